//! Rebuilds the final assistant message of an exchange, from a chat SSE stream or a JSON body.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::sse::SseParser;

/// One tool call of the final message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// `call_…`.
    pub id: String,
    /// Always `function` for chat completions.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function name and its JSON-encoded arguments, kept as the exact string received.
    pub function: FunctionCall,
}

/// A function call's name and arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function name.
    pub name: String,
    /// The arguments, a JSON-encoded string, never re-serialised.
    pub arguments: String,
}

/// The assistant's final message for one choice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// The text, if any.
    pub content: Option<String>,
    /// A refusal, if the model refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Tool calls, in index order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A call of the deprecated `functions` API, which older apps still send: `finish_reason`
    /// is then `function_call`, and the call is the whole answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCall>,
}

impl AssistantMessage {
    /// The answer as text, for a judge or a comparison: the content, or else the calls as JSON
    /// (some servers send an empty content beside a call).
    pub fn answer_text(&self) -> String {
        let calls = match (&self.function_call, self.tool_calls.is_empty()) {
            (_, false) => serde_json::to_string(&self.tool_calls).ok(),
            (Some(call), true) => serde_json::to_string(call).ok(),
            (None, true) => None,
        };
        match (self.content.as_deref(), calls) {
            (Some(text), _) if !text.is_empty() => text.to_string(),
            (_, Some(calls)) => calls,
            (text, None) => text.unwrap_or_default().to_string(),
        }
    }
}

/// One choice of the final response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalChoice {
    /// The choice index (`n > 1` gives several).
    pub index: u32,
    /// The reassembled message.
    pub message: AssistantMessage,
    /// `stop`, `length`, `tool_calls`, `content_filter`…; `None` if the stream was cut.
    pub finish_reason: Option<String>,
}

/// What the client received, reassembled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalResponse {
    /// The model name the upstream reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Choices in index order.
    pub choices: Vec<FinalChoice>,
    /// The usage object, if the upstream sent one, as it sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<RawObject>,
    /// An upstream error object: the whole error body, or a mid-stream `error` event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// For streams: whether `[DONE]` arrived and no event was too large to keep. Always true
    /// for a complete JSON body.
    pub complete: bool,
}

/// The deepest nesting of arrays and objects an upstream's usage or error object is stored
/// with. serde_json reads at most 128 levels, and a trace holds these two levels down (the
/// admin API's listing two more): an error body nested 126 deep parses when it arrives, but a
/// trace holding it could not be read back, and every dataset build reads every trace.
const MAX_STORED_NESTING: usize = 64;

/// How deep arrays and objects nest in the JSON `text`, strings aside.
fn nesting(text: &str) -> usize {
    let bytes = text.as_bytes();
    // Most objects (a usage object: three) have fewer brackets than the limit in all.
    if memchr::memchr2_iter(b'{', b'[', bytes).count() <= MAX_STORED_NESTING {
        return 0;
    }
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'{' | b'[') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, b'}' | b']') => depth = depth.saturating_sub(1),
            (false, _, _) => {}
        }
    }
    deepest
}

/// How deep arrays and objects nest in `value`.
fn value_nesting(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(value_nesting).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(value_nesting).max().unwrap_or(0),
        _ => 0,
    }
}

/// An upstream's error object as stored: as it came, or, nested past [`MAX_STORED_NESTING`],
/// as its JSON text, which keeps what it said and leaves the trace readable.
fn storable_error(error: Option<Value>) -> Option<Value> {
    let error = error.filter(|e| !e.is_null())?;
    Some(if value_nesting(&error) > MAX_STORED_NESTING {
        Value::String(error.to_string())
    } else {
        error
    })
}

/// A JSON object kept as the text it came in. The usage object is read, checked for secrets and
/// stored this way: OpenAI's, with its token details, took more than half of a response body's
/// parse as a tree of values, and more again to walk and serialise (`benches/ROUNDS.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawObject(Box<RawValue>);

impl RawObject {
    /// `raw`, if it is an object, without the whitespace between its tokens: upstreams that
    /// pretty-print their bodies would otherwise put line breaks in stored traces, and in each
    /// line of `forge traces export`.
    fn of(raw: &RawValue) -> Option<Self> {
        let text = raw.get();
        if !text.starts_with('{') || nesting(text) > MAX_STORED_NESTING {
            return None;
        }
        let bytes = text.as_bytes();
        if memchr::memchr3(b' ', b'\n', b'\r', bytes).is_none()
            && memchr::memchr(b'\t', bytes).is_none()
        {
            return Some(Self(raw.to_owned()));
        }
        RawValue::from_string(compact(text)).ok().map(Self)
    }

