//! The response future of [`Capture`](super::Capture): records the head, then wraps the body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use pin_project_lite::pin_project;

use super::{BodyEnd, CaptureBody, CaptureSession, TRACE_ID_HEADER, TraceSink};

pin_project! {
    /// Resolves to the inner response with a capturing body and the `x-forge-trace-id` header.
    pub struct ResponseFuture<F, K> {
        #[pin]
        inner: F,
        session: Option<(CaptureSession, K)>,
    }
}

impl<F, K> ResponseFuture<F, K> {
    pub(super) fn new(inner: F, session: Option<(CaptureSession, K)>) -> Self {
        Self { inner, session }
    }
}

impl<F, K, B, E> Future for ResponseFuture<F, K>
where
    F: Future<Output = Result<Response<B>, E>>,
    K: TraceSink,
    B: http_body::Body<Data = Bytes>,
{
    type Output = Result<Response<CaptureBody<B, K>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let Some((mut session, sink)) = this.session.take() else {
            return Poll::Ready(result.map(|r| r.map(CaptureBody::passthrough)));
        };
        match result {
            Ok(mut response) => {
                let is_sse = response
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|ct| ct.starts_with("text/event-stream"));
                session.on_response(response.status().as_u16(), is_sse);
                if let Ok(value) = HeaderValue::from_str(&session.id().to_string()) {
                    response.headers_mut().insert(TRACE_ID_HEADER, value);
                }
                Poll::Ready(Ok(
                    response.map(|body| CaptureBody::new(body, session, sink))
                ))
            }
            Err(e) => {
                // No response to wait on: the trace is submitted without waiting even if durable.
                drop(sink.submit(session.finish(BodyEnd::Failed)));
                Poll::Ready(Err(e))
            }
        }
    }
}
