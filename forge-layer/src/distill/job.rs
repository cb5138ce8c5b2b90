//! The distillation job record and the model registry record, as stored and shown by the admin API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::trace::TraceId;

/// Where a distillation job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Building the dataset.
    Collecting,
    /// Submitted to the provider (or about to be), polling until it finishes.
    Training,
    /// Trained; the model is in the registry (and in canary, if it passed the gate).
    Completed,
    /// Failed: not enough data, a provider error, or a failed training run.
    Failed,
}

impl JobStatus {
    /// Whether the job still holds its route (at most one active job per route).
    pub fn is_active(self) -> bool {
        matches!(self, JobStatus::Collecting | JobStatus::Training)
    }
}

/// One distillation cycle of one route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillationJob {
    /// `dj_<ULID>`: sorts by creation time.
    pub id: String,
    /// The route alias.
    pub route: String,
    /// What started it: `threshold`, `schedule` or `admin`.
    pub trigger: String,
    /// Where it stands.
    pub status: JobStatus,
    /// The provider (`openai`, `azure`, `kubernetes`, `sim`).
    pub provider: String,
    /// The student base model.
    pub base_model: String,
    /// The provider's job id, once submitted.
    #[serde(default)]
    pub provider_job_id: Option<String>,
    /// The provider's own status word, as last polled.
    #[serde(default)]
    pub provider_status: Option<String>,
    /// Training examples written (train + validation).
    pub dataset_size: u64,
    /// The dataset's manifest summary, once built.
    #[serde(default)]
    pub dataset: Option<serde_json::Value>,
    /// The newest trace the dataset read; the route's next dataset starts after it.
    #[serde(default)]
    pub cut: Option<TraceId>,
    /// The newest feedback the dataset saw: the route's next dataset also takes the traces up
    /// to `cut` that feedback after this made golden.
    #[serde(default)]
    pub feedback_mark: Option<TraceId>,
    /// When the dataset stopped at the file size limit among traces feedback had made golden
    /// behind the previous cut: where the route's next dataset goes on with them (the
    /// manifest's `late_stop`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_stop: Option<TraceId>,
    /// The model the provider trained, once training succeeded. A job that fails after that
    /// (its deployment or the registry) keeps its cut: its examples are trained on already, and
    /// a new job on them would pay for the same run again.
    #[serde(default)]
    pub trained_model: Option<String>,
    /// The model that came out, routed or not.
    #[serde(default)]
    pub resulting_model_id: Option<String>,
    /// Training loss, validation loss, token accuracy, and the held-out evaluation score.
    #[serde(default)]
    pub eval_metrics: BTreeMap<String, f64>,
    /// Why it failed, or why its model was held back.
    #[serde(default)]
    pub error: Option<String>,
    /// Its training run was cancelled (through the admin API, or at the provider): the route's
    /// automatic triggers then hold off for the longest back-off, so that a cancel is not undone
    /// by the next check.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelled: bool,
    /// Unix milliseconds.
    pub created_ms: u64,
    /// Unix milliseconds of the last change.
    pub updated_ms: u64,
    /// Unix milliseconds when it completed or failed.
    #[serde(default)]
    pub finished_ms: Option<u64>,
}

/// Where a trained model stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    /// Trained; not serving (below the evaluation gate, or not deployed yet).
    Candidate,
    /// Serving a canary share.
    Canary,
    /// Serving all of its route's traffic.
    Promoted,
    /// Taken back to 0 (by the guard or an operator).
    RolledBack,
    /// Replaced by a newer model.
    Retired,
}

/// A trained model in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// The name Forge routes to (`ft:…`, a deployment name, a LoRA adapter name).
    pub id: String,
    /// The route it was trained for.
    pub route: String,
    /// The Forge upstream that serves it.
    pub upstream: String,
    /// The job that made it.
    pub job_id: String,
    /// The base model.
    pub base_model: String,
    /// The provider.
    pub provider: String,
    /// Training metrics and the evaluation score.
    pub metrics: BTreeMap<String, f64>,
    /// Unix milliseconds.
    pub created_ms: u64,
    /// Where it stands.
    pub status: ModelStatus,
    /// Why it stands there (the gate's verdict, the guard's decision).
    #[serde(default)]
    pub reason: Option<String>,
    /// Unix milliseconds when `status` last changed (none in records from before it was kept).
    #[serde(default)]
    pub status_ms: Option<u64>,
    /// Unix milliseconds when, replaced, it left its route and its deployment was taken down.
    #[serde(default)]
    pub undeployed_ms: Option<u64>,
}
