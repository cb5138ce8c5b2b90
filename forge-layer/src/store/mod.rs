//! The embedded redb store: traces, feedback and evaluations, with crash-safe commits.
//!
//! Every write transaction uses two-phase commit (redb recommends it when attackers influence
//! the data, and prompts are user text) and quick repair, so reopening after `kill -9` reads the
//! saved allocator state instead of walking the whole file.

mod commit_lane;
mod commit_times;
mod feedback;
mod lanes;
mod open;
mod records;
mod retention;
mod routes;
mod unsettled;
mod writer;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::trace::{Trace, TraceId};
use open::{Handle, OpenDb};

pub use commit_times::{COMMIT_BUCKETS, CommitTimesSnapshot};
pub use feedback::{Evaluation, Feedback, MAX_FEEDBACK_PER_TRACE};
pub use lanes::lower_to_idle_class;
pub use records::GradedScan;
pub use retention::{EXPIRE_BATCH, EXPIRE_BATCH_BYTES, Expired, run_expiry};
pub use routes::RouteChange;
pub use unsettled::{Ticket, Unsettled};
pub use writer::{
    CaptureCounters, CaptureMode, CounterSnapshot, TraceWriter, WriterConfig, WriterTask,
};

/// Traces by id (a ULID as u128, so key order is time order); values are JSON.
const TRACES: TableDefinition<u128, &[u8]> = TableDefinition::new("traces");
/// Feedback by (trace id, feedback id); the last entry of a trace is the latest.
const FEEDBACK: TableDefinition<(u128, u128), &[u8]> = TableDefinition::new("feedback");
/// Feedback in the order it arrived: feedback id → trace id. Feedback ids are made inside the
/// write transaction that stores them, one writer at a time, so id order is commit order, and a
/// snapshot holds exactly the feedback up to its last id here (datasets rely on that to find
/// feedback that came after their cut: see `GradedScan::late`).
const FEEDBACK_ORDER: TableDefinition<u128, u128> = TableDefinition::new("feedback_order");
/// Evaluation results by (trace id, evaluation id).
const EVALUATIONS: TableDefinition<(u128, u128), &[u8]> = TableDefinition::new("evaluations");
/// The routing table in force, under the key `current`.
const ROUTES: TableDefinition<&str, &[u8]> = TableDefinition::new("routes");
/// Every accepted routing change, by table version.
const ROUTE_HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("route_history");
/// Distillation jobs by id.
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// The model registry by model id.
const MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("models");
/// Small named values: cursors and the like.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Every table's name, as [`Store::from_db`] creates them.
const TABLES: [&str; 9] = [
    "traces",
    "feedback",
    "feedback_order",
    "evaluations",
    "routes",
    "route_history",
    "jobs",
    "models",
    "meta",
];

/// The META key of the store's format version.
const FORMAT_KEY: &str = "format";

/// The version of the store's layout (its tables, keys and values) that this build writes. A
/// change that an older build would misread raises it; a store from a newer build is refused
/// rather than misread or written to. Stores from before the version was kept are format 1.
pub const STORE_FORMAT: u64 = 1;

/// redb's page cache unless configured (`capture.cache_mb`): enough for the writer's working
/// set; scans of a large file stay within it.
pub const DEFAULT_CACHE_BYTES: usize = 128 * 1024 * 1024;

/// The file name inside `capture.data_dir`.
pub const STORE_FILE: &str = "forge.redb";

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (usually a running gateway) has the file open.
    #[error(
        "the store {0} is open in another process (a running gateway, or a `forge traces` or `forge dataset export` still reading it): a second gateway needs a `capture.data_dir` of its own, and the CLI can read a running gateway's traces through its admin API (`forge traces --admin URL`)"
    )]
    InUse(PathBuf),
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// redb failed.
    #[error("store error: {0}")]
    Redb(#[from] redb::Error),
    /// A stored value could not be decoded.
    #[error("corrupt record: {0}")]
    Decode(#[from] serde_json::Error),
    /// The trace does not exist.
    #[error("no trace with id {0}")]
    NoSuchTrace(TraceId),
    /// The trace has all the feedback it may take ([`MAX_FEEDBACK_PER_TRACE`]).
    #[error("trace {0} already has {max} pieces of feedback, the most one trace takes", max = MAX_FEEDBACK_PER_TRACE)]
    FeedbackFull(TraceId),
    /// A command that only reads found no store where it was pointed.
    #[error(
        "no store at {0} (is the data directory right? the gateway creates it when it first starts with capture on)"
    )]
    NoStore(PathBuf),
    /// A new store file could not be put in place.
    #[error("cannot create the store {0}: {1}")]
    Create(PathBuf, std::io::Error),
    /// The file is being reopened after an I/O error or a write that panicked.
    #[error("the store {0} is being reopened after an error (see the log)")]
    Closed(PathBuf),
    /// The file could not be opened: it cannot be read, is not a store, or is cut short.
    #[error("cannot open the store {0}: {1}")]
    Open(PathBuf, String),
    /// Opening the file failed inside redb on a page it could not make sense of.
    #[error(
        "the store {0} is damaged ({1}): move it aside (or restore a backup), and the gateway makes a new one at its next start"
    )]
    Damaged(PathBuf, String),
    /// A command that only reads met a store a crash left unrecovered, and may not write it.
    #[error(
        "the store {0} was not closed cleanly, and recovering it writes to it: run the command as a user who may write the file, or start the gateway on it once"
    )]
    NeedsRecovery(PathBuf),
    /// The store was opened read-only (by a command that only reads), and something wrote.
    #[error("the store {0} was opened read-only")]
    ReadOnly(PathBuf),
    /// The store was written by a newer Forge, in a layout this build does not know.
    #[error(
        "the store {path} has format {found}, and this build of Forge reads format {STORE_FORMAT} at most: run the newer Forge that wrote it, or point `capture.data_dir` elsewhere"
    )]
    NewerFormat { path: PathBuf, found: u64 },
}

