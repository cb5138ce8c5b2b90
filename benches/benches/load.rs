//! Load bench: the simulated upstream direct vs through Forge with capture off, `async` and `durable`.
//!
//! `cargo bench -p forge-benches --bench load`. Closed-loop, in one process and one run: per cell
//! (mode × concurrency) each of the four targets is loaded in turn, in rounds whose order
//! alternates (direct, off, async, durable; then durable … direct), so drift during a cell (a
//! compile in the background, a growing store) falls on every target alike.
//! `FORGE_BENCH_SECS` sets the measured seconds per target and cell, split over the rounds
//! (default 4 s over 2 rounds, so 2 s per round, each after a 0.5 s warm-up of its own; about 2
//! minutes in all);
//! `FORGE_BENCH_CONNS=16` (a comma-separated subset of 1, 16, 64), `FORGE_BENCH_MODES=stream`
//! (of non-stream, stream) and `FORGE_BENCH_TARGETS=direct,off` (of direct, off, async,
//! durable) run fewer cells and targets; a skipped target shows as n/a.
//! `FORGE_BENCH_ROUNDS` sets the rounds per cell (an even number, default 2): many short rounds
//! let the median of the per-round comparisons (each capturing target against capture off in the
//! round beside it) stand clear of a stall that would rule a pooled p99.
//! `FORGE_BENCH_CAPTURE='enabled = false'` turns the capturing gateways into twins of capture
//! off, which gives the noise floor of those comparisons.
//! `FORGE_BENCH_CAPTURE` adds `[capture]` keys to the `async` and `durable` gateways, separated by
//! `;` (`FORGE_BENCH_CAPTURE='idle_priority = false; flush_interval_ms = 10'`; no value may hold a
//! `;`), to compare settings run against run.
//!
//! Closed loop keeps every target saturated, so there any CPU that capture spends shows as
//! latency. A production proxy runs below saturation, so the 16-connection cells are then run
//! again open loop, at a fixed rate: `FORGE_BENCH_LOAD_PCT` (default 50; a comma-separated list,
//! or `none`) percent of the rate capture off reached closed loop in the same cell. Direct, off
//! and `async` get the same rate; `durable`, which waits for a commit per response, cannot
//! serve it and is left out. The sim,
//! the gateways, their store writers and the load generator share one process, one tokio runtime
//! and the machine's cores, so absolute figures are pessimistic; the ratios are what count.
//! `FORGE_BENCH_GATEWAY_RUNTIME=own` gives the gateways a runtime of their own (two workers), as
//! a gateway process has, beside the load generator's and the sim's.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it is a short smoke test instead,
//! which fails on any request error, on any dropped trace and on counts that do not add up.

// The same allocator as the `forge` binary, so the gateway measured here is the one that ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use forge_benches::burner::{self, Burner};
use forge_benches::{
    Cell, Comparison, ENV_FORGE_BENCH_SECS, Load, Mode, Stats, Target, Timing, millis, run,
};
use forge_gateway::config::Config;
use forge_gateway::server::RunningGateway;
use forge_gateway::sim::{SimConfig, SimUpstream};
use forge_layer::store::{COMMIT_BUCKETS, CommitTimesSnapshot};
use tempfile::TempDir;

const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// Comma-separated subsets of the concurrencies, modes and targets to run (for a quicker look).
const ENV_FORGE_BENCH_CONNS: &str = "FORGE_BENCH_CONNS";
const ENV_FORGE_BENCH_MODES: &str = "FORGE_BENCH_MODES";
const ENV_FORGE_BENCH_TARGETS: &str = "FORGE_BENCH_TARGETS";
/// Extra `[capture]` keys for the capturing gateways, `;`-separated.
const ENV_FORGE_BENCH_CAPTURE: &str = "FORGE_BENCH_CAPTURE";
/// Rounds per cell.
const ENV_FORGE_BENCH_ROUNDS: &str = "FORGE_BENCH_ROUNDS";
/// Percentages of capture off's closed-loop rate to run the open-loop cells at.
const ENV_FORGE_BENCH_LOAD_PCT: &str = "FORGE_BENCH_LOAD_PCT";
/// `own`: the gateways run on a tokio runtime of their own (two workers), as a gateway process
/// would, instead of sharing the load generator's and the sim's.
const ENV_FORGE_BENCH_GATEWAY_RUNTIME: &str = "FORGE_BENCH_GATEWAY_RUNTIME";
/// A share of one core, in percent, that an idle-class thread spins for while `async` is loaded,
/// and optionally, after a `/`, how often it repeats that share, in milliseconds (10 unless told).
const ENV_FORGE_BENCH_BURN: &str = "FORGE_BENCH_BURN";
const DEFAULT_LOAD_PCT: [f64; 1] = [50.0];
/// The concurrency whose cells are also run open loop: the one the targets are set at.
const PACED_CONCURRENCY: usize = 16;
const DEFAULT_SECS: f64 = 4.0;
const DEFAULT_ROUNDS: usize = 2;
const WARMUP: Duration = Duration::from_millis(500);
/// One short round: enough to go through every path once.
const SMOKE: Plan = Plan {
    timing: Timing {
        warmup: Duration::from_millis(50),
        measure: Duration::from_millis(100),
    },
    rounds: 1,
};
/// Once the load stops, how long the writers may take to empty their queues.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
const SIM_MODEL: &str = "bench-model";
const ALIAS: &str = "bench";