    /// From a tree of values, if it is an object.
    pub fn from_value(value: &Value) -> Option<Self> {
        if !value.is_object() || value_nesting(value) > MAX_STORED_NESTING {
            return None;
        }
        serde_json::value::to_raw_value(value).ok().map(Self)
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// As a tree of values.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.get()).unwrap_or(Value::Null)
    }

    /// The same object redacted, or `None` when it holds something to redact and cannot be
    /// read as a tree of values (a number past f64's range, a lone surrogate escape: the raw
    /// text is not checked for those when it is borrowed): then it is left out, never kept
    /// with what it holds.
    pub(crate) fn redacted(self, redactor: &crate::redact::Redactor) -> Option<Self> {
        if redactor.json_is_clean(&self.0) {
            return Some(self);
        }
        let mut value: Value = serde_json::from_str(self.get()).ok()?;
        redactor.redact_json(&mut value);
        Self::from_value(&value)
    }
}

/// `json`, valid JSON text, without the whitespace outside its strings.
fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            (in_string, escaped) = (escaped || c != '"', !escaped && c == '\\');
        } else if c == '"' {
            in_string = true;
        } else if matches!(c, ' ' | '\t' | '\n' | '\r') {
            continue;
        }
        out.push(c);
    }
    out
}

/// Equal when the two hold the same JSON, however it is spaced or its keys ordered.
impl PartialEq for RawObject {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get() || self.to_value() == other.to_value()
    }
}

impl Eq for RawObject {}

impl FinalResponse {
    /// Parses a non-stream response body (a `chat.completion`, or an error body).
    pub fn from_json(body: &[u8]) -> Self {
        // The usual body is read into borrowed views, without a tree of values (about half the
        // cost). Anything unusual, a field of an unexpected type or a duplicate key, fails
        // that and is read the lenient way, which ignores what it cannot use.
        match parse::<CompletionView<'_>>(body) {
            Ok(view) => view.into_final(),
            Err(_) => Self::from_any_json(body),
        }
    }

    /// Reads whatever parts of a JSON body have the expected types.
    fn from_any_json(body: &[u8]) -> Self {
        let Ok(value) = parse::<Value>(body) else {
            return Self::default();
        };
        let mut out = FinalResponse {
            model: value["model"].as_str().map(str::to_string),
            usage: value.get("usage").and_then(RawObject::from_value),
            error: storable_error(value.get("error").cloned()),
            complete: true,
            choices: Vec::new(),
        };
        for choice in value["choices"].as_array().into_iter().flatten() {
            let message = &choice["message"];
            let tool_calls = message["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|call| ToolCall {
                    id: str_of(&call["id"]),
                    kind: call["type"].as_str().unwrap_or("function").to_string(),
                    function: FunctionCall {
                        name: str_of(&call["function"]["name"]),
                        arguments: str_of(&call["function"]["arguments"]),
                    },
                })
                .collect();
            // Read as the typed view reads it, so that both readings agree.
            let function_call = message.get("function_call").and_then(|call| {
                let text = call.to_string();
                function_call_of(serde_json::from_str(&text).ok()).map(FunctionView::into_owned)
            });
            out.choices.push(FinalChoice {
                index: index_of(choice),
                message: AssistantMessage {
                    content: message["content"].as_str().map(str::to_string),
                    refusal: message["refusal"].as_str().map(str::to_string),
                    tool_calls,
                    function_call,
                },
                finish_reason: choice["finish_reason"].as_str().map(str::to_string),
            });
        }
        out.choices.sort_by_key(|c| c.index);
        out
    }
}

