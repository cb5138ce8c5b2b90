//! The `TrainingProvider` trait: what the distiller needs from a fine-tuning service.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A boxed future, so providers can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Hyperparameters; `None` leaves the choice to the provider (`"auto"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    /// Epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_epochs: Option<u32>,
    /// Batch size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Learning-rate multiplier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate_multiplier: Option<f64>,
}

/// One training run to start.
#[derive(Clone)]
pub struct TrainingRequest {
    /// Forge's job id; providers use it to name what they create (idempotency, tracing).
    pub job_id: String,
    /// The training JSONL on local disk.
    pub train_file: PathBuf,
    /// The validation JSONL, if the split produced one.
    pub validation_file: Option<PathBuf>,
    /// The base model to fine-tune (`gpt-4o-mini`, or a Hugging Face id for LoRA).
    pub base_model: String,
    /// A suffix for the model name.
    pub suffix: Option<String>,
    /// Hyperparameters.
    pub hyperparameters: Hyperparameters,
    /// Where a remote trainer (a Kubernetes Job) can download the training file from Forge,
    /// and the bearer token that URL needs.
    pub dataset_url: Option<(String, String)>,
}

impl std::fmt::Debug for TrainingRequest {
    /// Without the dataset's token: it opens the job's dataset, every client's traces.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingRequest")
            .field("job_id", &self.job_id)
            .field("train_file", &self.train_file)
            .field("validation_file", &self.validation_file)
            .field("base_model", &self.base_model)
            .field("suffix", &self.suffix)
            .field("hyperparameters", &self.hyperparameters)
            .field(
                "dataset_url",
                &self.dataset_url.as_ref().map(|(url, _)| (url, "[token]")),
            )
            .finish()
    }
}

/// What a provider returns once a run is accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submitted {
    /// The provider's own job id (`ftjob-…`, a Kubernetes Job name, …).
    pub provider_job_id: String,
    /// The uploaded training file's id, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_file_id: Option<String>,
}

/// Where a provider's run stands.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderState {
    /// Accepted, not yet training (validating, queued, pending).
    Queued,
    /// Training.
    Running,
    /// Done: the trained model's name on the provider (`ft:…`, an adapter path, …).
    Succeeded {
        /// The provider's model name or artifact location.
        model: String,
    },
    /// Failed, with the provider's error.
    Failed {
        /// The provider's error message (and code, where there is one).
        error: String,
    },
    /// Cancelled on the provider's side.
    Cancelled,
}

/// One poll's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The state.
    pub state: ProviderState,
    /// The provider's own status word (`validating_files`, `running`, `Complete`, …).
    pub provider_status: String,
    /// Metrics known so far (train_loss, valid_loss, train_mean_token_accuracy, …).
    pub metrics: BTreeMap<String, f64>,
}

/// A trained model, ready to be routed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    /// The Forge upstream that serves it.
    pub upstream: String,
    /// The model name to send there.
    pub model: String,
}

/// A provider call that failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// 429 (or 503 with `retry-after`): try again after the given time.
    #[error("rate limited; retry after {0:?}")]
    RateLimited(Duration),
    /// The provider answered with an error status.
    #[error("provider answered {status}: {message}")]
    Http {
        /// The HTTP status.
        status: u16,
        /// The provider's message.
        message: String,
    },
    /// The provider could not be reached, or its answer could not be read.
    #[error("provider unreachable: {0}")]
    Transport(String),
    /// No connection could be made, so the request was never sent: unlike
    /// [`ProviderError::Transport`], it cannot have taken effect.
    #[error("provider unreachable: {0}")]
    NotSent(String),
    /// Forge's side is wrong (a missing file, a bad setting).
    #[error("{0}")]
    Invalid(String),
    /// The run has already ended (succeeded or failed), so there is nothing left to stop.
    #[error("{0}")]
    Ended(String),
    /// A call that may or may not have taken effect (the answer to a create was lost), which
    /// the provider cannot look up: not retried, so that nothing is started twice.
    #[error("{0}")]
    Ambiguous(String),
}

