//! The store: round trips, ordering, feedback, and the writer's counters and modes.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use forge_router::Arm;
use redb::ReadableDatabase;

use super::*;
use crate::capture::{BodyEnd, CaptureSession, ExchangeMeta};

fn pending(content: &str) -> crate::capture::PendingTrace {
    pending_as(Ticket::untracked(), content)
}

fn pending_as(ticket: Ticket, content: &str) -> crate::capture::PendingTrace {
    let meta = ExchangeMeta {
        tenant: None,
        key_id: Some("app".into()),
        alias: "a".into(),
        upstream: "u".into(),
        model: "m".into(),
        arm: Arm::Teacher,
        route_version: 1,
        stream: false,
        canary: false,
    };
    let request =
        format!(r#"{{"model":"a","messages":[{{"role":"user","content":"{content}"}}]}}"#);
    let mut s = CaptureSession::new(ticket, meta, Bytes::from(request), 1 << 20);
    s.on_response(200, false);
    s.on_chunk(&Bytes::from_static(br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#));
    s.finish(BodyEnd::Complete)
}

async fn write_all(
    store: &Store,
    config: WriterConfig,
    traces: Vec<crate::capture::PendingTrace>,
) -> CounterSnapshot {
    let (writer, task) = TraceWriter::start(store.clone(), config);
    let counters = writer.counters_handle();
    for t in traces {
        if let Some(ack) = writer.submit(t) {
            assert!(ack.await, "durable commit acknowledged");
        }
    }
    drop(writer);
    task.join().await;
    counters.snapshot()
}

#[tokio::test]
async fn traces_round_trip_newest_first_and_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let traces: Vec<_> = (0..5)
        .map(|i| pending(&format!("q{i} sk-abcdefghijklmnopqrstuvwx{i}")))
        .collect();
    let ids: Vec<_> = traces.iter().map(|t| t.id()).collect();
    let counts = write_all(&store, WriterConfig::default(), traces).await;
    assert_eq!(
        (counts.eligible, counts.captured, counts.pending),
        (5, 5, 0)
    );

    let recent = store.recent_traces(None, 3, |_| true).unwrap();
    assert_eq!(
        recent.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![ids[4], ids[3], ids[2]]
    );
    let older = store.recent_traces(Some(ids[2]), 10, |_| true).unwrap();
    assert_eq!(older.len(), 2);
    let one = store.trace(ids[0]).unwrap().unwrap();
    assert_eq!(
        one.request["messages"][0]["content"],
        "q0 [REDACTED:openai_key]"
    );
    assert_eq!(
        one.response.choices[0].message.content.as_deref(),
        Some("ok")
    );
    assert_eq!(one.key_id.as_deref(), Some("app"));
    let mut seen = Vec::new();
    store
        .for_each_trace(|t| {
            seen.push(t.id);
            true
        })
        .unwrap();
    assert_eq!(seen, ids, "export order is oldest first");
    let bytes = std::fs::read(store.path()).unwrap();
    let needle = b"sk-abcdefghijklmnopqrstuvwx";
    assert!(
        !bytes.windows(needle.len()).any(|w| w == needle),
        "no key in the file's bytes"
    );
}

#[tokio::test]
async fn feedback_needs_a_trace_and_the_latest_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let t = pending("hello");
    let id = t.id();
    write_all(&store, WriterConfig::default(), vec![t]).await;
    let fb = |score: f64| Feedback {
        trace_id: id,
        score: Some(score),
        approved: None,
        comment: None,
        time_ms: 0,
    };
    let approval = Feedback {
        score: None,
        approved: Some(true),
        ..fb(0.0)
    };
    // Each add says whether the trace had a score before it: the guard counts the first only.
    assert!(store.add_feedback(&approval).unwrap(), "no score yet");
    assert!(store.add_feedback(&fb(40.0)).unwrap(), "the first score");
    assert!(!store.add_feedback(&fb(95.0)).unwrap(), "scored before");
    assert_eq!(
        store.current_feedback(id).unwrap().unwrap().score,
        Some(95.0)
    );
    assert_eq!(store.feedback(id).unwrap().len(), 3);
    let missing = Feedback {
        trace_id: crate::trace::TraceId::generate(),
        ..fb(1.0)
    };
    assert!(matches!(
        store.add_feedback(&missing),
        Err(StoreError::NoSuchTrace(_))
    ));
    // One trace takes a bounded number: each add reads the earlier ones under the write lock.
    for _ in 3..crate::store::MAX_FEEDBACK_PER_TRACE {
        store.add_feedback(&approval).unwrap();
    }
    assert!(matches!(
        store.add_feedback(&fb(5.0)),
        Err(StoreError::FeedbackFull(_))
    ));
    assert_eq!(
        store.feedback(id).unwrap().len(),
        crate::store::MAX_FEEDBACK_PER_TRACE
    );
    // What was in force stays so: the last approval, not the refused score.
    let current = store.current_feedback(id).unwrap().unwrap();
    assert_eq!((current.score, current.approved), (None, Some(true)));
}

#[tokio::test]
async fn durable_mode_acknowledges_each_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let config = WriterConfig {
        mode: CaptureMode::Durable,
        queue_capacity: 2,
        ..Default::default()
    };
    let counts = write_all(
        &store,
        config,
        (0..10).map(|i| pending(&format!("d{i}"))).collect(),
    )
    .await;
    assert_eq!(
        (counts.captured, counts.dropped),
        (10, 0),
        "durable mode waits for room instead of dropping"
    );
    assert_eq!(store.trace_count().unwrap(), 10);
}

