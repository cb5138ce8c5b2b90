//! The routing table: aliases to a teacher and zero or more students, and the per-request pick.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::{CanaryShare, RouteError, StickyKey};

/// One model on one upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// The upstream's name in config.
    pub upstream: String,
    /// The model name sent to that upstream.
    pub model: String,
}

impl Target {
    /// A target from its upstream name and model.
    pub fn new(upstream: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            upstream: upstream.into(),
            model: model.into(),
        }
    }
}

/// A student target and the share of the alias's traffic it receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Student {
    /// Where the student is served.
    pub target: Target,
    /// Its share of the alias's traffic.
    pub share: CanaryShare,
    /// Where its range of the key space begins, in basis points (`0..10000`): it serves the
    /// keys from there for `share` points, wrapping past the end. Fixed while it serves, so
    /// that no change to another student's share moves its users.
    pub start: u16,
}

impl Student {
    /// A student with a share; [`Route::with_student`] gives it its start.
    pub fn new(target: Target, share: CanaryShare) -> Self {
        Self {
            target,
            share,
            start: 0,
        }
    }

    /// Whether key point `point` falls in its range. On every request, for each student until
    /// one serves: no division, and a student at 0% is out at once.
    fn serves(&self, point: u16) -> bool {
        let share = self.share.basis_points();
        if share == 0 {
            return false;
        }
        // Both below POINTS, so neither form overflows.
        let offset = if point >= self.start {
            point - self.start
        } else {
            point + POINTS - self.start
        };
        offset < share
    }
}

/// The key space's size in basis points.
const POINTS: u16 = crate::share::POINTS;

/// Everything an alias resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The model name apps send.
    pub alias: String,
    /// The expensive model that answers by default.
    pub teacher: Target,
    /// Students in order; each serves `share` points of the alias's key space from its `start`.
    pub students: Vec<Student>,
    salt: u64,
}

impl Route {
    /// A route with only a teacher. Its sticky salt is derived from the alias, so different
    /// aliases partition keys independently, and the partition survives restarts.
    pub fn new(alias: impl Into<String>, teacher: Target) -> Self {
        let alias = alias.into();
        let salt = xxhash_rust::xxh3::xxh3_64(alias.as_bytes());
        Self {
            alias,
            teacher,
            students: Vec::new(),
            salt,
        }
    }

    /// Adds a student after the existing ones, its range starting where theirs end together:
    /// students listed in order take consecutive ranges.
    pub fn with_student(mut self, mut student: Student) -> Self {
        let before: u32 = self.student_share();
        student.start = (before % u32::from(POINTS)) as u16;
        self.students.push(student);
        self
    }

    /// Gives student `i` a start where its share fits in the teacher's points: the first gap
    /// between the other serving students' ranges, looking on from the end of the range that
    /// starts last (so students that join in turn take consecutive ranges), that holds its
    /// share; 0 when no other student serves. With no such gap, the largest, which validation
    /// then refuses as an overlap. For a student that had no users: one already serving keeps
    /// its place.
    pub fn place(&mut self, i: usize) {
        let Some(share) = self
            .students
            .get(i)
            .map(|s| u32::from(s.share.basis_points()))
        else {
            return;
        };
        let mut ranges: Vec<(u32, u32)> = self
            .students
            .iter()
            .enumerate()
            .filter(|&(j, s)| j != i && s.share != CanaryShare::ZERO)
            .map(|(_, s)| (u32::from(s.start), u32::from(s.share.basis_points())))
            .collect();
        ranges.sort_unstable();
        let (n, points) = (ranges.len(), u32::from(POINTS));
        // The gap after each range, (where it starts, how long it is): the last range's first.
        let gaps: Vec<(u32, u32)> = (0..n)
            .map(|j| (j + n - 1) % n)
            .map(|k| {
                let (start, len) = ranges[k];
                let next = ranges[(k + 1) % n].0 + if k + 1 < n { 0 } else { points };
                ((start + len) % points, next.saturating_sub(start + len))
            })
            .collect();
        let chosen = gaps
            .iter()
            .find(|&&(_, room)| room >= share)
            .or_else(|| gaps.iter().max_by_key(|&&(_, room)| room))
            .map_or(0, |&(start, _)| start);
        if let Some(student) = self.students.get_mut(i) {
            student.start = u16::try_from(chosen).unwrap_or(0);
        }
    }

