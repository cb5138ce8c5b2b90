//! The evaluation gate: replay held-out prompts to the student and score its answers against
//! the teacher's.

use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::BoxFuture;
use crate::reassemble::AssistantMessage;

/// Sends one chat completion to a model on a Forge upstream, for the gate and the judge.
pub trait ChatClient: Send + Sync + std::fmt::Debug {
    /// The assistant's answer: its text, or its tool calls rendered as JSON.
    fn complete<'a>(
        &'a self,
        upstream: &'a str,
        model: &'a str,
        messages: &'a Value,
        tools: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<String, ChatError>>;
}

/// Why a chat call failed, and whether the same request could succeed later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatError {
    /// What went wrong, for logs and job reasons.
    pub message: String,
    /// `true` when the model refused this request itself (a 400, say: too long for its
    /// context), so that sending it again would be refused again; `false` when the call may
    /// succeed later (unreachable, rate-limited, a 5xx, Forge's key refused, the model not
    /// deployed yet), which says nothing about the request.
    pub refused: bool,
}

impl ChatError {
    /// A failure that may pass: try the same request again later.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            refused: false,
        }
    }

    /// A refusal of this request, which the same request would get again.
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            refused: true,
        }
    }
}

impl std::fmt::Display for ChatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// How an answer is compared with the teacher's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalMethod {
    /// 100 when equal (after trimming), else 0.
    Exact,
    /// Word-overlap F1 × 100.
    Similarity,
    /// The judge model scores the student's answer against the teacher's, 0–100.
    Judge,
}

/// One held-out example: the prompt and the teacher's answer.
#[derive(Debug, Clone)]
pub struct HeldOut {
    /// The messages before the answer.
    pub messages: Value,
    /// The line-level tools, if any.
    pub tools: Option<Value>,
    /// The teacher's answer as text (tool calls as JSON).
    pub reference: String,
}

/// Reads up to `max` held-out examples from a dataset file.
pub fn held_out(path: &Path, max: usize) -> std::io::Result<Vec<HeldOut>> {
    let file = std::fs::File::open(path)?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        if out.len() >= max {
            break;
        }
        let Ok(line) = serde_json::from_str::<Value>(&line?) else {
            continue;
        };
        let Some(mut messages) = line["messages"].as_array().cloned() else {
            continue;
        };
        let Some(answer) = messages.pop() else {
            continue;
        };
        // Earlier assistant turns carry `weight`, which chat requests do not accept.
        for m in &mut messages {
            if let Some(obj) = m.as_object_mut() {
                obj.remove("weight");
            }
        }
        out.push(HeldOut {
            messages: Value::Array(messages),
            tools: line.get("tools").cloned(),
            reference: reference_text(&answer),
        });
    }
    Ok(out)
}

/// The teacher's answer in a dataset line as text, rendered as the student's answer is
/// ([`AssistantMessage::answer_text`]): its content, or else its tool calls as JSON, also when
/// an empty content stands beside them.
fn reference_text(message: &Value) -> String {
    serde_json::from_value::<AssistantMessage>(message.clone())
        .map(|m| m.answer_text())
        .unwrap_or_else(|_| text_of(message.get("content")))
}

/// A message's content as text: the string, or its text parts one after another.
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// 100 when the answer is the reference, else 0: the same text after trimming, or the same
/// calls, by name and arguments as JSON (not by id: every response makes up its own ids, and
/// not by key order, which differs between a stored line and a fresh answer).
pub fn exact_score(answer: &str, reference: &str) -> f64 {
    let same = match (calls_of(answer), calls_of(reference)) {
        (Some(a), Some(r)) => a == r,
        _ => answer.trim() == reference.trim(),
    };
    if same { 100.0 } else { 0.0 }
}

