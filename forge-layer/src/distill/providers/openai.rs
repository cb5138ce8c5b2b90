//! OpenAI's fine-tuning API (and the simulated upstream's copy of it): upload, job, poll with metrics.

use http::HeaderName;

use super::client::{self, sensitive_header};
use super::config::{
    Env, OpenAiConfig, ProviderSetupError, name_or, process_env, resolve_secret, seconds, setting,
};
use super::fine_tuning::{Dialect, FineTuningApi, upload_names};
use crate::distill::provider::{
    BoxFuture, Deployed, Progress, ProviderError, Submitted, TrainingProvider, TrainingRequest,
};

const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// Trains on OpenAI: the files go to the Files API and a supervised job is started; the
/// `ft:…` model it yields is served by OpenAI itself, so deploying only names the upstream.
///
/// ```no_run
/// use forge_layer::distill::providers::{OpenAiConfig, OpenAiProvider, SecretString};
///
/// let provider = OpenAiProvider::new(&OpenAiConfig {
///     api_key: Some(SecretString::new("sk-…")),
///     ..OpenAiConfig::default()
/// })?;
/// # Ok::<(), forge_layer::distill::providers::ProviderSetupError>(())
/// ```
#[derive(Debug)]
pub struct OpenAiProvider {
    name: &'static str,
    upstream: String,
    api: FineTuningApi,
}

impl OpenAiProvider {
    /// An `openai` provider; `*_env` keys are read from the process environment.
    pub fn new(config: &OpenAiConfig) -> Result<Self, ProviderSetupError> {
        Self::from_config(config, "openai", &process_env)
    }

    /// A `sim` provider, for the built-in simulated upstream (`base_url` is required).
    pub fn sim(config: &OpenAiConfig) -> Result<Self, ProviderSetupError> {
        Self::from_config(config, "sim", &process_env)
    }

    pub(super) fn from_config(
        config: &OpenAiConfig,
        name: &'static str,
        env: Env<'_>,
    ) -> Result<Self, ProviderSetupError> {
        let base_url = match (&config.base_url, name) {
            (Some(url), _) => url.as_str(),
            (None, "openai") => DEFAULT_BASE_URL,
            (None, _) => return Err(setting("base_url", "is required")),
        };
        let base = client::parse_base(base_url).map_err(|reason| setting("base_url", reason))?;
        let key = resolve_secret(
            "api_key",
            config.api_key.as_ref(),
            config.api_key_env.as_deref(),
            None,
            env,
        )?;
        let auth = match key {
            Some(client::Secret::Value(key)) => Some(
                sensitive_header("Bearer ", &key)
                    .map_err(|()| setting("api_key", "has characters not allowed in a header"))?,
            ),
            // No file source is offered for this key, so only a value can come back.
            Some(client::Secret::File(_)) | None if name == "openai" => {
                return Err(setting("api_key", "`api_key` or `api_key_env` is required"));
            }
            Some(client::Secret::File(_)) | None => None,
        };
        let http = client::build_client(None).map_err(ProviderSetupError::Client)?;
        let api = FineTuningApi::new(
            http,
            base,
            None,
            auth.map(|value| (HeaderName::from_static("authorization"), value)),
            seconds("timeout_secs", config.timeout_secs, 60)?,
            seconds("upload_timeout_secs", config.upload_timeout_secs, 3600)?,
            Dialect::OpenAi,
        );
        Ok(Self {
            name,
            upstream: name_or("upstream", config.upstream.as_deref(), name)?,
            api,
        })
    }

    async fn submit_run(&self, request: &TrainingRequest) -> Result<Submitted, ProviderError> {
        // A crash between creating the job and recording it would otherwise train twice.
        let earlier = match self.api.find_job(&request.job_id).await {
            Ok(found) => found,
            // A service that cannot filter jobs on metadata: nothing to find, so create one.
            // Any other failure (a timeout, a refused key) leaves it unknown whether a run
            // exists, and a second one would be paid for: the submission is tried again later.
            Err(ProviderError::Http { status, message }) if matches!(status, 400 | 404) => {
                tracing::debug!(status, %message, "cannot look up earlier fine-tuning jobs; creating one");
                None
            }
            Err(err) => return Err(err),
        };
        if let Some(job) = earlier {
            tracing::info!(job_id = %request.job_id, provider_job_id = %job.id, "fine-tuning job already exists; resuming it");
            return Ok(Submitted {
                provider_job_id: job.id,
                training_file_id: job.training_file,
            });
        }
        let names = upload_names(&request.job_id);
        let training = self.api.upload(&request.train_file, &names[0]).await?;
        let validation = match &request.validation_file {
            Some(path) => Some(self.api.upload(path, &names[1]).await?),
            None => None,
        };
        let body = self.api.job_body(
            request,
            &training.id,
            validation.as_ref().map(|file| file.id.as_str()),
        );
        let job = self.api.create_job(&body).await.inspect_err(|e| {
            self.api.keep_if_used(&names, e);
        })?;
        self.api.forget_uploads(&[&names[0], &names[1]]);
        tracing::info!(job_id = %request.job_id, provider_job_id = %job.id, provider = self.name, "fine-tuning job created");
        Ok(Submitted {
            provider_job_id: job.id,
            training_file_id: Some(training.id),
        })
    }
}

impl TrainingProvider for OpenAiProvider {
    fn max_file_bytes(&self) -> Option<u64> {
        Some(super::fine_tuning::MAX_UPLOAD_BYTES)
    }

    fn name(&self) -> &'static str {
        self.name
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

    /// Jobs carry `metadata.forge_job_id`, and `submit` looks for one first.
    fn finds_earlier_submissions(&self) -> bool {
        true
    }

    fn earlier_submission<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, ProviderError>> {
        Box::pin(async move { Ok(self.api.find_job(job_id).await?.map(|job| job.id)) })
    }

    fn poll<'a>(
        &'a self,
        provider_job_id: &'a str,
    ) -> BoxFuture<'a, Result<Progress, ProviderError>> {
        Box::pin(self.api.progress(provider_job_id))
    }

    fn cancel<'a>(&'a self, provider_job_id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.api.cancel_job(provider_job_id))
    }

    fn discard_uploads<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move { self.api.discard_uploads(&upload_names(job_id)).await })
    }

    fn release<'a>(&'a self, provider_job_id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.api.delete_job_files(provider_job_id))
    }

    fn deploy<'a>(
        &'a self,
        _job_id: &'a str,
        trained_model: &'a str,
    ) -> BoxFuture<'a, Result<Deployed, ProviderError>> {
        // OpenAI serves an `ft:` model as soon as the job succeeds.
        Box::pin(async move {
            Ok(Deployed {
                upstream: self.upstream.clone(),
                model: trained_model.to_owned(),
            })
        })
    }
}
