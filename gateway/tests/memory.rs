//! The reliability plan's M2, memory amplification: the gateway's peak memory per request stays
//! within ten times the request body limit, with capture on and every trace written.
//!
//! The real binary, with `async` capture, takes concurrent requests whose bodies are just under
//! the limit. Each body is held by the proxy, rewritten for the upstream, kept by the capture
//! session, parsed, redacted, encoded and committed by the writer, so a copy too many anywhere
//! shows in the process's peak resident memory (`VmHWM`), read before and after.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use forge_gateway::sim::{SimConfig, SimUpstream};

mod common;
use common::serve;

const BODY_LIMIT: usize = 4 * 1024 * 1024;
const CONCURRENT: usize = 8;
/// The plan's bound; Envoy counts 100× as a vulnerability.
const MAX_AMPLIFICATION: usize = 10;

/// The peak resident memory of process `pid`, in bytes.
fn peak_rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}

/// A chat request of just under `size` bytes: one long user message.
fn big_chat(size: usize, i: usize, stream: bool) -> Vec<u8> {
    let head = format!(
        r#"{{"model":"m","stream":{stream},"messages":[{{"role":"user","content":"request {i}: "#
    );
    let tail = r#""}]}"#;
    let words = "the quick brown fox jumps over the lazy dog ";
    let room = size - head.len() - tail.len() - 64;
    let mut body = head.into_bytes();
    body.extend(words.as_bytes().iter().cycle().take(room));
    body.extend_from_slice(tail.as_bytes());
    assert!(body.len() < size);
    body
}

/// Reads a counter or gauge from the Prometheus text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn peak_memory_per_request_stays_within_ten_times_the_body_limit() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim = SimUpstream::start(SimConfig::default(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nmax_body_bytes = {BODY_LIMIT}\n\n[capture]\ndata_dir = {:?}\n\n[[upstreams]]\nname = \"sim\"\nbase_url = \"{}\"\n\n[[routes]]\nalias = \"m\"\nteacher = {{ upstream = \"sim\", model = \"gpt-4o\" }}\n",
        dir.path().join("data").display().to_string(),
        sim.base_url()
    );
    let (forge, base) = serve(&config, dir.path(), &[]);
    let pid = forge.0.id();
    let http = reqwest::Client::new();
    let root = base.trim_end_matches("/v1").to_string();

    // One small exchange first, so that the runtime, pools and store are all warm.
    let warm = http
        .post(format!("{base}/chat/completions"))
        .header("content-type", "application/json")
        .body(big_chat(4096, 0, false))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    warm.text().await.unwrap();
    let before = peak_rss(pid);

    let requests = (0..CONCURRENT).map(|i| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let resp = http
                .post(format!("{base}/chat/completions"))
                .header("content-type", "application/json")
                .body(big_chat(BODY_LIMIT, i, i % 2 == 0))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            assert_eq!(status, 200, "{text}");
        }
    });
    futures_util::future::join_all(requests).await;
    // The writer's part counts too: wait until every trace is committed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let text = http
            .get(format!("{root}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let captured = metric(&text, "forge_capture_captured_total").unwrap_or(0);
        if captured == 1 + CONCURRENT as u64 {
            assert_eq!(metric(&text, "forge_capture_dropped_total"), Some(0));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the traces were not all captured:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown = peak_rss(pid).saturating_sub(before);
    let per_request = grown as f64 / (CONCURRENT * BODY_LIMIT) as f64;
    println!(
        "peak RSS grew {:.1} MiB for {CONCURRENT} concurrent requests of {} MiB: {per_request:.2}x the body limit per request",
        grown as f64 / (1024.0 * 1024.0),
        BODY_LIMIT / (1024 * 1024)
    );
    assert!(
        grown <= CONCURRENT * MAX_AMPLIFICATION * BODY_LIMIT,
        "{per_request:.2}x the body limit per request"
    );
    // The bodies really went through, whole: the store holds each prompt.
    drop(forge);
    let store = forge_layer::store::Store::open_existing_dir(&dir.path().join("data")).unwrap();
    let mut long = 0;
    store
        .for_each_trace(|t| {
            let content = t.request["messages"][0]["content"].as_str().unwrap_or("");
            if content.len() > BODY_LIMIT - 4096 {
                long += 1;
            }
            true
        })
        .unwrap();
    assert_eq!(long, CONCURRENT);
}