#[tokio::test]
async fn second_open_of_a_busy_file_says_how_to_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let _store = Store::open_dir(dir.path()).unwrap();
    let err = Store::open_dir(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::InUse(_)));
    assert!(err.to_string().contains("--admin"), "{err}");
    assert!(err.to_string().contains("capture.data_dir"), "{err}");
}

/// A store in `dir` holding one trace, written before stores kept their format version: the
/// file, and the trace's id.
fn store_from_before_the_format_mark(dir: &std::path::Path) -> (std::path::PathBuf, TraceId) {
    let id = TraceId::earliest_at(5_000);
    {
        let store = Store::open_dir(dir).unwrap();
        assert_eq!(store.format().unwrap(), STORE_FORMAT);
        store.insert_encoded([(id, &b"{}"[..])]).unwrap();
    }
    let path = dir.join(STORE_FILE);
    let db = redb::Database::create(&path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut meta = txn.open_table(META).unwrap();
        assert!(meta.remove(FORMAT_KEY).unwrap().is_some());
    }
    txn.commit().unwrap();
    (path, id)
}

#[test]
fn the_list_of_tables_names_every_table_the_store_creates() {
    use redb::TableHandle;
    let defined = [
        TRACES.name(),
        FEEDBACK.name(),
        FEEDBACK_ORDER.name(),
        EVALUATIONS.name(),
        ROUTES.name(),
        ROUTE_HISTORY.name(),
        JOBS.name(),
        MODELS.name(),
        META.name(),
    ];
    assert_eq!(TABLES, defined);
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open_dir(dir.path()).unwrap());
    let store = Store::open_existing_dir(dir.path()).unwrap();
    assert_eq!(store.missing_table().unwrap(), None);
}

#[test]
fn a_store_from_before_a_table_existed_is_read_after_the_table_is_added() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open_dir(dir.path()).unwrap();
        store
            .insert_encoded([(TraceId::earliest_at(5_000), &b"{}"[..])])
            .unwrap();
    }
    {
        let db = redb::Database::create(dir.path().join(STORE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        assert!(txn.delete_table(FEEDBACK_ORDER).unwrap());
        txn.commit().unwrap();
    }
    // A reading command that needs the table (a dataset's snapshot) finds it.
    let store = Store::open_existing_dir(dir.path()).unwrap();
    assert_eq!(store.missing_table().unwrap(), None);
    store.with_graded_snapshot(|_| Ok(())).unwrap();
    assert_eq!(store.trace_count().unwrap(), 1);
}

#[test]
fn a_command_that_only_reads_opens_the_store_read_only_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // From before the format was kept: a writable open would add it.
    let (path, _) = store_from_before_the_format_mark(dir.path());
    let before = std::fs::read(&path).unwrap();

    let store = Store::open_existing_dir(dir.path()).unwrap();
    assert_eq!(store.trace_count().unwrap(), 1);
    assert_eq!(store.format().unwrap(), 1);
    assert_eq!(store.meta::<u64>(FORMAT_KEY).unwrap(), None);
    let refused = store.put_meta("x", &1).unwrap_err();
    assert!(matches!(refused, StoreError::ReadOnly(_)), "{refused:?}");
    // Readers share the file; a writer cannot have it meanwhile, nor it a writer's.
    let second = Store::open_existing_dir(dir.path()).unwrap();
    assert_eq!(second.trace_count().unwrap(), 1);
    assert!(matches!(
        Store::open_dir(dir.path()),
        Err(StoreError::InUse(_))
    ));
    drop((store, second));
    assert_eq!(std::fs::read(&path).unwrap(), before, "not a byte changed");

    let _writer = Store::open_dir(dir.path()).unwrap();
    let busy = Store::open_existing_dir(dir.path()).unwrap_err();
    assert!(matches!(busy, StoreError::InUse(_)), "{busy:?}");
}

