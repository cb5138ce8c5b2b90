//! A small client for the admin API, shared by the commands that talk to a running gateway.

use crate::env::ENV_FORGE_ADMIN_TOKEN;

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
    /// `base` is the admin address, e.g. `http://127.0.0.1:8081`.
    pub fn new(base: &str) -> Result<Self, String> {
        let token = std::env::var(ENV_FORGE_ADMIN_TOKEN)
            .map_err(|_| format!("set {ENV_FORGE_ADMIN_TOKEN} to the gateway's admin token"))?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::new(),
        })
    }

    /// `GET path`, the JSON answer, or the admin API's error message.
    pub async fn get(&self, path: &str) -> Result<serde_json::Value, String> {
        self.send(self.http.get(format!("{}{path}", self.base)))
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

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<serde_json::Value, String> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| format!("admin API: {e}"))?;
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|e| format!("admin API: {e}"))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!(
                "{status}: {}",
                body["error"]["message"].as_str().unwrap_or("error")
            ))
        }
    }
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