/// The foundation issue's targets: Forge (capture off) against direct.
const MIN_THROUGHPUT_PCT_AT_64: f64 = 35.0;
const MAX_ADDED_P50_MS_AT_16: f64 = 0.3;
const MAX_ADDED_P99_MS_AT_16: f64 = 1.0;
/// The capture issue's target: `async` capture against capture off, at p50 and p99.
const MAX_ASYNC_ADDED_PCT_AT_16: f64 = 5.0;

/// What a run is loaded against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// The simulated upstream itself.
    Direct,
    /// Forge with `[capture] enabled = false`.
    CaptureOff,
    /// Forge with `async` capture: a full queue drops traces.
    Async,
    /// Forge with `durable` capture: each response's end waits for its commit.
    Durable,
}

impl Variant {
    /// In the order of a forward round.
    const ALL: [Variant; 4] = [
        Variant::Direct,
        Variant::CaptureOff,
        Variant::Async,
        Variant::Durable,
    ];
    const FORGE: [Variant; 3] = [Variant::CaptureOff, Variant::Async, Variant::Durable];
    const CAPTURING: [Variant; 2] = [Variant::Async, Variant::Durable];
    /// What an open-loop cell runs: `durable` cannot serve half of capture off's rate.
    const PACED: [Variant; 3] = [Variant::Direct, Variant::CaptureOff, Variant::Async];

    fn label(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::CaptureOff => "off",
            Variant::Async => "async",
            Variant::Durable => "durable",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The `[capture]` section of its gateway, with `extra` keys when it captures; `None` for
    /// direct.
    fn capture_section(self, data_dir: &TempDir, extra: &str) -> Option<String> {
        let dir = data_dir.path();
        let mode = match self {
            Variant::Direct => return None,
            Variant::CaptureOff => return Some("enabled = false".into()),
            Variant::Async => "async",
            Variant::Durable => "durable",
        };
        Some(format!("mode = \"{mode}\"\ndata_dir = {dir:?}\n{extra}"))
    }
}

/// How long each run lasts, and how many rounds a cell gets.
#[derive(Debug, Clone, Copy)]
struct Plan {
    timing: Timing,
    rounds: usize,
}

/// One target under load: the sim itself, or a gateway of its own with its own store.
struct Subject {
    variant: Variant,
    target: Target,
    gateway: Option<RunningGateway>,
    // Held so the store outlives the gateway; removed when the bench ends.
    _data_dir: TempDir,
}

/// One cell's runs under one load: per variant, one [`Stats`] per round, and the rounds pooled.
struct CellResult {
    cell: Cell,
    load: Load,
    /// For an open-loop cell, the percentage of capture off's closed-loop rate it offered.
    load_pct: Option<f64>,
    rounds: [Vec<Stats>; 4],
    pooled: [Stats; 4],
}

impl CellResult {
    fn new(cell: Cell, load: Load, load_pct: Option<f64>, rounds: [Vec<Stats>; 4]) -> Self {
        let pooled = rounds.each_ref().map(|runs| Stats::pooled(runs));
        Self {
            cell,
            load,
            load_pct,
            rounds,
            pooled,
        }
    }

    /// How it was loaded, for tables.
    fn load_label(&self) -> String {
        match (self.load, self.load_pct) {
            (Load::Rate(rate), Some(pct)) => format!("{pct:.0}% ({rate:.0}/s)"),
            _ => "closed".into(),
        }
    }

    fn stats(&self, variant: Variant) -> &Stats {
        &self.pooled[variant.index()]
    }

    fn compare(&self, baseline: Variant, candidate: Variant) -> Comparison<'_> {
        Comparison {
            baseline: self.stats(baseline),
            candidate: self.stats(candidate),
        }
    }

    fn errors(&self) -> u64 {
        self.pooled.iter().map(|s| s.errors).sum()
    }

    /// The median over rounds of `candidate`'s latency at `quantile` over `baseline`'s in the
    /// same round, in percent. The two ran in the same round, seconds apart (`async` right next
    /// to capture off), so a stall of the machine moves one pair, not the median of many.
    fn paired_median_pct(
        &self,
        baseline: Variant,
        candidate: Variant,
        quantile: fn(&Stats) -> Option<Duration>,
    ) -> Option<f64> {
        let pairs = self.rounds[baseline.index()]
            .iter()
            .zip(&self.rounds[candidate.index()]);
        let mut pcts: Vec<f64> = pairs
            .filter_map(|(b, c)| {
                let (b, c) = (millis(quantile(b)?), millis(quantile(c)?));
                (b > 0.0).then(|| 100.0 * (c - b) / b)
            })
            .collect();
        if pcts.is_empty() {
            return None;
        }
        pcts.sort_by(f64::total_cmp);
        let mid = pcts.len() / 2;
        Some(if pcts.len().is_multiple_of(2) {
            (pcts[mid - 1] + pcts[mid]) / 2.0
        } else {
            pcts[mid]
        })
    }

