//! Configuration of the simulated upstream: per-model behaviour, fine-tuning, Azure and cluster timings, and credentials, in code or TOML.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// Everything the simulated upstream can be told before it starts. The default: every model
/// behaves as [`ModelBehavior::default`], no API key or tokens, default timings.
#[derive(Clone, PartialEq, Default)]
pub struct SimConfig {
    /// Behaviour by exact model name. The key `fine-tuned` sets the behaviour of every model
    /// this sim fine-tuned (which otherwise answer with Good quality).
    pub models: HashMap<String, ModelBehavior>,
    /// Behaviour of every model not in `models`.
    pub default_behavior: ModelBehavior,
    /// How long each phase of a fine-tuning job lasts.
    pub fine_tune: FineTuneTimings,
    /// When set, every `/v1` request must carry `Authorization: Bearer <key>`, or it gets a 401
    /// `invalid_api_key`; and every Azure `/openai/…` request must carry `api-key: <key>`. When
    /// unset, `/v1` is open and Azure still wants a non-empty `api-key` header.
    pub api_key: Option<String>,
    /// How long Azure takes to process an uploaded file and to provision a deployment.
    pub azure: AzureTimings,
    /// The Entra token the ARM endpoints (`/subscriptions/…`) want as `Authorization: Bearer`.
    /// When unset, any non-empty bearer token is accepted.
    pub arm_token: Option<String>,
    /// How long a Kubernetes Job's pod waits to be scheduled and then runs.
    pub cluster: ClusterTimings,
    /// The service-account token the Kubernetes endpoints (`/api/…`, `/apis/…`) want as
    /// `Authorization: Bearer`. When unset, any non-empty bearer token is accepted.
    pub cluster_token: Option<String>,
    /// The base model vLLM serves, named as `parent` of every LoRA adapter in `/v1/models`;
    /// [`DEFAULT_LORA_BASE_MODEL`] when unset.
    pub lora_base_model: Option<String>,
}

/// The base model of LoRA adapters when [`SimConfig::lora_base_model`] is unset.
pub const DEFAULT_LORA_BASE_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

// Hand-written so that the key never reaches a log line.
impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("models", &self.models)
            .field("default_behavior", &self.default_behavior)
            .field("fine_tune", &self.fine_tune)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("azure", &self.azure)
            .field("arm_token", &self.arm_token.as_ref().map(|_| "<redacted>"))
            .field("cluster", &self.cluster)
            .field(
                "cluster_token",
                &self.cluster_token.as_ref().map(|_| "<redacted>"),
            )
            .field("lora_base_model", &self.lora_base_model)
            .finish()
    }
}

/// How one model answers chat completions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelBehavior {
    /// Wait before the response headers are sent. A non-streamed answer waits only this long.
    pub first_byte_delay: Duration,
    /// Wait between two SSE events of a streamed answer.
    pub chunk_delay: Duration,
    /// Answer every request with this status and an OpenAI-shaped error. 429 and 503 carry
    /// `retry-after: 1`; 429 and 5xx carry `x-should-retry: true`.
    pub fail_status: Option<u16>,
    /// With `fail_status`: fail only every Nth request to this model (20 = 5% of requests), so
    /// a model can be made unreliable rather than down. `None` or 1 fails every request.
    pub fail_every: Option<u64>,
    /// Streams only: after this many content chunks (words or tool-argument fragments), send a
    /// `data: {"error":{…}}` event and end the body without `[DONE]`.
    pub error_after_chunks: Option<usize>,
    /// Whether answers are informative or generic.
    pub quality: Quality,
    /// Words in a text answer; a stream sends one content chunk per word.
    pub words: usize,
    /// Streams: leave the `usage` key out of the chunks before the usage chunk, as OpenAI's
    /// recorded 2024 streams do, instead of `"usage": null`, as its spec says.
    pub omit_null_usage: bool,
}

impl Default for ModelBehavior {
    fn default() -> Self {
        Self {
            first_byte_delay: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            fail_status: None,
            fail_every: None,
            error_after_chunks: None,
            quality: Quality::Good,
            words: 24,
            omit_null_usage: false,
        }
    }
}

/// How useful a model's text answers are, so graders and judges have something to tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    /// Teacher-like: refers to the question and answers it.
    #[default]
    Good,
    /// Generic and unhelpful: "I am not sure. Please ask again."
    Poor,
}