#[tokio::test]
async fn dropped_durable_wait_counts_as_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let stall = store.hold_write_lock().unwrap();
    let config = WriterConfig {
        mode: CaptureMode::Durable,
        queue_capacity: 1,
        batch_max: 1,
        ..Default::default()
    };
    let (writer, task) = TraceWriter::start(store.clone(), config);
    let counters = writer.counters_handle();
    // The first is taken by the (stalled) writer, the second fills the queue, the third waits.
    let acks: Vec<_> = (0..3)
        .map(|i| writer.submit(pending(&format!("w{i}"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(acks);
    drop(stall);
    drop(writer);
    task.join().await;
    let c = counters.snapshot();
    assert_eq!(c.eligible, 3);
    assert!(c.dropped >= 1, "a wait for room given up is a drop: {c:?}");
    assert_eq!(c.captured + c.dropped + c.failed, 3, "{c:?}");
    assert_eq!(store.trace_count().unwrap(), c.captured);
}

#[tokio::test]
async fn a_durable_wait_past_its_bound_fails_and_the_trace_is_still_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let stall = store.hold_write_lock().unwrap();
    let config = WriterConfig {
        mode: CaptureMode::Durable,
        durable_wait: Duration::from_millis(100),
        ..Default::default()
    };
    let (writer, task) = TraceWriter::start(store.clone(), config);
    let counters = writer.counters_handle();
    let ack = writer.submit(pending("stalled")).unwrap();
    // The store is held: only the bound can end the wait, and it ends it as a failure.
    let waited = tokio::time::timeout(Duration::from_secs(60), ack).await;
    assert_eq!(waited, Ok(false), "a wait past the bound is not a commit");
    drop(stall);
    drop(writer);
    task.join().await;
    let c = counters.snapshot();
    assert_eq!((c.eligible, c.captured), (1, 1), "{c:?}");
    assert_eq!(store.trace_count().unwrap(), 1);
}

#[tokio::test]
async fn feedback_batches_are_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let t = pending("batch");
    let id = t.id();
    write_all(&store, WriterConfig::default(), vec![t]).await;
    let fb = |trace_id| Feedback {
        trace_id,
        score: Some(99.0),
        approved: None,
        comment: None,
        time_ms: 0,
    };
    let missing = crate::trace::TraceId::generate();
    assert!(
        matches!(store.add_feedback_batch(&[fb(id), fb(missing)]), Err(StoreError::NoSuchTrace(m)) if m == missing)
    );
    assert!(
        store.feedback(id).unwrap().is_empty(),
        "nothing of a refused batch is kept"
    );
    store.add_feedback_batch(&[fb(id), fb(id)]).unwrap();
    assert_eq!(store.feedback(id).unwrap().len(), 2);
}

#[tokio::test]
async fn the_latest_feedback_alone_decides_grading() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let t = pending("hello");
    let id = t.id();
    write_all(&store, WriterConfig::default(), vec![t]).await;
    let golden = || {
        let mut verdict = None;
        store
            .for_each_graded_trace(None, |trace, fb, ev| {
                verdict = Some(crate::grade::GoldenPolicy::default().is_golden(
                    &trace,
                    fb.as_ref(),
                    ev.as_ref(),
                ));
                true
            })
            .unwrap();
        verdict.unwrap()
    };
    let fb = |score: Option<f64>, approved: Option<bool>| Feedback {
        trace_id: id,
        score,
        approved,
        comment: None,
        time_ms: 0,
    };
    store.add_feedback(&fb(Some(99.0), None)).unwrap();
    assert!(golden());
    store.add_feedback(&fb(None, Some(false))).unwrap();
    assert!(!golden(), "a person rejected it");
    store.add_feedback(&fb(Some(97.0), None)).unwrap();
    assert!(golden(), "a later score lifts the rejection");
    let current = store.current_feedback(id).unwrap().unwrap();
    assert_eq!((current.score, current.approved), (Some(97.0), None));
    store.add_feedback(&fb(None, Some(true))).unwrap();
    assert!(golden());
    store.add_feedback(&fb(Some(20.0), None)).unwrap();
    assert!(!golden(), "a later low score withdraws the approval");
    store.add_feedback(&fb(Some(40.0), Some(true))).unwrap();
    assert!(
        golden(),
        "an approval with a low score is still an approval"
    );
}

#[test]
fn new_ids_sort_after_the_newest_stored_trace_even_if_the_clock_went_back() {
    let dir = tempfile::tempdir().unwrap();
    // A trace stamped 2 s ahead of this clock, as a previous run with a faster clock left it
    // (further ahead than the floor the id unit test sets in this same process).
    let ahead = TraceId::from_u128(
        ulid::Ulid::from_parts(crate::trace::now_ms() + 2000, u128::from(u64::MAX)).into(),
    );
    {
        let store = Store::open_dir(dir.path()).unwrap();
        store.insert_encoded([(ahead, b"{}".as_slice())]).unwrap();
    }
    let _reopened = Store::open_dir(dir.path()).unwrap();
    assert!(TraceId::generate() > ahead);
}

/// Waits (with a generous deadline) until the writer has committed `n` traces.
async fn until_captured(writer: &TraceWriter, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while writer.counters().captured < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(writer.counters().captured, n);
}

#[test]
fn a_write_that_panicked_is_repaired_at_once_so_a_later_crash_needs_no_full_repair() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let insert = || store.insert_encoded([(TraceId::generate(), b"{}".as_slice())]);
    insert().unwrap();
    let panicked = std::panic::catch_unwind(AssertUnwindSafe(|| {
        store.write(|_| -> Result<(), StoreError> { panic!("a bug in a write") })
    }));
    assert!(panicked.is_err());
    // The file is reopened in the background; writes fail (transiently) until it is.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while let Err(e) = insert() {
        assert!(e.is_transient(), "{e}");
        assert!(std::time::Instant::now() < deadline, "never reopened");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(store.full_repairs(), 1, "the reopen repaired the file");
    for _ in 0..5 {
        insert().unwrap();
    }
    // A crash now: the file as it is while the store has it open.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::copy(store.path(), elsewhere.path().join(STORE_FILE)).unwrap();
    let after_crash = Store::open_dir(elsewhere.path()).unwrap();
    assert_eq!(
        after_crash.full_repairs(),
        0,
        "the commits after the reopen saved the allocator state again"
    );
    assert_eq!(after_crash.trace_count().unwrap(), 7);
}

/// Waits (with a generous deadline) until the queue's byte budget is all free again.
async fn until_no_bytes_queued(writer: &TraceWriter) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while writer.counters().queued_bytes > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(writer.counters().queued_bytes, 0);
}