    /// The total share of all students.
    pub fn student_share(&self) -> u32 {
        self.students
            .iter()
            .map(|s| u32::from(s.share.basis_points()))
            .sum()
    }

    fn validate(&self, known_upstreams: &HashSet<String>) -> Result<(), RouteError> {
        let alias = &self.alias;
        if alias.trim().is_empty() {
            return Err(RouteError::EmptyAlias);
        }
        let mut seen = HashSet::new();
        for target in std::iter::once(&self.teacher).chain(self.students.iter().map(|s| &s.target))
        {
            if target.model.trim().is_empty() {
                return Err(RouteError::EmptyModel {
                    alias: alias.clone(),
                });
            }
            if !known_upstreams.contains(&target.upstream) {
                return Err(RouteError::UnknownUpstream {
                    alias: alias.clone(),
                    upstream: target.upstream.clone(),
                });
            }
            if !seen.insert(&target.model) {
                return Err(RouteError::DuplicateTarget {
                    alias: alias.clone(),
                    upstream: target.upstream.clone(),
                    model: target.model.clone(),
                });
            }
        }
        if self.students.len() > MAX_STUDENTS {
            return Err(RouteError::TooManyStudents {
                alias: alias.clone(),
                count: self.students.len(),
            });
        }
        let total_bp = self.student_share();
        if total_bp > u32::from(crate::share::POINTS) {
            return Err(RouteError::SharesOverflow {
                alias: alias.clone(),
                total_bp,
            });
        }
        self.check_ranges()
    }

    /// Refuses students whose ranges overlap, or that start off the key space: a key must have
    /// one arm, and a student's range must not reach into another's users.
    fn check_ranges(&self) -> Result<(), RouteError> {
        let mut serving: Vec<&Student> = self
            .students
            .iter()
            .filter(|s| s.share != CanaryShare::ZERO)
            .collect();
        if let Some(off) = self.students.iter().find(|s| s.start >= POINTS) {
            return Err(RouteError::StartOutOfRange {
                alias: self.alias.clone(),
                model: off.target.model.clone(),
                start: off.start,
            });
        }
        serving.sort_by_key(|s| s.start);
        // Each range ends by the next one's start; the last, wrapping, by the first's.
        for (k, s) in serving.iter().enumerate() {
            let next = serving[(k + 1) % serving.len()];
            let end = u32::from(s.start) + u32::from(s.share.basis_points());
            let limit = if k + 1 < serving.len() {
                u32::from(next.start)
            } else {
                u32::from(next.start) + u32::from(POINTS)
            };
            if serving.len() > 1 && end > limit {
                return Err(RouteError::RangesOverlap {
                    alias: self.alias.clone(),
                    first: s.target.model.clone(),
                    second: next.target.model.clone(),
                });
            }
        }
        Ok(())
    }
}

/// The most students one route holds: every index must fit [`Arm::Student`]'s byte.
pub const MAX_STUDENTS: usize = u8::MAX as usize + 1;

/// Which arm of a route served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    /// The teacher: its exchanges are training candidates.
    Teacher,
    /// The student at this index in the route's list: captured for comparison, never trained on.
    Student(u8),
}

impl Arm {
    /// `teacher` or `student`, for metrics and logs.
    pub fn kind(self) -> &'static str {
        match self {
            Arm::Teacher => "teacher",
            Arm::Student(_) => "student",
        }
    }
}

/// Where one request goes, borrowed from the table snapshot that decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'t> {
    /// The upstream model to call.
    pub target: &'t Target,
    /// The arm it belongs to.
    pub arm: Arm,
    /// The version of the table that decided it.
    pub version: u64,
}

/// A validated, immutable set of routes with a version number.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    version: u64,
    routes: HashMap<String, Route>,
    /// Aliases in the order they were given, for stable listings.
    order: Vec<String>,
}

