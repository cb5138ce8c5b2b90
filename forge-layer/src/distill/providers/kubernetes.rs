//! LoRA training as a Kubernetes `batch/v1` Job over REST, then the adapter loaded into vLLM under a versioned name.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};
use reqwest::Url;
use serde::Deserialize;
use serde_json::{Value, json};

use super::client::{self, Secret, sensitive_header};
use super::config::{
    Env, KubernetesConfig, ProviderSetupError, name_or, process_env, required, resolve_secret,
    seconds, setting,
};
use super::naming::{dns_label, short_id, slug};
use crate::distill::provider::{
    BoxFuture, Deployed, Progress, ProviderError, ProviderState, Submitted, TrainingProvider,
    TrainingRequest,
};

/// Where a pod finds its service account's token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The trainer's environment: the URL it downloads the training JSONL from.
pub const TRAINER_ENV_DATASET_URL: &str = "FORGE_DATASET_URL";
/// The trainer's environment: the bearer token that URL needs (`Authorization: Bearer …`).
pub const TRAINER_ENV_DATASET_TOKEN: &str = "FORGE_DATASET_TOKEN";
/// The trainer's environment: the base model to adapt (a Hugging Face id or a path).
pub const TRAINER_ENV_BASE_MODEL: &str = "FORGE_BASE_MODEL";
/// The trainer's environment: the directory to write the PEFT adapter to, as vLLM will read it.
pub const TRAINER_ENV_OUTPUT_DIR: &str = "FORGE_OUTPUT_DIR";
/// The trainer's environment: Forge's job id.
pub const TRAINER_ENV_JOB_ID: &str = "FORGE_JOB_ID";
/// The trainer's environment: epochs, when set (otherwise the trainer's default).
pub const TRAINER_ENV_N_EPOCHS: &str = "FORGE_N_EPOCHS";
/// The trainer's environment: batch size, when set.
pub const TRAINER_ENV_BATCH_SIZE: &str = "FORGE_BATCH_SIZE";
/// The trainer's environment: learning-rate multiplier, when set.
pub const TRAINER_ENV_LEARNING_RATE_MULTIPLIER: &str = "FORGE_LEARNING_RATE_MULTIPLIER";

/// Job and pod labels: `app` marks every trainer, `forge/job` ties it to Forge's job.
const APP_LABEL: &str = "forge-train";
const JOB_LABEL: &str = "forge/job";
/// Records on the Job where its adapter goes, so polling needs no state of Forge's own.
const ADAPTER_ANNOTATION: &str = "forge/adapter-path";
/// Names of Jobs end up in the `job-name` pod label, which is limited to 63 characters.
const MAX_JOB_NAME: usize = 63;
/// The part of a lora name taken from the base model.
const MAX_BASE_IN_NAME: usize = 40;
const CONTAINER: &str = "train";
const VOLUME: &str = "adapters";

/// Trains a LoRA adapter with a trainer image run as a Kubernetes Job, then serves it from
/// vLLM. The Job downloads Forge's dataset from [`TrainingRequest::dataset_url`] and writes the
/// adapter to `{adapter_root}/{adapter name}`, a directory vLLM reads too; `deploy` loads it under a
/// name versioned by Forge's job, so the previous student keeps serving until the route moves.
#[derive(Debug)]
pub struct KubernetesProvider {
    api: reqwest::Client,
    api_server: Url,
    namespace: String,
    token: Secret,
    timeout: Duration,
    trainer: Trainer,
    vllm: reqwest::Client,
    vllm_url: Url,
    vllm_auth: Option<HeaderValue>,
    upstream: String,
    /// Jobs this provider deleted (cancelled): only for those does a 404 mean "cancelled"; any
    /// other missing Job is reported as the 404 it is (a TTL, a changed namespace, a hand).
    deleted: std::sync::Mutex<std::collections::HashSet<String>>,
}

#[derive(Debug)]
struct Trainer {
    image: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    gpu_limit: u32,
    memory_limit: Option<String>,
    service_account: Option<String>,
    adapter_pvc: Option<String>,
    adapter_root: String,
    backoff_limit: u32,
    active_deadline_secs: u64,
    ttl_secs_after_finished: u64,
}

impl KubernetesProvider {
    /// Builds the provider; in a cluster, the service account's files fill in what isn't set.
    pub fn new(config: &KubernetesConfig) -> Result<Self, ProviderSetupError> {
        Self::from_config(config, &process_env)
    }

