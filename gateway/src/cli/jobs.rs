//! `forge jobs list|show`: distillation jobs and the model registry, through the admin API.

use crate::env::ENV_FORGE_ADMIN_TOKEN;

/// What to show.
#[derive(Debug, Clone)]
pub enum Action {
    /// Every job, newest first.
    List,
    /// One job.
    Show {
        /// The job id.
        id: String,
    },
    /// The model registry.
    Models,
    /// Start a cycle for a route now.
    Start {
        /// The alias.
        alias: String,
    },
}

/// Runs the command against the admin API at `base`.
pub async fn run(base: &str, action: Action) -> Result<(), String> {
    let token = std::env::var(ENV_FORGE_ADMIN_TOKEN)
        .map_err(|_| format!("set {ENV_FORGE_ADMIN_TOKEN} to the gateway's admin token"))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let base = base.trim_end_matches('/');
    let http = reqwest::Client::new();
    let request = match &action {
        Action::List => http.get(format!("{base}/admin/jobs")),
        Action::Show { id } => http.get(format!("{base}/admin/jobs/{id}")),
        Action::Models => http.get(format!("{base}/admin/models")),
        Action::Start { alias } => http.post(format!("{base}/admin/distill/{alias}")),
    };
    let response = request
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| format!("admin API: {e}"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|e| format!("admin API: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "{status}: {}",
            body["error"]["message"].as_str().unwrap_or("error")
        ));
    }
    if let Action::List = action {
        for job in body["data"].as_array().into_iter().flatten() {
            println!(
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
            );
        }
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
    }
    Ok(())
}
