//! The training container's first act: download the dataset with its bearer token and check it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::DatasetFetch;
use super::job::DatasetSource;
use crate::sim::jsonl::validate_training_jsonl;
use crate::sim::state::SimState;

/// A real trainer would give up on a dataset server that hangs; so does this one.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the download of `source` for the Job `uid` at `start`, when its pod runs.
pub(super) fn spawn(state: &Arc<SimState>, job: JobRef, source: DatasetSource, start: Instant) {
    let task_state = Arc::clone(state);
    let task = tokio::spawn(async move {
        tokio::time::sleep_until(start).await;
        // A Job deleted before its pod started never runs its container.
        if !task_state.storage().cluster.has_job(&job.uid) {
            return;
        }
        let (status, outcome) = fetch(&source).await;
        let fetched = DatasetFetch {
            namespace: job.namespace,
            job: job.name,
            url: source.url,
            token: source.token,
            status,
            outcome,
        };
        task_state
            .storage()
            .cluster
            .finish_fetch(&job.uid, Instant::now(), fetched);
    });
    state.track(task.abort_handle());
}

/// Which Job a download belongs to; the uid tells a recreated Job of the same name apart.
pub(super) struct JobRef {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) uid: String,
}

/// The HTTP status, if any, and the examples in the file or why the container gave up.
async fn fetch(source: &DatasetSource) -> (Option<u16>, Result<usize, String>) {
    // reqwest is built without a default crypto provider; even plain HTTP needs one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder().timeout(FETCH_TIMEOUT).build() {
        Ok(client) => client,
        Err(err) => return (None, Err(format!("could not start an HTTP client: {err}"))),
    };
    let url = &source.url;
    let mut request = client.get(url);
    if let Some(token) = &source.token {
        request = request.bearer_auth(token);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(err) => {
            return (
                None,
                Err(format!("could not download the dataset from {url}: {err}")),
            );
        }
    };
    let status = response.status();
    if !status.is_success() {
        return (
            Some(status.as_u16()),
            Err(format!(
                "downloading the dataset from {url} answered HTTP {}",
                status.as_u16()
            )),
        );
    }
    let outcome = match response.bytes().await {
        Ok(body) => validate_training_jsonl(&body)
            .map_err(|err| format!("the dataset from {url} is not valid training data: {err}")),
        Err(err) => Err(format!("the dataset download from {url} broke off: {err}")),
    };
    (Some(status.as_u16()), outcome)
}
