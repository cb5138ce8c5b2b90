//! Configuration of the simulated upstream: per-model behaviour and fine-tuning timings, in code or TOML.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// Everything the simulated upstream can be told before it starts. The default: every model
/// behaves as [`ModelBehavior::default`], no API key, [`FineTuneTimings::default`].
#[derive(Clone, PartialEq, Default)]
pub struct SimConfig {
    /// Behaviour by exact model name.
    pub models: HashMap<String, ModelBehavior>,
    /// Behaviour of every model not in `models`.
    pub default_behavior: ModelBehavior,
    /// How long each phase of a fine-tuning job lasts.
    pub fine_tune: FineTuneTimings,
    /// When set, every `/v1` request must carry `Authorization: Bearer <key>`, or it gets a 401
    /// `invalid_api_key`.
    pub api_key: Option<String>,
}

// Hand-written so that the key never reaches a log line.
impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("models", &self.models)
            .field("default_behavior", &self.default_behavior)
            .field("fine_tune", &self.fine_tune)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
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

impl SimConfig {
    /// Reads a configuration from TOML. Every key is optional; unknown keys are an error that
    /// names them.
    ///
    /// ```toml
    /// api_key = "sk-sim"              # require `Authorization: Bearer sk-sim` on /v1
    ///
    /// [default_behavior]              # models not listed under [models]
    /// first_byte_delay_ms = 0         # before the response headers
    /// chunk_delay_ms = 0              # between SSE events
    /// fail_status = 503               # answer every request with this error status (400-599)
    /// fail_every = 20                  # with fail_status: only every 20th request fails (5%)
    /// error_after_chunks = 5          # streams: error event after this many content chunks
    /// quality = "good"                # "good" or "poor"
    /// words = 24                      # words per text answer (at least 1)
    ///
    /// [models."gpt-4o-mini"]          # same keys as [default_behavior]; unset keys take the
    /// quality = "poor"                # built-in defaults, not those of [default_behavior]
    ///
    /// [fine_tune]
    /// validating_ms = 1000
    /// queued_ms = 1000
    /// running_ms = 3000
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
        Ok(SimConfig {
            models,
            default_behavior,
            fine_tune,
            api_key: self.api_key,
        })
    }
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
            ..SimConfig::default()
        };
        assert!(!format!("{config:?}").contains("sk-very-secret"));
    }
}
