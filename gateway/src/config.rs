//! `forge.toml`: the raw serde shape (unknown keys refused) and its validation into [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use forge_layer::distill::{EvalMethod, Hyperparameters};
use forge_layer::guard::GuardConfig;
use forge_layer::redact::Kind;
use forge_layer::store::{CaptureMode, WriterConfig};
use forge_router::{CanaryShare, Route, RouteSpec};
use serde::Deserialize;

/// The longest `server.send_timeout_secs`: past a day a stalled client is not coming back, and
/// the timer's deadline must stay within what a clock can add.
const MAX_SEND_TIMEOUT_SECS: u64 = 86_400;

/// The longest `server.feedback_wait_secs`: feedback is a request a client waits on.
const MAX_FEEDBACK_WAIT_SECS: u64 = 600;

/// The most `server.max_headers` may allow: the parser reads up to [`PARSED_HEADERS`] so that
/// a request over the limit still gets a JSON 431.
pub const MAX_HEADERS_LIMIT: usize = 1000;
/// How many headers the HTTP parser reads before it refuses a request by itself (a 431 with no
/// body). Above 100 it needs a heap buffer per request, about 30 ns.
pub const PARSED_HEADERS: usize = 1024;
/// The most `server.max_header_bytes` may allow, far below [`PARSED_HEAD_BYTES`].
pub const MAX_HEADER_BYTES_LIMIT: usize = 1024 * 1024;
/// How large a request head the HTTP parser buffers before it refuses it by itself (a 431 with
/// no body). A connection's read buffer grows towards it only as a client sends that much.
pub const PARSED_HEAD_BYTES: usize = 4 * 1024 * 1024;

/// The shortest `capture.retention_days` besides 0: one minute.
const MIN_RETENTION_DAYS: f64 = 1.0 / 1440.0;
/// The longest: a hundred years, which a clock can add without overflowing.
const MAX_RETENTION_DAYS: f64 = 36_500.0;

/// The embedded default: the simulated upstream in-process and two ready routes. `forge serve`
/// with no `--config` runs this, so a fresh machine needs no set-up.
pub const DEFAULT_CONFIG: &str = include_str!("../forge.default.toml");

/// A config file that could not be read or is invalid. The message names the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    // The causes are in the messages and not chained as sources: a chain would print each one
    // twice (the message, then "Caused by" the same text).
    /// The file could not be read.
    #[error("cannot read config {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// TOML syntax, an unknown key, or a value of the wrong type: where, and what. The line
    /// itself is left out, since it may hold a key put where it does not belong.
    #[error("invalid config: {0}")]
    Parse(String),
    /// Well-formed, but inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// A TOML error as its position and message, without the line it quotes: a secret written
/// straight into the file (`api_key = "sk-…"` for `api_key_env`) would otherwise reach the
/// log of every start that fails on it.
fn parse_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let at = error.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {column}: ")
    });
    ConfigError::Parse(format!(
        "{}{}",
        at.unwrap_or_default(),
        error.message().trim_end()
    ))
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    routes: Vec<RouteSpec>,
    #[serde(default)]
    guard: RawGuard,
    #[serde(default)]
    distill: Vec<RawDistill>,
    #[serde(default)]
    distiller: RawDistiller,
    judge: Option<RawJudge>,
    #[serde(default)]
    capture: RawCapture,
    #[serde(default)]
    clients: Vec<RawClient>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCapture {
    enabled: bool,
    data_dir: PathBuf,
    mode: CaptureMode,
    queue_capacity: usize,
    queue_mb: usize,
    batch_max: usize,
    flush_interval_ms: u64,
    max_response_bytes: usize,
    max_event_bytes: usize,
    redact_pii: Vec<String>,
    cache_mb: usize,
    idle_priority: bool,
    retention_days: f64,
    durable_wait_secs: f64,
}

