//! The axum router: every endpoint, the JSON fallbacks, and the intake middleware that records requests, checks credentials and injects rate limits.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use http::{HeaderValue, Method, Uri};
use http_body_util::LengthLimitError;

use super::arm::ArmError;
use super::cluster::KubeStatus;
use super::config::SimConfig;
use super::error::ApiError;
use super::journal::RecordedRequest;
use super::state::{BearerRefusal, SimState};
use super::{arm, azure, chat, cluster, files, fine_tuning, models, vllm};

/// OpenAI's limit for one uploaded file; nothing else comes near it.
pub(crate) const MAX_REQUEST_BYTES: usize = 512 * 1024 * 1024;

pub(crate) fn build(config: SimConfig) -> (Router, Arc<SimState>) {
    let state = Arc::new(SimState::new(config));
    let router = Router::new()
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{model}", get(models::retrieve))
        .route("/v1/files", post(files::upload).get(files::list))
        .route(
            "/v1/files/{file_id}",
            get(files::retrieve).delete(files::delete),
        )
        .route("/v1/files/{file_id}/content", get(files::content))
        .route(
            "/v1/fine_tuning/jobs",
            post(fine_tuning::create).get(fine_tuning::list),
        )
        .route("/v1/fine_tuning/jobs/{job_id}", get(fine_tuning::retrieve))
        .route(
            "/v1/fine_tuning/jobs/{job_id}/events",
            get(fine_tuning::events),
        )
        .route(
            "/v1/fine_tuning/jobs/{job_id}/checkpoints",
            get(fine_tuning::checkpoints),
        )
        .route(
            "/v1/fine_tuning/jobs/{job_id}/cancel",
            post(fine_tuning::cancel),
        )
        .route(
            "/v1/fine_tuning/jobs/{job_id}/pause",
            post(fine_tuning::pause),
        )
        .route(
            "/v1/fine_tuning/jobs/{job_id}/resume",
            post(fine_tuning::resume),
        )
        .route("/v1/load_lora_adapter", post(vllm::load))
        .route("/v1/unload_lora_adapter", post(vllm::unload))
        .route("/openai/files", post(azure::upload).get(azure::list_files))
        .route(
            "/openai/files/{file_id}",
            get(azure::retrieve_file).delete(azure::delete_file),
        )
        .route("/openai/files/{file_id}/content", get(azure::file_content))
        .route(
            "/openai/fine_tuning/jobs",
            post(azure::create_job).get(azure::list_jobs),
        )
        .route(
            "/openai/fine_tuning/jobs/{job_id}",
            get(azure::retrieve_job),
        )
        .route(
            "/openai/fine_tuning/jobs/{job_id}/events",
            get(azure::job_events),
        )
        .route(
            "/openai/fine_tuning/jobs/{job_id}/checkpoints",
            get(azure::job_checkpoints),
        )
        .route(
            "/openai/fine_tuning/jobs/{job_id}/cancel",
            post(azure::cancel_job),
        )
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(azure::chat_completions),
        )
        .route(
            "/openai/v1/chat/completions",
            post(azure::v1_chat_completions),
        )
        .route(
            "/subscriptions/{subscription}/resourceGroups/{group}/providers/\
             Microsoft.CognitiveServices/accounts/{account}/deployments/{name}",
            put(arm::put).get(arm::get).delete(arm::delete),
        )
        .route(
            "/apis/batch/v1/namespaces/{namespace}/jobs",
            post(cluster::create_job).get(cluster::list_jobs),
        )
        .route(
            "/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            get(cluster::get_job).delete(cluster::delete_job),
        )
        .route(
            "/apis/batch/v1/namespaces/{namespace}/jobs/{name}/status",
            get(cluster::get_job),
        )
        .route(
            "/api/v1/namespaces/{namespace}/pods",
            get(cluster::list_pods),
        )
        .route(
            "/api/v1/namespaces/{namespace}/pods/{pod}/log",
            get(cluster::pod_log),
        )
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        // The intake middleware has already read the body within MAX_REQUEST_BYTES.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), intake))
        .with_state(state.clone());
    (router, state)
}

/// Which service a path belongs to, which decides its credentials and its error shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    /// `/v1/…` and anything unknown: OpenAI, and vLLM's LoRA endpoints.
    OpenAi,
    /// `/openai/…`: Azure OpenAI's data plane.
    Azure,
    /// `/subscriptions/…`: Azure Resource Manager.
    Arm,
    /// `/api/…` and `/apis/…`: the Kubernetes API server.
    Cluster,
}

impl Service {
    fn of(path: &str) -> Self {
        let under = |prefix: &str| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if under("/openai") {
            Service::Azure
        } else if under("/subscriptions") {
            Service::Arm
        } else if under("/api") || under("/apis") {
            Service::Cluster
        } else {
            Service::OpenAi
        }
    }

    /// Injected rate limits hit the training APIs, not OpenAI's chat or vLLM.
    fn is_rate_limited(self, path: &str) -> bool {
        match self {
            Service::OpenAi => {
                path.starts_with("/v1/files") || path.starts_with("/v1/fine_tuning/")
            }
            Service::Azure | Service::Arm | Service::Cluster => true,
        }
    }

