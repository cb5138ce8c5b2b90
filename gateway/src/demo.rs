//! `forge demo`: the whole loop on the simulated upstream, with a timeline and a summary.
//!
//! The simulated upstream plays a teacher that answers well (`gpt-4o`), a student base that
//! answers badly (`gpt-4o-mini`), a judge, and OpenAI's fine-tuning API with short timings.
//! Traffic flows through the real gateway, is captured, graded (user feedback and the judge),
//! distilled, trained, gated, and put into canary; the guard then steps the student up.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use forge_layer::distill::{DistillationJob, ModelRecord, ModelStatus};
use forge_layer::reassemble::RawObject;
use forge_router::CanaryShare;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::auth::Secret;
use crate::config::Config;
use crate::sim::{FineTuneTimings, ModelBehavior, Quality, SimConfig, SimUpstream};

/// The alias apps use in the demo.
const ALIAS: &str = "gpt-4o";

/// List prices, USD per million tokens: GPT-4o, and a fine-tuned GPT-4o mini.
const TEACHER_PRICE: (f64, f64) = (2.50, 10.00);
const STUDENT_PRICE: (f64, f64) = (0.30, 1.20);

const QUESTIONS: &[&str] = &[
    "How do I reset my password if I no longer have access to my email?",
    "What is the difference between a process and a thread?",
    "Explain how TCP congestion control avoids collapse.",
    "Summarize the refund policy for annual subscriptions.",
    "Why does my Rust code fail with a borrow checker error on a mutable reference?",
    "Draft a polite reply to a customer whose order arrived damaged.",
    "What are good practices for rotating API keys in production?",
    "How should I size a Kubernetes pod for a memory-heavy Java service?",
    "Compare PostgreSQL logical replication with physical streaming replication.",
    "What causes high tail latency in a reverse proxy under load?",
    "Translate our onboarding checklist into a short email for new hires.",
    "Which metrics matter most when canarying a new model version?",
];

fn demo_config(sim_url: &str, data_dir: &std::path::Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_secs = 5

[[upstreams]]
name = "sim"
base_url = "{sim_url}"

[[routes]]
alias = "{ALIAS}"
teacher = {{ upstream = "sim", model = "gpt-4o" }}

[capture]
data_dir = {data_dir:?}

[guard]
interval_secs = 1.5
min_requests = 12
steps = [10.0, 25.0, 50.0, 100.0]

[distiller]
check_every_secs = 0.5
poll_initial_secs = 0.2
poll_max_secs = 1.0
# The demo's feedback comes at once; a production gateway waits for late feedback.
grading_window_secs = 0

[judge]
upstream = "sim"
model = "judge"
sample_percent = 100.0
max_per_minute = 100000

[[distill]]
route = "{ALIAS}"
student_base_model = "gpt-4o-mini"
provider = "sim"
upstream = "sim"
trigger_threshold = 60
min_examples = 40
schedule = ""
eval_min_score = 70.0
eval_max_prompts = 8
# A quarter held out: even a 40-example dataset has lines the gate can score the student on.
validation_percent = 25.0
initial_canary_percent = 10.0
suffix = "forge-demo"
"#,
        data_dir = data_dir.display().to_string()
    )
}

/// A conversation an app might send: plain, multi-turn, or with a tool.
fn request(i: u64) -> Value {
    let q = QUESTIONS[(i as usize * 7) % QUESTIONS.len()];
    let user = format!("user-{}", i % 97);
    match i % 5 {
        0 => json!({"model": ALIAS, "user": user, "messages": [
            {"role": "system", "content": "You are a concise support assistant."},
            {"role": "user", "content": "Hi, I have a question."},
            {"role": "assistant", "content": "Of course. What would you like to know?"},
            {"role": "user", "content": q}
        ]}),
        1 => json!({"model": ALIAS, "user": user, "messages": [
            {"role": "user", "content": format!("Look up our docs: {q}")},
            {"role": "assistant", "content": null, "tool_calls": [{"id": format!("call_{i}"), "type": "function", "function": {"name": "search_docs", "arguments": "{\"query\":\"docs\"}"}}]},
            {"role": "tool", "tool_call_id": format!("call_{i}"), "content": "The docs say: follow the runbook, then verify with the checklist."}
        ], "tools": [{"type": "function", "function": {"name": "search_docs", "description": "Search internal docs", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]}),
        2 => {
            json!({"model": ALIAS, "user": user, "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": q}]})
        }
        _ => {
            json!({"model": ALIAS, "user": user, "messages": [{"role": "user", "content": format!("{q} (ticket {})", i % 400)}]})
        }
    }
}

/// Usage totals of one arm, for the cost estimate.
#[derive(Default)]
struct Usage {
    requests: u64,
    prompt: u64,
    completion: u64,
}

impl Usage {
    fn cost_per_1k(&self, price: (f64, f64)) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        let per_request = (self.prompt as f64 * price.0 + self.completion as f64 * price.1)
            / 1e6
            / self.requests as f64;
        per_request * 1000.0
    }
}