/// Tool calls rendered as JSON, as `(name, arguments)`; `None` for any other text.
fn calls_of(text: &str) -> Option<Vec<(String, Value)>> {
    let calls = serde_json::from_str::<Value>(text.trim()).ok()?;
    let calls: Vec<&Value> = match &calls {
        Value::Array(calls) => calls.iter().collect(),
        // A deprecated `function_call`: one call, not in a list.
        call @ Value::Object(_) => vec![call],
        _ => return None,
    };
    calls
        .into_iter()
        .map(|call| {
            let function = call.get("function").unwrap_or(call);
            let name = function.get("name")?.as_str()?.to_owned();
            let arguments = function.get("arguments")?.as_str()?;
            let arguments = serde_json::from_str(arguments)
                .unwrap_or_else(|_| Value::String(arguments.to_owned()));
            Some((name, arguments))
        })
        .collect()
}

fn words(text: &str) -> std::collections::HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Word-overlap F1 between two texts, 0–100. Every word counts, short ones too: an answer of
/// "12" against "42" is wrong, not empty.
pub fn similarity(answer: &str, reference: &str) -> f64 {
    let (a, r) = (words(answer), words(reference));
    if a.is_empty() || r.is_empty() {
        // Two answers with no words (both empty, or only punctuation) are the same only when
        // their text is.
        return if a.is_empty() && r.is_empty() && answer.trim() == reference.trim() {
            100.0
        } else {
            0.0
        };
    }
    let common = a.intersection(&r).count() as f64;
    let (precision, recall) = (common / a.len() as f64, common / r.len() as f64);
    if common == 0.0 {
        0.0
    } else {
        200.0 * precision * recall / (precision + recall)
    }
}

/// The rubric the judge model gets; it must answer with a number from 0 to 100.
pub const JUDGE_RUBRIC: &str = "You are a strict grader of assistant answers. Score the ANSWER to the QUESTION from 0 to 100 for correctness, helpfulness and relevance; if a REFERENCE answer is given, compare with it. Reply with the number only.";

/// The judge's request for one answer.
pub fn judge_messages(question: &str, answer: &str, reference: Option<&str>) -> Value {
    let mut user = format!("QUESTION:\n{question}\n\nANSWER:\n{answer}");
    if let Some(r) = reference {
        user.push_str(&format!("\n\nREFERENCE:\n{r}"));
    }
    serde_json::json!([{"role": "system", "content": JUDGE_RUBRIC}, {"role": "user", "content": user}])
}

/// The score in the judge's reply, 0–100. The rubric asks for the number alone, but judges
/// wrap it (`**87**`, `Score: 87/100`, `87 out of 100`, `8/10`) and add reasons, lists and
/// arithmetic with numbers of their own. The score is, in order: the number after the last
/// `Score:` (or `Overall:`, `Rating:`, `Grade:`) label that ends there; the number the reply
/// opens with, when nothing but its scale and a line break or a closing stop follows it; or the
/// reply's only number. A scale (`/100`, `out of 100`, `/10`, read as tenths) is never the score.
/// Anything else is no score, as is a negative number, one past 100, or a fraction below 10 with
/// no scale (`9.5`, `.85`: another scale): a wrong guess could make a trace golden.
pub fn parse_score(reply: &str) -> Option<f64> {
    let numbers = numbers_in(reply);
    let at = |offset: usize| numbers.iter().find(|n| n.start == offset);
    // The last labelled score: judges that explain first give their verdict last.
    let labelled = label_ends(reply)
        .filter_map(at)
        .filter(|n| n.alone >= Alone::Loosely)
        .last();
    if let Some(number) = labelled {
        return number.in_range();
    }
    let opening = reply.len()
        - reply
            .trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '*' | '#' | '_' | '`'))
            .len();
    if let Some(number) = at(opening).filter(|n| n.alone == Alone::Strictly) {
        return number.in_range();
    }
    let first = numbers.first()?;
    let only = numbers.iter().all(|n| n.score() == first.score());
    (only && first.alone >= Alone::Loosely)
        .then(|| first.in_range())
        .flatten()
}

/// The offsets just past each `Score:`-like label in `reply`, in order: the word (any case),
/// then `:` or `=`, with spaces and markdown around them.
fn label_ends(reply: &str) -> impl Iterator<Item = usize> {
    const LABELS: &[&str] = &["score", "overall", "rating", "grade"];
    let decoration = |c: char| c.is_whitespace() || matches!(c, '*' | '_' | '`');
    let lower = reply.to_ascii_lowercase();
    let mut ends = Vec::new();
    for label in LABELS {
        for (at, _) in lower.match_indices(label) {
            let after = reply[at + label.len()..].trim_start_matches(decoration);
            if let Some(after) = after.strip_prefix([':', '=']) {
                ends.push(reply.len() - after.trim_start_matches(decoration).len());
            }
        }
    }
    ends.sort_unstable();
    ends.into_iter()
}

