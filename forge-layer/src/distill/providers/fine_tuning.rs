//! The OpenAI-shaped Files and fine-tuning jobs API, shared by the OpenAI and Azure providers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use reqwest::Url;
use reqwest::multipart::{Form, Part};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::client::{self, MAX_BODY};
use super::metrics::{metrics_from_events, parse_result_csv};
use super::naming::slug;
use crate::distill::provider::{Progress, ProviderError, ProviderState, TrainingRequest};

/// The largest file the Files API takes in one request (openai-wire.md: 512 MB; larger ones need
/// the Uploads API). Datasets for these providers stop short of it.
pub(super) const MAX_UPLOAD_BYTES: u64 = 512_000_000;

/// A 429 on job creation is waited out this many times, when it asks for no more than
/// `MAX_CREATE_WAIT`: giving up would throw away an upload that may have taken an hour.
const CREATE_ATTEMPTS: usize = 3;
const MAX_CREATE_WAIT: Duration = Duration::from_secs(60);
/// Metrics events are near the top of the newest-first list once a job has finished.
const EVENTS_PAGE: &str = "100";
/// Objects read per page of a list.
const LIST_PAGE: &str = "100";

/// The two spellings of the same API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    /// `method.supervised.hyperparameters` and `metadata`.
    OpenAi,
    /// Azure's GA `api-version`s take the top-level `hyperparameters` and no `metadata`.
    Azure,
}

/// Where and how to call the API.
#[derive(Debug)]
pub(super) struct FineTuningApi {
    pub(super) client: reqwest::Client,
    /// `…/v1` for OpenAI, `{endpoint}/openai` for Azure.
    base: Url,
    api_version: Option<String>,
    auth: Option<(HeaderName, HeaderValue)>,
    timeout: Duration,
    upload_timeout: Duration,
    dialect: Dialect,
    /// Files uploaded for job creations not yet accepted.
    uploaded: std::sync::Mutex<Uploads>,
}

/// Files uploaded for job creations not yet accepted, by upload name: a submission tried again
/// after its create failed (a 5xx, rate limits) reuses them instead of sending up to half a
/// gigabyte again.
#[derive(Debug, Default)]
struct Uploads {
    files: std::collections::HashMap<String, FileObject>,
    /// Those this process sent that no create may have used: what a submission that failed for
    /// good deletes. An earlier submission's file (see [`FineTuningApi::reuse_upload`]), or one
    /// a create whose answer was lost may have made a run from, stays for that run.
    discardable: std::collections::HashSet<String>,
}

/// A File object; only what Forge reads.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct FileObject {
    pub(super) id: String,
    #[serde(default)]
    pub(super) filename: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub(super) created_at: Option<u64>,
    #[serde(default)]
    pub(super) status: Option<String>,
    #[serde(default)]
    pub(super) status_details: Option<Value>,
}

/// A fine-tuning job object; only what Forge reads, tolerant of nulls.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct JobObject {
    pub(super) id: String,
    pub(super) status: String,
    /// Unix seconds.
    #[serde(default)]
    pub(super) created_at: Option<u64>,
    #[serde(default)]
    pub(super) fine_tuned_model: Option<String>,
    #[serde(default)]
    pub(super) training_file: Option<String>,
    #[serde(default)]
    pub(super) validation_file: Option<String>,
    #[serde(default)]
    pub(super) result_files: Option<Vec<String>>,
    #[serde(default)]
    pub(super) error: Option<JobError>,
    #[serde(default)]
    pub(super) metadata: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct JobError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// What an earlier submission of a Forge job left at the provider.
#[derive(Debug)]
pub(super) struct EarlierSubmission {
    /// The run made from its training file, if any, not failed or cancelled.
    pub(super) job: Option<JobObject>,
    /// The files it uploaded, newest first.
    pub(super) uploads: Vec<FileObject>,
}

