//! `DistillationService`: decides when a route is distilled and drives each job to its end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::evaluate::{
    ChatClient, ChatError, EvalMethod, exact_score, held_out, judge_messages, parse_score,
    question_of, similarity,
};
use super::job::{DistillationJob, JobStatus, ModelRecord, ModelStatus};
use super::undeploy::Undeploys;
use super::{
    BoxFuture, Deployed, Hyperparameters, Progress, ProviderError, ProviderState, TrainingProvider,
    TrainingRequest,
};
use crate::dataset::{self, DatasetSpec, EarlierBuild, Manifest};
use crate::grade::GoldenPolicy;
use crate::store::{Store, StoreError};
use crate::trace::{TraceId, now_ms};

/// Puts a trained model into a route's traffic (the gateway's routing control).
pub trait Deployer: Send + Sync + std::fmt::Debug {
    /// Adds `upstream/model` as a student of `alias` at `percent`, through the router's
    /// validated swap.
    fn add_student<'a>(
        &'a self,
        alias: &'a str,
        upstream: &'a str,
        model: &'a str,
        percent: f64,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// Whether a student of `alias` is in canary (above 0%, below 100%): its verdict is still
    /// out, so automatic triggers wait rather than replace it.
    fn canary_in_progress(&self, alias: &str) -> bool;

    /// The share `model` has in `alias` in the routing table now, if it is a student there.
    fn share(&self, alias: &str, model: &str) -> Option<forge_router::CanaryShare>;

    /// Takes `upstream/model` out of `alias` once it is idle, through the router's validated
    /// swap: at 0% there for at least `idle_for`, and in no other route. `Ok(true)` once it is
    /// in no route (so its deployment can go), `Ok(false)` while it is not idle (an operator
    /// took it back, say).
    fn remove_idle_student<'a>(
        &'a self,
        alias: &'a str,
        upstream: &'a str,
        model: &'a str,
        idle_for: Duration,
    ) -> BoxFuture<'a, Result<bool, String>>;
}

/// One route's distillation settings (`[[distill]]`).
#[derive(Debug, Clone)]
pub struct RouteDistill {
    /// The alias.
    pub route: String,
    /// The student base model.
    pub base_model: String,
    /// Where training runs.
    pub provider: Arc<dyn TrainingProvider>,
    /// New golden examples since the last cut that start a job.
    pub trigger_threshold: u64,
    /// Fewest examples a dataset needs.
    pub min_examples: u64,
    /// A cron schedule (with seconds) that starts a job, if set.
    pub schedule: Option<cron::Schedule>,
    /// A suffix for the model name.
    pub suffix: Option<String>,
    /// Hyperparameters.
    pub hyperparameters: Hyperparameters,
    /// The canary share a student that passes the gate starts at.
    pub initial_canary_percent: f64,
    /// The gate's minimum score (0 turns the gate off).
    pub eval_min_score: f64,
    /// How the gate scores answers.
    pub eval_method: EvalMethod,
    /// How many held-out prompts the gate replays.
    pub eval_max_prompts: usize,
    /// Golden rule, tenant, split and key cap for the dataset.
    pub dataset: DatasetSpec,
}

/// The judge used by the gate (and by the background grader).
#[derive(Debug, Clone)]
pub struct JudgeModel {
    /// The Forge upstream.
    pub upstream: String,
    /// The model.
    pub model: String,
}

/// Service-wide settings. Their `Debug` leaves out the admin token.
#[derive(Clone)]
pub struct DistillSettings {
    /// Where datasets are written (`<data_dir>/datasets/<job>/`).
    pub data_dir: PathBuf,
    /// How often thresholds and schedules are checked.
    pub check_every: Duration,
    /// The first wait between provider polls; it grows 1.5× while nothing changes…
    pub poll_initial: Duration,
    /// …up to this.
    pub poll_max: Duration,
    /// How old a trace must be before a dataset may read it, to give feedback time to come
    /// before the trace's first dataset. Feedback that comes after a cut has passed its trace
    /// still counts: the route's next dataset looks behind the cut for it.
    pub grading_window: Duration,
    /// How long a job may go from its creation to the end of its training run; past it, the run
    /// is cancelled at the provider and the job fails. A run that hangs at the provider would
    /// otherwise keep its route's next job waiting for good. `None`: no limit.
    pub max_training: Option<Duration>,
    /// How long a trained model that serves nothing (replaced, rolled back, or a candidate that
    /// did not join its route) stays deployed at 0%, in case an operator takes it back, before
    /// it leaves its route and its deployment is taken down ([`super::undeploy`]). `None`: never.
    pub undeploy_after: Option<Duration>,
    /// The base of Forge's dataset URL as remote trainers reach it (`http://admin/…`), and the
    /// admin token each job's dataset token is signed with ([`super::dataset_token`]).
    pub dataset_url: Option<(String, String)>,
    /// The judge, when configured.
    pub judge: Option<JudgeModel>,
}

impl std::fmt::Debug for DistillSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistillSettings")
            .field("data_dir", &self.data_dir)
            .field("check_every", &self.check_every)
            .field("poll_initial", &self.poll_initial)
            .field("poll_max", &self.poll_max)
            .field("grading_window", &self.grading_window)
            .field("max_training", &self.max_training)
            .field("undeploy_after", &self.undeploy_after)
            .field(
                "dataset_url",
                &self.dataset_url.as_ref().map(|(url, _token)| url),
            )
            .field("judge", &self.judge)
            .finish()
    }
}

