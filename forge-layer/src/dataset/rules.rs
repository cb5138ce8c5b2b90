//! The OpenAI chat fine-tuning line rules, checked on every line before it is written.
//!
//! A line that breaks one is skipped and its reason counted, so one bad trace never fails an
//! upload that OpenAI would reject whole.

use std::collections::HashSet;

use serde_json::Value;

/// The longest example, in estimated tokens (gpt-4o-mini, gpt-4.1: 65,536).
pub const DEFAULT_MAX_TOKENS: usize = 65_536;

/// Checks one line; `Err` is the reason code counted in the report.
pub fn check(line: &Value, max_tokens: usize) -> Result<(), &'static str> {
    let obj = line.as_object().ok_or("not_an_object")?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "messages" | "tools" | "parallel_tool_calls") {
            return Err("unknown_line_key");
        }
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("missing_messages")?;
    if messages.is_empty() {
        return Err("missing_messages");
    }
    let mut call_ids = HashSet::new();
    let mut trained_answer = false;
    let mut chars = 0usize;
    for message in messages {
        let m = message.as_object().ok_or("bad_message")?;
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or("missing_role")?;
        let content = m.get("content");
        chars += content.map_or(0, content_chars) + 12;
        if m.get("name").is_some_and(|name| !name.is_string()) {
            return Err("bad_name");
        }
        match role {
            "system" | "user" => {
                check_keys(m, &["role", "content", "name"])?;
                check_content(content, role == "user")?;
            }
            "assistant" => {
                check_keys(m, &["role", "content", "name", "tool_calls", "weight"])?;
                let calls = m.get("tool_calls");
                match m.get("weight") {
                    None => trained_answer = true,
                    Some(w) if w == 1 => trained_answer = true,
                    Some(w) if w == 0 => {}
                    Some(_) => return Err("bad_weight"),
                }
                match calls {
                    Some(calls) => {
                        let calls = calls
                            .as_array()
                            .filter(|c| !c.is_empty())
                            .ok_or("bad_tool_call")?;
                        for call in calls {
                            call_ids.insert(check_tool_call(call)?);
                            chars += call.to_string().len();
                        }
                        if content.is_some_and(|c| !c.is_null() && !c.is_string()) {
                            return Err("bad_content");
                        }
                    }
                    None => check_content(content, false)?,
                }
            }
            "tool" => {
                check_keys(m, &["role", "content", "tool_call_id"])?;
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or("missing_tool_call_id")?;
                if !call_ids.contains(id) {
                    return Err("orphan_tool_message");
                }
                // A function that returns nothing answers with an empty string.
                if content.and_then(Value::as_str) != Some("") {
                    check_content(content, false)?;
                }
            }
            _ => return Err("unsupported_role"),
        }
    }
    if !trained_answer {
        return Err("no_trained_assistant_message");
    }
    if let Some(tools) = obj.get("tools") {
        for tool in tools.as_array().ok_or("bad_tools")? {
            if tool["type"] != "function" {
                return Err("bad_tools");
            }
            function_name(&tool["function"]["name"])?;
            check_function_definition(&tool["function"])?;
            chars += tool.to_string().len();
        }
    }
    if obj
        .get("parallel_tool_calls")
        .is_some_and(|v| !v.is_boolean())
    {
        return Err("bad_parallel_tool_calls");
    }
    // About four characters a token for English text, the usual estimate without a tokenizer.
    if chars / 4 > max_tokens {
        return Err("too_many_tokens");
    }
    Ok(())
}

/// The characters `content` counts for in the token estimate. An image part counts for the most
/// tokens an image costs (about 1,105 at high detail on gpt-4o), not for the length of its URL:
/// an inline image's base64 text would otherwise make any vision example too long.
fn content_chars(content: &Value) -> usize {
    const IMAGE_CHARS: usize = 1105 * 4;
    match content {
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part["type"].as_str() {
                Some("image_url") => IMAGE_CHARS,
                _ => part.to_string().len(),
            })
            .sum(),
        other => other.to_string().len(),
    }
}

fn check_keys(m: &serde_json::Map<String, Value>, allowed: &[&str]) -> Result<(), &'static str> {
    if m.keys().all(|k| allowed.contains(&k.as_str())) {
        Ok(())
    } else {
        Err("unknown_message_key")
    }
}

/// Content is a non-empty string, or a non-empty array of parts (`text`; `image_url` for users).
fn check_content(content: Option<&Value>, user: bool) -> Result<(), &'static str> {
    match content {
        Some(Value::String(s)) if !s.is_empty() => Ok(()),
        Some(Value::Array(parts)) if !parts.is_empty() => {
            for part in parts {
                match part["type"].as_str() {
                    Some("text") if part["text"].is_string() => {}
                    Some("image_url")
                        if user
                            && part["image_url"]["url"].is_string()
                            && part["image_url"].get("detail").is_none_or(|d| {
                                matches!(d.as_str(), Some("auto" | "low" | "high"))
                            }) => {}
                    _ => return Err("bad_content_part"),
                }
            }
            Ok(())
        }
        None | Some(Value::Null) => Err("missing_content"),
        _ => Err("bad_content"),
    }
}