impl StoreError {
    /// Whether the store is, or is about to be, reopened after an I/O error: an operation may
    /// succeed if tried again shortly.
    pub fn is_transient(&self) -> bool {
        self.is_io()
            || matches!(
                self,
                StoreError::Closed(_) | StoreError::Redb(redb::Error::DatabaseClosed)
            )
    }

    /// An I/O error, after which redb refuses every operation until the file is reopened.
    fn is_io(&self) -> bool {
        matches!(
            self,
            StoreError::Redb(redb::Error::Io(_) | redb::Error::PreviousIo)
        )
    }
}

/// The format version the META table of the store at `path` records, if it records one. One
/// that cannot be read is damage: no build can tell what the store holds.
fn format_of(
    path: &Path,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<u64>, StoreError> {
    let Some(value) = meta.get(FORMAT_KEY).map_err(db_err)? else {
        return Ok(None);
    };
    serde_json::from_slice(value.value())
        .map(Some)
        .map_err(|e| {
            StoreError::Damaged(
                path.to_path_buf(),
                format!("its format version is unreadable: {e}"),
            )
        })
}

/// Whether this process may open `path` for writing (opening it so changes nothing).
fn may_write(path: &Path) -> bool {
    !matches!(
        std::fs::OpenOptions::new().read(true).write(true).open(path),
        Err(e) if matches!(
            e.kind(),
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
        )
    )
}

/// Refuses the store at `path` if a newer build wrote it.
fn check_format(path: &Path, found: u64) -> Result<(), StoreError> {
    if found > STORE_FORMAT {
        return Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found,
        });
    }
    Ok(())
}

fn db_err<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Redb(e.into())
}

/// A handle to the open store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<OpenDb>,
    /// Trace ids the writer has issued and not yet committed.
    unsettled: Arc<Unsettled>,
}

