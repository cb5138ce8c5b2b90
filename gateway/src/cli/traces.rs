//! `forge traces list|show|stats|export`: read the store directly, or through the admin API.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use forge_layer::store::Store;
use forge_layer::trace::{Trace, TraceId};

use super::admin::{AdminClient, segment};

/// Where traces are read from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The data directory: the gateway must not be running (it holds the file's lock).
    DataDir(PathBuf),
    /// A running gateway's admin API, e.g. `http://127.0.0.1:8081`.
    Admin(String),
}

/// What to do.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Action {
    /// The newest traces, one per line.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One trace as JSON.
    Show {
        /// The trace id (the x-forge-trace-id response header).
        id: String,
    },
    /// Counts by outcome, arm and alias (store) or the live counters (admin API).
    Stats,
    /// Every trace as JSON lines on stdout (progress on stderr).
    Export,
}

/// Errors of the traces command, with what to do about them.
#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    /// Opening or reading the store failed.
    #[error(transparent)]
    Store(#[from] forge_layer::store::StoreError),
    /// The admin API could not be used (the message names it).
    #[error("{0}")]
    Admin(String),
    /// Writing to stdout failed (e.g. a closed pipe).
    #[error("output: {0}")]
    Output(#[from] std::io::Error),
    /// The trace id was not found or malformed.
    #[error("no trace {0}")]
    NotFound(String),
}

/// Runs the command, writing to stdout.
pub async fn run(source: Source, action: Action) -> Result<(), TracesError> {
    match source {
        Source::DataDir(dir) => {
            let store = Store::open_existing_dir(&dir)?;
            tokio::task::spawn_blocking(move || from_store(&store, action))
                .await
                .map_err(|e| TracesError::Admin(format!("the store read failed: {e}")))?
        }
        Source::Admin(url) => from_admin(&url, action).await,
    }
}

fn line(t: &Trace) -> String {
    format!(
        "{}  {:<14} {:<8} {:>3}  {:<9} {:>7.1} ms  {}",
        t.id,
        t.alias,
        t.arm.kind(),
        t.status,
        t.outcome.name(),
        t.latency_us as f64 / 1000.0,
        t.tenant.as_deref().unwrap_or("-")
    )
}

fn from_store(store: &Store, action: Action) -> Result<(), TracesError> {
    let mut out = std::io::stdout().lock();
    match action {
        Action::List { limit } => {
            for t in store.recent_traces(None, limit, |_| true)? {
                writeln!(out, "{}", line(&t))?;
            }
        }
        Action::Show { id } => {
            let trace_id: TraceId = id.parse().map_err(|_| TracesError::NotFound(id.clone()))?;
            let trace = store.trace(trace_id)?.ok_or(TracesError::NotFound(id))?;
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&trace).unwrap_or_default()
            )?;
        }
        Action::Stats => {
            let mut by: BTreeMap<(&'static str, String), u64> = BTreeMap::new();
            let mut total = 0u64;
            store.for_each_trace(|t| {
                total += 1;
                *by.entry(("outcome", t.outcome.name().to_string()))
                    .or_default() += 1;
                *by.entry(("arm", t.arm.kind().to_string())).or_default() += 1;
                *by.entry(("alias", t.alias)).or_default() += 1;
                true
            })?;
            writeln!(out, "traces: {total}")?;
            for ((group, name), n) in by {
                writeln!(out, "  {group:<8} {name:<20} {n}")?;
            }
        }
        Action::Export => {
            let total = store.trace_count()?;
            let mut done = 0u64;
            let mut failure = None;
            store.for_each_trace(|t| {
                let written = serde_json::to_writer(&mut out, &t)
                    .map_err(std::io::Error::other)
                    .and_then(|()| out.write_all(b"\n"));
                if let Err(e) = written {
                    failure = Some(e);
                    return false;
                }
                done += 1;
                if done.is_multiple_of(10_000) {
                    eprintln!("exported {done}/{total}");
                }
                true
            })?;
            if let Some(e) = failure {
                return Err(e.into());
            }
            eprintln!("exported {done} traces");
        }
    }
    Ok(())
}

/// JSON text indented, when a JSON tree can hold it; else as it is.
fn pretty(text: String) -> String {
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|value| serde_json::to_string_pretty(&value).ok())
        .unwrap_or(text)
}

/// A trace's id, read from a trace that cannot be read whole.
#[derive(serde::Deserialize)]
struct IdOnly {
    id: String,
}

/// One page of `GET /admin/traces`, its traces left as text: a JSON tree has a depth limit,
/// and a trace's request may nest deeper than the page's own levels leave room for.
#[derive(serde::Deserialize)]
struct Page<'a> {
    #[serde(borrow)]
    data: Vec<&'a serde_json::value::RawValue>,
    has_more: bool,
    last_id: Option<String>,
}

/// Calls `f` on the admin API's traces, newest first, page by page (`before` walks back), until
/// `limit` of them (all, without one).
async fn walk_pages<G, F>(
    get: &G,
    limit: Option<u64>,
    mut f: impl FnMut(&serde_json::value::RawValue) -> std::io::Result<()>,
) -> Result<(), TracesError>
where
    G: Fn(String) -> F,
    F: std::future::Future<Output = Result<String, TracesError>>,
{
    // The admin API's largest page.
    const PAGE: u64 = 1000;
    let mut before: Option<String> = None;
    let mut left = limit.unwrap_or(u64::MAX);
    while left > 0 {
        let cursor = before
            .as_deref()
            .map(|b| format!("&before={b}"))
            .unwrap_or_default();
        let text = get(format!("/admin/traces?limit={}{cursor}", left.min(PAGE))).await?;
        let page: Page = serde_json::from_str(&text)
            .map_err(|e| TracesError::Admin(format!("a page of traces cannot be read: {e}")))?;
        for trace in page.data {
            f(trace)?;
            left = left.saturating_sub(1);
        }
        match page.last_id {
            Some(last) if page.has_more => before = Some(last),
            _ => break,
        }
    }
    Ok(())
}

async fn from_admin(base: &str, action: Action) -> Result<(), TracesError> {
    let admin = AdminClient::new(base).map_err(TracesError::Admin)?;
    let get = |path: String| {
        let admin = &admin;
        async move { admin.get_text(&path).await.map_err(TracesError::Admin) }
    };
    let mut out = std::io::stdout().lock();
    match action {
        Action::List { limit } => {
            walk_pages(&get, Some(limit as u64), |raw| {
                match Trace::decode(raw.get().as_bytes()) {
                    Ok(t) => writeln!(out, "{}", line(&t)),
                    // A newer gateway's trace, say: still listed, by its id.
                    Err(e) => {
                        let id = serde_json::from_str::<IdOnly>(raw.get()).map(|t| t.id);
                        writeln!(out, "{}  (not read: {e})", id.unwrap_or_default())
                    }
                }
            })
            .await?;
        }
        Action::Show { id } => {
            let trace = get(format!("/admin/traces/{}", segment(&id))).await?;
            writeln!(out, "{}", pretty(trace))?;
        }
        Action::Stats => {
            let stats = get("/admin/stats".to_string()).await?;
            writeln!(out, "{}", pretty(stats))?;
        }
        Action::Export => {
            let mut done = 0u64;
            walk_pages(&get, None, |raw| {
                done += 1;
                if done.is_multiple_of(10_000) {
                    eprintln!("exported {done}");
                }
                writeln!(out, "{}", raw.get())
            })
            .await?;
            eprintln!("exported {done} traces");
        }
    }
    Ok(())
}
