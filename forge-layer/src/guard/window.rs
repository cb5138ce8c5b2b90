//! Rolling per-arm statistics between two guard checks.

/// The most latency samples kept per kind of response in a window; past that, reservoir
/// sampling keeps a fair sample in fixed memory.
const MAX_SAMPLES: usize = 10_000;

/// The fewest samples of a kind for it to stand for its share of another arm's mix.
pub const MIN_KIND_SAMPLES: usize = 20;

/// How an exchange was answered. A stream's latency runs to its last event and a JSON body's
/// to its whole answer, so the two are sampled apart and compared like with like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseKind {
    /// A whole JSON body.
    Json,
    /// An SSE stream.
    Stream,
}

/// A fair sample of latencies, in fixed memory.
#[derive(Debug, Clone, Default)]
struct Reservoir {
    /// Every latency offered, kept or not.
    seen: u64,
    samples_us: Vec<u64>,
    /// State of the sampler (xorshift), so sampling needs no global RNG.
    seed: u64,
}

impl Reservoir {
    fn add(&mut self, latency_us: u64) {
        self.seen += 1;
        if self.samples_us.len() < MAX_SAMPLES {
            self.samples_us.push(latency_us);
            return;
        }
        self.seed ^= self.seed << 13 | 1;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let slot = self.seed % self.seen;
        if let Some(s) = self.samples_us.get_mut(slot as usize) {
            *s = latency_us;
        }
    }
}

/// The share of each kind of response (JSON, stream) in some traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix([f64; 2]);

/// What one arm did since the last check.
#[derive(Debug, Clone, Default)]
pub struct ArmWindow {
    /// Exchanges that ended.
    pub requests: u64,
    /// Of those, upstream 5xx, gateway timeouts and broken bodies.
    pub errors: u64,
    /// Of those, exchanges whose client gave up before any answer came: neither a success nor
    /// an error, since the arm had not answered yet.
    pub unanswered: u64,
    /// Latencies by [`ResponseKind`]: JSON, then stream.
    latencies: [Reservoir; 2],
    feedback_sum: f64,
    feedback_n: u64,
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
    pub fn record(&mut self, kind: ResponseKind, latency_us: u64, failed: bool) {
        self.requests += 1;
        if failed {
            self.errors += 1;
        }
        self.latencies[kind as usize].add(latency_us);
    }

    /// Records one exchange whose client gave up before any answer came. Its wait is not a
    /// latency sample: with a p99 of a hundred exchanges, two such waits on one arm and none on
    /// the other decide the gate by chance alone. The share of them is judged on its own.
    pub fn record_unanswered(&mut self) {
        self.requests += 1;
        self.unanswered += 1;
    }

    /// Records a feedback score (0–100).
    pub fn record_feedback(&mut self, score: f64) {
        self.feedback_sum += score;
        self.feedback_n += 1;
    }

    /// Exchanges that had an answer (whole or not) before they ended.
    pub fn answered(&self) -> u64 {
        self.requests - self.unanswered
    }

    /// The share of answered exchanges that did not fail; `None` with none answered.
    pub fn success_rate(&self) -> Option<f64> {
        let answered = self.answered();
        (answered > 0).then(|| 1.0 - self.errors as f64 / answered as f64)
    }

    /// The share of exchanges whose client gave up before any answer; 0 with no traffic.
    pub fn unanswered_rate(&self) -> f64 {
        self.unanswered as f64 / self.requests.max(1) as f64
    }

    /// This window's own mix of JSON and stream responses (of the answered exchanges).
    pub fn mix(&self) -> Mix {
        let answered = self.answered().max(1) as f64;
        let share = |r: &Reservoir| r.seen as f64 / answered;
        Mix([share(&self.latencies[0]), share(&self.latencies[1])])
    }

    /// The 99th-percentile latency in microseconds (nearest rank) of this window's traffic.
    pub fn p99_us(&self) -> Option<u64> {
        self.weighted_p99_us(self.mix(), 1)
    }

    /// The 99th-percentile latency this arm would have had with `mix` of JSON and stream
    /// responses: each kind's samples weighted by its share in `mix`. The teacher's p99 at a
    /// student's mix is what the student's is judged against, so that an arm that happened to
    /// get more long streams is not taken for a slower one. A kind with fewer than
    /// [`MIN_KIND_SAMPLES`] samples here is left out (a handful would decide its whole share),
    /// and the rest stand for the whole; with no kind left, this arm's own p99 is the answer.
    pub fn p99_us_at(&self, mix: Mix) -> Option<u64> {
        self.weighted_p99_us(mix, MIN_KIND_SAMPLES)
            .or_else(|| self.p99_us())
    }

