//! Unit tests of the providers' parsing, naming, mapping and config; the wire paths are tested against the simulated upstream in `tests/providers.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use http::StatusCode;
use serde_json::json;

use super::client::{self, error_message};
use super::config::{ProviderConfig, ProviderSetupError, SecretString};
use super::fine_tuning::{self, Dialect, FineTuningApi, JobObject, parse_result_content, state_of};
use super::kubernetes::{Job, adapter_name, job_name};
use super::metrics::{metrics_from_events, parse_result_csv};
use super::naming::{dns_label, slug};
use crate::distill::provider::{Hyperparameters, ProviderError, ProviderState, TrainingRequest};

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

// ---- result CSV and events -------------------------------------------------------------

#[test]
fn csv_openai_spelling_keeps_the_last_non_empty_value_of_each_column() {
    let csv = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n\
               1,1.9,0.55,2.0,0.5\n\
               2,1.2,0.70,,\n\
               3,0.8,0.81,,\n";
    let metrics = parse_result_csv(csv);
    assert_eq!(
        metrics,
        BTreeMap::from([
            ("train_loss".to_owned(), 0.8),
            ("train_mean_token_accuracy".to_owned(), 0.81),
            ("valid_loss".to_owned(), 2.0),
            ("valid_mean_token_accuracy".to_owned(), 0.5),
        ])
    );
}

#[test]
fn csv_azure_spelling_in_another_order_with_spaces_crlf_and_bom() {
    let csv = "\u{feff}step, valid_loss, train_loss, train_mean_token_accuracy, \
               validation_mean_token_accuracy, full_valid_loss, full_valid_mean_token_accuracy\r\n\
               1, 1.5, 1.4, 0.6, 0.58, , \r\n\
               2, 1.1, 1.0, 0.7, 0.66, 1.05, 0.67\r\n";
    let metrics = parse_result_csv(csv);
    assert_eq!(metrics["train_loss"], 1.0);
    assert_eq!(metrics["valid_loss"], 1.1);
    assert_eq!(metrics["train_mean_token_accuracy"], 0.7);
    assert_eq!(metrics["valid_mean_token_accuracy"], 0.66);
    assert_eq!(metrics["full_valid_loss"], 1.05);
    assert_eq!(metrics["full_valid_mean_token_accuracy"], 0.67);
    assert!(!metrics.contains_key("step"));
}

#[test]
fn csv_without_validation_has_no_validation_metrics() {
    let csv = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,1.5,0.6,,\n2,1.0,0.7,,\n";
    let metrics = parse_result_csv(csv);
    assert_eq!(metrics.len(), 2, "{metrics:?}");
    assert_eq!(metrics["train_loss"], 1.0);
    assert!(!metrics.contains_key("valid_loss"));
}

#[test]
fn csv_edge_cases_yield_nothing_rather_than_garbage() {
    assert!(parse_result_csv("").is_empty());
    assert!(parse_result_csv("step,train_loss\n").is_empty());
    // Unknown columns and unparsable or non-finite cells are skipped.
    let metrics = parse_result_csv("step,mystery,train_loss\n1,5,NaN\n2,6,oops\n3,7,0.5\n4,8,\n");
    assert_eq!(metrics, BTreeMap::from([("train_loss".to_owned(), 0.5)]));
    // A short row doesn't shift later columns.
    let metrics = parse_result_csv("step,train_loss,valid_loss\n1,0.9\n");
    assert_eq!(metrics, BTreeMap::from([("train_loss".to_owned(), 0.9)]));
}

#[test]
fn result_content_may_be_base64_as_azure_serves_it() {
    // base64 of "step,train_loss\n1,0.25\n"
    let encoded = b"c3RlcCx0cmFpbl9sb3NzCjEsMC4yNQo=";
    assert_eq!(
        parse_result_content(encoded),
        BTreeMap::from([("train_loss".to_owned(), 0.25)])
    );
    assert!(parse_result_content(b"not base64 at all!").is_empty());
}

