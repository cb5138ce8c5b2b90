//! The gateway's memory under hostile input, as the reliability plan measures it, on the real
//! binary with `async` capture.
//!
//! - M1: floods of malformed requests (bad JSON, a body over the limit, invalid UTF-8, 300
//!   header fields, a 2 MiB header, a chunked body cut short) while slowloris connections hold
//!   half-sent heads: each gets its 4xx with an OpenAI-shaped JSON error, none a 5xx. Resident
//!   memory stays within 5% of what it was after a warm-up round, and the 2 MiB heads leave at
//!   most what the heads in flight can hold.
//! - M2: concurrent requests whose bodies are just under the limit. Each body is held by the
//!   proxy, rewritten for the upstream, kept by the capture session, parsed, redacted, encoded
//!   and committed by the writer, so a copy too many anywhere shows in the process's peak
//!   resident memory (`VmHWM`): it must stay within ten times the limit per request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use forge_gateway::sim::{SimConfig, SimHandle, SimUpstream};

mod common;
use common::{Forge, capture_counters, serve, status_bytes};

const BODY_LIMIT: usize = 4 * 1024 * 1024;
const CONCURRENT: usize = 8;
/// The plan's bound; Envoy counts 100× as a vulnerability.
const MAX_AMPLIFICATION: usize = 10;

/// The peak resident memory of process `pid`, in bytes.
fn peak_rss(pid: u32) -> usize {
    usize::try_from(status_bytes(pid, "VmHWM")).unwrap()
}

/// RSS of `pid` once the connections just answered are gone.
async fn settled_rss(pid: u32) -> usize {
    tokio::time::sleep(Duration::from_secs(1)).await;
    usize::try_from(status_bytes(pid, "VmRSS")).unwrap()
}

/// A running gateway with capture on (data in `dir/data`), in front of a simulated upstream.
struct Running {
    sim: SimHandle,
    dir: tempfile::TempDir,
    forge: Forge,
    base: String,
}

