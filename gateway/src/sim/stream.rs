//! The SSE body of a streamed chat completion: OpenAI's exact chunk sequence and framing, one frame per event.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderValue, header};
use serde::Serialize;
use serde::ser::SerializeMap;

use super::chat::{Completion, Reply, SERVICE_TIER, SYSTEM_FINGERPRINT, Usage};
use super::error::ApiError;

/// Argument fragments are about this many characters, like the token-sized pieces OpenAI sends.
const ARGUMENT_FRAGMENT_CHARS: usize = 6;

/// One SSE event of the stream, pointing into the completion rather than copying from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The first text chunk of a choice: the role, empty content, null refusal.
    Open {
        choice: usize,
    },
    /// `content[start..end]`: one word and the space after it.
    Word {
        choice: usize,
        start: usize,
        end: usize,
    },
    /// The first chunk of a tool call: its id and name. For call 0 it also carries the role.
    ToolOpen {
        choice: usize,
        call: usize,
    },
    /// `arguments[start..end]` of one call.
    ToolArguments {
        choice: usize,
        call: usize,
        start: usize,
        end: usize,
    },
    Finish {
        choice: usize,
    },
    Usage,
    Error,
    Done,
}

impl Step {
    fn is_content(self) -> bool {
        matches!(self, Step::Word { .. } | Step::ToolArguments { .. })
    }
}

/// What varies in a stream's chunks besides the answer (openai-wire.md §1.3).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// `stream_options.include_usage`: a usage chunk before `[DONE]`.
    pub(crate) include_usage: bool,
    /// `stream_options.include_obfuscation`: random padding in each chunk with a choice.
    pub(crate) obfuscation: bool,
    /// `usage: null` on every other chunk, as the spec says; without it the key is left out, as
    /// in OpenAI's recorded 2024 streams.
    pub(crate) null_usage: bool,
}

/// The longest `obfuscation` padding, in characters.
const OBFUSCATION_MAX_CHARS: usize = 16;

