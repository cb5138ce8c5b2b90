//! Validation of chat fine-tuning files (JSONL, openai-wire.md §2.1), the checks OpenAI runs in `validating_files`.

use serde_json::{Map, Value};

use super::answer;
use super::chat::is_valid_function_name;

/// OpenAI refuses to train on fewer examples than this.
pub const MIN_TRAINING_EXAMPLES: usize = 10;

const ROLES: &str = "system, user, assistant, tool or function";
const TEXT_PARTS: &[&str] = &["text"];
const USER_PARTS: &[&str] = &["text", "image_url", "input_audio", "file"];
const ASSISTANT_PARTS: &[&str] = &["text", "refusal"];

/// Checks a chat fine-tuning file the way OpenAI does before training, and returns how many
/// examples it holds.
///
/// The file must be UTF-8 JSONL (a leading BOM is allowed; blank lines only at the end). Each
/// line is an object with a non-empty `messages` array, an optional `tools` array of function
/// tools, an optional boolean `parallel_tool_calls` and the deprecated `functions`. Roles are
/// system, user, assistant, tool and function (`developer` is not accepted in training data),
/// each with only its own keys; every example has an assistant message; and there are at least
/// [`MIN_TRAINING_EXAMPLES`] examples. The error names the first line that is wrong.
///
/// ```
/// use forge_gateway::sim::validate_training_jsonl;
///
/// let line = r#"{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"}]}"#;
/// let file = format!("{line}\n").repeat(10);
/// assert_eq!(validate_training_jsonl(file.as_bytes()), Ok(10));
///
/// let bad = file.replace("\"assistant\"", "\"developer\"");
/// assert!(validate_training_jsonl(bad.as_bytes()).unwrap_err().starts_with("line 1:"));
/// ```
pub fn validate_training_jsonl(bytes: &[u8]) -> Result<usize, String> {
    inspect(bytes, MIN_TRAINING_EXAMPLES).map(|stats| stats.examples)
}

/// What training on a valid file involves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DatasetStats {
    pub(crate) examples: usize,
    /// Tokens in one pass over the file, estimated as for chat prompts.
    pub(crate) tokens: u64,
}

