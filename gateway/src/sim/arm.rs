//! Azure Resource Manager's deployments of Azure OpenAI models (openai-wire.md §5): `PUT`, `GET` and `DELETE`, provisioned over time.
//!
//! A deployment is `Creating` (or `Updating`, when `PUT` again) for
//! [`AzureTimings::deployment`](crate::sim::AzureTimings), then `Succeeded`. Only then does
//! `/openai/deployments/{name}/chat/completions` answer with its model; while an update
//! provisions, the previous model keeps answering. Deployments are found by name alone at
//! inference time, as one Azure OpenAI endpoint is one account.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::reply;
use super::state::SimState;

const RESOURCE_TYPE: &str = "Microsoft.CognitiveServices/accounts/deployments";

/// ARM's error shape: `{"error":{"code","message"}}`.
#[derive(Debug, Clone)]
pub(crate) struct ArmError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ArmError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn missing_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing.",
        )
    }

    pub(crate) fn invalid_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "The access token is invalid.",
        )
    }

    pub(crate) fn missing_api_version() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )
    }

    pub(crate) fn throttled(retry_after: u64) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            format!("The request was throttled. Please retry after {retry_after} seconds."),
        );
        error.retry_after = Some(retry_after);
        error
    }

    pub(crate) fn unknown_path(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "InvalidResourceType",
            format!("The resource type could not be found for the request path '{path}'."),
        )
    }

    pub(crate) fn method_not_allowed(method: &http::Method) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("The HTTP method '{method}' is not supported at this path."),
        )
    }

    fn invalid_content(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidRequestContent", message)
    }
}

impl IntoResponse for ArmError {
    fn into_response(self) -> Response {
        let mut response = reply::json(
            self.status,
            &json!({"error": {"code": self.code, "message": self.message}}),
        );
        if let Some(seconds) = self.retry_after {
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            headers.insert("x-should-retry", HeaderValue::from_static("true"));
        }
        response
    }
}

/// Every deployment of every account, in creation order.
#[derive(Default)]
pub(crate) struct DeploymentStore {
    deployments: Vec<Deployment>,
}

struct Deployment {
    /// `/subscriptions/…/deployments/{name}`, as first sent.
    id: String,
    name: String,
    sku: Value,
    model: Value,
    model_name: String,
    /// What answered before the current `PUT`, while that one provisions.
    previous_model: Option<String>,
    ready_at: Instant,
    created_wall: SystemTime,
    modified_wall: SystemTime,
    etag: String,
}

impl Deployment {
    fn provisioning_state(&self, now: Instant) -> &'static str {
        if now >= self.ready_at {
            "Succeeded"
        } else if self.previous_model.is_some() {
            "Updating"
        } else {
            "Creating"
        }
    }

    fn serving(&self, now: Instant) -> Option<&str> {
        if now >= self.ready_at {
            Some(&self.model_name)
        } else {
            self.previous_model.as_deref()
        }
    }

    fn to_json(&self, now: Instant) -> Value {
        let capacity = self
            .sku
            .get("capacity")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        json!({
            "id": self.id,
            "type": RESOURCE_TYPE,
            "name": self.name,
            "sku": self.sku,
            "properties": {
                "model": self.model,
                "versionUpgradeOption": "NoAutoUpgrade",
                "capabilities": {"chatCompletion": "true"},
                "provisioningState": self.provisioning_state(now),
                "rateLimits": [
                    {"key": "request", "renewalPeriod": 10, "count": capacity},
                    {"key": "token", "renewalPeriod": 60, "count": capacity * 1000},
                ],
            },
            "systemData": {
                "createdBy": "forge-sim",
                "createdByType": "User",
                "createdAt": reply::rfc3339(self.created_wall),
                "lastModifiedBy": "forge-sim",
                "lastModifiedByType": "User",
                "lastModifiedAt": reply::rfc3339(self.modified_wall),
            },
            "etag": format!("\"{}\"", self.etag),
        })
    }
}

impl DeploymentStore {
    /// The model deployment `name` answers with at `now`, if any.
    pub(crate) fn serving(&self, name: &str, now: Instant) -> Option<String> {
        self.deployments
            .iter()
            .filter(|deployment| deployment.name == name)
            .find_map(|deployment| deployment.serving(now).map(str::to_owned))
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.deployments
            .iter()
            .position(|deployment| deployment.id.eq_ignore_ascii_case(id))
    }
}

type DeploymentPath = Path<(String, String, String, String)>;

fn resource_id((subscription, group, account, name): &(String, String, String, String)) -> String {
    format!(
        "/subscriptions/{subscription}/resourceGroups/{group}/providers/\
         Microsoft.CognitiveServices/accounts/{account}/deployments/{name}"
    )
}

