//! A full disk: captures that cannot be written are counted failed, and capture resumes by
//! itself once there is room again, with no restart.
//!
//! A test binary of its own: it caps the size of the files this process may write
//! (`RLIMIT_FSIZE`), which would fail other tests' writes. Past the cap a write fails with
//! `EFBIG`, as a write to a full disk fails with `ENOSPC`: both are I/O errors to redb.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use forge_layer::capture::{BodyEnd, CaptureSession, ExchangeMeta, PendingTrace};
use forge_layer::store::{CaptureMode, STORE_FILE, Store, TraceWriter, WriterConfig};
use forge_router::Arm;

/// Caps the size of any file this process writes, within the hard limit; `None` lifts the cap
/// back to it.
fn cap_file_size(bytes: Option<u64>) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let hard = getrlimit(Resource::Fsize).maximum;
    let current = match (bytes, hard) {
        (Some(b), Some(h)) => Some(b.min(h)),
        (Some(b), None) => Some(b),
        (None, h) => h,
    };
    setrlimit(
        Resource::Fsize,
        Rlimit {
            current,
            maximum: hard,
        },
    )
    .expect("setrlimit");
}

/// Past the cap the kernel also sends SIGXFSZ, which kills a process by default; with a handler
/// installed (this one is never read), the write just fails.
fn survive_sigxfsz() -> tokio::signal::unix::Signal {
    let sigxfsz = tokio::signal::unix::SignalKind::from_raw(rustix::process::Signal::XFSZ.as_raw());
    tokio::signal::unix::signal(sigxfsz).expect("a SIGXFSZ handler")
}

/// A finished exchange whose prompt is `words` words long.
fn exchange(writer: &TraceWriter, words: usize) -> PendingTrace {
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
    let prompt = "word ".repeat(words);
    let request = format!(r#"{{"model":"a","messages":[{{"role":"user","content":"{prompt}"}}]}}"#);
    let mut session = CaptureSession::new(writer.ticket(), meta, Bytes::from(request), 1 << 20);
    session.on_response(200, false);
    session.on_chunk(br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#);
    session.finish(BodyEnd::Complete)
}

/// Submits in `durable` mode and waits: whether the trace was committed.
async fn committed(writer: &TraceWriter, trace: PendingTrace) -> bool {
    writer
        .submit(trace)
        .expect("durable mode acknowledges")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_captures_counted_and_capture_resumes_without_a_restart() {
    let _handler = survive_sigxfsz();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let config = WriterConfig {
        mode: CaptureMode::Durable,
        ..WriterConfig::default()
    };
    let (writer, task) = TraceWriter::start(store.clone(), config);
    assert!(committed(&writer, exchange(&writer, 10)).await);

    let size = std::fs::metadata(dir.path().join(STORE_FILE))
        .unwrap()
        .len();
    cap_file_size(Some(size));
    // redb fills the file's free pages first; 64 KB traces soon need it to grow.
    let mut full_after = None;
    for i in 0..400 {
        if !committed(&writer, exchange(&writer, 13_000)).await {
            full_after = Some(i);
            break;
        }
    }
    let full_after = full_after
        .unwrap_or_else(|| panic!("no commit failed with the file capped at {size} bytes"));
    // While the disk stays full, every capture fails, and is counted.
    assert!(!committed(&writer, exchange(&writer, 13_000)).await);

    cap_file_size(None);
    // The file is reopened in the background; until then captures still fail, counted.
    let start = tokio::time::Instant::now();
    let id = loop {
        let after = exchange(&writer, 13_000);
        let id = after.id();
        if committed(&writer, after).await {
            break id;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "capture did not resume once the disk had room"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(store.has_trace(id).unwrap(), "the store reads again too");

    let counters = writer.counters();
    assert!(counters.failed >= 2, "{counters:?}");
    assert_eq!(counters.dropped, 0, "{counters:?}");
    assert_eq!(counters.captured, 2 + full_after, "{counters:?}");
    assert_eq!(
        counters.captured + counters.failed + counters.dropped,
        counters.eligible,
        "{counters:?}"
    );
    assert_eq!(store.trace_count().unwrap(), counters.captured);
    drop(writer);
    task.join().await;
    drop(store);

    let reopened = Store::open_dir(dir.path()).unwrap();
    assert_eq!(reopened.trace_count().unwrap(), counters.captured);
}