impl Store {
    /// Opens (or creates) `DIR/forge.redb`, creating `DIR` if needed, with the default cache.
    pub fn open_dir(dir: &Path) -> Result<Self, StoreError> {
        Self::open_dir_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens `DIR/forge.redb` read-only, for a command that reads it: it then needs only read
    /// access to the file, and changes nothing in it. A store a crash left unrecovered is opened
    /// for writing instead, which recovers it, as the gateway's next start would. A directory
    /// without one is an error, not a new empty store (a mistyped `--data-dir` would otherwise
    /// quietly show nothing).
    pub fn open_existing_dir(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(STORE_FILE);
        match std::fs::metadata(&path) {
            // Opening an empty file would make it a new store: it is what a copy or a restore
            // cut short leaves, not one a gateway wrote.
            Ok(meta) if meta.is_file() && meta.len() == 0 => Err(StoreError::Open(
                path,
                "the file is empty, as a copy or a restore cut short leaves one".into(),
            )),
            Ok(meta) if meta.is_file() => {
                let read_only = OpenDb::open_read_only(&path, DEFAULT_CACHE_BYTES)
                    .and_then(Self::from_db)
                    .and_then(|store| match store.missing_table()? {
                        None => Ok(store),
                        Some(_) => Err(StoreError::NeedsRecovery(path.clone())),
                    });
                match read_only {
                    // Left by a crash, or by a build that had fewer tables: open it as the
                    // gateway does, which recovers it (quickly, from the allocator state every
                    // commit saves) and adds the tables, if this user may write it.
                    Err(StoreError::NeedsRecovery(_)) if !may_write(&path) => {
                        Err(StoreError::NeedsRecovery(path))
                    }
                    Err(StoreError::NeedsRecovery(_)) => Self::open(&path, DEFAULT_CACHE_BYTES),
                    other => other,
                }
            }
            Ok(_) => Err(StoreError::NoStore(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NoStore(path)),
            // Permission denied, say: the store is there, and this is why it cannot be read.
            Err(e) => Err(StoreError::Open(path, e.to_string())),
        }
    }

    /// Like [`Store::open_dir`], with redb's page cache capped at `cache_bytes`. The cache bounds
    /// the memory a full scan (an export, a dataset) takes, however large the file.
    pub fn open_dir_with_cache(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        Self::open(&dir.join(STORE_FILE), cache_bytes)
    }

    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        Self::from_db(OpenDb::open(path, cache_bytes)?)
    }

    /// Opens (or creates) a store on a redb storage backend other than a file: in memory, or
    /// one that injects failures in tests. `name` stands for the path in messages. After an
    /// I/O error the store reopens on a clone of `backend`, which must reach the same storage.
    pub fn open_backend<B>(name: &Path, backend: B, cache_bytes: usize) -> Result<Self, StoreError>
    where
        B: redb::StorageBackend + Clone,
    {
        Self::from_db(OpenDb::open_backend(name, backend, cache_bytes)?)
    }

    fn from_db(db: OpenDb) -> Result<Self, StoreError> {
        let store = Self {
            db: Arc::new(db),
            unsettled: Arc::default(),
        };
        if store.db.is_read_only() {
            check_format(store.path(), store.format()?)?;
            return Ok(store);
        }
        // Create the tables up front so that readers never meet a missing table.
        store.write(|txn| {
            txn.open_table(TRACES).map_err(db_err)?;
            let feedback = txn.open_table(FEEDBACK).map_err(db_err)?;
            let mut order = txn.open_table(FEEDBACK_ORDER).map_err(db_err)?;
            // A store from before the order was kept: its feedback goes in once, so that no
            // dataset mistakes it for new.
            if order.is_empty().map_err(db_err)? {
                for entry in feedback.iter().map_err(db_err)? {
                    let (trace, id) = entry.map_err(db_err)?.0.value();
                    order.insert(id, trace).map_err(db_err)?;
                }
            }
            txn.open_table(EVALUATIONS).map_err(db_err)?;
            txn.open_table(ROUTES).map_err(db_err)?;
            txn.open_table(ROUTE_HISTORY).map_err(db_err)?;
            txn.open_table(JOBS).map_err(db_err)?;
            txn.open_table(MODELS).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            match format_of(store.path(), &meta)? {
                Some(found) => check_format(store.path(), found),
                None => {
                    let current = STORE_FORMAT.to_string();
                    meta.insert(FORMAT_KEY, current.as_bytes())
                        .map_err(db_err)?;
                    Ok(())
                }
            }
        })?;
        if let Some(floor) = store.id_floor()? {
            TraceId::keep_above(floor);
        }
        Ok(store)
    }

    /// The first of this build's tables the store lacks, if any: a store last opened for
    /// writing by a build from before that table.
    fn missing_table(&self) -> Result<Option<&'static str>, StoreError> {
        let present: Vec<String> = self.read(|txn| {
            Ok(txn
                .list_tables()
                .map_err(db_err)?
                .map(|table| redb::TableHandle::name(&table).to_string())
                .collect())
        })?;
        Ok(TABLES
            .into_iter()
            .find(|name| !present.iter().any(|p| p == name)))
    }

    /// The format version the store is written in ([`STORE_FORMAT`] once this build opened it
    /// for writing; 1 for a store from before the version was kept).
    pub fn format(&self) -> Result<u64, StoreError> {
        self.read(|txn| match txn.open_table(META) {
            Ok(meta) => format_of(self.path(), &meta),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(db_err(e)),
        })
        .map(|found| found.unwrap_or(1))
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// How many times opening this store (at first, or again after an error) repaired its file
    /// in full. Stays 0 for a file only Forge wrote, even after `kill -9` or a power cut: every
    /// commit saves what a reopen needs (quick repair). A write that panicked is the exception:
    /// the store is reopened at once, and that reopen repairs it.
    pub fn full_repairs(&self) -> u64 {
        self.db.full_repairs()
    }

    /// The trace ids on their way to this store.
    pub fn unsettled(&self) -> &Arc<Unsettled> {
        &self.unsettled
    }

    /// Runs `f` in one durable write transaction. An I/O error starts a reopen of the file (see
    /// `store/open.rs`); the error is returned, and the caller decides whether to try again. A
    /// panic starts a reopen too, and goes on to the caller.
    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Handle { db, generation } = self.db.handle()?;
        let begun = match db.writable() {
            Some(db) => db.begin_write().map_err(db_err),
            None => Err(StoreError::ReadOnly(self.path().to_path_buf())),
        };
        drop(db);
        let written = std::panic::catch_unwind(AssertUnwindSafe(|| {
            begun.and_then(|mut txn| {
                txn.set_two_phase_commit(true);
                txn.set_quick_repair(true);
                txn.set_durability(Durability::Immediate).map_err(db_err)?;
                let out = f(&txn)?;
                txn.commit().map_err(db_err)?;
                Ok(out)
            })
        }));
        let written = written.unwrap_or_else(|panic| {
            // The transaction was dropped mid-way, after which redb saves no allocator state
            // until the file is reopened: the next crash would cost a full repair.
            self.db.restart(generation, "a store write panicked");
            std::panic::resume_unwind(panic)
        });
        if let Err(e) = &written {
            self.db.failed(generation, e);
        }
        written
    }