pub(crate) fn response(
    completion: Completion,
    shape: Shape,
    chunk_delay: Duration,
    error_after_chunks: Option<usize>,
) -> Response {
    let steps = plan(&completion.replies, shape.include_usage, error_after_chunks);
    let events = ChunkStream {
        completion,
        steps,
        shape,
        chunk_delay,
    };
    let body = futures_util::stream::unfold((events, 0_usize), |(events, next)| async move {
        let step = *events.steps.get(next)?;
        if next > 0 && !events.chunk_delay.is_zero() {
            tokio::time::sleep(events.chunk_delay).await;
        }
        let frame = events.render(step);
        Some((Ok::<_, Infallible>(frame), (events, next + 1)))
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Every event in wire order: each choice's own sequence, interleaved round-robin, then the
/// usage chunk and `[DONE]`; or cut by an error event after `error_after_chunks` content chunks.
fn plan(replies: &[Reply], include_usage: bool, error_after_chunks: Option<usize>) -> Vec<Step> {
    let per_choice: Vec<Vec<Step>> = replies
        .iter()
        .enumerate()
        .map(|(choice, reply)| choice_steps(choice, reply))
        .collect();
    let mut queues: Vec<std::vec::IntoIter<Step>> =
        per_choice.into_iter().map(Vec::into_iter).collect();
    let mut steps = Vec::new();
    let mut content_chunks = 0;
    loop {
        let mut progressed = false;
        for queue in &mut queues {
            let Some(step) = queue.next() else { continue };
            progressed = true;
            if error_after_chunks == Some(content_chunks)
                && !matches!(step, Step::Open { .. } | Step::ToolOpen { .. })
            {
                steps.push(Step::Error);
                return steps;
            }
            if step.is_content() {
                content_chunks += 1;
            }
            steps.push(step);
        }
        if !progressed {
            break;
        }
    }
    if include_usage {
        steps.push(Step::Usage);
    }
    steps.push(Step::Done);
    steps
}

fn choice_steps(choice: usize, reply: &Reply) -> Vec<Step> {
    let mut steps = Vec::new();
    match reply {
        Reply::Text(text) => {
            steps.push(Step::Open { choice });
            let content = text.content.as_str();
            let mut start = 0;
            // Each chunk is a word with the space that follows it, so the chunks concatenate
            // back to exactly the content.
            while start < content.len() {
                let end = content[start..]
                    .find(' ')
                    .map_or(content.len(), |space| start + space + 1);
                steps.push(Step::Word { choice, start, end });
                start = end;
            }
        }
        Reply::ToolCalls(_) | Reply::FunctionCall(_) => {
            let calls = reply.calls();
            for (call, tool_call) in calls.iter().enumerate() {
                steps.push(Step::ToolOpen { choice, call });
                let arguments = tool_call.arguments.as_str();
                let mut boundaries = arguments
                    .char_indices()
                    .map(|(at, _)| at)
                    .step_by(ARGUMENT_FRAGMENT_CHARS)
                    .chain(std::iter::once(arguments.len()))
                    .peekable();
                while let Some(start) = boundaries.next() {
                    let Some(&end) = boundaries.peek() else { break };
                    if end > start {
                        steps.push(Step::ToolArguments {
                            choice,
                            call,
                            start,
                            end,
                        });
                    }
                }
            }
        }
    }
    steps.push(Step::Finish { choice });
    steps
}

struct ChunkStream {
    completion: Completion,
    steps: Vec<Step>,
    shape: Shape,
    chunk_delay: Duration,
}

impl ChunkStream {
    fn render(&self, step: Step) -> Bytes {
        let chunk = match step {
            Step::Done => return Bytes::from_static(b"data: [DONE]\n\n"),
            Step::Error => return ApiError::server_error().to_sse_event(),
            Step::Usage => self.chunk(None, Some(&self.completion.usage)),
            Step::Open { choice } => self.chunk(Some(self.choice(choice, Delta::Open, None)), None),
            Step::Word { choice, start, end } => {
                let text = match &self.completion.replies[choice] {
                    Reply::Text(text) => &text.content[start..end],
                    Reply::ToolCalls(_) | Reply::FunctionCall(_) => "",
                };
                self.chunk(Some(self.choice(choice, Delta::Content(text), None)), None)
            }
            Step::ToolOpen { choice, call } => {
                let delta = match (self.call(choice, call), self.legacy(choice)) {
                    (Some(function_call), true) => Delta::FunctionOpen {
                        name: &function_call.name,
                    },
                    (Some(tool_call), false) => Delta::ToolOpen {
                        index: call,
                        id: &tool_call.id,
                        name: &tool_call.name,
                    },
                    (None, _) => Delta::Empty,
                };
                self.chunk(Some(self.choice(choice, delta, None)), None)
            }
            Step::ToolArguments {
                choice,
                call,
                start,
                end,
            } => {
                let delta = match (self.call(choice, call), self.legacy(choice)) {
                    (Some(function_call), true) => {
                        Delta::FunctionArguments(&function_call.arguments[start..end])
                    }
                    (Some(tool_call), false) => Delta::ToolArguments {
                        index: call,
                        fragment: &tool_call.arguments[start..end],
                    },
                    (None, _) => Delta::Empty,
                };
                self.chunk(Some(self.choice(choice, delta, None)), None)
            }
            Step::Finish { choice } => {
                let reason = self.completion.replies[choice].finish_reason();
                self.chunk(Some(self.choice(choice, Delta::Empty, Some(reason))), None)
            }
        };
        frame(&chunk)
    }

    fn call(&self, choice: usize, call: usize) -> Option<&super::answer::ToolCall> {
        self.completion.replies[choice].calls().get(call)
    }

    /// Whether the choice answers with the deprecated `function_call`.
    fn legacy(&self, choice: usize) -> bool {
        matches!(self.completion.replies[choice], Reply::FunctionCall(_))
    }

    fn choice<'a>(
        &self,
        index: usize,
        delta: Delta<'a>,
        finish_reason: Option<&'static str>,
    ) -> ChunkChoice<'a> {
        ChunkChoice {
            index,
            delta,
            logprobs: None,
            finish_reason,
        }
    }

    fn chunk<'a>(&'a self, choice: Option<ChunkChoice<'a>>, usage: Option<&'a Usage>) -> Chunk<'a> {
        let obfuscation = (self.shape.obfuscation && choice.is_some()).then(padding);
        Chunk {
            id: &self.completion.id,
            object: "chat.completion.chunk",
            created: self.completion.created,
            model: &self.completion.model,
            service_tier: SERVICE_TIER,
            system_fingerprint: SYSTEM_FINGERPRINT,
            choices: choice,
            usage: usage.map(Some).or(self.shape.null_usage.then_some(None)),
            obfuscation,
        }
    }
}

