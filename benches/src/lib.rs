//! Bench support: an HTTP load generator, and the criterion benches' fixtures and timings.
//!
//! Each worker owns one keep-alive HTTP/1.1 connection and sends chat completions, either
//! back-to-back (closed loop: exactly `concurrency` requests in flight, the target saturated) or
//! on a schedule at a fixed total rate (open loop; see [`Load`]). [`run`] loads one target
//! and returns its [`Stats`]; [`Stats::pooled`] joins several runs of one target, and
//! [`Comparison`] sets a candidate (say, Forge with capture on) beside a baseline (direct, or
//! Forge with capture off). [`fixtures`] and [`recorder`] serve the criterion benches.

pub mod burner;
pub mod fixtures;
pub mod recorder;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, InvalidHeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Seconds measured per target and cell, split over the bench's rounds; fractions allowed.
pub const ENV_FORGE_BENCH_SECS: &str = "FORGE_BENCH_SECS";

const CHAT_PATH: &str = "/v1/chat/completions";

/// Bounds every request, so a stuck server costs one error, not a hung bench.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed connect, so a dead target does not turn the worker into a busy loop.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(10);

/// The end of an OpenAI stream. A stream without it was cut short, even with a 200.
const STREAM_END: &[u8] = b"data: [DONE]";

/// Whether the client asks for the whole answer at once or as an SSE stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `"stream": false`: one JSON body.
    NonStream,
    /// `"stream": true`: SSE chunks ending in `data: [DONE]`.
    Stream,
}

impl Mode {
    /// Both modes, in the order the bench runs them.
    pub const ALL: [Mode; 2] = [Mode::NonStream, Mode::Stream];

    /// A short name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Mode::NonStream => "non-stream",
            Mode::Stream => "stream",
        }
    }

    fn is_stream(self) -> bool {
        self == Mode::Stream
    }
}

/// One bench cell: what is asked, and how many connections ask it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    /// Stream or not.
    pub mode: Mode,
    /// Connections, each with one request in flight.
    pub concurrency: usize,
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} c={}", self.mode.label(), self.concurrency)
    }
}

/// A server under load, and the model name it knows the bench model by.
#[derive(Debug, Clone)]
pub struct Target {
    /// What the reports call it.
    pub name: &'static str,
    addr: SocketAddr,
    host: HeaderValue,
    model: String,
}

impl Target {
    /// A server listening on `addr` that serves chat completions for `model`.
    pub fn new(
        name: &'static str,
        addr: SocketAddr,
        model: &str,
    ) -> Result<Self, InvalidHeaderValue> {
        Ok(Self {
            name,
            addr,
            host: HeaderValue::try_from(addr.to_string())?,
            model: model.to_string(),
        })
    }

    fn chat_body(&self, mode: Mode) -> Bytes {
        Bytes::from(format!(
            r#"{{"model":"{}","messages":[{{"role":"user","content":"Tell me about load testing."}}],"stream":{}}}"#,
            self.model,
            mode.is_stream()
        ))
    }

    fn request(&self, body: &Bytes) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static(CHAT_PATH);
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        request
    }
}

/// How long one run lasts. Only requests that finish inside the measured window count.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Load applied but not measured: connects, pools and caches settle here.
    pub warmup: Duration,
    /// The measured window.
    pub measure: Duration,
}

/// Why one request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The TCP connect failed.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The HTTP exchange failed (the connection broke, or the response was malformed).
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The server answered with a non-2xx status.
    #[error("status {0}")]
    Status(StatusCode),
    /// A 2xx response with no body.
    #[error("empty body")]
    EmptyBody,
    /// A stream that ended without `data: [DONE]`.
    #[error("stream ended without `data: [DONE]`")]
    UnfinishedStream,
    /// No complete response in time.
    #[error("no complete response within {REQUEST_TIMEOUT:?}")]
    Timeout,
    /// A worker task panicked.
    #[error("load worker failed: {0}")]
    Worker(String),
}

/// One successful request.
#[derive(Debug, Clone, Copy)]
struct Sample {
    finished: Instant,
    /// From sending the request (or releasing it, when paced) to the last body byte.
    latency: Duration,
    /// From the same start to the first body byte.
    first_byte: Duration,
}

/// Sorted durations, for nearest-rank percentiles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Distribution(Vec<Duration>);

