//! The engine-neutral capture of one exchange: request bytes in, response chunks, then an end.
//!
//! Any front end (the tower layer here, a pingora module later) drives the same session, so
//! there is one parser and one set of rules for what a trace is.

use bytes::Bytes;
use forge_router::Arm;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::reassemble::{FinalResponse, StreamReassembler};
use crate::redact::Redactor;
use crate::sse::DoneTail;
use crate::store::Ticket;
use crate::trace::{Outcome, Trace, TraceId, TraceOf};

/// What the router decided and who asked: known before the upstream is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeMeta {
    /// The tenant of the client key, if any.
    pub tenant: Option<String>,
    /// The client key's id, if any (never the key).
    pub key_id: Option<String>,
    /// The alias the client asked for.
    pub alias: String,
    /// The upstream that serves it.
    pub upstream: String,
    /// The model sent upstream.
    pub model: String,
    /// Teacher or student.
    pub arm: Arm,
    /// The routing table version that decided.
    pub route_version: u64,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether the route has students: only then has the canary guard anything to judge, and
    /// only then does it count the exchange.
    pub canary: bool,
}

/// How the response body ended, as the front end saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// The last frame arrived (with or without trailers).
    Complete,
    /// The body failed (the upstream broke or stalled).
    Failed,
    /// The client dropped the body before its end.
    Dropped,
}

/// One exchange being captured.
#[derive(Debug)]
pub struct CaptureSession {
    ticket: Ticket,
    meta: ExchangeMeta,
    request: Bytes,
    started: Instant,
    time_ms: u64,
    ttfb_us: u64,
    status: u16,
    is_sse: bool,
    body: Vec<u8>,
    cap: usize,
    over_cap: bool,
    /// An event stream's last bytes, kept past the cap too.
    tail: DoneTail,
}

impl CaptureSession {
    /// Starts a session when the request has been read, under the id `ticket` holds (from the
    /// sink, [`crate::capture::TraceSink::ticket`]). `cap` bounds the response bytes kept.
    pub fn new(ticket: Ticket, meta: ExchangeMeta, request: Bytes, cap: usize) -> Self {
        Self {
            time_ms: ticket.id().timestamp_ms(),
            ticket,
            meta,
            request,
            started: Instant::now(),
            ttfb_us: 0,
            status: 0,
            is_sse: false,
            body: Vec::new(),
            cap,
            over_cap: false,
            tail: DoneTail::default(),
        }
    }

    /// The trace id, sent to the client as `x-forge-trace-id`.
    pub fn id(&self) -> TraceId {
        self.ticket.id()
    }

    /// Whether the response is an event stream that has sent its last event, `[DONE]`.
    pub fn stream_done(&self) -> bool {
        self.is_sse && self.tail.is_done()
    }

    /// The response head arrived.
    pub fn on_response(&mut self, status: u16, is_sse: bool) {
        self.status = status;
        self.is_sse = is_sse;
        self.ttfb_us = micros(self.started.elapsed());
    }

    /// A body chunk passed to the client. It is copied, not reference-counted: holding on to the
    /// chunk would pin the upstream connection's read buffer until the writer runs, and the HTTP
    /// client would allocate a fresh buffer for every response meanwhile (measured: that cost
    /// more than the copy).
    pub fn on_chunk(&mut self, chunk: &[u8]) {
        if self.is_sse {
            self.tail.push(chunk);
        }
        // Past the cap nothing more is kept, not even a smaller chunk that would fit: the kept
        // body must be a prefix of what the client got, never one with a hole in it.
        if self.over_cap || self.body.len() + chunk.len() > self.cap {
            self.over_cap = true;
            return;
        }
        self.body.extend_from_slice(chunk);
    }