    /// How far the median of one variant moved between the first two rounds, in percent of
    /// their mean: the noise floor against which a few percent of added latency is read.
    fn p50_spread_pct(&self, variant: Variant) -> Option<f64> {
        let runs = &self.rounds[variant.index()];
        let a = millis(runs.first()?.latency.p50()?);
        let b = millis(runs.get(1)?.latency.p50()?);
        let mean = (a + b) / 2.0;
        (mean > 0.0).then(|| 100.0 * (a - b).abs() / mean)
    }
}

/// What one capturing gateway counted, next to what the clients saw.
struct Account {
    variant: Variant,
    /// Requests the clients completed against this gateway, warm-ups included.
    served: u64,
    counters: Option<forge_layer::store::CounterSnapshot>,
    /// Traces in the store after shutdown.
    stored: Option<u64>,
}

impl Account {
    fn dropped(&self) -> u64 {
        self.counters.map_or(0, |c| c.dropped)
    }

    /// Every exchange the clients completed became exactly one trace that is eligible, and
    /// every eligible trace is accounted for and, if captured, is in the store.
    fn balanced(&self) -> bool {
        self.counters.is_some_and(|c| {
            c.pending == 0
                && c.captured + c.dropped + c.failed == c.eligible
                && c.eligible == self.served
                && self.stored == Some(c.captured)
        })
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn Error>> {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not. Other arguments are ignored.
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let plan = if measuring { measured_plan()? } else { SMOKE };
    let concurrencies = subset(ENV_FORGE_BENCH_CONNS, &CONCURRENCY, |c| c.to_string())?;
    let modes = subset(ENV_FORGE_BENCH_MODES, &Mode::ALL, |m| m.label().to_string())?;
    let variants = subset(ENV_FORGE_BENCH_TARGETS, &Variant::ALL, |v| {
        v.label().to_string()
    })?;
    let load_pcts = if measuring {
        load_percentages()?
    } else {
        DEFAULT_LOAD_PCT.to_vec()
    };

    let capture_extra = std::env::var(ENV_FORGE_BENCH_CAPTURE).unwrap_or_default();
    let burner = burner()?;
    let gateway_runtime = GatewayRuntime(gateway_runtime()?);
    let on_gateways = gateway_runtime.0.as_ref().map(|rt| rt.handle().clone());

    let sim = SimUpstream::start(SimConfig::default(), "127.0.0.1:0".parse()?).await?;
    let mut subjects = Vec::new();
    for variant in variants {
        let data_dir = tempfile::tempdir()?;
        let subject = match variant.capture_section(&data_dir, &capture_extra.replace(';', "\n")) {
            None => Subject {
                variant,
                target: Target::new(variant.label(), sim.addr(), SIM_MODEL)?,
                gateway: None,
                _data_dir: data_dir,
            },
            Some(capture) => {
                let config = gateway_config(&sim.base_url(), &capture);
                let config = Config::from_toml(&config).map_err(|e| {
                    format!(
                        "{} gateway ({ENV_FORGE_BENCH_CAPTURE}={capture_extra:?}): {e}",
                        variant.label()
                    )
                })?;
                let started = forge_gateway::server::start(config);
                let gateway = match &on_gateways {
                    Some(runtime) => runtime.spawn(started).await??,
                    None => started.await?,
                };
                Subject {
                    variant,
                    target: Target::new(variant.label(), gateway.addr(), ALIAS)?,
                    gateway: Some(gateway),
                    _data_dir: data_dir,
                }
            }
        };
        subjects.push(subject);
    }

    let mut results = Vec::new();
    for &mode in &modes {
        for &concurrency in &concurrencies {
            let cell = Cell { mode, concurrency };
            let before = writer_so_far(&subjects);
            let rounds =
                run_cell(&subjects, &Variant::ALL, cell, plan, Load::Closed, &burner).await;
            let closed = CellResult::new(cell, Load::Closed, None, rounds);
            print_cell(&closed);
            print_writers(&subjects, &before);
            // The open-loop rates follow from capture off's closed-loop rate.
            let off_rate = closed.stats(Variant::CaptureOff).throughput();
            results.push(closed);
            if concurrency != PACED_CONCURRENCY || off_rate <= 0.0 {
                continue;
            }
            for &pct in &load_pcts {
                let load = Load::Rate(off_rate * pct / 100.0);
                let before = writer_so_far(&subjects);
                let rounds = run_cell(&subjects, &Variant::PACED, cell, plan, load, &burner).await;
                let result = CellResult::new(cell, load, Some(pct), rounds);
                print_cell(&result);
                print_writers(&subjects, &before);
                results.push(result);
            }
        }
    }

    let accounts = settle(subjects, &results, on_gateways.as_ref()).await;
    drop(gateway_runtime);
    sim.shutdown().await;

    print_accounts(&accounts);
    if measuring {
        print_targets(&results, &accounts);
        print_markdown(&results, &accounts, plan, &load_pcts);
    }
    Ok(verdict_exit(&results, &accounts, measuring))
}

/// The gateways' own runtime, if any. A runtime may not be dropped on an async task (tokio
/// panics), as it would be when the bench fails early with one, so this shuts it down in the
/// background instead.
struct GatewayRuntime(Option<tokio::runtime::Runtime>);

impl Drop for GatewayRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The runtime the gateways run on, when `FORGE_BENCH_GATEWAY_RUNTIME=own`; `None` (the
/// default, `shared`) runs them on the bench's own.
fn gateway_runtime() -> Result<Option<tokio::runtime::Runtime>, Box<dyn Error>> {
    match std::env::var(ENV_FORGE_BENCH_GATEWAY_RUNTIME).as_deref() {
        Err(_) | Ok("shared") => Ok(None),
        Ok("own") => Ok(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("forge-gateway")
                .enable_all()
                .build()?,
        )),
        Ok(other) => {
            Err(format!("{ENV_FORGE_BENCH_GATEWAY_RUNTIME}={other:?}: use own or shared").into())
        }
    }
}

/// What each subject's writer had done so far: traces dropped and commit times (`None` for one
/// that does not capture).
fn writer_so_far(subjects: &[Subject]) -> Vec<Option<(u64, CommitTimesSnapshot)>> {
    subjects
        .iter()
        .map(|s| {
            let gateway = s.gateway.as_ref()?;
            Some((gateway.capture_counters()?.dropped, gateway.commit_times()?))
        })
        .collect()
}

/// Says, for each capturing gateway, what its writer did during the cell just run: its commits,
/// how many took over 100 ms and the slowest one's bucket, and any traces dropped (a drop is
/// counted when the trace is refused, so it belongs to the cell whose request made it). A stall
/// that overflows the queue shows here as slow commits, or, if the commits were quick, as a
/// writer that did not run.
fn print_writers(subjects: &[Subject], before: &[Option<(u64, CommitTimesSnapshot)>]) {
    for ((subject, now), before) in subjects.iter().zip(writer_so_far(subjects)).zip(before) {
        let (Some((dropped, times)), Some((dropped_before, times_before))) = (now, before) else {
            continue;
        };
        let slowest = match times.slowest_bound_since(times_before) {
            Some(bound) if bound.is_finite() => format!("<= {bound} s"),
            Some(_) => format!("> {} s", COMMIT_BUCKETS[COMMIT_BUCKETS.len() - 1]),
            None => "none".to_string(),
        };
        println!(
            "  {:<7} {} commits, {} over 0.1 s, slowest {slowest}; dropped {} traces in this cell",
            subject.variant.label(),
            times.count() - times_before.count(),
            times.slower_than_since(0.1, times_before),
            dropped - dropped_before,
        );
    }
}

/// Loads each subject of the given variants in turn, in rounds whose order alternates, and
/// returns each variant's rounds. The burner, if any, spins while `async` is loaded.
async fn run_cell(
    subjects: &[Subject],
    variants: &[Variant],
    cell: Cell,
    plan: Plan,
    load: Load,
    burner: &Option<Burner>,
) -> [Vec<Stats>; 4] {
    let mut rounds: [Vec<Stats>; 4] = Default::default();
    let chosen: Vec<&Subject> = subjects
        .iter()
        .filter(|s| variants.contains(&s.variant))
        .collect();
    for round in 0..plan.rounds {
        let forward = round % 2 == 0;
        let order: Vec<&Subject> = if forward {
            chosen.clone()
        } else {
            chosen.iter().rev().copied().collect()
        };
        for subject in order {
            let burning = burner
                .as_ref()
                .filter(|_| subject.variant == Variant::Async);
            if let Some(burner) = burning {
                burner.set(true);
            }
            let stats = run(&subject.target, cell, plan.timing, load).await;
            if let Some(burner) = burning {
                burner.set(false);
            }
            rounds[subject.variant.index()].push(stats);
        }
    }
    rounds
}

/// `FORGE_BENCH_BURN`: the burner's share of a core in percent, and its period in milliseconds
/// after a `/` (`20/1`), if set. [`Burner::start`] checks the ranges.
fn burner() -> Result<Option<Burner>, String> {
    let text = match std::env::var(ENV_FORGE_BENCH_BURN) {
        Err(std::env::VarError::NotPresent) => return Ok(None),
        Err(e) => return Err(format!("{ENV_FORGE_BENCH_BURN}: {e}")),
        Ok(text) => text,
    };
    let bad = || {
        format!(
            "{ENV_FORGE_BENCH_BURN}={text:?}: want a percent of 1 to 100, then optionally / and a period in ms (20/1)"
        )
    };
    let (percent, period) = match text.trim().split_once('/') {
        Some((percent, ms)) => (percent, Some(ms)),
        None => (text.trim(), None),
    };
    let percent: u8 = percent.trim().parse().map_err(|_| bad())?;
    let period = match period {
        Some(ms) => Duration::from_secs_f64(
            ms.trim()
                .parse::<f64>()
                .ok()
                .filter(|ms| ms.is_finite() && *ms > 0.0 && *ms <= 10_000.0)
                .ok_or_else(bad)?
                / 1000.0,
        ),
        None => burner::DEFAULT_PERIOD,
    };
    Burner::start(percent, period)
        .map(Some)
        .map_err(|e| format!("{ENV_FORGE_BENCH_BURN}={text}: {e}"))
}

/// `FORGE_BENCH_LOAD_PCT`: percentages in (0, 100], or `none` for no open-loop cells.
fn load_percentages() -> Result<Vec<f64>, String> {
    let Ok(text) = std::env::var(ENV_FORGE_BENCH_LOAD_PCT) else {
        return Ok(DEFAULT_LOAD_PCT.to_vec());
    };
    if text.trim() == "none" {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|part| {
            part.trim()
                .parse::<f64>()
                .ok()
                .filter(|pct| *pct > 0.0 && *pct <= 100.0)
                .ok_or_else(|| {
                    format!(
                        "{ENV_FORGE_BENCH_LOAD_PCT}={text:?}: want percentages in (0, 100], or none"
                    )
                })
        })
        .collect()
}

fn measured_plan() -> Result<Plan, String> {
    let rounds = env_number(
        ENV_FORGE_BENCH_ROUNDS,
        DEFAULT_ROUNDS,
        |n: &usize| *n >= 2 && n.is_multiple_of(2) && *n <= 1000,
        "an even number of rounds, 2 to 1000",
    )?;
    let secs = env_number(
        ENV_FORGE_BENCH_SECS,
        DEFAULT_SECS,
        |s: &f64| s.is_finite() && *s > 0.0 && *s <= 600.0,
        "seconds in (0, 600]",
    )?;
    Ok(Plan {
        timing: Timing {
            warmup: WARMUP,
            measure: Duration::from_secs_f64(secs / rounds as f64),
        },
        rounds,
    })
}

/// The number in `env`, which `valid` must accept (`want` says what it takes), or `default`
/// when it is unset.
fn env_number<T: std::str::FromStr>(
    env: &str,
    default: T,
    valid: impl Fn(&T) -> bool,
    want: &str,
) -> Result<T, String> {
    let Ok(text) = std::env::var(env) else {
        return Ok(default);
    };
    text.trim()
        .parse::<T>()
        .ok()
        .filter(valid)
        .ok_or_else(|| format!("{env}={text:?}: want {want}"))
}

/// The items of `all` that the comma-separated list in `env` names, in `all`'s order; all of
/// them when `env` is unset.
fn subset<T: Copy>(env: &str, all: &[T], label: impl Fn(T) -> String) -> Result<Vec<T>, String> {
    let Ok(text) = std::env::var(env) else {
        return Ok(all.to_vec());
    };
    let names: Vec<&str> = text.split(',').map(str::trim).collect();
    let labels: Vec<String> = all.iter().map(|&item| label(item)).collect();
    if let Some(unknown) = names.iter().find(|n| !labels.iter().any(|l| l == *n)) {
        return Err(format!(
            "{env}={text:?}: {unknown:?} is not one of {labels:?}"
        ));
    }
    Ok(all
        .iter()
        .zip(&labels)
        .filter(|(_, l)| names.contains(&l.as_str()))
        .map(|(&item, _)| item)
        .collect())
}

/// Forge as deployed (default settings) with the given `[capture]` section, except: the limiter
/// never sheds at this load, shutdown is bounded, and the admin port cannot clash with a running
/// Forge.
fn gateway_config(sim_base_url: &str, capture: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_in_flight = 100000
shutdown_grace_secs = 1

[capture]
{capture}

[[upstreams]]
name = "sim"
base_url = "{sim_base_url}"

[[routes]]
alias = "{ALIAS}"
teacher = {{ upstream = "sim", model = "{SIM_MODEL}" }}
"#
    )
}

/// Waits for each capturing gateway's queue to empty, reads its counters, shuts every gateway
/// down, then counts what reached each store.
async fn settle(
    subjects: Vec<Subject>,
    results: &[CellResult],
    on_gateways: Option<&tokio::runtime::Handle>,
) -> Vec<Account> {
    let mut accounts = Vec::new();
    let mut stores = Vec::new();
    for subject in &subjects {
        let Some(gateway) = &subject.gateway else {
            continue;
        };
        // A capturing variant with capture turned off (the noise-floor run) has nothing to count.
        if !Variant::CAPTURING.contains(&subject.variant) || gateway.capture_counters().is_none() {
            continue;
        }
        let served = results
            .iter()
            .map(|r| r.stats(subject.variant).requests)
            .sum();
        accounts.push(Account {
            variant: subject.variant,
            served,
            counters: drained_counters(gateway).await,
            stored: None,
        });
        stores.push(gateway.store().cloned());
    }
    for subject in subjects {
        if let Some(gateway) = subject.gateway {
            match on_gateways {
                Some(runtime) => {
                    if let Err(e) = runtime.spawn(gateway.shutdown()).await {
                        eprintln!("{} gateway: shutdown failed: {e}", subject.variant.label());
                    }
                }
                None => gateway.shutdown().await,
            }
        }
    }
    for (account, store) in accounts.iter_mut().zip(stores) {
        account.stored = store.and_then(|s| s.trace_count().ok());
    }
    accounts
}

/// The counters once nothing is pending, or as they stand at the deadline.
async fn drained_counters(gateway: &RunningGateway) -> Option<forge_layer::store::CounterSnapshot> {
    let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
    loop {
        let counters = gateway.capture_counters()?;
        if counters.pending == 0 || tokio::time::Instant::now() >= deadline {
            return Some(counters);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "n/a".into(), |d| format!("{:.3}", millis(d)))
}

fn signed_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:+.3}"))
}

