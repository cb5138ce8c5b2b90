//! `forge routes show|set-canary|promote|rollback`: the routing table through the admin API.

use crate::env::ENV_FORGE_ADMIN_TOKEN;

/// What to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Print the table, its history and the guard's events.
    Show,
    /// Set a student's share.
    SetCanary {
        /// The alias.
        alias: String,
        /// 0–100.
        percent: f64,
        /// The student, when the route has several.
        model: Option<String>,
    },
    /// The student takes 100%.
    Promote {
        /// The alias.
        alias: String,
        /// The student, when the route has several.
        model: Option<String>,
    },
    /// The student goes to 0.
    Rollback {
        /// The alias.
        alias: String,
        /// The student; every student when absent.
        model: Option<String>,
    },
}

/// Runs the command against the admin API at `base` (e.g. `http://127.0.0.1:8081`).
pub async fn run(base: &str, action: Action) -> Result<(), String> {
    let token = std::env::var(ENV_FORGE_ADMIN_TOKEN)
        .map_err(|_| format!("set {ENV_FORGE_ADMIN_TOKEN} to the gateway's admin token"))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let base = base.trim_end_matches('/');
    let http = reqwest::Client::new();
    let with_model = |mut body: serde_json::Value, model: Option<String>| {
        if let Some(m) = model {
            body["model"] = m.into();
        }
        body
    };
    let request = match action {
        Action::Show => http.get(format!("{base}/admin/routes")),
        Action::SetCanary {
            alias,
            percent,
            model,
        } => http
            .put(format!("{base}/admin/routes/{alias}/canary"))
            .json(&with_model(serde_json::json!({"percent": percent}), model)),
        Action::Promote { alias, model } => http
            .post(format!("{base}/admin/routes/{alias}/promote"))
            .json(&with_model(serde_json::json!({}), model)),
        Action::Rollback { alias, model } => http
            .post(format!("{base}/admin/routes/{alias}/rollback"))
            .json(&with_model(serde_json::json!({}), model)),
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
    println!(
        "{}",
        serde_json::to_string_pretty(&body).unwrap_or_default()
    );
    Ok(())
}