    /// Runs `f` in one read transaction; an I/O error starts a reopen, as in [`Store::write`].
    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Handle { db, generation } = self.db.handle()?;
        let begun = db.begin_read().map_err(db_err);
        drop(db);
        let read = begun.and_then(|txn| f(&txn));
        if let Err(e) = &read {
            self.db.failed(generation, e);
        }
        read
    }

    /// Holds redb's write lock until the guard is dropped; every writer waits meanwhile. For
    /// fault-injection tests (a stalled store) and maintenance.
    pub fn hold_write_lock(&self) -> Result<WriteLock, StoreError> {
        let Handle { db, .. } = self.db.handle()?;
        let db = db
            .writable()
            .ok_or_else(|| StoreError::ReadOnly(self.path().to_path_buf()))?;
        Ok(WriteLock(Some(db.begin_write().map_err(db_err)?)))
    }

    /// Stores already-encoded traces in one transaction: all of them or none.
    pub fn insert_encoded<'a>(
        &self,
        batch: impl IntoIterator<Item = (TraceId, &'a [u8])>,
    ) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(TRACES).map_err(db_err)?;
            for (id, bytes) in batch {
                table.insert(id.as_u128(), bytes).map_err(db_err)?;
            }
            Ok(())
        })
    }

    /// One trace.
    pub fn trace(&self, id: TraceId) -> Result<Option<Trace>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(TRACES).map_err(db_err)?;
            match table.get(id.as_u128()).map_err(db_err)? {
                Some(v) => Ok(Some(Trace::decode(v.value())?)),
                None => Ok(None),
            }
        })
    }

    /// Whether a trace exists.
    pub fn has_trace(&self, id: TraceId) -> Result<bool, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(TRACES).map_err(db_err)?;
            Ok(table.get(id.as_u128()).map_err(db_err)?.is_some())
        })
    }

    /// How many traces are stored.
    pub fn trace_count(&self) -> Result<u64, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(TRACES).map_err(db_err)?;
            table.len().map_err(db_err)
        })
    }

    /// Up to `limit` traces, newest first, older than `before` when given, that pass `keep`.
    pub fn recent_traces(
        &self,
        before: Option<TraceId>,
        limit: usize,
        mut keep: impl FnMut(&Trace) -> bool,
    ) -> Result<Vec<Trace>, StoreError> {
        let mut out = Vec::new();
        if limit > 0 {
            self.newest_traces(before, |trace| {
                if keep(&trace) {
                    out.push(trace);
                }
                out.len() < limit
            })?;
        }
        Ok(out)
    }

    /// Calls `f` on the traces older than `before` (all, without it), newest first, one at a
    /// time; `f` returns `false` to stop.
    pub fn newest_traces(
        &self,
        before: Option<TraceId>,
        mut f: impl FnMut(Trace) -> bool,
    ) -> Result<(), StoreError> {
        self.read(|txn| {
            let table = txn.open_table(TRACES).map_err(db_err)?;
            let upper = before.map_or(u128::MAX, TraceId::as_u128);
            for entry in table.range(..upper).map_err(db_err)?.rev() {
                let (_, v) = entry.map_err(db_err)?;
                if !f(Trace::decode(v.value())?) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// Calls `f` on every trace, oldest first, one at a time: memory stays flat however many
    /// traces there are. `f` returns `false` to stop early.
    pub fn for_each_trace(&self, mut f: impl FnMut(Trace) -> bool) -> Result<(), StoreError> {
        self.read(|txn| {
            let table = txn.open_table(TRACES).map_err(db_err)?;
            for entry in table.iter().map_err(db_err)? {
                let (_, v) = entry.map_err(db_err)?;
                if !f(Trace::decode(v.value())?) {
                    break;
                }
            }
            Ok(())
        })
    }
}

/// See [`Store::hold_write_lock`].
pub struct WriteLock(Option<redb::WriteTransaction>);

impl std::fmt::Debug for WriteLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteLock")
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        if let Some(txn) = self.0.take() {
            let _ = txn.abort();
        }
    }
}

#[cfg(test)]
mod tests;
