//! `forge dataset export`: build a fine-tuning dataset from the store by hand, with progress.

use std::path::PathBuf;

use forge_layer::dataset::{self, DatasetSpec};
use forge_layer::grade::GoldenPolicy;
use forge_layer::store::Store;
use forge_layer::trace::TraceId;

/// What to export.
#[derive(Debug, Clone, clap::Args)]
pub struct Export {
    /// The route alias.
    #[arg(long)]
    pub route: String,
    /// The data directory (`capture.data_dir`); the gateway must be stopped.
    #[arg(long, default_value = "forge-data")]
    pub data_dir: PathBuf,
    /// Where the dataset folder is written.
    #[arg(long, default_value = "forge-datasets")]
    pub out: PathBuf,
    /// Only this tenant's traces.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only traces after this trace id.
    #[arg(long)]
    pub after: Option<String>,
    /// Scores strictly above this are golden.
    #[arg(long, default_value_t = 90.0)]
    pub golden_min_score: f64,
    /// Lines held out for validation, percent.
    #[arg(long, default_value_t = 10.0)]
    pub validation_percent: f64,
    /// The most of the dataset one client key may contribute.
    #[arg(long, default_value_t = 0.5)]
    pub max_key_share: f64,
}

/// Builds the dataset and prints its manifest; progress goes to stderr.
pub fn run(export: Export) -> anyhow::Result<()> {
    // As `max_key_share` in the config: 0, a negative share or NaN would write nothing or
    // turn the cap off.
    anyhow::ensure!(
        export.max_key_share > 0.0 && export.max_key_share <= 1.0,
        "--max-key-share is a fraction above 0, at most 1"
    );
    // As in the config: more held out than trained on is a mistake, and at 100% the train file
    // would be empty; NaN would quietly mean 0.
    anyhow::ensure!(
        (0.0..=50.0).contains(&export.validation_percent),
        "--validation-percent must be from 0 to 50"
    );
    anyhow::ensure!(
        (0.0..=100.0).contains(&export.golden_min_score),
        "--golden-min-score must be from 0 to 100"
    );
    let store = Store::open_existing_dir(&export.data_dir)?;
    let mut spec = DatasetSpec::new(export.route.clone());
    spec.tenant = export.tenant;
    spec.after = export
        .after
        .as_deref()
        .map(str::parse::<TraceId>)
        .transpose()
        .map_err(|_| anyhow::anyhow!("--after must be a trace id"))?;
    spec.policy = GoldenPolicy {
        min_score: export.golden_min_score,
    };
    spec.validation_percent = export.validation_percent;
    spec.max_key_share = export.max_key_share;
    let id = format!("export_{}", TraceId::generate());
    let started = std::time::Instant::now();
    let manifest = dataset::build(&store, &spec, &export.out, &id, |read| {
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        eprintln!("read {read} traces ({:.0}/s)", read as f64 / secs);
    })?;
    eprintln!(
        "done in {:.1}s: {} golden of {} considered → {} train + {} validation lines ({} duplicates, {} capped, {} skipped)",
        started.elapsed().as_secs_f64(),
        manifest.golden,
        manifest.considered,
        manifest.train.lines,
        manifest.validation.lines,
        manifest.duplicates,
        manifest.capped,
        manifest.skipped.values().sum::<u64>()
    );
    if manifest.considered == 0 {
        // Most likely a mistyped route (or tenant): say so rather than leave an empty dataset.
        std::fs::remove_dir_all(export.out.join(&id))?;
        anyhow::bail!(
            "no trace of route `{}`{} in {}; nothing exported",
            export.route,
            spec.after
                .map(|a| format!(" after {a}"))
                .unwrap_or_default(),
            export.data_dir.display()
        );
    }
    super::print_line(serde_json::to_string_pretty(&manifest)?)?;
    Ok(())
}
