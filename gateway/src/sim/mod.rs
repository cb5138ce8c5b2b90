//! A faithful fake of the OpenAI API for the demo, the tests and the benches, so none of them needs a key or the internet.
//!
//! It speaks OpenAI's wire format (`shared/docs/openai-wire.md`) and checks what it receives the
//! way OpenAI does:
//!
//! - `POST /v1/chat/completions`, streamed and not, with tool calls and deterministic answers:
//!   the same model and messages always get the same text and tool arguments. Each model's
//!   [`ModelBehavior`] sets delays, quality, length, and injected failures, also mid-stream.
//! - `GET /v1/models`, which lists the configured models, `gpt-4o`, `gpt-4o-mini`, and every
//!   `ft:` model whose fine-tuning job has succeeded.
//! - The Files API: multipart upload, list, retrieve, raw content, delete.
//! - Fine-tuning jobs as a timed state machine (`validating_files → queued → running →
//!   succeeded | failed | cancelled`, plus pause and resume) paced by [`FineTuneTimings`], with
//!   events, checkpoints and a result CSV. The training file is checked with
//!   [`validate_training_jsonl`]; a bad file fails the job at the end of `validating_files`.
//!
//! Every error, including unknown paths and wrong methods, is OpenAI-shaped JSON. With
//! [`SimConfig::api_key`] set, every `/v1` request needs `Authorization: Bearer <key>`.
//!
//! ```
//! use forge_gateway::sim::{ModelBehavior, Quality, SimConfig, SimUpstream};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let sim = SimUpstream::start(SimConfig::default(), ([127, 0, 0, 1], 0).into()).await?;
//! assert!(sim.base_url().starts_with("http://127.0.0.1:"));
//! assert!(sim.base_url().ends_with("/v1"));
//!
//! // Tests can change a model at run time, for example to make it fail.
//! sim.set_behavior("gpt-4o", ModelBehavior { fail_status: Some(503), ..ModelBehavior::default() });
//! sim.set_behavior("gpt-4o-mini", ModelBehavior { quality: Quality::Poor, ..ModelBehavior::default() });
//! assert_eq!(sim.request_count(), 0);
//! sim.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod answer;
mod chat;
mod config;
mod error;
mod files;
mod fine_tuning;
mod journal;
mod jsonl;
mod models;
mod reply;
mod routes;
mod state;
mod stream;
#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{FineTuneTimings, ModelBehavior, Quality, SimConfig};
pub use journal::RecordedRequest;
pub use jsonl::{MIN_TRAINING_EXAMPLES, validate_training_jsonl};

use state::SimState;

/// The simulated upstream.
pub struct SimUpstream;

impl SimUpstream {
    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves until the handle is shut down or dropped.
    pub async fn start(config: SimConfig, addr: SocketAddr) -> io::Result<SimHandle> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (router, state) = routes::build(config);
        let (shutdown, signal) = oneshot::channel::<()>();
        // Dropping the handle drops the sender, which resolves the signal just like a send.
        let task = tokio::spawn(serve_router(router, listener, async move {
            let _ = signal.await;
        }));
        Ok(SimHandle {
            addr,
            shutdown,
            task,
            state,
        })
    }

    /// The axum router, for callers that serve it themselves.
    pub fn router(config: SimConfig) -> Router {
        routes::build(config).0
    }
}

/// Serves the simulated upstream on `listener` until `shutdown` resolves, then finishes the
/// requests in flight. This is what `forge sim-upstream --listen ADDR` runs.
pub async fn serve(
    config: SimConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_router(routes::build(config).0, listener, shutdown).await
}

async fn serve_router(
    router: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    // Load benches send many small requests; without TCP_NODELAY, Nagle's algorithm adds
    // delayed-ACK stalls to every one of them.
    let listener = listener.tap_io(|stream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, "could not set TCP_NODELAY on a simulated upstream connection");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A running simulated upstream. Dropping it starts a graceful shutdown too, without waiting.
pub struct SimHandle {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<io::Result<()>>,
    state: Arc<SimState>,
}

impl SimHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`, the `base_url` an OpenAI client takes.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received, oldest first; only the last 10,000 are kept.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.journal.snapshot()
    }

    /// How many requests were received in all.
    pub fn request_count(&self) -> usize {
        self.state.journal.total()
    }

    /// Changes how `model` behaves from the next request on.
    pub fn set_behavior(&self, model: &str, behavior: ModelBehavior) {
        self.state.set_behavior(model, behavior);
    }

    /// Stops accepting connections, lets the requests in flight finish, and returns when done.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "simulated upstream stopped with an error"),
            Err(err) => tracing::warn!(%err, "simulated upstream task failed"),
        }
    }
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}
