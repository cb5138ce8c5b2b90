//! A faithful fake of OpenAI, Azure OpenAI, vLLM and a Kubernetes API server for the demo, the tests and the benches, so none of them needs a key or the internet.
//!
//! It speaks the wire formats of `shared/docs/openai-wire.md` and checks what it receives the
//! way the real services do. OpenAI (§1–4):
//!
//! - `POST /v1/chat/completions`, streamed and not, with tool calls (and the deprecated
//!   `functions`) and deterministic answers: the same model and messages always get the same
//!   text and tool arguments. Each model's [`ModelBehavior`] sets delays, quality, length, and
//!   injected failures, also mid-stream. Any model name is served as a base model, except an
//!   `ft:` name no succeeded job produced (404 `model_not_found`) and an unloaded adapter.
//!   Answers carry `service_tier` and usage with its token details; stream chunks carry
//!   `obfuscation` padding unless `stream_options.include_obfuscation` is false, and
//!   `usage: null` before the usage chunk unless [`ModelBehavior::omit_null_usage`] is set.
//!   An OpenAI alias (`gpt-4o`) is answered under the dated snapshot it resolves to
//!   (`gpt-4o-2024-08-06`), as OpenAI answers; other names are answered under their own.
//! - `GET /v1/models`, which lists the configured models, `gpt-4o`, `gpt-4o-mini` and their
//!   snapshots, and every `ft:` model whose fine-tuning job has succeeded.
//! - The Files API: multipart upload, list, retrieve, raw content, delete.
//! - Fine-tuning jobs as a timed state machine (`validating_files → queued → running →
//!   succeeded | failed | cancelled`, plus pause and resume) paced by [`FineTuneTimings`], with
//!   events, checkpoints and a result CSV. The job's `model` and the trained model's name
//!   (`ft:gpt-4o-mini-2024-07-18:forge-sim:…`) carry the base's snapshot. The training file is checked with
//!   [`validate_training_jsonl`]; a bad file fails the job at the end of `validating_files`.
//!   A job fails half-way through `running` with `error.code = "training_failed"` when its
//!   `suffix` contains `fail-training`, or when [`SimHandle::fail_next_fine_tuning_jobs`] said so.
//!
//! On the same listener, under their own paths:
//!
//! - Azure OpenAI (§5) under `/openai/…`, with `api-key` auth and a required `api-version`:
//!   files that are `pending` for a while, fine-tuning jobs whose models are named
//!   `<base>.ft-<32 hex>` (a job on a `pending` file fails), and chat through a deployment,
//!   `POST /openai/deployments/{name}/chat/completions`, or through the v1 API, with no
//!   `api-version` and the deployment as `model`, `POST /openai/v1/chat/completions`. Deployments are made through ARM,
//!   `PUT /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.CognitiveServices/accounts/{acct}/deployments/{name}`,
//!   with a bearer token; they are `Creating` for [`AzureTimings::deployment`], then
//!   `Succeeded`, and only then answer chat.
//! - vLLM's LoRA endpoints (§6): `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
//!   Adapters exist where a test put them ([`SimHandle::add_adapter_path`]) or where a
//!   succeeded Kubernetes Job wrote them; loaded ones are listed by `/v1/models` with `root`
//!   and `parent`, and answer chat well; once unloaded, chat with them is vLLM's 404.
//! - A Kubernetes API server (§7): `batch/v1` Jobs under `/apis/batch/v1/namespaces/{ns}/jobs`,
//!   pods and pod logs under `/api/v1/namespaces/{ns}/pods`, with bearer-token auth and `Status`
//!   errors. A Job runs for [`ClusterTimings`], and shows its interim condition
//!   (`SuccessCriteriaMet`, `FailureTarget`) alone for a while before its final one; its
//!   container really downloads `FORGE_DATASET_URL` (bearer `FORGE_DATASET_TOKEN`) and fails
//!   the Job with `BackoffLimitExceeded` if that fails or the data is invalid;
//!   `FORGE_SIM_FAIL=1` fails it too; on success the adapter is at `FORGE_OUTPUT_DIR` (or
//!   `/adapters/<job name>`). See [`SimHandle::k8s_fetches`].
//!
//! Every error, including unknown paths and wrong methods, has the shape of the service the
//! path belongs to: OpenAI's JSON for `/v1` and Azure, ARM's `{"error":{code,message}}`, and
//! Kubernetes' `Status`. With [`SimConfig::api_key`] set, every `/v1` request needs
//! `Authorization: Bearer <key>`. [`SimHandle::inject_rate_limit`] makes the next requests to
//! the training APIs (`/v1/files*`, `/v1/fine_tuning/*`, Azure, ARM, Kubernetes) answer 429
//! with `retry-after` and `x-should-retry: true`, each in its service's error shape;
//! [`SimHandle::exhaust_quota`] makes OpenAI's answer 429 `insufficient_quota`. vLLM's
//! endpoints sit under `/v1` and so take the `/v1` key; a Job's dataset download pointed at
//! this server's own Files API is a request like any other, key and injected 429s included.
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
mod arm;
mod azure;
mod chat;
mod cluster;
mod config;
mod error;
mod files;
mod fine_tuning;
mod journal;
mod jsonl;
mod judge;
mod models;
mod reply;
mod routes;
mod state;
pub use state::FINE_TUNED;
mod stream;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_training;
mod vllm;

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

