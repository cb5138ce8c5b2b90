//! Changing the live routing table: validated, written to the store, then swapped in, whether
//! the change comes from the admin API, the canary guard or the distiller.

use std::sync::Arc;
use std::time::Duration;

use forge_layer::guard::Guard;
use forge_layer::store::{RouteChange, Store, StoreError};
use forge_router::{CanaryShare, Route, RouteError, RouteSpec, Router, RoutingTable};

use forge_layer::trace::now_ms;

/// Why a routing change was refused. The table in force is unchanged in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteUpdateError {
    /// The result would not be a valid table (unknown upstream, shares over 100%, …).
    #[error("{0}")]
    Invalid(#[from] RouteError),
    /// No route has this alias.
    #[error("no route for alias `{0}`")]
    UnknownAlias(String),
    /// The route has no student by the name given.
    #[error("{0}")]
    UnknownStudent(String),
    /// The change does not fit the route's current state (no student, several students and
    /// none named, or the table moved on since the version the caller expected).
    #[error("{0}")]
    Conflict(String),
    /// The change could not be written down, so it was not made.
    #[error("the change could not be stored: {0}")]
    Store(#[from] StoreError),
    /// The task making the change failed (a panic, logged): Forge's fault, not the caller's.
    #[error("{0}")]
    Internal(String),
}

/// The one way routes change at run time.
#[derive(Debug, Clone)]
pub struct RouteControl {
    router: Router,
    store: Option<Store>,
    guard: Option<Arc<Guard>>,
    /// Held from reading the manual aliases to setting them: two changes at once must not each
    /// store the set without the other's alias.
    guard_modes: Arc<tokio::sync::Mutex<()>>,
}

/// Which student a canary operation acts on.
fn student_index(route: &Route, model: Option<&str>) -> Result<usize, RouteUpdateError> {
    match (model, route.students.len()) {
        (Some(m), _) => route
            .students
            .iter()
            .position(|s| s.target.model == m)
            .ok_or_else(|| {
                RouteUpdateError::UnknownStudent(format!(
                    "route `{}` has no student `{m}`",
                    route.alias
                ))
            }),
        (None, 0) => Err(RouteUpdateError::Conflict(format!(
            "route `{}` has no student",
            route.alias
        ))),
        (None, 1) => Ok(0),
        (None, n) => Err(RouteUpdateError::Conflict(format!(
            "route `{}` has {n} students: name one with \"model\"",
            route.alias
        ))),
    }
}

/// Restarts the guard's step of every student whose share differs between `before` and
/// `after` (or that is new), whoever changed it: the guard judges a step on its own traffic.
fn restart_changed_steps(guard: &Guard, before: &RoutingTable, after: &RoutingTable) {
    for route in after.routes() {
        let old = before.route(&route.alias);
        for student in &route.students {
            let was = old.and_then(|r| r.students.iter().find(|s| s.target == student.target));
            if was.is_none_or(|s| s.share != student.share) {
                guard.restart_step(&route.alias, &student.target.model);
            }
        }
    }
}

/// The store's key for the aliases in manual guard mode.
const GUARD_MANUAL: &str = "guard_manual";

/// How many of the latest routing changes [`RouteControl::remove_idle_student`] reads to find
/// when a student went idle.
const IDLE_HISTORY: usize = 1000;

/// Whether `target` is in use for [`RouteControl::remove_idle_student`]: by a route other than
/// `alias` (as its teacher or a student, at any share), by `alias` as its teacher, or by `alias`
/// as a student with a share.
fn in_use(routes: &[&Route], alias: &str, target: &forge_router::Target) -> bool {
    routes.iter().any(|r| {
        r.teacher == *target
            || r.students
                .iter()
                .any(|s| s.target == *target && (r.alias != alias || s.share != CanaryShare::ZERO))
    })
}

/// Sets student `i`'s share. One that had none takes a range of its own, from the teacher's
/// keys ([`Route::place`]); one already serving keeps its range's start, so its users stay.
fn set_share(route: &mut Route, i: usize, share: CanaryShare) {
    let joining = route.students[i].share == CanaryShare::ZERO && share != CanaryShare::ZERO;
    route.students[i].share = share;
    if joining {
        route.place(i);
    }
}

/// Gives the students of a route replaced by `spec` the places their ranges had in `before`,
/// when the spec does not say where they start: a replaced route moves no user whose arm keeps
/// its share, whatever the students' order. Those that had no range take one of their own.
fn keep_places(route: &mut Route, spec: &forge_router::RouteSpec, before: Option<&Route>) {
    let mut unplaced = Vec::new();
    for (k, student) in spec.students.iter().enumerate() {
        if student.start.is_some() {
            continue;
        }
        let kept = before
            .and_then(|b| {
                b.students
                    .iter()
                    .find(|o| o.target.model == student.model && o.share != CanaryShare::ZERO)
            })
            .map(|o| o.start);
        match kept {
            Some(start) => route.students[k].start = start,
            None => {
                unplaced.push((k, route.students[k].share));
                route.students[k].share = CanaryShare::ZERO;
            }
        }
    }
    for (k, share) in unplaced {
        set_share(route, k, share);
    }
}

fn route_mut<'r>(routes: &'r mut [Route], alias: &str) -> Result<&'r mut Route, RouteUpdateError> {
    routes
        .iter_mut()
        .find(|r| r.alias == alias)
        .ok_or_else(|| RouteUpdateError::UnknownAlias(alias.to_string()))
}

