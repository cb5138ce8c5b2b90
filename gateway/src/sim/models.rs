//! `GET /v1/models`: the configured models, a few base models, every fine-tuned model that succeeded, and vLLM's loaded LoRA adapters.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use http::StatusCode;
use serde::Serialize;
use tokio::time::Instant;

use super::error::ApiError;
use super::reply;
use super::state::SimState;

/// Always listed, so that a default config still looks like OpenAI.
const BASE_MODELS: &[&str] = &["gpt-4o", "gpt-4o-mini"];
/// OpenAI's aliases and the dated snapshot each resolves to. An answer names the snapshot, not
/// the alias asked for, and so does a fine-tuning job's `model` and the model it trains
/// (openai-wire.md); `/v1/models` lists both names.
const SNAPSHOTS: &[(&str, &str)] = &[
    ("gpt-4o", "gpt-4o-2024-08-06"),
    ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
    ("gpt-4.1", "gpt-4.1-2025-04-14"),
    ("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14"),
    ("gpt-4.1-nano", "gpt-4.1-nano-2025-04-14"),
    ("gpt-3.5-turbo", "gpt-3.5-turbo-0125"),
];

/// The dated snapshot `model` resolves to; any other name is its own.
pub(crate) fn snapshot_of(model: &str) -> &str {
    SNAPSHOTS
        .iter()
        .find(|(alias, _)| *alias == model)
        .map_or(model, |(_, snapshot)| snapshot)
}
/// A fixed creation time for models the simulated upstream did not train.
const BASE_CREATED: u64 = 1_715_367_049;

#[derive(Serialize)]
struct ModelView {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    /// vLLM only: the weights' path (the served name for the base model).
    #[serde(skip_serializing_if = "Option::is_none")]
    root: Option<String>,
    /// vLLM only: an adapter's base model; `null` for the base model itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<Option<String>>,
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelView>,
}

fn all_models(state: &SimState) -> Vec<ModelView> {
    let mut models: Vec<ModelView> = Vec::new();
    let mut add = |id: String, created: u64, owned_by: &'static str| {
        if !models.iter().any(|model| model.id == id) {
            models.push(ModelView {
                id,
                object: "model",
                created,
                owned_by,
                root: None,
                parent: None,
            });
        }
    };
    for base in BASE_MODELS {
        add((*base).to_owned(), BASE_CREATED, "system");
        add(snapshot_of(base).to_owned(), BASE_CREATED, "system");
    }
    for configured in state.configured_models() {
        add(configured, BASE_CREATED, "system");
    }
    let (fine_tuned, adapters) = {
        let mut guard = state.storage();
        let storage = &mut *guard;
        let fine_tuned = storage
            .jobs
            .succeeded_models(Instant::now(), &mut storage.files);
        (fine_tuned, storage.lora.adapters())
    };
    for (model, created) in fine_tuned {
        add(model, created, "forge-sim");
    }
    // vLLM lists its base model, then every adapter under it.
    if !adapters.is_empty() && !models.iter().any(|m| m.id == state.lora_base_model) {
        models.push(ModelView {
            id: state.lora_base_model.clone(),
            object: "model",
            created: BASE_CREATED,
            owned_by: "vllm",
            root: Some(state.lora_base_model.clone()),
            parent: Some(None),
        });
    }
    for adapter in adapters {
        if !models.iter().any(|model| model.id == adapter.name) {
            models.push(ModelView {
                id: adapter.name,
                object: "model",
                created: adapter.created,
                owned_by: "vllm",
                root: Some(adapter.path),
                parent: Some(Some(state.lora_base_model.clone())),
            });
        }
    }
    models
}

pub(crate) async fn list(State(state): State<Arc<SimState>>) -> Response {
    reply::json(
        StatusCode::OK,
        &ModelList {
            object: "list",
            data: all_models(&state),
        },
    )
}

pub(crate) async fn retrieve(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let model = all_models(&state)
        .into_iter()
        .find(|model| model.id == id)
        .ok_or_else(|| ApiError::model_not_found(&id))?;
    Ok(reply::json(StatusCode::OK, &model))
}