/// Runs the demo; returns an error if the loop did not complete.
pub async fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let say = |what: String| println!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
    let sim_config = SimConfig {
        models: HashMap::from([
            (
                "gpt-4o".to_string(),
                ModelBehavior {
                    words: 40,
                    ..ModelBehavior::default()
                },
            ),
            (
                "gpt-4o-mini".to_string(),
                ModelBehavior {
                    quality: Quality::Poor,
                    words: 24,
                    ..ModelBehavior::default()
                },
            ),
        ]),
        fine_tune: FineTuneTimings {
            validating: Duration::from_millis(400),
            queued: Duration::from_millis(400),
            running: Duration::from_millis(2000),
        },
        ..SimConfig::default()
    };
    let sim = SimUpstream::start(sim_config, ([127, 0, 0, 1], 0).into()).await?;
    let dir = tempfile_dir()?;
    let mut config = Config::from_toml(&demo_config(&sim.base_url(), dir.path()))?;
    config.server.admin_token = Some(Secret::new(&format!("demo-{}", ulid::Ulid::new())));
    let gateway = crate::server::start(config).await?;
    say(format!(
        "gateway up at {} (teacher gpt-4o, student base gpt-4o-mini, all simulated)",
        gateway.base_url()
    ));

    let http = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let (http, base, stop, sent) = (
            http.clone(),
            gateway.base_url(),
            Arc::clone(&stop),
            Arc::clone(&sent),
        );
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let body = request(i);
                if let Ok(resp) = http
                    .post(format!("{base}/chat/completions"))
                    .json(&body)
                    .send()
                    .await
                {
                    let trace = resp
                        .headers()
                        .get("x-forge-trace-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let _ = resp.bytes().await;
                    // About a third of users leave a thumbs-up, as apps report it.
                    if let (Some(trace), true) = (trace, i % 3 == 0) {
                        let _ = http
                            .post(format!("{base}/feedback"))
                            .json(&json!({"trace_id": trace, "approved": true}))
                            .send()
                            .await;
                    }
                }
                sent.fetch_add(1, Ordering::Relaxed);
                i += 4;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }));
    }

    let distiller = gateway
        .distiller()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the demo config has no [[distill]]"))?;
    let mut seen_jobs: HashMap<String, String> = HashMap::new();
    let mut seen_models: HashMap<String, String> = HashMap::new();
    let mut last_share = None;
    let mut seen_events = 0usize;
    let deadline = Duration::from_secs(55);
    let mut done = false;
    while started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let captured = gateway.capture_counters().map_or(0, |c| c.captured);
        for job in distiller.jobs()? {
            let state = format!(
                "{:?} {}",
                job.status,
                job.provider_status.clone().unwrap_or_default()
            );
            if seen_jobs.get(&job.id) != Some(&state) {
                match job.status {
                    forge_layer::distill::JobStatus::Collecting => say(format!(
                        "{} reached with {captured} traces captured: job {} builds the dataset",
                        if job.trigger == "threshold" {
                            "golden threshold (60)"
                        } else {
                            job.trigger.as_str()
                        },
                        job.id
                    )),
                    forge_layer::distill::JobStatus::Training => say(format!(
                        "job {}: dataset of {} examples; fine-tuning {} ({})",
                        job.id,
                        job.dataset_size,
                        job.provider_job_id.clone().unwrap_or_default(),
                        job.provider_status.clone().unwrap_or("submitted".into())
                    )),
                    forge_layer::distill::JobStatus::Completed => say(format!(
                        "job {} completed: {}",
                        job.id,
                        job.resulting_model_id.clone().unwrap_or_default()
                    )),
                    forge_layer::distill::JobStatus::Failed => say(format!(
                        "job {} FAILED: {}",
                        job.id,
                        job.error.clone().unwrap_or_default()
                    )),
                }
                seen_jobs.insert(job.id.clone(), state);
            }
        }
        for model in distiller.models()? {
            let state = format!("{:?}", model.status);
            if seen_models.get(&model.id) != Some(&state) {
                let score = model
                    .metrics
                    .get("eval_score")
                    .map(|s| format!(", held-out score {s:.0}"))
                    .unwrap_or_default();
                say(format!(
                    "registry: {} is {:?}{score}",
                    model.id, model.status
                ));
                seen_models.insert(model.id.clone(), state);
            }
        }
        let table = gateway.router().load();
        let share = table
            .route(ALIAS)
            .and_then(|r| r.students.last().map(|s| (s.target.model.clone(), s.share)));
        if share != last_share {
            if let Some((model, share)) = &share {
                say(format!(
                    "routing v{}: {model} gets {}% of {ALIAS}",
                    table.version(),
                    share.percent()
                ));
            }
            last_share = share.clone();
        }
        if let Some(events) = gateway_guard_events(&gateway) {
            for e in events.iter().skip(seen_events) {
                say(format!(
                    "guard: {} — {}",
                    serde_json::to_value(e.kind)
                        .unwrap_or_default()
                        .as_str()
                        .unwrap_or("?"),
                    e.detail
                ));
            }
            seen_events = events.len();
        }
        if share.as_ref().is_some_and(|(_, s)| *s == CanaryShare::FULL) {
            done = true;
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    settle_capture(&gateway).await;
    summary(
        &gateway,
        &distiller,
        sent.load(Ordering::Relaxed),
        started.elapsed(),
    )
    .await?;
    gateway.shutdown().await;
    sim.shutdown().await;
    if done {
        Ok(())
    } else {
        anyhow::bail!(
            "the loop did not reach promotion within {}s",
            deadline.as_secs()
        )
    }
}

