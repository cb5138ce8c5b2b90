//! Starting and stopping the gateway: upstreams, routing table, the proxy listener, graceful drain.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_io_timeout::TimeoutWriter;

use forge_layer::capture::CaptureLayer;
use forge_layer::store::{
    CaptureCounters, CommitTimesSnapshot, CounterSnapshot, Store, TraceWriter, WriterTask,
    run_expiry,
};
use tower::Layer;

use crate::admin::{self, AdminState};
use crate::auth::ClientKeys;
use crate::config::{Config, Endpoint, PARSED_HEAD_BYTES, PARSED_HEADERS, RoutesFromConfig};
use crate::distill::{RouteDeployer, UpstreamChat};
use crate::extract::BodyLimits;
use crate::head_limit::{HeadLimit, HeadLimits};
use crate::metrics::Metrics;
use crate::proxy::exchange::{Sink, UpstreamCall};
use crate::proxy::{self, ProxyState};
use crate::routes::{RouteControl, RouteUpdateError};
use crate::sim::{SimConfig, SimHandle, SimUpstream};
use crate::upstream::{Upstream, Upstreams};
use forge_layer::dataset::DatasetSpec;
use forge_layer::distill::providers::{OpenAiConfig, ProviderConfig, SecretString};
use forge_layer::distill::{
    ChatClient, DistillSettings, DistillationService, JudgeModel, RouteDistill, judge,
};
use forge_layer::guard::EventKind;
use forge_layer::guard::Guard;
use forge_layer::store::RouteChange;
use std::collections::HashMap;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// An upstream's key variable is unset, or its client could not be built.
    #[error("{0}")]
    Upstream(String),
    /// The routes do not validate.
    #[error("invalid routes: {0}")]
    Routes(#[from] forge_router::RouteError),
    /// The stored routing table does not fit the config.
    #[error("{0}")]
    StoredRoutes(String),
    /// The trace store could not be opened.
    #[error("capture store: {0}")]
    Store(#[from] forge_layer::store::StoreError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How long a client has to send its request headers; stops slowloris connections.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A running gateway. Dropping it does not stop it; call [`RunningGateway::shutdown`].
#[derive(Debug)]
pub struct RunningGateway {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    router: forge_router::Router,
    control: RouteControl,
    guard: Option<Arc<Guard>>,
    distiller: Option<Arc<DistillationService>>,
    store: Option<Store>,
    counters: Option<Arc<CaptureCounters>>,
    stop: watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    writer: Option<WriterTask>,
    sims: Vec<SimHandle>,
}

impl RunningGateway {
    /// The proxy's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/v1`, what apps use as their `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The admin API's address, if it started (it needs `FORGE_ADMIN_TOKEN`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The live routing table.
    pub fn router(&self) -> &forge_router::Router {
        &self.router
    }

    /// The routing control (the admin API's way to change routes).
    pub fn control(&self) -> &RouteControl {
        &self.control
    }

    /// The canary guard, when it is on.
    pub fn guard(&self) -> Option<&Arc<Guard>> {
        self.guard.as_ref()
    }

    /// The distillation service, when routes are configured for it.
    pub fn distiller(&self) -> Option<&Arc<DistillationService>> {
        self.distiller.as_ref()
    }

    /// The trace store, when capture is on.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// The capture counters now, when capture is on.
    pub fn capture_counters(&self) -> Option<CounterSnapshot> {
        self.counters.as_ref().map(|c| c.snapshot())
    }

    /// How long the trace commits so far took, when capture is on.
    pub fn commit_times(&self) -> Option<CommitTimesSnapshot> {
        self.counters.as_ref().map(|c| c.commit_times())
    }

    /// The simulated upstreams started for `sim = true` upstreams.
    pub fn sims(&self) -> &[SimHandle] {
        &self.sims
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, writes every
    /// queued trace, then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for server in self.servers {
            let _ = server.await;
        }
        // The servers held the last writer handles; with them gone the writer drains and stops.
        if let Some(writer) = self.writer {
            writer.join().await;
        }
        if let Some(counters) = &self.counters {
            tracing::info!(counters = ?counters.snapshot(), "capture flushed");
        }
        for sim in self.sims {
            sim.shutdown().await;
        }
    }
}

/// Starts the gateway described by `config`.
pub async fn start(config: Config) -> Result<RunningGateway, StartError> {
    // Installing twice (several gateways in one test process) is harmless; the first one wins.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let mut upstreams = Upstreams::default();
    // Where each upstream ended up and its key: the distiller's OpenAI-style providers use them.
    let mut resolved: HashMap<String, (String, Option<String>)> = HashMap::new();
    let mut sims = Vec::new();
    for up in &config.upstreams {
        let base_url = match &up.endpoint {
            Endpoint::Url(url) => url.clone(),
            Endpoint::Sim => {
                let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
                let sim = SimUpstream::start(SimConfig::default(), loopback)
                    .await
                    .map_err(|source| StartError::Bind {
                        addr: loopback,
                        source,
                    })?;
                tracing::info!(upstream = %up.name, addr = %sim.addr(), "simulated upstream started");
                let url = sim.base_url();
                sims.push(sim);
                url
            }
        };
        let key = match &up.api_key_env {
            // An empty key would start a gateway whose every request the upstream refuses.
            Some(var) => Some(
                crate::env::secret(var)
                    .ok_or_else(|| {
                        StartError::Upstream(format!(
                            "upstream `{}`: environment variable {var} (api_key_env) is not set or is empty",
                            up.name
                        ))
                    })?,
            ),
            None => None,
        };
        let upstream = Upstream::new(
            &up.name,
            &base_url,
            key.as_deref(),
            up.api_key_header,
            up.timeouts,
        )
        .map_err(|e| StartError::Upstream(e.to_string()))?;
        upstreams.insert(upstream);
        resolved.insert(up.name.clone(), (base_url, key));
    }
    let passthrough = config
        .server
        .passthrough_upstream
        .as_deref()
        .and_then(|name| upstreams.get(name).cloned());

    let mut metrics = Metrics::default();
    let (store, writer, writer_task, counters) = match &config.capture {
        Some(capture) => {
            let opening = std::time::Instant::now();
            let store = Store::open_dir_with_cache(&capture.data_dir, capture.cache_bytes)?;
            let (writer, task) = TraceWriter::start(store.clone(), capture.writer.clone());
            let counters = writer.counters_handle();
            metrics.register_capture(Arc::clone(&counters), Arc::clone(store.unsettled()));
            tracing::info!(path = %store.path().display(), mode = ?capture.writer.mode, open_ms = opening.elapsed().as_millis(), "capture on");
            (Some(store), Some(writer), Some(task), Some(counters))
        }
        None => {
            tracing::info!("capture off");
            (None, None, None, None)
        }
    };
    let router = load_routes(
        &config,
        store.as_ref(),
        upstreams.names().map(str::to_string).collect(),
    )?;
    let guard = config.guard.clone().map(|g| Arc::new(Guard::new(g)));
    let control = RouteControl::new(router.clone(), store.clone(), guard.clone());
    // Route changes and guard modes are kept in the capture store.
    if store.is_none() && guard.is_some() {
        tracing::warn!(
            "capture is off: the guard's rollbacks and promotions, and route changes made through the admin API, last until the next restart, which starts from the config"
        );
    } else if store.is_none() && config.server.admin_token.is_some() {
        tracing::warn!(
            "capture is off: route changes and guard modes made through the admin API last until the next restart, which starts from the config"
        );
    }
    if let Some(guard) = &guard {
        control
            .restore_guard_modes(guard)
            .map_err(|e| StartError::StoredRoutes(format!("stored guard modes: {e}")))?;
    }

    let (stop, stopped) = watch::channel(false);
    let mut servers = Vec::new();
    let retention = config.capture.as_ref().and_then(|c| c.retention);
    if let (Some(store), Some(max_age)) = (&store, retention) {
        let expired = metrics.register_expired();
        servers.push(tokio::spawn(run_expiry(
            store.clone(),
            max_age,
            move |n| {
                expired.inc_by(n);
            },
            stopped.clone(),
        )));
    }
    let distiller = match (&store, config.distill.is_empty()) {
        (Some(store), false) => {
            let service = start_distiller(&config, store, &resolved, &upstreams, &control)?;
            servers.push(tokio::spawn(Arc::clone(&service).run(stopped.clone())));
            Some(service)
        }
        _ => None,
    };
    // The judge grades captured traces whether or not a route is distilled here: datasets built
    // by hand (`forge dataset export`) use its scores too.
    match (&store, &config.judge) {
        (Some(store), Some(judge)) => {
            let settings = judge::JudgeSettings {
                model: JudgeModel {
                    upstream: judge.upstream.clone(),
                    model: judge.model.clone(),
                },
                sample_percent: judge.sample_percent,
                max_per_minute: judge.max_per_minute,
                max_per_day: judge.max_per_day,
                every: config.distiller.check_every.min(Duration::from_secs(5)),
            };
            let chat: Arc<dyn ChatClient> = Arc::new(UpstreamChat::new(upstreams.clone()));
            servers.push(tokio::spawn(judge::run(
                store.clone(),
                chat,
                settings,
                stopped.clone(),
            )));
        }
        (None, Some(_)) => {
            tracing::warn!("[judge] is configured but capture is off: there is nothing to judge")
        }
        _ => {}
    }

    let max_response_bytes = config
        .capture
        .as_ref()
        .map_or(1 << 20, |c| c.max_response_bytes);
    let send_timeouts = metrics.register_send_timeouts();
    let sink = Sink::new(writer, guard.clone());
    let state = ProxyState {
        router: router.clone(),
        upstreams,
        passthrough,
        passthrough_account_apis: config.server.passthrough_account_apis,
        body: BodyLimits {
            max_bytes: config.server.max_body_bytes,
            timeout: config.server.body_timeout,
        },
        feedback_wait: config.server.feedback_wait,
        metrics: Arc::new(metrics),
        exchange: CaptureLayer::new(sink, max_response_bytes).layer(UpstreamCall),
        capture_enabled: store.is_some(),
        store: store.clone(),
        redactor: config
            .capture
            .as_ref()
            .map(|c| c.writer.redactor.clone())
            .unwrap_or_default(),
        keys: ClientKeys::new(&config.clients),
        guard: guard.clone(),
    };
    let app = proxy::app(state, config.server.max_in_flight);

    let limits = ConnLimits {
        grace: config.server.shutdown_grace,
        send_timeout: config.server.send_timeout,
        send_timeouts,
        head: HeadLimits {
            max_headers: config.server.max_headers,
            max_header_bytes: config.server.max_header_bytes,
        },
    };
    let (listener, addr) = bind(config.server.listen).await?;
    servers.push(tokio::spawn(serve(
        listener,
        app,
        stopped.clone(),
        limits.clone(),
    )));
    if let Some(guard) = &guard {
        servers.push(tokio::spawn(run_guard(
            Arc::clone(guard),
            control.clone(),
            distiller.clone(),
            stopped.clone(),
        )));
    }

    let admin_addr = match &config.server.admin_token {
        Some(token) => {
            let admin = admin::app(
                AdminState {
                    control: control.clone(),
                    store: store.clone(),
                    counters: counters.clone(),
                    guard: guard.clone(),
                    distiller: distiller.clone(),
                    body: BodyLimits {
                        max_bytes: admin::MAX_BODY_BYTES,
                        timeout: config.server.body_timeout,
                    },
                },
                token.clone(),
            );
            let (listener, admin_addr) = bind(config.server.admin_listen).await?;
            servers.push(tokio::spawn(serve(listener, admin, stopped, limits)));
            tracing::info!(addr = %admin_addr, "admin API listening");
            Some(admin_addr)
        }
        None => {
            tracing::info!("admin API off: set FORGE_ADMIN_TOKEN to enable it");
            None
        }
    };
    tracing::info!(%addr, routes = router.load().routes().count(), version = router.load().version(), "forge is listening");
    Ok(RunningGateway {
        addr,
        admin_addr,
        router,
        control,
        guard,
        distiller,
        store,
        counters,
        stop,
        servers,
        writer: writer_task,
        sims,
    })
}

/// The routing table to start with: the stored one, unless there is none or the config says
/// its `[[routes]]` always win. A table taken from config is written to the store as a change.
fn load_routes(
    config: &Config,
    store: Option<&Store>,
    upstreams: Vec<String>,
) -> Result<forge_router::Router, StartError> {
    let saved = match store {
        Some(store) => store.load_routes()?,
        None => None,
    };
    if let Some(saved) = &saved
        && config.server.routes_from_config == RoutesFromConfig::IfEmpty
    {
        let routes = saved
            .routes
            .iter()
            .map(forge_router::RouteSpec::to_route)
            .collect::<Result<Vec<_>, _>>()?;
        let router = forge_router::Router::with_version(routes, upstreams, saved.version).map_err(|e| {
            StartError::StoredRoutes(format!(
                "{e}; the stored routing table (version {}) no longer fits this config. Set server.routes_from_config = \"always\" to replace it with the config's routes",
                saved.version
            ))
        })?;
        tracing::info!(
            version = saved.version,
            "routing table restored from the store"
        );
        return Ok(router);
    }
    let version = saved.as_ref().map_or(1, |s| s.version + 1);
    let router = forge_router::Router::with_version(config.routes.clone(), upstreams, version)?;
    if let Some(store) = store {
        let table = router.load();
        store.save_routes(&RouteChange {
            version,
            time_ms: forge_layer::trace::now_ms(),
            actor: "config".into(),
            action: "routes from the config file".into(),
            alias: None,
            routes: table.routes().map(forge_router::RouteSpec::from).collect(),
        })?;
    }
    Ok(router)
}

/// Builds the distillation service: one provider per `[[distill]]` route.
fn start_distiller(
    config: &Config,
    store: &Store,
    resolved: &HashMap<String, (String, Option<String>)>,
    upstreams: &Upstreams,
    control: &RouteControl,
) -> Result<Arc<DistillationService>, StartError> {
    let mut routes = Vec::new();
    for d in &config.distill {
        // The dataset URL is served by the admin API, which needs its token to start.
        if d.provider == "kubernetes" && config.server.admin_token.is_none() {
            return Err(StartError::Upstream(format!(
                "distill `{}`: provider kubernetes needs {}: the training Job downloads its dataset from the admin API, which starts only with a token",
                d.route,
                crate::env::ENV_FORGE_ADMIN_TOKEN
            )));
        }
        let provider_config: ProviderConfig = match d.provider.as_str() {
            "openai" | "sim" => {
                let (base_url, key) = resolved.get(&d.upstream).cloned().unwrap_or_default();
                let settings = OpenAiConfig {
                    base_url: Some(base_url),
                    api_key: key.map(SecretString::new),
                    upstream: Some(d.upstream.clone()),
                    ..OpenAiConfig::default()
                };
                if d.provider == "sim" {
                    ProviderConfig::Sim(settings)
                } else {
                    ProviderConfig::OpenAi(settings)
                }
            }
            other => {
                let mut table =
                    serde_json::to_value(d.provider_settings.clone().unwrap_or_default())
                        .map_err(|e| StartError::Upstream(format!("distill `{}`: {e}", d.route)))?;
                table["provider"] = serde_json::Value::String(other.to_string());
                serde_json::from_value(table).map_err(|e| {
                    StartError::Upstream(format!("distill `{}` [distill.{other}]: {e}", d.route))
                })?
            }
        };
        let provider = provider_config
            .build()
            .map_err(|e| StartError::Upstream(format!("distill `{}`: {e}", d.route)))?;
        if let Some(serving) = provider.serving_upstream()
            && upstreams.get(serving).is_none()
        {
            return Err(StartError::Upstream(format!(
                "distill `{}`: trained models would be served through upstream `{serving}`, which no [[upstreams]] entry defines",
                d.route
            )));
        }
        let mut dataset = DatasetSpec::new(d.route.clone());
        dataset.tenant = d.tenant.clone();
        dataset.policy = forge_layer::distill::policy(d.golden_min_score);
        dataset.validation_percent = d.validation_percent;
        dataset.max_key_share = d.max_key_share;
        routes.push(RouteDistill {
            route: d.route.clone(),
            base_model: d.base_model.clone(),
            provider: Arc::from(provider),
            trigger_threshold: d.trigger_threshold,
            min_examples: d.min_examples,
            schedule: d.schedule.clone(),
            suffix: d.suffix.clone(),
            hyperparameters: d.hyperparameters.clone(),
            initial_canary_percent: d.initial_canary_percent,
            eval_min_score: d.eval_min_score,
            eval_method: d.eval_method.clone(),
            eval_max_prompts: d.eval_max_prompts,
            dataset,
        });
    }
    let data_dir = config
        .capture
        .as_ref()
        .map(|c| c.data_dir.clone())
        .unwrap_or_default();
    let settings = DistillSettings {
        data_dir,
        check_every: config.distiller.check_every,
        poll_initial: config.distiller.poll_initial,
        poll_max: config.distiller.poll_max,
        grading_window: config.distiller.grading_window,
        max_training: config.distiller.max_training,
        undeploy_after: config.distiller.undeploy_after,
        dataset_url: match (&config.distiller.dataset_url, &config.server.admin_token) {
            (Some(url), Some(token)) => Some((url.clone(), token.expose().to_string())),
            _ => None,
        },
        judge: config.judge.as_ref().map(|j| JudgeModel {
            upstream: j.upstream.clone(),
            model: j.model.clone(),
        }),
    };
    Ok(DistillationService::new(
        store.clone(),
        settings,
        routes,
        Arc::new(RouteDeployer::new(control.clone())),
        Arc::new(UpstreamChat::new(upstreams.clone())),
    ))
}

/// Runs the guard's checks until shutdown, applying each decision through the route control
/// and recording it in the model registry.
async fn run_guard(
    guard: Arc<Guard>,
    control: RouteControl,
    registry: Option<Arc<DistillationService>>,
    mut stop: watch::Receiver<bool>,
) {
    // Check a few times per interval so a step is judged soon after it is due.
    let every =
        (guard.config().interval / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let table = control.router().load();
        for action in guard.check(&table, forge_layer::trace::now_ms()) {
            let kind = format!("{:?}", action.kind).to_lowercase();
            match control.apply_guard_decision(&action).await {
                Ok(_) => {}
                // Someone changed the share (or set manual mode, or removed the student) since
                // the guard judged it.
                Err(RouteUpdateError::Conflict(why) | RouteUpdateError::UnknownStudent(why)) => {
                    tracing::info!(alias = %action.alias, model = %action.model, decision = %kind, %why, "guard decision dropped: the route changed meanwhile");
                    continue;
                }
                Err(e) => {
                    tracing::error!(alias = %action.alias, model = %action.model, error = %e, decision = %kind, "guard decision could not be applied");
                    if action.kind == EventKind::RolledBack {
                        guard.rollback_not_applied(&action.alias, &action.model);
                    }
                    continue;
                }
            }
            if let Some(registry) = &registry
                && matches!(action.kind, EventKind::Promoted | EventKind::RolledBack)
            {
                let shares = vec![(action.model.clone(), action.share)];
                registry
                    .record_shares(&action.alias, shares, format!("guard: {kind}"))
                    .await;
            }
        }
    }
}

/// The client connection, with its writes timed.
///
/// A client that stops reading stalls the writes, and with them its exchange (the upstream
/// call, the capture, the in-flight slot) for good. So a write that waits longer than
/// `send_timeout` fails, and hyper closes the connection, as nginx's `send_timeout` does. Only a
/// waiting write is timed (an idle keep-alive connection is not), and the clock restarts when a
/// write goes through. On Linux, `TCP_NOTSENT_LOWAT` keeps at most 128 KiB of not-yet-sent bytes
/// in the socket, so a write goes through as soon as the client has taken some 64 KiB. Without
/// it, the kernel reports the socket writable only once half of a send buffer that can grow to
/// megabytes has drained, and a client reading steadily but slowly would be cut.
fn with_send_timeout(
    stream: TcpStream,
    send_timeout: Duration,
) -> Pin<Box<TimeoutWriter<TcpStream>>> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
    }
    let mut stream = TimeoutWriter::new(stream);
    stream.set_timeout(Some(send_timeout));
    Box::pin(stream)
}

