//! The distillation loop end to end: real gateway, real store, simulated upstream (teacher,
//! student base, judge, and OpenAI's fine-tuning API with short timings).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use forge_gateway::auth::Secret;
use forge_gateway::sim::{FineTuneTimings, ModelBehavior, Quality, SimConfig, SimHandle};
use forge_router::CanaryShare;
use forge_tests::{
    DEADLINE, TestGateway, client, clients_toml, eventually, start_gateway_with, start_sim,
};
use serde_json::{Value, json};

const TOKEN: &str = "distill-admin";

fn sim_config() -> SimConfig {
    SimConfig {
        models: HashMap::from([
            ("teacher".to_string(), ModelBehavior::default()),
            (
                "student-base".to_string(),
                ModelBehavior {
                    quality: Quality::Poor,
                    ..ModelBehavior::default()
                },
            ),
        ]),
        fine_tune: FineTuneTimings {
            validating: Duration::from_millis(100),
            queued: Duration::from_millis(100),
            running: Duration::from_millis(400),
        },
        ..SimConfig::default()
    }
}

/// A gateway whose `chat` route is distilled with the `sim` provider.
fn config(sim: &SimHandle, distill_extra: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[[upstreams]]
name = "sim"
base_url = "{url}"

[[routes]]
alias = "chat"
teacher = {{ upstream = "sim", model = "teacher" }}

[guard]
enabled = false

[distiller]
check_every_secs = 0.2
poll_initial_secs = 0.05
poll_max_secs = 0.2
grading_window_secs = 0

[[distill]]
route = "chat"
student_base_model = "student-base"
provider = "sim"
upstream = "sim"
trigger_threshold = 20
min_examples = 12
schedule = ""
eval_min_score = 0.0
initial_canary_percent = 20.0
{distill_extra}
{extra}
"#,
        url = sim.base_url()
    )
}

fn admin(config: &mut forge_gateway::config::Config) {
    config.server.admin_token = Some(Secret::new(TOKEN));
}

/// Sends `n` requests (some with tools) and approves each answer; returns the trace ids.
async fn traffic(gw: &TestGateway, n: usize, tag: &str, key: Option<&str>) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        // A user of its own: with a student in the route, requests spread over both arms (by
        // the hash of the user, the same in every run) rather than all following the client.
        let mut body = json!({"model": "chat", "user": format!("{tag}-{i}"), "messages": [{"role": "user", "content": format!("{tag} question {i} about distributed systems")}]});
        if i % 4 == 0 {
            body["tools"] = json!([{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]);
        }
        if i % 4 == 1 {
            body["messages"] = json!([
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": format!("{tag} lookup {i}")},
                {"role": "assistant", "content": null, "tool_calls": [{"id": format!("call_{i}"), "type": "function", "function": {"name": "search", "arguments": "{\"q\":\"x\"}"}}]},
                {"role": "tool", "tool_call_id": format!("call_{i}"), "content": "result text"}
            ]);
            body["tools"] = json!([{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]);
        }
        let id = ask(gw, &body, key).await;
        approve(gw, &id, key).await;
        ids.push(id);
    }
    ids
}

/// Sends one chat completion (with client key `key`, if any) and reads the answer; returns
/// its trace id.
async fn ask(gw: &TestGateway, body: &Value, key: Option<&str>) -> String {
    let mut req = client()
        .post(format!("{}/chat/completions", gw.base_url()))
        .json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-forge-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    resp.text().await.unwrap();
    id
}

/// Approves trace `id` through the feedback API.
async fn approve(gw: &TestGateway, id: &str, key: Option<&str>) {
    let mut fb = client()
        .post(format!("{}/feedback", gw.base_url()))
        .json(&json!({"trace_id": id, "approved": true}));
    if let Some(k) = key {
        fb = fb.bearer_auth(k);
    }
    assert_eq!(fb.send().await.unwrap().status(), 200);
}

/// `text` with jobs started only from the admin API: no threshold is ever reached.
fn admin_triggered(text: &str) -> String {
    text.replace("trigger_threshold = 20", "trigger_threshold = 100000")
}

/// `text` with trained students joining their route at 0%: every answer stays the teacher's.
fn no_canary(text: &str) -> String {
    text.replace(
        "initial_canary_percent = 20.0",
        "initial_canary_percent = 0.0",
    )
}

/// `text` with one more `[distiller]` line.
fn with_distiller(text: &str, line: &str) -> String {
    text.replace(
        "grading_window_secs = 0",
        &format!("grading_window_secs = 0\n{line}"),
    )
}