impl Default for RawCapture {
    fn default() -> Self {
        let writer = WriterConfig::default();
        Self {
            enabled: true,
            data_dir: PathBuf::from("forge-data"),
            mode: writer.mode,
            queue_capacity: writer.queue_capacity,
            queue_mb: writer.queue_bytes / (1024 * 1024),
            batch_max: writer.batch_max,
            flush_interval_ms: u64::try_from(writer.flush_interval.as_millis()).unwrap_or(u64::MAX),
            max_response_bytes: 4 * 1024 * 1024,
            max_event_bytes: writer.max_event_bytes,
            redact_pii: Kind::PII.iter().map(|k| k.name().to_string()).collect(),
            cache_mb: forge_layer::store::DEFAULT_CACHE_BYTES / (1024 * 1024),
            idle_priority: writer.idle_priority,
            retention_days: 0.0,
            durable_wait_secs: writer.durable_wait.as_secs_f64(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    id: String,
    tenant: Option<String>,
    key_env: Option<String>,
    key_sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    max_body_bytes: usize,
    max_in_flight: usize,
    body_timeout_secs: u64,
    send_timeout_secs: u64,
    feedback_wait_secs: u64,
    max_headers: usize,
    max_header_bytes: usize,
    shutdown_grace_secs: u64,
    passthrough_upstream: Option<String>,
    passthrough_account_apis: bool,
    admin_listen: String,
    routes_from_config: RoutesFromConfig,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 10 * 1024 * 1024,
            max_in_flight: 1024,
            body_timeout_secs: 60,
            send_timeout_secs: 60,
            feedback_wait_secs: 30,
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            shutdown_grace_secs: 30,
            passthrough_upstream: None,
            passthrough_account_apis: false,
            admin_listen: "127.0.0.1:8081".into(),
            routes_from_config: RoutesFromConfig::IfEmpty,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    base_url: Option<String>,
    #[serde(default)]
    sim: bool,
    api_key_env: Option<String>,
    #[serde(default)]
    api_key_header: KeyHeader,
    #[serde(default = "default_connect_ms")]
    connect_timeout_ms: u64,
    #[serde(default = "default_first_byte_ms")]
    first_byte_timeout_ms: u64,
    #[serde(default = "default_idle_ms")]
    idle_timeout_ms: u64,
}

fn default_connect_ms() -> u64 {
    5_000
}
fn default_first_byte_ms() -> u64 {
    300_000
}
fn default_idle_ms() -> u64 {
    60_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawGuard {
    enabled: bool,
    interval_secs: f64,
    min_requests: u64,
    steps: Vec<f64>,
    min_success_rate: f64,
    max_p99_ratio: f64,
    latency_slack_ms: u64,
    max_feedback_drop: f64,
    max_failed_checks: u32,
    manual: Vec<String>,
}

impl Default for RawGuard {
    fn default() -> Self {
        let d = GuardConfig::default();
        Self {
            enabled: true,
            interval_secs: d.interval.as_secs_f64(),
            min_requests: d.min_requests,
            steps: d.steps.iter().map(|s| s.percent()).collect(),
            min_success_rate: d.min_success_rate,
            max_p99_ratio: d.max_p99_ratio,
            latency_slack_ms: u64::try_from(d.latency_slack.as_millis()).unwrap_or(25),
            max_feedback_drop: d.max_feedback_drop,
            max_failed_checks: d.max_failed_checks,
            manual: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDistill {
    route: String,
    student_base_model: String,
    provider: String,
    upstream: String,
    #[serde(default = "default_trigger_threshold")]
    trigger_threshold: u64,
    #[serde(default = "default_min_examples")]
    min_examples: u64,
    #[serde(default = "default_schedule")]
    schedule: String,
    #[serde(default = "default_golden_min_score")]
    golden_min_score: f64,
    #[serde(default = "default_eval_min_score")]
    eval_min_score: f64,
    eval_method: Option<EvalMethod>,
    #[serde(default = "default_eval_max_prompts")]
    eval_max_prompts: usize,
    #[serde(default = "default_initial_canary")]
    initial_canary_percent: f64,
    suffix: Option<String>,
    tenant: Option<String>,
    #[serde(default = "default_validation_percent")]
    validation_percent: f64,
    #[serde(default = "default_max_key_share")]
    max_key_share: f64,
    #[serde(default)]
    hyperparameters: Hyperparameters,
    azure: Option<toml::Table>,
    kubernetes: Option<toml::Table>,
}

fn default_trigger_threshold() -> u64 {
    500
}
fn default_min_examples() -> u64 {
    100
}
fn default_schedule() -> String {
    "0 0 2 * * *".into()
}
fn default_golden_min_score() -> f64 {
    90.0
}
fn default_eval_min_score() -> f64 {
    80.0
}
fn default_eval_max_prompts() -> usize {
    20
}
fn default_initial_canary() -> f64 {
    10.0
}
fn default_validation_percent() -> f64 {
    10.0
}
fn default_max_key_share() -> f64 {
    0.5
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDistiller {
    check_every_secs: f64,
    poll_initial_secs: f64,
    poll_max_secs: f64,
    dataset_url: Option<String>,
    grading_window_secs: f64,
    max_training_secs: f64,
    undeploy_after_secs: f64,
}

impl Default for RawDistiller {
    fn default() -> Self {
        Self {
            check_every_secs: 60.0,
            poll_initial_secs: 10.0,
            poll_max_secs: 60.0,
            dataset_url: None,
            grading_window_secs: 3600.0,
            max_training_secs: 259_200.0,
            undeploy_after_secs: 3600.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJudge {
    upstream: String,
    model: String,
    #[serde(default = "default_sample_percent")]
    sample_percent: f64,
    #[serde(default = "default_per_minute")]
    max_per_minute: u32,
    #[serde(default = "default_per_day")]
    max_per_day: u32,
}

fn default_sample_percent() -> f64 {
    10.0
}
fn default_per_minute() -> u32 {
    60
}
fn default_per_day() -> u32 {
    5000
}

/// `[[distill]]`: one route's distillation, validated; the provider is built at start, once
/// simulated upstreams have addresses.
#[derive(Debug, Clone)]
pub struct DistillConfig {
    /// The route alias.
    pub route: String,
    /// The student base model.
    pub base_model: String,
    /// `openai`, `azure`, `kubernetes` or `sim`.
    pub provider: String,
    /// The upstream where the provider's API lives (openai, sim) and where students are served.
    pub upstream: String,
    /// Provider-specific settings (`[distill.azure]`, `[distill.kubernetes]`).
    pub provider_settings: Option<toml::Table>,
    /// New golden examples that start a job.
    pub trigger_threshold: u64,
    /// Fewest examples a dataset needs.
    pub min_examples: u64,
    /// The cron schedule, if any.
    pub schedule: Option<cron::Schedule>,
    /// Golden threshold.
    pub golden_min_score: f64,
    /// The held-out gate.
    pub eval_min_score: f64,
    /// How the gate scores.
    pub eval_method: EvalMethod,
    /// How many prompts the gate replays.
    pub eval_max_prompts: usize,
    /// The share a new student starts at.
    pub initial_canary_percent: f64,
    /// Model name suffix.
    pub suffix: Option<String>,
    /// Only this tenant's traces.
    pub tenant: Option<String>,
    /// Validation split, percent.
    pub validation_percent: f64,
    /// The most one client key may contribute.
    pub max_key_share: f64,
    /// Hyperparameters.
    pub hyperparameters: Hyperparameters,
}

/// `[distiller]`.
#[derive(Debug, Clone)]
pub struct DistillerConfig {
    /// How often thresholds and schedules are checked.
    pub check_every: Duration,
    /// First wait between provider polls.
    pub poll_initial: Duration,
    /// Longest wait between provider polls.
    pub poll_max: Duration,
    /// The admin API's public base URL, for remote trainers to fetch datasets from.
    pub dataset_url: Option<String>,
    /// How old a trace must be before a dataset may read it, so that feedback has time to come.
    pub grading_window: Duration,
    /// How long a job may go from its creation to the end of its training run before the run is
    /// cancelled and the job failed; `None` for no limit.
    pub max_training: Option<Duration>,
    /// How long a trained model that serves nothing stays deployed at 0% before it leaves its
    /// route and is undeployed; `None` for never.
    pub undeploy_after: Option<Duration>,
}

/// `[judge]`.
#[derive(Debug, Clone)]
pub struct JudgeConfig {
    /// The upstream.
    pub upstream: String,
    /// The model.
    pub model: String,
    /// Share of new teacher traces judged, percent.
    pub sample_percent: f64,
    /// Judgements per minute at most.
    pub max_per_minute: u32,
    /// Judgements per day at most (the cost cap).
    pub max_per_day: u32,
}

/// When the `[[routes]]` of the config file are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutesFromConfig {
    /// Only when the store holds no routing table yet (first start); afterwards the stored
    /// table, with every change made through the admin API, the guard or the distiller, wins.
    #[default]
    IfEmpty,
    /// Always: the config's routes replace the stored table at start (recorded in the history).
    Always,
}

/// The validated runtime config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The proxy listener and its limits.
    pub server: ServerConfig,
    /// Where models are served.
    pub upstreams: Vec<UpstreamConfig>,
    /// The routes the table starts with.
    pub routes: Vec<Route>,
    /// `[capture]`: `None` when capture is off.
    pub capture: Option<CaptureConfig>,
    /// `[[clients]]`: the keys apps must present. Empty means no client auth.
    pub clients: Vec<ClientConfig>,
    /// `[guard]`: `None` when the canary guard is off.
    pub guard: Option<GuardConfig>,
    /// `[[distill]]`.
    pub distill: Vec<DistillConfig>,
    /// `[distiller]`.
    pub distiller: DistillerConfig,
    /// `[judge]`.
    pub judge: Option<JudgeConfig>,
}

/// `[capture]`.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// The writer's settings (mode, queue, batching, redaction).
    pub writer: WriterConfig,
    /// Response bytes kept per exchange; past that the trace is marked truncated.
    pub max_response_bytes: usize,
    /// redb's page cache, in bytes.
    pub cache_bytes: usize,
    /// Traces older than this are deleted, with their feedback and evaluations; `None` keeps
    /// them all.
    pub retention: Option<Duration>,
}

/// `[[clients]]`: one app key.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The id recorded in traces (never the key).
    pub id: String,
    /// The tenant its traces belong to.
    pub tenant: Option<String>,
    /// SHA-256 of the key: the gateway never keeps the key itself.
    pub key_sha256: [u8; 32],
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The proxy address.
    pub listen: SocketAddr,
    /// Requests with a larger body get a 413.
    pub max_body_bytes: usize,
    /// Requests beyond this many in flight (streams count until they end) get a fast 503.
    pub max_in_flight: usize,
    /// How long a client has to send its whole request body; then a 408.
    pub body_timeout: Duration,
    /// How long a response write may wait for the client to take bytes; then the connection is
    /// closed (a client that stops reading would otherwise hold its exchange open for good).
    pub send_timeout: Duration,
    /// How long feedback on a trace still on its way to the store waits for it; then a 409.
    pub feedback_wait: Duration,
    /// Requests with more headers get a 431.
    pub max_headers: usize,
    /// Requests whose header names and values add up to more bytes get a 431.
    pub max_header_bytes: usize,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// The upstream that other `/v1/*` paths are passed to; `None` turns passthrough off.
    pub passthrough_upstream: Option<String>,
    /// Whether the passthrough also forwards the APIs that act on the account behind the
    /// upstream's key (files, fine-tuning, batches…), which hold every tenant's data.
    pub passthrough_account_apis: bool,
    /// The admin API address; it starts only when `FORGE_ADMIN_TOKEN` is set.
    pub admin_listen: SocketAddr,
    /// The admin bearer token, read from `FORGE_ADMIN_TOKEN` at load. `None`: no admin API.
    pub admin_token: Option<crate::auth::Secret>,
    /// Whether `[[routes]]` seed or replace the stored routing table.
    pub routes_from_config: RoutesFromConfig,
}

/// Where an upstream lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An OpenAI-compatible base URL, ending before the endpoint path (`…/v1`).
    Url(String),
    /// The built-in simulated upstream, started in-process on a loopback port.
    Sim,
}

/// `[[upstreams]]`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The name routes refer to.
    pub name: String,
    /// Its address.
    pub endpoint: Endpoint,
    /// The environment variable holding its API key, read at start-up.
    pub api_key_env: Option<String>,
    /// The header the key goes in.
    pub api_key_header: KeyHeader,
    /// Its timeouts.
    pub timeouts: Timeouts,
}

/// The header an upstream takes its key in (`api_key_header`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum KeyHeader {
    /// `Authorization: Bearer <key>`: OpenAI, vLLM, and most OpenAI-compatible servers.
    #[default]
    #[serde(rename = "authorization")]
    Authorization,
    /// `api-key: <key>`: Azure OpenAI's own key header.
    #[serde(rename = "api-key")]
    ApiKey,
}

/// The three upstream timeouts. None is a total timeout: streams may run for as long as the
/// upstream keeps sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// To establish the TCP (and TLS) connection.
    pub connect: Duration,
    /// From sending the request to the response headers.
    pub first_byte: Duration,
    /// Between two body chunks.
    pub idle: Duration,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::from_toml(&text)
    }

    /// The embedded default (see [`DEFAULT_CONFIG`]).
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::from_toml(DEFAULT_CONFIG)
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        Self::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let listen = raw.server.listen.parse().map_err(|_| {
            invalid(format!(
                "server.listen `{}` is not an address like 127.0.0.1:8080",
                raw.server.listen
            ))
        })?;
        if raw.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes must be at least 1"));
        }
        if !(1..=MAX_IN_FLIGHT).contains(&raw.server.max_in_flight) {
            return Err(invalid(format!(
                "server.max_in_flight must be from 1 to {MAX_IN_FLIGHT}"
            )));
        }
        if raw.server.body_timeout_secs == 0 {
            return Err(invalid("server.body_timeout_secs must be at least 1"));
        }
        if !(1..=MAX_FEEDBACK_WAIT_SECS).contains(&raw.server.feedback_wait_secs) {
            return Err(invalid(format!(
                "server.feedback_wait_secs must be from 1 to {MAX_FEEDBACK_WAIT_SECS}"
            )));
        }
        if !(1..=MAX_SEND_TIMEOUT_SECS).contains(&raw.server.send_timeout_secs) {
            return Err(invalid(format!(
                "server.send_timeout_secs must be from 1 to {MAX_SEND_TIMEOUT_SECS} (a day)"
            )));
        }
        if !(1..=MAX_HEADERS_LIMIT).contains(&raw.server.max_headers) {
            return Err(invalid(format!(
                "server.max_headers must be from 1 to {MAX_HEADERS_LIMIT}"
            )));
        }
        if !(1024..=MAX_HEADER_BYTES_LIMIT).contains(&raw.server.max_header_bytes) {
            return Err(invalid(format!(
                "server.max_header_bytes must be from 1024 to {MAX_HEADER_BYTES_LIMIT} (1 MiB)"
            )));
        }

        let mut upstreams: Vec<UpstreamConfig> = Vec::with_capacity(raw.upstreams.len());
        for up in raw.upstreams {
            if up.name.trim().is_empty() {
                return Err(invalid("an upstream has an empty name"));
            }
            if upstreams.iter().any(|u| u.name == up.name) {
                return Err(invalid(format!("upstream `{}` is defined twice", up.name)));
            }
            let endpoint = match (up.base_url, up.sim) {
                (Some(url), false) => Endpoint::Url(validate_base_url(&up.name, &url)?),
                (None, true) => Endpoint::Sim,
                (Some(_), true) => {
                    return Err(invalid(format!(
                        "upstream `{}`: set either base_url or sim = true, not both",
                        up.name
                    )));
                }
                (None, false) => {
                    return Err(invalid(format!(
                        "upstream `{}` needs base_url (or sim = true)",
                        up.name
                    )));
                }
            };
            for (key, ms) in [
                ("connect_timeout_ms", up.connect_timeout_ms),
                ("first_byte_timeout_ms", up.first_byte_timeout_ms),
                ("idle_timeout_ms", up.idle_timeout_ms),
            ] {
                if ms == 0 {
                    return Err(invalid(format!(
                        "upstream `{}`: {key} must be at least 1",
                        up.name
                    )));
                }
            }
            upstreams.push(UpstreamConfig {
                name: up.name,
                endpoint,
                api_key_env: up.api_key_env.filter(|v| !v.is_empty()),
                api_key_header: up.api_key_header,
                timeouts: Timeouts {
                    connect: Duration::from_millis(up.connect_timeout_ms),
                    first_byte: Duration::from_millis(up.first_byte_timeout_ms),
                    idle: Duration::from_millis(up.idle_timeout_ms),
                },
            });
        }
        if upstreams.is_empty() {
            return Err(invalid("at least one [[upstreams]] entry is needed"));
        }

        let passthrough_upstream = match raw.server.passthrough_upstream {
            Some(name) if name.is_empty() => None,
            Some(name) => {
                if !upstreams.iter().any(|u| u.name == name) {
                    return Err(invalid(format!(
                        "server.passthrough_upstream names unknown upstream `{name}`"
                    )));
                }
                Some(name)
            }
            None => upstreams.first().map(|u| u.name.clone()),
        };

        let mut routes = Vec::with_capacity(raw.routes.len());
        for spec in &raw.routes {
            routes.push(
                spec.to_route()
                    .map_err(|e| invalid(format!("route `{}`: {e}", spec.alias)))?,
            );
        }
        // Check the routes the way the router will, so a bad table fails at load, naming the route.
        forge_router::RoutingTable::new(
            0,
            routes.clone(),
            &upstreams.iter().map(|u| u.name.clone()).collect(),
        )
        .map_err(|e| invalid(e.to_string()))?;

        let admin_listen = raw.server.admin_listen.parse().map_err(|_| {
            invalid(format!(
                "server.admin_listen `{}` is not an address like 127.0.0.1:8081",
                raw.server.admin_listen
            ))
        })?;
        let capture = validate_capture(raw.capture)?;
        let guard = validate_guard(raw.guard)?;
        let judge = validate_judge(raw.judge, &upstreams)?;
        let distiller = validate_distiller(raw.distiller)?;
        let clients = validate_clients(raw.clients)?;
        let distill = validate_distill(
            raw.distill,
            &DistillContext {
                upstreams: &upstreams,
                routes: &routes,
                judge: judge.is_some(),
                clients: &clients,
                dataset_url: distiller.dataset_url.as_deref(),
            },
        )?;
        if !distill.is_empty() && capture.is_none() {
            return Err(invalid(
                "[[distill]] needs capture: its datasets are built from captured traces",
            ));
        }

        Ok(Config {
            capture,
            clients,
            guard,
            distill,
            distiller,
            judge,
            server: ServerConfig {
                admin_listen,
                routes_from_config: raw.server.routes_from_config,
                admin_token: crate::env::secret(crate::env::ENV_FORGE_ADMIN_TOKEN)
                    .map(|t| crate::auth::Secret::new(&t)),
                listen,
                max_body_bytes: raw.server.max_body_bytes,
                max_in_flight: raw.server.max_in_flight,
                body_timeout: Duration::from_secs(raw.server.body_timeout_secs),
                send_timeout: Duration::from_secs(raw.server.send_timeout_secs),
                feedback_wait: Duration::from_secs(raw.server.feedback_wait_secs),
                max_headers: raw.server.max_headers,
                max_header_bytes: raw.server.max_header_bytes,
                shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_secs),
                passthrough_upstream,
                passthrough_account_apis: raw.server.passthrough_account_apis,
            },
            upstreams,
            routes,
        })
    }
}

