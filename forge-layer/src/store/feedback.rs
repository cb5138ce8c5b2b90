//! Feedback from people and evaluation scores from graders, keyed by the trace they judge.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{EVALUATIONS, FEEDBACK, FEEDBACK_ORDER, META, Store, StoreError, TRACES, db_err};
use crate::trace::TraceId;

/// The META key of the newest evaluation's id.
const EVALUATION_MARK: &str = "evaluation_mark";

/// The newest evaluation's id, as recorded in the META table; none in a store without
/// evaluations (or from before the mark was kept, whose marks then cover feedback only).
pub(super) fn evaluation_mark(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<TraceId>, StoreError> {
    match meta.get(EVALUATION_MARK).map_err(db_err)? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
        None => Ok(None),
    }
}

/// One piece of feedback on a trace. Grading uses the latest piece alone
/// ([`Store::current_feedback`]): a score of 20 sent after an approval withdraws it, and a score
/// of 95 sent after a rejection lifts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    /// The trace judged.
    pub trace_id: TraceId,
    /// 0–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// A person approved (or rejected) the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<bool>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Unix milliseconds when it was recorded.
    pub time_ms: u64,
}

/// A grader's score for a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The trace judged.
    pub trace_id: TraceId,
    /// 0–100.
    pub score: f64,
    /// Who scored it, e.g. `judge:gpt-4o`.
    pub source: String,
    /// Unix milliseconds when it was recorded.
    pub time_ms: u64,
}

impl Store {
    /// Records feedback for an existing trace, in the same transaction that checks it exists.
    /// Returns whether the trace had no score before it, read in that same transaction: the
    /// canary guard counts one score per trace, and two first posts at once must not both count.
    pub fn add_feedback(&self, feedback: &Feedback) -> Result<bool, StoreError> {
        let unscored = self.add_feedback_batch(std::slice::from_ref(feedback))?;
        Ok(unscored.first().copied().unwrap_or(false))
    }

    /// Records many pieces of feedback in one transaction (imports, backfills): all or none.
    /// Each must name an existing trace. Returns, for each in order, whether its trace had no
    /// score before it.
    pub fn add_feedback_batch(&self, items: &[Feedback]) -> Result<Vec<bool>, StoreError> {
        let encoded = items
            .iter()
            .map(|f| serde_json::to_vec(f).map(|b| (f.trace_id, b)))
            .collect::<Result<Vec<_>, _>>()?;
        self.write(|txn| {
            let traces = txn.open_table(TRACES).map_err(db_err)?;
            let mut table = txn.open_table(FEEDBACK).map_err(db_err)?;
            let mut order = txn.open_table(FEEDBACK_ORDER).map_err(db_err)?;
            let mut unscored = Vec::with_capacity(encoded.len());
            for (trace, bytes) in &encoded {
                require_trace(&traces, *trace)?;
                let key = trace.as_u128();
                let (count, scored) = feedback_so_far(&table, key)?;
                if count >= MAX_FEEDBACK_PER_TRACE {
                    return Err(StoreError::FeedbackFull(*trace));
                }
                unscored.push(!scored);
                let id = TraceId::generate().as_u128();
                table.insert((key, id), bytes.as_slice()).map_err(db_err)?;
                order.insert(id, key).map_err(db_err)?;
            }
            Ok(unscored)
        })
    }

