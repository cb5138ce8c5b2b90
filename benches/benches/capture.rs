//! Criterion: what capture costs per exchange on the request path, and what the writer then does per trace.
//!
//! `cargo bench -p forge-benches --bench capture`. Two response shapes: a 2 KB non-stream
//! `chat.completion` body in one frame, and a 500-frame SSE stream of `chat.completion.chunk`
//! events. Each is driven to its end with `BodyExt::collect`:
//! - `bare`: the body alone, the floor;
//! - `passthrough`: wrapped in `CaptureBody::passthrough`, what an uncaptured exchange pays;
//! - `capture`: a `CaptureSession` opened (`new`, `on_response`) and the body teed through
//!   `CaptureBody` into a sink that counts and drops each trace. Dropping the trace here (one
//!   reference-count decrement per kept frame) is work the writer's thread does in the gateway.
//!
//! `capture` minus `passthrough` is what capture adds on the request path. The writer side,
//! off the request path: `PendingTrace::into_trace` (reassembly and redaction), the same plus
//! the JSON encoding, and `PendingTrace::into_stored` plus the encoding, which is what the writer
//! does (the request's bytes kept as sent when there is nothing to redact in them).

// A bench binary: a failed setup should stop it at once, with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use forge_benches::fixtures::{
    CAPTURE_CAP, MAX_EVENT_BYTES, chat_request, completion_json, exchange_meta, pending_trace,
    sse_frames, stored_json,
};
use forge_benches::recorder::{Recorder, human_ns, timed_batches};
use forge_layer::capture::{CaptureBody, CaptureSession, DurableAck, PendingTrace, TraceSink};
use forge_layer::reassemble::{FinalResponse, StreamReassembler};
use forge_layer::redact::Redactor;
use forge_layer::store::Ticket;
use forge_layer::trace::Outcome;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Collected};

const JSON_BYTES: usize = 2048;
const SSE_FRAMES: usize = 500;

/// Counts the traces it is handed, and drops them.
#[derive(Debug, Clone, Default)]
struct CountingSink(Arc<AtomicU64>);

impl TraceSink for CountingSink {
    fn submit(&self, trace: PendingTrace) -> Option<DurableAck> {
        self.0.fetch_add(1, Ordering::Relaxed);
        drop(trace);
        None
    }
}

/// A response body of ready-made frames of unknown total length, like a chunked SSE response.
struct Frames(std::vec::IntoIter<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.next().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.len() == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Collects a body whose frames are all ready, in one poll: no runtime in the measurement.
/// The frames are kept as they came (a client writes them out; it does not join them).
fn collect_now<B: Body<Data = Bytes, Error: std::fmt::Debug>>(body: B) -> Collected<Bytes> {
    let mut collecting = std::pin::pin!(body.collect());
    match collecting
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(Ok(collected)) => collected,
        Poll::Ready(Err(e)) => panic!("the bench's bodies do not fail: {e:?}"),
        Poll::Pending => panic!("a body of ready frames must collect in one poll"),
    }
}

/// One response shape, with everything its benches need made up front.
struct Shape {
    name: &'static str,
    is_sse: bool,
    request: Bytes,
    frames: Vec<Bytes>,
}

impl Shape {
    fn bytes(&self) -> u64 {
        self.frames.iter().map(|f| f.len() as u64).sum()
    }
}

/// Drives one shape's body through `wrap` to its end, `iters` times.
fn drive<B: Body<Data = Bytes, Error: std::fmt::Debug>>(
    shape: &Shape,
    iters: u64,
    wrap: impl Fn(Frames) -> B,
) -> Duration {
    timed_batches(
        iters,
        || Frames(shape.frames.clone().into_iter()),
        |frames| collect_now(wrap(frames)),
    )
}

fn bench_request_path(c: &mut Criterion, shapes: &[Shape], recorder: &Recorder) {
    let sink = CountingSink::default();
    let opened = std::cell::Cell::new(0u64);
    for shape in shapes {
        let meta = exchange_meta(shape.is_sse);
        let mut group = c.benchmark_group(format!("capture/{}", shape.name));
        group.throughput(Throughput::Bytes(shape.bytes()));
        let name = |variant: &str| format!("{}/{variant}", shape.name);

        group.bench_function("bare", |b| {
            b.iter_custom(|iters| recorder.record(&name("bare"), iters, drive(shape, iters, |f| f)))
        });
        group.bench_function("passthrough", |b| {
            b.iter_custom(|iters| {
                let elapsed = drive(shape, iters, CaptureBody::<_, CountingSink>::passthrough);
                recorder.record(&name("passthrough"), iters, elapsed)
            })
        });
        group.bench_function("capture", |b| {
            b.iter_custom(|iters| {
                let elapsed = drive(shape, iters, |frames| {
                    opened.set(opened.get() + 1);
                    let mut session = CaptureSession::new(
                        Ticket::untracked(),
                        meta.clone(),
                        shape.request.clone(),
                        CAPTURE_CAP,
                    );
                    session.on_response(200, shape.is_sse);
                    CaptureBody::new(frames, session, sink.clone())
                });
                recorder.record(&name("capture"), iters, elapsed)
            })
        });
        group.finish();
    }
    // Every captured exchange reached the sink exactly once, so each paid for a whole capture.
    assert_eq!(sink.0.load(Ordering::Relaxed), opened.get());
}