/// The longest interval a timer in the config may have (a week): past it a timer is as good as
/// off, and much longer ones cannot be represented.
const MAX_INTERVAL_SECS: f64 = 7.0 * 86_400.0;

/// The longest `capture.flush_interval_ms`: an hour of traces waiting for their commit (a test
/// that wants only the shutdown flush to store traces uses ten minutes).
const MAX_FLUSH_INTERVAL_MS: u64 = 3_600_000;

/// The longest `capture.durable_wait_secs`: an hour.
const MAX_DURABLE_WAIT_SECS: f64 = 3600.0;

/// The largest `capture.queue_mb`: just under 4 GiB.
const MAX_QUEUE_MB: usize = 4095;
/// The most requests served at once, and the most traces waiting for the writer: far above
/// what a machine serves, and below the most permits a tokio semaphore or channel holds.
const MAX_IN_FLIGHT: usize = 1 << 20;
const MAX_QUEUE_CAPACITY: usize = 1 << 24;

fn validate_capture(raw: RawCapture) -> Result<Option<CaptureConfig>, ConfigError> {
    if !raw.enabled {
        return Ok(None);
    }
    for (key, value) in [
        ("queue_capacity", raw.queue_capacity),
        ("batch_max", raw.batch_max),
        ("max_response_bytes", raw.max_response_bytes),
        ("max_event_bytes", raw.max_event_bytes),
        ("cache_mb", raw.cache_mb),
    ] {
        if value == 0 {
            return Err(invalid(format!("capture.{key} must be at least 1")));
        }
    }
    if raw.queue_capacity > MAX_QUEUE_CAPACITY {
        return Err(invalid(format!(
            "capture.queue_capacity must be from 1 to {MAX_QUEUE_CAPACITY}"
        )));
    }
    // A trace waits for its commit up to this long, and the clock must be able to add it.
    if raw.flush_interval_ms > MAX_FLUSH_INTERVAL_MS {
        return Err(invalid(format!(
            "capture.flush_interval_ms must be from 0 to {MAX_FLUSH_INTERVAL_MS} (an hour)"
        )));
    }
    // At least a second: a durable commit takes two fsyncs, and a bound near that would cut
    // responses whenever the disk is a little slow.
    if !(1.0..=MAX_DURABLE_WAIT_SECS).contains(&raw.durable_wait_secs) {
        return Err(invalid(format!(
            "capture.durable_wait_secs must be from 1 to {MAX_DURABLE_WAIT_SECS} (an hour)"
        )));
    }
    // The budget is counted in a u32 of bytes.
    if !(1..=MAX_QUEUE_MB).contains(&raw.queue_mb) {
        return Err(invalid(format!(
            "capture.queue_mb must be from 1 to {MAX_QUEUE_MB}"
        )));
    }
    // At least a minute: a smaller age would delete traces as they land.
    let days = raw.retention_days;
    if days != 0.0 && !(MIN_RETENTION_DAYS..=MAX_RETENTION_DAYS).contains(&days) {
        return Err(invalid(format!(
            "capture.retention_days must be 0 (keep every trace) or a number of days from one minute's worth (1/1440, about 0.000695) to {MAX_RETENTION_DAYS}"
        )));
    }
    let retention = (days > 0.0)
        .then(|| Duration::try_from_secs_f64(days * 86_400.0).ok())
        .flatten();
    let mut pii = Vec::new();
    for name in &raw.redact_pii {
        match Kind::from_name(name).filter(|k| Kind::PII.contains(k)) {
            Some(kind) => pii.push(kind),
            None => {
                return Err(invalid(format!(
                    "capture.redact_pii: unknown kind `{name}` (known: email, phone, card, iban, ip)"
                )));
            }
        }
    }
    Ok(Some(CaptureConfig {
        data_dir: raw.data_dir,
        max_response_bytes: raw.max_response_bytes,
        cache_bytes: raw.cache_mb.saturating_mul(1024 * 1024),
        retention,
        writer: WriterConfig {
            mode: raw.mode,
            queue_capacity: raw.queue_capacity,
            queue_bytes: raw.queue_mb * 1024 * 1024,
            batch_max: raw.batch_max,
            flush_interval: Duration::from_millis(raw.flush_interval_ms),
            redactor: forge_layer::redact::Redactor::with_pii(&pii),
            max_event_bytes: raw.max_event_bytes,
            idle_priority: raw.idle_priority,
            durable_wait: Duration::from_secs_f64(raw.durable_wait_secs),
        },
    }))
}

