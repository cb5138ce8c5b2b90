//! The routed upstream call as a tower service, so the capture layer can wrap it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::IntoResponse;
use bytes::Bytes;
use forge_layer::capture::{Capture, DurableAck, PendingTrace, TraceSink};
use forge_layer::guard::{Guard, ResponseKind};
use forge_layer::store::{Ticket, TraceWriter};
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use tower::Service;

use crate::upstream::{CHAT_PATH, Upstream};

/// Where a routed request goes; set by the chat handler as a request extension.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The upstream client.
    pub upstream: Arc<Upstream>,
    /// Whether the client asked for a stream.
    pub stream: bool,
}

/// Sends a routed chat body (already rewritten for its target) upstream. Gateway errors
/// (502, 504) become OpenAI-shaped responses here, so the capture layer records them as the
/// client saw them.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamCall;

impl Service<Request<Bytes>> for UpstreamCall {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let Some(routed) = request.extensions().get::<Routed>().cloned() else {
                return Ok(crate::error::Error::UpstreamUnreachable.into_response());
            };
            let mut headers = HeaderMap::with_capacity(2);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let accept = if routed.stream {
                "text/event-stream"
            } else {
                "application/json"
            };
            headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
            let body = request.into_body();
            Ok(
                match routed
                    .upstream
                    .send(Method::POST, CHAT_PATH, headers, body)
                    .await
                {
                    // No OpenAI-compatible API redirects a completion; passing the redirect
                    // on would send the app's prompt wherever it points.
                    Ok(response) if response.status().is_redirection() => {
                        crate::error::Error::UpstreamRedirect.into_response()
                    }
                    Ok(response) => response.map(Body::new),
                    Err(e) => e.into_response(),
                },
            )
        })
    }
}

/// Where finished exchanges go: the canary guard's statistics and the store's writer, either
/// of which may be off. Shared behind one `Arc`: each exchange holds the sink until its end, and
/// one reference count is cheaper than one for each handle inside.
#[derive(Debug, Clone, Default)]
pub struct Sink(Arc<SinkParts>);

#[derive(Debug, Default)]
struct SinkParts {
    writer: Option<TraceWriter>,
    guard: Option<Arc<Guard>>,
}

impl Sink {
    /// The trace writer, when capture is on, and the canary guard, when it is on.
    pub fn new(writer: Option<TraceWriter>, guard: Option<Arc<Guard>>) -> Self {
        Self(Arc::new(SinkParts { writer, guard }))
    }
}

impl TraceSink for Sink {
    fn submit(&self, trace: PendingTrace) -> Option<DurableAck> {
        let meta = trace.meta();
        if meta.canary
            && let Some(guard) = &self.0.guard
        {
            let kind = if meta.stream {
                ResponseKind::Stream
            } else {
                ResponseKind::Json
            };
            if trace.unanswered() {
                guard.record_unanswered(&meta.alias, &meta.model);
            } else {
                guard.record(
                    &meta.alias,
                    &meta.model,
                    kind,
                    trace.latency_us(),
                    trace.failed_upstream(),
                );
            }
        }
        self.0.writer.as_ref().and_then(|w| w.submit(trace))
    }

    fn ticket(&self) -> Ticket {
        self.0
            .writer
            .as_ref()
            .map_or_else(Ticket::untracked, TraceWriter::ticket)
    }
}

/// The captured upstream call.
pub type Exchange = Capture<UpstreamCall, Sink>;
