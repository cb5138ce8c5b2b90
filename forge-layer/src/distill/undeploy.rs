//! Taking down trained models that no longer serve: out of their route, then undeployed.
//!
//! An Azure deployment bills by the hour and a vLLM adapter holds GPU memory (an OpenAI
//! fine-tuned model costs nothing idle, and is left alone), so a student that
//! a newer one replaced, that the guard rolled back, or that never passed the evaluation gate
//! is taken down once it has been idle for `undeploy_after`: at 0% by the routing history, and
//! in no route as a teacher or a student with a share. An operator who gives it a share again
//! first keeps it; one who puts it back in a route after it went must deploy it again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::job::{DistillationJob, JobStatus, ModelRecord, ModelStatus};
use super::service::{DistillationService, RouteDistill};
use crate::store::{Store, StoreError};
use crate::trace::now_ms;

/// The longest wait between tries for a model whose undeploy keeps failing.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(3600);

/// Per model: the failed tries so far and when to try next; and the models already reported
/// as left deployed.
#[derive(Debug, Default)]
pub(super) struct Undeploys {
    retries: HashMap<String, (u32, u64)>,
    reported: HashSet<String>,
}

impl DistillationService {
    /// Takes idle models down every `check_every` until `stop`. A pass stops between models
    /// and abandons a provider call once stopped, but lets a store read or write under way
    /// finish, so that no store handle outlives the service.
    pub(super) async fn undeploy_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if self.settings.undeploy_after.is_none() {
            return;
        }
        let mut ticks = tokio::time::interval(self.settings.check_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = ticks.tick() => self.undeploy_idle(&stop).await,
            }
        }
    }

    /// One pass over the registry: every model that serves nothing, idle for `undeploy_after`
    /// and not taken down yet, leaves its route and is undeployed.
    async fn undeploy_idle(&self, stop: &watch::Receiver<bool>) {
        let Some(idle_for) = self.settings.undeploy_after else {
            return;
        };
        let store = self.store.clone();
        // Jobs before models: a candidate whose job ended after the jobs were read is still
        // taken for running, and one whose job ended before had its record written first (as
        // a student, if it joined), so a student that has just joined is never taken for a
        // candidate left over.
        let read = tokio::task::spawn_blocking(move || {
            let jobs = store.jobs::<DistillationJob>()?;
            Ok::<_, StoreError>((store.models::<ModelRecord>()?, jobs))
        })
        .await;
        let (models, jobs) = match read {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                return tracing::error!(error = %e, "registry not read; idle models stay deployed for now");
            }
            Err(e) => {
                return tracing::error!(error = %e, "registry read failed; idle models stay deployed for now");
            }
        };
        let status: HashMap<&str, JobStatus> =
            jobs.iter().map(|j| (j.id.as_str(), j.status)).collect();
        let idle_ms = u64::try_from(idle_for.as_millis()).unwrap_or(u64::MAX);
        for record in &models {
            if *stop.borrow() {
                return;
            }
            let now = now_ms();
            let settled = record.undeployed_ms.is_none()
                && serves_nothing(record, status.get(record.job_id.as_str()).copied(), || {
                    self.deployer.share(&record.route, &record.id).is_some()
                })
                // The status can only have changed since then: a quick check before the
                // routing history, which decides.
                && now.saturating_sub(record.status_ms.unwrap_or(record.created_ms)) >= idle_ms;
            if !settled || !self.due(&record.id, now) {
                continue;
            }
            // Only the provider that deployed it can take it down.
            let Some(route) = self
                .routes
                .get(&record.route)
                .filter(|r| r.provider.name() == record.provider)
            else {
                self.report_left_up(record);
                continue;
            };
            // Left in its route at 0%, where an operator can still raise it.
            if !route.provider.costs_while_idle() {
                continue;
            }
            match self.take_down(route, record, idle_for, stop).await {
                Ok(false) => {}
                Ok(true) => {
                    self.lock().retries.remove(&record.id);
                    tracing::info!(model = %record.id, route = %record.route, provider = %record.provider, "idle model taken out of its route and undeployed");
                    mark_undeployed(&self.store, &record.id).await;
                }
                Err(e) => self.failed(&record.id, &e),
            }
        }
    }

    /// Out of the route (if it is idle there), then the deployment: `Ok(false)` if not idle, or
    /// if stopped before it was undeployed.
    async fn take_down(
        &self,
        route: &RouteDistill,
        record: &ModelRecord,
        idle_for: Duration,
        stop: &watch::Receiver<bool>,
    ) -> Result<bool, String> {
        let remove = || {
            self.deployer
                .remove_idle_student(&record.route, &record.upstream, &record.id, idle_for)
        };
        if !remove().await? {
            return Ok(false);
        }
        // Stopped here, it is out of its route and still deployed: the next start finds it so,
        // and goes on from there.
        let mut stopped = stop.clone();
        tokio::select! {
            undeployed = route.provider.undeploy(&record.id) => undeployed.map_err(|e| e.to_string())?,
            _ = stopped.wait_for(|stop| *stop) => return Ok(false),
        }
        // An operator may have put it back into a route between the two steps.
        if !remove().await.unwrap_or(false) {
            tracing::error!(model = %record.id, route = %record.route, "a model was put back into a route while it was being undeployed: that route now points at a deployment that is gone; deploy it again or take it out");
        }
        Ok(true)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Undeploys> {
        self.undeploys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a model that failed before may be tried again now.
    fn due(&self, model: &str, now: u64) -> bool {
        self.lock()
            .retries
            .get(model)
            .is_none_or(|&(_, next)| now >= next)
    }

    /// Records a failed try: the next waits twice as long as the last (from `check_every`, up
    /// to an hour), so that a lasting refusal logs a line an hour, not one a check.
    fn failed(&self, model: &str, error: &str) {
        let mut state = self.lock();
        let (tries, next) = state.retries.entry(model.to_string()).or_default();
        *tries += 1;
        let wait = retry_wait(self.settings.check_every, *tries);
        *next = now_ms().saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        tracing::warn!(%model, error, tries = *tries, retry_in_secs = wait.as_secs(), "an idle model could not be taken down; trying again later");
    }

    /// Says once that an idle model stays deployed: its route is no longer distilled here, or
    /// by another provider, so nothing here can take it down.
    fn report_left_up(&self, record: &ModelRecord) {
        if self.lock().reported.insert(record.id.clone()) {
            tracing::warn!(model = %record.id, route = %record.route, provider = %record.provider, "an idle model stays deployed: its route is not distilled with that provider here; take it down by hand");
        }
    }
}

/// The wait after the `tries`-th failed try in a row: `check_every`, doubled each time, at most
/// [`MAX_RETRY_WAIT`].
fn retry_wait(check_every: Duration, tries: u32) -> Duration {
    check_every
        .saturating_mul(1 << tries.saturating_sub(1).min(16))
        .min(MAX_RETRY_WAIT)
}

/// Whether a model serves nothing by its registry status, given its `job`'s: replaced, rolled
/// back, or a candidate whose job has ended (it failed the gate, or could not join its route).
/// A student is recorded serving just before it joins its route, and its job completes once it
/// has: one whose job failed instead, and that is `in_route` nowhere, never joined (a restart
/// came between, and the resumed job failed).
fn serves_nothing(
    record: &ModelRecord,
    job: Option<JobStatus>,
    in_route: impl FnOnce() -> bool,
) -> bool {
    match record.status {
        ModelStatus::Retired | ModelStatus::RolledBack => true,
        ModelStatus::Candidate => !job.is_some_and(JobStatus::is_active),
        ModelStatus::Canary | ModelStatus::Promoted => {
            job == Some(JobStatus::Failed) && !in_route()
        }
    }
}

/// Records the undeploy on the model's latest record (its status may have changed meanwhile).
async fn mark_undeployed(store: &Store, model: &str) {
    let (store, id) = (store.clone(), model.to_string());
    let marked = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
        store.update_model(&id, |record: &mut ModelRecord| {
            record.undeployed_ms = Some(now_ms());
        })?;
        Ok(())
    })
    .await;
    match marked {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(%model, error = %e, "registry not updated after an undeploy"),
        Err(e) => tracing::error!(%model, error = %e, "registry update after an undeploy failed"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn record(status: ModelStatus) -> ModelRecord {
        ModelRecord {
            id: "m".into(),
            route: "chat".into(),
            upstream: "up".into(),
            job_id: "dj_1".into(),
            base_model: "b".into(),
            provider: "azure".into(),
            metrics: BTreeMap::new(),
            created_ms: 0,
            status,
            reason: None,
            status_ms: None,
            undeployed_ms: None,
        }
    }

    #[test]
    fn only_models_that_serve_nothing_are_taken_down() {
        let (running, completed, failed) = (
            Some(JobStatus::Training),
            Some(JobStatus::Completed),
            Some(JobStatus::Failed),
        );
        let (in_route, nowhere) = (|| true, || false);
        let serves_nothing =
            |status, job, in_route: fn() -> bool| serves_nothing(&record(status), job, in_route);
        for status in [ModelStatus::Retired, ModelStatus::RolledBack] {
            assert!(serves_nothing(status, running, in_route));
        }
        for status in [ModelStatus::Canary, ModelStatus::Promoted] {
            assert!(!serves_nothing(status, completed, in_route));
            // Recorded serving as it joins: while its job runs, whether or not it has joined.
            assert!(!serves_nothing(status, running, nowhere));
            // Its job completed, and an operator took it out of its route: theirs to decide.
            assert!(!serves_nothing(status, completed, nowhere));
            // Its job failed, and it is in no route: it never joined.
            assert!(serves_nothing(status, failed, nowhere));
            assert!(!serves_nothing(status, failed, in_route));
        }
        // A candidate is still being evaluated while its job runs.
        assert!(!serves_nothing(ModelStatus::Candidate, running, nowhere));
        assert!(serves_nothing(ModelStatus::Candidate, completed, nowhere));
        assert!(serves_nothing(ModelStatus::Candidate, None, nowhere));
    }

    #[test]
    fn a_failing_undeploy_waits_twice_as_long_each_time_up_to_an_hour() {
        let minute = Duration::from_secs(60);
        let waits: Vec<u64> = (1..=8)
            .map(|tries| retry_wait(minute, tries).as_secs())
            .collect();
        assert_eq!(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(retry_wait(minute, u32::MAX), MAX_RETRY_WAIT);
    }
}