#[tokio::test]
async fn async_mode_drops_what_the_byte_budget_cannot_hold_until_commits_free_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let size = pending("b0").held_bytes();
    // Room for three traces in bytes, and for far more in number.
    let config = WriterConfig {
        queue_capacity: 1000,
        queue_bytes: 3 * size + size / 2,
        ..Default::default()
    };
    // A stalled store: the bytes stay held until their commit settles, after the encode.
    let stall = store.hold_write_lock().unwrap();
    let (writer, task) = TraceWriter::start(store.clone(), config);
    for i in 0..10 {
        assert!(writer.submit(pending(&format!("b{i}"))).is_none());
    }
    let c = writer.counters();
    assert_eq!((c.eligible, c.dropped, c.pending), (10, 7, 3), "{c:?}");
    assert_eq!(c.queued_bytes, 3 * size as u64);
    let counters = writer.counters_handle();
    // The first drop was logged at once and the rest within the second after it: the writer
    // logs those a second later, without waiting for another drop.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while counters.unreported_drops() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "drops never logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once the three are encoded and their commit waits for the lock, the bytes are still held.
    while counters.largest_commit.load(Ordering::Acquire) < 3 {
        assert!(tokio::time::Instant::now() < deadline, "no commit began");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(writer.counters().queued_bytes, 3 * size as u64);

    drop(stall);
    until_captured(&writer, 3).await;
    until_no_bytes_queued(&writer).await;
    // The budget is whole again.
    for i in 10..13 {
        assert!(writer.submit(pending(&format!("b{i}"))).is_none());
    }
    until_captured(&writer, 6).await;
    drop(writer);
    task.join().await;
    assert_eq!(store.trace_count().unwrap(), 6);
}

#[tokio::test]
async fn durable_mode_waits_for_bytes_and_a_trace_larger_than_the_budget_takes_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let config = WriterConfig {
        mode: CaptureMode::Durable,
        queue_bytes: 10,
        ..Default::default()
    };
    let stall = store.hold_write_lock().unwrap();
    let (writer, task) = TraceWriter::start(store.clone(), config);
    assert!(pending("x").held_bytes() > 10);
    let acks: Vec<_> = (0..3)
        .map(|i| writer.submit(pending(&format!("x{i}"))).expect("durable"))
        .collect();
    let waiting = tokio::spawn(futures_util::future::join_all(acks));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = writer.counters();
    assert_eq!((c.captured, c.dropped, c.queued_bytes), (0, 0, 10), "{c:?}");

    drop(stall);
    // One at a time through the budget, none dropped.
    assert_eq!(waiting.await.unwrap(), vec![true; 3]);
    drop(writer);
    task.join().await;
    assert_eq!(store.trace_count().unwrap(), 3);
}

/// The ids a cursor scan after `after` sees now.
fn scanned(store: &Store, after: Option<TraceId>) -> Vec<TraceId> {
    let mut ids = Vec::new();
    store
        .for_each_graded_trace(after, |t, _, _| {
            ids.push(t.id);
            true
        })
        .unwrap();
    ids
}

#[tokio::test]
async fn cursor_scans_wait_for_a_trace_that_started_earlier_and_ends_later() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let config = WriterConfig {
        flush_interval: Duration::from_millis(10),
        ..WriterConfig::default()
    };
    let (writer, task) = TraceWriter::start(store.clone(), config);
    // A long stream starts first, so its id is older than those of the short exchanges that
    // start and end while it runs.
    let long = writer.ticket();
    let long_id = long.id();
    let short: Vec<TraceId> = (0..3)
        .map(|i| {
            let trace = pending_as(writer.ticket(), &format!("short {i}"));
            let id = trace.id();
            assert!(writer.submit(trace).is_none());
            id
        })
        .collect();
    until_captured(&writer, 3).await;
    assert_eq!(store.trace_count().unwrap(), 3, "the short ones are stored");
    // A judge or a dataset would take the last id it saw as its cursor, and never look below
    // it again: so the scan must not show the short ones yet.
    assert_eq!(scanned(&store, None), vec![]);

    assert!(writer.submit(pending_as(long, "long")).is_none());
    until_captured(&writer, 4).await;
    let mut all = vec![long_id];
    all.extend(&short);
    assert_eq!(
        scanned(&store, None),
        all,
        "in id order, the long one first"
    );
    assert_eq!(scanned(&store, Some(short[0])), short[1..].to_vec());

    // A trace that is dropped or fails settles too: it holds nothing up.
    let lost = writer.ticket();
    let after = writer.ticket();
    let after_id = after.id();
    assert!(writer.submit(pending_as(after, "after")).is_none());
    until_captured(&writer, 5).await;
    assert_eq!(scanned(&store, Some(short[2])), vec![]);
    drop(lost);
    assert_eq!(scanned(&store, Some(short[2])), vec![after_id]);
    drop(writer);
    task.join().await;
}

/// Submits `n` async traces to a running writer and checks that all of them are committed while
/// it still runs, within a deadline far beyond the intervals that should commit them.
async fn committed_while_running(config: WriterConfig, n: u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let (writer, task) = TraceWriter::start(store.clone(), config);
    for i in 0..n {
        assert!(writer.submit(pending(&format!("q{i}"))).is_none());
    }
    until_captured(&writer, n).await;
    let counters = writer.counters();
    assert_eq!((counters.captured, counters.pending), (n, 0));
    assert_eq!(store.trace_count().unwrap(), n);
    drop(writer);
    task.join().await;
}

#[tokio::test]
async fn async_traces_are_committed_once_the_flush_interval_passes_without_more_traffic() {
    // Nothing else arrives after the three: only the interval can commit them.
    let config = WriterConfig {
        batch_max: 1000,
        flush_interval: Duration::from_millis(100),
        ..WriterConfig::default()
    };
    committed_while_running(config, 3).await;
}

