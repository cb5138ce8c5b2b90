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
}

impl Student {
    /// A student with a share.
    pub fn new(target: Target, share: CanaryShare) -> Self {
        Self { target, share }
    }
}

/// Everything an alias resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The model name apps send.
    pub alias: String,
    /// The expensive model that answers by default.
    pub teacher: Target,
    /// Students in order; each takes the next `share` points of the alias's key space.
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

    /// Adds a student after the existing ones.
    pub fn with_student(mut self, student: Student) -> Self {
        self.students.push(student);
        self
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

    /// Refuses `next` if it raises a student's share while a student after it has a share:
    /// students take consecutive ranges of the key space, so that raise would shift the later
    /// student's range and move its users, where raising a share may only take keys from the
    /// teacher. Lowering a share (a rollback) is always allowed.
    pub fn check_raises(&self, next: &RoutingTable) -> Result<(), RouteError> {
        for route in next.routes() {
            let before = self.route(&route.alias);
            let old_share = |model: &Target| {
                before
                    .and_then(|r| r.students.iter().find(|s| &s.target == model))
                    .map_or(0, |s| s.share.basis_points())
            };
            for (i, raised) in route.students.iter().enumerate() {
                if raised.share.basis_points() <= old_share(&raised.target) {
                    continue;
                }
                if let Some(later) = route.students[i + 1..]
                    .iter()
                    .find(|s| s.share.basis_points() > 0)
                {
                    return Err(RouteError::RaiseMovesStudent {
                        alias: route.alias.clone(),
                        raised: raised.target.model.clone(),
                        later: later.target.model.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Picks the arm for one request. It allocates nothing: the decision borrows the table.
    ///
    /// The key's point in `0..10000` is compared with the students' cumulative shares; points
    /// past the last student go to the teacher. Raising the last student's share therefore only
    /// takes points from the teacher.
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
        let mut upper = 0u16;
        for (i, student) in route.students.iter().enumerate() {
            upper += student.share.basis_points();
            if point < upper {
                decision.target = &student.target;
                // Validation caps a route at MAX_STUDENTS, so the index fits.
                decision.arm = Arm::Student(u8::try_from(i).unwrap_or(u8::MAX));
                break;
            }
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
