//! A small client for the admin API, shared by the commands that talk to a running gateway.

use std::time::Duration;

use crate::env::ENV_FORGE_ADMIN_TOKEN;

/// How long one admin request may take before the command gives up: a gateway that accepts the
/// connection but never answers must not hang a script.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// `text` as one path segment: every byte but RFC 3986's unreserved ones percent-encoded, so
/// that an alias such as `meta-llama/Llama-3.1-8B` stays one segment.
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The admin API at one address, with the token from `FORGE_ADMIN_TOKEN`.
#[derive(Debug)]
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// `base` is the admin address, e.g. `http://127.0.0.1:8081`; without a scheme, `http://`.
    pub fn new(base: &str) -> Result<Self, String> {
        let token = crate::env::secret(ENV_FORGE_ADMIN_TOKEN)
            .ok_or_else(|| format!("set {ENV_FORGE_ADMIN_TOKEN} to the gateway's admin token"))?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = base.trim_end_matches('/');
        let base = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| with_causes("cannot build the HTTP client", &e))?;
        Ok(Self { base, token, http })
    }

    /// `GET path`, the JSON answer, or the admin API's error message.
    pub async fn get(&self, path: &str) -> Result<serde_json::Value, String> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// `GET path`, the JSON answer's text unparsed, or the admin API's error message. For
    /// traces: a JSON tree has a depth limit, and a trace's request may nest deeper still.
    pub async fn get_text(&self, path: &str) -> Result<String, String> {
        self.send_text(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// `method path` with a JSON body.
    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        self.send(
            self.http
                .request(method, format!("{}{path}", self.base))
                .json(body),
        )
        .await
    }

    /// Sends the request; the answer's JSON, or a message that says what went wrong, with
    /// the underlying causes (a refused connection, a timeout) and the status.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<serde_json::Value, String> {
        let text = self.send_text(request).await?;
        serde_json::from_str(&text).map_err(|e| {
            format!(
                "admin API at {}: the answer is not JSON ({e}): {}",
                self.base,
                text.chars().take(200).collect::<String>()
            )
        })
    }

    /// [`Self::send`], with a successful answer's text returned as it came, once it has been
    /// found to be JSON of any depth.
    async fn send_text(&self, request: reqwest::RequestBuilder) -> Result<String, String> {
        let at = format!("admin API at {}", self.base);
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| with_causes(&at, &e))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| with_causes(&format!("{at}: {status}"), &e))?;
        // Skipped over rather than parsed into a tree, which would have a depth limit.
        if serde_json::from_str::<&serde_json::value::RawValue>(&text).is_err() {
            // Not Forge's answer: a proxy's error page, or not the admin port.
            return Err(format!(
                "{at}: {status}: the answer is not JSON (is this the admin address?): {}",
                text.chars().take(200).collect::<String>()
            ));
        }
        if status.is_success() {
            return Ok(text);
        }
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        Err(format!(
            "{at}: {status}: {}",
            body["error"]["message"].as_str().unwrap_or("error")
        ))
    }
}

/// `context: error: cause: cause…`: reqwest's own message leaves out why (connection refused,
/// a DNS failure, a timeout).
fn with_causes(context: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = format!("{context}: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        message.push_str(&format!(": {c}"));
        cause = c.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::segment;

    #[test]
    fn segments_keep_unreserved_bytes_and_encode_the_rest() {
        assert_eq!(segment("chat-v1.2_x~"), "chat-v1.2_x~");
        assert_eq!(
            segment("meta-llama/Llama-3.1-8B"),
            "meta-llama%2FLlama-3.1-8B"
        );
        assert_eq!(segment("a b?#%é"), "a%20b%3F%23%25%C3%A9");
    }
}
