//! The record of every request the simulated upstream received, for tests to inspect.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;

/// How many requests the journal keeps; older ones are forgotten but still counted.
pub(crate) const JOURNAL_CAPACITY: usize = 10_000;

/// One request as the simulated upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path with its query string, e.g. `/v1/files?purpose=fine-tune`.
    pub path: String,
    /// Every header in arrival order, names in lowercase. Non-UTF-8 values are converted lossily.
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: bytes::Bytes,
}

impl RecordedRequest {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, when it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub(crate) fn from_parts(parts: &http::request::Parts, body: Bytes) -> Self {
        Self {
            method: parts.method.as_str().to_owned(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body,
        }
    }
}

/// The last [`JOURNAL_CAPACITY`] requests and a count of all of them.
#[derive(Default)]
pub(crate) struct RequestJournal {
    recent: Mutex<VecDeque<RecordedRequest>>,
    total: AtomicUsize,
}

impl RequestJournal {
    /// The lock is held only to push, never while building the record.
    pub(crate) fn record(&self, request: RecordedRequest) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == JOURNAL_CAPACITY {
            recent.pop_front();
        }
        recent.push_back(request);
        // Counted under the lock so that `total` never trails what `snapshot` shows.
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Vec<RecordedRequest> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.iter().cloned().collect()
    }

    pub(crate) fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: usize) -> RecordedRequest {
        RecordedRequest {
            method: "GET".into(),
            path: format!("/v1/models?n={n}"),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    #[test]
    fn keeps_the_newest_and_counts_all() {
        let journal = RequestJournal::default();
        for n in 0..JOURNAL_CAPACITY + 5 {
            journal.record(request(n));
        }
        let kept = journal.snapshot();
        assert_eq!(kept.len(), JOURNAL_CAPACITY);
        assert_eq!(kept[0].path, "/v1/models?n=5");
        assert_eq!(
            kept[JOURNAL_CAPACITY - 1].path,
            format!("/v1/models?n={}", JOURNAL_CAPACITY + 4)
        );
        assert_eq!(journal.total(), JOURNAL_CAPACITY + 5);
    }
}
