//! `CaptureLayer`: wraps a service so that its chat exchanges are captured.

use tower::Layer;

use super::{Capture, TraceSink};

/// Applies [`Capture`] to a service.
#[derive(Debug, Clone)]
pub struct CaptureLayer<K> {
    sink: K,
    max_response_bytes: usize,
}

impl<K: TraceSink> CaptureLayer<K> {
    /// Captures into `sink`, keeping at most `max_response_bytes` of each response (a longer
    /// one still reaches the client whole; its trace is marked truncated).
    pub fn new(sink: K, max_response_bytes: usize) -> Self {
        Self {
            sink,
            max_response_bytes,
        }
    }
}

impl<S, K: TraceSink> Layer<S> for CaptureLayer<K> {
    type Service = Capture<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Capture::new(inner, self.sink.clone(), self.max_response_bytes)
    }
}
