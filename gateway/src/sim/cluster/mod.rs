//! A Kubernetes API server that runs training Jobs (openai-wire.md §7): `batch/v1` Jobs, their pods, and pod logs.
//!
//! A Job's pod is `Pending` for [`ClusterTimings::pending`](crate::sim::ClusterTimings), then
//! `Running` for `running`, then `Succeeded`, as its status shows (`active:1` and `startTime`,
//! then `succeeded:1`, `completionTime` and the conditions `SuccessCriteriaMet` and `Complete`).
//! The container's env drives it, as a real training image's would:
//!
//! - `FORGE_DATASET_URL` (with `FORGE_DATASET_TOKEN` as bearer token): when the pod starts, the
//!   simulated server really downloads that URL and checks it with
//!   [`validate_training_jsonl`](crate::sim::validate_training_jsonl). A failed download or a
//!   bad file fails the Job at once; a download slower than `running` makes the run longer.
//!   Every download is recorded as a [`DatasetFetch`].
//! - `FORGE_SIM_FAIL=1` makes the container fail at the end of its run.
//! - `FORGE_OUTPUT_DIR` is where the adapter is written (`/adapters/<job name>` without it);
//!   once the Job has succeeded, vLLM's fake finds an adapter there.
//!
//! A failed Job has `failed: backoffLimit + 1` and the conditions `FailureTarget` and `Failed`
//! with reason `BackoffLimitExceeded`, whose message ends with why the pod failed. Only literal
//! env `value`s are read; `valueFrom` is not resolved. Errors are Kubernetes `Status` objects.

mod fetch;
mod job;
mod status;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::reply;
use super::state::SimState;
use super::vllm::normalize;
use job::{ClusterJob, Fetch, Stage, check_manifest};
pub use job::{
    ENV_FORGE_DATASET_TOKEN, ENV_FORGE_DATASET_URL, ENV_FORGE_OUTPUT_DIR, ENV_FORGE_SIM_FAIL,
};
pub(crate) use status::KubeStatus;

/// What `DELETE` without `propagationPolicy` warns about (`storage.go`).
const ORPHAN_WARNING: &str = "299 - \"child pods are preserved by default when jobs are deleted; \
     set propagationPolicy=Background to remove them or set propagationPolicy=Orphan to \
     suppress this warning\"";

/// One dataset download by a training Job's container.
#[derive(Clone, PartialEq, Eq)]
pub struct DatasetFetch {
    /// The Job's namespace.
    pub namespace: String,
    /// The Job's name.
    pub job: String,
    /// `FORGE_DATASET_URL`.
    pub url: String,
    /// `FORGE_DATASET_TOKEN`, sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// The HTTP status of the answer; `None` when there was none.
    pub status: Option<u16>,
    /// How many examples the file held, or why the Job failed.
    pub outcome: Result<usize, String>,
}

// Hand-written so that the token never reaches a log line.
impl fmt::Debug for DatasetFetch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatasetFetch")
            .field("namespace", &self.namespace)
            .field("job", &self.job)
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("status", &self.status)
            .field("outcome", &self.outcome)
            .finish()
    }
}

/// A pod whose Job was deleted without deleting it, frozen as it was.
struct OrphanPod {
    namespace: String,
    name: String,
    labels: Map<String, Value>,
    object: Value,
    log: Option<String>,
}

/// Every Job, the pods left behind, and what finished Jobs wrote.
#[derive(Default)]
pub(crate) struct ClusterStore {
    jobs: Vec<ClusterJob>,
    orphans: Vec<OrphanPod>,
    /// Adapter paths written by succeeded Jobs that were deleted since: the files stay.
    kept_paths: BTreeSet<String>,
    fetches: Vec<DatasetFetch>,
    next_version: u64,
}

impl ClusterStore {
    /// Whether a succeeded Job wrote its adapter to `path` (already normalized) by `now`.
    pub(crate) fn wrote(&self, path: &str, now: Instant) -> bool {
        self.kept_paths.contains(path)
            || self.jobs.iter().any(|job| {
                normalize(&job.output_path) == path
                    && matches!(job.stage(now), Stage::Succeeded { .. })
            })
    }

    pub(crate) fn fetches(&self) -> Vec<DatasetFetch> {
        self.fetches.clone()
    }

    fn has_job(&self, uid: &str) -> bool {
        self.jobs.iter().any(|job| job.uid == uid)
    }

    fn finish_fetch(&mut self, uid: &str, at: Instant, fetched: DatasetFetch) {
        if let Some(job) = self.jobs.iter_mut().find(|job| job.uid == uid) {
            job.fetch = Fetch::Done {
                at,
                result: fetched.outcome.clone(),
            };
        }
        self.fetches.push(fetched);
    }

    fn find(&self, namespace: &str, name: &str) -> Result<&ClusterJob, KubeStatus> {
        self.jobs
            .iter()
            .find(|job| job.namespace == namespace && job.name == name)
            .ok_or_else(|| KubeStatus::not_found("jobs", "batch", name))
    }