async fn admin_get(gw: &TestGateway, path: &str) -> reqwest::Response {
    client()
        .get(format!("http://{}{path}", gw.admin_addr().unwrap()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
}

/// `POST` to the admin API with the admin token.
async fn admin_post(gw: &TestGateway, path: &str) -> reqwest::Response {
    client()
        .post(format!("http://{}{path}", gw.admin_addr().unwrap()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
}

/// How many of `ids` the judge has scored.
fn judged(store: &forge_layer::store::Store, ids: &[String]) -> usize {
    ids.iter()
        .filter(|id| store.has_evaluation(id.parse().unwrap()).unwrap())
        .count()
}

/// `GET /admin/jobs`: every job, newest first.
async fn list_jobs(gw: &TestGateway) -> Value {
    admin_get(gw, "/admin/jobs").await.json().await.unwrap()
}

async fn wait_for_job(gw: &TestGateway, status: &str) -> Value {
    let start = tokio::time::Instant::now();
    loop {
        let jobs = list_jobs(gw).await;
        if let Some(job) = jobs["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["status"] == status)
        {
            return job.clone();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no job reached {status}: {jobs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn traffic_becomes_a_student_serving_canary_traffic() {
    let sim = start_sim(sim_config()).await;
    let gw = start_gateway_with(&config(&sim, "", ""), admin).await;
    traffic(&gw, 24, "loop", None).await;

    let job = wait_for_job(&gw, "COMPLETED").await;
    assert_eq!(job["trigger"], "threshold");
    assert!(job["dataset_size"].as_u64().unwrap() >= 20, "{job}");
    no_training_files_left(&sim).await;
    let model = job["resulting_model_id"].as_str().unwrap().to_string();
    assert!(model.starts_with("ft:student-base"), "{model}");
    assert!(
        job["eval_metrics"]["train_loss"].is_number(),
        "metrics from the result file: {job}"
    );

    // The student is in the table at the initial share, and the registry says canary.
    let table = gw.router().load();
    let student = &table.route("chat").unwrap().students[0];
    assert_eq!(
        (student.target.model.as_str(), student.share),
        (model.as_str(), CanaryShare::from_percent(20.0).unwrap())
    );
    let models: Value = admin_get(&gw, "/admin/models").await.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], model);
    assert_eq!(models["data"][0]["status"], "canary");

    // Canary requests reach the student model upstream.
    let before = sim
        .requests()
        .iter()
        .filter(|r| r.body.windows(model.len()).any(|w| w == model.as_bytes()))
        .count();
    let http = client();
    for i in 0..40 {
        let resp = http
            .post(format!("{}/chat/completions", gw.base_url()))
            .header("x-forge-sticky-key", format!("user-{i}"))
            .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hello"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let after = sim
        .requests()
        .iter()
        .filter(|r| r.body.windows(model.len()).any(|w| w == model.as_bytes()))
        .count();
    assert!(after > before, "no canary request reached {model}");

    // An operator's rollback and promote are recorded in the registry as the guard's are: a
    // student rolled back by hand is then taken down once idle.
    for (action, status) in [("rollback", "rolled_back"), ("promote", "promoted")] {
        let path = format!("/admin/routes/chat/{action}");
        assert_eq!(admin_post(&gw, &path).await.status(), 200);
        let models: Value = admin_get(&gw, "/admin/models").await.json().await.unwrap();
        assert_eq!(models["data"][0]["status"], status, "{models}");
        assert_eq!(models["data"][0]["reason"], format!("admin: {action}"));
    }
    // Taken from all of the traffic back to a share, it is in canary again.
    let canary = client()
        .put(format!(
            "http://{}/admin/routes/chat/canary",
            gw.admin_addr().unwrap()
        ))
        .bearer_auth(TOKEN)
        .json(&json!({"percent": 30.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(canary.status(), 200);
    let models: Value = admin_get(&gw, "/admin/models").await.json().await.unwrap();
    assert_eq!(models["data"][0]["status"], "canary", "{models}");
    assert_eq!(models["data"][0]["reason"], "admin: canary");

    // The exported dataset passes the fine-tuning format check of the simulated provider,
    // tool-use lines included, and contains only teacher traces.
    let id = job["id"].as_str().unwrap();
    let dataset = admin_get(&gw, &format!("/admin/datasets/{id}.jsonl")).await;
    assert_eq!(dataset.status(), 200);
    let bytes = dataset.bytes().await.unwrap();
    forge_gateway::sim::validate_training_jsonl(&bytes)
        .expect("every line passes the OpenAI rules");
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(
        text.contains("\"tool_calls\"") && text.contains("\"role\":\"tool\""),
        "tool-use traces are exported"
    );
    assert!(!text.contains("\"developer\""), "developer becomes system");
    assert_eq!(
        admin_get(&gw, "/admin/datasets/..%2Fforge.redb")
            .await
            .status(),
        404
    );
    // What a remote trainer holds opens this dataset and nothing else.
    let trainer_token = forge_layer::distill::dataset_token(TOKEN, id);
    let as_trainer = |path: String| {
        client()
            .get(format!("http://{}{path}", gw.admin_addr().unwrap()))
            .bearer_auth(&trainer_token)
            .send()
    };
    let own = as_trainer(format!("/admin/datasets/{id}.jsonl"))
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    assert_eq!(own.bytes().await.unwrap(), bytes);
    let other = format!(
        "/admin/datasets/dj_{}.jsonl",
        forge_layer::trace::TraceId::generate()
    );
    for path in [
        other,
        "/admin/jobs".to_string(),
        "/admin/routes".to_string(),
    ] {
        assert_eq!(
            as_trainer(path.clone()).await.unwrap().status(),
            401,
            "{path}"
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn only_teacher_traces_and_only_the_tenant_s_traces_are_trained_on() {
    let sim = start_sim(sim_config()).await;
    let clients = clients_toml(&[("app-a", Some("A"), "key-a"), ("app-b", Some("B"), "key-b")]);
    // A student already takes half the traffic, so both arms produce approved traces.
    let text = config(&sim, "tenant = \"A\"\nmax_key_share = 1.0", &clients).replace(
        "teacher = { upstream = \"sim\", model = \"teacher\" }",
        "teacher = { upstream = \"sim\", model = \"teacher\" }\nstudents = [{ upstream = \"sim\", model = \"old-student\", percent = 50.0 }]",
    );
    let gw = start_gateway_with(&text, admin).await;
    let b_ids = traffic(&gw, 30, "TENANT-B-SECRET", Some("key-b")).await;
    let a_ids = traffic(&gw, 60, "tenant-a", Some("key-a")).await;
    // A student is in canary, so automatic triggers wait for its verdict; an operator need not.
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
    let job = wait_for_job(&gw, "COMPLETED").await;

    let id = job["id"].as_str().unwrap();
    let provenance = std::fs::read_to_string(
        gw.data_dir()
            .join("datasets")
            .join(id)
            .join("provenance.jsonl"),
    )
    .unwrap();
    let store = gw.store().unwrap();
    let mut lines = 0;
    for line in provenance.lines() {
        let p: Value = serde_json::from_str(line).unwrap();
        let trace_id = p["trace_id"].as_str().unwrap();
        assert!(
            !b_ids.iter().any(|b| b == trace_id),
            "tenant B's trace {trace_id} in A's dataset"
        );
        assert!(a_ids.iter().any(|a| a == trace_id));
        let trace = store.trace(trace_id.parse().unwrap()).unwrap().unwrap();
        assert!(trace.is_teacher(), "a student trace was exported");
        lines += 1;
    }
    assert!(lines >= 12, "{lines}");
    // The student answered some of A's approved requests: there were traces to leave out.
    let from_the_student = a_ids
        .iter()
        .filter(|id| {
            !store
                .trace(id.parse().unwrap())
                .unwrap()
                .unwrap()
                .is_teacher()
        })
        .count();
    assert!(from_the_student > 0, "every answer was the teacher's");
    // What was uploaded to the provider holds none of B's text either.
    let uploads: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/v1/files"))
        .collect();
    assert!(!uploads.is_empty());
    for upload in uploads {
        assert!(!String::from_utf8_lossy(&upload.body).contains("TENANT-B-SECRET"));
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_dataset_that_holds_nothing_out_for_the_gate_is_not_trained_on() {
    let sim = start_sim(sim_config()).await;
    // One line in ten thousand held out. The split goes by each line's hash, and these lines
    // are the same in every run (the simulator answers deterministically): none is held out.
    let text = admin_triggered(&config(&sim, "validation_percent = 0.01", ""))
        .replace("eval_min_score = 0.0", "eval_min_score = 70.0");
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 20, "unheld", None).await;
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
    let failed = wait_for_job(&gw, "FAILED").await;
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("held none of its"),
        "{failed}"
    );
    // Nothing was uploaded or trained.
    assert!(
        !sim.requests()
            .iter()
            .any(|r| r.method == "POST" && r.path.starts_with("/v1/f")),
        "the provider heard of the job"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_trigger_needs_enough_examples_and_allows_one_job_per_route() {
    let sim = start_sim(sim_config()).await;
    let gw = start_gateway_with(&admin_triggered(&config(&sim, "", "")), admin).await;
    assert_eq!(admin_post(&gw, "/admin/distill/nope").await.status(), 404);
    // Too few examples: the job fails with a reason, and routes are unchanged.
    traffic(&gw, 3, "few", None).await;
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
    let failed = wait_for_job(&gw, "FAILED").await;
    assert!(
        failed["error"].as_str().unwrap().contains("min_examples"),
        "{failed}"
    );
    assert!(
        gw.router()
            .load()
            .route("chat")
            .unwrap()
            .students
            .is_empty()
    );
    // Enough now; a second trigger while the first runs is a 409.
    traffic(&gw, 20, "more", None).await;
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 409);
    let done = wait_for_job(&gw, "COMPLETED").await;
    assert_eq!(done["trigger"], "admin");
    eventually("student routed", || {
        !gw.router()
            .load()
            .route("chat")
            .unwrap()
            .students
            .is_empty()
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn the_threshold_counts_examples_as_the_dataset_takes_them() {
    let sim = start_sim(sim_config()).await;
    let clients = clients_toml(&[("loud", None, "key-loud"), ("quiet", None, "key-quiet")]);
    // max_key_share 0.5 (the default): with 40 golden traces from one key and 2 from another,
    // a dataset takes 2 + 2 lines, far below min_examples, though 42 is past the threshold.
    let gw = start_gateway_with(&config(&sim, "", &clients), admin).await;
    // The quiet key first: a single key's traces are not capped.
    traffic(&gw, 2, "quiet", Some("key-quiet")).await;
    traffic(&gw, 40, "loud", Some("key-loud")).await;
    // Once the quiet key has sent enough too, the dataset clears both bars.
    traffic(&gw, 20, "quiet-more", Some("key-quiet")).await;
    let done = wait_for_job(&gw, "COMPLETED").await;
    assert_eq!(done["trigger"], "threshold");
    // No job was started too early, only to fail for too few examples.
    let jobs = list_jobs(&gw).await;
    let statuses: Vec<&str> = jobs["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["COMPLETED"]);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_job_in_training_resumes_after_a_restart_and_completes() {
    let mut slow = sim_config();
    slow.fine_tune.running = Duration::from_secs(3);
    let sim = start_sim(slow).await;
    let text = config(&sim, "", "");
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 24, "resume", None).await;
    let id = submitted_job(&gw).await;
    // Stop mid-training: the provider keeps training; Forge must pick the job up again.
    let (again, dir) = restart(gw, &text, |_| {}).await;
    let job = completed(&again, &id).await;
    let model = job["resulting_model_id"].as_str().unwrap();
    assert_eq!(
        again.router().load().route("chat").unwrap().students[0]
            .target
            .model,
        model
    );
    again.shutdown().await;
    drop(dir);
}

#[tokio::test]
async fn a_job_resumed_after_its_student_joined_the_route_is_not_gated_again() {
    let sim = start_sim(sim_config()).await;
    let judge = "[judge]\nupstream = \"sim\"\nmodel = \"judge\"\nsample_percent = 0.0\n";
    let text = config(&sim, "validation_percent = 50.0", judge)
        .replace("eval_min_score = 0.0", "eval_min_score = 70.0");
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 24, "joined", None).await;
    let done = wait_for_job(&gw, "COMPLETED").await;
    let (id, model) = (
        done["id"].as_str().unwrap().to_string(),
        done["resulting_model_id"].as_str().unwrap().to_string(),
    );
    // As if Forge had stopped after the student joined its route, before the job was marked
    // done: the job still training, its model recorded as the candidate it was before it
    // joined. And a second evaluation would now fail the gate.
    sim.set_behavior(
        forge_gateway::sim::FINE_TUNED,
        ModelBehavior {
            quality: Quality::Poor,
            ..ModelBehavior::default()
        },
    );
    let (again, dir) = restart(gw, &text, |store| {
        let mut job: Value = store.job(&id).unwrap().unwrap();
        job["status"] = "TRAINING".into();
        job["finished_ms"] = Value::Null;
        store.put_job(&id, &job).unwrap();
        let mut record: Value = store.model(&model).unwrap().unwrap();
        record["status"] = "candidate".into();
        store.put_model(&model, &record).unwrap();
    })
    .await;
    let job = completed(&again, &id).await;
    assert!(job["error"].is_null(), "{job}");
    let models: Value = admin_get(&again, "/admin/models")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["status"], "canary", "{models}");
    let table = again.router().load();
    assert_eq!(table.route("chat").unwrap().students[0].target.model, model);
    again.shutdown().await;
    drop(dir);
}

#[tokio::test]
async fn a_job_stopped_before_its_run_id_was_recorded_finds_its_run_after_a_restart() {
    let mut slow = sim_config();
    slow.fine_tune.running = Duration::from_secs(3);
    let sim = start_sim(slow).await;
    let text = config(&sim, "", "");
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 24, "resubmit", None).await;
    let id = submitted_job(&gw).await;
    // As if Forge had stopped after the provider created the run, before it recorded its id.
    let (again, dir) = restart(gw, &text, |store| {
        let mut job: Value = store.job(&id).unwrap().unwrap();
        job["provider_job_id"] = Value::Null;
        store.put_job(&id, &job).unwrap();
    })
    .await;
    completed(&again, &id).await;
    assert_eq!(
        runs_created(&sim),
        1,
        "the second submission found the first run"
    );
    again.shutdown().await;
    drop(dir);
}

/// A job in training whose polls the provider now refuses: the account's key was rotated, so
/// every poll gets a 401.
struct RotatedKey {
    sim: SimHandle,
    gw: TestGateway,
    /// The gateway's config.
    text: String,
    /// The job's id.
    id: String,
    /// The provider's run.
    run: String,
    /// The key that works.
    key: String,
}

/// Starts a [`RotatedKey`] whose run takes `running` to train.
async fn training_with_a_rotated_key(tag: &str, running: Duration) -> RotatedKey {
    // The gateway's key is the value of PATH, an environment variable every test run has.
    let key = std::env::var("PATH").unwrap();
    let mut slow = sim_config();
    slow.fine_tune.running = running;
    slow.api_key = Some(key.clone());
    let sim = start_sim(slow).await;
    let text = config(&sim, "", "").replacen(
        "name = \"sim\"\n",
        "name = \"sim\"\napi_key_env = \"PATH\"\n",
        1,
    );
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 24, tag, None).await;
    let id = submitted_job(&gw).await;
    let run = job(&gw, &id).await["provider_job_id"]
        .as_str()
        .unwrap()
        .to_string();
    sim.set_api_key(Some("sk-rotated"));
    let before = calls(&sim, "GET", &format!("/v1/fine_tuning/jobs/{run}"));
    eventually("three polls refused", || {
        calls(&sim, "GET", &format!("/v1/fine_tuning/jobs/{run}")) >= before + 3
    })
    .await;
    RotatedKey {
        sim,
        gw,
        text,
        id,
        run,
        key,
    }
}

/// How many `method path` requests `sim` has received.
fn calls(sim: &SimHandle, method: &str, path: &str) -> usize {
    calls_where(sim, method, |p| p == path)
}

/// How many `method` requests `sim` has received whose path (with its query) `path` accepts.
fn calls_where(sim: &SimHandle, method: &str, path: impl Fn(&str) -> bool) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.method == method && path(&r.path))
        .count()
}

#[tokio::test]
async fn a_poll_refused_for_its_key_keeps_the_job_training_until_the_key_works() {
    let RotatedKey {
        sim, gw, id, key, ..
    } = training_with_a_rotated_key("rotated", Duration::from_secs(8)).await;
    assert_eq!(
        job(&gw, &id).await["status"],
        "TRAINING",
        "the run goes on at the provider"
    );
    // The key works again: the job goes on from its run, which was never abandoned.
    sim.set_api_key(Some(&key));
    completed(&gw, &id).await;
    assert_eq!(runs_created(&sim), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_cancel_the_provider_refuses_too_still_ends_a_job_whose_polls_are_refused() {
    let RotatedKey {
        sim: _sim, gw, id, ..
    } = training_with_a_rotated_key("cancelled", Duration::from_secs(600)).await;
    // The cancel is refused too, and its answer carries none of the provider's text, which
    // echoes part of the key.
    let cancel = admin_post(&gw, &format!("/admin/jobs/{id}/cancel")).await;
    assert_eq!(cancel.status(), 502);
    let err: Value = cancel.json().await.unwrap();
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("401") && message.contains("recorded"),
        "{message}"
    );
    assert!(!message.contains("Incorrect API key"), "{message}");
    // Recorded all the same: the next refused poll ends the job, cancelled, and the route
    // holds against the threshold.
    cancel_holds(&gw, &id).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_cancel_refused_at_the_training_deadline_is_tried_again_until_it_is_taken() {
    let RotatedKey {
        sim,
        gw,
        text,
        id,
        run,
        key,
    } = training_with_a_rotated_key("overdue", Duration::from_secs(600)).await;
    // Back with a deadline that has passed: the run must be cancelled, and the provider refuses.
    let dir = gw.shutdown().await;
    // Only the operator starts jobs from here on: the failed job's examples would meet the
    // threshold again once its short back-off ends, and a second run would be made.
    let overdue = with_distiller(&admin_triggered(&text), "max_training_secs = 1");
    let gw = start_on(&overdue, &dir).await;
    let cancel = format!("/v1/fine_tuning/jobs/{run}/cancel");
    eventually("two cancels refused", || calls(&sim, "POST", &cancel) >= 2).await;
    // Failed now, the job would leave the run going on, and billed, with its examples free for
    // the next job to train on again.
    assert_eq!(job(&gw, &id).await["status"], "TRAINING");
    // Asked again at the pace of the polls (0.2 s apart here), not in a loop with no pause: at
    // most ten in a second, with room for a slow machine to stretch the second.
    let before = calls(&sim, "POST", &cancel);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = calls(&sim, "POST", &cancel) - before;
    assert!(asked <= 50, "{asked} cancels in about a second");
    sim.set_api_key(Some(&key));
    let failed = wait_for_job(&gw, "FAILED").await;
    assert_eq!(failed["id"], id.as_str());
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("max_training_secs") && error.contains("cancelled at the provider"),
        "{failed}"
    );
    let at_provider = sim_json_as(&sim, &format!("/v1/fine_tuning/jobs/{run}"), Some(&key)).await;
    assert_eq!(at_provider["status"], "cancelled", "{at_provider}");
    assert_eq!(runs_created(&sim), 1);
    gw.shutdown().await;
    drop(dir);
}

/// Waits until the simulated OpenAI account holds no training file: the uploads (every
/// client's traces) are deleted, in the background, once their run has ended.
async fn no_training_files_left(sim: &SimHandle) {
    let start = tokio::time::Instant::now();
    loop {
        let list = sim_json(sim, "/v1/files").await;
        assert_eq!(list["object"], "list", "{list}");
        let left: Vec<&Value> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["purpose"] == "fine-tune")
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "training files left: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the one job in TRAINING has its provider run id; returns the job's id.
async fn submitted_job(gw: &TestGateway) -> String {
    let training = wait_for_job(gw, "TRAINING").await;
    let id = training["id"].as_str().unwrap().to_string();
    let start = tokio::time::Instant::now();
    while job(gw, &id).await["provider_job_id"].is_null() {
        assert!(start.elapsed() < DEADLINE, "never submitted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    id
}

/// Job `id` as the admin API shows it.
async fn job(gw: &TestGateway, id: &str) -> Value {
    admin_get(gw, &format!("/admin/jobs/{id}"))
        .await
        .json()
        .await
        .unwrap()
}

/// Stops `gw`, lets `edit` change its store while it is down, and starts it again on the same
/// data.
async fn restart(
    gw: TestGateway,
    text: &str,
    edit: impl FnOnce(&forge_layer::store::Store),
) -> (TestGateway, tempfile::TempDir) {
    let dir = gw.shutdown().await;
    edit(&reopened(&dir).await);
    let again = start_on(text, &dir).await;
    (again, dir)
}

/// The store a stopped gateway left in `dir`, once it can be opened: a stop does not wait for
/// the distiller's count of a route's traces, which may hold the store a moment longer on its
/// blocking thread.
async fn reopened(dir: &tempfile::TempDir) -> forge_layer::store::Store {
    let start = tokio::time::Instant::now();
    loop {
        match forge_layer::store::Store::open_dir(dir.path()) {
            Err(forge_layer::store::StoreError::InUse(_)) if start.elapsed() < DEADLINE => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            opened => return opened.unwrap(),
        }
    }
}

/// A gateway with config `text` on the data a stopped one left in `dir`.
async fn start_on(text: &str, dir: &tempfile::TempDir) -> TestGateway {
    drop(reopened(dir).await);
    let data_dir = dir.path().display().to_string();
    start_gateway_with(
        &format!("{text}\n[capture]\ndata_dir = {data_dir:?}\n"),
        admin,
    )
    .await
}

/// Waits until job `id` completes; it must not fail meanwhile.
async fn completed(gw: &TestGateway, id: &str) -> Value {
    ended_as(gw, id, "COMPLETED").await
}

/// Waits until job `id` ends as `status` (COMPLETED or FAILED); it must not end otherwise.
async fn ended_as(gw: &TestGateway, id: &str, status: &str) -> Value {
    let start = tokio::time::Instant::now();
    loop {
        let job = job(gw, id).await;
        if job["status"] == status {
            return job;
        }
        assert!(
            !["COMPLETED", "FAILED"].contains(&job["status"].as_str().unwrap_or("")),
            "{job}"
        );
        assert!(start.elapsed() < DEADLINE, "not resumed: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many fine-tuning runs the simulated provider was asked to create.
fn runs_created(sim: &SimHandle) -> usize {
    calls(sim, "POST", "/v1/fine_tuning/jobs")
}

/// Stops `gw` as if it had stopped while submitting job `id`, before recording the run's id,
/// and stayed down past the job's training deadline (an hour); `copy` names a copy of the job
/// to resume in its place, which the provider has never heard of, with the original set aside.
async fn restart_past_the_deadline(
    gw: TestGateway,
    text: &str,
    id: &str,
    copy: Option<&str>,
) -> (TestGateway, tempfile::TempDir) {
    restart(gw, text, |store| {
        let mut job: Value = store.job(id).unwrap().unwrap();
        job["provider_job_id"] = Value::Null;
        job["created_ms"] = (job["created_ms"].as_u64().unwrap() - 3_600_000).into();
        if let Some(copy) = copy {
            let mut original = job.clone();
            original["status"] = "FAILED".into();
            store.put_job(id, &original).unwrap();
            job["id"] = copy.into();
        }
        store.put_job(copy.unwrap_or(id), &job).unwrap();
    })
    .await
}

#[tokio::test]
async fn a_job_trained_before_a_restart_goes_on_from_its_model_when_the_run_is_gone() {
    let sim = start_sim(sim_config()).await;
    let text = no_canary(&admin_triggered(&config(&sim, "", "")));
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 24, "resumed", None).await;
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
    let job = wait_for_job(&gw, "COMPLETED").await;
    let id = job["id"].as_str().unwrap().to_string();
    let trained = job["trained_model"].clone();
    assert!(trained.is_string(), "{job}");
    // Forge stopped during the deploy, after the run: the job is still TRAINING with its model
    // recorded, and the run is gone at the provider (as a Kubernetes Job a day after it ended).
    let (gw, _dir) = restart(gw, &text, |store| {
        let mut job: Value = store.job(&id).unwrap().unwrap();
        job["status"] = "TRAINING".into();
        job["provider_job_id"] = "ftjob-deleted".into();
        job["finished_ms"] = Value::Null;
        store.put_job(&id, &job).unwrap();
    })
    .await;
    let done = completed(&gw, &id).await;
    assert_eq!(done["trained_model"], trained, "{done}");
    gw.shutdown().await;
}

/// A gateway whose route's job (traffic tagged `tag`) is in TRAINING with its run at the
/// provider: ten minutes of training against a 30-minute deadline. Returns the sim, the config,
/// the gateway and the job's id.
async fn training_under_a_deadline(tag: &str) -> (SimHandle, String, TestGateway, String) {
    let sim = start_sim(ten_minute_training()).await;
    let text = with_distiller(&config(&sim, "", ""), "max_training_secs = 1800");
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 24, tag, None).await;
    let id = submitted_job(&gw).await;
    (sim, text, gw, id)
}

#[tokio::test]
async fn a_submission_interrupted_past_its_deadline_starts_no_run_after_a_restart() {
    let (sim, text, gw, id) = training_under_a_deadline("unsent").await;
    let copy = format!("{id}-unsent");
    // Restarted with no threshold to reach: the route's traces are not cut by a failed job,
    // and a new job's run would count below.
    let (again, dir) =
        restart_past_the_deadline(gw, &admin_triggered(&text), &id, Some(&copy)).await;
    let failed = ended_as(&again, &copy, "FAILED").await;
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("max_training_secs") && error.contains("none was"),
        "{failed}"
    );
    assert_eq!(
        runs_created(&sim),
        1,
        "no run was started only to be cancelled"
    );
    again.shutdown().await;
    drop(dir);
}

/// The path where the provider has the run: found, not submitted again, and cancelled. (Before
/// the lookup, a new submission found the run as well; the test above is the one that a
/// resubmission past the deadline fails.)
#[tokio::test]
async fn a_run_found_after_a_restart_past_its_deadline_is_cancelled() {
    let (sim, text, gw, id) = training_under_a_deadline("found").await;
    let run = job(&gw, &id).await["provider_job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (again, dir) = restart_past_the_deadline(gw, &admin_triggered(&text), &id, None).await;
    let failed = ended_as(&again, &id, "FAILED").await;
    assert_eq!(failed["provider_job_id"], run.as_str(), "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("cancelled at the provider"),
        "{failed}"
    );
    assert_eq!(provider_job(&sim, &run).await["status"], "cancelled");
    assert_eq!(runs_created(&sim), 1);
    again.shutdown().await;
    drop(dir);
}

#[tokio::test]
async fn a_failed_training_run_fails_the_job_and_leaves_routes_alone() {
    let sim = start_sim(sim_config()).await;
    sim.fail_next_fine_tuning_jobs(1);
    let gw = start_gateway_with(&config(&sim, "", ""), admin).await;
    let version = gw.router().load().version();
    traffic(&gw, 24, "failing", None).await;
    let job = wait_for_job(&gw, "FAILED").await;
    assert!(
        job["error"].as_str().unwrap().contains("training_failed"),
        "the provider's error: {job}"
    );
    no_training_files_left(&sim).await;
    assert!(
        job["provider_job_id"]
            .as_str()
            .unwrap()
            .starts_with("ftjob-")
    );
    let table = gw.router().load();
    assert_eq!(table.version(), version);
    assert!(table.route("chat").unwrap().students.is_empty());
    let models: Value = admin_get(&gw, "/admin/models").await.json().await.unwrap();
    assert_eq!(models["data"], json!([]));
    gw.shutdown().await;
}

#[tokio::test]
async fn the_evaluation_gate_keeps_a_bad_student_out_of_traffic() {
    let mut bad = sim_config();
    // Every model this sim fine-tunes answers like the weak base model.
    bad.models.insert(
        forge_gateway::sim::FINE_TUNED.to_string(),
        ModelBehavior {
            quality: Quality::Poor,
            ..ModelBehavior::default()
        },
    );
    let sim = start_sim(bad).await;
    let judge = "[judge]\nupstream = \"sim\"\nmodel = \"judge\"\nsample_percent = 0.0\n";
    let gw = start_gateway_with(
        // Half held out: with about 20 examples, the gate always has lines to score.
        &config(&sim, "validation_percent = 50.0", judge)
            .replace("eval_min_score = 0.0", "eval_min_score = 70.0"),
        admin,
    )
    .await;
    traffic(&gw, 24, "gate", None).await;
    let job = wait_for_job(&gw, "COMPLETED").await;
    let score = job["eval_metrics"]["eval_score"].as_f64().unwrap();
    assert!(score < 70.0, "{job}");
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("below eval_min_score"),
        "{job}"
    );
    let models: Value = admin_get(&gw, "/admin/models").await.json().await.unwrap();
    assert_eq!(models["data"][0]["status"], "candidate");
    assert!(
        models["data"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("held-out score")
    );
    assert!(
        gw.router()
            .load()
            .route("chat")
            .unwrap()
            .students
            .is_empty(),
        "the bad student got no traffic"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_dataset_reads_only_what_the_judge_has_looked_at() {
    let sim = start_sim(sim_config()).await;
    // The judge scores every trace, but five a minute: the others wait for it.
    let judge = "[judge]\nupstream = \"sim\"\nmodel = \"judge\"\nsample_percent = 100.0\nmax_per_minute = 5\n";
    let text = admin_triggered(&config(&sim, "", judge));
    let gw = start_gateway_with(&text, admin).await;
    // All approved: each is golden whatever the judge says.
    let ids = traffic(&gw, 24, "judged", None).await;
    let store = gw.store().unwrap();
    let judged = || judged(store, &ids);
    eventually("the judge scores its five", || judged() == 5).await;
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
    // A cut past the nineteen the judge has yet to look at would leave them behind every later
    // dataset: this one reads five, too few to train on, and the cut does not move.
    let failed = wait_for_job(&gw, "FAILED").await;
    assert_eq!(failed["dataset_size"], 5, "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("min_examples"),
        "{failed}"
    );
    assert_eq!(judged(), 5);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_schedule_starts_a_job_once_there_is_enough_data() {
    let sim = start_sim(sim_config()).await;
    // Every second, and a threshold that is never reached: only the schedule can start a job.
    // Nothing held out for validation: the job may start at any of 12 to 17 lines, and the
    // training file must keep the 10 lines fine-tuning needs at every one.
    let text = admin_triggered(&config(&sim, "validation_percent = 0.0", ""))
        .replace("schedule = \"\"", "schedule = \"* * * * * *\"");
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 5, "too-few", None).await;
    // Several scheduled ticks pass with 5 golden traces (min_examples is 12): no job.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let jobs = list_jobs(&gw).await;
    assert_eq!(
        jobs["data"],
        json!([]),
        "a quiet route does not fail a job on schedule"
    );
    traffic(&gw, 12, "enough", None).await;
    let job = wait_for_job(&gw, "COMPLETED").await;
    assert_eq!(job["trigger"], "schedule");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_threshold_below_min_examples_waits_for_min_examples() {
    let sim = start_sim(sim_config()).await;
    // A threshold of 3 with min_examples 12: a job started at 3 would fail, leave the cut where
    // it was, and be started again at every check (every 0.2 s here).
    // Nothing held out for validation, as in the schedule's test.
    let text = config(&sim, "validation_percent = 0.0", "")
        .replace("trigger_threshold = 20", "trigger_threshold = 3");
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 5, "too-few", None).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let jobs = list_jobs(&gw).await;
    assert_eq!(jobs["data"], json!([]), "no job below min_examples");
    traffic(&gw, 12, "enough", None).await;
    let job = wait_for_job(&gw, "COMPLETED").await;
    assert_eq!(job["trigger"], "threshold");
    let jobs = list_jobs(&gw).await;
    let statuses: Vec<&str> = jobs["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["status"].as_str().unwrap())
        .collect();
    assert!(!statuses.contains(&"FAILED"), "{statuses:?}");
    gw.shutdown().await;
}

#[tokio::test]
async fn traces_younger_than_the_grading_window_wait_for_it() {
    let sim = start_sim(sim_config()).await;
    // An hour's window: the golden traces below are seconds old, so no dataset may read them
    // yet (feedback could still come for them), and no job starts, by threshold or by hand.
    let text =
        config(&sim, "", "").replace("grading_window_secs = 0", "grading_window_secs = 3600");
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 25, "fresh", None).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let jobs = list_jobs(&gw).await;
    assert_eq!(
        jobs["data"],
        json!([]),
        "no job on traces inside the window"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn traces_the_judge_could_not_score_are_scored_later() {
    let mut sim_config = sim_config();
    // Every other call to the judge fails.
    sim_config.models.insert(
        "judge".to_string(),
        ModelBehavior {
            fail_status: Some(503),
            fail_every: Some(2),
            ..ModelBehavior::default()
        },
    );
    let sim = start_sim(sim_config).await;
    // A day's cap of exactly the eight traces: a failed call must not count against it.
    let judge =
        "[judge]\nupstream = \"sim\"\nmodel = \"judge\"\nsample_percent = 100.0\nmax_per_day = 8\n";
    let text = admin_triggered(&config(&sim, "", judge));
    let gw = start_gateway_with(&text, admin).await;
    let ids = traffic(&gw, 8, "judged", None).await;
    let store = gw.store().unwrap();
    let judged = || judged(store, &ids);
    eventually("the judge scores every trace in the end", || judged() == 8).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_judge_call() {
    let mut sim_config = sim_config();
    // A judge that answers in ten minutes: only an abandoned call lets shutdown end in a test.
    sim_config.models.insert(
        "judge".to_string(),
        ModelBehavior {
            first_byte_delay: Duration::from_secs(600),
            ..ModelBehavior::default()
        },
    );
    let sim = start_sim(sim_config).await;
    let judge = "[judge]\nupstream = \"sim\"\nmodel = \"judge\"\nsample_percent = 100.0\n";
    let gw = start_gateway_with(&admin_triggered(&config(&sim, "", judge)), admin).await;
    traffic(&gw, 2, "slow-judge", None).await;
    let asked_the_judge = || {
        sim.requests()
            .iter()
            .any(|r| r.body.windows(7).any(|w| w == b"\"judge\""))
    };
    eventually("the judge is asked", asked_the_judge).await;
    tokio::time::timeout(DEADLINE, gw.shutdown())
        .await
        .expect("shutdown ends without waiting for the judge's answer");
}

#[tokio::test]
async fn the_judges_daily_cap_holds_across_a_restart() {
    let sim = start_sim(sim_config()).await;
    let judge =
        "[judge]\nupstream = \"sim\"\nmodel = \"judge\"\nsample_percent = 100.0\nmax_per_day = 3\n";
    let text = admin_triggered(&config(&sim, "", judge));
    let day = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 86_400
    };
    let first_day = day();
    let gw = start_gateway_with(&text, admin).await;
    let ids = traffic(&gw, 8, "capped", None).await;
    eventually("the judge spends the day's three", || {
        judged(gw.store().unwrap(), &ids) == 3
    })
    .await;
    // The cap is a cost cap: a restart must not start the day's count again.
    let (gw, _dir) = restart(gw, &text, |_| {}).await;
    // The judge looks for work every 0.2 s here: many rounds.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Across midnight UTC a new day's count starts, legitimately: nothing to check then.
    if day() == first_day {
        assert_eq!(judged(gw.store().unwrap(), &ids), 3);
    }
    gw.shutdown().await;
}

/// Training that would take ten minutes: only a cancel ends it within a test.
fn ten_minute_training() -> SimConfig {
    SimConfig {
        fine_tune: FineTuneTimings {
            validating: Duration::from_millis(50),
            queued: Duration::from_millis(50),
            running: Duration::from_secs(600),
        },
        ..sim_config()
    }
}

/// The simulated provider's own record of fine-tuning run `run`.
async fn provider_job(sim: &SimHandle, run: &str) -> Value {
    sim_json(sim, &format!("/v1/fine_tuning/jobs/{run}")).await
}

/// The simulated provider's answer to `GET path`, as JSON.
async fn sim_json(sim: &SimHandle, path: &str) -> Value {
    sim_json_as(sim, path, None).await
}

/// [`sim_json`], with `key` as the bearer token if given.
async fn sim_json_as(sim: &SimHandle, path: &str, key: Option<&str>) -> Value {
    sim_get(sim, path, |request| match key {
        Some(key) => request.bearer_auth(key),
        None => request,
    })
    .await
}

/// The JSON answer to a GET of `path` on `sim`, made with the credentials `auth` adds.
async fn sim_get(
    sim: &SimHandle,
    path: &str,
    auth: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
) -> Value {
    auth(client().get(format!("{}{path}", sim.root_url())))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_admin_cancel_stops_the_run_at_the_provider_and_fails_the_job() {
    let sim = start_sim(ten_minute_training()).await;
    let text = admin_triggered(&config(&sim, "", ""));
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 25, "cancelled", None).await;
    let client = client();
    let cancel = |id: &str| {
        client
            .post(format!(
                "http://{}/admin/jobs/{id}/cancel",
                gw.admin_addr().unwrap()
            ))
            .bearer_auth(TOKEN)
            .send()
    };
    assert_eq!(cancel("dj_nope").await.unwrap().status(), 404);
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
    let id = submitted_job(&gw).await;
    let accepted = cancel(&id).await.unwrap();
    assert_eq!(accepted.status(), 202);
    let accepted: Value = accepted.json().await.unwrap();
    let run = accepted["provider_job_id"].as_str().unwrap().to_string();
    let failed = wait_for_job(&gw, "FAILED").await;
    assert_eq!(failed["id"], id.as_str());
    assert!(
        failed["error"].as_str().unwrap().contains("cancelled"),
        "{failed}"
    );
    // The provider's own record says so too, and a cancelled job cannot be cancelled again.
    let at_provider = provider_job(&sim, &run).await;
    assert_eq!(at_provider["status"], "cancelled", "{at_provider}");
    let again = cancel(&id).await.unwrap();
    assert_eq!(again.status(), 409);
    gw.shutdown().await;
}

/// Starts a job by the threshold (25 approved traces, over 20), waits until its run is
/// submitted, and cancels it through the admin API; returns the job's id.
async fn threshold_job_cancelled(gw: &TestGateway) -> String {
    traffic(gw, 25, "threshold", None).await;
    let id = submitted_job(gw).await;
    let cancelled = admin_post(gw, &format!("/admin/jobs/{id}/cancel")).await;
    assert_eq!(cancelled.status(), 202);
    id
}

/// The cancelled job `id` is FAILED and marked cancelled, and for two seconds (ten checks) no
/// other job starts, though its examples still meet the threshold.
async fn cancel_holds(gw: &TestGateway, id: &str) {
    let failed = wait_for_job(gw, "FAILED").await;
    assert_eq!(failed["id"], id);
    assert_eq!(failed["cancelled"], true, "{failed}");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let jobs = list_jobs(gw).await;
    assert_eq!(
        jobs["data"].as_array().unwrap().len(),
        1,
        "the threshold undid the cancel: {jobs}"
    );
}

#[tokio::test]
async fn a_cancel_made_while_the_provider_is_down_ends_the_job() {
    let sim = start_sim(ten_minute_training()).await;
    let gw = start_gateway_with(&config(&sim, "", ""), admin).await;
    traffic(&gw, 25, "outage", None).await;
    let id = submitted_job(&gw).await;
    // The provider cannot be reached from here on: every poll fails as an outage does.
    sim.shutdown().await;
    let cancel = admin_post(&gw, &format!("/admin/jobs/{id}/cancel")).await;
    assert_eq!(cancel.status(), 502);
    let err: Value = cancel.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("recorded"),
        "{err}"
    );
    // Without the record, the job would poll the outage until its deadline, holding the route.
    cancel_holds(&gw, &id).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_cancelled_run_is_not_started_again_by_the_threshold() {
    let sim = start_sim(ten_minute_training()).await;
    let gw = start_gateway_with(&config(&sim, "", ""), admin).await;
    let id = threshold_job_cancelled(&gw).await;
    // A failure of another kind would be retried two checks (0.4 s) later.
    cancel_holds(&gw, &id).await;
    // An operator can still start one at once.
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_cancel_holds_the_route_even_when_a_restart_finds_the_run_gone() {
    let sim = start_sim(ten_minute_training()).await;
    // Polls half a minute apart: nothing reads the run cancelled before the restart.
    let slow_polls =
        config(&sim, "", "").replace("poll_initial_secs = 0.05", "poll_initial_secs = 30");
    let gw = start_gateway_with(&slow_polls, admin).await;
    let id = threshold_job_cancelled(&gw).await;
    // Back up against a provider that has no record of the run (as Kubernetes has none of a
    // deleted Job): the job fails as gone, yet it was cancelled, and the route holds.
    let other = start_sim(ten_minute_training()).await;
    let dir = gw.shutdown().await;
    let gw = start_on(&config(&other, "", ""), &dir).await;
    cancel_holds(&gw, &id).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_run_past_the_training_deadline_is_cancelled_and_its_job_failed() {
    // Against a deadline of two seconds.
    let sim = start_sim(ten_minute_training()).await;
    let text = with_distiller(
        &admin_triggered(&config(&sim, "", "")),
        "max_training_secs = 2",
    );
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 25, "deadline", None).await;
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
    // Not waited for in TRAINING: on a slow machine the deadline may pass at its first poll.
    let failed = wait_for_job(&gw, "FAILED").await;
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("max_training_secs") && error.contains("cancelled at the provider"),
        "{failed}"
    );
    let run = failed["provider_job_id"].as_str().unwrap();
    let at_provider = provider_job(&sim, run).await;
    assert_eq!(at_provider["status"], "cancelled", "{at_provider}");
    no_training_files_left(&sim).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_run_that_succeeded_while_forge_was_down_is_kept_past_the_deadline() {
    let mut short = sim_config();
    // Long enough that a slow machine still looks before the run ends.
    short.fine_tune.running = Duration::from_secs(6);
    let sim = start_sim(short).await;
    let text = with_distiller(&config(&sim, "", ""), "max_training_secs = 7");
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 24, "late", None).await;
    let id = submitted_job(&gw).await;
    let before = job(&gw, &id).await;
    assert!(
        before["trained_model"].is_null(),
        "trained already: {before}"
    );
    // Down while the run finishes, and until the deadline has passed.
    let dir = gw.shutdown().await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let again = start_on(&text, &dir).await;
    // The first poll finds the run done: the paid-for model is deployed, not cancelled.
    let job = completed(&again, &id).await;
    assert!(job["resulting_model_id"].is_string(), "{job}");
    again.shutdown().await;
}

/// The sim, whose ARM API takes `arm_token`, and a config whose `chat` route is distilled on
/// Azure, with ARM calls made with `token`.
async fn azure_setup(arm_token: &str, token: &str) -> (SimHandle, String) {
    azure_setup_with(arm_token, token, |_| {}).await
}

/// [`azure_setup`], on a simulator `adjust`ed first (its deployments take 50 ms to provision).
async fn azure_setup_with(
    arm_token: &str,
    token: &str,
    adjust: impl FnOnce(&mut SimConfig),
) -> (SimHandle, String) {
    let mut sim = SimConfig {
        arm_token: Some(arm_token.into()),
        azure: forge_gateway::sim::AzureTimings {
            file_processing: Duration::from_millis(50),
            deployment: Duration::from_millis(50),
        },
        ..sim_config()
    };
    adjust(&mut sim);
    let sim = start_sim(sim).await;
    let azure = format!(
        "[distill.azure]\nendpoint = \"{root}\"\napi_key = \"k\"\nupstream = \"sim\"\n\n[distill.azure.deployment]\nmanagement_url = \"{root}\"\nsubscription_id = \"s\"\nresource_group = \"g\"\naccount = \"acct\"\ntoken = \"{token}\"\n",
        root = sim.root_url()
    );
    let text = config(&sim, "", &azure).replace("provider = \"sim\"", "provider = \"azure\"");
    (sim, text)
}

/// How many fine-tuning jobs Forge asked the simulated Azure resource to create.
fn azure_runs_created(sim: &SimHandle) -> usize {
    calls_where(sim, "POST", |p| p.starts_with("/openai/fine_tuning/jobs?"))
}

#[tokio::test]
async fn an_azure_run_whose_create_answer_was_lost_is_found_not_started_again() {
    let (sim, text) = azure_setup("arm-token", "arm-token").await;
    // Azure creates the job, and its answer is lost on the way back: a 500.
    sim.lose_next_job_creates(1);
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 25, "lost-answer", None).await;
    let id = submitted_job(&gw).await;
    let done = completed(&gw, &id).await;
    assert_eq!(azure_runs_created(&sim), 1, "{done}");
    gw.shutdown().await;
}

/// The simulated Azure resource's list of files.
async fn azure_files(sim: &SimHandle) -> Value {
    sim_get(sim, "/openai/files?api-version=2024-10-21", |request| {
        request.header("api-key", "k")
    })
    .await
}

/// Starts a job from the admin API whose run the provider refuses to create (a 400), and
/// waits until it fails; returns the failed job.
async fn refused_run(sim: &SimHandle, text: &str) -> (TestGateway, Value) {
    sim.refuse_next_job_creates(1);
    let gw = start_gateway_with(&admin_triggered(text), admin).await;
    traffic(&gw, 25, "refused", None).await;
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
    let failed = wait_for_job(&gw, "FAILED").await;
    assert!(
        failed["error"].as_str().unwrap().contains("400"),
        "{failed}"
    );
    (gw, failed)
}

#[tokio::test]
async fn a_run_the_provider_refuses_leaves_none_of_its_uploads_behind() {
    let sim = start_sim(sim_config()).await;
    let (gw, _) = refused_run(&sim, &config(&sim, "", "")).await;
    // Uploaded, then deleted: they hold every client's traces.
    assert_eq!(calls(&sim, "POST", "/v1/files"), 2);
    no_training_files_left(&sim).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn uploads_a_lost_create_may_have_used_stay_when_the_retry_is_refused() {
    let sim = start_sim(sim_config()).await;
    // The first create answers 500 (whether it made a run, Forge cannot tell from that), the
    // retry 400: the files stay, for a run that may exist.
    sim.fail_next_job_creates(1);
    let (gw, _) = refused_run(&sim, &config(&sim, "", "")).await;
    assert_eq!(calls(&sim, "POST", "/v1/fine_tuning/jobs"), 2);
    let files = sim_json(&sim, "/v1/files").await;
    assert_eq!(files["data"].as_array().unwrap().len(), 2, "{files}");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_azure_run_refused_leaves_none_of_its_uploads_behind() {
    let (sim, text) = azure_setup("arm-token", "arm-token").await;
    let (gw, _) = refused_run(&sim, &text).await;
    assert_eq!(
        calls_where(&sim, "POST", |p| p.starts_with("/openai/files?")),
        2
    );
    let files = azure_files(&sim).await;
    assert_eq!(files["data"], json!([]), "{files}");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_azure_create_that_failed_with_no_run_is_not_tried_again() {
    let (sim, text) = azure_setup("arm-token", "arm-token").await;
    // A 500 that made no job: looked for, not found, and not created again, since a run
    // that shows up late would then be paid for twice.
    sim.fail_next_job_creates(1);
    let gw = start_gateway_with(&admin_triggered(&text), admin).await;
    traffic(&gw, 25, "failed-create", None).await;
    assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
    let failed = wait_for_job(&gw, "FAILED").await;
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("made all the same"), "{failed}");
    assert_eq!(azure_runs_created(&sim), 1);
    // Its uploads stay: they are what the operator checks a late run against.
    let files = azure_files(&sim).await;
    assert_eq!(files["data"].as_array().unwrap().len(), 2, "{files}");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_azure_submission_a_restart_interrupted_finds_its_run() {
    let (sim, text) = azure_setup_with("arm-token", "arm-token", |sim| {
        sim.fine_tune.running = Duration::from_secs(5)
    })
    .await;
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 25, "interrupted", None).await;
    let id = submitted_job(&gw).await;
    let run = job(&gw, &id).await["provider_job_id"].clone();
    // Stopped as if while submitting: the run exists, its id unrecorded.
    let dir = gw.shutdown().await;
    let store = reopened(&dir).await;
    let mut stored: Value = store.job(&id).unwrap().unwrap();
    stored["provider_job_id"] = Value::Null;
    store.put_job(&id, &stored).unwrap();
    drop(store);
    // Meanwhile another user of the resource makes 120 jobs: the run is no longer on the first
    // page of the job list (100 a page), and its upload not the newest file.
    let theirs = azure_upload(&sim, "theirs.jsonl").await;
    for _ in 0..120 {
        azure_create(&sim, &theirs).await;
    }
    let again = start_on(&admin_triggered(&text), &dir).await;
    let done = completed(&again, &id).await;
    assert_eq!(done["provider_job_id"], run, "{done}");
    // Forge's one run, and the other user's.
    assert_eq!(azure_runs_created(&sim), 1 + 120);
    again.shutdown().await;
    drop(dir);
}

#[tokio::test]
async fn an_azure_submission_stopped_between_upload_and_create_uses_its_upload_again() {
    // Files take 12 s to process: the gateway stops while it waits for the training file's.
    let (sim, text) = azure_setup_with("arm-token", "arm-token", |sim| {
        sim.azure.file_processing = Duration::from_secs(12)
    })
    .await;
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 25, "orphan", None).await;
    let uploads = || calls_where(&sim, "POST", |p| p.starts_with("/openai/files?"));
    eventually("the training file uploaded", || uploads() >= 1).await;
    let id = wait_for_job(&gw, "TRAINING").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = gw.shutdown().await;
    assert_eq!(uploads(), 1, "the gateway stopped too late");
    // Back: the upload is found with no job made from it, and used; only the validation file
    // is sent.
    let again = start_on(&admin_triggered(&text), &dir).await;
    completed(&again, &id).await;
    assert_eq!(uploads(), 2);
    assert_eq!(azure_runs_created(&sim), 1);
    again.shutdown().await;
    drop(dir);
}

/// Uploads a one-line training file to the simulated Azure resource, as another user of it
/// would; returns its id.
async fn azure_upload(sim: &SimHandle, name: &str) -> String {
    let line = "\u{feff}{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"hello\"}]}\n";
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(line.as_bytes().to_vec()).file_name(name.to_string()),
        );
    let resp = client()
        .post(format!(
            "{}/openai/files?api-version=2024-10-21",
            sim.root_url()
        ))
        .header("api-key", "k")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let file: Value = resp.json().await.unwrap();
    file["id"].as_str().unwrap().to_string()
}

/// Makes a fine-tuning job on the simulated Azure resource from `file`, as another user would.
async fn azure_create(sim: &SimHandle, file: &str) {
    let resp = client()
        .post(format!(
            "{}/openai/fine_tuning/jobs?api-version=2024-10-21",
            sim.root_url()
        ))
        .header("api-key", "k")
        .json(&json!({"model": "gpt-4o-mini-2024-07-18", "training_file": file}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
}

#[tokio::test]
async fn a_job_that_fails_after_training_keeps_its_examples_from_a_second_run() {
    // Azure trains, then its deployment is refused: the token is not the one ARM wants.
    let (sim, text) = azure_setup("the-right-token", "a-wrong-token").await;
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 25, "paid-for", None).await;
    let failed = wait_for_job(&gw, "FAILED").await;
    assert!(
        failed["error"].as_str().unwrap().contains("deploy"),
        "{failed}"
    );
    assert!(failed["trained_model"].is_string(), "{failed}");
    // The run ended: its uploads are deleted from the Azure resource.
    let azure = |path: String| {
        client()
            .get(format!(
                "{}/openai/{path}?api-version=2024-10-21",
                sim.root_url()
            ))
            .header("api-key", "k")
            .send()
    };
    let run = failed["provider_job_id"].as_str().unwrap();
    let run: Value = azure(format!("fine_tuning/jobs/{run}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for file in [&run["training_file"], &run["validation_file"]] {
        let file = file.as_str().unwrap();
        let start = tokio::time::Instant::now();
        while azure(format!("files/{file}")).await.unwrap().status() != 404 {
            assert!(start.elapsed() < DEADLINE, "{file} left: {run}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Many checks later (every 0.2 s), no second job has trained on the same examples.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let jobs = list_jobs(&gw).await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 1, "{jobs}");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_azure_deployment_that_outlasts_its_wait_is_deleted_and_the_job_fails() {
    let (sim, text) = azure_setup_with("arm-token", "arm-token", |sim| {
        sim.azure.deployment = Duration::from_secs(600)
    })
    .await;
    let text = text.replace(
        "token = \"arm-token\"\n",
        "token = \"arm-token\"\nwait_secs = 1\n",
    );
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 25, "slow-deploy", None).await;
    let failed = wait_for_job(&gw, "FAILED").await;
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("deployment.wait_secs") && error.contains("deleted"),
        "{failed}"
    );
    assert!(failed["trained_model"].is_string(), "{failed}");
    // Deleted, so that it does not go on to bill by the hour; put once, not again.
    let calls = |method| calls_where(&sim, method, |p| p.contains("/deployments/forge-"));
    assert_eq!((calls("PUT"), calls("DELETE")), (1, 1));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_newer_student_retires_the_one_it_replaces() {
    let sim = start_sim(sim_config()).await;
    let gw = start_gateway_with(
        // Idle students are taken down after 0.3 s, but an OpenAI-style model costs nothing
        // idle, so the replaced one stays in its route at 0%. Students join at 0%: with a
        // share, the first would answer some of the second round, whose examples (teacher
        // answers only) could then fall below min_examples.
        &with_distiller(
            &no_canary(&admin_triggered(&config(&sim, "", ""))),
            "undeploy_after_secs = 0.3",
        ),
        admin,
    )
    .await;
    let mut ids = Vec::new();
    for round in 0..2 {
        traffic(&gw, 20, &format!("round-{round}"), None).await;
        assert_eq!(admin_post(&gw, "/admin/distill/chat").await.status(), 202);
        let start = tokio::time::Instant::now();
        let job = loop {
            let jobs = list_jobs(&gw).await;
            let done = jobs["data"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["status"] == "COMPLETED" && !ids.contains(&j["resulting_model_id"]))
                .cloned();
            if let Some(job) = done {
                break job;
            }
            assert!(start.elapsed() < DEADLINE, "round {round}: {jobs}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        ids.push(job["resulting_model_id"].clone());
    }
    let models: Value = admin_get(&gw, "/admin/models").await.json().await.unwrap();
    let status_of = |id: &Value| {
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| &m["id"] == id)
            .map(|m| m["status"].clone())
    };
    assert_eq!(status_of(&ids[0]), Some(json!("retired")), "{models}");
    assert_eq!(status_of(&ids[1]), Some(json!("canary")), "{models}");
    // Many checks later (every 0.2 s), the replaced student is still in the route, at 0%.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let route = gw.router().load().route("chat").unwrap().clone();
    let shares: Vec<(Value, CanaryShare)> = route
        .students
        .iter()
        .map(|s| (json!(s.target.model), s.share))
        .collect();
    assert_eq!(shares[0], (ids[0].clone(), CanaryShare::ZERO), "{shares:?}");
    assert_eq!(shares.len(), 2, "{shares:?}");
    gw.shutdown().await;
}

/// Starts a job for `chat` from the admin API and waits for it to complete.
async fn distilled(gw: &TestGateway) -> Value {
    let started = admin_post(gw, "/admin/distill/chat").await;
    assert_eq!(started.status(), 202);
    let job: Value = started.json().await.unwrap();
    completed(gw, job["id"].as_str().unwrap()).await
}

/// The trace ids a completed job's dataset was built from, from its provenance file.
fn trained_on(job: &Value) -> Vec<String> {
    let path = job["dataset"]["provenance"]["path"].as_str().unwrap();
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["trace_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn an_approval_that_comes_after_the_cut_reaches_the_next_dataset_once() {
    let sim = start_sim(sim_config()).await;
    // Jobs start from the admin API only, and the first student gets no traffic: every answer
    // of the second round is the teacher's.
    let text = no_canary(&admin_triggered(&config(&sim, "", "")));
    let gw = start_gateway_with(&text, admin).await;
    // An answer nobody has reviewed yet, among approved ones.
    let question =
        json!({"model": "chat", "messages": [{"role": "user", "content": "reviewed next week"}]});
    let reviewed_late = ask(&gw, &question, None).await;
    traffic(&gw, 20, "first", None).await;
    let first = distilled(&gw).await;
    assert_eq!(first["dataset"]["late"], 0, "{first}");
    assert!(!trained_on(&first).contains(&reviewed_late));

    // The review comes after the first dataset's cut has passed the trace.
    approve(&gw, &reviewed_late, None).await;
    traffic(&gw, 20, "second", None).await;
    let second = distilled(&gw).await;
    assert_eq!(second["dataset"]["late"], 1, "{second}");
    let lines = trained_on(&second);
    assert_eq!(
        lines.iter().filter(|id| **id == reviewed_late).count(),
        1,
        "{lines:?}"
    );
    assert!(
        trained_on(&first).iter().all(|id| !lines.contains(id)),
        "no trace of the first dataset is trained on again"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_replaced_student_leaves_its_route_and_its_azure_deployment_is_deleted() {
    let (sim, text) = azure_setup("arm-token", "arm-token").await;
    // Every answer is the teacher's, so each round has its examples.
    let text = with_distiller(
        &no_canary(&admin_triggered(&text)),
        "undeploy_after_secs = 0.3",
    );
    let gw = start_gateway_with(&text, admin).await;
    traffic(&gw, 20, "first", None).await;
    let first = distilled(&gw).await["resulting_model_id"]
        .as_str()
        .unwrap()
        .to_string();
    traffic(&gw, 20, "second", None).await;
    let second = distilled(&gw).await["resulting_model_id"]
        .as_str()
        .unwrap()
        .to_string();
    let students = || -> Vec<String> {
        gw.router()
            .load()
            .route("chat")
            .unwrap()
            .students
            .iter()
            .map(|s| s.target.model.clone())
            .collect()
    };
    eventually("the replaced student left the route", || {
        students() == [second.clone()]
    })
    .await;
    let deleted = |model: &str| {
        sim.requests()
            .iter()
            .any(|r| r.method == "DELETE" && r.path.contains(&format!("/deployments/{model}?")))
    };
    eventually("its deployment was deleted", || deleted(&first)).await;
    assert!(!deleted(&second), "the serving student stays deployed");
    let start = tokio::time::Instant::now();
    loop {
        let models: Value = admin_get(&gw, "/admin/models").await.json().await.unwrap();
        let record = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == first.as_str())
            .cloned()
            .unwrap();
        if record["undeployed_ms"].is_u64() {
            assert_eq!(record["status"], "retired", "{record}");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{models}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}
