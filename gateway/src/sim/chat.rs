//! `POST /v1/chat/completions`: request validation, the answer plan, and the non-streamed response.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

use super::answer::{self, TextAnswer, ToolCall};
use super::error::ApiError;
use super::reply;
use super::state::SimState;
use super::stream;

/// What `system_fingerprint` says in every response and chunk.
pub(crate) const SYSTEM_FINGERPRINT: &str = "fp_sim";
/// The processing tier OpenAI reports for a request that asked for none.
pub(crate) const SERVICE_TIER: &str = "default";

const ROLES: &str = "'system', 'assistant', 'user', 'function', 'tool', and 'developer'";

pub(crate) async fn create(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let request = match reply::json_object(&body) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    let model = match request.get("model") {
        Some(Value::String(model)) => model.as_str(),
        None | Some(Value::Null) => {
            return ApiError::invalid_request("you must provide a model parameter")
                .with_param("model")
                .into_response();
        }
        Some(other) => return ApiError::invalid_type("model", "a string", other).into_response(),
    };
    respond(&state, model, &request).await
}

/// Answers `request` as `model`, whatever the body's own `model` says: Azure picks the model
/// by deployment, not by body.
pub(crate) async fn respond(
    state: &SimState,
    model: &str,
    request: &Map<String, Value>,
) -> Response {
    if let Some(refusal) = state.refuse_unknown_model(model) {
        return refusal;
    }
    let behavior = state.behavior(model);
    if !behavior.first_byte_delay.is_zero() {
        tokio::time::sleep(behavior.first_byte_delay).await;
    }
    if let Some(status) = behavior.fail_status
        && state.fails_now(model, behavior.fail_every)
    {
        return ApiError::injected(status, model).into_response();
    }
    let request = match ChatRequest::parse(model, request) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    let completion = Completion::answer(&request, behavior.quality, behavior.words);
    if request.stream {
        let shape = stream::Shape {
            include_usage: request.include_usage,
            obfuscation: request.include_obfuscation,
            null_usage: !behavior.omit_null_usage,
        };
        stream::response(
            completion,
            shape,
            behavior.chunk_delay,
            behavior.error_after_chunks,
        )
    } else {
        completion.into_json()
    }
}

/// The parts of a chat request the simulated model looks at, already validated.
pub(crate) struct ChatRequest<'a> {
    pub(crate) model: &'a str,
    pub(crate) messages: &'a [Value],
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    /// Streams: whether each chunk with a choice carries `obfuscation` padding.
    pub(crate) include_obfuscation: bool,
    pub(crate) n: usize,
    /// The smaller of `max_tokens` and `max_completion_tokens`, counted in words here.
    pub(crate) max_words: Option<usize>,
    /// Functions to call instead of answering in text; empty for a text answer.
    pub(crate) calls: Vec<&'a Map<String, Value>>,
    /// Whether `calls` came from the deprecated `functions` (answered with one `function_call`)
    /// rather than `tools`.
    pub(crate) legacy_functions: bool,
}

impl<'a> ChatRequest<'a> {
    pub(crate) fn parse(model: &'a str, request: &'a Map<String, Value>) -> Result<Self, ApiError> {
        let messages = parse_messages(request.get("messages"))?;
        let stream = optional_bool(request, "", "stream")?.unwrap_or(false);
        // Obfuscation is on unless the client turns it off (openai-wire.md §1.1).
        let (include_usage, include_obfuscation) = match request.get("stream_options") {
            None | Some(Value::Null) => (false, true),
            Some(_) if !stream => {
                return Err(ApiError::invalid_request(
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                )
                .with_param("stream_options"));
            }
            Some(Value::Object(options)) => (
                optional_bool(options, "stream_options", "include_usage")?.unwrap_or(false),
                optional_bool(options, "stream_options", "include_obfuscation")?.unwrap_or(true),
            ),
            Some(other) => {
                return Err(ApiError::invalid_type("stream_options", "an object", other));
            }
        };
        let n = optional_integer(request, "n", 1, 128)?.unwrap_or(1);
        let max_words = [
            optional_integer(request, "max_tokens", 1, usize::MAX)?,
            optional_integer(request, "max_completion_tokens", 1, usize::MAX)?,
        ]
        .into_iter()
        .flatten()
        .min();
        let has_tools = request.get("tools").is_some_and(|tools| !tools.is_null());
        let (calls, legacy_functions) = if has_tools {
            (plan_tool_calls(request, messages)?, false)
        } else {
            match plan_function_call(request, messages)? {
                Some(call) => (vec![call], true),
                None => (plan_tool_calls(request, messages)?, false),
            }
        };
        Ok(Self {
            model,
            messages,
            stream,
            include_usage,
            include_obfuscation,
            n,
            max_words,
            calls,
            legacy_functions,
        })
    }
}