/// Parses a JSON body. One that is UTF-8, as nearly all are, is read as text, whose strings
/// serde_json need not then check for UTF-8 one by one as it must in bytes; the same value either
/// way.
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> serde_json::Result<T> {
    // A byte order mark, which the SDKs' JSON readers skip.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn index_of(v: &Value) -> u32 {
    v["index"]
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct ToolAcc {
    id: String,
    kind: String,
    name: String,
    arguments: String,
}

#[derive(Debug, Default)]
struct ChoiceAcc {
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: BTreeMap<u32, ToolAcc>,
    function_call: Option<FunctionCall>,
    finish_reason: Option<String>,
}

/// Reassembles a chat completion stream fed in arbitrary byte chunks.
#[derive(Debug)]
pub struct StreamReassembler {
    parser: SseParser,
    model: Option<String>,
    choices: BTreeMap<u32, ChoiceAcc>,
    usage: Option<RawObject>,
    error: Option<Value>,
    done: bool,
}

impl StreamReassembler {
    /// A reassembler whose pending-event buffer is capped at `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            parser: SseParser::new(max_event_bytes),
            model: None,
            choices: BTreeMap::new(),
            usage: None,
            error: None,
            done: false,
        }
    }

    /// Feeds one chunk of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        let Self {
            parser,
            model,
            choices,
            usage,
            error,
            done,
        } = self;
        parser.feed(bytes, &mut |data| {
            if data.starts_with("[DONE]") {
                *done = true;
                return;
            }
            // A borrowed view of the chunk: only the fields that matter, no tree of values.
            let Ok(chunk) = serde_json::from_str::<ChunkView<'_>>(data) else {
                return;
            };
            if let Some(e) = chunk.error.filter(|e| !e.is_null()) {
                *error = Some(e);
            }
            // Azure's first chunk (its prompt filter results) names no model: `""`.
            if model.as_deref().is_none_or(str::is_empty) {
                *model = chunk.model.filter(|m| !m.is_empty()).map(Cow::into_owned);
            }
            if let Some(u) = chunk.usage.and_then(RawObject::of) {
                *usage = Some(u);
            }
            for choice in chunk.choices.into_iter().flatten() {
                apply_delta(choices.entry(choice.index).or_default(), choice);
            }
        });
    }

    /// Whether an event was too large to keep (the message is then incomplete).
    pub fn overflowed(&self) -> bool {
        self.parser.overflowed()
    }

    /// The final response as received so far.
    pub fn finish(self) -> FinalResponse {
        let choices = self
            .choices
            .into_iter()
            .map(|(index, acc)| FinalChoice {
                index,
                message: AssistantMessage {
                    content: acc.content,
                    refusal: acc.refusal,
                    tool_calls: acc
                        .tool_calls
                        .into_values()
                        .map(|t| ToolCall {
                            id: t.id,
                            kind: if t.kind.is_empty() {
                                "function".into()
                            } else {
                                t.kind
                            },
                            function: FunctionCall {
                                name: t.name,
                                arguments: t.arguments,
                            },
                        })
                        .collect(),
                    function_call: acc.function_call,
                },
                finish_reason: acc.finish_reason,
            })
            .collect();
        FinalResponse {
            model: self.model,
            choices,
            usage: self.usage,
            error: storable_error(self.error),
            // An event dropped for its size took part of the message with it.
            complete: self.done && !self.parser.overflowed(),
        }
    }
}

fn apply_delta(acc: &mut ChoiceAcc, choice: ChoiceView<'_>) {
    if let Some(delta) = choice.delta {
        if let Some(text) = delta.content {
            acc.content.get_or_insert_with(String::new).push_str(&text);
        }
        if let Some(text) = delta.refusal {
            acc.refusal.get_or_insert_with(String::new).push_str(&text);
        }
        if let Some(fragment) = function_call_of(delta.function_call) {
            apply_function_delta(acc, fragment);
        }
        for frag in delta.tool_calls.into_iter().flatten() {
            let tool = acc.tool_calls.entry(frag.index).or_default();
            // id, type and name come with the first fragment of an index; later ones add arguments.
            if let Some(id) = frag.id.filter(|_| tool.id.is_empty()) {
                tool.id = id.into_owned();
            }
            if let Some(kind) = frag.kind.filter(|_| tool.kind.is_empty()) {
                tool.kind = kind.into_owned();
            }
            if let Some(function) = frag.function {
                if let Some(name) = function.name.filter(|_| tool.name.is_empty()) {
                    tool.name = name.into_owned();
                }
                if let Some(args) = function.arguments {
                    tool.arguments.push_str(&args);
                }
            }
        }
    }
    if let Some(reason) = choice.finish_reason {
        acc.finish_reason = Some(reason.into_owned());
    }
}

/// A fragment of a deprecated `function_call`: the name comes first, then the arguments in pieces.
fn apply_function_delta(acc: &mut ChoiceAcc, fragment: FunctionView<'_>) {
    let call = acc.function_call.get_or_insert_with(|| FunctionCall {
        name: String::new(),
        arguments: String::new(),
    });
    if let Some(name) = fragment.name.filter(|_| call.name.is_empty()) {
        call.name = name.into_owned();
    }
    if let Some(args) = fragment.arguments {
        call.arguments.push_str(&args);
    }
}