fn signed_pct(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:+.1}%"))
}

/// One variant's figures in a cell, with the median of each round (their spread is the noise)
/// and the connections opened against the one per worker per round that keep-alive allows.
fn stats_line(name: &str, cell: Cell, stats: &Stats, rounds: &[Stats]) -> String {
    let per_round: Vec<String> = rounds.iter().map(|r| ms(r.latency.p50())).collect();
    let mut line = format!(
        "  {name:<7} p50 {:>8} ms  p99 {:>8} ms  {:>9.0} req/s  errors {}  p50 by round {}  conns {}/{}",
        ms(stats.latency.p50()),
        ms(stats.latency.p99()),
        stats.throughput(),
        stats.errors,
        per_round.join("/"),
        stats.connections,
        rounds.len() * cell.concurrency,
    );
    if cell.mode == Mode::Stream {
        line += &format!("  ttfb p50 {} ms", ms(stats.first_byte.p50()));
    }
    if let Some(error) = &stats.first_error {
        line += &format!("  first error: {error}");
    }
    line
}

fn print_cell(r: &CellResult) {
    match r.load_pct {
        None => println!("{}, {}", r.cell, r.load),
        Some(pct) => println!(
            "{}, {} ({pct:.0}% of capture off's closed-loop rate)",
            r.cell, r.load
        ),
    }
    for variant in Variant::ALL {
        let rounds = &r.rounds[variant.index()];
        let line = stats_line(variant.label(), r.cell, r.stats(variant), rounds);
        println!("{line}");
    }
    let ratios: Vec<String> = Variant::FORGE
        .iter()
        .map(|&v| {
            let c = r.compare(Variant::Direct, v);
            format!("{} {:.1}%", v.label(), c.throughput_pct())
        })
        .collect();
    println!("  throughput vs direct: {}", ratios.join("  "));
    let off = r.compare(Variant::Direct, Variant::CaptureOff);
    println!(
        "  off over direct:     p50 {} ms  p99 {} ms",
        signed_ms(off.added_p50_ms()),
        signed_ms(off.added_p99_ms()),
    );
    for variant in Variant::CAPTURING {
        let c = r.compare(Variant::CaptureOff, variant);
        println!(
            "  {:<7} over off:    p50 {} ms ({})  p99 {} ms ({});  median of {} paired rounds: p50 {}  p99 {}",
            variant.label(),
            signed_ms(c.added_p50_ms()),
            signed_pct(c.added_p50_pct()),
            signed_ms(c.added_p99_ms()),
            signed_pct(c.added_p99_pct()),
            r.rounds[variant.index()].len(),
            signed_pct(r.paired_median_pct(Variant::CaptureOff, variant, p50)),
            signed_pct(r.paired_median_pct(Variant::CaptureOff, variant, p99)),
        );
    }
    let cpu: Vec<String> = Variant::ALL
        .iter()
        .map(|&v| {
            let us = cpu_us(r.stats(v).cpu_per_request_us());
            format!("{} {us}", v.label())
        })
        .collect();
    println!("  process CPU per request (µs): {}", cpu.join("  "));
}

