//! Helpers the endpoints share: JSON responses, list queries and cursors, ids and timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use rand::Rng;
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::ApiError;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Serializes `value` as the whole response body.
pub(crate) fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    let (status, body) = match serde_json::to_vec(value) {
        Ok(body) => (status, body),
        // Our response types hold only strings, numbers and maps, so this is unreachable in
        // practice; still answer in OpenAI's shape rather than panic.
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"error":{"message":"response serialization failed","type":"server_error","param":null,"code":null}}"#
                .to_vec(),
        ),
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Parses a request body that must be a JSON object.
pub(crate) fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ApiError::unparsable_json()),
    }
}

pub(crate) fn unix_now() -> u64 {
    unix_seconds(SystemTime::now())
}

pub(crate) fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `prefix` followed by `len` random base-62 characters, the shape of OpenAI's opaque ids.
pub(crate) fn random_id(prefix: &str, len: usize) -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    for _ in 0..len {
        id.push(char::from(BASE62[rng.random_range(0..BASE62.len())]));
    }
    id
}

/// `prefix` followed by `len` random lowercase hex digits, the shape of Azure's ids.
pub(crate) fn random_hex(prefix: &str, len: usize) -> String {
    const HEX: &[u8] = b"0123456789abcdef";
    let mut rng = rand::rng();
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    for _ in 0..len {
        id.push(char::from(HEX[rng.random_range(0..HEX.len())]));
    }
    id
}

/// `at` as RFC 3339 UTC with whole seconds (`2024-05-01T12:00:00Z`), as Kubernetes and ARM
/// write timestamps.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let secs = unix_seconds(at);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm, for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Like [`random_id`], but drawn from `next`, for ids that must be reproducible.
pub(crate) fn derived_id(prefix: &str, len: usize, mut next: impl FnMut() -> u64) -> String {
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    for _ in 0..len {
        id.push(char::from(BASE62[(next() % BASE62.len() as u64) as usize]));
    }
    id
}

/// The query string of a list endpoint, as ordered `key=value` pairs.
pub(crate) struct ListQuery {
    pairs: Vec<(String, String)>,
}

impl ListQuery {
    pub(crate) fn new(pairs: Vec<(String, String)>) -> Self {
        Self { pairs }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `limit`, or `default` when absent; outside `1..=max` is a 400 like OpenAI's.
    pub(crate) fn limit(&self, default: usize, max: usize) -> Result<usize, ApiError> {
        let Some(raw) = self.get("limit") else {
            return Ok(default);
        };
        match raw.parse::<usize>() {
            Ok(limit) if (1..=max).contains(&limit) => Ok(limit),
            _ => Err(ApiError::invalid_value(
                "limit",
                format!(
                    "Invalid 'limit': expected an integer between 1 and {max}, but got '{raw}'."
                ),
            )),
        }
    }

    pub(crate) fn after(&self) -> Option<&str> {
        self.get("after").filter(|after| !after.is_empty())
    }
}

/// One page of a list in its final order: the items after the `after` cursor (exclusive), at
/// most `limit` of them, and whether more follow. An unknown cursor gives an empty page.
pub(crate) fn page<T>(
    items: impl Iterator<Item = T>,
    after: Option<&str>,
    limit: usize,
    id_of: impl Fn(&T) -> &str,
) -> (Vec<T>, bool) {
    let mut items = items.peekable();
    if let Some(cursor) = after {
        loop {
            match items.next() {
                Some(item) if id_of(&item) == cursor => break,
                Some(_) => {}
                None => return (Vec::new(), false),
            }
        }
    }
    let data: Vec<T> = items.by_ref().take(limit).collect();
    let has_more = items.peek().is_some();
    (data, has_more)
}

/// `{"object":"list","data":…,"has_more":…}`, the list shape of fine-tuning jobs and events.
#[derive(Serialize)]
pub(crate) struct List<T> {
    pub(crate) object: &'static str,
    pub(crate) data: Vec<T>,
    pub(crate) has_more: bool,
}

/// The list shape with cursors, used by files and checkpoints.
#[derive(Serialize)]
pub(crate) struct CursorList<'a, T> {
    pub(crate) object: &'static str,
    pub(crate) data: Vec<T>,
    pub(crate) first_id: Option<&'a str>,
    pub(crate) last_id: Option<&'a str>,
    pub(crate) has_more: bool,
}