impl RouteControl {
    /// Control over `router`, persisting to `store` when there is one.
    pub fn new(router: Router, store: Option<Store>, guard: Option<Arc<Guard>>) -> Self {
        Self {
            router,
            store,
            guard,
            guard_modes: Arc::default(),
        }
    }

    /// The live router.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Applies `edit` to the routes, then validates, stores and swaps. Runs the store write on
    /// the blocking pool.
    async fn apply<F>(
        &self,
        actor: &str,
        action: String,
        alias: Option<String>,
        expected_version: Option<u64>,
        edit: F,
    ) -> Result<Arc<RoutingTable>, RouteUpdateError>
    where
        F: FnOnce(&mut Vec<Route>) -> Result<(), RouteUpdateError> + Send + 'static,
    {
        let router = self.router.clone();
        let store = self.store.clone();
        let guard = self.guard.clone();
        let actor = actor.to_string();
        let result = tokio::task::spawn_blocking(move || {
            router.update_with(
                |routes| {
                    if let Some(expected) = expected_version {
                        let current = router.load().version();
                        if current != expected {
                            return Err(RouteUpdateError::Conflict(format!(
                                "the table is at version {current}, not {expected}"
                            )));
                        }
                    }
                    edit(routes)
                },
                |next| {
                    // Before the swap, under the writer lock: a guard check in between sees the
                    // old share with a step that starts now, never the new share with an old
                    // step's clock and traffic.
                    if let Some(guard) = &guard {
                        restart_changed_steps(guard, &router.load(), next);
                    }
                    let Some(store) = &store else { return Ok(()) };
                    let change = RouteChange {
                        version: next.version(),
                        time_ms: now_ms(),
                        actor: actor.clone(),
                        action: action.clone(),
                        alias: alias.clone(),
                        routes: next.routes().map(RouteSpec::from).collect(),
                    };
                    store.save_routes(&change)?;
                    tracing::info!(version = change.version, actor = %change.actor, action = %change.action, "routing table updated");
                    Ok(())
                },
            )
        })
        .await;
        result.unwrap_or_else(|e| {
            Err(RouteUpdateError::Internal(format!(
                "update task failed: {e}"
            )))
        })
    }

    /// Creates or replaces one route.
    pub async fn put_route(
        &self,
        spec: RouteSpec,
        actor: &str,
        expected_version: Option<u64>,
    ) -> Result<Arc<RoutingTable>, RouteUpdateError> {
        let mut route = spec.to_route()?;
        let alias = spec.alias.clone();
        self.apply(
            actor,
            format!("put route `{alias}`"),
            Some(alias.clone()),
            expected_version,
            move |routes| {
                match routes.iter_mut().find(|r| r.alias == alias) {
                    Some(existing) => {
                        keep_places(&mut route, &spec, Some(existing));
                        *existing = route;
                    }
                    None => {
                        keep_places(&mut route, &spec, None);
                        routes.push(route);
                    }
                }
                Ok(())
            },
        )
        .await
    }

    /// Sets one student's share. The guard starts its step afresh from there.
    pub async fn set_share(
        &self,
        alias: &str,
        model: Option<&str>,
        share: CanaryShare,
        actor: &str,
        expected_version: Option<u64>,
    ) -> Result<Arc<RoutingTable>, RouteUpdateError> {
        self.set_share_from(alias, model, share, actor, expected_version, None)
            .await
    }

