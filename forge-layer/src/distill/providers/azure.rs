//! Azure OpenAI fine-tuning: `api-key` and `api-version`, a wait for processed files, and an ARM deployment before use.

use std::time::Duration;

use http::{HeaderName, Method};
use reqwest::Url;
use serde::Deserialize;
use serde_json::json;

use super::client::{self, Backoff, Secret, sensitive_header};
use super::config::{
    AzureConfig, Env, ProviderSetupError, name_or, process_env, required, resolve_secret, seconds,
    setting,
};
use super::fine_tuning::{
    Dialect, EarlierSubmission, FineTuningApi, JobObject, details, upload_names,
};
use super::naming::dns_label;
use crate::distill::provider::{
    BoxFuture, Deployed, Progress, ProviderError, Submitted, TrainingProvider, TrainingRequest,
    retry_after,
};

const DEFAULT_API_VERSION: &str = "2024-10-21";
const DEFAULT_MANAGEMENT_URL: &str = "https://management.azure.com";
const DEFAULT_ARM_API_VERSION: &str = "2024-10-21";
/// Azure limits deployment names to 64 characters.
const MAX_DEPLOYMENT_NAME: usize = 64;
const FIRST_WAIT: Duration = Duration::from_millis(250);
const MAX_FILE_WAIT_STEP: Duration = Duration::from_secs(5);
const MAX_DEPLOY_WAIT_STEP: Duration = Duration::from_secs(15);
/// The pauses before each look for the job a failed create may have made: at once, then
/// twice more, as a create still in flight when its answer was lost may show up late.
const LOST_CREATE_LOOKS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(2),
    Duration::from_secs(10),
];

/// Trains on Azure OpenAI. Uploads are processed asynchronously there and a job on a `pending`
/// file fails, so `submit` waits (bounded) for `processed`. A trained model can't be called
/// until it has a deployment, so `deploy` creates one through Azure Resource Manager and waits
/// for it; inference then names the deployment, not the model.
#[derive(Debug)]
pub struct AzureProvider {
    api: FineTuningApi,
    upstream: String,
    file_wait: Duration,
    arm: Arm,
}

#[derive(Debug)]
struct Arm {
    /// `…/providers/Microsoft.CognitiveServices/accounts/{account}`.
    account: Url,
    api_version: String,
    token: Secret,
    sku: String,
    capacity: u32,
    wait: Duration,
    timeout: Duration,
}

#[derive(Deserialize)]
struct Deployment {
    #[serde(default)]
    properties: DeploymentProperties,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeploymentProperties {
    #[serde(default)]
    provisioning_state: Option<String>,
}

impl AzureProvider {
    /// Builds the provider; `*_env` keys are read from the process environment.
    pub fn new(config: &AzureConfig) -> Result<Self, ProviderSetupError> {
        Self::from_config(config, &process_env)
    }

