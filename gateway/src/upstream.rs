//! Clients for the configured upstreams: pooled connections, the key from the environment, timeouts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, header};

use crate::config::Timeouts;
use crate::error::Error;
use crate::proxy::body::UpstreamBody;

/// One upstream: where it is, its key, and a pooled client with its timeouts.
#[derive(Debug)]
pub struct Upstream {
    name: String,
    base_url: String,
    /// `Authorization: Bearer …`, marked sensitive so it never shows in debug output.
    auth: Option<HeaderValue>,
    client: reqwest::Client,
    timeouts: Timeouts,
    chat_url: reqwest::Url,
}

/// The chat completions path under an upstream's base URL.
pub const CHAT_PATH: &str = "/chat/completions";

/// A request that could not be built or configured at start-up.
#[derive(Debug, thiserror::Error)]
#[error("upstream `{name}`: {reason}")]
pub struct UpstreamSetupError {
    name: String,
    reason: String,
}

impl Upstream {
    /// Builds the client. `api_key` comes from the environment variable the config names.
    pub fn new(
        name: &str,
        base_url: &str,
        api_key: Option<&str>,
        timeouts: Timeouts,
    ) -> Result<Self, UpstreamSetupError> {
        let setup_err = |reason: String| UpstreamSetupError {
            name: name.to_string(),
            reason,
        };
        let auth = api_key
            .map(|key| {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    setup_err("the API key has characters not allowed in a header".into())
                })?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            // A redirect would carry the provider key to wherever the upstream points (S4).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("forge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| setup_err(format!("cannot build the HTTP client: {e}")))?;
        let base_url = base_url.trim_end_matches('/').to_string();
        let chat_url = reqwest::Url::parse(&format!("{base_url}{CHAT_PATH}"))
            .map_err(|e| setup_err(format!("base_url is not a URL: {e}")))?;
        Ok(Self {
            chat_url,
            name: name.to_string(),
            base_url,
            auth,
            client,
            timeouts,
        })
    }

    /// The name routes use.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base URL, e.g. `https://api.openai.com/v1`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Sends one request to `{base_url}{path}` and returns the upstream's response with its body
    /// still streaming. `path` starts after the `/v1` prefix (e.g. `/chat/completions?x=1`).
    ///
    /// The caller's headers are sent as given; the upstream key replaces any credentials.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        mut headers: HeaderMap,
        body: reqwest::Body,
    ) -> Result<http::Response<UpstreamBody>, Error> {
        strip_credentials(&mut headers);
        if let Some(auth) = &self.auth {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        let request = if path == CHAT_PATH {
            // The hot path: the chat URL was parsed once, at start.
            self.client.request(method, self.chat_url.clone())
        } else {
            self.client
                .request(method, format!("{}{}", self.base_url, path))
        };
        let request = request.headers(headers).body(body);
        let first_byte = self.timeouts.first_byte;
        let response = match tokio::time::timeout(first_byte, request.send()).await {
            Err(_) => return Err(Error::UpstreamTimeout(millis(first_byte))),
            Ok(Err(e)) if e.is_timeout() => {
                return Err(Error::UpstreamTimeout(millis(self.timeouts.connect)));
            }
            Ok(Err(e)) => {
                tracing::warn!(upstream = %self.name, error = %e, "upstream request failed");
                return Err(Error::UpstreamUnreachable);
            }
            Ok(Ok(response)) => response,
        };
        let response: http::Response<reqwest::Body> = response.into();
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let is_sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        if is_sse {
            // An SSE body may gain a final error event if the upstream fails, so its length is
            // not known in advance.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let body = UpstreamBody::new(body, self.timeouts.idle, is_sse);
        Ok(http::Response::from_parts(parts, body))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Credentials a client sent are for Forge, never for the upstream.
pub fn strip_credentials(headers: &mut HeaderMap) {
    for name in [
        header::AUTHORIZATION,
        header::COOKIE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("api-key");
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1), including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// All upstreams by name.
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
}

impl Upstreams {
    /// Adds an upstream.
    pub fn insert(&mut self, upstream: Upstream) {
        self.by_name
            .insert(upstream.name.clone(), Arc::new(upstream));
    }

    /// The upstream with this name.
    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(name)
    }

    /// All names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// A request body held in memory, as the chat handler has it after validation.
pub fn full_body(bytes: Bytes) -> reqwest::Body {
    reqwest::Body::from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-request-id"));
    }

    #[test]
    fn client_credentials_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        h.insert("api-key", HeaderValue::from_static("k"));
        h.insert(header::COOKIE, HeaderValue::from_static("c=1"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_credentials(&mut h);
        assert_eq!(h.len(), 1);
    }
}