fn p50(stats: &Stats) -> Option<Duration> {
    stats.latency.p50()
}

fn p99(stats: &Stats) -> Option<Duration> {
    stats.latency.p99()
}

/// CPU microseconds per request, for tables.
fn cpu_us(us: Option<f64>) -> String {
    us.map_or_else(|| "n/a".into(), |us| format!("{us:.1}"))
}

/// The closed-loop cell.
fn find(results: &[CellResult], mode: Mode, concurrency: usize) -> Option<&CellResult> {
    results
        .iter()
        .find(|r| r.cell == Cell { mode, concurrency } && r.load == Load::Closed)
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "n/a ",
    }
}

/// The issues' targets, reported, not asserted: a loaded CI box should not fail the build.
fn print_targets(results: &[CellResult], accounts: &[Account]) {
    println!();
    println!("Targets");
    let keep = find(results, Mode::NonStream, 64).map(|r| {
        r.compare(Variant::Direct, Variant::CaptureOff)
            .throughput_pct()
    });
    println!(
        "  {}  non-stream c=64: forge (capture off) keeps >= {MIN_THROUGHPUT_PCT_AT_64}% of direct throughput ({})",
        verdict(keep.map(|pct| pct >= MIN_THROUGHPUT_PCT_AT_64)),
        keep.map_or_else(|| "n/a".into(), |pct| format!("{pct:.1}%")),
    );
    for mode in Mode::ALL {
        let label = mode.label();
        let cell = find(results, mode, 16);
        let off = cell.map(|r| r.compare(Variant::Direct, Variant::CaptureOff));
        let p50 = off.and_then(|c| c.added_p50_ms());
        let p99 = off.and_then(|c| c.added_p99_ms());
        println!(
            "  {}  {label} c=16: forge (capture off) adds <= {MAX_ADDED_P50_MS_AT_16} ms at p50 over direct ({} ms)",
            verdict(p50.map(|v| v <= MAX_ADDED_P50_MS_AT_16)),
            signed_ms(p50)
        );
        println!(
            "  {}  {label} c=16: forge (capture off) adds <= {MAX_ADDED_P99_MS_AT_16} ms at p99 over direct ({} ms)",
            verdict(p99.map(|v| v <= MAX_ADDED_P99_MS_AT_16)),
            signed_ms(p99)
        );
    }
    let async_cells = Mode::ALL.into_iter().flat_map(|mode| {
        let closed = find(results, mode, PACED_CONCURRENCY);
        let paced = results
            .iter()
            .filter(move |r| r.cell.mode == mode && r.load != Load::Closed);
        std::iter::once((mode, closed)).chain(paced.map(move |r| (mode, Some(r))))
    });
    for (mode, cell) in async_cells {
        let load = cell.map_or_else(|| "closed".into(), CellResult::load_label);
        let label = format!("{} c={PACED_CONCURRENCY} {load}", mode.label());
        let noise = cell
            .and_then(|r| r.p50_spread_pct(Variant::CaptureOff))
            .map_or_else(String::new, |pct| {
                format!("; capture-off p50 moved {pct:.1}% between rounds")
            });
        let capture = cell.map(|r| r.compare(Variant::CaptureOff, Variant::Async));
        let paired = |quantile| {
            cell.and_then(|r| r.paired_median_pct(Variant::CaptureOff, Variant::Async, quantile))
        };
        for (name, pct, added, paired) in [
            (
                "p50",
                capture.and_then(|c| c.added_p50_pct()),
                capture.and_then(|c| c.added_p50_ms()),
                paired(p50),
            ),
            (
                "p99",
                capture.and_then(|c| c.added_p99_pct()),
                capture.and_then(|c| c.added_p99_ms()),
                paired(p99),
            ),
        ] {
            println!(
                "  {}  {label}: async capture adds <= {MAX_ASYNC_ADDED_PCT_AT_16}% at {name} over capture off ({}, {} ms; median of paired rounds {}{noise})",
                verdict(pct.map(|v| v <= MAX_ASYNC_ADDED_PCT_AT_16)),
                signed_pct(pct),
                signed_ms(added),
                signed_pct(paired),
            );
        }
    }
    let drops: Vec<String> = accounts
        .iter()
        .map(|a| format!("{} {}", a.variant.label(), a.dropped()))
        .collect();
    println!(
        "  {}  no dropped traces ({})",
        verdict(Some(accounts.iter().all(|a| a.dropped() == 0))),
        drops.join(", ")
    );
}