/// How long a fine-tuning job spends in each phase before moving on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FineTuneTimings {
    /// `validating_files`, at the end of which a bad training file fails the job.
    pub validating: Duration,
    /// `queued`.
    pub queued: Duration,
    /// `running`, spread evenly over the training steps.
    pub running: Duration,
}

impl Default for FineTuneTimings {
    fn default() -> Self {
        Self {
            validating: Duration::from_secs(1),
            queued: Duration::from_secs(1),
            running: Duration::from_secs(3),
        }
    }
}

/// How long Azure OpenAI takes for the asynchronous steps a client has to poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AzureTimings {
    /// From upload until the file's `status` turns from `pending` to `processed`.
    pub file_processing: Duration,
    /// From the ARM `PUT` until the deployment's `provisioningState` is `Succeeded`.
    pub deployment: Duration,
}

impl Default for AzureTimings {
    fn default() -> Self {
        Self {
            file_processing: Duration::from_secs(1),
            deployment: Duration::from_secs(2),
        }
    }
}

/// How long a Kubernetes training Job takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterTimings {
    /// From creation until the pod runs (scheduling, image pull); the Job is `active` meanwhile.
    pub pending: Duration,
    /// How long the training container runs. A dataset fetch that takes longer extends it.
    pub running: Duration,
    /// From the container's exit until the Job's terminal condition (`Complete`, `Failed`):
    /// meanwhile the Job shows only the interim one (`SuccessCriteriaMet`, `FailureTarget`),
    /// which is not final, and the adapter is not yet in place.
    pub finishing: Duration,
}

impl Default for ClusterTimings {
    fn default() -> Self {
        Self {
            pending: Duration::from_secs(1),
            running: Duration::from_secs(3),
            finishing: Duration::from_millis(500),
        }
    }
}

