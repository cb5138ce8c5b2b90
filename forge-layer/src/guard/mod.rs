//! The canary guard: watches each student against its teacher and steps its share up or rolls it
//! back, by itself.
//!
//! Exchanges and feedback are recorded per arm as they finish. At each check, a student whose
//! step has lasted the interval and seen the minimum traffic is judged on three gates: success
//! rate, p99 latency against the teacher's (at the student's mix of streams and JSON answers),
//! and mean feedback against the teacher's. Passing moves it to the next step of the plan;
//! failing `max_failed_checks` times in a row rolls it back to 0. A step without enough traffic
//! is *unverified*: neither passed nor failed. [`Guard::check`] only decides; the caller applies
//! each [`Action`] through the router.

mod window;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use forge_router::{CanaryShare, RoutingTable};
use serde::Serialize;
use tokio::time::Instant;

pub use window::{ArmWindow, Mix, ResponseKind};

/// The fewest feedback scores, on each side, for the feedback gate to count.
const MIN_FEEDBACK: u64 = 10;

/// The guard's settings.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// The shares a student climbs through; the last is usually 100%.
    pub steps: Vec<CanaryShare>,
    /// The shortest time a step lasts before it is judged.
    pub interval: Duration,
    /// The fewest student exchanges a step needs before it is judged.
    pub min_requests: u64,
    /// Gate: the student's success rate must be at least this.
    pub min_success_rate: f64,
    /// Gate: the student's p99 may be at most this multiple of the teacher's…
    pub max_p99_ratio: f64,
    /// …or exceed it by at most this much (small absolute differences are noise).
    pub latency_slack: Duration,
    /// Gate: the student's mean feedback may trail the teacher's by at most this many points.
    pub max_feedback_drop: f64,
    /// Failed checks in a row before the rollback.
    pub max_failed_checks: u32,
    /// Aliases the guard leaves alone.
    pub manual: HashSet<String>,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            steps: [1.0, 5.0, 10.0, 25.0, 50.0, 100.0]
                .into_iter()
                .filter_map(|p| CanaryShare::from_percent(p).ok())
                .collect(),
            interval: Duration::from_secs(300),
            min_requests: 100,
            min_success_rate: 0.99,
            max_p99_ratio: 1.2,
            latency_slack: Duration::from_millis(25),
            max_feedback_drop: 5.0,
            max_failed_checks: 2,
            manual: HashSet::new(),
        }
    }
}

/// A change the guard wants made to a route.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// The alias.
    pub alias: String,
    /// The student's model.
    pub model: String,
    /// Its new share.
    pub share: CanaryShare,
    /// The share it had when it was judged: the decision holds only while it still has it.
    pub judged: CanaryShare,
    /// What kind of decision this is.
    pub kind: EventKind,
}

/// What the guard decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Not enough traffic to judge the step.
    Unverified,
    /// All gates passed; the share goes up a step.
    SteppedUp,
    /// The last step passed: the student has all the traffic.
    Promoted,
    /// A gate failed; one more in a row rolls back.
    FailedCheck,
    /// Gates failed too often: the share is back to 0.
    RolledBack,
    /// A decision above was not applied: the route changed meanwhile, or the change failed.
    NotApplied,
}

/// One decision, as the admin API shows it and the log records it.
#[derive(Debug, Clone, Serialize)]
pub struct GuardEvent {
    /// Unix milliseconds.
    pub time_ms: u64,
    /// The alias.
    pub alias: String,
    /// The student's model.
    pub model: String,
    /// The decision.
    pub kind: EventKind,
    /// The student's share after the decision, in percent.
    pub percent: f64,
    /// The figures behind it.
    pub detail: String,
}

#[derive(Debug, Default)]
struct RouteStats {
    /// The route's teacher, as the last check saw it.
    teacher: Option<String>,
    /// By student model: its window.
    arms: HashMap<String, ArmWindow>,
    /// By student model: the teacher's window since that student's step began. Each student
    /// has its own, so steps that start at different times are each judged against the
    /// teacher's traffic of the same time, never its past.
    baselines: HashMap<String, ArmWindow>,
}