    /// The exchange ended: the raw material of a trace, for the writer to finish off the hot path.
    pub fn finish(self, end: BodyEnd) -> PendingTrace {
        PendingTrace {
            ticket: self.ticket,
            time_ms: self.time_ms,
            meta: self.meta,
            request: self.request,
            status: self.status,
            is_sse: self.is_sse,
            body: self.body,
            over_cap: self.over_cap,
            end,
            latency_us: micros(self.started.elapsed()),
            ttfb_us: self.ttfb_us,
        }
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A finished exchange not yet parsed, redacted or stored.
#[derive(Debug)]
pub struct PendingTrace {
    ticket: Ticket,
    time_ms: u64,
    meta: ExchangeMeta,
    request: Bytes,
    status: u16,
    is_sse: bool,
    body: Vec<u8>,
    over_cap: bool,
    end: BodyEnd,
    latency_us: u64,
    ttfb_us: u64,
}

impl PendingTrace {
    /// Its id.
    pub fn id(&self) -> TraceId {
        self.ticket.id()
    }

    /// The memory its request and response bytes take.
    pub fn held_bytes(&self) -> usize {
        self.request.len() + self.body.capacity()
    }

    /// Whether the client gave up before any answer came (no response head): the canary guard
    /// judges these apart, against the teacher's share of them.
    pub fn unanswered(&self) -> bool {
        self.status == 0 && self.end == BodyEnd::Dropped
    }

    /// Who asked and where it went.
    pub fn meta(&self) -> &ExchangeMeta {
        &self.meta
    }

    /// The status the client received.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// From the request to the end of the response, in microseconds.
    pub fn latency_us(&self) -> u64 {
        self.latency_us
    }

    /// Whether the exchange failed in a way that is the serving side's fault: a 5xx (including
    /// Forge's own 502/504); a 401, 403, 404 or 429, which say the deployment or adapter is gone,
    /// refuses Forge's key or is out of capacity (a 400 or 413 is the request's own fault); a
    /// body that broke; or a stream that ended on an `error` event (the upstream's, or the one
    /// Forge sends when the upstream breaks or stalls mid-stream, after which the client sees a
    /// clean end). What the canary guard counts as an error.
    pub fn failed_upstream(&self) -> bool {
        self.status >= 500
            || matches!(self.status, 401 | 403 | 404 | 429)
            || self.end == BodyEnd::Failed
            || (self.is_sse && !self.over_cap && last_event_is_error(&self.body))
    }

    /// Reassembles the response, decides the outcome and redacts: the trace as it is stored.
    pub fn into_trace(self, redactor: &Redactor, max_event_bytes: usize) -> Trace {
        self.into_trace_with(redactor, max_event_bytes, request_tree)
            .0
    }

    /// Like [`PendingTrace::into_trace`], for the writer: the request kept as the bytes the
    /// client sent when redaction has nothing to change in them, and the ticket, which the
    /// writer holds until the trace's commit, so that scans with a cursor wait for the trace.
    pub fn into_stored(
        self,
        redactor: &Redactor,
        max_event_bytes: usize,
    ) -> (TraceOf<StoredRequest>, Ticket) {
        self.into_trace_with(
            redactor,
            max_event_bytes,
            |request, redactor| match clean_request(request, redactor) {
                Some(raw) => StoredRequest::Raw(raw),
                None => StoredRequest::Tree(request_tree(request, redactor)),
            },
        )
    }

    fn into_trace_with<R>(
        self,
        redactor: &Redactor,
        max_event_bytes: usize,
        request: impl FnOnce(&[u8], &Redactor) -> R,
    ) -> (TraceOf<R>, Ticket) {
        let response = if self.is_sse {
            let mut r = StreamReassembler::new(max_event_bytes);
            r.feed(&self.body);
            if crate::sse::ends_with_done(&self.body) {
                // `[DONE]` without its blank line: the trace was finished at `[DONE]`, and the
                // line end came in a later frame (or never). The stream is over all the same.
                r.feed(b"\n\n");
            }
            r.finish()
        } else {
            FinalResponse::from_json(&self.body)
        };
        let outcome = match self.end {
            BodyEnd::Dropped => Outcome::Cancelled,
            BodyEnd::Failed => Outcome::Errored,
            BodyEnd::Complete if !(200..300).contains(&self.status) || response.error.is_some() => {
                Outcome::Errored
            }
            BodyEnd::Complete if self.over_cap || !response.complete => Outcome::Truncated,
            BodyEnd::Complete => Outcome::Completed,
        };
        let request = request(&self.request, redactor);
        let mut response = response;
        redact_response(redactor, &mut response);
        let trace = TraceOf {
            id: self.ticket.id(),
            time_ms: self.time_ms,
            tenant: self.meta.tenant,
            key_id: self.meta.key_id,
            alias: self.meta.alias,
            upstream: self.meta.upstream,
            model: self.meta.model,
            arm: self.meta.arm,
            route_version: self.meta.route_version,
            stream: self.meta.stream,
            request,
            response,
            status: self.status,
            latency_us: self.latency_us,
            ttfb_us: self.ttfb_us,
            outcome,
        };
        (trace, self.ticket)
    }
}

/// Whether the last event of an SSE body, not counting a final `data: [DONE]`, carries an
/// `error` object: vLLM ends a stream that failed with an error event and then `[DONE]`. Reads
/// back from the end over the last events' lines only: this runs on the request path, for
/// streams on routes with students, where the last event is nearly always a short `[DONE]`.
fn last_event_is_error(body: &[u8]) -> bool {
    let is_break = |b: &u8| *b == b'\n' || *b == b'\r';
    let trimmed = |body: &[u8]| body.len() - body.iter().rev().take_while(|b| is_break(b)).count();
    let mut end = trimmed(body);
    let last = body[..end].iter().rposition(is_break).map_or(0, |i| i + 1);
    if body[last..end]
        .strip_prefix(b"data:")
        .is_some_and(|data| data.trim_ascii() == b"[DONE]")
    {
        end = trimmed(&body[..last]);
    }
    loop {
        let start = body[..end].iter().rposition(is_break).map_or(0, |i| i + 1);
        let line = &body[start..end];
        if line.is_empty() {
            return false;
        }
        if let Some(data) = line.strip_prefix(b"data:")
            && let Ok(event) = serde_json::from_slice::<Value>(data)
        {
            return event.get("error").is_some_and(Value::is_object);
        }
        if start == 0 {
            return false;
        }
        // Over one line break: `\n`, `\r` or `\r\n`.
        end = start - 1;
        if body[end] == b'\n' && end > 0 && body[end - 1] == b'\r' {
            end -= 1;
        }
    }
}

/// A request as the writer encodes it.
#[derive(Debug)]
pub enum StoredRequest {
    /// The client's bytes, in which redaction found nothing.
    Raw(Box<RawValue>),
    /// Parsed and redacted (or `null`, if it was not JSON).
    Tree(Value),
}

impl serde::Serialize for StoredRequest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StoredRequest::Raw(raw) => raw.serialize(s),
            StoredRequest::Tree(tree) => tree.serialize(s),
        }
    }
}

