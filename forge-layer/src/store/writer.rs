//! The single trace writer: a bounded queue in, one redb transaction per batch out.
//!
//! The request path only ever calls [`TraceWriter::submit`], which never blocks in `async` mode:
//! a full queue drops the trace and counts it. The queue is bounded in traces and in bytes: a
//! trace holds its bytes' worth of the budget until its commit settles, so a burst of large
//! exchanges cannot hold unbounded memory while the store is slow. Every trace handed to
//! `submit` ends up in exactly one of `captured`, `dropped` or `failed`, so once the queue is
//! drained `captured + dropped + failed == eligible` holds exactly.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::commit_lane::{CommitLane, LIFT_AFTER, LaneWork};
use super::commit_times::{CommitTimes, CommitTimesSnapshot};
use super::lanes::{Lanes, PATIENCE};
use super::{Store, StoreError, Ticket, Unsettled};
use crate::capture::{DurableAck, PendingTrace};
use crate::redact::Redactor;
use crate::trace::TraceId;

/// What the end of a response waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureMode {
    /// Never wait: a full queue drops the trace (counted).
    #[default]
    Async,
    /// The response's end waits for the commit that holds its trace.
    Durable,
}

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// `async` or `durable`.
    pub mode: CaptureMode,
    /// Traces that may wait for the writer.
    pub queue_capacity: usize,
    /// Bytes of exchanges (request and response as received) that may wait for the writer or
    /// for their commit; at most `u32::MAX`. A trace larger than this takes all of it. Each
    /// trace holds its raw size until its commit settles, though once encoded it takes its
    /// encoded size instead, usually less: the figure is an upper bound on what queued traces
    /// hold, give or take the writer's buffers. A `durable` trace waiting for room is not in it:
    /// its response holds it, and the in-flight cap bounds those.
    pub queue_bytes: usize,
    /// At most this many traces per transaction.
    pub batch_max: usize,
    /// In `async` mode, how long a trace may wait for its commit: traces are encoded as they
    /// come (every few milliseconds) and committed together once per interval, or as soon as
    /// `batch_max` are ready, since a commit (two fsyncs) costs much the same for one trace or
    /// thousands. `durable` commits as soon as encoded traces are ready and no commit runs: a
    /// client waits on each commit.
    pub flush_interval: Duration,
    /// What to redact before the write.
    pub redactor: Redactor,
    /// The cap on one SSE event while reassembling.
    pub max_event_bytes: usize,
    /// In `async` mode, encode on a thread in the idle scheduling class, so that the writer's
    /// encoding takes no CPU that request handling wants, until it falls behind (see
    /// `store/lanes.rs`), and commit on another, lifted to the normal class when a commit must
    /// not wait (see `store/commit_lane.rs`). Off: on tokio's blocking pool, at normal priority.
    pub idle_priority: bool,
    /// In `durable` mode, the longest a response's end waits for the commit of its trace (and
    /// first, when the queue is full, for room in it); past it the wait counts as a failed
    /// commit, and the response is cut short. A stalled disk would otherwise hold every
    /// response, and the in-flight slots with them, for good. A trace already queued is still
    /// written.
    pub durable_wait: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            mode: CaptureMode::Async,
            // About four seconds of a saturated 2-core gateway (17k exchanges/s): 8192, half a
            // second, overflowed in stalls of the writer there. Memory stays bounded by
            // `queue_bytes`, which holds every waiting trace's size.
            queue_capacity: 65_536,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            batch_max: 2048,
            flush_interval: Duration::from_millis(50),
            redactor: Redactor::default(),
            max_event_bytes: 1 << 20,
            idle_priority: true,
            durable_wait: Duration::from_secs(30),
        }
    }
}

/// The queue's byte budget unless configured (`capture.queue_mb`): far above what thousands of
/// ordinary exchanges take, and far below what as many long-context ones could.
pub const DEFAULT_QUEUE_BYTES: usize = 256 * 1024 * 1024;

