//! Trace ids still on their way to the store, and the bound that scans with a cursor stop at.
//!
//! A trace's id is made when its exchange starts, and the trace is committed when the exchange
//! ends. So a long stream's trace lands after the traces of many later, shorter exchanges. A scan
//! that remembers where it stopped (the judge's cursor, a dataset's cut) must never step past an
//! id that may still arrive, or that trace is passed over for good. Every id below
//! [`Unsettled::scan_bound`] is settled: committed, or never to be stored.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use crate::trace::TraceId;

/// The ids issued and not yet settled. One per store; the writer issues from it.
#[derive(Debug, Default)]
pub struct Unsettled {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Ids issued and not yet settled: at most the exchanges in flight plus the writer's queue.
    ids: BTreeSet<u128>,
    /// Whether a writer issues ids here; without one nothing is on its way.
    tracking: bool,
}

impl Unsettled {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new trace id, unsettled until the ticket is dropped (after its commit, or when the
    /// trace is dropped or fails).
    pub fn issue(self: &Arc<Self>) -> Ticket {
        let mut state = self.state();
        state.tracking = true;
        // Made under the lock, so a bound read meanwhile is never above an id not yet listed.
        let id = TraceId::generate();
        state.ids.insert(id.as_u128());
        Ticket {
            id,
            owner: Some(Arc::clone(self)),
        }
    }

    /// Where a scan with a cursor must stop (exclusive): the oldest unsettled id, or, with none in
    /// flight, a fresh id above every id issued so far (ids issued later are above it). `None`
    /// when no writer issues ids here: everything stored is settled.
    pub fn scan_bound(&self) -> Option<TraceId> {
        let state = self.state();
        if !state.tracking {
            return None;
        }
        Some(match state.ids.first() {
            Some(&oldest) => TraceId::from_u128(oldest),
            None => TraceId::generate(),
        })
    }

    /// The oldest unsettled id: the exchange that holds cursor scans back (an endless stream, a
    /// client that stopped reading), for operators to see.
    pub fn oldest(&self) -> Option<TraceId> {
        self.state().ids.first().map(|&id| TraceId::from_u128(id))
    }

    /// Whether `id` was issued here and its trace is not settled yet (it is still in flight or
    /// queued for the writer).
    pub fn contains(&self, id: TraceId) -> bool {
        self.state().ids.contains(&id.as_u128())
    }

    fn settle(&self, id: TraceId) {
        self.state().ids.remove(&id.as_u128());
    }

    /// Settles a batch of tickets under one lock (the writer settles a whole commit at once),
    /// leaving `tickets` empty.
    pub(crate) fn settle_all(tickets: &mut Vec<Ticket>) {
        let Some(owner) = tickets.iter().find_map(|t| t.owner.clone()) else {
            tickets.clear();
            return;
        };
        // In slices, so that the request path, which issues under the same lock, never waits
        // for a whole commit's worth of removals.
        for slice in tickets.chunks_mut(64) {
            let mut state = owner.state();
            for ticket in slice {
                if ticket
                    .owner
                    .as_ref()
                    .is_some_and(|o| Arc::ptr_eq(o, &owner))
                {
                    state.ids.remove(&ticket.id.as_u128());
                    ticket.owner = None;
                }
            }
        }
        // Any of another store (none in practice) settle one by one as they drop.
        tickets.clear();
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
}