pub use cluster::{
    DatasetFetch, ENV_FORGE_DATASET_TOKEN, ENV_FORGE_DATASET_URL, ENV_FORGE_OUTPUT_DIR,
    ENV_FORGE_SIM_FAIL,
};
pub use config::{
    AzureTimings, ClusterTimings, DEFAULT_LORA_BASE_MODEL, FineTuneTimings, ModelBehavior, Quality,
    SimConfig,
};
pub use fine_tuning::FAIL_TRAINING_SUFFIX;
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
        let served = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let result = serve_router(router, listener, async move {
                let _ = signal.await;
            })
            .await;
            served.abort_tasks();
            result
        });
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
    let (router, state) = routes::build(config);
    let result = serve_router(router, listener, shutdown).await;
    state.abort_tasks();
    result
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

    /// `http://127.0.0.1:PORT`, the endpoint of Azure OpenAI, of ARM, and of the Kubernetes
    /// API server, whose paths start at the root.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Rotates the account's API key ([`SimConfig::api_key`]), as a provider's console does:
    /// `/v1` and Azure requests with the key before get 401 from then on; `None` opens `/v1`.
    pub fn set_api_key(&self, key: Option<&str>) {
        self.state.set_api_key(key.map(str::to_owned));
    }

    /// Makes the next `n` requests to the training APIs (`/v1/files*`, `/v1/fine_tuning/*`,
    /// Azure `/openai/…`, ARM `/subscriptions/…`, Kubernetes `/api/…` and `/apis/…`) answer 429
    /// with `retry-after: <retry_after_secs>` and `x-should-retry: true`. Credentials are
    /// checked first, so a refused request is not counted. Replaces any earlier injection.
    pub fn inject_rate_limit(&self, n: usize, retry_after_secs: u64) {
        self.state.inject_rate_limit(n, retry_after_secs);
    }

    /// Makes the next `n` requests to OpenAI's training APIs (`/v1/files*`,
    /// `/v1/fine_tuning/*`) answer as an account out of credit does: 429 `insufficient_quota`,
    /// which no wait ends, though its headers say to retry as every 429's do. Checked before an
    /// injected rate limit. Replaces any earlier count.
    pub fn exhaust_quota(&self, n: usize) {
        self.state.exhaust_quota(n);
    }

    /// How many requests an injected rate limit has refused so far.
    pub fn rate_limited_count(&self) -> usize {
        self.state.rate_limited_count()
    }

    /// Makes the next `n` fine-tuning jobs created (OpenAI or Azure) fail half-way through
    /// `running` with `error.code = "training_failed"`, as a `suffix` containing
    /// `fail-training` does. Replaces any earlier count.
    pub fn fail_next_fine_tuning_jobs(&self, n: usize) {
        self.state.fail_next_fine_tuning_jobs(n);
    }

    /// Makes the next `n` fine-tuning job creations (OpenAI or Azure) create the job and then
    /// answer 500, as when the answer is lost on its way back (a front end's timeout). Replaces
    /// any earlier count.
    pub fn lose_next_job_creates(&self, n: usize) {
        self.state.lose_next_job_creates(n);
    }

    /// Makes the next `n` fine-tuning job creations (OpenAI or Azure) answer 500 and make no
    /// job. Replaces any earlier count.
    pub fn fail_next_job_creates(&self, n: usize) {
        self.state.fail_next_job_creates(n);
    }

    /// Makes the next `n` fine-tuning job creations (OpenAI or Azure) answer 400, as for a base
    /// model the account may not fine-tune, and make no job. Replaces any earlier count.
    pub fn refuse_next_job_creates(&self, n: usize) {
        self.state.refuse_next_job_creates(n);
    }

    /// Every dataset download a Kubernetes Job's container made, oldest first.
    pub fn k8s_fetches(&self) -> Vec<DatasetFetch> {
        self.state.storage().cluster.fetches()
    }

    /// Makes `path` an adapter directory that `POST /v1/load_lora_adapter` can load.
    pub fn add_adapter_path(&self, path: &str) {
        self.state.storage().lora.add_path(path);
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
