//! The training providers end to end against the simulated upstream on loopback: OpenAI, Azure, Kubernetes + vLLM, and their failure paths.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use forge_gateway::sim::{
    AzureTimings, ClusterTimings, FineTuneTimings, SimConfig, SimHandle, SimUpstream,
};
use forge_layer::distill::providers::{
    AzureConfig, AzureDeploymentConfig, AzureProvider, KubernetesConfig, KubernetesProvider,
    OpenAiConfig, OpenAiProvider, ProviderConfig, SecretString,
};
use forge_layer::distill::{
    Hyperparameters, Progress, ProviderError, ProviderState, Submitted, TrainingProvider,
    TrainingRequest,
};
use serde_json::{Value, json};
use tokio::time::Instant;

const API_KEY: &str = "sk-forge-test";
const ARM_TOKEN: &str = "arm-entra-token";
const CLUSTER_TOKEN: &str = "sa-token";
const DATASET_TOKEN: &str = "dataset-bearer";
const AZURE_API_VERSION: &str = "2024-10-21";
/// Generous: the simulated phases take milliseconds, but a loaded CI machine may not.
const DEADLINE: Duration = Duration::from_secs(60);

async fn sim() -> SimHandle {
    start(sim_config()).await
}

/// Like [`sim`], with training runs that take ten minutes: only a cancel ends them in a test.
async fn slow_sim() -> SimHandle {
    let mut config = sim_config();
    config.fine_tune.running = Duration::from_secs(600);
    config.cluster.running = Duration::from_secs(600);
    start(config).await
}

async fn start(config: SimConfig) -> SimHandle {
    SimUpstream::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn sim_config() -> SimConfig {
    let tiny = Duration::from_millis(40);
    SimConfig {
        fine_tune: FineTuneTimings {
            validating: tiny,
            queued: tiny,
            running: tiny * 2,
        },
        azure: AzureTimings {
            file_processing: Duration::from_millis(150),
            deployment: Duration::from_millis(150),
        },
        cluster: ClusterTimings {
            pending: tiny,
            running: tiny * 2,
            finishing: tiny,
        },
        api_key: Some(API_KEY.into()),
        arm_token: Some(ARM_TOKEN.into()),
        cluster_token: Some(CLUSTER_TOKEN.into()),
        ..SimConfig::default()
    }
}

fn line(i: usize) -> String {
    json!({"messages": [
        {"role": "system", "content": "You are a support bot."},
        {"role": "user", "content": format!("How do I reset password number {i}?")},
        {"role": "assistant", "content": format!("Open settings and choose reset ({i}).")},
    ]})
    .to_string()
}

fn jsonl(dir: &Path, name: &str, examples: usize) -> PathBuf {
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    for i in 0..examples {
        writeln!(file, "{}", line(i)).unwrap();
    }
    path
}

fn request(
    job_id: &str,
    train: PathBuf,
    validation: Option<PathBuf>,
    base_model: &str,
) -> TrainingRequest {
    TrainingRequest {
        job_id: job_id.into(),
        train_file: train,
        validation_file: validation,
        base_model: base_model.into(),
        suffix: Some("support".into()),
        hyperparameters: Hyperparameters {
            n_epochs: Some(2),
            ..Hyperparameters::default()
        },
        dataset_url: None,
    }
}

fn sim_provider(sim: &SimHandle) -> Box<dyn TrainingProvider> {
    let config: ProviderConfig = serde_json::from_value(json!({
        "provider": "sim",
        "base_url": sim.base_url(),
        "api_key": API_KEY,
    }))
    .unwrap();
    config.build().unwrap()
}

/// Polls until the run is final, waiting out 429s as the distiller would.
async fn until_final(provider: &dyn TrainingProvider, id: &str) -> Progress {
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "{id} did not finish in time");
        match provider.poll(id).await {
            Ok(progress)
                if !matches!(
                    progress.state,
                    ProviderState::Queued | ProviderState::Running
                ) =>
            {
                return progress;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            Err(ProviderError::RateLimited(wait)) => tokio::time::sleep(wait).await,
            Err(err) => panic!("poll failed: {err}"),
        }
    }
}

/// `GET` a JSON document from the sim's `/v1/{path}`, with the API key.
async fn get_json(sim: &SimHandle, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}/{path}", sim.base_url()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn posts_to(sim: &SimHandle, path_prefix: &str) -> Vec<forge_gateway::sim::RecordedRequest> {
    sim.requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.starts_with(path_prefix))
        .collect()
}

// ---- OpenAI (and the sim) -------------------------------------------------------------