/// How a number stands in its reply, by what follows it (after its scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Alone {
    /// More words follow (`3 sources`, `1. Correctness`, `1) Correct`, `100 - 15`, `4/5`).
    No,
    /// Punctuation follows, then more (`95, with 3 errors`, `85 (good)`).
    Loosely,
    /// Nothing follows on its line but a stop, or a comment after a dash (`87`, `87.`,
    /// `87/100 - good`).
    Strictly,
}

impl Alone {
    /// How a number followed by `tail` stands.
    fn of(tail: &str) -> Alone {
        const DECORATION: [char; 5] = [' ', '\t', '*', '`', '_'];
        let tail = tail.trim_start_matches(DECORATION);
        let Some(next) = tail.chars().next() else {
            return Alone::Strictly;
        };
        let rest = tail[next.len_utf8()..].trim_start_matches(DECORATION);
        let line_ends = rest.is_empty() || rest.starts_with(['\n', '\r']);
        match next {
            '\n' | '\r' => Alone::Strictly,
            '.' | ',' | '!' | '%' | ';' if line_ends => Alone::Strictly,
            '.' | ',' | '!' | '%' | ';' | '(' => Alone::Loosely,
            // A comment after a dash; not arithmetic or a range (`100 - 15`, `80-90`).
            '-' | '–' | '—' if !rest.starts_with(|c: char| c.is_ascii_digit()) => {
                Alone::Strictly
            }
            _ => Alone::No,
        }
    }
}

/// A number in a judge's reply.
#[derive(Debug)]
struct Number {
    value: f64,
    /// Byte offset of its first digit (or of the `.` before it).
    start: usize,
    /// Preceded by a minus sign (not a hyphen inside a word: `GPT-4`).
    negative: bool,
    /// The scale written after it: `/100` or `out of 100`; `/10` or `out of 10`.
    scale: Option<Scale>,
    /// How it stands: by itself, or inside more words.
    alone: Alone,
}

impl Number {
    /// The value on a 0–100 scale.
    fn score(&self) -> f64 {
        match self.scale {
            Some(Scale::Ten) => self.value * 10.0,
            Some(Scale::Hundred) | None => self.value,
        }
    }

    /// The score, if it can be one: 0–100, not negative, and not a fraction below 10 with no
    /// scale, which is a score on some other scale.
    fn in_range(&self) -> Option<f64> {
        let other_scale = self.scale.is_none() && self.value < 10.0 && self.value.fract() != 0.0;
        let score = self.score();
        (!self.negative && !other_scale && (0.0..=100.0).contains(&score)).then_some(score)
    }
}

/// A scale a judge writes beside its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    Hundred,
    Ten,
}

/// The numbers in `reply`, with each scale read as part of the number before it and a scale
/// with none before it (`Out of 100, …`) left out.
fn numbers_in(reply: &str) -> Vec<Number> {
    let bytes = reply.as_bytes();
    let mut numbers = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let b = bytes[at];
        let decimal_start = b == b'.' && bytes.get(at + 1).is_some_and(u8::is_ascii_digit);
        if !b.is_ascii_digit() && !decimal_start {
            at += 1;
            continue;
        }
        // Part of a word or name (`gpt4o`, `step2`): not a number of its own.
        let glued = at > 0 && bytes[at - 1].is_ascii_alphabetic();
        let start = at;
        let len = reply[at..]
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(reply.len() - at);
        let text = reply[at..at + len].trim_end_matches('.');
        at += len;
        let negative = start > 0
            && bytes[start - 1] == b'-'
            && (start < 2 || !bytes[start - 2].is_ascii_alphanumeric());
        if glued || ends_with_out_of(reply[..start].trim_end()) {
            continue;
        }
        let Ok(value) = text.parse::<f64>() else {
            continue;
        };
        let (scale, scale_len) = scale_after(&reply[start + text.len()..]);
        let tail = &reply[start + text.len() + scale_len..];
        let alone = Alone::of(tail);
        at = at.max(start + text.len() + scale_len);
        numbers.push(Number {
            value,
            start,
            negative,
            scale,
            alone,
        });
    }
    numbers
}

