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
/// often wrap it: `Score: 87`, `92.5/100`, `87 out of 100`. A reply whose numbers disagree
/// (`Out of 100, I'd give it 20`) has no score: a wrong guess could make a trace golden. A
/// number past 100, or below 0, is no score either.
pub fn parse_score(reply: &str) -> Option<f64> {
    let mut scores = Vec::new();
    let mut rest = reply;
    while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
        let negative = rest[..start].ends_with('-');
        let tail = &rest[start..];
        let len = tail
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(tail.len());
        let number = tail[..len].trim_end_matches('.');
        let after = tail[len..].trim_start();
        rest = &tail[len..];
        // The scale itself, written after a score: `/100`, `out of 100`.
        if after.starts_with("/100") || after.starts_with("out of 100") {
            rest = after
                .trim_start_matches("/100")
                .trim_start_matches("out of 100");
        }
        let value = number.parse::<f64>().ok().filter(|_| !negative)?;
        if !(0.0..=100.0).contains(&value) {
            return None;
        }
        scores.push(value);
    }
    scores.dedup();
    match scores.as_slice() {
        [score] => Some(*score),
        _ => None,
    }
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
        assert_eq!(similarity("42", "42"), 100.0);
        assert_eq!(similarity("", "42"), 0.0);
        assert_eq!(similarity("", ""), 100.0);
        assert_eq!(similarity("?", "!"), 0.0);
    }

    #[test]
    fn a_score_is_read_only_when_the_reply_names_one() {
        for (reply, score) in [
            ("87", Some(87.0)),
            ("Score: 87", Some(87.0)),
            ("92.5/100", Some(92.5)),
            ("Score: 87/100.", Some(87.0)),
            ("I'd give it 90 out of 100", Some(90.0)),
            ("100", Some(100.0)),
            ("0", Some(0.0)),
            ("9.5", Some(9.5)),
            ("95. It is 95 because it is right.", Some(95.0)),
            // The scale first, then the score: no guess.
            ("Out of 100, I'd give this answer a 20.", None),
            ("Score: 95, with 3 errors", None),
            ("-3", None),
            ("I'd say 140", None),
            ("no idea", None),
            ("", None),
        ] {
            assert_eq!(parse_score(reply), score, "{reply:?}");
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