#[tokio::test]
async fn openai_uploads_trains_reports_metrics_and_deploys() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let provider = sim_provider(&sim);
    assert_eq!(provider.name(), "sim");
    let train = jsonl(dir.path(), "train.jsonl", 24);
    let valid = jsonl(dir.path(), "valid.jsonl", 4);

    let Submitted {
        provider_job_id,
        training_file_id,
    } = provider
        .submit(&request("01JOBOPENAI", train, Some(valid), "gpt-4o-mini"))
        .await
        .unwrap();
    assert!(provider_job_id.starts_with("ftjob-"), "{provider_job_id}");
    assert!(
        training_file_id
            .as_deref()
            .is_some_and(|id| id.starts_with("file-"))
    );

    // Both uploads are multipart, `purpose=fine-tune`, `.jsonl`, with the key as a bearer token.
    let uploads = posts_to(&sim, "/v1/files");
    assert_eq!(uploads.len(), 2);
    for upload in &uploads {
        assert_eq!(
            upload.header("authorization"),
            Some(format!("Bearer {API_KEY}").as_str())
        );
        assert!(
            upload
                .header("content-type")
                .unwrap()
                .starts_with("multipart/form-data")
        );
        let body = String::from_utf8_lossy(&upload.body);
        assert!(body.contains("fine-tune"), "{body}");
        assert!(body.contains(".jsonl\""), "{body}");
    }
    let create = &posts_to(&sim, "/v1/fine_tuning/jobs")[0];
    let body = create.json().unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["method"]["type"], "supervised");
    assert_eq!(
        body["method"]["supervised"]["hyperparameters"],
        json!({"n_epochs": 2})
    );
    assert_eq!(body["metadata"]["forge_job_id"], "01JOBOPENAI");
    assert_eq!(body["suffix"], "support");
    assert!(
        body["validation_file"]
            .as_str()
            .unwrap()
            .starts_with("file-")
    );

    let progress = until_final(provider.as_ref(), &provider_job_id).await;
    let ProviderState::Succeeded { model } = &progress.state else {
        panic!("{progress:?}");
    };
    assert!(model.starts_with("ft:gpt-4o-mini"), "{model}");
    assert!(model.contains(":support:"), "{model}");
    assert_eq!(progress.provider_status, "succeeded");
    for key in [
        "train_loss",
        "valid_loss",
        "train_mean_token_accuracy",
        "valid_mean_token_accuracy",
    ] {
        let value = progress.metrics.get(key).copied();
        assert!(
            value.is_some_and(|v| v > 0.0 && v.is_finite()),
            "{key}: {:?}",
            progress.metrics
        );
    }
    // The metrics are the result CSV's last row, which the provider read by header name.
    let csv_read = sim.requests().iter().any(|r| {
        r.method == "GET" && r.path.starts_with("/v1/files/") && r.path.ends_with("/content")
    });
    assert!(csv_read, "the result CSV was not read");
    // And they are the values of its last row, whatever the column order.
    let http = reqwest::Client::new();
    let job = get_json(&sim, &format!("fine_tuning/jobs/{provider_job_id}")).await;
    let csv = http
        .get(format!(
            "{}/files/{}/content",
            sim.base_url(),
            job["result_files"][0].as_str().unwrap()
        ))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let last: Vec<&str> = csv.lines().last().unwrap().split(',').collect();
    let cell = |name: &str| {
        last[header.iter().position(|h| *h == name).unwrap()]
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(progress.metrics["train_loss"], cell("train_loss"));
    assert_eq!(
        progress.metrics["train_mean_token_accuracy"],
        cell("train_accuracy")
    );
    assert_eq!(
        progress.metrics["valid_mean_token_accuracy"],
        cell("valid_mean_token_accuracy")
    );

    let deployed = provider.deploy("01JOBOPENAI", model).await.unwrap();
    assert_eq!(deployed.upstream, "sim");
    assert_eq!(&deployed.model, model);
    sim.shutdown().await;
}

#[tokio::test]
async fn openai_resubmission_finds_the_job_an_earlier_attempt_created() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let provider = sim_provider(&sim);
    let req = request(
        "01JOBAGAIN",
        jsonl(dir.path(), "t.jsonl", 12),
        None,
        "gpt-4o-mini",
    );
    // Looking, before any submission, finds nothing and starts nothing.
    assert_eq!(
        provider.earlier_submission(&req.job_id).await.unwrap(),
        None
    );
    let first = provider.submit(&req).await.unwrap();
    let second = provider.submit(&req).await.unwrap();
    assert_eq!(first.provider_job_id, second.provider_job_id);
    assert_eq!(first.training_file_id, second.training_file_id);
    assert_eq!(
        provider.earlier_submission(&req.job_id).await.unwrap(),
        Some(first.provider_job_id.clone())
    );
    assert_eq!(
        provider.earlier_submission("01OTHERJOB").await.unwrap(),
        None
    );
    assert_eq!(posts_to(&sim, "/v1/fine_tuning/jobs").len(), 1);
    assert_eq!(posts_to(&sim, "/v1/files").len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn openai_bad_data_fails_the_job_with_the_providers_error() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let provider = sim_provider(&sim);
    // Fewer than the 10 examples OpenAI requires: accepted at upload, failed in validation.
    let submitted = provider
        .submit(&request(
            "01JOBBAD",
            jsonl(dir.path(), "t.jsonl", 3),
            None,
            "gpt-4o-mini",
        ))
        .await
        .unwrap();
    let progress = until_final(provider.as_ref(), &submitted.provider_job_id).await;
    let ProviderState::Failed { error } = &progress.state else {
        panic!("{progress:?}");
    };
    assert!(error.starts_with("invalid_training_file: "), "{error}");
    assert_eq!(progress.provider_status, "failed");
    assert!(progress.metrics.is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn openai_training_failure_is_reported() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let provider = sim_provider(&sim);
    sim.fail_next_fine_tuning_jobs(1);
    let submitted = provider
        .submit(&request(
            "01JOBFAILRUN",
            jsonl(dir.path(), "t.jsonl", 12),
            None,
            "gpt-4o-mini",
        ))
        .await
        .unwrap();
    let progress = until_final(provider.as_ref(), &submitted.provider_job_id).await;
    let ProviderState::Failed { error } = &progress.state else {
        panic!("{progress:?}");
    };
    assert!(error.starts_with("training_failed"), "{error}");
    sim.shutdown().await;
}

#[tokio::test]
async fn openai_429_gives_the_retry_after_duration() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let provider = sim_provider(&sim);
    let req = request(
        "01JOB429",
        jsonl(dir.path(), "t.jsonl", 12),
        None,
        "gpt-4o-mini",
    );

    sim.inject_rate_limit(1, 7);
    let err = provider.submit(&req).await.unwrap_err();
    assert_eq!(err, ProviderError::RateLimited(Duration::from_secs(7)));
    assert!(err.is_transient());

    let submitted = provider.submit(&req).await.unwrap();
    sim.inject_rate_limit(1, 3);
    let err = provider.poll(&submitted.provider_job_id).await.unwrap_err();
    assert_eq!(err, ProviderError::RateLimited(Duration::from_secs(3)));
    assert_eq!(sim.rate_limited_count(), 2);
    // The limit is over: the next poll answers.
    provider.poll(&submitted.provider_job_id).await.unwrap();
    sim.shutdown().await;
}

