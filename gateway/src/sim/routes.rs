//! The axum router: every endpoint, the JSON fallbacks, and the intake middleware that records requests and checks the key.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderValue, Method, Uri};
use http_body_util::LengthLimitError;

use super::config::SimConfig;
use super::error::ApiError;
use super::journal::RecordedRequest;
use super::state::SimState;
use super::{chat, files, fine_tuning, models};

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
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        // The intake middleware has already read the body within MAX_REQUEST_BYTES.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), intake))
        .with_state(state.clone());
    (router, state)
}

/// Buffers the body (so it can be recorded and handed on), records the request, then checks
/// the API key. Every request is recorded, including those that fail auth.
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
    let mut response = match state.check_api_key(&parts.headers) {
        Ok(()) => next.run(Request::from_parts(parts, Body::from(body))).await,
        Err(err) => err.into_response(),
    };
    if let Ok(id) = HeaderValue::from_str(&format!("req_{}", ulid::Ulid::new())) {
        response.headers_mut().insert("x-request-id", id);
    }
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

async fn unknown_url(method: Method, uri: Uri) -> ApiError {
    ApiError::unknown_url(&method, uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(&method, uri.path())
}