impl SimConfig {
    /// Reads a configuration from TOML. Every key is optional; unknown keys are an error that
    /// names them.
    ///
    /// ```toml
    /// api_key = "sk-sim"              # require `Authorization: Bearer sk-sim` on /v1 and
    ///                                 # `api-key: sk-sim` on Azure's /openai
    /// arm_token = "entra-token"       # require this bearer token on ARM's /subscriptions
    /// cluster_token = "sa-token"      # require this bearer token on Kubernetes' /api, /apis
    /// lora_base_model = "meta-llama/Llama-3.1-8B-Instruct"  # `parent` of LoRA adapters
    ///
    /// [default_behavior]              # models not listed under [models]
    /// first_byte_delay_ms = 0         # before the response headers
    /// chunk_delay_ms = 0              # between SSE events
    /// fail_status = 503               # answer every request with this error status (400-599)
    /// fail_every = 20                  # with fail_status: only every 20th request fails (5%)
    /// error_after_chunks = 5          # streams: error event after this many content chunks
    /// quality = "good"                # "good" or "poor"
    /// words = 24                      # words per text answer (at least 1)
    /// omit_null_usage = false         # streams: no `usage` key before the usage chunk
    ///
    /// [models."gpt-4o-mini"]          # same keys as [default_behavior]; unset keys take the
    /// quality = "poor"                # built-in defaults, not those of [default_behavior]
    ///
    /// [fine_tune]
    /// validating_ms = 1000
    /// queued_ms = 1000
    /// running_ms = 3000
    ///
    /// [azure]
    /// file_processing_ms = 1000       # upload: `pending` until `processed`
    /// deployment_ms = 2000            # ARM deployment: `Creating` until `Succeeded`
    ///
    /// [cluster]
    /// pending_ms = 1000               # Kubernetes Job: pod pending
    /// running_ms = 3000               # Kubernetes Job: pod running
    /// finishing_ms = 500              # Kubernetes Job: interim condition before the final one
    /// ```
    pub fn from_toml_str(text: &str) -> Result<SimConfig, String> {
        let raw: RawSimConfig = toml::from_str(text)
            .map_err(|err| format!("invalid simulated upstream config: {err}"))?;
        raw.validate()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSimConfig {
    api_key: Option<String>,
    default_behavior: Option<RawBehavior>,
    #[serde(default)]
    models: HashMap<String, RawBehavior>,
    fine_tune: Option<RawTimings>,
    arm_token: Option<String>,
    cluster_token: Option<String>,
    lora_base_model: Option<String>,
    azure: Option<RawAzureTimings>,
    cluster: Option<RawClusterTimings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAzureTimings {
    file_processing_ms: Option<u64>,
    deployment_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClusterTimings {
    pending_ms: Option<u64>,
    running_ms: Option<u64>,
    finishing_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBehavior {
    first_byte_delay_ms: Option<u64>,
    chunk_delay_ms: Option<u64>,
    fail_status: Option<u16>,
    fail_every: Option<u64>,
    error_after_chunks: Option<usize>,
    quality: Option<Quality>,
    words: Option<usize>,
    omit_null_usage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimings {
    validating_ms: Option<u64>,
    queued_ms: Option<u64>,
    running_ms: Option<u64>,
}

impl RawSimConfig {
    fn validate(self) -> Result<SimConfig, String> {
        if self.api_key.as_deref().is_some_and(str::is_empty) {
            return Err("api_key: must not be empty (leave it out to accept any request)".into());
        }
        for (key, value) in [
            ("arm_token", &self.arm_token),
            ("cluster_token", &self.cluster_token),
            ("lora_base_model", &self.lora_base_model),
        ] {
            if value.as_deref().is_some_and(str::is_empty) {
                return Err(format!("{key}: must not be empty (leave it out instead)"));
            }
        }
        let default_behavior = match self.default_behavior {
            Some(raw) => raw.validate("default_behavior")?,
            None => ModelBehavior::default(),
        };
        let mut models = HashMap::with_capacity(self.models.len());
        for (name, raw) in self.models {
            let behavior = raw.validate(&format!("models.\"{name}\""))?;
            models.insert(name, behavior);
        }
        let fine_tune = self
            .fine_tune
            .map_or_else(FineTuneTimings::default, RawTimings::resolve);
        let azure = self.azure.map_or_else(AzureTimings::default, |raw| {
            let defaults = AzureTimings::default();
            AzureTimings {
                file_processing: millis_or(raw.file_processing_ms, defaults.file_processing),
                deployment: millis_or(raw.deployment_ms, defaults.deployment),
            }
        });
        let cluster = self.cluster.map_or_else(ClusterTimings::default, |raw| {
            let defaults = ClusterTimings::default();
            ClusterTimings {
                pending: millis_or(raw.pending_ms, defaults.pending),
                running: millis_or(raw.running_ms, defaults.running),
                finishing: millis_or(raw.finishing_ms, defaults.finishing),
            }
        });
        Ok(SimConfig {
            models,
            default_behavior,
            fine_tune,
            api_key: self.api_key,
            azure,
            arm_token: self.arm_token,
            cluster,
            cluster_token: self.cluster_token,
            lora_base_model: self.lora_base_model,
        })
    }
}

fn millis_or(ms: Option<u64>, default: Duration) -> Duration {
    ms.map_or(default, Duration::from_millis)
}

impl RawBehavior {
    fn validate(self, table: &str) -> Result<ModelBehavior, String> {
        let defaults = ModelBehavior::default();
        if let Some(status) = self.fail_status
            && !(400..=599).contains(&status)
        {
            return Err(format!(
                "{table}.fail_status: {status} is not an error status (400-599)"
            ));
        }
        if self.fail_every == Some(0) {
            return Err(format!("{table}.fail_every: must be at least 1"));
        }
        if self.words == Some(0) {
            return Err(format!("{table}.words: must be at least 1"));
        }
        Ok(ModelBehavior {
            first_byte_delay: self
                .first_byte_delay_ms
                .map_or(defaults.first_byte_delay, Duration::from_millis),
            chunk_delay: self
                .chunk_delay_ms
                .map_or(defaults.chunk_delay, Duration::from_millis),
            fail_status: self.fail_status,
            fail_every: self.fail_every,
            error_after_chunks: self.error_after_chunks,
            quality: self.quality.unwrap_or(defaults.quality),
            words: self.words.unwrap_or(defaults.words),
            omit_null_usage: self.omit_null_usage.unwrap_or(defaults.omit_null_usage),
        })
    }
}

impl RawTimings {
    fn resolve(self) -> FineTuneTimings {
        let defaults = FineTuneTimings::default();
        FineTuneTimings {
            validating: self
                .validating_ms
                .map_or(defaults.validating, Duration::from_millis),
            queued: self
                .queued_ms
                .map_or(defaults.queued, Duration::from_millis),
            running: self
                .running_ms
                .map_or(defaults.running, Duration::from_millis),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_sets_every_key() {
        let config = SimConfig::from_toml_str(
            r#"
            api_key = "sk-sim"
            [default_behavior]
            first_byte_delay_ms = 5
            chunk_delay_ms = 7
            error_after_chunks = 3
            quality = "poor"
            words = 9
            omit_null_usage = true
            [models."gpt-4o"]
            fail_status = 503
            [fine_tune]
            validating_ms = 10
            queued_ms = 20
            running_ms = 30
            "#,
        )
        .unwrap();
        assert_eq!(config.api_key.as_deref(), Some("sk-sim"));
        assert_eq!(
            config.default_behavior,
            ModelBehavior {
                first_byte_delay: Duration::from_millis(5),
                chunk_delay: Duration::from_millis(7),
                fail_status: None,
                fail_every: None,
                error_after_chunks: Some(3),
                quality: Quality::Poor,
                words: 9,
                omit_null_usage: true,
            }
        );
        let gpt4o = &config.models["gpt-4o"];
        assert_eq!(gpt4o.fail_status, Some(503));
        // A model table starts from the built-in defaults, not from [default_behavior].
        assert_eq!(gpt4o.quality, Quality::Good);
        assert_eq!(gpt4o.words, 24);
        assert_eq!(config.fine_tune.running, Duration::from_millis(30));
        assert_eq!(config.fine_tune.queued, Duration::from_millis(20));
        assert_eq!(config.fine_tune.validating, Duration::from_millis(10));
    }

    #[test]
    fn toml_sets_azure_cluster_and_tokens() {
        let config = SimConfig::from_toml_str(
            r#"
            arm_token = "entra"
            cluster_token = "sa"
            lora_base_model = "Qwen/Qwen2.5-7B-Instruct"
            [azure]
            file_processing_ms = 5
            deployment_ms = 6
            [cluster]
            pending_ms = 7
            "#,
        )
        .unwrap();
        assert_eq!(config.arm_token.as_deref(), Some("entra"));
        assert_eq!(config.cluster_token.as_deref(), Some("sa"));
        assert_eq!(
            config.lora_base_model.as_deref(),
            Some("Qwen/Qwen2.5-7B-Instruct")
        );
        assert_eq!(
            config.azure,
            AzureTimings {
                file_processing: Duration::from_millis(5),
                deployment: Duration::from_millis(6),
            }
        );
        assert_eq!(config.cluster.pending, Duration::from_millis(7));
        assert_eq!(config.cluster.running, ClusterTimings::default().running);
        let err = SimConfig::from_toml_str("[cluster]\nrun_ms = 5\n").unwrap_err();
        assert!(err.contains("run_ms"), "{err}");
        let err = SimConfig::from_toml_str("cluster_token = \"\"\n").unwrap_err();
        assert!(err.contains("cluster_token"), "{err}");
    }

    #[test]
    fn empty_toml_is_the_default() {
        assert_eq!(SimConfig::from_toml_str("").unwrap(), SimConfig::default());
    }

    #[test]
    fn typo_in_a_key_is_named() {
        let err = SimConfig::from_toml_str("[default_behavior]\nchunk_delay = 5\n").unwrap_err();
        assert!(err.contains("chunk_delay"), "{err}");
        let err = SimConfig::from_toml_str("apikey = \"x\"\n").unwrap_err();
        assert!(err.contains("apikey"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let err = SimConfig::from_toml_str("[models.m]\nfail_status = 200\n").unwrap_err();
        assert!(err.contains("fail_status"), "{err}");
        let err = SimConfig::from_toml_str("[default_behavior]\nwords = 0\n").unwrap_err();
        assert!(err.contains("words"), "{err}");
        let err =
            SimConfig::from_toml_str("[default_behavior]\nquality = \"great\"\n").unwrap_err();
        assert!(err.contains("great"), "{err}");
    }

    #[test]
    fn debug_hides_the_api_key() {
        let config = SimConfig {
            api_key: Some("sk-very-secret".into()),
            arm_token: Some("entra-very-secret".into()),
            cluster_token: Some("sa-very-secret".into()),
            ..SimConfig::default()
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("very-secret"), "{debug}");
    }
}