impl JobObject {
    /// Not failed or cancelled: a run that is going, or has made its model.
    pub(super) fn is_live(&self) -> bool {
        !matches!(self.status.as_str(), "failed" | "cancelled")
    }
}

#[derive(Deserialize)]
struct ListOf<T> {
    data: Vec<T>,
    #[serde(default)]
    has_more: bool,
}

impl FineTuningApi {
    pub(super) fn new(
        client: reqwest::Client,
        base: Url,
        api_version: Option<String>,
        auth: Option<(HeaderName, HeaderValue)>,
        timeout: Duration,
        upload_timeout: Duration,
        dialect: Dialect,
    ) -> Self {
        Self {
            client,
            base,
            api_version,
            auth,
            timeout,
            upload_timeout,
            dialect,
            uploaded: Default::default(),
        }
    }

    fn lock_uploaded(&self) -> std::sync::MutexGuard<'_, Uploads> {
        self.uploaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The file an earlier attempt uploaded as `filename`, if its job was not created.
    pub(super) fn uploaded(&self, filename: &str) -> Option<FileObject> {
        self.lock_uploaded().files.get(filename).cloned()
    }

    /// Takes `file`, which an earlier submission uploaded under its name, as this one's upload
    /// under that name, unless one is known already (the newest is offered first), or the
    /// provider could not process it (then the file is uploaded again).
    pub(super) fn reuse_upload(&self, file: FileObject) {
        let unusable = matches!(
            file.status.as_deref(),
            Some("error" | "failed" | "deleting" | "deleted")
        );
        if let (Some(name), false) = (file.filename.clone(), unusable) {
            self.lock_uploaded().files.entry(name).or_insert(file);
        }
    }

    /// Forgets the uploads of `filenames` once their job exists.
    pub(super) fn forget_uploads(&self, filenames: &[&str]) {
        let mut uploaded = self.lock_uploaded();
        for name in filenames {
            uploaded.files.remove(*name);
            uploaded.discardable.remove(*name);
        }
    }

