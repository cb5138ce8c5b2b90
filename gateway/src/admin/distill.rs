//! The admin API's distillation endpoints: jobs, cycles on demand, the model registry, datasets.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use forge_layer::distill::{CancelError, DistillError, ProviderError};
use http::{StatusCode, header};

use super::{AdminState, error};
use crate::extract::JsonPath;

/// The answer when no route is configured for distillation.
fn distillation_off() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "distillation_off",
        "no route is configured for distillation ([[distill]])".into(),
    )
}

fn internal(e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "admin: distillation store read failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the store could not be read; see the log".into(),
    )
}

/// `GET /admin/jobs`: every distillation job, newest first.
pub async fn jobs(State(state): State<AdminState>) -> Response {
    let Some(service) = state.distiller.clone() else {
        return distillation_off();
    };
    match tokio::task::spawn_blocking(move || service.jobs()).await {
        Ok(Ok(jobs)) => Json(serde_json::json!({"object": "list", "data": jobs})).into_response(),
        Ok(Err(e)) => crate::error::Error::from_store(&e).into_response(),
        Err(e) => internal(&e),
    }
}

/// `GET /admin/jobs/{id}`.
pub async fn job(State(state): State<AdminState>, JsonPath(id): JsonPath<String>) -> Response {
    let Some(service) = state.distiller.clone() else {
        return distillation_off();
    };
    let lookup = id.clone();
    match tokio::task::spawn_blocking(move || service.job(&lookup)).await {
        Ok(Ok(Some(job))) => Json(job).into_response(),
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            "job_not_found",
            format!("no job `{id}`"),
        ),
        Ok(Err(e)) => crate::error::Error::from_store(&e).into_response(),
        Err(e) => internal(&e),
    }
}

/// `POST /admin/jobs/{id}/cancel`: asks the provider to stop the job's training run (202 with
/// the job as it stood; it ends FAILED once its next poll reads the run cancelled).
pub async fn cancel(State(state): State<AdminState>, JsonPath(id): JsonPath<String>) -> Response {
    let Some(service) = state.distiller.clone() else {
        return distillation_off();
    };
    match service.cancel(&id).await {
        Ok(job) => (StatusCode::ACCEPTED, Json(job)).into_response(),
        Err(e @ CancelError::NotFound(_)) => {
            error(StatusCode::NOT_FOUND, "job_not_found", e.to_string())
        }
        Err(e @ CancelError::NotTraining(..)) => {
            error(StatusCode::CONFLICT, "job_not_training", e.to_string())
        }
        // The provider answered that it will not (the run ended meanwhile, say). Any other
        // refusal (a bad key, a job it does not know) is a fault between Forge and it: 502.
        Err(
            e @ CancelError::Provider(
                ProviderError::Http {
                    status: 400 | 409, ..
                }
                | ProviderError::Ended(_),
            ),
        ) => error(StatusCode::CONFLICT, "provider_refused", e.to_string()),
        Err(e @ (CancelError::Provider(_) | CancelError::RecordedButNotTaken(_))) => {
            error(StatusCode::BAD_GATEWAY, "provider_error", e.to_string())
        }
        Err(CancelError::Store(e)) => crate::error::Error::from_store(&e).into_response(),
        Err(e) => internal(&e),
    }
}

/// `POST /admin/distill/{alias}`: start a cycle now (202 with the job; 409 if one is running).
pub async fn distill(
    State(state): State<AdminState>,
    JsonPath(alias): JsonPath<String>,
) -> Response {
    let Some(service) = state.distiller.clone() else {
        return distillation_off();
    };
    match tokio::task::spawn_blocking(move || service.trigger(&alias, "admin")).await {
        Ok(Ok(job)) => (StatusCode::ACCEPTED, Json(job)).into_response(),
        Ok(Err(e @ DistillError::NotConfigured(_))) => {
            error(StatusCode::NOT_FOUND, "route_not_found", e.to_string())
        }
        Ok(Err(e @ DistillError::Busy(..))) => {
            error(StatusCode::CONFLICT, "job_active", e.to_string())
        }
        // A store being reopened is a 503 to retry, as on every other endpoint.
        Ok(Err(DistillError::Store(e))) => crate::error::Error::from_store(&e).into_response(),
        Ok(Err(e)) => internal(&e),
        Err(e) => internal(&e),
    }
}

/// `GET /admin/models`: the model registry.
pub async fn models(State(state): State<AdminState>) -> Response {
    let Some(service) = state.distiller.clone() else {
        return distillation_off();
    };
    match tokio::task::spawn_blocking(move || service.models()).await {
        Ok(Ok(models)) => {
            Json(serde_json::json!({"object": "list", "data": models})).into_response()
        }
        Ok(Err(e)) => crate::error::Error::from_store(&e).into_response(),
        Err(e) => internal(&e),
    }
}

/// `GET /admin/datasets/{id}.jsonl`: a job's training file, streamed from disk. Remote trainers
/// (a Kubernetes Job) fetch their data here with the admin token.
pub async fn dataset(
    State(state): State<AdminState>,
    JsonPath(file): JsonPath<String>,
) -> Response {
    let Some(service) = state.distiller.clone() else {
        return distillation_off();
    };
    let Some(id) = file.strip_suffix(".jsonl") else {
        return error(
            StatusCode::NOT_FOUND,
            "dataset_not_found",
            format!("no dataset `{file}`"),
        );
    };
    // Job ids are `dj_` and a ULID: anything else (a `..`, a slash) is not a dataset.
    let well_formed = id
        .strip_prefix("dj_")
        .is_some_and(|u| u.len() == 26 && u.bytes().all(|b| b.is_ascii_alphanumeric()));
    if !well_formed {
        return error(
            StatusCode::NOT_FOUND,
            "dataset_not_found",
            format!("no dataset `{file}`"),
        );
    }
    let path = service.dataset_file(id);
    let Ok(file) = tokio::fs::File::open(&path).await else {
        return error(
            StatusCode::NOT_FOUND,
            "dataset_not_found",
            format!("no dataset `{id}`"),
        );
    };
    let len = file.metadata().await.map(|m| m.len()).ok();
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/jsonl"),
    );
    if let Some(len) = len {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
    response
}