impl RouteStats {
    /// Calls `f` on each window an exchange of `model` counts in: the student's own, or, for
    /// the teacher, every student's baseline.
    fn for_windows_of(&mut self, model: &str, mut f: impl FnMut(&mut ArmWindow)) {
        if self.teacher.as_deref() == Some(model) {
            self.baselines.values_mut().for_each(f);
            return;
        }
        // Look up before inserting, so the common case allocates nothing.
        if !self.arms.contains_key(model) {
            self.arms.insert(model.to_string(), ArmWindow::default());
        }
        if let Some(w) = self.arms.get_mut(model) {
            f(w);
        }
    }
}

#[derive(Debug)]
struct StudentState {
    step_started: Instant,
    failed_checks: u32,
    /// When the step was last reported short of traffic.
    last_unverified: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    stats: HashMap<String, RouteStats>,
    students: HashMap<(String, String), StudentState>,
    events: VecDeque<GuardEvent>,
    manual: HashSet<String>,
}

/// How many events are kept for the admin API.
const MAX_EVENTS: usize = 1000;

/// The guard. Recording takes one short lock; checks run on the caller's schedule.
#[derive(Debug)]
pub struct Guard {
    config: GuardConfig,
    state: Mutex<State>,
}

impl Guard {
    /// A guard with these settings.
    pub fn new(config: GuardConfig) -> Self {
        let manual = config.manual.clone();
        Self {
            config,
            state: Mutex::new(State {
                manual,
                ..State::default()
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &GuardConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one finished exchange of `model` on `alias`.
    pub fn record(
        &self,
        alias: &str,
        model: &str,
        kind: ResponseKind,
        latency_us: u64,
        failed: bool,
    ) {
        let mut state = self.lock();
        if let Some(stats) = route_stats(&mut state, alias) {
            stats.for_windows_of(model, |w| w.record(kind, latency_us, failed));
        }
    }

    /// Records one exchange of `model` on `alias` whose client gave up before any answer came.
    pub fn record_unanswered(&self, alias: &str, model: &str) {
        let mut state = self.lock();
        if let Some(stats) = route_stats(&mut state, alias) {
            stats.for_windows_of(model, ArmWindow::record_unanswered);
        }
    }

    /// Records a feedback score for an exchange of `model` on `alias` that began at
    /// `exchange_ms` (Unix milliseconds). Feedback on an exchange from before the current step
    /// is left out: scores on old traces (given to make them golden, say) would otherwise judge
    /// a step they have nothing to do with.
    pub fn record_feedback(&self, alias: &str, model: &str, exchange_ms: u64, score: f64) {
        let mut state = self.lock();
        if let Some(stats) = route_stats(&mut state, alias) {
            stats.for_windows_of(model, |w| {
                if exchange_ms >= w.since_ms() {
                    w.record_feedback(score);
                }
            });
        }
    }

    /// Puts an alias in manual mode (`true`) or back under the guard. Back under the guard, its
    /// students start their steps afresh: their clocks, failed checks and windows are from
    /// before the operator took over, and may not match the shares set since.
    pub fn set_manual(&self, alias: &str, manual: bool) {
        let mut state = self.lock();
        if manual {
            state.manual.insert(alias.to_string());
        } else if state.manual.remove(alias) {
            state.students.retain(|(a, _), _| a != alias);
            state.stats.remove(alias);
        }
    }

    /// The aliases in manual mode, sorted.
    pub fn manual_aliases(&self) -> Vec<String> {
        let mut aliases: Vec<String> = self.lock().manual.iter().cloned().collect();
        aliases.sort();
        aliases
    }

    /// Whether an alias is in manual mode.
    pub fn is_manual(&self, alias: &str) -> bool {
        self.lock().manual.contains(alias)
    }

    /// Restarts a student's step (its windows and its clock), e.g. after an operator set its
    /// share by hand.
    pub fn restart_step(&self, alias: &str, model: &str) {
        let mut state = self.lock();
        state
            .students
            .remove(&(alias.to_string(), model.to_string()));
        if let Some(route) = state.stats.get_mut(alias) {
            route.arms.remove(model);
            route.baselines.remove(model);
        }
    }

    /// Notes that `action`, whose event is in the log, was not applied, and why: so that the
    /// log does not show a share the route never had.
    pub fn not_applied(&self, action: &Action, why: &str) {
        let decision = match action.kind {
            EventKind::Promoted => "promotion",
            EventKind::RolledBack => "rollback",
            _ => "step",
        };
        let event = GuardEvent {
            time_ms: crate::trace::now_ms(),
            alias: action.alias.clone(),
            model: action.model.clone(),
            kind: EventKind::NotApplied,
            percent: action.judged.percent(),
            detail: format!(
                "the {decision} to {}% was not applied: {why}",
                action.share.percent()
            ),
        };
        push_event(&mut self.lock(), event);
    }

    /// Takes back a rollback that could not be applied (the store failed, say): the student
    /// stays one failed check from it, with its step due, so the next check with enough
    /// traffic that fails rolls it back, not `max_failed_checks` intervals later.
    pub fn rollback_not_applied(&self, alias: &str, model: &str) {
        let due = Instant::now()
            .checked_sub(self.config.interval)
            .unwrap_or_else(Instant::now);
        self.lock().students.insert(
            (alias.to_string(), model.to_string()),
            StudentState {
                step_started: due,
                failed_checks: self.config.max_failed_checks.saturating_sub(1),
                last_unverified: None,
            },
        );
    }

    /// The most recent events, newest last.
    pub fn events(&self) -> Vec<GuardEvent> {
        self.lock().events.iter().cloned().collect()
    }

    /// Judges every student in canary (share above 0 and below 100%) on `table`, and returns
    /// the share changes to make. Events are recorded for every decision, including unverified
    /// steps.
    pub fn check(&self, table: &RoutingTable, now_ms: u64) -> Vec<Action> {
        let mut state = self.lock();
        let mut actions = Vec::new();
        let now = Instant::now();
        for route in table.routes() {
            if state.manual.contains(&route.alias) {
                continue;
            }
            if let Some(stats) = route_stats(&mut state, &route.alias) {
                if stats.teacher.as_deref() != Some(route.teacher.model.as_str()) {
                    stats.teacher = Some(route.teacher.model.clone());
                }
                // Every teacher exchange goes into each baseline: keep only those of students
                // still in canary.
                stats.baselines.retain(|model, _| {
                    route.students.iter().any(|s| {
                        &s.target.model == model
                            && s.share != CanaryShare::ZERO
                            && s.share != CanaryShare::FULL
                    })
                });
            }
            for student in &route.students {
                let share = student.share;
                let key = (route.alias.clone(), student.target.model.clone());
                if share == CanaryShare::ZERO || share == CanaryShare::FULL {
                    // Out of canary (rolled back or promoted, by anyone): a return to canary
                    // starts a step afresh, not on its old clock and failed checks.
                    state.students.remove(&key);
                    continue;
                }
                let started = match state.students.get(&key) {
                    Some(s) => s.step_started,
                    None => {
                        // A step starts: it is judged on what comes from now on, the teacher's
                        // traffic included.
                        state.students.insert(
                            key.clone(),
                            StudentState {
                                step_started: now,
                                failed_checks: 0,
                                last_unverified: None,
                            },
                        );
                        restart_windows(&mut state, &route.alias, &student.target.model, now_ms);
                        now
                    }
                };
                if now.duration_since(started) < self.config.interval {
                    continue;
                }
                let stats = state.stats.entry(route.alias.clone()).or_default();
                let student_w = stats
                    .arms
                    .get(&student.target.model)
                    .cloned()
                    .unwrap_or_default();
                let teacher_w = stats
                    .baselines
                    .get(&student.target.model)
                    .cloned()
                    .unwrap_or_default();
                let event = |kind: EventKind, share: CanaryShare, detail: String| GuardEvent {
                    time_ms: now_ms,
                    alias: route.alias.clone(),
                    model: student.target.model.clone(),
                    kind,
                    percent: share.percent(),
                    detail,
                };
                // Both sides need enough traffic: a p99 or a mean from a handful of teacher
                // requests (or none) would decide nothing.
                let short = [("student", &student_w), ("teacher", &teacher_w)]
                    .into_iter()
                    .find(|(_, w)| w.requests < self.config.min_requests);
                if let Some((side, w)) = short {
                    // Said once an interval, not at every check: a quiet canary can wait for
                    // hours, and its notes would push real decisions out of the event log.
                    let last = state.students.get(&key).and_then(|s| s.last_unverified);
                    if last.is_some_and(|t| now.duration_since(t) < self.config.interval) {
                        continue;
                    }
                    if let Some(s) = state.students.get_mut(&key) {
                        s.last_unverified = Some(now);
                    }
                    let e = event(
                        EventKind::Unverified,
                        share,
                        format!(
                            "{} {side} requests of the {} needed",
                            w.requests, self.config.min_requests
                        ),
                    );
                    push_event(&mut state, e);
                    continue;
                }
                let verdict = self.judge(&student_w, &teacher_w);
                let student_state = state.students.entry(key.clone()).or_insert(StudentState {
                    step_started: now,
                    failed_checks: 0,
                    last_unverified: None,
                });
                student_state.step_started = now;
                let (kind, next) = match verdict {
                    Ok(summary) => {
                        student_state.failed_checks = 0;
                        let next = self.next_step(share);
                        let kind = if next == CanaryShare::FULL {
                            EventKind::Promoted
                        } else {
                            EventKind::SteppedUp
                        };
                        (Some((kind, next)), summary)
                    }
                    Err(reason) => {
                        student_state.failed_checks += 1;
                        if student_state.failed_checks >= self.config.max_failed_checks {
                            (Some((EventKind::RolledBack, CanaryShare::ZERO)), reason)
                        } else {
                            (None, reason)
                        }
                    }
                };
                // The next step is judged on fresh traffic.
                restart_windows(&mut state, &route.alias, &student.target.model, now_ms);
                match kind {
                    Some((kind, share)) => {
                        if kind == EventKind::RolledBack {
                            state.students.remove(&key);
                        }
                        let e = event(kind, share, next);
                        push_event(&mut state, e);
                        actions.push(Action {
                            alias: route.alias.clone(),
                            model: student.target.model.clone(),
                            share,
                            judged: student.share,
                            kind,
                        });
                    }
                    None => {
                        let e = event(EventKind::FailedCheck, share, next);
                        push_event(&mut state, e);
                    }
                }
            }
        }
        actions
    }

    /// The next share in the plan above `share` (100% past the end).
    fn next_step(&self, share: CanaryShare) -> CanaryShare {
        self.config
            .steps
            .iter()
            .copied()
            .find(|s| *s > share)
            .unwrap_or(CanaryShare::FULL)
    }

    /// `Ok(summary)` if every gate passes, else `Err(the failed gates)`.
    fn judge(&self, student: &ArmWindow, teacher: &ArmWindow) -> Result<String, String> {
        let mut failed = Vec::new();
        let mut notes = Vec::new();
        if let Some(success) = student.success_rate() {
            notes.push(format!(
                "success {:.2}% over {} answered requests",
                success * 100.0,
                student.answered()
            ));
            if success < self.config.min_success_rate {
                failed.push(format!(
                    "success {:.2}% < {:.2}%",
                    success * 100.0,
                    self.config.min_success_rate * 100.0
                ));
            }
        }
        // Clients that gave up before any answer. A hung student fails no request: its clients
        // time out first. But a teacher's clients leave early too (a user's stop, an SDK
        // timeout shorter than a long answer), so the student is judged against the teacher's
        // share: it may exceed it by the success gate's tolerance, plus two standard errors of
        // the difference of two samples of the teacher's share, so that a healthy student is
        // not rolled back for chance. For the errors that share is estimated with two more
        // exchanges of each kind (Agresti and Coull's), since a small sample that saw none or
        // one would all but close the allowance; never from the student's own, whose excess
        // would widen it.
        let (gone, teacher_gone) = (student.unanswered_rate(), teacher.unanswered_rate());
        let (n_student, n_teacher) = (
            student.requests.max(1) as f64,
            teacher.requests.max(1) as f64,
        );
        let share = (teacher.unanswered as f64 + 2.0) / (n_teacher + 4.0);
        let noise = 2.0 * (share * (1.0 - share) * (1.0 / n_student + 1.0 / n_teacher)).sqrt();
        let allowed = teacher_gone + (1.0 - self.config.min_success_rate) + noise;
        if gone > allowed {
            failed.push(format!(
                "{:.2}% of its clients gave up before an answer, against the teacher's {:.2}% ({:.2}% allowed)",
                gone * 100.0,
                teacher_gone * 100.0,
                allowed * 100.0
            ));
        }
        // The teacher's p99 as it would be with the student's mix of streams and JSON answers:
        // sticky keys can send one arm more streams, whose latency runs to their last event.
        match (student.p99_us(), teacher.p99_us_at(student.mix())) {
            (Some(s), Some(t)) => {
                let slack =
                    u64::try_from(self.config.latency_slack.as_micros()).unwrap_or(u64::MAX);
                let limit =
                    ((t as f64 * self.config.max_p99_ratio) as u64).max(t.saturating_add(slack));
                notes.push(format!(
                    "p99 {:.1} ms vs teacher {:.1} ms",
                    s as f64 / 1000.0,
                    t as f64 / 1000.0
                ));
                if s > limit {
                    failed.push(format!(
                        "p99 {:.1} ms > {:.1} ms allowed",
                        s as f64 / 1000.0,
                        limit as f64 / 1000.0
                    ));
                }
            }
            _ => notes.push("no teacher latency to compare".into()),
        }
        // A mean of a few scores is one person's mood: the gate needs enough on both sides.
        let enough_feedback =
            student.feedback_count().min(teacher.feedback_count()) >= MIN_FEEDBACK;
        if let (Some(s), Some(t), true) = (
            student.mean_feedback(),
            teacher.mean_feedback(),
            enough_feedback,
        ) {
            notes.push(format!("feedback {s:.1} vs teacher {t:.1}"));
            if s < t - self.config.max_feedback_drop {
                failed.push(format!(
                    "feedback {s:.1} trails the teacher's {t:.1} by more than {}",
                    self.config.max_feedback_drop
                ));
            }
        }
        if failed.is_empty() {
            Ok(notes.join("; "))
        } else {
            Err(failed.join("; "))
        }
    }
}

/// `alias`'s statistics, made empty if there were none. (An `Option` only because the borrow
/// checker cannot see that the lookup after the insert finds it.)
fn route_stats<'s>(state: &'s mut State, alias: &str) -> Option<&'s mut RouteStats> {
    // Look up before inserting, so the common case allocates nothing.
    if !state.stats.contains_key(alias) {
        state.stats.insert(alias.to_string(), RouteStats::default());
    }
    state.stats.get_mut(alias)
}

/// Restarts `model`'s window, and its baseline of the teacher's, for a step that starts at
/// `now_ms` (this check, on the wall clock that traces' times are on).
fn restart_windows(state: &mut State, alias: &str, model: &str, now_ms: u64) {
    let Some(stats) = route_stats(state, alias) else {
        return;
    };
    stats
        .arms
        .insert(model.to_string(), ArmWindow::since(now_ms));
    stats
        .baselines
        .insert(model.to_string(), ArmWindow::since(now_ms));
}

fn push_event(state: &mut State, event: GuardEvent) {
    match event.kind {
        EventKind::Unverified => {
            tracing::info!(alias = %event.alias, model = %event.model, detail = %event.detail, "canary step unverified")
        }
        EventKind::FailedCheck => {
            tracing::warn!(alias = %event.alias, model = %event.model, detail = %event.detail, "canary check failed")
        }
        EventKind::RolledBack => {
            tracing::warn!(alias = %event.alias, model = %event.model, detail = %event.detail, "canary rolled back to 0%")
        }
        // The caller logs why, with the error.
        EventKind::NotApplied => {}
        EventKind::SteppedUp | EventKind::Promoted => {
            tracing::info!(alias = %event.alias, model = %event.model, percent = event.percent, detail = %event.detail, "canary stepped up")
        }
    }
    if state.events.len() == MAX_EVENTS {
        state.events.pop_front();
    }
    state.events.push_back(event);
}

#[cfg(test)]
mod tests;