fn print_accounts(accounts: &[Account]) {
    println!();
    println!("Capture counters at the end (after the queues drained)");
    for a in accounts {
        let counters = a.counters.map_or_else(
            || "no counters".into(),
            |c| {
                format!(
                    "eligible {} captured {} dropped {} failed {} pending {}",
                    c.eligible, c.captured, c.dropped, c.failed, c.pending
                )
            },
        );
        let stored = a
            .stored
            .map_or_else(|| "n/a".into(), |n: u64| n.to_string());
        println!(
            "  {:<7} {counters}; client-completed {}; stored {stored}  {}",
            a.variant.label(),
            a.served,
            if a.balanced() { "OK" } else { "MISMATCH" },
        );
    }
    for a in accounts.iter().filter(|a| a.dropped() > 0) {
        eprintln!();
        eprintln!(
            "!!!!!!!! {}: {} TRACES DROPPED: the capture queue overflowed at this load !!!!!!!!",
            a.variant.label(),
            a.dropped()
        );
    }
    for a in accounts.iter().filter(|a| !a.balanced()) {
        eprintln!();
        eprintln!(
            "!!!!!!!! {}: CAPTURE COUNTS DO NOT ADD UP (client-completed {}, counters {:?}, stored {:?}) !!!!!!!!",
            a.variant.label(),
            a.served,
            a.counters,
            a.stored
        );
    }
}