    pub(super) fn from_config(
        config: &AzureConfig,
        env: Env<'_>,
    ) -> Result<Self, ProviderSetupError> {
        let endpoint = required("endpoint", &config.endpoint)?;
        let base = client::parse_base(&format!("{}/openai", endpoint.trim_end_matches('/')))
            .map_err(|reason| setting("endpoint", reason))?;
        let key = match resolve_secret(
            "api_key",
            config.api_key.as_ref(),
            config.api_key_env.as_deref(),
            None,
            env,
        )? {
            Some(Secret::Value(key)) => key,
            _ => return Err(setting("api_key", "`api_key` or `api_key_env` is required")),
        };
        let key = sensitive_header("", &key)
            .map_err(|()| setting("api_key", "has characters not allowed in a header"))?;
        let timeout = seconds("timeout_secs", config.timeout_secs, 60)?;
        let http = client::build_client(None).map_err(ProviderSetupError::Client)?;
        let api = FineTuningApi::new(
            http,
            base,
            Some(name_or(
                "api_version",
                config.api_version.as_deref(),
                DEFAULT_API_VERSION,
            )?),
            Some((HeaderName::from_static("api-key"), key)),
            timeout,
            seconds("upload_timeout_secs", config.upload_timeout_secs, 3600)?,
            Dialect::Azure,
        );

        let deployment = &config.deployment;
        let management = name_or(
            "deployment.management_url",
            deployment.management_url.as_deref(),
            DEFAULT_MANAGEMENT_URL,
        )?;
        let management = client::parse_base(&management)
            .map_err(|reason| setting("deployment.management_url", reason))?;
        let subscription = required("deployment.subscription_id", &deployment.subscription_id)?;
        let resource_group = required("deployment.resource_group", &deployment.resource_group)?;
        let account = required("deployment.account", &deployment.account)?;
        let account = client::endpoint(
            &management,
            &[
                "subscriptions",
                &subscription,
                "resourceGroups",
                &resource_group,
                "providers",
                "Microsoft.CognitiveServices",
                "accounts",
                &account,
            ],
            &[],
        );
        let token = resolve_secret(
            "deployment.token",
            deployment.token.as_ref(),
            deployment.token_env.as_deref(),
            deployment.token_file.as_ref(),
            env,
        )?
        .ok_or_else(|| {
            setting(
                "deployment.token",
                "one of `token`, `token_env` and `token_file` is required",
            )
        })?;
        let capacity = deployment.capacity.unwrap_or(1);
        if capacity == 0 {
            return Err(setting("deployment.capacity", "must be at least 1"));
        }
        Ok(Self {
            api,
            upstream: name_or("upstream", config.upstream.as_deref(), "azure")?,
            file_wait: seconds("file_wait_secs", config.file_wait_secs, 1800)?,
            arm: Arm {
                account,
                api_version: name_or(
                    "deployment.api_version",
                    deployment.api_version.as_deref(),
                    DEFAULT_ARM_API_VERSION,
                )?,
                token,
                sku: name_or("deployment.sku", deployment.sku.as_deref(), "standard")?,
                capacity,
                // Three hours, as long as six waits of half an hour took before a deployment
                // still provisioning was deleted: a healthy one can take over an hour.
                wait: seconds("deployment.wait_secs", deployment.wait_secs, 10_800)?,
                timeout,
            },
        })
    }

    async fn submit_run(&self, request: &TrainingRequest) -> Result<Submitted, ProviderError> {
        // Azure jobs carry no metadata: an earlier submission's run (a crash came between its
        // create and its record) is found by its training file's name, or it would train twice.
        // A lookup that fails fails the submission: creating without it could pay twice.
        let earlier = self.api.earlier_submission(&request.job_id).await?;
        if let Some(job) = earlier.job {
            tracing::info!(job_id = %request.job_id, provider_job_id = %job.id, "Azure fine-tuning job already exists; resuming it");
            return Ok(Submitted {
                provider_job_id: job.id,
                training_file_id: job.training_file,
            });
        }
        // Its files, if it got no further, are used again rather than uploaded a second time
        // and left behind: only a run's own files are deleted once it ends.
        for file in earlier.uploads {
            self.api.reuse_upload(file);
        }
        let names = upload_names(&request.job_id);
        let training = self.upload(&request.train_file, &names[0]).await?;
        let validation = match &request.validation_file {
            Some(path) => Some(self.upload(path, &names[1]).await?),
            None => None,
        };
        let body = self.api.job_body(request, &training, validation.as_deref());
        let job = match self.api.create_job(&body).await.inspect_err(|e| {
            self.api.keep_if_used(&names, e);
        }) {
            Ok(job) => job,
            // A create whose answer was lost (a 5xx, a timeout) may have made the job: it is
            // looked for, a few times as it may show up late. Not found, the submission is not
            // tried again: that could pay for a second run. One never sent (no connection, a
            // rate limit) is tried again as it is.
            Err(e) if e.may_have_taken_effect() => {
                self.created_all_the_same(&request.job_id, &e).await?
            }
            Err(e) => return Err(e),
        };
        self.api.forget_uploads(&[&names[0], &names[1]]);
        tracing::info!(job_id = %request.job_id, provider_job_id = %job.id, "Azure fine-tuning job created");
        Ok(Submitted {
            provider_job_id: job.id,
            training_file_id: Some(training),
        })
    }

