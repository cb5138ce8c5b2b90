//! The live table behind one `ArcSwap`: lock-free loads for requests, validated swaps for updates.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use crate::{Route, RouteError, RoutingTable};

/// The handle every request and every updater shares.
///
/// Readers call [`Router::load`] once per request. Writers are serialised by a mutex so that
/// two updates never race to the same version number; readers never take it.
#[derive(Debug, Clone)]
pub struct Router {
    current: Arc<ArcSwap<RoutingTable>>,
    known_upstreams: Arc<HashSet<String>>,
    writer: Arc<Mutex<()>>,
}

impl Router {
    /// Builds the first table (version 1) from `routes`, validated against the upstream names.
    pub fn new<I, S>(routes: Vec<Route>, upstreams: I) -> Result<Self, RouteError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::with_version(routes, upstreams, 1)
    }

    /// Like [`Router::new`], resuming the version count from a stored table.
    pub fn with_version<I, S>(
        routes: Vec<Route>,
        upstreams: I,
        version: u64,
    ) -> Result<Self, RouteError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let known_upstreams: HashSet<String> = upstreams.into_iter().map(Into::into).collect();
        let table = RoutingTable::new(version, routes, &known_upstreams)?;
        Ok(Self {
            current: Arc::new(ArcSwap::from_pointee(table)),
            known_upstreams: Arc::new(known_upstreams),
            writer: Arc::new(Mutex::new(())),
        })
    }

    /// The table in force. Load it once per request and use that snapshot throughout.
    pub fn load(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    /// Derives a new table from the current routes. `edit` may refuse with an error; otherwise
    /// the result is validated and, only if valid, stored as the next version.
    pub fn update<F>(&self, edit: F) -> Result<Arc<RoutingTable>, RouteError>
    where
        F: FnOnce(&mut Vec<Route>) -> Result<(), RouteError>,
    {
        self.update_with(edit, |_| Ok(()))
    }

    /// Like [`Router::update`], with a step between validation and the swap: `persist` sees the
    /// validated next table and may refuse it (say, when it cannot be written down), in which
    /// case the table in force stays. Updates are serialised, so versions never collide.
    pub fn update_with<F, P, E>(&self, edit: F, persist: P) -> Result<Arc<RoutingTable>, E>
    where
        F: FnOnce(&mut Vec<Route>) -> Result<(), E>,
        P: FnOnce(&RoutingTable) -> Result<(), E>,
        E: From<RouteError>,
    {
        // A poisoned lock only means an earlier editor panicked; the table itself is immutable.
        let _guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.current.load();
        let mut routes: Vec<Route> = current.routes().cloned().collect();
        edit(&mut routes)?;
        let next = Arc::new(RoutingTable::new(
            current.version() + 1,
            routes,
            &self.known_upstreams,
        )?);
        persist(&next)?;
        self.current.store(Arc::clone(&next));
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Arm, CanaryShare, StickyKey, Student, Target};

    #[test]
    fn invalid_update_keeps_the_old_table() {
        let router = Router::new(vec![Route::new("a", Target::new("up", "t"))], ["up"]).unwrap();
        let err = router
            .update(|routes| {
                routes.push(Route::new("b", Target::new("elsewhere", "m")));
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(err, RouteError::UnknownUpstream { .. }));
        let table = router.load();
        assert_eq!(table.version(), 1);
        assert!(table.route("b").is_none());
    }

    #[test]
    fn valid_update_is_visible_to_the_next_load_with_a_new_version() {
        let router = Router::new(vec![Route::new("a", Target::new("up", "t"))], ["up"]).unwrap();
        let before = router.load();
        router
            .update(|routes| {
                routes[0]
                    .students
                    .push(Student::new(Target::new("up", "s"), CanaryShare::FULL));
                Ok(())
            })
            .unwrap();
        let after = router.load();
        assert_eq!(after.version(), 2);
        assert_eq!(
            after.pick("a", StickyKey::Point(1)).unwrap().arm,
            Arm::Student(0)
        );
        // The snapshot a request already holds is unchanged.
        assert_eq!(
            before.pick("a", StickyKey::Point(1)).unwrap().arm,
            Arm::Teacher
        );
    }

    #[test]
    fn no_change_of_one_student_s_share_moves_another_student_s_keys() {
        let pct = |p: f64| CanaryShare::from_percent(p).unwrap();
        let route = Route::new("a", Target::new("up", "t"))
            .with_student(Student::new(Target::new("up", "s0"), pct(10.0)))
            .with_student(Student::new(Target::new("up", "s1"), pct(10.0)));
        let router = Router::new(vec![route], ["up"]).unwrap();
        let set = |i: usize, p: f64| {
            router.update(|routes| {
                routes[0].students[i].share = pct(p);
                Ok(())
            })
        };
        // Every point whose arm changed went to or came from the teacher, or the student whose
        // share changed: no other student's users moved.
        let only_moves = |before: &RoutingTable, after: &RoutingTable, changed: u8| {
            for point in 0..10_000u16 {
                let (old, new) = (
                    before.pick("a", StickyKey::Point(point)).unwrap().arm,
                    after.pick("a", StickyKey::Point(point)).unwrap().arm,
                );
                let involved = |arm: Arm| arm == Arm::Teacher || arm == Arm::Student(changed);
                assert!(
                    old == new || (involved(old) && involved(new)),
                    "point {point}: {old:?} -> {new:?}"
                );
            }
        };
        // s0's range would grow into s1's: refused; the table stays.
        let err = set(0, 20.0).unwrap_err();
        assert!(
            matches!(&err, RouteError::RangesOverlap { first, second, .. } if first == "s0" && second == "s1"),
            "{err}"
        );
        assert_eq!(router.load().version(), 1);
        // s1 grows into the teacher's range only.
        let before = router.load();
        set(1, 30.0).unwrap();
        only_moves(&before, &router.load(), 1);
        // Rolling back s0, the first, gives its users to the teacher; s1's stay with s1.
        let before = router.load();
        set(0, 0.0).unwrap();
        only_moves(&before, &router.load(), 0);
        // And the order of the students is not their place: listed the other way round, every
        // key keeps its arm's model.
        let before = router.load();
        router
            .update(|routes| {
                routes[0].students.reverse();
                Ok(())
            })
            .unwrap();
        let after = router.load();
        for point in 0..10_000u16 {
            let (old, new) = (
                before.pick("a", StickyKey::Point(point)).unwrap().target,
                after.pick("a", StickyKey::Point(point)).unwrap().target,
            );
            assert_eq!(old, new, "point {point}");
        }
    }
}