fn print_markdown(results: &[CellResult], accounts: &[Account], plan: Plan, load_pcts: &[f64]) {
    println!();
    println!("Direct vs Forge with capture off:");
    println!();
    println!(
        "| mode | conns | load | direct req/s | forge req/s | forge/direct | direct p50 ms | forge p50 ms | added p50 ms | direct p99 ms | forge p99 ms | added p99 ms | errors |"
    );
    println!("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in results {
        let direct = r.stats(Variant::Direct);
        let off = r.stats(Variant::CaptureOff);
        let c = r.compare(Variant::Direct, Variant::CaptureOff);
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.1}% | {} | {} | {} | {} | {} | {} | {} |",
            r.cell.mode.label(),
            r.cell.concurrency,
            r.load_label(),
            direct.throughput(),
            off.throughput(),
            c.throughput_pct(),
            ms(direct.latency.p50()),
            ms(off.latency.p50()),
            signed_ms(c.added_p50_ms()),
            ms(direct.latency.p99()),
            ms(off.latency.p99()),
            signed_ms(c.added_p99_ms()),
            direct.errors + off.errors,
        );
    }
    println!();
    println!("Forge with capture off vs `async` vs `durable` (added latency is over capture off):");
    println!();
    println!(
        "| mode | conns | load | req/s off / async / durable | % of direct off / async / durable | CPU µs/req off / async / durable | off p50 ms | async p50 ms | durable p50 ms | off p99 ms | async p99 ms | durable p99 ms | errors |"
    );
    println!("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in results {
        let throughput = Variant::FORGE
            .map(|v| format!("{:.0}", r.stats(v).throughput()))
            .join(" / ");
        let share = Variant::FORGE
            .map(|v| format!("{:.1}%", r.compare(Variant::Direct, v).throughput_pct()))
            .join(" / ");
        let cpu = Variant::FORGE
            .map(|v| cpu_us(r.stats(v).cpu_per_request_us()))
            .join(" / ");
        let off = r.stats(Variant::CaptureOff);
        let with_added = |variant: Variant, p99: bool| {
            let c = r.compare(Variant::CaptureOff, variant);
            let (value, added_ms, added_pct) = if p99 {
                (
                    c.candidate.latency.p99(),
                    c.added_p99_ms(),
                    c.added_p99_pct(),
                )
            } else {
                (
                    c.candidate.latency.p50(),
                    c.added_p50_ms(),
                    c.added_p50_pct(),
                )
            };
            format!(
                "{} ({}, {})",
                ms(value),
                signed_ms(added_ms),
                signed_pct(added_pct)
            )
        };
        println!(
            "| {} | {} | {} | {throughput} | {share} | {cpu} | {} | {} | {} | {} | {} | {} | {} |",
            r.cell.mode.label(),
            r.cell.concurrency,
            r.load_label(),
            ms(off.latency.p50()),
            with_added(Variant::Async, false),
            with_added(Variant::Durable, false),
            ms(off.latency.p99()),
            with_added(Variant::Async, true),
            with_added(Variant::Durable, true),
            r.stats(Variant::Async).errors + r.stats(Variant::Durable).errors,
        );
    }
    println!();
    println!(
        "`async` over capture off, the median of the rounds' own comparisons ({} rounds each):",
        plan.rounds
    );
    println!();
    println!("| mode | conns | load | p50 | p99 |");
    println!("|---|--:|---|--:|--:|");
    for r in results {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.cell.mode.label(),
            r.cell.concurrency,
            r.load_label(),
            signed_pct(r.paired_median_pct(Variant::CaptureOff, Variant::Async, p50)),
            signed_pct(r.paired_median_pct(Variant::CaptureOff, Variant::Async, p99)),
        );
    }
    println!();
    println!("Capture counters at the end of the run:");
    println!();
    println!(
        "| gateway | client-completed | eligible | captured | dropped | failed | stored | adds up |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|---|");
    for a in accounts {
        let field = |f: fn(&forge_layer::store::CounterSnapshot) -> u64| {
            a.counters
                .as_ref()
                .map_or_else(|| "n/a".into(), |c| f(c).to_string())
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            a.variant.label(),
            a.served,
            field(|c| c.eligible),
            field(|c| c.captured),
            field(|c| c.dropped),
            field(|c| c.failed),
            a.stored.map_or_else(|| "n/a".into(), |n| n.to_string()),
            if a.balanced() { "yes" } else { "NO" },
        );
    }
    println!();
    // The settings that narrowed or changed the run, so that the line reproduces it.
    let settings: String = [
        ENV_FORGE_BENCH_CONNS,
        ENV_FORGE_BENCH_MODES,
        ENV_FORGE_BENCH_TARGETS,
        ENV_FORGE_BENCH_LOAD_PCT,
        ENV_FORGE_BENCH_CAPTURE,
        ENV_FORGE_BENCH_ROUNDS,
        ENV_FORGE_BENCH_GATEWAY_RUNTIME,
        ENV_FORGE_BENCH_BURN,
    ]
    .into_iter()
    .filter_map(|name| {
        let value = std::env::var(name).ok()?;
        Some(format!("{name}='{}' ", value.replace('\'', r"'\''")))
    })
    .collect();
    println!(
        "Command: {settings}{ENV_FORGE_BENCH_SECS}={} cargo bench -p forge-benches --bench load  ({} rounds of {} s per target and cell, each after {} s of warm-up; open loop at {load_pcts:?}% of capture off's closed-loop rate; {} cores)",
        plan.timing.measure.as_secs_f64() * plan.rounds as f64,
        plan.rounds,
        plan.timing.measure.as_secs_f64(),
        plan.timing.warmup.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
}

/// Figures from a run with errors are not comparable, and counts that do not add up are a
/// capture bug, so both fail the run, loudly. Drops fail only the smoke test: under a measured
/// load they are a missed target, reported above.
fn verdict_exit(results: &[CellResult], accounts: &[Account], measuring: bool) -> ExitCode {
    let errors: u64 = results.iter().map(CellResult::errors).sum();
    if errors > 0 {
        eprintln!();
        eprintln!("!!!!!!!! {errors} REQUEST ERRORS: these figures are not valid !!!!!!!!");
        for r in results.iter().filter(|r| r.errors() > 0) {
            for variant in Variant::ALL {
                let stats = r.stats(variant);
                if let Some(error) = &stats.first_error {
                    eprintln!(
                        "  {} {}: {} errors, first: {error}",
                        r.cell,
                        variant.label(),
                        stats.errors
                    );
                }
            }
        }
    }
    let unbalanced = accounts.iter().any(|a| !a.balanced());
    let dropped = accounts.iter().any(|a| a.dropped() > 0);
    if errors > 0 || unbalanced || (dropped && !measuring) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