/// Validates a file of chat examples that must hold at least `min_examples`.
pub(crate) fn inspect(bytes: &[u8], min_examples: usize) -> Result<DatasetStats, String> {
    let text = std::str::from_utf8(bytes).map_err(|err| {
        let line = 1 + bytes[..err.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        format!("line {line}: the file is not valid UTF-8")
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut stats = DatasetStats {
        examples: 0,
        tokens: 0,
    };
    let mut blank_line: Option<usize> = None;
    for (index, line) in text.split('\n').enumerate() {
        let number = index + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            blank_line.get_or_insert(number);
            continue;
        }
        if let Some(blank) = blank_line {
            return Err(format!(
                "line {blank}: empty line; every line must be one JSON example"
            ));
        }
        let example: Value = serde_json::from_str(line)
            .map_err(|err| format!("line {number}: invalid JSON ({err})"))?;
        let Value::Object(example) = example else {
            return Err(format!("line {number}: expected a JSON object"));
        };
        stats.tokens += check_example(&example).map_err(|err| format!("line {number}: {err}"))?;
        stats.examples += 1;
    }
    if stats.examples < min_examples {
        return Err(format!(
            "the file has {} example(s), but at least {min_examples} are required",
            stats.examples
        ));
    }
    Ok(stats)
}

/// Returns the example's token estimate.
fn check_example(example: &Map<String, Value>) -> Result<u64, String> {
    for key in example.keys() {
        if !matches!(
            key.as_str(),
            "messages" | "tools" | "parallel_tool_calls" | "functions"
        ) {
            return Err(format!("unrecognized key \"{key}\""));
        }
    }
    let messages = match example.get("messages") {
        None => return Err("missing \"messages\"".into()),
        Some(Value::Array(messages)) if messages.is_empty() => {
            return Err("\"messages\" must not be empty".into());
        }
        Some(Value::Array(messages)) => messages,
        Some(_) => return Err("\"messages\" must be an array".into()),
    };
    if let Some(tools) = example.get("tools") {
        check_tools(tools)?;
    }
    if let Some(parallel) = example.get("parallel_tool_calls")
        && !parallel.is_boolean()
    {
        return Err("\"parallel_tool_calls\" must be a boolean".into());
    }
    if let Some(functions) = example.get("functions") {
        check_functions(functions)?;
    }
    let mut tokens = 0;
    let mut has_assistant = false;
    for (i, message) in messages.iter().enumerate() {
        let Some(message) = message.as_object() else {
            return Err(format!("messages[{i}] must be an object"));
        };
        tokens += check_message(message).map_err(|err| format!("messages[{i}]: {err}"))?;
        has_assistant |= message.get("role").and_then(Value::as_str) == Some("assistant");
    }
    if !has_assistant {
        return Err("the example has no assistant message".into());
    }
    Ok(tokens)
}

/// Returns the message's token estimate.
fn check_message(message: &Map<String, Value>) -> Result<u64, String> {
    let role = match message.get("role") {
        None => return Err("missing \"role\"".into()),
        Some(Value::String(role)) => role.as_str(),
        Some(_) => return Err("\"role\" must be a string".into()),
    };
    let allowed: &[&str] = match role {
        "system" | "user" => &["role", "content", "name"],
        "assistant" => &[
            "role",
            "content",
            "refusal",
            "name",
            "tool_calls",
            "function_call",
            "weight",
        ],
        "tool" => &["role", "content", "tool_call_id"],
        "function" => &["role", "content", "name"],
        "developer" => {
            return Err(
                "role \"developer\" is not accepted in training data; use \"system\"".into(),
            );
        }
        other => return Err(format!("unrecognized role \"{other}\" (expected {ROLES})")),
    };
    for key in message.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(format!("unrecognized key \"{key}\" for role {role}"));
        }
    }
    if let Some(name) = message.get("name")
        && !name.is_string()
    {
        return Err("\"name\" must be a string".into());
    }
    let content = message.get("content");
    let mut tokens = 3 + answer::count_words(content) as u64;
    match role {
        "system" => check_required_content(content, TEXT_PARTS)?,
        "user" => check_required_content(content, USER_PARTS)?,
        "tool" => {
            match content {
                None => return Err("missing \"content\"".into()),
                Some(Value::String(_)) => {}
                Some(Value::Array(parts)) => check_parts(parts, TEXT_PARTS)?,
                Some(_) => {
                    return Err("\"content\" must be a string or an array of text parts".into());
                }
            }
            match message.get("tool_call_id") {
                Some(Value::String(id)) if !id.is_empty() => {}
                Some(_) => return Err("\"tool_call_id\" must be a non-empty string".into()),
                None => return Err("missing \"tool_call_id\"".into()),
            }
        }
        "function" => {
            match content {
                None => return Err("missing \"content\"".into()),
                Some(Value::String(_) | Value::Null) => {}
                Some(_) => return Err("\"content\" must be a string or null".into()),
            }
            if message.get("name").is_none() {
                return Err("missing \"name\"".into());
            }
        }
        _ => tokens += check_assistant(message)?,
    }
    Ok(tokens)
}

/// Returns the tokens of the tool calls; content tokens are counted by the caller.
fn check_assistant(message: &Map<String, Value>) -> Result<u64, String> {
    let has_content = match message.get("content") {
        None | Some(Value::Null) => false,
        Some(Value::String(text)) => !text.is_empty(),
        Some(Value::Array(parts)) => {
            check_parts(parts, ASSISTANT_PARTS)?;
            !parts.is_empty()
        }
        Some(_) => return Err("\"content\" must be a string, an array of parts or null".into()),
    };
    match message.get("refusal") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(_) => return Err("\"refusal\" must be a string or null".into()),
    }
    match message.get("weight") {
        None => {}
        Some(weight) if weight.as_u64() == Some(0) || weight.as_u64() == Some(1) => {}
        Some(_) => return Err("\"weight\" must be 0 or 1".into()),
    }
    let mut tokens = 0;
    let has_tool_calls = match message.get("tool_calls") {
        None | Some(Value::Null) => false,
        Some(Value::Array(calls)) if !calls.is_empty() => {
            for (i, call) in calls.iter().enumerate() {
                tokens += check_tool_call(call).map_err(|err| format!("tool_calls[{i}]: {err}"))?;
            }
            true
        }
        Some(_) => return Err("\"tool_calls\" must be a non-empty array".into()),
    };
    let has_function_call = match message.get("function_call") {
        None | Some(Value::Null) => false,
        Some(Value::Object(call)) => {
            check_function_call(call)?;
            true
        }
        Some(_) => return Err("\"function_call\" must be an object".into()),
    };
    if !has_content && !has_tool_calls && !has_function_call {
        return Err(
            "an assistant message needs non-empty \"content\", \"tool_calls\" or \"function_call\""
                .into(),
        );
    }
    Ok(tokens)
}

