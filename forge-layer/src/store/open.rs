//! The open redb file, reopened in the background after an I/O error or a write that panicked.
//!
//! After one I/O error (a full disk, say) redb refuses every later operation until the file is
//! closed and opened again. So the first operation to meet one takes the database out of its
//! slot, and a thread of its own closes the file and opens it again, retrying until it can.
//! Capture resumes as soon as the disk has room, with no restart; nobody waits for the reopen:
//! meanwhile operations fail at once with [`StoreError::Closed`]. A write transaction dropped
//! by a panic is handled the same way: redb then stops saving the allocator state with each
//! commit until the file is reopened, so the next crash would cost a full repair; the reopen
//! does that repair at once instead.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard};
use std::time::Duration;

use redb::{Builder, Database, ReadOnlyDatabase, ReadableDatabase, RepairSession};

use super::StoreError;

/// The first pause between two attempts to reopen; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Opens the database: its file, or another redb storage backend.
type Opener = Box<dyn Fn() -> Result<Db, StoreError> + Send + Sync>;

/// An open database: writable, as the gateway has it, or read-only, as the CLI's reading
/// commands open it (they then need only read access to the file, and change nothing in it).
pub(super) enum Db {
    Writable(Database),
    ReadOnly(ReadOnlyDatabase),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Db::Writable(_) => "Db::Writable",
            Db::ReadOnly(_) => "Db::ReadOnly",
        })
    }
}

impl Db {
    pub(super) fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            Db::Writable(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        }
    }

    /// The database to write to; `None` when it was opened read-only.
    pub(super) fn writable(&self) -> Option<&Database> {
        match self {
            Db::Writable(db) => Some(db),
            Db::ReadOnly(_) => None,
        }
    }
}

/// The database file and, while it is open, its handle.
pub(super) struct OpenDb {
    path: PathBuf,
    opener: Opener,
    slot: RwLock<Slot>,
    full_repairs: Arc<AtomicU64>,
    read_only: bool,
}

impl std::fmt::Debug for OpenDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenDb")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Slot {
    /// `None` while a reopen runs.
    db: Option<Arc<Db>>,
    /// Counts the openings, so that a failure reported late never closes a newer opening.
    generation: u64,
}

/// The database for one operation, and the opening it belongs to. Drop `db` as soon as the
/// transaction has begun: a reopen waits for every handle to be gone before it closes the file.
pub(super) struct Handle {
    pub(super) db: Arc<Db>,
    pub(super) generation: u64,
}

impl OpenDb {
    /// Opens (or creates) the file.
    pub(super) fn open(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        Self::on_file(path, cache_bytes, |file, builder| {
            open_database(file, &builder).map(Db::Writable)
        })
    }

    /// Opens an existing file read-only. A file that was not closed cleanly is refused
    /// ([`StoreError::NeedsRecovery`]): even the quick recovery writes to it.
    pub(super) fn open_read_only(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        Self::on_file(path, cache_bytes, |file, builder| {
            builder
                .open_read_only(file)
                .map(Db::ReadOnly)
                .map_err(|e| open_error(file, e))
        })
    }

    /// Opens the file at `path` with `open_file`, given a builder set up for it.
    fn on_file(
        path: &Path,
        cache_bytes: usize,
        open_file: fn(&Path, Builder) -> Result<Db, StoreError>,
    ) -> Result<Self, StoreError> {
        let full_repairs = Arc::default();
        let open = counting_repairs(path, cache_bytes, &full_repairs);
        let file = path.to_path_buf();
        Self::with_opener(
            path,
            Box::new(move || open(&|builder| open_file(&file, builder))),
            full_repairs,
        )
    }

    /// Whether the database was opened read-only.
    pub(super) fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Opens (or creates) a database on `backend`, named `name` in messages. A reopen starts
    /// from a clone of it, which must reach the same storage.
    pub(super) fn open_backend<B>(
        name: &Path,
        backend: B,
        cache_bytes: usize,
    ) -> Result<Self, StoreError>
    where
        B: redb::StorageBackend + Clone,
    {
        let full_repairs = Arc::default();
        let open = counting_repairs(name, cache_bytes, &full_repairs);
        Self::with_opener(
            name,
            Box::new(move || {
                open(&|builder| {
                    builder
                        .create_with_backend(backend.clone())
                        .map(Db::Writable)
                        .map_err(super::db_err)
                })
            }),
            full_repairs,
        )
    }