/// `text` after an opening `out of` (any case).
fn strip_out_of(text: &str) -> Option<&str> {
    let (head, rest) = (text.get(..OUT_OF.len())?, text.get(OUT_OF.len()..)?);
    head.eq_ignore_ascii_case(OUT_OF).then_some(rest)
}

/// Whether `text` ends with `out of` (any case): the number after it is a scale.
fn ends_with_out_of(text: &str) -> bool {
    text.len()
        .checked_sub(OUT_OF.len())
        .and_then(|at| text.get(at..))
        .is_some_and(|tail| tail.eq_ignore_ascii_case(OUT_OF))
}

const OUT_OF: &str = "out of";

/// The scale at the start of `text` (`/100`, ` / 10`, ` out of 100`, ` (out of 100)`), and
/// how many bytes it takes.
fn scale_after(text: &str) -> (Option<Scale>, usize) {
    let trimmed = text.trim_start();
    let (rest, opened) = match trimmed.strip_prefix('(') {
        Some(rest) => (rest.trim_start(), true),
        None => (trimmed, false),
    };
    let rest = if let Some(r) = rest.strip_prefix('/') {
        r.trim_start()
    } else if let Some(r) = strip_out_of(rest) {
        r.trim_start()
    } else {
        return (None, 0);
    };
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let scale = match &rest[..digits] {
        "100" => Scale::Hundred,
        "10" => Scale::Ten,
        _ => return (None, 0),
    };
    let mut end = &rest[digits..];
    if opened {
        match end.trim_start().strip_prefix(')') {
            Some(after) => end = after,
            None => return (None, 0),
        }
    }
    (Some(scale), text.len() - end.len())
}

