//! The response future of [`Capture`](super::Capture): records the head, then wraps the body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Response, header};
use pin_project_lite::pin_project;

use super::{BodyEnd, CaptureBody, CaptureSession, TRACE_ID_HEADER, TraceSink};

pin_project! {
    /// Resolves to the inner response with a capturing body and the `x-forge-trace-id` header.
    pub struct ResponseFuture<F, K: TraceSink, B> {
        #[pin]
        inner: F,
        session: Option<(CaptureSession, K)>,
        // A response whose body ended before it began, held until its durable commit: the
        // server writes such a response (`Content-Length: 0`) without ever polling its body.
        committing: Option<Response<CaptureBody<B, K>>>,
    }

    impl<F, K: TraceSink, B> PinnedDrop for ResponseFuture<F, K, B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((session, sink)) = this.session.take() {
                // The client went away (or shutdown cut it off) before the response head
                // arrived: still one trace, cancelled, and one sample for the guard.
                drop(sink.submit(session.finish(BodyEnd::Dropped)));
            }
        }
    }
}

impl<F, K: TraceSink, B> ResponseFuture<F, K, B> {
    pub(super) fn new(inner: F, session: Option<(CaptureSession, K)>) -> Self {
        Self {
            inner,
            session,
            committing: None,
        }
    }
}

impl<F, K, B, E> Future for ResponseFuture<F, K, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    K: TraceSink,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<super::BoxError>,
{
    type Output = Result<Response<CaptureBody<B, K>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(response) = this.committing.as_mut() {
            ready!(response.body_mut().poll_commit(cx));
            if let Some(response) = this.committing.take() {
                return Poll::Ready(Ok(response));
            }
        }
        let result = ready!(this.inner.poll(cx));
        let Some((mut session, sink)) = this.session.take() else {
            return Poll::Ready(result.map(|r| r.map(CaptureBody::passthrough)));
        };
        let mut response = match result {
            Ok(response) => response,
            Err(e) => {
                // No response to wait on: submitted without waiting even if durable.
                drop(sink.submit(session.finish(BodyEnd::Failed)));
                return Poll::Ready(Err(e));
            }
        };
        let is_sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        session.on_response(response.status().as_u16(), is_sse);
        response
            .headers_mut()
            .insert(TRACE_ID_HEADER, session.id().to_header_value());
        let mut response = response.map(|body| CaptureBody::new(body, session, sink));
        if response.body_mut().poll_commit(cx).is_ready() {
            return Poll::Ready(Ok(response));
        }
        *this.committing = Some(response);
        Poll::Pending
    }
}
