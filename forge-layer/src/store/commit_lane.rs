//! Where an `async` writer's commits run: an idle-class thread, lifted when a commit must not wait.
//!
//! A commit is a burst of CPU (B-tree inserts, page checksums, page writes) once per flush
//! interval. At normal priority the burst holds a core for a whole scheduler slice while a
//! request's task waits for it: at half load that was most of what `async` capture added to
//! p99 (`benches/ROUNDS.md`). In Linux's `SCHED_IDLE` class the same burst gives way to any
//! request at once. But a commit holds redb's write lock, and an idle-class thread can starve
//! while the machine is saturated, so no commit may be left there: the writer lifts the thread
//! into the normal class as soon as it falls behind, or once a commit has run for
//! [`LIFT_AFTER`], and the thread drops back to the idle class before its next commit.
//!
//! Leaving the idle class needs `CAP_SYS_NICE`, or an `RLIMIT_NICE` of 20 (systemd's
//! `LimitNICE=-20`). The lane checks this when it starts; without it there is no lane, and the
//! writer commits on tokio's blocking pool at normal priority, as it would with
//! `capture.idle_priority = false`.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, mpsc};
use std::time::Duration;

use thread_priority::{NormalThreadSchedulePolicy, ThreadId, ThreadSchedulePolicy};
use tokio::sync::oneshot;

/// How long a commit may run in the idle class before the writer lifts it, and how often the
/// writer lifts it again while it runs (a lift that raced the thread's return to the idle class,
/// or failed, is made good by the next): past this the machine has no headroom to spare, and
/// feedback or route changes may be waiting for the lock.
pub(super) const LIFT_AFTER: Duration = Duration::from_millis(100);

/// The name of the commit thread.
pub(super) const COMMIT_THREAD: &str = "forge-commit";

const NORMAL: ThreadSchedulePolicy =
    ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other);

type Task = Box<dyn FnOnce() + Send>;

/// A commit handed to the lane, by its place in the lane's order (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct LaneWork(u64);

/// The commit thread, which runs what it is given in order.
#[derive(Debug)]
pub(super) struct CommitLane {
    tasks: mpsc::Sender<(LaneWork, Task)>,
    shared: Arc<Shared>,
    next: u64,
}

/// What the lane, the commit thread and the threads that lift it share. Neither the writer nor
/// a lift ever waits for the commit thread: it may be starved.
#[derive(Debug, Default)]
struct Shared {
    /// The commit thread, once it has shown that it may be lifted.
    thread: OnceLock<ThreadId>,
    /// The latest work lifted for: the thread leaves the idle class for it, and does not go back
    /// before later work.
    lifted_for: AtomicU64,
    /// Whether the commit thread still runs (its id means nothing once it has ended); held
    /// across each lift.
    alive: Mutex<bool>,
    /// Lifts that took effect.
    lifts_done: AtomicU64,
}

impl CommitLane {
    /// Starts the thread, or says why there is none: not on Linux, or no right to lift it.
    pub(super) async fn start() -> Result<Self, String> {
        let (tasks, queued) = mpsc::channel::<(LaneWork, Task)>();
        let (ready, started) = oneshot::channel();
        let shared = Arc::new(Shared {
            alive: Mutex::new(true),
            ..Shared::default()
        });
        let theirs = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(COMMIT_THREAD.into())
            .spawn(move || {
                let _ended = Ended(Arc::clone(&theirs));
                if let Err(why) = probe() {
                    let _ = ready.send(Err(why));
                    return;
                }
                let _ = theirs.thread.set(thread_priority::thread_native_id());
                let _ = ready.send(Ok(()));
                for (work, task) in queued {
                    // Back to the idle class unless lifted for this work already. A lift that
                    // comes between this check and the change is undone by it, and made good
                    // by the writer's next lift.
                    if theirs.lifted_for.load(Ordering::Acquire) < work.0
                        && let Err(e) = crate::store::lanes::lower_to_idle_class()
                    {
                        tracing::warn!(error = ?e, "capture writer: the commit thread stays in the normal class");
                    }
                    task();
                }
            });
        spawned.map_err(|e| format!("no commit thread: {e}"))?;
        started
            .await
            .map_err(|_| "the commit thread ended at once".to_string())??;
        Ok(Self {
            tasks,
            shared,
            next: 0,
        })
    }