/// The capture counters, and the queue's byte budget.
#[derive(Debug)]
pub struct CaptureCounters {
    eligible: AtomicU64,
    captured: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    /// A permit per byte a queued trace holds, from `submit` until its commit settles.
    room: Arc<Semaphore>,
    room_total: usize,
    /// Drops, told in the log at most once a second.
    drop_log: DropLog,
    /// How long commits take (`forge_capture_commit_seconds`).
    commit_times: CommitTimes,
    /// The most traces one transaction held, for tests of `batch_max`.
    #[cfg(test)]
    pub(super) largest_commit: AtomicU64,
    /// For tests of the commit lane's use: whether it started, commits queued on it, lifts
    /// that took effect (as of the writer's last look), and commits that ended on the commit
    /// thread in the normal class.
    #[cfg(test)]
    pub(super) lane_ready: std::sync::atomic::AtomicBool,
    #[cfg(test)]
    pub(super) lane_commits: AtomicU64,
    #[cfg(test)]
    pub(super) lifts_done: AtomicU64,
    #[cfg(test)]
    pub(super) lifted_commits: AtomicU64,
    /// Encodes sent to the blocking pool for their size ([`IDLE_MAX_BYTES`]).
    #[cfg(test)]
    pub(super) heavy_encodes: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    /// Exchanges that finished and were handed to the writer.
    pub eligible: u64,
    /// Committed to the store.
    pub captured: u64,
    /// Dropped because the queue was full (or the writer had stopped).
    pub dropped: u64,
    /// Lost to a failed commit (after retries).
    pub failed: u64,
    /// Queued or being written: `eligible - captured - dropped - failed`.
    pub pending: u64,
    /// The bytes those pending traces hold of the queue's budget.
    pub queued_bytes: u64,
}

impl CaptureCounters {
    fn new(queue_bytes: usize) -> Self {
        // A u32 of permits at most per trace, and tokio's own cap (smaller on 32-bit targets).
        let room_total = queue_bytes.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self {
            eligible: AtomicU64::new(0),
            captured: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            room: Arc::new(Semaphore::new(room_total)),
            room_total,
            drop_log: DropLog::default(),
            commit_times: CommitTimes::default(),
            #[cfg(test)]
            largest_commit: AtomicU64::new(0),
            #[cfg(test)]
            lane_ready: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            lane_commits: AtomicU64::new(0),
            #[cfg(test)]
            lifts_done: AtomicU64::new(0),
            #[cfg(test)]
            lifted_commits: AtomicU64::new(0),
            #[cfg(test)]
            heavy_encodes: AtomicU64::new(0),
        }
    }

    /// The budget `trace` takes: its bytes, or the whole budget if it is larger.
    fn room_for(&self, trace: &PendingTrace) -> u32 {
        u32::try_from(trace.held_bytes().min(self.room_total)).unwrap_or(u32::MAX)
    }

    /// Reads all four counters. `eligible` is read last, so `pending` is never negative.
    pub fn snapshot(&self) -> CounterSnapshot {
        let captured = self.captured.load(Ordering::Acquire);
        let dropped = self.dropped.load(Ordering::Acquire);
        let failed = self.failed.load(Ordering::Acquire);
        let eligible = self.eligible.load(Ordering::Acquire);
        CounterSnapshot {
            eligible,
            captured,
            dropped,
            failed,
            pending: eligible.saturating_sub(captured + dropped + failed),
            queued_bytes: self
                .room_total
                .saturating_sub(self.room.available_permits()) as u64,
        }
    }

    /// Drops not yet told in the log.
    #[cfg(test)]
    pub(super) fn unreported_drops(&self) -> u64 {
        self.drop_log.unreported()
    }

    /// How long the commits so far took.
    pub fn commit_times(&self) -> CommitTimesSnapshot {
        self.commit_times.snapshot()
    }
}

struct Job {
    trace: PendingTrace,
    ack: Option<oneshot::Sender<bool>>,
    /// Its share of the byte budget, returned when its commit settles.
    room: OwnedSemaphorePermit,
}

/// What a durable trace that found the queue full waits for.
enum Waiting {
    /// Bytes in the budget.
    Room(PendingTrace, Option<oneshot::Sender<bool>>),
    /// A place in the queue, with its bytes already held.
    Slot(Job),
}

/// The handle the capture layer submits to. Cheap to clone. The writer stops, after writing
/// what is queued, when every handle is dropped.
#[derive(Debug, Clone)]
pub struct TraceWriter {
    tx: mpsc::Sender<Job>,
    counters: Arc<CaptureCounters>,
    mode: CaptureMode,
    durable_wait: Duration,
    unsettled: Arc<Unsettled>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("trace", &self.trace.id())
            .finish()
    }
}

/// The writer's task; await [`WriterTask::join`] after dropping every [`TraceWriter`] to flush.
#[derive(Debug)]
pub struct WriterTask(JoinHandle<()>);

impl WriterTask {
    /// Waits until everything queued is written.
    pub async fn join(self) {
        if let Err(e) = self.0.await {
            tracing::error!(error = %e, "trace writer task failed");
        }
    }
}