fn check_tool_call(call: &Value) -> Result<u64, String> {
    let Some(call) = call.as_object() else {
        return Err("must be an object".into());
    };
    for key in call.keys() {
        if !matches!(key.as_str(), "id" | "type" | "function") {
            return Err(format!("unrecognized key \"{key}\""));
        }
    }
    match call.get("id") {
        Some(Value::String(id)) if !id.is_empty() => {}
        _ => return Err("\"id\" must be a non-empty string".into()),
    }
    if call.get("type").and_then(Value::as_str) != Some("function") {
        return Err("\"type\" must be \"function\"".into());
    }
    match call.get("function") {
        Some(Value::Object(function)) => {
            check_function_call(function).map_err(|err| format!("function: {err}"))
        }
        _ => Err("missing \"function\" object".into()),
    }
}

/// `{name, arguments}`, where `arguments` is JSON carried as a string.
fn check_function_call(function: &Map<String, Value>) -> Result<u64, String> {
    let name = match function.get("name") {
        Some(Value::String(name)) if is_valid_function_name(name) => name,
        Some(Value::String(name)) => {
            return Err(format!(
                "function name \"{name}\" must match ^[a-zA-Z0-9_-]{{1,64}}$"
            ));
        }
        _ => return Err("\"name\" must be a string".into()),
    };
    let arguments = match function.get("arguments") {
        Some(Value::String(arguments)) => arguments,
        Some(_) => return Err("\"arguments\" must be a string of JSON, not a JSON value".into()),
        None => return Err("missing \"arguments\"".into()),
    };
    if serde_json::from_str::<Value>(arguments).is_err() {
        return Err(format!("\"arguments\" of {name} is not valid JSON"));
    }
    Ok(answer::approx_tokens(name) + answer::approx_tokens(arguments))
}

fn check_required_content(content: Option<&Value>, parts: &[&str]) -> Result<(), String> {
    match content {
        None | Some(Value::Null) => Err("missing \"content\"".into()),
        Some(Value::String(text)) if text.is_empty() => Err("\"content\" is empty".into()),
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(items)) if items.is_empty() => Err("\"content\" is empty".into()),
        Some(Value::Array(items)) => check_parts(items, parts),
        Some(_) => Err("\"content\" must be a string or an array of parts".into()),
    }
}

fn check_parts(parts: &[Value], allowed: &[&str]) -> Result<(), String> {
    for (i, part) in parts.iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str);
        match kind {
            Some(kind) if allowed.contains(&kind) => {
                // Each part carries its payload under the key named by its type.
                match part.get(kind) {
                    None | Some(Value::Null) => {
                        return Err(format!(
                            "content[{i}] of type \"{kind}\" is missing \"{kind}\""
                        ));
                    }
                    Some(payload) => {
                        if let Some(shape) = wrong_payload(kind, payload) {
                            return Err(format!("content[{i}]: \"{kind}\" must be {shape}"));
                        }
                    }
                }
            }
            Some(kind) => {
                return Err(format!(
                    "content[{i}] has type \"{kind}\", expected one of {}",
                    allowed.join(", ")
                ));
            }
            None => return Err(format!("content[{i}] is missing \"type\"")),
        }
    }
    Ok(())
}

/// The shape OpenAI's schema gives the payload of a content part of type `kind`, when
/// `payload` does not have it.
fn wrong_payload(kind: &str, payload: &Value) -> Option<&'static str> {
    let string = |key: &str| payload.get(key).is_some_and(Value::is_string);
    let (fits, shape) = match kind {
        "text" | "refusal" => (payload.is_string(), "a string"),
        "image_url" => (
            string("url")
                && payload
                    .get("detail")
                    .is_none_or(|d| matches!(d.as_str(), Some("auto" | "low" | "high"))),
            "an object with a string \"url\" and \"detail\" auto, low or high",
        ),
        "input_audio" => (
            string("data")
                && matches!(
                    payload.get("format").and_then(Value::as_str),
                    Some("wav" | "mp3")
                ),
            "an object with a string \"data\" and \"format\" wav or mp3",
        ),
        "file" => (
            string("file_data") || string("file_id"),
            "an object with a string \"file_data\" or \"file_id\"",
        ),
        _ => (false, "a string"),
    };
    (!fits).then_some(shape)
}