fn parse_messages(value: Option<&Value>) -> Result<&[Value], ApiError> {
    let messages = match value {
        None | Some(Value::Null) => return Err(ApiError::missing_parameter("messages")),
        Some(Value::Array(messages)) => messages,
        Some(other) => {
            return Err(ApiError::invalid_type(
                "messages",
                "an array of objects",
                other,
            ));
        }
    };
    if messages.is_empty() {
        return Err(ApiError::invalid_request(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an \
             empty array instead.",
        )
        .with_param("messages")
        .with_code("empty_array"));
    }
    // Whether a `tool` message here answers an assistant turn that asked for tools.
    let mut answering_tool_calls = false;
    for (i, message) in messages.iter().enumerate() {
        let Some(message) = message.as_object() else {
            return Err(ApiError::invalid_type(
                format!("messages[{i}]"),
                "an object",
                message,
            ));
        };
        let role = match message.get("role") {
            Some(Value::String(role)) => role.as_str(),
            None | Some(Value::Null) => {
                return Err(ApiError::missing_parameter(format!("messages[{i}].role")));
            }
            Some(other) => {
                return Err(ApiError::invalid_type(
                    format!("messages[{i}].role"),
                    "a string",
                    other,
                ));
            }
        };
        let required: &[&str] = match role {
            "system" | "developer" | "user" => &["content"],
            "assistant" => &[],
            "tool" => &["content", "tool_call_id"],
            "function" => &["name"],
            other => {
                return Err(ApiError::invalid_value(
                    format!("messages[{i}].role"),
                    format!("Invalid value: '{other}'. Supported values are: {ROLES}."),
                ));
            }
        };
        for key in required {
            if message.get(*key).is_none_or(Value::is_null) {
                return Err(ApiError::missing_parameter(format!("messages[{i}].{key}")));
            }
        }
        if let Some(name) = message.get("name").filter(|name| !name.is_string()) {
            return Err(ApiError::invalid_type(
                format!("messages[{i}].name"),
                "a string",
                name,
            ));
        }
        if role == "tool" && !answering_tool_calls {
            return Err(ApiError::invalid_request(
                "Invalid parameter: messages with role 'tool' must be a response to a preceeding \
                 message with 'tool_calls'.",
            )
            .with_param(format!("messages.[{i}].role")));
        }
        answering_tool_calls = match role {
            "assistant" => message
                .get("tool_calls")
                .and_then(Value::as_array)
                .is_some_and(|calls| !calls.is_empty()),
            "tool" => true,
            _ => false,
        };
    }
    Ok(messages)
}

/// Which functions the model calls. Tools are used unless `tool_choice` is `"none"` or the
/// conversation ends with a tool result, which the model then answers in text.
fn plan_tool_calls<'a>(
    request: &'a Map<String, Value>,
    messages: &'a [Value],
) -> Result<Vec<&'a Map<String, Value>>, ApiError> {
    let functions = parse_tools(request.get("tools"))?;
    let tool_choice = request
        .get("tool_choice")
        .filter(|choice| !choice.is_null());
    let parallel = optional_bool(request, "", "parallel_tool_calls")?.unwrap_or(true);
    let Some(functions) = functions else {
        if tool_choice.is_some() {
            return Err(ApiError::invalid_value(
                "tool_choice",
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are \
                 specified.",
            ));
        }
        return Ok(Vec::new());
    };
    let mut candidates: Vec<&Map<String, Value>> = functions;
    let mut named = false;
    match tool_choice {
        None => {}
        Some(Value::String(choice)) => match choice.as_str() {
            "none" => return Ok(Vec::new()),
            "auto" | "required" => {}
            other => {
                return Err(ApiError::invalid_value(
                    "tool_choice",
                    format!(
                        "Invalid value: '{other}'. Supported values are: 'none', 'auto', and \
                         'required'."
                    ),
                ));
            }
        },
        Some(Value::Object(choice)) => match choice.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = choice
                    .get("function")
                    .and_then(|function| function.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::missing_parameter("tool_choice.function.name"))?;
                let function = candidates
                    .iter()
                    .copied()
                    .find(|function| function_name(function) == name)
                    .ok_or_else(|| {
                        ApiError::invalid_value(
                            "tool_choice",
                            format!(
                                "Invalid value for 'tool_choice': Tool choice '{name}' not found \
                                 in 'tools' parameter."
                            ),
                        )
                    })?;
                candidates = vec![function];
                named = true;
            }
            Some("allowed_tools") => {
                let allowed: Vec<&str> = choice
                    .get("allowed_tools")
                    .and_then(|allowed| allowed.get("tools"))
                    .and_then(Value::as_array)
                    .map(|tools| {
                        tools
                            .iter()
                            .filter_map(|tool| tool.get("function")?.get("name")?.as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                if choice
                    .get("allowed_tools")
                    .and_then(|allowed| allowed.get("mode"))
                    .and_then(Value::as_str)
                    == Some("none")
                {
                    return Ok(Vec::new());
                }
                candidates.retain(|function| allowed.contains(&function_name(function)));
            }
            // A named custom tool: this model only calls functions, so it answers in text.
            Some("custom") => return Ok(Vec::new()),
            _ => {
                return Err(ApiError::invalid_value(
                    "tool_choice.type",
                    "Invalid value for 'tool_choice.type': expected 'function', \
                     'allowed_tools' or 'custom'.",
                ));
            }
        },
        Some(other) => {
            return Err(ApiError::invalid_type(
                "tool_choice",
                "a string or an object",
                other,
            ));
        }
    }
    if messages.last().and_then(answer::role) == Some("tool") {
        return Ok(Vec::new());
    }
    let count = if !named && parallel { 2 } else { 1 };
    candidates.truncate(count);
    Ok(candidates)
}