/// A `chat.completion` (or an error body), borrowing its strings from the body where it can.
#[derive(Deserialize)]
struct CompletionView<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Option<Vec<CompletionChoiceView<'a>>>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct CompletionChoiceView<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    message: Option<MessageView<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

impl CompletionView<'_> {
    fn into_final(self) -> FinalResponse {
        let mut choices: Vec<FinalChoice> =
            self.choices
                .into_iter()
                .flatten()
                .map(|choice| {
                    let message = choice.message.map_or_else(AssistantMessage::default, |m| {
                        AssistantMessage {
                            content: m.content.map(Cow::into_owned),
                            refusal: m.refusal.map(Cow::into_owned),
                            tool_calls: m
                                .tool_calls
                                .into_iter()
                                .flatten()
                                .map(|call| {
                                    let function = call.function.unwrap_or_default();
                                    ToolCall {
                                        id: call.id.unwrap_or_default().into_owned(),
                                        kind: call
                                            .kind
                                            .unwrap_or(Cow::Borrowed("function"))
                                            .into_owned(),
                                        function: FunctionCall {
                                            name: function.name.unwrap_or_default().into_owned(),
                                            arguments: function
                                                .arguments
                                                .unwrap_or_default()
                                                .into_owned(),
                                        },
                                    }
                                })
                                .collect(),
                            function_call: function_call_of(m.function_call)
                                .map(FunctionView::into_owned),
                        }
                    });
                    FinalChoice {
                        index: choice
                            .index
                            .and_then(|i| u32::try_from(i).ok())
                            .unwrap_or(0),
                        message,
                        finish_reason: choice.finish_reason.map(Cow::into_owned),
                    }
                })
                .collect();
        choices.sort_by_key(|c| c.index);
        FinalResponse {
            model: self.model.map(Cow::into_owned),
            choices,
            usage: self.usage.and_then(RawObject::of),
            error: storable_error(self.error),
            complete: true,
        }
    }
}

/// One `chat.completion.chunk`, borrowing its strings from the event where it can.
#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Option<Vec<ChoiceView<'a>>>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default)]
    index: u32,
    #[serde(borrow, default)]
    delta: Option<MessageView<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

/// A message, or a stream's delta of one: the fields are the same.
#[derive(Deserialize)]
struct MessageView<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolDeltaView<'a>>>,
    /// Read only when it is there, and leniently: a malformed one (a field this parser did not
    /// read before it knew the deprecated API) must not cost the chunk its content.
    #[serde(borrow, default)]
    function_call: Option<&'a RawValue>,
}

/// A `function_call` object or fragment, if it has the expected shape.
fn function_call_of(raw: Option<&RawValue>) -> Option<FunctionView<'_>> {
    serde_json::from_str(raw?.get()).ok()
}

#[derive(Deserialize)]
struct ToolDeltaView<'a> {
    #[serde(default)]
    index: u32,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    function: Option<FunctionView<'a>>,
}

#[derive(Deserialize, Default)]
struct FunctionView<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

