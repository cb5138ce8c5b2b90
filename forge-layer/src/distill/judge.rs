//! The judge grader: a background task that scores a sample of new teacher traces with a judge
//! model, rate-limited and capped per day. A judge failure records nothing, so it can never make
//! a trace golden.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::evaluate::{ChatClient, judge_messages, parse_score, question_of};
use super::service::JudgeModel;
use crate::grade::GoldenPolicy;
use crate::store::{Evaluation, Store, StoreError};
use crate::trace::{Trace, TraceId, now_ms};

/// The judge grader's settings.
#[derive(Debug, Clone)]
pub struct JudgeSettings {
    /// The judge model.
    pub model: JudgeModel,
    /// Share of eligible new traces judged, percent (decided by trace id, so deterministic).
    pub sample_percent: f64,
    /// Judgements per minute at most.
    pub max_per_minute: u32,
    /// Judgements per day at most: the cost cap.
    pub max_per_day: u32,
    /// How often new traces are looked for.
    pub every: Duration,
}

const CURSOR: &str = "judge_cursor";
/// Refused traces that wait for the judge's first answer, at most: past them, the judge is taken
/// to take no request at all, and asking it more only costs calls.
const MAX_WAITING_REFUSALS: usize = 10_000;
/// The day (days since the epoch, UTC) and the judgements made in it, kept in the store: the
/// daily cap is a cost cap, and a gateway restarted in a loop must not spend it afresh each time.
const DAY_COUNT: &str = "judge_day";

/// The last trace the judge has looked at: every trace up to it is scored or passed over for
/// good. `None` before its first look.
pub fn judged_until(store: &Store) -> Result<Option<TraceId>, StoreError> {
    store.meta(CURSOR)
}

