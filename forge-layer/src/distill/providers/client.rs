//! HTTP plumbing the providers share: the client, URLs, secrets, error mapping and bounded waits.

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use reqwest::Url;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::distill::provider::{ProviderError, retry_after};

/// How long a 429 without `retry-after` makes the caller wait; `retry_after` also falls back
/// to a second for an HTTP date.
pub(super) const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Error bodies are read only this far: enough for any message, not for a runaway stream.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// JSON answers (jobs, files, events) are small; a result CSV of a very long run is the largest
/// thing read into memory.
pub(super) const MAX_BODY: usize = 64 * 1024 * 1024;
/// Error messages quoted from a non-JSON body are cut here.
const MAX_MESSAGE_CHARS: usize = 500;

/// Builds the client every provider uses: redirects are not followed, since a redirect would
/// carry the credentials to wherever the provider points.
pub(super) fn build_client(
    roots: Option<Vec<reqwest::Certificate>>,
) -> Result<reqwest::Client, String> {
    // reqwest is built without a TLS crypto provider and panics without one; the gateway
    // installs ring at start-up, and this covers callers that build a provider first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("forge/", env!("CARGO_PKG_VERSION")));
    if let Some(roots) = roots {
        builder = builder.tls_certs_only(roots);
    }
    builder
        .build()
        .map_err(|err| format!("cannot build the HTTP client: {}", chain(&err)))
}

/// Parses an `http(s)` base URL, keeping its path (`/v1`, `/openai`) as the prefix.
pub(super) fn parse_base(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url.trim_end_matches('/'))
        .map_err(|err| format!("{url:?} is not a URL: {err}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.cannot_be_a_base() {
        return Err(format!("{url:?} is not an http(s) URL"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // Credentials in a URL end up in error messages and logs.
        return Err("credentials in the URL are not allowed; use the key settings".into());
    }
    Ok(parsed)
}

/// `base` + path segments (each percent-encoded, so an id can't escape its place) + query.
pub(super) fn endpoint(base: &Url, segments: &[&str], query: &[(&str, &str)]) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    url
}

/// A credential: given in the config, or read from a file on every use, because mounted tokens
/// (Kubernetes service accounts, workload identity) rotate.
#[derive(Clone)]
pub(super) enum Secret {
    Value(String),
    File(PathBuf),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Value(_) => f.write_str("Secret(<redacted>)"),
            Secret::File(path) => f.debug_tuple("Secret::File").field(path).finish(),
        }
    }
}

impl Secret {
    async fn read(&self) -> Result<String, ProviderError> {
        match self {
            Secret::Value(value) => Ok(value.clone()),
            Secret::File(path) => match tokio::fs::read_to_string(path).await {
                Ok(text) => Ok(text.trim().to_owned()),
                Err(err) => Err(ProviderError::Invalid(format!(
                    "cannot read the token file {}: {err}",
                    path.display()
                ))),
            },
        }
    }

    /// The header value `prefix` + secret, marked sensitive so that no debug output shows it.
    pub(super) async fn header(&self, prefix: &str) -> Result<HeaderValue, ProviderError> {
        let secret = self.read().await?;
        if secret.is_empty() {
            return Err(ProviderError::Invalid(
                "the configured credential is empty".into(),
            ));
        }
        sensitive_header(prefix, &secret).map_err(|()| {
            ProviderError::Invalid(
                "the configured credential has characters not allowed in a header".into(),
            )
        })
    }
}

/// `prefix` + `secret` as a sensitive header value.
pub(super) fn sensitive_header(prefix: &str, secret: &str) -> Result<HeaderValue, ()> {
    let mut value = HeaderValue::from_str(&format!("{prefix}{secret}")).map_err(|_| ())?;
    value.set_sensitive(true);
    Ok(value)
}

/// Sends the request; a non-2xx answer becomes the matching [`ProviderError`].
pub(super) async fn send(
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, ProviderError> {
    let response = request.send().await.map_err(|err| transport(&err))?;
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(error_from(response).await)
    }
}

/// Sends the request and decodes a 2xx JSON answer.
pub(super) async fn send_json<T: DeserializeOwned>(
    request: reqwest::RequestBuilder,
) -> Result<T, ProviderError> {
    let response = send(request).await?;
    decode(response).await
}

