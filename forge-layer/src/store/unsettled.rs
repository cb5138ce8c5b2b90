//! Trace ids still on their way to the store, and the bound that scans with a cursor stop at.
//!
//! A trace's id is made when its exchange starts, and the trace is committed when the exchange
//! ends. So a long stream's trace lands after the traces of many later, shorter exchanges. A scan
//! that remembers where it stopped (the judge's cursor, a dataset's cut) must never step past an
//! id that may still arrive, or that trace is passed over for good. Every id below
//! [`Unsettled::scan_bound`] is settled: committed, or never to be stored.
//!
//! Every exchange issues an id here, so the request path must not wait behind another holder. A
//! holder that the kernel preempts keeps its lock until it runs again, and the writer settles
//! from a thread in the idle scheduling class, which runs only when a core is free: with one
//! lock for issuing, settling and the sorted set, the load bench saw requests wait up to 5 ms.
//! So issuing and settling each only append to a list of their own, and the sorted set that
//! readers use is kept apart. The writer folds the two lists into the set after each commit, and
//! so does every reader before it reads; a fold holds the issuing lock only to swap a list out
//! (and, for a scan's bound, to make a fresh id).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use crate::trace::TraceId;

/// Settled ids a single settle may leave unfolded before it folds them itself (the writer folds
/// after every commit; this bounds the list when it does not, say once it has stopped).
const FOLD_AT: usize = 4096;

/// The ids issued and not yet settled. One per store; the writer issues from it.
#[derive(Debug, Default)]
pub struct Unsettled {
    /// Ids issued since the last fold. The request path takes this lock, and only to append.
    issued: Mutex<Issued>,
    /// Ids settled since the last fold.
    settled: Mutex<Vec<u128>>,
    /// The ids issued and not settled, as of the last fold.
    open: Mutex<BTreeSet<u128>>,
    /// The time in the oldest id of `open` after the last fold, in Unix milliseconds; 0 for none.
    oldest_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct Issued {
    /// In the order issued, which is ascending.
    ids: Vec<u128>,
    /// Whether a writer issues ids here; without one nothing is on its way.
    tracking: bool,
}

/// What a fold saw of the issuing side.
struct Folded {
    tracking: bool,
    /// A fresh id above every id issued before the fold, if asked for.
    fresh: Option<TraceId>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The lock if it is free (poisoned or not).
fn try_lock<T>(mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match mutex.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

impl Unsettled {
    /// A new trace id, unsettled until the ticket is dropped (after its commit, or when the
    /// trace is dropped or fails).
    pub fn issue(self: &Arc<Self>) -> Ticket {
        let mut issued = lock(&self.issued);
        issued.tracking = true;
        // Made under the lock, so a fold meanwhile never misses an id made before its own.
        let id = TraceId::generate();
        issued.ids.push(id.as_u128());
        Ticket {
            id,
            owner: Some(Arc::clone(self)),
        }
    }

    /// Where a scan with a cursor must stop (exclusive): the oldest unsettled id, or, with none in
    /// flight, a fresh id above every id issued so far (ids issued later are above it). `None`
    /// when no writer issues ids here: everything stored is settled.
    pub fn scan_bound(&self) -> Option<TraceId> {
        let mut open = lock(&self.open);
        let folded = self.fold(&mut open, true);
        if !folded.tracking {
            return None;
        }
        open.first()
            .map(|&oldest| TraceId::from_u128(oldest))
            .or(folded.fresh)
    }

    /// The oldest unsettled id, for tests; operators see its age through
    /// [`Unsettled::oldest_started_ms`].
    #[cfg(test)]
    fn oldest(&self) -> Option<TraceId> {
        let mut open = lock(&self.open);
        self.fold(&mut open, false);
        open.first().map(|&id| TraceId::from_u128(id))
    }

    /// When the oldest unsettled exchange started (Unix milliseconds): the exchange that holds
    /// cursor scans back (an endless stream, a client that stopped reading). For metrics, which a
    /// runtime thread renders: it never waits for a fold under way on the writer's idle-class
    /// thread, and gives the answer of the last fold instead.
    pub fn oldest_started_ms(&self) -> Option<u64> {
        if let Some(mut open) = try_lock(&self.open) {
            self.fold(&mut open, false);
        }
        Some(self.oldest_ms.load(Ordering::Acquire)).filter(|&ms| ms != 0)
    }

    /// Whether `id` was issued here and its trace is not settled yet (it is still in flight or
    /// queued for the writer).
    pub fn contains(&self, id: TraceId) -> bool {
        let mut open = lock(&self.open);
        self.fold(&mut open, false);
        open.contains(&id.as_u128())
    }

    /// Moves what was issued and settled since the last fold into `open`.
    fn fold(&self, open: &mut BTreeSet<u128>, fresh: bool) -> Folded {
        // Settled first, then issued: an id settled before the first swap was issued before it,
        // so it is in `open` already or among the ids taken next. One settled later waits for
        // the next fold.
        let settled = std::mem::take(&mut *lock(&self.settled));
        // Allocated outside the lock, so that issuing never waits for an allocation.
        let mut issued_ids = Vec::with_capacity(settled.len().max(64));
        let folded = {
            let mut issued = lock(&self.issued);
            std::mem::swap(&mut issued.ids, &mut issued_ids);
            Folded {
                tracking: issued.tracking,
                // Under the lock, so every id issued after the fold lies above it.
                fresh: fresh.then(TraceId::generate),
            }
        };
        open.extend(issued_ids);
        for id in settled {
            open.remove(&id);
        }
        let oldest = open
            .first()
            .map_or(0, |&id| TraceId::from_u128(id).timestamp_ms());
        self.oldest_ms.store(oldest, Ordering::Release);
        folded
    }

    fn settle(&self, id: TraceId) {
        let unfolded = {
            let mut settled = lock(&self.settled);
            settled.push(id.as_u128());
            settled.len()
        };
        // Only when nothing else folds; never waiting for a fold already under way.
        if unfolded >= FOLD_AT
            && let Some(mut open) = try_lock(&self.open)
        {
            self.fold(&mut open, false);
        }
    }

    /// Settles a batch of tickets at once (the writer settles a whole commit), then folds,
    /// leaving `tickets` empty.
    pub(crate) fn settle_all(tickets: &mut Vec<Ticket>) {
        let Some(owner) = tickets.iter().find_map(|t| t.owner.clone()) else {
            tickets.clear();
            return;
        };
        // Gathered outside the lock: a single settle on the request path (a dropped trace) takes
        // it too, and this runs on the idle-class commit thread.
        let mine: Vec<u128> = tickets
            .iter_mut()
            .filter(|t| t.owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, &owner)))
            .map(|ticket| {
                ticket.owner = None;
                ticket.id.as_u128()
            })
            .collect();
        {
            let mut settled = lock(&owner.settled);
            if settled.is_empty() {
                *settled = mine;
            } else {
                settled.extend_from_slice(&mine);
            }
        }
        // Any of another store (none in practice) settle one by one as they drop.
        tickets.clear();
        let mut open = lock(&owner.open);
        owner.fold(&mut open, false);
    }
}

/// A trace id, unsettled while the ticket lives.
#[derive(Debug)]
pub struct Ticket {
    id: TraceId,
    owner: Option<Arc<Unsettled>>,
}

impl Ticket {
    /// An id no scan waits for: for sinks that do not store traces.
    pub fn untracked() -> Self {
        Self {
            id: TraceId::generate(),
            owner: None,
        }
    }

