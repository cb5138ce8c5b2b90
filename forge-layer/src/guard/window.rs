//! Rolling per-arm statistics between two guard checks.

/// The most latency samples kept per window; past that, reservoir sampling keeps a fair sample
/// in fixed memory.
const MAX_SAMPLES: usize = 20_000;

/// What one arm did since the last check.
#[derive(Debug, Clone, Default)]
pub struct ArmWindow {
    /// Exchanges that ended.
    pub requests: u64,
    /// Of those, upstream 5xx, gateway timeouts and broken bodies.
    pub errors: u64,
    latencies_us: Vec<u64>,
    feedback_sum: f64,
    feedback_n: u64,
    /// State of the sampler (xorshift), so sampling needs no global RNG.
    seed: u64,
    /// When the window began (Unix milliseconds): feedback on an exchange from before then
    /// belongs to an earlier step, not to this one.
    since_ms: u64,
}

impl ArmWindow {
    /// An empty window that begins at `since_ms`.
    pub fn since(since_ms: u64) -> Self {
        Self {
            since_ms,
            ..Self::default()
        }
    }

    /// When the window began (Unix milliseconds).
    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    /// Records one finished exchange.
    pub fn record(&mut self, latency_us: u64, failed: bool) {
        self.requests += 1;
        if failed {
            self.errors += 1;
        }
        if self.latencies_us.len() < MAX_SAMPLES {
            self.latencies_us.push(latency_us);
        } else {
            self.seed ^= self.seed << 13 | 1;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            let slot = self.seed % self.requests;
            if let Some(s) = self.latencies_us.get_mut(slot as usize) {
                *s = latency_us;
            }
        }
    }

    /// Records a feedback score (0–100).
    pub fn record_feedback(&mut self, score: f64) {
        self.feedback_sum += score;
        self.feedback_n += 1;
    }

    /// The share of exchanges that did not fail; `None` with no traffic.
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| 1.0 - self.errors as f64 / self.requests as f64)
    }

    /// The 99th-percentile latency in microseconds (nearest rank).
    pub fn p99_us(&self) -> Option<u64> {
        if self.latencies_us.is_empty() {
            return None;
        }
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let rank = (sorted.len() as f64 * 0.99).ceil() as usize;
        sorted.get(rank.saturating_sub(1)).copied()
    }

    /// The mean feedback score, if any feedback came in.
    pub fn mean_feedback(&self) -> Option<f64> {
        (self.feedback_n > 0).then(|| self.feedback_sum / self.feedback_n as f64)
    }

    /// How many feedback scores came in.
    pub fn feedback_count(&self) -> u64 {
        self.feedback_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_percentiles() {
        let mut w = ArmWindow::default();
        assert_eq!(w.success_rate(), None);
        for i in 1..=100 {
            w.record(i * 1000, i % 20 == 0);
        }
        assert_eq!(w.success_rate(), Some(0.95));
        assert_eq!(w.p99_us(), Some(99_000));
        w.record_feedback(80.0);
        w.record_feedback(90.0);
        assert_eq!(w.mean_feedback(), Some(85.0));
    }

    #[test]
    fn memory_stays_bounded_past_the_sample_cap() {
        let mut w = ArmWindow::default();
        for i in 0..(MAX_SAMPLES as u64 * 3) {
            w.record(i, false);
        }
        assert_eq!(w.latencies_us.len(), MAX_SAMPLES);
        assert_eq!(w.requests, MAX_SAMPLES as u64 * 3);
        // A fair sample of 0..60000 has its p99 near the top.
        assert!(w.p99_us().unwrap() > (MAX_SAMPLES as u64 * 3) * 9 / 10);
    }
}