    /// Queues `f` on the thread, in the idle class unless lifted; its result arrives through
    /// the future (`None` if it panicked). `Err(f)` if the thread is gone: run it elsewhere.
    pub(super) fn run<T, F>(
        &mut self,
        f: F,
    ) -> Result<(LaneWork, impl Future<Output = Option<T>> + Send + 'static), F>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.next += 1;
        let work = LaneWork(self.next);
        let (done, finished) = oneshot::channel();
        // The work travels inside the task, and comes back out if the thread is gone.
        let slot = Arc::new(Mutex::new(Some(f)));
        let theirs = Arc::clone(&slot);
        let task: Task = Box::new(move || {
            if let Some(f) = take(&theirs)
                && let Ok(out) = std::panic::catch_unwind(AssertUnwindSafe(f))
            {
                let _ = done.send(out);
            }
        });
        match self.tasks.send((work, task)) {
            Ok(()) => Ok((work, async move { finished.await.ok() })),
            // The task never ran, so the work is still in its slot.
            Err(_gone) => take(&slot).map_or_else(|| unreachable!("unsent work ran"), Err),
        }
    }

    /// Moves the thread into the normal class for `work` (whether it runs now or is still
    /// queued); it stays there until work queued after it. Never waits: the change is made on
    /// a thread of its own, which also keeps the library's change to the calling thread's nice
    /// value (see [`to_normal_class`]) off the runtime's workers.
    pub(super) fn lift(&self, work: LaneWork) {
        self.shared.lifted_for.fetch_max(work.0, Ordering::AcqRel);
        let shared = Arc::clone(&self.shared);
        let lifter = std::thread::Builder::new()
            .name("forge-commit-lift".into())
            .spawn(move || shared.lift_now());
        if let Err(e) = lifter {
            tracing::error!(error = %e, "capture writer: no thread to lift a waiting commit; the writer tries again");
        }
    }

    /// Lifts that took effect so far.
    #[cfg(test)]
    pub(super) fn lifts_done(&self) -> u64 {
        self.shared.lifts_done.load(Ordering::Acquire)
    }
}

impl Shared {
    fn lift_now(&self) {
        let alive = self.alive.lock().unwrap_or_else(PoisonError::into_inner);
        let (true, Some(&thread)) = (*alive, self.thread.get()) else {
            return;
        };
        let result = to_normal_class(thread);
        // Read back: the library's error may be about the calling thread's nice value alone.
        let normal = thread_priority::thread_schedule_policy_param(thread)
            .is_ok_and(|(policy, _)| policy == NORMAL);
        if normal {
            self.lifts_done.fetch_add(1, Ordering::AcqRel);
        } else {
            tracing::error!(result = ?result, "capture writer: could not lift a waiting commit out of the idle class; the writer tries again");
        }
    }
}

/// Marks the commit thread ended, however it ends, so that no lift names it afterwards.
struct Ended(Arc<Shared>);

impl Drop for Ended {
    fn drop(&mut self) {
        *self.0.alive.lock().unwrap_or_else(PoisonError::into_inner) = false;
    }
}

fn take<F>(slot: &Mutex<Option<F>>) -> Option<F> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// On the commit thread: into the idle class, then proves that leaving it is allowed, and
/// goes back in.
#[cfg(target_os = "linux")]
fn probe() -> Result<(), String> {
    use crate::store::lanes::lower_to_idle_class;
    lower_to_idle_class().map_err(|e| format!("cannot enter the idle class: {e:?}"))?;
    to_normal_class(thread_priority::thread_native_id()).map_err(|e| {
        format!("cannot leave the idle class ({e:?}): lifting a commit needs CAP_SYS_NICE or RLIMIT_NICE of 20")
    })?;
    lower_to_idle_class().map_err(|e| format!("cannot enter the idle class: {e:?}"))
}

#[cfg(not(target_os = "linux"))]
fn probe() -> Result<(), String> {
    Err("the idle scheduling class is Linux's".into())
}

