//! A fake judge: a request that opens with a grading rubric gets a score, not an answer.
//!
//! Real judge models read a rubric and reply with a number. This one scores how much of the
//! question's content the ANSWER addresses, which separates the simulated teacher's informative
//! answers (they echo the question's keywords) from a weak model's generic ones.

use serde_json::Value;

use super::answer;

/// The opening a grading request's system message has (Forge's rubric starts this way).
const RUBRIC_OPENING: &str = "You are a strict grader";

/// The score to reply with, when the messages are a grading request.
pub(crate) fn score(messages: &[Value]) -> Option<u32> {
    let system = messages
        .first()
        .filter(|m| answer::role(m) == Some("system"))?;
    if !answer::content_text(system.get("content")).starts_with(RUBRIC_OPENING) {
        return None;
    }
    let user = answer::last_user_text(messages);
    let question = section(&user, "QUESTION:", "ANSWER:");
    let reply = section(&user, "ANSWER:", "REFERENCE:");
    let wanted = content_words(question);
    if wanted.is_empty() {
        return Some(50);
    }
    let got = content_words(reply);
    let covered = wanted.iter().filter(|w| got.contains(*w)).count() as f64 / wanted.len() as f64;
    Some((30.0 + 70.0 * covered).round() as u32)
}

fn section<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let Some(from) = text.find(start).map(|i| i + start.len()) else {
        return "";
    };
    let rest = &text[from..];
    rest.find(end).map_or(rest, |to| &rest[..to])
}

fn content_words(text: &str) -> Vec<String> {
    let mut words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 5)
        .map(str::to_lowercase)
        .collect();
    words.sort();
    words.dedup();
    words
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn grading(answer: &str) -> Vec<Value> {
        vec![
            json!({"role": "system", "content": "You are a strict grader of assistant answers. Reply with the number only."}),
            json!({"role": "user", "content": format!("QUESTION:\nHow does TCP congestion control work?\n\nANSWER:\n{answer}")}),
        ]
    }

    #[test]
    fn informative_answers_score_high_and_generic_ones_low() {
        let good = score(&grading(
            "TCP congestion control slows senders: the congestion window shrinks on loss.",
        ))
        .unwrap();
        let poor = score(&grading("I am not sure. Please ask again.")).unwrap();
        assert!(good > 90, "{good}");
        assert!(poor < 50, "{poor}");
        assert_eq!(
            score(&[json!({"role": "user", "content": "hello"})]),
            None,
            "not a grading request"
        );
    }
}
