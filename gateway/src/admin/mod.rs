//! The admin API, on its own listener (loopback by default), behind `FORGE_ADMIN_TOKEN`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRef, Query, Request, State};
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
use crate::extract::{BodyLimits, JsonPath};

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
    /// What a request body may be: [`MAX_BODY_BYTES`] within `server.body_timeout_secs`.
    pub body: BodyLimits,
}

/// The largest admin request body. Route specs and the like are small; this is axum's default.
pub const MAX_BODY_BYTES: usize = 2 << 20;

impl FromRef<AdminState> for BodyLimits {
    fn from_ref(state: &AdminState) -> Self {
        state.body
    }
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
        .route("/admin/jobs/{id}/cancel", post(distill::cancel))
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
                .method_not_allowed_fallback(crate::proxy::method_not_allowed)
                .layer(middleware::from_fn_with_state(token, require_dataset_token)),
        )
        .with_state(state)
}

/// An admin error: OpenAI-shaped JSON with the status the cause calls for, typed as the
/// caller's error or, for a 5xx, Forge's.
fn error(status: http::StatusCode, code: &'static str, message: String) -> Response {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
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

/// The most traces one page reads. A filter that matches little would otherwise read the whole
/// store for one page; the page stops here instead, and `last_id` tells where to go on.
const SCAN_BUDGET: usize = 20_000;

/// One page of a newest-first scan: what it kept, and where the next page starts.
#[derive(Debug)]
struct Page {
    limit: usize,
    budget: usize,
    traces: Vec<Trace>,
    scanned: usize,
    last_scanned: Option<TraceId>,
}

impl Page {
    fn new(limit: usize, budget: usize) -> Self {
        Self {
            limit,
            budget,
            traces: Vec::new(),
            scanned: 0,
            last_scanned: None,
        }
    }

    /// Takes in one scanned trace; `false` once the page is full or its budget spent.
    fn visit(&mut self, trace: Trace, keep: bool) -> bool {
        self.scanned += 1;
        self.last_scanned = Some(trace.id);
        if keep {
            self.traces.push(trace);
        }
        // One extra tells whether another page exists.
        self.traces.len() <= self.limit && self.scanned < self.budget
    }

    /// The answer: a full page goes on after its last trace; one that ran out of budget, after
    /// the last trace it read.
    fn into_json(mut self) -> serde_json::Value {
        let (has_more, last_id) = if self.traces.len() > self.limit {
            self.traces.truncate(self.limit);
            (true, self.traces.last().map(|t| t.id))
        } else if self.scanned >= self.budget {
            (true, self.last_scanned)
        } else {
            (false, self.traces.last().map(|t| t.id))
        };
        serde_json::json!({
            "object": "list",
            "data": self.traces,
            "has_more": has_more,
            "last_id": last_id.map(|id| id.to_string()),
        })
    }
}

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
    let result = tokio::task::spawn_blocking(move || {
        let mut page = Page::new(limit, SCAN_BUDGET);
        match golden {
            None => store.newest_traces(before, |t| {
                let kept = keep(&t);
                page.visit(t, kept)
            })?,
            Some(wanted) => store.with_graded_snapshot(|scan| {
                scan.newest_first(before, |t, feedback, evaluation| {
                    let is_golden =
                        policy(&t.alias).is_golden(&t, feedback.as_ref(), evaluation.as_ref());
                    let kept = keep(&t) && is_golden == wanted;
                    page.visit(t, kept)
                })
            })?,
        }
        Ok::<_, forge_layer::store::StoreError>(page)
    })
    .await;
    match result {
        Ok(Ok(page)) => axum::Json(page.into_json()).into_response(),
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn status_and_type(response: Response) -> (u16, String, String) {
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let error = &body["error"];
        (
            status,
            error["type"].as_str().unwrap().to_string(),
            error["code"].as_str().unwrap().to_string(),
        )
    }

    #[tokio::test]
    async fn admin_errors_say_whose_fault_they_are() {
        let cases = [
            (http::StatusCode::BAD_REQUEST, "invalid_request_error"),
            (http::StatusCode::NOT_FOUND, "invalid_request_error"),
            (http::StatusCode::CONFLICT, "invalid_request_error"),
            (http::StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            (http::StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        ];
        for (status, kind) in cases {
            let got = status_and_type(error(status, "some_code", "why".into())).await;
            assert_eq!(got, (status.as_u16(), kind.into(), "some_code".into()));
        }
    }

    /// `n` traces, newest first, as a scan meets them, and their ids.
    fn traces(n: usize) -> (Vec<Trace>, Vec<String>) {
        use forge_layer::capture::{BodyEnd, CaptureSession, ExchangeMeta};
        use forge_layer::redact::Redactor;
        use forge_layer::store::Ticket;

        let meta = ExchangeMeta {
            tenant: None,
            key_id: None,
            alias: "a".into(),
            upstream: "u".into(),
            model: "m".into(),
            arm: forge_router::Arm::Teacher,
            route_version: 1,
            stream: false,
            canary: false,
        };
        let mut out: Vec<Trace> = (0..n)
            .map(|_| {
                let request = bytes::Bytes::from_static(br#"{"model":"a","messages":[]}"#);
                let mut s = CaptureSession::new(Ticket::untracked(), meta.clone(), request, 1024);
                s.on_response(200, false);
                s.finish(BodyEnd::Complete)
                    .into_trace(&Redactor::default(), 1024)
            })
            .collect();
        out.reverse();
        let ids = out.iter().map(|t| t.id.to_string()).collect();
        (out, ids)
    }

    /// `has_more` and `last_id` of a page's answer.
    fn next(json: &serde_json::Value) -> (serde_json::Value, serde_json::Value) {
        (json["has_more"].clone(), json["last_id"].clone())
    }

    fn run(page: &mut Page, traces: Vec<Trace>, keep: impl Fn(usize) -> bool) -> usize {
        let mut read = 0;
        for (i, t) in traces.into_iter().enumerate() {
            read += 1;
            if !page.visit(t, keep(i)) {
                break;
            }
        }
        read
    }

    #[test]
    fn a_full_page_goes_on_after_its_last_trace() {
        let (all, ids) = traces(10);
        let mut page = Page::new(3, 100);
        // Reads one more than the page, to know there is more.
        assert_eq!(run(&mut page, all, |_| true), 4);
        let json = page.into_json();
        assert_eq!(json["data"].as_array().unwrap().len(), 3);
        assert_eq!(next(&json), (true.into(), ids[2].clone().into()));
    }

    #[test]
    fn a_page_that_spends_its_budget_goes_on_after_the_last_trace_it_read() {
        let (all, ids) = traces(10);
        // Only every fifth trace matches; a budget of 7 reads stops at the seventh.
        let mut page = Page::new(3, 7);
        assert_eq!(run(&mut page, all, |i| i % 5 == 0), 7);
        let json = page.into_json();
        let kept: Vec<&str> = json["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap())
            .collect();
        assert_eq!(kept, [ids[0].as_str(), ids[5].as_str()]);
        assert_eq!(next(&json), (true.into(), ids[6].clone().into()));
    }

    #[test]
    fn the_end_of_the_store_within_budget_is_the_last_page() {
        let (all, ids) = traces(4);
        let mut page = Page::new(3, 100);
        assert_eq!(run(&mut page, all, |i| i != 1), 4);
        let json = page.into_json();
        assert_eq!(json["data"].as_array().unwrap().len(), 3);
        assert_eq!(next(&json), (false.into(), ids[3].clone().into()));
    }
}
