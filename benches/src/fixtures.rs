//! Realistic exchanges for the capture and writer benches: requests, JSON bodies and SSE streams.
//!
//! The bodies have the shape the simulated upstream and OpenAI send (`chat.completion` and
//! `chat.completion.chunk` with every field), carry ordinary prose with nothing to redact, and
//! are built once per bench, so what is timed is capture, not the making of inputs.

use bytes::Bytes;
use forge_layer::capture::{BodyEnd, CaptureSession, ExchangeMeta, PendingTrace};
use forge_layer::redact::Redactor;
use forge_layer::store::Ticket;
use forge_router::Arm;

/// The response cap the gateway uses by default (`capture.max_response_bytes`).
pub const CAPTURE_CAP: usize = 4 * 1024 * 1024;

/// The SSE event cap the writer uses by default (`capture.max_event_bytes`).
pub const MAX_EVENT_BYTES: usize = 1 << 20;

const WORDS: [&str; 16] = [
    "Load",
    "testing",
    "measures",
    "how",
    "a",
    "service",
    "behaves",
    "when",
    "many",
    "clients",
    "send",
    "requests",
    "at",
    "once,",
    "under",
    "pressure.",
];

const COMPLETION_ID: &str = "chatcmpl-9xBenchFixture0000000000000";
const MODEL: &str = "gpt-4o-mini-2024-07-18";
const FINGERPRINT: &str = "fp_0ba0d124f1";
const CREATED: u64 = 1_735_689_600;
/// The token details OpenAI's usage object carries besides its three counts.
const USAGE_DETAILS: &str = r#""prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}"#;

/// What the router decided for a teacher exchange of the bench alias.
pub fn exchange_meta(stream: bool) -> ExchangeMeta {
    ExchangeMeta {
        tenant: Some("acme".into()),
        key_id: Some("app-1".into()),
        alias: "gpt-4o".into(),
        upstream: "openai".into(),
        model: MODEL.into(),
        arm: Arm::Teacher,
        route_version: 7,
        stream,
        canary: false,
    }
}

/// A chat completion request with a system and a user message.
pub fn chat_request(stream: bool) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"system","content":"You are a concise assistant for an engineering team."}},{{"role":"user","content":"Explain what a closed-loop load generator measures and why p99 matters more than the mean."}}],"temperature":0.2,"user":"user-42","stream":{stream}}}"#
    ))
}

/// Prose of `words` words, cycling through a fixed vocabulary.
fn prose(words: usize) -> String {
    let mut text = String::new();
    for (i, word) in WORDS.iter().cycle().take(words).enumerate() {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(word);
    }
    text
}

fn completion(content: &str) -> String {
    format!(
        r#"{{"id":"{COMPLETION_ID}","object":"chat.completion","created":{CREATED},"model":"{MODEL}","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":41,"completion_tokens":380,"total_tokens":421,{USAGE_DETAILS}}},"system_fingerprint":"{FINGERPRINT}","service_tier":"default"}}"#
    )
}

/// A non-stream `chat.completion` body of at least `min_len` bytes (and barely more).
pub fn completion_json(min_len: usize) -> Bytes {
    let mut words = 1;
    loop {
        let body = completion(&prose(words));
        if body.len() >= min_len {
            return Bytes::from(body);
        }
        words += 1;
    }
}

fn chunk(delta: &str, finish_reason: &str) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"{COMPLETION_ID}\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\"model\":\"{MODEL}\",\"system_fingerprint\":\"{FINGERPRINT}\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish_reason}}}],\"usage\":null}}\n\n"
    ))
}

/// A whole SSE stream of exactly `frames` frames (at least 4), one event per frame as upstreams
/// send them: the role, one word per content chunk, the finish reason, the usage chunk and
/// `[DONE]`.
pub fn sse_frames(frames: usize) -> Vec<Bytes> {
    let words = frames.saturating_sub(4);
    let mut out = Vec::with_capacity(frames);
    out.push(chunk(
        r#"{"role":"assistant","content":"","refusal":null}"#,
        "null",
    ));
    for (i, word) in WORDS.iter().cycle().take(words).enumerate() {
        let word = if i == 0 {
            (*word).to_string()
        } else {
            format!(" {word}")
        };
        out.push(chunk(&format!(r#"{{"content":"{word}"}}"#), "null"));
    }
    out.push(chunk("{}", "\"stop\""));
    out.push(Bytes::from(format!(
        "data: {{\"id\":\"{COMPLETION_ID}\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\"model\":\"{MODEL}\",\"system_fingerprint\":\"{FINGERPRINT}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":41,\"completion_tokens\":{words},\"total_tokens\":{},{USAGE_DETAILS}}}}}\n\n",
        41 + words
    )));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

/// A finished 200 exchange whose response was `frames`, as the capture layer hands it to the
/// writer.
pub fn pending_trace(
    meta: &ExchangeMeta,
    request: &Bytes,
    is_sse: bool,
    frames: &[Bytes],
) -> PendingTrace {
    let mut session = CaptureSession::new(
        Ticket::untracked(),
        meta.clone(),
        request.clone(),
        CAPTURE_CAP,
    );
    session.on_response(200, is_sse);
    for frame in frames {
        session.on_chunk(frame);
    }
    session.finish(BodyEnd::Complete)
}

/// What the writer commits for a finished exchange: the trace as stored (the request kept as
/// sent when there is nothing to redact in it), encoded as JSON the way `store/writer.rs`
/// encodes it.
pub fn stored_json(trace: PendingTrace, redactor: &Redactor) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&trace.into_stored(redactor, MAX_EVENT_BYTES).0)
}

#[cfg(test)]
mod tests {
    use forge_layer::trace::Outcome;

    use super::*;

    #[test]
    fn completion_is_just_over_the_asked_length_and_parses_complete() {
        let body = completion_json(2048);
        assert!((2048..2048 + 16).contains(&body.len()), "{}", body.len());
        let trace = pending_trace(&exchange_meta(false), &chat_request(false), false, &[body])
            .into_trace(&Redactor::default(), MAX_EVENT_BYTES);
        assert_eq!(trace.outcome, Outcome::Completed);
        let content = trace.response.choices[0].message.content.as_deref();
        assert!(content.is_some_and(|c| c.starts_with("Load testing measures")));
    }

    #[test]
    fn stream_has_the_asked_frames_and_reassembles_complete() {
        let frames = sse_frames(500);
        assert_eq!(frames.len(), 500);
        let trace = pending_trace(&exchange_meta(true), &chat_request(true), true, &frames)
            .into_trace(&Redactor::default(), MAX_EVENT_BYTES);
        assert_eq!(trace.outcome, Outcome::Completed);
        let choice = &trace.response.choices[0];
        assert_eq!(choice.finish_reason.as_deref(), Some("stop"));
        assert_eq!(choice.message.content.as_deref(), Some(prose(496).as_str()));
        assert_eq!(
            trace.response.usage.as_ref().unwrap().to_value()["completion_tokens"],
            496
        );
        // As OpenAI sends it, with the token details.
        assert!(
            trace
                .response
                .usage
                .as_ref()
                .unwrap()
                .get()
                .contains(USAGE_DETAILS)
        );
        // Nothing in the prose looks like a secret or PII, so redaction changes nothing.
        assert_eq!(trace.request["user"], "user-42");
    }
}