#[tokio::test]
async fn async_full_batches_are_committed_without_waiting_for_the_interval() {
    // The interval is far longer than the deadline: only full batches can be committed in time.
    let config = WriterConfig {
        batch_max: 4,
        flush_interval: Duration::from_secs(3600),
        ..WriterConfig::default()
    };
    committed_while_running(config, 8).await;
}

/// A durable commit waits for nothing but the work itself: no timer tick (tokio's timer rounds
/// even a deadline of "now" up to its next millisecond, which once cost every durable response
/// at one connection a millisecond more). On a paused clock, any timer the writer waited on would
/// move it.
#[tokio::test(start_paused = true)]
async fn a_durable_commit_waits_on_no_timer() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let config = WriterConfig {
        mode: CaptureMode::Durable,
        ..Default::default()
    };
    let (writer, task) = TraceWriter::start(store.clone(), config);
    for i in 0..3 {
        // Off the millisecond grid, where rounding up shows.
        tokio::time::advance(Duration::from_micros(300)).await;
        let started = tokio::time::Instant::now();
        let ack = writer.submit(pending(&format!("d{i}"))).expect("durable");
        assert!(ack.await, "committed");
        assert_eq!(tokio::time::Instant::now(), started, "trace {i}");
    }
    drop(writer);
    task.join().await;
    assert_eq!(store.trace_count().unwrap(), 3);
}

/// `batch_max` bounds every transaction, also when a stalled commit lets encoded traces pile up
/// behind it: the writer stops taking from the queue instead.
#[tokio::test]
async fn no_commit_holds_more_than_batch_max() {
    for mode in [CaptureMode::Async, CaptureMode::Durable] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(dir.path()).unwrap();
        let config = WriterConfig {
            mode,
            queue_capacity: 1000,
            batch_max: 4,
            idle_priority: false,
            ..Default::default()
        };
        let (writer, task) = TraceWriter::start(store.clone(), config);
        let counters = writer.counters_handle();
        let stall = store.hold_write_lock().unwrap();
        let acks: Vec<_> = (0..200)
            .map(|i| writer.submit(pending(&format!("b{i}"))))
            .collect();
        // Long enough for many encodes while the first commit waits for the lock.
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(stall);
        for ack in acks.into_iter().flatten() {
            assert!(ack.await, "{mode:?}: committed");
        }
        drop(writer);
        task.join().await;
        let c = counters.snapshot();
        assert_eq!((c.captured, c.dropped, c.failed), (200, 0, 0), "{mode:?}");
        let largest = counters.largest_commit.load(Ordering::Acquire);
        assert!(
            (1..=4).contains(&largest),
            "{mode:?}: {largest} traces in one commit"
        );
        assert_eq!(store.trace_count().unwrap(), 200);
    }
}

/// Feedback with a score of 50 for `trace`.
fn score_50(trace: TraceId) -> Feedback {
    Feedback {
        trace_id: trace,
        score: Some(50.0),
        approved: None,
        comment: None,
        time_ms: 1,
    }
}

#[test]
fn expiry_deletes_the_oldest_traces_below_the_cutoff_with_their_feedback_in_bounded_steps() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    // Five traces a second apart, then two more at the cutoff and after.
    let at =
        |secs: u64, n: u128| TraceId::from_u128(TraceId::earliest_at(secs * 1000).as_u128() + n);
    let old: Vec<TraceId> = (0..5).map(|i| at(1_000 + i, 7)).collect();
    let cutoff = TraceId::earliest_at(2_000 * 1000);
    let kept = [at(2_000, 0), at(3_000, 1)];
    let all: Vec<TraceId> = old.iter().chain(&kept).copied().collect();
    store
        .insert_encoded(all.iter().map(|&id| (id, &b"{}"[..])))
        .unwrap();
    for &id in &all {
        store.add_feedback(&score_50(id)).unwrap();
        store
            .add_evaluation(&Evaluation {
                trace_id: id,
                score: 60.0,
                source: "test".into(),
                time_ms: 1,
            })
            .unwrap();
    }
    let step = |limit, max_bytes| store.expire_traces(cutoff, limit, max_bytes).unwrap();
    let expired = |deleted, more| Expired { deleted, more };
    // At most `limit` a step, oldest first: the first step leaves the third old trace.
    assert_eq!(step(2, usize::MAX), expired(2, true));
    assert!(!store.has_trace(old[1]).unwrap() && store.has_trace(old[2]).unwrap());
    assert!(store.feedback(old[1]).unwrap().is_empty());
    assert!(store.latest_evaluation(old[1]).unwrap().is_none());
    assert_eq!(store.feedback(old[2]).unwrap().len(), 1);
    // And no more once `max_bytes` have gone (each value here is 2 bytes), but always one; the
    // traces it stopped before keep their feedback.
    assert_eq!(step(2, 1), expired(1, true));
    assert_eq!(store.feedback(old[3]).unwrap().len(), 1);
    // A step that takes the last old traces says so, even when that is exactly its limit: the
    // sweep ends there without one more (empty) commit.
    assert_eq!(step(2, usize::MAX), expired(2, false));
    assert_eq!(step(3, usize::MAX), expired(0, false));
    // Everything from the cutoff on stays, feedback and evaluations included.
    assert_eq!(store.trace_count().unwrap(), 2);
    for id in kept {
        assert!(store.has_trace(id).unwrap());
        assert_eq!(store.feedback(id).unwrap().len(), 1);
        assert!(store.latest_evaluation(id).unwrap().is_some());
    }
    for id in old {
        assert!(store.feedback(id).unwrap().is_empty());
        assert!(store.latest_evaluation(id).unwrap().is_none());
    }
    // The arrival order of feedback (which datasets read for late feedback) lost the same.
    let arrivals: Vec<TraceId> = store
        .feedback_arrivals()
        .unwrap()
        .into_iter()
        .map(|(_, trace)| trace)
        .collect();
    assert_eq!(arrivals, kept);
}