fn validate_guard(raw: RawGuard) -> Result<Option<GuardConfig>, ConfigError> {
    if !raw.enabled {
        return Ok(None);
    }
    let interval = secs("guard.interval_secs", raw.interval_secs)?;
    let mut steps = Vec::with_capacity(raw.steps.len());
    for p in &raw.steps {
        let share =
            CanaryShare::from_percent(*p).map_err(|e| invalid(format!("guard.steps: {e}")))?;
        if steps.last().is_some_and(|last| *last >= share) || share == CanaryShare::ZERO {
            return Err(invalid("guard.steps must rise strictly, above 0"));
        }
        steps.push(share);
    }
    if steps.is_empty() {
        return Err(invalid("guard.steps needs at least one step"));
    }
    if !(0.0..=1.0).contains(&raw.min_success_rate) {
        return Err(invalid(
            "guard.min_success_rate is a fraction from 0 to 1 (0.99 = 99%)",
        ));
    }
    if !(raw.max_p99_ratio.is_finite() && raw.max_p99_ratio >= 1.0) {
        return Err(invalid("guard.max_p99_ratio must be at least 1"));
    }
    // Negative, a student would have to beat the teacher; NaN would turn the gate off.
    if !(0.0..=100.0).contains(&raw.max_feedback_drop) {
        return Err(invalid("guard.max_feedback_drop must be 0–100 (points)"));
    }
    if raw.max_failed_checks == 0 {
        return Err(invalid("guard.max_failed_checks must be at least 1"));
    }
    if raw.min_requests == 0 {
        // With none needed, a student with no traffic at all would be judged (and rolled back).
        return Err(invalid("guard.min_requests must be at least 1"));
    }
    Ok(Some(GuardConfig {
        steps,
        interval,
        min_requests: raw.min_requests,
        min_success_rate: raw.min_success_rate,
        max_p99_ratio: raw.max_p99_ratio,
        latency_slack: Duration::from_millis(raw.latency_slack_ms),
        max_feedback_drop: raw.max_feedback_drop,
        max_failed_checks: raw.max_failed_checks,
        manual: raw.manual.into_iter().collect(),
    }))
}

/// An interval given in seconds: from a millisecond to [`MAX_INTERVAL_SECS`]. A timer of zero
/// would spin (tokio refuses one), and a huge one cannot be represented.
fn secs(key: &str, value: f64) -> Result<Duration, ConfigError> {
    if (0.001..=MAX_INTERVAL_SECS).contains(&value) {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(invalid(format!(
            "{key} must be a number of seconds from 0.001 to {MAX_INTERVAL_SECS} (a week)"
        )))
    }
}

