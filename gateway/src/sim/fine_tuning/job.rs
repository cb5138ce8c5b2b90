//! One fine-tuning job: its timed state machine, its events and checkpoints, and its JSON form.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rand::Rng;
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use super::metrics::{CheckpointMetrics, StepMetrics, result_csv};
use super::request::{Hyperparameters, JobRequest, Resolved};
use crate::sim::config::FineTuneTimings;
use crate::sim::error::ApiError;
use crate::sim::files::FileStore;
use crate::sim::jsonl::{self, DatasetStats, MIN_TRAINING_EXAMPLES};
use crate::sim::models::snapshot_of;
use crate::sim::reply;
use crate::sim::state::Flavor;

const ORGANIZATION: &str = "org-forge-sim";
/// The org slug inside fine-tuned model names: `ft:<base>:forge-sim:<suffix>:<id>`.
const ORG_SLUG: &str = "forge-sim";
const RESULT_FILENAME: &str = "step_metrics.csv";
/// OpenAI keeps the checkpoints of the last three epochs.
const KEPT_CHECKPOINT_EPOCHS: u64 = 3;
/// Metrics events are thinned so that a long job logs about this many.
const METRICS_EVENTS: u64 = 100;

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

/// What the files of a job hold, once they passed validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct TrainingPlan {
    dataset: DatasetStats,
    pub(super) has_validation: bool,
    pub(super) resolved: Resolved,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(super) struct JobFailure {
    code: &'static str,
    message: String,
    param: Option<&'static str>,
}

impl JobFailure {
    /// Azure fails a job whose file it has not finished processing.
    pub(super) fn file_pending(id: &str, param: &'static str) -> Self {
        let (code, file) = match param {
            "validation_file" => ("invalid_validation_file", "validation"),
            _ => ("invalid_training_file", "training"),
        };
        Self {
            code,
            message: format!(
                "The {file} file {id} is not ready: its status is 'pending'. Wait until the file \
                 is 'processed' before creating a fine-tuning job."
            ),
            param: Some(param),
        }
    }
}

impl JobFailure {
    /// Azure fails a job whose file is not UTF-8 with a byte order mark.
    pub(super) fn no_bom(id: &str, param: &'static str) -> Self {
        let code = match param {
            "validation_file" => "invalid_validation_file",
            _ => "invalid_training_file",
        };
        Self {
            code,
            message: format!("The file {id} must be UTF-8 encoded with a byte order mark (BOM)."),
            param: Some(param),
        }
    }
}

