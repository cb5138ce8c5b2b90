//! vLLM's runtime LoRA endpoints (openai-wire.md §6): load and unload adapters found in the simulated storage.
//!
//! An adapter path exists when a test registered it (`SimHandle::add_adapter_path`) or when a
//! Kubernetes training Job that wrote it has succeeded (see the cluster module). Paths compare
//! without trailing slashes.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::reply;
use super::state::SimState;

/// The adapters vLLM has loaded, and the adapter paths that exist on its simulated disk.
#[derive(Default)]
pub(crate) struct LoraStore {
    adapters: Vec<Adapter>,
    paths: BTreeSet<String>,
    /// Adapters unloaded and not loaded again: vLLM serves them no more.
    unloaded: BTreeSet<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Adapter {
    pub(crate) name: String,
    pub(crate) path: String,
    pub(crate) created: u64,
}

impl LoraStore {
    pub(crate) fn is_loaded(&self, name: &str) -> bool {
        self.adapters.iter().any(|adapter| adapter.name == name)
    }

    /// Whether `name` is an adapter that was unloaded (and not loaded again).
    pub(crate) fn was_unloaded(&self, name: &str) -> bool {
        self.unloaded.contains(name)
    }

    /// The loaded adapters, in load order.
    pub(crate) fn adapters(&self) -> Vec<Adapter> {
        self.adapters.clone()
    }

    pub(crate) fn add_path(&mut self, path: &str) {
        self.paths.insert(normalize(path).to_owned());
    }

    fn has_path(&self, path: &str) -> bool {
        self.paths.contains(normalize(path))
    }
}

/// `/adapters/x/` and `/adapters/x` are the same directory.
pub(crate) fn normalize(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() { path } else { trimmed }
}

/// vLLM's newer error body: `{"error":{message,type,param,code}}` with an integer `code`.
fn error(status: StatusCode, kind: &str, message: String) -> Response {
    reply::json(
        status,
        &json!({"error": {
            "message": message,
            "type": kind,
            "param": null,
            "code": status.as_u16(),
        }}),
    )
}

/// What vLLM answers a request for a model it does not serve.
pub(crate) fn model_not_found(model: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "NotFoundError",
        format!("The model `{model}` does not exist."),
    )
}

fn text(message: String) -> Response {
    let mut response = Response::new(Body::from(message));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn non_empty<'a>(request: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    request
        .get(key)
        .and_then(Value::as_str)
        .filter(|value| !value.is_empty())
}

fn body_object(body: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

fn not_an_object() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "BadRequestError",
        "The request body must be a JSON object.".to_owned(),
    )
}

/// `POST /v1/load_lora_adapter`.
pub(crate) async fn load(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let Some(request) = body_object(&body) else {
        return not_an_object();
    };
    let (Some(name), Some(path)) = (
        non_empty(&request, "lora_name"),
        non_empty(&request, "lora_path"),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidUserInput",
            "Both 'lora_name' and 'lora_path' must be provided.".to_owned(),
        );
    };
    let in_place = request.get("load_inplace").and_then(Value::as_bool) == Some(true);
    let mut guard = state.storage();
    let storage = &mut *guard;
    if storage.lora.is_loaded(name) && !in_place {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidUserInput",
            format!("The lora adapter '{name}' has already been loaded."),
        );
    }
    let exists =
        storage.lora.has_path(path) || storage.cluster.wrote(normalize(path), Instant::now());
    if !exists {
        return error(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("Loading lora {name} failed: No adapter found for {path}"),
        );
    }
    storage.lora.adapters.retain(|adapter| adapter.name != name);
    storage.lora.unloaded.remove(name);
    storage.lora.adapters.push(Adapter {
        name: name.to_owned(),
        path: path.to_owned(),
        created: reply::unix_now(),
    });
    text(format!(
        "Success: LoRA adapter '{name}' added successfully."
    ))
}

/// `POST /v1/unload_lora_adapter`.
pub(crate) async fn unload(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let Some(request) = body_object(&body) else {
        return not_an_object();
    };
    let Some(name) = non_empty(&request, "lora_name") else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidUserInput",
            "either 'lora_name' and 'lora_int_id' needs to be provided.".to_owned(),
        );
    };
    let mut storage = state.storage();
    if !storage.lora.is_loaded(name) {
        return error(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("The lora adapter '{name}' cannot be found."),
        );
    }
    storage.lora.adapters.retain(|adapter| adapter.name != name);
    storage.lora.unloaded.insert(name.to_owned());
    text(format!(
        "Success: LoRA adapter '{name}' removed successfully."
    ))
}
