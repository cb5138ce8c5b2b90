//! `POST /v1/chat/completions`: validate, pick the arm from one table snapshot, forward, stream back.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use forge_router::StickyKey;

use super::request::ChatRequest;
use super::{ProxyState, check_declared_length, read_body};
use crate::error::Error;
use crate::upstream::full_body;

/// The header a client may set to pin its canary arm.
pub const STICKY_HEADER: &str = "x-forge-sticky-key";

pub async fn completions(State(state): State<ProxyState>, headers: HeaderMap, body: Body) -> Response {
    let response = match forward(&state, &headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    state.metrics.record("chat", response.status());
    response
}

async fn forward(state: &ProxyState, headers: &HeaderMap, body: Body) -> Result<Response, Error> {
    check_declared_length(headers, state.max_body_bytes)?;
    let bytes = read_body(body, state.max_body_bytes).await?;
    let request = ChatRequest::parse(&bytes)?;

    // One snapshot for the whole request: the route and the version recorded come from it.
    let table = state.router.load();
    let alias = request.model();
    let route = table.route(alias).ok_or_else(|| Error::ModelNotFound(alias.to_string()))?;
    let sticky_owned;
    let key = if route.students.is_empty() {
        // Only one arm: skip looking for a key.
        StickyKey::Point(0)
    } else {
        sticky_owned = sticky_key(headers, &request);
        match &sticky_owned {
            Some(k) => StickyKey::Key(k.as_bytes()),
            None => StickyKey::Point(rand::random_range(0..10_000)),
        }
    };
    let decision = table.pick(alias, key).ok_or_else(|| Error::ModelNotFound(alias.to_string()))?;
    let upstream = state
        .upstreams
        .get(&decision.target.upstream)
        .ok_or(Error::UpstreamUnreachable)?;

    let mut upstream_headers = HeaderMap::with_capacity(2);
    upstream_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    upstream_headers.insert(
        header::ACCEPT,
        if request.is_stream() {
            HeaderValue::from_static("text/event-stream")
        } else {
            HeaderValue::from_static("application/json")
        },
    );
    let out = request.with_model(&decision.target.model);
    let response = upstream
        .send(Method::POST, "/chat/completions", upstream_headers, full_body(out))
        .await?;
    Ok(response.map(Body::new))
}

/// The sticky key, in order of precedence: the header, then `user`, then `safety_identifier`.
fn sticky_key(headers: &HeaderMap, request: &ChatRequest<'_>) -> Option<String> {
    headers
        .get(STICKY_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .or_else(|| request.string_field("user").filter(|v| !v.is_empty()))
        .or_else(|| request.string_field("safety_identifier").filter(|v| !v.is_empty()))
}
