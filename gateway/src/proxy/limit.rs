//! The in-flight cap: a request over it gets an immediate 503, never a queue.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;
use crate::metrics::Metrics;

/// Shared state of the cap.
#[derive(Debug, Clone)]
pub struct InFlight {
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl InFlight {
    /// A cap of `max` requests at once.
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            metrics,
        }
    }
}

/// Middleware: takes a permit or refuses at once. The permit lives in the response body, so a
/// stream holds its slot until its last byte, not just until its headers.
pub async fn limit_in_flight(
    State(cap): State<InFlight>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(permit) = Arc::clone(&cap.permits).try_acquire_owned() else {
        return Error::Overloaded.into_response();
    };
    cap.metrics.in_flight.inc();
    let slot = Slot {
        _permit: permit,
        metrics: Arc::clone(&cap.metrics),
    };
    next.run(request)
        .await
        .map(|inner| Body::new(PermitBody { inner, _slot: slot }))
}

/// Frees the permit and the gauge together, whenever the body is dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

pin_project! {
    struct PermitBody {
        #[pin]
        inner: Body,
        _slot: Slot,
    }
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