#[test]
fn new_ids_stay_above_expired_ones_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let newest = {
        let store = Store::open_dir(dir.path()).unwrap();
        let ids: Vec<TraceId> = (1..=3).map(|s| TraceId::earliest_at(s * 1000)).collect();
        store
            .insert_encoded(ids.iter().map(|&id| (id, &b"{}"[..])))
            .unwrap();
        let all = TraceId::earliest_at(10_000);
        while store.expire_traces(all, 1, usize::MAX).unwrap().more {}
        assert_eq!(store.trace_count().unwrap(), 0);
        ids[2]
    };
    // Every trace is gone, but the store still knows the highest id it held: a cursor may point
    // at it, and ids made after a clock went back must not fall below it.
    let store = Store::open_dir(dir.path()).unwrap();
    assert_eq!(store.id_floor().unwrap(), Some(newest));
    store
        .insert_encoded([(TraceId::earliest_at(500), &b"{}"[..])])
        .unwrap();
    assert_eq!(
        store.id_floor().unwrap(),
        Some(newest),
        "the higher of the two"
    );
}

#[test]
fn a_store_from_a_newer_forge_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    // A store from before the version was kept opens, and is marked with this build's format.
    let (path, id) = store_from_before_the_format_mark(dir.path());
    let store = Store::open_dir(dir.path()).unwrap();
    assert_eq!(store.meta::<u64>(FORMAT_KEY).unwrap(), Some(STORE_FORMAT));
    store.put_meta(FORMAT_KEY, &(STORE_FORMAT + 1)).unwrap();
    drop(store);

    let refused = Store::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&refused, StoreError::NewerFormat { path: p, found } if *p == path && *found == STORE_FORMAT + 1),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("newer Forge"), "{refused}");
    // Nothing was written: the newer format stays, and so does the trace.
    let db = redb::Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let format = txn
        .open_table(META)
        .unwrap()
        .get(FORMAT_KEY)
        .unwrap()
        .unwrap()
        .value()
        .to_vec();
    assert_eq!(format, (STORE_FORMAT + 1).to_string().as_bytes());
    assert!(
        txn.open_table(TRACES)
            .unwrap()
            .get(id.as_u128())
            .unwrap()
            .is_some()
    );
    drop(txn);
    drop(db);

    // A version that is not a number is not guessed at either.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(FORMAT_KEY, &b"two"[..])
            .unwrap();
        txn.commit().unwrap();
    }
    let refused = Store::open_dir(dir.path()).unwrap_err();
    assert!(matches!(refused, StoreError::Damaged(..)), "{refused:?}");
}

#[test]
fn an_unreadable_expiry_mark_does_not_keep_the_store_from_opening() {
    let dir = tempfile::tempdir().unwrap();
    let newest = TraceId::earliest_at(5_000);
    {
        let store = Store::open_dir(dir.path()).unwrap();
        store.insert_encoded([(newest, &b"{}"[..])]).unwrap();
        store.put_meta("expired_up_to", &"not a trace id").unwrap();
    }
    let store = Store::open_dir(dir.path()).expect("opens");
    assert_eq!(store.id_floor().unwrap(), Some(newest));
    // The next expiry writes a good mark.
    let all = TraceId::earliest_at(10_000);
    assert_eq!(store.expire_traces(all, 10, usize::MAX).unwrap().deleted, 1);
    assert_eq!(store.id_floor().unwrap(), Some(newest));
}

#[test]
fn an_io_error_reopens_the_file_once_and_a_late_report_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    store
        .insert_encoded([(TraceId::generate(), &b"{}"[..])])
        .unwrap();
    let io = || StoreError::Redb(redb::Error::PreviousIo);
    // Not an I/O error: nothing happens.
    store
        .db
        .failed(0, &StoreError::NoSuchTrace(TraceId::generate()));
    assert_eq!(store.db.handle().unwrap().generation, 0);

    store.db.failed(0, &io());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let reopened = loop {
        match store.db.handle() {
            Ok(handle) => break handle.generation,
            // Meanwhile every operation fails at once, and says why.
            Err(e) => assert!(matches!(e, StoreError::Closed(_)), "{e}"),
        }
        assert!(std::time::Instant::now() < deadline, "never reopened");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(reopened, 1);
    assert_eq!(
        store.trace_count().unwrap(),
        1,
        "the reopened file holds the trace"
    );
    // Another operation of the first opening reports the same failure late: the new opening
    // stays open.
    store.db.failed(0, &io());
    assert_eq!(store.db.handle().unwrap().generation, 1);
    store
        .insert_encoded([(TraceId::generate(), &b"{}"[..])])
        .unwrap();
    assert_eq!(store.trace_count().unwrap(), 2);
}

