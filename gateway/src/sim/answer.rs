//! Deterministic answers: the same model and messages always give the same text and tool calls.

use std::io;

use serde_json::{Map, Value};

use super::config::Quality;
use super::reply;

/// A stable 64-bit FNV-1a, so answers do not change with the Rust version (std's hasher may).
pub(crate) struct Fnv64(u64);

impl Fnv64 {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

impl io::Write for Fnv64 {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// SplitMix64: tiny, stable and good enough to pick sentences.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The seed of every answer to this conversation. Messages are hashed in their serialized form;
/// serde_json's maps are sorted, so key order in the request does not matter.
pub(crate) fn conversation_seed(model: &str, messages: &[Value]) -> u64 {
    let mut hasher = Fnv64::new();
    hasher.update(model.as_bytes());
    hasher.update(&[0xff]);
    // Writing into the hasher cannot fail, and neither can serializing a `Value`.
    let _ = serde_json::to_writer(&mut hasher, messages);
    hasher.finish()
}

fn choice_seed(seed: u64, choice: usize, salt: u64) -> u64 {
    seed ^ (choice as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt
}

/// Words in a message `content`: a string, or an array of text (or refusal) parts.
pub(crate) fn count_words(content: Option<&Value>) -> usize {
    match content {
        Some(Value::String(text)) => text.split_whitespace().count(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(part_text)
            .map(|text| text.split_whitespace().count())
            .sum(),
        _ => 0,
    }
}

/// The text of a message `content`, parts joined by a space.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(part_text)
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn part_text(part: &Value) -> Option<&str> {
    part.get("text")
        .or_else(|| part.get("refusal"))
        .and_then(Value::as_str)
}

pub(crate) fn role(message: &Value) -> Option<&str> {
    message.get("role").and_then(Value::as_str)
}

/// Roughly what a tokenizer would count: a word per token plus 3 per message, as the brief asks.
pub(crate) fn prompt_tokens(messages: &[Value]) -> u64 {
    messages
        .iter()
        .map(|message| count_words(message.get("content")) as u64 + 3)
        .sum()
}

/// About four characters per token, at least one.
pub(crate) fn approx_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// What the last user message asked, or an empty string.
pub(crate) fn last_user_text(messages: &[Value]) -> String {
    messages
        .iter()
        .rev()
        .find(|message| role(message) == Some("user"))
        .map(|message| content_text(message.get("content")))
        .unwrap_or_default()
}

/// A text answer of exactly `words` words, cut to `limit` words when that is smaller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TextAnswer {
    /// Words separated by single spaces, with no leading or trailing space.
    pub(crate) content: String,
    pub(crate) words: usize,
    /// Cut by the request's token limit: finish with `length`.
    pub(crate) truncated: bool,
}

pub(crate) fn text_answer(
    seed: u64,
    choice: usize,
    quality: Quality,
    words: usize,
    limit: Option<usize>,
    messages: &[Value],
) -> TextAnswer {
    let budget = limit.map_or(words, |limit| limit.min(words));
    let mut out = WordBudget::new(budget);
    let mut rng = SplitMix64::new(choice_seed(seed, choice, 0x7465_7874));
    let tool_result = match messages.last() {
        Some(last) if role(last) == Some("tool") => Some(content_text(last.get("content"))),
        _ => None,
    };
    match quality {
        Quality::Good => good_answer(
            &mut out,
            &mut rng,
            &last_user_text(messages),
            tool_result.as_deref(),
        ),
        Quality::Poor => poor_answer(&mut out, &mut rng, tool_result.as_deref()),
    }
    TextAnswer {
        words: out.count,
        content: out.text,
        truncated: budget < words,
    }
}

const GOOD_SENTENCES: &[&str] = &[
    "The key point about {k} is that it follows well understood principles.",
    "In practice {k} matters because it shapes the outcome in most real cases.",
    "A good first step with {k} is to check the main assumptions against the evidence.",
    "For example, when {k} changes the result changes in a predictable way.",
    "Experts usually compare {k} with related ideas to explain the trade-offs clearly.",
    "In short, focus on {k} first and then refine the details step by step.",
];

const POOR_SENTENCES: &[&str] = &[
    "It depends on many things.",
    "There could be several answers to that.",
    "Maybe try searching for more information.",
    "I cannot say for certain.",
    "Please ask again later.",
    "That is hard to say.",
];

const STOP_WORDS: &[&str] = &[
    "about", "after", "also", "been", "being", "could", "does", "doing", "from", "have", "into",
    "just", "like", "made", "make", "more", "most", "much", "please", "should", "some", "than",
    "that", "their", "them", "then", "there", "these", "they", "this", "those", "what", "when",
    "where", "which", "while", "with", "would", "your",
];

fn good_answer(
    out: &mut WordBudget,
    rng: &mut SplitMix64,
    question: &str,
    tool_result: Option<&str>,
) {
    let keywords = keywords(question);
    let topic = if keywords.is_empty() {
        "this topic".to_owned()
    } else {
        keywords[..keywords.len().min(4)].join(" ")
    };
    if let Some(result) = tool_result {
        out.push(&format!(
            "According to the tool result, {}.",
            excerpt(result, 16)
        ));
        out.push("Based on that result, here is the answer.");
    } else if question.split_whitespace().next().is_some() {
        out.push(&format!("You asked: {}", as_sentence(question, 16)));
        out.push("Here is a clear answer.");
    } else {
        out.push("Here is a clear answer to your request.");
    }
    // The first sentence is about the whole topic, later ones about one keyword each.
    let mut subjects =
        std::iter::once(topic.as_str()).chain(keywords.iter().map(String::as_str).cycle());
    while !out.is_full() {
        let subject = subjects.next().unwrap_or(topic.as_str());
        let sentence = GOOD_SENTENCES[rng.below(GOOD_SENTENCES.len())];
        out.push(&sentence.replace("{k}", subject));
    }
}

fn poor_answer(out: &mut WordBudget, rng: &mut SplitMix64, tool_result: Option<&str>) {
    if let Some(result) = tool_result {
        out.push(&format!("The tool said {}.", excerpt(result, 8)));
    }
    out.push("I am not sure. Please ask again.");
    while !out.is_full() {
        out.push(POOR_SENTENCES[rng.below(POOR_SENTENCES.len())]);
    }
}

/// The first `max` words of `text`, without trailing sentence punctuation.
fn excerpt(text: &str, max: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().take(max).collect();
    words
        .join(" ")
        .trim_end_matches(['.', '?', '!', ',', ';', ':'])
        .to_owned()
}

/// The first `max` words of `text` as a sentence: its own final punctuation, or a full stop.
fn as_sentence(text: &str, max: usize) -> String {
    let mut sentence = text
        .split_whitespace()
        .take(max)
        .collect::<Vec<_>>()
        .join(" ");
    if !sentence.ends_with(['.', '?', '!']) {
        sentence.push('.');
    }
    sentence
}

/// Distinct content words of the question in order: acronyms as written, other words of four
/// letters or more in lowercase.
fn keywords(question: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for word in question.split_whitespace() {
        let word = word.trim_matches(|c: char| !c.is_alphanumeric());
        let is_acronym = word.chars().count() >= 2
            && word
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        let word = if is_acronym {
            word.to_owned()
        } else {
            word.to_lowercase()
        };
        let long_enough = is_acronym || word.chars().count() >= 4;
        if !long_enough || STOP_WORDS.contains(&word.as_str()) || found.contains(&word) {
            continue;
        }
        found.push(word);
        if found.len() == 6 {
            break;
        }
    }
    found
}

/// Collects whole words up to a fixed count.
struct WordBudget {
    text: String,
    count: usize,
    limit: usize,
}

impl WordBudget {
    fn new(limit: usize) -> Self {
        Self {
            text: String::with_capacity(limit * 8),
            count: 0,
            limit,
        }
    }

    fn is_full(&self) -> bool {
        self.count >= self.limit
    }

    fn push(&mut self, sentence: &str) {
        for word in sentence.split_whitespace() {
            if self.is_full() {
                return;
            }
            if self.count > 0 {
                self.text.push(' ');
            }
            self.text.push_str(word);
            self.count += 1;
        }
    }
}

/// One function call the model decided to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ToolCall {
    pub(crate) id: String,
    pub(crate) name: String,
    /// A JSON object, serialized: the wire carries it as a string.
    pub(crate) arguments: String,
}

/// Calls each of `functions` (the `function` objects of the chosen tools), with arguments
/// filled from the question so that they look like a real model's.
pub(crate) fn tool_calls(
    seed: u64,
    choice: usize,
    functions: &[&Map<String, Value>],
    question: &str,
) -> Vec<ToolCall> {
    let snippet = truncate_chars(question.trim(), 60);
    let mut rng = SplitMix64::new(choice_seed(seed, choice, 0x6361_6c6c));
    functions
        .iter()
        .map(|function| ToolCall {
            id: reply::derived_id("call_", 24, || rng.next_u64()),
            name: function
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            arguments: arguments_for(function, snippet),
        })
        .collect()
}

fn arguments_for(function: &Map<String, Value>, snippet: &str) -> String {
    let mut arguments = Map::new();
    match function.get("parameters") {
        // No schema at all: a single free-text argument.
        None | Some(Value::Null) => {
            arguments.insert("query".to_owned(), Value::String(snippet.to_owned()));
        }
        Some(parameters) => {
            if let Some(properties) = parameters.get("properties").and_then(Value::as_object) {
                for (name, schema) in properties {
                    arguments.insert(name.clone(), sample(schema, snippet, 0));
                }
            }
        }
    }
    Value::Object(arguments).to_string()
}

/// A plausible value for a JSON-Schema property.
fn sample(schema: &Value, snippet: &str, depth: usize) -> Value {
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|values| values.first())
    {
        return first.clone();
    }
    let kind = match schema.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        // `["string", "null"]` and the like: take the first non-null type.
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|kind| *kind != "null")
            .unwrap_or("string"),
        _ => "string",
    };
    match kind {
        "integer" => Value::from(3),
        "number" => Value::from(1.5),
        "boolean" => Value::Bool(true),
        "null" => Value::Null,
        "array" if depth < 4 => match schema.get("items") {
            Some(items) => Value::Array(vec![sample(items, snippet, depth + 1)]),
            None => Value::Array(Vec::new()),
        },
        "object" if depth < 4 => {
            let mut object = Map::new();
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (name, property) in properties {
                    object.insert(name.clone(), sample(property, snippet, depth + 1));
                }
            }
            Value::Object(object)
        }
        "array" => Value::Array(Vec::new()),
        "object" => Value::Object(Map::new()),
        _ => Value::String(snippet.to_owned()),
    }
}

