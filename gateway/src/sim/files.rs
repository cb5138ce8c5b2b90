//! The Files API: multipart upload, list, retrieve, raw content and delete (openai-wire.md §3), for OpenAI and Azure.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use tokio::time::Instant;

use super::error::ApiError;
use super::reply::{self, CursorList, ListQuery};
use super::state::{Flavor, SimState};

const PURPOSES: &[&str] = &[
    "assistants",
    "batch",
    "fine-tune",
    "vision",
    "user_data",
    "evals",
];
const PURPOSES_MESSAGE: &str = "'{}' is not one of ['assistants', 'batch', 'fine-tune', 'vision', 'user_data', 'evals'] - 'purpose'";

/// Every file of one account, in upload order.
#[derive(Default)]
pub(crate) struct FileStore {
    files: Vec<StoredFile>,
    flavor: Flavor,
}

pub(crate) struct StoredFile {
    id: String,
    filename: String,
    purpose: String,
    created_at: u64,
    expires_at: Option<u64>,
    content: Bytes,
    /// Until then the file is `pending`, as Azure's asynchronous processing shows it.
    ready_at: Option<Instant>,
}

/// A training or validation file, as a fine-tuning job sees it when it is created.
pub(crate) struct FineTuneInput {
    pub(crate) content: Bytes,
    /// Azure has not finished processing it.
    pub(crate) pending: bool,
}

impl FileStore {
    pub(crate) fn new(flavor: Flavor) -> Self {
        Self {
            files: Vec::new(),
            flavor,
        }
    }

    pub(crate) fn add(
        &mut self,
        filename: String,
        purpose: &str,
        content: Bytes,
        created_at: u64,
        expires_at: Option<u64>,
    ) -> &StoredFile {
        self.push(filename, purpose, content, created_at, expires_at, None)
    }

    fn push(
        &mut self,
        filename: String,
        purpose: &str,
        content: Bytes,
        created_at: u64,
        expires_at: Option<u64>,
        ready_at: Option<Instant>,
    ) -> &StoredFile {
        let id = match self.flavor {
            Flavor::OpenAi => reply::random_id("file-", 22),
            Flavor::Azure => reply::random_hex("file-", 32),
        };
        self.files.push(StoredFile {
            id,
            filename,
            purpose: purpose.to_owned(),
            created_at,
            expires_at,
            content,
            ready_at,
        });
        let last = self.files.len() - 1;
        &self.files[last]
    }

    fn get(&self, id: &str) -> Result<&StoredFile, ApiError> {
        self.files
            .iter()
            .find(|file| file.id == id)
            .ok_or_else(|| no_such_file(id))
    }

    /// A file a fine-tuning job names in `param`; a missing file or one of another purpose is
    /// a 400 on that parameter, as OpenAI answers.
    pub(crate) fn fine_tune_input(
        &self,
        id: &str,
        param: &'static str,
        now: Instant,
    ) -> Result<FineTuneInput, ApiError> {
        let Some(file) = self.files.iter().find(|file| file.id == id) else {
            return Err(
                ApiError::invalid_request(format!("invalid {param}: {id}")).with_param(param)
            );
        };
        if file.purpose != "fine-tune" {
            return Err(ApiError::invalid_request(format!(
                "File {id} has purpose '{}', but fine-tuning needs a file with purpose \
                 'fine-tune'.",
                file.purpose
            ))
            .with_param(param));
        }
        Ok(FineTuneInput {
            content: file.content.clone(),
            pending: !file.is_ready(now),
        })
    }
}

impl StoredFile {
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    fn is_ready(&self, now: Instant) -> bool {
        self.ready_at.is_none_or(|ready_at| now >= ready_at)
    }

    fn view(&self, now: Instant) -> FileView<'_> {
        FileView {
            object: "file",
            id: &self.id,
            purpose: &self.purpose,
            filename: &self.filename,
            bytes: self.content.len(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            status: if self.is_ready(now) {
                "processed"
            } else {
                "pending"
            },
            status_details: None,
        }
    }
}

#[derive(Serialize)]
struct FileView<'a> {
    object: &'static str,
    id: &'a str,
    purpose: &'a str,
    filename: &'a str,
    bytes: usize,
    created_at: u64,
    expires_at: Option<u64>,
    status: &'static str,
    status_details: Option<&'a str>,
}

fn no_such_file(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}")).with_param("id")
}

fn multipart_error(err: &MultipartError) -> ApiError {
    ApiError::invalid_request(format!(
        "Could not read the multipart body: {}",
        err.body_text()
    ))
}

/// A multipart upload, checked the way OpenAI checks it.
pub(crate) struct Upload {
    filename: String,
    purpose: String,
    content: Bytes,
    expires_after_seconds: Option<u64>,
}

impl Upload {
    /// Stores the file in `files` (it stays `pending` for `processing`, if given) and answers
    /// with its id and the File object: 200 from OpenAI, 201 from Azure.
    pub(crate) fn store(
        self,
        files: &mut FileStore,
        processing: Option<std::time::Duration>,
    ) -> (String, Response) {
        let created_at = reply::unix_now();
        let now = Instant::now();
        let status = match files.flavor {
            Flavor::OpenAi => StatusCode::OK,
            Flavor::Azure => StatusCode::CREATED,
        };
        let stored = files.push(
            self.filename,
            &self.purpose,
            self.content,
            created_at,
            self.expires_after_seconds
                .map(|seconds| created_at + seconds),
            processing.map(|processing| now + processing),
        );
        (stored.id.clone(), reply::json(status, &stored.view(now)))
    }
}