/// The deprecated `functions` API: the one function called, chosen by `function_call` (`auto`,
/// the default, calls the first), or none for a text answer, as after a `function` result.
fn plan_function_call<'a>(
    request: &'a Map<String, Value>,
    messages: &'a [Value],
) -> Result<Option<&'a Map<String, Value>>, ApiError> {
    let choice = request
        .get("function_call")
        .filter(|choice| !choice.is_null());
    let functions = match request.get("functions") {
        None | Some(Value::Null) => {
            if choice.is_some() {
                return Err(ApiError::invalid_value(
                    "function_call",
                    "Invalid value for 'function_call': 'function_call' is only allowed when \
                     'functions' are specified.",
                ));
            }
            return Ok(None);
        }
        Some(Value::Array(functions)) if !functions.is_empty() => functions,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_request(
                "Invalid 'functions': empty array. Expected an array with minimum length 1, but \
                 got an empty array instead.",
            )
            .with_param("functions")
            .with_code("empty_array"));
        }
        Some(other) => {
            return Err(ApiError::invalid_type(
                "functions",
                "an array of objects",
                other,
            ));
        }
    };
    let mut parsed = Vec::with_capacity(functions.len());
    for (i, function) in functions.iter().enumerate() {
        let Some(function) = function.as_object() else {
            return Err(ApiError::invalid_type(
                format!("functions[{i}]"),
                "an object",
                function,
            ));
        };
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::missing_parameter(format!("functions[{i}].name")))?;
        if !is_valid_function_name(name) {
            return Err(ApiError::invalid_value(
                format!("functions[{i}].name"),
                format!(
                    "Invalid 'functions[{i}].name': string does not match pattern. Expected a \
                     string that matches the pattern '^[a-zA-Z0-9_-]{{1,64}}$'."
                ),
            ));
        }
        parsed.push(function);
    }
    let chosen = match choice {
        None => parsed.first().copied(),
        Some(Value::String(choice)) => match choice.as_str() {
            "none" => None,
            "auto" => parsed.first().copied(),
            other => {
                return Err(ApiError::invalid_value(
                    "function_call",
                    format!("Invalid value: '{other}'. Supported values are: 'none' and 'auto'."),
                ));
            }
        },
        Some(Value::Object(choice)) => {
            let name = choice
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::missing_parameter("function_call.name"))?;
            let found = parsed
                .iter()
                .copied()
                .find(|function| function_name(function) == name);
            Some(found.ok_or_else(|| {
                ApiError::invalid_value(
                    "function_call",
                    format!(
                        "Invalid value for 'function_call': function '{name}' not found in \
                         'functions' parameter."
                    ),
                )
            })?)
        }
        Some(other) => {
            return Err(ApiError::invalid_type(
                "function_call",
                "a string or an object",
                other,
            ));
        }
    };
    if messages.last().and_then(answer::role) == Some("function") {
        return Ok(None);
    }
    Ok(chosen)
}