impl TraceWriter {
    /// Starts the writer on `store`.
    pub fn start(store: Store, config: WriterConfig) -> (TraceWriter, WriterTask) {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let counters = Arc::new(CaptureCounters::new(config.queue_bytes));
        let writer = TraceWriter {
            tx,
            counters: Arc::clone(&counters),
            mode: config.mode,
            durable_wait: config.durable_wait,
            unsettled: Arc::clone(store.unsettled()),
        };
        let task = tokio::spawn(run(store, config, rx, counters));
        (writer, WriterTask(task))
    }

    /// The mode.
    pub fn mode(&self) -> CaptureMode {
        self.mode
    }

    /// The id for an exchange that is starting, tracked until its trace is committed (or
    /// dropped, or failed).
    pub fn ticket(&self) -> Ticket {
        self.unsettled.issue()
    }

    /// The counters now.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// The live counters, readable after every writer handle is gone (for metrics and shutdown).
    pub fn counters_handle(&self) -> Arc<CaptureCounters> {
        Arc::clone(&self.counters)
    }

    /// Hands a finished exchange to the writer; never blocks.
    ///
    /// In `async` mode it returns `None`, and a full queue (in traces or in bytes) drops the
    /// trace (counted). In `durable` mode it returns the future the response's end waits for:
    /// the commit of this trace, and first, if the queue is full, room in it. Dropping that
    /// future never loses count: a queued trace is still written, and one still waiting for room
    /// is counted dropped.
    pub fn submit(&self, trace: PendingTrace) -> Option<DurableAck> {
        self.counters.eligible.fetch_add(1, Ordering::AcqRel);
        let durable = self.mode == CaptureMode::Durable;
        let (ack, done) = if durable {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let need = self.counters.room_for(&trace);
        let waiting = match Arc::clone(&self.counters.room).try_acquire_many_owned(need) {
            Ok(room) => match self.tx.try_send(Job { trace, ack, room }) {
                Ok(()) => {
                    return done.map(|rx| self.bounded(async move { rx.await.unwrap_or(false) }));
                }
                Err(mpsc::error::TrySendError::Full(job)) if durable => Waiting::Slot(job),
                Err(
                    mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job),
                ) => return self.drop_trace(job.trace.id(), DropReason::QueueFull, done),
            },
            Err(TryAcquireError::NoPermits) if durable => Waiting::Room(trace, ack),
            Err(_) => {
                return self.drop_trace(trace.id(), DropReason::BudgetSpent, done);
            }
        };
        let (tx, room) = (self.tx.clone(), Arc::clone(&self.counters.room));
        let unsent = Unsent(Some(Arc::clone(&self.counters)));
        Some(self.bounded(async move {
            let mut unsent = unsent;
            let job = match waiting {
                Waiting::Slot(job) => Some(job),
                Waiting::Room(trace, ack) => room
                    .acquire_many_owned(need)
                    .await
                    .ok()
                    .map(|room| Job { trace, ack, room }),
            };
            let sent = match job {
                Some(job) => tx.send(job).await.is_ok(),
                None => false,
            };
            if sent {
                unsent.0 = None;
            }
            match done {
                Some(rx) if sent => rx.await.unwrap_or(false),
                _ => false,
            }
        }))
    }

    /// `commit`, as a durable response's end waits for it: at most `durable_wait`.
    fn bounded(&self, commit: impl Future<Output = bool> + Send + 'static) -> DurableAck {
        let wait = self.durable_wait;
        // The response's end says it was cut (rate-limited: every response is, while the disk
        // stalls).
        Box::pin(async move { tokio::time::timeout(wait, commit).await.unwrap_or(false) })
    }

    /// Counts a trace dropped, and says why.
    fn drop_trace(
        &self,
        id: TraceId,
        why: DropReason,
        done: Option<oneshot::Receiver<bool>>,
    ) -> Option<DurableAck> {
        self.counters.dropped.fetch_add(1, Ordering::AcqRel);
        self.counters.drop_log.record(id, why);
        done.map(|_| Box::pin(std::future::ready(false)) as DurableAck)
    }
}

/// Why a trace was dropped; each reason has its own count and line in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropReason {
    QueueFull = 0,
    BudgetSpent = 1,
}

impl DropReason {
    const ALL: [DropReason; 2] = [DropReason::QueueFull, DropReason::BudgetSpent];

    fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "capture queue full or closed",
            Self::BudgetSpent => "capture queue's byte budget (capture.queue_mb) spent",
        }
    }
}

/// Reports drops in the log at most once per [`DropLog::EVERY`], a line per reason. A queue
/// overflows under load, when a line per trace would add to the load and bury every other line;
/// the dropped counter (`forge_capture_dropped_total`) has every one. Drops that came too soon
/// after a line are reported by the next drop, or by the writer's [`DropLog::flush`] a second or
/// two later, so the last of a burst shows without waiting for another burst.
#[derive(Debug)]
struct DropLog {
    since: std::time::Instant,
    /// When the last lines were written, in milliseconds after `since`, plus one; 0 for never.
    last_ms: AtomicU64,
    /// Drops since the last lines, by [`DropReason`].
    unreported: [AtomicU64; DropReason::ALL.len()],
}