/// Not-yet-sent bytes a client socket may hold; see [`with_send_timeout`].
#[cfg(any(target_os = "linux", target_os = "android"))]
const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Whether a connection ended because a write waited past the send timeout: a `TimedOut`
/// error made by the timer, not one from the OS (a TCP retransmission timeout carries its
/// error code).
fn timed_out(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            io.kind() == std::io::ErrorKind::TimedOut && io.raw_os_error().is_none()
        }) {
            return true;
        }
        source = e.source();
    }
    false
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// What bounds a client connection's life.
#[derive(Debug, Clone)]
struct ConnLimits {
    /// How long connections may finish their responses after a stop is asked for.
    grace: Duration,
    /// How long a write may wait for the client to take bytes.
    send_timeout: Duration,
    /// Counts the connections closed for it.
    send_timeouts: Counter,
    /// What a request's headers may hold.
    head: HeadLimits,
}

/// The accept loop. Each connection is tracked both by the graceful watcher (to ask it to close
/// after its current response) and by a `JoinSet` (to cut it when the grace period runs out).
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
    limits: ConnLimits,
) {
    let ConnLimits {
        grace,
        send_timeout,
        send_timeouts,
        head,
    } = limits;
    let app = HeadLimit::new(app, head);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Far above the configured limits, so that `HeadLimit` refuses with a JSON body.
        .max_headers(PARSED_HEADERS)
        .max_buf_size(PARSED_HEAD_BYTES);

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Usually EMFILE: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(app.clone());
                let stream = with_send_timeout(stream, send_timeout);
                let conn = http.serve_connection(TokioIo::new(stream), service);
                let watched = graceful.watch(conn);
                let send_timeouts = send_timeouts.clone();
                connections.spawn(async move {
                    if let Err(e) = watched.await {
                        if timed_out(&e) {
                            send_timeouts.inc();
                            tracing::info!(secs = send_timeout.as_secs(), "client took no response bytes within send_timeout_secs: connection closed");
                        } else {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    tracing::info!(
        open = connections.len(),
        grace_secs = grace.as_secs(),
        "shutting down: draining connections"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(cut = connections.len(), "grace period over: cutting the remaining connections");
        }
    }
    connections.shutdown().await;
}