    pub(super) fn from_config(
        config: &KubernetesConfig,
        env: Env<'_>,
    ) -> Result<Self, ProviderSetupError> {
        let account = Path::new(SERVICE_ACCOUNT_DIR);
        let api_server = match &config.api_server {
            Some(url) => url.clone(),
            None => match (
                env("KUBERNETES_SERVICE_HOST"),
                env("KUBERNETES_SERVICE_PORT"),
            ) {
                (Some(host), Some(port)) if host.contains(':') => {
                    format!("https://[{host}]:{port}")
                }
                (Some(host), Some(port)) => format!("https://{host}:{port}"),
                _ => return Err(setting("api_server", "is required outside a cluster")),
            },
        };
        let api_server =
            client::parse_base(&api_server).map_err(|reason| setting("api_server", reason))?;
        let namespace = match &config.namespace {
            Some(namespace) => required("namespace", namespace)?,
            None => std::fs::read_to_string(account.join("namespace"))
                .map(|text| text.trim().to_owned())
                .ok()
                .filter(|namespace| !namespace.is_empty())
                .ok_or_else(|| setting("namespace", "is required outside a cluster"))?,
        };
        if slug(&namespace) != namespace {
            return Err(setting(
                "namespace",
                format!("{namespace:?} is not a Kubernetes namespace name"),
            ));
        }
        let token = match resolve_secret(
            "token",
            config.token.as_ref(),
            config.token_env.as_deref(),
            config.token_file.as_ref(),
            env,
        )? {
            Some(token) => token,
            None => {
                let path = account.join("token");
                if !path.exists() {
                    return Err(setting("token", "is required outside a cluster"));
                }
                Secret::File(path)
            }
        };
        let ca_file = match &config.ca_file {
            Some(path) => Some(path.clone()),
            None => Some(account.join("ca.crt")).filter(|path| path.exists()),
        };
        let roots = match &ca_file {
            Some(path) => Some(read_ca(path)?),
            None => None,
        };
        let api = client::build_client(roots).map_err(ProviderSetupError::Client)?;

        let adapter_root = name_or("adapter_root", config.adapter_root.as_deref(), "/adapters")?;
        if !adapter_root.starts_with('/') {
            return Err(setting("adapter_root", "must be an absolute path"));
        }
        let trainer = Trainer {
            image: required("image", &config.image)?,
            args: config.args.clone(),
            env: extra_env(&config.env)?,
            gpu_limit: config.gpu_limit.unwrap_or(1),
            memory_limit: config.memory_limit.clone(),
            service_account: config.service_account.clone(),
            adapter_pvc: config.adapter_pvc.clone(),
            adapter_root: adapter_root.trim_end_matches('/').to_owned(),
            backoff_limit: config.backoff_limit.unwrap_or(0),
            active_deadline_secs: seconds(
                "active_deadline_secs",
                config.active_deadline_secs,
                21_600,
            )?
            .as_secs(),
            ttl_secs_after_finished: match config.ttl_secs_after_finished {
                // The Job field is an int32.
                Some(ttl) if ttl > i32::MAX as u64 => {
                    return Err(setting(
                        "ttl_secs_after_finished",
                        format!("must be at most {}", i32::MAX),
                    ));
                }
                // A week, the longest `max_training_secs`: a Job that ends while Forge is down
                // must still be there, with its adapter's path, when Forge is back; one
                // collected before is a run Forge can no longer follow.
                ttl => ttl.unwrap_or(604_800),
            },
        };

        let vllm_url = required("vllm_url", &config.vllm_url)?;
        let vllm_url = vllm_url.trim_end_matches('/');
        let vllm_url = vllm_url.strip_suffix("/v1").unwrap_or(vllm_url);
        let vllm_url =
            client::parse_base(vllm_url).map_err(|reason| setting("vllm_url", reason))?;
        let vllm_auth = match resolve_secret(
            "vllm_api_key",
            config.vllm_api_key.as_ref(),
            config.vllm_api_key_env.as_deref(),
            None,
            env,
        )? {
            Some(Secret::Value(key)) => {
                Some(sensitive_header("Bearer ", &key).map_err(|()| {
                    setting("vllm_api_key", "has characters not allowed in a header")
                })?)
            }
            _ => None,
        };
        Ok(Self {
            api,
            api_server,
            namespace,
            token,
            timeout: seconds("timeout_secs", config.timeout_secs, 60)?,
            trainer,
            vllm: client::build_client(None).map_err(ProviderSetupError::Client)?,
            vllm_url,
            vllm_auth,
            upstream: name_or("upstream", config.upstream.as_deref(), "vllm")?,
            deleted: Default::default(),
        })
    }