impl ProviderError {
    /// Whether the call may have done what it asked all the same: its answer was lost (a
    /// timeout, a broken connection) or was a server error, a timeout or a conflict.
    pub fn may_have_taken_effect(&self) -> bool {
        match self {
            ProviderError::Transport(_) => true,
            ProviderError::Http { status, .. } => {
                *status >= 500 || *status == 408 || *status == 409
            }
            ProviderError::RateLimited(_)
            | ProviderError::NotSent(_)
            | ProviderError::Invalid(_)
            | ProviderError::Ended(_)
            | ProviderError::Ambiguous(_) => false,
        }
    }

    /// Whether trying again later may succeed: a call that may have taken effect, or one that
    /// surely did not (never sent, or rate limited).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited(_) | ProviderError::NotSent(_)
        ) || self.may_have_taken_effect()
    }
}

/// A fine-tuning service: OpenAI, Azure OpenAI, a Kubernetes LoRA job served by vLLM, or the
/// built-in simulation of OpenAI.
pub trait TrainingProvider: Send + Sync + std::fmt::Debug {
    /// A short name for logs and the registry (`openai`, `azure`, `kubernetes`, `sim`).
    fn name(&self) -> &'static str;

    /// Uploads the data and starts training.
    fn submit<'a>(
        &'a self,
        request: &'a TrainingRequest,
    ) -> BoxFuture<'a, Result<Submitted, ProviderError>>;

    /// The Forge upstream that serves the models this provider trains, when it is not the
    /// route's own: checked against the config at start, not after a paid run.
    fn serving_upstream(&self) -> Option<&str> {
        None
    }

    /// The largest dataset file the provider takes, in bytes, when it has a limit: a dataset
    /// stops short of it, and the route's next one goes on from there.
    fn max_file_bytes(&self) -> Option<u64> {
        None
    }

    /// Deletes what the submission of run `provider_job_id` uploaded (its training and
    /// validation files), once the run has ended and its model, if any, is recorded: the files
    /// hold every client's traces, and count against the account's storage.
    fn release<'a>(
        &'a self,
        _provider_job_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }

    /// Deletes the files that submissions of Forge job `job_id` uploaded and no run took: called
    /// when the job fails before a run holds them, as they hold every client's traces. Only the
    /// uploads this process knows of are found. The default uploads nothing, and deletes
    /// nothing.
    fn discard_uploads<'a>(&'a self, _job_id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether [`TrainingProvider::submit`] finds a run an earlier submission of the same Forge
    /// job started, rather than starting a second one. Only then is a submission that a restart
    /// interrupted made again.
    fn finds_earlier_submissions(&self) -> bool {
        false
    }

    /// The run an earlier submission of the Forge job `job_id` started (still running, or
    /// succeeded), without starting one; `None` only if the provider is sure there is none.
    /// Asked of a provider that [`TrainingProvider::finds_earlier_submissions`], when a job that
    /// a restart interrupted while it was submitted is already past its training deadline: such
    /// a run is to be cancelled (or kept, if it succeeded), and no new one started only to be
    /// cancelled. The default cannot look, which is an error, never "none".
    fn earlier_submission<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, ProviderError>> {
        let _ = job_id;
        Box::pin(async {
            Err(ProviderError::Invalid(
                "this provider cannot look up earlier submissions".into(),
            ))
        })
    }

    /// Reads where the run stands.
    fn poll<'a>(
        &'a self,
        provider_job_id: &'a str,
    ) -> BoxFuture<'a, Result<Progress, ProviderError>>;

    /// Asks the provider to stop the run (OpenAI and Azure: cancel the job; Kubernetes: delete
    /// the Job and its pod). The run's next poll then reads [`ProviderState::Cancelled`]. A run
    /// that is already gone is not an error.
    fn cancel<'a>(&'a self, provider_job_id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>>;

    /// Makes a trained model servable (Azure: a deployment; vLLM: load the adapter under a
    /// versioned name) and says where Forge routes it. `job_id` is Forge's, for naming.
    fn deploy<'a>(
        &'a self,
        job_id: &'a str,
        trained_model: &'a str,
    ) -> BoxFuture<'a, Result<Deployed, ProviderError>>;

    /// Whether what [`TrainingProvider::deploy`] sets up costs while idle, so that the
    /// distiller takes it down once the model serves nothing (see `distill/undeploy.rs`):
    /// Azure bills a deployment by the hour, and vLLM holds a loaded adapter in GPU memory. An
    /// OpenAI fine-tuned model costs nothing while it is not called (the default).
    fn costs_while_idle(&self) -> bool {
        false
    }

    /// Takes down what [`TrainingProvider::deploy`] set up for `model` (the name Forge routed
    /// to). One already gone is not an error. Called only when
    /// [`TrainingProvider::costs_while_idle`]; the default does nothing.
    fn undeploy<'a>(&'a self, model: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        let _ = model;
        Box::pin(async { Ok(()) })
    }
}

