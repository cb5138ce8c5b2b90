//! Dataset export throughput and peak memory at 100k and 1M stored traces.
//!
//! `cargo bench -p forge-benches --bench dataset`. Each size runs in fresh child processes: one
//! fills a store, another exports it, so the exporter's peak RSS (VmHWM) is its own. Memory should
//! stay flat in the number of traces; throughput is traces read per second. `FORGE_BENCH_SIZES`
//! (comma-separated) overrides the sizes.
// A bench binary: a failed step should stop it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use forge_layer::dataset::{self, DatasetSpec};
use forge_layer::reassemble::{AssistantMessage, FinalChoice, FinalResponse, RawObject};
use forge_layer::store::{Feedback, Store};
use forge_layer::trace::{Outcome, Trace, TraceId};
use forge_router::Arm;

fn trace(i: u64) -> Trace {
    Trace {
        id: TraceId::generate(),
        time_ms: 0,
        tenant: None,
        key_id: Some(format!("app-{}", i % 7)),
        alias: "chat".into(),
        upstream: "sim".into(),
        model: "teacher".into(),
        arm: Arm::Teacher,
        route_version: 1,
        stream: i.is_multiple_of(2),
        request: serde_json::json!({"model": "chat", "messages": [
            {"role": "system", "content": "You are a concise support assistant for a software company."},
            {"role": "user", "content": format!("Question {i}: how do I rotate the API keys of service {} without downtime?", i % 1000)}
        ]}),
        response: FinalResponse {
            choices: vec![FinalChoice {
                index: 0,
                message: AssistantMessage {
                    content: Some(format!(
                        "For service {}, create the new key first, deploy it next to the old one, switch readers, then revoke the old key. Request {i}.",
                        i % 1000
                    )),
                    ..Default::default()
                },
                finish_reason: Some("stop".into()),
            }],
            usage: RawObject::from_value(
                &serde_json::json!({"prompt_tokens": 40, "completion_tokens": 35, "total_tokens": 75}),
            ),
            complete: true,
            ..Default::default()
        },
        status: 200,
        latency_us: 1000,
        ttfb_us: 100,
        outcome: Outcome::Completed,
    }
}

/// Fills a store with `n` traces; every other one approved (so golden).
fn populate(dir: &Path, n: u64) {
    let store = Store::open_dir(dir).unwrap();
    let mut batch = Vec::with_capacity(20_000);
    let mut approved = Vec::new();
    for i in 0..n {
        let t = trace(i);
        if i.is_multiple_of(2) {
            approved.push(t.id);
        }
        batch.push((t.id, serde_json::to_vec(&t).unwrap()));
        if batch.len() == 20_000 {
            store
                .insert_encoded(batch.iter().map(|(id, b)| (*id, b.as_slice())))
                .unwrap();
            batch.clear();
        }
    }
    store
        .insert_encoded(batch.iter().map(|(id, b)| (*id, b.as_slice())))
        .unwrap();
    for id in approved {
        store
            .add_feedback(&Feedback {
                trace_id: id,
                score: None,
                approved: Some(true),
                comment: None,
                time_ms: 0,
            })
            .unwrap();
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Exports the store in `dir`; prints one JSON line of figures.
fn export(dir: &Path) {
    let store = Store::open_dir(dir).unwrap();
    let rss_before = peak_rss_kib();
    let started = Instant::now();
    let mut spec = DatasetSpec::new("chat");
    spec.max_key_share = 1.0;
    let manifest = dataset::build(&store, &spec, &dir.join("out"), "bench", |_| {}).unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "traces": manifest.considered,
            "lines": manifest.examples(),
            "secs": secs,
            "traces_per_sec": manifest.considered as f64 / secs,
            "peak_rss_mib": peak_rss_kib() as f64 / 1024.0,
            "rss_at_open_mib": rss_before as f64 / 1024.0,
        })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("populate") => return populate(Path::new(&args[2]), args[3].parse().unwrap()),
        Some("export") => return export(Path::new(&args[2])),
        _ => {}
    }
    // `cargo test --benches` runs this without `--bench`: a small smoke run.
    let measuring = args.iter().any(|a| a == "--bench");
    let sizes: Vec<u64> = match std::env::var("FORGE_BENCH_SIZES") {
        Ok(s) => s.split(',').map(|v| v.trim().parse().unwrap()).collect(),
        Err(_) if measuring => vec![100_000, 1_000_000],
        Err(_) => vec![2_000],
    };
    let me = std::env::current_exe().unwrap();
    println!(
        "| stored traces | golden | lines | export time | traces/s | peak RSS of the exporter |"
    );
    println!("|--:|--:|--:|--:|--:|--:|");
    for n in sizes {
        let dir = tempfile::tempdir().unwrap();
        let filled = Command::new(&me)
            .args(["populate", dir.path().to_str().unwrap(), &n.to_string()])
            .status()
            .unwrap();
        assert!(filled.success());
        let out = Command::new(&me)
            .args(["export", dir.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        println!(
            "| {n} | {} | {} | {:.2} s | {:.0} | {:.1} MiB |",
            n / 2,
            r["lines"],
            r["secs"].as_f64().unwrap(),
            r["traces_per_sec"].as_f64().unwrap(),
            r["peak_rss_mib"].as_f64().unwrap()
        );
    }
    println!(
        "\nCommand: cargo bench -p forge-benches --bench dataset (targets: >= 100k traces/s; RSS flat in the number of traces)"
    );
}