impl FunctionView<'_> {
    fn into_owned(self) -> FunctionCall {
        FunctionCall {
            name: self.name.unwrap_or_default().into_owned(),
            arguments: self.arguments.unwrap_or_default().into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn a_body_with_a_byte_order_mark_keeps_its_answer() {
        let body = b"\xEF\xBB\xBF{\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}";
        let r = FinalResponse::from_json(body);
        assert_eq!(r.choices.len(), 1, "{r:?}");
        assert_eq!(r.choices[0].message.content.as_deref(), Some("hi"));
        assert!(r.complete);
    }

    #[test]
    fn azures_prompt_filter_chunk_does_not_blank_the_model() {
        let stream = concat!(
            "data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[{\"prompt_index\":0,\"content_filter_results\":{}}]}\n\n",
            "data: {\"choices\":[{\"content_filter_results\":{},\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null,\"index\":0}],\"created\":1,\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o-2024-08-06\",\"object\":\"chat.completion.chunk\"}\n\n",
            "data: {\"choices\":[{\"content_filter_results\":{},\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\",\"index\":0}],\"created\":1,\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o-2024-08-06\",\"object\":\"chat.completion.chunk\"}\n\n",
            "data: [DONE]\n\n"
        );
        let mut r = StreamReassembler::new(1 << 20);
        r.feed(stream.as_bytes());
        let r = r.finish();
        assert_eq!(r.choices[0].message.content.as_deref(), Some("hi"));
        assert_eq!(r.model.as_deref(), Some("gpt-4o-2024-08-06"));
    }

    #[test]
    fn a_deprecated_function_call_is_kept_from_a_stream_and_from_a_body() {
        let chunk = |delta: Value, finish: Value| {
            format!(
                "data: {}\n\n",
                json!({"object": "chat.completion.chunk", "model": "gpt-4o", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            )
        };
        let stream = [
            chunk(
                json!({"role": "assistant", "content": null, "function_call": {"name": "get_weather", "arguments": ""}}),
                Value::Null,
            ),
            chunk(json!({"function_call": {"arguments": "{\"city\":"}}), Value::Null),
            chunk(json!({"function_call": {"arguments": "\"Zürich\"}"}}), Value::Null),
            chunk(json!({}), json!("function_call")),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        let expected = FinalChoice {
            index: 0,
            message: AssistantMessage {
                function_call: Some(FunctionCall {
                    name: "get_weather".into(),
                    arguments: "{\"city\":\"Zürich\"}".into(),
                }),
                ..Default::default()
            },
            finish_reason: Some("function_call".into()),
        };
        for at in 0..=stream.len() {
            let (a, b) = stream.as_bytes().split_at(at);
            assert_eq!(
                reassemble(&[a, b]).choices,
                std::slice::from_ref(&expected),
                "split at {at}"
            );
        }
        let body = json!({"object": "chat.completion", "model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "function_call",
            "message": {"role": "assistant", "content": null, "function_call": {"name": "get_weather", "arguments": "{\"city\":\"Zürich\"}"}}}]}).to_string();
        assert_eq!(
            FinalResponse::from_json(body.as_bytes()).choices,
            std::slice::from_ref(&expected)
        );
        assert_eq!(
            FinalResponse::from_any_json(body.as_bytes()).choices,
            std::slice::from_ref(&expected)
        );
        assert_eq!(
            expected.message.answer_text(),
            r#"{"name":"get_weather","arguments":"{\"city\":\"Zürich\"}"}"#
        );
        // Some servers send an empty content beside the call: the call is still the answer.
        let beside_empty = AssistantMessage {
            content: Some(String::new()),
            ..expected.message.clone()
        };
        assert_eq!(beside_empty.answer_text(), expected.message.answer_text());

        // A malformed one costs its chunk nothing else.
        let odd = chunk(
            json!({"content": "hi", "function_call": "oops"}),
            json!("stop"),
        );
        let r = reassemble(&[odd.as_bytes()]);
        assert_eq!(r.choices[0].message.content.as_deref(), Some("hi"));
        assert_eq!(r.choices[0].message.function_call, None);
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));
        for body in [
            r#"{"choices":[{"message":{"content":"hi","function_call":"oops"}}]}"#,
            r#"{"choices":[{"message":{"content":"hi","function_call":{"name":1}}}]}"#,
        ] {
            let fast = FinalResponse::from_json(body.as_bytes());
            assert_eq!(
                fast,
                FinalResponse::from_any_json(body.as_bytes()),
                "{body}"
            );
            assert_eq!(fast.choices[0].message.content.as_deref(), Some("hi"));
        }
    }

    /// A stream with two choices, text with multi-byte characters, parallel tool calls, a
    /// refusal, and a usage chunk, framed with the given line ending.
    fn stream(eol: &str) -> Vec<u8> {
        let chunk = |choices: Value| json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m-1", "choices": choices});
        let events = vec![
            chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "finish_reason": null}]),
            ),
            chunk(
                json!([{"index": 1, "delta": {"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]}, "finish_reason": null}]),
            ),
            chunk(json!([{"index": 0, "delta": {"content": "Grüße, "}, "finish_reason": null}])),
            chunk(
                json!([{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":"}}]}, "finish_reason": null}]),
            ),
            chunk(json!([{"index": 0, "delta": {"content": "世界 😀"}, "finish_reason": null}])),
            chunk(
                json!([{"index": 1, "delta": {"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}, "finish_reason": null}]),
            ),
            chunk(
                json!([{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"é\"}"}}]}, "finish_reason": null}]),
            ),
            chunk(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])),
            chunk(json!([{"index": 1, "delta": {}, "finish_reason": "tool_calls"}])),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}),
        ];
        let mut out = String::new();
        for e in events {
            out.push_str(&format!("data: {e}{eol}{eol}"));
        }
        out.push_str(&format!("data: [DONE]{eol}{eol}"));
        out.into_bytes()
    }

    fn expected() -> FinalResponse {
        FinalResponse {
            model: Some("m-1".into()),
            choices: vec![
                FinalChoice {
                    index: 0,
                    message: AssistantMessage {
                        content: Some("Grüße, 世界 😀".into()),
                        refusal: None,
                        tool_calls: vec![],
                        function_call: None,
                    },
                    finish_reason: Some("stop".into()),
                },
                FinalChoice {
                    index: 1,
                    message: AssistantMessage {
                        content: None,
                        refusal: None,
                        tool_calls: vec![
                            ToolCall {
                                id: "call_a".into(),
                                kind: "function".into(),
                                function: FunctionCall {
                                    name: "f".into(),
                                    arguments: "{\"q\":\"é\"}".into(),
                                },
                            },
                            ToolCall {
                                id: "call_b".into(),
                                kind: "function".into(),
                                function: FunctionCall {
                                    name: "g".into(),
                                    arguments: "{}".into(),
                                },
                            },
                        ],
                        function_call: None,
                    },
                    finish_reason: Some("tool_calls".into()),
                },
            ],
            usage: RawObject::from_value(
                &json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}),
            ),
            error: None,
            complete: true,
        }
    }

    /// `bytes` cut at the given points (empty chunks included, where two points meet).
    fn cut<'a>(bytes: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut last = 0;
        for p in points {
            chunks.push(&bytes[last..p]);
            last = p;
        }
        chunks.push(&bytes[last..]);
        chunks
    }

    fn reassemble(chunks: &[&[u8]]) -> FinalResponse {
        let mut r = StreamReassembler::new(1 << 20);
        for c in chunks {
            r.feed(c);
        }
        r.finish()
    }

    #[test]
    fn whole_stream_reassembles() {
        for eol in ["\n", "\r\n", "\r"] {
            assert_eq!(reassemble(&[&stream(eol)]), expected(), "eol {eol:?}");
        }
    }

    #[test]
    fn every_single_split_point_gives_the_same_message() {
        for eol in ["\n", "\r\n"] {
            let bytes = stream(eol);
            for i in 0..=bytes.len() {
                assert_eq!(
                    reassemble(&[&bytes[..i], &bytes[i..]]),
                    expected(),
                    "split at {i}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_message(eol in prop::sample::select(vec!["\n", "\r\n", "\r"]), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40)) {
            let bytes = stream(eol);
            prop_assert_eq!(reassemble(&cut(&bytes, &cuts)), expected());
        }
    }

    /// Lines an upstream might send, right or wrong, to build arbitrary streams from.
    fn any_line() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("data: [DONE]".to_string()),
            Just(String::new()),
            Just(": comment".to_string()),
            Just("event: x".to_string()),
            Just("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"é😀\"}}]}".to_string()),
            Just("data: {\"choices\":[{\"index\":4294967296,\"delta\":{\"tool_calls\":[{\"index\":18446744073709551615,\"function\":{\"arguments\":\"{\"}}]}}]}".to_string()),
            Just("data: {\"error\":{\"message\":\"x\"}}".to_string()),
            Just("data: {\"usage\":{\"total_tokens\":1}}".to_string()),
            "data: \\PC{0,40}",
            "\\PC{0,40}",
        ]
    }

    proptest! {
        // Any bytes at all, cut anywhere: no panic, and the same message as whole.
        #[test]
        fn arbitrary_streams_give_one_message_for_any_chunking(
            lines in prop::collection::vec(any_line(), 0..12),
            eol in prop::sample::select(vec!["\n", "\r\n", "\r"]),
            noise in prop::collection::vec(any::<u8>(), 0..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut bytes = lines.join(eol).into_bytes();
            bytes.extend_from_slice(&noise);
            prop_assert_eq!(reassemble(&cut(&bytes, &cuts)), reassemble(&[&bytes]));
        }

        // A non-stream body of any bytes is read without a panic, the same both ways.
        #[test]
        fn arbitrary_json_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..200), text in "\\PC{0,80}") {
            let _ = FinalResponse::from_json(&body);
            let wrapped = format!("{{\"choices\":[{{\"message\":{{\"content\":{text:?}}}}}]}}");
            prop_assert_eq!(
                FinalResponse::from_json(wrapped.as_bytes()),
                FinalResponse::from_any_json(wrapped.as_bytes())
            );
        }
    }

    #[test]
    fn an_error_or_usage_nested_too_deep_to_read_back_is_kept_as_text_or_left_out() {
        let deep = format!("{}{}", "[".repeat(120), "]".repeat(120));
        let body = format!(r#"{{"error":{deep},"usage":{{"x":{deep}}}}}"#);
        let r = FinalResponse::from_json(body.as_bytes());
        assert_eq!(r.error, Some(Value::String(deep.clone())));
        assert!(r.usage.is_none());
        let event = format!("data: {{\"error\":{{\"detail\":{deep}}}}}\n\n");
        let streamed = reassemble(&[event.as_bytes()]);
        assert_eq!(
            streamed.error,
            Some(Value::String(format!("{{\"detail\":{deep}}}")))
        );
        // Shallower values, brackets inside strings included, are kept as they came.
        let fine = r#"{"error":{"message":"[[[[","nested":[[[1]]]},"usage":{"prompt_tokens":1}}"#;
        let r = FinalResponse::from_json(fine.as_bytes());
        assert_eq!(r.error.unwrap()["nested"], serde_json::json!([[[1]]]));
        assert_eq!(r.usage.unwrap().get(), r#"{"prompt_tokens":1}"#);
        assert_eq!(
            nesting(&format!(r#"{{"s":"{}","a":[[1]]}}"#, "[".repeat(200))),
            3
        );
    }

    #[test]
    fn cut_stream_and_mid_stream_error_are_visible() {
        let bytes = stream("\n");
        let cut = reassemble(&[&bytes[..bytes.len() / 2]]);
        assert!(!cut.complete);
        let err = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n";
        let r = reassemble(&[err]);
        assert_eq!(r.error.unwrap()["message"], "boom");
        assert_eq!(r.choices[0].message.content.as_deref(), Some("hi"));
        assert!(!r.complete);
    }

    #[test]
    fn a_stream_with_an_event_too_large_to_keep_is_not_complete() {
        let small = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
        let big = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\ndata: [DONE]\n\n",
            "x".repeat(200)
        );
        let mut r = StreamReassembler::new(128);
        r.feed(small);
        r.feed(big.as_bytes());
        assert!(r.overflowed());
        let r = r.finish();
        assert_eq!(r.choices[0].message.content.as_deref(), Some("hi"));
        assert!(!r.complete, "a dropped event leaves the message short");
        let mut whole = StreamReassembler::new(1 << 20);
        whole.feed(small);
        whole.feed(big.as_bytes());
        assert!(whole.finish().complete);
    }

    #[test]
    fn non_stream_body_parses_to_the_same_shape() {
        let body = json!({"id": "x", "object": "chat.completion", "model": "m-1", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Grüße, 世界 😀", "refusal": null}, "finish_reason": "stop", "logprobs": null},
            {"index": 1, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"q\":\"é\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}});
        assert_eq!(
            FinalResponse::from_json(body.to_string().as_bytes()),
            expected()
        );
        let error = FinalResponse::from_json(
            br#"{"error":{"message":"no","type":"x","param":null,"code":null}}"#,
        );
        assert_eq!(error.error.unwrap()["message"], "no");
    }

    /// The usage object is kept as the upstream wrote it, token details and key order included,
    /// less the spaces between tokens, from a body or from a stream's usage chunk; anything but
    /// an object is dropped.
    #[test]
    fn usage_is_kept_as_sent() {
        let usage = concat!(
            r#"{ "prompt_tokens":41, "completion_tokens":380,"total_tokens":421, "#,
            r#""prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"#,
            r#""completion_tokens_details":{"reasoning_tokens":0,"accepted_prediction_tokens":0}}"#
        );
        let body =
            format!(r#"{{"choices":[{{"index":0,"message":{{"content":"x"}}}}],"usage":{usage}}}"#);
        let stream = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"x\"}}}}],\"usage\":null}}\n\n\
             data: {{\"choices\":[],\"usage\":{usage}}}\n\ndata: [DONE]\n\n"
        );
        let from_body = FinalResponse::from_json(body.as_bytes());
        let from_stream = reassemble(&[stream.as_bytes()]);
        let lenient = FinalResponse::from_any_json(body.as_bytes());
        for response in [&from_body, &from_stream] {
            let kept = usage.replace(' ', "");
            assert_eq!(response.usage.as_ref().map(RawObject::get), Some(&*kept));
        }
        assert_eq!(
            lenient.usage.as_ref().map(RawObject::to_value),
            Some(serde_json::from_str(usage).unwrap())
        );
        assert_eq!(from_body, lenient, "equal as JSON, however written");
        assert_eq!(
            from_body.usage.as_ref().unwrap().to_value()["prompt_tokens_details"]["cached_tokens"],
            0
        );

        for other in ["null", "5", r#""x""#, "[1]"] {
            let body = format!(r#"{{"choices":[],"usage":{other}}}"#);
            assert_eq!(
                FinalResponse::from_json(body.as_bytes()).usage,
                None,
                "{other}"
            );
            let event = format!("data: {{\"choices\":[],\"usage\":{other}}}\n\n");
            assert_eq!(reassemble(&[event.as_bytes()]).usage, None, "{other}");
        }
        // Pretty-printed, as some upstreams send bodies: stored on one line, strings untouched.
        let pretty = "{\n  \"choices\": [],\n  \"usage\": {\n    \"prompt_tokens\": 1,\r\n\t\"note\": \"a \\\" b\\\\\",\n    \"x\": [ 1, {} ]\n  }\n}\n";
        let usage = FinalResponse::from_json(pretty.as_bytes()).usage.unwrap();
        assert_eq!(
            usage.get(),
            r#"{"prompt_tokens":1,"note":"a \" b\\","x":[1,{}]}"#
        );
        let round_trip: FinalResponse =
            serde_json::from_value(serde_json::to_value(&from_body).unwrap()).unwrap();
        assert_eq!(
            round_trip, from_body,
            "read back from a tree, as the CLI reads the admin API"
        );

        let a = RawObject::from_value(&json!({"a": 1, "b": [2]})).unwrap();
        let spaced: RawObject = serde_json::from_str(r#"{ "b" : [2], "a":1 }"#).unwrap();
        assert_eq!(a, spaced);
        assert_ne!(
            a,
            RawObject::from_value(&json!({"a": 1, "b": [3]})).unwrap()
        );
        assert_eq!(RawObject::from_value(&json!([1])), None);
    }

    /// The borrowed views and the lenient reading agree on every body, usual or not; the
    /// unusual ones reach the lenient reading through the views' failure.
    #[test]
    fn both_readings_of_a_json_body_agree() {
        let usual = json!({"model": "m", "choices": [
            {"index": 1, "message": {"content": "bé", "tool_calls": [
                {"id": "c", "function": {"name": "f", "arguments": "{}"}}]}, "finish_reason": "stop"},
            {"index": 0, "message": {"content": null, "refusal": "no"}}],
            "usage": {"total_tokens": 1}})
        .to_string();
        let usual_bodies: Vec<&[u8]> = vec![
            usual.as_bytes(),
            br#"{"choices":[{"message":{"content":"x"}}],"usage":null,"error":null}"#,
            br#"{"choices":[{"message":{"content":"b\u00e9 \"q\"","refusal":"\n"}}]}"#,
            br#"{"choices":[{"index":0,"message":null,"finish_reason":null}]}"#,
            br#"{"choices":[{"index":0,"message":{"tool_calls":[{"type":"custom"}]}}]}"#,
            br#"{"error":{"message":"no"},"usage":5}"#,
        ];
        // Each has a field of a type the views do not take, a duplicate key, or is not an object.
        let unusual_bodies: Vec<&[u8]> = vec![
            br#"{"model":7,"choices":[{"index":0,"message":{"content":"x"}}]}"#,
            br#"{"choices":[{"index":-1,"message":{"content":"x"}}]}"#,
            br#"{"choices":[{"index":1.5,"message":{"content":["x"]}}]}"#,
            br#"{"choices":[{"index":99999999999,"message":"x"}]}"#,
            br#"{"choices":{"0":{}}}"#,
            br#"{"choices":["x",{"index":2,"message":{"content":"y"}}]}"#,
            br#"{"choices":[{"message":{"tool_calls":[{"id":1,"function":{"name":"f","arguments":{}}}]}}]}"#,
            br#"{"model":"a","model":"b","choices":[]}"#,
            br#"[1,2]"#,
            b"not json",
            b"",
        ];
        let views = |body: &[u8]| serde_json::from_slice::<CompletionView<'_>>(body).is_ok();
        assert!(usual_bodies.iter().all(|b| views(b)));
        assert!(unusual_bodies.iter().all(|b| !views(b)));
        for body in usual_bodies.into_iter().chain(unusual_bodies) {
            assert_eq!(
                FinalResponse::from_json(body),
                FinalResponse::from_any_json(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
