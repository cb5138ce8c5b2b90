//! Live routing end to end: sticky canary, hot swaps under load, the admin API, restarts, and
//! the guard, with the simulated upstream serving a teacher and a student.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use forge_gateway::auth::Secret;
use forge_gateway::sim::{ModelBehavior, SimConfig};
use forge_layer::trace::TraceId;
use forge_router::{Arm, CanaryShare, RouteSpec, Router, StickyKey};
use forge_tests::{
    behaviors, chat_body, client, eventually, start_gateway, start_gateway_with, start_sim,
};
use serde_json::{Value, json};

const TOKEN: &str = "test-admin-token";

fn canary_config(sim_url: &str, percent: f64, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}\n\n[[upstreams]]\nname = \"sim\"\nbase_url = \"{sim_url}\"\n\n[[routes]]\nalias = \"chat\"\nteacher = {{ upstream = \"sim\", model = \"teacher\" }}\nstudents = [{{ upstream = \"sim\", model = \"student\", percent = {percent} }}]\n"
    )
}

fn with_admin(config: &mut forge_gateway::config::Config) {
    config.server.admin_token = Some(Secret::new(TOKEN));
}

/// Sends one request with a sticky key and returns the model that answered.
async fn answered_by(http: &reqwest::Client, base: &str, key: &str) -> String {
    traced_answer(http, base, key).await.0
}

