//! Provider settings as written in config (`provider = "openai" | "sim" | "azure" | "kubernetes"`), and their validation into a provider.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::azure::AzureProvider;
use super::client::Secret;
use super::kubernetes::KubernetesProvider;
use super::openai::OpenAiProvider;
use crate::distill::provider::TrainingProvider;

/// Reads an environment variable; a parameter so that tests need not touch the process's.
pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Which service trains a route's students and how to reach it, tagged by `provider`.
///
/// ```
/// use forge_layer::distill::providers::ProviderConfig;
///
/// let config: ProviderConfig = serde_json::from_value(serde_json::json!({
///     "provider": "openai",
///     "api_key_env": "OPENAI_API_KEY",
/// }))
/// .unwrap();
/// assert!(matches!(config, ProviderConfig::OpenAi(_)));
///
/// // A typo is an error that names the key.
/// let err = serde_json::from_value::<ProviderConfig>(serde_json::json!({
///     "provider": "openai",
///     "api_kee": "sk-…",
/// }))
/// .unwrap_err();
/// assert!(err.to_string().contains("api_kee"));
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "provider")]
#[non_exhaustive]
pub enum ProviderConfig {
    /// OpenAI's fine-tuning API.
    #[serde(rename = "openai")]
    OpenAi(OpenAiConfig),
    /// The simulated upstream's copy of OpenAI's fine-tuning API.
    #[serde(rename = "sim")]
    Sim(OpenAiConfig),
    /// Azure OpenAI fine-tuning, then an ARM deployment.
    #[serde(rename = "azure")]
    Azure(AzureConfig),
    /// A LoRA run as a Kubernetes Job, then the adapter loaded into vLLM.
    #[serde(rename = "kubernetes")]
    Kubernetes(KubernetesConfig),
}

impl ProviderConfig {
    /// Checks the settings, resolves the `*_env` keys from the environment and builds the
    /// provider. Nothing is sent anywhere yet.
    pub fn build(&self) -> Result<Box<dyn TrainingProvider>, ProviderSetupError> {
        self.build_with_env(&process_env)
    }

    pub(super) fn build_with_env(
        &self,
        env: Env<'_>,
    ) -> Result<Box<dyn TrainingProvider>, ProviderSetupError> {
        Ok(match self {
            ProviderConfig::OpenAi(config) => {
                Box::new(OpenAiProvider::from_config(config, "openai", env)?)
            }
            ProviderConfig::Sim(config) => {
                Box::new(OpenAiProvider::from_config(config, "sim", env)?)
            }
            ProviderConfig::Azure(config) => Box::new(AzureProvider::from_config(config, env)?),
            ProviderConfig::Kubernetes(config) => {
                Box::new(KubernetesProvider::from_config(config, env)?)
            }
        })
    }
}

