//! Fine-tuning jobs (openai-wire.md §4, and Azure's in §5): a timed state machine with events, checkpoints and a result CSV.
//!
//! OpenAI's and Azure's jobs share the state machine; they differ in their ids, the name of
//! the model (`ft:<base>:<org>:<suffix>:<id>` against `<base>.ft-<32 hex>`), and in that Azure
//! fails a job whose file is still `pending`. A job fails half-way through `running` with
//! `training_failed` when its `suffix` contains `fail-training` or when the simulated upstream
//! was told to fail the next jobs.
//!
//! A job's state is not driven by background tasks: every read first advances the job to the
//! present from the time elapsed in its phase, emitting the events it passed on the way. So all
//! endpoints see one consistent state under the storage lock, events are in order by
//! construction, and nothing is left running after shutdown.

mod job;
mod metrics;
mod request;

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use super::error::ApiError;
use super::files::{FileStore, FineTuneInput};
use super::reply::{self, CursorList, List, ListQuery};
use super::state::{Flavor, SimState};
use job::{EventView, FineTuneJob, JobFailure, check_inputs};
use request::JobRequest;

/// Every job, in creation order.
#[derive(Default)]
pub(crate) struct JobStore {
    jobs: Vec<FineTuneJob>,
}

impl JobStore {
    /// `(model, created_at)` of every job that has succeeded by `now`.
    pub(crate) fn succeeded_models(
        &mut self,
        now: Instant,
        files: &mut FileStore,
    ) -> Vec<(String, u64)> {
        self.jobs
            .iter_mut()
            .filter_map(|job| {
                job.advance(now, files);
                Some((job.fine_tuned_model.clone()?, job.finished_at?))
            })
            .collect()
    }

    fn find(&mut self, id: &str) -> Result<&mut FineTuneJob, ApiError> {
        self.jobs
            .iter_mut()
            .find(|job| job.id == id)
            .ok_or_else(|| {
                ApiError::not_found(format!("No such fine-tuning job: {id}"))
                    .with_param("fine_tuning_job_id")
            })
    }
}

/// A fine-tuning job whose `suffix` contains this fails half-way through `running`.
pub const FAIL_TRAINING_SUFFIX: &str = "fail-training";

pub(crate) type ListParams = Result<Query<Vec<(String, String)>>, QueryRejection>;

fn list_query(query: ListParams) -> Result<ListQuery, ApiError> {
    let Query(pairs) = query.map_err(|err| ApiError::invalid_request(err.body_text()))?;
    Ok(ListQuery::new(pairs))
}

pub(crate) async fn create(
    State(state): State<Arc<SimState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    create_in(&state, Flavor::OpenAi, &body)
}

/// Azure's files must be UTF-8 with a byte order mark (openai-wire.md §2.1): the first file
/// of the job without one.
fn without_bom<'r>(
    request: &'r JobRequest,
    training: &FineTuneInput,
    validation: Option<&FineTuneInput>,
) -> Option<(&'r str, &'static str)> {
    const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";
    if !training.content.starts_with(UTF8_BOM) {
        return Some((&request.training_file, "training_file"));
    }
    match (&request.validation_file, validation) {
        (Some(id), Some(file)) if !file.content.starts_with(UTF8_BOM) => {
            Some((id, "validation_file"))
        }
        _ => None,
    }
}

pub(crate) fn create_in(
    state: &SimState,
    flavor: Flavor,
    body: &[u8],
) -> Result<Response, ApiError> {
    if state.take_failed_create() {
        return Err(ApiError::server_error());
    }
    if state.take_refused_create() {
        return Err(ApiError::invalid_value(
            "model",
            "Model is not available for fine-tuning or does not exist.",
        ));
    }
    let request = JobRequest::parse(&reply::json_object(body)?)?;
    if flavor == Flavor::Azure
        && request
            .suffix
            .as_ref()
            .is_some_and(|suffix| suffix.chars().count() > 40)
    {
        return Err(ApiError::invalid_value(
            "suffix",
            "Invalid 'suffix': string too long. Expected a string with maximum length 40.",
        ));
    }
    let now = Instant::now();
    let (training, validation) = {
        let mut storage = state.storage();
        let (files, _) = storage.account(flavor);
        let training = files.fine_tune_input(&request.training_file, "training_file", now)?;
        let validation = match &request.validation_file {
            Some(id) => Some(files.fine_tune_input(id, "validation_file", now)?),
            None => None,
        };
        (training, validation)
    };
    let inputs = if training.pending {
        Err(JobFailure::file_pending(
            &request.training_file,
            "training_file",
        ))
    } else if let Some(id) = request
        .validation_file
        .as_deref()
        .filter(|_| validation.as_ref().is_some_and(|file| file.pending))
    {
        Err(JobFailure::file_pending(id, "validation_file"))
    } else if flavor == Flavor::Azure
        && let Some((id, param)) = without_bom(&request, &training, validation.as_ref())
    {
        Err(JobFailure::no_bom(id, param))
    } else {
        // Validated outside the lock: a large file must not stall every other endpoint.
        check_inputs(
            &training.content,
            validation.as_ref().map(|file| &file.content),
            request.hyperparameters,
        )
    };
    let fails_in_training = request
        .suffix
        .as_deref()
        .is_some_and(|suffix| suffix.contains(FAIL_TRAINING_SUFFIX))
        || state.take_failing_job();
    let job = FineTuneJob::new(
        request,
        inputs,
        state.fine_tune,
        now,
        flavor,
        fails_in_training,
    );
    // Azure's create answers 201, OpenAI's 200.
    let status = match flavor {
        Flavor::OpenAi => StatusCode::OK,
        Flavor::Azure => StatusCode::CREATED,
    };
    let response = reply::json(status, &job.view());
    let mut storage = state.storage();
    let (_, jobs) = storage.account(flavor);
    jobs.jobs.push(job);
    if state.take_lost_create() {
        return Err(ApiError::server_error());
    }
    Ok(response)
}