/// The last user message's text, for the judge's QUESTION.
pub fn question_of(messages: &Value) -> String {
    messages
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| text_of(m.get("content")))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn similarity_and_score_parsing() {
        assert_eq!(
            similarity("the cat sat on the mat", "the cat sat on the mat"),
            100.0
        );
        assert_eq!(
            similarity("completely different words", "nothing shared here"),
            0.0
        );
        let partial = similarity(
            "rust borrow checker rules",
            "the rust borrow checker explained",
        );
        assert!(partial > 40.0 && partial < 100.0, "{partial}");
        // Every word counts: a short answer that is wrong scores nothing.
        assert_eq!(similarity("12", "42"), 0.0);
        assert_eq!(similarity("12 apples", "42 apples"), 50.0);
        assert_eq!(similarity("42", "42"), 100.0);
        assert_eq!(similarity("", "42"), 0.0);
        assert_eq!(similarity("", ""), 100.0);
        assert_eq!(similarity("?", "!"), 0.0);
    }

    #[test]
    fn a_score_is_read_only_when_the_reply_names_one() {
        for (reply, score) in [
            ("87", Some(87.0)),
            ("85\n", Some(85.0)),
            ("**85**", Some(85.0)),
            ("85.0", Some(85.0)),
            ("100", Some(100.0)),
            ("0", Some(0.0)),
            ("0/100", Some(0.0)),
            ("95%", Some(95.0)),
            ("Score: 87", Some(87.0)),
            ("Score:95", Some(95.0)),
            ("**Score:** 90", Some(90.0)),
            ("Rating: 88", Some(88.0)),
            ("92.5/100", Some(92.5)),
            ("Score: 87/100.", Some(87.0)),
            ("Score: 85 / 100", Some(85.0)),
            ("Score: 95 (out of 100)", Some(95.0)),
            ("Score: 85 (good)", Some(85.0)),
            ("95 Out of 100", Some(95.0)),
            ("I'd give it 90 out of 100", Some(90.0)),
            ("I rate this 8/10", Some(80.0)),
            ("I'd rate it 9 out of 10", Some(90.0)),
            ("Score: 8/10", Some(80.0)),
            ("The answer is correct and complete. 95", Some(95.0)),
            // The score, then reasons with numbers of their own.
            ("Score: 85/100 - the answer is good", Some(85.0)),
            ("95 - the answer correctly says 2+2=4", Some(95.0)),
            ("95/100\n\nThe answer covers all 3 points.", Some(95.0)),
            ("Score: 92\n\nStep 1 and step 2 are right.", Some(92.0)),
            ("Score: 95, with 3 errors", Some(95.0)),
            (
                "Score: 95. Compared with GPT-4 style answers it is good.",
                Some(95.0),
            ),
            ("95. It is 95 because it is right.", Some(95.0)),
            // Reasons first, in a numbered list, then the verdict.
            (
                "1. Correctness: the answer is right.\n2. Completeness: it misses one case.\n\nScore: 70",
                Some(70.0),
            ),
            (
                "### 1. Accuracy\nThe answer is accurate.\n\nScore: 70",
                Some(70.0),
            ),
            ("1) Correct\n2) Complete\nScore: 60", Some(60.0)),
            (
                "Score: 10/10 for accuracy, 4/10 for completeness. Overall: 70",
                Some(70.0),
            ),
            (
                "Score: 85\nOn reflection, one step is wrong.\nFinal score: 60",
                Some(60.0),
            ),
            // The scale first, then the score.
            ("Out of 100, I'd give this answer a 20.", Some(20.0)),
            // Arithmetic, ranges, hypotheticals, counts, other scales: no telling.
            ("100 - 15 (missing edge case) = 85", None),
            ("Score: 100 - 20 for the missing step = 80", None),
            ("0-100 scale: 75", None),
            ("80-90", None),
            (
                "A perfect score of 100 would require citing the source; I give it 70.",
                None,
            ),
            ("The reference would score 100; this answer gets 60.", None),
            ("The answer cites 3 sources and is mostly right.", None),
            ("2 out of 3 criteria are met, so 60", None),
            ("It gets 70, or maybe 80", None),
            ("Score: 4/5", None),
            ("Score: 19/20", None),
            ("Score (0-100): 85", None),
            ("Score: 1e2", None),
            ("9.5", None),
            (".85", None),
            ("-3", None),
            ("Score: -3", None),
            ("I'd say 140", None),
            ("gpt-4o would score this 85, gpt4 less", None),
            ("no idea", None),
            ("", None),
        ] {
            assert_eq!(parse_score(reply), score, "{reply:?}");
        }
    }

    proptest::proptest! {
        /// Any reply, of any characters: a score from 0 to 100, or none, never a panic.
        #[test]
        fn any_reply_gives_a_score_in_range_or_none(reply in "(?s).{0,80}|[0-9 ./()%*:a-zA-Z\\n-]{0,40}") {
            if let Some(score) = parse_score(&reply) {
                proptest::prop_assert!((0.0..=100.0).contains(&score), "{reply:?}: {score}");
            }
        }
    }

    #[test]
    fn an_exact_match_of_calls_ignores_ids_and_key_order() {
        let stored = json!({"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]});
        // The line's answer is rendered as the student's is: the calls, not the empty content.
        let reference = reference_text(&stored);
        assert!(reference.contains("get_weather"), "{reference}");
        let student = AssistantMessage {
            tool_calls: vec![crate::reassemble::ToolCall {
                id: "call_9".into(),
                kind: "function".into(),
                function: crate::reassemble::FunctionCall {
                    name: "get_weather".into(),
                    arguments: "{\"city\":\"Paris\"}".into(),
                },
            }],
            ..Default::default()
        }
        .answer_text();
        assert_eq!(exact_score(&student, &reference), 100.0);
        let other_city = student.replace("Paris", "Rome");
        assert_eq!(exact_score(&other_city, &reference), 0.0);
        assert_eq!(exact_score(" Paris. ", "Paris."), 100.0);
        assert_eq!(exact_score("Paris", "Rome"), 0.0);
    }

    #[test]
    fn the_question_of_content_parts_is_their_text() {
        let messages = json!([
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}, {"type": "text", "text": "2+2?"}]}
        ]);
        assert_eq!(question_of(&messages), "What is\n2+2?");
    }
}