/// Moves `thread` into the normal class. Its nice value stays what it was (0: entering the idle
/// class sets it so). The library then sets the *calling* thread's nice value to 0 as well,
/// which is why a lift runs on a thread of its own.
fn to_normal_class(thread: ThreadId) -> Result<(), thread_priority::Error> {
    use thread_priority::{ThreadPriority, ThreadPriorityValue};
    // The library maps 0..=99 onto nice 19..=-20; 48 is nice 0.
    let nice_zero = ThreadPriorityValue::try_from(48u8)
        .map_err(|_| thread_priority::Error::Priority("48 is out of range"))?;
    thread_priority::set_thread_priority_and_policy(
        thread,
        ThreadPriority::Crossplatform(nice_zero),
        NORMAL,
    )
}

#[cfg(test)]
#[cfg(target_os = "linux")]
mod tests {
    use super::*;

    fn class_and_nice() -> (ThreadSchedulePolicy, i32) {
        let policy = thread_priority::thread_schedule_policy().expect("policy");
        let nice = rustix::process::getpriority_process(None).expect("nice");
        (policy, nice)
    }

    const IDLE: ThreadSchedulePolicy =
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);

    /// Whether this process may leave the idle class (the lane's condition), checked apart
    /// from the lane, on a thread of its own.
    fn may_lift() -> bool {
        std::thread::spawn(|| {
            crate::store::lanes::lower_to_idle_class().expect("lower");
            to_normal_class(thread_priority::thread_native_id()).is_ok()
        })
        .join()
        .expect("joined")
    }

    async fn until_lifted(lane: &CommitLane, times: u64) {
        crate::store::tests::until("never lifted", || lane.lifts_done() >= times).await;
    }

    #[tokio::test]
    async fn work_runs_idle_until_lifted_and_the_next_work_is_idle_again() {
        let mut lane = match CommitLane::start().await {
            Ok(lane) => lane,
            Err(why) => {
                // Only where lifting is refused may the lane be missing.
                assert!(!may_lift(), "no lane although lifting is allowed: {why}");
                return;
            }
        };
        let (_, first) = lane.run(class_and_nice).ok().expect("queued");
        assert_eq!(first.await.expect("ran").0, IDLE);

        // Held until lifted: the lift reaches work already running.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (work, second) = lane
            .run(move || {
                held.recv().expect("released");
                (
                    std::thread::current().name().map(String::from),
                    class_and_nice(),
                )
            })
            .ok()
            .expect("queued");
        lane.lift(work);
        until_lifted(&lane, 1).await;
        release.send(()).expect("held");
        let (name, (class, nice)) = second.await.expect("ran");
        assert_eq!(name.as_deref(), Some(COMMIT_THREAD));
        assert_eq!((class, nice), (NORMAL, 0));

        let (_, third) = lane.run(class_and_nice).ok().expect("queued");
        assert_eq!(third.await.expect("ran").0, IDLE);
    }

    #[tokio::test]
    async fn a_lift_for_queued_work_holds_until_it_has_run_and_a_panic_is_none() {
        let Ok(mut lane) = CommitLane::start().await else {
            assert!(!may_lift());
            return;
        };
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (_, blocker) = lane
            .run(move || held.recv().expect("released"))
            .ok()
            .expect("queued");
        let (queued, panicked) = lane.run(|| -> u8 { panic!("boom") }).ok().expect("queued");
        let (_, after) = lane.run(class_and_nice).ok().expect("queued");
        let (lifted_work, lifted) = lane.run(class_and_nice).ok().expect("queued");
        // Lifted for the last of them while the first still runs: all of them run lifted.
        lane.lift(lifted_work);
        lane.lift(queued);
        until_lifted(&lane, 2).await;
        release.send(()).expect("held");
        blocker.await.expect("ran");
        assert_eq!(panicked.await, None);
        assert_eq!(after.await.expect("ran").0, NORMAL);
        assert_eq!(lifted.await.expect("ran").0, NORMAL);
        // A lift for earlier work does not take back one for later work.
        assert_eq!(
            lane.shared.lifted_for.load(Ordering::Acquire),
            lifted_work.0
        );
        let (_, next) = lane.run(class_and_nice).ok().expect("queued");
        assert_eq!(next.await.expect("ran").0, IDLE);
    }
}