impl Distribution {
    /// Sorts `samples`.
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self(samples)
    }

    /// All the samples of several distributions in one.
    pub fn pooled<'a>(parts: impl IntoIterator<Item = &'a Distribution>) -> Self {
        Self::new(
            parts
                .into_iter()
                .flat_map(|d| d.0.iter().copied())
                .collect(),
        )
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True with no samples.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The nearest-rank percentile: the smallest sample with at least `pct`% of samples at or
    /// below it. Always an observed value, never interpolated. `None` with no samples.
    pub fn percentile(&self, pct: usize) -> Option<Duration> {
        let rank = (self.0.len() * pct.min(100)).div_ceil(100).max(1);
        self.0.get(rank - 1).copied()
    }

    /// The median.
    pub fn p50(&self) -> Option<Duration> {
        self.percentile(50)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Option<Duration> {
        self.percentile(99)
    }
}

/// What one run of one target measured.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Send to last body byte, for requests that finished in the window.
    pub latency: Distribution,
    /// Send to first body byte, for the same requests.
    pub first_byte: Distribution,
    /// Failed requests, in warm-up and window alike: any error makes the run suspect.
    pub errors: u64,
    /// The first error seen, to say what went wrong.
    pub first_error: Option<String>,
    /// TCP connections opened. More than the concurrency means keep-alive broke somewhere.
    pub connections: u64,
    /// The measured window.
    pub window: Duration,
    /// Every successful request, warm-up and stragglers after the window included: what the
    /// server completed, for checking its own count (say, of captured traces) against.
    pub requests: u64,
    /// CPU time the whole process (load generator, upstream, gateway and its writer threads)
    /// used during the window. Unlike latency, it hardly moves with what else the machine
    /// runs, so per request it shows what a change costs where the latencies are noise.
    pub cpu: Duration,
}

impl Stats {
    /// Several runs of one target and cell as one: samples, errors, connections and windows
    /// added up, so throughput is over the total window.
    pub fn pooled(runs: &[Stats]) -> Stats {
        Stats {
            latency: Distribution::pooled(runs.iter().map(|s| &s.latency)),
            first_byte: Distribution::pooled(runs.iter().map(|s| &s.first_byte)),
            errors: runs.iter().map(|s| s.errors).sum(),
            first_error: runs.iter().find_map(|s| s.first_error.clone()),
            connections: runs.iter().map(|s| s.connections).sum(),
            window: runs.iter().map(|s| s.window).sum(),
            requests: runs.iter().map(|s| s.requests).sum(),
            cpu: runs.iter().map(|s| s.cpu).sum(),
        }
    }

    /// The process's CPU time per request completed in the window, in microseconds.
    pub fn cpu_per_request_us(&self) -> Option<f64> {
        let n = self.latency.len();
        (n > 0).then(|| self.cpu.as_secs_f64() * 1e6 / n as f64)
    }

    /// Completed requests per second over the window.
    pub fn throughput(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.latency.len() as f64 / secs
        } else {
            0.0
        }
    }
}

/// What one worker saw, before the workers are merged into [`Stats`].
#[derive(Debug, Default)]
struct Tally {
    samples: Vec<Sample>,
    errors: u64,
    first_error: Option<String>,
    connections: u64,
}

impl Tally {
    fn error(&mut self, error: &RequestError) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| error.to_string());
    }

    fn merge(&mut self, other: Tally) {
        self.samples.extend(other.samples);
        self.errors += other.errors;
        self.connections += other.connections;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn into_stats(self, window_start: Instant, window: Duration) -> Stats {
        let window_end = window_start + window;
        let requests = self.samples.len() as u64;
        let measured: Vec<Sample> = self
            .samples
            .into_iter()
            .filter(|s| s.finished >= window_start && s.finished <= window_end)
            .collect();
        Stats {
            latency: Distribution::new(measured.iter().map(|s| s.latency).collect()),
            first_byte: Distribution::new(measured.iter().map(|s| s.first_byte).collect()),
            errors: self.errors,
            first_error: self.first_error,
            connections: self.connections,
            window,
            requests,
            cpu: Duration::ZERO,
        }
    }
}

/// The CPU time this process has used so far, over all its threads.
pub fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// How the load is offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Each connection sends its next request as soon as the last one ends: the target is
    /// driven as fast as it answers, so it runs saturated and latency is mostly queueing.
    Closed,
    /// A fixed total rate, in requests per second, whatever the target's speed (open loop), as
    /// a production proxy meets its traffic. See [`Pacer`].
    Rate(f64),
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Load::Closed => f.write_str("closed loop"),
            Load::Rate(rate) => write!(f, "{rate:.0} req/s offered"),
        }
    }
}