fn validate_distiller(raw: RawDistiller) -> Result<DistillerConfig, ConfigError> {
    Ok(DistillerConfig {
        check_every: secs("distiller.check_every_secs", raw.check_every_secs)?,
        poll_initial: secs("distiller.poll_initial_secs", raw.poll_initial_secs)?,
        poll_max: secs("distiller.poll_max_secs", raw.poll_max_secs)?,
        dataset_url: raw.dataset_url.filter(|u| !u.is_empty()),
        // Zero is allowed: no timer runs on it.
        grading_window: if raw.grading_window_secs == 0.0 {
            Duration::ZERO
        } else {
            secs("distiller.grading_window_secs", raw.grading_window_secs)?
        },
        // Zero turns the deadline off.
        max_training: if raw.max_training_secs == 0.0 {
            None
        } else {
            Some(secs("distiller.max_training_secs", raw.max_training_secs)?)
        },
        // Zero keeps replaced students deployed.
        undeploy_after: if raw.undeploy_after_secs == 0.0 {
            None
        } else {
            Some(secs(
                "distiller.undeploy_after_secs",
                raw.undeploy_after_secs,
            )?)
        },
    })
}

fn validate_judge(
    raw: Option<RawJudge>,
    upstreams: &[UpstreamConfig],
) -> Result<Option<JudgeConfig>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    if !upstreams.iter().any(|u| u.name == raw.upstream) {
        return Err(invalid(format!(
            "judge.upstream names unknown upstream `{}`",
            raw.upstream
        )));
    }
    if !(0.0..=100.0).contains(&raw.sample_percent) {
        return Err(invalid("judge.sample_percent must be 0–100"));
    }
    // A cap of 0 would judge nothing, and datasets wait for the judge: distillation would stop
    // without a word. To judge nothing, leave `[judge]` out.
    if raw.max_per_minute == 0 || raw.max_per_day == 0 {
        return Err(invalid(
            "judge.max_per_minute and judge.max_per_day must be at least 1 (to turn the judge off, leave out [judge])",
        ));
    }
    Ok(Some(JudgeConfig {
        upstream: raw.upstream,
        model: raw.model,
        sample_percent: raw.sample_percent,
        max_per_minute: raw.max_per_minute,
        max_per_day: raw.max_per_day,
    }))
}

/// What the rest of the config says that `[[distill]]` entries are checked against.
struct DistillContext<'a> {
    upstreams: &'a [UpstreamConfig],
    routes: &'a [Route],
    /// Whether `[judge]` is set.
    judge: bool,
    clients: &'a [ClientConfig],
    /// `[distiller] dataset_url`.
    dataset_url: Option<&'a str>,
}

fn validate_distill(
    raw: Vec<RawDistill>,
    context: &DistillContext<'_>,
) -> Result<Vec<DistillConfig>, ConfigError> {
    let DistillContext {
        upstreams,
        routes,
        judge,
        clients,
        dataset_url,
    } = *context;
    let mut out: Vec<DistillConfig> = Vec::new();
    for d in raw {
        let at = |key: &str| format!("distill `{}`: {key}", d.route);
        if !routes.iter().any(|r| r.alias == d.route) {
            return Err(invalid(format!(
                "[[distill]] route `{}` is not a route alias",
                d.route
            )));
        }
        if out.iter().any(|o| o.route == d.route) {
            return Err(invalid(format!(
                "[[distill]] route `{}` is configured twice",
                d.route
            )));
        }
        let Some(upstream) = upstreams.iter().find(|u| u.name == d.upstream) else {
            return Err(invalid(at(&format!(
                "upstream names unknown upstream `{}`",
                d.upstream
            ))));
        };
        // OpenAI's fine-tuning API takes the key of the upstream it lives on; there is no other.
        if d.provider == "openai"
            && upstream.api_key_env.is_none()
            && matches!(upstream.endpoint, Endpoint::Url(_))
        {
            return Err(invalid(at(&format!(
                "provider openai uses the key of upstream `{}`: set api_key_env there",
                d.upstream
            ))));
        }
        if d.provider == "kubernetes" {
            // The training Job downloads its dataset from there; without it every job would
            // build its dataset, and then fail.
            let url = dataset_url.ok_or_else(|| {
                invalid(at(
                    "provider kubernetes needs [distiller] dataset_url, the admin API address the training Job downloads its dataset from",
                ))
            })?;
            validate_base_url("[distiller] dataset_url", url)
                .map_err(|_| invalid("distiller.dataset_url must be an http(s) URL with a host"))?;
        }
        // Traces carry a tenant only from a client key that has it: any other tenant would
        // match nothing, and the route would never distill.
        if let Some(tenant) = &d.tenant
            && !clients.iter().any(|c| c.tenant.as_ref() == Some(tenant))
        {
            return Err(invalid(at(&format!(
                "tenant `{tenant}` is the tenant of no [[clients]] entry, so no trace has it"
            ))));
        }
        let settings = match d.provider.as_str() {
            "openai" | "sim" => {
                if d.azure.is_some() || d.kubernetes.is_some() {
                    return Err(invalid(at(
                        "[distill.azure]/[distill.kubernetes] do not apply to this provider",
                    )));
                }
                None
            }
            "azure" => Some(d.azure.ok_or_else(|| {
                invalid(at("provider = \"azure\" needs a [distill.azure] table"))
            })?),
            "kubernetes" => Some(d.kubernetes.ok_or_else(|| {
                invalid(at(
                    "provider = \"kubernetes\" needs a [distill.kubernetes] table",
                ))
            })?),
            other => {
                return Err(invalid(at(&format!(
                    "provider `{other}` is not one of openai, azure, kubernetes, sim"
                ))));
            }
        };
        let schedule =
            forge_layer::distill::parse_schedule(&d.schedule).map_err(|e| invalid(at(&e)))?;
        for (key, v) in [
            ("eval_min_score", d.eval_min_score),
            ("golden_min_score", d.golden_min_score),
            ("validation_percent", d.validation_percent),
            ("initial_canary_percent", d.initial_canary_percent),
        ] {
            if !(0.0..=100.0).contains(&v) {
                return Err(invalid(at(&format!("{key} must be 0–100"))));
            }
        }
        // Checked here, not after the training run it is first used for.
        forge_router::CanaryShare::from_percent(d.initial_canary_percent)
            .map_err(|e| invalid(at(&format!("initial_canary_percent: {e}"))))?;
        if !(0.0..=1.0).contains(&d.max_key_share) || d.max_key_share == 0.0 {
            return Err(invalid(at(
                "max_key_share is a fraction above 0, at most 1",
            )));
        }
        // More held out than trained on is a mistake, and at 100% no job could ever train.
        if d.validation_percent > 50.0 {
            return Err(invalid(at("validation_percent is at most 50")));
        }
        // The gate scores the student only on lines it was not trained on.
        if d.eval_min_score > 0.0 && d.validation_percent == 0.0 {
            return Err(invalid(at(
                "eval_min_score needs held-out lines: set validation_percent above 0, or eval_min_score = 0 to turn the gate off",
            )));
        }
        if d.min_examples < 10 {
            return Err(invalid(at(
                "min_examples must be at least 10 (the fine-tuning minimum)",
            )));
        }
        // The provider refuses a longer suffix only at job creation, after the uploads.
        let suffix_max = if d.provider == "azure" { 40 } else { 64 };
        if d.suffix
            .as_ref()
            .is_some_and(|s| s.chars().count() > suffix_max)
        {
            return Err(invalid(at(&format!(
                "suffix is at most {suffix_max} characters for provider `{}`",
                d.provider
            ))));
        }
        check_hyperparameters(&d.hyperparameters, &d.provider).map_err(|e| invalid(at(&e)))?;
        let eval_method = match d.eval_method {
            Some(EvalMethod::Judge) if !judge => {
                return Err(invalid(at(
                    "eval_method = \"judge\" needs a [judge] section",
                )));
            }
            Some(m) => m,
            None if judge => EvalMethod::Judge,
            None => EvalMethod::Similarity,
        };
        out.push(DistillConfig {
            route: d.route,
            base_model: d.student_base_model,
            provider: d.provider,
            upstream: d.upstream,
            provider_settings: settings,
            trigger_threshold: d.trigger_threshold.max(1),
            min_examples: d.min_examples,
            schedule,
            golden_min_score: d.golden_min_score,
            eval_min_score: d.eval_min_score,
            eval_method,
            eval_max_prompts: d.eval_max_prompts.max(1),
            initial_canary_percent: d.initial_canary_percent,
            suffix: d.suffix,
            tenant: d.tenant,
            validation_percent: d.validation_percent,
            max_key_share: d.max_key_share,
            hyperparameters: d.hyperparameters,
        });
    }
    Ok(out)
}