#[tokio::test]
async fn a_graded_snapshot_sees_the_same_traces_and_feedback_on_every_walk() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    write_all(&store, WriterConfig::default(), vec![pending("a")]).await;
    let id = scanned(&store, None)[0];
    let mut copy = store.trace(id).unwrap().unwrap();
    copy.id = TraceId::generate();
    let copy_json = serde_json::to_vec(&copy).unwrap();
    let walk = |scan: &GradedScan| {
        let mut seen = Vec::new();
        scan.for_each(None, None, |t, fb, _| {
            seen.push((t.id, fb.and_then(|f| f.score)));
            true
        })
        .unwrap();
        seen
    };
    let (first, second) = store
        .with_graded_snapshot(|scan| {
            let first = walk(scan);
            // Feedback and a new trace arrive between the walks.
            store
                .add_feedback(&Feedback {
                    trace_id: id,
                    score: Some(95.0),
                    approved: None,
                    comment: None,
                    time_ms: 0,
                })
                .unwrap();
            store.insert_encoded([(copy.id, &copy_json[..])]).unwrap();
            Ok((first, walk(scan)))
        })
        .unwrap();
    assert_eq!(first, vec![(id, None)]);
    assert_eq!(second, first, "both walks see the snapshot");
    let now = store.with_graded_snapshot(|scan| Ok(walk(scan))).unwrap();
    assert_eq!(now, vec![(id, Some(95.0)), (copy.id, None)]);
}

#[test]
fn a_store_file_whose_creation_was_cut_short_is_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STORE_FILE);
    let fresh = dir.path().join(format!("{STORE_FILE}.new"));
    // What a power cut while redb wrote its first state can leave: not a database.
    std::fs::write(&fresh, [0x7f; 700]).unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    assert!(path.is_file());
    assert!(!fresh.exists(), "the leftover is gone");
    let id = TraceId::generate();
    store.insert_encoded([(id, &b"{}"[..])]).unwrap();
    drop(store);

    // A cut after the link leaves the file's second name behind: it goes, the data stays.
    std::fs::hard_link(&path, &fresh).unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    assert!(!fresh.exists());
    assert!(store.has_trace(id).unwrap());
}

/// Whether this process may run commits on the commit lane (see `store/commit_lane.rs`). Where
/// it may not (no `CAP_SYS_NICE`, no `RLIMIT_NICE` of 20), the tests below check that no commit
/// goes near it, which is all there is to check there.
async fn commit_lane_available() -> bool {
    commit_lane::CommitLane::start().await.is_ok()
}

/// Waits until `done` holds, failing with `never` after a minute: the commit lane's thread
/// starts, and is lifted, from the idle class, which a busy machine may keep waiting.
pub(super) async fn until(never: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{never}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the writer's commit lane has started (it starts beside the writer's loop).
async fn until_lane_ready(counters: &CaptureCounters) {
    until("the commit lane never started", || {
        counters.lane_ready.load(Ordering::Acquire)
    })
    .await;
}

/// An `async` commit runs on the commit lane, in the idle class. One that runs long (here it
/// waits for redb's write lock, which the test holds) is lifted into the normal class, and its
/// traces are captured once the lock is free.
#[tokio::test]
async fn a_long_commit_on_the_commit_lane_is_lifted_and_its_traces_captured() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let config = WriterConfig {
        flush_interval: Duration::from_millis(10),
        ..WriterConfig::default()
    };
    let (writer, task) = TraceWriter::start(store.clone(), config);
    let counters = writer.counters_handle();
    let lane = commit_lane_available().await;
    if lane {
        until_lane_ready(&counters).await;
    }
    let stall = store.hold_write_lock().unwrap();
    for i in 0..3 {
        assert!(writer.submit(pending(&format!("l{i}"))).is_none());
    }
    if lane {
        // Until a lift has taken effect: the commit then ends in the normal class.
        until("the held commit was never lifted", || {
            counters.lifts_done.load(Ordering::Acquire) > 0
        })
        .await;
    }
    drop(stall);
    until_captured(&writer, 3).await;
    drop(writer);
    task.join().await;
    let lane_commits = counters.lane_commits.load(Ordering::Acquire);
    let lifted = counters.lifted_commits.load(Ordering::Acquire);
    if lane {
        // The held commit ended in the normal class; a later one may have run lifted too, if
        // the machine was busy enough.
        assert!(lane_commits >= 1);
        assert!(lifted >= 1);
    } else {
        assert_eq!((lane_commits, lifted), (0, 0));
    }
    assert_eq!(store.trace_count().unwrap(), 3);
}

/// A large trace is not encoded on the idle-class thread, where it could wait minutes for CPU
/// on a saturated machine once started; small ones are.
#[tokio::test]
async fn a_trace_over_a_megabyte_is_encoded_on_the_blocking_pool() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let (writer, task) = TraceWriter::start(store.clone(), WriterConfig::default());
    let counters = writer.counters_handle();
    assert!(writer.submit(pending("small")).is_none());
    until_captured(&writer, 1).await;
    assert_eq!(counters.heavy_encodes.load(Ordering::Acquire), 0);
    let large = "x".repeat(1 << 21);
    assert!(writer.submit(pending(&large)).is_none());
    until_captured(&writer, 2).await;
    assert_eq!(counters.heavy_encodes.load(Ordering::Acquire), 1);
    drop(writer);
    task.join().await;
    assert_eq!(store.trace_count().unwrap(), 2);
}

