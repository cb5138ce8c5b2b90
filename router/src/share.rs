//! Canary shares in basis points, and the sticky point a request falls on.

use crate::RouteError;

/// The number of points the traffic of one alias is divided into (basis points).
pub const POINTS: u16 = 10_000;

/// A share of an alias's traffic, in basis points (0–10000, so 1 = 0.01%).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CanaryShare(u16);

impl CanaryShare {
    /// No traffic.
    pub const ZERO: CanaryShare = CanaryShare(0);
    /// All traffic.
    pub const FULL: CanaryShare = CanaryShare(POINTS);

    /// A share from basis points; `None` above 10000.
    pub fn from_basis_points(bp: u16) -> Option<Self> {
        (bp <= POINTS).then_some(Self(bp))
    }

    /// A share from a percentage, rounded to the nearest basis point.
    pub fn from_percent(percent: f64) -> Result<Self, RouteError> {
        if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
            return Err(RouteError::ShareOutOfRange(percent.to_string()));
        }
        // Shares go in steps of 0.01%: a finer value is refused, not silently rounded (the tiny
        // tolerance only absorbs binary fractions, 12.35 being 1234.9999… basis points).
        let points = percent * 100.0;
        if (points - points.round()).abs() > 1e-6 {
            return Err(RouteError::ShareNotInSteps(percent.to_string()));
        }
        // In range, so the product fits u16 after rounding.
        Ok(Self(points.round() as u16))
    }

    /// Basis points.
    pub fn basis_points(self) -> u16 {
        self.0
    }

    /// Percent, for display and the admin API.
    pub fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

/// What decides where a request falls among the arms of a route.
#[derive(Debug, Clone, Copy)]
pub enum StickyKey<'a> {
    /// A stable key (sticky header, `user`, client key id): the same key always falls on the
    /// same point, so it keeps its arm for as long as the shares don't move past it.
    Key(&'a [u8]),
    /// A point the caller drew at random in `0..10000`, for requests with no key.
    Point(u16),
}

impl StickyKey<'_> {
    /// The point in `0..10000` this key falls on under `salt`.
    pub(crate) fn point(self, salt: u64) -> u16 {
        match self {
            StickyKey::Key(key) => {
                // xxh3 is stable across releases and platforms, so a key keeps its arm across
                // restarts and between replicas. The modulo bias on a 64-bit hash is < 1e-15.
                (xxhash_rust::xxh3::xxh3_64_with_seed(key, salt) % u64::from(POINTS)) as u16
            }
            StickyKey::Point(p) => p % POINTS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_round_trips_and_bounds() {
        assert_eq!(
            CanaryShare::from_percent(12.5).unwrap().basis_points(),
            1250
        );
        assert_eq!(CanaryShare::from_percent(100.0).unwrap(), CanaryShare::FULL);
        assert!(CanaryShare::from_percent(100.01).is_err());
        assert!(CanaryShare::from_percent(-0.5).is_err());
        assert!(CanaryShare::from_percent(f64::NAN).is_err());
        // Steps of 0.01%: binary fractions pass, finer values are refused, not rounded.
        assert_eq!(
            CanaryShare::from_percent(12.35).unwrap().basis_points(),
            1235
        );
        assert_eq!(CanaryShare::from_percent(0.07).unwrap().basis_points(), 7);
        assert!(matches!(
            CanaryShare::from_percent(12.345),
            Err(RouteError::ShareNotInSteps(_))
        ));
        assert_eq!(CanaryShare::from_basis_points(10_001), None);
    }

    #[test]
    fn key_points_are_stable_and_spread() {
        let a = StickyKey::Key(b"user-1").point(7);
        assert_eq!(a, StickyKey::Key(b"user-1").point(7));
        assert!(a < POINTS);
        // A different salt partitions the keys differently.
        let moved = (0..1000)
            .filter(|i| {
                let k = format!("k{i}");
                StickyKey::Key(k.as_bytes()).point(1) != StickyKey::Key(k.as_bytes()).point(2)
            })
            .count();
        assert!(moved > 900, "salt should reshuffle keys, moved {moved}");
    }
}