/// The shortest pause between two of the pacer's wake-ups, which bounds its own CPU.
const PACER_TICK: Duration = Duration::from_micros(100);

/// Releases requests at a fixed rate, evenly spaced, from a thread of its own: tokio's timer
/// has millisecond ticks, and would send a whole millisecond's requests at once, which loads
/// the target in bursts, as closed loop does. Each released request is taken by the first
/// free connection, and its latency runs from its release: a target that falls behind is
/// charged for the wait (no coordinated omission), and a late wake-up of the pacer is charged
/// to no one.
struct Pacer {
    released: Arc<Released>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Release times not yet taken, and a permit for each.
struct Released {
    times: std::sync::Mutex<std::collections::VecDeque<Instant>>,
    permits: tokio::sync::Semaphore,
}

impl Released {
    fn new() -> Self {
        Self {
            times: std::sync::Mutex::default(),
            permits: tokio::sync::Semaphore::new(0),
        }
    }

    /// The next released request's release time; `None` once the pacer has stopped.
    async fn take(&self) -> Option<Instant> {
        self.permits.acquire().await.ok()?.forget();
        self.times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front()
    }
}

impl Pacer {
    /// Releases `rate` requests per second from now until `stop`.
    fn start(rate: f64, stop: Instant) -> std::io::Result<Self> {
        let released = Arc::new(Released::new());
        let every = Duration::from_secs_f64(1.0 / rate);
        let shared = Arc::clone(&released);
        let thread = std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                let mut due = Instant::now();
                loop {
                    let now = Instant::now();
                    let mut count = 0;
                    while due <= now {
                        count += 1;
                        due += every;
                    }
                    if count > 0 {
                        let at = Instant::now();
                        shared
                            .times
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .extend(std::iter::repeat_n(at, count));
                        shared.permits.add_permits(count);
                    }
                    // Dropping the pacer closes the permits: stop early too.
                    if Instant::now() >= stop || shared.permits.is_closed() {
                        break;
                    }
                    std::thread::sleep(due.saturating_duration_since(now).max(PACER_TICK));
                }
                // Wakes every connection still waiting, to stop.
                shared.permits.close();
            })?;
        Ok(Self {
            released,
            thread: Some(thread),
        })
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.released.permits.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Loads `target` with `concurrency` connections for the warm-up plus the window.
pub async fn run(target: &Target, cell: Cell, timing: Timing, load: Load) -> Stats {
    let window_start = Instant::now() + timing.warmup;
    let stop = window_start + timing.measure;
    let body = target.chat_body(cell.mode);
    let pacer = match load {
        Load::Closed => None,
        Load::Rate(rate) => match Pacer::start(rate, stop) {
            Ok(pacer) => Some(pacer),
            Err(e) => {
                let mut tally = Tally::default();
                tally.error(&RequestError::Worker(format!("pacer thread: {e}")));
                return tally.into_stats(window_start, timing.measure);
            }
        },
    };
    // The CPU the process uses from the window's start to its end.
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(window_start).await;
        let from = process_cpu();
        tokio::time::sleep_until(stop).await;
        process_cpu().saturating_sub(from)
    });
    let mut workers = JoinSet::new();
    for _ in 0..cell.concurrency {
        let released = pacer.as_ref().map(|p| Arc::clone(&p.released));
        workers.spawn(worker(
            target.clone(),
            body.clone(),
            cell.mode,
            stop,
            released,
        ));
    }
    let mut tally = Tally::default();
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(worker) => tally.merge(worker),
            Err(e) => tally.error(&RequestError::Worker(e.to_string())),
        }
    }
    drop(pacer);
    let mut stats = tally.into_stats(window_start, timing.measure);
    // The task only sleeps and reads a clock; it cannot fail short of a panic.
    stats.cpu = cpu.await.unwrap_or_default();
    stats
}

/// Sends requests over one connection until `stop`: back-to-back, or as the pacer releases
/// them; reconnects after any error.
async fn worker(
    target: Target,
    body: Bytes,
    mode: Mode,
    stop: Instant,
    released: Option<Arc<Released>>,
) -> Tally {
    let mut tally = Tally::default();
    let mut connection: Option<Connection> = None;
    while Instant::now() < stop {
        let since = match &released {
            None => None,
            Some(released) => match released.take().await {
                Some(at) => Some(at),
                None => break,
            },
        };
        let open = match &mut connection {
            Some(open) => open,
            None => match Connection::open(target.addr).await {
                Ok(fresh) => {
                    tally.connections += 1;
                    connection.insert(fresh)
                }
                Err(e) => {
                    tally.error(&e);
                    tokio::time::sleep(RECONNECT_BACKOFF).await;
                    continue;
                }
            },
        };
        let exchange = open.exchange(target.request(&body), mode, since);
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(sample)) => tally.samples.push(sample),
            Ok(Err(e)) => {
                tally.error(&e);
                connection = None;
            }
            Err(_elapsed) => {
                tally.error(&RequestError::Timeout);
                connection = None;
            }
        }
    }
    tally
}