/// Runs the grader until `stop`.
pub async fn run(
    store: Store,
    chat: Arc<dyn ChatClient>,
    settings: JudgeSettings,
    mut stop: watch::Receiver<bool>,
) {
    let mut minute = (Instant::now(), 0u32);
    // The day's count, read from the store before the first judgement.
    let mut day = (0u64, 0u32);
    let mut day_read = false;
    // Whether the judge has taken a request since start. Until it has, a refusal may be the
    // judge's own fault (a model that takes no such request at all), so nothing is passed over.
    let mut judge_answers = false;
    // Meanwhile, the traces it refused: each waits, and is not asked again until it has.
    let mut refused: HashSet<TraceId> = HashSet::new();
    // Traces answered with no score while the cursor was held: passed over, never asked again,
    // though the cursor has yet to pass them.
    let mut unscored: HashSet<TraceId> = HashSet::new();
    // A score the store failed to take. It is stored before anything else: the judgement was
    // paid for, and asking again would pay twice.
    let mut unstored: Option<Evaluation> = None;
    // What this judge's evaluations are recorded as.
    let source = format!("judge:{}", settings.model.model);
    let mut ticks = tokio::time::interval(settings.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => {
                // A last try: after a restart the trace, with no score, is judged again.
                if let Some(evaluation) = unstored.take() {
                    store_evaluation(&store, &evaluation).await;
                }
                return;
            }
            _ = ticks.tick() => {}
        }
        if let Some(evaluation) = unstored.take()
            && !store_evaluation(&store, &evaluation).await
        {
            unstored = Some(evaluation);
            continue;
        }
        let cursor: Option<TraceId> = match store.meta(CURSOR) {
            Ok(cursor) => cursor,
            // The store being reopened: the cursor is there, just not readable yet. Starting
            // from the first trace would judge every trace again.
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "judge: cannot read its cursor yet; waiting for the next round");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "judge: its cursor is unreadable; starting again from the first trace");
                None
            }
        };
        if !day_read {
            // Counting from 0 instead could spend the day's cap twice: no judging until read.
            match stored_day_count(&store).await {
                Ok(Ok(stored)) => (day, day_read) = (stored, true),
                // Unreadable for good (a value that does not decode): today's cap counts as
                // spent, and tomorrow's count replaces the value.
                Ok(Err(e)) if !e.is_transient() => {
                    tracing::error!(error = %e, "judge: today's count is unreadable; no more judging until tomorrow (UTC)");
                    (day, day_read) = ((today(), settings.max_per_day), true);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "judge: cannot read today's count yet; waiting for the next round");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "judge: the read of today's count failed; trying again next round");
                    continue;
                }
            }
        }
        // Once the judge has answered, the traces it refused are tried again, and passed over.
        if judge_answers {
            refused.clear();
        }
        unscored.retain(|id| cursor.is_none_or(|c| *id > c));
        let skip = refused.union(&unscored).copied().collect();
        let (batch, scanned, scored_before) = match pending(
            &store,
            cursor,
            settings.sample_percent,
            skip,
            source.clone(),
        )
        .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(error = %e, "judge: cannot read traces");
                continue;
            }
        };
        // Its scores past the cursor, from before a restart, show the judge takes requests.
        judge_answers |= scored_before;
        // Held by a refusal that is not passed over (this round's, or one still waiting): the
        // cursor stays before that trace, and the traces after it are still judged, which shows
        // whether the judge takes any.
        let mut held = !refused.is_empty();
        let mut finished = !held;
        // The last trace passed over for its refusal, while its cursor is not stored yet.
        let mut passed_over = None;
        for trace in batch {
            if minute.0.elapsed() >= Duration::from_secs(60) {
                minute = (Instant::now(), 0);
            }
            let now = today();
            if day.0 != now {
                day = (now, 0);
            }
            if refused.len() >= MAX_WAITING_REFUSALS
                || day.1 >= settings.max_per_day
                || minute.1 >= settings.max_per_minute
            {
                // The rest waits for the next window (past the refusals' limit, for a restart);
                // the cursor stays before them.
                finished = false;
                break;
            }
            minute.1 += 1;
            day.1 += 1;
            // Counted before the call: a crash during it must not give the judgement back.
            store_meta(&store, DAY_COUNT, day).await;
            let answer = trace
                .response
                .choices
                .first()
                .map(|c| c.message.answer_text());
            let question = question_of(&trace.request["messages"]);
            let prompt = judge_messages(&question, &answer.unwrap_or_default(), None);
            let reply = tokio::select! {
                reply = chat.complete(
                    &settings.model.upstream,
                    &settings.model.model,
                    &prompt,
                    None,
                ) => reply,
                // A judge call may take minutes; shutdown must not wait for it. Abandoned, it
                // stays counted, as in a crash (the provider may bill it all the same), and the
                // trace, behind the cursor, is judged after a restart.
                _ = stop.changed() => return,
            };
            judge_answers |= reply.is_ok();
            match reply {
                Ok(reply) => match parse_score(&reply) {
                    Some(score) => {
                        let evaluation = Evaluation {
                            trace_id: trace.id,
                            score,
                            source: source.clone(),
                            time_ms: now_ms(),
                        };
                        if !store_evaluation(&store, &evaluation).await {
                            // The cursor stays before the trace, and the round ends: the
                            // store is failing, and the next round stores this score first.
                            unstored = Some(evaluation);
                            finished = false;
                            break;
                        }
                    }
                    None => {
                        tracing::warn!(trace_id = %trace.id, reply = %reply.chars().take(80).collect::<String>(), "judge: no score in the reply; passing over it");
                        if held {
                            unscored.insert(trace.id);
                        }
                    }
                },
                // The judge refused this trace itself (a 400: longer than its context, say),
                // and would refuse it again. Once the judge has taken other requests, the
                // trace is passed over: else every later trace would wait behind it for good,
                // and with them every dataset. The call cost nothing.
                Err(e) if e.refused => {
                    // Given back in memory only: the next judgement stores the count, and a crash
                    // before it leaves the count high, which a cost cap may be.
                    day.1 = day.1.saturating_sub(1);
                    if judge_answers {
                        tracing::warn!(trace_id = %trace.id, error = %e, "judge: it refused this trace; passing over it");
                        // Stored with the next judgement or at the round's end: asking again
                        // after a crash costs nothing, and a run of refusals costs no commits.
                        passed_over = Some(trace.id);
                    } else {
                        tracing::warn!(trace_id = %trace.id, error = %e, "judge: it refused this trace and has taken no request yet; the trace waits, and the next ones are tried (check [judge] model if this goes on)");
                        refused.insert(trace.id);
                        held = true;
                        finished = false;
                        if refused.len() == MAX_WAITING_REFUSALS {
                            tracing::error!(
                                "judge: {MAX_WAITING_REFUSALS} traces refused and none taken; no more judging until a restart (check [judge] model)"
                            );
                        }
                    }
                    continue;
                }
                // The judge is down or refusing Forge: this trace and the rest wait for the
                // next round, behind the cursor. Passing over them would keep each from ever
                // being scored, and so from becoming golden through the judge.
                Err(e) => {
                    tracing::warn!(trace_id = %trace.id, error = %e, "judge: request failed; trying again next round");
                    // No judgement was had: given back, or a judge that is down for hours
                    // (one failed call a round) would spend the day's cap on nothing.
                    day.1 = day.1.saturating_sub(1);
                    store_meta(&store, DAY_COUNT, day).await;
                    finished = false;
                    break;
                }
            }
            if !held {
                store_meta(&store, CURSOR, trace.id).await;
                passed_over = None;
            }
        }
        // Traces that were not sampled are passed over for good.
        if finished && let Some(last) = scanned {
            store_meta(&store, CURSOR, last).await;
        } else if !held && let Some(last) = passed_over {
            store_meta(&store, CURSOR, last).await;
        }
    }
}

