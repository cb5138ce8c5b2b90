//! Other `/v1/*` requests (files, fine-tuning, embeddings, …): forwarded as they are, not captured.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{ProxyState, check_declared_length, read_body};
use crate::error::Error;
use crate::upstream::strip_hop_by_hop;

pub async fn forward(State(state): State<Arc<ProxyState>>, request: Request) -> Response {
    let response = match send(&state, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    state.metrics.record("passthrough", response.status());
    response
}

async fn send(state: &ProxyState, request: Request) -> Result<Response, Error> {
    let Some(upstream) = &state.passthrough else {
        return Err(Error::UnknownPath {
            method: request.method().to_string(),
            path: request.uri().path().to_string(),
        });
    };
    let (parts, body) = request.into_parts();
    check_declared_length(&parts.headers, state.max_body_bytes)?;
    // Bounded by the body limit, so holding it whole costs at most that much per request.
    let bytes = read_body(body, state).await?;

    // The route is matched on `/v1/…`; the upstream's base URL already ends in its own `/v1`.
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let suffix = path_and_query.strip_prefix("/v1").unwrap_or(path_and_query);
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_ENCODING);
    let response = upstream.send(parts.method, suffix, headers, bytes).await?;
    Ok(response.map(Body::new))
}