impl RoutingTable {
    /// Validates `routes` against the upstream names the config defines.
    pub fn new(
        version: u64,
        routes: Vec<Route>,
        known_upstreams: &HashSet<String>,
    ) -> Result<Self, RouteError> {
        let mut map = HashMap::with_capacity(routes.len());
        let mut order = Vec::with_capacity(routes.len());
        for route in routes {
            route.validate(known_upstreams)?;
            if map.contains_key(&route.alias) {
                return Err(RouteError::DuplicateAlias(route.alias));
            }
            order.push(route.alias.clone());
            map.insert(route.alias.clone(), route);
        }
        Ok(Self {
            version,
            routes: map,
            order,
        })
    }

    /// The table's version; every accepted update increments it.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The route for an alias.
    pub fn route(&self, alias: &str) -> Option<&Route> {
        self.routes.get(alias)
    }

    /// All routes, in the order they were defined.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.order.iter().filter_map(|a| self.routes.get(a))
    }

    /// Picks the arm for one request. It allocates nothing: the decision borrows the table.
    ///
    /// The key's point in `0..10000` goes to the student whose range holds it, else to the
    /// teacher. Ranges are fixed where they start: raising a share takes points from the
    /// teacher only, and lowering one gives them back to the teacher, never to another student.
    pub fn pick(&self, alias: &str, key: StickyKey<'_>) -> Option<Decision<'_>> {
        let route = self.routes.get(alias)?;
        let mut decision = Decision {
            target: &route.teacher,
            arm: Arm::Teacher,
            version: self.version,
        };
        if route.students.is_empty() {
            return Some(decision);
        }
        let point = key.point(route.salt);
        if let Some((i, student)) = route
            .students
            .iter()
            .enumerate()
            .find(|(_, s)| s.serves(point))
        {
            decision.target = &student.target;
            // Validation caps a route at MAX_STUDENTS, so the index fits.
            decision.arm = Arm::Student(u8::try_from(i).unwrap_or(u8::MAX));
        }
        Some(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams() -> HashSet<String> {
        ["up".to_string()].into_iter().collect()
    }

    fn route(share_percent: f64) -> Route {
        Route::new("a", Target::new("up", "teacher")).with_student(Student::new(
            Target::new("up", "student"),
            CanaryShare::from_percent(share_percent).unwrap(),
        ))
    }

    #[test]
    fn validation_refuses_bad_tables() {
        let ups = upstreams();
        let dup = vec![route(1.0), route(2.0)];
        assert_eq!(
            RoutingTable::new(1, dup, &ups).unwrap_err(),
            RouteError::DuplicateAlias("a".into())
        );
        let unknown = Route::new("b", Target::new("nope", "m"));
        assert!(matches!(
            RoutingTable::new(1, vec![unknown], &ups).unwrap_err(),
            RouteError::UnknownUpstream { .. }
        ));
        let over = route(60.0).with_student(Student::new(
            Target::new("up", "s2"),
            CanaryShare::from_percent(50.0).unwrap(),
        ));
        assert!(matches!(
            RoutingTable::new(1, vec![over], &ups).unwrap_err(),
            RouteError::SharesOverflow {
                total_bp: 11000,
                ..
            }
        ));
        let same = route(10.0).with_student(Student::new(
            Target::new("up", "student"),
            CanaryShare::ZERO,
        ));
        assert!(matches!(
            RoutingTable::new(1, vec![same], &ups).unwrap_err(),
            RouteError::DuplicateTarget { .. }
        ));
        // The same model on another upstream is the same arm to everything that names arms.
        let ups2: HashSet<String> = ["up".to_string(), "other".to_string()].into();
        let elsewhere = route(10.0).with_student(Student::new(
            Target::new("other", "student"),
            CanaryShare::ZERO,
        ));
        assert!(matches!(
            RoutingTable::new(1, vec![elsewhere], &ups2).unwrap_err(),
            RouteError::DuplicateTarget { .. }
        ));
        assert!(matches!(
            RoutingTable::new(1, vec![Route::new(" ", Target::new("up", "m"))], &ups).unwrap_err(),
            RouteError::EmptyAlias
        ));
        let crowded = |n: usize| {
            (0..n).fold(Route::new("c", Target::new("up", "t")), |r, i| {
                r.with_student(Student::new(
                    Target::new("up", format!("s{i}")),
                    CanaryShare::ZERO,
                ))
            })
        };
        assert!(RoutingTable::new(1, vec![crowded(MAX_STUDENTS)], &ups).is_ok());
        assert_eq!(
            RoutingTable::new(1, vec![crowded(MAX_STUDENTS + 1)], &ups).unwrap_err(),
            RouteError::TooManyStudents {
                alias: "c".into(),
                count: MAX_STUDENTS + 1
            }
        );
    }

    #[test]
    fn zero_share_always_teacher_full_share_always_student() {
        let ups = upstreams();
        let zero = RoutingTable::new(1, vec![route(0.0)], &ups).unwrap();
        let full = RoutingTable::new(2, vec![route(100.0)], &ups).unwrap();
        for p in 0..10_000 {
            assert_eq!(
                zero.pick("a", StickyKey::Point(p)).unwrap().arm,
                Arm::Teacher
            );
            let d = full.pick("a", StickyKey::Point(p)).unwrap();
            assert_eq!(
                (d.arm, d.target.model.as_str(), d.version),
                (Arm::Student(0), "student", 2)
            );
        }
        assert!(zero.pick("missing", StickyKey::Point(0)).is_none());
    }

    #[test]
    fn ranges_start_where_they_are_placed_wrap_round_and_never_overlap() {
        let ups = upstreams();
        let at = |model: &str, percent: f64, start: u16| Student {
            start,
            ..Student::new(
                Target::new("up", model),
                CanaryShare::from_percent(percent).unwrap(),
            )
        };
        let with = |students: Vec<Student>| {
            let mut route = Route::new("a", Target::new("up", "teacher"));
            route.students = students;
            RoutingTable::new(1, vec![route], &ups)
        };
        // 10% from 9500: the last 500 points and the first 500.
        let table = with(vec![at("w", 10.0, 9500), at("s", 5.0, 500)]).unwrap();
        let arm = |p: u16| {
            table
                .pick("a", StickyKey::Point(p))
                .unwrap()
                .target
                .model
                .clone()
        };
        for (point, model) in [
            (9499, "teacher"),
            (9500, "w"),
            (9999, "w"),
            (0, "w"),
            (499, "w"),
            (500, "s"),
            (999, "s"),
            (1000, "teacher"),
        ] {
            assert_eq!(arm(point), model, "point {point}");
        }
        assert!(matches!(
            with(vec![at("w", 10.0, 9500), at("s", 5.0, 400)]).unwrap_err(),
            RouteError::RangesOverlap { .. }
        ));
        assert!(matches!(
            with(vec![at("w", 10.0, 10_000)]).unwrap_err(),
            RouteError::StartOutOfRange { .. }
        ));
        // A student at 0 holds no range, wherever it starts.
        with(vec![at("w", 10.0, 9500), at("idle", 0.0, 9600)]).unwrap();
    }

    #[test]
    fn share_is_respected_over_many_keys() {
        let table = RoutingTable::new(1, vec![route(12.5)], &upstreams()).unwrap();
        let n = 100_000;
        let students = (0..n)
            .filter(|i| {
                let key = format!("key-{i}");
                table.pick("a", StickyKey::Key(key.as_bytes())).unwrap().arm != Arm::Teacher
            })
            .count();
        let percent = students as f64 * 100.0 / n as f64;
        assert!((percent - 12.5).abs() < 1.0, "got {percent}%");
    }

    #[test]
    fn raising_the_share_only_moves_keys_from_teacher_to_student() {
        let ups = upstreams();
        let low = RoutingTable::new(1, vec![route(5.0)], &ups).unwrap();
        let high = RoutingTable::new(2, vec![route(25.0)], &ups).unwrap();
        for i in 0..20_000 {
            let key = format!("u{i}");
            let before = low.pick("a", StickyKey::Key(key.as_bytes())).unwrap().arm;
            let after = high.pick("a", StickyKey::Key(key.as_bytes())).unwrap().arm;
            assert!(
                !(before == Arm::Student(0) && after == Arm::Teacher),
                "key {key} moved student -> teacher"
            );
        }
    }
}
