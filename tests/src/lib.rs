//! Shared helpers for the end-to-end tests: start the simulated upstream and the gateway on loopback.
// Test support: a failed set-up step should stop the test with its message.
#![allow(clippy::expect_used)]

use std::time::Duration;

use forge_gateway::config::Config;
use forge_gateway::server::RunningGateway;
use forge_gateway::sim::{ModelBehavior, SimConfig, SimHandle, SimUpstream};

/// How long any asynchronous effect may take before a test gives up. Generous: the machine is
/// shared and noisy, and a passing test never waits this long.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A simulated upstream's config in which each named model behaves as given.
pub fn behaviors(pairs: &[(&str, ModelBehavior)]) -> SimConfig {
    SimConfig {
        models: pairs
            .iter()
            .map(|(m, b)| (m.to_string(), b.clone()))
            .collect(),
        ..SimConfig::default()
    }
}

/// `[[clients]]` config entries: each client's id, tenant (if any) and key, given to the
/// gateway as the key's SHA-256, as an operator does.
pub fn clients_toml(clients: &[(&str, Option<&str>, &str)]) -> String {
    clients
        .iter()
        .map(|(id, tenant, key)| {
            let digest: String = forge_gateway::auth::sha256(key.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let tenant = tenant.map_or(String::new(), |t| format!("tenant = \"{t}\"\n"));
            format!("\n[[clients]]\nid = \"{id}\"\n{tenant}key_sha256 = \"{digest}\"\n")
        })
        .collect()
}

/// A model that streams `words` words, `chunk_delay` apart.
pub fn trickle(chunk_delay: Duration, words: usize) -> ModelBehavior {
    ModelBehavior {
        chunk_delay,
        words,
        ..ModelBehavior::default()
    }
}

/// Starts a simulated upstream on `127.0.0.1:0`.
pub async fn start_sim(config: SimConfig) -> SimHandle {
    SimUpstream::start(config, ([127, 0, 0, 1], 0).into())
        .await
        .expect("start the simulated upstream")
}

/// A config with one upstream `sim` at `sim_url`, the `[server]` keys given, and routes
/// `alias -> model` for each pair. Extra TOML (more upstreams, routes) can follow.
pub fn config_text(sim_url: &str, server: &str, routes: &[(&str, &str)]) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n\n[[upstreams]]\nname = \"sim\"\nbase_url = \"{sim_url}\"\n"
    );
    for (alias, model) in routes {
        text.push_str(&format!(
            "\n[[routes]]\nalias = \"{alias}\"\nteacher = {{ upstream = \"sim\", model = \"{model}\" }}\n"
        ));
    }
    text
}

/// A gateway started for a test, with its data directory, removed when it is dropped.
#[derive(Debug)]
pub struct TestGateway {
    gateway: RunningGateway,
    dir: tempfile::TempDir,
}

impl std::ops::Deref for TestGateway {
    type Target = RunningGateway;
    fn deref(&self) -> &RunningGateway {
        &self.gateway
    }
}

impl TestGateway {
    /// The data directory (capture store).
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Waits until the capture writer has settled every trace handed to it (nothing pending),
    /// and returns the counters then.
    pub async fn settled_capture_counters(&self) -> forge_layer::store::CounterSnapshot {
        eventually("the capture writer settles every trace", || {
            self.capture_counters().expect("capture on").pending == 0
        })
        .await;
        self.capture_counters().expect("capture on")
    }

    /// Shuts the gateway down gracefully (flushing capture), keeping the data directory.
    pub async fn shutdown(self) -> tempfile::TempDir {
        self.gateway.shutdown().await;
        self.dir
    }
}

/// Starts the real gateway from TOML text. Unless the text has its own `[capture]` section,
/// capture is on, into a fresh temporary directory.
pub async fn start_gateway(toml: &str) -> TestGateway {
    start_gateway_with(toml, |_| {}).await
}

/// Like [`start_gateway`], with a chance to adjust the parsed config (e.g. the admin token,
/// which production reads from the environment).
pub async fn start_gateway_with(toml: &str, adjust: impl FnOnce(&mut Config)) -> TestGateway {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut text = toml.to_string();
    if !text.contains("[capture]") {
        text.push_str(&format!(
            "\n[capture]\ndata_dir = {:?}\n",
            dir.path().display().to_string()
        ));
    }
    let mut config = Config::from_toml(&text).expect("valid test config");
    adjust(&mut config);
    let gateway = forge_gateway::server::start(config)
        .await
        .expect("start the gateway");
    TestGateway { gateway, dir }
}

/// A client like an app's: pooled, no proxy, and with a timeout only as a hang guard.
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .expect("build the test client")
}

/// A minimal chat body.
pub fn chat_body(model: &str, prompt: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
    })
}

/// Polls `check` until it returns true, panicking with `what` after [`DEADLINE`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `head` (a request line and headers promising 100 bytes of body), then 10 bytes of body
/// and nothing more, and returns what comes back before the first JSON error body ends. The
/// connection stays open all the while, as a client that stalls mid-body keeps it.
pub async fn answer_to_a_stalled_body(addr: std::net::SocketAddr, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut slow = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    slow.write_all(format!("{head}content-length: 100\r\n\r\n{{\"model\":").as_bytes())
        .await
        .expect("send the head and part of the body");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("}}") {
        let n = tokio::time::timeout(DEADLINE, slow.read(&mut buf))
            .await
            .expect("an answer before the deadline")
            .expect("read the answer");
        assert!(
            n > 0,
            "closed without an answer: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Replaces each stream chunk's `obfuscation` padding, random in every answer, with `*`, so
/// that two streams can be compared byte for byte everywhere else.
pub fn mask_padding(stream: &str) -> String {
    const KEY: &str = "\"obfuscation\":\"";
    let mut out = String::with_capacity(stream.len());
    let mut rest = stream;
    while let Some(at) = rest.find(KEY) {
        let value = at + KEY.len();
        out.push_str(&rest[..value]);
        out.push('*');
        let end = rest[value..]
            .find('"')
            .map_or(rest.len(), |len| value + len);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Replaces each occurrence of the response id and `created` timestamp of `from` with those of
/// `to`, so that two answers to the same request can be compared byte for byte.
pub fn align_ids(from: &str, to: &str) -> String {
    let field = |text: &str, key: &str| -> Option<String> {
        let start = text.find(key)? + key.len();
        let rest = &text[start..];
        let end = rest.find([',', '}'])?;
        Some(rest[..end].to_string())
    };
    let mut out = from.to_string();
    for key in ["\"id\":", "\"created\":"] {
        if let (Some(a), Some(b)) = (field(from, key), field(to, key)) {
            out = out.replace(&format!("{key}{a}"), &format!("{key}{b}"));
        }
    }
    out
}