    /// All feedback for a trace, oldest first.
    pub fn feedback(&self, trace: TraceId) -> Result<Vec<Feedback>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(FEEDBACK).map_err(db_err)?;
            let key = trace.as_u128();
            let mut out = Vec::new();
            for entry in table.range((key, 0)..=(key, u128::MAX)).map_err(db_err)? {
                let (_, v) = entry.map_err(db_err)?;
                out.push(serde_json::from_slice(v.value())?);
            }
            Ok(out)
        })
    }

    /// The feedback in force for a trace: the latest piece of it.
    pub fn current_feedback(&self, trace: TraceId) -> Result<Option<Feedback>, StoreError> {
        self.read(|txn| {
            latest_of(
                &txn.open_table(FEEDBACK).map_err(db_err)?,
                trace.as_u128(),
                u128::MAX,
            )
        })
    }

    /// Records an evaluation result for an existing trace, checked in the same transaction (a
    /// judge's reply can come after its trace expired).
    pub fn add_evaluation(&self, evaluation: &Evaluation) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(evaluation)?;
        let trace = evaluation.trace_id;
        self.write(|txn| {
            require_trace(&txn.open_table(TRACES).map_err(db_err)?, trace)?;
            let id = TraceId::generate();
            let mut table = txn.open_table(EVALUATIONS).map_err(db_err)?;
            table
                .insert((trace.as_u128(), id.as_u128()), bytes.as_slice())
                .map_err(db_err)?;
            // Evaluations have no arrival-order table, as feedback has: a dataset's mark must
            // cover the newest, and ids follow commit order (made under the write lock).
            txn.open_table(META)
                .map_err(db_err)?
                .insert(EVALUATION_MARK, serde_json::to_vec(&id)?.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
    }

    /// The latest evaluation of a trace.
    pub fn latest_evaluation(&self, trace: TraceId) -> Result<Option<Evaluation>, StoreError> {
        self.read(|txn| {
            latest_of(
                &txn.open_table(EVALUATIONS).map_err(db_err)?,
                trace.as_u128(),
                u128::MAX,
            )
        })
    }
}

#[cfg(test)]
impl Store {
    /// Each piece of feedback's id and its trace, in the order the feedback arrived.
    pub(super) fn feedback_arrivals(&self) -> Result<Vec<(TraceId, TraceId)>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(FEEDBACK_ORDER).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)? {
                let (id, trace) = entry.map_err(db_err)?;
                out.push((
                    TraceId::from_u128(id.value()),
                    TraceId::from_u128(trace.value()),
                ));
            }
            Ok(out)
        })
    }

    /// Empties the arrival order, as a store from before it was kept has it.
    pub(super) fn forget_feedback_order(&self) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(FEEDBACK_ORDER)
                .map_err(db_err)?
                .retain(|_, _| false)
                .map_err(db_err)
        })
    }
}

/// `NoSuchTrace` unless `trace` is stored. Called in the write transaction that adds to it, so
/// that nothing is added to a trace deleted meanwhile (for age).
fn require_trace(
    traces: &impl ReadableTable<u128, &'static [u8]>,
    trace: TraceId,
) -> Result<(), StoreError> {
    match traces.get(trace.as_u128()).map_err(db_err)? {
        Some(_) => Ok(()),
        None => Err(StoreError::NoSuchTrace(trace)),
    }
}

/// The most feedback one trace takes. Adding feedback reads the trace's earlier feedback under
/// the store's write lock, which the trace writer waits for too: without a bound, one client
/// posting to one trace over and over would make each post slower than the last, and stall
/// capture behind it.
pub const MAX_FEEDBACK_PER_TRACE: usize = 100;

/// How many pieces of feedback keyed `(trace, *)` there are (counting no further than the
/// bound), and whether any holds a score (decoding none after the first that does).
fn feedback_so_far(
    table: &impl ReadableTable<(u128, u128), &'static [u8]>,
    trace: u128,
) -> Result<(usize, bool), StoreError> {
    let (mut count, mut scored) = (0, false);
    for entry in table
        .range((trace, 0)..=(trace, u128::MAX))
        .map_err(db_err)?
        .take(MAX_FEEDBACK_PER_TRACE)
    {
        let entry = entry.map_err(db_err)?;
        count += 1;
        if !scored {
            let feedback: Feedback = serde_json::from_slice(entry.1.value())?;
            scored = feedback.score.is_some();
        }
    }
    Ok((count, scored))
}

/// The last record keyed `(trace, *)` whose id is at most `until` (`u128::MAX`: of all) in a
/// feedback-shaped table: the latest one, since the second half of the key is a time-ordered id.
pub(super) fn latest_of<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<(u128, u128), &'static [u8]>,
    trace: u128,
    until: u128,
) -> Result<Option<T>, StoreError> {
    match table
        .range((trace, 0)..=(trace, until))
        .map_err(db_err)?
        .next_back()
    {
        Some(entry) => Ok(Some(serde_json::from_slice(
            entry.map_err(db_err)?.1.value(),
        )?)),
        None => Ok(None),
    }
}