    fn jobs_url(&self, name: Option<&str>) -> Url {
        let mut segments = vec![
            "apis",
            "batch",
            "v1",
            "namespaces",
            self.namespace.as_str(),
            "jobs",
        ];
        segments.extend(name);
        client::endpoint(&self.api_server, &segments, &[])
    }

    /// A request to the API server, with the token as it is now (it rotates).
    async fn api_request(
        &self,
        method: Method,
        url: Url,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let token = self.token.header("Bearer ").await?;
        Ok(self
            .api
            .request(method, url)
            .timeout(self.timeout)
            .header(http::header::AUTHORIZATION, token)
            .header(http::header::ACCEPT, "application/json"))
    }

    async fn submit_run(&self, request: &TrainingRequest) -> Result<Submitted, ProviderError> {
        let Some((dataset_url, dataset_token)) = &request.dataset_url else {
            return Err(ProviderError::Invalid(
                "the Kubernetes provider needs the dataset URL the trainer downloads from".into(),
            ));
        };
        let name = job_name(&request.job_id);
        let adapter_path = format!(
            "{}/{}",
            self.trainer.adapter_root,
            adapter_name(&request.base_model, &request.job_id)
        );
        let manifest =
            self.trainer
                .manifest(&name, &adapter_path, request, dataset_url, dataset_token);
        let post = self
            .api_request(Method::POST, self.jobs_url(None))
            .await?
            .json(&manifest);
        let response = post.send().await.map_err(|err| client::transport(&err))?;
        match response.status() {
            status if status.is_success() => {
                tracing::info!(job_id = %request.job_id, job = %name, namespace = %self.namespace, "training Job created");
            }
            // Same job id, same name: an earlier attempt got this far before Forge stopped.
            StatusCode::CONFLICT => {
                tracing::info!(job_id = %request.job_id, job = %name, "training Job already exists; resuming it");
            }
            _ => return Err(client::error_from(response).await),
        }
        Ok(Submitted {
            provider_job_id: name,
            training_file_id: None,
        })
    }