/// Decodes a JSON body.
pub(super) async fn decode<T: DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, ProviderError> {
    let url = redacted_url(response.url());
    let body = read_body(response, MAX_BODY).await?;
    serde_json::from_slice(&body)
        .map_err(|err| ProviderError::Transport(format!("unreadable answer from {url}: {err}")))
}

/// The body, refused beyond `limit` bytes.
pub(super) async fn read_body(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, ProviderError> {
    let url = redacted_url(response.url());
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|err| transport(&err))? {
        if body.len() + chunk.len() > limit {
            return Err(ProviderError::Transport(format!(
                "the answer from {url} is larger than {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Maps an error answer: 429, and 503 with `retry-after`, say when to come back; anything else
/// carries the provider's own message. A 429 for an exhausted quota (`insufficient_quota`), or
/// any answer with `x-should-retry: false`, is not waited out: no wait ends it, and its message
/// says what does (billing, say).
pub(super) async fn error_from(mut response: reqwest::Response) -> ProviderError {
    let status = response.status();
    let wait = retry_after(response.headers());
    let no_retry = response
        .headers()
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
    if let (StatusCode::SERVICE_UNAVAILABLE, Some(wait), false) = (status, wait, no_retry) {
        return ProviderError::RateLimited(wait);
    }
    let mut body = Vec::new();
    // A broken error body still leaves the status to report.
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    if status == StatusCode::TOO_MANY_REQUESTS && !no_retry && !quota_exhausted(&body) {
        return ProviderError::RateLimited(wait.unwrap_or(DEFAULT_RETRY_AFTER));
    }
    let message = if status == StatusCode::UNAUTHORIZED {
        // OpenAI's says "Incorrect API key provided: sk-ab***wXyZ": part of Forge's key, which
        // this message would carry into logs, job records and admin answers.
        "the provider refused Forge's credentials: check the key or token it is given".to_owned()
    } else {
        error_message(&body, status)
    };
    ProviderError::Http {
        status: status.as_u16(),
        message,
    }
}

/// Whether an error body says the account's quota is used up (OpenAI's `insufficient_quota`,
/// as its `code` or its `type`).
fn quota_exhausted(body: &[u8]) -> bool {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    ["/error/code", "/error/type"].iter().any(|field| {
        json.pointer(field).and_then(serde_json::Value::as_str) == Some("insufficient_quota")
    })
}

/// The message of an error body: OpenAI's and Azure's `error.message`, the flat `message` of
/// older vLLM releases and of Kubernetes' `Status`, or the text itself.
pub(super) fn error_message(body: &[u8], status: StatusCode) -> String {
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let message = json
            .pointer("/error/message")
            .and_then(serde_json::Value::as_str)
            .or_else(|| json.get("message").and_then(serde_json::Value::as_str))
            .or_else(|| json.get("error").and_then(serde_json::Value::as_str));
        if let Some(message) = message {
            return message.to_owned();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return status.canonical_reason().unwrap_or("no message").to_owned();
    }
    let mut cut: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

/// A reqwest error with its causes ("connection refused" is in the source, not the top).
pub(super) fn transport(err: &reqwest::Error) -> ProviderError {
    if err.is_connect() {
        ProviderError::NotSent(chain(err))
    } else {
        ProviderError::Transport(chain(err))
    }
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// The URL without its query, which may carry a signature.
fn redacted_url(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

/// Paces a bounded wait: growing intervals, or the provider's `retry-after` when it gives one,
/// never past the deadline.
pub(super) struct Backoff {
    next: Duration,
    max: Duration,
    deadline: Instant,
}

impl Backoff {
    pub(super) fn new(first: Duration, max: Duration, limit: Duration) -> Self {
        Self {
            next: first,
            max,
            deadline: Instant::now() + limit,
        }
    }

    /// Sleeps before the next attempt, `hint` if given; `false` once the deadline has passed.
    pub(super) async fn wait(&mut self, hint: Option<Duration>) -> bool {
        let now = Instant::now();
        if now >= self.deadline {
            return false;
        }
        let pause = hint.unwrap_or(self.next).min(self.deadline - now);
        self.next = (self.next * 2).min(self.max);
        tokio::time::sleep(pause).await;
        true
    }
}