#[test]
fn newest_metrics_event_wins() {
    let events = vec![
        json!({"object": "fine_tuning.job.event", "type": "message", "message": "The job has successfully completed", "data": null}),
        json!({"type": "metrics", "data": {"step": 30, "train_loss": 0.3, "train_mean_token_accuracy": 0.9, "valid_loss": 0.35, "total_steps": 30}}),
        json!({"type": "metrics", "data": {"step": 29, "train_loss": 0.4}}),
    ];
    let metrics = metrics_from_events(&events);
    assert_eq!(
        metrics,
        BTreeMap::from([
            ("train_loss".to_owned(), 0.3),
            ("train_mean_token_accuracy".to_owned(), 0.9),
            ("valid_loss".to_owned(), 0.35),
        ])
    );
    assert!(metrics_from_events(&[json!({"type": "message", "data": null})]).is_empty());
}

// ---- names -----------------------------------------------------------------------------

#[test]
fn job_names_are_dns_1123_labels() {
    let name = job_name("01JZ8X3Q4M5N6P7R8S9T0VWXYZ");
    assert_eq!(name, "forge-train-01jz8x3q4m5n6p7r8s9t0vwxyz");
    for id in [
        "A_B.C D",
        "---",
        "",
        "ÜnïcødeJob",
        "job/with/slashes",
        &"x".repeat(200),
        "UPPER-case-END-",
    ] {
        let name = job_name(id);
        assert!(is_dns_label(&name), "{id:?} gave {name:?}");
        assert!(name.starts_with("forge-train-"), "{name}");
        assert_eq!(name, job_name(id), "names must be stable for resubmission");
    }
}

#[test]
fn long_ids_that_share_a_prefix_get_distinct_names() {
    let base = "a".repeat(80);
    let one = job_name(&format!("{base}-1"));
    let two = job_name(&format!("{base}-2"));
    assert_ne!(one, two);
    assert!(one.len() <= 63 && two.len() <= 63);
    assert!(is_dns_label(&one) && is_dns_label(&two));
}

#[test]
fn dns_label_respects_any_limit() {
    for max in [20, 32, 63, 64] {
        let name = dns_label("forge-", &"Z-".repeat(100), max);
        assert!(name.len() <= max, "{name}");
        assert!(!name.ends_with('-'), "{name}");
    }
    assert_eq!(slug("--Hello, World!--"), "hello-world");
}

#[test]
fn adapter_names_are_versioned_by_job() {
    assert_eq!(
        adapter_name(
            "meta-llama/Llama-3.1-8B-Instruct",
            "01JZ8X3Q4M5N6P7R8S9T7K2M9QXA"
        ),
        "llama-3-1-8b-instruct-forge-7k2m9qxa"
    );
    assert_ne!(adapter_name("m", "job-0001"), adapter_name("m", "job-0002"));
    assert_eq!(adapter_name("", "x"), "student-forge-x");
}

// ---- states and errors ----------------------------------------------------------------

fn job(value: serde_json::Value) -> JobObject {
    serde_json::from_value(value).unwrap()
}

#[test]
fn fine_tuning_statuses_map_to_states() {
    for status in [
        "validating_files",
        "queued",
        "paused",
        "pending",
        "notRunning",
        "something_new",
    ] {
        assert_eq!(
            state_of(&job(json!({"id": "j", "status": status}))),
            ProviderState::Queued,
            "{status}"
        );
    }
    assert_eq!(
        state_of(&job(json!({"id": "j", "status": "running"}))),
        ProviderState::Running
    );
    assert_eq!(
        state_of(&job(json!({"id": "j", "status": "cancelled"}))),
        ProviderState::Cancelled
    );
    assert_eq!(
        state_of(&job(
            json!({"id": "j", "status": "succeeded", "fine_tuned_model": "ft:m:o::x", "result_files": null})
        )),
        ProviderState::Succeeded {
            model: "ft:m:o::x".into()
        }
    );
    assert_eq!(
        state_of(&job(json!({"id": "j", "status": "failed",
            "error": {"code": "invalid_training_file", "message": "too few examples", "param": "training_file"}}))),
        ProviderState::Failed {
            error: "invalid_training_file: too few examples".into()
        }
    );
    // A running job with OpenAI's all-null error object is not a failure.
    assert_eq!(
        state_of(&job(
            json!({"id": "j", "status": "running", "error": {"code": null, "message": null, "param": null}})
        )),
        ProviderState::Running
    );
    assert!(matches!(
        state_of(&job(
            json!({"id": "j", "status": "succeeded", "fine_tuned_model": null})
        )),
        ProviderState::Failed { .. }
    ));
}