/// A planned answer: its status, headers and JSON body.
type Answer = (StatusCode, &'static [(&'static str, &'static str)], Value);

/// A stand-in for OpenAI's Files and fine-tuning jobs endpoints that answers job lookups with
/// `list` and job creations with `creates` in turn (then success), and counts the calls: the
/// simulated upstream's "next n requests" injection can't single out one endpoint.
#[derive(Clone)]
struct ScriptedOpenAi {
    list: StatusCode,
    creates: Arc<std::sync::Mutex<Vec<Answer>>>,
    uploads: Arc<AtomicUsize>,
    created: Arc<AtomicUsize>,
}

impl ScriptedOpenAi {
    fn new(list: StatusCode, creates: Vec<Answer>) -> Self {
        Self {
            list,
            creates: Arc::new(std::sync::Mutex::new(creates)),
            uploads: Arc::default(),
            created: Arc::default(),
        }
    }

    /// Serves it; returns a provider pointed at it, and the server's task.
    async fn start(&self) -> (OpenAiProvider, tokio::task::JoinHandle<()>) {
        async fn list(State(fake): State<ScriptedOpenAi>) -> Response {
            if fake.list != StatusCode::OK {
                let body = json!({"error": {"message": "not now", "type": "server_error", "param": null, "code": null}});
                return (fake.list, Json(body)).into_response();
            }
            Json(json!({"object": "list", "data": [], "has_more": false})).into_response()
        }
        // The body is read whole, as a real server does: answering before the upload is sent
        // makes the client's write fail with a broken pipe.
        async fn upload(
            State(fake): State<ScriptedOpenAi>,
            _file: axum::body::Bytes,
        ) -> Json<Value> {
            let n = fake.uploads.fetch_add(1, Ordering::SeqCst);
            Json(json!({"id": format!("file-{n}"), "object": "file", "status": "processed"}))
        }
        async fn create(State(fake): State<ScriptedOpenAi>) -> Response {
            fake.created.fetch_add(1, Ordering::SeqCst);
            let planned = {
                let mut creates = fake.creates.lock().unwrap();
                (!creates.is_empty()).then(|| creates.remove(0))
            };
            match planned {
                Some((status, headers, body)) => {
                    let mut response = (status, Json(body)).into_response();
                    for (name, value) in headers {
                        response.headers_mut().insert(*name, value.parse().unwrap());
                    }
                    response
                }
                None => Json(json!({"id": "ftjob-1", "object": "fine_tuning.job", "status": "validating_files"}))
                    .into_response(),
            }
        }
        let app = Router::new()
            .route("/v1/files", post(upload))
            .route("/v1/fine_tuning/jobs", get(list).post(create))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let provider = OpenAiProvider::new(&OpenAiConfig {
            base_url: Some(base_url),
            api_key: Some(SecretString::new(API_KEY)),
            ..OpenAiConfig::default()
        })
        .unwrap();
        (provider, server)
    }
}

/// An OpenAI error body with `code`.
fn openai_error(message: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": code, "param": null, "code": code}})
}

#[tokio::test]
async fn openai_job_creation_waits_out_a_short_429_without_reuploading() {
    let fake = ScriptedOpenAi::new(
        StatusCode::OK,
        vec![(
            StatusCode::TOO_MANY_REQUESTS,
            &[("retry-after", "1")],
            openai_error("Rate limit reached", "rate_limit_exceeded"),
        )],
    );
    let (provider, server) = fake.start().await;
    let dir = tempfile::tempdir().unwrap();
    let submitted = provider
        .submit(&request(
            "01JOBCREATE429",
            jsonl(dir.path(), "t.jsonl", 12),
            None,
            "gpt-4o-mini",
        ))
        .await
        .unwrap();
    assert_eq!(submitted.provider_job_id, "ftjob-1");
    assert_eq!(fake.created.load(Ordering::SeqCst), 2);
    assert_eq!(
        fake.uploads.load(Ordering::SeqCst),
        1,
        "the file must not be uploaded twice"
    );
    server.abort();
}

#[tokio::test]
async fn a_submission_tried_again_after_its_create_failed_sends_no_file_twice() {
    // The create fails for good this time (a 500, which the distiller tries again later).
    let fake = ScriptedOpenAi::new(
        StatusCode::OK,
        vec![(
            StatusCode::INTERNAL_SERVER_ERROR,
            &[],
            openai_error("The server had an error", "server_error"),
        )],
    );
    let (provider, server) = fake.start().await;
    let dir = tempfile::tempdir().unwrap();
    let request = request(
        "01JOBRESUBMIT",
        jsonl(dir.path(), "t.jsonl", 12),
        Some(jsonl(dir.path(), "v.jsonl", 3)),
        "gpt-4o-mini",
    );
    let failed = provider.submit(&request).await.unwrap_err();
    assert!(failed.is_transient(), "{failed:?}");
    assert_eq!(fake.uploads.load(Ordering::SeqCst), 2);
    let submitted = provider.submit(&request).await.unwrap();
    assert_eq!(submitted.provider_job_id, "ftjob-1");
    assert_eq!(
        fake.uploads.load(Ordering::SeqCst),
        2,
        "the second attempt reuses both files"
    );
    server.abort();
}

#[tokio::test]
async fn an_exhausted_quota_is_not_waited_out_and_its_message_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    // OpenAI's `insufficient_quota`: its headers say to retry, as every 429's do; its code says
    // that no wait ends it.
    let sim = sim().await;
    sim.exhaust_quota(1);
    refused_for_good(&*sim_provider(&sim), "01JOBQUOTA", dir.path()).await;
    sim.shutdown().await;

    // Any 429 that says not to retry is not waited out either.
    let fake = ScriptedOpenAi::new(
        StatusCode::OK,
        vec![(
            StatusCode::TOO_MANY_REQUESTS,
            &[("x-should-retry", "false")][..],
            openai_error("You exceeded your current quota.", "rate_limit_exceeded"),
        )],
    );
    let (provider, server) = fake.start().await;
    refused_for_good(&provider, "01JOBNORETRY", dir.path()).await;
    server.abort();
}