    /// The job a create that failed with `error` made all the same, or an ambiguous error.
    async fn created_all_the_same(
        &self,
        job_id: &str,
        error: &ProviderError,
    ) -> Result<JobObject, ProviderError> {
        let mut lookup = None;
        for pause in LOST_CREATE_LOOKS {
            tokio::time::sleep(pause).await;
            match self.api.earlier_submission(job_id).await {
                Ok(EarlierSubmission { job: Some(job), .. }) => {
                    tracing::info!(job_id, provider_job_id = %job.id, %error, "the fine-tuning job's create failed, but the job was made");
                    return Ok(job);
                }
                Ok(_) => lookup = None,
                Err(e) => lookup = Some(e),
            }
        }
        let looked = match lookup {
            None => "no job made from its training file shows".to_string(),
            Some(e) => format!("looking for it failed too ({e})"),
        };
        Err(ProviderError::Ambiguous(format!(
            "creating the fine-tuning job failed ({error}), and {looked}; it may have been made all the same: check the Azure resource before starting another"
        )))
    }

    /// Uploads with a byte order mark, then waits until Azure has processed the file.
    async fn upload(
        &self,
        path: &std::path::Path,
        filename: &str,
    ) -> Result<String, ProviderError> {
        let mut file = match self.api.uploaded(filename) {
            // Uploaded by an earlier attempt: its processing is waited for again below.
            Some(file) => file,
            None => self.api.upload(&with_bom(path).await?, filename).await?,
        };
        let mut backoff = Backoff::new(FIRST_WAIT, MAX_FILE_WAIT_STEP, self.file_wait);
        loop {
            let status = file.status.as_deref().unwrap_or("pending");
            match status {
                "processed" | "succeeded" => return Ok(file.id),
                "error" | "failed" | "deleting" | "deleted" => {
                    return Err(ProviderError::Invalid(format!(
                        "Azure could not process the file {} ({status}): {}",
                        file.id,
                        details(&file)
                    )));
                }
                _ => {}
            }
            let mut hint = None;
            loop {
                if !backoff.wait(hint).await {
                    return Err(ProviderError::Transport(format!(
                        "the file {} is still {status} after {}s",
                        file.id,
                        self.file_wait.as_secs()
                    )));
                }
                match self.api.file(&file.id).await {
                    Ok(next) => {
                        file = next;
                        break;
                    }
                    // Keep waiting through a 429 or a blip: the upload is worth it.
                    Err(ProviderError::RateLimited(wait)) => hint = Some(wait),
                    Err(err) if err.is_transient() => {
                        tracing::debug!(%err, file = %file.id, "waiting for an Azure file; retrying");
                        hint = None;
                    }
                    Err(err) => return Err(err),
                }
            }
        }
    }

    async fn deploy_model(
        &self,
        job_id: &str,
        trained_model: &str,
    ) -> Result<Deployed, ProviderError> {
        let name = dns_label("forge-", job_id, MAX_DEPLOYMENT_NAME);
        let arm = &self.arm;
        let mut url = client::endpoint(&arm.account, &["deployments", &name], &[]);
        url.query_pairs_mut()
            .append_pair("api-version", &arm.api_version);
        let body = json!({
            "sku": {"name": arm.sku, "capacity": arm.capacity},
            "properties": {"model": {"format": "OpenAI", "name": trained_model, "version": "1"}},
        });
        let put = self
            .arm_request(Method::PUT, url.clone())
            .await?
            .json(&body);
        let response = client::send(put).await?;
        let mut hint = retry_after(response.headers());
        let mut deployment: Deployment = client::decode(response).await?;
        let mut backoff = Backoff::new(FIRST_WAIT, MAX_DEPLOY_WAIT_STEP, arm.wait);
        loop {
            let state = deployment
                .properties
                .provisioning_state
                .clone()
                .unwrap_or_default();
            match state.as_str() {
                "Succeeded" => {
                    tracing::info!(deployment = %name, model = %trained_model, "Azure deployment ready");
                    return Ok(Deployed {
                        upstream: self.upstream.clone(),
                        model: name,
                    });
                }
                "Failed" | "Canceled" | "Cancelled" => {
                    return Err(ProviderError::Invalid(format!(
                        "the Azure deployment {name} of {trained_model} ended {state}"
                    )));
                }
                _ => {}
            }
            loop {
                if !backoff.wait(hint.take()).await {
                    // Left there, it would finish and bill by the hour with nothing in Forge's
                    // registry to take it down. Not retried: a second wait would end alike.
                    let deleted = match self.delete_deployment(&name).await {
                        Ok(()) => "deleted".to_string(),
                        Err(e) => format!("deleting it failed ({e}): delete it by hand"),
                    };
                    return Err(ProviderError::Invalid(format!(
                        "the Azure deployment {name} is still {state} after {}s (deployment.wait_secs); {deleted}",
                        arm.wait.as_secs_f64()
                    )));
                }
                match client::send(self.arm_request(Method::GET, url.clone()).await?).await {
                    Ok(response) => {
                        hint = retry_after(response.headers());
                        deployment = client::decode(response).await?;
                        break;
                    }
                    Err(ProviderError::RateLimited(wait)) => hint = Some(wait),
                    Err(err) if err.is_transient() => {
                        tracing::debug!(%err, deployment = %name, "waiting for an Azure deployment; retrying");
                    }
                    Err(err) => return Err(err),
                }
            }
        }
    }

