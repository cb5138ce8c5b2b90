//! Deleting traces past their retention age, with their feedback and evaluations.

use std::time::Duration;

use redb::ReadableTable;
use tokio::sync::watch;

use super::{EVALUATIONS, FEEDBACK, FEEDBACK_ORDER, META, Store, StoreError, TRACES, db_err};
use crate::trace::{TraceId, now_ms};

/// Traces deleted per transaction, and the bytes of them: small enough that the trace writer,
/// which waits for the same write lock, is held up for milliseconds, not seconds.
pub const EXPIRE_BATCH: usize = 1000;
/// See [`EXPIRE_BATCH`].
pub const EXPIRE_BATCH_BYTES: usize = 8 << 20;

/// What one [`Store::expire_traces`] step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// Traces deleted.
    pub deleted: usize,
    /// Whether it stopped at its limits with traces below the cutoff possibly left.
    pub more: bool,
}

/// The META key of the newest trace id deleted for age.
const EXPIRED_UP_TO: &str = "expired_up_to";

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
            let expiring = move || step.expire_traces(cutoff, EXPIRE_BATCH, EXPIRE_BATCH_BYTES);
            match tokio::task::spawn_blocking(expiring).await {
                Ok(Ok(Expired { deleted, more })) => {
                    let deleted = deleted as u64;
                    on_expired(deleted);
                    total += deleted;
                    if !more || *stop.borrow() {
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
    /// Deletes the oldest traces whose ids are below `cutoff`, with all feedback and evaluations
    /// of those traces, in one transaction: up to `limit` traces, and no more once `max_bytes` of
    /// them have gone (traces can hold megabytes). The caller repeats it while it says there may be
    /// more, so that no one transaction holds the write lock (which the trace writer waits on) for
    /// long.
    pub fn expire_traces(
        &self,
        cutoff: TraceId,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Expired, StoreError> {
        self.write(|txn| {
            let mut newest_gone = None;
            let mut deleted = 0;
            let mut more = false;
            {
                let mut traces = txn.open_table(TRACES).map_err(db_err)?;
                let mut gone = traces
                    .extract_from_if(..cutoff.as_u128(), |_, _| true)
                    .map_err(db_err)?;
                let mut bytes = 0;
                loop {
                    if deleted == limit || bytes >= max_bytes {
                        more = true;
                        break;
                    }
                    let Some(entry) = gone.next() else { break };
                    let (id, value) = entry.map_err(db_err)?;
                    newest_gone = Some(id.value());
                    bytes += value.value().len();
                    deleted += 1;
                }
                // Closed here rather than dropped, so that an error finishing the removal is
                // this error, not a poisoned transaction at commit.
                gone.close().map_err(db_err)?;
                // Stopped at a limit: more only if an old trace is left, so that a sweep whose
                // last step took exactly the limit does not commit one more, empty, step.
                if more {
                    let next = traces.first().map_err(db_err)?;
                    more = next.is_some_and(|(id, _)| id.value() < cutoff.as_u128());
                }
            }
            let Some(newest) = newest_gone else {
                return Ok(Expired::default());
            };
            // Feedback and evaluations are keyed by their trace's id first, and both are only
            // added to a trace that exists (checked in their own write transactions), so every
            // entry up to the newest trace deleted belongs to a deleted trace.
            // The feedback deleted leaves the arrival order too.
            let mut feedback_ids = Vec::new();
            txn.open_table(FEEDBACK)
                .map_err(db_err)?
                .retain_in(..=(newest, u128::MAX), |(_, id), _| {
                    feedback_ids.push(id);
                    false
                })
                .map_err(db_err)?;
            let mut order = txn.open_table(FEEDBACK_ORDER).map_err(db_err)?;
            for &id in &feedback_ids {
                order.remove(id).map_err(db_err)?;
            }
            txn.open_table(EVALUATIONS)
                .map_err(db_err)?
                .retain_in(..=(newest, u128::MAX), |_, _| false)
                .map_err(db_err)?;
            // New ids must stay above every id this store has held, even once all of them have
            // expired: a cursor (the judge's, a dataset's cut) may point at one, and a clock that
            // went back across a restart would otherwise make ids below it (see `id_floor`).
            let mut meta = txn.open_table(META).map_err(db_err)?;
            // Feedback ids count too: a dataset's feedback mark may be one.
            let newest = TraceId::from_u128(feedback_ids.into_iter().fold(newest, u128::max));
            let floor = expired_mark(&meta)?.map_or(newest, |mark| mark.max(newest));
            meta.insert(EXPIRED_UP_TO, serde_json::to_vec(&floor)?.as_slice())
                .map_err(db_err)?;
            Ok(Expired { deleted, more })
        })
    }

    /// The highest id this store has held: its newest trace, feedback or evaluation, or the newest it
    /// deleted for age if that is higher. New ids are made above it when the store opens.
    pub fn id_floor(&self) -> Result<Option<TraceId>, StoreError> {
        // One snapshot, so that an expiry committing meanwhile cannot hide both.
        self.read(|txn| {
            let newest = txn
                .open_table(TRACES)
                .map_err(db_err)?
                .last()
                .map_err(db_err)?
                .map(|(k, _)| TraceId::from_u128(k.value()));
            // Datasets keep a feedback id as their mark; feedback after it must sort after it.
            let feedback = txn
                .open_table(FEEDBACK_ORDER)
                .map_err(db_err)?
                .last()
                .map_err(db_err)?
                .map(|(k, _)| TraceId::from_u128(k.value()));
            let meta = txn.open_table(META).map_err(db_err)?;
            // And a dataset's mark may be an evaluation's id.
            let evaluation = super::feedback::evaluation_mark(&meta)?;
            Ok(newest
                .max(feedback)
                .max(expired_mark(&meta)?)
                .max(evaluation))
        })
    }
}

/// The highest id deleted for age (a trace's, or its feedback's), as recorded in the META table.
/// A mark that cannot be read is left out, with a warning, rather than keep the store from
/// opening: new ids then stay above the newest stored trace and feedback only, and the next
/// expiry writes the mark afresh.
fn expired_mark(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<TraceId>, StoreError> {
    let Some(v) = meta.get(EXPIRED_UP_TO).map_err(db_err)? else {
        return Ok(None);
    };
    match serde_json::from_slice(v.value()) {
        Ok(mark) => Ok(Some(mark)),
        Err(e) => {
            tracing::warn!(error = %e, "retention: the record of expired trace ids cannot be read; ignoring it");
            Ok(None)
        }
    }
}