/// Sends one request with a sticky key; returns the model that answered and the trace id.
async fn traced_answer(http: &reqwest::Client, base: &str, key: &str) -> (String, String) {
    let resp = http
        .post(format!("{base}/chat/completions"))
        .header("x-forge-sticky-key", key)
        .json(&chat_body("chat", "hello", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-forge-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = resp.json().await.unwrap();
    (body["model"].as_str().unwrap().to_string(), id)
}

#[tokio::test]
async fn sticky_keys_keep_their_arm_and_raising_the_share_only_moves_teacher_keys() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway_with(
        &canary_config(&sim.base_url(), 20.0, "[guard]\nenabled = false"),
        with_admin,
    )
    .await;
    let http = client();
    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let mut before = HashMap::new();
    for key in &keys {
        let model = answered_by(&http, &gw.base_url(), key).await;
        for _ in 0..2 {
            assert_eq!(
                answered_by(&http, &gw.base_url(), key).await,
                model,
                "key {key} changed arm"
            );
        }
        before.insert(key.clone(), model);
    }
    let students = before.values().filter(|m| *m == "student").count();
    assert!(
        (20..=60).contains(&students),
        "about 20% of 200 keys: {students}"
    );

    let admin = format!(
        "http://{}/admin/routes/chat/canary",
        gw.admin_addr().unwrap()
    );
    let resp = http
        .put(&admin)
        .bearer_auth(TOKEN)
        .json(&json!({"percent": 50.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut moved = 0;
    for key in &keys {
        let now = answered_by(&http, &gw.base_url(), key).await;
        assert!(
            !(before[key] == "student" && now == "teacher"),
            "key {key} moved student -> teacher"
        );
        moved += usize::from(before[key] != now);
    }
    assert!(moved > 20, "raising 20% -> 50% moved {moved} keys");
    gw.shutdown().await;
}

#[tokio::test]
async fn thousands_of_swaps_under_load_fail_nothing_and_each_trace_has_one_version() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway_with(
        &canary_config(&sim.base_url(), 0.0, "[guard]\nenabled = false"),
        with_admin,
    )
    .await;
    let http = client();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (http, base, stop, sent) = (
            http.clone(),
            gw.base_url(),
            Arc::clone(&stop),
            Arc::clone(&sent),
        );
        workers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let stream = i.is_multiple_of(2);
                let mut body = chat_body("chat", "swap me", stream);
                // The sticky key travels in `user`, so the trace keeps it for the check below.
                body["user"] = json!(format!("w{w}-k{}", i % 50));
                let resp = http
                    .post(format!("{base}/chat/completions"))
                    .json(&body)
                    .send()
                    .await
                    .expect("request failed during swaps");
                assert_eq!(resp.status(), 200);
                let body = resp.text().await.expect("body cut during swaps");
                if stream {
                    assert!(body.ends_with("data: [DONE]\n\n"), "stream cut: {body}");
                }
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let control = gw.control().clone();
    let swaps = 2000u32;
    for s in 0..swaps {
        let share = CanaryShare::from_basis_points(((s * 37) % 10_001) as u16).unwrap();
        control
            .set_share("chat", None, share, "test", None)
            .await
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 50, "traffic flowed during the swaps: {sent}");
    assert_eq!(gw.router().load().version(), 1 + u64::from(swaps));

    // Rebuild every version's table from the stored history and check each trace's arm is the
    // one its recorded version picks for its key: one snapshot decided both.
    gw.settled_capture_counters().await;
    let store = gw.store().unwrap();
    let history = store.route_history(usize::MAX).unwrap();
    assert_eq!(history.len() as u32, swaps + 1);
    let tables: HashMap<u64, Arc<forge_router::RoutingTable>> = history
        .iter()
        .map(|change| {
            let routes = change
                .routes
                .iter()
                .map(|r| RouteSpec::to_route(r).unwrap())
                .collect();
            (
                change.version,
                Router::with_version(routes, ["sim"], change.version)
                    .unwrap()
                    .load(),
            )
        })
        .collect();
    let mut checked = 0;
    store
        .for_each_trace(|t| {
            let table = &tables[&t.route_version];
            let key = t.request["user"].as_str().unwrap();
            let expected = table.pick("chat", StickyKey::Key(key.as_bytes())).unwrap();
            assert_eq!(
                (t.arm, t.model.as_str()),
                (expected.arm, expected.target.model.as_str()),
                "trace {} (version {}) does not match its version's pick",
                t.id,
                t.route_version
            );
            checked += 1;
            true
        })
        .unwrap();
    assert_eq!(checked, sent);
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_api_validates_authenticates_and_survives_a_restart() {
    let sim = start_sim(SimConfig::default()).await;
    let text = canary_config(&sim.base_url(), 5.0, "[guard]\nenabled = false");
    let gw = start_gateway_with(&text, with_admin).await;
    let http = client();
    let admin = format!("http://{}", gw.admin_addr().unwrap());

    for auth in [None, Some("wrong")] {
        let mut req = http.get(format!("{admin}/admin/routes"));
        if let Some(token) = auth {
            req = req.bearer_auth(token);
        }
        assert_eq!(req.send().await.unwrap().status(), 401);
    }
    let proxy_side = http
        .get(format!("http://{}/admin/routes", gw.addr()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        proxy_side.status(),
        404,
        "admin paths are not on the proxy port"
    );
    // The header limits guard the admin port too, before the token is even looked at.
    let mut many = reqwest::header::HeaderMap::new();
    for i in 0..200 {
        many.insert(
            reqwest::header::HeaderName::try_from(format!("x-h{i}")).unwrap(),
            reqwest::header::HeaderValue::from_static("v"),
        );
    }
    let refused = http
        .get(format!("{admin}/admin/routes"))
        .headers(many)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 431);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_header_fields_too_large");
    // Without a token there is no admin listener at all.
    let tokenless = start_gateway(&text).await;
    assert!(tokenless.admin_addr().is_none());
    tokenless.shutdown().await;

    let put = |path: &str, body: Value| {
        http.put(format!("{admin}{path}"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };
    let post = |path: &str| {
        http.post(format!("{admin}{path}"))
            .bearer_auth(TOKEN)
            .send()
    };
    // Invalid updates: 400, and the table in force is unchanged.
    let version = gw.router().load().version();
    assert_eq!(
        put("/admin/routes/chat/canary", json!({"percent": 150}))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        put(
            "/admin/routes/chat",
            json!({"teacher": {"upstream": "nowhere", "model": "m"}})
        )
        .await
        .unwrap()
        .status(),
        400
    );
    assert_eq!(
        put("/admin/routes/chat/canary", json!({"percent": "x"}))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        put("/admin/routes/missing/canary", json!({"percent": 5}))
            .await
            .unwrap()
            .status(),
        404
    );
    let no_such_student = put(
        "/admin/routes/chat/canary",
        json!({"percent": 5, "model": "nope"}),
    )
    .await
    .unwrap();
    assert_eq!(no_such_student.status(), 404);
    let err: Value = no_such_student.json().await.unwrap();
    assert_eq!(err["error"]["code"], "student_not_found");
    assert_eq!(
        put(
            "/admin/routes/chat/canary",
            json!({"percent": 5, "expected_version": 999})
        )
        .await
        .unwrap()
        .status(),
        409
    );
    assert_eq!(gw.router().load().version(), version);

    // A route without students cannot be promoted: 409.
    let created = put(
        "/admin/routes/solo",
        json!({"teacher": {"upstream": "sim", "model": "teacher"}}),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 200);
    assert_eq!(
        post("/admin/routes/solo/promote").await.unwrap().status(),
        409
    );
    // An alias with a slash, as model names often have, is one segment encoded, as the CLI
    // sends it: found (409, no students to promote), not a 404 for a longer path.
    let slashed = "meta-llama%2FLlama-3.1-8B";
    let created = put(
        &format!("/admin/routes/{slashed}"),
        json!({"teacher": {"upstream": "sim", "model": "teacher"}}),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 200);
    assert!(
        gw.router()
            .load()
            .route("meta-llama/Llama-3.1-8B")
            .is_some()
    );
    assert_eq!(
        post(&format!("/admin/routes/{slashed}/promote"))
            .await
            .unwrap()
            .status(),
        409
    );

    assert_eq!(
        put("/admin/routes/chat/canary", json!({"percent": 12.5}))
            .await
            .unwrap()
            .status(),
        200
    );
    let promoted: Value = post("/admin/routes/chat/promote")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(promoted["routes"][0]["students"][0]["percent"], 100.0);
    assert_eq!(
        promoted["routes"][0]["teacher"]["model"], "teacher",
        "the teacher stays for a rollback"
    );
    assert_eq!(
        answered_by(&http, &gw.base_url(), "anyone").await,
        "student"
    );
    let rolled: Value = post("/admin/routes/chat/rollback")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rolled["routes"][0]["students"][0]["percent"], 0.0);
    assert_eq!(
        answered_by(&http, &gw.base_url(), "anyone").await,
        "teacher"
    );
    assert_eq!(
        put("/admin/routes/chat/canary", json!({"percent": 33}))
            .await
            .unwrap()
            .status(),
        200
    );

    let listed: Value = http
        .get(format!("{admin}/admin/routes"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last_version = listed["version"].as_u64().unwrap();
    let actions: Vec<&str> = listed["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["action"].as_str().unwrap())
        .collect();
    assert!(actions[0].starts_with("set canary 33"), "{actions:?}");
    assert!(actions.contains(&"promote") && actions.contains(&"rollback"));

    // Restart on the same data: the last table comes back, not the config's 5%.
    let dir = gw.shutdown().await;
    let text_same_dir = format!(
        "{text}\n[capture]\ndata_dir = {:?}\n",
        dir.path().display().to_string()
    );
    let again = start_gateway_with(&text_same_dir, with_admin).await;
    let table = again.router().load();
    assert_eq!(table.version(), last_version);
    assert_eq!(
        table.route("chat").unwrap().students[0].share.percent(),
        33.0
    );
    assert!(table.route("solo").is_some());
    again.shutdown().await;

    // Asked for explicitly, the config's routes win (and the change is in the history).
    let forced = text_same_dir.replace("[server]\n", "[server]\nroutes_from_config = \"always\"\n");
    let third = start_gateway_with(&forced, with_admin).await;
    let table = third.router().load();
    assert_eq!(table.version(), last_version + 1);
    assert_eq!(
        table.route("chat").unwrap().students[0].share.percent(),
        5.0
    );
    assert!(table.route("solo").is_none());
    third.shutdown().await;
    drop(dir);
}

#[tokio::test]
async fn admin_errors_are_openai_shaped_json() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway_with(&canary_config(&sim.base_url(), 5.0, ""), with_admin).await;
    let admin = format!("http://{}", gw.admin_addr().unwrap());
    let http = client();
    let cases = [
        (
            http.put(format!("{admin}/admin/routes/%FF"))
                .json(&json!({})),
            400,
        ),
        (http.get(format!("{admin}/admin/traces/%FF")), 400),
        (http.get(format!("{admin}/admin/routes/chat")), 405),
        (http.post(format!("{admin}/admin/datasets/dj_x.jsonl")), 405),
        (
            http.put(format!("{admin}/admin/routes/chat"))
                .body(vec![b' '; 3 << 20]),
            413,
        ),
    ];
    for (request, status) in cases {
        let resp = request.bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(resp.status(), status);
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"]["message"].is_string(), "{body}");
        assert!(body["error"]["type"].is_string(), "{body}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn an_admin_body_that_never_finishes_is_a_408() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway_with(
        &canary_config(&sim.base_url(), 5.0, "body_timeout_secs = 1"),
        with_admin,
    )
    .await;
    let answer = forge_tests::answer_to_a_stalled_body(
        gw.admin_addr().unwrap(),
        &format!("PUT /admin/routes/chat HTTP/1.1\r\nhost: forge\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_guard_mode_set_by_an_operator_survives_a_restart() {
    let sim = start_sim(SimConfig::default()).await;
    let text = canary_config(&sim.base_url(), 5.0, "[guard]\ninterval_secs = 3600\n");
    let set_mode = |gw: &forge_tests::TestGateway, mode: &str| {
        client()
            .put(format!(
                "http://{}/admin/routes/chat/guard",
                gw.admin_addr().unwrap()
            ))
            .bearer_auth(TOKEN)
            .json(&json!({"mode": mode}))
            .send()
    };
    let manual_after_restart = |dir: &tempfile::TempDir| {
        let text = format!(
            "{text}\n[capture]\ndata_dir = {:?}\n",
            dir.path().display().to_string()
        );
        async move {
            let gw = start_gateway_with(&text, with_admin).await;
            let manual = gw.guard().unwrap().is_manual("chat");
            (gw, manual)
        }
    };
    let gw = start_gateway_with(&text, with_admin).await;
    assert_eq!(set_mode(&gw, "manual").await.unwrap().status(), 200);
    let dir = gw.shutdown().await;
    let (gw, manual) = manual_after_restart(&dir).await;
    assert!(manual, "the operator's manual mode came back");
    assert_eq!(set_mode(&gw, "auto").await.unwrap().status(), 200);
    gw.shutdown().await;
    let (gw, manual) = manual_after_restart(&dir).await;
    assert!(!manual, "and so did the switch back to auto");
    gw.shutdown().await;
    drop(dir);
}

#[tokio::test]
async fn the_guard_rolls_back_a_failing_student_without_failing_teacher_requests() {
    let flaky = ModelBehavior {
        fail_status: Some(503),
        fail_every: Some(20),
        ..ModelBehavior::default()
    };
    let sim = start_sim(behaviors(&[("student", flaky)])).await;
    let guard = "[guard]\ninterval_secs = 0.3\nmin_requests = 40\nsteps = [50.0, 100.0]\n";
    let gw = start_gateway_with(&canary_config(&sim.base_url(), 50.0, guard), with_admin).await;
    let http = client();
    // The trace id of every failed request, and how many the teacher answered.
    let (mut failed, mut teacher_answers): (Vec<TraceId>, u32) = (Vec::new(), 0);
    let mut i = 0u64;
    let start = tokio::time::Instant::now();
    while gw.router().load().route("chat").unwrap().students[0].share != CanaryShare::ZERO {
        assert!(
            start.elapsed() < forge_tests::DEADLINE,
            "no rollback; guard events: {}",
            events(&http, &gw).await
        );
        let resp = http
            .post(format!("{}/chat/completions", gw.base_url()))
            .header("x-forge-sticky-key", format!("k{i}"))
            .json(&chat_body("chat", "hi", false))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let id = resp.headers()["x-forge-trace-id"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body: Value = resp.json().await.unwrap();
        if status != 200 {
            failed.push(id);
        } else if body["model"] == "teacher" {
            teacher_answers += 1;
        }
        i += 1;
    }
    // Every failure was the student's: its trace records the arm that served it.
    assert!(
        !failed.is_empty() && teacher_answers > 0,
        "{failed:?}, {teacher_answers}"
    );
    let store = gw.store().unwrap();
    eventually("the failed exchanges are stored", || {
        failed.iter().all(|id| store.has_trace(*id).unwrap())
    })
    .await;
    for id in &failed {
        let arm = store.trace(*id).unwrap().unwrap().arm;
        assert!(matches!(arm, Arm::Student(_)), "{id}: {arm:?}");
    }
    let log = events(&http, &gw).await;
    let kinds: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .filter(|k| *k != "unverified")
        .collect();
    assert_eq!(
        kinds,
        vec!["failed_check", "rolled_back"],
        "rolled back on the second failed check: {log}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_student_that_never_answers_is_rolled_back_though_its_clients_give_up_first() {
    // The student hangs; every client gives up long before the gateway's own upstream timeout.
    // No error status is ever sent, so only the unanswered exchanges can tell the guard.
    let hung = ModelBehavior {
        first_byte_delay: std::time::Duration::from_secs(60),
        ..ModelBehavior::default()
    };
    let sim = start_sim(behaviors(&[("student", hung)])).await;
    // The latency gate is left out (a huge slack), so that the success gate alone decides.
    let guard = "[guard]\ninterval_secs = 0.3\nmin_requests = 5\nsteps = [50.0, 100.0]\nlatency_slack_ms = 3600000\nmax_failed_checks = 1\n";
    let gw = start_gateway_with(&canary_config(&sim.base_url(), 50.0, guard), with_admin).await;
    let http = client();
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(150))
        .build()
        .unwrap();
    let (mut i, mut gave_up) = (0u64, 0u32);
    let start = tokio::time::Instant::now();
    let share = loop {
        let share = gw.router().load().route("chat").unwrap().students[0].share;
        if share == CanaryShare::ZERO || share == CanaryShare::FULL {
            break share;
        }
        assert!(
            start.elapsed() < forge_tests::DEADLINE,
            "no decision; guard events: {}",
            events(&http, &gw).await
        );
        let sent = impatient
            .post(format!("{}/chat/completions", gw.base_url()))
            .header("x-forge-sticky-key", format!("k{i}"))
            .json(&chat_body("chat", "hi", false))
            .send()
            .await;
        match sent {
            Ok(resp) => assert_eq!(resp.status(), 200, "the teacher answers"),
            Err(e) => {
                assert!(e.is_timeout(), "{e}");
                gave_up += 1;
            }
        }
        i += 1;
    };
    let log = events(&http, &gw).await;
    assert_eq!(share, CanaryShare::ZERO, "{log}");
    assert!(gave_up > 0);
    let rolled_back = log
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "rolled_back")
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        rolled_back["detail"]
            .as_str()
            .unwrap()
            .contains("100.00% of its clients gave up before an answer"),
        "{log}"
    );
    gw.shutdown().await;
}

async fn events(http: &reqwest::Client, gw: &forge_tests::TestGateway) -> Value {
    let routes: Value = http
        .get(format!("http://{}/admin/routes", gw.admin_addr().unwrap()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    routes["guard"]["events"].clone()
}

#[tokio::test]
async fn the_guard_steps_a_healthy_student_up_through_the_plan() {
    let sim = start_sim(SimConfig::default()).await;
    // A generous latency slack and failed-check budget: on a shared machine one slow request can
    // make a 10-request p99 fail a check, and this test is about stepping, not latency.
    let guard = "[guard]\ninterval_secs = 0.2\nmin_requests = 10\nsteps = [10.0, 30.0, 60.0, 100.0]\nlatency_slack_ms = 2000\nmax_failed_checks = 5\n";
    let gw = start_gateway_with(&canary_config(&sim.base_url(), 10.0, guard), with_admin).await;
    let http = client();
    let mut i = 0u64;
    let start = tokio::time::Instant::now();
    while gw.router().load().route("chat").unwrap().students[0].share != CanaryShare::FULL {
        assert!(
            start.elapsed() < forge_tests::DEADLINE,
            "not promoted; events: {}",
            events(&http, &gw).await
        );
        answered_by(&http, &gw.base_url(), &format!("k{i}")).await;
        i += 1;
    }
    let log = events(&http, &gw).await;
    let steps: Vec<f64> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "stepped_up" || e["kind"] == "promoted")
        .map(|e| e["percent"].as_f64().unwrap())
        .collect();
    assert_eq!(steps, vec![30.0, 60.0, 100.0], "{log}");
    let history = gw.store().unwrap().route_history(10).unwrap();
    assert_eq!(history[0].actor, "guard");
    gw.shutdown().await;
}

#[test]
fn sticky_pick_share_is_within_one_point_over_100k_keys() {
    // The same check as the router's unit test, on the public API the gateway uses.
    let route = forge_router::Route::new("a", forge_router::Target::new("u", "t")).with_student(
        forge_router::Student::new(
            forge_router::Target::new("u", "s"),
            CanaryShare::from_percent(7.5).unwrap(),
        ),
    );
    let router = Router::new(vec![route], ["u"]).unwrap();
    let table = router.load();
    let n = 100_000;
    let hits = (0..n)
        .filter(|i| {
            table
                .pick("a", StickyKey::Key(format!("key-{i}").as_bytes()))
                .unwrap()
                .arm
                != forge_router::Arm::Teacher
        })
        .count();
    let percent = hits as f64 * 100.0 / n as f64;
    assert!((percent - 7.5).abs() <= 1.0, "{percent}%");
}

#[tokio::test]
async fn feedback_posted_again_on_one_trace_counts_once_in_the_guard() {
    // Fifteen posts on one trace: counted once, the student has too few scores to be judged on
    // feedback, and steps up; counted fifteen times, it would be rolled back.
    let (decision, log) = guard_decision_after_student_scores(1, 15).await;
    assert_eq!(decision, "promoted", "{log}");
}

#[tokio::test]
async fn low_feedback_on_enough_student_traces_rolls_the_student_back() {
    // The control for the test above: the same scores on ten traces do reach the guard.
    let (decision, log) = guard_decision_after_student_scores(10, 1).await;
    assert_eq!(decision, "rolled_back", "{log}");
    let rollback = log
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "rolled_back")
        .unwrap();
    assert!(
        rollback["detail"].as_str().unwrap().contains("feedback"),
        "rolled back for its feedback: {log}"
    );
}

/// Starts a canary at 50% whose one failed check rolls back, scores twelve teacher traces 100
/// and `traces` student traces 0 (`posts` times each), then sends traffic until the guard
/// promotes or rolls back the student; returns which, and the guard's events. `min_requests`
/// keeps the first check from coming before the feedback is in.
async fn guard_decision_after_student_scores(traces: usize, posts: usize) -> (String, Value) {
    let sim = start_sim(SimConfig::default()).await;
    let guard = "[guard]\ninterval_secs = 0.2\nmin_requests = 60\nsteps = [50.0, 100.0]\nlatency_slack_ms = 2000\nmax_failed_checks = 1\n";
    let gw = start_gateway_with(&canary_config(&sim.base_url(), 50.0, guard), with_admin).await;
    let http = client();
    let base = gw.base_url();
    let (mut teacher, mut student) = (Vec::new(), Vec::new());
    let mut i = 0u64;
    while teacher.len() < 12 || student.len() < traces {
        let (model, id) = traced_answer(&http, &base, &format!("k{i}")).await;
        if model == "teacher" {
            teacher.push(id)
        } else {
            student.push(id)
        }
        i += 1;
    }
    assert!(
        student.len() < 60 && teacher.len() < 60,
        "the guard could judge before the feedback is in"
    );
    let post = |trace_id: &str, score: u32| {
        let request = http
            .post(format!("{base}/feedback"))
            .json(&json!({"trace_id": trace_id, "score": score}));
        async move {
            let resp = request.send().await.unwrap();
            assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        }
    };
    for id in &teacher {
        post(id, 100).await;
    }
    for id in &student[..traces] {
        for _ in 0..posts {
            post(id, 0).await;
        }
    }
    let start = tokio::time::Instant::now();
    loop {
        let share = gw.router().load().route("chat").unwrap().students[0].share;
        if share == CanaryShare::FULL || share == CanaryShare::ZERO {
            break;
        }
        assert!(
            start.elapsed() < forge_tests::DEADLINE,
            "no decision; events: {}",
            events(&http, &gw).await
        );
        answered_by(&http, &base, &format!("k{i}")).await;
        i += 1;
    }
    let log = events(&http, &gw).await;
    let decision = log
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .rfind(|k| *k == "promoted" || *k == "rolled_back")
        .unwrap_or("none")
        .to_string();
    gw.shutdown().await;
    (decision, log)
}