/// Hyperparameters a job would be refused for. OpenAI's ranges for a supervised job
/// (openai-wire.md), which Azure and the simulated upstream share: the provider refuses a value
/// out of them only at job creation, after the uploads, and the next check would build and
/// upload the same dataset again. A Kubernetes trainer is Forge's own image, with no such upper
/// bounds: there only a value no trainer can use (no epoch, an empty batch) is refused.
fn check_hyperparameters(h: &Hyperparameters, provider: &str) -> Result<(), String> {
    let (epochs_max, batch_max) = if provider == "kubernetes" {
        (u32::MAX, u32::MAX)
    } else {
        (50, 256)
    };
    let in_range = |n: Option<u32>, max: u32| n.is_none_or(|n| (1..=max).contains(&n));
    if !in_range(h.n_epochs, epochs_max) {
        return Err(bound("n_epochs", epochs_max));
    }
    if !in_range(h.batch_size, batch_max) {
        return Err(bound("batch_size", batch_max));
    }
    if h.learning_rate_multiplier
        .is_some_and(|m| !(m.is_finite() && m > 0.0))
    {
        return Err("hyperparameters.learning_rate_multiplier must be a number above 0".into());
    }
    Ok(())
}

/// The error for hyperparameter `name` out of 1..=`max`.
fn bound(name: &str, max: u32) -> String {
    if max == u32::MAX {
        format!("hyperparameters.{name} must be at least 1")
    } else {
        format!("hyperparameters.{name} must be from 1 to {max}")
    }
}

fn validate_clients(raw: Vec<RawClient>) -> Result<Vec<ClientConfig>, ConfigError> {
    let mut clients: Vec<ClientConfig> = Vec::with_capacity(raw.len());
    for c in raw {
        if c.id.trim().is_empty() {
            return Err(invalid("a [[clients]] entry has an empty id"));
        }
        if clients.iter().any(|k| k.id == c.id) {
            return Err(invalid(format!("client `{}` is defined twice", c.id)));
        }
        let key_sha256 = match (c.key_env, c.key_sha256) {
            (Some(var), None) => {
                let key = crate::env::secret(&var).ok_or_else(|| {
                    invalid(format!(
                        "client `{}`: environment variable {var} (key_env) is not set or is empty",
                        c.id
                    ))
                })?;
                crate::auth::sha256(key.as_bytes())
            }
            (None, Some(hex_digest)) => hex::decode(hex_digest.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    invalid(format!(
                        "client `{}`: key_sha256 must be 64 hex characters",
                        c.id
                    ))
                })?,
            _ => {
                return Err(invalid(format!(
                    "client `{}`: set exactly one of key_env or key_sha256",
                    c.id
                )));
            }
        };
        if clients.iter().any(|k| k.key_sha256 == key_sha256) {
            return Err(invalid(format!(
                "client `{}` has the same key as another client",
                c.id
            )));
        }
        clients.push(ClientConfig {
            id: c.id,
            tenant: c.tenant.filter(|t| !t.is_empty()),
            key_sha256,
        });
    }
    Ok(clients)
}

fn validate_base_url(name: &str, url: &str) -> Result<String, ConfigError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        invalid(format!(
            "upstream `{name}`: base_url `{url}` is not a URL ({e})"
        ))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(invalid(format!(
            "upstream `{name}`: base_url must be an http(s) URL with a host"
        )));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid(format!(
            "upstream `{name}`: base_url must not have a query or fragment"
        )));
    }
    Ok(url.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let config = Config::embedded_default().unwrap();
        assert_eq!(config.upstreams[0].endpoint, Endpoint::Sim);
        assert!(!config.routes.is_empty());
    }

    #[test]
    fn unknown_key_is_an_error_that_names_it() {
        let err =
            Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nmax_bodyy = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_bodyy"), "{err}");
        let err = Config::from_toml("[[upstreams]]\nname = \"a\"\nsim = true\nkey = \"x\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("key"), "{err}");
    }

    #[test]
    fn inconsistent_configs_are_refused() {
        let up = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n";
        let cases = [
            (String::new(), "at least one"),
            (format!("{up}{up}"), "defined twice"),
            (
                "[[upstreams]]\nname = \"a\"\nbase_url = \"ftp://x\"\n".to_string(),
                "http(s)",
            ),
            (
                "[[upstreams]]\nname = \"a\"\n".to_string(),
                "needs base_url",
            ),
            (
                format!(
                    "{up}[[routes]]\nalias = \"m\"\nteacher = {{ upstream = \"b\", model = \"x\" }}\n"
                ),
                "unknown upstream `b`",
            ),
            (
                format!(
                    "{up}[[routes]]\nalias = \"m\"\nteacher = {{ upstream = \"a\", model = \"x\" }}\nstudents = [{{ upstream = \"a\", model = \"y\", percent = 101.0 }}]\n"
                ),
                "outside",
            ),
            (
                format!("[server]\npassthrough_upstream = \"zz\"\n{up}"),
                "passthrough_upstream",
            ),
            (
                format!("[server]\nlisten = \"nope\"\n{up}"),
                "server.listen",
            ),
            (
                format!("[server]\nsend_timeout_secs = 0\n{up}"),
                "server.send_timeout_secs must be from 1",
            ),
            (
                format!("[server]\nfeedback_wait_secs = 0\n{up}"),
                "server.feedback_wait_secs must be from 1",
            ),
            (
                format!("[server]\nfeedback_wait_secs = 601\n{up}"),
                "server.feedback_wait_secs must be from 1",
            ),
            (
                format!("[server]\nsend_timeout_secs = 9223372036854775807\n{up}"),
                "server.send_timeout_secs must be from 1",
            ),
            (
                format!("[server]\nmax_headers = 0\n{up}"),
                "server.max_headers must be from 1 to 1000",
            ),
            (
                format!("[server]\nmax_headers = 1001\n{up}"),
                "server.max_headers must be from 1 to 1000",
            ),
            (
                format!("[server]\nmax_header_bytes = 1023\n{up}"),
                "server.max_header_bytes must be from 1024",
            ),
            (
                format!("[server]\nmax_header_bytes = 1048577\n{up}"),
                "server.max_header_bytes must be from 1024",
            ),
            (
                format!("[capture]\nretention_days = -1\n{up}"),
                "capture.retention_days must be 0",
            ),
            (
                format!("[capture]\nretention_days = 0.00001\n{up}"),
                "capture.retention_days must be 0",
            ),
            (
                format!("[capture]\nretention_days = 1e300\n{up}"),
                "capture.retention_days must be 0",
            ),
            (
                format!("[capture]\nqueue_mb = 0\n{up}"),
                "capture.queue_mb must be from 1 to 4095",
            ),
            (
                format!("[capture]\nqueue_mb = 4096\n{up}"),
                "capture.queue_mb must be from 1 to 4095",
            ),
            (
                format!("[capture]\ndurable_wait_secs = 0.5\n{up}"),
                "capture.durable_wait_secs must be from 1 to 3600",
            ),
            (
                format!("[capture]\ndurable_wait_secs = 3601\n{up}"),
                "capture.durable_wait_secs must be from 1 to 3600",
            ),
        ];
        for (text, needle) in cases {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "expected `{needle}` in `{err}` for:\n{text}"
            );
        }
    }

    /// Every key set, to its default or near it: the base the sweep below bends key by key.
    const FULL: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_body_bytes = 10485760
