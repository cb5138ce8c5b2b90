//! Shared state of one simulated upstream: behaviours, credentials, injected failures, the request journal, and every store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use http::HeaderMap;
use tokio::task::AbortHandle;

use super::arm::DeploymentStore;
use super::cluster::ClusterStore;
use super::config::{
    AzureTimings, ClusterTimings, DEFAULT_LORA_BASE_MODEL, FineTuneTimings, ModelBehavior, Quality,
    SimConfig,
};
use super::error::ApiError;
use super::files::FileStore;
use super::fine_tuning::JobStore;
use super::journal::RequestJournal;
use super::vllm::LoraStore;

/// Whose wire conventions an account follows: ids, model names, statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Flavor {
    #[default]
    OpenAi,
    Azure,
}

/// The `models` key whose behaviour every fine-tuned model takes, when present.
pub const FINE_TUNED: &str = "fine-tuned";

pub(crate) struct SimState {
    behaviors: RwLock<HashMap<String, ModelBehavior>>,
    default_behavior: ModelBehavior,
    pub(crate) fine_tune: FineTuneTimings,
    pub(crate) azure: AzureTimings,
    pub(crate) cluster: ClusterTimings,
    pub(crate) lora_base_model: String,
    /// Changed by [`SimState::set_api_key`], as a key rotated at the provider.
    api_key: RwLock<Option<String>>,
    arm_token: Option<String>,
    cluster_token: Option<String>,
    pub(crate) journal: RequestJournal,
    storage: Mutex<Storage>,
    /// Requests per model, for `fail_every`.
    served: Mutex<HashMap<String, u64>>,
    rate_limit: Mutex<RateLimit>,
    rate_limited: AtomicUsize,
    /// How many of the next fine-tuning jobs fail while running.
    failing_jobs: AtomicUsize,
    /// How many of the next fine-tuning job creations are answered with a 500 all the same.
    lost_creates: AtomicUsize,
    /// How many of the next fine-tuning job creations fail with a 500, making no job.
    failed_creates: AtomicUsize,
    /// How many of the next fine-tuning job creations are refused with a 400.
    refused_creates: AtomicUsize,
    /// How many of the next requests to OpenAI's training APIs meet an exhausted quota.
    quota_refusals: AtomicUsize,
    /// Background work (dataset fetches) to stop when the server stops.
    tasks: Mutex<Vec<AbortHandle>>,
}

#[derive(Default)]
struct RateLimit {
    remaining: usize,
    retry_after_secs: u64,
}

/// Every store lives under one lock: a job that succeeds writes its result file, a deployment
/// needs a succeeded job, and loading an adapter needs a finished Kubernetes Job.
pub(crate) struct Storage {
    pub(crate) files: FileStore,
    pub(crate) jobs: JobStore,
    pub(crate) azure: AzureAccount,
    pub(crate) cluster: ClusterStore,
    pub(crate) lora: LoraStore,
}

/// The Azure OpenAI resource: its own files and jobs, apart from OpenAI's, and its deployments.
pub(crate) struct AzureAccount {
    pub(crate) files: FileStore,
    pub(crate) jobs: JobStore,
    pub(crate) deployments: DeploymentStore,
}

impl Storage {
    fn new() -> Self {
        Self {
            files: FileStore::new(Flavor::OpenAi),
            jobs: JobStore::default(),
            azure: AzureAccount {
                files: FileStore::new(Flavor::Azure),
                jobs: JobStore::default(),
                deployments: DeploymentStore::default(),
            },
            cluster: ClusterStore::default(),
            lora: LoraStore::default(),
        }
    }

    /// The files and jobs of the account that `flavor` names.
    pub(crate) fn account(&mut self, flavor: Flavor) -> (&mut FileStore, &mut JobStore) {
        match flavor {
            Flavor::OpenAi => (&mut self.files, &mut self.jobs),
            Flavor::Azure => (&mut self.azure.files, &mut self.azure.jobs),
        }
    }
}