/// A durable client waits on its commit, and `idle_priority = false` asks for normal priority:
/// neither commits on the commit lane, where the default `async` writer does.
#[tokio::test]
async fn durable_commits_and_commits_without_idle_priority_stay_off_the_commit_lane() {
    let lane = commit_lane_available().await;
    let configs = [
        WriterConfig {
            flush_interval: Duration::from_millis(10),
            ..WriterConfig::default()
        },
        WriterConfig {
            mode: CaptureMode::Durable,
            ..WriterConfig::default()
        },
        WriterConfig {
            idle_priority: false,
            flush_interval: Duration::from_millis(10),
            ..WriterConfig::default()
        },
    ];
    for config in configs {
        let mode = config.mode;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(dir.path()).unwrap();
        let control = mode == CaptureMode::Async && config.idle_priority;
        let (writer, task) = TraceWriter::start(store.clone(), config);
        let counters = writer.counters_handle();
        if control && lane {
            until_lane_ready(&counters).await;
        }
        for i in 0..3 {
            if let Some(ack) = writer.submit(pending(&format!("o{i}"))) {
                assert!(ack.await);
            }
        }
        until_captured(&writer, 3).await;
        drop(writer);
        task.join().await;
        let on_lane = counters.lane_commits.load(Ordering::Acquire);
        if control && lane {
            assert!(on_lane >= 1, "the default async writer commits on the lane");
        } else {
            assert_eq!(on_lane, 0, "{mode:?}");
        }
    }
}

#[test]
fn feedback_keeps_its_arrival_order_which_a_store_from_before_gets_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let ids: Vec<TraceId> = (0..3).map(|_| TraceId::generate()).collect();
    store
        .insert_encoded(ids.iter().map(|&id| (id, &b"{}"[..])))
        .unwrap();
    for &id in ids.iter().rev().chain(&ids[..1]) {
        store.add_feedback(&score_50(id)).unwrap();
    }
    let arrivals = store.feedback_arrivals().unwrap();
    let traces: Vec<TraceId> = arrivals.iter().map(|&(_, trace)| trace).collect();
    assert_eq!(
        traces,
        [ids[2], ids[1], ids[0], ids[0]],
        "in the order it came"
    );
    // New ids sort after the newest feedback, which is newer than every trace.
    let newest_feedback = arrivals.last().unwrap().0;
    assert_eq!(store.id_floor().unwrap(), Some(newest_feedback));
    // And after the newest evaluation, which a dataset's mark may be.
    store
        .add_evaluation(&Evaluation {
            trace_id: ids[0],
            score: 95.0,
            source: "test".into(),
            time_ms: 1,
        })
        .unwrap();
    let floor = store.id_floor().unwrap().unwrap();
    assert!(floor > newest_feedback, "{floor:?}");
    let mark = store
        .with_graded_snapshot(|scan| scan.feedback_mark())
        .unwrap();
    assert_eq!(mark, floor, "the dataset mark covers the evaluation");

    store.forget_feedback_order().unwrap();
    drop(store);
    let reopened = Store::open_dir(dir.path()).unwrap();
    let mut restored = reopened.feedback_arrivals().unwrap();
    let mut before = arrivals;
    restored.sort();
    before.sort();
    assert_eq!(
        restored, before,
        "the open puts every piece of feedback back"
    );
}

#[test]
fn a_damaged_store_file_is_an_error_naming_it_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    for i in 0..50 {
        let body = format!("{{\"n\":{i}}}");
        store
            .insert_encoded([(TraceId::generate(), body.as_bytes())])
            .unwrap();
    }
    drop(store);
    // One 4 KiB page zeroed, as a bad sector or a torn copy leaves it: redb panics opening it.
    let path = dir.path().join(STORE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096..8192].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let opened = std::panic::catch_unwind(|| Store::open_dir(dir.path()));
    let err = opened
        .expect("no panic out of the open")
        .expect_err("a damaged file does not open");
    assert!(matches!(err, StoreError::Damaged(..)), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_store_file_that_cannot_be_what_it_seems_is_left_alone() {
    // A link to a volume not mounted yet: no new store in its place.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STORE_FILE);
    let target = dir.path().join("unmounted").join(STORE_FILE);
    std::os::unix::fs::symlink(&target, &path).unwrap();
    let err = Store::open_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(std::fs::symlink_metadata(&path).unwrap().is_symlink());
    assert!(!target.exists());
    // An empty file, as a copy cut short leaves: a reading command does not make it a store.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STORE_FILE);
    std::fs::write(&path, b"").unwrap();
    let err = Store::open_existing_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    // Not a store at all: the error names the file.
    std::fs::write(&path, b"not a database").unwrap();
    let err = Store::open_existing_dir(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn registry_updates_of_different_fields_made_at_once_keep_both() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    store
        .put_model("m", &serde_json::json!({"status": 0, "undeploys": 0}))
        .unwrap();
    // Two writers, as the guard's status changes and the undeploy loop's marks are: each
    // changes its own field of the same record.
    const EACH: u64 = 40;
    std::thread::scope(|scope| {
        for field in ["status", "undeploys"] {
            let store = &store;
            scope.spawn(move || {
                for _ in 0..EACH {
                    let found = store
                        .update_model("m", |record: &mut serde_json::Value| {
                            record[field] = (record[field].as_u64().unwrap() + 1).into();
                        })
                        .unwrap();
                    assert!(found);
                }
            });
        }
    });
    let record: serde_json::Value = store.model("m").unwrap().unwrap();
    assert_eq!(
        record,
        serde_json::json!({"status": EACH, "undeploys": EACH})
    );
    let absent = store
        .update_model("none", |_: &mut serde_json::Value| unreachable!())
        .unwrap();
    assert!(!absent);
}
