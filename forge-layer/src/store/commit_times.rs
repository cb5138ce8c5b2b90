//! How long the trace writer's commits take, as a histogram, so a stalled disk shows on
//! `/metrics` before the queue overflows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: Prometheus' default buckets, with two below 5 ms,
/// where a healthy commit of a batch of traces lands (two fsyncs on an SSD).
pub const COMMIT_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Commit durations so far. Each commit adds to one bucket and to the sum; readers take a
/// snapshot.
#[derive(Debug, Default)]
pub struct CommitTimes {
    /// One per bound in [`COMMIT_BUCKETS`], then one for slower commits.
    buckets: [AtomicU64; COMMIT_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

/// [`CommitTimes`] at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitTimesSnapshot {
    /// `(upper bound in seconds, commits in this bucket only)`, the last bound infinite: the
    /// shape Prometheus encoders take (they accumulate).
    pub buckets: Vec<(f64, u64)>,
    /// All commits' time together, in seconds.
    pub sum_secs: f64,
}

impl CommitTimes {
    /// Counts one commit that took `took` (retries included: the traces waited all of it).
    pub fn record(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = COMMIT_BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(COMMIT_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The histogram now. A commit recorded meanwhile may be in the buckets and not the sum, or
    /// the other way round; the next scrape has it in both.
    pub fn snapshot(&self) -> CommitTimesSnapshot {
        let bounds = COMMIT_BUCKETS.iter().copied().chain([f64::INFINITY]);
        CommitTimesSnapshot {
            buckets: bounds
                .zip(&self.buckets)
                .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
                .collect(),
            sum_secs: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

impl CommitTimesSnapshot {
    /// Commits counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|&(_, n)| n).sum()
    }

    /// Commits since `earlier` that took longer than `secs` (which should be a bucket bound).
    pub fn slower_than_since(&self, secs: f64, earlier: &CommitTimesSnapshot) -> u64 {
        self.buckets
            .iter()
            .zip(&earlier.buckets)
            .filter(|((bound, _), _)| *bound > secs)
            .map(|((_, now), (_, then))| now.saturating_sub(*then))
            .sum()
    }

    /// The upper bound of the slowest bucket holding a commit since `earlier`: the slowest
    /// commit took at most this long (infinite past the last bound); `None` if none ran.
    pub fn slowest_bound_since(&self, earlier: &CommitTimesSnapshot) -> Option<f64> {
        self.buckets
            .iter()
            .zip(&earlier.buckets)
            .rev()
            .find(|((_, now), (_, then))| now > then)
            .map(|((bound, _), _)| *bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_commit_lands_in_the_first_bucket_that_holds_it() {
        let times = CommitTimes::default();
        let empty = times.snapshot();
        for ms in [0, 1, 3, 3, 600, 20_000] {
            times.record(Duration::from_millis(ms));
        }
        let now = times.snapshot();
        assert_eq!(now.count(), 6);
        assert_eq!(now.buckets[0], (0.001, 2), "0 and exactly 1 ms");
        assert_eq!(now.buckets[2], (0.005, 2));
        assert_eq!(now.buckets[9], (1.0, 1));
        assert_eq!(now.buckets[13], (f64::INFINITY, 1));
        assert!((now.sum_secs - 20.607).abs() < 1e-9, "{}", now.sum_secs);
        assert_eq!(now.slower_than_since(0.5, &empty), 2);
        assert_eq!(now.slowest_bound_since(&empty), Some(f64::INFINITY));

        let later = {
            times.record(Duration::from_millis(200));
            times.snapshot()
        };
        assert_eq!(later.slower_than_since(0.1, &now), 1);
        assert_eq!(later.slower_than_since(0.25, &now), 0);
        assert_eq!(later.slowest_bound_since(&now), Some(0.25));
        assert_eq!(later.slowest_bound_since(&later), None);
    }
}
