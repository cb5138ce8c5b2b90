//! One Kubernetes training Job: its manifest checks, its timeline, and its Job and Pod objects.

use std::time::SystemTime;

use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::status::{Cause, KubeStatus};
use crate::sim::config::ClusterTimings;
use crate::sim::reply;

/// The container env var naming the dataset the simulated trainer downloads when it starts.
pub const ENV_FORGE_DATASET_URL: &str = "FORGE_DATASET_URL";
/// The container env var holding the bearer token for [`ENV_FORGE_DATASET_URL`].
pub const ENV_FORGE_DATASET_TOKEN: &str = "FORGE_DATASET_TOKEN";
/// The container env var naming the directory the simulated trainer writes the adapter to.
pub const ENV_FORGE_OUTPUT_DIR: &str = "FORGE_OUTPUT_DIR";
/// `1` or `true` in this container env var makes the simulated trainer fail at the end of its
/// run.
pub const ENV_FORGE_SIM_FAIL: &str = "FORGE_SIM_FAIL";

const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
const CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";
const BACKOFF_LIMIT_MESSAGE: &str = "Job has reached the specified backoff limit";
const COMPLETIONS_MESSAGE: &str = "Reached expected number of succeeded pods";

/// Where the container downloads its training data from.
#[derive(Debug, Clone)]
pub(crate) struct DatasetSource {
    pub(crate) url: String,
    pub(crate) token: Option<String>,
}

/// The dataset download: not needed, under way, or over with the number of examples or why it
/// failed.
#[derive(Debug, Clone)]
pub(super) enum Fetch {
    NotNeeded,
    Waiting,
    Done {
        at: Instant,
        result: Result<usize, String>,
    },
}

/// Where a Job is on its timeline at some instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stage {
    Pending,
    Running,
    /// The container exited at `at` (with `failure`, if it failed), and the Job controller
    /// has set only the interim condition: not final yet.
    Finishing {
        at: Instant,
        failure: Option<String>,
    },
    Succeeded {
        at: Instant,
    },
    Failed {
        at: Instant,
        reason: String,
    },
}

impl Stage {
    fn index(&self) -> u64 {
        match self {
            Stage::Pending => 0,
            Stage::Running => 1,
            Stage::Finishing { .. } => 2,
            Stage::Succeeded { .. } | Stage::Failed { .. } => 3,
        }
    }

    /// How the container ended, for what the pod and its log show: `None` while it runs.
    fn exit(&self) -> Option<(Instant, Option<&str>)> {
        match self {
            Stage::Pending | Stage::Running => None,
            Stage::Finishing { at, failure } => Some((*at, failure.as_deref())),
            Stage::Succeeded { at } => Some((*at, None)),
            Stage::Failed { at, reason } => Some((*at, Some(reason))),
        }
    }
}

pub(super) struct ClusterJob {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) uid: String,
    metadata: Map<String, Value>,
    spec: Map<String, Value>,
    created: Instant,
    created_wall: SystemTime,
    /// Stage 0's resourceVersion; each later stage adds one.
    resource_version: u64,
    pub(super) pod_name: String,
    pod_uid: String,
    backoff_limit: u64,
    timings: ClusterTimings,
    pub(super) dataset: Option<DatasetSource>,
    fail_injected: bool,
    pub(super) output_path: String,
    pub(super) fetch: Fetch,
}

/// A manifest that passed the API server's checks.
pub(super) struct Manifest {
    pub(super) name: String,
    metadata: Map<String, Value>,
    spec: Map<String, Value>,
}