pub(crate) async fn list(
    State(state): State<Arc<SimState>>,
    query: ListParams,
) -> Result<Response, ApiError> {
    list_in(&state, Flavor::OpenAi, query)
}

pub(crate) fn list_in(
    state: &SimState,
    flavor: Flavor,
    query: ListParams,
) -> Result<Response, ApiError> {
    let query = list_query(query)?;
    let limit = query.limit(20, 10_000)?;
    let wanted: Vec<(&str, &str)> = query
        .pairs()
        .filter_map(|(key, value)| Some((key.strip_prefix("metadata[")?.strip_suffix(']')?, value)))
        .collect();
    let now = Instant::now();
    let mut guard = state.storage();
    let (files, jobs) = guard.account(flavor);
    for job in &mut jobs.jobs {
        job.advance(now, files);
    }
    let matching = jobs.jobs.iter().rev().filter(|job| {
        wanted.iter().all(|(key, value)| {
            job.metadata
                .as_ref()
                .and_then(|metadata| metadata.get(*key))
                .and_then(Value::as_str)
                == Some(*value)
        })
    });
    let (data, has_more) = reply::page(matching, query.after(), limit, |job| &job.id);
    Ok(reply::json(
        StatusCode::OK,
        &List {
            object: "list",
            data: data.into_iter().map(FineTuneJob::view).collect(),
            has_more,
        },
    ))
}

/// Runs `action` on the job, brought up to date first, and answers with the job.
fn with_job(
    state: &SimState,
    flavor: Flavor,
    id: &str,
    action: impl FnOnce(&mut FineTuneJob, Instant) -> Result<(), ApiError>,
) -> Result<Response, ApiError> {
    let now = Instant::now();
    let mut guard = state.storage();
    let (files, jobs) = guard.account(flavor);
    let job = jobs.find(id)?;
    job.advance(now, files);
    action(job, now)?;
    Ok(reply::json(StatusCode::OK, &job.view()))
}

pub(crate) async fn retrieve(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    retrieve_in(&state, Flavor::OpenAi, &id)
}

pub(crate) fn retrieve_in(
    state: &SimState,
    flavor: Flavor,
    id: &str,
) -> Result<Response, ApiError> {
    with_job(state, flavor, id, |_, _| Ok(()))
}

pub(crate) async fn cancel(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    cancel_in(&state, Flavor::OpenAi, &id)
}

pub(crate) fn cancel_in(state: &SimState, flavor: Flavor, id: &str) -> Result<Response, ApiError> {
    with_job(state, flavor, id, FineTuneJob::cancel)
}

pub(crate) async fn pause(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    with_job(&state, Flavor::OpenAi, &id, FineTuneJob::pause)
}

pub(crate) async fn resume(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    with_job(&state, Flavor::OpenAi, &id, FineTuneJob::resume)
}

pub(crate) async fn events(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
    query: ListParams,
) -> Result<Response, ApiError> {
    events_in(&state, Flavor::OpenAi, &id, query)
}

pub(crate) fn events_in(
    state: &SimState,
    flavor: Flavor,
    id: &str,
    query: ListParams,
) -> Result<Response, ApiError> {
    let query = list_query(query)?;
    let limit = query.limit(20, 10_000)?;
    let now = Instant::now();
    let mut guard = state.storage();
    let (files, jobs) = guard.account(flavor);
    let job = jobs.find(id)?;
    job.advance(now, files);
    let (data, has_more) = reply::page(job.events.iter().rev(), query.after(), limit, |event| {
        &event.id
    });
    Ok(reply::json(
        StatusCode::OK,
        &List {
            object: "list",
            data: data.into_iter().map(EventView::from).collect(),
            has_more,
        },
    ))
}

pub(crate) async fn checkpoints(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
    query: ListParams,
) -> Result<Response, ApiError> {
    checkpoints_in(&state, Flavor::OpenAi, &id, query)
}

pub(crate) fn checkpoints_in(
    state: &SimState,
    flavor: Flavor,
    id: &str,
    query: ListParams,
) -> Result<Response, ApiError> {
    let query = list_query(query)?;
    let limit = query.limit(10, 10_000)?;
    let now = Instant::now();
    let mut guard = state.storage();
    let (files, jobs) = guard.account(flavor);
    let job = jobs.find(id)?;
    job.advance(now, files);
    let (page, has_more) = reply::page(
        job.checkpoints.iter().rev(),
        query.after(),
        limit,
        |checkpoint| &checkpoint.id,
    );
    Ok(reply::json(
        StatusCode::OK,
        &CursorList {
            object: "list",
            first_id: page.first().map(|checkpoint| checkpoint.id.as_str()),
            last_id: page.last().map(|checkpoint| checkpoint.id.as_str()),
            data: page
                .iter()
                .map(|checkpoint| checkpoint.view(&job.id))
                .collect(),
            has_more,
        },
    ))
}