/// Why a distillation request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DistillError {
    /// No `[[distill]]` block for the alias.
    #[error("route `{0}` is not configured for distillation")]
    NotConfigured(String),
    /// A job for the route is still running.
    #[error("route `{0}` already has an active job ({1})")]
    Busy(String, String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a job could not be cancelled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CancelError {
    /// No such job.
    #[error("no job `{0}`")]
    NotFound(String),
    /// The job is not training: collecting, trained already, or ended.
    #[error("job `{0}` is not training ({1}); only a run at the provider can be cancelled")]
    NotTraining(String, String),
    /// The provider answered that the run has ended, or is ending (a 400 or 409): nothing is
    /// recorded.
    #[error("the provider did not cancel the run: {0}")]
    Provider(ProviderError),
    /// The provider did not take the cancel: it refused (its key rotated, say) or could not be
    /// reached. The cancel is recorded: the job asks again at each poll, and fails, cancelled,
    /// at its first poll that fails.
    #[error(
        "the provider did not take the cancel ({0}); it is recorded: Forge asks again at each poll, and the job fails at its first poll that fails, though the run may still be running there"
    )]
    RecordedButNotTaken(ProviderError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The distillation loop for every configured route.
#[derive(Debug)]
pub struct DistillationService {
    pub(super) store: Store,
    pub(super) settings: DistillSettings,
    pub(super) routes: HashMap<String, RouteDistill>,
    pub(super) deployer: Arc<dyn Deployer>,
    chat: Arc<dyn ChatClient>,
    /// Routes with an active job (at most one each), and how many jobs of each have ended.
    active: Mutex<ActiveRoutes>,
    queue: mpsc::UnboundedSender<DistillationJob>,
    queued: Mutex<Option<mpsc::UnboundedReceiver<DistillationJob>>>,
    /// Where taking down idle students stands ([`super::undeploy`]).
    pub(super) undeploys: Mutex<Undeploys>,
    /// Held while a share change is recorded: see [`DistillationService::record_shares`].
    recording: Mutex<()>,
}

impl DistillationService {
    /// A service over `routes`. Call [`DistillationService::run`] to start it.
    pub fn new(
        store: Store,
        settings: DistillSettings,
        routes: Vec<RouteDistill>,
        deployer: Arc<dyn Deployer>,
        chat: Arc<dyn ChatClient>,
    ) -> Arc<Self> {
        let (queue, queued) = mpsc::unbounded_channel();
        let routes: HashMap<String, RouteDistill> =
            routes.into_iter().map(|r| (r.route.clone(), r)).collect();
        // A route whose job a restart interrupted is held from the start, not from when `run`
        // resumes the job: a trigger that came first would start a second job beside it.
        let active = match store.jobs::<DistillationJob>() {
            Ok(jobs) => jobs
                .into_iter()
                .filter(|j| j.status.is_active() && routes.contains_key(&j.route))
                .map(|j| j.route)
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the jobs a restart interrupted; a trigger before they resume could start a second job on their route");
                HashSet::new()
            }
        };
        Arc::new(Self {
            store,
            settings,
            routes,
            deployer,
            chat,
            active: Mutex::new(ActiveRoutes {
                routes: active,
                ended: HashMap::new(),
            }),
            queue,
            queued: Mutex::new(Some(queued)),
            undeploys: Mutex::default(),
            recording: Mutex::new(()),
        })
    }

    /// The routes configured for distillation.
    pub fn routes(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// Every job, newest first.
    pub fn jobs(&self) -> Result<Vec<DistillationJob>, StoreError> {
        let mut jobs: Vec<DistillationJob> = self.store.jobs()?;
        jobs.reverse();
        Ok(jobs)
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<DistillationJob>, StoreError> {
        self.store.job(id)
    }

    /// Asks the provider to stop job `id`'s training run, and returns the job as it stands. The
    /// job's next poll reads the run cancelled and ends the job FAILED; its examples are not cut,
    /// so the next job of the route trains on them.
    pub async fn cancel(&self, id: &str) -> Result<DistillationJob, CancelError> {
        // One small read; the job loop reads and writes its jobs the same way.
        let job: DistillationJob = self
            .store
            .job(id)?
            .ok_or_else(|| CancelError::NotFound(id.to_string()))?;
        let not_training = |why: &str| CancelError::NotTraining(id.to_string(), why.to_string());
        let (JobStatus::Training, None) = (job.status, &job.trained_model) else {
            return Err(not_training(match job.status {
                JobStatus::Collecting => "still collecting its dataset",
                JobStatus::Training => "trained already, being deployed or evaluated",
                JobStatus::Completed => "completed",
                JobStatus::Failed => "failed",
            }));
        };
        let (Some(route), Some(run)) = (self.routes.get(&job.route), &job.provider_job_id) else {
            return Err(not_training("not submitted to the provider yet"));
        };
        let not_taken = match route.provider.cancel(run).await {
            Ok(()) => None,
            // The run has ended, or the provider may take the cancel later: nothing to record.
            Err(
                e @ (ProviderError::Ended(_)
                | ProviderError::Http {
                    status: 400 | 409, ..
                }),
            ) => return Err(CancelError::Provider(e)),
            // Refused (a key rotated, a 403) or unreachable (an outage): the operator's wish is
            // recorded all the same. The job's loop asks again while the run goes on, and ends
            // the job at its first failed poll: otherwise a job whose polls fail alike would wait
            // for its deadline (for ever, without one), holding its route.
            Err(e) => Some(e),
        };
        // Kept apart from the job, which its own loop writes: however the job then ends (a
        // Kubernetes Job deleted before a restart reads as gone, not cancelled), it ends
        // cancelled, and holds the route's automatic triggers. Whether the provider took it is
        // kept too: only one it did not take is asked again.
        let recorded = self.store.put_meta(&cancel_key(id), &true).and_then(|()| {
            self.store
                .put_meta(&cancel_pending_key(id), &not_taken.is_some())
        });
        if let Err(e) = recorded {
            tracing::error!(job = %id, error = %e, "the cancel could not be recorded; the route's triggers may start a job again soon");
        }
        match not_taken {
            None => {
                tracing::info!(job = %id, provider_job = %run, "training run cancelled at the provider");
                Ok(job)
            }
            Some(e) => {
                tracing::warn!(job = %id, provider_job = %run, error = %e, "the provider did not take the cancel; it is recorded, asked again at each poll, and the job ends at its first failed poll");
                Err(CancelError::RecordedButNotTaken(e))
            }
        }
    }

    /// Every registered model, newest first.
    pub fn models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let mut models: Vec<ModelRecord> = self.store.models()?;
        models.sort_by_key(|m| std::cmp::Reverse(m.created_ms));
        Ok(models)
    }

    /// What makes a trace of `alias` golden: its route's policy, or the default one.
    pub fn golden_policy(&self, alias: &str) -> crate::grade::GoldenPolicy {
        self.routes
            .get(alias)
            .map_or_else(Default::default, |r| r.dataset.policy)
    }

    /// Updates a registered model's status (the guard's and the operator's decisions).
    pub fn set_model_status(
        &self,
        model: &str,
        status: ModelStatus,
        reason: &str,
    ) -> Result<(), StoreError> {
        // Read first: a change that leaves the status as it was (a canary stepped from 5% to
        // 10%) commits nothing.
        let current = self.store.model::<ModelRecord>(model)?;
        if current.is_none_or(|record| record.status == status) {
            return Ok(());
        }
        self.store.update_model(model, |record: &mut ModelRecord| {
            if record.status != status {
                record.status = status;
                record.reason = Some(reason.to_string());
                record.status_ms = Some(now_ms());
            }
        })?;
        Ok(())
    }

    /// Records in the registry what a change of shares (a guard decision, or an operator's
    /// canary, promote or rollback) left each of `shares`' models in `alias` at: all of the
    /// route's traffic is promoted, a share below that is canary, and 0 is rolled back for a
    /// model that was serving (a candidate or a retired model at 0 stays what it is). Every
    /// model is tried; a failed write is logged, as the route has changed anyway.
    ///
    /// Two changes close together (an operator's and the guard's) record in either order, so
    /// a model whose share in the live table is no longer the one given is left to the newer
    /// change's record; the check and the write happen under one lock.
    pub async fn record_shares(
        self: &Arc<Self>,
        alias: &str,
        shares: Vec<(String, forge_router::CanaryShare)>,
        reason: String,
    ) {
        let (this, alias) = (Arc::clone(self), alias.to_string());
        // Off the runtime: each write waits for its commit's fsyncs.
        let written = tokio::task::spawn_blocking(move || {
            let _recording = this
                .recording
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (model, share) in shares {
                if this.deployer.share(&alias, &model) != Some(share) {
                    continue;
                }
                if let Err(e) = this.record_share(&model, share, &reason) {
                    tracing::error!(%model, error = %e, %reason, "registry not updated");
                }
            }
        })
        .await;
        if let Err(e) = written {
            tracing::error!(error = %e, "registry update task failed");
        }
    }

    fn record_share(
        &self,
        model: &str,
        share: forge_router::CanaryShare,
        reason: &str,
    ) -> Result<(), StoreError> {
        use forge_router::CanaryShare;
        let Some(record) = self.store.model::<ModelRecord>(model)? else {
            return Ok(());
        };
        let status = match share {
            CanaryShare::FULL => ModelStatus::Promoted,
            CanaryShare::ZERO
                if matches!(record.status, ModelStatus::Canary | ModelStatus::Promoted) =>
            {
                ModelStatus::RolledBack
            }
            CanaryShare::ZERO => return Ok(()),
            _ => ModelStatus::Canary,
        };
        self.set_model_status(model, status, reason)
    }

    /// The training file of a job's dataset.
    pub fn dataset_file(&self, job_id: &str) -> PathBuf {
        self.settings
            .data_dir
            .join("datasets")
            .join(job_id)
            .join("train.jsonl")
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, ActiveRoutes> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a cycle for `alias` now. The job is recorded (COLLECTING) before this returns;
    /// it then runs in the background.
    pub fn trigger(&self, alias: &str, trigger: &str) -> Result<DistillationJob, DistillError> {
        let route = self
            .routes
            .get(alias)
            .ok_or_else(|| DistillError::NotConfigured(alias.to_string()))?;
        if !self.lock_active().routes.insert(alias.to_string()) {
            let running = self
                .jobs()?
                .into_iter()
                .find(|j| j.route == alias && j.status.is_active())
                .map_or_else(|| "starting".to_string(), |j| j.id);
            return Err(DistillError::Busy(alias.to_string(), running));
        }
        self.start_claimed(alias, route, trigger)
    }

    /// Records and queues a job for `alias`, which the caller has claimed in `active`; the
    /// claim is let go if the job cannot be recorded.
    fn start_claimed(
        &self,
        alias: &str,
        route: &RouteDistill,
        trigger: &str,
    ) -> Result<DistillationJob, DistillError> {
        let now = now_ms();
        let job = DistillationJob {
            id: format!("dj_{}", TraceId::generate()),
            route: alias.to_string(),
            trigger: trigger.to_string(),
            status: JobStatus::Collecting,
            provider: route.provider.name().to_string(),
            base_model: route.base_model.clone(),
            provider_job_id: None,
            provider_status: None,
            dataset_size: 0,
            dataset: None,
            cut: None,
            feedback_mark: None,
            late_stop: None,
            trained_model: None,
            resulting_model_id: None,
            eval_metrics: BTreeMap::new(),
            error: None,
            cancelled: false,
            created_ms: now,
            updated_ms: now,
            finished_ms: None,
        };
        if let Err(e) = self.store.put_job(&job.id, &job) {
            self.lock_active().routes.remove(alias);
            return Err(e.into());
        }
        tracing::info!(job = %job.id, route = alias, trigger, "distillation job created");
        let _ = self.queue.send(job.clone());
        Ok(job)
    }

    /// The route's useful jobs that read traces, oldest first, with their cuts and feedback
    /// marks: the next dataset starts after the last cut, and looks behind it for traces that
    /// feedback after the last mark made golden and no earlier dataset took. A job that failed
    /// before its training succeeded read nothing for good; one that failed after it did.
    fn earlier_builds(&self, alias: &str) -> Result<Vec<EarlierBuild>, StoreError> {
        let jobs: Vec<DistillationJob> = self.store.jobs()?;
        Ok(jobs
            .into_iter()
            .filter(|j| {
                j.route == alias && (j.status != JobStatus::Failed || j.trained_model.is_some())
            })
            .filter_map(|j| {
                Some(EarlierBuild {
                    cut: j.cut?,
                    // A job from before marks were kept: its creation, which came before its
                    // build, so feedback it may have seen counts as later (read twice at
                    // worst, never lost).
                    feedback_mark: j
                        .feedback_mark
                        .unwrap_or_else(|| TraceId::earliest_at(j.created_ms)),
                    late_stop: j.late_stop,
                })
            })
            .collect())
    }

    /// With a judge grading in the background, how far datasets may read: up to the last trace
    /// it has looked at (before its first look, nothing). A cut past that point would leave the
    /// traces it scores later behind every future cut.
    fn judged_until(&self) -> Result<Option<TraceId>, StoreError> {
        if self.settings.judge.is_none() {
            return Ok(None);
        }
        // Trace ids are ULIDs, never 0: a bound of 0 reads nothing.
        Ok(Some(
            super::judge::judged_until(&self.store)?.unwrap_or(TraceId::from_u128(0)),
        ))
    }

    /// The route's next dataset: from its last cut to as far as the judge has got, and no
    /// nearer to now than the grading window.
    fn next_dataset(&self, route: &RouteDistill) -> Result<DatasetSpec, StoreError> {
        let mut spec = route.dataset.clone();
        spec.earlier = self.earlier_builds(&route.route)?;
        spec.after = spec.earlier.last().map(|b| b.cut);
        spec.max_file_bytes = route.provider.max_file_bytes();
        let window = self.settings.grading_window;
        let graded_by = (!window.is_zero()).then(|| {
            let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
            TraceId::earliest_at(crate::trace::now_ms().saturating_sub(window_ms))
        });
        spec.until = match (self.judged_until()?, graded_by) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(spec)
    }

    /// The lines the route's next dataset would hold now: its golden examples since the last
    /// cut, less those the rules, duplicates or the per-key cap would leave out. Counting the
    /// same way the dataset is built means a trigger does not start a job that then fails for
    /// too few examples, again at every check. (The validation split is not counted: a job at
    /// `min_examples` may still fail for too few training lines after it, and back off.)
    pub fn golden_since_cut(&self, alias: &str) -> Result<u64, StoreError> {
        let Some(route) = self.routes.get(alias) else {
            return Ok(0);
        };
        dataset::lines_ready(&self.store, &self.next_dataset(route)?)
    }

    /// Runs until `stop`: resumes interrupted jobs, checks thresholds and schedules, and runs
    /// each job to its end. Jobs are tracked, so shutdown aborts them cleanly; a job in
    /// TRAINING resumes at the next start (polling, or from its model once trained).
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(mut queued) = self
            .queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let mut running = JoinSet::new();
        self.resume(&mut running);
        // Its own task: a slow provider there must not hold up jobs and triggers.
        let undeploys = tokio::spawn(Arc::clone(&self).undeploy_loop(stop.clone()));
        let mut ticks = tokio::time::interval(self.settings.check_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_check = chrono::Utc::now();
        // Kept in the store, so that a restart during a back-off does not lose them.
        let mut deferred: HashSet<String> = match self.store.meta(DEFERRED_SCHEDULES) {
            Ok(set) => set.unwrap_or_default(),
            Err(e) => {
                tracing::error!(error = %e, "deferred schedules not read; they fire at their next time");
                HashSet::new()
            }
        };
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                Some(job) = queued.recv() => {
                    let this = Arc::clone(&self);
                    running.spawn(async move { this.execute(job).await });
                }
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = ticks.tick() => {
                    let now = chrono::Utc::now();
                    // Counting a route's lines reads every trace since its last cut, which on a
                    // large store takes seconds: a stop does not wait for it.
                    tokio::select! {
                        () = self.check_triggers(last_check, now, &mut deferred) => {}
                        _ = stop.changed() => break,
                    }
                    last_check = now;
                }
            }
        }
        running.shutdown().await;
        // It ends at its next step once stopped; a store write under way finishes first, so
        // that no store handle outlives the service.
        let _ = undeploys.await;
    }

    fn resume(self: &Arc<Self>, running: &mut JoinSet<()>) {
        let jobs: Vec<DistillationJob> = match self.store.jobs() {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::error!(error = %e, "cannot read jobs to resume");
                return;
            }
        };
        for mut job in jobs.into_iter().filter(|j| j.status.is_active()) {
            if !self.routes.contains_key(&job.route) {
                continue;
            }
            let manifest = job
                .dataset
                .clone()
                .and_then(|m| serde_json::from_value::<Manifest>(m).ok());
            let finds_earlier = self
                .routes
                .get(&job.route)
                .is_some_and(|r| r.provider.finds_earlier_submissions());
            match (&job.status, &job.provider_job_id, manifest) {
                (JobStatus::Training, Some(_), _) => {
                    tracing::info!(job = %job.id, "resuming a training job after restart");
                    self.lock_active().routes.insert(job.route.clone());
                    let this = Arc::clone(self);
                    running.spawn(async move { this.finish_training(job).await });
                }
                // Interrupted while submitting: the run may exist with its id unrecorded. A
                // provider that finds it is asked again and answers with it (or starts it).
                (JobStatus::Training, None, Some(manifest)) if finds_earlier => {
                    self.lock_active().routes.insert(job.route.clone());
                    let this = Arc::clone(self);
                    running.spawn(async move { this.resubmit(job, manifest).await });
                }
                _ => {
                    // Nothing to resume, and resubmitting blindly could start a second paid run.
                    self.fail(
                        &mut job,
                        "interrupted by a restart before the provider accepted it".into(),
                    );
                }
            }
        }
    }

    /// Starts the jobs that thresholds and schedules call for. A schedule that comes due while
    /// its route backs off after failed jobs is kept in `deferred`, and fires once the wait ends.
    async fn check_triggers(
        self: &Arc<Self>,
        since: chrono::DateTime<chrono::Utc>,
        now: chrono::DateTime<chrono::Utc>,
        deferred: &mut HashSet<String>,
    ) {
        let before = deferred.clone();
        self.check_routes(since, now, deferred).await;
        if *deferred != before {
            let (this, set) = (Arc::clone(self), deferred.clone());
            let stored =
                tokio::task::spawn_blocking(move || this.store.put_meta(DEFERRED_SCHEDULES, &set))
                    .await;
            if !matches!(stored, Ok(Ok(()))) {
                tracing::error!("deferred schedules not stored; a restart would drop them");
            }
        }
    }

    async fn check_routes(
        self: &Arc<Self>,
        since: chrono::DateTime<chrono::Utc>,
        now: chrono::DateTime<chrono::Utc>,
        deferred: &mut HashSet<String>,
    ) {
        // Counted before the jobs are read: a job that ends after this (saved, then its route
        // let go) may look still running in the read, which then cannot tell whether its end
        // (a cancel, a failure) holds the route. No job is started on such a read.
        let ended = self.lock_active().ended.clone();
        let this = Arc::clone(self);
        let jobs = match tokio::task::spawn_blocking(move || this.jobs()).await {
            Ok(Ok(jobs)) => jobs,
            Ok(Err(e)) => {
                return tracing::error!(error = %e, "cannot read the jobs; no distillation started this round");
            }
            Err(e) => return tracing::error!(error = %e, "jobs read task failed"),
        };
        for (alias, route) in &self.routes {
            if self.lock_active().routes.contains(alias) || self.deployer.canary_in_progress(alias)
            {
                // A schedule stands for one job at a time: the one running, or the canary's.
                deferred.remove(alias);
                continue;
            }
            let due = route
                .schedule
                .as_ref()
                .is_some_and(|s| s.after(&since).next().is_some_and(|t| t <= now));
            let newest = jobs.iter().filter(|j| &j.route == alias);
            if let Some((until_ms, failures)) = failure_backoff(newest, self.settings.check_every)
                && now_ms() < until_ms
            {
                if due {
                    deferred.insert(alias.clone());
                }
                tracing::debug!(route = %alias, failures, wait_ms = until_ms - now_ms(), deferred = deferred.contains(alias), "distillation backing off after failed jobs");
                continue;
            }
            let due = deferred.remove(alias) || due;
            let (this, name) = (Arc::clone(self), alias.clone());
            let golden =
                match tokio::task::spawn_blocking(move || this.golden_since_cut(&name)).await {
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, route = %alias, "cannot count golden traces");
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, route = %alias, "golden count task failed");
                        continue;
                    }
                };
            // The threshold starts a job; the schedule does too, but only with enough data for
            // one, so a quiet route does not fail a job every night. Neither starts one below
            // `min_examples`: that job would fail, leave the cut where it was, and be started
            // again at the next check, and the next.
            let trigger = if golden >= route.trigger_threshold.max(route.min_examples) {
                Some("threshold")
            } else if due && golden >= route.min_examples {
                Some("schedule")
            } else {
                if due {
                    tracing::info!(route = %alias, golden, min_examples = route.min_examples, "scheduled distillation skipped: not enough golden traces");
                }
                None
            };
            let Some(trigger) = trigger else { continue };
            if !self.lock_active().claim_unchanged(alias, &ended) {
                // A job of the route ended or started since the read: the next check decides on
                // a fresh one, and a schedule that came due waits for it.
                if due {
                    deferred.insert(alias.clone());
                }
                continue;
            }
            if let Err(e) = self.start_claimed(alias, route, trigger) {
                tracing::warn!(error = %e, route = %alias, "distillation not started");
            }
        }
    }

    fn save(&self, job: &mut DistillationJob) -> bool {
        job.updated_ms = now_ms();
        match self.store.put_job(&job.id, job) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "job state could not be stored");
                false
            }
        }
    }

    /// Whether an operator cancelled job `id` (`POST /admin/jobs/{id}/cancel`), whether or not
    /// the provider took the cancel.
    fn cancel_recorded(&self, id: &str) -> bool {
        matches!(self.store.meta::<bool>(&cancel_key(id)), Ok(Some(true)))
    }

    /// Whether an operator's cancel of job `id` is recorded and the provider may not have taken
    /// it. Only a cancel known to be taken is not: one recorded by a build before this mark, or
    /// whose mark a crash or a store error lost, is asked again while the run goes on.
    fn cancel_pending(&self, id: &str) -> bool {
        self.cancel_recorded(id)
            && !matches!(
                self.store.meta::<bool>(&cancel_pending_key(id)),
                Ok(Some(false))
            )
    }

    /// Marks an operator's cancel of job `id` as taken by the provider: not asked again.
    fn cancel_taken(&self, id: &str) {
        if let Err(e) = self.store.put_meta(&cancel_pending_key(id), &false) {
            tracing::warn!(job = %id, error = %e, "the cancel's being taken could not be recorded; it may be asked again");
        }
    }

    fn fail(&self, job: &mut DistillationJob, error: String) {
        tracing::warn!(job = %job.id, route = %job.route, error = %error, "distillation job failed");
        job.cancelled |= self.cancel_recorded(&job.id);
        job.status = JobStatus::Failed;
        job.error = Some(error);
        job.finished_ms = Some(now_ms());
        self.save(job);
        self.lock_active().release(&job.route);
    }

    /// COLLECTING → TRAINING → …: builds the dataset, submits it, then follows the run.
    async fn execute(self: Arc<Self>, mut job: DistillationJob) {
        let Some(route) = self.routes.get(&job.route).cloned() else {
            return self.fail(&mut job, "route no longer configured".into());
        };
        let manifest = match self.collect(&route, &job).await {
            Ok(m) => m,
            Err(e) => return self.fail(&mut job, format!("dataset: {e}")),
        };
        job.dataset_size = manifest.examples();
        job.cut = manifest.cut;
        job.feedback_mark = manifest.feedback_mark;
        job.late_stop = manifest.late_stop;
        job.dataset = serde_json::to_value(&manifest).ok();
        if manifest.full {
            tracing::info!(job = %job.id, examples = manifest.examples(), "the dataset reached the provider's file size limit; the traces after its cut wait for the route's next job");
        }
        if manifest.examples() < route.min_examples {
            return self.fail(
                &mut job,
                format!(
                    "only {} training examples; min_examples is {}",
                    manifest.examples(),
                    route.min_examples
                ),
            );
        }
        // The validation split leaves the training file shorter; fine-tuning refuses one with
        // fewer than this many lines, after the upload.
        if manifest.train.lines < MIN_TRAINING_LINES {
            return self.fail(
                &mut job,
                format!(
                    "only {} lines in the training file after the validation split; fine-tuning needs at least {MIN_TRAINING_LINES}",
                    manifest.train.lines
                ),
            );
        }
        // The gate scores the student only on held-out lines: with none, a paid run would end in
        // a model it cannot judge. The cut stays, so the next job, with more examples, splits
        // them anew.
        if route.eval_min_score > 0.0 && manifest.validation.lines == 0 {
            return self.fail(
                &mut job,
                format!(
                    "the dataset held none of its {} examples out for the evaluation gate (validation_percent {}); the next job, with more examples, tries again",
                    manifest.examples(),
                    route.dataset.validation_percent
                ),
            );
        }
        // Recorded before the provider hears of it: a crash from here on is visible at restart.
        job.status = JobStatus::Training;
        if !self.save(&mut job) {
            return self.fail(&mut job, "job state could not be stored".into());
        }
        self.submit_and_follow(job, manifest).await;
    }

    /// TRAINING: hands the dataset to the provider, records the run's id, and follows it.
    async fn submit_and_follow(self: Arc<Self>, mut job: DistillationJob, manifest: Manifest) {
        let Some(route) = self.routes.get(&job.route).cloned() else {
            return self.fail(&mut job, "route no longer configured".into());
        };
        let request = TrainingRequest {
            job_id: job.id.clone(),
            train_file: manifest.train.path.clone(),
            validation_file: (manifest.validation.lines > 0)
                .then(|| manifest.validation.path.clone()),
            base_model: route.base_model.clone(),
            suffix: route.suffix.clone(),
            hyperparameters: route.hyperparameters.clone(),
            // The trainer gets a token for this dataset only, never the admin token.
            dataset_url: self
                .settings
                .dataset_url
                .as_ref()
                .map(|(base, admin_token)| {
                    (
                        format!(
                            "{}/admin/datasets/{}.jsonl",
                            base.trim_end_matches('/'),
                            job.id
                        ),
                        super::dataset_token(admin_token, &job.id),
                    )
                }),
        };
        let submitted = match retrying(
            || route.provider.submit(&request),
            self.settings.poll_initial,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                // What was uploaded goes, as it holds every client's traces; the provider keeps
                // the files a create whose answer was lost may have made a run from.
                let discarded = retrying(
                    || route.provider.discard_uploads(&job.id),
                    self.settings.poll_initial,
                )
                .await;
                if let Err(e) = discarded {
                    tracing::warn!(job = %job.id, error = %e, "the failed submission's uploads could not be deleted; they stay at the provider");
                }
                return self.fail(&mut job, format!("submit: {e}"));
            }
        };
        tracing::info!(job = %job.id, provider_job = %submitted.provider_job_id, examples = job.dataset_size, "training submitted");
        job.provider_job_id = Some(submitted.provider_job_id);
        // The run is real and paid for: follow it even if its id could not be recorded (then a
        // restart submits again, and a provider that finds earlier submissions finds it).
        self.save(&mut job);
        self.finish_training(job).await;
    }

    /// TRAINING, for a job a restart interrupted while it was submitted: submits it again (the
    /// provider finds the run the first submission started, or starts it). Past the training
    /// deadline, though, a new run would only be cancelled at its first poll, after the provider
    /// had started billing for it: then only a run that exists already is followed (to its
    /// cancellation, or kept if it has succeeded), and none is started.
    async fn resubmit(self: Arc<Self>, mut job: DistillationJob, manifest: Manifest) {
        if self.training_deadline(&job).is_none_or(|at| now_ms() < at) {
            tracing::info!(job = %job.id, "submitting again a job a restart interrupted while it was submitted");
            return self.submit_and_follow(job, manifest).await;
        }
        let Some(route) = self.routes.get(&job.route).cloned() else {
            return self.fail(&mut job, "route no longer configured".into());
        };
        let limit = self.settings.max_training.unwrap_or_default().as_secs_f64();
        let late = format!(
            "a restart interrupted the submission, and distiller.max_training_secs ({limit} s) had passed when Forge was back"
        );
        match retrying(
            || route.provider.earlier_submission(&job.id),
            self.settings.poll_initial,
        )
        .await
        {
            Ok(Some(run)) => {
                tracing::info!(job = %job.id, provider_job = %run, "found the run of a job that a restart interrupted while it was submitted");
                job.provider_job_id = Some(run);
                self.save(&mut job);
                self.finish_training(job).await;
            }
            Ok(None) => self.fail(
                &mut job,
                format!("{late}; the provider has no run of this job, and none was started"),
            ),
            Err(e) => self.fail(
                &mut job,
                format!(
                    "{late}; looking for a run the submission may have started failed ({e}): one may be running at the provider"
                ),
            ),
        }
    }

    /// When job's training must have ended, in Unix milliseconds: counted from the job's
    /// creation, which is stored, so a restart keeps the same deadline.
    fn training_deadline(&self, job: &DistillationJob) -> Option<u64> {
        self.settings
            .max_training
            .map(|max| job.created_ms.saturating_add(max.as_millis() as u64))
    }

    /// TRAINING → FAILED once the deadline has passed: cancels the run at the provider and fails
    /// the job. Its examples are not cut, so the route's next job trains on them. A cancel the
    /// provider refuses may mean the run has just succeeded: then one more poll says so, and the
    /// trained model is kept. A cancel that fails otherwise (an outage, a rotated key) leaves
    /// the job following its run, to cancel it at the next try: failed now, with the run going
    /// on and billed, its examples would be trained again by the next job, and the model the
    /// run might still make would be lost. An operator's cancel of the job ends that wait.
    async fn give_up_training(
        &self,
        job: &mut DistillationJob,
        route: &RouteDistill,
        provider_job: &str,
    ) -> AtDeadline {
        let limit = self.settings.max_training.unwrap_or_default().as_secs_f64();
        let cancelled = retrying(
            || route.provider.cancel(provider_job),
            self.settings.poll_initial,
        )
        .await;
        let run = match cancelled {
            Ok(()) => {
                self.release(route, job, provider_job);
                "the run was cancelled at the provider".to_string()
            }
            Err(e) => {
                if let Ok(Progress {
                    state: ProviderState::Succeeded { model },
                    ..
                }) = route.provider.poll(provider_job).await
                {
                    tracing::info!(job = %job.id, provider_job, "the run succeeded as its deadline passed; it is kept");
                    return AtDeadline::Trained(model);
                }
                let operator_cancelled = self.cancel_recorded(&job.id);
                if let ProviderError::Ended(why) = &e {
                    tracing::warn!(job = %job.id, provider_job, "training deadline passed as the run ended without a model: {why}");
                    format!("the run had ended at the provider ({why})")
                } else if operator_cancelled {
                    tracing::error!(job = %job.id, provider_job, error = %e, "training deadline passed, the job was cancelled, and the provider refuses the cancel: the run may still be running, and billed, at the provider");
                    format!(
                        "cancelling the run at the provider failed ({e}): it may still be running there"
                    )
                } else {
                    tracing::error!(job = %job.id, provider_job, error = %e, "training deadline passed, and the run could not be cancelled; trying again at the next poll (or cancel the job)");
                    return AtDeadline::StillRunning;
                }
            }
        };
        self.fail(
            job,
            format!(
                "training took longer than distiller.max_training_secs ({limit} s) allows; {run}"
            ),
        );
        AtDeadline::Failed
    }

    async fn collect(
        &self,
        route: &RouteDistill,
        job: &DistillationJob,
    ) -> Result<Manifest, String> {
        let spec = self.next_dataset(route).map_err(|e| e.to_string())?;
        let (store, dir, id) = (
            self.store.clone(),
            self.settings.data_dir.join("datasets"),
            job.id.clone(),
        );
        tokio::task::spawn_blocking(move || {
            dataset::build(
                &store,
                &spec,
                &dir,
                &id,
                |n| tracing::info!(job = %id, traces_read = n, "building dataset"),
            )
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// TRAINING → COMPLETED | FAILED: polls the provider, then deploys, gates and routes.
    async fn finish_training(self: Arc<Self>, mut job: DistillationJob) {
        let Some(route) = self.routes.get(&job.route).cloned() else {
            return;
        };
        let Some(provider_job) = job.provider_job_id.clone() else {
            return self.fail(&mut job, "no provider job id".into());
        };
        // Trained before a restart that came during the deploy or the evaluation: the run is
        // done, and may be gone at the provider (a Kubernetes Job is deleted some time after it
        // ends), so the job goes on from its model instead of polling for it.
        if let Some(trained) = job.trained_model.clone() {
            tracing::info!(job = %job.id, model = %trained, "resuming after training: the model is already trained");
            // The restart may have come before the uploads were deleted.
            self.release(&route, &job, &provider_job);
            return self.after_training(job, route, trained).await;
        }
        let mut wait = self.settings.poll_initial;
        let deadline = self.training_deadline(&job);
        let trained = loop {
            tokio::time::sleep(poll_pause(wait, deadline, now_ms())).await;
            match route.provider.poll(&provider_job).await {
                Ok(progress) => {
                    let changed =
                        job.provider_status.as_deref() != Some(progress.provider_status.as_str());
                    job.eval_metrics.extend(progress.metrics);
                    if changed {
                        tracing::info!(job = %job.id, status = %progress.provider_status, "provider status");
                        job.provider_status = Some(progress.provider_status);
                        self.save(&mut job);
                        wait = self.settings.poll_initial;
                    } else {
                        wait = wait.mul_f64(1.5).min(self.settings.poll_max);
                    }
                    match progress.state {
                        ProviderState::Succeeded { model } => break model,
                        ProviderState::Failed { error } => {
                            self.release(&route, &job, &provider_job);
                            return self.fail(&mut job, format!("training failed: {error}"));
                        }
                        ProviderState::Cancelled => {
                            self.release(&route, &job, &provider_job);
                            job.cancelled = true;
                            return self.fail(
                                &mut job,
                                "training cancelled (through the admin API, or at the provider)"
                                    .into(),
                            );
                        }
                        ProviderState::Queued | ProviderState::Running => {
                            // An operator's cancel that the provider did not take (refused, or
                            // unreachable then) is asked again while the run goes on.
                            if self.cancel_pending(&job.id) {
                                self.cancel_again(&job, &route, &provider_job).await;
                            }
                        }
                    }
                }
                // A rate limit says nothing of the run: waited out, whatever else holds.
                Err(ProviderError::RateLimited(after)) => {
                    wait = after.max(self.settings.poll_initial)
                }
                // A run that is gone (a Kubernetes Job deleted), or one an operator cancelled:
                // there is nothing left to follow. After a cancel, any other failed poll ends
                // the job (a refusal, an outage), or an outage would hold the route against the
                // operator until the deadline, or for ever without one.
                Err(e) if matches!(e, ProviderError::Ended(_)) || self.cancel_recorded(&job.id) => {
                    self.release(&route, &job, &provider_job);
                    return self.fail(&mut job, format!("poll: {e}"));
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(job = %job.id, error = %e, "poll failed; retrying");
                    wait = wait.mul_f64(2.0).min(self.settings.poll_max);
                }
                // Any other refused poll (a key rotated at the provider, a token file being
                // renewed, a 404 from an account that is not the run's) says nothing of the run,
                // which goes on and is billed. Failing the job would abandon it, and its
                // examples would be paid for again by the next job. So the poll is tried again,
                // slowly, until the training deadline cancels the run; an operator can cancel
                // the job before then.
                Err(e) => {
                    tracing::error!(job = %job.id, error = %e, "poll refused; trying again until the training deadline (or cancel the job)");
                    wait = self.settings.poll_max;
                }
            }
            // After the poll, so that a run that has just succeeded (say, while Forge was down)
            // is kept, not cancelled.
            if deadline.is_some_and(|at| now_ms() >= at) {
                match self.give_up_training(&mut job, &route, &provider_job).await {
                    AtDeadline::Trained(model) => break model,
                    AtDeadline::Failed => return,
                    AtDeadline::StillRunning => wait = self.settings.poll_max,
                }
            }
        };
        // From here on the run is paid for: whatever fails next, its examples are not trained on
        // again (see `last_cut`), and the model's name stays on the job for a manual deployment.
        job.trained_model = Some(trained.clone());
        // The run succeeded before an operator's cancel could stop it: paid for, so its
        // examples stay cut and the model's name stays on the job, but it is not deployed
        // against the operator's wish. The model and the failure are saved together: a job
        // saved with its model alone would be resumed, after a restart, from the deploy on.
        if self.cancel_recorded(&job.id) {
            self.fail(
                &mut job,
                format!("cancelled by an operator, but the run had succeeded: its model {trained} is recorded as trained_model and not deployed"),
            );
            return self.release(&route, &job, &provider_job);
        }
        self.save(&mut job);
        self.release(&route, &job, &provider_job);
        self.after_training(job, route, trained).await;
    }

    /// Asks the provider once more to cancel a run an operator cancelled.
    async fn cancel_again(&self, job: &DistillationJob, route: &RouteDistill, provider_job: &str) {
        match route.provider.cancel(provider_job).await {
            Ok(()) => {
                tracing::info!(job = %job.id, provider_job, "the recorded cancel was taken");
                self.cancel_taken(&job.id);
            }
            // The run may be ending already, or not ready to be cancelled: asked again at the
            // next poll, which reads the run ended once it has.
            Err(
                e @ ProviderError::Http {
                    status: 400 | 409, ..
                },
            ) => {
                tracing::debug!(job = %job.id, provider_job, error = %e, "the recorded cancel was not taken now; asking again at the next poll");
            }
            Err(e) => {
                tracing::warn!(job = %job.id, provider_job, error = %e, "the recorded cancel was not taken; asking again at the next poll");
            }
        }
    }

    /// Deletes what job's run uploaded, once the run has ended ([`TrainingProvider::release`]),
    /// in the background: retried through rate limits, it must not hold up the deploy or the
    /// route. A failure leaves the files at the provider, which the log says, and nothing else.
    fn release(&self, route: &RouteDistill, job: &DistillationJob, provider_job: &str) {
        let (provider, job, run) = (
            Arc::clone(&route.provider),
            job.id.clone(),
            provider_job.to_owned(),
        );
        let first_wait = self.settings.poll_initial;
        tokio::spawn(async move {
            match retrying(|| provider.release(&run), first_wait).await {
                Ok(()) => {
                    tracing::debug!(job = %job, provider_job = %run, "uploaded training files deleted")
                }
                Err(e) => {
                    tracing::warn!(job = %job, provider_job = %run, error = %e, "the uploaded training files could not be deleted; they stay at the provider")
                }
            }
        });
    }

    /// TRAINING, trained → COMPLETED: deploys the model, registers it, evaluates it and lets
    /// it join its route.
    async fn after_training(
        self: Arc<Self>,
        mut job: DistillationJob,
        route: RouteDistill,
        trained: String,
    ) {
        let deployed = match retrying(
            || route.provider.deploy(&job.id, &trained),
            self.settings.poll_initial,
        )
        .await
        {
            Ok(d) => d,
            Err(e) => return self.fail(&mut job, format!("deploy {trained}: {e}")),
        };
        if self.deployer.share(&job.route, &deployed.model).is_some() {
            return self.already_joined(job, &route, &deployed);
        }
        let mut record = candidate(&job, &route, &deployed);
        job.resulting_model_id = Some(deployed.model.clone());
        if let Err(e) = self.store.put_model(&record.id.clone(), &record) {
            return self.fail(&mut job, format!("registry: {e}"));
        }
        tracing::info!(job = %job.id, model = %record.id, "model registered as candidate");

        if route.eval_min_score > 0.0 {
            match self
                .evaluate(&route, &job, &deployed.upstream, &deployed.model)
                .await
            {
                Ok(score) => {
                    job.eval_metrics.insert("eval_score".into(), score);
                    record.metrics.insert("eval_score".into(), score);
                    if score < route.eval_min_score {
                        let reason = format!(
                            "held-out score {score:.1} is below eval_min_score {}",
                            route.eval_min_score
                        );
                        tracing::warn!(job = %job.id, model = %record.id, %reason, "model stays a candidate");
                        record.reason = Some(reason.clone());
                        let _ = self.store.put_model(&record.id.clone(), &record);
                        job.error = Some(reason);
                        return self.complete(&mut job);
                    }
                }
                Err(e) => {
                    let reason = format!("evaluation failed: {e}");
                    record.reason = Some(reason.clone());
                    let _ = self.store.put_model(&record.id.clone(), &record);
                    job.error = Some(reason);
                    return self.complete(&mut job);
                }
            }
        }
        // Recorded as serving before it joins: a share change made as soon as it has joined
        // (the guard's, an operator's) is recorded over this, and nothing written after the
        // join can undo it.
        record.status = ModelStatus::Canary;
        record.status_ms = Some(now_ms());
        record.reason = Some(format!(
            "joined `{}` at {}%",
            job.route, route.initial_canary_percent
        ));
        if let Err(e) = self.store.put_model(&record.id.clone(), &record) {
            return self.fail(&mut job, format!("registry: {e}"));
        }
        match self
            .deployer
            .add_student(
                &job.route,
                &deployed.upstream,
                &deployed.model,
                route.initial_canary_percent,
            )
            .await
        {
            Ok(()) => {
                self.retire_replaced(&job.route, &record.id);
                tracing::info!(job = %job.id, model = %record.id, percent = route.initial_canary_percent, "student joined the route");
            }
            Err(e) => {
                let reason = format!("could not join the route: {e}");
                // Not in the route, no share change can have been recorded on it since.
                let back = self.store.update_model(&record.id, |r: &mut ModelRecord| {
                    r.status = ModelStatus::Candidate;
                    r.status_ms = Some(now_ms());
                    r.reason = Some(reason.clone());
                });
                if let Err(e) = back {
                    tracing::error!(job = %job.id, model = %record.id, error = %e, "registry: the student that could not join is still recorded as serving");
                }
                job.error = Some(reason);
            }
        }
        self.complete(&mut job);
    }

    /// TRAINING → COMPLETED for a job resumed after its student joined the route (a restart
    /// came before the job was marked done). The student serves already: the gate is not run
    /// again, since a second score could differ and leave a serving student a candidate, and
    /// its share, which the guard may have moved since, is left as it is.
    fn already_joined(&self, mut job: DistillationJob, route: &RouteDistill, deployed: &Deployed) {
        tracing::info!(job = %job.id, model = %deployed.model, "resuming a job whose student has joined its route already");
        // Written as a candidate before it joined (by a build that wrote it serving only after
        // the join), or lost: it serves. What the guard or an operator made of it since stays.
        let joined = |record: &mut ModelRecord| {
            if record.status == ModelStatus::Candidate {
                record.status = ModelStatus::Canary;
                record.status_ms = Some(now_ms());
                record.reason = Some(format!("joined `{}` before a restart", job.route));
            }
        };
        let written = match self.store.update_model(&deployed.model, joined) {
            Ok(true) => Ok(()),
            Ok(false) => {
                let mut record = candidate(&job, route, deployed);
                joined(&mut record);
                self.store.put_model(&record.id.clone(), &record)
            }
            Err(e) => Err(e),
        };
        match written {
            // The restart may have come before the students it replaced were marked so.
            Ok(()) => self.retire_replaced(&job.route, &deployed.model),
            Err(e) => {
                tracing::error!(job = %job.id, model = %deployed.model, error = %e, "registry: the serving student's record could not be written");
            }
        }
        job.resulting_model_id = Some(deployed.model.clone());
        self.complete(&mut job);
    }

    /// Marks the route's earlier serving students retired: joining the route took their share
    /// away (one student at a time), and the registry must not go on calling them serving.
    fn retire_replaced(&self, route: &str, newest: &str) {
        let models: Vec<ModelRecord> = match self.store.models() {
            Ok(models) => models,
            Err(e) => {
                return tracing::error!(error = %e, "registry not read; older students keep their status");
            }
        };
        for old in models.iter().filter(|m| {
            m.route == route
                && m.id != newest
                && matches!(m.status, ModelStatus::Canary | ModelStatus::Promoted)
        }) {
            if let Err(e) = self.set_model_status(
                &old.id,
                ModelStatus::Retired,
                &format!("replaced by {newest}"),
            ) {
                tracing::error!(error = %e, model = %old.id, "could not mark a replaced model retired");
            }
        }
    }

    fn complete(&self, job: &mut DistillationJob) {
        job.status = JobStatus::Completed;
        job.finished_ms = Some(now_ms());
        self.save(job);
        self.lock_active().release(&job.route);
        tracing::info!(job = %job.id, route = %job.route, model = ?job.resulting_model_id, "distillation job completed");
    }

    /// The gate's score: the mean over held-out prompts of the student's answer against the
    /// teacher's.
    async fn evaluate(
        &self,
        route: &RouteDistill,
        job: &DistillationJob,
        upstream: &str,
        model: &str,
    ) -> Result<f64, String> {
        let dir = self.settings.data_dir.join("datasets").join(&job.id);
        // Only lines the student was not trained on: a score on its own training data would
        // pass a student that learnt them by heart.
        let examples = held_out(&dir.join("validation.jsonl"), route.eval_max_prompts)
            .map_err(|e| e.to_string())?;
        if examples.is_empty() {
            return Err(
                "no held-out prompts: the dataset held no line out for validation (raise validation_percent or min_examples)"
                    .into(),
            );
        }
        let mut scores = Vec::with_capacity(examples.len());
        for example in &examples {
            let answer = match self
                .complete_patiently(upstream, model, &example.messages, example.tools.as_ref())
                .await
            {
                Ok(answer) => answer,
                // The student cannot answer this prompt (too long for its context, say): a
                // prompt the teacher answered and it cannot scores nothing.
                Err(e) if e.refused => {
                    tracing::warn!(job = %job.id, %model, error = %e, "the student refused a held-out prompt; it scores 0");
                    scores.push(0.0);
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            let score = match route.eval_method {
                EvalMethod::Exact => exact_score(&answer, &example.reference),
                EvalMethod::Similarity => similarity(&answer, &example.reference),
                EvalMethod::Judge => {
                    let judge = self
                        .settings
                        .judge
                        .as_ref()
                        .ok_or("eval_method = judge needs a [judge]")?;
                    let question = question_of(&example.messages);
                    let prompt = judge_messages(&question, &answer, Some(&example.reference));
                    let reply = match self
                        .complete_patiently(&judge.upstream, &judge.model, &prompt, None)
                        .await
                    {
                        Ok(reply) => reply,
                        Err(e) if e.refused => {
                            tracing::warn!(job = %job.id, error = %e, "the judge refused a held-out answer; left out of the score");
                            continue;
                        }
                        Err(e) => return Err(e.to_string()),
                    };
                    // One wordy reply says nothing of the student: left out, as long as most
                    // answers are scored.
                    match parse_score(&reply) {
                        Some(score) => score,
                        None => {
                            tracing::warn!(job = %job.id, reply = %reply.chars().take(80).collect::<String>(), "the judge's reply has no score; left out of the score");
                            continue;
                        }
                    }
                }
            };
            scores.push(score);
        }
        if scores.len() * 2 <= examples.len() {
            return Err(format!(
                "the judge scored only {} of {} held-out answers",
                scores.len(),
                examples.len()
            ));
        }
        Ok(scores.iter().sum::<f64>() / scores.len() as f64)
    }

    /// One chat call of the evaluation gate, tried up to [`EVAL_ATTEMPTS`] times: a freshly
    /// deployed model often fails its first calls while it warms up, and one failure would
    /// leave the model a candidate for good, since the gate runs once.
    async fn complete_patiently(
        &self,
        upstream: &str,
        model: &str,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, ChatError> {
        let mut pause = self.settings.poll_initial;
        let mut attempt = 1;
        loop {
            match self.chat.complete(upstream, model, messages, tools).await {
                Ok(answer) => return Ok(answer),
                Err(e) if !e.refused && attempt < EVAL_ATTEMPTS => {
                    tracing::warn!(%model, error = %e, attempt, "evaluation call failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = pause.mul_f64(2.0).min(self.settings.poll_max);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Tries of each call of the evaluation gate.
const EVAL_ATTEMPTS: u32 = 4;

/// The fewest lines fine-tuning accepts in a training file.
const MIN_TRAINING_LINES: u64 = 10;

/// The registry's record of `job`'s model as deployed, before the gate has judged it.
fn candidate(job: &DistillationJob, route: &RouteDistill, deployed: &Deployed) -> ModelRecord {
    ModelRecord {
        id: deployed.model.clone(),
        route: job.route.clone(),
        upstream: deployed.upstream.clone(),
        job_id: job.id.clone(),
        base_model: route.base_model.clone(),
        provider: route.provider.name().to_string(),
        metrics: job.eval_metrics.clone(),
        created_ms: now_ms(),
        status: ModelStatus::Candidate,
        reason: None,
        status_ms: Some(now_ms()),
        undeployed_ms: None,
    }
}

/// How long to wait before the next poll: `wait`, cut short so that the poll comes right at the
/// training deadline. Once it has passed (a run whose cancel failed is still followed), `wait`
/// whole, or the provider would be polled, and asked to cancel, without a pause.
fn poll_pause(wait: Duration, deadline: Option<u64>, now_ms: u64) -> Duration {
    match deadline {
        Some(at) if now_ms < at => wait.min(Duration::from_millis(at - now_ms)),
        _ => wait,
    }
}

/// What became of a run whose training deadline passed.
#[derive(Debug)]
enum AtDeadline {
    /// It had succeeded: the model is kept.
    Trained(String),
    /// It was cancelled, or had ended, and the job failed.
    Failed,
    /// It could not be cancelled, and may still be running: the job follows it still.
    StillRunning,
}

/// Calls `f` until it succeeds or fails for good: waits out rate limits, and retries transient
/// errors a few times with growing pauses.
async fn retrying<'a, T, F>(mut f: F, first_pause: Duration) -> Result<T, ProviderError>
where
    F: FnMut() -> BoxFuture<'a, Result<T, ProviderError>>,
{
    let mut pause = first_pause;
    let mut attempts = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(ProviderError::RateLimited(after)) if attempts < 20 => {
                tokio::time::sleep(after).await
            }
            Err(e) if e.is_transient() && attempts < 5 => {
                tracing::warn!(error = %e, attempt = attempts + 1, "provider call failed; retrying");
                tokio::time::sleep(pause).await;
                pause = pause.mul_f64(2.0);
            }
            Err(e) => return Err(e),
        }
        attempts += 1;
    }
}

/// Parses a cron schedule (six fields, with seconds); an empty string means none.
pub fn parse_schedule(text: &str) -> Result<Option<cron::Schedule>, String> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    cron::Schedule::from_str(text)
        .map(Some)
        .map_err(|e| format!("schedule `{text}`: {e}"))
}

/// The routes with a job under way, and a count of each route's jobs that have ended.
#[derive(Debug)]
struct ActiveRoutes {
    routes: HashSet<String>,
    /// Jobs ended since start, by route: a decision on a route made on a read of the jobs
    /// taken when its count was lower may have missed how one ended.
    ended: HashMap<String, u64>,
}

impl ActiveRoutes {
    /// Lets `route` go at the end of its job, which is saved first.
    fn release(&mut self, route: &str) {
        self.routes.remove(route);
        *self.ended.entry(route.to_string()).or_default() += 1;
    }

    /// Claims `route` for a job decided on a read of the jobs taken when the counts were
    /// `ended`: refused if it is busy, or if a job of it has ended since.
    fn claim_unchanged(&mut self, route: &str, ended: &HashMap<String, u64>) -> bool {
        self.ended.get(route) == ended.get(route) && self.routes.insert(route.to_string())
    }
}

/// The golden rule with a threshold.
pub fn policy(min_score: f64) -> GoldenPolicy {
    GoldenPolicy { min_score }
}

/// The store's record that an operator asked to cancel job `id`.
fn cancel_key(id: &str) -> String {
    format!("cancel_requested_{id}")
}

/// Where an operator's cancel that the provider has not taken yet is marked.
fn cancel_pending_key(id: &str) -> String {
    format!("cancel_pending_{id}")
}

/// The store's record of the routes whose schedule came due during a back-off.
const DEFERRED_SCHEDULES: &str = "deferred_schedules";

/// The longest automatic triggers wait after failed jobs.
const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(6 * 3600);

/// After `n` failed jobs in a row (the newest of a route's `jobs`, newest first), until when
/// automatic triggers wait: `check_every × 2^n`, at most [`MAX_FAILURE_BACKOFF`], from the last
/// one's end; and `n`. Without it, a job the provider refuses for good (a file over its size
/// limit, training data its moderation refuses) is built, uploaded and failed again at every
/// check. A newest job whose run was cancelled (by an operator, or at the provider) waits the
/// whole [`MAX_FAILURE_BACKOFF`], so that the cancel is not undone by the next check. A job that
/// completes ends the wait; an operator's trigger never waits.
fn failure_backoff<'j>(
    jobs: impl Iterator<Item = &'j DistillationJob>,
    check_every: Duration,
) -> Option<(u64, u32)> {
    let mut failures = 0u32;
    let mut newest = None;
    for job in jobs {
        if job.status != JobStatus::Failed {
            break;
        }
        failures += 1;
        newest = newest.or(Some(job));
    }
    let newest = newest?;
    let wait = if newest.cancelled {
        MAX_FAILURE_BACKOFF
    } else {
        check_every
            .saturating_mul(1u32 << failures.min(20))
            .min(MAX_FAILURE_BACKOFF)
    };
    let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
    let end = newest.finished_ms.unwrap_or(newest.updated_ms);
    Some((end.saturating_add(wait_ms), failures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_decided_before_a_job_ended_is_refused() {
        let mut active = ActiveRoutes {
            routes: HashSet::from(["chat".to_string()]),
            ended: HashMap::new(),
        };
        let read_at = active.ended.clone();
        assert!(!active.claim_unchanged("chat", &read_at), "busy");
        // The job ends after the read: a decision made on that read may not start another.
        active.release("chat");
        assert!(!active.claim_unchanged("chat", &read_at));
        // Another route's decision stands: its jobs are as read.
        assert!(active.claim_unchanged("other", &read_at));
        // A decision on a read taken after the end may.
        let now = active.ended.clone();
        assert!(active.claim_unchanged("chat", &now));
        assert!(!active.claim_unchanged("chat", &now), "claimed once");
    }

    #[test]
    fn settings_debug_shows_the_dataset_url_but_not_the_admin_token() {
        let settings = DistillSettings {
            data_dir: "/tmp".into(),
            check_every: Duration::from_secs(1),
            poll_initial: Duration::from_secs(1),
            poll_max: Duration::from_secs(1),
            grading_window: Duration::ZERO,
            max_training: None,
            undeploy_after: None,
            dataset_url: Some(("http://admin:8081".into(), "admin-secret-token".into())),
            judge: None,
        };
        let shown = format!("{settings:?}");
        assert!(shown.contains("http://admin:8081"), "{shown}");
        assert!(!shown.contains("admin-secret-token"), "{shown}");
    }

    #[test]
    fn automatic_triggers_wait_longer_after_each_failed_job_until_one_completes() {
        let job = |status: JobStatus, finished_ms: u64| DistillationJob {
            status,
            finished_ms: Some(finished_ms),
            ..serde_json::from_value(serde_json::json!({
                "id": "dj_x", "route": "chat", "trigger": "threshold", "status": "FAILED",
                "provider": "sim", "base_model": "m", "dataset_size": 0, "created_ms": 0,
                "updated_ms": 0
            }))
            .unwrap()
        };
        let every = Duration::from_secs(60);
        let backoff = |jobs: &[DistillationJob]| failure_backoff(jobs.iter(), every);
        assert_eq!(backoff(&[]), None);
        assert_eq!(backoff(&[job(JobStatus::Completed, 5)]), None);
        // Newest first: one failure waits two checks, two wait four, three wait eight.
        let failed = job(JobStatus::Failed, 1_000);
        assert_eq!(backoff(std::slice::from_ref(&failed)), Some((121_000, 1)));
        assert_eq!(
            backoff(&[failed.clone(), job(JobStatus::Failed, 500)]),
            Some((241_000, 2))
        );
        let three = [failed.clone(), failed.clone(), failed.clone()];
        assert_eq!(backoff(&three), Some((481_000, 3)));
        // A completed job before them ends the run of failures.
        assert_eq!(
            backoff(&[failed.clone(), job(JobStatus::Completed, 0), failed.clone()]),
            Some((121_000, 1))
        );
        // However many, never more than the cap.
        let many = vec![failed.clone(); 40];
        let cap_ms = u64::try_from(MAX_FAILURE_BACKOFF.as_millis()).unwrap();
        assert_eq!(backoff(&many), Some((1_000 + cap_ms, 40)));
        // A cancelled run waits the whole cap at once, and only while it is the newest job.
        let cancelled = DistillationJob {
            cancelled: true,
            ..failed.clone()
        };
        assert_eq!(
            backoff(std::slice::from_ref(&cancelled)),
            Some((1_000 + cap_ms, 1))
        );
        assert_eq!(backoff(&[failed, cancelled]), Some((241_000, 2)));
    }

    #[test]
    fn polls_come_at_the_deadline_and_keep_their_pace_after_it() {
        let wait = Duration::from_secs(60);
        assert_eq!(poll_pause(wait, None, 1_000), wait);
        assert_eq!(poll_pause(wait, Some(1_000_000), 1_000), wait);
        assert_eq!(
            poll_pause(wait, Some(11_000), 1_000),
            Duration::from_secs(10)
        );
        assert_eq!(poll_pause(wait, Some(1_000), 1_000), wait);
        assert_eq!(poll_pause(wait, Some(1_000), 5_000), wait);
    }

    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering::SeqCst;

    /// The evaluation gate's tests need no provider or route table: each call says so.
    #[derive(Debug)]
    struct Unused;

    impl TrainingProvider for Unused {
        fn name(&self) -> &'static str {
            "unused"
        }
        fn submit<'a>(
            &'a self,
            _: &'a TrainingRequest,
        ) -> BoxFuture<'a, Result<super::super::Submitted, ProviderError>> {
            Box::pin(async { Err(ProviderError::Invalid("not in this test".into())) })
        }
        fn poll<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Progress, ProviderError>> {
            Box::pin(async { Err(ProviderError::Invalid("not in this test".into())) })
        }
        fn cancel<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
            Box::pin(async { Err(ProviderError::Invalid("not in this test".into())) })
        }
        fn deploy<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<super::super::Deployed, ProviderError>> {
            Box::pin(async { Err(ProviderError::Invalid("not in this test".into())) })
        }
    }

    impl Deployer for Unused {
        fn add_student<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: &'a str,
            _: f64,
        ) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async { Err("not in this test".into()) })
        }
        fn canary_in_progress(&self, _: &str) -> bool {
            false
        }
        fn share(&self, _: &str, _: &str) -> Option<forge_router::CanaryShare> {
            None
        }
        fn remove_idle_student<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: &'a str,
            _: Duration,
        ) -> BoxFuture<'a, Result<bool, String>> {
            Box::pin(async { Err("not in this test".into()) })
        }
    }

    /// A run at a provider scripted for the cancel tests: it trains (or has succeeded, with
    /// `succeeded`) until a cancel is taken, then reads `cancelling` for two polls before it
    /// reads cancelled. The first cancel finds the provider down with `first_cancel_fails`;
    /// the first `rate_limited` polls get a 429.
    #[derive(Debug, Default)]
    struct CancelScript {
        first_cancel_fails: bool,
        succeeded: bool,
        rate_limited: AtomicUsize,
        cancels: AtomicUsize,
        polls_since_taken: AtomicUsize,
    }

    impl CancelScript {
        fn taken(&self) -> bool {
            self.cancels.load(SeqCst) > usize::from(self.first_cancel_fails)
        }
    }

    impl TrainingProvider for CancelScript {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn submit<'a>(
            &'a self,
            _: &'a TrainingRequest,
        ) -> BoxFuture<'a, Result<super::super::Submitted, ProviderError>> {
            Box::pin(async { Err(ProviderError::Invalid("not in this test".into())) })
        }
        fn poll<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Progress, ProviderError>> {
            let limited = self
                .rate_limited
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let (state, status) = if self.succeeded {
                (
                    ProviderState::Succeeded {
                        model: "ft:m:run-1".into(),
                    },
                    "succeeded",
                )
            } else if self.taken() && self.polls_since_taken.fetch_add(1, SeqCst) >= 2 {
                (ProviderState::Cancelled, "cancelled")
            } else if self.taken() {
                (ProviderState::Running, "cancelling")
            } else {
                (ProviderState::Running, "running")
            };
            Box::pin(async move {
                if limited {
                    return Err(ProviderError::RateLimited(Duration::from_millis(1)));
                }
                Ok(Progress {
                    state,
                    provider_status: status.into(),
                    metrics: BTreeMap::new(),
                })
            })
        }
        fn cancel<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
            let fails = self.first_cancel_fails && self.cancels.fetch_add(1, SeqCst) == 0;
            if !self.first_cancel_fails {
                self.cancels.fetch_add(1, SeqCst);
            }
            Box::pin(async move {
                if fails {
                    Err(ProviderError::Transport("connection refused".into()))
                } else {
                    Ok(())
                }
            })
        }
        fn deploy<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<super::super::Deployed, ProviderError>> {
            Box::pin(async { Err(ProviderError::Invalid("deployed in this test".into())) })
        }
    }

    /// Stores job `id` of route `chat`, in TRAINING on `provider`'s run `run-1`, and returns it.
    fn training_on_run_1(store: &Store, id: &str, provider: &str) -> DistillationJob {
        let job: DistillationJob = serde_json::from_value(serde_json::json!({
            "id": id, "route": "chat", "trigger": "threshold", "status": "TRAINING",
            "provider": provider, "base_model": "m", "provider_job_id": "run-1",
            "dataset_size": 12, "created_ms": now_ms(), "updated_ms": 0
        }))
        .unwrap();
        store.put_job(&job.id, &job).unwrap();
        job
    }

    /// Job `dj_cancelled` in TRAINING on `provider`, cancelled by an operator, then followed to
    /// its end; returns the ended job and what the operator's cancel answered. With
    /// `by_an_earlier_build`, the cancel is only recorded, as builds before the mark of a cancel
    /// not taken recorded every cancel, and answered `None`.
    async fn cancelled_on(
        provider: Arc<CancelScript>,
        by_an_earlier_build: bool,
    ) -> (
        DistillationJob,
        Option<Result<DistillationJob, CancelError>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(&dir.path().join("store")).unwrap();
        training_on_run_1(&store, "dj_cancelled", "scripted");
        let service = DistillationService::new(
            store,
            settings(dir.path()),
            vec![RouteDistill {
                provider,
                ..chat_route()
            }],
            Arc::new(Unused),
            Arc::new(Scripted {
                refused: None,
                wordy: None,
            }),
        );
        let answer = if by_an_earlier_build {
            service
                .store
                .put_meta(&cancel_key("dj_cancelled"), &true)
                .unwrap();
            None
        } else {
            Some(service.cancel("dj_cancelled").await)
        };
        let job = service.job("dj_cancelled").unwrap().unwrap();
        tokio::time::timeout(
            Duration::from_secs(30),
            Arc::clone(&service).finish_training(job),
        )
        .await
        .expect("the job ends");
        (service.job("dj_cancelled").unwrap().unwrap(), answer)
    }

    /// `ended` is marked cancelled, and says so.
    fn ended_cancelled(ended: &DistillationJob) {
        assert!(ended.cancelled, "{ended:?}");
        let error = ended.error.as_deref().unwrap_or("");
        assert!(error.contains("training cancelled"), "{ended:?}");
    }

    #[tokio::test]
    async fn a_cancel_the_provider_did_not_take_is_asked_again_while_the_run_goes_on() {
        // Down at the operator's cancel, then a 429: neither ends the job before the run does.
        let provider = Arc::new(CancelScript {
            first_cancel_fails: true,
            rate_limited: AtomicUsize::new(1),
            ..CancelScript::default()
        });
        let (ended, answer) = cancelled_on(Arc::clone(&provider), false).await;
        assert!(
            matches!(
                answer,
                Some(Err(CancelError::RecordedButNotTaken(
                    ProviderError::Transport(_)
                )))
            ),
            "{answer:?}"
        );
        assert_eq!(ended.status, JobStatus::Failed);
        ended_cancelled(&ended);
        // Asked again once, and not while the run was cancelling.
        assert_eq!(provider.cancels.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cancel_the_provider_took_is_not_asked_again() {
        let provider = Arc::new(CancelScript::default());
        let (ended, answer) = cancelled_on(Arc::clone(&provider), false).await;
        assert!(matches!(answer, Some(Ok(_))), "{answer:?}");
        assert!(ended.cancelled, "{ended:?}");
        assert_eq!(provider.cancels.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_cancel_an_earlier_build_recorded_is_asked_until_it_is_taken() {
        // That build recorded a cancel the provider did not take as it did one it took: asked
        // again, it ends the run, and only then is it not asked again.
        let provider = Arc::new(CancelScript::default());
        let (ended, _) = cancelled_on(Arc::clone(&provider), true).await;
        ended_cancelled(&ended);
        assert_eq!(provider.cancels.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_run_that_succeeded_despite_a_cancel_is_kept_but_not_deployed() {
        let provider = Arc::new(CancelScript {
            succeeded: true,
            ..CancelScript::default()
        });
        let (ended, _) = cancelled_on(provider, false).await;
        assert_eq!(ended.status, JobStatus::Failed);
        assert!(ended.cancelled, "{ended:?}");
        assert_eq!(ended.trained_model.as_deref(), Some("ft:m:run-1"));
        let error = ended.error.unwrap_or_default();
        assert!(error.contains("not deployed"), "{error}");
    }

    /// Deploys every trained model on upstream `students`; nothing else is asked of it.
    #[derive(Debug)]
    struct DeploysOnly;

    impl TrainingProvider for DeploysOnly {
        fn name(&self) -> &'static str {
            "deploys"
        }
        fn submit<'a>(
            &'a self,
            request: &'a TrainingRequest,
        ) -> BoxFuture<'a, Result<super::super::Submitted, ProviderError>> {
            Unused.submit(request)
        }
        fn poll<'a>(&'a self, run: &'a str) -> BoxFuture<'a, Result<Progress, ProviderError>> {
            Unused.poll(run)
        }
        fn cancel<'a>(&'a self, run: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
            Unused.cancel(run)
        }
        fn deploy<'a>(
            &'a self,
            _: &'a str,
            trained: &'a str,
        ) -> BoxFuture<'a, Result<super::super::Deployed, ProviderError>> {
            Box::pin(async move {
                Ok(super::super::Deployed {
                    upstream: "students".into(),
                    model: trained.into(),
                })
            })
        }
    }

    /// A route table that a student joins, unless it `refuses`, and whose share a rollback
    /// (the guard's, an operator's) takes away at once: recorded in the registry as
    /// [`DistillationService::record_shares`] records it.
    #[derive(Debug)]
    struct RolledBackOnJoin {
        store: Store,
        refuses: bool,
    }

    impl Deployer for RolledBackOnJoin {
        fn add_student<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            model: &'a str,
            _: f64,
        ) -> BoxFuture<'a, Result<(), String>> {
            let joined = if self.refuses {
                Err("the route table refused it".to_string())
            } else {
                let rolled_back = self.store.update_model(model, |r: &mut ModelRecord| {
                    r.status = ModelStatus::RolledBack;
                });
                assert!(rolled_back.unwrap(), "recorded before it joins");
                Ok(())
            };
            Box::pin(async move { joined })
        }
        fn canary_in_progress(&self, alias: &str) -> bool {
            Unused.canary_in_progress(alias)
        }
        fn share(&self, alias: &str, model: &str) -> Option<forge_router::CanaryShare> {
            Unused.share(alias, model)
        }
        fn remove_idle_student<'a>(
            &'a self,
            alias: &'a str,
            upstream: &'a str,
            model: &'a str,
            idle_for: Duration,
        ) -> BoxFuture<'a, Result<bool, String>> {
            Unused.remove_idle_student(alias, upstream, model, idle_for)
        }
    }

    /// The registry record of a student trained as `ft:m:run-1` once its job has ended, on
    /// a [`RolledBackOnJoin`] route table.
    async fn record_after_join(refuses: bool) -> ModelRecord {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(&dir.path().join("store")).unwrap();
        let job = training_on_run_1(&store, "dj_join", "deploys");
        let route = RouteDistill {
            provider: Arc::new(DeploysOnly),
            eval_min_score: 0.0,
            ..chat_route()
        };
        let service = DistillationService::new(
            store.clone(),
            settings(dir.path()),
            vec![route.clone()],
            Arc::new(RolledBackOnJoin { store, refuses }),
            Arc::new(Scripted {
                refused: None,
                wordy: None,
            }),
        );
        Arc::clone(&service)
            .after_training(job, route, "ft:m:run-1".into())
            .await;
        assert_eq!(
            service.job("dj_join").unwrap().unwrap().status,
            JobStatus::Completed
        );
        service.store.model("ft:m:run-1").unwrap().unwrap()
    }

    #[tokio::test]
    async fn a_rollback_recorded_as_the_student_joins_is_not_written_over() {
        let record = record_after_join(false).await;
        assert_eq!(record.status, ModelStatus::RolledBack, "{record:?}");
        // One that could not join is a candidate again, and says why.
        let record = record_after_join(true).await;
        assert_eq!(record.status, ModelStatus::Candidate, "{record:?}");
        let reason = record.reason.unwrap_or_default();
        assert!(reason.contains("could not join"), "{reason}");
    }

    /// The student answers `q<i>` with `a<i>`, word for word, but refuses `q<refused>`; the
    /// judge gives 95 to each answer but that of `q<wordy>`, which it praises without a number.
    #[derive(Debug)]
    struct Scripted {
        refused: Option<usize>,
        wordy: Option<usize>,
    }

    impl ChatClient for Scripted {
        fn complete<'a>(
            &'a self,
            _: &'a str,
            model: &'a str,
            messages: &'a serde_json::Value,
            _: Option<&'a serde_json::Value>,
        ) -> BoxFuture<'a, Result<String, ChatError>> {
            let asked = |i: usize| {
                let text = messages.to_string();
                text.contains(&format!("q{i}\\n")) || text.contains(&format!("\"q{i}\""))
            };
            let answer = if model == "judge" {
                Ok(if self.wordy.is_some_and(asked) {
                    "A thorough, excellent answer.".to_string()
                } else {
                    "95".to_string()
                })
            } else if self.refused.is_some_and(asked) {
                Err(ChatError::refused(
                    "student answered 400: context_length_exceeded",
                ))
            } else {
                let question = messages[0]["content"].as_str().unwrap_or_default();
                Ok(question.replacen('q', "a", 1))
            };
            Box::pin(async move { answer })
        }
    }

    /// Settings for a service in `dir` that nothing waits on.
    fn settings(dir: &std::path::Path) -> DistillSettings {
        DistillSettings {
            data_dir: dir.into(),
            check_every: Duration::from_secs(1),
            poll_initial: Duration::from_millis(1),
            poll_max: Duration::from_millis(1),
            grading_window: Duration::ZERO,
            max_training: None,
            undeploy_after: None,
            dataset_url: None,
            judge: Some(JudgeModel {
                upstream: "u".into(),
                model: "judge".into(),
            }),
        }
    }

    /// The route `chat`, gated at 80 by exact match, with no provider behind it.
    fn chat_route() -> RouteDistill {
        RouteDistill {
            route: "chat".into(),
            base_model: "m".into(),
            provider: Arc::new(Unused),
            trigger_threshold: 10,
            min_examples: 10,
            schedule: None,
            suffix: None,
            hyperparameters: Hyperparameters::default(),
            initial_canary_percent: 10.0,
            eval_min_score: 80.0,
            eval_method: EvalMethod::Exact,
            eval_max_prompts: 20,
            dataset: DatasetSpec::new("chat"),
        }
    }

    #[test]
    fn a_route_whose_job_a_restart_interrupted_is_busy_before_the_job_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(&dir.path().join("store")).unwrap();
        let training: DistillationJob = serde_json::from_value(serde_json::json!({
            "id": "dj_before", "route": "chat", "trigger": "threshold", "status": "TRAINING",
            "provider": "unused", "base_model": "m", "provider_job_id": "ftjob-1",
            "dataset_size": 12, "created_ms": 0, "updated_ms": 0
        }))
        .unwrap();
        store.put_job(&training.id, &training).unwrap();
        // `run` is never called: the job has not resumed yet.
        let service = DistillationService::new(
            store,
            settings(dir.path()),
            vec![chat_route()],
            Arc::new(Unused),
            Arc::new(Scripted {
                refused: None,
                wordy: None,
            }),
        );
        match service.trigger("chat", "manual") {
            Err(DistillError::Busy(route, job)) => {
                assert_eq!((route.as_str(), job.as_str()), ("chat", "dj_before"));
            }
            other => panic!("a second job beside the interrupted one: {other:?}"),
        }
        assert_eq!(service.jobs().unwrap().len(), 1);
    }

    /// The gate's score of a student over `validation` lines `q<i>` → `a<i>`.
    async fn gate(
        validation: usize,
        method: EvalMethod,
        chat: Scripted,
    ) -> (tempfile::TempDir, Result<f64, String>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(&dir.path().join("store")).unwrap();
        let job: DistillationJob = serde_json::from_value(serde_json::json!({
            "id": "dj_gate", "route": "chat", "trigger": "threshold", "status": "TRAINING",
            "provider": "unused", "base_model": "m", "dataset_size": 12, "created_ms": 0,
            "updated_ms": 0
        }))
        .unwrap();
        let data = dir.path().join("datasets").join(&job.id);
        std::fs::create_dir_all(&data).unwrap();
        let line = |i: usize| {
            serde_json::json!({"messages": [{"role": "user", "content": format!("q{i}")},
                                            {"role": "assistant", "content": format!("a{i}")}]})
            .to_string()
                + "\n"
        };
        // What the student was trained on: it answers these perfectly too.
        std::fs::write(
            data.join("train.jsonl"),
            (100..112).map(line).collect::<String>(),
        )
        .unwrap();
        std::fs::write(
            data.join("validation.jsonl"),
            (0..validation).map(line).collect::<String>(),
        )
        .unwrap();
        let route = RouteDistill {
            eval_method: method,
            ..chat_route()
        };
        let service = DistillationService::new(
            store,
            settings(dir.path()),
            vec![route.clone()],
            Arc::new(Unused),
            Arc::new(chat),
        );
        let score = service.evaluate(&route, &job, "u", "student").await;
        (dir, score)
    }

    #[tokio::test]
    async fn the_gate_never_scores_a_student_on_what_it_was_trained_on() {
        let chat = Scripted {
            refused: None,
            wordy: None,
        };
        let (_dir, score) = gate(0, EvalMethod::Exact, chat).await;
        let error = score.unwrap_err();
        assert!(error.contains("no held-out prompts"), "{error}");
    }

    #[tokio::test]
    async fn a_prompt_the_student_refuses_scores_nothing_and_a_wordy_judge_reply_is_left_out() {
        let refusing = Scripted {
            refused: Some(3),
            wordy: None,
        };
        assert_eq!(gate(4, EvalMethod::Exact, refusing).await.1, Ok(75.0));
        let wordy = Scripted {
            refused: None,
            wordy: Some(2),
        };
        assert_eq!(gate(20, EvalMethod::Judge, wordy).await.1, Ok(95.0));
        // With most replies unscored, the judge has said nothing of the student.
        let (_dir, score) = gate(
            1,
            EvalMethod::Judge,
            Scripted {
                refused: None,
                wordy: Some(0),
            },
        )
        .await;
        assert!(score.unwrap_err().contains("scored only 0 of 1"));
    }
}
