//! The serialisable form of a route: what config files, the admin API and the store exchange.

use serde::{Deserialize, Serialize};

use crate::{CanaryShare, Route, RouteError, Student, Target};

/// A student as written in config and JSON: `{ upstream, model, percent, start? }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSpec {
    /// The upstream's name.
    pub upstream: String,
    /// The model name there.
    pub model: String,
    /// Its share of the alias's traffic, 0–100.
    #[serde(default)]
    pub percent: f64,
    /// Where its range of the key space begins, in basis points (0–9999). Left out, students
    /// take consecutive ranges in their order (and a route replaced through the admin API keeps
    /// the places its students had).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<u16>,
}

/// A route as written in config and JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The model name apps send.
    pub alias: String,
    /// The teacher.
    pub teacher: Target,
    /// Students with their shares.
    #[serde(default)]
    pub students: Vec<StudentSpec>,
}

impl RouteSpec {
    /// Builds the route; a share outside 0–100 is an error. Other rules are checked when the
    /// route joins a table.
    pub fn to_route(&self) -> Result<Route, RouteError> {
        let mut route = Route::new(self.alias.clone(), self.teacher.clone());
        for s in &self.students {
            route = route.with_student(Student::new(
                Target::new(s.upstream.clone(), s.model.clone()),
                CanaryShare::from_percent(s.percent)?,
            ));
            if let (Some(start), Some(student)) = (s.start, route.students.last_mut()) {
                student.start = start;
            }
        }
        Ok(route)
    }
}

impl From<&Route> for RouteSpec {
    fn from(route: &Route) -> Self {
        Self {
            alias: route.alias.clone(),
            teacher: route.teacher.clone(),
            students: route
                .students
                .iter()
                .map(|s| StudentSpec {
                    upstream: s.target.upstream.clone(),
                    model: s.target.model.clone(),
                    percent: s.share.percent(),
                    // Only a serving student's place means anything: one at 0% takes a new one
                    // when it serves again.
                    start: (s.share != CanaryShare::ZERO).then_some(s.start),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_a_route_and_json() {
        let json = r#"{"alias":"a","teacher":{"upstream":"u","model":"t"},"students":[{"upstream":"u","model":"s","percent":12.5,"start":300}]}"#;
        let spec: RouteSpec = serde_json::from_str(json).unwrap();
        let route = spec.to_route().unwrap();
        assert_eq!(route.students[0].share.basis_points(), 1250);
        assert_eq!(route.students[0].start, 300);
        assert_eq!(RouteSpec::from(&route), spec);
        // Without starts (a config file, a table stored before they were kept), students take
        // consecutive ranges in their order.
        let old = r#"{"alias":"a","teacher":{"upstream":"u","model":"t"},"students":[{"upstream":"u","model":"s","percent":12.5},{"upstream":"u","model":"r","percent":5}]}"#;
        let route = serde_json::from_str::<RouteSpec>(old)
            .unwrap()
            .to_route()
            .unwrap();
        let starts: Vec<u16> = route.students.iter().map(|s| s.start).collect();
        assert_eq!(starts, vec![0, 1250]);
        assert!(
            serde_json::from_str::<RouteSpec>(
                r#"{"alias":"a","teacher":{"upstream":"u","model":"t"},"x":1}"#
            )
            .is_err()
        );
        let bad = RouteSpec {
            students: vec![StudentSpec {
                percent: 120.0,
                ..spec.students[0].clone()
            }],
            ..spec
        };
        assert!(bad.to_route().is_err());
    }
}
