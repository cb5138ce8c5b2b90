//! `forge routes show|set-canary|promote|rollback`: the routing table through the admin API.

use super::admin::{AdminClient, segment};

/// What to do.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Action {
    /// The table, its change history and the guard's events.
    Show,
    /// Set a student's share of an alias's traffic.
    SetCanary {
        /// The alias.
        alias: String,
        /// The share, 0–100.
        percent: f64,
        /// The student, when the route has several.
        #[arg(long)]
        model: Option<String>,
    },
    /// Give the student all the traffic (the teacher stays for a rollback).
    Promote {
        /// The alias.
        alias: String,
        /// The student, when the route has several.
        #[arg(long)]
        model: Option<String>,
    },
    /// Send the student's share back to 0.
    Rollback {
        /// The alias.
        alias: String,
        /// The student; every student when absent.
        #[arg(long)]
        model: Option<String>,
    },
}

/// Runs the command against the admin API at `base` (e.g. `http://127.0.0.1:8081`).
pub async fn run(base: &str, action: Action) -> Result<(), String> {
    let admin = AdminClient::new(base)?;
    let with_model = |mut body: serde_json::Value, model: Option<String>| {
        if let Some(m) = model {
            body["model"] = m.into();
        }
        body
    };
    let body = match action {
        Action::Show => admin.get("/admin/routes").await?,
        Action::SetCanary {
            alias,
            percent,
            model,
        } => {
            let body = with_model(serde_json::json!({"percent": percent}), model);
            admin
                .send_json(
                    reqwest::Method::PUT,
                    &format!("/admin/routes/{}/canary", segment(&alias)),
                    &body,
                )
                .await?
        }
        Action::Promote { alias, model } => {
            let body = with_model(serde_json::json!({}), model);
            admin
                .send_json(
                    reqwest::Method::POST,
                    &format!("/admin/routes/{}/promote", segment(&alias)),
                    &body,
                )
                .await?
        }
        Action::Rollback { alias, model } => {
            let body = with_model(serde_json::json!({}), model);
            admin
                .send_json(
                    reqwest::Method::POST,
                    &format!("/admin/routes/{}/rollback", segment(&alias)),
                    &body,
                )
                .await?
        }
    };
    super::print_line(serde_json::to_string_pretty(&body).unwrap_or_default())
        .map_err(|e| format!("output: {e}"))
}