fn truncate_chars(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn messages(question: &str) -> Vec<Value> {
        vec![
            json!({"role": "system", "content": "You are helpful."}),
            json!({"role": "user", "content": question}),
        ]
    }

    #[test]
    fn same_conversation_same_answer() {
        let m = messages("How do volcanoes form under the ocean?");
        let seed = conversation_seed("gpt-4o", &m);
        let a = text_answer(seed, 0, Quality::Good, 30, None, &m);
        let b = text_answer(
            conversation_seed("gpt-4o", &m),
            0,
            Quality::Good,
            30,
            None,
            &m,
        );
        assert_eq!(a, b);
        assert_eq!(a.words, 30);
        assert_eq!(a.content.split(' ').count(), 30);
        assert!(!a.content.starts_with(' ') && !a.content.ends_with(' '));
    }

    #[test]
    fn seed_depends_on_model_and_messages_not_key_order() {
        let m = messages("Explain tides.");
        let reordered = vec![
            json!({"content": "You are helpful.", "role": "system"}),
            json!({"content": "Explain tides.", "role": "user"}),
        ];
        assert_eq!(
            conversation_seed("a", &m),
            conversation_seed("a", &reordered)
        );
        assert_ne!(conversation_seed("a", &m), conversation_seed("b", &m));
        assert_ne!(
            conversation_seed("a", &m),
            conversation_seed("a", &messages("Explain waves."))
        );
    }

    #[test]
    fn good_refers_to_the_question_and_poor_does_not() {
        let m = messages("How do volcanoes form under the ocean?");
        let seed = conversation_seed("m", &m);
        let good = text_answer(seed, 0, Quality::Good, 40, None, &m).content;
        let poor = text_answer(seed, 0, Quality::Poor, 40, None, &m).content;
        assert!(good.contains("volcanoes"), "{good}");
        assert!(!poor.contains("volcanoes"), "{poor}");
        assert!(
            poor.starts_with("I am not sure. Please ask again."),
            "{poor}"
        );
    }

    #[test]
    fn limit_truncates_and_marks_it() {
        let m = messages("Why is the sky blue?");
        let seed = conversation_seed("m", &m);
        let full = text_answer(seed, 0, Quality::Good, 20, None, &m);
        let cut = text_answer(seed, 0, Quality::Good, 20, Some(5), &m);
        assert!(!full.truncated);
        assert!(cut.truncated);
        assert_eq!(cut.words, 5);
        assert!(full.content.starts_with(&cut.content));
        assert!(!text_answer(seed, 0, Quality::Good, 20, Some(20), &m).truncated);
    }

    #[test]
    fn answer_after_a_tool_mentions_its_result() {
        let m = vec![
            json!({"role": "user", "content": "Weather in Paris?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]}),
            json!({"role": "tool", "tool_call_id": "call_1", "content": "Sunny and 22C"}),
        ];
        let answer = text_answer(conversation_seed("m", &m), 0, Quality::Good, 30, None, &m);
        assert!(
            answer.content.contains("Sunny and 22C"),
            "{}",
            answer.content
        );
    }

    #[test]
    fn choices_differ_but_each_is_stable() {
        let m = messages("Describe the water cycle in detail.");
        let seed = conversation_seed("m", &m);
        let first = text_answer(seed, 0, Quality::Good, 60, None, &m);
        let second = text_answer(seed, 1, Quality::Good, 60, None, &m);
        assert_ne!(first.content, second.content);
        assert_eq!(second, text_answer(seed, 1, Quality::Good, 60, None, &m));
    }

    #[test]
    fn arguments_follow_the_schema() {
        let function = json!({
            "name": "search",
            "parameters": {"type": "object", "properties": {
                "q": {"type": "string"},
                "limit": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "exact": {"type": "boolean"}
            }}
        });
        let function = function.as_object().unwrap();
        let calls = tool_calls(1, 0, &[function], "  find cheap flights to Lisbon  ");
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(
            args,
            json!({"q": "find cheap flights to Lisbon", "limit": 3, "unit": "celsius", "exact": true})
        );
        assert_eq!(calls[0].name, "search");
        assert!(calls[0].id.starts_with("call_"));
        assert_eq!(
            calls,
            tool_calls(1, 0, &[function], "  find cheap flights to Lisbon  ")
        );
    }

    #[test]
    fn arguments_without_a_schema_carry_the_question_cut_on_a_char_boundary() {
        let function = json!({"name": "lookup"});
        let question = "é".repeat(100);
        let calls = tool_calls(1, 0, &[function.as_object().unwrap()], &question);
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(args["query"].as_str().unwrap().chars().count(), 60);
    }
}
