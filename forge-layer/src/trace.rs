//! The trace record: one captured exchange, as it is stored and exported.

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};

use forge_router::Arm;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::reassemble::FinalResponse;

/// A trace id: a ULID, so ids sort by creation time (the store's key order is time order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TraceId(u128);

/// The id generator, and the id every new one must be above.
struct Ids {
    generator: ulid::Generator,
    floor: u128,
}

static IDS: Mutex<Ids> = Mutex::new(Ids {
    generator: ulid::Generator::new(),
    floor: 0,
});

impl TraceId {
    /// A new id for now, greater than every id this process made before (within one
    /// millisecond the random part is incremented, so ids never sort out of creation order) and
    /// than any id passed to [`TraceId::keep_above`].
    pub fn generate() -> Self {
        let mut ids = IDS.lock().unwrap_or_else(PoisonError::into_inner);
        // Overflow needs 2^80 ids in one millisecond; fall back to a fresh random id.
        let made: u128 = ids
            .generator
            .generate()
            .unwrap_or_else(|_| ulid::Ulid::new())
            .into();
        let id = made.max(ids.floor.saturating_add(1));
        ids.floor = id;
        Self(id)
    }

    /// Makes every id generated from now on sort after `id`. The store calls it when it opens
    /// with the highest id it has held (its newest trace, or the newest it deleted for age): if
    /// the clock went back across a restart, new traces still sort after the old ones, so a
    /// cursor kept from before (the judge's, a dataset's cut) never passes them.
    pub fn keep_above(id: TraceId) {
        let mut ids = IDS.lock().unwrap_or_else(PoisonError::into_inner);
        ids.floor = ids.floor.max(id.0);
    }

    /// The id as a 128-bit key.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// From a 128-bit key.
    pub fn from_u128(v: u128) -> Self {
        Self(v)
    }

    /// The lowest id made at `ms` milliseconds since the Unix epoch: every id made earlier is
    /// below it (a cutoff for ids by age).
    pub fn earliest_at(ms: u64) -> Self {
        Self(ulid::Ulid::from_parts(ms, 0).into())
    }

    /// Milliseconds since the Unix epoch when the id was made.
    pub fn timestamp_ms(self) -> u64 {
        ulid::Ulid::from(self.0).timestamp_ms()
    }
}

impl TraceId {
    /// The id as a header value, formatted on the stack: it goes out on every captured response.
    pub fn to_header_value(self) -> http::HeaderValue {
        let mut buf = [0; ulid::ULID_LEN];
        let text = ulid::Ulid::from(self.0).array_to_str(&mut buf);
        // Crockford base32 is always a valid header value.
        http::HeaderValue::from_str(text).unwrap_or_else(|_| http::HeaderValue::from_static(""))
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0; ulid::ULID_LEN];
        f.write_str(ulid::Ulid::from(self.0).array_to_str(&mut buf))
    }
}

/// A string that is not a trace id.
#[derive(Debug, thiserror::Error)]
#[error("not a trace id (expected a 26-character ULID)")]
pub struct BadTraceId;

impl FromStr for TraceId {
    type Err = BadTraceId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ulid::Ulid::from_string(s)
            .map(|u| Self(u.into()))
            .map_err(|_| BadTraceId)
    }
}

impl Serialize for TraceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TraceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The whole response reached the client, with a 2xx status and no error event.
    Completed,
    /// A non-2xx status, an upstream failure, or an error event mid-stream.
    Errored,
    /// The client went away before the response ended.
    Cancelled,
    /// The response ended, but what was captured is incomplete: the capture cap was reached, or
    /// the stream ended without `[DONE]`.
    Truncated,
}

impl Outcome {
    /// The snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Errored => "errored",
            Outcome::Cancelled => "cancelled",
            Outcome::Truncated => "truncated",
        }
    }
}

/// One captured exchange, with secrets and configured PII already redacted.
pub type Trace = TraceOf<Value>;