/// The request parsed and redacted; `null` if it is not JSON.
fn request_tree(bytes: &[u8], redactor: &Redactor) -> Value {
    let mut request = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    redactor.redact_json(&mut request);
    request
}

/// The request as it came, if it is JSON in which redaction would change nothing: what
/// [`request_tree`] gives, without building the tree (measured in the capture bench: building
/// it, and serialising it again, was the largest part of the writer's work on a request).
fn clean_request(bytes: &[u8], redactor: &Redactor) -> Option<Box<RawValue>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let raw = RawValue::from_string(text.to_owned()).ok()?;
    redactor.json_is_clean(&raw).then_some(raw)
}

/// Redacts every string the upstream sent, not only the message text: a model can echo a key
/// into a tool call's name or id as readily as into its arguments.
fn redact_response(redactor: &Redactor, response: &mut FinalResponse) {
    let fix = |s: &mut String| {
        if let Some(clean) = redactor.redact_str(s) {
            *s = clean;
        }
    };
    response.model.iter_mut().for_each(fix);
    for choice in &mut response.choices {
        // An answer that did not end as the model chose (at `max_tokens`, a client that left, a
        // broken stream, the capture cap) may have been cut mid-key.
        let cut = !matches!(
            choice.finish_reason.as_deref(),
            Some("stop" | "tool_calls" | "function_call")
        );
        let fix_written = |s: &mut String| {
            fix(s);
            if cut && let Some(clean) = redactor.redact_cut_key(s) {
                *s = clean;
            }
        };
        choice.finish_reason.iter_mut().for_each(fix);
        let m = &mut choice.message;
        m.content.iter_mut().for_each(fix_written);
        m.refusal.iter_mut().for_each(fix_written);
        for call in &mut m.tool_calls {
            fix(&mut call.id);
            fix(&mut call.kind);
            fix(&mut call.function.name);
            fix_written(&mut call.function.arguments);
        }
        if let Some(call) = &mut m.function_call {
            fix(&mut call.name);
            fix_written(&mut call.arguments);
        }
    }
    response.usage = response.usage.take().and_then(|u| u.redacted(redactor));
    if let Some(error) = &mut response.error {
        redactor.redact_json(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reassemble::RawObject;
    use proptest::prelude::*;
    use serde_json::json;

    fn meta(stream: bool) -> ExchangeMeta {
        ExchangeMeta {
            tenant: Some("team-a".into()),
            key_id: Some("key-1".into()),
            alias: "a".into(),
            upstream: "u".into(),
            model: "m".into(),
            arm: Arm::Teacher,
            route_version: 1,
            stream,
            canary: false,
        }
    }

    #[test]
    fn a_stream_that_ends_on_an_error_event_failed_upstream() {
        let failed = |body: &str| {
            let mut session =
                CaptureSession::new(Ticket::untracked(), meta(true), Bytes::new(), 1 << 20);
            session.on_response(200, true);
            session.on_chunk(body.as_bytes());
            session.finish(BodyEnd::Complete).failed_upstream()
        };
        let chunk = r#"data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
        let error = r#"data: {"error":{"message":"The upstream connection failed mid-stream.","type":"server_error"}}"#;
        for eol in ["\n", "\r\n", "\r"] {
            let event = |line: &str| format!("{line}{eol}{eol}");
            assert!(failed(&(event(chunk) + &event(error))), "{eol:?}");
            // Cut mid-event, then the error after a blank line.
            assert!(failed(&format!(
                "{}data: {{\"choi{eol}{eol}{}",
                event(chunk),
                event(error)
            )));
            assert!(!failed(&(event(chunk) + &event("data: [DONE]"))));
            // vLLM's way: the error event, then `[DONE]`.
            assert!(failed(
                &(event(chunk) + &event(error) + &event("data: [DONE]"))
            ));
            assert!(failed(
                &(event(chunk) + &event(error) + &event("data:[DONE]"))
            ));
            assert!(!failed(&event("data: [DONE]")));
            assert!(
                !failed(&event(chunk)),
                "cut, but not the serving side's word"
            );
            assert!(!failed(&(event(error) + &event(chunk))));
            assert!(!failed(&(event(chunk) + &event(r#"data: {"error":null}"#))));
        }
        assert!(!failed(""));
        assert!(!failed("\n\n\r\n"));
        assert!(failed(error));
    }

    #[test]
    fn client_errors_of_the_serving_side_are_failures_and_the_request_s_are_not() {
        let failed = |status: u16| {
            let mut session =
                CaptureSession::new(Ticket::untracked(), meta(false), Bytes::new(), 1 << 20);
            session.on_response(status, false);
            session.on_chunk(br#"{"error":{"message":"x","type":"invalid_request_error"}}"#);
            session.finish(BodyEnd::Complete).failed_upstream()
        };
        // A student whose adapter was unloaded answers 404 to every canary user.
        for status in [401, 403, 404, 429, 500, 502, 503, 504] {
            assert!(failed(status), "{status}");
        }
        for status in [200, 400, 408, 413, 422] {
            assert!(!failed(status), "{status}");
        }
    }

    #[test]
    fn a_client_that_gave_up_before_any_answer_is_unanswered_not_failed() {
        let session =
            || CaptureSession::new(Ticket::untracked(), meta(false), Bytes::new(), 1 << 20);
        let gone = session().finish(BodyEnd::Dropped);
        assert!(gone.unanswered() && !gone.failed_upstream());
        // Answered, then the client left: the serving side did its part.
        let mut answered = session();
        answered.on_response(200, false);
        answered.on_chunk(b"{\"id\":");
        let answered = answered.finish(BodyEnd::Dropped);
        assert!(!answered.unanswered() && !answered.failed_upstream());
    }

    #[test]
    fn a_usage_object_that_cannot_be_redacted_is_left_out() {
        let key = "sk-proj-Abcdefghijklmnopqrstuvwxyz0123456789ABCD";
        let trace = |usage: &str| {
            let mut session =
                CaptureSession::new(Ticket::untracked(), meta(false), Bytes::new(), 1 << 20);
            session.on_response(200, false);
            let body = format!(
                r#"{{"id":"c","object":"chat.completion","model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
            );
            session.on_chunk(body.as_bytes());
            let trace = session
                .finish(BodyEnd::Complete)
                .into_trace(&Redactor::default(), 1 << 20);
            serde_json::to_string(&trace).unwrap()
        };
        for usage in [
            format!(r#"{{"prompt_tokens":1e400,"note":"{key}"}}"#),
            format!(r#"{{"prompt_tokens":1,"note":"{key}","odd":"\udc00"}}"#),
        ] {
            let stored = trace(&usage);
            assert!(!stored.contains("Abcdefghijklmnop"), "{stored}");
            assert!(
                stored.contains(r#""content":"hi""#),
                "the rest is kept: {stored}"
            );
        }
        // One that can be read is redacted and kept.
        let stored = trace(&format!(r#"{{"prompt_tokens":1,"note":"{key}"}}"#));
        assert!(!stored.contains("Abcdefghijklmnop"), "{stored}");
        assert!(stored.contains(r#""prompt_tokens":1"#), "{stored}");
    }

    #[test]
    fn a_key_the_answer_was_cut_in_is_not_stored() {
        // 35 of the token's 36 characters: the rest is a guess away.
        let cut = "ghp_0123456789abcdefghijABCDEFGHIJ01234";
        let mut session =
            CaptureSession::new(Ticket::untracked(), meta(true), Bytes::new(), 1 << 20);
        session.on_response(200, true);
        let events = [
            format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"Use {cut}"}}}}]}}"#),
            format!(
                r#"{{"choices":[{{"index":1,"delta":{{"tool_calls":[{{"index":0,"id":"c","type":"function","function":{{"name":"f","arguments":"{{\"token\": \"{cut}"}}}}]}}}}]}}"#
            ),
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#.to_string(),
            // An answer the model ended itself was not cut: its last word is its own.
            r#"{"choices":[{"index":2,"delta":{"content":"Sign it xoxb-12345678"},"finish_reason":"stop"}]}"#.to_string(),
        ];
        for event in events {
            session.on_chunk(format!("data: {event}\n\n").as_bytes());
        }
        let trace = session
            .finish(BodyEnd::Dropped)
            .into_trace(&Redactor::default(), 1 << 20);
        let stored = serde_json::to_string(&trace).unwrap();
        assert!(!stored.contains("0123456789abcdef"), "{stored}");
        let choices = &trace.response.choices;
        assert_eq!(
            choices[0].message.content.as_deref(),
            Some("Use [REDACTED:github_token]")
        );
        assert_eq!(
            choices[1].message.tool_calls[0].function.arguments,
            r#"{"token": "[REDACTED:github_token]"#
        );
        assert_eq!(
            choices[2].message.content.as_deref(),
            Some("Sign it xoxb-12345678")
        );
    }

    #[test]
    fn past_the_cap_nothing_more_is_kept() {
        let mut session = CaptureSession::new(Ticket::untracked(), meta(true), Bytes::new(), 10);
        session.on_chunk(b"data: 1\n");
        session.on_chunk(b"data: too long\n");
        // Fits what is left, but would leave a hole where the long chunk was.
        session.on_chunk(b"x");
        let pending = session.finish(BodyEnd::Complete);
        assert!(pending.over_cap);
        assert_eq!(pending.body, b"data: 1\n");
    }

    proptest! {
        /// A request with nothing to redact is stored as the client sent it, and reads back
        /// as the parsed tree would: the same trace either way. Text that is not one JSON value
        /// is stored as `null`, as before.
        #[test]
        fn clean_requests_are_stored_as_sent_and_read_back_the_same(
            words in prop::collection::vec("[a-z]{1,8}|\\PC{1,4}", 0..12),
            numbers in prop::collection::vec(any::<f64>(), 0..4),
            pretty in any::<bool>(),
            tail in prop::sample::select(vec!["", " ", "\n", " x", "}", "\u{0}"]),
        ) {
            let value = json!({"model": "a", "messages": [{"role": "user", "content": words.join(" ")}],
                "temperature": numbers, "metadata": {words.concat(): words}});
            let mut text = if pretty { serde_json::to_string_pretty(&value).unwrap() } else { value.to_string() };
            text.push_str(tail);
            let request = Bytes::from(text.clone());
            let pending = || {
                let mut session = CaptureSession::new(Ticket::untracked(), meta(false), request.clone(), 1 << 20);
                session.on_response(200, false);
                session.on_chunk(br#"{"choices":[{"index":0,"message":{"content":"ok"},"finish_reason":"stop"}]}"#);
                session.finish(BodyEnd::Complete)
            };
            let redactor = Redactor::default();
            let trace = pending().into_trace(&redactor, 1 << 20);
            let (stored, _) = pending().into_stored(&redactor, 1 << 20);
            // What the request was stored as before: parsed (floats as serde_json reads them,
            // not always to the last bit), then redacted.
            let parsed = serde_json::from_str::<Value>(&text).ok();
            let parses = parsed.is_some();
            let parsed = parsed.unwrap_or(Value::Null);
            let mut redacted = parsed.clone();
            redactor.redact_json(&mut redacted);
            let raw = match &stored.request {
                StoredRequest::Raw(raw) => Some(raw.get().to_string()),
                StoredRequest::Tree(_) => None,
            };
            prop_assert_eq!(raw.is_some(), parses && redacted == parsed, "{:?}", text);
            if let Some(raw) = raw {
                prop_assert_eq!(raw.trim(), text.trim());
            }
            let decoded: Trace = serde_json::from_slice(&serde_json::to_vec(&stored).unwrap()).unwrap();
            prop_assert_eq!(&same_exchange(decoded, &trace), &trace);
            prop_assert_eq!(trace.request, redacted);
        }
    }

    /// `trace` with the id and timings of `like`: two runs of one exchange differ only there.
    fn same_exchange(trace: Trace, like: &Trace) -> Trace {
        Trace {
            id: like.id,
            time_ms: like.time_ms,
            latency_us: like.latency_us,
            ttfb_us: like.ttfb_us,
            ..trace
        }
    }

    /// A key of some kind, and its random part: neither may reach the stored bytes.
    fn key() -> impl Strategy<Value = (String, String)> {
        prop_oneof![
            "[A-Za-z0-9]{24,40}".prop_map(|b| (format!("sk-proj-{b}"), b)),
            "[A-Za-z0-9]{30,40}".prop_map(|b| (format!("sk-ant-api03-{b}"), b)),
            "[A-Za-z0-9]{36}".prop_map(|b| (format!("ghp_{b}"), b)),
            "[0-9A-Z]{16}".prop_map(|b| (format!("AKIA{b}"), b)),
            "[A-Za-z0-9]{20,30}".prop_map(|b| (format!("Bearer {b}"), b)),
            "[A-Za-z0-9_-]{12}\\.eyJ[A-Za-z0-9_-]{12}\\.[A-Za-z0-9_-]{16}"
                .prop_map(|b| (format!("eyJ{b}"), b)),
        ]
    }

    /// Prose with a key in it, set apart as a key is in real text.
    fn text_with(
        key: impl Strategy<Value = (String, String)>,
    ) -> impl Strategy<Value = (String, (String, String))> {
        let sep = || prop::sample::select(vec![" ", "\n", ": ", "(", "\"", ", ", "\t", "é "]);
        ("[a-z ,.]{0,24}", sep(), key, sep(), "[a-z ,.é😀]{0,24}")
            .prop_map(|(pre, a, key, b, post)| (format!("{pre}{a}{}{b}{post}", key.0), key))
    }

    /// `text` as a JSON string, each character escaped as `\uXXXX` where `escape` says so.
    fn json_string(text: &str, escape: &[bool]) -> String {
        let mut out = String::from("\"");
        for (i, c) in text.chars().enumerate() {
            if escape.get(i).copied().unwrap_or(false) || c == '"' || c == '\\' || c.is_control() {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            } else {
                out.push(c);
            }
        }
        out.push('"');
        out
    }

    /// `text` cut into pieces at `cuts` (character boundaries).
    fn pieces(text: &str, cuts: &[prop::sample::Index]) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(chars.len() + 1)).collect();
        at.extend([0, chars.len()]);
        at.sort_unstable();
        at.dedup();
        at.windows(2)
            .map(|w| chars[w[0]..w[1]].iter().collect())
            .collect()
    }

    fn redacted(text: &str) -> String {
        Redactor::default()
            .redact_str(text)
            .unwrap_or_else(|| text.to_string())
    }

    proptest! {
        /// Keys planted in every string a trace takes from the client or the upstream (escaped
        /// in the request, cut across stream deltas in the response) are gone from its stored
        /// bytes, what is left is the text redacted, and the bytes decode to the same trace.
        #[test]
        fn stored_traces_hold_no_planted_key_and_decode_to_themselves(
            (prompt, k1) in text_with(key()),
            (meta_key, k2) in text_with(key()),
            (meta_value, k3) in text_with(key()),
            (answer, k4) in text_with(key()),
            (arguments, k5) in text_with(key()),
            (tool_name, k6) in key().prop_map(|k| (k.0.clone(), k)),
            (usage_note, k7) in text_with(key()),
            escape in prop::collection::vec(any::<bool>(), 0..80),
            stream in any::<bool>(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let request = format!(
                r#"{{"model":"a","messages":[{{"role":"user","content":{}}}],"metadata":{{{}:[{}]}}}}"#,
                json_string(&prompt, &escape),
                json_string(&meta_key, &escape),
                json_string(&meta_value, &escape),
            );
            prop_assert!(serde_json::from_str::<serde_json::Value>(&request).is_ok(), "{}", request);
            let call = |arguments: &str| json!({"index": 0, "id": "call_1", "type": "function",
                "function": {"name": tool_name, "arguments": arguments}});
            // Usage holds numbers, but a string in it is checked like any other.
            let usage = json!({"prompt_tokens": 3, "note": usage_note, "completion_tokens_details": {"reasoning_tokens": 0}});
            let body = if stream {
                let mut sse = String::new();
                let mut event = |chunk: serde_json::Value| sse.push_str(&format!("data: {chunk}\n\n"));
                for piece in pieces(&answer, &cuts) {
                    event(json!({"model": tool_name, "choices": [{"index": 0, "delta": {"content": piece}}]}));
                }
                for piece in pieces(&arguments, &cuts) {
                    event(json!({"choices": [{"index": 0, "delta": {"tool_calls": [call(&piece)]}}]}));
                }
                event(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}));
                event(json!({"choices": [], "usage": usage}));
                sse.push_str("data: [DONE]\n\n");
                sse
            } else {
                json!({"model": tool_name, "choices": [{"index": 0, "finish_reason": "tool_calls",
                    "message": {"role": "assistant", "content": answer, "tool_calls": [call(&arguments)]}}],
                    "usage": usage})
                .to_string()
            };
            let request = Bytes::from(request);
            let pending = || {
                let mut session = CaptureSession::new(Ticket::untracked(), meta(stream), request.clone(), 1 << 20);
                session.on_response(200, stream);
                for piece in pieces(&body, &cuts) {
                    session.on_chunk(piece.as_bytes());
                }
                session.finish(BodyEnd::Complete)
            };
            let trace = pending().into_trace(&Redactor::default(), 1 << 20);
            // What the writer stores; here the request always has something to redact.
            let (stored, _) = pending().into_stored(&Redactor::default(), 1 << 20);
            prop_assert!(matches!(stored.request, StoredRequest::Tree(_)));
            let stored = serde_json::to_vec(&stored).unwrap();

            for (key, random_part) in [k1, k2, k3, k4, k5, k6, k7] {
                prop_assert!(memchr::memmem::find(&stored, key.as_bytes()).is_none(), "{} stored", key);
                prop_assert!(memchr::memmem::find(&stored, random_part.as_bytes()).is_none(), "{} stored", random_part);
            }
            let message = &trace.response.choices[0].message;
            prop_assert_eq!(trace.outcome, Outcome::Completed);
            prop_assert_eq!(message.content.clone(), Some(redacted(&answer)));
            prop_assert_eq!(&message.tool_calls[0].function.arguments, &redacted(&arguments));
            prop_assert_eq!(&trace.request["messages"][0]["content"], &json!(redacted(&prompt)));
            prop_assert_eq!(&trace.request["metadata"][redacted(&meta_key)], &json!([redacted(&meta_value)]));
            let usage = trace.response.usage.as_ref().map(RawObject::to_value).unwrap_or_default();
            prop_assert_eq!(&usage["note"], &json!(redacted(&usage_note)));
            prop_assert_eq!(&usage["completion_tokens_details"]["reasoning_tokens"], &json!(0));

            let decoded: Trace = serde_json::from_slice(&stored).unwrap();
            prop_assert_eq!(same_exchange(decoded, &trace), trace);
        }
    }
}