fn not_found(path: &(String, String, String, String)) -> ArmError {
    let (_, group, account, name) = path;
    ArmError::new(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        format!(
            "The Resource '{RESOURCE_TYPE}/{account}/{name}' under resource group '{group}' was \
             not found."
        ),
    )
}

/// The `sku` and `properties.model` of a `PUT` body, checked.
fn parse_put(body: &[u8]) -> Result<(Value, Value, String), ArmError> {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
        return Err(ArmError::invalid_content(
            "The request content was invalid and could not be deserialized.",
        ));
    };
    let sku = match body.get("sku") {
        Some(Value::Object(sku))
            if sku
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(|name| !name.is_empty()) =>
        {
            Value::Object(sku.clone())
        }
        _ => {
            return Err(ArmError::invalid_content(
                "The request content was invalid: 'sku.name' is required.",
            ));
        }
    };
    let model = body
        .get("properties")
        .and_then(|properties| properties.get("model"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let field = |key: &str, model: &Map<String, Value>| {
        model
            .get(key)
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
            .map(str::to_owned)
    };
    let (Some(format), Some(name), Some(_version)) = (
        field("format", &model),
        field("name", &model),
        field("version", &model),
    ) else {
        return Err(ArmError::invalid_content(
            "The request content was invalid: 'properties.model' needs 'format', 'name' and \
             'version'.",
        ));
    };
    if format != "OpenAI" {
        return Err(ArmError::new(
            StatusCode::BAD_REQUEST,
            "InvalidResourceProperties",
            format!("The model format '{format}' is not supported; use 'OpenAI'."),
        ));
    }
    Ok((sku, Value::Object(model), name))
}

/// `PUT /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.CognitiveServices/accounts/{acct}/deployments/{name}`.
pub(crate) async fn put(
    State(state): State<Arc<SimState>>,
    Path(path): DeploymentPath,
    body: Bytes,
) -> Result<Response, ArmError> {
    let (sku, model, model_name) = parse_put(&body)?;
    let now = Instant::now();
    let wall = SystemTime::now();
    let mut guard = state.storage();
    let azure = &mut guard.azure;
    let trained = azure
        .jobs
        .succeeded_models(now, &mut azure.files)
        .into_iter()
        .any(|(model, _)| model == model_name);
    if !trained {
        return Err(ArmError::new(
            StatusCode::BAD_REQUEST,
            "InvalidResourceProperties",
            format!(
                "The specified model '{model_name}' is not a fine-tuned model of this resource \
                 whose fine-tuning job has succeeded."
            ),
        ));
    }
    let id = resource_id(&path);
    let ready_at = now + state.azure.deployment;
    let etag = reply::random_hex("", 32);
    let (status, deployment) = match azure.deployments.position(&id) {
        Some(index) => {
            let deployment = &mut azure.deployments.deployments[index];
            deployment.previous_model = deployment.serving(now).map(str::to_owned);
            deployment.sku = sku;
            deployment.model = model;
            deployment.model_name = model_name;
            deployment.ready_at = ready_at;
            deployment.modified_wall = wall;
            deployment.etag = etag;
            (StatusCode::OK, &*deployment)
        }
        None => {
            azure.deployments.deployments.push(Deployment {
                name: path.3.clone(),
                id,
                sku,
                model,
                model_name,
                previous_model: None,
                ready_at,
                created_wall: wall,
                modified_wall: wall,
                etag,
            });
            let last = azure.deployments.deployments.len() - 1;
            (StatusCode::CREATED, &azure.deployments.deployments[last])
        }
    };
    Ok(reply::json(status, &deployment.to_json(now)))
}

/// `GET` of the same URL: how a client polls `provisioningState`.
pub(crate) async fn get(
    State(state): State<Arc<SimState>>,
    Path(path): DeploymentPath,
) -> Result<Response, ArmError> {
    let storage = state.storage();
    let deployments = &storage.azure.deployments;
    let index = deployments
        .position(&resource_id(&path))
        .ok_or_else(|| not_found(&path))?;
    Ok(reply::json(
        StatusCode::OK,
        &deployments.deployments[index].to_json(Instant::now()),
    ))
}

/// `DELETE`: 200 when there was a deployment, 204 when there was none, as ARM answers.
pub(crate) async fn delete(
    State(state): State<Arc<SimState>>,
    Path(path): DeploymentPath,
) -> Response {
    let mut storage = state.storage();
    let deployments = &mut storage.azure.deployments;
    match deployments.position(&resource_id(&path)) {
        Some(index) => {
            deployments.deployments.remove(index);
            Response::new(axum::body::Body::empty())
        }
        None => {
            let mut response = Response::new(axum::body::Body::empty());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
    }
}
