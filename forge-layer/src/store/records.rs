//! Distillation records in the store: jobs, the model registry, cursors, and graded trace scans.

use redb::{ReadOnlyTable, ReadableTable};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::feedback::latest_of;
use super::{
    EVALUATIONS, FEEDBACK, FEEDBACK_ORDER, JOBS, META, MODELS, Store, StoreError, TRACES, db_err,
};
use crate::store::{Evaluation, Feedback};
use crate::trace::{Trace, TraceId};

impl Store {
    fn put_json<T: Serialize>(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value)?;
        self.write(|txn| {
            txn.open_table(table)
                .map_err(db_err)?
                .insert(key, bytes.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn get_json<T: DeserializeOwned>(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(table).map_err(db_err)?;
            match t.get(key).map_err(db_err)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
                None => Ok(None),
            }
        })
    }

    fn all_json<T: DeserializeOwned>(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(table).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(db_err)? {
                let (_, v) = entry.map_err(db_err)?;
                out.push(serde_json::from_slice(v.value())?);
            }
            Ok(out)
        })
    }

    /// Writes a distillation job record (durably, before the change it records takes effect).
    pub fn put_job<T: Serialize>(&self, id: &str, job: &T) -> Result<(), StoreError> {
        self.put_json(JOBS, id, job)
    }

    /// One job record.
    pub fn job<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>, StoreError> {
        self.get_json(JOBS, id)
    }

    /// Every job record, oldest first (job ids sort by time).
    pub fn jobs<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        self.all_json(JOBS)
    }

    /// Writes a model registry record.
    pub fn put_model<T: Serialize>(&self, id: &str, model: &T) -> Result<(), StoreError> {
        self.put_json(MODELS, id, model)
    }

    /// Changes registry record `id` with `f` in one write transaction, so that two changes of
    /// different fields (a status, an undeploy mark) made at once cannot undo each other.
    /// Returns whether the record exists.
    pub fn update_model<T: Serialize + DeserializeOwned>(
        &self,
        id: &str,
        f: impl FnOnce(&mut T),
    ) -> Result<bool, StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(MODELS).map_err(db_err)?;
            let Some(mut record) = table
                .get(id)
                .map_err(db_err)?
                .map(|v| serde_json::from_slice::<T>(v.value()))
                .transpose()?
            else {
                return Ok(false);
            };
            f(&mut record);
            let bytes = serde_json::to_vec(&record)?;
            table.insert(id, bytes.as_slice()).map_err(db_err)?;
            Ok(true)
        })
    }

    /// One registry record.
    pub fn model<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>, StoreError> {
        self.get_json(MODELS, id)
    }

    /// Every registry record.
    pub fn models<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        self.all_json(MODELS)
    }

    /// Writes a small named value (a cursor, a counter).
    pub fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.put_json(META, key, value)
    }

    /// Reads a small named value.
    pub fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.get_json(META, key)
    }

    /// Calls `f` on every trace after `after` (oldest first) with the feedback in force and its
    /// latest evaluation, all from one consistent snapshot, one trace at a time.
    ///
    /// The scan stops below the oldest trace still on its way ([`Unsettled::scan_bound`]): a
    /// caller that keeps the last id it saw as a cursor never steps past a trace that is still
    /// to be committed (a long stream started before shorter exchanges that ended first).
    ///
    /// [`Unsettled::scan_bound`]: super::Unsettled::scan_bound
    pub fn for_each_graded_trace(
        &self,
        after: Option<TraceId>,
        f: impl FnMut(Trace, Option<Feedback>, Option<Evaluation>) -> bool,
    ) -> Result<(), StoreError> {
        self.with_graded_snapshot(|scan| scan.for_each(after, None, f))
    }

    /// Runs `f` on one snapshot of the graded traces, which it may walk as often as it needs:
    /// every walk sees the same traces, feedback and evaluations (a dataset counts its lines
    /// in one walk and writes them in the next).
    pub fn with_graded_snapshot<T>(
        &self,
        f: impl FnOnce(&GradedScan) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // Read before the snapshot is taken: every id below it is committed by then.
        let settled = self
            .unsettled
            .scan_bound()
            .map_or(u128::MAX, TraceId::as_u128);
        self.read(|txn| {
            f(&GradedScan {
                traces: txn.open_table(TRACES).map_err(db_err)?,
                feedback: txn.open_table(FEEDBACK).map_err(db_err)?,
                feedback_order: txn.open_table(FEEDBACK_ORDER).map_err(db_err)?,
                evaluations: txn.open_table(EVALUATIONS).map_err(db_err)?,
                meta: txn.open_table(META).map_err(db_err)?,
                settled,
            })
        })
    }

    /// Whether a trace already has an evaluation.
    pub fn has_evaluation(&self, trace: TraceId) -> Result<bool, StoreError> {
        Ok(self.latest_evaluation(trace)?.is_some())
    }
}

/// Graded traces in one snapshot; see [`Store::with_graded_snapshot`].
pub struct GradedScan {
    traces: ReadOnlyTable<u128, &'static [u8]>,
    feedback: ReadOnlyTable<(u128, u128), &'static [u8]>,
    feedback_order: ReadOnlyTable<u128, u128>,
    evaluations: ReadOnlyTable<(u128, u128), &'static [u8]>,
    meta: ReadOnlyTable<&'static str, &'static [u8]>,
    /// The scan stops below this id: see [`Store::for_each_graded_trace`].
    settled: u128,
}