    fn list_version(&self) -> String {
        (self.next_version + 9).to_string()
    }
}

type Params = Result<Query<Vec<(String, String)>>, QueryRejection>;

fn params(query: Params) -> Result<Vec<(String, String)>, KubeStatus> {
    query
        .map(|Query(pairs)| pairs)
        .map_err(|err| KubeStatus::bad_request(err.body_text()))
}

fn param<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Watches stream events this server does not produce; refusing beats a body that never ends.
fn refuse_watch(pairs: &[(String, String)]) -> Result<(), KubeStatus> {
    match param(pairs, "watch") {
        Some("1" | "true") => Err(KubeStatus::bad_request(
            "watch is not supported by the simulated API server; poll the object instead",
        )),
        _ => Ok(()),
    }
}

/// Equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k` and `!k`, comma-separated.
fn selector_matches(selector: &str, labels: &Map<String, Value>) -> Result<bool, KubeStatus> {
    for requirement in selector.split(',').map(str::trim) {
        if requirement.is_empty() {
            continue;
        }
        let label = |key: &str| labels.get(key.trim()).and_then(Value::as_str);
        let matched = if let Some((key, value)) = requirement.split_once("!=") {
            label(key) != Some(value.trim())
        } else if let Some((key, value)) = requirement
            .split_once("==")
            .or_else(|| requirement.split_once('='))
        {
            label(key) == Some(value.trim())
        } else if requirement.contains([' ', '(']) {
            return Err(KubeStatus::bad_request(format!(
                "unable to parse requirement: set-based selectors are not supported by the \
                 simulated API server: {requirement}"
            )));
        } else if let Some(key) = requirement.strip_prefix('!') {
            label(key).is_none()
        } else {
            label(requirement).is_some()
        };
        if !matched {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `POST /apis/batch/v1/namespaces/{ns}/jobs`.
pub(crate) async fn create_job(
    State(state): State<Arc<SimState>>,
    Path(namespace): Path<String>,
    body: Bytes,
) -> Response {
    let manifest = match check_manifest(&namespace, &body) {
        Ok(manifest) => manifest,
        Err(status) => return status.into_response(),
    };
    let now = Instant::now();
    let (body, download) = {
        let mut storage = state.storage();
        let cluster = &mut storage.cluster;
        if cluster.find(&namespace, &manifest.name).is_ok() {
            return KubeStatus::already_exists("jobs", "batch", &manifest.name).into_response();
        }
        cluster.next_version += 10;
        let job = ClusterJob::new(
            &namespace,
            manifest,
            state.cluster,
            cluster.next_version,
            now,
        );
        let download = job.dataset.clone().map(|source| {
            let target = fetch::JobRef {
                namespace: job.namespace.clone(),
                name: job.name.clone(),
                uid: job.uid.clone(),
            };
            (target, source, job.starts_at())
        });
        let body = job.to_json(now, false);
        cluster.jobs.push(job);
        (body, download)
    };
    if let Some((target, source, start)) = download {
        fetch::spawn(&state, target, source, start);
    }
    reply::json(StatusCode::CREATED, &body)
}

/// `GET /apis/batch/v1/namespaces/{ns}/jobs`.
pub(crate) async fn list_jobs(
    State(state): State<Arc<SimState>>,
    Path(namespace): Path<String>,
    query: Params,
) -> Response {
    let result = (|| {
        let pairs = params(query)?;
        refuse_watch(&pairs)?;
        let selector = param(&pairs, "labelSelector").unwrap_or_default();
        let now = Instant::now();
        let storage = state.storage();
        let mut items = Vec::new();
        for job in storage.cluster.jobs.iter() {
            let labels = job.metadata_labels();
            if job.namespace == namespace && selector_matches(selector, &labels)? {
                let mut item = job.to_json(now, true);
                strip_type(&mut item);
                items.push(item);
            }
        }
        Ok::<_, KubeStatus>(json!({
            "kind": "JobList",
            "apiVersion": "batch/v1",
            "metadata": {"resourceVersion": storage.cluster.list_version()},
            "items": items,
        }))
    })();
    match result {
        Ok(list) => reply::json(StatusCode::OK, &list),
        Err(status) => status.into_response(),
    }
}

/// List items carry no `kind` or `apiVersion`: the list says them once.
fn strip_type(item: &mut Value) {
    if let Value::Object(item) = item {
        item.remove("kind");
        item.remove("apiVersion");
    }
}

/// `GET …/jobs/{name}` and `GET …/jobs/{name}/status`.
pub(crate) async fn get_job(
    State(state): State<Arc<SimState>>,
    Path((namespace, name)): Path<(String, String)>,
    query: Params,
) -> Response {
    let result = params(query)
        .and_then(|pairs| refuse_watch(&pairs))
        .and_then(|()| {
            let storage = state.storage();
            let job = storage.cluster.find(&namespace, &name)?;
            Ok(job.to_json(Instant::now(), true))
        });
    match result {
        Ok(job) => reply::json(StatusCode::OK, &job),
        Err(status) => status.into_response(),
    }
}

/// `DELETE …/jobs/{name}`, with `propagationPolicy` from the query or a `DeleteOptions` body
/// (kube-rs sends the body).
pub(crate) async fn delete_job(
    State(state): State<Arc<SimState>>,
    Path((namespace, name)): Path<(String, String)>,
    query: Params,
    body: Bytes,
) -> Response {
    let pairs = match params(query) {
        Ok(pairs) => pairs,
        Err(status) => return status.into_response(),
    };
    let from_body = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|options| {
            options
                .get("propagationPolicy")?
                .as_str()
                .map(str::to_owned)
        });
    let policy = param(&pairs, "propagationPolicy")
        .map(str::to_owned)
        .or(from_body);
    if let Some(policy) = &policy
        && !matches!(policy.as_str(), "Background" | "Foreground" | "Orphan")
    {
        return KubeStatus::bad_request(format!(
            "propagationPolicy: Unsupported value: \"{policy}\": supported values: \
             \"Foreground\", \"Background\", \"Orphan\""
        ))
        .into_response();
    }
    let now = Instant::now();
    let mut storage = state.storage();
    let cluster = &mut storage.cluster;
    let Some(position) = cluster
        .jobs
        .iter()
        .position(|job| job.namespace == namespace && job.name == name)
    else {
        return KubeStatus::not_found("jobs", "batch", &name).into_response();
    };
    let job = cluster.jobs.remove(position);
    if matches!(job.stage(now), Stage::Succeeded { .. }) {
        cluster
            .kept_paths
            .insert(normalize(&job.output_path).to_owned());
    }
    let orphaning = matches!(policy.as_deref(), None | Some("Orphan"));
    if orphaning {
        cluster.orphans.push(OrphanPod {
            namespace: job.namespace.clone(),
            name: job.pod_name.clone(),
            labels: job.pod_labels(),
            object: job.pod_json(now),
            log: job.log(now),
        });
    }
    let mut response = if policy.as_deref() == Some("Foreground") {
        let mut object = job.to_json(now, true);
        object["metadata"]["deletionTimestamp"] =
            json!(reply::rfc3339(std::time::SystemTime::now()));
        object["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
        reply::json(StatusCode::OK, &object)
    } else {
        reply::json(
            StatusCode::OK,
            &json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": job.name, "group": "batch", "kind": "jobs", "uid": job.uid},
            }),
        )
    };
    if policy.is_none() {
        response
            .headers_mut()
            .insert("warning", HeaderValue::from_static(ORPHAN_WARNING));
    }
    response
}

/// `GET /api/v1/namespaces/{ns}/pods`, usually with
/// `labelSelector=batch.kubernetes.io/job-name=<name>`.
pub(crate) async fn list_pods(
    State(state): State<Arc<SimState>>,
    Path(namespace): Path<String>,
    query: Params,
) -> Response {
    let result = (|| {
        let pairs = params(query)?;
        refuse_watch(&pairs)?;
        let selector = param(&pairs, "labelSelector").unwrap_or_default();
        let now = Instant::now();
        let storage = state.storage();
        let cluster = &storage.cluster;
        let mut items = Vec::new();
        for job in &cluster.jobs {
            if job.namespace == namespace && selector_matches(selector, &job.pod_labels())? {
                items.push(job.pod_json(now));
            }
        }
        for orphan in &cluster.orphans {
            if orphan.namespace == namespace && selector_matches(selector, &orphan.labels)? {
                items.push(orphan.object.clone());
            }
        }
        Ok::<_, KubeStatus>(json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": cluster.list_version()},
            "items": items,
        }))
    })();
    match result {
        Ok(list) => reply::json(StatusCode::OK, &list),
        Err(status) => status.into_response(),
    }
}

/// `GET /api/v1/namespaces/{ns}/pods/{pod}/log`: plain text.
pub(crate) async fn pod_log(
    State(state): State<Arc<SimState>>,
    Path((namespace, pod)): Path<(String, String)>,
) -> Response {
    let now = Instant::now();
    let log = {
        let storage = state.storage();
        let cluster = &storage.cluster;
        if let Some(job) = cluster
            .jobs
            .iter()
            .find(|job| job.namespace == namespace && job.pod_name == pod)
        {
            Some(job.log(now))
        } else {
            cluster
                .orphans
                .iter()
                .find(|orphan| orphan.namespace == namespace && orphan.name == pod)
                .map(|orphan| orphan.log.clone())
        }
    };
    match log {
        None => KubeStatus::not_found("pods", "", &pod).into_response(),
        Some(None) => KubeStatus::bad_request(format!(
            "container in pod \"{pod}\" is waiting to start: ContainerCreating"
        ))
        .into_response(),
        Some(Some(text)) => {
            let mut response = Response::new(Body::from(text));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            response
        }
    }
}
