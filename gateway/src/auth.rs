//! Who is calling: app keys mapped to tenants on the proxy port, and the admin token.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ClientConfig;
use crate::error::Error;

/// A secret string (the admin token) that never shows in debug output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: &str) -> Self {
        Self(Arc::from(value))
    }

    /// The secret itself, for comparison only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// SHA-256 of a key.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The caller of one request, as recorded in its trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The client key's id.
    pub key_id: Option<String>,
    /// Its tenant.
    pub tenant: Option<String>,
}

/// The configured app keys, by the SHA-256 of each key.
///
/// Looking a key up by its digest means the lookup's timing depends on the digest, not on how
/// much of a guessed key was right, and the gateway holds no key in memory.
#[derive(Debug, Clone, Default)]
pub struct ClientKeys {
    by_digest: Arc<HashMap<[u8; 32], Caller>>,
}

impl ClientKeys {
    /// From config; empty means no authentication.
    pub fn new(clients: &[ClientConfig]) -> Self {
        let by_digest = clients
            .iter()
            .map(|c| {
                (
                    c.key_sha256,
                    Caller {
                        key_id: Some(c.id.clone()),
                        tenant: c.tenant.clone(),
                    },
                )
            })
            .collect();
        Self {
            by_digest: Arc::new(by_digest),
        }
    }

    /// Whether keys are required.
    pub fn enabled(&self) -> bool {
        !self.by_digest.is_empty()
    }

    fn identify(&self, headers: &HeaderMap) -> Option<Caller> {
        let key = presented_key(headers)?;
        self.by_digest.get(&sha256(key.as_bytes())).cloned()
    }
}

/// The key from `Authorization: Bearer …`, or Azure-style `api-key`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, key) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then_some(key.trim());
    }
    headers
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Middleware: with keys configured, a request without a valid key gets a 401; the caller is
/// attached to the request for the handlers.
pub async fn authenticate(
    State(keys): State<ClientKeys>,
    mut request: Request,
    next: Next,
) -> Response {
    if keys.enabled() {
        match keys.identify(request.headers()) {
            Some(caller) => {
                request.extensions_mut().insert(caller);
            }
            None => return Error::Unauthorized.into_response(),
        }
    }
    next.run(request).await
}

/// Checks `Authorization: Bearer <token>` against the admin token in constant time.
pub fn admin_token_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(presented) = bearer_token(headers) else {
        return false;
    };
    // Compare digests so the comparison takes the same time whatever the lengths.
    bool::from(sha256(presented.as_bytes()).ct_eq(&sha256(token.as_bytes())))
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn keys_identify_by_digest() {
        let keys = ClientKeys::new(&[ClientConfig {
            id: "app".into(),
            tenant: Some("t1".into()),
            key_sha256: sha256(b"sk-app"),
        }]);
        let caller = keys
            .identify(&headers("authorization", "Bearer sk-app"))
            .unwrap();
        assert_eq!(caller.tenant.as_deref(), Some("t1"));
        assert!(keys.identify(&headers("api-key", "sk-app")).is_some());
        assert!(
            keys.identify(&headers("authorization", "Bearer sk-other"))
                .is_none()
        );
        assert!(
            keys.identify(&headers("authorization", "Basic sk-app"))
                .is_none()
        );
        assert!(keys.identify(&HeaderMap::new()).is_none());
    }

    #[test]
    fn admin_token_must_match_exactly() {
        assert!(admin_token_matches(
            &headers("authorization", "Bearer s3cret"),
            "s3cret"
        ));
        assert!(!admin_token_matches(
            &headers("authorization", "Bearer s3cre"),
            "s3cret"
        ));
        assert!(!admin_token_matches(
            &headers("authorization", "s3cret"),
            "s3cret"
        ));
        assert!(!admin_token_matches(&HeaderMap::new(), "s3cret"));
    }
}