    /// The training Job of Forge job `job_id`, if it exists (a run that has succeeded too: its
    /// adapter is paid for, and the job's next poll keeps it).
    async fn find_job(&self, job_id: &str) -> Result<Option<String>, ProviderError> {
        let name = job_name(job_id);
        match self.poll_job(&name).await {
            Ok(_) => Ok(Some(name)),
            Err(ProviderError::Http { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn poll_job(&self, name: &str) -> Result<Progress, ProviderError> {
        let get = self
            .api_request(Method::GET, self.jobs_url(Some(name)))
            .await?;
        let (state, provider_status) = match client::send_json::<Job>(get).await {
            Ok(job) => job.state(),
            Err(ProviderError::Http { status: 404, .. }) if self.deleted().contains(name) => {
                (ProviderState::Cancelled, "Deleted".to_string())
            }
            Err(e) => return Err(e),
        };
        Ok(Progress {
            state,
            provider_status,
            metrics: BTreeMap::new(),
        })
    }

    fn deleted(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.deleted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes the Job, and its pod with it (background propagation); one already gone is fine.
    /// A Job that has finished is left alone (409): its adapter may be what the job deploys
    /// next. A Job that finishes between the look and the delete is still deleted; the adapter
    /// stays on its volume, and the job's error names the run.
    async fn delete_job(&self, name: &str) -> Result<(), ProviderError> {
        let progress = match self.poll_job(name).await {
            Ok(progress) => Some(progress),
            Err(ProviderError::Http { status: 404, .. }) => None,
            Err(e) => return Err(e),
        };
        if let Some(Progress {
            state: ProviderState::Succeeded { .. } | ProviderState::Failed { .. },
            provider_status,
            ..
        }) = progress
        {
            return Err(ProviderError::Ended(format!(
                "the Job {name} has finished ({provider_status})"
            )));
        }
        self.deleted().insert(name.to_owned());
        let mut url = self.jobs_url(Some(name));
        url.query_pairs_mut()
            .append_pair("propagationPolicy", "Background");
        match client::send(self.api_request(Method::DELETE, url).await?).await {
            Ok(_) | Err(ProviderError::Http { status: 404, .. }) => {
                tracing::info!(job = %name, namespace = %self.namespace, "training Job deleted");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn load_adapter(
        &self,
        job_id: &str,
        adapter_path: &str,
    ) -> Result<Deployed, ProviderError> {
        let lora_name = lora_name(job_id, adapter_path);
        let url = client::endpoint(&self.vllm_url, &["v1", "load_lora_adapter"], &[]);
        let mut post = self
            .vllm
            .post(url)
            .timeout(self.timeout)
            .json(&json!({"lora_name": lora_name, "lora_path": adapter_path}));
        if let Some(auth) = &self.vllm_auth {
            post = post.header(http::header::AUTHORIZATION, auth.clone());
        }
        match client::send(post).await {
            // The body is plain text ("Success: LoRA adapter '…' added successfully."), not JSON.
            Ok(_) => {
                tracing::info!(lora_name = %lora_name, path = %adapter_path, "LoRA adapter loaded into vLLM")
            }
            Err(ProviderError::Http {
                status: 400,
                message,
            }) if message.to_ascii_lowercase().contains("already been loaded") => {
                tracing::info!(lora_name = %lora_name, "LoRA adapter was already loaded");
            }
            Err(err) => return Err(err),
        }
        Ok(Deployed {
            upstream: self.upstream.clone(),
            model: lora_name,
        })
    }

    /// Unloads the adapter `lora_name` from vLLM. A 404 naming the adapter means it is not
    /// loaded, which is as good; any other 404 (no such endpoint: runtime LoRA updates are off)
    /// is an error.
    async fn unload_adapter(&self, lora_name: &str) -> Result<(), ProviderError> {
        let url = client::endpoint(&self.vllm_url, &["v1", "unload_lora_adapter"], &[]);
        let mut post = self
            .vllm
            .post(url)
            .timeout(self.timeout)
            .json(&json!({"lora_name": lora_name}));
        if let Some(auth) = &self.vllm_auth {
            post = post.header(http::header::AUTHORIZATION, auth.clone());
        }
        match client::send(post).await {
            Ok(_) => {}
            Err(ProviderError::Http {
                status: 404,
                message,
            }) if message.contains(lora_name) => {}
            Err(err) => return Err(err),
        }
        tracing::info!(lora_name = %lora_name, "LoRA adapter unloaded from vLLM");
        Ok(())
    }
}

/// The names Forge sets on the trainer, which `env` must not override.
const RESERVED_ENV: &[&str] = &[
    TRAINER_ENV_DATASET_URL,
    TRAINER_ENV_DATASET_TOKEN,
    TRAINER_ENV_BASE_MODEL,
    TRAINER_ENV_OUTPUT_DIR,
    TRAINER_ENV_JOB_ID,
    TRAINER_ENV_N_EPOCHS,
    TRAINER_ENV_BATCH_SIZE,
    TRAINER_ENV_LEARNING_RATE_MULTIPLIER,
];

fn extra_env(env: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, ProviderSetupError> {
    env.iter()
        .map(|(name, value)| {
            let key = format!("env.{name}");
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !valid {
                return Err(setting(&key, "is not a valid environment variable name"));
            }
            if RESERVED_ENV.contains(&name.as_str()) {
                return Err(setting(&key, "is set by Forge itself"));
            }
            Ok((name.clone(), value.clone()))
        })
        .collect()
}

fn read_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, ProviderSetupError> {
    let pem = std::fs::read(path)
        .map_err(|err| setting("ca_file", format!("cannot read {}: {err}", path.display())))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|err| {
        setting(
            "ca_file",
            format!("{} is not a PEM bundle: {err}", path.display()),
        )
    })?;
    if certs.is_empty() {
        return Err(setting(
            "ca_file",
            format!("{} holds no certificate", path.display()),
        ));
    }
    Ok(certs)
}

impl Trainer {
    fn manifest(
        &self,
        name: &str,
        adapter_path: &str,
        request: &TrainingRequest,
        dataset_url: &str,
        dataset_token: &str,
    ) -> Value {
        let mut env = vec![
            json!({"name": TRAINER_ENV_JOB_ID, "value": request.job_id}),
            json!({"name": TRAINER_ENV_DATASET_URL, "value": dataset_url}),
            json!({"name": TRAINER_ENV_DATASET_TOKEN, "value": dataset_token}),
            json!({"name": TRAINER_ENV_BASE_MODEL, "value": request.base_model}),
            json!({"name": TRAINER_ENV_OUTPUT_DIR, "value": adapter_path}),
        ];
        let h = &request.hyperparameters;
        let settings = [
            (TRAINER_ENV_N_EPOCHS, h.n_epochs.map(|n| n.to_string())),
            (TRAINER_ENV_BATCH_SIZE, h.batch_size.map(|n| n.to_string())),
            (
                TRAINER_ENV_LEARNING_RATE_MULTIPLIER,
                h.learning_rate_multiplier.map(|m| m.to_string()),
            ),
        ];
        for (key, value) in settings {
            if let Some(value) = value {
                env.push(json!({"name": key, "value": value}));
            }
        }
        for (key, value) in &self.env {
            env.push(json!({"name": key, "value": value}));
        }
        let mut limits = serde_json::Map::new();
        if self.gpu_limit > 0 {
            // An extended resource: the request defaults to the limit.
            limits.insert("nvidia.com/gpu".into(), json!(self.gpu_limit));
        }
        if let Some(memory) = &self.memory_limit {
            limits.insert("memory".into(), json!(memory));
        }
        let mut container = json!({
            "name": CONTAINER,
            "image": self.image,
            "env": env,
            "resources": {"limits": limits},
        });
        if !self.args.is_empty() {
            container["args"] = json!(self.args);
        }
        let mut pod = json!({
            "restartPolicy": "Never",
            "containers": [],
        });
        if let Some(claim) = &self.adapter_pvc {
            container["volumeMounts"] = json!([{"name": VOLUME, "mountPath": self.adapter_root}]);
            pod["volumes"] =
                json!([{"name": VOLUME, "persistentVolumeClaim": {"claimName": claim}}]);
        }
        if let Some(account) = &self.service_account {
            pod["serviceAccountName"] = json!(account);
        }
        pod["containers"] = json!([container]);
        let labels = json!({"app": APP_LABEL, (JOB_LABEL): job_label(&request.job_id)});
        json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": {(ADAPTER_ANNOTATION): adapter_path},
            },
            "spec": {
                "backoffLimit": self.backoff_limit,
                "ttlSecondsAfterFinished": self.ttl_secs_after_finished,
                "activeDeadlineSeconds": self.active_deadline_secs,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": pod,
                },
            },
        })
    }
}

/// The Job's name: `forge-train-<job id>`, a DNS-1123 label of at most 63 characters.
pub(super) fn job_name(job_id: &str) -> String {
    dns_label("forge-train-", job_id, MAX_JOB_NAME)
}

/// A label value (at most 63 characters, alphanumeric at both ends).
fn job_label(job_id: &str) -> String {
    dns_label("", job_id, MAX_JOB_NAME)
        .trim_start_matches('-')
        .to_owned()
}

/// The adapter's directory name, which is also the name vLLM serves it under:
/// `<base model>-forge-<last 8 of the job id>`, e.g. `llama-3-1-8b-instruct-forge-7k2m9qxa`.
pub(super) fn adapter_name(base_model: &str, job_id: &str) -> String {
    let base = base_model
        .rsplit('/')
        .find(|segment| !segment.is_empty())
        .unwrap_or_default();
    let base = slug(base);
    let base = base[..base.len().min(MAX_BASE_IN_NAME)].trim_end_matches('-');
    let base = if base.is_empty() { "student" } else { base };
    let short = short_id(job_id, 8);
    if short.is_empty() {
        format!("{base}-forge")
    } else {
        format!("{base}-forge-{short}")
    }
}

/// The name to load an adapter under: its directory's name, which `submit` made unique per
/// job; an odd path falls back to one made from the job id.
fn lora_name(job_id: &str, adapter_path: &str) -> String {
    let dir = adapter_path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let name = slug(dir);
    if name.is_empty() {
        adapter_name("", job_id)
    } else {
        name
    }
}

/// The parts of a Job that polling reads.
#[derive(Deserialize)]
pub(super) struct Job {
    #[serde(default)]
    metadata: JobMetadata,
    #[serde(default)]
    spec: Value,
    #[serde(default)]
    status: JobStatus,
}

#[derive(Default, Deserialize)]
struct JobMetadata {
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
struct JobStatus {
    #[serde(default)]
    active: Option<u32>,
    #[serde(default)]
    ready: Option<u32>,
    #[serde(default)]
    conditions: Vec<Condition>,
}

#[derive(Deserialize)]
struct Condition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl Job {
    /// Finished only on a `Complete` or `Failed` condition that is `"True"`: `SuccessCriteriaMet`
    /// and `FailureTarget` come first, while pods may still be terminating.
    pub(super) fn state(&self) -> (ProviderState, String) {
        let holds = |kind: &str| {
            self.status
                .conditions
                .iter()
                .find(|condition| condition.kind == kind && condition.status == "True")
        };
        if let Some(failed) = holds("Failed") {
            let reason = failed.reason.as_deref().unwrap_or("Failed");
            let error = match failed
                .message
                .as_deref()
                .filter(|message| !message.is_empty())
            {
                Some(message) => format!("{reason}: {message}"),
                None => reason.to_owned(),
            };
            return (ProviderState::Failed { error }, "Failed".into());
        }
        if holds("Complete").is_some() {
            let state = match self.adapter_path() {
                Some(model) => ProviderState::Succeeded { model },
                None => ProviderState::Failed {
                    error: format!(
                        "the Job completed but names no adapter path (annotation {ADAPTER_ANNOTATION})"
                    ),
                },
            };
            return (state, "Complete".into());
        }
        // Decided but not final: the Job's pods are still being cleaned up, and on success the
        // adapter may not be in place yet. Still running, not back to pending.
        for interim in ["SuccessCriteriaMet", "FailureTarget"] {
            if holds(interim).is_some() {
                return (ProviderState::Running, interim.into());
            }
        }
        if holds("Suspended").is_some() {
            return (ProviderState::Queued, "Suspended".into());
        }
        let running = match (self.status.ready, self.status.active) {
            (Some(ready), _) => ready > 0,
            (None, active) => active.unwrap_or(0) > 0,
        };
        if running {
            (ProviderState::Running, "Running".into())
        } else {
            (ProviderState::Queued, "Pending".into())
        }
    }

    /// From the annotation `submit` wrote, or else the trainer's output directory.
    fn adapter_path(&self) -> Option<String> {
        if let Some(path) = self.metadata.annotations.get(ADAPTER_ANNOTATION) {
            return Some(path.clone());
        }
        let containers = self.spec.pointer("/template/spec/containers")?.as_array()?;
        containers
            .iter()
            .filter_map(|container| container.get("env")?.as_array())
            .flatten()
            .find(|var| var.get("name").and_then(Value::as_str) == Some(TRAINER_ENV_OUTPUT_DIR))
            .and_then(|var| var.get("value")?.as_str())
            .map(str::to_owned)
    }
}

impl TrainingProvider for KubernetesProvider {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn submit<'a>(
        &'a self,
        request: &'a TrainingRequest,
    ) -> BoxFuture<'a, Result<Submitted, ProviderError>> {
        Box::pin(self.submit_run(request))
    }

    fn serving_upstream(&self) -> Option<&str> {
        Some(&self.upstream)
    }

    /// The Job is named after the Forge job, and `submit` takes over one that exists.
    fn finds_earlier_submissions(&self) -> bool {
        true
    }

    fn earlier_submission<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, ProviderError>> {
        Box::pin(self.find_job(job_id))
    }

    /// A Job that is gone (and that this provider did not delete) has ended for good: its pod
    /// went with it, and nothing of its run can be followed.
    fn poll<'a>(
        &'a self,
        provider_job_id: &'a str,
    ) -> BoxFuture<'a, Result<Progress, ProviderError>> {
        Box::pin(async move {
            match self.poll_job(provider_job_id).await {
                Err(ProviderError::Http {
                    status: 404,
                    message,
                }) => Err(ProviderError::Ended(format!(
                    "the Job {provider_job_id} is gone ({message}): deleted by its TTL, by hand, or in another namespace"
                ))),
                other => other,
            }
        })
    }

    fn cancel<'a>(&'a self, provider_job_id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.delete_job(provider_job_id))
    }

    fn deploy<'a>(
        &'a self,
        job_id: &'a str,
        trained_model: &'a str,
    ) -> BoxFuture<'a, Result<Deployed, ProviderError>> {
        Box::pin(self.load_adapter(job_id, trained_model))
    }

    fn costs_while_idle(&self) -> bool {
        true
    }

    fn undeploy<'a>(&'a self, model: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.unload_adapter(model))
    }
}