fn kube_job(conditions: serde_json::Value, extra_status: serde_json::Value) -> Job {
    let mut status = json!({"conditions": conditions});
    if let (Some(status), Some(extra)) = (status.as_object_mut(), extra_status.as_object()) {
        status.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "metadata": {"name": "forge-train-x", "annotations": {"forge/adapter-path": "/adapters/m-forge-x"}},
        "spec": {},
        "status": status,
    }))
    .unwrap()
}

#[test]
fn kubernetes_jobs_finish_only_on_complete_or_failed() {
    let (state, status) = kube_job(json!([]), json!({"active": 1, "ready": 0})).state();
    assert_eq!((state, status.as_str()), (ProviderState::Queued, "Pending"));
    let (state, _) = kube_job(json!([]), json!({"active": 1, "ready": 1})).state();
    assert_eq!(state, ProviderState::Running);
    let (state, _) = kube_job(json!([]), json!({"active": 1})).state();
    assert_eq!(state, ProviderState::Running);

    // The interim conditions are not final.
    let interim = json!([{"type": "SuccessCriteriaMet", "status": "True"}]);
    assert!(!matches!(
        kube_job(interim, json!({"active": 1})).state().0,
        ProviderState::Succeeded { .. }
    ));
    let interim =
        json!([{"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"}]);
    assert!(!matches!(
        kube_job(interim, json!({"active": 1})).state().0,
        ProviderState::Failed { .. }
    ));
    // A condition that is "False" doesn't count.
    let not_yet = json!([{"type": "Complete", "status": "False"}]);
    assert!(!matches!(
        kube_job(not_yet, json!({})).state().0,
        ProviderState::Succeeded { .. }
    ));

    let complete = json!([{"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]);
    assert_eq!(
        kube_job(complete, json!({"succeeded": 1})).state(),
        (
            ProviderState::Succeeded {
                model: "/adapters/m-forge-x".into()
            },
            "Complete".into()
        )
    );
    let failed = json!([
        {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"},
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"},
    ]);
    assert_eq!(
        kube_job(failed, json!({"failed": 1})).state(),
        (
            ProviderState::Failed {
                error: "BackoffLimitExceeded: Job has reached the specified backoff limit".into()
            },
            "Failed".into()
        )
    );
}

#[test]
fn error_messages_come_from_every_shape_of_error_body() {
    let status = StatusCode::BAD_REQUEST;
    assert_eq!(
        error_message(
            br#"{"error":{"message":"nested","type":"x","param":null,"code":null}}"#,
            status
        ),
        "nested"
    );
    assert_eq!(
        error_message(
            br#"{"object":"error","message":"flat","type":"InvalidUserInput","code":400}"#,
            status
        ),
        "flat"
    );
    assert_eq!(error_message(br#"{"kind":"Status","status":"Failure","message":"jobs.batch \"x\" already exists","reason":"AlreadyExists"}"#, status), "jobs.batch \"x\" already exists");
    assert_eq!(error_message(b"  plain text  ", status), "plain text");
    assert_eq!(error_message(b"", status), "Bad Request");
    assert!(
        error_message("x".repeat(5000).as_bytes(), status)
            .chars()
            .count()
            <= 501
    );
}

#[test]
fn urls_keep_the_base_path_and_encode_ids() {
    let base = client::parse_base("http://127.0.0.1:1/v1/").unwrap();
    let url = client::endpoint(
        &base,
        &["fine_tuning", "jobs", "a/b?c"],
        &[("api-version", "2024-10-21")],
    );
    assert_eq!(
        url.as_str(),
        "http://127.0.0.1:1/v1/fine_tuning/jobs/a%2Fb%3Fc?api-version=2024-10-21"
    );
    assert!(client::parse_base("ftp://x").is_err());
    assert!(client::parse_base("http://user:pass@x/v1").is_err());
}

// ---- request bodies -------------------------------------------------------------------

fn request(hyperparameters: Hyperparameters) -> TrainingRequest {
    TrainingRequest {
        job_id: "01JOB".into(),
        train_file: PathBuf::from("/nonexistent/train.jsonl"),
        validation_file: None,
        base_model: "gpt-4o-mini-2024-07-18".into(),
        suffix: Some("support".into()),
        hyperparameters,
        dataset_url: None,
    }
}

fn api(dialect: Dialect) -> FineTuningApi {
    api_at("http://127.0.0.1:1/v1", dialect)
}

fn api_at(base: &str, dialect: Dialect) -> FineTuningApi {
    let client = client::build_client(None).unwrap();
    let base = client::parse_base(base).unwrap();
    FineTuningApi::new(
        client,
        base,
        None,
        None,
        Duration::from_secs(1),
        Duration::from_secs(1),
        dialect,
    )
}

#[test]
fn openai_job_body_leaves_auto_out_and_tags_forge_job() {
    let body = api(Dialect::OpenAi).job_body(&request(Hyperparameters::default()), "file-t", None);
    assert_eq!(
        body,
        json!({
            "model": "gpt-4o-mini-2024-07-18",
            "training_file": "file-t",
            "suffix": "support",
            "method": {"type": "supervised", "supervised": {}},
            "metadata": {"forge_job_id": "01JOB"},
        })
    );
    let set = Hyperparameters {
        n_epochs: Some(2),
        batch_size: None,
        learning_rate_multiplier: Some(0.5),
    };
    let body = api(Dialect::OpenAi).job_body(&request(set), "file-t", Some("file-v"));
    assert_eq!(body["validation_file"], "file-v");
    assert_eq!(
        body["method"]["supervised"]["hyperparameters"],
        json!({"n_epochs": 2, "learning_rate_multiplier": 0.5})
    );
}

#[test]
fn azure_job_body_uses_top_level_hyperparameters() {
    let set = Hyperparameters {
        n_epochs: None,
        batch_size: Some(4),
        learning_rate_multiplier: None,
    };
    let body = api(Dialect::Azure).job_body(&request(set), "file-t", None);
    assert_eq!(body["hyperparameters"], json!({"batch_size": 4}));
    assert!(
        body.get("method").is_none() && body.get("metadata").is_none(),
        "{body}"
    );
}

// ---- config ---------------------------------------------------------------------------

fn parse(value: serde_json::Value) -> Result<ProviderConfig, serde_json::Error> {
    serde_json::from_value(value)
}

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn config_is_tagged_by_provider_and_refuses_unknown_keys() {
    assert!(matches!(
        parse(json!({"provider": "sim", "base_url": "http://127.0.0.1:9/v1"})).unwrap(),
        ProviderConfig::Sim(_)
    ));
    let azure = json!({
        "provider": "azure",
        "endpoint": "https://r.openai.azure.com",
        "api_key_env": "AZ",
        "deployment": {"subscription_id": "s", "resource_group": "g", "account": "a", "token_env": "ARM"},
    });
    assert!(matches!(
        parse(azure.clone()).unwrap(),
        ProviderConfig::Azure(_)
    ));
    let mut typo = azure;
    typo["deployment"]["acount"] = json!("a");
    let err = parse(typo).unwrap_err().to_string();
    assert!(err.contains("acount"), "{err}");
    let err =
        parse(json!({"provider": "kubernetes", "image": "i", "vllm_url": "http://v", "gpus": 1}))
            .unwrap_err()
            .to_string();
    assert!(err.contains("gpus"), "{err}");
    let err = parse(json!({"provider": "bedrock"}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bedrock"), "{err}");
}

fn setup_error_key(config: serde_json::Value, env: &dyn Fn(&str) -> Option<String>) -> String {
    match parse(config).unwrap().build_with_env(env) {
        Err(ProviderSetupError::Setting { key, .. }) => key,
        Err(other) => panic!("unexpected error {other}"),
        Ok(provider) => panic!("built {provider:?}"),
    }
}

#[test]
fn build_names_the_setting_that_is_wrong() {
    assert_eq!(
        setup_error_key(json!({"provider": "openai"}), &no_env),
        "api_key"
    );
    assert_eq!(
        setup_error_key(
            json!({"provider": "openai", "api_key_env": "NOPE"}),
            &no_env
        ),
        "api_key_env"
    );
    assert_eq!(
        setup_error_key(
            json!({"provider": "openai", "api_key": "a", "api_key_env": "B"}),
            &no_env
        ),
        "api_key"
    );
    assert_eq!(
        setup_error_key(json!({"provider": "sim"}), &no_env),
        "base_url"
    );
    assert_eq!(
        setup_error_key(json!({"provider": "sim", "base_url": "nope"}), &no_env),
        "base_url"
    );
    assert_eq!(
        setup_error_key(
            json!({"provider": "sim", "base_url": "http://x/v1", "timeout_secs": 0}),
            &no_env
        ),
        "timeout_secs"
    );
    let azure = json!({
        "provider": "azure",
        "endpoint": "https://r.openai.azure.com",
        "api_key": "k",
        "deployment": {"subscription_id": "s", "resource_group": "", "account": "a", "token": "t"},
    });
    assert_eq!(setup_error_key(azure, &no_env), "deployment.resource_group");
    let kube = json!({"provider": "kubernetes", "api_server": "http://k", "namespace": "ns", "token": "t",
                      "image": "trainer", "vllm_url": "http://v", "env": {"FORGE_DATASET_URL": "x"}});
    assert_eq!(setup_error_key(kube, &no_env), "env.FORGE_DATASET_URL");
    let kube = json!({"provider": "kubernetes", "api_server": "http://k", "namespace": "Not_A_Namespace",
                      "token": "t", "image": "trainer", "vllm_url": "http://v"});
    assert_eq!(setup_error_key(kube, &no_env), "namespace");
    // Waits and timeouts past 30 days would overflow the clock when a deadline is set.
    let azure = json!({
        "provider": "azure",
        "endpoint": "https://r.openai.azure.com",
        "api_key": "k",
        "file_wait_secs": i64::MAX,
        "deployment": {"subscription_id": "s", "resource_group": "g", "account": "a", "token": "t"},
    });
    assert_eq!(setup_error_key(azure, &no_env), "file_wait_secs");
    assert_eq!(
        setup_error_key(
            json!({"provider": "sim", "base_url": "http://x/v1", "timeout_secs": 2_592_001}),
            &no_env
        ),
        "timeout_secs"
    );
    let kube = json!({"provider": "kubernetes", "api_server": "http://k", "namespace": "ns", "token": "t",
                      "image": "trainer", "vllm_url": "http://v", "ttl_secs_after_finished": 2_147_483_648_u64});
    assert_eq!(setup_error_key(kube, &no_env), "ttl_secs_after_finished");
}

#[test]
fn build_resolves_env_and_defaults() {
    let env = |name: &str| (name == "OPENAI_API_KEY").then(|| "sk-from-env".to_owned());
    let provider = parse(json!({"provider": "openai", "api_key_env": "OPENAI_API_KEY"}))
        .unwrap()
        .build_with_env(&env)
        .unwrap();
    assert_eq!(provider.name(), "openai");
    let debug = format!("{provider:?}");
    assert!(debug.contains("api.openai.com"), "{debug}");
    assert!(
        !debug.contains("sk-from-env"),
        "the key leaked into debug output: {debug}"
    );

    let kube = parse(json!({"provider": "kubernetes", "api_server": "http://k:6443", "namespace": "ml",
                            "token": "secret-token", "image": "trainer", "vllm_url": "http://vllm:8000/v1"}))
    .unwrap()
    .build_with_env(&no_env)
    .unwrap();
    assert_eq!(kube.name(), "kubernetes");
    assert!(!format!("{kube:?}").contains("secret-token"));
}

#[test]
fn secrets_never_show_in_debug_output() {
    let config = parse(json!({"provider": "openai", "api_key": "sk-very-secret"})).unwrap();
    assert!(!format!("{config:?}").contains("sk-very-secret"));
    assert_eq!(format!("{:?}", SecretString::new("x")), "<redacted>");
}

#[test]
fn in_cluster_defaults_come_from_the_service_environment() {
    let env = |name: &str| match name {
        "KUBERNETES_SERVICE_HOST" => Some("fd00::1".to_owned()),
        "KUBERNETES_SERVICE_PORT" => Some("6443".to_owned()),
        _ => None,
    };
    let provider = parse(
        json!({"provider": "kubernetes", "namespace": "ml", "token": "t",
                                "image": "trainer", "vllm_url": "http://vllm:8000"}),
    )
    .unwrap()
    .build_with_env(&env)
    .unwrap();
    let debug = format!("{provider:?}");
    let api_server = debug.split("api_server:").nth(1).unwrap();
    assert!(
        api_server.starts_with(r#" Url { scheme: "https""#),
        "{debug}"
    );
    assert!(
        api_server.contains("Ipv6(fd00::1)") && api_server.contains("port: Some(6443)"),
        "{debug}"
    );
    // Outside a cluster, with nothing set, the API server is required.
    let kube = json!({"provider": "kubernetes", "namespace": "ml", "token": "t", "image": "trainer", "vllm_url": "http://v"});
    assert_eq!(setup_error_key(kube, &no_env), "api_server");
}

#[test]
fn an_unreadable_ca_bundle_is_a_setup_error() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.crt");
    std::fs::write(&not_pem, "this is not a certificate").unwrap();
    for path in [not_pem, dir.path().join("missing.crt")] {
        let kube = json!({"provider": "kubernetes", "api_server": "https://k:6443", "namespace": "ml", "token": "t",
                          "ca_file": path, "image": "trainer", "vllm_url": "http://v"});
        assert_eq!(setup_error_key(kube, &no_env), "ca_file");
    }
}

/// Every key each provider reads, set, but for the file paths (`token_file`, `ca_file`): each
/// secret has one source, here its `*_env`.
fn full_provider_settings() -> Vec<serde_json::Value> {
    vec![
        json!({"provider": "openai", "base_url": "https://api.openai.com/v1", "api_key_env": "K",
               "upstream": "openai", "timeout_secs": 60, "upload_timeout_secs": 600}),
        json!({"provider": "sim", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}),
        json!({"provider": "azure", "endpoint": "https://r.openai.azure.com", "api_version": "2024-10-21",
               "api_key_env": "K", "upstream": "azure", "timeout_secs": 60, "upload_timeout_secs": 600,
               "file_wait_secs": 600,
               "deployment": {"management_url": "https://management.azure.com", "subscription_id": "s",
                              "resource_group": "g", "account": "a", "api_version": "2024-10-01",
                              "token_env": "ARM", "sku": "Standard", "capacity": 1, "wait_secs": 600}}),
        json!({"provider": "kubernetes", "api_server": "https://k:6443", "namespace": "ns", "token_env": "K",
               "image": "trainer:1", "args": ["--lora"], "env": {"HF_HOME": "/cache"}, "gpu_limit": 1,
               "memory_limit": "32Gi", "service_account": "trainer", "adapter_pvc": "adapters",
               "adapter_root": "/adapters", "backoff_limit": 0, "active_deadline_secs": 86400,
               "ttl_secs_after_finished": 3600, "vllm_url": "http://vllm:8000/v1",
               "vllm_api_key_env": "V", "upstream": "vllm", "timeout_secs": 60}),
    ]
}

/// The paths of every value in `v`, objects and arrays descended into.
fn leaf_paths(v: &serde_json::Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                at.push(k.clone());
                out.push(at.clone());
                leaf_paths(child, at, out);
                at.pop();
            }
        }
        serde_json::Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                at.push(i.to_string());
                out.push(at.clone());
                leaf_paths(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

/// The plan's F1 for the provider tables: any value of any key is refused with an error or
/// builds a provider, never a panic. The base settings themselves build.
#[test]
fn any_value_of_any_provider_key_is_an_error_or_a_provider() {
    let env = |_: &str| Some("from-env".to_string());
    let odd = [
        json!(0),
        json!(-1),
        json!(1),
        json!(0.5),
        json!(1e300),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(u32::MAX),
        json!(""),
        json!("x"),
        json!("http://"),
        json!("https://[::1]:0/v1"),
        json!("é😀/../\u{0}"),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
    ];
    let mut panics = Vec::new();
    let mut bent_count = 0;
    for full in full_provider_settings() {
        let built = parse(full.clone()).map(|c| c.build_with_env(&env).map(|_| ()));
        assert!(matches!(built, Ok(Ok(()))), "{full}: {built:?}");
        let mut paths = Vec::new();
        leaf_paths(&full, &mut Vec::new(), &mut paths);
        for path in paths.iter().filter(|p| p != &&["provider"]) {
            for value in &odd {
                let mut bent = full.clone();
                let pointer = format!("/{}", path.join("/"));
                *bent.pointer_mut(&pointer).expect("a path of the value") = value.clone();
                bent_count += 1;
                let outcome = std::panic::catch_unwind(|| {
                    parse(bent.clone()).map(|c| c.build_with_env(&env).map(|_| ()))
                });
                if outcome.is_err() {
                    panics.push(format!("{} {pointer} = {value}", full["provider"]));
                }
            }
        }
    }
    assert!(bent_count > 500, "{bent_count} settings tried");
    assert!(panics.is_empty(), "these panicked: {panics:?}");
}

#[tokio::test]
async fn a_file_over_the_files_api_limit_is_refused_before_it_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.jsonl");
    // Sparse: no disk space is used.
    std::fs::File::create(&path)
        .unwrap()
        .set_len(fine_tuning::MAX_UPLOAD_BYTES + 1)
        .unwrap();
    // The API's address has no listener: a send would fail with a transport error instead.
    let err = api(Dialect::OpenAi)
        .upload(&path, "train.jsonl")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::Invalid(m) if m.contains("at most 512000000 bytes")),
        "{err:?}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_list_that_ignores_after_is_an_error_not_a_loop() {
    // Every request gets the first page again, which says more follow.
    let app = axum::Router::new().route(
        "/v1/files",
        axum::routing::get(|| async {
            axum::Json(serde_json::json!({
                "object": "list",
                "data": [
                    {"id": "file-b", "filename": "forge-01job-train.jsonl", "created_at": 2},
                    {"id": "file-a", "filename": "other.jsonl", "created_at": 1},
                ],
                "has_more": true,
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let lookup = tokio::time::timeout(
        Duration::from_secs(30),
        api_at(&base, Dialect::Azure).earlier_submission("01JOB"),
    )
    .await
    .expect("the lookup ends");
    let err = lookup.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Invalid(m) if m.contains("`after` ignored")),
        "{err:?}"
    );
    server.abort();
}

#[tokio::test]
async fn the_newest_usable_upload_of_an_earlier_submission_is_used_again() {
    // Listed oldest first; the newest could not be processed. No job was made from any.
    let files = json!({
        "object": "list",
        "has_more": false,
        "data": [
            {"id": "file-old", "filename": "forge-01job-train.jsonl", "created_at": 1, "status": "processed"},
            {"id": "file-new", "filename": "forge-01job-train.jsonl", "created_at": 5, "status": "processed"},
            {"id": "file-bad", "filename": "forge-01job-train.jsonl", "created_at": 9, "status": "error"},
            {"id": "file-other", "filename": "theirs.jsonl", "created_at": 7, "status": "processed"},
        ],
    });
    let app = axum::Router::new()
        .route(
            "/v1/files",
            axum::routing::get(move || {
                let files = files.clone();
                async move { axum::Json(files) }
            }),
        )
        .route(
            "/v1/fine_tuning/jobs",
            axum::routing::get(|| async {
                axum::Json(json!({"object": "list", "data": [], "has_more": false}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let api = api_at(&base, Dialect::Azure);
    let earlier = api.earlier_submission("01JOB").await.unwrap();
    assert!(earlier.job.is_none());
    let ids: Vec<&str> = earlier.uploads.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["file-bad", "file-new", "file-old"]);
    for file in earlier.uploads {
        api.reuse_upload(file);
    }
    let [train, _] = fine_tuning::upload_names("01JOB");
    assert_eq!(
        api.uploaded(&train).map(|f| f.id).as_deref(),
        Some("file-new")
    );
    server.abort();
}

#[tokio::test]
async fn a_failed_submission_deletes_only_uploads_no_run_may_have_used() {
    use std::sync::{Arc, Mutex};
    // Uploads get ids in order; the first job create answers 500 (it may have made the run),
    // the next 400 (it made none). Deletes are recorded.
    let deleted = Arc::new(Mutex::new(Vec::<String>::new()));
    let (uploads, creates) = (Arc::new(Mutex::new(0)), Arc::new(Mutex::new(0)));
    let app = axum::Router::new()
        .route(
            "/v1/files",
            // The body is read: a server that answers before it has, closes on it.
            axum::routing::post(move |_: axum::body::Bytes| {
                let uploads = Arc::clone(&uploads);
                async move {
                    let mut n = uploads.lock().unwrap();
                    *n += 1;
                    axum::Json(json!({"id": format!("file-{n}"), "object": "file"}))
                }
            }),
        )
        .route(
            "/v1/files/{id}",
            axum::routing::delete({
                let deleted = Arc::clone(&deleted);
                move |axum::extract::Path(id): axum::extract::Path<String>| {
                    let deleted = Arc::clone(&deleted);
                    async move {
                        deleted.lock().unwrap().push(id.clone());
                        axum::Json(json!({"id": id, "object": "file", "deleted": true}))
                    }
                }
            }),
        )
        .route(
            "/v1/fine_tuning/jobs",
            axum::routing::post(move |_: axum::body::Bytes| {
                let creates = Arc::clone(&creates);
                async move {
                    let mut n = creates.lock().unwrap();
                    *n += 1;
                    let status = if *n == 1 {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::BAD_REQUEST
                    };
                    (status, axum::Json(json!({"error": {"message": "no"}})))
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    // Timeouts no slow machine reaches: one would turn the 400 into a lost answer.
    let api = FineTuningApi::new(
        client::build_client(None).unwrap(),
        client::parse_base(&base).unwrap(),
        None,
        None,
        Duration::from_secs(60),
        Duration::from_secs(60),
        Dialect::OpenAi,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.jsonl");
    std::fs::write(&path, "{}\n").unwrap();
    let submit = |job: &'static str| {
        let (api, path) = (&api, &path);
        async move {
            let names = fine_tuning::upload_names(job);
            for name in &names {
                api.upload(path, name).await.unwrap();
            }
            let err = api.create_job(&json!({})).await.unwrap_err();
            api.keep_if_used(&names, &err);
            api.discard_uploads(&names).await.unwrap();
        }
    };
    // The 500: both files stay, for the run that may exist.
    submit("01LOST").await;
    assert!(deleted.lock().unwrap().is_empty());
    // The 400: both go.
    submit("01REFUSED").await;
    assert_eq!(*deleted.lock().unwrap(), ["file-3", "file-4"]);
    // An earlier submission's file, found at the provider, is never this process's to delete.
    let [train, _] = fine_tuning::upload_names("01EARLIER");
    api.reuse_upload(
        serde_json::from_value(json!({"id": "file-9", "filename": train, "status": "processed"}))
            .unwrap(),
    );
    api.discard_uploads(&fine_tuning::upload_names("01EARLIER"))
        .await
        .unwrap();
    assert_eq!(deleted.lock().unwrap().len(), 2);
    server.abort();
}