    fn with_opener(
        path: &Path,
        opener: Opener,
        full_repairs: Arc<AtomicU64>,
    ) -> Result<Self, StoreError> {
        let db = open_guarded(path, &opener)?;
        Ok(Self {
            path: path.to_path_buf(),
            opener,
            read_only: db.writable().is_none(),
            slot: RwLock::new(Slot {
                db: Some(Arc::new(db)),
                generation: 0,
            }),
            full_repairs,
        })
    }

    /// How many of this store's openings (the first, and any reopen after an error) repaired
    /// the file in full.
    pub(super) fn full_repairs(&self) -> u64 {
        self.full_repairs.load(Ordering::Relaxed)
    }

    /// The file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The database to begin a transaction on.
    pub(super) fn handle(&self) -> Result<Handle, StoreError> {
        let slot = self.slot.read().unwrap_or_else(PoisonError::into_inner);
        match &slot.db {
            Some(db) => Ok(Handle {
                db: Arc::clone(db),
                generation: slot.generation,
            }),
            None => Err(StoreError::Closed(self.path.clone())),
        }
    }

    /// Reports how an operation on opening `generation` failed: an I/O error starts a reopen,
    /// unless one has started since.
    pub(super) fn failed(self: &Arc<Self>, generation: u64, error: &StoreError) {
        if error.is_io() {
            self.restart(generation, &format!("store I/O error ({error})"));
        }
    }