/// Days since the epoch, UTC: the cap's day.
fn today() -> u64 {
    now_ms() / 86_400_000
}

/// Today's judgements so far, as stored (none if the stored count is from another day).
async fn stored_day_count(
    store: &Store,
) -> Result<Result<(u64, u32), StoreError>, tokio::task::JoinError> {
    let reader = store.clone();
    let stored = tokio::task::spawn_blocking(move || reader.meta::<(u64, u32)>(DAY_COUNT)).await?;
    let now = today();
    Ok(stored.map(|stored| match stored {
        Some((d, n)) if d == now => (d, n),
        _ => (now, 0),
    }))
}

/// Stores a score off the async runtime. False when the store failed to take it: the caller
/// keeps it for later. A trace deleted for its age meanwhile needs no score.
async fn store_evaluation(store: &Store, evaluation: &Evaluation) -> bool {
    let (writer, evaluation) = (store.clone(), evaluation.clone());
    let trace = evaluation.trace_id;
    match tokio::task::spawn_blocking(move || writer.add_evaluation(&evaluation)).await {
        Ok(Ok(())) => true,
        Ok(Err(StoreError::NoSuchTrace(_))) => {
            tracing::debug!(trace_id = %trace, "judge: the trace expired before its evaluation");
            true
        }
        Ok(Err(e)) => {
            tracing::error!(trace_id = %trace, error = %e, "judge: evaluation not stored; trying again next round");
            false
        }
        Err(e) => {
            tracing::error!(trace_id = %trace, error = %e, "judge: evaluation task failed; trying again next round");
            false
        }
    }
}

/// Stores the judge's cursor or count off the async runtime: a write waits for its commit's
/// fsyncs, and on a small machine a runtime thread held there is half of what serves requests.
async fn store_meta<T: serde::Serialize + Send + 'static>(
    store: &Store,
    key: &'static str,
    value: T,
) {
    let writer = store.clone();
    match tokio::task::spawn_blocking(move || writer.put_meta(key, &value)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, key, "judge: not stored"),
        Err(e) => tracing::error!(error = %e, key, "judge: store task failed"),
    }
}