/// One keep-alive HTTP/1.1 client connection. Dropping it aborts its driver task.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    _driver: JoinSet<()>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Self, RequestError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(RequestError::Connect)?;
        // Without it, Nagle holds back small request writes and adds delay unrelated to Forge.
        stream.set_nodelay(true).map_err(RequestError::Connect)?;
        let (sender, driver) = http1::handshake(TokioIo::new(stream)).await?;
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            // Its error also reaches the pending request, which counts it.
            let _ = driver.await;
        });
        Ok(Self {
            sender,
            _driver: tasks,
        })
    }

    /// Sends one request and reads its body to the end. Latency runs from `since` (when a
    /// paced request was released) or else from the send.
    async fn exchange(
        &mut self,
        request: Request<Full<Bytes>>,
        mode: Mode,
        since: Option<Instant>,
    ) -> Result<Sample, RequestError> {
        self.sender.ready().await?;
        let sent = since.unwrap_or_else(Instant::now);
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let mut body = response.into_body();
        let mut first_byte = None;
        let mut tail = Tail::default();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                first_byte.get_or_insert_with(|| sent.elapsed());
                tail.push(data);
            }
        }
        let finished = Instant::now();
        if !status.is_success() {
            return Err(RequestError::Status(status));
        }
        let first_byte = first_byte.ok_or(RequestError::EmptyBody)?;
        if mode.is_stream() && !tail.ends_stream() {
            return Err(RequestError::UnfinishedStream);
        }
        Ok(Sample {
            finished,
            latency: finished - sent,
            first_byte,
        })
    }
}

/// The last bytes of a body, enough to see how it ended without buffering all of it.
#[derive(Debug, Default)]
struct Tail(Vec<u8>);

impl Tail {
    const KEEP: usize = 32;

    fn push(&mut self, data: &[u8]) {
        self.0
            .extend_from_slice(&data[data.len().saturating_sub(Self::KEEP)..]);
        let excess = self.0.len().saturating_sub(Self::KEEP);
        self.0.drain(..excess);
    }

    fn ends_stream(&self) -> bool {
        self.0.trim_ascii_end().ends_with(STREAM_END)
    }
}

/// One cell's figures for a candidate beside its baseline: Forge beside direct, or Forge with
/// capture on beside Forge with capture off.
#[derive(Debug, Clone, Copy)]
pub struct Comparison<'a> {
    /// What the candidate is measured against.
    pub baseline: &'a Stats,
    /// What is measured.
    pub candidate: &'a Stats,
}

impl Comparison<'_> {
    /// Candidate throughput as a percentage of the baseline's.
    pub fn throughput_pct(&self) -> f64 {
        let baseline = self.baseline.throughput();
        if baseline > 0.0 {
            100.0 * self.candidate.throughput() / baseline
        } else {
            0.0
        }
    }

    /// Milliseconds the candidate adds at the median; negative when it measured faster.
    pub fn added_p50_ms(&self) -> Option<f64> {
        added_ms(self.baseline.latency.p50(), self.candidate.latency.p50())
    }

    /// Milliseconds the candidate adds at p99.
    pub fn added_p99_ms(&self) -> Option<f64> {
        added_ms(self.baseline.latency.p99(), self.candidate.latency.p99())
    }

    /// What the candidate adds at the median, as a percentage of the baseline's median.
    pub fn added_p50_pct(&self) -> Option<f64> {
        added_pct(self.baseline.latency.p50(), self.candidate.latency.p50())
    }

    /// What the candidate adds at p99, as a percentage of the baseline's p99.
    pub fn added_p99_pct(&self) -> Option<f64> {
        added_pct(self.baseline.latency.p99(), self.candidate.latency.p99())
    }
}

fn added_pct(baseline: Option<Duration>, candidate: Option<Duration>) -> Option<f64> {
    let (baseline, candidate) = (millis(baseline?), millis(candidate?));
    (baseline > 0.0).then(|| 100.0 * (candidate - baseline) / baseline)
}

