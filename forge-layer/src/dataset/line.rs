//! One golden trace as one line of OpenAI chat fine-tuning JSONL.

use serde_json::{Map, Value, json};

use crate::trace::Trace;

/// Keys kept per role; everything else a request may carry (audio ids, cache hints, …) is not
/// part of the fine-tuning format.
fn allowed_keys(role: &str) -> &'static [&'static str] {
    match role {
        "system" | "user" => &["role", "content", "name"],
        "assistant" => &["role", "content", "name", "tool_calls", "weight"],
        "tool" => &["role", "content", "tool_call_id"],
        _ => &[],
    }
}

/// An earlier assistant turn's tool calls in the fine-tuning shape, `{id, type, function:
/// {name, arguments}}`: a request may carry more (a streamed call's `index`), which the
/// fine-tuning API refuses for the whole file.
fn tool_calls_as_trained(calls: &Value) -> Value {
    let Some(calls) = calls.as_array() else {
        return calls.clone();
    };
    Value::Array(
        calls
            .iter()
            .map(|call| {
                json!({
                    "id": call["id"],
                    "type": call["type"],
                    "function": {
                        "name": call["function"]["name"],
                        "arguments": call["function"]["arguments"],
                    },
                })
            })
            .collect(),
    )
}

/// Builds the training line: the request's messages (`developer` mapped to `system`, earlier
/// assistant turns weighted 0 so only the teacher's answer is learned), then the teacher's
/// final message, plus the request's function tools at line level. `Err` names why the trace
/// cannot become a line.
pub fn to_line(trace: &Trace) -> Result<Value, &'static str> {
    let messages = trace
        .request
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("no_messages")?;
    if uses_legacy_functions(trace, messages) {
        return Err("legacy_function_call");
    }
    let mut out = Vec::with_capacity(messages.len() + 1);
    for message in messages {
        let obj = message.as_object().ok_or("bad_message")?;
        let role = match obj.get("role").and_then(Value::as_str) {
            Some("developer") => "system",
            Some(role @ ("system" | "user" | "assistant" | "tool")) => role,
            _ => return Err("unsupported_role"),
        };
        let mut kept = Map::new();
        for key in allowed_keys(role) {
            if let Some(v) = obj.get(*key).filter(|v| !v.is_null()) {
                let v = if *key == "tool_calls" {
                    tool_calls_as_trained(v)
                } else {
                    v.clone()
                };
                kept.insert((*key).to_string(), v);
            }
        }
        kept.insert("role".into(), Value::String(role.into()));
        if role == "assistant" {
            drop_empty_content_beside_calls(&mut kept);
            kept.insert("weight".into(), json!(0));
        }
        out.push(Value::Object(kept));
    }
    let choice = trace.response.choices.first().ok_or("no_answer")?;
    let mut answer = Map::new();
    answer.insert("role".into(), json!("assistant"));
    if let Some(content) = &choice.message.content {
        answer.insert("content".into(), json!(content));
    }
    if !choice.message.tool_calls.is_empty() {
        answer.insert(
            "tool_calls".into(),
            serde_json::to_value(&choice.message.tool_calls).map_err(|_| "bad_tool_call")?,
        );
    }
    drop_empty_content_beside_calls(&mut answer);
    out.push(Value::Object(answer));

    let mut line = Map::new();
    line.insert("messages".into(), Value::Array(out));
    if let Some(tools) = trace.request.get("tools").and_then(Value::as_array) {
        let functions: Vec<Value> = tools
            .iter()
            .filter(|t| t["type"] == "function")
            .cloned()
            .collect();
        if !functions.is_empty() {
            line.insert("tools".into(), Value::Array(functions));
        }
    }
    // Only beside the tools it is about: a request whose tools were all custom ones has none
    // left in the line.
    if let Some(parallel) = trace
        .request
        .get("parallel_tool_calls")
        .filter(|v| v.is_boolean() && line.contains_key("tools"))
    {
        line.insert("parallel_tool_calls".into(), parallel.clone());
    }
    Ok(Value::Object(line))
}

/// Leaves out an assistant message's empty content beside its tool calls: some servers send
/// `""` there, where OpenAI's own messages have none (openai-wire.md §1.2).
fn drop_empty_content_beside_calls(message: &mut Map<String, Value>) {
    if message.contains_key("tool_calls") && message.get("content").is_some_and(|c| c == "") {
        message.remove("content");
    }
}

/// Whether the exchange used the deprecated `functions` API: a line could not hold it beside
/// the `tools` shape the rest of a dataset is in, so such a trace is counted and left out.
fn uses_legacy_functions(trace: &Trace, messages: &[Value]) -> bool {
    trace
        .response
        .choices
        .first()
        .is_some_and(|c| c.message.function_call.is_some())
        || trace.request.get("functions").is_some_and(|f| !f.is_null())
        || messages.iter().any(|m| {
            m["role"] == "function" || m.get("function_call").is_some_and(|f| !f.is_null())
        })
}
