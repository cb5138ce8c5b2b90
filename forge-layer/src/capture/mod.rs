//! Inline capture of chat exchanges: a tower layer that tees each response into a trace.
//!
//! [`CaptureLayer`] wraps the service that calls the upstream. A request that carries an
//! [`ExchangeMeta`] extension is captured; any other passes through untouched. The response
//! body is wrapped in [`CaptureBody`], which hands every frame to the client as it comes and
//! keeps a reference-counted copy. The trace is finished exactly once: at the end of the body,
//! at its trailers, on an error, or when the client drops it (`cancelled`). Then it goes to the
//! [`TraceSink`] (the store's writer), which parses, redacts and stores it off the request path.
//!
//! ```
//! use bytes::Bytes;
//! use forge_layer::capture::{CaptureLayer, ExchangeMeta, PendingTrace, TraceSink, DurableAck};
//! use tower::{Layer, Service, ServiceExt};
//!
//! #[derive(Clone)]
//! struct Collect(std::sync::Arc<std::sync::Mutex<Vec<PendingTrace>>>);
//! impl TraceSink for Collect {
//!     fn submit(&self, trace: PendingTrace) -> Option<DurableAck> {
//!         self.0.lock().unwrap().push(trace);
//!         None
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let sink = Collect(Default::default());
//! let upstream = tower::service_fn(|_req: http::Request<Bytes>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from_static(b"{}"))))
//! });
//! let service = CaptureLayer::new(sink.clone(), 1 << 20).layer(upstream);
//! let mut request = http::Request::new(Bytes::from_static(b"{\"model\":\"m\",\"messages\":[]}"));
//! request.extensions_mut().insert(ExchangeMeta {
//!     tenant: None, key_id: None, alias: "m".into(), upstream: "u".into(), model: "m".into(),
//!     arm: forge_router::Arm::Teacher, route_version: 1, stream: false, canary: false,
//! });
//! let response = service.oneshot(request).await.unwrap();
//! assert!(response.headers().contains_key("x-forge-trace-id"));
//! http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
//! assert_eq!(sink.0.lock().unwrap().len(), 1);
//! # }
//! ```

mod body;
mod future;
mod layer;
mod service;
mod session;
mod sink;

pub use body::{BoxError, CaptureBody, NotStored};
pub use future::ResponseFuture;
pub use layer::CaptureLayer;
pub use service::Capture;
pub use session::{BodyEnd, CaptureSession, ExchangeMeta, PendingTrace, StoredRequest};
pub use sink::{DurableAck, TraceSink};

/// The response header that carries the trace id.
pub const TRACE_ID_HEADER: &str = "x-forge-trace-id";

#[cfg(test)]
mod tests;
