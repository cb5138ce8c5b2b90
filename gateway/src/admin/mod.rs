//! The admin API, on its own listener (loopback by default), behind `FORGE_ADMIN_TOKEN`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use forge_layer::store::{CaptureCounters, Store};
use forge_layer::trace::{Outcome, Trace, TraceId};
use serde::Deserialize;

use crate::auth::{Secret, admin_token_matches, bearer_token};
use crate::routes::RouteControl;
use forge_layer::distill::dataset_token_matches;
use forge_layer::guard::Guard;

mod distill;
mod routes;
use crate::error::Error;
use crate::extract::JsonPath;

/// What the admin handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Reads and changes the routing table.
    pub control: RouteControl,
    /// The canary guard, when it is on.
    pub guard: Option<Arc<Guard>>,
    /// The distillation service, when routes are configured for it.
    pub distiller: Option<Arc<forge_layer::distill::DistillationService>>,
    /// The trace store, when capture is on.
    pub store: Option<Store>,
    /// The capture counters, when capture is on.
    pub counters: Option<Arc<CaptureCounters>>,
}

/// The admin routes, all behind the token.
pub fn app(state: AdminState, token: Secret) -> Router {
    Router::new()
        .route("/admin/traces", get(list_traces))
        .route("/admin/traces/{id}", get(get_trace))
        .route("/admin/stats", get(stats))
        .route("/admin/routes", get(routes::list))
        .route("/admin/routes/{alias}", put(routes::put))
        .route("/admin/routes/{alias}/canary", put(routes::canary))
        .route("/admin/routes/{alias}/promote", post(routes::promote))
        .route("/admin/routes/{alias}/rollback", post(routes::rollback))
        .route("/admin/routes/{alias}/guard", put(routes::guard_mode))
        .route("/admin/jobs", get(distill::jobs))
        .route("/admin/jobs/{id}", get(distill::job))
        .route("/admin/distill/{alias}", post(distill::distill))
        .route("/admin/models", get(distill::models))
        .fallback(|method: http::Method, uri: http::Uri| async move {
            Error::UnknownPath {
                method: method.to_string(),
                path: uri.path().to_string(),
            }
        })
        .method_not_allowed_fallback(crate::proxy::method_not_allowed)
        .layer(middleware::from_fn_with_state(token.clone(), require_token))
        // A remote trainer holds a token for its own dataset only (see `dataset_token`).
        .merge(
            Router::new()
                .route("/admin/datasets/{file}", get(distill::dataset))
                .layer(middleware::from_fn_with_state(token, require_dataset_token)),
        )
        .with_state(state)
}

/// An admin error: OpenAI-shaped JSON with the status the cause calls for.
fn error(status: http::StatusCode, code: &'static str, message: String) -> Response {
    let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}});
    (status, axum::Json(body)).into_response()
}

async fn require_token(State(token): State<Secret>, request: Request, next: Next) -> Response {
    if admin_token_matches(request.headers(), token.expose()) {
        next.run(request).await
    } else {
        Error::Unauthorized.into_response()
    }
}

/// The admin token, or the dataset token of the job whose dataset is asked for.
async fn require_dataset_token(
    State(token): State<Secret>,
    request: Request,
    next: Next,
) -> Response {
    let job = request
        .uri()
        .path()
        .rsplit('/')
        .next()
        .and_then(|file| file.strip_suffix(".jsonl"));
    let for_this_job = match (job, bearer_token(request.headers())) {
        (Some(job), Some(presented)) => dataset_token_matches(token.expose(), job, presented),
        _ => false,
    };
    if for_this_job || admin_token_matches(request.headers(), token.expose()) {
        next.run(request).await
    } else {
        Error::Unauthorized.into_response()
    }
}

/// The most traces one page returns.
const MAX_PAGE: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceQuery {
    limit: Option<usize>,
    before: Option<String>,
    tenant: Option<String>,
    alias: Option<String>,
    arm: Option<String>,
    outcome: Option<Outcome>,
    /// Only golden traces (`true`) or only others (`false`), by their route's policy.
    golden: Option<bool>,
}

async fn list_traces(
    State(state): State<AdminState>,
    query: Result<Query<TraceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return Error::invalid(e.body_text(), None).into_response(),
    };
    let Some(store) = state.store else {
        return Error::invalid("Capture is off: there are no traces.", None).into_response();
    };
    let limit = query.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    let before = match query.before.as_deref().map(str::parse::<TraceId>) {
        Some(Err(_)) => {
            return Error::invalid("`before` must be a trace id.", Some("before")).into_response();
        }
        Some(Ok(id)) => Some(id),
        None => None,
    };
    let golden = query.golden;
    let keep = move |t: &Trace| {
        query
            .tenant
            .as_ref()
            .is_none_or(|x| t.tenant.as_ref() == Some(x))
            && query.alias.as_ref().is_none_or(|x| &t.alias == x)
            && query.arm.as_deref().is_none_or(|x| t.arm.kind() == x)
            && query.outcome.is_none_or(|x| t.outcome == x)
    };
    let distiller = state.distiller.clone();
    let policy = move |alias: &str| {
        distiller
            .as_ref()
            .map_or_else(Default::default, |d| d.golden_policy(alias))
    };
    // One extra tells whether another page exists.
    let result = tokio::task::spawn_blocking(move || match golden {
        None => store.recent_traces(before, limit + 1, keep),
        Some(wanted) => store.with_graded_snapshot(|scan| {
            let mut out = Vec::new();
            scan.newest_first(before, |t, feedback, evaluation| {
                let is_golden =
                    policy(&t.alias).is_golden(&t, feedback.as_ref(), evaluation.as_ref());
                if keep(&t) && is_golden == wanted {
                    out.push(t);
                }
                out.len() <= limit
            })?;
            Ok(out)
        }),
    })
    .await;
    match result {
        Ok(Ok(mut traces)) => {
            let has_more = traces.len() > limit;
            traces.truncate(limit);
            let last_id = traces.last().map(|t| t.id.to_string());
            axum::Json(serde_json::json!({"object": "list", "data": traces, "has_more": has_more, "last_id": last_id}))
                .into_response()
        }
        Ok(Err(e)) => store_error(&e),
        Err(_) => Error::Internal.into_response(),
    }
}

async fn get_trace(State(state): State<AdminState>, JsonPath(id): JsonPath<String>) -> Response {
    let (Some(store), Ok(trace_id)) = (state.store, id.parse::<TraceId>()) else {
        return Error::TraceNotFound(id).into_response();
    };
    match tokio::task::spawn_blocking(move || store.trace(trace_id)).await {
        Ok(Ok(Some(trace))) => axum::Json(trace).into_response(),
        Ok(Ok(None)) => Error::TraceNotFound(id).into_response(),
        Ok(Err(e)) => store_error(&e),
        Err(_) => Error::Internal.into_response(),
    }
}

async fn stats(State(state): State<AdminState>) -> Response {
    let stored = match state.store {
        Some(store) => match tokio::task::spawn_blocking(move || store.trace_count()).await {
            Ok(Ok(n)) => Some(n),
            Ok(Err(e)) => return store_error(&e),
            Err(_) => return Error::Internal.into_response(),
        },
        None => None,
    };
    let table = state.control.router().load();
    axum::Json(serde_json::json!({
        "capture": state.counters.map(|c| c.snapshot()),
        "traces_stored": stored,
        "routes": {"version": table.version(), "aliases": table.routes().count()},
    }))
    .into_response()
}

fn store_error(e: &forge_layer::store::StoreError) -> Response {
    Error::from_store(e).into_response()
}
