//! OpenAI-shaped error responses: `{"error":{"message","type","param","code"}}` with OpenAI's statuses and retry headers.

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use super::reply;

const INVALID_REQUEST: &str = "invalid_request_error";
const SERVER_ERROR: &str = "server_error";

/// One error as OpenAI reports it. Every constructor picks the status, `type` and `code` that
/// OpenAI uses for that situation, so callers only say what went wrong.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: Cow<'static, str>,
    kind: &'static str,
    param: Option<Cow<'static, str>>,
    code: Option<&'static str>,
    /// `retry-after` in seconds when it is not the default 1 of 429 and 503.
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A 400 `invalid_request_error`.
    pub(crate) fn invalid_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message)
    }

    pub(crate) fn with_param(mut self, param: impl Into<Cow<'static, str>>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub(crate) fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// A 429 that asks to come back after `retry_after` seconds; `code` is OpenAI's
    /// `rate_limit_exceeded` or Azure's `"429"`.
    pub(crate) fn rate_limited(
        message: impl Into<Cow<'static, str>>,
        code: &'static str,
        retry_after: u64,
    ) -> Self {
        let mut error =
            Self::new(StatusCode::TOO_MANY_REQUESTS, "requests", message).with_code(code);
        error.retry_after = Some(retry_after);
        error
    }

    /// Azure's 401 for a missing or wrong `api-key`: Azure says the same for both.
    pub(crate) fn azure_access_denied() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            INVALID_REQUEST,
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to \
             provide a valid key for an active subscription and use a correct regional API \
             endpoint for your resource.",
        )
        .with_code("401")
    }

    /// The body was not a JSON object; OpenAI's own wording.
    pub(crate) fn unparsable_json() -> Self {
        Self::invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but \
             what was sent was not valid JSON.)",
        )
    }

    pub(crate) fn missing_parameter(param: impl Into<Cow<'static, str>>) -> Self {
        let param = param.into();
        Self::invalid_request(format!("Missing required parameter: '{param}'."))
            .with_param(param)
            .with_code("missing_required_parameter")
    }

    /// `expected` reads as a noun phrase: "a string", "an array of objects".
    pub(crate) fn invalid_type(
        param: impl Into<Cow<'static, str>>,
        expected: &str,
        got: &serde_json::Value,
    ) -> Self {
        let param = param.into();
        Self::invalid_request(format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            describe(got)
        ))
        .with_param(param)
        .with_code("invalid_type")
    }

    pub(crate) fn invalid_value(
        param: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::invalid_request(message)
            .with_param(param)
            .with_code("invalid_value")
    }

    pub(crate) fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, INVALID_REQUEST, message)
    }

    pub(crate) fn unknown_url(method: &http::Method, path: &str) -> Self {
        Self::not_found(format!("Invalid URL ({method} {path})"))
    }

    pub(crate) fn method_not_allowed(method: &http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            INVALID_REQUEST,
            format!("Method not allowed ({method} {path})"),
        )
    }

    pub(crate) fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            INVALID_REQUEST,
            format!("The request body is larger than the {limit} bytes this server accepts."),
        )
    }

    pub(crate) fn missing_api_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            INVALID_REQUEST,
            "You didn't provide an API key. You need to provide your API key in an Authorization \
             header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
        .with_code("invalid_api_key")
    }

    /// Echoes only a masked form of the key, as OpenAI does, so logs never hold a whole key.
    pub(crate) fn incorrect_api_key(presented: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            INVALID_REQUEST,
            format!(
                "Incorrect API key provided: {}. You can find your API key at \
                 https://platform.openai.com/account/api-keys.",
                mask_key(presented)
            ),
        )
        .with_code("invalid_api_key")
    }

    pub(crate) fn model_not_found(model: &str) -> Self {
        Self::not_found(format!(
            "The model `{model}` does not exist or you do not have access to it."
        ))
        .with_param("model")
        .with_code("model_not_found")
    }

    /// The failure a model configured with `fail_status` answers with.
    pub(crate) fn injected(status: u16, model: &str) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match status.as_u16() {
            400 => Self::invalid_request(format!(
                "The simulated upstream rejects every request for model `{model}`."
            )),
            401 => Self::incorrect_api_key(""),
            // What OpenAI answers an account in a place it does not serve.
            403 => Self::new(
                status,
                "request_forbidden",
                "Country, region, or territory not supported",
            )
            .with_code("unsupported_country_region_territory"),
            404 => Self::model_not_found(model),
            429 => Self::new(
                status,
                "requests",
                format!(
                    "Rate limit reached for {model} in organization org-forge-sim on requests per \
                     min (RPM): Limit 3, Used 3, Requested 1. Please try again in 1s."
                ),
            )
            .with_code("rate_limit_exceeded"),
            500 => Self::server_error(),
            503 => Self::new(
                status,
                SERVER_ERROR,
                "The server is overloaded or not ready yet.",
            ),
            _ if status.is_server_error() => Self::new(
                status,
                SERVER_ERROR,
                format!(
                    "The simulated upstream failed with status {}.",
                    status.as_u16()
                ),
            ),
            _ => Self::new(
                status,
                INVALID_REQUEST,
                format!(
                    "The simulated upstream refused the request with status {}.",
                    status.as_u16()
                ),
            ),
        }
    }

    /// OpenAI's answer to an account out of credit.
    pub(crate) fn insufficient_quota() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details. For \
             more information on this error, read the docs: \
             https://platform.openai.com/docs/guides/error-codes/api-errors.",
        )
        .with_code("insufficient_quota")
    }

    pub(crate) fn server_error() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            SERVER_ERROR,
            "The server had an error while processing your request. Sorry about that!",
        )
    }

    /// The `data: {"error":…}` event that cuts a stream short.
    pub(crate) fn to_sse_event(&self) -> Bytes {
        let mut out = Vec::with_capacity(192);
        out.extend_from_slice(b"data: ");
        if serde_json::to_writer(&mut out, &self.envelope()).is_err() {
            return Bytes::from_static(
                b"data: {\"error\":{\"message\":\"stream interrupted\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
            );
        }
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    fn envelope(&self) -> Envelope<'_> {
        Envelope {
            error: ErrorBody {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = reply::json(self.status, &self.envelope());
        let headers = response.headers_mut();
        // OpenAI's SDKs read these two headers to decide whether and when to retry.
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        } else if matches!(self.status.as_u16(), 429 | 503) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.status.is_server_error() {
            headers.insert("x-should-retry", HeaderValue::from_static("true"));
        }
        response
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

fn describe(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "****".to_owned();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}****{tail}")
}