/// Teacher traces after the cursor that could be golden, sampled, without an evaluation yet,
/// and not in `skip` (refused and waiting for the judge's first answer, or answered with no
/// score: left out, so that a run of them cannot fill every batch); the last trace looked at;
/// and whether a trace after the cursor holds a score from `source`, this judge.
async fn pending(
    store: &Store,
    cursor: Option<TraceId>,
    sample_percent: f64,
    skip: HashSet<TraceId>,
    source: String,
) -> Result<(Vec<Trace>, Option<TraceId>, bool), String> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let policy = GoldenPolicy::default();
        let threshold = (sample_percent.clamp(0.0, 100.0) * 100.0) as u128;
        let mut out = Vec::new();
        let mut last = None;
        let mut scored_here = false;
        store
            .for_each_graded_trace(cursor, |trace, _, evaluation| {
                last = Some(trace.id);
                scored_here |= evaluation.as_ref().is_some_and(|e| e.source == source);
                if evaluation.is_none()
                    && !skip.contains(&trace.id)
                    && policy.is_candidate(&trace)
                    && trace.id.as_u128() % 10_000 < threshold
                {
                    out.push(trace);
                }
                out.len() < 500
            })
            .map_err(|e| e.to_string())?;
        Ok((out, last, scored_here))
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use serde_json::Value;

    use super::*;
    use crate::distill::{BoxFuture, ChatError};

    /// A judge that scores every answer 95, except a question holding `refused_word`, which it
    /// refuses (as a judge with a shorter context refuses a long trace), one holding `MUMBLE`,
    /// which it answers with no score, and everything while `down`. It keeps every prompt.
    #[derive(Debug)]
    struct Judge {
        refused_word: &'static str,
        down: bool,
        prompts: Mutex<Vec<String>>,
        /// Armed by each call, when set: the disk's next sync fails.
        disk_fault: Option<Arc<AtomicBool>>,
    }

    impl Judge {
        fn new(refused_word: &'static str, down: bool) -> Self {
            Self {
                refused_word,
                down,
                prompts: Mutex::new(Vec::new()),
                disk_fault: None,
            }
        }

        fn calls(&self) -> usize {
            self.prompts.lock().unwrap().len()
        }

        fn asked(&self, word: &str) -> usize {
            let prompts = self.prompts.lock().unwrap();
            prompts.iter().filter(|p| p.contains(word)).count()
        }
    }

    impl ChatClient for Judge {
        fn complete<'a>(
            &'a self,
            _upstream: &'a str,
            _model: &'a str,
            messages: &'a Value,
            _tools: Option<&'a Value>,
        ) -> BoxFuture<'a, Result<String, ChatError>> {
            let prompt = messages[1]["content"].as_str().unwrap_or_default();
            self.prompts.lock().unwrap().push(prompt.to_string());
            if let Some(fault) = &self.disk_fault {
                fault.store(true, Ordering::SeqCst);
            }
            let answer = if self.down {
                Err(ChatError::transient(
                    "judge answered 503 Service Unavailable",
                ))
            } else if prompt.contains(self.refused_word) {
                Err(ChatError::refused(
                    "judge answered 400 Bad Request: context_length_exceeded",
                ))
            } else if prompt.contains("MUMBLE") {
                Ok("I cannot tell.".to_string())
            } else {
                Ok("95".to_string())
            };
            Box::pin(async move { answer })
        }
    }

    fn settings() -> JudgeSettings {
        JudgeSettings {
            model: JudgeModel {
                upstream: "u".into(),
                model: "judge".into(),
            },
            sample_percent: 100.0,
            max_per_minute: 100_000,
            max_per_day: 100_000,
            every: Duration::from_millis(20),
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stores `traces` and starts the judge on them.
    fn judging(
        traces: &[Trace],
        judge: Judge,
    ) -> (tempfile::TempDir, Store, Arc<Judge>, watch::Sender<bool>) {
        let (dir, store) = stored(traces);
        let (judge, stop) = start(&store, judge, settings());
        (dir, store, judge, stop)
    }

    /// A store holding `traces`.
    fn stored(traces: &[Trace]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(dir.path()).unwrap();
        for t in traces {
            let bytes = serde_json::to_vec(t).unwrap();
            store.insert_encoded([(t.id, bytes.as_slice())]).unwrap();
        }
        (dir, store)
    }

    fn start(
        store: &Store,
        judge: Judge,
        settings: JudgeSettings,
    ) -> (Arc<Judge>, watch::Sender<bool>) {
        let judge = Arc::new(judge);
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(run(store.clone(), judge.clone(), settings, stopped));
        (judge, stop)
    }

    fn questions(word: &str, n: usize) -> Vec<Trace> {
        (0..n)
            .map(|i| Trace::sample("a", &format!("{word} {i}")))
            .collect()
    }

    #[tokio::test]
    async fn traces_the_judge_refuses_are_passed_over_and_the_later_ones_are_judged() {
        // More refused traces in a row than a batch holds, before the first it takes.
        let mut traces = questions("HUGE", 505);
        traces.extend(questions("question", 3));
        let judge = Judge::new("HUGE", false);
        let (_dir, store, _judge, stop) = judging(&traces, judge);
        let last = traces.last().unwrap().id;
        until("every trace judged or passed over", || {
            judged_until(&store).unwrap() == Some(last)
        })
        .await;
        let evaluated = |t: &Trace| store.latest_evaluation(t.id).unwrap().is_some();
        assert!(traces[505..].iter().all(evaluated));
        assert!(
            !traces[..505].iter().any(evaluated),
            "a refusal records no score"
        );
        // The refusals cost nothing: the stored count is the three judgements, and at most the
        // call that was on its way when it was last stored, not a thousand refusals.
        let (_, count): (u64, u32) = store.meta(DAY_COUNT).unwrap().unwrap();
        assert!((3..=4).contains(&count), "{count}");
        stop.send(true).unwrap();
    }

    #[tokio::test]
    async fn a_judge_that_refuses_every_trace_passes_none_over() {
        let traces = questions("question", 5);
        let judge = Judge::new("question", false);
        let (_dir, store, judge, stop) = judging(&traces, judge);
        until("every trace tried", || judge.calls() >= 5).await;
        // Rounds go on (every 20 ms); none asks again, and none passes a trace over.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(judge.calls(), 5, "each refused trace asked once");
        assert_eq!(judged_until(&store).unwrap(), None, "nothing passed over");
        stop.send(true).unwrap();
    }

    #[tokio::test]
    async fn a_judge_that_is_down_leaves_every_trace_for_later() {
        let traces = questions("question", 4);
        let judge = Judge::new("HUGE", true);
        let (_dir, store, judge, stop) = judging(&traces, judge);
        until("three rounds of calls", || judge.calls() >= 3).await;
        assert!(
            traces
                .iter()
                .all(|t| store.latest_evaluation(t.id).unwrap().is_none())
        );
        assert_eq!(judged_until(&store).unwrap(), None, "nothing passed over");
        stop.send(true).unwrap();
    }

    #[tokio::test]
    async fn a_reply_with_no_score_is_asked_once_while_a_refused_trace_waits() {
        let mut traces = questions("HUGE", 1);
        traces.extend(questions("MUMBLE", 1));
        traces.extend(questions("question", 1));
        let (_dir, store, judge, stop) = judging(&traces, Judge::new("HUGE", false));
        let last = traces.last().unwrap().id;
        until("every trace judged or passed over", || {
            judged_until(&store).unwrap() == Some(last)
        })
        .await;
        assert_eq!(
            judge.asked("MUMBLE"),
            1,
            "a trace answered is not asked again"
        );
        assert_eq!(judge.asked("question"), 1);
        stop.send(true).unwrap();
    }

    #[tokio::test]
    async fn after_a_restart_the_judges_own_scores_let_a_waiting_trace_be_passed_over() {
        let mut traces = questions("HUGE", 1);
        traces.extend(questions("question", 3));
        let (_dir, store) = stored(&traces);
        // One round (the next is a minute away): the refused trace waits, the others are scored.
        let once = JudgeSettings {
            every: Duration::from_secs(60),
            ..settings()
        };
        let (_, stop) = start(&store, Judge::new("HUGE", false), once);
        let evaluated = |t: &Trace| store.latest_evaluation(t.id).unwrap().is_some();
        until("the later traces scored", || {
            traces[1..].iter().all(evaluated)
        })
        .await;
        stop.send(true).unwrap();
        assert_eq!(judged_until(&store).unwrap(), None, "held by the refusal");
        // Restarted, with no new trace to show that the judge answers: its scores show it.
        let (_, stop) = start(&store, Judge::new("HUGE", false), settings());
        let last = traces.last().unwrap().id;
        until("the refused trace passed over", || {
            judged_until(&store).unwrap() == Some(last)
        })
        .await;
        stop.send(true).unwrap();
    }

    /// redb's in-memory disk, whose next sync fails while `fault` is set (the flag then clears),
    /// as a full or failing disk fails a commit. Clones share it, so the store can reopen on it.
    #[derive(Debug, Clone, Default)]
    struct FaultyDisk {
        disk: Arc<redb::backends::InMemoryBackend>,
        fault: Arc<AtomicBool>,
    }

    impl redb::StorageBackend for FaultyDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.disk.len()
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.disk.read(offset, out)
        }

        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.disk.set_len(len)
        }

        fn sync_data(&self) -> Result<(), std::io::Error> {
            if self.fault.swap(false, Ordering::SeqCst) {
                return Err(std::io::Error::other("injected: the disk failed a sync"));
            }
            self.disk.sync_data()
        }

        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.disk.write(offset, data)
        }
    }

    /// A store on a [`FaultyDisk`] holding `trace`, and a judge whose call arms the disk's
    /// fault, so that the commit of its score fails.
    fn judged_on_a_faulty_disk(
        trace: &Trace,
        settings: JudgeSettings,
    ) -> (Store, FaultyDisk, Arc<Judge>, watch::Sender<bool>) {
        let disk = FaultyDisk::default();
        drop(
            redb::Database::builder()
                .create_with_backend(disk.clone())
                .unwrap(),
        );
        let store = Store::open_backend(std::path::Path::new("faulty-disk"), disk.clone(), 1 << 20)
            .unwrap();
        let bytes = serde_json::to_vec(trace).unwrap();
        store
            .insert_encoded([(trace.id, bytes.as_slice())])
            .unwrap();
        let judge = Judge {
            disk_fault: Some(disk.fault.clone()),
            ..Judge::new("HUGE", false)
        };
        let (judge, stop) = start(&store, judge, settings);
        (store, disk, judge, stop)
    }

    #[tokio::test]
    async fn a_score_the_store_fails_to_take_is_stored_later_without_asking_again() {
        let traces = questions("question", 1);
        let (store, _disk, judge, stop) = judged_on_a_faulty_disk(&traces[0], settings());
        until("the trace judged", || {
            judged_until(&store).ok().flatten() == Some(traces[0].id)
        })
        .await;
        let evaluation = store.latest_evaluation(traces[0].id).unwrap();
        assert_eq!(evaluation.map(|e| e.score), Some(95.0), "the score is kept");
        assert_eq!(judge.calls(), 1, "and not paid for twice");
        stop.send(true).unwrap();
    }

    #[tokio::test]
    async fn a_score_not_stored_yet_gets_a_last_try_at_shutdown() {
        let traces = questions("question", 1);
        // One round: the next is a minute away, after the shutdown.
        let once = JudgeSettings {
            every: Duration::from_secs(60),
            ..settings()
        };
        let (store, disk, judge, stop) = judged_on_a_faulty_disk(&traces[0], once);
        until("the score's commit failed", || {
            judge.calls() == 1 && !disk.fault.load(Ordering::SeqCst)
        })
        .await;
        // The store takes writes again (it reopens on its disk after the error).
        until("the store writable", || store.put_meta("probe", &1).is_ok()).await;
        stop.send(true).unwrap();
        until("the score stored", || {
            store
                .latest_evaluation(traces[0].id)
                .ok()
                .flatten()
                .is_some()
        })
        .await;
    }
}