/// The `function` objects of the function tools; `None` when there is no `tools` array.
fn parse_tools(value: Option<&Value>) -> Result<Option<Vec<&Map<String, Value>>>, ApiError> {
    let tools = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(tools)) => tools,
        Some(other) => {
            return Err(ApiError::invalid_type(
                "tools",
                "an array of objects",
                other,
            ));
        }
    };
    if tools.is_empty() {
        return Err(ApiError::invalid_request(
            "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an \
             empty array instead.",
        )
        .with_param("tools")
        .with_code("empty_array"));
    }
    let mut functions = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let Some(tool) = tool.as_object() else {
            return Err(ApiError::invalid_type(
                format!("tools[{i}]"),
                "an object",
                tool,
            ));
        };
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {
                let Some(function) = tool.get("function").and_then(Value::as_object) else {
                    return Err(ApiError::missing_parameter(format!("tools[{i}].function")));
                };
                let name = function
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::missing_parameter(format!("tools[{i}].function.name"))
                    })?;
                if !is_valid_function_name(name) {
                    return Err(ApiError::invalid_value(
                        format!("tools[{i}].function.name"),
                        format!(
                            "Invalid 'tools[{i}].function.name': string does not match pattern. \
                             Expected a string that matches the pattern '^[a-zA-Z0-9_-]{{1,64}}$'."
                        ),
                    ));
                }
                functions.push(function);
            }
            Some("custom") => {}
            _ => {
                return Err(ApiError::invalid_value(
                    format!("tools[{i}].type"),
                    "Invalid value. Supported values are: 'function' and 'custom'.",
                ));
            }
        }
    }
    Ok(Some(functions))
}

/// OpenAI's rule for function names: `^[a-zA-Z0-9_-]{1,64}$`.
pub(crate) fn is_valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn function_name(function: &Map<String, Value>) -> &str {
    function
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The boolean at `key` of `object`, or `None` when absent or null. `within` names the object
/// in the error's `param` (`stream_options`), or is empty for the request itself.
fn optional_bool(
    object: &Map<String, Value>,
    within: &str,
    key: &'static str,
) -> Result<Option<bool>, ApiError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(other) if within.is_empty() => Err(ApiError::invalid_type(key, "a boolean", other)),
        Some(other) => Err(ApiError::invalid_type(
            format!("{within}.{key}"),
            "a boolean",
            other,
        )),
    }
}

fn optional_integer(
    request: &Map<String, Value>,
    key: &'static str,
    min: usize,
    max: usize,
) -> Result<Option<usize>, ApiError> {
    let value = match request.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(value) => value,
    };
    let Some(number) = value.as_i64() else {
        return Err(ApiError::invalid_type(key, "an integer", value));
    };
    if number < min as i64 {
        return Err(ApiError::invalid_request(format!(
            "Invalid '{key}': integer below minimum value. Expected a value >= {min}, but got \
             {number} instead."
        ))
        .with_param(key)
        .with_code("integer_below_min_value"));
    }
    match usize::try_from(number) {
        Ok(number) if number <= max => Ok(Some(number)),
        _ => Err(ApiError::invalid_request(format!(
            "Invalid '{key}': integer above maximum value. Expected a value <= {max}, but got \
             {number} instead."
        ))
        .with_param(key)
        .with_code("integer_above_max_value")),
    }
}

/// What one choice says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Text(TextAnswer),
    ToolCalls(Vec<ToolCall>),
    /// A call of the deprecated `functions` API (its `id` unused: the wire has none).
    FunctionCall(ToolCall),
}

impl Reply {
    pub(crate) fn finish_reason(&self) -> &'static str {
        match self {
            Reply::Text(text) if text.truncated => "length",
            Reply::Text(_) => "stop",
            Reply::ToolCalls(_) => "tool_calls",
            Reply::FunctionCall(_) => "function_call",
        }
    }

    /// The calls the reply makes, of either API.
    pub(crate) fn calls(&self) -> &[ToolCall] {
        match self {
            Reply::Text(_) => &[],
            Reply::ToolCalls(calls) => calls,
            Reply::FunctionCall(call) => std::slice::from_ref(call),
        }
    }

    fn completion_tokens(&self) -> u64 {
        match self {
            Reply::Text(text) => text.words as u64,
            Reply::ToolCalls(_) | Reply::FunctionCall(_) => self
                .calls()
                .iter()
                .map(|call| {
                    answer::approx_tokens(&call.name) + answer::approx_tokens(&call.arguments)
                })
                .sum(),
        }
    }
}