/// Checks a Job manifest the way the API server does before storing it.
pub(super) fn check_manifest(namespace: &str, body: &[u8]) -> Result<Manifest, KubeStatus> {
    let Ok(Value::Object(mut job)) = serde_json::from_slice::<Value>(body) else {
        return Err(KubeStatus::bad_request(
            "the object provided is unrecognized (must be of type Job): couldn't get \
             version/kind; json parse error",
        ));
    };
    if let Some(kind) = job.get("kind").and_then(Value::as_str)
        && kind != "Job"
    {
        return Err(KubeStatus::bad_request(format!(
            "the object provided is unrecognized (must be of type Job): kind {kind}"
        )));
    }
    if let Some(version) = job.get("apiVersion").and_then(Value::as_str)
        && version != "batch/v1"
    {
        return Err(KubeStatus::bad_request(format!(
            "the API version in the data ({version}) does not match the expected API version \
             (batch/v1)"
        )));
    }
    let mut metadata = match job.remove("metadata") {
        Some(Value::Object(metadata)) => metadata,
        _ => Map::new(),
    };
    if let Some(declared) = metadata.get("namespace").and_then(Value::as_str)
        && declared != namespace
    {
        return Err(KubeStatus::bad_request(
            "the namespace of the provided object does not match the namespace sent on the \
             request",
        ));
    }
    let name = match (
        metadata.get("name").and_then(Value::as_str),
        metadata.get("generateName").and_then(Value::as_str),
    ) {
        (Some(name), _) if !name.is_empty() => name.to_owned(),
        (_, Some(prefix)) if !prefix.is_empty() => format!("{prefix}{}", random_suffix()),
        _ => String::new(),
    };
    metadata.insert("name".into(), Value::String(name.clone()));
    let spec = match job.remove("spec") {
        Some(Value::Object(spec)) => spec,
        _ => Map::new(),
    };
    let mut causes = Vec::new();
    if name.is_empty() {
        causes.push(Cause::required(
            "metadata.name",
            Some("name or generateName is required"),
        ));
    } else if let Some(why) = invalid_name(&name) {
        causes.push(Cause::invalid("metadata.name", &name, &why));
    }
    let pod_spec = spec
        .get("template")
        .and_then(|template| template.get("spec"))
        .and_then(Value::as_object);
    let containers = pod_spec
        .and_then(|pod| pod.get("containers"))
        .and_then(Value::as_array)
        .filter(|containers| !containers.is_empty());
    match containers {
        None => causes.push(Cause::required("spec.template.spec.containers", None)),
        Some(containers) => {
            for (i, container) in containers.iter().enumerate() {
                for key in ["name", "image"] {
                    let present = container
                        .get(key)
                        .and_then(Value::as_str)
                        .is_some_and(|value| !value.is_empty());
                    if !present {
                        causes.push(Cause::required(
                            format!("spec.template.spec.containers[{i}].{key}"),
                            None,
                        ));
                    }
                }
            }
        }
    }
    // A pod template defaults to `Always`, which a Job refuses.
    let restart_policy = pod_spec
        .and_then(|pod| pod.get("restartPolicy"))
        .and_then(Value::as_str)
        .unwrap_or("Always");
    if !matches!(restart_policy, "Never" | "OnFailure") {
        causes.push(Cause::unsupported(
            "spec.template.spec.restartPolicy",
            restart_policy,
            "\"OnFailure\", \"Never\"",
        ));
    }
    if let Some(limit) = spec.get("backoffLimit")
        && limit.as_u64().is_none()
    {
        causes.push(Cause::invalid(
            "spec.backoffLimit",
            &limit.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    if !causes.is_empty() {
        return Err(KubeStatus::invalid(&name, &causes));
    }
    Ok(Manifest {
        name,
        metadata,
        spec,
    })
}

/// RFC 1123 subdomain, and at most 63 characters because the name becomes a label value.
fn invalid_name(name: &str) -> Option<String> {
    if name.len() > 63 {
        return Some("must be no more than 63 characters".to_owned());
    }
    let valid = name.split('.').all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !part.starts_with('-')
            && !part.ends_with('-')
    });
    (!valid).then(|| {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' \
         or '.', and must start and end with an alphanumeric character (e.g. 'example.com', \
         regex used for validation is \
         '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
            .to_owned()
    })
}

/// Five characters like the ones Kubernetes appends to generated names.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn uuid() -> String {
    let hex = reply::random_hex("", 32);
    format!(
        "{}-{}-4{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Every `env` entry with a literal `value`, across all containers; the first wins.
fn env_of(spec: &Map<String, Value>, key: &str) -> Option<String> {
    spec.get("template")?
        .get("spec")?
        .get("containers")?
        .as_array()?
        .iter()
        .filter_map(|container| container.get("env")?.as_array())
        .flatten()
        .find(|var| var.get("name").and_then(Value::as_str) == Some(key))
        .and_then(|var| var.get("value")?.as_str())
        .map(str::to_owned)
}

fn insert_default(map: &mut Map<String, Value>, key: &str, value: Value) {
    map.entry(key.to_owned()).or_insert(value);
}

impl ClusterJob {
    pub(super) fn new(
        namespace: &str,
        manifest: Manifest,
        timings: ClusterTimings,
        resource_version: u64,
        now: Instant,
    ) -> Self {
        let Manifest {
            name,
            mut metadata,
            mut spec,
        } = manifest;
        let uid = uuid();
        let created_wall = SystemTime::now();
        let controller_labels = json!({
            CONTROLLER_UID_LABEL: uid,
            JOB_NAME_LABEL: name,
            "controller-uid": uid,
            "job-name": name,
        });
        // The Job controller's defaults: a selector on its uid, and labels on the pod template.
        insert_default(&mut spec, "parallelism", json!(1));
        insert_default(&mut spec, "completions", json!(1));
        insert_default(&mut spec, "backoffLimit", json!(6));
        insert_default(&mut spec, "completionMode", json!("NonIndexed"));
        insert_default(&mut spec, "suspend", json!(false));
        insert_default(
            &mut spec,
            "podReplacementPolicy",
            json!("TerminatingOrFailed"),
        );
        spec.insert(
            "selector".into(),
            json!({"matchLabels": {CONTROLLER_UID_LABEL: uid}}),
        );
        let mut template_labels = Map::new();
        if let Some(Value::Object(template)) = spec.get_mut("template") {
            let template_meta = template.entry("metadata").or_insert_with(|| json!({}));
            if let Value::Object(template_meta) = template_meta {
                let labels = template_meta.entry("labels").or_insert_with(|| json!({}));
                if let (Value::Object(labels), Value::Object(extra)) =
                    (labels, controller_labels.clone())
                {
                    labels.extend(extra);
                    template_labels = labels.clone();
                }
            }
        }
        let has_labels = metadata
            .get("labels")
            .and_then(Value::as_object)
            .is_some_and(|labels| !labels.is_empty());
        if !has_labels {
            metadata.insert("labels".into(), Value::Object(template_labels));
        }
        metadata.insert("namespace".into(), json!(namespace));
        metadata.insert("uid".into(), json!(uid));
        metadata.insert("generation".into(), json!(1));
        metadata.insert(
            "creationTimestamp".into(),
            json!(reply::rfc3339(created_wall)),
        );
        let backoff_limit = spec
            .get("backoffLimit")
            .and_then(Value::as_u64)
            .unwrap_or(6);
        let dataset = env_of(&spec, ENV_FORGE_DATASET_URL).map(|url| DatasetSource {
            url,
            token: env_of(&spec, ENV_FORGE_DATASET_TOKEN).filter(|token| !token.is_empty()),
        });
        let fail_injected = env_of(&spec, ENV_FORGE_SIM_FAIL)
            .is_some_and(|value| value == "1" || value.eq_ignore_ascii_case("true"));
        let output_path = env_of(&spec, ENV_FORGE_OUTPUT_DIR)
            .filter(|dir| !dir.is_empty())
            .unwrap_or_else(|| format!("/adapters/{name}"));
        Self {
            namespace: namespace.to_owned(),
            pod_name: format!("{name}-{}", random_suffix()),
            pod_uid: uuid(),
            fetch: if dataset.is_some() {
                Fetch::Waiting
            } else {
                Fetch::NotNeeded
            },
            name,
            uid,
            metadata,
            spec,
            created: now,
            created_wall,
            resource_version,
            backoff_limit,
            timings,
            dataset,
            fail_injected,
            output_path,
        }
    }

    /// When the pod starts running, and with it the dataset download.
    pub(super) fn starts_at(&self) -> Instant {
        self.created + self.timings.pending
    }

    fn wall(&self, at: Instant) -> String {
        reply::rfc3339(self.created_wall + at.saturating_duration_since(self.created))
    }

    pub(super) fn stage(&self, now: Instant) -> Stage {
        let start = self.starts_at();
        if now < start {
            return Stage::Pending;
        }
        let run_end = start + self.timings.running;
        let (end, failure) = match &self.fetch {
            Fetch::Waiting => return Stage::Running,
            Fetch::Done {
                at,
                result: Err(reason),
            } => (*at, Some(reason.clone())),
            Fetch::Done { at, result: Ok(_) } => (run_end.max(*at), None),
            Fetch::NotNeeded => (run_end, None),
        };
        let failure = failure.or_else(|| {
            self.fail_injected.then(|| {
                format!("{ENV_FORGE_SIM_FAIL} is set: the training container exited with code 1")
            })
        });
        if now < end {
            Stage::Running
        } else if now < end + self.timings.finishing {
            Stage::Finishing { at: end, failure }
        } else {
            match failure {
                Some(reason) => Stage::Failed { at: end, reason },
                None => Stage::Succeeded { at: end },
            }
        }
    }

    /// The Job object; `status:{}` as the create call answers it, before the controller ran.
    pub(super) fn to_json(&self, now: Instant, with_status: bool) -> Value {
        let stage = self.stage(now);
        let mut metadata = self.metadata.clone();
        metadata.insert(
            "resourceVersion".into(),
            json!((self.resource_version + stage.index()).to_string()),
        );
        json!({
            "kind": "Job",
            "apiVersion": "batch/v1",
            "metadata": metadata,
            "spec": self.spec,
            "status": if with_status { self.status(&stage) } else { json!({}) },
        })
    }

    fn condition(&self, kind: &str, reason: &str, message: &str, at: Instant) -> Value {
        let at = self.wall(at);
        json!({
            "type": kind,
            "status": "True",
            "lastProbeTime": at,
            "lastTransitionTime": at,
            "reason": reason,
            "message": message,
        })
    }

    fn status(&self, stage: &Stage) -> Value {
        let start_time = self.wall(self.created);
        match stage {
            Stage::Pending | Stage::Running => json!({
                "active": 1,
                "ready": u8::from(*stage == Stage::Running),
                "terminating": 0,
                "startTime": start_time,
                "uncountedTerminatedPods": {},
            }),
            // Kubernetes sets the interim condition first; the terminal one follows once the
            // Job's pods are gone (openai-wire.md §7).
            Stage::Finishing { at, failure: None } => json!({
                "succeeded": 1,
                "ready": 0,
                "terminating": 0,
                "startTime": start_time,
                "uncountedTerminatedPods": {},
                "conditions": [
                    self.condition("SuccessCriteriaMet", "CompletionsReached", COMPLETIONS_MESSAGE, *at),
                ],
            }),
            Stage::Finishing {
                at,
                failure: Some(reason),
            } => json!({
                "failed": self.backoff_limit + 1,
                "ready": 0,
                "terminating": 1,
                "startTime": start_time,
                "uncountedTerminatedPods": {},
                "conditions": [
                    self.condition("FailureTarget", "BackoffLimitExceeded", &self.failure_message(reason), *at),
                ],
            }),
            Stage::Succeeded { at } => json!({
                "succeeded": 1,
                "ready": 0,
                "terminating": 0,
                "startTime": start_time,
                "completionTime": self.wall(*at),
                "uncountedTerminatedPods": {},
                "conditions": [
                    self.condition("SuccessCriteriaMet", "CompletionsReached", COMPLETIONS_MESSAGE, *at),
                    self.condition("Complete", "CompletionsReached", COMPLETIONS_MESSAGE, *at),
                ],
            }),
            Stage::Failed { at, reason } => {
                let message = self.failure_message(reason);
                json!({
                    "failed": self.backoff_limit + 1,
                    "ready": 0,
                    "terminating": 0,
                    "startTime": start_time,
                    "uncountedTerminatedPods": {},
                    "conditions": [
                        self.condition("FailureTarget", "BackoffLimitExceeded", &message, *at),
                        self.condition("Failed", "BackoffLimitExceeded", &message, *at),
                    ],
                })
            }
        }
    }

    /// Kubernetes' message, then why the last pod failed, so that a provider can show the
    /// cause without reading pod logs.
    fn failure_message(&self, reason: &str) -> String {
        format!(
            "{BACKOFF_LIMIT_MESSAGE}: pod {} failed: {reason}",
            self.pod_name
        )
    }

    /// The Job's own labels, for label selectors.
    pub(super) fn metadata_labels(&self) -> Map<String, Value> {
        self.metadata
            .get("labels")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    }

    /// The labels of the Job's pod, for label selectors.
    pub(super) fn pod_labels(&self) -> Map<String, Value> {
        self.spec
            .get("template")
            .and_then(|template| template.get("metadata"))
            .and_then(|metadata| metadata.get("labels"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    }

    /// The Job's one pod, as `GET /api/v1/namespaces/{ns}/pods` lists it.
    pub(super) fn pod_json(&self, now: Instant) -> Value {
        let stage = self.stage(now);
        let start = self.starts_at();
        let container = self
            .spec
            .get("template")
            .and_then(|template| template.get("spec"))
            .and_then(|spec| spec.get("containers"))
            .and_then(|containers| containers.get(0));
        let container_name = container
            .and_then(|container| container.get("name"))
            .cloned()
            .unwrap_or(Value::Null);
        let image = container
            .and_then(|container| container.get("image"))
            .cloned()
            .unwrap_or(Value::Null);
        let (phase, state) = match stage.exit() {
            None if stage == Stage::Pending => (
                "Pending",
                json!({"waiting": {"reason": "ContainerCreating"}}),
            ),
            None => (
                "Running",
                json!({"running": {"startedAt": self.wall(start)}}),
            ),
            Some((at, None)) => (
                "Succeeded",
                json!({"terminated": {"exitCode": 0, "reason": "Completed",
                    "startedAt": self.wall(start), "finishedAt": self.wall(at)}}),
            ),
            Some((at, Some(reason))) => (
                "Failed",
                json!({"terminated": {"exitCode": 1, "reason": "Error", "message": reason,
                    "startedAt": self.wall(start), "finishedAt": self.wall(at)}}),
            ),
        };
        let pod_spec = self
            .spec
            .get("template")
            .and_then(|template| template.get("spec"))
            .cloned()
            .unwrap_or_else(|| json!({}));
        json!({
            "metadata": {
                "name": self.pod_name,
                "generateName": format!("{}-", self.name),
                "namespace": self.namespace,
                "uid": self.pod_uid,
                "resourceVersion": (self.resource_version + stage.index()).to_string(),
                "creationTimestamp": self.wall(self.created),
                "labels": self.pod_labels(),
                "ownerReferences": [{
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": self.name,
                    "uid": self.uid,
                    "controller": true,
                    "blockOwnerDeletion": true,
                }],
            },
            "spec": pod_spec,
            "status": {
                "phase": phase,
                "startTime": self.wall(self.created),
                "containerStatuses": [{
                    "name": container_name,
                    "image": image,
                    "ready": stage == Stage::Running,
                    "restartCount": 0,
                    "state": state,
                }],
            },
        })
    }

    /// What the training container printed so far; `None` while it has not started.
    pub(super) fn log(&self, now: Instant) -> Option<String> {
        let stage = self.stage(now);
        if stage == Stage::Pending {
            return None;
        }
        let mut log = String::new();
        if let Some(dataset) = &self.dataset {
            log.push_str(&format!("fetching dataset from {}\n", dataset.url));
            if let Fetch::Done {
                at,
                result: Ok(examples),
            } = &self.fetch
                && now >= *at
            {
                log.push_str(&format!("dataset valid: {examples} examples\n"));
            }
        }
        match stage.exit() {
            None => log.push_str("training\n"),
            Some((_, None)) => {
                log.push_str("training\n");
                log.push_str(&format!("adapter saved to {}\n", self.output_path));
            }
            Some((_, Some(reason))) => log.push_str(&format!("error: {reason}\n")),
        }
        Some(log)
    }
}
