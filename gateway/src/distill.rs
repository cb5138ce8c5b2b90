//! The gateway's side of distillation: the upstream chat client and the route deployer the
//! distiller uses, so forge-layer never talks HTTP to Forge's own parts.

use bytes::Bytes;
use forge_layer::distill::{BoxFuture, ChatClient, Deployer};
use forge_layer::reassemble::FinalResponse;
use forge_router::{CanaryShare, Target};
use http::{HeaderMap, HeaderValue, Method, header};
use http_body_util::BodyExt;

use crate::routes::RouteControl;
use crate::upstream::{CHAT_PATH, Upstreams};

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
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let up = self
                .upstreams
                .get(upstream)
                .ok_or_else(|| format!("unknown upstream `{upstream}`"))?;
            let mut body = serde_json::json!({"model": model, "messages": messages});
            if let Some(tools) = tools {
                body["tools"] = tools.clone();
            }
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let bytes = Bytes::from(serde_json::to_vec(&body).map_err(|e| e.to_string())?);
            let response = up
                .send(Method::POST, CHAT_PATH, headers, bytes)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!(
                    "{model} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                ));
            }
            let parsed = FinalResponse::from_json(&body);
            let choice = parsed.choices.first().ok_or("no choices in the answer")?;
            Ok(match &choice.message.content {
                Some(text) => text.clone(),
                None => serde_json::to_string(&choice.message.tool_calls).unwrap_or_default(),
            })
        })
    }
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

    fn canary_in_progress(&self, alias: &str) -> bool {
        self.control.router().load().route(alias).is_some_and(|r| {
            r.students
                .iter()
                .any(|s| s.share != CanaryShare::ZERO && s.share != CanaryShare::FULL)
        })
    }
}