body_timeout_secs = 60
send_timeout_secs = 60
feedback_wait_secs = 30
max_headers = 100
max_header_bytes = 65536
max_in_flight = 1024
shutdown_grace_secs = 30
routes_from_config = "if_empty"
passthrough_upstream = "sim"
passthrough_account_apis = false

[[upstreams]]
name = "sim"
sim = true
connect_timeout_ms = 5000
first_byte_timeout_ms = 300000
idle_timeout_ms = 60000

[[upstreams]]
name = "remote"
base_url = "https://api.example.com/v1"
api_key_env = "FORGE_SWEEP_KEY"

[[routes]]
alias = "chat"
teacher = { upstream = "sim", model = "gpt-4o" }
students = [{ upstream = "sim", model = "small", percent = 5.0 }]

[capture]
enabled = true
data_dir = "forge-data"
redact_pii = ["email", "phone", "card", "iban", "ip"]
mode = "async"
queue_capacity = 65536
queue_mb = 256
batch_max = 2048
flush_interval_ms = 50
max_response_bytes = 4194304
max_event_bytes = 1048576
cache_mb = 128
idle_priority = true
retention_days = 30.0
durable_wait_secs = 30.0

[guard]
enabled = true
interval_secs = 60.0
min_requests = 100
steps = [1.0, 5.0, 10.0, 25.0, 50.0, 100.0]
min_success_rate = 0.99
max_p99_ratio = 1.2
latency_slack_ms = 25
max_feedback_drop = 5.0
max_failed_checks = 2
manual = ["other"]

[[distill]]
route = "chat"
student_base_model = "gpt-4o-mini"
provider = "sim"
upstream = "sim"
trigger_threshold = 500
min_examples = 100
schedule = "0 0 2 * * *"
golden_min_score = 90.0
eval_min_score = 80.0
eval_max_prompts = 20
initial_canary_percent = 10.0
validation_percent = 10.0
max_key_share = 0.5
eval_method = "similarity"
suffix = "forge"
tenant = "acme"
hyperparameters = { n_epochs = 3, batch_size = 8, learning_rate_multiplier = 1.0 }

[distiller]
check_every_secs = 60.0
poll_initial_secs = 10.0
poll_max_secs = 60.0
dataset_url = "http://forge-admin:8081"
grading_window_secs = 3600.0
max_training_secs = 259200.0
undeploy_after_secs = 3600.0

[judge]
upstream = "sim"
model = "gpt-4o"
sample_percent = 10.0
max_per_minute = 60
max_per_day = 10000