    /// Keeps the uploads of `filenames` from [`FineTuningApi::discard_uploads`]: a create that
    /// failed with `error` may have made a run from them all the same.
    pub(super) fn keep_if_used(&self, filenames: &[String], error: &ProviderError) {
        if error.may_have_taken_effect() {
            let mut uploaded = self.lock_uploaded();
            for name in filenames {
                uploaded.discardable.remove(name);
            }
        }
    }

    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut pairs: Vec<(&str, &str)> = query.to_vec();
        if let Some(version) = &self.api_version {
            pairs.push(("api-version", version));
        }
        client::endpoint(&self.base, segments, &pairs)
    }

    fn request(&self, method: Method, url: Url, timeout: Duration) -> reqwest::RequestBuilder {
        let mut request = self.client.request(method, url).timeout(timeout);
        if let Some((name, value)) = &self.auth {
            request = request.header(name.clone(), value.clone());
        }
        request
    }

    /// Uploads a JSONL file for fine-tuning, streamed from disk; one over
    /// [`MAX_UPLOAD_BYTES`] is refused before it is sent. A file an earlier attempt uploaded
    /// under the same name (see [`FineTuningApi::uploaded`]) is not sent again.
    pub(super) async fn upload(
        &self,
        path: &Path,
        filename: &str,
    ) -> Result<FileObject, ProviderError> {
        if let Some(file) = self.uploaded(filename) {
            tracing::info!(file = %file.id, %filename, "reusing the file an earlier attempt uploaded");
            return Ok(file);
        }
        let file = self.send_file(path, filename).await?;
        let mut uploaded = self.lock_uploaded();
        uploaded.files.insert(filename.to_owned(), file.clone());
        uploaded.discardable.insert(filename.to_owned());
        Ok(file)
    }

    async fn send_file(&self, path: &Path, filename: &str) -> Result<FileObject, ProviderError> {
        let file = tokio::fs::File::open(path).await.map_err(|err| {
            ProviderError::Invalid(format!("cannot open {}: {err}", path.display()))
        })?;
        let length = file
            .metadata()
            .await
            .map_err(|err| {
                ProviderError::Invalid(format!("cannot read {}: {err}", path.display()))
            })?
            .len();
        // Refused here, not after streaming half a gigabyte to a 413.
        if length > MAX_UPLOAD_BYTES {
            return Err(ProviderError::Invalid(format!(
                "the dataset file is {length} bytes; the Files API takes at most {MAX_UPLOAD_BYTES} bytes per file"
            )));
        }
        let part = Part::stream_with_length(reqwest::Body::from(file), length)
            .file_name(filename.to_owned())
            .mime_str("application/octet-stream")
            .map_err(|err| ProviderError::Invalid(err.to_string()))?;
        let form = Form::new().text("purpose", "fine-tune").part("file", part);
        let url = self.url(&["files"], &[]);
        client::send_json(
            self.request(Method::POST, url, self.upload_timeout)
                .multipart(form),
        )
        .await
    }

    pub(super) async fn file(&self, id: &str) -> Result<FileObject, ProviderError> {
        let url = self.url(&["files", id], &[]);
        client::send_json(self.request(Method::GET, url, self.timeout)).await
    }

    /// Creates the job; a short 429 is waited out rather than losing the uploads.
    pub(super) async fn create_job(&self, body: &Value) -> Result<JobObject, ProviderError> {
        let mut attempt = 1;
        loop {
            let url = self.url(&["fine_tuning", "jobs"], &[]);
            match client::send_json(self.request(Method::POST, url, self.timeout).json(body)).await
            {
                Err(ProviderError::RateLimited(wait))
                    if attempt < CREATE_ATTEMPTS && wait <= MAX_CREATE_WAIT =>
                {
                    tracing::debug!(
                        ?wait,
                        attempt,
                        "fine-tuning job creation rate limited; waiting"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// `POST /fine_tuning/jobs/{id}/cancel`. A job that has already ended answers 400 there,
    /// which is returned as it is: the caller decides what it means.
    pub(super) async fn cancel_job(&self, id: &str) -> Result<(), ProviderError> {
        let url = self.url(&["fine_tuning", "jobs", id, "cancel"], &[]);
        client::send_json::<JobObject>(self.request(Method::POST, url, self.timeout))
            .await
            .map(drop)
    }

    /// Deletes the training and validation files job `id` was created with: they hold every
    /// client's traces, and count against the account's storage. A file already gone is fine.
    pub(super) async fn delete_job_files(&self, id: &str) -> Result<(), ProviderError> {
        let job = self.job(id).await?;
        for file in [job.training_file, job.validation_file]
            .into_iter()
            .flatten()
        {
            self.delete_file(&file).await?;
        }
        Ok(())
    }

    /// Deletes the files this process uploaded under `filenames` that no create may have used
    /// (see [`Uploads::discardable`]), and forgets them: nothing is to use them again.
    pub(super) async fn discard_uploads(&self, filenames: &[String]) -> Result<(), ProviderError> {
        for name in filenames {
            let (id, discardable) = {
                let uploaded = self.lock_uploaded();
                match uploaded.files.get(name) {
                    Some(file) => (file.id.clone(), uploaded.discardable.contains(name)),
                    None => continue,
                }
            };
            if !discardable {
                tracing::warn!(file = %id, filename = %name, "an upload is kept on the account: a run may have been made from it, or an earlier process uploaded it; delete it by hand once no run uses it");
                continue;
            }
            self.delete_file(&id).await?;
            let mut uploaded = self.lock_uploaded();
            uploaded.files.remove(name);
            uploaded.discardable.remove(name);
        }
        Ok(())
    }

    /// `DELETE /files/{id}`; a file already gone is fine.
    async fn delete_file(&self, id: &str) -> Result<(), ProviderError> {
        let url = self.url(&["files", id], &[]);
        match client::send_json::<Value>(self.request(Method::DELETE, url, self.timeout)).await {
            Ok(_) | Err(ProviderError::Http { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn job(&self, id: &str) -> Result<JobObject, ProviderError> {
        let url = self.url(&["fine_tuning", "jobs", id], &[]);
        client::send_json(self.request(Method::GET, url, self.timeout)).await
    }

    /// The job, not failed or cancelled, that an earlier attempt at this submission created,
    /// found by its `metadata.forge_job_id`. A service that cannot filter on metadata answers
    /// 4xx, which is an error here: whether it means "none" is the caller's call.
    pub(super) async fn find_job(
        &self,
        forge_job_id: &str,
    ) -> Result<Option<JobObject>, ProviderError> {
        if self.dialect != Dialect::OpenAi {
            return Ok(None);
        }
        let url = self.url(
            &["fine_tuning", "jobs"],
            &[("metadata[forge_job_id]", forge_job_id), ("limit", "10")],
        );
        let list: ListOf<JobObject> =
            client::send_json(self.request(Method::GET, url, self.timeout)).await?;
        // Checked here too: a service that ignores the filter lists every job.
        Ok(list.data.into_iter().find(|job| {
            job.is_live()
                && job
                    .metadata
                    .as_ref()
                    .and_then(|m| m.get("forge_job_id"))
                    .and_then(Value::as_str)
                    == Some(forge_job_id)
        }))
    }

    /// What an earlier submission of Forge job `job_id` left at the provider, found by its
    /// uploads' names ([`upload_names`]): how a job that carries no metadata (Azure's) is found
    /// again after its create's answer was lost, or a restart came before its id was stored.
    /// Jobs are listed newest first, back to the oldest such upload, before which none of them
    /// can have been created.
    pub(super) async fn earlier_submission(
        &self,
        job_id: &str,
    ) -> Result<EarlierSubmission, ProviderError> {
        let names = upload_names(job_id);
        let mut uploads: Vec<FileObject> = self
            .list_all(&["files"], None, |file: &FileObject| &file.id, |_| true)
            .await?
            .into_iter()
            .filter(|file| {
                file.filename
                    .as_ref()
                    .is_some_and(|name| names.contains(name))
            })
            .collect();
        // Newest first, whatever order the list came in: the newest is the one used again.
        uploads.sort_by_key(|file| std::cmp::Reverse(file.created_at));
        let training: Vec<&FileObject> = uploads
            .iter()
            .filter(|file| file.filename.as_ref() == Some(&names[0]))
            .collect();
        let made_from_it = |job: &JobObject| {
            job.is_live()
                && job
                    .training_file
                    .as_ref()
                    .is_some_and(|id| training.iter().any(|file| file.id == *id))
        };
        let job = match training
            .iter()
            .map(|file| file.created_at.unwrap_or(0))
            .min()
        {
            None => None,
            Some(oldest) => self
                .list_all(
                    &["fine_tuning", "jobs"],
                    Some(LIST_PAGE),
                    |job: &JobObject| &job.id,
                    |job| !made_from_it(job) && job.created_at.is_none_or(|at| at >= oldest),
                )
                .await?
                .into_iter()
                .find(made_from_it),
        };
        Ok(EarlierSubmission { job, uploads })
    }

    /// Every object of a list endpoint, page by page (`after` the last one's id, while
    /// `has_more`), until `more` says to stop after the object it was shown. `limit` is sent
    /// only where given: Azure documents it for jobs, not for files.
    async fn list_all<T: serde::de::DeserializeOwned>(
        &self,
        segments: &[&str],
        limit: Option<&str>,
        id: fn(&T) -> &str,
        mut more: impl FnMut(&T) -> bool,
    ) -> Result<Vec<T>, ProviderError> {
        let mut all = Vec::new();
        loop {
            let mut query: Vec<(&str, &str)> = limit.map(|n| ("limit", n)).into_iter().collect();
            let after = all.last().map(|last| id(last).to_owned());
            if let Some(after) = &after {
                query.push(("after", after.as_str()));
            }
            let url = self.url(segments, &query);
            let page: ListOf<T> =
                client::send_json(self.request(Method::GET, url, self.timeout)).await?;
            // A service that ignores `after` sends the same page again, and would be read for
            // ever: what follows the last object seen must not end with it.
            if after.is_some() && page.data.last().map(id) == after.as_deref() {
                return Err(ProviderError::Invalid(format!(
                    "the provider's list of {} does not go on past a page (`after` ignored)",
                    segments.join("/")
                )));
            }
            let last_page = !page.has_more || page.data.is_empty();
            for item in page.data {
                let go_on = more(&item);
                all.push(item);
                if !go_on {
                    return Ok(all);
                }
            }
            if last_page {
                return Ok(all);
            }
        }
    }

    /// The request body of `POST /fine_tuning/jobs`. "auto" hyperparameters are left out.
    pub(super) fn job_body(
        &self,
        request: &TrainingRequest,
        training_file: &str,
        validation_file: Option<&str>,
    ) -> Value {
        let mut hyperparameters = Map::new();
        let h = &request.hyperparameters;
        if let Some(n) = h.n_epochs {
            hyperparameters.insert("n_epochs".into(), json!(n));
        }
        if let Some(n) = h.batch_size {
            hyperparameters.insert("batch_size".into(), json!(n));
        }
        if let Some(m) = h.learning_rate_multiplier {
            hyperparameters.insert("learning_rate_multiplier".into(), json!(m));
        }
        let mut body = Map::new();
        body.insert("model".into(), json!(request.base_model));
        body.insert("training_file".into(), json!(training_file));
        if let Some(validation) = validation_file {
            body.insert("validation_file".into(), json!(validation));
        }
        if let Some(suffix) = &request.suffix {
            body.insert("suffix".into(), json!(suffix));
        }
        match self.dialect {
            Dialect::OpenAi => {
                let mut supervised = Map::new();
                if !hyperparameters.is_empty() {
                    supervised.insert("hyperparameters".into(), Value::Object(hyperparameters));
                }
                body.insert(
                    "method".into(),
                    json!({"type": "supervised", "supervised": supervised}),
                );
                body.insert("metadata".into(), json!({"forge_job_id": request.job_id}));
            }
            Dialect::Azure => {
                if !hyperparameters.is_empty() {
                    body.insert("hyperparameters".into(), Value::Object(hyperparameters));
                }
            }
        }
        Value::Object(body)
    }

    /// Reads the job, and on success its metrics.
    pub(super) async fn progress(&self, id: &str) -> Result<Progress, ProviderError> {
        let job = self.job(id).await?;
        let state = state_of(&job);
        let metrics = match state {
            ProviderState::Succeeded { .. } => self.metrics(&job).await?,
            _ => BTreeMap::new(),
        };
        Ok(Progress {
            state,
            provider_status: job.status,
            metrics,
        })
    }

    /// The final metrics: from the result CSV, or else the newest metrics event. A missing
    /// file or event only leaves the metrics empty; a 429 or an outage is returned, so that
    /// the poll is tried again rather than the job recorded without them.
    async fn metrics(&self, job: &JobObject) -> Result<BTreeMap<String, f64>, ProviderError> {
        if let Some(file_id) = job.result_files.as_deref().and_then(<[String]>::first) {
            match self.result_csv(file_id).await {
                Ok(metrics) if !metrics.is_empty() => return Ok(metrics),
                Ok(_) => {
                    tracing::debug!(job = %job.id, file = %file_id, "result file has no known metrics")
                }
                Err(
                    err @ (ProviderError::RateLimited(_)
                    | ProviderError::Transport(_)
                    | ProviderError::NotSent(_)),
                ) => {
                    return Err(err);
                }
                Err(err) => {
                    tracing::warn!(job = %job.id, file = %file_id, %err, "cannot read the result file")
                }
            }
        }
        let url = self.url(
            &["fine_tuning", "jobs", &job.id, "events"],
            &[("limit", EVENTS_PAGE)],
        );
        match client::send_json::<ListOf<Value>>(self.request(Method::GET, url, self.timeout)).await
        {
            Ok(events) => Ok(metrics_from_events(&events.data)),
            Err(
                err @ (ProviderError::RateLimited(_)
                | ProviderError::Transport(_)
                | ProviderError::NotSent(_)),
            ) => Err(err),
            Err(err) => {
                tracing::warn!(job = %job.id, %err, "cannot read the job's events; no metrics");
                Ok(BTreeMap::new())
            }
        }
    }

    async fn result_csv(&self, file_id: &str) -> Result<BTreeMap<String, f64>, ProviderError> {
        let url = self.url(&["files", file_id, "content"], &[]);
        let response = client::send(self.request(Method::GET, url, self.timeout)).await?;
        let body = client::read_body(response, MAX_BODY).await?;
        Ok(parse_result_content(&body))
    }
}

/// Parses a result file as CSV, or as base64 of a CSV, which is how Azure serves it.
pub(super) fn parse_result_content(body: &[u8]) -> BTreeMap<String, f64> {
    let text = String::from_utf8_lossy(body);
    let metrics = parse_result_csv(&text);
    if !metrics.is_empty() {
        return metrics;
    }
    match decode_base64(text.trim()) {
        Some(decoded) => parse_result_csv(&String::from_utf8_lossy(&decoded)),
        None => metrics,
    }
}

/// Standard base64, padding optional, whitespace ignored; `None` if it isn't base64.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut buffer = 0u32;
    let mut bits = 0u32;
    for byte in text.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((buffer >> bits) & 0xff) as u8);
        }
    }
    Some(out)
}

/// Maps the job's `status` (OpenAI's words, and Azure's older `pending`/`notRunning`).
pub(super) fn state_of(job: &JobObject) -> ProviderState {
    match job.status.as_str() {
        "running" => ProviderState::Running,
        "succeeded" => match job
            .fine_tuned_model
            .as_deref()
            .filter(|model| !model.is_empty())
        {
            Some(model) => ProviderState::Succeeded {
                model: model.to_owned(),
            },
            None => ProviderState::Failed {
                error: "the job succeeded but names no fine_tuned_model".into(),
            },
        },
        "failed" => ProviderState::Failed {
            error: failure_message(job.error.as_ref()),
        },
        "cancelled" | "canceled" => ProviderState::Cancelled,
        // validating_files, queued, paused, pending, created, notRunning, and words to come.
        _ => ProviderState::Queued,
    }
}

fn failure_message(error: Option<&JobError>) -> String {
    let code = error
        .and_then(|e| e.code.as_deref())
        .filter(|c| !c.is_empty());
    let message = error
        .and_then(|e| e.message.as_deref())
        .filter(|m| !m.is_empty());
    match (code, message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        (None, Some(message)) => message.to_owned(),
        (None, None) => "the provider reported the job failed without an error".into(),
    }
}

/// The names a Forge job's training and validation files are uploaded under.
pub(super) fn upload_names(job_id: &str) -> [String; 2] {
    [
        upload_name(job_id, "train"),
        upload_name(job_id, "validation"),
    ]
}

/// `forge-<job>-train.jsonl`: the `.jsonl` ending is required, and the name says where the
/// file came from on the provider's console.
fn upload_name(job_id: &str, part: &str) -> String {
    let job = slug(job_id);
    if job.is_empty() {
        format!("forge-{part}.jsonl")
    } else {
        format!("forge-{job}-{part}.jsonl")
    }
}

/// `FileObject.status_details` as text, for an error message.
pub(super) fn details(file: &FileObject) -> String {
    match &file.status_details {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}