impl SimState {
    pub(crate) fn new(config: SimConfig) -> Self {
        Self {
            behaviors: RwLock::new(config.models),
            default_behavior: config.default_behavior,
            fine_tune: config.fine_tune,
            azure: config.azure,
            cluster: config.cluster,
            lora_base_model: config
                .lora_base_model
                .unwrap_or_else(|| DEFAULT_LORA_BASE_MODEL.to_owned()),
            api_key: RwLock::new(config.api_key),
            arm_token: config.arm_token,
            cluster_token: config.cluster_token,
            journal: RequestJournal::default(),
            storage: Mutex::new(Storage::new()),
            served: Mutex::new(HashMap::new()),
            rate_limit: Mutex::new(RateLimit::default()),
            rate_limited: AtomicUsize::new(0),
            lost_creates: AtomicUsize::new(0),
            failed_creates: AtomicUsize::new(0),
            refused_creates: AtomicUsize::new(0),
            failing_jobs: AtomicUsize::new(0),
            quota_refusals: AtomicUsize::new(0),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Fine-tuned models (OpenAI `ft:`, Azure `.ft-`, loaded LoRA adapters) answer well unless
    /// configured otherwise: they stand in for a student that learned from a good teacher.
    pub(crate) fn behavior(&self, model: &str) -> ModelBehavior {
        let configured = self
            .behaviors
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
            .cloned();
        if let Some(behavior) = configured {
            return behavior;
        }
        let fine_tuned = model.starts_with("ft:")
            || model.contains(".ft-")
            || self.storage().lora.is_loaded(model);
        if fine_tuned {
            // `models["fine-tuned"]`, when configured, is how every fine-tuned model behaves:
            // tests use it for a student that learned nothing.
            if let Some(behavior) = self
                .behaviors
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(FINE_TUNED)
                .cloned()
            {
                return behavior;
            }
            ModelBehavior {
                quality: Quality::Good,
                ..self.default_behavior.clone()
            }
        } else {
            self.default_behavior.clone()
        }
    }

    /// The answer to a chat request for a model this upstream does not serve: an OpenAI
    /// fine-tuned name (`ft:`) that no succeeded job produced (yet), or a LoRA adapter vLLM has
    /// unloaded. Other names are served as base models; a model with a configured behaviour is
    /// always served.
    pub(crate) fn refuse_unknown_model(&self, model: &str) -> Option<axum::response::Response> {
        use axum::response::IntoResponse;
        if self
            .behaviors
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(model)
        {
            return None;
        }
        let mut guard = self.storage();
        let storage = &mut *guard;
        if model.starts_with("ft:") {
            let trained = storage
                .jobs
                .succeeded_models(tokio::time::Instant::now(), &mut storage.files)
                .into_iter()
                .any(|(name, _)| name == model);
            return (!trained).then(|| ApiError::model_not_found(model).into_response());
        }
        storage
            .lora
            .was_unloaded(model)
            .then(|| super::vllm::model_not_found(model))
    }

    /// Whether this request to `model` is one that `fail_every` makes fail.
    pub(crate) fn fails_now(&self, model: &str, every: Option<u64>) -> bool {
        let every = every.unwrap_or(1).max(1);
        if every == 1 {
            return true;
        }
        let mut served = self.served.lock().unwrap_or_else(PoisonError::into_inner);
        let n = served.entry(model.to_owned()).or_insert(0);
        *n += 1;
        n.is_multiple_of(every)
    }

    pub(crate) fn set_behavior(&self, model: &str, behavior: ModelBehavior) {
        let mut behaviors = self
            .behaviors
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        behaviors.insert(model.to_owned(), behavior);
    }

    pub(crate) fn configured_models(&self) -> Vec<String> {
        let behaviors = self
            .behaviors
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = behaviors.keys().cloned().collect();
        names.sort();
        names
    }

    pub(crate) fn storage(&self) -> MutexGuard<'_, Storage> {
        self.storage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the next `n` requests to the training APIs answer 429.
    pub(crate) fn inject_rate_limit(&self, n: usize, retry_after_secs: u64) {
        let mut limit = self
            .rate_limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *limit = RateLimit {
            remaining: n,
            retry_after_secs,
        };
    }

    /// Whether this request is one that an injected rate limit refuses, and if so after how
    /// many seconds to retry. Counts the refusal.
    pub(crate) fn take_rate_limit(&self) -> Option<u64> {
        let mut limit = self
            .rate_limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if limit.remaining == 0 {
            return None;
        }
        limit.remaining -= 1;
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
        Some(limit.retry_after_secs)
    }

    pub(crate) fn rate_limited_count(&self) -> usize {
        self.rate_limited.load(Ordering::Relaxed)
    }

    pub(crate) fn fail_next_fine_tuning_jobs(&self, n: usize) {
        self.failing_jobs.store(n, Ordering::Relaxed);
    }

    pub(crate) fn lose_next_job_creates(&self, n: usize) {
        self.lost_creates.store(n, Ordering::Relaxed);
    }

    /// Whether the answer to the job just created is to be lost; uses one up if so.
    pub(crate) fn take_lost_create(&self) -> bool {
        take_one(&self.lost_creates)
    }

    pub(crate) fn fail_next_job_creates(&self, n: usize) {
        self.failed_creates.store(n, Ordering::Relaxed);
    }

    /// Whether the job about to be created is to fail instead; uses one up if so.
    pub(crate) fn take_failed_create(&self) -> bool {
        take_one(&self.failed_creates)
    }

    pub(crate) fn refuse_next_job_creates(&self, n: usize) {
        self.refused_creates.store(n, Ordering::Relaxed);
    }

    /// Whether the job about to be created is to be refused instead; uses one up if so.
    pub(crate) fn take_refused_create(&self) -> bool {
        take_one(&self.refused_creates)
    }

    pub(crate) fn exhaust_quota(&self, n: usize) {
        self.quota_refusals.store(n, Ordering::Relaxed);
    }

    /// Whether this request is one that an exhausted quota refuses; uses one up if so.
    pub(crate) fn take_quota_refusal(&self) -> bool {
        take_one(&self.quota_refusals)
    }

    /// Whether the job being created is one of those told to fail; uses one up if so.
    pub(crate) fn take_failing_job(&self) -> bool {
        take_one(&self.failing_jobs)
    }

    /// Keeps `task` so that stopping the server stops it too.
    pub(crate) fn track(&self, task: AbortHandle) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.retain(|task| !task.is_finished());
        tasks.push(task);
    }

    pub(crate) fn abort_tasks(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in tasks {
            task.abort();
        }
    }

    /// Azure data plane: `api-key: <key>`, never a bearer token. Without a configured key any
    /// non-empty key passes.
    pub(crate) fn check_azure_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let presented = headers
            .get("api-key")
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .filter(|key| !key.is_empty());
        match (presented, self.api_key().as_deref()) {
            (None, _) => Err(ApiError::azure_access_denied()),
            (Some(presented), Some(key)) if presented != key => {
                Err(ApiError::azure_access_denied())
            }
            (Some(_), _) => Ok(()),
        }
    }