[[clients]]
id = "app"
tenant = "acme"
key_sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
"#;

    /// Values that would be refused only later, by the provider after the uploads or by tokio
    /// at start, or that would quietly stop the judge, are refused when the config is read;
    /// the limits themselves are accepted.
    #[test]
    fn values_refused_later_or_that_stop_work_are_refused_at_start() {
        let bent = |from: &str, to: &str| {
            assert!(FULL.contains(from), "{from}");
            Config::from_toml(&FULL.replace(from, to))
        };
        for (from, to, needle) in [
            (
                "n_epochs = 3",
                "n_epochs = 0",
                "n_epochs must be from 1 to 50",
            ),
            (
                "n_epochs = 3",
                "n_epochs = 51",
                "n_epochs must be from 1 to 50",
            ),
            (
                "batch_size = 8",
                "batch_size = 0",
                "batch_size must be from 1 to 256",
            ),
            (
                "batch_size = 8",
                "batch_size = 257",
                "batch_size must be from 1 to 256",
            ),
            (
                "learning_rate_multiplier = 1.0",
                "learning_rate_multiplier = 0.0",
                "above 0",
            ),
            (
                "learning_rate_multiplier = 1.0",
                "learning_rate_multiplier = nan",
                "above 0",
            ),
            (
                "learning_rate_multiplier = 1.0",
                "learning_rate_multiplier = inf",
                "above 0",
            ),
            (
                "max_per_minute = 60",
                "max_per_minute = 0",
                "judge.max_per_minute",
            ),
            (
                "max_per_day = 10000",
                "max_per_day = 0",
                "judge.max_per_minute",
            ),
            (
                "max_feedback_drop = 5.0",
                "max_feedback_drop = -1.0",
                "guard.max_feedback_drop",
            ),
            (
                "max_feedback_drop = 5.0",
                "max_feedback_drop = nan",
                "guard.max_feedback_drop",
            ),
            (
                "max_in_flight = 1024",
                "max_in_flight = 1048577",
                "server.max_in_flight must be from 1 to 1048576",
            ),
            (
                "queue_capacity = 65536",
                "queue_capacity = 16777217",
                "capture.queue_capacity must be from 1 to 16777216",
            ),
        ] {
            let err = bent(from, to).unwrap_err().to_string();
            assert!(err.contains(needle), "`{to}`: `{err}`");
        }
        for (from, to) in [
            ("n_epochs = 3", "n_epochs = 50"),
            ("batch_size = 8", "batch_size = 256"),
            (
                "learning_rate_multiplier = 1.0",
                "learning_rate_multiplier = 0.02",
            ),
            ("max_in_flight = 1024", "max_in_flight = 1048576"),
            ("queue_capacity = 65536", "queue_capacity = 16777216"),
        ] {
            bent(from, to).unwrap_or_else(|e| panic!("`{to}`: {e}"));
        }
        // Forge's own LoRA trainer has no upper bounds; it still needs an epoch and a batch.
        let kubernetes = |hyperparameters: &str| {
            let text = FULL
                .replace("provider = \"sim\"", "provider = \"kubernetes\"")
                .replace(
                    "\n[distiller]\n",
                    "\n[distill.kubernetes]\nimage = \"trainer\"\nvllm_url = \"http://vllm:8000\"\n\n[distiller]\n",
                )
                .replace(
                    "n_epochs = 3, batch_size = 8, learning_rate_multiplier = 1.0",
                    hyperparameters,
                );
            Config::from_toml(&text)
        };
        kubernetes("n_epochs = 100, batch_size = 512").unwrap_or_else(|e| panic!("{e}"));
        let err = kubernetes("n_epochs = 0").unwrap_err().to_string();
        assert!(err.contains("n_epochs must be at least 1"), "{err}");
        let err = kubernetes("batch_size = 0").unwrap_err().to_string();
        assert!(err.contains("batch_size must be at least 1"), "{err}");
    }

    /// The plan's F1 for the route config: any value of any key is refused with an error or
    /// accepted, never a panic, and what is accepted can be run (no zero or unrepresentable
    /// interval).
    #[test]
    fn any_value_of_any_key_is_an_error_or_a_config_that_runs() {
        let full = Config::from_toml(FULL).unwrap_or_else(|e| panic!("{e}"));
        assert!(full.guard.is_some() && full.capture.is_some());
        let odd = [
            "0",
            "-1",
            "1",
            "0.5",
            "1e-300",
            "1e300",
            "nan",
            "inf",
            "-inf",
            "9223372036854775807",
            "-9223372036854775808",
            "\"\"",
            "\"x\"",
            "[]",
            "{}",
            "true",
        ];
        let lines: Vec<&str> = FULL.lines().collect();
        let mut panics = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            for value in odd {
                let mut bent = lines.clone();
                let replaced = format!("{key} = {value}");
                bent[i] = &replaced;
                let text = bent.join("\n");
                match std::panic::catch_unwind(|| Config::from_toml(&text)) {
                    Err(_) => panics.push(replaced.clone()),
                    Ok(Ok(config)) => {
                        let intervals = [
                            config.guard.as_ref().map(|g| g.interval),
                            Some(config.distiller.check_every),
                            Some(config.distiller.poll_initial),
                            Some(config.distiller.poll_max),
                        ];
                        for interval in intervals.into_iter().flatten() {
                            assert!(
                                interval >= Duration::from_millis(1)
                                    && interval <= Duration::from_secs(MAX_INTERVAL_SECS as u64),
                                "{replaced}: accepted an interval of {interval:?}"
                            );
                        }
                        if let Some(capture) = &config.capture {
                            assert!(
                                capture.writer.flush_interval <= Duration::from_secs(3600),
                                "{replaced}: flush interval {:?}",
                                capture.writer.flush_interval
                            );
                        }
                    }
                    Ok(Err(_)) => {}
                }
            }
        }
        assert!(panics.is_empty(), "these panicked: {panics:?}");
    }

    /// A `[[distill]]` on the simulated upstream, with `extra` keys.
    fn distill_config(extra: &str) -> String {
        format!(
            "[[upstreams]]\nname = \"sim\"\nsim = true\n\n[[routes]]\nalias = \"gpt-4o\"\nteacher = {{ upstream = \"sim\", model = \"gpt-4o\" }}\n\n[[distill]]\nroute = \"gpt-4o\"\nstudent_base_model = \"gpt-4o-mini\"\nprovider = \"sim\"\nupstream = \"sim\"\n{extra}"
        )
    }

    #[test]
    fn values_that_would_fail_only_after_a_dataset_or_a_run_are_refused_at_load() {
        let refused = |text: String, says: &str| {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(says), "{says:?} not in {err}");
        };
        // The router takes shares in steps of 0.01%; the first use is after training.
        refused(
            distill_config("initial_canary_percent = 12.345\n"),
            "initial_canary_percent",
        );
        assert!(Config::from_toml(&distill_config("initial_canary_percent = 12.34\n")).is_ok());
        // Kubernetes Jobs download their dataset from `dataset_url`.
        let kube = distill_config(
            "[distill.kubernetes]\nimage = \"trainer\"\nvllm_url = \"http://vllm:8000\"\n",
        )
        .replace("provider = \"sim\"", "provider = \"kubernetes\"");
        refused(kube.clone(), "dataset_url");
        refused(
            format!("[distiller]\ndataset_url = \"forge-admin:8081\"\n{kube}"),
            "dataset_url must be an http(s) URL",
        );
        assert!(
            Config::from_toml(&format!(
                "[distiller]\ndataset_url = \"http://forge-admin:8081\"\n{kube}"
            ))
            .is_ok()
        );
        // The gate (on by default) scores only held-out lines: none would leave every model
        // a candidate.
        refused(
            distill_config("validation_percent = 0.0\n"),
            "eval_min_score needs held-out lines",
        );
        assert!(
            Config::from_toml(&distill_config(
                "validation_percent = 0.0\neval_min_score = 0.0\n"
            ))
            .is_ok()
        );
        // A tenant that no client key has: no trace ever carries it.
        refused(distill_config("tenant = \"acme\"\n"), "tenant `acme`");
        let with_client = format!(
            "{}\n[[clients]]\nid = \"app\"\ntenant = \"acme\"\nkey_sha256 = \"{}\"\n",
            distill_config("tenant = \"acme\"\n"),
            "ab".repeat(32)
        );
        assert!(Config::from_toml(&with_client).is_ok());
        // OpenAI's fine-tuning API takes its upstream's key, and nothing else.
        let openai = distill_config("")
            .replace("sim = true", "base_url = \"https://api.openai.com/v1\"")
            .replace("provider = \"sim\"", "provider = \"openai\"");
        refused(openai.clone(), "set api_key_env there");
        assert!(
            Config::from_toml(&openai.replace(
                "base_url = \"https://api.openai.com/v1\"",
                "base_url = \"https://api.openai.com/v1\"\napi_key_env = \"K\""
            ))
            .is_ok()
        );
    }

    #[test]
    fn a_parse_error_names_the_place_not_the_line() {
        let text = "[[upstreams]]\nname = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\napi_key = \"sk-proj-SECRET123\"\n";
        let err = Config::from_toml(text).unwrap_err().to_string();
        assert!(err.contains("line 4, column 1"), "{err}");
        assert!(err.contains("unknown field `api_key`"), "{err}");
        assert!(!err.contains("SECRET"), "the key is in the error: {err}");
    }

    #[test]
    fn defaults_and_trailing_slash() {
        let c = Config::from_toml("[[upstreams]]\nname = \"a\"\nbase_url = \"https://api.example.com/v1/\"\napi_key_env = \"K\"\n").unwrap();
        assert_eq!(
            c.upstreams[0].endpoint,
            Endpoint::Url("https://api.example.com/v1".into())
        );
        assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
        // Both ports listen on loopback unless told otherwise.
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.server.admin_listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(c.server.passthrough_upstream.as_deref(), Some("a"));
        assert_eq!(c.upstreams[0].timeouts.idle, Duration::from_secs(60));
        assert_eq!(c.upstreams[0].api_key_header, KeyHeader::Authorization);
        let azure = "[[upstreams]]\nname = \"a\"\nbase_url = \"https://r.openai.azure.com/openai/v1\"\napi_key_header = ";
        let c = Config::from_toml(&format!("{azure}\"api-key\"\n")).unwrap();
        assert_eq!(c.upstreams[0].api_key_header, KeyHeader::ApiKey);
        assert!(Config::from_toml(&format!("{azure}\"bearer\"\n")).is_err());
        assert_eq!(c.server.send_timeout, Duration::from_secs(60));
        assert_eq!(c.server.feedback_wait, Duration::from_secs(30));
        assert_eq!(
            (c.server.max_headers, c.server.max_header_bytes),
            (100, 65536)
        );
        assert_eq!(c.capture.as_ref().unwrap().retention, None, "kept forever");
        assert_eq!(
            c.distiller.max_training,
            Some(Duration::from_secs(72 * 3600))
        );
        assert_eq!(
            c.capture.as_ref().unwrap().writer.queue_bytes,
            256 * 1024 * 1024
        );
        assert_eq!(c.distiller.undeploy_after, Some(Duration::from_secs(3600)));
        let no_limit = Config::from_toml("[distiller]\nmax_training_secs = 0\nundeploy_after_secs = 0\n[[upstreams]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n").unwrap();
        assert_eq!(no_limit.distiller.max_training, None);
        assert_eq!(no_limit.distiller.undeploy_after, None);
        let c = Config::from_toml("[capture]\nretention_days = 1.5\n[[upstreams]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n").unwrap();
        assert_eq!(
            c.capture.unwrap().retention,
            Some(Duration::from_secs(36 * 3600))
        );
    }
}