/// Starts the simulated upstream and `forge serve` with `body_limit` and `env`.
async fn start(body_limit: usize, env: &[(&str, &str)]) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim = SimUpstream::start(SimConfig::default(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nmax_body_bytes = {body_limit}\n\n[capture]\ndata_dir = {:?}\n\n[[upstreams]]\nname = \"sim\"\nbase_url = \"{}\"\n\n[[routes]]\nalias = \"m\"\nteacher = {{ upstream = \"sim\", model = \"gpt-4o\" }}\n",
        dir.path().join("data").display().to_string(),
        sim.base_url()
    );
    let (forge, base) = serve(&config, dir.path(), env);
    Running {
        sim,
        dir,
        forge,
        base,
    }
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

#[cfg(target_os = "linux")]
#[tokio::test]
async fn peak_memory_per_request_stays_within_ten_times_the_body_limit() {
    // The upstream must outlive the requests: bound, not dropped with the rest.
    let Running {
        sim: _sim,
        dir,
        forge,
        base,
    } = start(BODY_LIMIT, &[]).await;
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
    // The peak so far (start-up's, say) must not hide part of the growth: reset it to the
    // current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
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
        let [eligible, captured, dropped, failed] = capture_counters(&http, &root).await;
        if captured == 1 + CONCURRENT as u64 {
            assert_eq!((eligible, dropped, failed), (captured, 0, 0));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the traces were not all captured: {eligible} eligible, {captured} captured, {dropped} dropped, {failed} failed"
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

/// One kind of malformed request, and the status it must get.
struct Malformed {
    name: &'static str,
    /// How many of it in each round of the flood.
    weight: usize,
    request: Vec<u8>,
    /// Whether the client stops writing (half-closes) after the request: a body cut short.
    cut: bool,
    status: u16,
}

/// A raw chat request with `head` fields and `body`, closing the connection after it.
fn raw_chat(extra_head: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: forge\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra_head}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

fn malformed_kinds(body_limit: usize) -> Vec<Malformed> {
    let fine = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let many_fields: String = (0..300).map(|i| format!("x-h{i}: v\r\n")).collect();
    let huge_field = format!("x-big: {}\r\n", "a".repeat(2 * 1024 * 1024));
    let mut invalid_utf8 = br#"{"model":"m","messages":[{"role":"user","content":""#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    invalid_utf8.extend_from_slice(br#""}]}"#);
    vec![
        Malformed {
            name: "bad JSON",
            weight: 4,
            request: raw_chat("", b"{not json"),
            cut: false,
            status: 400,
        },
        Malformed {
            name: "body limit + 1",
            weight: 4,
            request: raw_chat("", &vec![b' '; body_limit + 1]),
            cut: false,
            status: 413,
        },
        Malformed {
            name: "invalid UTF-8",
            weight: 4,
            request: raw_chat("", &invalid_utf8),
            cut: false,
            status: 400,
        },
        Malformed {
            name: "300 header fields",
            weight: 4,
            request: raw_chat(&many_fields, fine),
            cut: false,
            status: 431,
        },
        Malformed {
            name: "2 MiB header",
            weight: 1,
            request: raw_chat(&huge_field, fine),
            cut: false,
            status: 431,
        },
        Malformed {
            name: "chunked body cut short",
            weight: 4,
            request: b"POST /v1/chat/completions HTTP/1.1\r\nhost: forge\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n100\r\n{\"model\":\"m\"".to_vec(),
            cut: true,
            status: 400,
        },
    ]
}

/// Sends one malformed request on a connection of its own; returns the status and the body.
async fn send_malformed(addr: &str, kind: &Malformed) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The gateway may answer (and close) before it has read everything, as for a body over the
    // limit: a failed write is fine, the answer is what counts.
    let _ = socket.write_all(&kind.request).await;
    if kind.cut {
        let _ = socket.shutdown().await;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), socket.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("{}: no answer within 60 s", kind.name));
    if let Err(e) = read {
        assert!(!answer.is_empty(), "{}: {e}", kind.name);
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{}: not an HTTP answer: {answer:.200}", kind.name));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sends `total` malformed requests, the kinds by their weights, `workers` at a time, checking
/// each answer.
async fn flood(addr: &str, kinds: &Arc<Vec<Malformed>>, total: usize, workers: usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let order: Arc<Vec<usize>> = Arc::new(
        (0..kinds.len())
            .flat_map(|k| std::iter::repeat_n(k, kinds[k].weight))
            .collect(),
    );
    let tasks = (0..workers).map(|_| {
        let (addr, kinds, next, order) = (
            addr.to_string(),
            Arc::clone(kinds),
            Arc::clone(&next),
            Arc::clone(&order),
        );
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let kind = &kinds[order[i % order.len()]];
                let (status, body) = send_malformed(&addr, kind).await;
                assert_eq!(status, kind.status, "{}: {body:.300}", kind.name);
                let error: serde_json::Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {body:.300}", kind.name));
                for key in ["message", "type", "param", "code"] {
                    assert!(
                        error["error"].get(key).is_some(),
                        "{}: error.{key} missing: {body:.300}",
                        kind.name
                    );
                }
            }
        })
    });
    for task in futures_util::future::join_all(tasks).await {
        task.unwrap();
    }
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_flood_of_malformed_requests_gets_json_4xx_and_leaves_memory_flat() {
    const FLOOD: usize = 10_000;
    const WORKERS: usize = 8;
    const BODY_LIMIT: usize = 64 * 1024;
    const SLOWLORIS: usize = 50;
    // The plan's bound.
    const MAX_RSS_GROWTH_PCT: f64 = 5.0;
    /// What hyper's read buffer may grow to for one head (the parser's cap).
    const HEAD_BUFFER_MAX: usize = 4 * 1024 * 1024;
    // The allocator returns freed memory at once, so that RSS is what the gateway holds, not
    // what the allocator keeps at hand for the next 2 MiB head (with its default delay, RSS
    // moved between 72 and 86 MiB from one round of the flood to the next).
    let Running {
        sim,
        dir,
        forge,
        base,
    } = start(BODY_LIMIT, &[("MIMALLOC_PURGE_DELAY", "0")]).await;
    let pid = forge.0.id();
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    let every_kind = Arc::new(malformed_kinds(BODY_LIMIT));
    // Everything but the 2 MiB heads, whose buffers the allocator keeps in part (below).
    let small_kinds = Arc::new(
        malformed_kinds(BODY_LIMIT)
            .into_iter()
            .filter(|k| k.request.len() < 1024 * 1024)
            .collect::<Vec<_>>(),
    );
    assert_eq!(small_kinds.len() + 1, every_kind.len());

    // Slowloris: heads half sent and never finished, held open through the flood.
    let mut slow = Vec::new();
    for _ in 0..SLOWLORIS {
        use tokio::io::AsyncWriteExt;
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        socket
            .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: f")
            .await
            .unwrap();
        slow.push(socket);
    }

    let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
    // The leak check first, before any 2 MiB head has left the allocator memory at hand that
    // a leak could hide in. A warm-up round fills the allocator's and the runtime's pools once;
    // after it, these kinds leave RSS steady (36.6 MiB after each of eight rounds of 2,000).
    flood(&addr, &small_kinds, FLOOD / 10, WORKERS).await;
    let warm = settled_rss(pid).await;
    flood(&addr, &small_kinds, FLOOD, WORKERS).await;
    let after = settled_rss(pid).await;
    flood(&addr, &small_kinds, FLOOD, WORKERS).await;
    let again = settled_rss(pid).await;
    let growth = |from: usize, to: usize| (to as f64 / from as f64 - 1.0) * 100.0;
    let (first, second) = (growth(warm, after), growth(after, again));
    println!(
        "two floods of {FLOOD} malformed requests of five kinds after a warm-up of {}: RSS {:.1} -> {:.1} ({first:+.1}%) -> {:.1} MiB ({second:+.1}%)",
        FLOOD / 10,
        mib(warm),
        mib(after),
        mib(again)
    );
    // A leak grows RSS in each flood alike. One reading alone moves by more than the bound on
    // a loaded machine (+7.0% once, beside a build), but not in both floods at once.
    assert!(
        first.min(second) < MAX_RSS_GROWTH_PCT,
        "RSS grew {first:.1}% and then {second:.1}%"
    );

    // Then every kind, 2 MiB heads among them. The allocator keeps part of their buffers
    // (between -1 and +11 MiB after each of eight rounds of 2,000, with no trend), so this
    // bound is what the heads in flight can hold, not a percentage.
    flood(&addr, &every_kind, FLOOD, WORKERS).await;
    let after_all = settled_rss(pid).await;
    println!(
        "{FLOOD} more of all six kinds: RSS {:.1} MiB ({:+.1} MiB)",
        mib(after_all),
        mib(after_all) - mib(again)
    );
    assert!(
        after_all <= again + WORKERS * HEAD_BUFFER_MAX,
        "RSS grew from {:.1} to {:.1} MiB",
        mib(again),
        mib(after_all)
    );

    // Still serving, none of it reached the upstream, and nothing panicked.
    let http = reqwest::Client::new();
    let ok = http
        .post(format!("{base}/chat/completions"))
        .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(sim.request_count(), 1);
    drop(slow);
    drop(forge);
    let log = std::fs::read_to_string(dir.path().join("forge.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}
