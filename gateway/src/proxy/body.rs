//! The response body from an upstream, passed on frame by frame with an idle timeout between frames.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// Why an upstream body ended early.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    /// No frame arrived within the idle timeout.
    #[error("upstream sent nothing for {0:?}")]
    Idle(Duration),
    /// The connection to the upstream failed mid-body.
    #[error("upstream body failed: {0}")]
    Upstream(#[from] reqwest::Error),
}

pin_project! {
    /// Forwards every frame as soon as it arrives; never buffers.
    ///
    /// The idle timer restarts at each frame, so a long stream that keeps sending is never cut.
    /// When an SSE stream fails, the client receives a final OpenAI-style `data: {"error":…}`
    /// event (which the SDKs raise as `APIError`) and a clean end, rather than a cut connection
    /// it cannot tell from a network fault. Other bodies end with an error, which aborts the
    /// connection, so a truncated JSON body is never mistaken for a complete one.
    pub struct UpstreamBody {
        #[pin]
        inner: reqwest::Body,
        #[pin]
        idle_timer: Sleep,
        idle: Duration,
        // When the last frame arrived. The timer is moved only when it fires, not at every
        // frame: a long stream costs a clock read per chunk, not a timer-wheel update.
        last_frame: Instant,
        is_sse: bool,
        done: bool,
    }
}

impl UpstreamBody {
    /// Wraps an upstream body.
    pub fn new(inner: reqwest::Body, idle: Duration, is_sse: bool) -> Self {
        Self {
            inner,
            idle_timer: tokio::time::sleep(idle),
            idle,
            last_frame: Instant::now(),
            is_sse,
            done: false,
        }
    }
}

/// The SSE event sent to the client when the upstream stream fails.
pub fn sse_error_event(message: &str) -> Bytes {
    let event = serde_json::json!({
        "error": {"message": message, "type": "server_error", "param": null, "code": "upstream_error"}
    });
    Bytes::from(format!("data: {event}\n\n"))
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let failure = loop {
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    *this.last_frame = Instant::now();
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(None) => {
                    *this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => break UpstreamBodyError::Upstream(e),
                Poll::Pending => {
                    ready!(this.idle_timer.as_mut().poll(cx));
                    let due = *this.last_frame + *this.idle;
                    if Instant::now() >= due {
                        break UpstreamBodyError::Idle(*this.idle);
                    }
                    // Frames came since the timer was set: wait out the rest from the last one.
                    this.idle_timer.as_mut().reset(due);
                }
            }
        };
        *this.done = true;
        tracing::warn!(error = %failure, "upstream body ended early");
        if *this.is_sse {
            let message = match failure {
                UpstreamBodyError::Idle(d) => {
                    format!("The upstream stream stalled for {} ms.", d.as_millis())
                }
                UpstreamBodyError::Upstream(_) => {
                    "The upstream connection failed mid-stream.".to_string()
                }
            };
            Poll::Ready(Some(Ok(Frame::data(sse_error_event(&message)))))
        } else {
            Poll::Ready(Some(Err(failure)))
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
