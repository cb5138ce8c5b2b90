//! Fine-tuning jobs (openai-wire.md §4): a timed state machine with events, checkpoints and a result CSV.
//!
//! A job's state is not driven by background tasks: every read first advances the job to the
//! present from the time elapsed in its phase, emitting the events it passed on the way. So all
//! endpoints see one consistent state under the storage lock, events are in order by
//! construction, and nothing is left running after shutdown.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use bytes::Bytes;
use http::StatusCode;
use rand::Rng;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::config::FineTuneTimings;
use super::error::ApiError;
use super::files::FileStore;
use super::jsonl::{self, DatasetStats, MIN_TRAINING_EXAMPLES};
use super::reply::{self, CursorList, List, ListQuery};
use super::state::{SimState, Storage};

const ORGANIZATION: &str = "org-forge-sim";
/// The org slug inside fine-tuned model names: `ft:<base>:forge-sim:<suffix>:<id>`.
const ORG_SLUG: &str = "forge-sim";
const RESULT_FILENAME: &str = "step_metrics.csv";
const RESULT_HEADER: &str = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n";
/// OpenAI keeps the checkpoints of the last three epochs.
const KEPT_CHECKPOINT_EPOCHS: u64 = 3;
/// Metrics events are thinned so that a long job logs about this many.
const METRICS_EVENTS: u64 = 100;

/// Every job, in creation order.
#[derive(Default)]
pub(crate) struct JobStore {
    jobs: Vec<FineTuneJob>,
}

impl JobStore {
    /// `(model, created_at)` of every job that has succeeded by `now`.
    pub(crate) fn succeeded_models(
        &mut self,
        now: Instant,
        files: &mut FileStore,
    ) -> Vec<(String, u64)> {
        self.jobs
            .iter_mut()
            .filter_map(|job| {
                job.advance(now, files);
                Some((job.fine_tuned_model.clone()?, job.finished_at?))
            })
            .collect()
    }

