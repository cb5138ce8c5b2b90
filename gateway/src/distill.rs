//! The gateway's side of distillation: the upstream chat client and the route deployer the
//! distiller uses, so forge-layer never talks HTTP to Forge's own parts.

use bytes::Bytes;
use forge_layer::distill::{BoxFuture, ChatClient, ChatError, Deployer};
use forge_layer::reassemble::FinalResponse;
use forge_router::{CanaryShare, Target};
use http::{HeaderMap, HeaderValue, Method, header};
use http_body_util::BodyExt;

use crate::routes::RouteControl;
use crate::upstream::{CHAT_PATH, Upstreams};

/// The most of one answer the judge's and the evaluation's calls read: far above any chat
/// completion, and a bound on what a broken or hostile upstream can make them hold.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// One non-stream chat completion through a configured upstream (its key, its timeouts).
#[derive(Debug, Clone)]
pub struct UpstreamChat {
    upstreams: Upstreams,
}

impl UpstreamChat {
    /// Over the gateway's upstreams.
    pub fn new(upstreams: Upstreams) -> Self {
        Self { upstreams }
    }
}

impl ChatClient for UpstreamChat {
    fn complete<'a>(
        &'a self,
        upstream: &'a str,
        model: &'a str,
        messages: &'a serde_json::Value,
        tools: Option<&'a serde_json::Value>,
    ) -> BoxFuture<'a, Result<String, ChatError>> {
        Box::pin(async move {
            let up = self
                .upstreams
                .get(upstream)
                .ok_or_else(|| ChatError::transient(format!("unknown upstream `{upstream}`")))?;
            let mut body = serde_json::json!({"model": model, "messages": messages});
            if let Some(tools) = tools {
                body["tools"] = tools.clone();
            }
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let bytes = Bytes::from(
                serde_json::to_vec(&body).map_err(|e| ChatError::refused(e.to_string()))?,
            );
            let response = up
                .send(Method::POST, CHAT_PATH, headers, bytes)
                .await
                .map_err(|e| ChatError::transient(e.to_string()))?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| ChatError::transient(format!("{model}'s answer: {e}")))?
                .to_bytes();
            if !status.is_success() {
                let message = format!(
                    "{model} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                );
                return Err(if refuses_the_request(status) {
                    ChatError::refused(message)
                } else {
                    ChatError::transient(message)
                });
            }
            let parsed = FinalResponse::from_json(&body);
            let choice = parsed
                .choices
                .first()
                .ok_or_else(|| ChatError::refused(format!("{model} answered no choices")))?;
            Ok(choice.message.answer_text())
        })
    }
}

/// Whether `status` refuses the request itself, so that sending it again gets the same answer: a
/// 4xx other than those about Forge's key or account (401, 403), a model not there yet (404),
/// a timeout (408), a conflict (409) or a rate limit (429).
fn refuses_the_request(status: http::StatusCode) -> bool {
    status.is_client_error() && !matches!(status.as_u16(), 401 | 403 | 404 | 408 | 409 | 429)
}

/// Adds trained students to routes through the validated, persisted routing control.
#[derive(Debug, Clone)]
pub struct RouteDeployer {
    control: RouteControl,
}

impl RouteDeployer {
    /// Over the gateway's routing control.
    pub fn new(control: RouteControl) -> Self {
        Self { control }
    }
}

impl Deployer for RouteDeployer {
    fn add_student<'a>(
        &'a self,
        alias: &'a str,
        upstream: &'a str,
        model: &'a str,
        percent: f64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let share = CanaryShare::from_percent(percent).map_err(|e| e.to_string())?;
            // Older students of this route step aside, in the same update: one canary at a
            // time keeps the guard's comparison clean.
            self.control
                .add_sole_student(alias, Target::new(upstream, model), share, "distiller")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn remove_idle_student<'a>(
        &'a self,
        alias: &'a str,
        upstream: &'a str,
        model: &'a str,
        idle_for: std::time::Duration,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            self.control
                .remove_idle_student(alias, Target::new(upstream, model), idle_for, "distiller")
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn share(&self, alias: &str, model: &str) -> Option<CanaryShare> {
        let table = self.control.router().load();
        let route = table.route(alias)?;
        let student = route.students.iter().find(|s| s.target.model == model)?;
        Some(student.share)
    }

    fn canary_in_progress(&self, alias: &str) -> bool {
        self.control.router().load().route(alias).is_some_and(|r| {
            r.students
                .iter()
                .any(|s| s.share != CanaryShare::ZERO && s.share != CanaryShare::FULL)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::Timeouts;
    use crate::upstream::Upstream;

    #[tokio::test]
    async fn an_answer_larger_than_the_cap_is_an_error_not_a_growing_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // An upstream that declares, and sends, more than the cap.
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0; 4096];
            let _ = socket.read(&mut request).await;
            let len = MAX_ANSWER_BYTES + 1024;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let chunk = vec![b' '; 64 * 1024];
            for _ in 0..len / chunk.len() + 1 {
                if socket.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let timeouts = Timeouts {
            connect: Duration::from_secs(30),
            first_byte: Duration::from_secs(30),
            idle: Duration::from_secs(30),
        };
        let mut upstreams = Upstreams::default();
        upstreams.insert(
            Upstream::new(
                "big",
                &format!("http://{addr}/v1"),
                None,
                crate::config::KeyHeader::default(),
                timeouts,
            )
            .unwrap(),
        );
        let chat = UpstreamChat::new(upstreams);
        let err = chat
            .complete("big", "m", &serde_json::json!([]), None)
            .await
            .unwrap_err();
        assert!(err.message.contains("length limit"), "{err}");
    }

    #[test]
    fn only_a_refusal_of_the_request_itself_is_final() {
        for status in [400, 413, 415, 422] {
            let status = http::StatusCode::from_u16(status).unwrap();
            assert!(refuses_the_request(status), "{status}");
        }
        // Forge's key, a model not deployed yet, a timeout, a rate limit, the server: none of
        // them is about the request, so the same request is tried again later.
        for status in [401, 403, 404, 408, 409, 429, 500, 502, 503] {
            let status = http::StatusCode::from_u16(status).unwrap();
            assert!(!refuses_the_request(status), "{status}");
        }
    }
}
