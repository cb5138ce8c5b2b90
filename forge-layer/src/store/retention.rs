//! Deleting traces past their retention age, with their feedback and evaluations.

use std::time::Duration;

use tokio::sync::watch;

use super::{EVALUATIONS, FEEDBACK, Store, StoreError, TRACES, db_err};
use crate::trace::{TraceId, now_ms};

/// Traces deleted per transaction: small enough that the trace writer, which waits for the same
/// write lock, is held up for milliseconds, not seconds.
pub const EXPIRE_BATCH: usize = 1000;

/// Deletes the traces older than `max_age` (with their feedback and evaluations) now and then
/// every tenth of `max_age` (at least a second apart, at most an hour), until `stop` turns true.
/// `on_expired` is told how many each step deleted. A failed step is logged and retried at the
/// next sweep: an expiry that waits costs disk, not data.
pub async fn run_expiry(
    store: Store,
    max_age: Duration,
    on_expired: impl Fn(u64) + Send + 'static,
    mut stop: watch::Receiver<bool>,
) {
    let every = (max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max_age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = ticks.tick() => {}
        }
        let cutoff = TraceId::earliest_at(now_ms().saturating_sub(max_age_ms));
        let mut total = 0u64;
        loop {
            let step = store.clone();
            match tokio::task::spawn_blocking(move || step.expire_traces(cutoff, EXPIRE_BATCH))
                .await
            {
                Ok(Ok(deleted)) => {
                    let deleted_count = deleted as u64;
                    on_expired(deleted_count);
                    total += deleted_count;
                    if deleted < EXPIRE_BATCH || *stop.borrow() {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "retention: traces could not be deleted; retrying at the next sweep");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "retention: the deletion task failed");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(
                deleted = total,
                max_age_secs = max_age.as_secs(),
                "retention: deleted traces past their age"
            );
        }
    }
}

impl Store {
    /// Deletes up to `limit` of the oldest traces whose ids are below `cutoff`, with all feedback
    /// and evaluations of those traces, in one transaction; returns how many traces it deleted.
    /// The caller repeats it until it deletes fewer than `limit`, so that no one transaction
    /// holds the write lock (which the trace writer waits on) for long.
    pub fn expire_traces(&self, cutoff: TraceId, limit: usize) -> Result<usize, StoreError> {
        self.write(|txn| {
            let mut newest_gone = None;
            let mut deleted = 0;
            {
                let mut traces = txn.open_table(TRACES).map_err(db_err)?;
                let gone = traces
                    .extract_from_if(..cutoff.as_u128(), |_, _| true)
                    .map_err(db_err)?;
                for entry in gone.take(limit) {
                    let (id, _) = entry.map_err(db_err)?;
                    newest_gone = Some(id.value());
                    deleted += 1;
                }
            }
            // Feedback and evaluations are keyed by their trace's id first, and feedback is only
            // ever added to a trace that exists (checked in its own write transaction), so every
            // entry up to the newest trace deleted belongs to a deleted trace.
            if let Some(newest) = newest_gone {
                for definition in [FEEDBACK, EVALUATIONS] {
                    let mut table = txn.open_table(definition).map_err(db_err)?;
                    table
                        .retain_in(..=(newest, u128::MAX), |_, _| false)
                        .map_err(db_err)?;
                }
            }
            Ok(deleted)
        })
    }
}
