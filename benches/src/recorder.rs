//! Timings the criterion benches keep beside criterion's own, for the summaries and targets they print.
//!
//! criterion reports each bench on its own and keeps its estimates to itself; the README wants a
//! comparison (capture beside passthrough) and the issues want targets checked. So each bench
//! times its own iterations (`iter_custom`), hands the time to criterion, and records it here.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One criterion sample: so many iterations took so long.
#[derive(Debug, Clone, Copy)]
struct Sample {
    iters: u64,
    elapsed: Duration,
}

/// Samples by bench name. Cheap to clone; clones share the samples.
#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<BTreeMap<String, Vec<Sample>>>>);

impl Recorder {
    /// Records that `iters` iterations of `name` took `elapsed`, and returns `elapsed` for
    /// criterion.
    pub fn record(&self, name: &str, iters: u64, elapsed: Duration) -> Duration {
        // A panic elsewhere cannot leave a half-written sample list, so poison is harmless.
        let mut samples = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        samples
            .entry(name.to_string())
            .or_default()
            .push(Sample { iters, elapsed });
        elapsed
    }

    /// The median over the samples of the time per iteration, in nanoseconds. Only samples
    /// that lasted at least [`MIN_SAMPLE`] count: criterion's first warm-up samples are a few
    /// iterations each, and clock reads and scheduling dominate them.
    pub fn median_ns(&self, name: &str) -> Option<f64> {
        let samples = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut per_iter: Vec<f64> = samples
            .get(name)?
            .iter()
            .filter(|s| s.iters > 0 && s.elapsed >= MIN_SAMPLE)
            .map(|s| s.elapsed.as_secs_f64() * 1e9 / s.iters as f64)
            .collect();
        if per_iter.is_empty() {
            return None;
        }
        per_iter.sort_by(f64::total_cmp);
        Some(per_iter[per_iter.len() / 2])
    }
}

/// The shortest sample [`Recorder::median_ns`] counts.
pub const MIN_SAMPLE: Duration = Duration::from_millis(1);

/// Inputs made per timed batch: enough that the two clock reads vanish against the batch,
/// few enough that the inputs stay in cache.
const BATCH: u64 = 32;

/// Runs `routine` `iters` times, each on a fresh input from `setup`, and returns the time spent
/// in `routine` alone: inputs are made, and outputs dropped, outside the clock, in batches
/// (what criterion's `iter_batched` does, but with the time in hand).
pub fn timed_batches<I, O>(
    iters: u64,
    mut setup: impl FnMut() -> I,
    mut routine: impl FnMut(I) -> O,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        let inputs: Vec<I> = (0..n).map(|_| setup()).collect();
        let mut outputs = Vec::with_capacity(inputs.len());
        let start = Instant::now();
        for input in inputs {
            outputs.push(black_box(routine(black_box(input))));
        }
        total += start.elapsed();
        drop(outputs);
        left -= n;
    }
    total
}

/// Formats nanoseconds in the unit that keeps them readable: ns, µs or ms.
pub fn human_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.1} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_per_iteration_and_skips_short_samples() {
        let r = Recorder::default();
        r.record("x", 1, Duration::from_micros(900));
        r.record("x", 100, Duration::from_micros(1000));
        r.record("x", 200, Duration::from_micros(2200));
        r.record("x", 300, Duration::from_micros(3600));
        let median = r.median_ns("x").unwrap();
        assert!((median - 11_000.0).abs() < 1e-6, "{median}");
        assert_eq!(r.median_ns("y"), None);
    }

    #[test]
    fn timed_batches_runs_the_routine_once_per_iteration() {
        let mut made = 0;
        let mut ran = Vec::new();
        timed_batches(
            70,
            || {
                made += 1;
                made
            },
            |i| ran.push(i),
        );
        assert_eq!(made, 70);
        assert_eq!(ran, (1..=70).collect::<Vec<_>>());
    }

    #[test]
    fn human_picks_the_unit() {
        assert_eq!(human_ns(42.0), "42.0 ns");
        assert_eq!(human_ns(4_200.0), "4.20 µs");
        assert_eq!(human_ns(4_200_000.0), "4.20 ms");
    }
}
