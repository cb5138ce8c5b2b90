//! The `forge` binary as an operator runs it: config errors, the upstream key from the
//! environment, and a SIGTERM drain with streams in flight.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use forge_gateway::sim::{ModelBehavior, SimConfig, SimUpstream};

const FORGE: &str = env!("CARGO_BIN_EXE_forge");

mod common;
use common::Forge;

/// Starts `forge serve` on `config` in a directory of its own, which it returns with the gateway
/// and the base URL it printed.
fn serve(config: &str, env: &[(&str, &str)]) -> (Forge, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (forge, url) = common::serve(config, dir.path(), env);
    (forge, url, dir)
}

fn run_to_failure(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("forge.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(FORGE)
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("FORGE_TEST_MISSING")
        .env("FORGE_TEST_EMPTY", "")
        .output()
        .unwrap();
    assert!(!out.status.success(), "forge should refuse this config");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn config(sim_url: &str, key_env: &str, data_dir: &std::path::Path) -> String {
    format!(
        "[capture]\ndata_dir = {:?}\n\n[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 60\n\n[[upstreams]]\nname = \"sim\"\nbase_url = \"{sim_url}\"\napi_key_env = \"{key_env}\"\n\n[[routes]]\nalias = \"a\"\nteacher = {{ upstream = \"sim\", model = \"trickle\" }}\n",
        data_dir.display().to_string()
    )
}

#[test]
fn bad_configs_are_refused_with_a_message_naming_the_problem() {
    let stderr = run_to_failure("[server]\nlisten = \"127.0.0.1:0\"\nlisten_port = 1\n");
    assert!(stderr.contains("listen_port"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let stderr = run_to_failure(&config(
        "http://127.0.0.1:9/v1",
        "FORGE_TEST_MISSING",
        dir.path(),
    ));
    assert!(stderr.contains("FORGE_TEST_MISSING"), "{stderr}");
    // Set but empty: every request would be refused upstream with a 401.
    let stderr = run_to_failure(&config(
        "http://127.0.0.1:9/v1",
        "FORGE_TEST_EMPTY",
        dir.path(),
    ));
    assert!(
        stderr.contains("FORGE_TEST_EMPTY") && stderr.contains("empty"),
        "{stderr}"
    );
}

#[test]
fn a_provider_serving_through_an_unknown_upstream_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let azure = format!(
        "{}\n[[distill]]\nroute = \"a\"\nstudent_base_model = \"gpt-4o-mini\"\nprovider = \"azure\"\nupstream = \"sim\"\n\n[distill.azure]\nendpoint = \"https://x.openai.azure.com\"\napi_key = \"k\"\n\n[distill.azure.deployment]\nsubscription_id = \"s\"\nresource_group = \"g\"\naccount = \"acct\"\ntoken = \"t\"\n",
        config("http://127.0.0.1:9/v1", "PATH", dir.path())
    );
    // Deployments are served through an upstream named `azure` unless the config says another:
    // none is defined, so a trained model could never be routed. Refused before any training.
    let stderr = run_to_failure(&azure);
    assert!(stderr.contains("upstream `azure`"), "{stderr}");
}

#[test]
fn reading_commands_refuse_a_directory_without_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let mistyped = dir.path().join("forge-dta");
    for args in [
        vec!["traces", "list", "--data-dir"],
        vec!["dataset", "export", "--route", "a", "--data-dir"],
    ] {
        let out = Command::new(FORGE)
            .args(&args)
            .arg(&mistyped)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no store at"), "{args:?}: {stderr}");
        assert!(
            !mistyped.join("forge.redb").exists(),
            "{args:?} created a store"
        );
    }
    for share in ["0", "-0.5", "1.5", "NaN"] {
        let out = Command::new(FORGE)
            .args(["dataset", "export", "--route", "a", "--data-dir"])
            .arg(dir.path())
            .arg(format!("--max-key-share={share}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("--max-key-share"),
            "{share}: {stderr}"
        );
    }
}

#[tokio::test]
async fn upstream_key_comes_from_env_and_sigterm_drains_streams() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let trickle = ModelBehavior {
        chunk_delay: Duration::from_millis(100),
        words: 30,
        ..ModelBehavior::default()
    };
    let sim = SimUpstream::start(
        SimConfig {
            models: [("trickle".to_string(), trickle)].into_iter().collect(),
            api_key: Some("sk-upstream-test".into()),
            ..SimConfig::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let (forge, base, _dir) = serve(
        &config(&sim.base_url(), "FORGE_TEST_UPSTREAM_KEY", data.path()),
        &[("FORGE_TEST_UPSTREAM_KEY", "sk-upstream-test")],
    );
    let http = reqwest::Client::new();
    let body = serde_json::json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": true});

    // The sim refuses any other key, so a 200 proves the env key was sent; the client's wasn't.
    let resp = http
        .post(format!("{base}/chat/completions"))
        .bearer_auth("sk-client-key")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let auth: Vec<String> = sim.requests()[0]
        .headers
        .iter()
        .filter(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(auth, vec!["Bearer sk-upstream-test".to_string()]);
    let stream = tokio::spawn(async move { resp.text().await.unwrap() });

    let status = sigterm_and_wait(forge).await;
    assert!(status.success(), "forge exited with {status}");
    let text = stream.await.unwrap();
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "stream cut by SIGTERM: {text}"
    );
    assert!(
        http.get(format!("{base}/models")).send().await.is_err(),
        "still accepting after exit"
    );
}

/// Opens the store a stopped gateway left in `dir`: it must need no repair (the gateway closed
/// it cleanly). Returns its traces, oldest first.
fn traces_left_without_repair(dir: &std::path::Path) -> Vec<forge_layer::trace::Trace> {
    // A read-only open refuses a file that needs recovery, quick or not.
    let clean = redb::Database::builder().open_read_only(dir.join(forge_layer::store::STORE_FILE));
    assert!(
        clean.is_ok(),
        "the store was not closed cleanly: {:?}",
        clean.err()
    );
    drop(clean);
    let store = forge_layer::store::Store::open_existing_dir(dir).unwrap();
    let mut traces = Vec::new();
    store
        .for_each_trace(|t| {
            traces.push(t);
            true
        })
        .unwrap();
    traces
}

/// A sim whose `trickle` model streams `words` words 100 ms apart.
async fn trickling_sim(words: usize) -> forge_gateway::sim::SimHandle {
    let trickle = ModelBehavior {
        chunk_delay: Duration::from_millis(100),
        words,
        ..ModelBehavior::default()
    };
    SimUpstream::start(
        SimConfig {
            models: [("trickle".to_string(), trickle)].into_iter().collect(),
            ..SimConfig::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .unwrap()
}

/// Starts a streamed chat through `base`, returning the task that reads it to the end.
async fn start_stream(base: &str) -> tokio::task::JoinHandle<String> {
    let body = serde_json::json!({"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let resp = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A cut connection ends the text early, or fails it; either way what arrived is returned.
    tokio::spawn(async move {
        let mut resp = resp;
        let mut text = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    })
}

/// Sends SIGTERM and waits for the process to exit.
async fn sigterm_and_wait(mut forge: Forge) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || {
        let pid = forge.0.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        forge.0.wait().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn sigterm_flushes_the_capture_queue_and_closes_the_store_cleanly() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim = trickling_sim(10).await;
    let data = tempfile::tempdir().unwrap();
    // Commits would wait ten minutes: only the flush at shutdown can store the trace.
    let text = config(&sim.base_url(), "PATH", data.path())
        .replace("[capture]\n", "[capture]\nflush_interval_ms = 600000\n");
    let (forge, base, _dir) = serve(&text, &[]);
    let stream = start_stream(&base).await;
    let status = sigterm_and_wait(forge).await;
    assert!(status.success(), "forge exited with {status}");
    assert!(
        stream.await.unwrap().ends_with("data: [DONE]\n\n"),
        "the stream finished"
    );

    let traces = traces_left_without_repair(data.path());
    assert_eq!(traces.len(), 1, "the queued trace was flushed");
    assert_eq!(traces[0].outcome, forge_layer::trace::Outcome::Completed);
}

#[tokio::test]
async fn sigterm_past_the_grace_period_cuts_streams_and_still_stores_their_traces() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // 600 words, 100 ms apart: a minute, far past a 1 s grace period.
    let sim = trickling_sim(600).await;
    let data = tempfile::tempdir().unwrap();
    let text = config(&sim.base_url(), "PATH", data.path())
        .replace("shutdown_grace_secs = 60", "shutdown_grace_secs = 1");
    let (forge, base, _dir) = serve(&text, &[]);
    let streams = [start_stream(&base).await, start_stream(&base).await];
    let status = sigterm_and_wait(forge).await;
    assert!(status.success(), "forge exited with {status}");
    for stream in streams {
        let text = stream.await.unwrap();
        assert!(text.starts_with("data: "), "the stream had begun: {text:?}");
        assert!(!text.contains("[DONE]"), "cut before its end: {text:?}");
    }

    let traces = traces_left_without_repair(data.path());
    assert_eq!(traces.len(), 2, "both cut exchanges are stored");
    for trace in traces {
        assert_eq!(trace.outcome, forge_layer::trace::Outcome::Cancelled);
    }
}

#[test]
fn dataset_export_builds_a_valid_dataset_with_progress() {
    use forge_layer::reassemble::{AssistantMessage, FinalChoice, FinalResponse};
    use forge_layer::store::{Feedback, Store};
    use forge_layer::trace::{Outcome, Trace, TraceId};

    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    {
        let store = Store::open_dir(data.path()).unwrap();
        for i in 0..15 {
            let trace = Trace {
                id: TraceId::generate(),
                time_ms: 0,
                tenant: None,
                key_id: None,
                alias: "chat".into(),
                upstream: "sim".into(),
                model: "teacher".into(),
                arm: forge_router::Arm::Teacher,
                route_version: 1,
                stream: false,
                request: serde_json::json!({"model": "chat", "messages": [{"role": "user", "content": format!("question {i}")}]}),
                response: FinalResponse {
                    choices: vec![FinalChoice {
                        index: 0,
                        message: AssistantMessage {
                            content: Some(format!("answer {i}")),
                            ..Default::default()
                        },
                        finish_reason: Some("stop".into()),
                    }],
                    complete: true,
                    ..Default::default()
                },
                status: 200,
                latency_us: 1,
                ttfb_us: 1,
                outcome: Outcome::Completed,
            };
            store
                .insert_encoded([(trace.id, serde_json::to_vec(&trace).unwrap().as_slice())])
                .unwrap();
            store
                .add_feedback(&Feedback {
                    trace_id: trace.id,
                    score: Some(97.0),
                    approved: None,
                    comment: None,
                    time_ms: 0,
                })
                .unwrap();
        }
    }
    let export = |args: &[&str]| {
        Command::new(FORGE)
            .args(["dataset", "export"])
            .args(args)
            .arg("--data-dir")
            .arg(data.path())
            .arg("--out")
            .arg(out.path())
            .output()
            .unwrap()
    };
    let output = export(&["--route", "chat", "--validation-percent", "0"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("done in") && stderr.contains("15 golden"),
        "{stderr}"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(manifest["train"]["lines"], 15);
    let train = std::fs::read(manifest["train"]["path"].as_str().unwrap()).unwrap();
    assert_eq!(forge_gateway::sim::validate_training_jsonl(&train), Ok(15));
    // A route no trace has (a typo, most likely) is an error, and leaves no empty dataset.
    let exported = std::fs::read_dir(out.path()).unwrap().count();
    let typo = export(&["--route", "chta"]);
    assert!(!typo.status.success());
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert!(stderr.contains("no trace of route `chta`"), "{stderr}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), exported);
    // Values the config would refuse are refused here too, before anything is written.
    for (flag, value) in [
        ("--validation-percent", "100"),
        ("--validation-percent", "NaN"),
        ("--golden-min-score", "101"),
        ("--max-key-share", "0"),
    ] {
        let refused = export(&["--route", "chat", flag, value]);
        assert!(!refused.status.success(), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), exported);
    }
}

#[test]
fn output_to_a_reader_that_has_gone_ends_quietly() {
    // A store with a trace to list.
    let dir = tempfile::tempdir().unwrap();
    let store = forge_layer::store::Store::open_dir(dir.path()).unwrap();
    let trace = forge_layer::trace::Trace {
        id: forge_layer::trace::TraceId::generate(),
        time_ms: 1,
        tenant: None,
        key_id: None,
        alias: "a".into(),
        upstream: "sim".into(),
        model: "m".into(),
        arm: forge_router::Arm::Teacher,
        route_version: 1,
        stream: false,
        request: serde_json::json!({}),
        response: Default::default(),
        status: 200,
        latency_us: 1,
        ttfb_us: 1,
        outcome: forge_layer::trace::Outcome::Completed,
    };
    let id = trace.id;
    store
        .insert_encoded([(id, serde_json::to_vec(&trace).unwrap().as_slice())])
        .unwrap();
    drop(store);
    let data_dir = dir.path().display().to_string();
    for args in [
        vec!["serve", "--print-default-config"],
        vec!["traces", "list", "--data-dir", &data_dir],
    ] {
        // As `forge … | head -0`: the read end is closed before anything is written.
        let mut child = Command::new(FORGE)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Read whole, the default config is one a gateway takes as it is.
    let printed = Command::new(FORGE)
        .args(["serve", "--print-default-config"])
        .output()
        .unwrap();
    let text = String::from_utf8(printed.stdout).unwrap();
    assert_eq!(
        text,
        format!("{}\n", forge_gateway::config::DEFAULT_CONFIG.trim_end())
    );
    forge_gateway::config::Config::from_toml(&text).unwrap();
}

#[test]
fn without_a_store_the_log_says_guard_decisions_are_not_kept() {
    // Capture off, the guard on, and no admin token: the guard's rollbacks still change the
    // routes, and a restart undoes them.
    let (forge, _url, dir) = serve(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[capture]\nenabled = false\n\n[guard]\n\n[[upstreams]]\nname = \"sim\"\nsim = true\n\n[[routes]]\nalias = \"a\"\nteacher = { upstream = \"sim\", model = \"gpt-4o\" }\n",
        &[],
    );
    drop(forge);
    let log = std::fs::read_to_string(dir.path().join("forge.log")).unwrap();
    assert!(
        log.contains("the guard's rollbacks and promotions") && log.contains("next restart"),
        "{log}"
    );
}
