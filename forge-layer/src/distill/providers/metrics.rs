//! Training metrics from a job's result CSV or its metrics events, under one set of names.

use std::collections::BTreeMap;

use serde_json::Value;

/// Forge's names for the metrics, with every spelling providers use for each. OpenAI's guide
/// writes `train_accuracy`; Azure writes `validation_mean_token_accuracy`.
const COLUMNS: &[(&str, &[&str])] = &[
    ("train_loss", &["train_loss"]),
    (
        "train_mean_token_accuracy",
        &["train_mean_token_accuracy", "train_accuracy"],
    ),
    ("valid_loss", &["valid_loss", "validation_loss"]),
    (
        "valid_mean_token_accuracy",
        &[
            "valid_mean_token_accuracy",
            "validation_mean_token_accuracy",
            "valid_accuracy",
        ],
    ),
    ("full_valid_loss", &["full_valid_loss"]),
    (
        "full_valid_mean_token_accuracy",
        &[
            "full_valid_mean_token_accuracy",
            "full_validation_mean_token_accuracy",
        ],
    ),
];

fn canonical(header: &str) -> Option<&'static str> {
    let header = header.trim().trim_matches('"').trim();
    COLUMNS
        .iter()
        .find(|(_, spellings)| {
            spellings
                .iter()
                .any(|spelling| spelling.eq_ignore_ascii_case(header))
        })
        .map(|(name, _)| *name)
}

/// Reads a result CSV by header name: the last non-empty value of each known column. Columns
/// are found by name, never by position, since OpenAI and Azure order and name them
/// differently; unknown columns and unparsable cells are skipped.
pub(super) fn parse_result_csv(text: &str) -> BTreeMap<String, f64> {
    let mut lines = text.lines().map(|line| line.trim_end_matches('\r'));
    let Some(header) = lines.next() else {
        return BTreeMap::new();
    };
    let header = header.trim_start_matches('\u{feff}');
    let columns: Vec<Option<&'static str>> = header.split(',').map(canonical).collect();
    let mut metrics = BTreeMap::new();
    for line in lines {
        for (cell, column) in line.split(',').zip(&columns) {
            let Some(name) = column else { continue };
            let cell = cell.trim().trim_matches('"').trim();
            if let Ok(value) = cell.parse::<f64>()
                && value.is_finite()
            {
                metrics.insert((*name).to_owned(), value);
            }
        }
    }
    metrics
}

/// Reads the newest `type:"metrics"` event of a newest-first event list (`data` of
/// `GET …/events`).
pub(super) fn metrics_from_events(events: &[Value]) -> BTreeMap<String, f64> {
    let newest = events.iter().find(|event| {
        event.get("type").and_then(Value::as_str) == Some("metrics")
            && event.get("data").is_some_and(Value::is_object)
    });
    let mut metrics = BTreeMap::new();
    if let Some(data) = newest
        .and_then(|event| event.get("data"))
        .and_then(Value::as_object)
    {
        for (key, value) in data {
            if let (Some(name), Some(value)) = (canonical(key), value.as_f64())
                && value.is_finite()
            {
                metrics.insert(name.to_owned(), value);
            }
        }
    }
    metrics
}
