//! Criterion: the trace writer's throughput in traces per second, into a real redb store.
//!
//! `cargo bench -p forge-benches --bench writer`. One `Store` in a temp dir and one
//! `TraceWriter` in `async` mode, with a queue big enough that nothing is dropped. Each
//! iteration submits a burst of finished exchanges (built beforehand, off the clock, as the
//! capture layer hands them over) and ends when the counters say all of them are captured, so
//! it covers reassembly, redaction, JSON encoding and the durable redb commits, as the gateway's
//! writer does them. Bursts: 20 000 exchanges with a 2 KB JSON response (the target: at
//! least 50 000 traces/s), 1 000 with a 500-frame SSE response, and 20 000 with a 400-byte JSON
//! response (about the load bench's).
//!
//! Each store keeps every trace of the run (a gigabyte or more, in temp dirs removed at the end),
//! so later samples write into a bigger file, as a long-running gateway would.
//!
//! The baseline, `…/store_alone`: the same traces, encoded beforehand, committed straight into a
//! second store in transactions of the writer's `batch_max`, on one thread. The table compares
//! the CPU the process spends per trace either way: what redb's inserts and commits cost alone
//! is a floor no change to the writer can go below. (In wall time the baseline can be the slower:
//! it waits for each commit's fsyncs, where the writer encodes meanwhile.) The baseline's
//! traces are encoded just before, one after another on one thread, and that CPU is the table's
//! third figure, "encode alone": the writer's encoding as a loop does it, with each trace fresh
//! in the cache. What the writer spends beyond the two is the hand-over between threads, and
//! encoding traces that have gone cold in the queue.

// A bench binary: a failed setup should stop it at once, with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use forge_benches::fixtures::{
    chat_request, completion_json, exchange_meta, pending_trace, sse_frames, stored_json,
};
use forge_benches::process_cpu;
use forge_benches::recorder::Recorder;
use forge_layer::capture::PendingTrace;
use forge_layer::redact::Redactor;
use forge_layer::store::{CaptureMode, Store, TraceWriter, WriterConfig};
use forge_layer::trace::TraceId;

const MIN_TRACES_PER_SEC: f64 = 50_000.0;
/// How long one burst may take before the bench calls the writer stuck.
const BURST_DEADLINE: Duration = Duration::from_secs(120);

/// One kind of exchange and how many of them make a burst.
struct Burst {
    name: &'static str,
    is_sse: bool,
    frames: Vec<bytes::Bytes>,
    size: u64,
}

impl Burst {
    fn make(&self) -> Vec<PendingTrace> {
        let meta = exchange_meta(self.is_sse);
        let request = chat_request(self.is_sse);
        (0..self.size)
            .map(|_| pending_trace(&meta, &request, self.is_sse, &self.frames))
            .collect()
    }

    /// `traces` as the writer commits them: each trace's id and encoded bytes, encoded here,
    /// one after another on this thread.
    fn encode(traces: Vec<PendingTrace>) -> Vec<(TraceId, Vec<u8>)> {
        let redactor = Redactor::default();
        traces
            .into_iter()
            .map(|pending| (pending.id(), stored_json(pending, &redactor).unwrap()))
            .collect()
    }

    /// The bytes one of its traces takes in the store.
    fn stored_bytes(&self) -> usize {
        let trace = pending_trace(
            &exchange_meta(self.is_sse),
            &chat_request(self.is_sse),
            self.is_sse,
            &self.frames,
        );
        stored_json(trace, &Redactor::default()).unwrap().len()
    }
}