/// The longest wait a `retry-after` may ask for: a provider (or a proxy on the way) asking for
/// more would hold the job, and its route, for that long without a word.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Reads a `retry-after-ms` or `retry-after` header: milliseconds, or seconds, or an HTTP date
/// (the time until then; a date past, or one that cannot be read, is "a second"); at most an
/// hour.
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(Duration::from_millis(ms).min(MAX_RETRY_AFTER));
    }
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    Some(match value.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64()))
        }
        _ => httpdate::parse_http_date(value.trim())
            .ok()
            .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok())
            .filter(|wait| *wait >= Duration::from_secs(1))
            .map_or(Duration::from_secs(1), |wait| wait.min(MAX_RETRY_AFTER)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_training_request_s_debug_leaves_out_the_dataset_token() {
        let request = TrainingRequest {
            job_id: "job-1".into(),
            train_file: "train.jsonl".into(),
            validation_file: None,
            base_model: "m".into(),
            suffix: None,
            hyperparameters: Hyperparameters::default(),
            dataset_url: Some((
                "http://forge:8081/admin/datasets/job-1.jsonl".into(),
                "tok-secret-123".into(),
            )),
        };
        let shown = format!("{request:?}");
        assert!(
            shown.contains("job-1.jsonl") && !shown.contains("tok-secret-123"),
            "{shown}"
        );
    }

    fn wait(name: &'static str, value: &'static str) -> Option<Duration> {
        let mut headers = http::HeaderMap::new();
        headers.insert(name, http::HeaderValue::from_static(value));
        retry_after(&headers)
    }

    #[test]
    fn retry_after_reads_both_headers_and_never_asks_more_than_an_hour() {
        assert_eq!(
            wait("retry-after-ms", "250"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            wait("retry-after", "2.5"),
            Some(Duration::from_millis(2500))
        );
        // A date past: a second.
        assert_eq!(
            wait("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::from_secs(1))
        );
        // A date to come: the time until then, at most an hour.
        let at = |ahead: Duration| {
            let mut headers = http::HeaderMap::new();
            let date = httpdate::fmt_http_date(std::time::SystemTime::now() + ahead);
            headers.insert(http::header::RETRY_AFTER, date.parse().unwrap());
            retry_after(&headers).unwrap()
        };
        let two_minutes = at(Duration::from_secs(120));
        assert!(
            (Duration::from_secs(60)..=Duration::from_secs(120)).contains(&two_minutes),
            "{two_minutes:?}"
        );
        assert_eq!(at(Duration::from_secs(86_400)), MAX_RETRY_AFTER);
        assert_eq!(wait("retry-after-ms", "86400000000"), Some(MAX_RETRY_AFTER));
        assert_eq!(wait("retry-after", "1e12"), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&http::HeaderMap::new()), None);
    }
}