/// Submits a job and checks that the provider's quota refusal ends it: its message is kept,
/// and it is not an error to wait out.
async fn refused_for_good(provider: &dyn TrainingProvider, job_id: &str, dir: &Path) {
    let train = jsonl(dir, &format!("{job_id}.jsonl"), 12);
    let err = provider
        .submit(&request(job_id, train, None, "gpt-4o-mini"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::Http { status: 429, message } if message.contains("exceeded your current quota")),
        "{err:?}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_failed_lookup_of_an_earlier_run_starts_no_second_one() {
    // A timeout from the lookup leaves it unknown whether a run exists.
    let fake = ScriptedOpenAi::new(StatusCode::REQUEST_TIMEOUT, vec![]);
    let (provider, server) = fake.start().await;
    let dir = tempfile::tempdir().unwrap();
    let err = provider
        .submit(&request(
            "01JOBLOOKUP",
            jsonl(dir.path(), "t.jsonl", 12),
            None,
            "gpt-4o-mini",
        ))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "tried again later: {err:?}");
    assert_eq!(fake.uploads.load(Ordering::SeqCst), 0);
    assert_eq!(fake.created.load(Ordering::SeqCst), 0);
    server.abort();
}

#[tokio::test]
async fn an_unreachable_provider_is_an_error_known_never_to_have_been_sent() {
    // A port nothing listens on: bound, then released.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let provider = OpenAiProvider::sim(&OpenAiConfig {
        base_url: Some(format!("http://127.0.0.1:{port}/v1")),
        api_key: Some(SecretString::new(API_KEY)),
        ..OpenAiConfig::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let req = request(
        "01JOBDOWN",
        jsonl(dir.path(), "t.jsonl", 12),
        None,
        "gpt-4o-mini",
    );
    // The connection is refused: nothing was sent, so a create cannot have been made, and may
    // be tried again without looking for it first.
    let err = provider.submit(&req).await.unwrap_err();
    assert!(matches!(err, ProviderError::NotSent(_)), "{err:?}");
    assert!(err.is_transient());
    let err = provider.poll("ftjob-x").await.unwrap_err();
    assert!(matches!(err, ProviderError::NotSent(_)), "{err:?}");
}

#[tokio::test]
async fn wrong_key_and_missing_file_are_not_transient() {
    let sim = sim().await;
    let provider = OpenAiProvider::sim(&OpenAiConfig {
        base_url: Some(sim.base_url()),
        api_key: Some(SecretString::new("sk-wrong")),
        ..OpenAiConfig::default()
    })
    .unwrap();
    let err = provider.poll("ftjob-x").await.unwrap_err();
    let ProviderError::Http { status, message } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*status, 401);
    assert!(!message.is_empty() && !message.contains('{'), "{message}");
    assert!(!err.is_transient());
    assert!(!format!("{provider:?}").contains("sk-wrong"));

    let right = sim_provider(&sim);
    let err = right.poll("ftjob-doesnotexist").await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Http { status: 404, .. }),
        "{err:?}"
    );
    let req = request(
        "01JOBNOFILE",
        PathBuf::from("/nonexistent/train.jsonl"),
        None,
        "gpt-4o-mini",
    );
    let err = right.submit(&req).await.unwrap_err();
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    sim.shutdown().await;
}

