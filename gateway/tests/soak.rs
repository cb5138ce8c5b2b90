//! The reliability plan's R1 soak: hundreds of concurrent streams through the real binary, for
//! minutes, with capture on. Nothing lost, nothing failed, memory flat, little latency added.
//!
//! Too long for every test run, so it is ignored unless asked for:
//! `cargo test --release -p forge-gateway --test soak -- --ignored --nocapture`.
//! `FORGE_SOAK_SECS` (default 600) sets how long the load runs and `FORGE_SOAK_STREAMS` (default
//! 200) how many streams are open at once. The simulated teacher streams 500 tokens 10 ms apart,
//! as the plan has it. Some connections go straight to it meanwhile: added latency is the p99
//! through Forge minus the p99 direct, two distributions from the same minutes (not the p99 of
//! a difference, since no stream is timed both ways).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use forge_gateway::sim::{ModelBehavior, SimConfig, SimUpstream};
use forge_layer::store::Store;

mod common;
use common::{Forge, capture_counters, serve, status_bytes};

/// The plan's teacher: 500 tokens, 10 ms apart.
const TOKENS: usize = 500;
const TOKEN_DELAY: Duration = Duration::from_millis(10);
/// Streams straight to the simulated teacher, for the baseline.
const DIRECT_STREAMS: usize = 40;
/// Fewer timed streams (after the warm-up) than this, on either side, and a p99 means little.
const MIN_TIMED: usize = 100;
/// The plan's bounds.
const MAX_RSS_GROWTH_PCT: f64 = 10.0;
const MAX_ADDED_MS: f64 = 5.0;
/// redb's page cache for the soak, small enough to fill during the warm-up: a cache still
/// filling would look like growth, and it stops at its cap (`capture.cache_mb`).
const CACHE_MB: usize = 8;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The gateway's resident set in KiB; fails the test if it has exited.
fn rss_kib(forge: &mut Forge) -> u64 {
    if let Ok(Some(status)) = forge.0.try_wait() {
        panic!("forge exited during the soak: {status}");
    }
    status_bytes(forge.0.id(), "VmRSS") / 1024
}

/// What one streaming connection saw.
#[derive(Debug, Default)]
struct Tally {
    /// Streams that ended with `[DONE]`, warm-up included.
    completed: u64,
    /// To the first body byte and to the end, for streams started after the warm-up.
    first_byte: Vec<Duration>,
    total: Vec<Duration>,
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.completed += other.completed;
        self.first_byte.extend(other.first_byte);
        self.total.extend(other.total);
        self.failures.extend(other.failures);
    }
}

/// The `pct`th percentile, in milliseconds, of a non-empty sample.
fn p(pct: usize, samples: &mut [Duration]) -> f64 {
    samples.sort();
    let i = (samples.len() * pct).div_ceil(100).max(1) - 1;
    samples[i].as_secs_f64() * 1e3
}

/// After `delay`, streams one request after another to `url` until `stop`, timing each that
/// starts after `measure_from`.
async fn streamer(
    http: reqwest::Client,
    url: String,
    delay: Duration,
    stop: Arc<AtomicBool>,
    measure_from: Instant,
) -> Tally {
    tokio::time::sleep(delay).await;
    let mut tally = Tally::default();
    let body = serde_json::json!({
        "model": "t",
        "stream": true,
        "messages": [{"role": "user", "content": "soak"}],
    });
    'streams: while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let mut resp = match http.post(&url).json(&body).send().await {
            Ok(resp) if resp.status() == 200 => resp,
            Ok(resp) => {
                tally.failures.push(format!("status {}", resp.status()));
                // Not a busy loop if the gateway is gone.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                tally.failures.push(e.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut first = None;
        let mut tail = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    first.get_or_insert_with(|| start.elapsed());
                    tail.extend_from_slice(&chunk);
                    let keep = tail.len().saturating_sub(32);
                    tail.drain(..keep);
                }
                Ok(None) => break,
                Err(e) => {
                    tally.failures.push(e.to_string());
                    continue 'streams;
                }
            }
        }
        if !tail.trim_ascii_end().ends_with(b"data: [DONE]") {
            tally.failures.push("stream cut".into());
            continue;
        }
        tally.completed += 1;
        if start >= measure_from {
            tally.first_byte.push(first.unwrap_or_default());
            tally.total.push(start.elapsed());
        }
    }
    tally
}