fn added_ms(baseline: Option<Duration>, candidate: Option<Duration>) -> Option<f64> {
    Some(millis(candidate?) - millis(baseline?))
}

/// A duration in milliseconds, for printing.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: impl IntoIterator<Item = u64>) -> Distribution {
        Distribution::new(values.into_iter().map(Duration::from_millis).collect())
    }

    #[test]
    fn percentiles_of_one_to_a_hundred_are_their_rank() {
        let d = ms((1..=100).rev());
        assert_eq!(d.p50(), Some(Duration::from_millis(50)));
        assert_eq!(d.p99(), Some(Duration::from_millis(99)));
        assert_eq!(d.percentile(100), Some(Duration::from_millis(100)));
        assert_eq!(d.percentile(1), Some(Duration::from_millis(1)));
    }

    #[test]
    fn percentile_rounds_rank_up_on_small_samples() {
        let d = ms([40, 10, 30, 20]);
        assert_eq!(d.p50(), Some(Duration::from_millis(20)));
        assert_eq!(d.percentile(51), Some(Duration::from_millis(30)));
        assert_eq!(d.p99(), Some(Duration::from_millis(40)));
    }

    #[test]
    fn p99_of_ten_samples_is_the_maximum() {
        let d = ms([5, 1, 9, 3, 7, 2, 8, 4, 6, 1000]);
        assert_eq!(d.p50(), Some(Duration::from_millis(5)));
        assert_eq!(d.percentile(90), Some(Duration::from_millis(9)));
        assert_eq!(d.p99(), Some(Duration::from_millis(1000)));
    }

    #[test]
    fn percentile_edges() {
        assert_eq!(Distribution::default().p50(), None);
        let one = ms([7]);
        assert_eq!(one.percentile(0), Some(Duration::from_millis(7)));
        assert_eq!(one.p99(), Some(Duration::from_millis(7)));
        assert_eq!(ms([1, 2]).percentile(250), Some(Duration::from_millis(2)));
    }

    fn stats(latencies_ms: &[u64], window_ms: u64) -> Stats {
        Stats {
            latency: ms(latencies_ms.iter().copied()),
            window: Duration::from_millis(window_ms),
            requests: latencies_ms.len() as u64,
            ..Stats::default()
        }
    }

    #[test]
    fn pooled_runs_add_up_samples_and_windows() {
        let mut first = stats(&[1, 3], 1000);
        first.errors = 1;
        first.first_error = Some("first".into());
        let mut second = stats(&[2, 4, 5, 6], 2000);
        second.first_error = Some("second".into());
        second.connections = 4;
        first.cpu = Duration::from_millis(30);
        second.cpu = Duration::from_millis(90);
        let pooled = Stats::pooled(&[first, second]);
        // 120 ms of CPU over the six requests in the windows.
        assert_eq!(pooled.cpu_per_request_us(), Some(20_000.0));
        assert_eq!(Stats::default().cpu_per_request_us(), None);
        assert_eq!(pooled.latency, ms([1, 2, 3, 4, 5, 6]));
        assert_eq!(pooled.window, Duration::from_millis(3000));
        assert_eq!(pooled.throughput(), 2.0);
        assert_eq!(
            (pooled.errors, pooled.connections, pooled.requests),
            (1, 4, 6)
        );
        assert_eq!(pooled.first_error.as_deref(), Some("first"));
    }

    #[test]
    fn comparison_reports_ratio_and_added_latency() {
        let baseline = stats(&[10, 10, 20], 1000);
        let candidate = stats(&[11, 12, 25], 2000);
        let c = Comparison {
            baseline: &baseline,
            candidate: &candidate,
        };
        assert_eq!(c.throughput_pct(), 50.0);
        assert_eq!(c.added_p50_ms(), Some(2.0));
        assert_eq!(c.added_p50_pct(), Some(20.0));
        assert_eq!(c.added_p99_ms(), Some(5.0));
        assert_eq!(c.added_p99_pct(), Some(25.0));
        let empty = Stats::default();
        let none = Comparison {
            baseline: &empty,
            candidate: &candidate,
        };
        assert_eq!((none.throughput_pct(), none.added_p50_pct()), (0.0, None));
    }

    #[test]
    fn tail_sees_the_stream_end_across_frames() {
        let mut tail = Tail::default();
        tail.push(&[b'x'; 100]);
        tail.push(b"data: [DO");
        tail.push(b"NE]\n\n");
        assert!(tail.ends_stream());
        tail.push(b"data: {}\n\n");
        assert!(!tail.ends_stream());
    }
}
