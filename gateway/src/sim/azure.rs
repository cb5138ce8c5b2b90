//! Azure OpenAI's data plane (openai-wire.md §5): files processed asynchronously, fine-tuning jobs, and chat through a deployment.
//!
//! Files and jobs live in an account apart from OpenAI's. An upload answers 201 with a
//! `Location` header and stays `pending` for
//! [`AzureTimings::file_processing`](crate::sim::AzureTimings); a job created on a `pending`
//! file is accepted and then fails in `validating_files` with `invalid_training_file`, as Azure
//! fails it. Job creation answers 201. Auth (`api-key`) and `api-version` are checked before
//! these handlers run.

use std::sync::Arc;

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use tokio::time::Instant;

use super::chat;
use super::error::ApiError;
use super::files;
use super::fine_tuning::{self, ListParams};
use super::reply;
use super::state::{Flavor, SimState};

/// The query string's `api-version`, which the intake already required.
fn api_version(uri: &http::Uri) -> String {
    uri.query()
        .into_iter()
        .flat_map(|query| query.split('&'))
        .find_map(|pair| pair.strip_prefix("api-version="))
        .unwrap_or_default()
        .to_owned()
}

/// `POST /openai/files?api-version=…`.
pub(crate) async fn upload(
    State(state): State<Arc<SimState>>,
    uri: http::Uri,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let upload = files::read_upload(multipart).await?;
    let (id, mut response) = upload.store(
        &mut state.storage().azure.files,
        Some(state.azure.file_processing),
    );
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or("localhost");
    let location = format!(
        "http://{host}/openai/files/{id}?api-version={}",
        api_version(&uri)
    );
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `GET /openai/files?api-version=…`: the resource's files, in OpenAI's list shape.
pub(crate) async fn list_files(
    State(state): State<Arc<SimState>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    files::list_from(&state.storage().azure.files, query)
}

/// `GET /openai/files/{id}?api-version=…`.
pub(crate) async fn retrieve_file(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    files::retrieve_from(&state.storage().azure.files, &id)
}

/// `DELETE /openai/files/{id}?api-version=…`.
pub(crate) async fn delete_file(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<files::Deleted>, ApiError> {
    files::delete_from(&mut state.storage().azure.files, &id)
}

/// `GET /openai/files/{id}/content?api-version=…`.
pub(crate) async fn file_content(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    files::content_from(&state.storage().azure.files, &id)
}

/// `POST /openai/fine_tuning/jobs?api-version=…`.
pub(crate) async fn create_job(
    State(state): State<Arc<SimState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    fine_tuning::create_in(&state, Flavor::Azure, &body)
}

/// `GET /openai/fine_tuning/jobs?api-version=…`.
pub(crate) async fn list_jobs(
    State(state): State<Arc<SimState>>,
    query: ListParams,
) -> Result<Response, ApiError> {
    fine_tuning::list_in(&state, Flavor::Azure, query)
}

/// `GET /openai/fine_tuning/jobs/{id}?api-version=…`.
pub(crate) async fn retrieve_job(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    fine_tuning::retrieve_in(&state, Flavor::Azure, &id)
}

/// `GET /openai/fine_tuning/jobs/{id}/events?api-version=…`.
pub(crate) async fn job_events(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
    query: ListParams,
) -> Result<Response, ApiError> {
    fine_tuning::events_in(&state, Flavor::Azure, &id, query)
}

/// `GET /openai/fine_tuning/jobs/{id}/checkpoints?api-version=…`.
pub(crate) async fn job_checkpoints(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
    query: ListParams,
) -> Result<Response, ApiError> {
    fine_tuning::checkpoints_in(&state, Flavor::Azure, &id, query)
}

/// `POST /openai/fine_tuning/jobs/{id}/cancel?api-version=…`.
pub(crate) async fn cancel_job(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    fine_tuning::cancel_in(&state, Flavor::Azure, &id)
}

/// `POST /openai/deployments/{deployment}/chat/completions?api-version=…`: the deployment
/// picks the model; the body's `model`, if any, is ignored as Azure ignores it.
pub(crate) async fn chat_completions(
    State(state): State<Arc<SimState>>,
    Path(deployment): Path<String>,
    body: Bytes,
) -> Response {
    match reply::json_object(&body) {
        Ok(request) => deployment_chat(&state, &deployment, &request).await,
        Err(err) => err.into_response(),
    }
}

/// `POST /openai/v1/chat/completions` (the v1 API, with no `api-version`): the body's `model`
/// names the deployment, as OpenAI's clients send it.
pub(crate) async fn v1_chat_completions(
    State(state): State<Arc<SimState>>,
    body: Bytes,
) -> Response {
    let request = match reply::json_object(&body) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    let Some(deployment) = request.get("model").and_then(|m| m.as_str()) else {
        return ApiError::invalid_request("you must provide a model parameter")
            .with_param("model")
            .into_response();
    };
    deployment_chat(&state, deployment, &request).await
}

/// The chat answer of the model `deployment` serves, or Azure's 404 for a deployment that does
/// not exist or is still provisioning.
async fn deployment_chat(
    state: &SimState,
    deployment: &str,
    request: &serde_json::Map<String, serde_json::Value>,
) -> Response {
    let serving = state
        .storage()
        .azure
        .deployments
        .serving(deployment, Instant::now());
    let Some(model) = serving else {
        return ApiError::not_found(
            "The API deployment for this resource does not exist. If you created the deployment \
             within the last 5 minutes, please wait a moment and try again.",
        )
        .with_code("DeploymentNotFound")
        .into_response();
    };
    chat::respond(state, &model, request).await
}

/// Azure's answer to an unknown `/openai/…` path.
pub(crate) fn unknown_path() -> ApiError {
    ApiError::not_found("Resource not found").with_code("404")
}

/// Azure's answer to a request without `api-version`.
pub(crate) fn missing_api_version() -> ApiError {
    ApiError::invalid_request(
        "Missing required query parameter 'api-version'. Supported versions are listed at \
         https://aka.ms/azure-openai-versions.",
    )
    .with_param("api-version")
    .with_code("MissingApiVersionParameter")
}

/// Azure's 429, with its own `code` and wording.
pub(crate) fn throttled(retry_after: u64) -> ApiError {
    ApiError::rate_limited(
        format!(
            "Requests to the Azure OpenAI API have exceeded the call rate limit of your current \
             pricing tier. Please retry after {retry_after} seconds."
        ),
        "429",
        retry_after,
    )
}
