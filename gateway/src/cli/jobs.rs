//! `forge jobs list|show`: distillation jobs and the model registry, through the admin API.

use super::admin::{AdminClient, segment};

/// What to show.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Action {
    /// Every distillation job, newest first.
    List,
    /// One job as JSON.
    Show {
        /// The job id.
        id: String,
    },
    /// The model registry.
    Models,
    /// Start a distillation cycle for a route now.
    Start {
        /// The alias.
        alias: String,
    },
}

/// Runs the command against the admin API at `base`.
pub async fn run(base: &str, action: Action) -> Result<(), String> {
    let admin = AdminClient::new(base)?;
    let body = match &action {
        Action::List => admin.get("/admin/jobs").await?,
        Action::Show { id } => admin.get(&format!("/admin/jobs/{}", segment(id))).await?,
        Action::Models => admin.get("/admin/models").await?,
        Action::Start { alias } => {
            admin
                .send_json(
                    reqwest::Method::POST,
                    &format!("/admin/distill/{}", segment(alias)),
                    &serde_json::json!({}),
                )
                .await?
        }
    };
    let printed = if let Action::List = action {
        body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .try_for_each(|job| {
                super::print_line(format_args!(
                    "{}  {:<12} {:<10} {:<16} examples {:<6} {}",
                    job["id"].as_str().unwrap_or("?"),
                    job["route"].as_str().unwrap_or("?"),
                    job["status"].as_str().unwrap_or("?"),
                    job["provider_status"].as_str().unwrap_or("-"),
                    job["dataset_size"],
                    job["resulting_model_id"]
                        .as_str()
                        .or(job["error"].as_str())
                        .unwrap_or("")
                ))
            })
    } else {
        super::print_line(serde_json::to_string_pretty(&body).unwrap_or_default())
    };
    printed.map_err(|e| format!("output: {e}"))
}