// ---- Azure ----------------------------------------------------------------------------

fn azure(sim: &SimHandle, token: &str) -> AzureProvider {
    AzureProvider::new(&AzureConfig {
        endpoint: sim.root_url(),
        api_key: Some(SecretString::new(API_KEY)),
        deployment: AzureDeploymentConfig {
            management_url: Some(sim.root_url()),
            subscription_id: "00000000-0000-0000-0000-000000000000".into(),
            resource_group: "forge-rg".into(),
            account: "forge-aoai".into(),
            token: Some(SecretString::new(token)),
            ..AzureDeploymentConfig::default()
        },
        ..AzureConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn azure_waits_for_processed_files_trains_and_deploys() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let provider = azure(&sim, ARM_TOKEN);
    assert_eq!(provider.name(), "azure");
    let req = request(
        "01JOBAZURE",
        jsonl(dir.path(), "t.jsonl", 12),
        Some(jsonl(dir.path(), "v.jsonl", 3)),
        "gpt-4o-mini-2024-07-18",
    );
    let submitted = provider.submit(&req).await.unwrap();

    // The upload used `api-key` and `api-version`, and the file was polled until processed
    // before the job was created (a job on a pending file fails).
    let requests = sim.requests();
    let upload = requests
        .iter()
        .find(|r| r.method == "POST" && r.path.starts_with("/openai/files"))
        .unwrap();
    assert_eq!(upload.header("api-key"), Some(API_KEY));
    assert_eq!(upload.header("authorization"), None);
    assert!(
        upload
            .path
            .contains(&format!("api-version={AZURE_API_VERSION}")),
        "{}",
        upload.path
    );
    let file_polls = requests
        .iter()
        .filter(|r| r.method == "GET" && r.path.starts_with("/openai/files/"))
        .count();
    assert!(file_polls >= 1, "the file's status was never read");

    let progress = until_final(&provider, &submitted.provider_job_id).await;
    let ProviderState::Succeeded { model } = &progress.state else {
        panic!("{progress:?}");
    };
    assert!(model.contains(".ft-"), "{model}");
    assert!(
        progress.metrics.contains_key("train_loss"),
        "{:?}",
        progress.metrics
    );

    let deployed = provider.deploy("01JOBAZURE", model).await.unwrap();
    assert_eq!(deployed.upstream, "azure");
    assert_eq!(deployed.model, "forge-01jobazure");
    let put = sim
        .requests()
        .into_iter()
        .find(|r| r.method == "PUT")
        .unwrap();
    assert_eq!(
        put.header("authorization"),
        Some(format!("Bearer {ARM_TOKEN}").as_str())
    );
    assert!(
        put.path
            .contains("/deployments/forge-01jobazure?api-version="),
        "{}",
        put.path
    );
    assert_eq!(
        put.json().unwrap()["properties"]["model"]["name"],
        model.as_str()
    );

    // Inference picks the model by deployment name.
    let chat = || async {
        reqwest::Client::new()
            .post(format!(
                "{}/openai/deployments/{}/chat/completions?api-version={AZURE_API_VERSION}",
                sim.root_url(),
                deployed.model
            ))
            .header("api-key", API_KEY)
            .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
    };
    let answered = chat().await;
    assert_eq!(answered.status(), StatusCode::OK);
    let answer: Value = answered.json().await.unwrap();
    assert_eq!(answer["model"], model.as_str());

    // Undeployed (an ARM DELETE with the Entra token), it serves no more; a second undeploy
    // finds it gone, which is success.
    provider.undeploy(&deployed.model).await.unwrap();
    let delete = sim
        .requests()
        .into_iter()
        .find(|r| r.method == "DELETE" && r.path.contains("/deployments/"))
        .unwrap();
    assert_eq!(
        delete.header("authorization"),
        Some(format!("Bearer {ARM_TOKEN}").as_str())
    );
    assert!(
        delete
            .path
            .contains("/deployments/forge-01jobazure?api-version="),
        "{}",
        delete.path
    );
    assert_eq!(chat().await.status(), StatusCode::NOT_FOUND);
    provider.undeploy(&deployed.model).await.unwrap();
    sim.shutdown().await;
}

#[tokio::test]
async fn azure_deploy_is_idempotent_and_reports_429_and_bad_tokens() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let provider = azure(&sim, ARM_TOKEN);
    let submitted = provider
        .submit(&request(
            "01JOBAZ2",
            jsonl(dir.path(), "t.jsonl", 12),
            None,
            "gpt-4o-mini-2024-07-18",
        ))
        .await
        .unwrap();
    let ProviderState::Succeeded { model } = until_final(&provider, &submitted.provider_job_id)
        .await
        .state
    else {
        panic!("the job did not succeed");
    };

    let wrong = azure(&sim, "not-the-token");
    let err = wrong.deploy("01JOBAZ2", &model).await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Http { status: 401, .. }),
        "{err:?}"
    );

    sim.inject_rate_limit(1, 2);
    let err = provider.deploy("01JOBAZ2", &model).await.unwrap_err();
    assert_eq!(err, ProviderError::RateLimited(Duration::from_secs(2)));
    let first = provider.deploy("01JOBAZ2", &model).await.unwrap();
    let again = provider.deploy("01JOBAZ2", &model).await.unwrap();
    assert_eq!(first, again);
    sim.shutdown().await;
}