/// A trace with its request held as `R`: a JSON tree when read ([`Trace`]); the writer may
/// encode the request's own bytes instead, when redaction had nothing to change in them (the
/// same JSON, without a tree built and serialised again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceOf<R> {
    /// Sorts by time.
    pub id: TraceId,
    /// Unix milliseconds when the request arrived.
    pub time_ms: u64,
    /// The tenant of the client key, if client keys are configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The client key's id (never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The alias the client asked for.
    pub alias: String,
    /// The upstream that served it.
    pub upstream: String,
    /// The model sent upstream.
    pub model: String,
    /// Teacher or student: only teacher traces are training candidates.
    pub arm: Arm,
    /// The routing table version that decided the arm.
    pub route_version: u64,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The request body as JSON (redacted).
    pub request: R,
    /// The final message(s) the client received (redacted).
    pub response: FinalResponse,
    /// The HTTP status the client received.
    pub status: u16,
    /// From the request to the end of the response, in microseconds.
    pub latency_us: u64,
    /// From the request to the response headers, in microseconds.
    pub ttfb_us: u64,
    /// How it ended.
    pub outcome: Outcome,
}

impl<R> TraceOf<R> {
    /// The same trace with `request` as its request.
    fn with_request<S>(self, request: S) -> TraceOf<S> {
        TraceOf {
            id: self.id,
            time_ms: self.time_ms,
            tenant: self.tenant,
            key_id: self.key_id,
            alias: self.alias,
            upstream: self.upstream,
            model: self.model,
            arm: self.arm,
            route_version: self.route_version,
            stream: self.stream,
            request,
            response: self.response,
            status: self.status,
            latency_us: self.latency_us,
            ttfb_us: self.ttfb_us,
            outcome: self.outcome,
        }
    }
}

impl Trace {
    /// Reads a stored trace. A request whose JSON is valid but that a JSON tree cannot hold (a
    /// number past `f64`, nesting past the parser's depth limit once inside the trace) was
    /// stored as the client sent it, and is read as `null`: one odd request must not make its
    /// trace, and every listing, export and dataset that reads it, fail.
    pub fn decode(bytes: &[u8]) -> Result<Trace, serde_json::Error> {
        serde_json::from_slice(bytes).or_else(|error| {
            let Ok(trace) = serde_json::from_slice::<TraceOf<&serde_json::value::RawValue>>(bytes)
            else {
                return Err(error);
            };
            let request = serde_json::from_str(trace.request.get()).unwrap_or(Value::Null);
            Ok(trace.with_request(request))
        })
    }

    /// Whether this exchange may ever become training data.
    pub fn is_teacher(&self) -> bool {
        self.arm == Arm::Teacher
    }

    /// The `finish_reason` of the first choice.
    pub fn finish_reason(&self) -> Option<&str> {
        self.response
            .choices
            .first()
            .and_then(|c| c.finish_reason.as_deref())
    }
}

#[cfg(test)]
impl Trace {
    /// A test's exchange: `prompt` sent to `alias` (after a developer message), answered
    /// `answer to <prompt>`, completed with a 200 on the teacher arm.
    pub(crate) fn sample(alias: &str, prompt: &str) -> Trace {
        use crate::reassemble::{AssistantMessage, FinalChoice};
        Trace {
            id: TraceId::generate(),
            time_ms: 0,
            tenant: None,
            key_id: None,
            alias: alias.into(),
            upstream: "u".into(),
            model: "teacher".into(),
            arm: Arm::Teacher,
            route_version: 1,
            stream: false,
            request: serde_json::json!({"model": alias, "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": prompt}
            ]}),
            response: FinalResponse {
                choices: vec![FinalChoice {
                    index: 0,
                    message: AssistantMessage {
                        content: Some(format!("answer to {prompt}")),
                        ..Default::default()
                    },
                    finish_reason: Some("stop".into()),
                }],
                complete: true,
                ..Default::default()
            },
            status: 200,
            latency_us: 1,
            ttfb_us: 1,
            outcome: Outcome::Completed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_above_a_floor_from_a_clock_that_went_back() {
        // As if the last run's clock had been half a second ahead of this one's.
        let ahead = TraceId::from_u128(ulid::Ulid::from_parts(now_ms() + 500, 0).into());
        TraceId::keep_above(ahead);
        let next = TraceId::generate();
        assert!(next > ahead);
        assert!(TraceId::generate() > next);
    }

    #[test]
    fn ids_sort_by_time_and_round_trip_as_text() {
        let ids: Vec<TraceId> = (0..1000).map(|_| TraceId::generate()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "monotonic within a millisecond"
        );
        let a = ids[0];
        assert_eq!(a.to_string().parse::<TraceId>().unwrap(), a);
        assert_eq!(a.to_string().len(), 26);
        assert!("not-an-id".parse::<TraceId>().is_err());
    }
}
