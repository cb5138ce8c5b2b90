//! The admin API's routing endpoints: read the table and its history, change routes and shares.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use forge_router::{CanaryShare, RouteSpec, RoutingTable};
use http::StatusCode;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{AdminState, error};
use crate::extract::{JsonBytes, JsonPath};
use crate::routes::RouteUpdateError;

fn update_error(e: &RouteUpdateError) -> Response {
    match e {
        RouteUpdateError::Invalid(_) => {
            error(StatusCode::BAD_REQUEST, "invalid_route", e.to_string())
        }
        RouteUpdateError::UnknownAlias(_) => {
            error(StatusCode::NOT_FOUND, "route_not_found", e.to_string())
        }
        RouteUpdateError::UnknownStudent(_) => {
            error(StatusCode::NOT_FOUND, "student_not_found", e.to_string())
        }
        RouteUpdateError::Conflict(_) => error(StatusCode::CONFLICT, "conflict", e.to_string()),
        RouteUpdateError::Store(store) => crate::error::Error::from_store(store).into_response(),
        RouteUpdateError::Internal(why) => {
            tracing::error!(error = %why, "admin: route update failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the route update failed; see the log".into(),
            )
        }
    }
}

/// A request body that is not the JSON the endpoint expects: answered with a 400.
struct BadBody(String);

impl IntoResponse for BadBody {
    fn into_response(self) -> Response {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("invalid JSON body: {}", self.0),
        )
    }
}

/// Parses a JSON body. An empty body is `{}`.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, BadBody> {
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| BadBody(e.to_string()))
}

fn table_json(table: &RoutingTable) -> serde_json::Value {
    let routes: Vec<RouteSpec> = table.routes().map(RouteSpec::from).collect();
    serde_json::json!({"version": table.version(), "routes": routes})
}

fn applied(result: Result<Arc<RoutingTable>, RouteUpdateError>) -> Response {
    match result {
        Ok(table) => Json(table_json(&table)).into_response(),
        Err(e) => update_error(&e),
    }
}

/// Answers an operator's change of shares, after recording in the model registry what it left
/// the route's students at, as the guard's decisions are recorded: one taken to 0 is rolled
/// back (and so taken down once idle, where its deployment costs), one given all the traffic
/// is promoted, one given a share below that is in canary.
async fn recorded(
    state: &AdminState,
    alias: &str,
    result: Result<Arc<RoutingTable>, RouteUpdateError>,
    action: &str,
) -> Response {
    if let (Some(registry), Ok(after)) = (&state.distiller, &result)
        && let Some(route) = after.route(alias)
    {
        let shares = route
            .students
            .iter()
            .map(|s| (s.target.model.clone(), s.share))
            .collect();
        registry
            .record_shares(alias, shares, format!("admin: {action}"))
            .await;
    }
    applied(result)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    history: Option<usize>,
}

/// `GET /admin/routes`: the table in force, its change history and the guard's events.
pub async fn list(
    State(state): State<AdminState>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let limit = match query {
        Ok(Query(q)) => q.history.unwrap_or(50).min(1000),
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()),
    };
    let table = state.control.router().load();
    let history = match state.control.history(limit).await {
        Ok(h) => h,
        Err(e) => return update_error(&e),
    };
    let mut out = table_json(&table);
    out["history"] = serde_json::to_value(history).unwrap_or_default();
    if let Some(guard) = &state.guard {
        let manual: Vec<String> = table
            .routes()
            .filter(|r| guard.is_manual(&r.alias))
            .map(|r| r.alias.clone())
            .collect();
        out["guard"] = serde_json::json!({"events": guard.events(), "manual": manual});
    }
    Json(out).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutRoute {
    #[serde(default)]
    alias: Option<String>,
    teacher: forge_router::Target,
    #[serde(default)]
    students: Vec<forge_router::StudentSpec>,
    #[serde(default)]
    expected_version: Option<u64>,
}

/// `PUT /admin/routes/{alias}`: create or replace a route.
pub async fn put(
    State(state): State<AdminState>,
    JsonPath(alias): JsonPath<String>,
    JsonBytes(bytes): JsonBytes,
) -> Response {
    let request: PutRoute = match body(&bytes) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if request.alias.as_ref().is_some_and(|a| *a != alias) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body's alias differs from the path's".into(),
        );
    }
    let spec = RouteSpec {
        alias: alias.clone(),
        teacher: request.teacher,
        students: request.students,
    };
    let result = state
        .control
        .put_route(spec, "admin", request.expected_version)
        .await;
    recorded(&state, &alias, result, "put route").await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Canary {
    percent: f64,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    expected_version: Option<u64>,
}

/// `PUT /admin/routes/{alias}/canary` with `{"percent": 12.5}` (and `"model"` when the route
/// has several students).
pub async fn canary(
    State(state): State<AdminState>,
    JsonPath(alias): JsonPath<String>,
    JsonBytes(bytes): JsonBytes,
) -> Response {
    let request: Canary = match body(&bytes) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let share = match CanaryShare::from_percent(request.percent) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_route", e.to_string()),
    };
    let result = state
        .control
        .set_share(
            &alias,
            request.model.as_deref(),
            share,
            "admin",
            request.expected_version,
        )
        .await;
    recorded(&state, &alias, result, "canary").await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Which {
    #[serde(default)]
    model: Option<String>,
}

/// `POST /admin/routes/{alias}/promote`: the student takes 100%; the teacher stays for rollback.
pub async fn promote(
    State(state): State<AdminState>,
    JsonPath(alias): JsonPath<String>,
    JsonBytes(bytes): JsonBytes,
) -> Response {
    let which: Which = match body(&bytes) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let result = state
        .control
        .promote(&alias, which.model.as_deref(), "admin")
        .await;
    recorded(&state, &alias, result, "promote").await
}

/// `POST /admin/routes/{alias}/rollback`: the student (or every student) goes to 0.
pub async fn rollback(
    State(state): State<AdminState>,
    JsonPath(alias): JsonPath<String>,
    JsonBytes(bytes): JsonBytes,
) -> Response {
    let which: Which = match body(&bytes) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let result = state
        .control
        .rollback(&alias, which.model.as_deref(), "admin")
        .await;
    recorded(&state, &alias, result, "rollback").await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Mode {
    Auto,
    Manual,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardMode {
    mode: Mode,
}

/// `PUT /admin/routes/{alias}/guard` with `{"mode": "manual" | "auto"}`.
pub async fn guard_mode(
    State(state): State<AdminState>,
    JsonPath(alias): JsonPath<String>,
    JsonBytes(bytes): JsonBytes,
) -> Response {
    let request: GuardMode = match body(&bytes) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let Some(guard) = &state.guard else {
        return error(
            StatusCode::CONFLICT,
            "guard_off",
            "the canary guard is off ([guard] enabled = false)".into(),
        );
    };
    if state.control.router().load().route(&alias).is_none() {
        return update_error(&RouteUpdateError::UnknownAlias(alias));
    }
    let manual = matches!(request.mode, Mode::Manual);
    if let Err(e) = state.control.set_guard_mode(guard, &alias, manual).await {
        return update_error(&e);
    }
    Json(serde_json::json!({"alias": alias, "mode": if guard.is_manual(&alias) { "manual" } else { "auto" }})).into_response()
}