fn check_tools(tools: &Value) -> Result<(), String> {
    let Some(tools) = tools.as_array() else {
        return Err("\"tools\" must be an array".into());
    };
    for (i, tool) in tools.iter().enumerate() {
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(format!("tools[{i}]: \"type\" must be \"function\""));
        }
        let Some(function) = tool.get("function").and_then(Value::as_object) else {
            return Err(format!("tools[{i}]: missing \"function\" object"));
        };
        check_function_definition(function).map_err(|err| format!("tools[{i}].function: {err}"))?;
    }
    Ok(())
}

fn check_functions(functions: &Value) -> Result<(), String> {
    match functions.as_array() {
        Some(functions) if (1..=128).contains(&functions.len()) => {
            for (i, function) in functions.iter().enumerate() {
                let Some(function) = function.as_object() else {
                    return Err(format!("functions[{i}] must be an object"));
                };
                check_function_definition(function)
                    .map_err(|err| format!("functions[{i}]: {err}"))?;
            }
            Ok(())
        }
        _ => Err("\"functions\" must be an array of 1 to 128 function definitions".into()),
    }
}

fn check_function_definition(function: &Map<String, Value>) -> Result<(), String> {
    match function.get("name") {
        Some(Value::String(name)) if is_valid_function_name(name) => {}
        Some(Value::String(name)) => {
            return Err(format!(
                "name \"{name}\" must match ^[a-zA-Z0-9_-]{{1,64}}$"
            ));
        }
        _ => return Err("missing \"name\"".into()),
    }
    match function.get("parameters") {
        None | Some(Value::Object(_)) => Ok(()),
        Some(_) => Err("\"parameters\" must be a JSON Schema object".into()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn simple() -> Value {
        json!({"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}
        ]})
    }

    fn tool_use() -> Value {
        json!({
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "-3C, snow"},
                {"role": "assistant", "content": "It is -3C and snowing in Oslo.", "weight": 1}
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "parallel_tool_calls": false
        })
    }

    /// Ten copies of `simple`, with `line` (1-based) replaced by `bad`.
    fn file_with(line: usize, bad: &str) -> String {
        let mut lines: Vec<String> = (0..10).map(|_| simple().to_string()).collect();
        lines[line - 1] = bad.to_owned();
        lines.join("\n") + "\n"
    }

    fn error_for(message: Value) -> String {
        let bad = json!({"messages": [{"role": "user", "content": "Hi"}, message]}).to_string();
        validate_training_jsonl(file_with(4, &bad).as_bytes()).unwrap_err()
    }

    #[test]
    fn accepts_plain_and_tool_use_examples() {
        let mut lines: Vec<String> = (0..6).map(|_| simple().to_string()).collect();
        lines.extend((0..4).map(|_| tool_use().to_string()));
        let file = lines.join("\n");
        assert_eq!(validate_training_jsonl(file.as_bytes()), Ok(10));
        // CRLF endings, a BOM and trailing blank lines are tolerated.
        let file = format!("\u{feff}{}\r\n\r\n\n", lines.join("\r\n"));
        assert_eq!(validate_training_jsonl(file.as_bytes()), Ok(10));
    }

    #[test]
    fn weight_zero_and_function_messages_are_accepted() {
        let line = json!({"messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": 0},
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": null, "function_call": {"name": "now", "arguments": "{}"}},
            {"role": "function", "name": "now", "content": "12:00"},
            {"role": "assistant", "content": "It is noon."}
        ], "functions": [{"name": "now"}]});
        assert_eq!(
            validate_training_jsonl(file_with(1, &line.to_string()).as_bytes()),
            Ok(10)
        );
    }

    #[test]
    fn too_few_examples() {
        let file = format!("{}\n", simple()).repeat(9);
        let err = validate_training_jsonl(file.as_bytes()).unwrap_err();
        assert!(err.contains("9 example") && err.contains("10"), "{err}");
    }

    #[test]
    fn not_json_and_not_an_object() {
        let err = validate_training_jsonl(file_with(3, "{\"messages\": [").as_bytes()).unwrap_err();
        assert!(err.starts_with("line 3: invalid JSON"), "{err}");
        let err = validate_training_jsonl(file_with(7, "[1, 2]").as_bytes()).unwrap_err();
        assert_eq!(err, "line 7: expected a JSON object");
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let mut file = file_with(1, &simple().to_string()).into_bytes();
        let second_line = file.iter().position(|&b| b == b'\n').unwrap() + 1;
        file.insert(second_line + 5, 0xff);
        let err = validate_training_jsonl(&file).unwrap_err();
        assert_eq!(err, "line 2: the file is not valid UTF-8");
    }

    #[test]
    fn blank_line_in_the_middle() {
        let err = validate_training_jsonl(file_with(5, "   ").as_bytes()).unwrap_err();
        assert!(err.starts_with("line 5: empty line"), "{err}");
    }

    #[test]
    fn messages_missing_empty_or_wrong_type() {
        let err =
            validate_training_jsonl(file_with(2, r#"{"prompt": "x"}"#).as_bytes()).unwrap_err();
        assert!(
            err.starts_with("line 2: unrecognized key \"prompt\""),
            "{err}"
        );
        let err = validate_training_jsonl(file_with(2, r#"{}"#).as_bytes()).unwrap_err();
        assert_eq!(err, "line 2: missing \"messages\"");
        let err =
            validate_training_jsonl(file_with(2, r#"{"messages": []}"#).as_bytes()).unwrap_err();
        assert_eq!(err, "line 2: \"messages\" must not be empty");
        let err =
            validate_training_jsonl(file_with(2, r#"{"messages": "hi"}"#).as_bytes()).unwrap_err();
        assert_eq!(err, "line 2: \"messages\" must be an array");
    }

    #[test]
    fn developer_and_unknown_roles_are_refused() {
        let err = error_for(json!({"role": "developer", "content": "x"}));
        assert!(
            err.starts_with("line 4: messages[1]: role \"developer\""),
            "{err}"
        );
        let err = error_for(json!({"role": "robot", "content": "x"}));
        assert!(
            err.starts_with("line 4: messages[1]: unrecognized role \"robot\""),
            "{err}"
        );
        let err = error_for(json!({"content": "x"}));
        assert_eq!(err, "line 4: messages[1]: missing \"role\"");
    }

    #[test]
    fn keys_are_checked_per_role() {
        let err = error_for(json!({"role": "assistant", "content": "x", "tool_call_id": "c"}));
        assert!(
            err.contains("unrecognized key \"tool_call_id\" for role assistant"),
            "{err}"
        );
        let line = json!({"messages": [{"role": "user", "content": "Hi", "weight": 1},
            {"role": "assistant", "content": "Yo"}]});
        let err = validate_training_jsonl(file_with(6, &line.to_string()).as_bytes()).unwrap_err();
        assert_eq!(
            err,
            "line 6: messages[0]: unrecognized key \"weight\" for role user"
        );
    }

    #[test]
    fn content_rules() {
        let line = json!({"messages": [{"role": "user"}, {"role": "assistant", "content": "Yo"}]});
        let err = validate_training_jsonl(file_with(2, &line.to_string()).as_bytes()).unwrap_err();
        assert_eq!(err, "line 2: messages[0]: missing \"content\"");
        let line = json!({"messages": [{"role": "system", "content": ""}, {"role": "assistant", "content": "Yo"}]});
        let err = validate_training_jsonl(file_with(2, &line.to_string()).as_bytes()).unwrap_err();
        assert_eq!(err, "line 2: messages[0]: \"content\" is empty");
        let err = error_for(json!({"role": "assistant", "content": ""}));
        assert!(
            err.starts_with("line 4: messages[1]: an assistant message needs"),
            "{err}"
        );
    }

    #[test]
    fn weight_must_be_zero_or_one() {
        let err = error_for(json!({"role": "assistant", "content": "x", "weight": 2}));
        assert_eq!(err, "line 4: messages[1]: \"weight\" must be 0 or 1");
        let err = error_for(json!({"role": "assistant", "content": "x", "weight": "1"}));
        assert_eq!(err, "line 4: messages[1]: \"weight\" must be 0 or 1");
    }

    #[test]
    fn tool_messages_need_content_and_call_id() {
        let line = |tool: Value| {
            json!({"messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "f", "arguments": "{}"}}]},
                tool,
                {"role": "assistant", "content": "Done"}
            ]})
            .to_string()
        };
        let err = validate_training_jsonl(
            file_with(8, &line(json!({"role": "tool", "content": "ok"}))).as_bytes(),
        )
        .unwrap_err();
        assert_eq!(err, "line 8: messages[2]: missing \"tool_call_id\"");
        let err = validate_training_jsonl(
            file_with(8, &line(json!({"role": "tool", "tool_call_id": "c1"}))).as_bytes(),
        )
        .unwrap_err();
        assert_eq!(err, "line 8: messages[2]: missing \"content\"");
    }

    #[test]
    fn tool_call_shape() {
        let call = |call: Value| error_for(json!({"role": "assistant", "tool_calls": [call]}));
        let err = call(
            json!({"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}),
        );
        assert!(
            err.contains("tool_calls[0]: function: \"arguments\" must be a string"),
            "{err}"
        );
        let err = call(
            json!({"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}),
        );
        assert!(err.contains("is not valid JSON"), "{err}");
        let err = call(json!({"type": "function", "function": {"name": "f", "arguments": "{}"}}));
        assert!(err.contains("tool_calls[0]: \"id\""), "{err}");
        let err = call(
            json!({"id": "c", "type": "custom", "function": {"name": "f", "arguments": "{}"}}),
        );
        assert!(
            err.contains("tool_calls[0]: \"type\" must be \"function\""),
            "{err}"
        );
        let err = call(
            json!({"id": "c", "type": "function", "function": {"name": "bad name", "arguments": "{}"}}),
        );
        assert!(err.contains("bad name"), "{err}");
    }

    #[test]
    fn every_example_needs_an_assistant() {
        let line = json!({"messages": [{"role": "user", "content": "Hi"}]});
        let err = validate_training_jsonl(file_with(10, &line.to_string()).as_bytes()).unwrap_err();
        assert_eq!(err, "line 10: the example has no assistant message");
    }

    #[test]
    fn line_level_tools_and_parallel_flag() {
        let mut line = simple();
        line["tools"] = json!([{"type": "function", "function": {"description": "no name"}}]);
        let err = validate_training_jsonl(file_with(3, &line.to_string()).as_bytes()).unwrap_err();
        assert_eq!(err, "line 3: tools[0].function: missing \"name\"");
        let mut line = simple();
        line["parallel_tool_calls"] = json!("yes");
        let err = validate_training_jsonl(file_with(3, &line.to_string()).as_bytes()).unwrap_err();
        assert_eq!(err, "line 3: \"parallel_tool_calls\" must be a boolean");
    }

    #[test]
    fn user_image_parts_are_accepted_but_system_images_are_not() {
        let line = json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
            {"role": "assistant", "content": "A cat."}
        ]});
        assert_eq!(
            validate_training_jsonl(file_with(1, &line.to_string()).as_bytes()),
            Ok(10)
        );
        let line = json!({"messages": [
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": "A cat."}
        ]});
        let err = validate_training_jsonl(file_with(1, &line.to_string()).as_bytes()).unwrap_err();
        assert!(
            err.starts_with("line 1: messages[0]: content[0] has type \"image_url\""),
            "{err}"
        );
    }

    #[test]
    fn a_part_whose_payload_has_the_wrong_shape_is_refused() {
        let with_part = |part: Value| {
            let line = json!({"messages": [
                {"role": "user", "content": [part]},
                {"role": "assistant", "content": "A cat."}
            ]});
            validate_training_jsonl(file_with(1, &line.to_string()).as_bytes())
        };
        for (part, expected) in [
            (json!({"type": "text", "text": 42}), "a string"),
            (json!({"type": "text", "text": {"value": "hi"}}), "a string"),
            (json!({"type": "image_url", "image_url": true}), "\"url\""),
            (
                json!({"type": "image_url", "image_url": "https://x/cat.png"}),
                "\"url\"",
            ),
            (
                json!({"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "max"}}),
                "\"detail\"",
            ),
            (
                json!({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}),
                "wav or mp3",
            ),
            (
                json!({"type": "file", "file": {"filename": "a.pdf"}}),
                "\"file_id\"",
            ),
        ] {
            let err = with_part(part.clone()).unwrap_err();
            assert!(err.contains(expected), "{part}: {err}");
        }
        for part in [
            json!({"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "low"}}),
            json!({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
            json!({"type": "file", "file": {"file_id": "file-abc"}}),
        ] {
            assert_eq!(with_part(part.clone()), Ok(10), "{part}");
        }
    }

    #[test]
    fn stats_count_tokens() {
        let file = format!("{}\n", simple()).repeat(10);
        let stats = inspect(file.as_bytes(), 10).unwrap();
        // 3 messages × 3 + "You are terse." (3) + "Capital of France?" (3) + "Paris." (1).
        assert_eq!(
            stats,
            DatasetStats {
                examples: 10,
                tokens: 160
            }
        );
    }
}
