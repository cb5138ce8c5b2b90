//! The evaluation gate: replay held-out prompts to the student and score its answers against
//! the teacher's.

use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::BoxFuture;

/// Sends one chat completion to a model on a Forge upstream, for the gate and the judge.
pub trait ChatClient: Send + Sync + std::fmt::Debug {
    /// The assistant's answer: its text, or its tool calls rendered as JSON.
    fn complete<'a>(
        &'a self,
        upstream: &'a str,
        model: &'a str,
        messages: &'a Value,
        tools: Option<&'a Value>,
    ) -> BoxFuture<'a, Result<String, String>>;
}

/// How an answer is compared with the teacher's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalMethod {
    /// 100 when equal (after trimming), else 0.
    Exact,
    /// Word-overlap F1 × 100 (content words of three letters or more).
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
            reference: answer_text(&answer),
        });
    }
    Ok(out)
}

/// An assistant message as text: its content, or its tool calls as JSON.
pub fn answer_text(message: &Value) -> String {
    match message.get("content").and_then(Value::as_str) {
        Some(text) => text.to_string(),
        None => message
            .get("tool_calls")
            .map(Value::to_string)
            .unwrap_or_default(),
    }
}

fn words(text: &str) -> std::collections::HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 3)
        .map(str::to_lowercase)
        .collect()
}

/// Word-overlap F1 between two texts, 0–100.
pub fn similarity(answer: &str, reference: &str) -> f64 {
    let (a, r) = (words(answer), words(reference));
    if a.is_empty() || r.is_empty() {
        return if a.is_empty() && r.is_empty() {
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

/// The first number in the judge's reply, if it is within 0–100.
pub fn parse_score(reply: &str) -> Option<f64> {
    let start = reply.find(|c: char| c.is_ascii_digit())?;
    let number: String = reply[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    number
        .trim_end_matches('.')
        .parse::<f64>()
        .ok()
        .filter(|s| (0.0..=100.0).contains(s))
}

/// The last user message's text, for the judge's QUESTION.
pub fn question_of(messages: &Value) -> String {
    messages
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find(|m| m["role"] == "user")
        .map(answer_text)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
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
        assert_eq!(parse_score("Score: 87"), Some(87.0));
        assert_eq!(parse_score("92.5/100"), Some(92.5));
        assert_eq!(parse_score("I'd say 140"), None);
        assert_eq!(parse_score("no idea"), None);
    }
}
