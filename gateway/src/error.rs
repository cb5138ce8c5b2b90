//! The gateway's one error type: it knows its status, who was at fault, and renders OpenAI-shaped JSON.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

/// Who caused an error: decides the log level and is recorded in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request was wrong; nothing for an operator to do.
    Client,
    /// The upstream failed or was too slow.
    Upstream,
    /// Forge itself is overloaded or broken.
    Gateway,
}

/// Every error the gateway answers with. The message is safe to show to the client: no
/// internals, no upstream URLs, no keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The body is not valid JSON, or not the shape the endpoint expects.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    /// No route has this alias.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// No such endpoint.
    #[error("Unknown request URL: {method} {path}.")]
    UnknownPath { method: String, path: String },
    /// The request body is larger than `server.max_body_bytes`.
    #[error("Request body exceeds the limit of {limit} bytes.")]
    BodyTooLarge { limit: usize },
    /// The request has more headers than `server.max_headers`, or more header bytes than
    /// `server.max_header_bytes`.
    #[error("Request headers exceed the limit: {0}.")]
    HeadersTooLarge(String),
    /// The request body did not arrive within `server.body_timeout_secs`.
    #[error("The request body did not arrive within {secs} s.")]
    BodyTimeout { secs: u64 },
    /// The in-flight cap is reached; the client should retry shortly.
    #[error("Forge is serving its maximum number of requests; retry shortly.")]
    Overloaded,
    /// Forge could not connect to the upstream, or the connection failed.
    #[error("The upstream could not be reached.")]
    UpstreamUnreachable,
    /// The upstream answered a chat completion with a redirect: Forge connects only where its
    /// config says, and does not pass an app somewhere else either.
    #[error("The upstream answered with a redirect, which Forge does not follow.")]
    UpstreamRedirect,
    /// The upstream did not answer in time.
    #[error("The upstream did not respond within {0} ms.")]
    UpstreamTimeout(u64),
    /// The upstream answered 401 or 403: it refused Forge's own key (revoked, expired, wrong,
    /// or without access), which the client can do nothing about. Its answer is not passed on:
    /// it would tell the client its own key is wrong, and OpenAI's echoes part of Forge's key.
    #[error(
        "The upstream refused Forge's credentials (HTTP {0}); the gateway's operator must check its upstream key."
    )]
    UpstreamRefusedCredentials(u16),
    /// The client must send a valid key.
    #[error("Incorrect or missing API key.")]
    Unauthorized,
    /// A passthrough path that acts on the account behind Forge's upstream key.
    #[error(
        "`{0}` is not passed through: it acts on the account behind Forge's upstream key, whose files and fine-tuning jobs hold every client's data (server.passthrough_account_apis allows it)."
    )]
    AccountApi(String),
    /// No trace with this id (or not one the caller's tenant may see).
    #[error("No trace with id `{0}`.")]
    TraceNotFound(String),
    /// The trace is still on its way to the store: its exchange is running (a long stream), or
    /// it waits for the writer. Feedback on it can be sent again once it has landed.
    #[error(
        "The exchange of trace `{0}` has not ended, or its trace is not stored yet; send the feedback again once it has (server.feedback_wait_secs is how long this request waited)."
    )]
    TraceInProgress(String),
    /// The trace store is being reopened after an I/O error (a full disk, say); the client
    /// should retry shortly.
    #[error("The trace store is briefly unavailable; retry shortly.")]
    StoreUnavailable,
    /// Forge failed internally (the store); the details are logged, not shown.
    #[error("Forge could not complete the request; the error is in its log.")]
    Internal,
}

impl Error {
    /// What a failed store operation tells the client: a 503 while the store is being
    /// reopened after an I/O error, otherwise a 500 (its details logged here).
    pub fn from_store(e: &forge_layer::store::StoreError) -> Self {
        if e.is_transient() {
            return Error::StoreUnavailable;
        }
        tracing::error!(error = %e, "store operation failed");
        Error::Internal
    }