// ---- Kubernetes + vLLM ----------------------------------------------------------------

/// Forge's dataset endpoint, as the trainer sees it: the JSONL behind a bearer token.
async fn dataset_server(body: String) -> (String, tokio::task::JoinHandle<()>) {
    async fn serve(State(body): State<String>, headers: HeaderMap) -> Result<String, StatusCode> {
        let expected = format!("Bearer {DATASET_TOKEN}");
        match headers.get("authorization").and_then(|v| v.to_str().ok()) {
            Some(value) if value == expected => Ok(body),
            _ => Err(StatusCode::UNAUTHORIZED),
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/admin/datasets/ds-1.jsonl",
        listener.local_addr().unwrap()
    );
    let app = Router::new()
        .route("/admin/datasets/ds-1.jsonl", get(serve))
        .with_state(body);
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, task)
}

fn kubernetes(sim: &SimHandle, env: &[(&str, &str)]) -> KubernetesProvider {
    KubernetesProvider::new(&KubernetesConfig {
        api_server: Some(sim.root_url()),
        namespace: Some("forge".into()),
        token: Some(SecretString::new(CLUSTER_TOKEN)),
        image: "ghcr.io/example/peft-trainer:1".into(),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        memory_limit: Some("64Gi".into()),
        adapter_pvc: Some("forge-adapters".into()),
        vllm_url: sim.base_url(),
        // The simulated upstream's key guards its vLLM endpoints too, like `vllm --api-key`.
        vllm_api_key: Some(SecretString::new(API_KEY)),
        ..KubernetesConfig::default()
    })
    .unwrap()
}

fn k8s_request(job_id: &str, dataset_url: &str, token: &str) -> TrainingRequest {
    TrainingRequest {
        dataset_url: Some((dataset_url.to_owned(), token.to_owned())),
        ..request(
            job_id,
            PathBuf::from("/unused.jsonl"),
            None,
            "meta-llama/Llama-3.1-8B-Instruct",
        )
    }
}

#[tokio::test]
async fn kubernetes_trains_from_the_dataset_url_and_vllm_serves_the_adapter() {
    let sim = sim().await;
    let dataset: String = (0..12).map(|i| line(i) + "\n").collect();
    let (dataset_url, server) = dataset_server(dataset).await;
    let provider = kubernetes(&sim, &[]);
    assert_eq!(provider.name(), "kubernetes");
    let req = k8s_request("01JZ8X3Q4M5N6P7R8S9T7K2M9QXA", &dataset_url, DATASET_TOKEN);
    // Looking, before any submission, finds nothing and creates nothing.
    assert_eq!(
        provider.earlier_submission(&req.job_id).await.unwrap(),
        None
    );

    let submitted = provider.submit(&req).await.unwrap();
    assert_eq!(
        provider.earlier_submission(&req.job_id).await.unwrap(),
        Some(submitted.provider_job_id.clone())
    );
    assert_eq!(
        submitted.provider_job_id,
        "forge-train-01jz8x3q4m5n6p7r8s9t7k2m9qxa"
    );
    assert_eq!(submitted.training_file_id, None);
    // A resubmission after a crash meets 409 AlreadyExists, which means "already created".
    let again = provider.submit(&req).await.unwrap();
    assert_eq!(again, submitted);

    let create = posts_to(&sim, "/apis/batch/v1/namespaces/forge/jobs")[0].clone();
    assert_eq!(
        create.header("authorization"),
        Some(format!("Bearer {CLUSTER_TOKEN}").as_str())
    );
    let manifest = create.json().unwrap();
    assert_eq!(manifest["metadata"]["labels"]["app"], "forge-train");
    assert_eq!(manifest["spec"]["backoffLimit"], 0);
    assert_eq!(
        manifest["spec"]["template"]["spec"]["restartPolicy"],
        "Never"
    );
    let container = &manifest["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert_eq!(container["resources"]["limits"]["memory"], "64Gi");
    assert_eq!(container["volumeMounts"][0]["mountPath"], "/adapters");

    let progress = until_final(&provider, &submitted.provider_job_id).await;
    let ProviderState::Succeeded { model: adapter } = &progress.state else {
        panic!("{progress:?}");
    };
    assert_eq!(progress.provider_status, "Complete");
    assert_eq!(adapter, "/adapters/llama-3-1-8b-instruct-forge-7k2m9qxa");

    // The trainer really fetched the dataset with the token.
    let fetches = sim.k8s_fetches();
    assert_eq!(fetches.len(), 1, "{fetches:?}");
    assert_eq!(fetches[0].url, dataset_url);
    assert_eq!(fetches[0].token.as_deref(), Some(DATASET_TOKEN));
    assert_eq!(fetches[0].status, Some(200));
    assert_eq!(fetches[0].outcome, Ok(12));

    let deployed = provider.deploy(&req.job_id, adapter).await.unwrap();
    assert_eq!(deployed.upstream, "vllm");
    assert_eq!(deployed.model, "llama-3-1-8b-instruct-forge-7k2m9qxa");
    let load = posts_to(&sim, "/v1/load_lora_adapter")[0].json().unwrap();
    assert_eq!(
        load,
        json!({"lora_name": deployed.model, "lora_path": adapter})
    );
    // Loading again is "already been loaded", which is success.
    assert_eq!(
        provider.deploy(&req.job_id, adapter).await.unwrap(),
        deployed
    );

    // The adapter is listed and answers chat under its versioned name.
    let http = reqwest::Client::new();
    let models = get_json(&sim, "models").await;
    let listed = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == deployed.model.as_str())
        .cloned();
    assert_eq!(
        listed.as_ref().map(|m| m["root"].clone()),
        Some(json!(adapter)),
        "{models}"
    );
    let chat = http
        .post(format!("{}/chat/completions", sim.base_url()))
        .bearer_auth(API_KEY)
        .json(&json!({"model": deployed.model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), StatusCode::OK);
    let answer: Value = chat.json().await.unwrap();
    assert_eq!(answer["model"], deployed.model.as_str());

    // Undeployed, the adapter is unloaded from vLLM; a second unload finds it gone (404), which
    // is success.
    provider.undeploy(&deployed.model).await.unwrap();
    let unload = posts_to(&sim, "/v1/unload_lora_adapter")[0].json().unwrap();
    assert_eq!(unload, json!({"lora_name": deployed.model}));
    let models = get_json(&sim, "models").await;
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["id"] != deployed.model.as_str()),
        "{models}"
    );
    provider.undeploy(&deployed.model).await.unwrap();
    assert_eq!(posts_to(&sim, "/v1/unload_lora_adapter").len(), 2);

    server.abort();
    sim.shutdown().await;
}

