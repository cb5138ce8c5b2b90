//! `POST /v1/feedback`: a score or an approval for a captured trace.

use std::sync::Arc;

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use forge_layer::store::{Feedback, Store, StoreError};
use forge_layer::trace::{Trace, TraceId, now_ms};
use http::StatusCode;
use serde::Deserialize;

use super::ProxyState;
use crate::auth::Caller;
use crate::error::Error;

/// The longest comment kept.
const MAX_COMMENT_CHARS: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackRequest {
    trace_id: String,
    score: Option<f64>,
    approved: Option<bool>,
    comment: Option<String>,
}

pub async fn submit(
    State(state): State<Arc<ProxyState>>,
    caller: Option<axum::Extension<Caller>>,
    body: Body,
) -> Response {
    let caller = caller.map(|axum::Extension(c)| c).unwrap_or_default();
    match record(&state, caller, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn record(state: &ProxyState, caller: Caller, body: Body) -> Result<Response, Error> {
    let bytes = state.body.read(body).await?;
    let request: FeedbackRequest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(format!("Invalid feedback body: {e}."), None))?;
    let trace_id: TraceId = request.trace_id.parse().map_err(|_| {
        Error::invalid(
            "`trace_id` must be the x-forge-trace-id of a response.",
            Some("trace_id"),
        )
    })?;
    if let Some(score) = request.score
        && (!score.is_finite() || !(0.0..=100.0).contains(&score))
    {
        return Err(Error::invalid(
            "`score` must be a number from 0 to 100.",
            Some("score"),
        ));
    }
    if request.score.is_none() && request.approved.is_none() {
        return Err(Error::invalid("Give a `score`, `approved`, or both.", None));
    }
    if request
        .comment
        .as_ref()
        .is_some_and(|c| c.chars().count() > MAX_COMMENT_CHARS)
    {
        return Err(Error::invalid(
            format!("`comment` is longer than {MAX_COMMENT_CHARS} characters."),
            Some("comment"),
        ));
    }
    let Some(store) = state.store.clone() else {
        return Err(Error::TraceNotFound(request.trace_id));
    };
    let feedback = Feedback {
        trace_id,
        score: request.score,
        approved: request.approved,
        // Written by a person, and as likely as a prompt to hold a pasted key or an address.
        comment: request
            .comment
            .map(|c| state.redactor.redact_str(&c).unwrap_or(c)),
        time_ms: now_ms(),
    };
    let score = feedback.score;
    let result = save(store, caller, feedback, state.feedback_wait).await?;
    match result {
        Ok((trace, first_score)) => {
            // The guard counts one score per trace: posting again must not outvote others.
            if let (Some(guard), Some(score), true) = (&state.guard, score, first_score) {
                guard.record_feedback(&trace.alias, &trace.model, trace.time_ms, score);
            }
            Ok((
            StatusCode::OK,
            axum::Json(serde_json::json!({"object": "feedback", "trace_id": request.trace_id, "recorded": true})),
        )
            .into_response())
        }
        Err(StoreError::NoSuchTrace(_)) => Err(Error::TraceNotFound(request.trace_id)),
        Err(e @ StoreError::FeedbackFull(_)) => Err(Error::invalid(
            format!("{e}; the latest of them stays the one grading uses."),
            Some("trace_id"),
        )),
        Err(e) => Err(Error::from_store(&e)),
    }
}

/// Runs store work off the runtime: reads and writes wait for the disk.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<Result<T, StoreError>, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| Error::Internal)
}

/// Checks the trace belongs to the caller's tenant, then stores the feedback. A trace still on
/// its way to the store (its exchange running, or queued for the writer) is waited for, on the
/// runtime between reads, so that many feedbacks waiting for one long stream's trace hold no
/// blocking thread (commits and route changes run on that pool); past `wait`
/// (`server.feedback_wait_secs`) the answer is [`Error::TraceInProgress`]. Also says whether
/// this is the trace's first score.
async fn save(
    store: Store,
    caller: Caller,
    feedback: Feedback,
    wait: Duration,
) -> Result<Result<(Trace, bool), StoreError>, Error> {
    let id = feedback.trace_id;
    let deadline = tokio::time::Instant::now() + wait;
    let trace = loop {
        let reader = store.clone();
        let found = blocking(move || {
            // Asked before the store is read: an id that settles in between is then found there.
            let on_its_way = reader.unsettled().contains(id);
            reader.trace(id).map(|trace| (trace, on_its_way))
        })
        .await?;
        match found {
            Ok((Some(trace), _)) => break trace,
            Ok((None, true)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Still on its way: a 404 would say it never will be, and the feedback be lost.
            // (Which tenant it is for cannot be known yet; an id is a random ULID.)
            Ok((None, true)) => return Err(Error::TraceInProgress(id.to_string())),
            Ok((None, false)) => return Ok(Err(StoreError::NoSuchTrace(id))),
            Err(e) => return Ok(Err(e)),
        }
    };
    if trace.tenant != caller.tenant {
        // Another tenant's trace is reported as missing, not as forbidden: no existence leak.
        // A key without a tenant reaches only traces without one: grading makes training data,
        // so no key may grade a tenant's traces but that tenant's own.
        return Ok(Err(StoreError::NoSuchTrace(id)));
    }
    Ok(blocking(move || store.add_feedback(&feedback))
        .await?
        .map(|first_score| (trace, first_score)))
}