/// Submits one burst and waits until the writer has committed all of it.
fn write_burst(writer: &TraceWriter, traces: Vec<PendingTrace>) -> Duration {
    let before = writer.counters();
    assert_eq!(before.pending, 0, "the last burst is not written yet");
    let target = before.captured + traces.len() as u64;
    let start = Instant::now();
    for trace in traces {
        // `async` mode never makes the caller wait.
        assert!(writer.submit(trace).is_none());
    }
    loop {
        let now = writer.counters();
        if now.captured >= target {
            return start.elapsed();
        }
        assert_eq!(
            (now.dropped, now.failed),
            (before.dropped, before.failed),
            "the writer dropped or failed traces: the figure would be meaningless"
        );
        assert!(start.elapsed() < BURST_DEADLINE, "the writer is stuck");
        // Sleeping, not spinning, leaves the cores to the writer; 100 µs is noise on a burst.
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Commits `traces` straight into `store`, `batch_max` to a transaction.
fn store_alone(store: &Store, traces: &[(TraceId, Vec<u8>)], batch_max: usize) -> Duration {
    let start = Instant::now();
    for batch in traces.chunks(batch_max) {
        store
            .insert_encoded(batch.iter().map(|(id, bytes)| (*id, bytes.as_slice())))
            .unwrap();
    }
    start.elapsed()
}

/// The process's CPU time per trace, summed over each name's timed bursts.
#[derive(Default)]
struct CpuPerTrace(RefCell<HashMap<String, (Duration, u64)>>);

impl CpuPerTrace {
    /// Runs `burst` of `traces` traces, adding the CPU it takes to `name`'s sum.
    fn measure<T>(&self, name: &str, traces: u64, burst: impl FnOnce() -> T) -> T {
        let before = process_cpu();
        let out = burst();
        let mut sums = self.0.borrow_mut();
        let sum = sums.entry(name.to_string()).or_default();
        sum.0 += process_cpu().saturating_sub(before);
        sum.1 += traces;
        out
    }

    fn micros(&self, name: &str) -> Option<f64> {
        let sums = self.0.borrow();
        let &(cpu, traces) = sums.get(name)?;
        (traces > 0).then(|| cpu.as_secs_f64() * 1e6 / traces as f64)
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and criterion then
    // runs each bench once as a test, so the bursts are kept small there.
    let measuring =
        std::env::args().any(|a| a == "--bench") && !std::env::args().any(|a| a == "--test");
    let scale = if measuring { 1 } else { 100 };
    let bursts = [
        Burst {
            name: "json_2k",
            is_sse: false,
            frames: vec![completion_json(2048)],
            size: 20_000 / scale,
        },
        Burst {
            name: "sse_500",
            is_sse: true,
            frames: sse_frames(500),
            size: 1_000 / scale,
        },
        // About the size of the load bench's exchanges; last, so that the file the others are
        // measured on is the same as before it was added.
        Burst {
            name: "json_400",
            is_sse: false,
            frames: vec![completion_json(400)],
            size: 20_000 / scale,
        },
    ];

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path()).unwrap();
    let baseline_dir = tempfile::tempdir().unwrap();
    let baseline = Store::open_dir(baseline_dir.path()).unwrap();
    let queue = bursts.iter().map(|b| b.size).max().unwrap_or(1) as usize;
    let config = WriterConfig {
        mode: CaptureMode::Async,
        queue_capacity: 2 * queue,
        // A throughput bench: a burst of 500-frame streams would fill the default byte budget.
        queue_bytes: u32::MAX as usize,
        ..WriterConfig::default()
    };
    let batch_max = config.batch_max;
    let flush_ms = config.flush_interval.as_millis();
    let (writer, task) = {
        let _runtime = runtime.enter();
        TraceWriter::start(store.clone(), config)
    };

    let recorder = Recorder::default();
    let cpu = CpuPerTrace::default();
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("writer");
    // A burst takes most of a second: few samples, each of a single burst.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    for burst in &bursts {
        group.throughput(Throughput::Elements(burst.size));
        group.bench_function(burst.name, |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let traces = burst.make();
                    elapsed += cpu.measure(burst.name, burst.size, || write_burst(&writer, traces));
                }
                recorder.record(burst.name, iters * burst.size, elapsed)
            })
        });
    }
    // After every writer figure: the baseline's own writes cannot slow them.
    for burst in &bursts {
        group.throughput(Throughput::Elements(burst.size));
        let alone = format!("{}/store_alone", burst.name);
        let encoding = format!("{}/encode_alone", burst.name);
        group.bench_function(&alone, |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let traces = burst.make();
                    let traces = cpu.measure(&encoding, burst.size, || Burst::encode(traces));
                    elapsed += cpu.measure(&alone, burst.size, || {
                        store_alone(&baseline, &traces, batch_max)
                    });
                }
                recorder.record(&alone, iters * burst.size, elapsed)
            })
        });
    }
    group.finish();
    c.final_summary();

    let counters = writer.counters();
    drop(writer);
    runtime.block_on(task.join());
    let stored = store.trace_count().unwrap();
    assert_eq!(counters.captured, counters.eligible);
    assert_eq!((counters.dropped, counters.failed), (0, 0));
    assert_eq!(
        stored, counters.captured,
        "every captured trace is in the store"
    );

    if measuring {
        println!();
        println!(
            "Trace writer, async mode, one redb store (batches of up to {batch_max}, flush after {flush_ms} ms; {} cores):",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );
        println!();
        println!(
            "| traces | per burst | stored bytes per trace | traces/s (median) | CPU µs per trace: writer / store alone / encode alone |"
        );
        println!("|---|--:|--:|--:|--:|");
        let rate = |name: &str| recorder.median_ns(name).map(|ns| 1e9 / ns);
        for burst in &bursts {
            let alone = format!("{}/store_alone", burst.name);
            let encoding = format!("{}/encode_alone", burst.name);
            println!(
                "| {} | {} | {} | {} | {} |",
                burst.name,
                burst.size,
                burst.stored_bytes(),
                rate(burst.name).map_or_else(|| "n/a".into(), |r| format!("{r:.0}")),
                [
                    cpu.micros(burst.name),
                    cpu.micros(&alone),
                    cpu.micros(&encoding),
                ]
                .map(|us| us.map_or_else(|| "n/a".into(), |us| format!("{us:.1}")))
                .join(" / "),
            );
        }
        println!();
        println!("Store at the end: {stored} traces, {counters:?}");
        let json = rate("json_2k");
        println!();
        println!("Targets");
        println!(
            "  {}  the writer sustains >= {MIN_TRACES_PER_SEC:.0} traces/s of 2 KB traces ({})",
            match json {
                Some(r) if r >= MIN_TRACES_PER_SEC => "PASS",
                Some(_) => "MISS",
                None => "n/a ",
            },
            json.map_or_else(|| "n/a".into(), |r| format!("{r:.0}/s")),
        );
        println!();
        println!("Command: cargo bench -p forge-benches --bench writer");
    }
}
