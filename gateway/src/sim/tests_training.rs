//! End-to-end tests of the training fakes over loopback: injected 429s and training failures, Azure OpenAI with ARM, vLLM LoRA, and Kubernetes Jobs.

use std::time::Duration;

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use super::tests::{
    DEADLINE, body_text, chat, client, create_job, get_json, post_json, question, start,
    tiny_timings, training_file, upload_ok, wait_for_final,
};
use super::*;

const API_VERSION: &str = "2024-10-21";
const AZURE_KEY: &str = "azure-test-key";
const ARM_PATH: &str = "/subscriptions/sub-1/resourceGroups/rg-1/providers/\
                        Microsoft.CognitiveServices/accounts/acct-1/deployments";

/// Tiny timings everywhere, and Azure files that are processed almost at once.
fn fast() -> SimConfig {
    SimConfig {
        azure: AzureTimings {
            file_processing: Duration::from_millis(20),
            deployment: Duration::from_millis(20),
        },
        cluster: ClusterTimings {
            pending: Duration::from_millis(20),
            running: Duration::from_millis(50),
            finishing: Duration::from_millis(20),
        },
        ..tiny_timings()
    }
}

/// Polls `read` every 10 ms until `done` holds, failing after [`DEADLINE`].
async fn poll<F, Fut>(mut read: F, done: impl Fn(&Value) -> bool) -> Value
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Value>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let value = read().await;
        if done(&value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held: {value}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn timestamps_are_rfc3339_utc() {
    use std::time::{Duration, UNIX_EPOCH};
    let at = |secs| reply::rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
    assert_eq!(at(0), "1970-01-01T00:00:00Z");
    assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(at(4_102_444_799), "2099-12-31T23:59:59Z");
}

// ---- Rate limits and training failures ----

#[tokio::test]
async fn an_exhausted_quota_refuses_openai_training_calls_until_it_is_used_up() {
    let sim = start(SimConfig::default()).await;
    sim.exhaust_quota(1);
    // Chat is not a training API.
    chat(
        &sim,
        &json!({"model": "gpt-4o", "messages": question("Hello?")}),
    )
    .await;
    let (status, error) = get_json(&sim, "/files").await;
    assert_eq!(status, 429);
    assert_eq!(error["error"]["code"], "insufficient_quota");
    assert_eq!(error["error"]["type"], "insufficient_quota");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("You exceeded your current quota")
    );
    let (status, _) = get_json(&sim, "/files").await;
    assert_eq!(status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn injected_rate_limits_answer_429_in_each_services_shape() {
    let sim = start(SimConfig::default()).await;
    let root = sim.root_url();
    sim.inject_rate_limit(4, 7);

    // Chat and vLLM are not training APIs: not refused, not counted.
    chat(
        &sim,
        &json!({"model": "gpt-4o", "messages": question("Hello?")}),
    )
    .await;
    assert_eq!(sim.rate_limited_count(), 0);

    let openai = client()
        .get(format!("{}/files", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(openai.status(), 429);
    assert_eq!(openai.headers()["retry-after"], "7");
    assert_eq!(openai.headers()["x-should-retry"], "true");
    let error: Value = openai.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(error["error"]["type"], "requests");
    assert!(error["error"].as_object().unwrap().contains_key("param"));

    let azure = client()
        .get(format!(
            "{root}/openai/fine_tuning/jobs?api-version={API_VERSION}"
        ))
        .header("api-key", AZURE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(azure.status(), 429);
    assert_eq!(azure.headers()["retry-after"], "7");
    assert_eq!(azure.headers()["x-should-retry"], "true");
    assert_eq!(azure.json::<Value>().await.unwrap()["error"]["code"], "429");

    let arm = client()
        .get(format!("{root}{ARM_PATH}/d1?api-version={API_VERSION}"))
        .bearer_auth("entra")
        .send()
        .await
        .unwrap();
    assert_eq!(arm.status(), 429);
    assert_eq!(arm.headers()["retry-after"], "7");
    assert_eq!(
        arm.json::<Value>().await.unwrap()["error"]["code"],
        "TooManyRequests"
    );

    let cluster = client()
        .get(format!("{root}/apis/batch/v1/namespaces/ml/jobs/x"))
        .bearer_auth("sa")
        .send()
        .await
        .unwrap();
    assert_eq!(cluster.status(), 429);
    assert_eq!(cluster.headers()["retry-after"], "7");
    let status: Value = cluster.json().await.unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "TooManyRequests");
    assert_eq!(status["code"], 429);
    assert_eq!(status["details"]["retryAfterSeconds"], 7);
    assert_eq!(sim.rate_limited_count(), 4);

    // Used up: the next request goes through.
    let (status, _) = get_json(&sim, "/files").await;
    assert_eq!(status, 200);
    assert_eq!(sim.rate_limited_count(), 4);

    // A request refused for its credentials does not use up an injected 429.
    sim.inject_rate_limit(1, 2);
    let unauthenticated = client()
        .get(format!("{root}/openai/files/x?api-version={API_VERSION}"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let (status, _) = get_json(&sim, "/fine_tuning/jobs").await;
    assert_eq!(status, 429);
    assert_eq!(sim.rate_limited_count(), 5);
    sim.shutdown().await;
}

#[tokio::test]
async fn jobs_fail_in_training_by_suffix_or_when_told() {
    let sim = start(tiny_timings()).await;
    let file = upload_ok(&sim, "train.jsonl", "fine-tune", training_file(12)).await;
    let file_id = file["id"].as_str().unwrap();

    let by_suffix = create_job(
        &sim,
        &json!({"model": "gpt-4o-mini", "training_file": file_id, "suffix": "run7-fail-training"}),
    )
    .await;
    let failed = wait_for_final(&sim, by_suffix["id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "training_failed");
    assert_eq!(failed["error"]["param"], Value::Null);
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("step")
    );
    assert_eq!(failed["fine_tuned_model"], Value::Null);
    assert!(failed["finished_at"].is_u64());
    let (_, events) = get_json(
        &sim,
        &format!(
            "/fine_tuning/jobs/{}/events",
            by_suffix["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(events["data"][0]["level"], "error");
    // It got as far as running: some steps were reported before it failed.
    assert!(
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|event| event["type"] == "metrics"),
        "{events}"
    );

    sim.fail_next_fine_tuning_jobs(1);
    let told = create_job(
        &sim,
        &json!({"model": "gpt-4o-mini", "training_file": file_id}),
    )
    .await;
    let next = create_job(
        &sim,
        &json!({"model": "gpt-4o-mini", "training_file": file_id}),
    )
    .await;
    let told = wait_for_final(&sim, told["id"].as_str().unwrap()).await;
    assert_eq!(told["status"], "failed");
    assert_eq!(told["error"]["code"], "training_failed");
    let next = wait_for_final(&sim, next["id"].as_str().unwrap()).await;
    assert_eq!(next["status"], "succeeded", "{next}");
    sim.shutdown().await;
}

// ---- Azure OpenAI and ARM ----

fn azure(sim: &SimHandle, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    let separator = if path.contains('?') { '&' } else { '?' };
    client()
        .request(
            method,
            format!(
                "{}{path}{separator}api-version={API_VERSION}",
                sim.root_url()
            ),
        )
        .header("api-key", AZURE_KEY)
}

async fn azure_json(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// A file as Azure wants it: UTF-8 with a byte order mark.
fn with_bom(content: Vec<u8>) -> Vec<u8> {
    [b"\xEF\xBB\xBF".as_slice(), &content].concat()
}

async fn azure_upload(sim: &SimHandle, content: Vec<u8>) -> reqwest::Response {
    let form = Form::new()
        .text("purpose", "fine-tune")
        .part("file", Part::bytes(content).file_name("train.jsonl"));
    azure(sim, reqwest::Method::POST, "/openai/files")
        .multipart(form)
        .send()
        .await
        .unwrap()
}

fn arm(sim: &SimHandle, method: reqwest::Method, name: &str) -> reqwest::RequestBuilder {
    client()
        .request(
            method,
            format!(
                "{}{ARM_PATH}/{name}?api-version={API_VERSION}",
                sim.root_url()
            ),
        )
        .bearer_auth("entra-token")
}

/// Deployment `name` once provisioned.
async fn provisioned(sim: &SimHandle, name: &str) -> Value {
    poll(
        || async {
            arm(sim, reqwest::Method::GET, name)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        },
        |deployment| deployment["properties"]["provisioningState"] == "Succeeded",
    )
    .await
}

fn deployment_body(model: &str) -> Value {
    json!({"sku": {"name": "standard", "capacity": 1},
           "properties": {"model": {"format": "OpenAI", "name": model, "version": "1"}}})
}

/// Uploads a good file, waits until it is processed, trains on it, and returns the model.
async fn azure_fine_tuned_model(sim: &SimHandle) -> String {
    let done = azure_job_on(sim, with_bom(training_file(12))).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    done["fine_tuned_model"].as_str().unwrap().to_owned()
}

/// Uploads `content`, waits until it is processed, starts a job on it, and returns the job
/// once it has succeeded or failed.
async fn azure_job_on(sim: &SimHandle, content: Vec<u8>) -> Value {
    let file: Value = azure_upload(sim, content).await.json().await.unwrap();
    let id = file["id"].as_str().unwrap().to_owned();
    poll(
        || async {
            azure_json(azure(
                sim,
                reqwest::Method::GET,
                &format!("/openai/files/{id}"),
            ))
            .await
            .1
        },
        |file| file["status"] == "processed",
    )
    .await;
    let (status, job) = azure_json(
        azure(sim, reqwest::Method::POST, "/openai/fine_tuning/jobs")
            .json(&json!({"model": "gpt-4o-mini-2024-07-18", "training_file": id, "suffix": "s"})),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();
    poll(
        || async {
            azure_json(azure(
                sim,
                reqwest::Method::GET,
                &format!("/openai/fine_tuning/jobs/{job_id}"),
            ))
            .await
            .1
        },
        |job| matches!(job["status"].as_str(), Some("succeeded" | "failed")),
    )
    .await
}

#[tokio::test]
async fn azure_fails_a_job_on_a_file_without_a_byte_order_mark() {
    let sim = start(SimConfig {
        api_key: Some(AZURE_KEY.into()),
        ..fast()
    })
    .await;
    let done = azure_job_on(&sim, training_file(12)).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "invalid_training_file");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("byte order mark"),
        "{done}"
    );
    sim.shutdown().await;
}

fn is_azure_model_name(model: &str) -> bool {
    let Some(hex) = model.strip_prefix("gpt-4o-mini-2024-07-18.ft-") else {
        return false;
    };
    hex.len() == 32
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[tokio::test]
async fn azure_files_are_pending_then_processed_and_jobs_name_models_the_azure_way() {
    let sim = start(SimConfig {
        api_key: Some(AZURE_KEY.into()),
        ..fast()
    })
    .await;
    let content = with_bom(training_file(12));
    let response = azure_upload(&sim, content.clone()).await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let file: Value = response.json().await.unwrap();
    let id = file["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("file-"));
    assert_eq!(file["status"], "pending");
    assert_eq!(file["purpose"], "fine-tune");
    assert_eq!(file["bytes"], content.len());
    assert!(
        location.ends_with(&format!("/openai/files/{id}?api-version={API_VERSION}")),
        "{location}"
    );
    let processed = poll(
        || async {
            azure_json(azure(
                &sim,
                reqwest::Method::GET,
                &format!("/openai/files/{id}"),
            ))
            .await
            .1
        },
        |file| file["status"] == "processed",
    )
    .await;
    assert_eq!(processed["id"], id.as_str());
    let raw = azure(
        &sim,
        reqwest::Method::GET,
        &format!("/openai/files/{id}/content"),
    )
    .send()
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
    assert_eq!(raw.as_ref(), content.as_slice());
    // Azure's files are not OpenAI's.
    let (status, _) = get_json(&sim, &format!("/files/{id}")).await;
    assert_eq!(status, 401, "OpenAI wants its bearer key");

    let model = azure_fine_tuned_model(&sim).await;
    assert!(is_azure_model_name(&model), "{model}");
    let (status, jobs) = azure_json(azure(
        &sim,
        reqwest::Method::GET,
        "/openai/fine_tuning/jobs",
    ))
    .await;
    assert_eq!(status, 200);
    let job_id = jobs["data"][0]["id"].as_str().unwrap().to_owned();
    assert!(job_id.starts_with("ftjob-"));
    let (status, events) = azure_json(azure(
        &sim,
        reqwest::Method::GET,
        &format!("/openai/fine_tuning/jobs/{job_id}/events"),
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(events["object"], "list");
    assert_eq!(
        events["data"][1]["message"],
        format!("New fine-tuned model created: {model}")
    );
    // The result file uses Azure's column names, not OpenAI's, and has its two more columns.
    let (_, job) = azure_json(azure(
        &sim,
        reqwest::Method::GET,
        &format!("/openai/fine_tuning/jobs/{job_id}"),
    ))
    .await;
    let result_id = job["result_files"][0].as_str().unwrap();
    let csv = body_text(azure(
        &sim,
        reqwest::Method::GET,
        &format!("/openai/files/{result_id}/content"),
    ))
    .await;
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "step,train_loss,train_mean_token_accuracy,valid_loss,validation_mean_token_accuracy,full_valid_loss,full_valid_mean_token_accuracy"
        )
    );
    let row: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(
        row,
        ["1", row[1], row[2], "", "", "", ""],
        "no validation file"
    );
    assert!(row[1].parse::<f64>().is_ok() && row[2].parse::<f64>().is_ok());
    // Azure's models are served through deployments, not in OpenAI's model list.
    let models = client()
        .get(format!("{}/models", sim.base_url()))
        .bearer_auth(AZURE_KEY)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert!(!models.to_string().contains(".ft-"), "{models}");
    sim.shutdown().await;
}

#[tokio::test]
async fn azure_fails_a_job_on_a_file_still_pending() {
    let sim = start(SimConfig {
        azure: AzureTimings {
            file_processing: Duration::from_secs(600),
            ..fast().azure
        },
        ..fast()
    })
    .await;
    let file: Value = azure_upload(&sim, training_file(12))
        .await
        .json()
        .await
        .unwrap();
    let id = file["id"].as_str().unwrap();
    assert_eq!(file["status"], "pending");
    let (status, job) = azure_json(
        azure(&sim, reqwest::Method::POST, "/openai/fine_tuning/jobs")
            .json(&json!({"model": "gpt-4o-mini-2024-07-18", "training_file": id})),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();
    let done = poll(
        || async {
            azure_json(azure(
                &sim,
                reqwest::Method::GET,
                &format!("/openai/fine_tuning/jobs/{job_id}"),
            ))
            .await
            .1
        },
        |job| job["status"] == "failed",
    )
    .await;
    assert_eq!(done["error"]["code"], "invalid_training_file");
    assert_eq!(done["error"]["param"], "training_file");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pending"),
        "{done}"
    );
    assert_eq!(done["fine_tuned_model"], Value::Null);
    sim.shutdown().await;
}

#[tokio::test]
async fn azure_wants_its_api_key_and_an_api_version() {
    let sim = start(SimConfig {
        api_key: Some(AZURE_KEY.into()),
        ..fast()
    })
    .await;
    let url = format!(
        "{}/openai/fine_tuning/jobs?api-version={API_VERSION}",
        sim.root_url()
    );
    let missing = client().get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["code"], "401");
    // The OpenAI way of sending a key is not Azure's.
    let bearer = client()
        .get(&url)
        .bearer_auth(AZURE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 401);
    let wrong = client()
        .get(&url)
        .header("api-key", "other-key")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = client()
        .get(&url)
        .header("api-key", AZURE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    let unversioned = client()
        .get(format!("{}/openai/fine_tuning/jobs", sim.root_url()))
        .header("api-key", AZURE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(unversioned.status(), 400);
    let error: Value = unversioned.json().await.unwrap();
    assert_eq!(error["error"]["code"], "MissingApiVersionParameter");
    let (status, error) = azure_json(azure(&sim, reqwest::Method::GET, "/openai/nothing")).await;
    assert_eq!(status, 404);
    assert_eq!(error["error"]["message"], "Resource not found");
    sim.shutdown().await;
}

#[tokio::test]
async fn azure_without_a_configured_key_still_wants_one() {
    let sim = start(fast()).await;
    let url = format!(
        "{}/openai/files/x?api-version={API_VERSION}",
        sim.root_url()
    );
    let none = client().get(&url).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let any = client()
        .get(&url)
        .header("api-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(any.status(), 404, "any key passes; the file does not exist");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_deployment_answers_chat_only_once_provisioned() {
    let sim = start(SimConfig {
        azure: AzureTimings {
            file_processing: Duration::from_millis(20),
            // Long enough to see `Creating` right after the PUT.
            deployment: Duration::from_secs(2),
        },
        default_behavior: ModelBehavior {
            quality: Quality::Poor,
            ..ModelBehavior::default()
        },
        ..fast()
    })
    .await;
    let model = azure_fine_tuned_model(&sim).await;
    let chat_path = "/openai/deployments/student/chat/completions";
    let request = json!({"messages": question("Why do volcanoes erupt?")});

    let (status, error) =
        azure_json(azure(&sim, reqwest::Method::POST, chat_path).json(&request)).await;
    assert_eq!(status, 404);
    assert_eq!(error["error"]["code"], "DeploymentNotFound");

    let created = arm(&sim, reqwest::Method::PUT, "student")
        .json(&deployment_body(&model))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["properties"]["provisioningState"], "Creating");
    assert_eq!(created["name"], "student");
    assert_eq!(
        created["type"],
        "Microsoft.CognitiveServices/accounts/deployments"
    );
    assert_eq!(created["properties"]["model"]["name"], model.as_str());
    assert_eq!(created["sku"], json!({"name": "standard", "capacity": 1}));
    assert!(
        created["id"]
            .as_str()
            .unwrap()
            .ends_with("/accounts/acct-1/deployments/student")
    );
    let (status, error) =
        azure_json(azure(&sim, reqwest::Method::POST, chat_path).json(&request)).await;
    assert_eq!(status, 404, "not before provisioning ends");
    assert_eq!(error["error"]["code"], "DeploymentNotFound");

    let ready = provisioned(&sim, "student").await;
    assert_eq!(ready["properties"]["model"]["name"], model.as_str());
    let (status, answer) =
        azure_json(azure(&sim, reqwest::Method::POST, chat_path).json(&request)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], model.as_str());
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        content.contains("volcanoes"),
        "a fine-tuned model answers well: {content}"
    );

    // A second PUT updates; the model keeps answering while it provisions.
    let updated = arm(&sim, reqwest::Method::PUT, "student")
        .json(&deployment_body(&model))
        .send()
        .await
        .unwrap();
    assert_eq!(updated.status(), 200);
    let updated: Value = updated.json().await.unwrap();
    assert_eq!(updated["properties"]["provisioningState"], "Updating");
    let (status, _) =
        azure_json(azure(&sim, reqwest::Method::POST, chat_path).json(&request)).await;
    assert_eq!(status, 200);

    let deleted = arm(&sim, reqwest::Method::DELETE, "student")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let again = arm(&sim, reqwest::Method::DELETE, "student")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 204);
    let gone = arm(&sim, reqwest::Method::GET, "student")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    assert_eq!(
        gone.json::<Value>().await.unwrap()["error"]["code"],
        "ResourceNotFound"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn arm_checks_its_token_version_and_model() {
    let sim = start(SimConfig {
        arm_token: Some("entra-token".into()),
        ..fast()
    })
    .await;
    let url = format!("{}{ARM_PATH}/d?api-version={API_VERSION}", sim.root_url());
    let body = deployment_body("gpt-4o-mini-2024-07-18.ft-00000000000000000000000000000000");
    let missing = client().put(&url).json(&body).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"]["code"],
        "AuthenticationFailed"
    );
    let wrong = client()
        .put(&url)
        .bearer_auth("other")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        wrong.json::<Value>().await.unwrap()["error"]["code"],
        "InvalidAuthenticationToken"
    );
    // The Azure api-key is not an Entra token.
    let api_key = client()
        .put(&url)
        .header("api-key", AZURE_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(api_key.status(), 401);
    let unversioned = client()
        .put(format!("{}{ARM_PATH}/d", sim.root_url()))
        .bearer_auth("entra-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(unversioned.status(), 400);
    assert_eq!(
        unversioned.json::<Value>().await.unwrap()["error"]["code"],
        "MissingApiVersionParameter"
    );
    // A model no job produced cannot be deployed.
    let unknown = arm(&sim, reqwest::Method::PUT, "d")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    assert_eq!(
        unknown.json::<Value>().await.unwrap()["error"]["code"],
        "InvalidResourceProperties"
    );
    let no_model = arm(&sim, reqwest::Method::PUT, "d")
        .json(&json!({"sku": {"name": "standard", "capacity": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_model.status(), 400);
    sim.shutdown().await;
}

// ---- vLLM LoRA ----

async fn lora(sim: &SimHandle, action: &str, body: &Value) -> (u16, String) {
    let response = client()
        .post(format!("{}/{action}_lora_adapter", sim.base_url()))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn lora_adapters_load_from_known_paths_and_serve_chat() {
    let sim = start(SimConfig {
        default_behavior: ModelBehavior {
            quality: Quality::Poor,
            ..ModelBehavior::default()
        },
        ..fast()
    })
    .await;
    let (status, body) = lora(
        &sim,
        "load",
        &json!({"lora_name": "student-v1", "lora_path": "/adapters/nowhere"}),
    )
    .await;
    assert_eq!(status, 404);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["type"], "NotFoundError");
    assert_eq!(error["error"]["code"], 404);

    sim.add_adapter_path("/adapters/student-v1/");
    let (status, body) = lora(
        &sim,
        "load",
        &json!({"lora_name": "student-v1", "lora_path": "/adapters/student-v1"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        "Success: LoRA adapter 'student-v1' added successfully."
    );

    let (status, body) = lora(
        &sim,
        "load",
        &json!({"lora_name": "student-v1", "lora_path": "/adapters/student-v1"}),
    )
    .await;
    assert_eq!(status, 400);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["type"], "InvalidUserInput");
    assert_eq!(
        error["error"]["message"],
        "The lora adapter 'student-v1' has already been loaded."
    );
    let (status, body) = lora(&sim, "load", &json!({"lora_name": "x"})).await;
    assert_eq!(status, 400);
    assert!(body.contains("Both 'lora_name' and 'lora_path' must be provided."));
    // `load_inplace` replaces an adapter under the same name.
    let (status, _) = lora(
        &sim,
        "load",
        &json!({"lora_name": "student-v1", "lora_path": "/adapters/student-v1",
                "load_inplace": true}),
    )
    .await;
    assert_eq!(status, 200);

    let (_, models) = get_json(&sim, "/models").await;
    let data = models["data"].as_array().unwrap();
    let adapter = data.iter().find(|m| m["id"] == "student-v1").unwrap();
    assert_eq!(adapter["root"], "/adapters/student-v1");
    assert_eq!(adapter["parent"], DEFAULT_LORA_BASE_MODEL);
    let base = data
        .iter()
        .find(|m| m["id"] == DEFAULT_LORA_BASE_MODEL)
        .unwrap();
    assert_eq!(base["parent"], Value::Null);
    assert_eq!(data.iter().filter(|m| m["id"] == "student-v1").count(), 1);

    let answer = chat(
        &sim,
        &json!({"model": "student-v1", "messages": question("Why do volcanoes erupt?")}),
    )
    .await;
    assert_eq!(answer["model"], "student-v1");
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("volcanoes"), "{content}");

    let (status, body) = lora(&sim, "unload", &json!({"lora_name": "student-v1"})).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        "Success: LoRA adapter 'student-v1' removed successfully."
    );
    let (status, body) = lora(&sim, "unload", &json!({"lora_name": "student-v1"})).await;
    assert_eq!(status, 404);
    assert!(body.contains("cannot be found"));
    // Unloaded, it is served no more.
    let gone = post_json(
        &sim,
        "/chat/completions",
        &json!({"model": "student-v1", "messages": question("Why do volcanoes erupt?")}),
    )
    .await;
    assert_eq!(gone.status(), 404);
    let error: Value = gone.json().await.unwrap();
    assert_eq!(
        error["error"]["message"],
        "The model `student-v1` does not exist."
    );
    let (_, models) = get_json(&sim, "/models").await;
    assert!(!models.to_string().contains("student-v1"));
    sim.shutdown().await;
}

// ---- Kubernetes ----

const NAMESPACE: &str = "ml";
const SA_TOKEN: &str = "sa-token";

fn kube(sim: &SimHandle, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    client()
        .request(method, format!("{}{path}", sim.root_url()))
        .bearer_auth(SA_TOKEN)
}

fn jobs_path() -> String {
    format!("/apis/batch/v1/namespaces/{NAMESPACE}/jobs")
}

fn manifest(name: &str, env: Value) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "forge-train"}},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 86400,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "train", "image": "forge/trainer:1", "env": env}],
            }},
        },
    })
}

async fn create_k8s_job(sim: &SimHandle, body: &Value) -> (u16, Value) {
    let response = kube(sim, reqwest::Method::POST, &jobs_path())
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn read_k8s_job(sim: &SimHandle, name: &str) -> Value {
    kube(
        sim,
        reqwest::Method::GET,
        &format!("{}/{name}/status", jobs_path()),
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap()
}

/// Polls the Job until its `Complete` or `Failed` condition is true, noting whether it was
/// ever seen active.
async fn wait_for_k8s_job(sim: &SimHandle, name: &str) -> (Value, bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut seen_active = false;
    loop {
        let job = read_k8s_job(sim, name).await;
        seen_active |= job["status"]["active"] == 1 && job["status"]["startTime"].is_string();
        let finished = job["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                matches!(c["type"].as_str(), Some("Complete" | "Failed")) && c["status"] == "True"
            });
        if finished {
            return (job, seen_active);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never finished: {job}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn condition_types(job: &Value) -> Vec<&str> {
    job["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect()
}

/// Uploads `content` to the simulated OpenAI Files API, whose content URL then serves as the
/// dataset URL, guarded by the API key.
async fn dataset_url(sim: &SimHandle, key: &str, content: Vec<u8>) -> String {
    let form = Form::new()
        .text("purpose", "fine-tune")
        .part("file", Part::bytes(content).file_name("train.jsonl"));
    let file: Value = client()
        .post(format!("{}/files", sim.base_url()))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    format!(
        "{}/files/{}/content",
        sim.base_url(),
        file["id"].as_str().unwrap()
    )
}

#[tokio::test]
async fn a_k8s_job_shows_its_interim_condition_alone_before_the_final_one() {
    let sim = start(SimConfig {
        cluster_token: Some(SA_TOKEN.into()),
        cluster: ClusterTimings {
            pending: Duration::from_millis(20),
            running: Duration::from_millis(50),
            // Long enough to be seen by a poll every 10 ms.
            finishing: Duration::from_secs(2),
        },
        ..fast()
    })
    .await;
    for (name, env, interim, terminal) in [
        (
            "forge-lora-ok",
            json!([{"name": "FORGE_OUTPUT_DIR", "value": "/data/adapters/ok"}]),
            "SuccessCriteriaMet",
            "Complete",
        ),
        (
            "forge-lora-bad",
            json!([{"name": "FORGE_SIM_FAIL", "value": "1"}]),
            "FailureTarget",
            "Failed",
        ),
    ] {
        let (status, created) = create_k8s_job(&sim, &manifest(name, env)).await;
        assert_eq!(status, 201, "{created}");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let job = loop {
            let job = read_k8s_job(&sim, name).await;
            if job["status"]["conditions"].is_array() {
                break job;
            }
            assert!(tokio::time::Instant::now() < deadline, "{job}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(condition_types(&job), [interim], "{job}");
        assert!(job["status"].get("completionTime").is_none(), "{job}");
        if terminal == "Complete" {
            // The adapter is in place only once the Job is complete.
            let (status, _) = lora(
                &sim,
                "load",
                &json!({"lora_name": "ok", "lora_path": "/data/adapters/ok"}),
            )
            .await;
            assert_eq!(status, 404);
        }
        let (job, _) = wait_for_k8s_job(&sim, name).await;
        assert_eq!(condition_types(&job), [interim, terminal], "{job}");
    }
    let (status, _) = lora(
        &sim,
        "load",
        &json!({"lora_name": "ok", "lora_path": "/data/adapters/ok"}),
    )
    .await;
    assert_eq!(status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_k8s_job_fetches_its_dataset_trains_and_leaves_an_adapter() {
    let key = "sk-dataset-key";
    let sim = start(SimConfig {
        api_key: Some(key.into()),
        cluster_token: Some(SA_TOKEN.into()),
        cluster: ClusterTimings {
            // Long enough that the first read sees the pod pending.
            pending: Duration::from_secs(1),
            running: Duration::from_millis(50),
            finishing: Duration::from_millis(20),
        },
        ..fast()
    })
    .await;
    let url = dataset_url(&sim, key, training_file(12)).await;
    let body = manifest(
        "forge-lora-run1",
        json!([
            {"name": "FORGE_DATASET_URL", "value": url},
            {"name": "FORGE_DATASET_TOKEN", "value": key},
            {"name": "FORGE_OUTPUT_DIR", "value": "/data/adapters/run1"},
        ]),
    );
    let (status, created) = create_k8s_job(&sim, &body).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["kind"], "Job");
    assert_eq!(created["apiVersion"], "batch/v1");
    assert_eq!(created["status"], json!({}));
    assert_eq!(created["metadata"]["name"], "forge-lora-run1");
    assert_eq!(created["metadata"]["namespace"], NAMESPACE);
    assert_eq!(created["metadata"]["labels"], json!({"app": "forge-train"}));
    assert!(created["metadata"]["uid"].is_string());
    assert!(
        created["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(created["spec"]["backoffLimit"], 0);
    assert_eq!(created["spec"]["ttlSecondsAfterFinished"], 86400);
    assert_eq!(
        created["spec"]["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"],
        "forge-lora-run1"
    );

    let (job, seen_active) = wait_for_k8s_job(&sim, "forge-lora-run1").await;
    assert!(seen_active, "the job was active before it finished");
    assert_eq!(job["status"]["succeeded"], 1, "{job}");
    assert!(job["status"].get("active").is_none());
    assert!(job["status"]["completionTime"].is_string());
    assert_eq!(condition_types(&job), ["SuccessCriteriaMet", "Complete"]);
    assert_eq!(job["status"]["conditions"][1]["status"], "True");

    let fetches = sim.k8s_fetches();
    assert_eq!(fetches.len(), 1);
    assert_eq!(fetches[0].job, "forge-lora-run1");
    assert_eq!(fetches[0].namespace, NAMESPACE);
    assert_eq!(fetches[0].url, url);
    assert_eq!(fetches[0].token.as_deref(), Some(key));
    assert_eq!(fetches[0].status, Some(200));
    assert_eq!(fetches[0].outcome, Ok(12));
    assert!(!format!("{:?}", fetches[0]).contains(key));
    // The container really called the dataset URL, with the token.
    let download = sim
        .requests()
        .into_iter()
        .find(|request| request.path.ends_with("/content"))
        .unwrap();
    assert_eq!(
        download.header("authorization"),
        Some("Bearer sk-dataset-key")
    );

    let pods: Value = kube(
        &sim,
        reqwest::Method::GET,
        &format!(
            "/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=batch.kubernetes.io/job-name=forge-lora-run1"
        ),
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(pods["kind"], "PodList");
    let items = pods["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["status"]["phase"], "Succeeded");
    let pod = items[0]["metadata"]["name"].as_str().unwrap();
    assert!(pod.starts_with("forge-lora-run1-"));
    let log = body_text(kube(
        &sim,
        reqwest::Method::GET,
        &format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}/log"),
    ))
    .await;
    assert!(
        log.contains("adapter saved to /data/adapters/run1"),
        "{log}"
    );

    // vLLM finds the adapter the Job wrote, even after the Job is gone.
    let deleted = kube(
        &sim,
        reqwest::Method::DELETE,
        &format!(
            "{}/forge-lora-run1?propagationPolicy=Background",
            jobs_path()
        ),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(deleted.status(), 200);
    let (status, body) = lora(
        &sim,
        "load",
        &json!({"lora_name": "run1", "lora_path": "/data/adapters/run1"}),
    )
    .await;
    assert_eq!(
        status, 401,
        "vLLM's endpoints want the /v1 bearer key too: {body}"
    );
    let loaded = client()
        .post(format!("{}/load_lora_adapter", sim.base_url()))
        .bearer_auth(key)
        .json(&json!({"lora_name": "run1", "lora_path": "/data/adapters/run1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(loaded.status(), 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_k8s_job_fails_with_backoff_limit_exceeded_when_its_dataset_does() {
    let sim = start(fast()).await;
    let good_url = dataset_url(&sim, "", training_file(12)).await;
    let bad_url = dataset_url(&sim, "", training_file(3)).await;
    let cases = [
        // Nothing listens there.
        (
            "unreachable",
            json!([{"name": "FORGE_DATASET_URL", "value": "http://127.0.0.1:1/data.jsonl"}]),
            "could not download",
        ),
        (
            "bad-data",
            json!([{"name": "FORGE_DATASET_URL", "value": bad_url}]),
            "not valid training data",
        ),
        (
            "told-to-fail",
            json!([{"name": "FORGE_DATASET_URL", "value": good_url},
                   {"name": "FORGE_SIM_FAIL", "value": "1"}]),
            "FORGE_SIM_FAIL",
        ),
    ];
    for (name, env, reason) in cases {
        let (status, created) = create_k8s_job(&sim, &manifest(name, env)).await;
        assert_eq!(status, 201, "{created}");
        let (job, _) = wait_for_k8s_job(&sim, name).await;
        assert_eq!(
            job["status"]["failed"], 1,
            "backoffLimit 0 means one pod: {job}"
        );
        assert!(job["status"].get("succeeded").is_none());
        assert!(job["status"].get("completionTime").is_none());
        assert_eq!(condition_types(&job), ["FailureTarget", "Failed"]);
        for condition in job["status"]["conditions"].as_array().unwrap() {
            assert_eq!(condition["reason"], "BackoffLimitExceeded");
            assert_eq!(condition["status"], "True");
            let message = condition["message"].as_str().unwrap();
            assert!(message.starts_with("Job has reached the specified backoff limit"));
            assert!(message.contains(reason), "{message}");
        }
        let pods: Value = kube(
            &sim,
            reqwest::Method::GET,
            &format!("/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=job-name={name}"),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        assert_eq!(pods["items"][0]["status"]["phase"], "Failed");
        // No adapter was written.
        let (status, _) = lora(
            &sim,
            "load",
            &json!({"lora_name": name, "lora_path": format!("/adapters/{name}")}),
        )
        .await;
        assert_eq!(status, 404);
    }
    let fetches = sim.k8s_fetches();
    assert_eq!(fetches.len(), 3);
    let unreachable = fetches.iter().find(|f| f.job == "unreachable").unwrap();
    assert_eq!(unreachable.status, None);
    assert!(unreachable.outcome.is_err());
    let bad = fetches.iter().find(|f| f.job == "bad-data").unwrap();
    assert_eq!(bad.status, Some(200));
    assert!(bad.outcome.as_ref().unwrap_err().contains("at least 10"));

    // A dataset server that refuses the token fails the Job, and the status is recorded.
    let refused = start(SimConfig {
        api_key: Some("sk-right".into()),
        ..fast()
    })
    .await;
    let url = dataset_url(&refused, "sk-right", training_file(12)).await;
    let env = json!([{"name": "FORGE_DATASET_URL", "value": url},
                     {"name": "FORGE_DATASET_TOKEN", "value": "sk-wrong"}]);
    let (status, _) = create_k8s_job(&refused, &manifest("refused", env)).await;
    assert_eq!(status, 201);
    let (job, _) = wait_for_k8s_job(&refused, "refused").await;
    assert!(
        job["status"]["conditions"][1]["message"]
            .as_str()
            .unwrap()
            .contains("HTTP 401"),
        "{job}"
    );
    assert_eq!(refused.k8s_fetches()[0].status, Some(401));
    refused.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn k8s_refuses_bad_tokens_duplicates_and_invalid_jobs_with_status_objects() {
    let sim = start(SimConfig {
        cluster_token: Some(SA_TOKEN.into()),
        ..fast()
    })
    .await;
    let url = format!("{}{}", sim.root_url(), jobs_path());
    let body = manifest("dup", json!([]));
    let anonymous = client().post(&url).json(&body).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let status: Value = anonymous.json().await.unwrap();
    assert_eq!(
        status,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
    );
    let wrong = client()
        .post(&url)
        .bearer_auth("other")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let (status, _) = create_k8s_job(&sim, &body).await;
    assert_eq!(status, 201);
    let (status, conflict) = create_k8s_job(&sim, &body).await;
    assert_eq!(status, 409);
    assert_eq!(conflict["kind"], "Status");
    assert_eq!(conflict["reason"], "AlreadyExists");
    assert_eq!(conflict["message"], "jobs.batch \"dup\" already exists");
    assert_eq!(conflict["code"], 409);

    let mut always = manifest("always", json!([]));
    always["spec"]["template"]["spec"]["restartPolicy"] = json!("Always");
    let (status, invalid) = create_k8s_job(&sim, &always).await;
    assert_eq!(status, 422);
    assert_eq!(invalid["reason"], "Invalid");
    assert_eq!(
        invalid["details"]["causes"][0]["field"],
        "spec.template.spec.restartPolicy"
    );
    assert!(
        invalid["message"]
            .as_str()
            .unwrap()
            .contains("Unsupported value: \"Always\"")
    );
    let mut no_containers = manifest("empty", json!([]));
    no_containers["spec"]["template"]["spec"]["containers"] = json!([]);
    let (status, invalid) = create_k8s_job(&sim, &no_containers).await;
    assert_eq!(status, 422);
    assert_eq!(
        invalid["message"],
        "Job.batch \"empty\" is invalid: spec.template.spec.containers: Required value"
    );
    let mut bad_name = manifest("Bad_Name", json!([]));
    bad_name["spec"]["template"]["spec"]["restartPolicy"] = json!("OnFailure");
    let (status, invalid) = create_k8s_job(&sim, &bad_name).await;
    assert_eq!(status, 422);
    assert_eq!(invalid["details"]["causes"][0]["field"], "metadata.name");
    let (status, _) = create_k8s_job(&sim, &json!("not a job")).await;
    assert_eq!(status, 400);

    let missing = kube(&sim, reqwest::Method::GET, &format!("{}/nope", jobs_path()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let status: Value = missing.json().await.unwrap();
    assert_eq!(status["reason"], "NotFound");
    assert_eq!(status["message"], "jobs.batch \"nope\" not found");
    let unknown = kube(&sim, reqwest::Method::GET, "/apis/apps/v1/deployments")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.json::<Value>().await.unwrap()["kind"], "Status");
    sim.shutdown().await;
}

#[tokio::test]
async fn deleting_a_k8s_job_orphans_its_pod_unless_told_otherwise() {
    let sim = start(fast()).await;
    let pods_of = |name: &'static str| {
        let request = kube(
            &sim,
            reqwest::Method::GET,
            &format!(
                "/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=batch.kubernetes.io/job-name={name}"
            ),
        );
        async move {
            let pods: Value = request.send().await.unwrap().json().await.unwrap();
            pods["items"].as_array().unwrap().len()
        }
    };
    for name in ["orphaned", "background", "by-body"] {
        let (status, _) = create_k8s_job(&sim, &manifest(name, json!([]))).await;
        assert_eq!(status, 201);
    }
    let listed: Value = kube(
        &sim,
        reqwest::Method::GET,
        &format!("{}?labelSelector=app=forge-train", jobs_path()),
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(listed["kind"], "JobList");
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);

    let orphaning = kube(
        &sim,
        reqwest::Method::DELETE,
        &format!("{}/orphaned", jobs_path()),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(orphaning.status(), 200);
    let warning = orphaning.headers()["warning"].to_str().unwrap().to_owned();
    assert!(
        warning.contains("child pods are preserved by default when jobs are deleted"),
        "{warning}"
    );
    let status: Value = orphaning.json().await.unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["status"], "Success");
    assert_eq!(status["details"]["name"], "orphaned");
    assert_eq!(pods_of("orphaned").await, 1, "the pod stays behind");

    let background = kube(
        &sim,
        reqwest::Method::DELETE,
        &format!("{}/background?propagationPolicy=Background", jobs_path()),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(background.status(), 200);
    assert!(background.headers().get("warning").is_none());
    assert_eq!(pods_of("background").await, 0);

    // kube-rs sends the policy as a DeleteOptions body.
    let by_body = kube(
        &sim,
        reqwest::Method::DELETE,
        &format!("{}/by-body", jobs_path()),
    )
    .json(&json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}))
    .send()
    .await
    .unwrap();
    assert_eq!(by_body.status(), 200);
    assert!(by_body.headers().get("warning").is_none());
    assert_eq!(pods_of("by-body").await, 0);

    let again = kube(
        &sim,
        reqwest::Method::DELETE,
        &format!("{}/background?propagationPolicy=Background", jobs_path()),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(again.status(), 404);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_v1_api_serves_a_deployment_by_model_to_an_api_key() {
    let sim = start(fast()).await;
    let model = azure_fine_tuned_model(&sim).await;
    arm(&sim, reqwest::Method::PUT, "student")
        .json(&deployment_body(&model))
        .send()
        .await
        .unwrap();
    provisioned(&sim, "student").await;
    // Through the gateway's own upstream client, with the key in `api-key` and no
    // `api-version`: the v1 API has none.
    let upstream = |header| {
        crate::upstream::Upstream::new(
            "azure",
            &format!("{}/openai/v1", sim.root_url()),
            Some(AZURE_KEY),
            header,
            crate::config::Timeouts {
                connect: Duration::from_secs(5),
                first_byte: Duration::from_secs(30),
                idle: Duration::from_secs(30),
            },
        )
        .unwrap()
    };
    let body = |model: &str| {
        bytes::Bytes::from(
            json!({"model": model, "messages": question("Why do volcanoes erupt?")}).to_string(),
        )
    };
    let send = |upstream: crate::upstream::Upstream, model: &'static str| async move {
        let response = upstream
            .send(
                http::Method::POST,
                "/chat/completions",
                http::HeaderMap::new(),
                body(model),
            )
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, serde_json::from_slice::<Value>(&bytes).unwrap())
    };
    let (status, answer) = send(upstream(crate::config::KeyHeader::ApiKey), "student").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model"], model.as_str());
    let (status, error) = send(upstream(crate::config::KeyHeader::ApiKey), "nobody").await;
    assert_eq!(status, 404);
    assert_eq!(error["error"]["code"], "DeploymentNotFound");
    // Azure does not take its key as a bearer token: its 401 is a refusal of Forge's key.
    let refused = upstream(crate::config::KeyHeader::Authorization)
        .send(
            http::Method::POST,
            "/chat/completions",
            http::HeaderMap::new(),
            body("student"),
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(crate::error::Error::UpstreamRefusedCredentials(401))
        ),
        "{:?}",
        refused.map(|r| r.status())
    );
}