    /// Sets an alias's guard mode and stores the set of manual aliases, so that a restart keeps
    /// it: a route an operator took out of the guard's hands must not be stepped or rolled back
    /// after a restart.
    pub async fn set_guard_mode(
        &self,
        guard: &Guard,
        alias: &str,
        manual: bool,
    ) -> Result<(), RouteUpdateError> {
        let _one_at_a_time = self.guard_modes.lock().await;
        // Stored first: a mode that could not be written down is not set.
        if let Some(store) = self.store.clone() {
            let mut aliases = guard.manual_aliases();
            aliases.retain(|a| a != alias);
            if manual {
                aliases.push(alias.to_string());
            }
            tokio::task::spawn_blocking(move || store.put_meta(GUARD_MANUAL, &aliases))
                .await
                .map_err(|e| RouteUpdateError::Internal(format!("store task failed: {e}")))??;
        }
        guard.set_manual(alias, manual);
        Ok(())
    }

    /// Puts back the guard modes stored by [`RouteControl::set_guard_mode`] before a restart.
    pub fn restore_guard_modes(&self, guard: &Guard) -> Result<(), RouteUpdateError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let stored: Option<Vec<String>> = store.meta(GUARD_MANUAL)?;
        for alias in stored.unwrap_or_default() {
            guard.set_manual(&alias, true);
        }
        Ok(())
    }

    /// Applies a canary guard decision, unless the student's share is no longer the one it
    /// judged, or the route went to manual mode, since: an operator's (or the distiller's)
    /// change made meanwhile wins, and the decision is a conflict. A decision not applied is
    /// noted in the guard's events, after the decision itself.
    pub async fn apply_guard_decision(
        &self,
        action: &forge_layer::guard::Action,
    ) -> Result<Arc<RoutingTable>, RouteUpdateError> {
        let applied = self
            .set_share_from(
                &action.alias,
                Some(&action.model),
                action.share,
                "guard",
                None,
                Some(action.judged),
            )
            .await;
        if let (Err(e), Some(guard)) = (&applied, &self.guard) {
            let why = match e {
                RouteUpdateError::Conflict(why) | RouteUpdateError::UnknownStudent(why) => {
                    format!("the route changed meanwhile ({why})")
                }
                other => other.to_string(),
            };
            guard.not_applied(action, &why);
        }
        applied
    }

    async fn set_share_from(
        &self,
        alias: &str,
        model: Option<&str>,
        share: CanaryShare,
        actor: &str,
        expected_version: Option<u64>,
        judged: Option<CanaryShare>,
    ) -> Result<Arc<RoutingTable>, RouteUpdateError> {
        let (alias_owned, model_owned) = (alias.to_string(), model.map(str::to_string));
        let guard = self.guard.clone();
        let action = format!(
            "set canary {}%{}",
            share.percent(),
            model.map(|m| format!(" for {m}")).unwrap_or_default()
        );
        let table = self
            .apply(
                actor,
                action,
                Some(alias.to_string()),
                expected_version,
                move |routes| {
                    let route = route_mut(routes, &alias_owned)?;
                    let i = student_index(route, model_owned.as_deref())?;
                    if let Some(judged) = judged {
                        let now = route.students[i].share;
                        if now != judged {
                            return Err(RouteUpdateError::Conflict(format!(
                                "the share is {}% now, not the {}% the guard judged",
                                now.percent(),
                                judged.percent()
                            )));
                        }
                        if guard.as_ref().is_some_and(|g| g.is_manual(&alias_owned)) {
                            return Err(RouteUpdateError::Conflict(format!(
                                "route `{alias_owned}` is in manual mode"
                            )));
                        }
                    }
                    set_share(route, i, share);
                    Ok(())
                },
            )
            .await?;
        Ok(table)
    }

    /// The student takes all the traffic; the teacher stays in the route for a rollback.
    pub async fn promote(
        &self,
        alias: &str,
        model: Option<&str>,
        actor: &str,
    ) -> Result<Arc<RoutingTable>, RouteUpdateError> {
        let (alias_owned, model_owned) = (alias.to_string(), model.map(str::to_string));
        self.apply(
            actor,
            "promote".into(),
            Some(alias.to_string()),
            None,
            move |routes| {
                let route = route_mut(routes, &alias_owned)?;
                let i = student_index(route, model_owned.as_deref())?;
                for (j, s) in route.students.iter_mut().enumerate() {
                    if j != i {
                        s.share = CanaryShare::ZERO;
                    }
                }
                set_share(route, i, CanaryShare::FULL);
                Ok(())
            },
        )
        .await
    }

    /// The named student (or every student) goes back to 0; the teacher takes the traffic.
    pub async fn rollback(
        &self,
        alias: &str,
        model: Option<&str>,
        actor: &str,
    ) -> Result<Arc<RoutingTable>, RouteUpdateError> {
        // Already rolled back: nothing to change, and no new table version for it.
        let current = self.router.load();
        if let Some(route) = current.route(alias) {
            let rolled_back = match model {
                Some(m) => route
                    .students
                    .iter()
                    .any(|s| s.target.model == m && s.share == CanaryShare::ZERO),
                None => route.students.iter().all(|s| s.share == CanaryShare::ZERO),
            };
            if rolled_back {
                return Ok(current);
            }
        }
        let (alias_owned, model_owned) = (alias.to_string(), model.map(str::to_string));
        self.apply(
            actor,
            "rollback".into(),
            Some(alias.to_string()),
            None,
            move |routes| {
                let route = route_mut(routes, &alias_owned)?;
                match model_owned {
                    Some(_) => {
                        let i = student_index(route, model_owned.as_deref())?;
                        route.students[i].share = CanaryShare::ZERO;
                    }
                    None => route
                        .students
                        .iter_mut()
                        .for_each(|s| s.share = CanaryShare::ZERO),
                }
                Ok(())
            },
        )
        .await
    }

    /// Adds a student at `share` (or updates its share if it is there already).
    pub async fn add_student(
        &self,
        alias: &str,
        target: forge_router::Target,
        share: CanaryShare,
        actor: &str,
    ) -> Result<Arc<RoutingTable>, RouteUpdateError> {
        self.put_student(alias, target, share, actor, false).await
    }

    /// Like [`RouteControl::add_student`], and every other student of the route goes to 0 in
    /// the same update: one canary at a time, and never a table where the old students are
    /// gone but the new one could not join.
    pub async fn add_sole_student(
        &self,
        alias: &str,
        target: forge_router::Target,
        share: CanaryShare,
        actor: &str,
    ) -> Result<Arc<RoutingTable>, RouteUpdateError> {
        let before = self.router.load();
        let table = self
            .put_student(alias, target.clone(), share, actor, true)
            .await?;
        // The students set aside start afresh if they ever come back.
        if let (Some(guard), Some(route)) = (&self.guard, before.route(alias)) {
            for old in route.students.iter().filter(|s| s.target != target) {
                guard.restart_step(alias, &old.target.model);
            }
        }
        Ok(table)
    }

    /// Removes the student `target` from `alias` once it is idle: at 0% there for at least
    /// `idle_for` (by the routing history), and used by no other route, as a teacher or a
    /// student. `Ok(true)` once it is in no route (also when it was in none), so that its
    /// deployment can go; `Ok(false)`, with no change, while it is not idle. A student at 0% has
    /// an empty key range, so no other student's users move.
    pub async fn remove_idle_student(
        &self,
        alias: &str,
        target: forge_router::Target,
        idle_for: Duration,
        actor: &str,
    ) -> Result<bool, RouteUpdateError> {
        let table = self.router.load();
        let route = table
            .route(alias)
            .ok_or_else(|| RouteUpdateError::UnknownAlias(alias.to_string()))?;
        let routes: Vec<&Route> = table.routes().collect();
        if in_use(&routes, alias, &target) {
            return Ok(false);
        }
        if !route.students.iter().any(|s| s.target == target) {
            return Ok(true);
        }
        let idle_since = self.idle_since(alias, &target).await?;
        let idle_ms = u64::try_from(idle_for.as_millis()).unwrap_or(u64::MAX);
        if idle_since.is_some_and(|since| now_ms().saturating_sub(since) < idle_ms) {
            return Ok(false);
        }
        let action = format!("remove student {}/{} (idle)", target.upstream, target.model);
        let alias_owned = alias.to_string();
        // Only on the table the history was read against: a share given and taken away since
        // would restart the idle time, and the next pass decides on it.
        let removed = self
            .apply(
                actor,
                action,
                Some(alias.to_string()),
                Some(table.version()),
                move |routes| {
                    // Checked again in the update itself: a share or a use given meanwhile keeps it.
                    if in_use(&routes.iter().collect::<Vec<_>>(), &alias_owned, &target) {
                        return Err(RouteUpdateError::Conflict("it is in use again".into()));
                    }
                    route_mut(routes, &alias_owned)?
                        .students
                        .retain(|s| s.target != target);
                    Ok(())
                },
            )
            .await;
        match removed {
            Ok(_) => Ok(true),
            Err(RouteUpdateError::Conflict(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Since when `target` has been in `alias` at 0%, by the routing history: from the change
    /// that took its share away, or that added it at 0%. Only the latest [`IDLE_HISTORY`]
    /// changes are read: at 0% in all of them, it counts from the oldest, which can only make
    /// it wait longer. `None` without a history (no store).
    async fn idle_since(
        &self,
        alias: &str,
        target: &forge_router::Target,
    ) -> Result<Option<u64>, RouteUpdateError> {
        let mut since = None;
        for change in self.history(IDLE_HISTORY).await? {
            let share = change
                .routes
                .iter()
                .filter(|r| r.alias == alias)
                .flat_map(|r| &r.students)
                .find(|s| s.upstream == target.upstream && s.model == target.model)
                .map(|s| s.percent);
            // Idle from the change after this one (newer, read before it) on: it had a share
            // here, or it was not in the route yet (it joined at 0%).
            if share.is_none_or(|percent| percent > 0.0) {
                return Ok(Some(since.unwrap_or_else(now_ms)));
            }
            since = Some(change.time_ms);
        }
        Ok(since)
    }

    async fn put_student(
        &self,
        alias: &str,
        target: forge_router::Target,
        share: CanaryShare,
        actor: &str,
        sole: bool,
    ) -> Result<Arc<RoutingTable>, RouteUpdateError> {
        let alias_owned = alias.to_string();
        let action = format!(
            "add student {}/{} at {}%{}",
            target.upstream,
            target.model,
            share.percent(),
            if sole { ", the others to 0" } else { "" }
        );
        self.apply(
            actor,
            action,
            Some(alias.to_string()),
            None,
            move |routes| {
                let route = route_mut(routes, &alias_owned)?;
                if sole {
                    for other in route.students.iter_mut().filter(|s| s.target != target) {
                        other.share = CanaryShare::ZERO;
                    }
                }
                match route.students.iter().position(|s| s.target == target) {
                    Some(i) => set_share(route, i, share),
                    None => {
                        // A route holds at most MAX_STUDENTS, and each distillation adds one:
                        // make room by dropping the oldest students that carry no traffic. Their
                        // key ranges are empty, so no other student's users move.
                        while route.students.len() >= forge_router::MAX_STUDENTS {
                            let Some(idle) = route
                                .students
                                .iter()
                                .position(|s| s.share == CanaryShare::ZERO)
                            else {
                                break; // validation refuses the table, with the reason
                            };
                            route.students.remove(idle);
                        }
                        route
                            .students
                            .push(forge_router::Student::new(target, CanaryShare::ZERO));
                        let i = route.students.len() - 1;
                        set_share(route, i, share);
                    }
                }
                Ok(())
            },
        )
        .await
    }

    /// The latest changes, newest first (empty without a store). A read that fails is an
    /// error, never an empty history.
    pub async fn history(&self, limit: usize) -> Result<Vec<RouteChange>, RouteUpdateError> {
        let Some(store) = self.store.clone() else {
            return Ok(Vec::new());
        };
        tokio::task::spawn_blocking(move || store.route_history(limit))
            .await
            .map_err(|e| RouteUpdateError::Internal(format!("routing history read: {e}")))?
            .map_err(RouteUpdateError::Store)
    }
}

#[cfg(test)]
mod tests {
    use forge_layer::guard::{Action, EventKind, GuardConfig, ResponseKind};
    use forge_router::{Student, Target};

    use super::*;

    fn pct(p: f64) -> CanaryShare {
        CanaryShare::from_percent(p).unwrap()
    }

    fn control(share: f64) -> (RouteControl, Arc<Guard>) {
        let route = Route::new("a", Target::new("up", "t"))
            .with_student(Student::new(Target::new("up", "s"), pct(share)));
        let router = Router::new(vec![route], ["up"]).unwrap();
        let guard = Arc::new(Guard::new(GuardConfig::default()));
        (
            RouteControl::new(router, None, Some(Arc::clone(&guard))),
            guard,
        )
    }

    fn step_up(judged: f64, to: f64) -> Action {
        Action {
            alias: "a".into(),
            model: "s".into(),
            share: pct(to),
            judged: pct(judged),
            kind: EventKind::SteppedUp,
        }
    }

    fn share_now(control: &RouteControl) -> CanaryShare {
        control.router().load().route("a").unwrap().students[0].share
    }

    #[tokio::test]
    async fn a_guard_decision_never_undoes_a_change_made_since_it_judged() {
        let (control, guard) = control(5.0);
        // An operator rolls the student back after the guard judged it at 5%.
        control
            .set_share("a", Some("s"), CanaryShare::ZERO, "operator", None)
            .await
            .unwrap();
        let err = control
            .apply_guard_decision(&step_up(5.0, 10.0))
            .await
            .unwrap_err();
        assert!(matches!(err, RouteUpdateError::Conflict(_)), "{err}");
        assert_eq!(share_now(&control), CanaryShare::ZERO);
        // The guard's log says so, rather than showing a share the route never had.
        let last = guard.events().pop().unwrap();
        assert_eq!((last.kind, last.percent), (EventKind::NotApplied, 5.0));
        assert!(
            last.detail.contains("step to 10% was not applied"),
            "{}",
            last.detail
        );
        // Nor a route an operator took into manual mode.
        control
            .set_share("a", Some("s"), pct(5.0), "operator", None)
            .await
            .unwrap();
        guard.set_manual("a", true);
        assert!(
            control
                .apply_guard_decision(&step_up(5.0, 10.0))
                .await
                .is_err()
        );
        assert_eq!(share_now(&control), pct(5.0));
        // Unchanged and automatic: it applies.
        guard.set_manual("a", false);
        control
            .apply_guard_decision(&step_up(5.0, 10.0))
            .await
            .unwrap();
        assert_eq!(share_now(&control), pct(10.0));
    }

    /// Traffic enough for a check, and a check past the step's interval: what the guard does
    /// with it (`None`: nothing judged yet, or not verified).
    async fn judged_after_traffic(control: &RouteControl, guard: &Guard) -> Option<EventKind> {
        for _ in 0..200 {
            guard.record("a", "t", ResponseKind::Json, 1000, false);
            guard.record("a", "s", ResponseKind::Json, 1000, false);
        }
        tokio::time::advance(GuardConfig::default().interval / 2).await;
        let actions = guard.check(&control.router().load(), 0);
        actions.first().map(|a| a.kind)
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_changed_by_any_means_is_judged_on_a_step_of_its_own() {
        let (control, guard) = control(5.0);
        // The step at 5% starts, and half an interval of healthy traffic comes.
        assert!(guard.check(&control.router().load(), 0).is_empty());
        assert_eq!(judged_after_traffic(&control, &guard).await, None);
        // An operator sets 25% by replacing the route: a step at 25% starts at the next check,
        // so it is not judged then, on the 5% step's clock and traffic.
        let mut spec = RouteSpec::from(control.router().load().route("a").unwrap());
        spec.students[0].percent = 25.0;
        control.put_route(spec, "operator", None).await.unwrap();
        assert_eq!(judged_after_traffic(&control, &guard).await, None);
        // A full interval into its own step, it is.
        assert_eq!(judged_after_traffic(&control, &guard).await, None);
        assert_eq!(
            judged_after_traffic(&control, &guard).await,
            Some(EventKind::SteppedUp)
        );
        // Back from manual mode, the same: the old clock does not count.
        guard.set_manual("a", true);
        assert_eq!(judged_after_traffic(&control, &guard).await, None);
        guard.set_manual("a", false);
        assert_eq!(judged_after_traffic(&control, &guard).await, None);
        assert_eq!(judged_after_traffic(&control, &guard).await, None);
    }

    /// Which model serves each key point of route `a`.
    fn arms(control: &RouteControl) -> Vec<String> {
        let table = control.router().load();
        (0..10_000u16)
            .map(|p| {
                let d = table.pick("a", forge_router::StickyKey::Point(p)).unwrap();
                d.target.model.clone()
            })
            .collect()
    }

    #[tokio::test]
    async fn rollbacks_route_replacements_and_new_students_move_no_other_student_s_users() {
        let route = Route::new("a", Target::new("up", "t"))
            .with_student(Student::new(Target::new("up", "s0"), pct(10.0)))
            .with_student(Student::new(Target::new("up", "s1"), pct(10.0)));
        let router = Router::new(vec![route], ["up"]).unwrap();
        let control = RouteControl::new(router, None, None);
        let s1_keys = |arms: &[String]| -> Vec<usize> {
            (0..arms.len()).filter(|&p| arms[p] == "s1").collect()
        };
        let before = arms(&control);
        // s0 rolled back: its users go to the teacher, s1 keeps exactly its own.
        control.rollback("a", Some("s0"), "operator").await.unwrap();
        let after = arms(&control);
        assert_eq!(s1_keys(&after), s1_keys(&before));
        assert!(after.iter().all(|m| m != "s0"));
        // The route replaced with its students in the other order: every key keeps its model.
        let mut spec = RouteSpec::from(control.router().load().route("a").unwrap());
        spec.students.reverse();
        for s in &mut spec.students {
            s.start = None;
        }
        control.put_route(spec, "operator", None).await.unwrap();
        assert_eq!(arms(&control), after);
        // s0 back at 5%: it takes teacher keys, and s1 keeps its users.
        control
            .set_share("a", Some("s0"), pct(5.0), "operator", None)
            .await
            .unwrap();
        let back = arms(&control);
        assert_eq!(s1_keys(&back), s1_keys(&before));
        assert_eq!(back.iter().filter(|m| *m == "s0").count(), 500);
    }

    #[tokio::test]
    async fn a_student_that_joins_takes_whatever_room_the_teacher_has() {
        let route = Route::new("a", Target::new("up", "t"))
            .with_student(Student::new(Target::new("up", "s0"), pct(50.0)))
            .with_student(Student::new(Target::new("up", "s1"), pct(50.0)))
            .with_student(Student::new(Target::new("up", "s2"), CanaryShare::ZERO));
        let router = Router::new(vec![route], ["up"]).unwrap();
        let control = RouteControl::new(router, None, None);
        // s0 lowered to 10%: the room it gave back lies between s0 and s1, not after s1.
        control
            .set_share("a", Some("s0"), pct(10.0), "operator", None)
            .await
            .unwrap();
        control
            .set_share("a", Some("s2"), pct(1.0), "operator", None)
            .await
            .unwrap();
        let joined = arms(&control);
        assert_eq!(joined.iter().filter(|m| *m == "s2").count(), 100);
        assert_eq!(joined.iter().filter(|m| *m == "s1").count(), 5000);
        // What GET shows, edited and put back: s0 rolled back and brought back at 5% finds
        // room too, without the place it had.
        control.rollback("a", Some("s0"), "operator").await.unwrap();
        let mut spec = RouteSpec::from(control.router().load().route("a").unwrap());
        assert_eq!(spec.students[0].start, None, "a student at 0% has no place");
        spec.students[0].percent = 5.0;
        control.put_route(spec, "operator", None).await.unwrap();
        let again = arms(&control);
        assert_eq!(again.iter().filter(|m| *m == "s0").count(), 500);
        assert_eq!(again.iter().filter(|m| *m == "s1").count(), 5000);
    }

    #[tokio::test]
    async fn a_new_sole_student_replaces_the_old_ones_in_one_update_or_not_at_all() {
        let (control, _guard) = control(100.0);
        // A student that cannot join (its upstream is unknown): the old one keeps its 100%.
        let err = control
            .add_sole_student("a", Target::new("nowhere", "new"), pct(5.0), "distiller")
            .await
            .unwrap_err();
        assert!(matches!(err, RouteUpdateError::Invalid(_)), "{err}");
        assert_eq!(share_now(&control), CanaryShare::FULL);
        assert_eq!(control.router().load().version(), 1);
        // One that can: a single new version, the old student at 0, the new one at 5%.
        control
            .add_sole_student("a", Target::new("up", "new"), pct(5.0), "distiller")
            .await
            .unwrap();
        let table = control.router().load();
        assert_eq!(table.version(), 2);
        // Rolling back a student already at 0 changes nothing, not even the version.
        control.rollback("a", Some("s"), "operator").await.unwrap();
        assert_eq!(control.router().load().version(), 2);
        let shares: Vec<(String, CanaryShare)> = table
            .route("a")
            .unwrap()
            .students
            .iter()
            .map(|s| (s.target.model.clone(), s.share))
            .collect();
        assert_eq!(
            shares,
            vec![("s".into(), CanaryShare::ZERO), ("new".into(), pct(5.0))]
        );
    }

    #[tokio::test]
    async fn a_new_student_on_a_full_route_takes_the_place_of_the_oldest_idle_one() {
        // Full: the first student carries 5%, the rest none.
        let full = (1..forge_router::MAX_STUDENTS).fold(
            Route::new("a", Target::new("up", "t"))
                .with_student(Student::new(Target::new("up", "live"), pct(5.0))),
            |r, i| {
                r.with_student(Student::new(
                    Target::new("up", format!("s{i}")),
                    CanaryShare::ZERO,
                ))
            },
        );
        let router = Router::new(vec![full], ["up"]).unwrap();
        let control = RouteControl::new(router, None, None);
        control
            .add_student("a", Target::new("up", "new"), pct(1.0), "distiller")
            .await
            .unwrap();
        let table = control.router().load();
        let names: Vec<&str> = table
            .route("a")
            .unwrap()
            .students
            .iter()
            .map(|s| s.target.model.as_str())
            .collect();
        assert_eq!(names.len(), forge_router::MAX_STUDENTS);
        // The live one stays first (its users keep their keys); the oldest idle one is gone.
        assert_eq!(
            (names[0], names[1], names[names.len() - 1]),
            ("live", "s2", "new")
        );
    }

    #[tokio::test]
    async fn only_a_student_idle_long_enough_and_used_nowhere_else_is_removed() {
        // With a store, so that changes are kept in the routing history, which starts two hours
        // ago.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(dir.path()).unwrap();
        let routes = vec![
            Route::new("a", Target::new("up", "t"))
                .with_student(Student::new(Target::new("up", "s"), pct(5.0))),
            Route::new("b", Target::new("up", "t")),
        ];
        store
            .save_routes(&RouteChange {
                version: 1,
                time_ms: now_ms() - 2 * 3600 * 1000,
                actor: "config".into(),
                action: "routes from the config file".into(),
                alias: None,
                routes: routes.iter().map(RouteSpec::from).collect(),
            })
            .unwrap();
        let control = RouteControl::new(Router::new(routes, ["up"]).unwrap(), Some(store), None);
        let s = || Target::new("up", "s");
        let hour = Duration::from_secs(3600);
        let remove = |idle_for| control.remove_idle_student("a", s(), idle_for, "distiller");
        let students = |alias| -> Vec<String> {
            let table = control.router().load();
            let route = table.route(alias).unwrap();
            route
                .students
                .iter()
                .map(|s| s.target.model.clone())
                .collect()
        };
        // It carries traffic (an operator took it back): no change, not even the version.
        assert!(!remove(Duration::ZERO).await.unwrap());
        assert_eq!(control.router().load().version(), 1);
        // At 0% from now on: not idle for an hour yet, but idle.
        control.rollback("a", Some("s"), "operator").await.unwrap();
        assert!(!remove(hour).await.unwrap());
        assert_eq!(students("a"), ["s"]);
        // Used by another route, at 0% there too, or as a teacher: it stays.
        control
            .add_student("b", s(), CanaryShare::ZERO, "operator")
            .await
            .unwrap();
        assert!(!remove(Duration::ZERO).await.unwrap());
        assert_eq!(students("a"), ["s"]);
        let mut other = RouteSpec::from(control.router().load().route("b").unwrap());
        other.students.clear();
        other.teacher = s();
        control
            .put_route(other.clone(), "operator", None)
            .await
            .unwrap();
        assert!(!remove(Duration::ZERO).await.unwrap());
        other.teacher = Target::new("up", "t");
        control.put_route(other, "operator", None).await.unwrap();
        // Idle and nowhere else: out.
        assert!(remove(Duration::ZERO).await.unwrap());
        assert!(students("a").is_empty());
        // Already gone: done, with no new version.
        let version = control.router().load().version();
        assert!(remove(hour).await.unwrap());
        assert_eq!(control.router().load().version(), version);
        // One that joined at 0% just now is idle since it joined, not since the history began.
        let z = || Target::new("up", "z");
        control
            .add_student("a", z(), CanaryShare::ZERO, "operator")
            .await
            .unwrap();
        let remove_z = |idle_for| control.remove_idle_student("a", z(), idle_for, "distiller");
        assert!(!remove_z(hour).await.unwrap());
        assert!(remove_z(Duration::ZERO).await.unwrap());
        assert!(matches!(
            control
                .remove_idle_student("nope", s(), hour, "distiller")
                .await,
            Err(RouteUpdateError::UnknownAlias(_))
        ));
    }
}
