//! Where the writer's work runs: a thread that yields the CPU to requests, or tokio's blocking pool.
//!
//! On a machine with headroom, capture's CPU should cost requests nothing. A thread of the
//! normal class that encodes for a few milliseconds holds a core that a request's task then
//! waits for; under Linux's `SCHED_IDLE` class the same work runs only while no ordinary thread
//! wants that core (figures in `benches/ROUNDS.md`). The writer sends only encodes here:
//! a commit holds redb's write lock, and a starved commit would make every other writer wait.
//!
//! An idle-class thread can starve while the machine is saturated. So work offered to it and not
//! started within [`PATIENCE`] runs on the blocking pool instead (work runs exactly once, on
//! whichever side claims it first), the writer sends work straight there whenever it falls
//! behind, and it keeps each piece it offers here short, so that one starved once started is
//! still done soon.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use tokio::sync::oneshot;

/// How long work offered to the background thread may wait for it to start.
pub(super) const PATIENCE: Duration = Duration::from_millis(10);

/// The name of the background thread.
pub(super) const BACKGROUND_THREAD: &str = "forge-capture";

type Task = Box<dyn FnOnce() + Send>;

/// The background thread, if any, and the blocking pool.
#[derive(Debug)]
pub(super) struct Lanes {
    background: Option<mpsc::Sender<Task>>,
    patience: Duration,
}

impl Lanes {
    /// With `background`, starts the idle-class thread (it ends when the lanes are dropped);
    /// without, everything runs on the blocking pool. Work offered to the background thread
    /// waits `patience` for it to start (the writer uses [`PATIENCE`]).
    pub(super) fn new(background: bool, patience: Duration) -> Self {
        Self {
            background: background.then(start_background).flatten(),
            patience,
        }
    }

    /// Runs `f` off the async runtime: on the background thread unless `urgent`, and on the
    /// blocking pool if `urgent`, without a background thread, or when the background thread
    /// has not started it within its patience. `None` if `f` panicked.
    pub(super) fn run<T, F>(
        &self,
        urgent: bool,
        f: F,
    ) -> impl Future<Output = Option<T>> + Send + 'static
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let claim = Arc::new(Mutex::new(Some(f)));
        let patience = self.patience;
        let offered = match &self.background {
            Some(background) if !urgent => {
                let (done, finished) = oneshot::channel();
                let theirs = Arc::clone(&claim);
                let task: Task = Box::new(move || {
                    if let Some(f) = take(&theirs) {
                        // A panic drops `done`, which the waiting side reads as `None`.
                        if let Ok(out) = std::panic::catch_unwind(AssertUnwindSafe(f)) {
                            let _ = done.send(out);
                        }
                    }
                });
                background.send(task).ok().map(|()| finished)
            }
            _ => None,
        };
        async move {
            if let Some(mut finished) = offered {
                match tokio::time::timeout(patience, &mut finished).await {
                    Ok(Ok(out)) => return Some(out),
                    // It panicked there (the claim is empty, and so is the answer below), or
                    // the thread went away with the work still queued (the claim still holds
                    // it, and it runs here).
                    Ok(Err(_gone)) => {}
                    Err(_late) => match take(&claim) {
                        Some(f) => return tokio::task::spawn_blocking(f).await.ok(),
                        // Started meanwhile: it finishes there.
                        None => return finished.await.ok(),
                    },
                }
            }
            tokio::task::spawn_blocking(take(&claim)?).await.ok()
        }
    }
}

/// Takes the work out of its claim: `None` if the other side took it.
fn take<F>(claim: &Mutex<Option<F>>) -> Option<F> {
    claim.lock().unwrap_or_else(PoisonError::into_inner).take()
}

fn start_background() -> Option<mpsc::Sender<Task>> {
    let (tx, rx) = mpsc::channel::<Task>();
    let spawned = std::thread::Builder::new()
        .name(BACKGROUND_THREAD.into())
        .spawn(move || {
            if let Err(e) = lower_to_idle_class() {
                // Still correct, just no kinder to requests than the blocking pool.
                tracing::warn!(error = %e, "capture writer: could not lower its thread to the idle scheduling class; it runs at normal priority");
            }
            for task in rx {
                task();
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "capture writer: no background thread; all work runs on the blocking pool");
            None
        }
    }
}

/// Moves the calling thread into the idle scheduling class (elsewhere than Linux, to the lowest
/// priority an ordinary thread may have).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn lower_to_idle_class() -> Result<(), thread_priority::Error> {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    )
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn lower_to_idle_class() -> Result<(), thread_priority::Error> {
    // The lowest priority the platform offers to an ordinary thread.
    thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or("").to_string()
    }

    /// Long enough for an idle-class thread on a busy test machine to get a turn.
    const TEST_PATIENCE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn work_runs_in_the_idle_class_unless_urgent() {
        let lanes = Lanes::new(true, TEST_PATIENCE);
        let background = lanes.run(false, thread_name).await;
        assert_eq!(background.as_deref(), Some(BACKGROUND_THREAD));
        #[cfg(target_os = "linux")]
        {
            let policy = lanes
                .run(false, thread_priority::thread_schedule_policy)
                .await;
            assert!(
                matches!(
                    policy,
                    Some(Ok(thread_priority::ThreadSchedulePolicy::Normal(
                        thread_priority::NormalThreadSchedulePolicy::Idle
                    )))
                ),
                "{policy:?}"
            );
        }
        let urgent = lanes.run(true, thread_name).await.expect("ran");
        assert_ne!(urgent, BACKGROUND_THREAD);
        let without = Lanes::new(false, TEST_PATIENCE)
            .run(false, thread_name)
            .await
            .expect("ran");
        assert_ne!(without, BACKGROUND_THREAD);
    }

    #[tokio::test]
    async fn work_the_background_thread_cannot_start_in_time_runs_once_elsewhere() {
        let lanes = Lanes::new(true, PATIENCE);
        // Hold the background thread until told.
        let (release, held) = mpsc::channel::<()>();
        let holding = lanes.run(false, move || held.recv());
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&runs);
        let out = lanes
            .run(false, move || {
                counted.fetch_add(1, Ordering::SeqCst);
                thread_name()
            })
            .await;
        let ran_on = out.expect("the work ran");
        assert_ne!(ran_on, BACKGROUND_THREAD);
        release.send(()).unwrap();
        assert!(holding.await.is_some());
        // Work offered after it is queued behind it: once that ran, the background thread has
        // reached the taken work and skipped it.
        let (after, ran) = mpsc::channel();
        drop(lanes.run(false, move || after.send(()).unwrap()));
        ran.recv_timeout(TEST_PATIENCE).unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_panic_is_none_and_the_thread_goes_on() {
        let lanes = Lanes::new(true, TEST_PATIENCE);
        let panicked = lanes.run(false, || -> u8 { panic!("boom") }).await;
        assert_eq!(panicked, None);
        assert_eq!(
            lanes.run(false, thread_name).await.as_deref(),
            Some(BACKGROUND_THREAD)
        );
        assert_eq!(lanes.run(true, || -> u8 { panic!("boom") }).await, None);
    }
}
