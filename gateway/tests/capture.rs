//! Capture as an operator meets it: `kill -9` in durable mode, secrets kept out of the logs and
//! exports, and the `forge traces` CLI against a stopped and a running gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use forge_gateway::sim::{SimConfig, SimUpstream};
use forge_layer::store::Store;
use forge_layer::trace::TraceId;

mod common;
use common::serve;

const FORGE: &str = env!("CARGO_BIN_EXE_forge");

fn config(sim_url: &str, data_dir: &Path, mode: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[capture]\ndata_dir = {:?}\nmode = \"{mode}\"\n\n[[upstreams]]\nname = \"sim\"\nbase_url = \"{sim_url}\"\n\n[[routes]]\nalias = \"m\"\nteacher = {{ upstream = \"sim\", model = \"gpt-4o\" }}\n",
        data_dir.display().to_string()
    )
}

async fn start_sim() -> forge_gateway::sim::SimHandle {
    let _ = rustls::crypto::ring::default_provider().install_default();
    SimUpstream::start(SimConfig::default(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap()
}

/// The admin API's address, as the gateway logged it in `dir/forge.log`.
fn admin_addr(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("forge.log")).unwrap();
    log.lines()
        .find(|l| l.contains("admin API listening"))
        .and_then(|l| l.split("addr=").nth(1))
        .map(|a| a.split_whitespace().next().unwrap().to_string())
        .expect("admin address in the log")
}

/// Stops the gateway as an operator does (SIGTERM); it must exit cleanly.
fn stop(forge: &mut common::Forge) {
    assert!(
        Command::new("kill")
            .args(["-TERM", &forge.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(forge.0.wait().unwrap().success());
}

fn chat(prompt: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": stream})
}

/// Runs `forge serve` in durable mode on `data` under load from four clients until `kill_after`
/// responses have been received whole, then kills it with SIGKILL. Returns the trace ids of
/// every response received whole.
async fn load_then_kill_9(
    sim_url: &str,
    dir: &Path,
    data: &Path,
    kill_after: usize,
) -> Vec<TraceId> {
    let (mut forge, base) = serve(&config(sim_url, data, "durable"), dir, &[]);
    let acknowledged = Arc::new(Mutex::new(Vec::<TraceId>::new()));
    let http = reqwest::Client::new();
    let mut workers = Vec::new();
    for w in 0..4 {
        let (http, base, acknowledged) = (http.clone(), base.clone(), Arc::clone(&acknowledged));
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let Ok(resp) = http
                    .post(format!("{base}/chat/completions"))
                    .json(&chat(&format!("w{w} q{i}"), i % 2 == 0))
                    .send()
                    .await
                else {
                    return;
                };
                let id: TraceId = resp.headers()["x-forge-trace-id"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let Ok(body) = resp.text().await else { return };
                // A stream is whole only with its terminator; a cut one was not acknowledged.
                if i % 2 == 0 && !body.ends_with("data: [DONE]\n\n") {
                    return;
                }
                acknowledged.lock().unwrap().push(id);
            }
        }));
    }
    let start = tokio::time::Instant::now();
    while acknowledged.lock().unwrap().len() < kill_after {
        assert!(
            start.elapsed() < forge_tests_deadline(),
            "load did not progress"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    forge.0.kill().unwrap(); // SIGKILL, mid-load
    forge.0.wait().unwrap();
    for w in workers {
        w.await.unwrap();
    }
    acknowledged.lock().unwrap().clone()
}

#[tokio::test]
async fn durable_mode_keeps_every_answered_exchange_across_repeated_kill_9() {
    let sim = start_sim().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Several rounds on one store, each killed at a different point of its load.
    let mut acknowledged = Vec::new();
    // The reliability plan's R3: fifty kills.
    for round in 0..50 {
        let kill_after = rand::random_range(10..300);
        acknowledged.extend(load_then_kill_9(&sim.base_url(), dir.path(), &data, kill_after).await);

        let opened = std::time::Instant::now();
        // Half the rounds open it as a command that only reads does (`forge traces`): a crash
        // left it unrecovered, so that open recovers it as the gateway's does.
        let store = if round % 2 == 1 {
            Store::open_existing_dir(&data)
        } else {
            Store::open_dir(&data)
        }
        .expect("the store reopens after kill -9");
        println!(
            "round {round}: killed after {kill_after} responses; reopen took {:?}",
            opened.elapsed()
        );
        // Fast because it read the allocator state the last commit saved, not the whole file.
        assert_eq!(
            store.full_repairs(),
            0,
            "round {round}: the reopen had to repair the whole file"
        );
        let missing: Vec<_> = acknowledged
            .iter()
            .filter(|id| store.trace(**id).unwrap().is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} of {} acknowledged exchanges missing: {missing:?}",
            missing.len(),
            acknowledged.len()
        );
        // No half-written trace: every stored one decodes whole.
        let mut stored = 0u64;
        store
            .for_each_trace(|trace| {
                assert!(!trace.request.is_null());
                stored += 1;
                true
            })
            .expect("every stored trace decodes");
        assert!(stored >= acknowledged.len() as u64);
        assert_eq!(stored, store.trace_count().unwrap());
    }
}

fn forge_tests_deadline() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

#[tokio::test]
async fn secrets_stay_out_of_logs_store_and_exports_and_the_cli_reads_both_ways() {
    let sim = start_sim().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text = config(&sim.base_url(), &data, "async");
    let (mut forge, base) = serve(
        &text,
        dir.path(),
        &[("FORGE_LOG", "debug"), ("FORGE_ADMIN_TOKEN", "adm1n-t0ken")],
    );

    let header_secret = "sk-proj-HEADERsecret0123456789abcdef";
    let prompt_secret = "ghp_PROMPTsecret0123456789abcdefghijklmn";
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for stream in [false, true] {
        let resp = http
            .post(format!("{base}/chat/completions"))
            .bearer_auth(header_secret)
            .header("api-key", header_secret)
            .header("cookie", format!("session={header_secret}"))
            .json(&chat(
                &format!("please use {prompt_secret} for the repo"),
                stream,
            ))
            .send()
            .await
            .unwrap();
        ids.push(
            resp.headers()["x-forge-trace-id"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        resp.text().await.unwrap();
    }

    // While it runs, the file is locked: the CLI says how to read through the admin API…
    let busy = Command::new(FORGE)
        .args(["traces", "list", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("--admin"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    // …and through it, the export holds both traces, redacted.
    let admin_addr = admin_addr(dir.path());
    // `async` capture commits every 50 ms or so: poll the live export until both traces are in.
    let export_live = || {
        let admin_addr = admin_addr.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(FORGE)
                .args([
                    "traces",
                    "export",
                    "--admin",
                    &format!("http://{admin_addr}"),
                ])
                .env("FORGE_ADMIN_TOKEN", "adm1n-t0ken")
                .output()
                .unwrap()
        })
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let live_export = loop {
        let live = export_live().await.unwrap();
        assert!(
            live.status.success(),
            "{}",
            String::from_utf8_lossy(&live.stderr)
        );
        let text = String::from_utf8_lossy(&live.stdout).into_owned();
        if text.lines().count() >= 2 || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(live_export.lines().count(), 2, "{live_export}");
    // An address without a scheme is taken as http.
    let admin_stats = |addr: String| {
        tokio::task::spawn_blocking(move || {
            Command::new(FORGE)
                .args(["traces", "stats", "--admin", &addr])
                .env("FORGE_ADMIN_TOKEN", "adm1n-t0ken")
                .output()
                .unwrap()
        })
    };
    let bare = admin_stats(admin_addr.clone()).await.unwrap();
    assert!(
        bare.status.success(),
        "{}",
        String::from_utf8_lossy(&bare.stderr)
    );

    stop(&mut forge);
    // With the gateway gone, the error says where and why.
    let gone = admin_stats(format!("http://{admin_addr}")).await.unwrap();
    assert!(!gone.status.success());
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(
        stderr.contains(&format!("admin API at http://{admin_addr}"))
            && stderr.to_lowercase().contains("refused")
            && !stderr.contains("admin API: admin API"),
        "{stderr}"
    );

    let offline = Command::new(FORGE)
        .args(["traces", "export", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        offline.status.success(),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    let export = String::from_utf8_lossy(&offline.stdout).into_owned();
    assert_eq!(export.lines().count(), 2);
    for id in &ids {
        assert!(export.contains(id.as_str()));
    }
    assert!(export.contains("[REDACTED:github_token]"), "{export}");
    let stats = Command::new(FORGE)
        .args(["traces", "stats", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&stats.stdout).contains("traces: 2"));

    let log = std::fs::read_to_string(dir.path().join("forge.log")).unwrap();
    let file = std::fs::read(data.join(forge_layer::store::STORE_FILE)).unwrap();
    for secret in [header_secret, prompt_secret] {
        assert!(!log.contains(secret), "secret in the log");
        assert!(
            !export.contains(secret) && !live_export.contains(secret),
            "secret in an export"
        );
        assert!(
            !file.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret in the redb file"
        );
    }
}

#[tokio::test]
async fn the_cli_lists_past_one_admin_page() {
    let sim = start_sim().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // More traces than the admin API's largest page (1,000).
    let traces: Vec<(TraceId, Vec<u8>)> = (0..1005)
        .map(|i| {
            let trace = forge_layer::trace::Trace {
                id: TraceId::generate(),
                time_ms: i,
                tenant: None,
                key_id: None,
                alias: "m".into(),
                upstream: "sim".into(),
                model: "gpt-4o".into(),
                arm: forge_router::Arm::Teacher,
                route_version: 1,
                stream: false,
                request: serde_json::json!({"n": i}),
                response: Default::default(),
                status: 200,
                latency_us: 1,
                ttfb_us: 1,
                outcome: forge_layer::trace::Outcome::Completed,
            };
            (trace.id, serde_json::to_vec(&trace).unwrap())
        })
        .collect();
    // And the newest, a request nested deeper than a JSON tree holds once inside a page of
    // the admin API (the parser's limit is 128 levels).
    let mut traces = traces;
    let deep_id = TraceId::generate();
    let nested = format!("{}1{}", "{\"a\":".repeat(126), "}".repeat(126));
    let mut deep =
        serde_json::to_value(forge_layer::trace::Trace::decode(&traces[0].1).unwrap()).unwrap();
    deep["id"] = serde_json::json!(deep_id.to_string());
    deep["request"] = serde_json::Value::Null;
    let deep = serde_json::to_string(&deep)
        .unwrap()
        .replace("\"request\":null", &format!("\"request\":{nested}"));
    traces.push((deep_id, deep.into_bytes()));
    let store = Store::open_dir(&data).unwrap();
    store
        .insert_encoded(traces.iter().map(|(id, bytes)| (*id, bytes.as_slice())))
        .unwrap();
    drop(store);
    let (mut forge, _) = serve(
        &config(&sim.base_url(), &data, "async"),
        dir.path(),
        &[("FORGE_ADMIN_TOKEN", "adm1n-t0ken")],
    );
    let admin = admin_addr(dir.path());
    let cli = |args: &'static [&'static str]| {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            let output = Command::new(FORGE)
                .arg("traces")
                .args(args)
                .args(["--admin", &admin])
                .env("FORGE_ADMIN_TOKEN", "adm1n-t0ken")
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap()
        })
    };
    let listed = cli(&["list", "--limit", "1003"]).await.unwrap();
    let ids: Vec<&str> = listed
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ids.len(), 1003);
    // Newest first, none twice, across the page boundary.
    let expected: Vec<String> = traces
        .iter()
        .rev()
        .take(1003)
        .map(|(id, _)| id.to_string())
        .collect();
    assert_eq!(ids, expected);
    let exported = cli(&["export"]).await.unwrap();
    assert_eq!(exported.lines().count(), 1006);
    let first = exported.lines().next().unwrap();
    assert!(first.contains(&deep_id.to_string()), "{first:.100}");
    assert!(first.contains(&format!("\"request\":{nested}")));
    let shown = tokio::task::spawn_blocking(move || {
        Command::new(FORGE)
            .args(["traces", "show", &deep_id.to_string(), "--admin", &admin])
            .env("FORGE_ADMIN_TOKEN", "adm1n-t0ken")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&shown.stdout)
            .matches("\"a\":")
            .count(),
        126
    );
    stop(&mut forge);
}

#[tokio::test]
async fn keys_from_a_file_with_a_trailing_newline_still_authenticate() {
    // As `kubectl create secret --from-file` leaves them.
    let sim = start_sim().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[[clients]]\nid = \"app\"\nkey_env = \"APP_KEY\"\n",
        config(&sim.base_url(), &dir.path().join("data"), "async")
    );
    let (mut forge, url) = serve(
        &text,
        dir.path(),
        &[
            ("APP_KEY", "sk-app-0123456789\n"),
            ("FORGE_ADMIN_TOKEN", " adm1n-t0ken\n"),
        ],
    );
    let http = reqwest::Client::new();
    let answered = http
        .post(format!("{url}/chat/completions"))
        .bearer_auth("sk-app-0123456789")
        .json(&chat("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let admin = admin_addr(dir.path());
    let stats = http
        .get(format!("http://{admin}/admin/stats"))
        .bearer_auth("adm1n-t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(stats.status(), 200);
    // The CLI reads its token the same way.
    let cli = tokio::task::spawn_blocking(move || {
        Command::new(FORGE)
            .args(["traces", "stats", "--admin", &admin])
            .env("FORGE_ADMIN_TOKEN", "adm1n-t0ken\n")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    stop(&mut forge);
}

#[tokio::test]
async fn a_refused_upstream_key_is_logged_with_the_answer_s_code_and_nothing_of_the_key() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim = SimUpstream::start(
        SimConfig {
            api_key: Some("sk-proj-RIGHTkey0123456789Ab1c".into()),
            ..SimConfig::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = config(&sim.base_url(), &dir.path().join("data"), "async").replace(
        "name = \"sim\"\n",
        "name = \"sim\"\napi_key_env = \"FORGE_TEST_UPSTREAM_KEY\"\n",
    );
    let wrong = "sk-proj-WRONGkey0123456789Zq9x";
    let (forge, base) = serve(&text, dir.path(), &[("FORGE_TEST_UPSTREAM_KEY", wrong)]);
    let resp = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .json(&chat("hello", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let answer = resp.text().await.unwrap();
    drop(forge);
    let log = std::fs::read_to_string(dir.path().join("forge.log")).unwrap();
    let refusal = log
        .lines()
        .find(|l| l.contains("refused Forge's credentials"))
        .unwrap_or_else(|| panic!("no refusal in the log:\n{log}"));
    // The simulated OpenAI answers a wrong key with `invalid_api_key`, quoting the key masked.
    assert!(
        refusal.contains("sim") && refusal.contains("401") && refusal.contains("invalid_api_key"),
        "{refusal}"
    );
    for text in [&log, &answer] {
        assert!(
            !text.contains("Zq9x") && !text.contains("WRONGkey"),
            "{text}"
        );
        assert!(!text.contains("Incorrect API key"), "{text}");
    }
}