impl Default for DropLog {
    fn default() -> Self {
        Self {
            since: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            unreported: Default::default(),
        }
    }
}

impl DropLog {
    const EVERY: Duration = Duration::from_secs(1);

    /// Notes one drop, and writes the lines for the drops since the last ones if those were long
    /// enough ago; returns whether it wrote.
    fn record(&self, id: TraceId, why: DropReason) -> bool {
        self.unreported[why as usize].fetch_add(1, Ordering::AcqRel);
        self.write_lines(Some((id, why)))
    }

    /// Writes lines for drops not yet reported, if the last ones were long enough ago (or
    /// `stopping`: the writer is stopping, and this is the last chance); returns whether it
    /// wrote.
    fn flush(&self, stopping: bool) -> bool {
        if self.unreported() == 0 {
            return false;
        }
        if stopping {
            self.last_ms.store(0, Ordering::Release);
        }
        self.write_lines(None)
    }

    /// Drops not yet in a line.
    fn unreported(&self) -> u64 {
        self.unreported
            .iter()
            .map(|n| n.load(Ordering::Acquire))
            .sum()
    }

    /// `latest`: the drop that asks, whose id goes on its reason's line.
    fn write_lines(&self, latest: Option<(TraceId, DropReason)>) -> bool {
        let now = u64::try_from(self.since.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        let last = self.last_ms.load(Ordering::Acquire);
        let every = Self::EVERY.as_millis() as u64;
        if last != 0 && now < last.saturating_add(every) {
            return false;
        }
        // One thread writes the lines; the others' drops go into them or the next ones. (One
        // that finds nothing left to write, another having taken it, still moves the window;
        // the drops after it wait for the next lines.)
        if self
            .last_ms
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        let mut wrote = false;
        for why in DropReason::ALL {
            let dropped = self.unreported[why as usize].swap(0, Ordering::AcqRel);
            if dropped == 0 {
                continue;
            }
            // The asking drop's id goes on its own reason's line only.
            let trace_id = latest
                .filter(|&(_, asking)| asking == why)
                .map(|(id, _)| tracing::field::display(id));
            let reason = why.as_str();
            tracing::warn!(
                trace_id,
                dropped,
                "{reason}: {dropped} trace(s) dropped since the last such line (lines come at most once a second; forge_capture_dropped_total counts every drop)"
            );
            wrote = true;
        }
        wrote
    }
}

/// Counts a durable trace as dropped if its wait for queue room ends before it got in.
struct Unsent(Option<Arc<CaptureCounters>>);

impl Drop for Unsent {
    fn drop(&mut self) {
        if let Some(counters) = self.0.take() {
            counters.dropped.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// How often an `async` writer takes what is queued and encodes it: in small batches, while
/// the traces are still in the CPU's caches (measured in the load bench: encoding took about
/// 2 µs per trace in batches gathered over 5 ms, 7–8 µs in batches gathered over 50–200 ms).
/// Commits follow the flush interval instead.
const ENCODE_EVERY: Duration = Duration::from_millis(5);
/// At most this many traces per encode, for the same reason, and so that one piece of work on
/// the idle-class thread stays short.
const ENCODE_MAX: usize = 256;
/// Encodes in flight at once. More than one lets the blocking pool go on while a piece of work
/// waits for the idle-class thread.
const MAX_ENCODES: usize = 4;
/// The most trace bytes one piece of work on the idle-class thread holds; a larger piece is
/// encoded on the blocking pool. Once started there, a piece gets almost no CPU while other
/// processes saturate the machine: a 4 MB trace stayed pending for over two minutes in a test
/// run beside two busy loops. A full batch of 2 KB traces is half of this.
const IDLE_MAX_BYTES: usize = 1 << 20;

/// The writer's loop. Encoding and commits run off the runtime (redb is synchronous), one
/// commit at a time, while encoding goes on; traces encoded or being encoded never outnumber
/// `batch_max`, so that a commit holds at most that many, and past it the writer stops taking
/// from the queue, which then fills and drops (counted). In `async` mode encodes run on the
/// idle-class thread (see [`super::lanes`]) until the writer falls behind: once a quarter of
/// the queue waits, or once the queue has closed, they run on the blocking pool. Commits run on
/// the commit lane (see [`super::commit_lane`]) unless the writer is behind, and then on the
/// blocking pool. A commit holds redb's write lock, which feedback, route changes and the next
/// commit wait for, so one on the lane is lifted to the normal class once the writer falls
/// behind or the commit has run for [`LIFT_AFTER`], and again every [`LIFT_AFTER`] while it
/// runs. The lane starts beside the loop; until it has, commits run on the blocking pool.
async fn run(
    store: Store,
    config: WriterConfig,
    mut rx: mpsc::Receiver<Job>,
    counters: Arc<CaptureCounters>,
) {
    let config = Arc::new(config);
    let batch_max = config.batch_max.max(1);
    let durable = config.mode == CaptureMode::Durable;
    let behind_at = (config.queue_capacity / 4).max(1);
    let lanes = Lanes::new(!durable && config.idle_priority, PATIENCE);
    // The lane starts beside the loop: its thread proves itself from the idle class, which a
    // busy machine may keep waiting, and traces must not wait for that.
    let mut commit_lane: Option<CommitLane> = None;
    let mut lane_start = (!durable && config.idle_priority).then(|| Box::pin(CommitLane::start()));
    let far = || Instant::now() + Duration::from_secs(3600);
    // Encoded traces waiting for their commit, and when it is due at the latest.
    let mut ready = Encoded::default();
    let mut due: Option<Instant> = None;
    // Jobs taken from the queue for the next encode, and when it starts.
    let mut gathered: Vec<Job> = Vec::new();
    let mut encode_at: Option<Instant> = None;
    let mut encodes: JoinSet<Option<(Vec<Job>, Encoded)>> = JoinSet::new();
    let mut commit: Option<JoinHandle<Option<Encoded>>> = None;
    // The commit running on the commit lane, when it is to be lifted (again), and whether it has
    // been lifted yet.
    let mut on_lane: Option<(LaneWork, Instant, bool)> = None;
    // Emptied buffers, kept for the next batches.
    let mut spare_jobs: Vec<Vec<Job>> = Vec::new();
    let mut spare_encoded: Vec<Encoded> = Vec::new();
    let mut open = true;
    // Reports the last drops of a burst that came too soon after a line (see `DropLog`).
    let mut drop_report = tokio::time::interval(DropLog::EVERY);
    drop_report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Behind: the queue backs up, or closed, or a full batch waits for the running commit.
        let behind = !open || rx.len() >= behind_at || ready.len() >= batch_max;
        if let (Some(lane), Some((work, lift_at, lifted))) = (&commit_lane, on_lane)
            && ((behind && !lifted) || Instant::now() >= lift_at)
        {
            lane.lift(work);
            on_lane = Some((work, Instant::now() + LIFT_AFTER, true));
        }
        #[cfg(test)]
        if let Some(lane) = &commit_lane {
            counters
                .lifts_done
                .store(lane.lifts_done(), Ordering::Release);
        }
        let commit_due = durable || !open || ready.len() >= batch_max;
        if commit.is_none()
            && !ready.is_empty()
            && (commit_due || due.is_some_and(|d| Instant::now() >= d))
        {
            let batch = std::mem::replace(&mut ready, spare_encoded.pop().unwrap_or_default());
            let (store, shared) = (store.clone(), Arc::clone(&counters));
            let work = move || commit_batch(&store, &shared, batch);
            let queued = match commit_lane.as_mut() {
                Some(lane) if !behind => lane.run(work),
                _ => Err(work),
            };
            commit = Some(match queued {
                Ok((work, done)) => {
                    #[cfg(test)]
                    counters.lane_commits.fetch_add(1, Ordering::AcqRel);
                    on_lane = Some((work, Instant::now() + LIFT_AFTER, false));
                    tokio::spawn(done)
                }
                Err(work) => tokio::task::spawn_blocking(move || Some(work())),
            });
            due = None;
        }
        if !open
            && gathered.is_empty()
            && encodes.is_empty()
            && commit.is_none()
            && ready.is_empty()
        {
            break;
        }
        // Room for more traces in the next commit, counting each encode in flight as full.
        let room =
            batch_max.saturating_sub(ready.len() + encodes.len() * ENCODE_MAX.min(batch_max));
        let may_take = open && encode_at.is_none() && encodes.len() < MAX_ENCODES && room > 0;
        // Set when the gathered jobs are to be encoded now: outside `select!`, since tokio's
        // timer rounds a deadline of "now" up to its next millisecond tick.
        let mut encode_now = false;
        tokio::select! {
            next = rx.recv(), if may_take => match next {
                None => open = false,
                Some(job) => {
                    gathered.push(job);
                    // `async` gathers without being woken per trace (a wake-up per request cost
                    // the proxy more CPU than the encoding did): the next encode waits a few
                    // milliseconds unless a full batch is already queued, a full batch being as
                    // many as the commit has room for, or as the queue holds (a small queue
                    // would otherwise overflow during the wait). `durable` encodes what is
                    // queued now: a client waits on the commit.
                    let full = ENCODE_MAX.min(room).min(rx.max_capacity());
                    if durable || rx.len() + 1 >= full {
                        encode_now = true;
                    } else {
                        encode_at =
                            Some((Instant::now() + ENCODE_EVERY).min(due.unwrap_or_else(far)));
                    }
                }
            },
            () = tokio::time::sleep_until(encode_at.unwrap_or_else(far)), if encode_at.is_some() => {
                encode_at = None;
                encode_now = true;
            }
            Some(done) = encodes.join_next(), if !encodes.is_empty() => match done {
                Ok(Some((jobs, mut encoded))) => {
                    ready.take_from(&mut encoded);
                    spare_jobs.push(jobs);
                    spare_encoded.push(encoded);
                    if !ready.is_empty() {
                        due.get_or_insert_with(|| Instant::now() + config.flush_interval);
                    }
                }
                // Panics are caught per trace inside; this is a lost task, logged.
                _ => tracing::error!("trace encode task failed"),
            },
            done = async {
                match commit.as_mut() {
                    Some(running) => running.await,
                    None => std::future::pending().await,
                }
            }, if commit.is_some() => {
                commit = None;
                on_lane = None;
                match done {
                    Ok(Some(emptied)) => spare_encoded.push(emptied),
                    // Panics are caught inside, and counted; this is a lost task, logged.
                    Ok(None) => tracing::error!("trace commit task failed"),
                    Err(e) => tracing::error!(error = %e, "trace commit task failed"),
                }
            }
            () = tokio::time::sleep_until(on_lane.map_or_else(far, |(_, at, _)| at)), if on_lane.is_some() => {}
            started = async {
                match lane_start.as_mut() {
                    Some(starting) => starting.await,
                    None => std::future::pending().await,
                }
            }, if lane_start.is_some() => {
                lane_start = None;
                match started {
                    Ok(lane) => {
                        commit_lane = Some(lane);
                        #[cfg(test)]
                        counters.lane_ready.store(true, Ordering::Release);
                    }
                    Err(why) => tracing::info!("capture writer: commits run at normal priority: {why}"),
                }
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(far)), if due.is_some() && commit.is_none() => {}
            _ = drop_report.tick() => {
                counters.drop_log.flush(false);
            }
        }
        if encode_now {
            while gathered.len() < ENCODE_MAX.min(room) {
                match rx.try_recv() {
                    Ok(job) => gathered.push(job),
                    Err(_) => break,
                }
            }
            let mut jobs = std::mem::replace(&mut gathered, spare_jobs.pop().unwrap_or_default());
            let heavy = jobs.iter().map(|j| j.trace.held_bytes()).sum::<usize>() > IDLE_MAX_BYTES;
            let urgent = !open || rx.len() >= behind_at || heavy;
            #[cfg(test)]
            if heavy {
                counters.heavy_encodes.fetch_add(1, Ordering::AcqRel);
            }
            let mut into = spare_encoded.pop().unwrap_or_default();
            let (config, counters) = (Arc::clone(&config), Arc::clone(&counters));
            encodes.spawn(lanes.run(urgent, move || {
                encode_batch(&config, &counters, &mut jobs, &mut into);
                (jobs, into)
            }));
        }
    }
    counters.drop_log.flush(true);
    tracing::debug!("trace writer stopped: queue closed and drained");
}

/// Encoded traces, back to back in one buffer, and the acknowledgements waiting on them. The
/// buffers are reused from batch to batch: a buffer per trace cost more in allocation, growth
/// and fresh pages than the encoding itself.
#[derive(Default)]
struct Encoded {
    bytes: Vec<u8>,
    /// Each trace's id and the end of its JSON in `bytes`.
    ends: Vec<(TraceId, usize)>,
    acks: Vec<oneshot::Sender<bool>>,
    /// The traces' tickets, settled together once the batch's commit has settled.
    tickets: Vec<Ticket>,
    /// The traces' share of the queue's byte budget, returned once the batch is settled.
    room: Option<OwnedSemaphorePermit>,
}

/// The most buffer a batch keeps for the next one. Ordinary batches stay below it (2,048
/// traces of a few KB); a batch of huge traces must not pin its buffer's peak for good.
const KEEP_BYTES: usize = 16 * 1024 * 1024;

impl Encoded {
    fn len(&self) -> usize {
        self.ends.len()
    }

    /// Holds `room` with the rest of the batch's share of the budget.
    fn hold(&mut self, room: OwnedSemaphorePermit) {
        match &mut self.room {
            Some(held) => held.merge(room),
            None => self.room = Some(room),
        }
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Encodes one trace; on failure nothing of it is kept.
    fn push(&mut self, id: TraceId, trace: &impl Serialize) -> Result<(), serde_json::Error> {
        let start = self.bytes.len();
        match serde_json::to_writer(&mut self.bytes, trace) {
            Ok(()) => {
                self.ends.push((id, self.bytes.len()));
                Ok(())
            }
            Err(e) => {
                self.bytes.truncate(start);
                Err(e)
            }
        }
    }

    /// Moves everything `other` holds to the end of this batch, leaving `other` empty.
    fn take_from(&mut self, other: &mut Encoded) {
        let base = self.bytes.len();
        self.bytes.extend_from_slice(&other.bytes);
        self.ends
            .extend(other.ends.iter().map(|&(id, end)| (id, base + end)));
        self.acks.append(&mut other.acks);
        self.tickets.append(&mut other.tickets);
        if let Some(room) = other.room.take() {
            self.hold(room);
        }
        other.clear();
    }

    /// Drops bytes a failed encode left after the last whole trace.
    fn discard_partial(&mut self) {
        let end = self.ends.last().map_or(0, |&(_, end)| end);
        self.bytes.truncate(end);
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.bytes.shrink_to(KEEP_BYTES);
        self.ends.clear();
        self.acks.clear();
        Unsettled::settle_all(&mut self.tickets);
        self.room = None;
    }

    /// Each trace's id and JSON.
    fn traces(&self) -> impl Iterator<Item = (TraceId, &[u8])> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&(_, end)| end));
        self.ends
            .iter()
            .zip(starts)
            .map(|(&(id, end), start)| (id, &self.bytes[start..end]))
    }
}

/// Reassembles, redacts and serialises each trace of `batch` into `out`, leaving `batch` empty.
/// One that cannot be encoded is counted failed.
fn encode_batch(
    config: &WriterConfig,
    counters: &CaptureCounters,
    batch: &mut Vec<Job>,
    out: &mut Encoded,
) {
    for Job { trace, ack, room } in batch.drain(..) {
        let id = trace.id();
        // A panic while reassembling or encoding one exchange (a bug meeting odd upstream
        // bytes) costs that trace, counted failed, not the whole batch uncounted.
        let encoded = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let (trace, ticket) = trace.into_stored(&config.redactor, config.max_event_bytes);
            out.push(id, &trace).map(|()| ticket)
        }));
        // A trace that fails here drops its ticket at once: it will never be stored.
        let error = match encoded {
            Ok(Ok(ticket)) => {
                out.acks.extend(ack);
                out.tickets.push(ticket);
                out.hold(room);
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_panic) => {
                out.discard_partial();
                "panicked while encoding".to_string()
            }
        };
        counters.failed.fetch_add(1, Ordering::AcqRel);
        tracing::error!(trace_id = %id, error, "trace could not be encoded");
        if let Some(ack) = ack {
            let _ = ack.send(false);
        }
    }
}