    fn unknown_url(self, method: &Method, path: &str) -> Response {
        match self {
            Service::OpenAi => ApiError::unknown_url(method, path).into_response(),
            Service::Azure => azure::unknown_path().into_response(),
            Service::Arm => ArmError::unknown_path(path).into_response(),
            Service::Cluster => KubeStatus::unknown_path().into_response(),
        }
    }

    fn method_not_allowed(self, method: &Method, path: &str) -> Response {
        match self {
            Service::OpenAi | Service::Azure => {
                ApiError::method_not_allowed(method, path).into_response()
            }
            Service::Arm => ArmError::method_not_allowed(method).into_response(),
            Service::Cluster => KubeStatus::method_not_allowed().into_response(),
        }
    }
}

fn has_api_version(uri: &Uri) -> bool {
    uri.query()
        .into_iter()
        .flat_map(|query| query.split('&'))
        .any(|pair| {
            pair.strip_prefix("api-version=")
                .is_some_and(|v| !v.is_empty())
        })
}

/// Credentials, then `api-version` where Azure wants one, then any injected rate limit: the
/// refusal, if any.
fn admit(state: &SimState, parts: &http::request::Parts) -> Option<Response> {
    let path = parts.uri.path();
    let service = Service::of(path);
    let refusal = match service {
        Service::OpenAi => state
            .check_api_key(&parts.headers)
            .err()
            .map(IntoResponse::into_response),
        Service::Azure => match state.check_azure_key(&parts.headers) {
            Err(err) => Some(err.into_response()),
            // The v1 API has no dated versions.
            Ok(()) if !path.starts_with("/openai/v1/") && !has_api_version(&parts.uri) => {
                Some(azure::missing_api_version().into_response())
            }
            Ok(()) => None,
        },
        Service::Arm => match state.check_arm_token(&parts.headers) {
            Err(BearerRefusal::Missing) => Some(ArmError::missing_token().into_response()),
            Err(BearerRefusal::Wrong) => Some(ArmError::invalid_token().into_response()),
            Ok(()) if !has_api_version(&parts.uri) => {
                Some(ArmError::missing_api_version().into_response())
            }
            Ok(()) => None,
        },
        Service::Cluster => state
            .check_cluster_token(&parts.headers)
            .err()
            .map(|_| KubeStatus::unauthorized().into_response()),
    };
    if refusal.is_some() || !service.is_rate_limited(path) {
        return refusal;
    }
    if service == Service::OpenAi && state.take_quota_refusal() {
        return Some(ApiError::insufficient_quota().into_response());
    }
    let seconds = state.take_rate_limit()?;
    Some(match service {
        Service::OpenAi => ApiError::rate_limited(
            format!(
                "Rate limit reached for requests in organization org-forge-sim. Please try again \
                 in {seconds}s."
            ),
            "rate_limit_exceeded",
            seconds,
        )
        .into_response(),
        Service::Azure => azure::throttled(seconds).into_response(),
        Service::Arm => ArmError::throttled(seconds).into_response(),
        Service::Cluster => KubeStatus::too_many_requests(seconds).into_response(),
    })
}

/// Buffers the body (so it can be recorded and handed on), records the request, then checks
/// credentials and injected rate limits. Every request is recorded, including those refused.
async fn intake(State(state): State<Arc<SimState>>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(body) => body,
        Err(err) => {
            state
                .journal
                .record(RecordedRequest::from_parts(&parts, bytes::Bytes::new()));
            return if is_length_limit(&err) {
                ApiError::payload_too_large(MAX_REQUEST_BYTES).into_response()
            } else {
                ApiError::invalid_request("The request body could not be read.").into_response()
            };
        }
    };
    state
        .journal
        .record(RecordedRequest::from_parts(&parts, body.clone()));
    let mut response = match admit(&state, &parts) {
        None => next.run(Request::from_parts(parts, Body::from(body))).await,
        Some(refused) => refused,
    };
    if let Ok(id) = HeaderValue::from_str(&format!("req_{}", ulid::Ulid::new())) {
        response.headers_mut().insert("x-request-id", id);
    }
    // As OpenAI's answers carry them: the account behind the key, and its edge's cookie.
    let headers = response.headers_mut();
    headers.insert("openai-organization", HeaderValue::from_static("org-sim"));
    headers.insert("openai-project", HeaderValue::from_static("proj_sim"));
    headers.insert(
        http::header::SET_COOKIE,
        HeaderValue::from_static("__cf_bm=sim; path=/; domain=.api.openai.com; HttpOnly; Secure"),
    );
    response
}

fn is_length_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if current.is::<LengthLimitError>() {
            return true;
        }
        source = current.source();
    }
    false
}

async fn unknown_url(method: Method, uri: Uri) -> Response {
    Service::of(uri.path()).unknown_url(&method, uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    Service::of(uri.path()).method_not_allowed(&method, uri.path())
}