async fn gather(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let mut all = Tally::default();
    for task in tasks {
        all.add(task.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of minutes: run it with --ignored"]
async fn hundreds_of_streams_for_minutes_lose_nothing_and_memory_stays_flat() {
    if cfg!(debug_assertions) {
        panic!("run the soak with --release: a debug build is too slow for its latency bound");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let secs = env_or("FORGE_SOAK_SECS", 600);
    let streams = usize::try_from(env_or("FORGE_SOAK_STREAMS", 200)).unwrap();
    assert!(streams > 0, "FORGE_SOAK_STREAMS must be at least 1");
    let run = Duration::from_secs(secs);
    let warm_up = run / 5;

    let teacher = ModelBehavior {
        chunk_delay: TOKEN_DELAY,
        words: TOKENS,
        ..ModelBehavior::default()
    };
    let sim = SimUpstream::start(
        SimConfig {
            default_behavior: teacher,
            ..SimConfig::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_in_flight = {}\n\n[capture]\ndata_dir = {:?}\ncache_mb = {CACHE_MB}\n\n[[upstreams]]\nname = \"sim\"\nbase_url = \"{}\"\n\n[[routes]]\nalias = \"t\"\nteacher = {{ upstream = \"sim\", model = \"teacher\" }}\n",
        streams * 2,
        data.display().to_string(),
        sim.base_url()
    );
    let (mut forge, base) = serve(&config, dir.path(), &[]);
    let root = base.strip_suffix("/v1").expect("the base URL ends in /v1");

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    // Each connection starts a little after the last, spread over one stream's length, so
    // that streams begin and end all the time rather than in bursts of hundreds.
    let one_stream = TOKEN_DELAY * u32::try_from(TOKENS).unwrap();
    let spawn = |url: String, i: usize, of: usize| {
        let delay = one_stream * u32::try_from(i).unwrap() / u32::try_from(of).unwrap();
        let stop = Arc::clone(&stop);
        tokio::spawn(streamer(http.clone(), url, delay, stop, start + warm_up))
    };
    let through: Vec<_> = (0..streams)
        .map(|i| spawn(format!("{base}/chat/completions"), i, streams))
        .collect();
    let direct: Vec<_> = (0..DIRECT_STREAMS)
        .map(|i| {
            spawn(
                format!("{}/chat/completions", sim.base_url()),
                i,
                DIRECT_STREAMS,
            )
        })
        .collect();

    tokio::time::sleep(warm_up).await;
    // RSS rises and falls by tens of MiB as buffers fill and are freed, so one sample says
    // little: growth is the highest RSS of the last third of the run against the first.
    let mut rss = Vec::new();
    while start.elapsed() < run {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let kib = rss_kib(&mut forge);
        if rss.len() % 30 == 0 {
            println!("{:>4} s: RSS {} MiB", start.elapsed().as_secs(), kib / 1024);
        }
        rss.push(kib);
    }
    stop.store(true, Ordering::Relaxed);
    let mut through = gather(through).await;
    let mut direct = gather(direct).await;

    // Every stream the clients finished is captured, none dropped or failed. The client sees
    // a stream's end only after the gateway has handed its trace to the writer, so `eligible`
    // is final by now; wait for the commits.
    let deadline = Instant::now() + Duration::from_secs(60);
    let [eligible, captured, dropped, failed] = loop {
        let c = capture_counters(&http, root).await;
        if c[1] + c[2] + c[3] == c[0] {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "capture did not drain within 60 s: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // `captured` counts committed traces only, so killing the gateway loses none of them.
    drop(forge);
    let stored = Store::open_existing_dir(&data)
        .unwrap()
        .trace_count()
        .unwrap();

    let completed = through.completed;
    println!(
        "{secs} s, {streams} streams: {completed} completed, {} failed; capture eligible {eligible} \
         captured {captured} dropped {dropped} failed {failed}; stored {stored}",
        through.failures.len() + direct.failures.len()
    );
    assert!(
        through.failures.is_empty() && direct.failures.is_empty(),
        "failures: {:?}",
        through
            .failures
            .iter()
            .chain(&direct.failures)
            .take(5)
            .collect::<Vec<_>>()
    );
    // No client abandons a stream: each one it started, it finished.
    assert!(completed > 0);
    assert_eq!(
        (eligible, captured, dropped, failed),
        (completed, completed, 0, 0)
    );
    assert_eq!(stored, completed);

    assert!(
        rss.len() >= 3,
        "FORGE_SOAK_SECS is too short to sample memory"
    );
    let third = rss.len() / 3;
    let highest = |samples: &[u64]| samples.iter().copied().max().unwrap_or(0);
    let (early, late) = (highest(&rss[..third]), highest(&rss[rss.len() - third..]));
    let growth = 100.0 * (late as f64 - early as f64) / early as f64;
    println!(
        "RSS after the warm-up ({} s): highest {} MiB in the first third, {} MiB in the last \
         ({growth:+.1}%); lowest {} MiB",
        warm_up.as_secs(),
        early / 1024,
        late / 1024,
        rss.iter().min().copied().unwrap_or(0) / 1024
    );

    let timed = (through.total.len(), direct.total.len());
    assert!(
        timed.0 >= MIN_TIMED && timed.1 >= MIN_TIMED,
        "too few streams timed for a p99: {timed:?}"
    );
    let mut line = Vec::new();
    let mut added = Vec::new();
    for (what, forge_ms, direct_ms) in [
        ("last byte", &mut through.total, &mut direct.total),
        (
            "first byte",
            &mut through.first_byte,
            &mut direct.first_byte,
        ),
    ] {
        let (f50, d50) = (p(50, forge_ms), p(50, direct_ms));
        let (f99, d99) = (p(99, forge_ms), p(99, direct_ms));
        line.push(format!(
            "{what}: p50 {f50:.2} vs {d50:.2} ms, p99 {f99:.2} vs {d99:.2} ms ({:+.2})",
            f99 - d99
        ));
        added.push(f99 - d99);
    }
    println!(
        "through Forge vs direct ({} and {} streams timed): {}",
        timed.0,
        timed.1,
        line.join("; ")
    );
    assert!(growth < MAX_RSS_GROWTH_PCT, "RSS grew {growth:.1}%");
    assert!(
        added.iter().all(|&ms| ms <= MAX_ADDED_MS),
        "p99 added over {MAX_ADDED_MS} ms: {}",
        line.join("; ")
    );
}
