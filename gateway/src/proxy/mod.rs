//! The proxy port: OpenAI-compatible endpoints that route each request to its upstream.

pub mod body;
mod chat;
pub mod exchange;
pub mod feedback;
mod limit;
mod passthrough;
pub mod request;
mod stored;

use std::sync::Arc;

use axum::Router;
use axum::extract::{MatchedPath, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};

use crate::auth::{self, ClientKeys};
use crate::error::Error;
use crate::extract::{BodyLimits, JsonPath};
use crate::metrics::Metrics;
use crate::upstream::{Upstream, Upstreams};

pub use limit::InFlight;

/// What every proxy handler shares.
#[derive(Debug, Clone)]
pub struct ProxyState {
    /// The live routing table.
    pub router: forge_router::Router,
    /// Upstream clients by name.
    pub upstreams: Upstreams,
    /// Where other `/v1/*` requests go, if anywhere.
    pub passthrough: Option<Arc<Upstream>>,
    /// `server.passthrough_account_apis`.
    pub passthrough_account_apis: bool,
    /// `server.max_body_bytes` and `server.body_timeout_secs`.
    pub body: BodyLimits,
    /// `server.feedback_wait_secs`.
    pub feedback_wait: std::time::Duration,
    /// Counters and gauges.
    pub metrics: Arc<Metrics>,
    /// The upstream call, wrapped by the capture layer.
    pub exchange: exchange::Exchange,
    /// Whether chat exchanges are captured into the store. Without it, only exchanges on a route
    /// with a student in canary get a capture session, for the guard.
    pub capture_enabled: bool,
    /// The canary guard, fed by feedback too.
    pub guard: Option<Arc<forge_layer::guard::Guard>>,
    /// The trace store, when capture is on.
    pub store: Option<forge_layer::store::Store>,
    /// What capture redacts, applied to feedback comments too.
    pub redactor: forge_layer::redact::Redactor,
    /// App keys; empty means no authentication.
    pub keys: ClientKeys,
}

/// The proxy's routes. The in-flight cap covers the `/v1` endpoints, not health or metrics,
/// so an overloaded gateway can still be observed.
pub fn app(state: ProxyState, max_in_flight: usize) -> Router {
    let cap = InFlight::new(max_in_flight, Arc::clone(&state.metrics));
    let keys = state.keys.clone();
    let mut v1 = Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/feedback", post(feedback::submit))
        .route("/v1/models", get(list_models))
        // Any depth: an alias may hold slashes (`meta-llama/Llama-3-8B`), and a deeper path
        // must not fall through to the passthrough, with Forge's key.
        .route("/v1/models/{*model}", get(get_model))
        .route("/v1/{*rest}", any(passthrough::forward))
        .route_layer(middleware::from_fn_with_state(cap, limit::limit_in_flight));
    if keys.enabled() {
        // Checked before the cap, so unauthenticated traffic cannot take the slots.
        v1 = v1.route_layer(middleware::from_fn_with_state(keys, auth::authenticate));
    }
    // Outermost, so the refusals of the key check and the cap are counted too.
    let v1 = v1.route_layer(middleware::from_fn_with_state(
        Arc::clone(&state.metrics),
        count_answers,
    ));
    Router::new()
        .merge(v1)
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/metrics", get(metrics))
        .fallback(unknown_path)
        .method_not_allowed_fallback(method_not_allowed)
        // Shared, not cloned: axum hands every handler its own copy of the state.
        .with_state(Arc::new(state))
}

/// Middleware: counts every answer of the `/v1` endpoints in `forge_requests_total`, by
/// endpoint and status, when its head goes out.
async fn count_answers(
    State(metrics): State<Arc<Metrics>>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let endpoint = match request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
    {
        Some("/v1/chat/completions") => "chat",
        Some("/v1/feedback") => "feedback",
        Some("/v1/models" | "/v1/models/{*model}") => "models",
        _ => "passthrough",
    };
    let response = next.run(request).await;
    metrics.record(endpoint, response.status());
    response
}

#[derive(serde::Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

fn model_object(alias: &str) -> ModelObject<'_> {
    ModelObject {
        id: alias,
        object: "model",
        created: 0,
        owned_by: "forge",
    }
}

async fn list_models(State(state): State<Arc<ProxyState>>) -> Response {
    let table = state.router.load();
    let data: Vec<ModelObject<'_>> = table.routes().map(|r| model_object(&r.alias)).collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn get_model(
    State(state): State<Arc<ProxyState>>,
    JsonPath(model): JsonPath<String>,
) -> Response {
    let table = state.router.load();
    match table.route(&model) {
        Some(route) => axum::Json(model_object(&route.alias)).into_response(),
        None => Error::ModelNotFound(model).into_response(),
    }
}

async fn metrics(State(state): State<Arc<ProxyState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn unknown_path(method: Method, uri: Uri) -> Response {
    Error::UnknownPath {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
    .into_response()
}

pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let mut response = Error::invalid(
        format!("Method {method} is not allowed on {}.", uri.path()),
        None,
    )
    .into_response();
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}
