//! The engine-neutral capture of one exchange: request bytes in, response chunks, then an end.
//!
//! Any front end (the tower layer here, a pingora module later) drives the same session, so
//! there is one parser and one set of rules for what a trace is.

use bytes::Bytes;
use forge_router::Arm;
use tokio::time::Instant;

use crate::reassemble::{FinalResponse, StreamReassembler};
use crate::redact::Redactor;
use crate::store::Ticket;
use crate::trace::{Outcome, Trace, TraceId};

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
        }
    }

    /// The trace id, sent to the client as `x-forge-trace-id`.
    pub fn id(&self) -> TraceId {
        self.ticket.id()
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
    /// Forge's own 502/504) or a body that broke. What the canary guard counts as an error.
    pub fn failed_upstream(&self) -> bool {
        self.status >= 500 || self.end == BodyEnd::Failed
    }

    /// Reassembles the response, decides the outcome and redacts: the trace as it is stored.
    pub fn into_trace(self, redactor: &Redactor, max_event_bytes: usize) -> Trace {
        self.into_trace_and_ticket(redactor, max_event_bytes).0
    }

    /// Like [`PendingTrace::into_trace`], keeping the ticket: the writer holds it until the
    /// trace's commit, so that scans with a cursor wait for the trace.
    pub(crate) fn into_trace_and_ticket(
        self,
        redactor: &Redactor,
        max_event_bytes: usize,
    ) -> (Trace, Ticket) {
        let response = if self.is_sse {
            let mut r = StreamReassembler::new(max_event_bytes);
            r.feed(&self.body);
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
        let mut request = serde_json::from_slice(&self.request).unwrap_or(serde_json::Value::Null);
        redactor.redact_json(&mut request);
        let mut response = response;
        redact_response(redactor, &mut response);
        let trace = Trace {
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

fn redact_response(redactor: &Redactor, response: &mut FinalResponse) {
    let mut fix = |s: &mut String| {
        if let Some(clean) = redactor.redact_str(s) {
            *s = clean;
        }
    };
    for choice in &mut response.choices {
        let m = &mut choice.message;
        m.content.iter_mut().for_each(&mut fix);
        m.refusal.iter_mut().for_each(&mut fix);
        for call in &mut m.tool_calls {
            fix(&mut call.function.arguments);
        }
    }
    if let Some(error) = &mut response.error {
        redactor.redact_json(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_cap_nothing_more_is_kept() {
        let meta = ExchangeMeta {
            tenant: None,
            key_id: None,
            alias: "a".into(),
            upstream: "u".into(),
            model: "m".into(),
            arm: Arm::Teacher,
            route_version: 1,
            stream: true,
            canary: false,
        };
        let mut session = CaptureSession::new(Ticket::untracked(), meta, Bytes::new(), 10);
        session.on_chunk(b"data: 1\n");
        session.on_chunk(b"data: too long\n");
        // Fits what is left, but would leave a hole where the long chunk was.
        session.on_chunk(b"x");
        let pending = session.finish(BodyEnd::Complete);
        assert!(pending.over_cap);
        assert_eq!(pending.body, b"data: 1\n");
    }
}