#[tokio::test]
async fn kubernetes_backoff_limit_exceeded_is_a_failure() {
    let sim = sim().await;
    let dataset: String = (0..12).map(|i| line(i) + "\n").collect();
    let (dataset_url, server) = dataset_server(dataset).await;

    // The trainer fails at the end of its run.
    let failing = kubernetes(&sim, &[("FORGE_SIM_FAIL", "1")]);
    let submitted = failing
        .submit(&k8s_request("01JOBKFAIL", &dataset_url, DATASET_TOKEN))
        .await
        .unwrap();
    let progress = until_final(&failing, &submitted.provider_job_id).await;
    let ProviderState::Failed { error } = &progress.state else {
        panic!("{progress:?}");
    };
    assert!(error.starts_with("BackoffLimitExceeded"), "{error}");
    assert_eq!(progress.provider_status, "Failed");

    // The trainer is refused by the dataset endpoint.
    let provider = kubernetes(&sim, &[]);
    let submitted = provider
        .submit(&k8s_request("01JOBKTOKEN", &dataset_url, "wrong-token"))
        .await
        .unwrap();
    let progress = until_final(&provider, &submitted.provider_job_id).await;
    let ProviderState::Failed { error } = &progress.state else {
        panic!("{progress:?}");
    };
    assert!(
        error.starts_with("BackoffLimitExceeded") && error.contains("401"),
        "{error}"
    );

    server.abort();
    sim.shutdown().await;
}