    /// Deletes the deployment `name`. ARM answers 204 for one already gone; a 404 means the
    /// account or resource group is not there, which is an error, not a deployment taken down.
    async fn delete_deployment(&self, name: &str) -> Result<(), ProviderError> {
        let arm = &self.arm;
        let mut url = client::endpoint(&arm.account, &["deployments", name], &[]);
        url.query_pairs_mut()
            .append_pair("api-version", &arm.api_version);
        client::send(self.arm_request(Method::DELETE, url).await?).await?;
        tracing::info!(deployment = %name, "Azure deployment deleted");
        Ok(())
    }

    async fn arm_request(
        &self,
        method: Method,
        url: Url,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let token = self.arm.token.header("Bearer ").await?;
        Ok(self
            .api
            .client
            .request(method, url)
            .timeout(self.arm.timeout)
            .header(http::header::AUTHORIZATION, token))
    }
}

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// A copy of the JSONL file at `path` that starts with a UTF-8 byte order mark, which Azure
/// requires (OpenAI does not, so the dataset itself is written without one). Copied on disk,
/// not in memory: a training file may be hundreds of megabytes.
async fn with_bom(path: &std::path::Path) -> Result<std::path::PathBuf, ProviderError> {
    let (from, to) = (path.to_path_buf(), path.with_extension("bom.jsonl"));
    let written = to.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&to)?);
        out.write_all(BOM)?;
        std::io::copy(&mut std::fs::File::open(&from)?, &mut out)?;
        out.into_inner()
            .map_err(std::io::IntoInnerError::into_error)?
            .sync_all()
    })
    .await
    .map_err(|e| ProviderError::Invalid(format!("copying {} failed: {e}", path.display())))?
    .map_err(|e| {
        ProviderError::Invalid(format!("cannot copy {} for Azure: {e}", path.display()))
    })?;
    Ok(written)
}

impl TrainingProvider for AzureProvider {
    /// The Files API's limit, less the byte order mark [`with_bom`] puts before the dataset.
    fn max_file_bytes(&self) -> Option<u64> {
        Some(super::fine_tuning::MAX_UPLOAD_BYTES - BOM.len() as u64)
    }

    fn name(&self) -> &'static str {
        "azure"
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

    /// Jobs are found by their training file's name, and `submit` looks for one first.
    fn finds_earlier_submissions(&self) -> bool {
        true
    }

    fn earlier_submission<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, ProviderError>> {
        Box::pin(async move {
            Ok(self
                .api
                .earlier_submission(job_id)
                .await?
                .job
                .map(|job| job.id))
        })
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
        job_id: &'a str,
        trained_model: &'a str,
    ) -> BoxFuture<'a, Result<Deployed, ProviderError>> {
        Box::pin(self.deploy_model(job_id, trained_model))
    }

    fn costs_while_idle(&self) -> bool {
        true
    }

    fn undeploy<'a>(&'a self, model: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.delete_deployment(model))
    }
}