fn check_tool_call(call: &Value) -> Result<String, &'static str> {
    let only = |v: &Value, keys: &[&str]| {
        v.as_object()
            .is_some_and(|o| o.keys().all(|k| keys.contains(&k.as_str())))
    };
    if !only(call, &["id", "type", "function"]) || !only(&call["function"], &["name", "arguments"])
    {
        return Err("bad_tool_call");
    }
    let id = call["id"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or("bad_tool_call")?;
    if call["type"] != "function" {
        return Err("bad_tool_call");
    }
    function_name(&call["function"]["name"])?;
    let args = call["function"]["arguments"]
        .as_str()
        .ok_or("bad_tool_call")?;
    serde_json::from_str::<Value>(args).map_err(|_| "tool_arguments_not_json")?;
    Ok(id.to_string())
}

/// A tool's `function` beyond its name: `parameters` a JSON Schema object, `description` a
/// string, `strict` a boolean, each optional. A request may carry `"parameters": null`, which
/// the chat API takes, but the fine-tuning API refuses the whole file for it.
fn check_function_definition(function: &Value) -> Result<(), &'static str> {
    let absent_or = |key: &str, ok: fn(&Value) -> bool| function.get(key).is_none_or(ok);
    if absent_or("parameters", Value::is_object)
        && absent_or("description", Value::is_string)
        && absent_or("strict", Value::is_boolean)
    {
        Ok(())
    } else {
        Err("bad_tools")
    }
}

/// `a-zA-Z0-9_-`, 1–64 characters.
fn function_name(name: &Value) -> Result<(), &'static str> {
    let name = name.as_str().ok_or("bad_function_name")?;
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err("bad_function_name") }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_inline_image_counts_as_image_tokens_not_as_its_base64_text() {
        let url = format!("data:image/jpeg;base64,{}", "A".repeat(400_000));
        let line = json!({"messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]},
            {"role": "assistant", "content": "A cat."}]});
        assert_eq!(check(&line, DEFAULT_MAX_TOKENS), Ok(()));
        // The text around it still counts.
        let long = json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "x".repeat(400_000)}]},
            {"role": "assistant", "content": "A cat."}]});
        assert_eq!(check(&long, DEFAULT_MAX_TOKENS), Err("too_many_tokens"));
    }

    #[test]
    fn good_lines_pass() {
        let plain = json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]});
        assert_eq!(check(&plain, DEFAULT_MAX_TOKENS), Ok(()));
        let tools = json!({
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}], "weight": 0},
                {"role": "tool", "tool_call_id": "call_1", "content": ""},
                {"role": "assistant", "content": "It is sunny."}
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "parallel_tool_calls": false
        });
        assert_eq!(check(&tools, DEFAULT_MAX_TOKENS), Ok(()));
    }

    #[test]
    fn each_rule_has_its_reason() {
        let call_with = |call: Value| json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]}]});
        let cases = [
            (
                call_with(
                    json!({"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}),
                ),
                "bad_tool_call",
            ),
            (
                call_with(
                    json!({"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}", "strict": true}}),
                ),
                "bad_tool_call",
            ),
            (json!([1]), "not_an_object"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/c.png", "detail": "max"}}]}, {"role": "assistant", "content": "a"}]}),
                "bad_content_part",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q", "name": 42}, {"role": "assistant", "content": "a"}]}),
                "bad_name",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                       "tools": [{"type": "function", "function": {"name": "f", "parameters": null}}]}),
                "bad_tools",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                       "tools": [{"type": "function", "function": {"name": "f", "description": 7}}]}),
                "bad_tools",
            ),
            (json!({"messages": []}), "missing_messages"),
            (
                json!({"messages": [{"role": "developer", "content": "x"}, {"role": "assistant", "content": "a"}]}),
                "unsupported_role",
            ),
            (
                json!({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
                "missing_content",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q", "extra": 1}, {"role": "assistant", "content": "a"}]}),
                "unknown_message_key",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}]}),
                "no_trained_assistant_message",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}),
                "no_trained_assistant_message",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}),
                "bad_weight",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "x", "content": "r"}, {"role": "assistant", "content": "a"}]}),
                "orphan_tool_message",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}),
                "tool_arguments_not_json",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "bad name", "arguments": "{}"}}]}]}),
                "bad_function_name",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "extra": true}),
                "unknown_line_key",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q".repeat(400)}, {"role": "assistant", "content": "a"}]}),
                "too_many_tokens",
            ),
        ];
        for (line, reason) in cases {
            assert_eq!(check(&line, 50), Err(reason), "{line}");
        }
    }
}
