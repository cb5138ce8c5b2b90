//! `Capture<S>`: starts a capture session per request and wraps the response.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::Service;

use super::{CaptureBody, CaptureSession, ExchangeMeta, ResponseFuture, TraceSink};

/// The capturing service. Its error type is the inner service's: capture never adds a failure.
#[derive(Debug, Clone)]
pub struct Capture<S, K> {
    inner: S,
    sink: K,
    max_response_bytes: usize,
}

impl<S, K> Capture<S, K> {
    /// Wraps `inner`.
    pub fn new(inner: S, sink: K, max_response_bytes: usize) -> Self {
        Self {
            inner,
            sink,
            max_response_bytes,
        }
    }
}

impl<S, K, B> Service<Request<Bytes>> for Capture<S, K>
where
    S: Service<Request<Bytes>, Response = Response<B>>,
    K: TraceSink,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<super::BoxError>,
{
    type Response = Response<CaptureBody<B, K>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, K, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Bytes>) -> Self::Future {
        let session = request
            .extensions_mut()
            .remove::<ExchangeMeta>()
            .map(|meta| {
                let ticket = self.sink.ticket();
                let session = CaptureSession::new(
                    ticket,
                    meta,
                    request.body().clone(),
                    self.max_response_bytes,
                );
                (session, self.sink.clone())
            });
        ResponseFuture::new(self.inner.call(request), session)
    }
}
