//! Which traces are golden: good enough to teach a student.

use crate::store::{Evaluation, Feedback};
use crate::trace::{Outcome, Trace};

/// The rule that makes a trace golden: it completed with a 2xx, did not stop for length, came
/// from the teacher, and either a person approved it or its score (feedback or evaluation) is
/// above `min_score`. A person's explicit rejection (`approved: false`) overrides any score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GoldenPolicy {
    /// Scores strictly above this count (default 90).
    pub min_score: f64,
}

impl Default for GoldenPolicy {
    fn default() -> Self {
        Self { min_score: 90.0 }
    }
}

impl GoldenPolicy {
    /// Whether the exchange itself can teach anything, before anyone graded it.
    pub fn is_candidate(&self, trace: &Trace) -> bool {
        trace.outcome == Outcome::Completed
            && (200..300).contains(&trace.status)
            // Cut short, by the token limit or the content filter: the teacher never meant to
            // stop there, and a student trained on it would learn to.
            && !matches!(trace.finish_reason(), Some("length" | "content_filter"))
            && trace.is_teacher()
            && !trace.response.choices.is_empty()
    }

    /// Whether the trace is golden, given the feedback in force and its latest evaluation.
    pub fn is_golden(
        &self,
        trace: &Trace,
        feedback: Option<&Feedback>,
        evaluation: Option<&Evaluation>,
    ) -> bool {
        if !self.is_candidate(trace) {
            return false;
        }
        if feedback.and_then(|f| f.approved) == Some(false) {
            return false;
        }
        let approved = feedback.and_then(|f| f.approved) == Some(true);
        let feedback_score = feedback
            .and_then(|f| f.score)
            .is_some_and(|s| s > self.min_score);
        let evaluation_score = evaluation.is_some_and(|e| e.score > self.min_score);
        approved || feedback_score || evaluation_score
    }
}

#[cfg(test)]
mod tests {
    use forge_router::Arm;

    use super::*;

    fn trace(outcome: Outcome, status: u16, finish: &str, arm: Arm) -> Trace {
        let mut trace = Trace {
            outcome,
            status,
            arm,
            ..Trace::sample("a", "q")
        };
        trace.response.choices[0].finish_reason = Some(finish.into());
        trace
    }

    fn feedback(t: &Trace, score: Option<f64>, approved: Option<bool>) -> Feedback {
        Feedback {
            trace_id: t.id,
            score,
            approved,
            comment: None,
            time_ms: 0,
        }
    }

    fn eval(t: &Trace, score: f64) -> Evaluation {
        Evaluation {
            trace_id: t.id,
            score,
            source: "judge".into(),
            time_ms: 0,
        }
    }

    #[test]
    fn golden_needs_a_good_teacher_exchange_and_a_high_score_or_approval() {
        let p = GoldenPolicy::default();
        let good = trace(Outcome::Completed, 200, "stop", Arm::Teacher);
        assert!(!p.is_golden(&good, None, None), "ungraded is not golden");
        assert!(p.is_golden(&good, Some(&feedback(&good, Some(95.0), None)), None));
        assert!(
            !p.is_golden(&good, Some(&feedback(&good, Some(90.0), None)), None),
            "above 90, not at 90"
        );
        assert!(p.is_golden(&good, Some(&feedback(&good, None, Some(true))), None));
        assert!(p.is_golden(&good, None, Some(&eval(&good, 91.0))));
        assert!(
            !p.is_golden(
                &good,
                Some(&feedback(&good, None, Some(false))),
                Some(&eval(&good, 99.0))
            ),
            "a rejection wins"
        );
        let high = Some(feedback(&good, Some(99.0), Some(true)));
        for bad in [
            trace(Outcome::Errored, 200, "stop", Arm::Teacher),
            trace(Outcome::Completed, 500, "stop", Arm::Teacher),
            trace(Outcome::Completed, 200, "length", Arm::Teacher),
            trace(Outcome::Completed, 200, "content_filter", Arm::Teacher),
            trace(Outcome::Completed, 200, "stop", Arm::Student(0)),
            trace(Outcome::Truncated, 200, "stop", Arm::Teacher),
        ] {
            assert!(
                !p.is_golden(&bad, high.as_ref(), None),
                "{:?}",
                (bad.outcome, bad.status, bad.arm)
            );
        }
    }
}