    /// The ARM endpoints' Entra token check.
    pub(crate) fn check_arm_token(&self, headers: &HeaderMap) -> Result<(), BearerRefusal> {
        check_bearer(headers, self.arm_token.as_deref())
    }

    /// The Kubernetes API server's bearer token check.
    pub(crate) fn check_cluster_token(&self, headers: &HeaderMap) -> Result<(), BearerRefusal> {
        check_bearer(headers, self.cluster_token.as_deref())
    }

    /// The account's key now.
    fn api_key(&self) -> Option<String> {
        self.api_key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the account's key: requests with the one before get 401 from then on.
    pub(crate) fn set_api_key(&self, key: Option<String>) {
        *self.api_key.write().unwrap_or_else(PoisonError::into_inner) = key;
    }

    pub(crate) fn check_api_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = self.api_key() else {
            return Ok(());
        };
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            None | Some("") => Err(ApiError::missing_api_key()),
            Some(presented) if presented == key.as_str() => Ok(()),
            Some(presented) => Err(ApiError::incorrect_api_key(presented)),
        }
    }
}

/// Why a bearer token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BearerRefusal {
    Missing,
    Wrong,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

fn check_bearer(headers: &HeaderMap, expected: Option<&str>) -> Result<(), BearerRefusal> {
    match (bearer(headers), expected) {
        (None, _) => Err(BearerRefusal::Missing),
        (Some(token), Some(expected)) if token != expected => Err(BearerRefusal::Wrong),
        (Some(_), _) => Ok(()),
    }
}

/// Counts one down from `count`; false when it is at zero already.
fn take_one(count: &AtomicUsize) -> bool {
    count
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}