fn gateway_guard_events(
    gateway: &crate::server::RunningGateway,
) -> Option<Vec<forge_layer::guard::GuardEvent>> {
    gateway.guard().map(|g| g.events())
}

/// Waits (up to 10 s) until the writer has committed every trace it was handed, so that the
/// summary counts the last requests too: an `async` writer commits once per flush interval.
async fn settle_capture(gateway: &crate::server::RunningGateway) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gateway.capture_counters().is_some_and(|c| c.pending > 0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn tempfile_dir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("forge-demo-").tempdir()
}

async fn summary(
    gateway: &crate::server::RunningGateway,
    distiller: &Arc<forge_layer::distill::DistillationService>,
    sent: u64,
    took: Duration,
) -> anyhow::Result<()> {
    let store = gateway
        .store()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("capture is off"))?;
    let (traces, golden, teacher, student) = tokio::task::spawn_blocking(move || {
        let (mut traces, mut golden) = (0u64, 0u64);
        let (mut teacher, mut student) = (Usage::default(), Usage::default());
        let policy = forge_layer::grade::GoldenPolicy::default();
        let _ = store.for_each_graded_trace(None, |t, fb, ev| {
            traces += 1;
            golden += u64::from(policy.is_golden(&t, fb.as_ref(), ev.as_ref()));
            let usage = if t.is_teacher() {
                &mut teacher
            } else {
                &mut student
            };
            if let Some(u) = t.response.usage.as_ref().map(RawObject::to_value) {
                usage.requests += 1;
                usage.prompt += u["prompt_tokens"].as_u64().unwrap_or(0);
                usage.completion += u["completion_tokens"].as_u64().unwrap_or(0);
            }
            true
        });
        (traces, golden, teacher, student)
    })
    .await?;
    let models: Vec<ModelRecord> = distiller.models()?;
    // The model that is serving (promoted or in canary), and the job that made it.
    let serving = models
        .iter()
        .find(|m| matches!(m.status, ModelStatus::Promoted | ModelStatus::Canary))
        .or(models.first());
    let jobs: Vec<DistillationJob> = distiller.jobs()?;
    let job = serving
        .and_then(|m| jobs.iter().find(|j| j.id == m.job_id))
        .or(jobs.first());
    let table = gateway.router().load();
    let share = table
        .route(ALIAS)
        .and_then(|r| r.students.last())
        .map_or(0.0, |s| s.share.percent());
    println!();
    println!("Summary ({:.1}s)", took.as_secs_f64());
    println!("  requests sent            {sent}");
    println!("  traces captured          {traces}");
    println!("  golden traces            {golden}");
    println!(
        "  dataset size             {}",
        job.map_or(0, |j| j.dataset_size)
    );
    println!(
        "  fine-tuning job          {} ({})",
        job.map_or("-".into(), |j| j.id.clone()),
        job.and_then(|j| j.provider_job_id.clone())
            .unwrap_or_default()
    );
    println!(
        "  student model            {}",
        serving.map_or("-".into(), |m| format!("{} ({:?})", m.id, m.status))
    );
    println!("  student share of {ALIAS}   {share}%");
    // The student is priced as if it answered the teacher's prompts: same tokens, cheaper model.
    let teacher_cost = teacher.cost_per_1k(TEACHER_PRICE);
    let student_cost = Usage {
        requests: teacher.requests,
        prompt: teacher.prompt,
        completion: teacher.completion,
    }
    .cost_per_1k(STUDENT_PRICE);
    println!(
        "  est. cost per 1k requests teacher ${teacher_cost:.3} vs student ${student_cost:.3} ({:.0}% less; list prices per 1M tokens: gpt-4o ${}/${}, ft gpt-4o-mini ${}/${})",
        if teacher_cost > 0.0 {
            100.0 * (1.0 - student_cost / teacher_cost)
        } else {
            0.0
        },
        TEACHER_PRICE.0,
        TEACHER_PRICE.1,
        STUDENT_PRICE.0,
        STUDENT_PRICE.1
    );
    println!("  student requests served  {}", student.requests);
    Ok(())
}