impl GradedScan {
    /// Calls `f` on every trace after `after` and up to `until` (when given), oldest first,
    /// with the feedback in force and its latest evaluation; `f` returns `false` to stop.
    pub fn for_each(
        &self,
        after: Option<TraceId>,
        until: Option<TraceId>,
        mut f: impl FnMut(Trace, Option<Feedback>, Option<Evaluation>) -> bool,
    ) -> Result<(), StoreError> {
        let end = until.map_or(self.settled, |id| {
            self.settled.min(id.as_u128().saturating_add(1))
        });
        let start = after.map_or(0, |id| id.as_u128().saturating_add(1));
        if start >= end {
            return Ok(());
        }
        for entry in self.traces.range(start..end).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (trace, feedback, evaluation) = self.graded(k.value(), v.value())?;
            if !f(trace, feedback, evaluation) {
                break;
            }
        }
        Ok(())
    }

    /// Calls `f` on the traces before `before` (all, without it), newest first, with the
    /// feedback in force and the latest evaluation; `f` returns `false` to stop. Every trace
    /// in the snapshot, settled or not: a listing keeps no cursor that a trace still on its way
    /// could fall behind, and one long stream must not hide every trace that came after it.
    pub fn newest_first(
        &self,
        before: Option<TraceId>,
        mut f: impl FnMut(Trace, Option<Feedback>, Option<Evaluation>) -> bool,
    ) -> Result<(), StoreError> {
        let end = before.map_or(u128::MAX, TraceId::as_u128);
        for entry in self.traces.range(..end).map_err(db_err)?.rev() {
            let (k, v) = entry.map_err(db_err)?;
            let (trace, feedback, evaluation) = self.graded(k.value(), v.value())?;
            if !f(trace, feedback, evaluation) {
                break;
            }
        }
        Ok(())
    }

    /// The newest feedback or evaluation in this snapshot, or the id 0 when there is none: the
    /// snapshot holds exactly the feedback and evaluations up to it (their ids follow commit
    /// order). Grading a trace at this mark ([`GradedScan::graded_at`]) is grading it as this
    /// snapshot does, judge's scores included.
    pub fn feedback_mark(&self) -> Result<TraceId, StoreError> {
        let last = self.feedback_order.last().map_err(db_err)?;
        let feedback = TraceId::from_u128(last.map_or(0, |(id, _)| id.value()));
        Ok(super::feedback::evaluation_mark(&self.meta)?.map_or(feedback, |e| e.max(feedback)))
    }

    /// Calls `f` on each trace up to `upto` that got feedback after the mark `since` (see
    /// [`GradedScan::feedback_mark`]), with the feedback in force, its latest evaluation and the
    /// id of its latest feedback; `f` returns `false` to stop. A dataset's cut passes traces
    /// whose feedback is still to come: this is how a later dataset finds them.
    ///
    /// Traces come in the order of their latest feedback, so a walk stopped at a trace has dealt
    /// with exactly the traces whose latest feedback came before that trace's latest (see
    /// [`GradedScan::latest_feedback`]).
    pub fn late(
        &self,
        since: TraceId,
        upto: TraceId,
        mut f: impl FnMut(Trace, Option<Feedback>, Option<Evaluation>, TraceId) -> bool,
    ) -> Result<(), StoreError> {
        let from = since.as_u128().saturating_add(1);
        // Each trace's latest feedback: the arrival order is ascending, so the last one wins.
        let mut latest = std::collections::HashMap::new();
        for entry in self.feedback_order.range(from..).map_err(db_err)? {
            let (feedback, trace) = entry.map_err(db_err)?;
            if trace.value() <= upto.as_u128() {
                latest.insert(trace.value(), feedback.value());
            }
        }
        let mut order: Vec<(u128, u128)> = latest.into_iter().map(|(t, f)| (f, t)).collect();
        order.sort_unstable();
        for (feedback_id, key) in order {
            // Expired since its feedback came.
            let Some(stored) = self.traces.get(key).map_err(db_err)? else {
                continue;
            };
            let (trace, feedback, evaluation) = self.graded(key, stored.value())?;
            if !f(trace, feedback, evaluation, TraceId::from_u128(feedback_id)) {
                break;
            }
        }
        Ok(())
    }

    /// The id of the latest feedback on `trace` up to the mark `until`, if it has any.
    pub fn latest_feedback(
        &self,
        trace: TraceId,
        until: TraceId,
    ) -> Result<Option<TraceId>, StoreError> {
        let key = trace.as_u128();
        let last = self
            .feedback
            .range((key, 0)..=(key, until.as_u128()))
            .map_err(db_err)?
            .next_back();
        Ok(match last {
            Some(entry) => Some(TraceId::from_u128(entry.map_err(db_err)?.0.value().1)),
            None => None,
        })
    }

    /// The feedback in force for `trace` and its latest evaluation as they stood at `mark` (see
    /// [`GradedScan::feedback_mark`]): evaluation ids follow commit order like feedback ids.
    pub fn graded_at(
        &self,
        trace: TraceId,
        mark: TraceId,
    ) -> Result<(Option<Feedback>, Option<Evaluation>), StoreError> {
        let (key, until) = (trace.as_u128(), mark.as_u128());
        Ok((
            latest_of(&self.feedback, key, until)?,
            latest_of(&self.evaluations, key, until)?,
        ))
    }

    /// The trace stored under `key` as `bytes`, with the feedback in force and its latest
    /// evaluation.
    fn graded(
        &self,
        key: u128,
        bytes: &[u8],
    ) -> Result<(Trace, Option<Feedback>, Option<Evaluation>), StoreError> {
        let now = TraceId::from_u128(u128::MAX);
        let (feedback, evaluation) = self.graded_at(TraceId::from_u128(key), now)?;
        Ok((Trace::decode(bytes)?, feedback, evaluation))
    }
}