pub(super) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Settings that could not be turned into a provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderSetupError {
    /// A setting is missing, malformed, or names an environment variable or file that isn't there.
    #[error("training provider setting `{key}`: {reason}")]
    Setting {
        /// The key, as written in config.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built (e.g. an unreadable CA certificate).
    #[error("training provider HTTP client: {0}")]
    Client(String),
}

pub(super) fn setting(key: &str, reason: impl Into<String>) -> ProviderSetupError {
    ProviderSetupError::Setting {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// A secret written in config; it never shows in debug output.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub(super) fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SecretString {
    fn from(secret: &str) -> Self {
        Self::new(secret)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Settings for `provider = "openai"` and `provider = "sim"`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// The API's base URL, version path included. Default for `openai`:
    /// `https://api.openai.com/v1`; `sim` requires it (the simulated upstream's
    /// `http://HOST:PORT/v1`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The API key, sent only as `Authorization: Bearer`. Prefer `api_key_env`. `openai` needs
    /// one of the two; `sim` needs one only if the simulated upstream was given a key.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// The environment variable that holds the API key, e.g. `OPENAI_API_KEY`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The Forge upstream that serves the fine-tuned `ft:…` models. Default: `openai`, or `sim`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Timeout of each API call, in seconds. Default 60.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Timeout of one training-file upload, in seconds. Default 3600.
    #[serde(default)]
    pub upload_timeout_secs: Option<u64>,
}

/// Settings for `provider = "azure"`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// The Azure OpenAI resource, e.g. `https://my-resource.openai.azure.com`. Required.
    pub endpoint: String,
    /// The `api-version` of the files and fine-tuning calls. Default `2024-10-21`.
    #[serde(default)]
    pub api_version: Option<String>,
    /// The resource's key, sent as the `api-key` header. One of `api_key` and `api_key_env`
    /// is required.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// The environment variable that holds the resource's key, e.g. `AZURE_OPENAI_API_KEY`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The Forge upstream that serves this resource's deployments (inference picks the model
    /// by deployment name). Default `azure`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Timeout of each API call, in seconds. Default 60.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Timeout of one training-file upload, in seconds. Default 3600.
    #[serde(default)]
    pub upload_timeout_secs: Option<u64>,
    /// The longest wait for an uploaded file to be `processed` before the job is created, in
    /// seconds. Default 1800.
    #[serde(default)]
    pub file_wait_secs: Option<u64>,
    /// Where trained models are deployed (Azure needs a deployment before a model can be used).
    pub deployment: AzureDeploymentConfig,
}

/// The Azure Resource Manager settings of the deployment step (`[…deployment]`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureDeploymentConfig {
    /// The Resource Manager's base URL. Default `https://management.azure.com`.
    #[serde(default)]
    pub management_url: Option<String>,
    /// The subscription id. Required.
    pub subscription_id: String,
    /// The resource group of the Azure OpenAI resource. Required.
    pub resource_group: String,
    /// The Azure OpenAI resource's name (`…/accounts/{account}`). Required.
    pub account: String,
    /// The Resource Manager `api-version`. Default `2024-10-21`.
    #[serde(default)]
    pub api_version: Option<String>,
    /// An Entra bearer token for the Resource Manager (not the resource key). Exactly one of
    /// `token`, `token_env` and `token_file` is required.
    #[serde(default)]
    pub token: Option<SecretString>,
    /// The environment variable that holds the bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// A file that holds the bearer token, re-read on every deployment, so that something else
    /// can keep it fresh (Entra tokens last about an hour).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The deployment SKU. Default `standard`.
    #[serde(default)]
    pub sku: Option<String>,
    /// The deployment capacity. Default 1.
    #[serde(default)]
    pub capacity: Option<u32>,
    /// The longest wait for a deployment to reach `Succeeded`, in seconds. Default 10800 (3 h).
    #[serde(default)]
    pub wait_secs: Option<u64>,
}

/// Settings for `provider = "kubernetes"`: a LoRA trainer run as a `batch/v1` Job, then served
/// by vLLM.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The API server. Default, in a cluster:
    /// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    #[serde(default)]
    pub api_server: Option<String>,
    /// The namespace the Jobs run in. Default: the service account's namespace file.
    #[serde(default)]
    pub namespace: Option<String>,
    /// A bearer token for the API server. Default: the service account's token file,
    /// re-read on every call since it rotates. At most one of `token`, `token_env`,
    /// `token_file`.
    #[serde(default)]
    pub token: Option<SecretString>,
    /// The environment variable that holds the bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// A file that holds the bearer token, re-read on every call.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The PEM CA bundle that signs the API server's certificate; only it is trusted. Default:
    /// the service account's `ca.crt` when present, otherwise the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The PEFT trainer image. Required.
    pub image: String,
    /// Arguments for the trainer container. Default none: the image's entrypoint reads the
    /// `FORGE_*` environment.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment for the trainer container, e.g. cache directories. Not for secrets:
    /// values are written into the Job, where anyone who can read Jobs sees them. The `FORGE_*`
    /// names Forge sets itself can't be overridden.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// GPUs per run (`nvidia.com/gpu` limit). Default 1; 0 asks for none.
    #[serde(default)]
    pub gpu_limit: Option<u32>,
    /// The trainer's memory limit, e.g. `64Gi`. Default none.
    #[serde(default)]
    pub memory_limit: Option<String>,
    /// The service account the trainer pod runs as. Default: the namespace's default.
    #[serde(default)]
    pub service_account: Option<String>,
    /// A persistent volume claim, shared with vLLM, mounted at `adapter_root`. Default none
    /// (the image must put the adapter where vLLM can read it).
    #[serde(default)]
    pub adapter_pvc: Option<String>,
    /// The directory, the same in the trainer and in vLLM, under which each run writes its
    /// adapter (`{adapter_root}/{adapter name}`). Default `/adapters`.
    #[serde(default)]
    pub adapter_root: Option<String>,
    /// The Job's `backoffLimit`: retries of a failed pod. Default 0, since GPU runs are costly.
    #[serde(default)]
    pub backoff_limit: Option<u32>,
    /// The Job's `activeDeadlineSeconds`: a cap on wall time. Default 21600 (6 h).
    #[serde(default)]
    pub active_deadline_secs: Option<u64>,
    /// The Job's `ttlSecondsAfterFinished`. Default 604800 (a week).
    #[serde(default)]
    pub ttl_secs_after_finished: Option<u64>,
    /// vLLM's base URL, e.g. `http://vllm:8000/v1` (with or without `/v1`). Required. vLLM must
    /// run with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`.
    pub vllm_url: String,
    /// vLLM's `--api-key`, if it has one.
    #[serde(default)]
    pub vllm_api_key: Option<SecretString>,
    /// The environment variable that holds vLLM's key.
    #[serde(default)]
    pub vllm_api_key_env: Option<String>,
    /// The Forge upstream that routes to that vLLM. Default `vllm`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Timeout of each API call, in seconds. Default 60.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// Resolves at most one of a secret's sources; `key` names the inline one in errors.
pub(super) fn resolve_secret(
    key: &str,
    value: Option<&SecretString>,
    env_key: Option<&str>,
    file: Option<&PathBuf>,
    env: Env<'_>,
) -> Result<Option<Secret>, ProviderSetupError> {
    let given: Vec<String> = [
        value.map(|_| key.to_owned()),
        env_key.map(|_| format!("{key}_env")),
        file.map(|_| format!("{key}_file")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if given.len() > 1 {
        return Err(setting(
            key,
            format!("set only one of {}", given.join(", ")),
        ));
    }
    if let Some(value) = value {
        if value.expose().trim().is_empty() {
            return Err(setting(key, "is empty"));
        }
        return Ok(Some(Secret::Value(value.expose().trim().to_owned())));
    }
    if let Some(name) = env_key {
        return match env(name) {
            Some(value) if !value.trim().is_empty() => {
                Ok(Some(Secret::Value(value.trim().to_owned())))
            }
            _ => Err(setting(
                &format!("{key}_env"),
                format!("the environment variable {name} is not set or empty"),
            )),
        };
    }
    Ok(file.map(|path| Secret::File(path.clone())))
}

/// The trimmed value of a required string setting.
pub(super) fn required(key: &str, value: &str) -> Result<String, ProviderSetupError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(setting(key, "is required"));
    }
    Ok(value.to_owned())
}

/// The longest wait or timeout a provider setting may give: 30 days. A deadline is the clock
/// plus this, and a huge value would overflow it (a panic the first time a job waits).
pub(super) const MAX_SECONDS: u64 = 30 * 86_400;

/// A number of seconds from 1 to [`MAX_SECONDS`], or the default.
pub(super) fn seconds(
    key: &str,
    value: Option<u64>,
    default: u64,
) -> Result<Duration, ProviderSetupError> {
    match value {
        Some(secs) if !(1..=MAX_SECONDS).contains(&secs) => Err(setting(
            key,
            format!("must be from 1 to {MAX_SECONDS} (30 days)"),
        )),
        Some(secs) => Ok(Duration::from_secs(secs)),
        None => Ok(Duration::from_secs(default)),
    }
}

/// A non-empty name, or the default.
pub(super) fn name_or(
    key: &str,
    value: Option<&str>,
    default: &str,
) -> Result<String, ProviderSetupError> {
    match value.map(str::trim) {
        Some("") => Err(setting(key, "must not be empty")),
        Some(value) => Ok(value.to_owned()),
        None => Ok(default.to_owned()),
    }
}