/// OpenAI's usage object, token details included (openai-wire.md §1.2). This model caches no
/// prompt and neither reasons nor speaks, so every detail is 0, as OpenAI reports them then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) total_tokens: u64,
    prompt_tokens_details: PromptTokensDetails,
    completion_tokens_details: CompletionTokensDetails,
}

impl Usage {
    fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails::default(),
            completion_tokens_details: CompletionTokensDetails::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
struct PromptTokensDetails {
    cached_tokens: u64,
    audio_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
struct CompletionTokensDetails {
    reasoning_tokens: u64,
    audio_tokens: u64,
    accepted_prediction_tokens: u64,
    rejected_prediction_tokens: u64,
}

/// A whole answer to one request, before it is put on the wire either way.
pub(crate) struct Completion {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) replies: Vec<Reply>,
    pub(crate) usage: Usage,
}

impl Completion {
    pub(crate) fn answer(request: &ChatRequest<'_>, quality: super::Quality, words: usize) -> Self {
        let seed = answer::conversation_seed(request.model, request.messages);
        let question = if request.calls.is_empty() {
            String::new()
        } else {
            answer::last_user_text(request.messages)
        };
        let judged = super::judge::score(request.messages);
        let replies: Vec<Reply> = (0..request.n)
            .map(|choice| {
                if let Some(score) = judged {
                    Reply::Text(TextAnswer {
                        content: score.to_string(),
                        words: 1,
                        truncated: false,
                    })
                } else if request.calls.is_empty() {
                    Reply::Text(answer::text_answer(
                        seed,
                        choice,
                        quality,
                        words,
                        request.max_words,
                        request.messages,
                    ))
                } else {
                    let mut calls = answer::tool_calls(seed, choice, &request.calls, &question);
                    if request.legacy_functions && !calls.is_empty() {
                        Reply::FunctionCall(calls.swap_remove(0))
                    } else {
                        Reply::ToolCalls(calls)
                    }
                }
            })
            .collect();
        let prompt_tokens = answer::prompt_tokens(request.messages);
        let completion_tokens = replies.iter().map(Reply::completion_tokens).sum();
        Self {
            id: reply::random_id("chatcmpl-", 29),
            created: reply::unix_now(),
            model: super::models::snapshot_of(request.model).to_owned(),
            replies,
            usage: Usage::new(prompt_tokens, completion_tokens),
        }
    }

    fn into_json(self) -> Response {
        let choices: Vec<ChoiceView<'_>> = self
            .replies
            .iter()
            .enumerate()
            .map(|(index, reply)| ChoiceView {
                index,
                message: match reply {
                    Reply::Text(text) => MessageView {
                        role: "assistant",
                        content: Some(&text.content),
                        refusal: None,
                        tool_calls: None,
                        function_call: None,
                    },
                    Reply::ToolCalls(calls) => MessageView {
                        role: "assistant",
                        content: None,
                        refusal: None,
                        tool_calls: Some(calls.iter().map(ToolCallView::from).collect()),
                        function_call: None,
                    },
                    Reply::FunctionCall(call) => MessageView {
                        role: "assistant",
                        content: None,
                        refusal: None,
                        tool_calls: None,
                        function_call: Some(FunctionView {
                            name: &call.name,
                            arguments: &call.arguments,
                        }),
                    },
                },
                logprobs: None,
                finish_reason: reply.finish_reason(),
            })
            .collect();
        reply::json(
            StatusCode::OK,
            &CompletionView {
                id: &self.id,
                object: "chat.completion",
                created: self.created,
                model: &self.model,
                choices,
                usage: self.usage,
                service_tier: SERVICE_TIER,
                system_fingerprint: SYSTEM_FINGERPRINT,
            },
        )
    }
}

#[derive(Serialize)]
struct CompletionView<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChoiceView<'a>>,
    usage: Usage,
    service_tier: &'static str,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct ChoiceView<'a> {
    index: usize,
    message: MessageView<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct MessageView<'a> {
    role: &'static str,
    content: Option<&'a str>,
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallView<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_call: Option<FunctionView<'a>>,
}

#[derive(Serialize)]
struct ToolCallView<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionView<'a>,
}

#[derive(Serialize)]
struct FunctionView<'a> {
    name: &'a str,
    arguments: &'a str,
}

impl<'a> From<&'a ToolCall> for ToolCallView<'a> {
    fn from(call: &'a ToolCall) -> Self {
        Self {
            id: &call.id,
            kind: "function",
            function: FunctionView {
                name: &call.name,
                arguments: &call.arguments,
            },
        }
    }
}