    fn find(&mut self, id: &str) -> Result<&mut FineTuneJob, ApiError> {
        self.jobs
            .iter_mut()
            .find(|job| job.id == id)
            .ok_or_else(|| {
                ApiError::not_found(format!("No such fine-tuning job: {id}"))
                    .with_param("fine_tuning_job_id")
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ValidatingFiles,
    Queued,
    Running,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl Phase {
    fn status(self) -> &'static str {
        match self {
            Phase::ValidatingFiles => "validating_files",
            Phase::Queued => "queued",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    fn is_final(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }
}

/// A hyperparameter as requested: `"auto"` or a number.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Setting {
    Auto,
    Integer(u64),
    Decimal(f64),
}

impl Serialize for Setting {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            Setting::Auto => serializer.serialize_str("auto"),
            Setting::Integer(value) => serializer.serialize_u64(value),
            Setting::Decimal(value) => serializer.serialize_f64(value),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Hyperparameters {
    n_epochs: Setting,
    batch_size: Setting,
    learning_rate_multiplier: Setting,
}

impl Hyperparameters {
    const AUTO: Self = Self {
        n_epochs: Setting::Auto,
        batch_size: Setting::Auto,
        learning_rate_multiplier: Setting::Auto,
    };

    fn parse(value: &Value, param: &str) -> Result<Self, ApiError> {
        let object = match value {
            Value::Null => return Ok(Self::AUTO),
            Value::Object(object) => object,
            other => return Err(ApiError::invalid_type(param.to_owned(), "an object", other)),
        };
        let mut parsed = Self::AUTO;
        for (key, value) in object {
            let param = format!("{param}.{key}");
            match key.as_str() {
                "n_epochs" => parsed.n_epochs = integer_setting(value, &param, 1, 50)?,
                "batch_size" => parsed.batch_size = integer_setting(value, &param, 1, 256)?,
                "learning_rate_multiplier" => {
                    parsed.learning_rate_multiplier = match value {
                        Value::String(auto) if auto == "auto" => Setting::Auto,
                        Value::Number(n) if n.as_f64().is_some_and(|n| n > 0.0) => {
                            Setting::Decimal(n.as_f64().unwrap_or(1.0))
                        }
                        _ => {
                            return Err(ApiError::invalid_value(
                                param,
                                "Invalid value: expected \"auto\" or a number greater than 0.",
                            ));
                        }
                    };
                }
                _ => {
                    return Err(ApiError::invalid_request(format!(
                        "Unrecognized hyperparameter: '{key}'."
                    ))
                    .with_param(param));
                }
            }
        }
        Ok(parsed)
    }

    /// What "auto" means for a file of `examples` examples.
    fn resolve(self, examples: usize) -> Resolved {
        let examples = examples as u64;
        let n_epochs = match self.n_epochs {
            Setting::Integer(n) => n,
            _ => 3,
        };
        let batch_size = match self.batch_size {
            Setting::Integer(n) => n,
            _ => examples.div_ceil(100).clamp(1, 256),
        };
        let learning_rate_multiplier = match self.learning_rate_multiplier {
            Setting::Decimal(value) => value,
            Setting::Integer(value) => value as f64,
            Setting::Auto => 1.8,
        };
        let steps_per_epoch = examples.div_ceil(batch_size).max(1);
        Resolved {
            n_epochs,
            batch_size,
            learning_rate_multiplier,
            steps_per_epoch,
            total_steps: steps_per_epoch * n_epochs,
        }
    }
}

fn integer_setting(value: &Value, param: &str, min: u64, max: u64) -> Result<Setting, ApiError> {
    match value {
        Value::String(auto) if auto == "auto" => Ok(Setting::Auto),
        Value::Number(n) if n.as_u64().is_some_and(|n| (min..=max).contains(&n)) => {
            Ok(Setting::Integer(n.as_u64().unwrap_or(min)))
        }
        _ => Err(ApiError::invalid_value(
            param.to_owned(),
            format!("Invalid value: expected \"auto\" or an integer from {min} to {max}."),
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Resolved {
    n_epochs: u64,
    batch_size: u64,
    learning_rate_multiplier: f64,
    steps_per_epoch: u64,
    total_steps: u64,
}

impl Resolved {
    fn as_hyperparameters(&self) -> Hyperparameters {
        Hyperparameters {
            n_epochs: Setting::Integer(self.n_epochs),
            batch_size: Setting::Integer(self.batch_size),
            learning_rate_multiplier: Setting::Decimal(self.learning_rate_multiplier),
        }
    }
}

/// What the files of a job hold, once they passed validation.
#[derive(Debug, Clone, Copy, PartialEq)]
struct TrainingPlan {
    dataset: DatasetStats,
    has_validation: bool,
    resolved: Resolved,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct JobFailure {
    code: &'static str,
    message: String,
    param: Option<&'static str>,
}

/// Validates the files now; the job reveals the outcome when `validating_files` ends.
fn check_inputs(
    training: &[u8],
    validation: Option<&Bytes>,
    requested: Hyperparameters,
) -> Result<TrainingPlan, JobFailure> {
    let dataset =
        jsonl::inspect(training, MIN_TRAINING_EXAMPLES).map_err(|message| JobFailure {
            code: "invalid_training_file",
            message: format!("Invalid training file: {message}"),
            param: Some("training_file"),
        })?;
    if let Some(validation) = validation {
        jsonl::inspect(validation, 1).map_err(|message| JobFailure {
            code: "invalid_validation_file",
            message: format!("Invalid validation file: {message}"),
            param: Some("validation_file"),
        })?;
    }
    Ok(TrainingPlan {
        dataset,
        has_validation: validation.is_some(),
        resolved: requested.resolve(dataset.examples),
    })
}

/// The loss curve: deterministic, decreasing, and flattening out, like a healthy run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct StepMetrics {
    step: u64,
    train_loss: f64,
    train_mean_token_accuracy: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    valid_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    valid_mean_token_accuracy: Option<f64>,
    total_steps: u64,
}

impl StepMetrics {
    fn at(step: u64, plan: &TrainingPlan) -> Self {
        let total = plan.resolved.total_steps;
        let progress = step as f64 / total.max(1) as f64;
        let decay = (-4.0 * progress).exp();
        let train_loss = round6(0.25 + 1.75 * decay);
        let train_accuracy = round6(0.55 + 0.4 * (1.0 - decay));
        Self {
            step,
            train_loss,
            train_mean_token_accuracy: train_accuracy,
            valid_loss: plan.has_validation.then(|| round6(train_loss + 0.05)),
            valid_mean_token_accuracy: plan.has_validation.then(|| round6(train_accuracy - 0.02)),
            total_steps: total,
        }
    }
}

fn round6(value: f64) -> f64 {
    (value * 1e6).round() / 1e6
}

#[derive(Serialize)]
struct CheckpointMetrics {
    step: u64,
    train_loss: f64,
    train_mean_token_accuracy: f64,
    valid_loss: Option<f64>,
    valid_mean_token_accuracy: Option<f64>,
    full_valid_loss: Option<f64>,
    full_valid_mean_token_accuracy: Option<f64>,
}

struct Checkpoint {
    id: String,
    created_at: u64,
    model: String,
    metrics: StepMetrics,
}

struct JobEvent {
    id: String,
    created_at: u64,
    level: &'static str,
    message: String,
    metrics: Option<StepMetrics>,
}

struct FineTuneJob {
    id: String,
    model: String,
    created_at: u64,
    /// The instant and wall time of creation: event times are derived from both, so that a
    /// paused test clock still gives consistent Unix timestamps.
    born: Instant,
    born_wall: SystemTime,
    training_file: String,
    validation_file: Option<String>,
    suffix: Option<String>,
    seed: u64,
    metadata: Option<Value>,
    integrations: Option<Value>,
    requested: Hyperparameters,
    timings: FineTuneTimings,
    inputs: Result<TrainingPlan, JobFailure>,
    /// The name the model gets on success; checkpoints are named after it.
    output_model: String,
    phase: Phase,
    phase_started: Instant,
    /// Time spent running before the current phase; a paused job resumes where it stopped.
    ran_before: Duration,
    steps_done: u64,
    events: Vec<JobEvent>,
    checkpoints: Vec<Checkpoint>,
    finished_at: Option<u64>,
    fine_tuned_model: Option<String>,
    result_files: Vec<String>,
    trained_tokens: Option<u64>,
    error: Option<JobFailure>,
}

/// A validated `POST /fine_tuning/jobs` body.
struct JobRequest {
    model: String,
    training_file: String,
    validation_file: Option<String>,
    suffix: Option<String>,
    seed: Option<u64>,
    metadata: Option<Value>,
    integrations: Option<Value>,
    hyperparameters: Hyperparameters,
}

impl JobRequest {
    fn parse(request: &Map<String, Value>) -> Result<Self, ApiError> {
        const KNOWN: &[&str] = &[
            "model",
            "training_file",
            "validation_file",
            "suffix",
            "seed",
            "metadata",
            "integrations",
            "method",
            "hyperparameters",
        ];
        if let Some(key) = request.keys().find(|key| !KNOWN.contains(&key.as_str())) {
            return Err(ApiError::invalid_request(format!(
                "Unrecognized request argument supplied: {key}"
            )));
        }
        let model = required_string(request, "model")?;
        let training_file = required_string(request, "training_file")?;
        let validation_file = optional_string(request, "validation_file")?;
        let suffix = optional_string(request, "suffix")?;
        if let Some(suffix) = &suffix {
            if suffix.chars().count() > 64 {
                return Err(ApiError::invalid_value(
                    "suffix",
                    "Invalid 'suffix': string too long. Expected a string with maximum length 64.",
                ));
            }
            // A colon would make the model name ambiguous to parse.
            if suffix.contains(':') || suffix.chars().any(char::is_whitespace) {
                return Err(ApiError::invalid_value(
                    "suffix",
                    "Invalid 'suffix': it may not contain ':' or whitespace.",
                ));
            }
        }
        let seed = match request.get("seed") {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_u64() {
                Some(seed) if seed <= 2_147_483_647 => Some(seed),
                _ => {
                    return Err(ApiError::invalid_value(
                        "seed",
                        "Invalid 'seed': expected an integer from 0 to 2147483647.",
                    ));
                }
            },
        };
        let metadata = match request.get("metadata") {
            None | Some(Value::Null) => None,
            Some(value) => Some(check_metadata(value)?),
        };
        let integrations = match request.get("integrations") {
            None | Some(Value::Null) => None,
            Some(value @ Value::Array(_)) => Some(value.clone()),
            Some(other) => return Err(ApiError::invalid_type("integrations", "an array", other)),
        };
        let hyperparameters = Self::hyperparameters(request)?;
        Ok(Self {
            model,
            training_file,
            validation_file,
            suffix,
            seed,
            metadata,
            integrations,
            hyperparameters,
        })
    }

    /// From `method.supervised.hyperparameters`, or the deprecated top-level `hyperparameters`.
    fn hyperparameters(request: &Map<String, Value>) -> Result<Hyperparameters, ApiError> {
        let top_level = request
            .get("hyperparameters")
            .filter(|value| !value.is_null());
        let method = match request.get("method") {
            None | Some(Value::Null) => None,
            Some(Value::Object(method)) => Some(method),
            Some(other) => return Err(ApiError::invalid_type("method", "an object", other)),
        };
        let Some(method) = method else {
            return match top_level {
                Some(value) => Hyperparameters::parse(value, "hyperparameters"),
                None => Ok(Hyperparameters::AUTO),
            };
        };
        match method.get("type").and_then(Value::as_str) {
            Some("supervised") => {}
            Some(kind @ ("dpo" | "reinforcement")) => {
                return Err(ApiError::invalid_value(
                    "method.type",
                    format!(
                        "The simulated upstream trains only with method type 'supervised', not \
                         '{kind}'."
                    ),
                ));
            }
            Some(other) => {
                return Err(ApiError::invalid_value(
                    "method.type",
                    format!(
                        "Invalid value: '{other}'. Supported values are: 'supervised', 'dpo', and \
                         'reinforcement'."
                    ),
                ));
            }
            None => return Err(ApiError::missing_parameter("method.type")),
        }
        let nested = method
            .get("supervised")
            .and_then(|supervised| supervised.get("hyperparameters"))
            .filter(|value| !value.is_null());
        match (nested, top_level) {
            (Some(_), Some(_)) => Err(ApiError::invalid_request(
                "Specify hyperparameters either in 'method' or in the deprecated top-level \
                 'hyperparameters', not both.",
            )
            .with_param("hyperparameters")),
            (Some(value), None) => {
                Hyperparameters::parse(value, "method.supervised.hyperparameters")
            }
            (None, Some(value)) => Hyperparameters::parse(value, "hyperparameters"),
            (None, None) => Ok(Hyperparameters::AUTO),
        }
    }
}

fn required_string(request: &Map<String, Value>, key: &'static str) -> Result<String, ApiError> {
    match request.get(key) {
        Some(Value::String(value)) if !value.is_empty() => Ok(value.clone()),
        None | Some(Value::Null) => Err(ApiError::missing_parameter(key)),
        Some(Value::String(_)) => Err(ApiError::invalid_value(
            key,
            format!("Invalid '{key}': empty string."),
        )),
        Some(other) => Err(ApiError::invalid_type(key, "a string", other)),
    }
}

fn optional_string(
    request: &Map<String, Value>,
    key: &'static str,
) -> Result<Option<String>, ApiError> {
    match request.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value.clone())),
        Some(other) => Err(ApiError::invalid_type(key, "a string", other)),
    }
}

/// OpenAI's metadata limits: at most 16 string pairs, keys up to 64 and values up to 512 chars.
fn check_metadata(value: &Value) -> Result<Value, ApiError> {
    let Some(map) = value.as_object() else {
        return Err(ApiError::invalid_type("metadata", "an object", value));
    };
    if map.len() > 16 {
        return Err(ApiError::invalid_value(
            "metadata",
            "Invalid 'metadata': too many properties. Expected an object with at most 16 properties.",
        ));
    }
    for (key, value) in map {
        let fits = key.chars().count() <= 64
            && value
                .as_str()
                .is_some_and(|value| value.chars().count() <= 512);
        if !fits {
            return Err(ApiError::invalid_value(
                format!("metadata.{key}"),
                "Invalid 'metadata': keys must be strings of at most 64 characters and values \
                 strings of at most 512 characters.",
            ));
        }
    }
    Ok(value.clone())
}

impl FineTuneJob {
    fn new(
        request: JobRequest,
        inputs: Result<TrainingPlan, JobFailure>,
        timings: FineTuneTimings,
        now: Instant,
    ) -> Self {
        let id = reply::random_id("ftjob-", 24);
        // Continuing from a fine-tuned model names the result after the original base.
        let base = match request.model.strip_prefix("ft:") {
            Some(rest) => rest.split(':').next().unwrap_or(rest),
            None => request.model.as_str(),
        };
        let short_id = id.get(6..14).unwrap_or(&id);
        let output_model = format!(
            "ft:{base}:{ORG_SLUG}:{}:{short_id}",
            request.suffix.as_deref().unwrap_or_default()
        );
        let born_wall = SystemTime::now();
        let mut job = Self {
            created_at: reply::unix_seconds(born_wall),
            born: now,
            born_wall,
            seed: request
                .seed
                .unwrap_or_else(|| rand::rng().random_range(0..=2_147_483_647)),
            model: request.model,
            training_file: request.training_file,
            validation_file: request.validation_file,
            suffix: request.suffix,
            metadata: request.metadata,
            integrations: request.integrations,
            requested: request.hyperparameters,
            timings,
            inputs,
            output_model,
            phase: Phase::ValidatingFiles,
            phase_started: now,
            ran_before: Duration::ZERO,
            steps_done: 0,
            events: Vec::new(),
            checkpoints: Vec::new(),
            finished_at: None,
            fine_tuned_model: None,
            result_files: Vec::new(),
            trained_tokens: None,
            error: None,
            id,
        };
        job.log(now, format!("Created fine-tuning job: {}", job.id));
        let validating = match &job.validation_file {
            Some(validation) => format!(
                "Validating training file: {} and validation file: {validation}",
                job.training_file
            ),
            None => format!("Validating training file: {}", job.training_file),
        };
        job.log(now, validating);
        job
    }

    fn unix_at(&self, at: Instant) -> u64 {
        reply::unix_seconds(self.born_wall + at.saturating_duration_since(self.born))
    }

    fn log(&mut self, at: Instant, message: String) {
        self.push_event(at, "info", message, None);
    }

    fn push_event(
        &mut self,
        at: Instant,
        level: &'static str,
        message: String,
        metrics: Option<StepMetrics>,
    ) {
        self.events.push(JobEvent {
            id: reply::random_id("ft-event-", 24),
            created_at: self.unix_at(at),
            level,
            message,
            metrics,
        });
    }

    fn enter(&mut self, phase: Phase, at: Instant) {
        self.phase = phase;
        self.phase_started = at;
    }

    /// Brings the job up to `now`, passing through every phase whose time is over.
    fn advance(&mut self, now: Instant, files: &mut FileStore) {
        loop {
            match self.phase {
                Phase::ValidatingFiles => {
                    let end = self.phase_started + self.timings.validating;
                    if now < end {
                        return;
                    }
                    match self.inputs.clone() {
                        Ok(_) => {
                            self.log(end, "Files validated, moving job to queued state".into());
                            self.enter(Phase::Queued, end);
                        }
                        Err(failure) => {
                            self.fail(end, failure);
                            return;
                        }
                    }
                }
                Phase::Queued => {
                    let end = self.phase_started + self.timings.queued;
                    if now < end {
                        return;
                    }
                    self.log(end, "Fine-tuning job started".into());
                    self.enter(Phase::Running, end);
                }
                Phase::Running => {
                    let Ok(plan) = self.inputs.clone() else {
                        return;
                    };
                    let total = self.timings.running;
                    let ran = self.ran_before + now.saturating_duration_since(self.phase_started);
                    self.report_steps(ran.min(total), &plan);
                    if ran >= total {
                        let end = self.phase_started + total.saturating_sub(self.ran_before);
                        self.succeed(end, &plan, files);
                    }
                    return;
                }
                Phase::Paused | Phase::Succeeded | Phase::Failed | Phase::Cancelled => return,
            }
        }
    }

    /// Emits the metrics events and checkpoints of every step reached after `ran` of running.
    fn report_steps(&mut self, ran: Duration, plan: &TrainingPlan) {
        let total_steps = plan.resolved.total_steps;
        let total_time = self.timings.running;
        let reached = if total_time.is_zero() {
            total_steps
        } else {
            let fraction = ran.as_nanos() * u128::from(total_steps) / total_time.as_nanos();
            u64::try_from(fraction)
                .unwrap_or(total_steps)
                .min(total_steps)
        };
        let stride = total_steps.div_ceil(METRICS_EVENTS).max(1);
        let per_epoch = plan.resolved.steps_per_epoch;
        for step in self.steps_done + 1..=reached {
            let at = self.step_instant(step, total_steps);
            let metrics = StepMetrics::at(step, plan);
            if step == 1 || step % stride == 0 || step == total_steps {
                let mut message = format!(
                    "Step {step}/{total_steps}: training loss={:.4}",
                    metrics.train_loss
                );
                if let Some(valid_loss) = metrics.valid_loss {
                    message.push_str(&format!(", validation loss={valid_loss:.4}"));
                }
                self.push_event(at, "info", message, Some(metrics));
            }
            let epoch = step / per_epoch;
            if step % per_epoch == 0 && epoch + KEPT_CHECKPOINT_EPOCHS > plan.resolved.n_epochs {
                self.checkpoints.push(Checkpoint {
                    id: reply::random_id("ftckpt_", 24),
                    created_at: self.unix_at(at),
                    model: format!("{}:ckpt-step-{step}", self.output_model),
                    metrics,
                });
                self.log(at, format!("Checkpoint created at step {step}"));
            }
        }
        self.steps_done = self.steps_done.max(reached);
    }

    /// When `step` was reached, given that the current phase is running.
    fn step_instant(&self, step: u64, total_steps: u64) -> Instant {
        let at_run_time = self
            .timings
            .running
            .mul_f64(step as f64 / total_steps.max(1) as f64);
        self.phase_started + at_run_time.saturating_sub(self.ran_before)
    }

    fn succeed(&mut self, at: Instant, plan: &TrainingPlan, files: &mut FileStore) {
        let finished_at = self.unix_at(at);
        let csv = result_csv(plan);
        let file = files.add(
            RESULT_FILENAME.to_owned(),
            "fine-tune-results",
            Bytes::from(csv),
            finished_at,
            None,
        );
        self.result_files = vec![file.id().to_owned()];
        self.trained_tokens = Some(plan.dataset.tokens * plan.resolved.n_epochs);
        self.fine_tuned_model = Some(self.output_model.clone());
        self.finished_at = Some(finished_at);
        self.log(
            at,
            format!("New fine-tuned model created: {}", self.output_model),
        );
        self.log(at, "The job has successfully completed".into());
        self.enter(Phase::Succeeded, at);
    }

    fn fail(&mut self, at: Instant, failure: JobFailure) {
        let file = match failure.param {
            Some("validation_file") => "validation",
            _ => "training",
        };
        self.push_event(
            at,
            "error",
            format!(
                "The job failed due to an invalid {file} file. {}",
                failure.message
            ),
            None,
        );
        self.error = Some(failure);
        self.finished_at = Some(self.unix_at(at));
        self.enter(Phase::Failed, at);
    }

    fn cancel(&mut self, now: Instant) -> Result<(), ApiError> {
        if self.phase.is_final() {
            return Err(ApiError::invalid_request(format!(
                "Job {} has already {} and cannot be cancelled.",
                self.id,
                self.phase.status()
            ))
            .with_param("fine_tuning_job_id"));
        }
        self.finished_at = Some(self.unix_at(now));
        self.log(now, "Fine-tuning job cancelled".into());
        self.enter(Phase::Cancelled, now);
        Ok(())
    }

    fn pause(&mut self, now: Instant) -> Result<(), ApiError> {
        if self.phase != Phase::Running {
            return Err(ApiError::invalid_request(format!(
                "Only a running job can be paused; job {} is {}.",
                self.id,
                self.phase.status()
            ))
            .with_param("fine_tuning_job_id"));
        }
        self.ran_before += now.saturating_duration_since(self.phase_started);
        self.log(now, "Fine-tuning job paused".into());
        self.enter(Phase::Paused, now);
        Ok(())
    }

    fn resume(&mut self, now: Instant) -> Result<(), ApiError> {
        if self.phase != Phase::Paused {
            return Err(ApiError::invalid_request(format!(
                "Only a paused job can be resumed; job {} is {}.",
                self.id,
                self.phase.status()
            ))
            .with_param("fine_tuning_job_id"));
        }
        self.log(now, "Fine-tuning job resumed".into());
        self.enter(Phase::Queued, now);
        Ok(())
    }

    fn view(&self) -> JobView<'_> {
        // "auto" is shown until validation has read the file that settles it.
        let hyperparameters = match (&self.inputs, self.phase) {
            (Ok(plan), phase) if phase != Phase::ValidatingFiles => {
                plan.resolved.as_hyperparameters()
            }
            _ => self.requested,
        };
        let estimated_finish = (self.phase == Phase::Running).then(|| {
            self.unix_at(self.phase_started + self.timings.running.saturating_sub(self.ran_before))
        });
        JobView {
            object: "fine_tuning.job",
            id: &self.id,
            model: &self.model,
            created_at: self.created_at,
            finished_at: self.finished_at,
            fine_tuned_model: self.fine_tuned_model.as_deref(),
            organization_id: ORGANIZATION,
            result_files: &self.result_files,
            status: self.phase.status(),
            validation_file: self.validation_file.as_deref(),
            training_file: &self.training_file,
            hyperparameters,
            trained_tokens: self.trained_tokens,
            error: self.error.as_ref(),
            user_provided_suffix: self.suffix.as_deref(),
            seed: self.seed,
            estimated_finish,
            integrations: self.integrations.as_ref(),
            metadata: self.metadata.as_ref(),
            method: MethodView {
                kind: "supervised",
                supervised: SupervisedView { hyperparameters },
            },
        }
    }
}

/// `step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`, a row per step, with
/// empty validation cells when the job has no validation file.
fn result_csv(plan: &TrainingPlan) -> String {
    let mut csv = String::from(RESULT_HEADER);
    for step in 1..=plan.resolved.total_steps {
        let metrics = StepMetrics::at(step, plan);
        let cell = |value: Option<f64>| value.map(|v| format!("{v:.6}")).unwrap_or_default();
        csv.push_str(&format!(
            "{step},{:.6},{:.6},{},{}\n",
            metrics.train_loss,
            metrics.train_mean_token_accuracy,
            cell(metrics.valid_loss),
            cell(metrics.valid_mean_token_accuracy),
        ));
    }
    csv
}

#[derive(Serialize)]
struct JobView<'a> {
    object: &'static str,
    id: &'a str,
    model: &'a str,
    created_at: u64,
    finished_at: Option<u64>,
    fine_tuned_model: Option<&'a str>,
    organization_id: &'static str,
    result_files: &'a [String],
    status: &'static str,
    validation_file: Option<&'a str>,
    training_file: &'a str,
    hyperparameters: Hyperparameters,
    trained_tokens: Option<u64>,
    error: Option<&'a JobFailure>,
    user_provided_suffix: Option<&'a str>,
    seed: u64,
    estimated_finish: Option<u64>,
    integrations: Option<&'a Value>,
    metadata: Option<&'a Value>,
    method: MethodView,
}

#[derive(Serialize)]
struct MethodView {
    #[serde(rename = "type")]
    kind: &'static str,
    supervised: SupervisedView,
}

#[derive(Serialize)]
struct SupervisedView {
    hyperparameters: Hyperparameters,
}

#[derive(Serialize)]
struct EventView<'a> {
    object: &'static str,
    id: &'a str,
    created_at: u64,
    level: &'static str,
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    data: Option<&'a StepMetrics>,
}

impl<'a> From<&'a JobEvent> for EventView<'a> {
    fn from(event: &'a JobEvent) -> Self {
        Self {
            object: "fine_tuning.job.event",
            id: &event.id,
            created_at: event.created_at,
            level: event.level,
            message: &event.message,
            kind: if event.metrics.is_some() {
                "metrics"
            } else {
                "message"
            },
            data: event.metrics.as_ref(),
        }
    }
}

#[derive(Serialize)]
struct CheckpointView<'a> {
    object: &'static str,
    id: &'a str,
    created_at: u64,
    fine_tuned_model_checkpoint: &'a str,
    step_number: u64,
    metrics: CheckpointMetrics,
    fine_tuning_job_id: &'a str,
}

type ListParams = Result<Query<Vec<(String, String)>>, QueryRejection>;

fn list_query(query: ListParams) -> Result<ListQuery, ApiError> {
    let Query(pairs) = query.map_err(|err| ApiError::invalid_request(err.body_text()))?;
    Ok(ListQuery::new(pairs))
}

pub(crate) async fn create(
    State(state): State<Arc<SimState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = JobRequest::parse(&reply::json_object(&body)?)?;
    let (training, validation) = {
        let storage = state.storage();
        let training = storage
            .files
            .fine_tune_input(&request.training_file, "training_file")?;
        let validation = match &request.validation_file {
            Some(id) => Some(storage.files.fine_tune_input(id, "validation_file")?),
            None => None,
        };
        (training, validation)
    };
    // Validated outside the lock: a large file must not stall every other endpoint.
    let inputs = check_inputs(&training, validation.as_ref(), request.hyperparameters);
    let job = FineTuneJob::new(request, inputs, state.fine_tune, Instant::now());
    let response = reply::json(StatusCode::OK, &job.view());
    state.storage().jobs.jobs.push(job);
    Ok(response)
}

pub(crate) async fn list(
    State(state): State<Arc<SimState>>,
    query: ListParams,
) -> Result<Response, ApiError> {
    let query = list_query(query)?;
    let limit = query.limit(20, 10_000)?;
    let wanted: Vec<(&str, &str)> = query
        .pairs()
        .filter_map(|(key, value)| Some((key.strip_prefix("metadata[")?.strip_suffix(']')?, value)))
        .collect();
    let now = Instant::now();
    let mut guard = state.storage();
    let Storage { files, jobs } = &mut *guard;
    for job in &mut jobs.jobs {
        job.advance(now, files);
    }
    let matching = jobs.jobs.iter().rev().filter(|job| {
        wanted.iter().all(|(key, value)| {
            job.metadata
                .as_ref()
                .and_then(|metadata| metadata.get(*key))
                .and_then(Value::as_str)
                == Some(*value)
        })
    });
    let (data, has_more) = reply::page(matching, query.after(), limit, |job| &job.id);
    Ok(reply::json(
        StatusCode::OK,
        &List {
            object: "list",
            data: data.into_iter().map(FineTuneJob::view).collect(),
            has_more,
        },
    ))
}

/// Runs `action` on the job, brought up to date first, and answers with the job.
fn with_job(
    state: &SimState,
    id: &str,
    action: impl FnOnce(&mut FineTuneJob, Instant) -> Result<(), ApiError>,
) -> Result<Response, ApiError> {
    let now = Instant::now();
    let mut guard = state.storage();
    let Storage { files, jobs } = &mut *guard;
    let job = jobs.find(id)?;
    job.advance(now, files);
    action(job, now)?;
    Ok(reply::json(StatusCode::OK, &job.view()))
}

pub(crate) async fn retrieve(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    with_job(&state, &id, |_, _| Ok(()))
}

pub(crate) async fn cancel(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    with_job(&state, &id, FineTuneJob::cancel)
}

pub(crate) async fn pause(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    with_job(&state, &id, FineTuneJob::pause)
}

pub(crate) async fn resume(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    with_job(&state, &id, FineTuneJob::resume)
}

pub(crate) async fn events(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
    query: ListParams,
) -> Result<Response, ApiError> {
    let query = list_query(query)?;
    let limit = query.limit(20, 10_000)?;
    let now = Instant::now();
    let mut guard = state.storage();
    let Storage { files, jobs } = &mut *guard;
    let job = jobs.find(&id)?;
    job.advance(now, files);
    let (data, has_more) = reply::page(job.events.iter().rev(), query.after(), limit, |event| {
        &event.id
    });
    Ok(reply::json(
        StatusCode::OK,
        &List {
            object: "list",
            data: data.into_iter().map(EventView::from).collect(),
            has_more,
        },
    ))
}

pub(crate) async fn checkpoints(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
    query: ListParams,
) -> Result<Response, ApiError> {
    let query = list_query(query)?;
    let limit = query.limit(10, 10_000)?;
    let now = Instant::now();
    let mut guard = state.storage();
    let Storage { files, jobs } = &mut *guard;
    let job = jobs.find(&id)?;
    job.advance(now, files);
    let (data, has_more) = reply::page(
        job.checkpoints.iter().rev(),
        query.after(),
        limit,
        |checkpoint| &checkpoint.id,
    );
    let data: Vec<CheckpointView<'_>> = data
        .into_iter()
        .map(|checkpoint| CheckpointView {
            object: "fine_tuning.job.checkpoint",
            id: &checkpoint.id,
            created_at: checkpoint.created_at,
            fine_tuned_model_checkpoint: &checkpoint.model,
            step_number: checkpoint.metrics.step,
            metrics: CheckpointMetrics {
                step: checkpoint.metrics.step,
                train_loss: checkpoint.metrics.train_loss,
                train_mean_token_accuracy: checkpoint.metrics.train_mean_token_accuracy,
                valid_loss: checkpoint.metrics.valid_loss,
                valid_mean_token_accuracy: checkpoint.metrics.valid_mean_token_accuracy,
                full_valid_loss: checkpoint.metrics.valid_loss,
                full_valid_mean_token_accuracy: checkpoint.metrics.valid_mean_token_accuracy,
            },
            fine_tuning_job_id: &job.id,
        })
        .collect();
    Ok(reply::json(
        StatusCode::OK,
        &CursorList {
            object: "list",
            first_id: data.first().map(|checkpoint| checkpoint.id),
            last_id: data.last().map(|checkpoint| checkpoint.id),
            data,
            has_more,
        },
    ))
}
