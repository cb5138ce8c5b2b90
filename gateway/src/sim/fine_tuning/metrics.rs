//! The simulated training curve: per-step metrics, checkpoint metrics and the result CSV.

use serde::Serialize;

use super::job::TrainingPlan;
use crate::sim::state::Flavor;

const OPENAI_RESULT_HEADER: &str =
    "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n";
const AZURE_RESULT_HEADER: &str = "step,train_loss,train_mean_token_accuracy,valid_loss,validation_mean_token_accuracy,full_valid_loss,full_valid_mean_token_accuracy\n";

/// The loss curve: deterministic, decreasing, and flattening out, like a healthy run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(super) struct StepMetrics {
    pub(super) step: u64,
    pub(super) train_loss: f64,
    train_mean_token_accuracy: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) valid_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    valid_mean_token_accuracy: Option<f64>,
    total_steps: u64,
}

impl StepMetrics {
    pub(super) fn at(step: u64, plan: &TrainingPlan) -> Self {
        let total = plan.resolved.total_steps;
        let progress = step as f64 / total.max(1) as f64;
        let decay = (-4.0 * progress).exp();
        let train_loss = round6(0.25 + 1.75 * decay);
        let train_accuracy = round6(0.55 + 0.4 * (1.0 - decay));
        Self {
            step,
            train_loss,
            train_mean_token_accuracy: train_accuracy,
            valid_loss: plan.has_validation.then(|| round6(train_loss + 0.05)),
            valid_mean_token_accuracy: plan.has_validation.then(|| round6(train_accuracy - 0.02)),
            total_steps: total,
        }
    }
}

fn round6(value: f64) -> f64 {
    (value * 1e6).round() / 1e6
}

/// A checkpoint's `metrics`: every key OpenAI documents, null where there is no validation file.
#[derive(Serialize)]
pub(super) struct CheckpointMetrics {
    step: u64,
    train_loss: f64,
    train_mean_token_accuracy: f64,
    valid_loss: Option<f64>,
    valid_mean_token_accuracy: Option<f64>,
    full_valid_loss: Option<f64>,
    full_valid_mean_token_accuracy: Option<f64>,
}

impl From<&StepMetrics> for CheckpointMetrics {
    fn from(metrics: &StepMetrics) -> Self {
        Self {
            step: metrics.step,
            train_loss: metrics.train_loss,
            train_mean_token_accuracy: metrics.train_mean_token_accuracy,
            valid_loss: metrics.valid_loss,
            valid_mean_token_accuracy: metrics.valid_mean_token_accuracy,
            // The simulated validation set is always evaluated in full.
            full_valid_loss: metrics.valid_loss,
            full_valid_mean_token_accuracy: metrics.valid_mean_token_accuracy,
        }
    }
}

/// The result file: a header, then a row per step, with empty validation cells when the job has
/// no validation file. OpenAI's guide and Azure's docs name and count the columns differently
/// (openai-wire.md §4), and each service writes its own.
pub(super) fn result_csv(plan: &TrainingPlan, flavor: Flavor) -> String {
    let mut csv = String::from(match flavor {
        Flavor::OpenAi => OPENAI_RESULT_HEADER,
        Flavor::Azure => AZURE_RESULT_HEADER,
    });
    for step in 1..=plan.resolved.total_steps {
        let metrics = StepMetrics::at(step, plan);
        let cell = |value: Option<f64>| value.map(|v| format!("{v:.6}")).unwrap_or_default();
        let (valid_loss, valid_accuracy) = (
            cell(metrics.valid_loss),
            cell(metrics.valid_mean_token_accuracy),
        );
        csv.push_str(&format!(
            "{step},{:.6},{:.6},{valid_loss},{valid_accuracy}",
            metrics.train_loss, metrics.train_mean_token_accuracy,
        ));
        if flavor == Flavor::Azure {
            // The simulated validation set is always evaluated in full.
            csv.push_str(&format!(",{valid_loss},{valid_accuracy}"));
        }
        csv.push('\n');
    }
    csv
}
