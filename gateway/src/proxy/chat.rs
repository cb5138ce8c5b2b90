//! `POST /v1/chat/completions`: validate, pick the arm from one table snapshot, forward, stream back.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use forge_layer::capture::ExchangeMeta;
use forge_router::StickyKey;
use tower::ServiceExt;

use super::ProxyState;
use super::exchange::Routed;
use super::request::ChatRequest;
use crate::auth::Caller;
use crate::error::Error;

/// The header a client may set to pin its canary arm.
pub const STICKY_HEADER: &str = "x-forge-sticky-key";

pub async fn completions(
    State(state): State<Arc<ProxyState>>,
    caller: Option<axum::Extension<Caller>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let caller = caller.map(|axum::Extension(c)| c).unwrap_or_default();
    match forward(&state, caller, &headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn forward(
    state: &ProxyState,
    caller: Caller,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    state.body.check_declared(headers)?;
    let bytes = state.body.read(body).await?;
    let request = ChatRequest::parse(&bytes)?;
    if !state.passthrough_account_apis
        && let Some(field) = request.stored_reference()?
    {
        return Err(Error::AccountApi(format!(
            "POST /v1/chat/completions with {field}"
        )));
    }

    // One snapshot for the whole request: the route and the version recorded come from it.
    let table = state.router.load();
    let alias = request.model();
    let route = table
        .route(alias)
        .ok_or_else(|| Error::ModelNotFound(alias.to_string()))?;
    let sticky_owned;
    let key = if route.students.is_empty() {
        // Only one arm: skip looking for a key.
        StickyKey::Point(0)
    } else {
        sticky_owned = sticky_key(headers, &request, &caller);
        match &sticky_owned {
            Some(k) => StickyKey::Key(k.as_bytes()),
            None => StickyKey::Point(rand::random_range(0..10_000)),
        }
    };
    let decision = table
        .pick(alias, key)
        .ok_or_else(|| Error::ModelNotFound(alias.to_string()))?;
    let upstream = state
        .upstreams
        .get(&decision.target.upstream)
        .ok_or(Error::UpstreamUnreachable)?;

    let mut exchange = http::Request::new(request.with_model(&decision.target.model));
    exchange.extensions_mut().insert(Routed {
        upstream: upstream.clone(),
        stream: request.is_stream(),
    });
    // The guard judges canaries from capture sessions, so a canary route gets one even with
    // capture off; a route without students does not pay for it.
    if state.capture_enabled || (state.guard.is_some() && !route.students.is_empty()) {
        exchange.extensions_mut().insert(ExchangeMeta {
            tenant: caller.tenant,
            key_id: caller.key_id,
            alias: alias.to_string(),
            upstream: decision.target.upstream.clone(),
            model: decision.target.model.clone(),
            arm: decision.arm,
            route_version: decision.version,
            stream: request.is_stream(),
            canary: !route.students.is_empty(),
        });
    }
    let response = match state.exchange.clone().oneshot(exchange).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    Ok(response.map(Body::new))
}

/// The sticky key, in order of precedence: the header, `user`, `safety_identifier`, the client key.
fn sticky_key(headers: &HeaderMap, request: &ChatRequest<'_>, caller: &Caller) -> Option<String> {
    headers
        .get(STICKY_HEADER)
        .filter(|v| !v.is_empty())
        // Non-ASCII bytes are still a key (lossy, but the same bytes give the same key).
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .or_else(|| request.string_field("user").filter(|v| !v.is_empty()))
        .or_else(|| {
            request
                .string_field("safety_identifier")
                .filter(|v| !v.is_empty())
        })
        .or_else(|| caller.key_id.clone())
}
