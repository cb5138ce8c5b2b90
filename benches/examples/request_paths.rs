//! The writer's two ways with a request, timed in alternation: parsed into a tree, redacted and
//! serialised again (`into_trace` + encode), or kept as sent when redaction finds nothing in it
//! (`into_stored` + encode, what the writer does).
//!
//! `cargo run --release -p forge-benches --example request_paths [-- long]`: the load bench's
//! 283-byte request, or with `long` one of 2.7 KB (nine user turns). Each of 40 rounds times 2,000
//! traces one way, then 2,000 the other, so that a machine whose speed drifts meets both alike;
//! the medians of the rounds are printed. The response is the capture bench's 2 KB completion.

// A measuring binary: a failed setup should stop it at once.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use forge_benches::fixtures::{
    MAX_EVENT_BYTES, chat_request, completion_json, exchange_meta, pending_trace, stored_json,
};
use forge_layer::capture::PendingTrace;
use forge_layer::redact::Redactor;

const ROUNDS: usize = 40;
const PER_ROUND: usize = 2000;

fn main() {
    let long = std::env::args().nth(1).as_deref() == Some("long");
    let redactor = Redactor::default();
    let meta = exchange_meta(false);
    let mut request = String::from_utf8(chat_request(false).to_vec()).unwrap();
    if long {
        let turn = r#",{"role":"user","content":"Explain what a closed-loop load generator measures and why p99 matters more than the mean. Explain what a closed-loop load generator measures and why p99 matters more than the mean. Explain what a closed-loop load generator measures and why p99 matters more than the mean."}"#;
        request = request.replacen("}],", &format!("}}{}],", turn.repeat(8)), 1);
    }
    let request = bytes::Bytes::from(request);
    let frames = vec![completion_json(2048)];
    let batch = || -> Vec<PendingTrace> {
        (0..PER_ROUND)
            .map(|_| pending_trace(&meta, &request, false, &frames))
            .collect()
    };
    let time = |encode: &dyn Fn(PendingTrace) -> Vec<u8>| {
        let traces = batch();
        let start = Instant::now();
        for trace in traces {
            std::hint::black_box(encode(trace));
        }
        start.elapsed().as_nanos() as f64 / PER_ROUND as f64 / 1000.0
    };
    let (mut tree, mut kept) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        tree.push(time(&|p| {
            serde_json::to_vec(&p.into_trace(&redactor, MAX_EVENT_BYTES)).unwrap()
        }));
        kept.push(time(&|p| stored_json(p, &redactor).unwrap()));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "request of {} bytes, medians of {ROUNDS} alternated rounds of {PER_ROUND}: into_trace + encode {:.2} µs, into_stored + encode {:.2} µs",
        request.len(),
        median(tree),
        median(kept)
    );
}