    /// A 400 with a message and, where one field is to blame, its name.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Error::InvalidRequest {
            message: message.into(),
            param,
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Error::ModelNotFound(_) | Error::UnknownPath { .. } | Error::TraceNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Error::Overloaded | Error::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Error::UpstreamUnreachable
            | Error::UpstreamRedirect
            | Error::UpstreamRefusedCredentials(_) => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::AccountApi(_) => StatusCode::FORBIDDEN,
            Error::TraceInProgress(_) => StatusCode::CONFLICT,
            Error::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Who was at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Error::UpstreamUnreachable
            | Error::UpstreamRedirect
            | Error::UpstreamTimeout(_)
            | Error::UpstreamRefusedCredentials(_) => Fault::Upstream,
            Error::Overloaded | Error::StoreUnavailable | Error::Internal => Fault::Gateway,
            _ => Fault::Client,
        }
    }

    /// The OpenAI `error.type`.
    fn kind(&self) -> &'static str {
        match self.fault() {
            Fault::Client => "invalid_request_error",
            Fault::Upstream | Fault::Gateway => "server_error",
        }
    }

    /// The OpenAI `error.code`.
    fn code(&self) -> Option<&'static str> {
        Some(match self {
            Error::InvalidRequest { .. } => return None,
            Error::ModelNotFound(_) => "model_not_found",
            Error::UnknownPath { .. } => "unknown_url",
            Error::BodyTooLarge { .. } => "request_too_large",
            Error::HeadersTooLarge(_) => "request_header_fields_too_large",
            Error::BodyTimeout { .. } => "request_timeout",
            Error::Overloaded => "overloaded",
            Error::UpstreamUnreachable => "upstream_unreachable",
            Error::UpstreamRedirect => "upstream_redirect",
            Error::UpstreamTimeout(_) => "upstream_timeout",
            Error::UpstreamRefusedCredentials(_) => "upstream_credentials_refused",
            Error::Unauthorized => "invalid_api_key",
            Error::AccountApi(_) => "passthrough_refused",
            Error::TraceNotFound(_) => "trace_not_found",
            Error::TraceInProgress(_) => "trace_in_progress",
            Error::StoreUnavailable => "store_unavailable",
            Error::Internal => "internal_error",
        })
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Error::InvalidRequest { param, .. } => *param,
            Error::ModelNotFound(_) => Some("model"),
            Error::TraceNotFound(_) | Error::TraceInProgress(_) => Some("trace_id"),
            _ => None,
        }
    }

    /// The OpenAI error body, `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        }
    }
}

/// The OpenAI error envelope. All four inner keys are always present (null where unset).
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Serialize)]
struct ErrorDetail {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        match self.fault() {
            Fault::Client => {
                tracing::debug!(status = status.as_u16(), error = %self, "request refused")
            }
            Fault::Upstream => {
                tracing::warn!(status = status.as_u16(), error = %self, "upstream failure")
            }
            Fault::Gateway => {
                tracing::warn!(status = status.as_u16(), error = %self, "gateway refused request")
            }
        }
        let body = match serde_json::to_vec(&self.body()) {
            Ok(body) => body,
            // Serialising a struct of strings cannot fail; keep a valid body regardless.
            Err(_) => br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.to_vec(),
        };
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if matches!(self, Error::Overloaded | Error::StoreUnavailable) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            headers.insert("x-should-retry", HeaderValue::from_static("true"));
        }
        if matches!(self, Error::UpstreamRefusedCredentials(_)) {
            // OpenAI's SDKs retry a 502 unless told not to; a refused key stays refused.
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_being_reopened_is_a_503_to_retry_and_other_store_failures_a_500() {
        let closed = forge_layer::store::StoreError::Closed("forge.redb".into());
        let response = Error::from_store(&closed).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        // So is an operation that met the I/O error itself: the reopen starts there.
        let io = forge_layer::store::StoreError::Redb(redb::Error::PreviousIo);
        assert_eq!(
            Error::from_store(&io).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let other = forge_layer::store::StoreError::NoStore("x".into());
        assert_eq!(
            Error::from_store(&other).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn body_has_all_four_keys() {
        let v = serde_json::to_value(Error::ModelNotFound("x".into()).body()).unwrap();
        let e = &v["error"];
        assert_eq!(e["code"], "model_not_found");
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["param"], "model");
        assert!(e["message"].as_str().unwrap().contains("`x`"));
        let v = serde_json::to_value(Error::invalid("bad", None).body()).unwrap();
        assert!(v["error"].get("code").unwrap().is_null());
        assert!(v["error"].get("param").unwrap().is_null());
    }
}