/// Random characters of a random length, as OpenAI pads chunks to hide their sizes.
fn padding() -> String {
    use rand::Rng;
    use rand::distr::{Alphanumeric, SampleString};
    let mut rng = rand::rng();
    let len = rng.random_range(1..=OBFUSCATION_MAX_CHARS);
    Alphanumeric.sample_string(&mut rng, len)
}

fn frame(chunk: &Chunk<'_>) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    if serde_json::to_writer(&mut out, chunk).is_err() {
        return ApiError::server_error().to_sse_event();
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    /// At most one choice per chunk; none in the usage chunk.
    #[serde(serialize_with = "as_list")]
    choices: Option<ChunkChoice<'a>>,
    /// Absent, `null`, or the usage object (in the usage chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<&'a Usage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    obfuscation: Option<String>,
}

fn as_list<S: serde::Serializer>(
    choice: &Option<ChunkChoice<'_>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    choice.as_slice().serialize(serializer)
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: usize,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

/// The `delta` of a chunk, field for field as OpenAI sends it (openai-wire.md §1.3).
enum Delta<'a> {
    Open,
    Content(&'a str),
    ToolOpen {
        index: usize,
        id: &'a str,
        name: &'a str,
    },
    ToolArguments {
        index: usize,
        fragment: &'a str,
    },
    /// The first chunk of a deprecated `function_call`: the role, null content, the name.
    FunctionOpen {
        name: &'a str,
    },
    FunctionArguments(&'a str),
    Empty,
}

impl Serialize for Delta<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            Delta::Open => {
                let mut map = serializer.serialize_map(Some(3))?;
                map.serialize_entry("role", "assistant")?;
                map.serialize_entry("content", "")?;
                map.serialize_entry("refusal", &None::<&str>)?;
                map.end()
            }
            Delta::Content(text) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("content", text)?;
                map.end()
            }
            Delta::ToolOpen { index, id, name } => {
                let call = [ToolCallDelta {
                    index,
                    id: Some(id),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(name),
                        arguments: "",
                    },
                }];
                // Only the first call of a message carries the role, as recorded from OpenAI.
                if index == 0 {
                    let mut map = serializer.serialize_map(Some(4))?;
                    map.serialize_entry("role", "assistant")?;
                    map.serialize_entry("content", &None::<&str>)?;
                    map.serialize_entry("tool_calls", &call)?;
                    map.serialize_entry("refusal", &None::<&str>)?;
                    map.end()
                } else {
                    let mut map = serializer.serialize_map(Some(1))?;
                    map.serialize_entry("tool_calls", &call)?;
                    map.end()
                }
            }
            Delta::ToolArguments { index, fragment } => {
                let call = [ToolCallDelta {
                    index,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments: fragment,
                    },
                }];
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("tool_calls", &call)?;
                map.end()
            }
            Delta::FunctionOpen { name } => {
                let mut map = serializer.serialize_map(Some(4))?;
                map.serialize_entry("role", "assistant")?;
                map.serialize_entry("content", &None::<&str>)?;
                map.serialize_entry(
                    "function_call",
                    &FunctionDelta {
                        name: Some(name),
                        arguments: "",
                    },
                )?;
                map.serialize_entry("refusal", &None::<&str>)?;
                map.end()
            }
            Delta::FunctionArguments(fragment) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(
                    "function_call",
                    &FunctionDelta {
                        name: None,
                        arguments: fragment,
                    },
                )?;
                map.end()
            }
            Delta::Empty => serializer.serialize_map(Some(0))?.end(),
        }
    }
}

#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}