/// The reassembly step of `into_trace` alone, as it treats each shape.
fn reassemble(shape: &Shape) -> FinalResponse {
    if shape.is_sse {
        let mut reassembler = StreamReassembler::new(MAX_EVENT_BYTES);
        for frame in &shape.frames {
            reassembler.feed(frame);
        }
        reassembler.finish()
    } else {
        FinalResponse::from_json(&shape.frames[0])
    }
}

fn bench_writer_side(c: &mut Criterion, shapes: &[Shape], recorder: &Recorder) {
    let redactor = Redactor::default();
    let mut group = c.benchmark_group("writer_side");
    for shape in shapes {
        let meta = exchange_meta(shape.is_sse);
        let pending = || pending_trace(&meta, &shape.request, shape.is_sse, &shape.frames);
        // The fixture must reassemble into a whole message, or the figures measure an error path.
        let trace = pending().into_trace(&redactor, MAX_EVENT_BYTES);
        assert_eq!(trace.outcome, Outcome::Completed, "{}", shape.name);
        assert!(trace.response.choices[0].message.content.is_some());

        let name = format!("reassemble/{}", shape.name);
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let elapsed = timed_batches(iters, || (), |()| reassemble(shape));
                recorder.record(&name, iters, elapsed)
            })
        });
        let name = format!("into_trace/{}", shape.name);
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let elapsed =
                    timed_batches(iters, pending, |p| p.into_trace(&redactor, MAX_EVENT_BYTES));
                recorder.record(&name, iters, elapsed)
            })
        });
        let name = format!("into_trace+encode/{}", shape.name);
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let elapsed = timed_batches(iters, pending, |p| {
                    serde_json::to_vec(&p.into_trace(&redactor, MAX_EVENT_BYTES)).unwrap()
                });
                recorder.record(&name, iters, elapsed)
            })
        });
        // What the writer does: the request kept as sent when there is nothing to redact in it.
        let name = format!("into_stored+encode/{}", shape.name);
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let elapsed = timed_batches(iters, pending, |p| stored_json(p, &redactor).unwrap());
                recorder.record(&name, iters, elapsed)
            })
        });
    }
    group.finish();
}

fn print_summary(shapes: &[Shape], recorder: &Recorder) {
    let median = |name: &str| recorder.median_ns(name);
    let show = |ns: Option<f64>| ns.map_or_else(|| "n/a".into(), human_ns);
    println!();
    println!("Capture cost per exchange (median over criterion's samples of 1 ms or more):");
    println!();
    println!(
        "| shape | bytes | bare | passthrough | capture | capture − passthrough | reassemble | into_trace | into_trace + encode | into_stored + encode (the writer's) |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for shape in shapes {
        let n = shape.name;
        let passthrough = median(&format!("{n}/passthrough"));
        let capture = median(&format!("{n}/capture"));
        let added = passthrough.zip(capture).map(|(p, c)| c - p);
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            shape.bytes(),
            show(median(&format!("{n}/bare"))),
            show(passthrough),
            show(capture),
            show(added),
            show(median(&format!("reassemble/{n}"))),
            show(median(&format!("into_trace/{n}"))),
            show(median(&format!("into_trace+encode/{n}"))),
            show(median(&format!("into_stored+encode/{n}"))),
        );
    }
    println!();
    println!("Command: cargo bench -p forge-benches --bench capture");
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and criterion then
    // runs each bench once as a test.
    let measuring =
        std::env::args().any(|a| a == "--bench") && !std::env::args().any(|a| a == "--test");
    let shapes = [
        Shape {
            name: "json_2k",
            is_sse: false,
            request: chat_request(false),
            frames: vec![completion_json(JSON_BYTES)],
        },
        Shape {
            name: "sse_500",
            is_sse: true,
            request: chat_request(true),
            frames: sse_frames(SSE_FRAMES),
        },
    ];
    let recorder = Recorder::default();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
        .configure_from_args();
    bench_request_path(&mut c, &shapes, &recorder);
    bench_writer_side(&mut c, &shapes, &recorder);
    c.final_summary();
    if measuring {
        print_summary(&shapes, &recorder);
    }
}