    /// The weighted nearest-rank p99 over the kinds with at least `min_samples` samples and a
    /// share in `mix`; `None` if there are none.
    fn weighted_p99_us(&self, mix: Mix, min_samples: usize) -> Option<u64> {
        let mut weighted: Vec<(u64, f64)> = Vec::new();
        for (reservoir, share) in self.latencies.iter().zip(mix.0) {
            let n = reservoir.samples_us.len();
            if n == 0 || n < min_samples || share <= 0.0 {
                continue;
            }
            let weight = share / n as f64;
            weighted.extend(reservoir.samples_us.iter().map(|&l| (l, weight)));
        }
        weighted.sort_unstable_by_key(|&(latency, _)| latency);
        let total: f64 = weighted.iter().map(|&(_, w)| w).sum();
        // The relative slack absorbs rounding in the sum: with equal weights this is the
        // nearest-rank percentile exactly.
        let rank = total * 0.99 * (1.0 - 1e-9);
        let mut below = 0.0;
        for &(latency, weight) in &weighted {
            below += weight;
            if below >= rank {
                return Some(latency);
            }
        }
        weighted.last().map(|&(latency, _)| latency)
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
        assert_eq!(w.p99_us(), None);
        for i in 1..=100 {
            w.record(ResponseKind::Json, i * 1000, i % 20 == 0);
        }
        assert_eq!(w.success_rate(), Some(0.95));
        assert_eq!(w.p99_us(), Some(99_000));
        // Unanswered exchanges count apart: they leave the success rate as it was.
        for _ in 0..25 {
            w.record_unanswered();
        }
        assert_eq!(w.success_rate(), Some(0.95));
        assert_eq!(w.unanswered_rate(), 0.2);
        assert_eq!(w.p99_us(), Some(99_000), "and the latencies as they were");
        w.record_feedback(80.0);
        w.record_feedback(90.0);
        assert_eq!(w.mean_feedback(), Some(85.0));
    }

    #[test]
    fn memory_stays_bounded_past_the_sample_cap() {
        let mut w = ArmWindow::default();
        for i in 0..(MAX_SAMPLES as u64 * 3) {
            w.record(ResponseKind::Stream, i, false);
        }
        assert_eq!(w.latencies[1].samples_us.len(), MAX_SAMPLES);
        assert_eq!(w.requests, MAX_SAMPLES as u64 * 3);
        // A fair sample of 0..30000 has its p99 near the top.
        assert!(w.p99_us().unwrap() > (MAX_SAMPLES as u64 * 3) * 9 / 10);
    }

    #[test]
    fn a_p99_at_another_mix_weighs_each_kind_by_its_share_there() {
        // 900 fast JSON answers (1–900 µs) and 100 slow streams (100.001–100.1 ms).
        let mut w = ArmWindow::default();
        for i in 1..=900 {
            w.record(ResponseKind::Json, i, false);
        }
        for i in 1..=100 {
            w.record(ResponseKind::Stream, 100_000 + i, false);
        }
        // Its own mix, 10% streams: the p99 is among the streams, and a plain nearest rank.
        assert_eq!(w.p99_us(), Some(100_090));
        // With only 0.5% streams, the 99th percentile falls among the JSON answers.
        let mostly_json = Mix([0.995, 0.005]);
        let p99 = w.p99_us_at(mostly_json).unwrap();
        assert!((890..=900).contains(&p99), "{p99}");
        // A kind the window has too few samples of is left out, whatever its share in the mix;
        // with none left, the window's own p99 answers.
        let mut json_only = ArmWindow::default();
        for i in 1..=100 {
            json_only.record(ResponseKind::Json, i, false);
        }
        json_only.record(ResponseKind::Stream, 1_000_000, false);
        assert_eq!(json_only.p99_us_at(Mix([0.5, 0.5])), Some(99));
        assert_eq!(json_only.p99_us_at(Mix([0.0, 1.0])), json_only.p99_us());
        assert_eq!(ArmWindow::default().p99_us_at(Mix([0.5, 0.5])), None);
    }
}