pub(crate) async fn read_upload(
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Upload, ApiError> {
    let mut multipart = multipart.map_err(|err| {
        ApiError::invalid_request(format!(
            "Expected a multipart/form-data body with 'file' and 'purpose': {}",
            err.body_text()
        ))
    })?;
    let mut file: Option<(String, Bytes)> = None;
    let mut purpose: Option<String> = None;
    let mut expires_after_seconds: Option<u64> = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|err| multipart_error(&err))?
    {
        match field.name() {
            Some("file") => {
                let filename = field.file_name().unwrap_or("file").to_owned();
                let content = field.bytes().await.map_err(|err| multipart_error(&err))?;
                file = Some((filename, content));
            }
            Some("purpose") => {
                purpose = Some(field.text().await.map_err(|err| multipart_error(&err))?);
            }
            Some("expires_after[seconds]") => {
                let text = field.text().await.map_err(|err| multipart_error(&err))?;
                match text.trim().parse::<u64>() {
                    Ok(seconds) if (3600..=2_592_000).contains(&seconds) => {
                        expires_after_seconds = Some(seconds);
                    }
                    _ => {
                        return Err(ApiError::invalid_value(
                            "expires_after.seconds",
                            "Invalid 'expires_after.seconds': expected an integer between 3600 and \
                             2592000.",
                        ));
                    }
                }
            }
            // `expires_after[anchor]` can only be `created_at`; other fields are ignored, as
            // OpenAI ignores them.
            _ => {}
        }
    }
    let Some((filename, content)) = file else {
        return Err(ApiError::missing_parameter("file"));
    };
    let Some(purpose) = purpose else {
        return Err(ApiError::missing_parameter("purpose"));
    };
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::invalid_value(
            "purpose",
            PURPOSES_MESSAGE.replace("{}", &purpose),
        ));
    }
    if purpose == "fine-tune" && !filename.ends_with(".jsonl") {
        return Err(ApiError::invalid_request(
            "Invalid file format for Fine-Tuning API. Must be .jsonl",
        )
        .with_param("file"));
    }
    Ok(Upload {
        filename,
        purpose,
        content,
        expires_after_seconds,
    })
}

pub(crate) async fn upload(
    State(state): State<Arc<SimState>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let upload = read_upload(multipart).await?;
    Ok(upload.store(&mut state.storage().files, None).1)
}

pub(crate) async fn list(
    State(state): State<Arc<SimState>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    list_from(&state.storage().files, query)
}

/// A page of `files`, newest first unless `order=asc`, of one `purpose` if asked.
pub(crate) fn list_from(
    files: &FileStore,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = ListQuery::new(
        query
            .map_err(|err| ApiError::invalid_request(err.body_text()))?
            .0,
    );
    let limit = query.limit(10_000, 10_000)?;
    let newest_first = match query.get("order") {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(ApiError::invalid_value(
                "order",
                format!("Invalid value: '{other}'. Supported values are: 'asc' and 'desc'."),
            ));
        }
    };
    let purpose = query.get("purpose");
    let mut files: Vec<&StoredFile> = files
        .files
        .iter()
        .filter(|file| purpose.is_none_or(|purpose| file.purpose == purpose))
        .collect();
    // Upload order breaks ties between files created in the same second.
    files.sort_by_key(|file| file.created_at);
    if newest_first {
        files.reverse();
    }
    let (data, has_more) = reply::page(files.into_iter(), query.after(), limit, |file| &file.id);
    let now = Instant::now();
    let data: Vec<FileView<'_>> = data.into_iter().map(|file| file.view(now)).collect();
    Ok(reply::json(
        StatusCode::OK,
        &CursorList {
            object: "list",
            first_id: data.first().map(|file| file.id),
            last_id: data.last().map(|file| file.id),
            data,
            has_more,
        },
    ))
}

pub(crate) async fn retrieve(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    retrieve_from(&state.storage().files, &id)
}

pub(crate) fn retrieve_from(files: &FileStore, id: &str) -> Result<Response, ApiError> {
    Ok(reply::json(
        StatusCode::OK,
        &files.get(id)?.view(Instant::now()),
    ))
}

pub(crate) async fn content(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    content_from(&state.storage().files, &id)
}

pub(crate) fn content_from(files: &FileStore, id: &str) -> Result<Response, ApiError> {
    let content = files.get(id)?.content.clone();
    let mut response = Response::new(Body::from(content));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}

pub(crate) async fn delete(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    delete_from(&mut state.storage().files, &id)
}

/// Deletes file `id` from `store`: OpenAI's or Azure's.
pub(crate) fn delete_from(store: &mut FileStore, id: &str) -> Result<Json<Deleted>, ApiError> {
    let position = store
        .files
        .iter()
        .position(|file| file.id == id)
        .ok_or_else(|| no_such_file(id))?;
    let removed = store.files.remove(position);
    Ok(Json(Deleted {
        id: removed.id,
        object: "file",
        deleted: true,
    }))
}

#[derive(Serialize)]
pub(crate) struct Deleted {
    id: String,
    object: &'static str,
    deleted: bool,
}