/// Validates the files now; the job reveals the outcome when `validating_files` ends.
pub(super) fn check_inputs(
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

pub(super) struct Checkpoint {
    pub(super) id: String,
    created_at: u64,
    model: String,
    metrics: StepMetrics,
}

pub(super) struct JobEvent {
    pub(super) id: String,
    created_at: u64,
    level: &'static str,
    message: String,
    metrics: Option<StepMetrics>,
}

pub(super) struct FineTuneJob {
    pub(super) id: String,
    flavor: Flavor,
    /// Fail half-way through `running`, as an injected training failure.
    fails_in_training: bool,
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
    pub(super) metadata: Option<Value>,
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
    pub(super) events: Vec<JobEvent>,
    pub(super) checkpoints: Vec<Checkpoint>,
    pub(super) finished_at: Option<u64>,
    pub(super) fine_tuned_model: Option<String>,
    result_files: Vec<String>,
    trained_tokens: Option<u64>,
    error: Option<JobFailure>,
}

impl FineTuneJob {
    pub(super) fn new(
        request: JobRequest,
        inputs: Result<TrainingPlan, JobFailure>,
        timings: FineTuneTimings,
        now: Instant,
        flavor: Flavor,
        fails_in_training: bool,
    ) -> Self {
        let (id, output_model) = match flavor {
            Flavor::OpenAi => {
                let id = reply::random_id("ftjob-", 24);
                // Continuing from a fine-tuned model names the result after the original base.
                let base = match request.model.strip_prefix("ft:") {
                    Some(rest) => rest.split(':').next().unwrap_or(rest),
                    None => snapshot_of(&request.model),
                };
                let short_id = id.get(6..14).unwrap_or(&id);
                let output_model = format!(
                    "ft:{base}:{ORG_SLUG}:{}:{short_id}",
                    request.suffix.as_deref().unwrap_or_default()
                );
                (id, output_model)
            }
            Flavor::Azure => {
                let base = request.model.split(".ft-").next().unwrap_or(&request.model);
                let output_model = reply::random_hex(&format!("{base}.ft-"), 32);
                (reply::random_hex("ftjob-", 32), output_model)
            }
        };
        // OpenAI names the snapshot it resolved the base to; Azure takes only dated names.
        let model = match flavor {
            Flavor::OpenAi => snapshot_of(&request.model).to_owned(),
            Flavor::Azure => request.model,
        };
        let born_wall = SystemTime::now();
        let mut job = Self {
            created_at: reply::unix_seconds(born_wall),
            born: now,
            born_wall,
            seed: request
                .seed
                .unwrap_or_else(|| rand::rng().random_range(0..=2_147_483_647)),
            model,
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
            flavor,
            fails_in_training,
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
        let id = match self.flavor {
            Flavor::OpenAi => reply::random_id("ft-event-", 24),
            Flavor::Azure => reply::random_hex("ftevent-", 32),
        };
        self.events.push(JobEvent {
            id,
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
    pub(super) fn advance(&mut self, now: Instant, files: &mut FileStore) {
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
                            let file = match failure.param {
                                Some("validation_file") => "validation",
                                _ => "training",
                            };
                            let event = format!(
                                "The job failed due to an invalid {file} file. {}",
                                failure.message
                            );
                            self.fail(end, failure, event);
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
                    if self.fails_in_training {
                        let fail_after = total / 2;
                        self.report_steps(ran.min(fail_after), &plan);
                        if ran >= fail_after {
                            let end =
                                self.phase_started + fail_after.saturating_sub(self.ran_before);
                            self.fail_training(end, &plan);
                        }
                        return;
                    }
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
                let id = match self.flavor {
                    Flavor::OpenAi => reply::random_id("ftckpt_", 24),
                    Flavor::Azure => reply::random_hex("ftchkpt-", 32),
                };
                self.checkpoints.push(Checkpoint {
                    id,
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
        let csv = result_csv(plan, self.flavor);
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

    /// The injected failure: training stops at the step it reached, with `training_failed`.
    fn fail_training(&mut self, at: Instant, plan: &TrainingPlan) {
        let total = plan.resolved.total_steps;
        let message = format!(
            "Training failed at step {}/{total}: the trainer stopped with an internal error. \
             Retry the job; if it keeps failing, contact support.",
            self.steps_done
        );
        let event = format!("The job failed during training. {message}");
        let failure = JobFailure {
            code: "training_failed",
            message,
            param: None,
        };
        self.fail(at, failure, event);
    }

    fn fail(&mut self, at: Instant, failure: JobFailure, event: String) {
        self.push_event(at, "error", event, None);
        self.error = Some(failure);
        self.finished_at = Some(self.unix_at(at));
        self.enter(Phase::Failed, at);
    }

    pub(super) fn cancel(&mut self, now: Instant) -> Result<(), ApiError> {
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

    pub(super) fn pause(&mut self, now: Instant) -> Result<(), ApiError> {
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

    pub(super) fn resume(&mut self, now: Instant) -> Result<(), ApiError> {
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

    pub(super) fn view(&self) -> JobView<'_> {
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

#[derive(Serialize)]
pub(super) struct JobView<'a> {
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
pub(super) struct EventView<'a> {
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
pub(super) struct CheckpointView<'a> {
    object: &'static str,
    id: &'a str,
    created_at: u64,
    fine_tuned_model_checkpoint: &'a str,
    step_number: u64,
    metrics: CheckpointMetrics,
    fine_tuning_job_id: &'a str,
}

impl Checkpoint {
    pub(super) fn view<'a>(&'a self, job_id: &'a str) -> CheckpointView<'a> {
        CheckpointView {
            object: "fine_tuning.job.checkpoint",
            id: &self.id,
            created_at: self.created_at,
            fine_tuned_model_checkpoint: &self.model,
            step_number: self.metrics.step,
            metrics: CheckpointMetrics::from(&self.metrics),
            fine_tuning_job_id: job_id,
        }
    }
}