#[tokio::test]
async fn kubernetes_interim_conditions_are_running_not_final() {
    // Long enough to be seen: the Job shows only its interim condition for two seconds.
    let mut config = sim_config();
    config.cluster.finishing = Duration::from_secs(2);
    let sim = start(config).await;
    let dataset: String = (0..12).map(|i| line(i) + "\n").collect();
    let (dataset_url, server) = dataset_server(dataset).await;
    for (env, job_id, interim, terminal) in [
        (&[][..], "01JOBKINTERIMOK", "SuccessCriteriaMet", "Complete"),
        (
            &[("FORGE_SIM_FAIL", "1")][..],
            "01JOBKINTERIMFAIL",
            "FailureTarget",
            "Failed",
        ),
    ] {
        let provider = kubernetes(&sim, env);
        let submitted = provider
            .submit(&k8s_request(job_id, &dataset_url, DATASET_TOKEN))
            .await
            .unwrap();
        let deadline = Instant::now() + DEADLINE;
        let seen = loop {
            assert!(Instant::now() < deadline, "{interim} never seen");
            let progress = provider.poll(&submitted.provider_job_id).await.unwrap();
            if progress.provider_status == interim {
                break progress;
            }
            assert!(
                matches!(
                    progress.state,
                    ProviderState::Queued | ProviderState::Running
                ),
                "final before {interim}: {progress:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        assert_eq!(seen.state, ProviderState::Running, "{seen:?}");
        let done = until_final(&provider, &submitted.provider_job_id).await;
        assert_eq!(done.provider_status, terminal, "{done:?}");
    }
    server.abort();
    sim.shutdown().await;
}

#[tokio::test]
async fn kubernetes_refusals_map_to_provider_errors() {
    let sim = sim().await;
    let provider = kubernetes(&sim, &[]);
    // No dataset URL: nothing for the trainer to download.
    let err = provider
        .submit(&request(
            "01JOBNOURL",
            PathBuf::from("/unused.jsonl"),
            None,
            "m",
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");

    // A Job Forge did not delete is missing for a reason it does not know (a TTL, a changed
    // namespace, a hand): ended, with the 404's reason, not "cancelled".
    let err = provider.poll("forge-train-missing").await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Ended(why) if why.contains("is gone")),
        "{err:?}"
    );

    sim.inject_rate_limit(1, 4);
    let err = provider.poll("forge-train-missing").await.unwrap_err();
    assert_eq!(err, ProviderError::RateLimited(Duration::from_secs(4)));

    let bad_token = KubernetesProvider::new(&KubernetesConfig {
        api_server: Some(sim.root_url()),
        namespace: Some("forge".into()),
        token: Some(SecretString::new("expired")),
        image: "trainer".into(),
        vllm_url: sim.base_url(),
        ..KubernetesConfig::default()
    })
    .unwrap();
    let err = bad_token.poll("forge-train-x").await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Http { status: 401, .. }),
        "{err:?}"
    );

    // vLLM can't load an adapter that isn't on its disk.
    let err = provider
        .deploy("01JOBNOADAPTER", "/adapters/nothing-here")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProviderError::Http { status: 404, .. }),
        "{err:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn kubernetes_token_file_is_reread_on_every_call() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "stale\n").unwrap();
    let provider = KubernetesProvider::new(&KubernetesConfig {
        api_server: Some(sim.root_url()),
        namespace: Some("forge".into()),
        token_file: Some(token_file.clone()),
        image: "trainer".into(),
        vllm_url: sim.base_url(),
        ..KubernetesConfig::default()
    })
    .unwrap();
    let err = provider.poll("forge-train-x").await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Http { status: 401, .. }),
        "{err:?}"
    );
    // The kubelet rotates the token in place.
    std::fs::write(&token_file, format!("{CLUSTER_TOKEN}\n")).unwrap();
    let err = provider.poll("forge-train-x").await.unwrap_err();
    assert!(matches!(err, ProviderError::Ended(_)), "{err:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn kubernetes_cancel_deletes_the_job_with_its_pod_and_the_run_reads_cancelled() {
    let sim = slow_sim().await;
    let dataset: String = (0..12).map(|i| line(i) + "\n").collect();
    let (dataset_url, server) = dataset_server(dataset).await;
    let provider = kubernetes(&sim, &[]);
    let submitted = provider
        .submit(&k8s_request("01JOBKCANCEL", &dataset_url, DATASET_TOKEN))
        .await
        .unwrap();
    let name = submitted.provider_job_id;
    let before = provider.poll(&name).await.unwrap();
    assert!(
        matches!(before.state, ProviderState::Queued | ProviderState::Running),
        "{before:?}"
    );

    provider.cancel(&name).await.unwrap();
    let after = provider.poll(&name).await.unwrap();
    assert_eq!(
        (after.state, after.provider_status.as_str()),
        (ProviderState::Cancelled, "Deleted")
    );
    // Deleted with its pod, not orphaning it; a second cancel finds nothing and is fine.
    let deletes: Vec<String> = sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    assert_eq!(
        deletes,
        [format!(
            "/apis/batch/v1/namespaces/forge/jobs/{name}?propagationPolicy=Background"
        )]
    );
    provider.cancel(&name).await.unwrap();

    server.abort();
    sim.shutdown().await;

    // A Job that has finished is left alone: its adapter is what its Forge job deploys next.
    let sim = self::sim().await;
    let dataset: String = (0..12).map(|i| line(i) + "\n").collect();
    let (dataset_url, server) = dataset_server(dataset).await;
    let provider = kubernetes(&sim, &[]);
    let done = provider
        .submit(&k8s_request("01JOBKDONE", &dataset_url, DATASET_TOKEN))
        .await
        .unwrap()
        .provider_job_id;
    let finished = until_final(&provider, &done).await;
    assert!(
        matches!(finished.state, ProviderState::Succeeded { .. }),
        "{finished:?}"
    );
    let refused = provider.cancel(&done).await.unwrap_err();
    // Ended, not a conflict to retry: a deadline's cancel of a run that just finished goes
    // straight on to read its model.
    assert!(matches!(refused, ProviderError::Ended(_)), "{refused:?}");
    assert!(!refused.is_transient());
    assert_eq!(provider.poll(&done).await.unwrap().state, finished.state);
    assert!(sim.requests().iter().all(|r| r.method != "DELETE"));
    server.abort();
    sim.shutdown().await;
}

#[tokio::test]
async fn openai_and_azure_cancel_the_job_and_the_run_reads_cancelled() {
    let sim = slow_sim().await;
    let dir = tempfile::tempdir().unwrap();
    let train = jsonl(dir.path(), "train.jsonl", 12);
    let providers: [Box<dyn TrainingProvider>; 2] =
        [sim_provider(&sim), Box::new(azure(&sim, ARM_TOKEN))];
    for provider in providers {
        let submitted = provider
            .submit(&request("01JOBCANCEL", train.clone(), None, "gpt-4o-mini"))
            .await
            .unwrap();
        provider.cancel(&submitted.provider_job_id).await.unwrap();
        let progress = until_final(provider.as_ref(), &submitted.provider_job_id).await;
        assert_eq!(
            progress.state,
            ProviderState::Cancelled,
            "{}",
            provider.name()
        );
        // A run that has ended cannot be cancelled: the provider's refusal comes back as it is.
        let again = provider
            .cancel(&submitted.provider_job_id)
            .await
            .unwrap_err();
        assert!(
            matches!(again, ProviderError::Http { status: 400, .. }),
            "{}: {again:?}",
            provider.name()
        );
    }
    sim.shutdown().await;
}