    /// Closes opening `generation` and opens the file again in the background, unless a reopen
    /// has started since; `why` goes to the log.
    pub(super) fn restart(self: &Arc<Self>, generation: u64, why: &str) {
        let mut slot = self.lock();
        if slot.generation != generation {
            return;
        }
        let Some(old) = slot.db.take() else {
            return;
        };
        drop(slot);
        tracing::error!(path = %self.path.display(), "{why}: reopening the file");
        let this = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("forge-store-reopen".into())
            .spawn(move || this.reopen(old));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no thread to reopen the store; it stays closed");
        }
    }

    fn reopen(self: Arc<Self>, mut old: Arc<Db>) {
        // Others hold a handle only until they have begun a transaction.
        let db = loop {
            match Arc::try_unwrap(old) {
                Ok(db) => break db,
                Err(shared) => {
                    old = shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        // Closes the file now, or when a write transaction still running ends.
        drop(db);
        let mut pause = FIRST_PAUSE;
        let mut attempts = 0u64;
        // Until it opens, or the store is gone (this thread holds the last reference).
        while Arc::strong_count(&self) > 1 {
            attempts += 1;
            match open_guarded(&self.path, &self.opener) {
                Ok(db) => {
                    let mut slot = self.lock();
                    slot.db = Some(Arc::new(db));
                    slot.generation += 1;
                    tracing::warn!(path = %self.path.display(), attempts, "store reopened");
                    return;
                }
                Err(e) => {
                    // A transaction that began before the error may still hold the file, or
                    // the disk may still refuse: say so once, then keep trying quietly.
                    if attempts == 1 {
                        tracing::error!(path = %self.path.display(), error = %e, "store cannot be reopened yet; retrying");
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }

    fn lock(&self) -> RwLockWriteGuard<'_, Slot> {
        self.slot.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Wraps the opens of the store `name`: the function returned gives the open it is called with a
/// redb builder (page cache capped at `cache_bytes`, a full repair's progress logged), and
/// counts a full repair in `full_repairs` once that open has worked.
///
/// Every commit saves the allocator state (quick repair), so an open after `kill -9` or a power
/// cut reads that instead of walking the whole file. A full repair is then left for a file last
/// written without it, or one whose saved state does not verify. On a large file it takes long
/// enough that an operator wants to know why the gateway is not up yet.
fn counting_repairs(
    name: &Path,
    cache_bytes: usize,
    full_repairs: &Arc<AtomicU64>,
) -> impl Fn(&dyn Fn(Builder) -> Result<Db, StoreError>) -> Result<Db, StoreError> + Send + Sync + 'static
{
    let name = name.to_path_buf();
    let full_repairs = Arc::clone(full_repairs);
    move |open| {
        let repaired = Arc::new(AtomicBool::new(false));
        let (seen, name) = (Arc::clone(&repaired), name.clone());
        let mut builder = Database::builder();
        builder
            .set_cache_size(cache_bytes)
            .set_repair_callback(move |session: &mut RepairSession| {
                // redb reports 0 as the repair starts, then once after each pass over the file.
                if session.progress() < f64::EPSILON {
                    seen.store(true, Ordering::Relaxed);
                    tracing::warn!(path = %name.display(), "the store's saved allocator state is missing or does not verify: repairing the whole file, which reads all of it");
                } else {
                    tracing::warn!(path = %name.display(), "repairing the store: {:.0}% done", session.progress() * 100.0);
                }
            });
        let db = open(builder)?;
        // Counted once it has worked: a repair that failed is tried again by the next open.
        if repaired.load(Ordering::Relaxed) {
            full_repairs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(db)
    }
}

/// Calls `opener`. A damaged file can make redb panic while it opens it ("unreachable code");
/// that becomes an error naming the file, and a reopen after an I/O error keeps trying instead
/// of losing its thread.
fn open_guarded(path: &Path, opener: &Opener) -> Result<Db, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(opener)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("redb panicked");
        Err(StoreError::Damaged(path.to_path_buf(), message.to_string()))
    })
}

/// Opens (or creates) the file, telling "another process has it" apart from other failures.
fn open_database(path: &Path, builder: &Builder) -> Result<Database, StoreError> {
    let fresh = fresh_path(path);
    // A failure to tell counts as "there": opening it then reports the real error.
    if matches!(path.try_exists(), Ok(false)) {
        // A link to a file that is not there (a volume not mounted yet): a new store in its
        // place would hide the real one, and the routes and jobs it holds.
        if let Ok(target) = std::fs::read_link(path) {
            return Err(StoreError::Open(
                path.to_path_buf(),
                format!(
                    "it is a symbolic link to {}, which does not exist (not mounted yet?)",
                    target.display()
                ),
            ));
        }
        create_whole(path, &fresh)?;
    }
    // Left by a creation cut short, or the file's second name if the cut came after the link.
    let _ = std::fs::remove_file(&fresh);
    // The file's name is durable before anything is acknowledged under it, even if the process
    // that made it died before it could see to that.
    sync_dir(path);
    builder.create(path).map_err(|e| open_error(path, e))
}

/// Where a new store file is made before it takes its name.
fn fresh_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

/// Creates a new store file as a whole: redb writes its first state under `fresh`, syncs it,
/// and only then does the file appear at `path`. A power cut while redb is still writing that
/// state leaves a file it cannot open ("not a redb database"); under the other name it is just
/// made again. A link, not a rename, so that two processes starting at once cannot replace
/// each other's file: the second finds `path` taken and opens that.
fn create_whole(path: &Path, fresh: &Path) -> Result<(), StoreError> {
    let created = Database::create(fresh).or_else(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => Err(e),
        // A leftover from a cut creation.
        _ => {
            let _ = std::fs::remove_file(fresh);
            Database::create(fresh)
        }
    });
    // Another process is making the store right now: it is as busy as an open one.
    drop(created.map_err(|e| open_error(path, e))?);
    if let Err(e) = std::fs::hard_link(fresh, path) {
        match path.try_exists() {
            // Another process put its file there first (it may even have taken this one).
            Ok(true) => {}
            // A filesystem without hard links (FAT, some network shares): a plain rename,
            // which a second process starting at the same instant could undo; neither file
            // holds data yet.
            _ if e.kind() != std::io::ErrorKind::NotFound => std::fs::rename(fresh, path)
                .map_err(|e| StoreError::Create(path.to_path_buf(), e))?,
            _ => return Err(StoreError::Create(path.to_path_buf(), e)),
        }
    }
    Ok(())
}

/// Makes the directory entry of `path` durable. Some filesystems cannot sync a directory; they
/// get a warning, not a store that will not open.
fn sync_dir(path: &Path) {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not sync the store's directory; a power cut could lose a new store file's name");
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(path.to_path_buf()),
        // Only a read-only open declines a recovery.
        redb::DatabaseError::RepairAborted => StoreError::NeedsRecovery(path.to_path_buf()),
        other => StoreError::Open(path.to_path_buf(), other.to_string()),
    }
}