/// Commits one batch in one transaction and settles its counters and acknowledgements; returns
/// the batch emptied, for reuse.
fn commit_batch(store: &Store, counters: &CaptureCounters, mut batch: Encoded) -> Encoded {
    let n = batch.len() as u64;
    #[cfg(test)]
    counters.largest_commit.fetch_max(n, Ordering::AcqRel);
    // A panic in the store counts the batch failed, so the counters still add up.
    let started = std::time::Instant::now();
    let ok = std::panic::catch_unwind(AssertUnwindSafe(|| commit_with_retry(store, &batch)))
        .is_ok_and(|committed| committed.is_ok());
    counters.commit_times.record(started.elapsed());
    #[cfg(test)]
    if std::thread::current().name() == Some(super::commit_lane::COMMIT_THREAD)
        && thread_priority::thread_schedule_policy().is_ok_and(|policy| {
            policy
                == thread_priority::ThreadSchedulePolicy::Normal(
                    thread_priority::NormalThreadSchedulePolicy::Other,
                )
        })
    {
        counters.lifted_commits.fetch_add(1, Ordering::AcqRel);
    }
    // Settled before counted: whoever sees the traces counted sees them settled, and scans
    // with a cursor free to pass them.
    Unsettled::settle_all(&mut batch.tickets);
    if ok {
        counters.captured.fetch_add(n, Ordering::AcqRel);
    } else {
        counters.failed.fetch_add(n, Ordering::AcqRel);
    }
    for ack in batch.acks.drain(..) {
        let _ = ack.send(ok);
    }
    batch.clear();
    batch
}