    /// The id.
    pub fn id(&self) -> TraceId {
        self.id
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            owner.settle(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_the_oldest_unsettled_id_and_passes_every_settled_one() {
        let unsettled = Arc::new(Unsettled::default());
        assert_eq!(unsettled.scan_bound(), None, "no writer: no bound");
        let (a, b, c) = (unsettled.issue(), unsettled.issue(), unsettled.issue());
        assert_eq!(unsettled.scan_bound(), Some(a.id()));
        assert_eq!(unsettled.oldest(), Some(a.id()));
        assert!(unsettled.contains(b.id()));
        drop(b);
        assert_eq!(
            unsettled.scan_bound(),
            Some(a.id()),
            "a later id settling moves nothing"
        );
        let a_id = a.id();
        drop(a);
        assert_eq!(unsettled.scan_bound(), Some(c.id()));
        let c_id = c.id();
        drop(c);
        assert_eq!(unsettled.oldest(), None);
        let bound = unsettled.scan_bound().unwrap();
        assert!(
            bound > c_id && bound > a_id,
            "all settled: above every id issued"
        );
        let next = unsettled.issue();
        assert!(
            next.id() > bound,
            "ids issued after the bound was read lie above it"
        );
        assert!(Ticket::untracked().owner.is_none());
    }

    #[test]
    fn a_batch_settles_at_once_and_single_settles_fold_before_they_pile_up() {
        let unsettled = Arc::new(Unsettled::default());
        let held = unsettled.issue();
        let mut batch: Vec<Ticket> = (0..100).map(|_| unsettled.issue()).collect();
        let last = batch.last().map(Ticket::id);
        assert!(unsettled.contains(last.unwrap()));
        Unsettled::settle_all(&mut batch);
        assert!(batch.is_empty());
        assert!(!unsettled.contains(last.unwrap()), "settled with its batch");
        assert_eq!(unsettled.oldest(), Some(held.id()));
        let started = held.id().timestamp_ms();
        assert_eq!(unsettled.oldest_started_ms(), Some(started));
        // With a fold under way (the lock held here), metrics get the last answer at once.
        let later = unsettled.issue();
        {
            let _folding = lock(&unsettled.open);
            drop(held);
            assert_eq!(unsettled.oldest_started_ms(), Some(started));
        }
        assert_eq!(
            unsettled.oldest_started_ms(),
            Some(later.id().timestamp_ms())
        );
        drop(later);
        assert_eq!(unsettled.oldest_started_ms(), None);

        // Settled one by one with no reader and no writer to fold them: the list stays bounded.
        let many: Vec<Ticket> = (0..2 * FOLD_AT).map(|_| unsettled.issue()).collect();
        drop(many);
        assert!(lock(&unsettled.settled).len() < FOLD_AT);
        assert_eq!(unsettled.oldest(), None);
    }

    #[test]
    fn under_concurrent_issue_and_settle_the_bound_never_passes_a_live_id() {
        let unsettled = Arc::new(Unsettled::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn: Vec<_> = (0..3)
            .map(|n| {
                let (unsettled, stop) = (Arc::clone(&unsettled), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut batch = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        batch.push(unsettled.issue());
                        // One thread settles in batches, as the writer does; the others one by one.
                        if n > 0 || batch.len() == 32 {
                            Unsettled::settle_all(&mut batch);
                        }
                    }
                })
            })
            .collect();
        for _ in 0..20_000 {
            let live = unsettled.issue();
            let bound = unsettled.scan_bound().unwrap();
            assert!(
                bound <= live.id(),
                "the bound passed an id still on its way"
            );
            assert!(unsettled.contains(live.id()));
            let id = live.id();
            drop(live);
            assert!(!unsettled.contains(id));
            let after = unsettled.issue();
            assert!(after.id() > id);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in churn {
            thread.join().unwrap();
        }
        // Every ticket is gone: nothing may be left listed, or scans would stop there for good.
        assert_eq!(unsettled.oldest(), None);
        assert!(lock(&unsettled.open).is_empty());
    }
}