/// A failed commit is retried twice with a short pause; a transient error (a full disk that an
/// operator is clearing) should not cost traces if it clears quickly.
fn commit_with_retry(store: &Store, batch: &Encoded) -> Result<(), StoreError> {
    let mut pause = Duration::from_millis(20);
    for attempt in 1..=3 {
        match store.insert_encoded(batch.traces()) {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 3 => {
                tracing::warn!(error = %e, attempt, traces = batch.len(), "trace commit failed; retrying");
                std::thread::sleep(pause);
                pause *= 5;
            }
            Err(e) => {
                tracing::error!(error = %e, traces = batch.len(), "trace commit failed: traces lost (counted as failed)");
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(first_id: u128, parts: &[&str]) -> Encoded {
        let mut e = Encoded::default();
        for (i, part) in parts.iter().enumerate() {
            e.bytes.extend_from_slice(part.as_bytes());
            e.ends
                .push((TraceId::from_u128(first_id + i as u128), e.bytes.len()));
        }
        e
    }

    fn texts(e: &Encoded) -> Vec<(u128, String)> {
        e.traces()
            .map(|(id, bytes)| (id.as_u128(), String::from_utf8_lossy(bytes).into_owned()))
            .collect()
    }

    #[test]
    fn batches_keep_each_trace_whole_and_in_order_as_they_are_joined() {
        let mut ready = encoded(1, &["{\"a\":1}", "{}"]);
        let mut scratch = encoded(3, &["{\"c\":[3]}"]);
        ready.take_from(&mut scratch);
        assert!(scratch.is_empty() && scratch.bytes.is_empty());
        assert_eq!(
            texts(&ready),
            vec![
                (1, "{\"a\":1}".to_string()),
                (2, "{}".to_string()),
                (3, "{\"c\":[3]}".to_string()),
            ]
        );
        // What an encode that panicked left behind goes; the whole traces stay.
        let whole = ready.bytes.len();
        ready.bytes.extend_from_slice(b"{\"half\":");
        ready.discard_partial();
        assert_eq!(ready.bytes.len(), whole);
        assert_eq!(texts(&ready).len(), 3);
        // A cleared batch is empty but keeps its buffer for the next one.
        let capacity = ready.bytes.capacity();
        ready.clear();
        assert_eq!(texts(&ready), vec![]);
        assert_eq!(ready.bytes.capacity(), capacity);
    }

    #[test]
    fn drops_are_reported_once_and_then_at_most_once_a_second() {
        let mut log = DropLog::default();
        let id = TraceId::from_u128(7);
        let full = DropReason::QueueFull;
        assert!(log.record(id, full), "the first drop is reported at once");
        let reported = (0..10_000).filter(|_| log.record(id, full)).count();
        // The loop takes far less than a second, but a stalled machine might cross one boundary.
        assert!(reported <= 1, "{reported} lines for a burst of drops");
        assert!(log.unreported() >= 1);
        // A second later (moved back in time here), the next drop reports the burst with it.
        log.since = log.since.checked_sub(DropLog::EVERY * 2).unwrap();
        assert!(log.record(id, full));
        assert_eq!(log.unreported(), 0);
    }

    #[test]
    fn the_last_drops_of_a_burst_are_reported_without_another_drop_each_reason_apart() {
        let mut log = DropLog::default();
        let id = TraceId::from_u128(7);
        assert!(!log.flush(false), "nothing to report");
        assert!(log.record(id, DropReason::BudgetSpent));
        for _ in 0..100 {
            log.record(id, DropReason::BudgetSpent);
            log.record(id, DropReason::QueueFull);
        }
        // Unless a stalled machine crossed the second, both reasons wait, each counted apart.
        let waiting =
            DropReason::ALL.map(|why| log.unreported[why as usize].load(Ordering::Acquire));
        assert!(
            waiting == [0, 0] || (waiting[0] >= 1 && waiting[1] >= 1),
            "{waiting:?}"
        );
        // After the second, the writer's tick reports them.
        log.since = log.since.checked_sub(DropLog::EVERY * 2).unwrap();
        assert!(waiting == [0, 0] || log.flush(false), "reported by a flush");
        assert_eq!(log.unreported(), 0);
        assert!(!log.flush(true), "nothing left, even when stopping");
        // A stopping writer reports what is left at once.
        log.record(id, DropReason::QueueFull);
        log.record(id, DropReason::QueueFull);
        assert!(log.unreported() == 0 || log.flush(true));
        assert_eq!(log.unreported(), 0);
    }
}
