//! Extractors whose rejections are OpenAI-shaped JSON errors, not axum's plain text, and the
//! limits every request body is read under.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Path, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header;
use http::request::Parts;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

use crate::error::Error;

/// [`Path`], refused with a JSON 400 (a segment that is not UTF-8 once decoded, say).
#[derive(Debug)]
pub struct JsonPath<T>(pub T);

impl<S, T> FromRequestParts<S> for JsonPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(Error::invalid(rejection.body_text(), None).into_response()),
        }
    }
}

/// How much of a request body Forge reads, and for how long: a client that trickles its body
/// would otherwise hold a connection (and, on the proxy port, an in-flight slot) for as long as
/// it likes.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// The most bytes read; past it, a 413.
    pub max_bytes: usize,
    /// How long the whole body may take to arrive; past it, a 408.
    pub timeout: Duration,
}

impl BodyLimits {
    /// A 413 before reading anything, when `Content-Length` already says too much.
    pub fn check_declared(&self, headers: &http::HeaderMap) -> Result<(), Error> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(n) if n > self.max_bytes as u64 => Err(Error::BodyTooLarge {
                limit: self.max_bytes,
            }),
            _ => Ok(()),
        }
    }

    /// Reads a whole body, refusing it with a 413 as soon as it passes the size limit, and with
    /// a 408 when it has not all come within the time limit.
    pub async fn read(&self, body: Body) -> Result<Bytes, Error> {
        let reading =
            tokio::time::timeout(self.timeout, Limited::new(body, self.max_bytes).collect());
        let Ok(read) = reading.await else {
            return Err(Error::BodyTimeout {
                secs: self.timeout.as_secs(),
            });
        };
        match read {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(Error::BodyTooLarge {
                limit: self.max_bytes,
            }),
            Err(_) => Err(Error::invalid(
                "The request body could not be read completely.",
                None,
            )),
        }
    }
}

/// The whole body as bytes, read under the state's [`BodyLimits`].
#[derive(Debug)]
pub struct JsonBytes(pub Bytes);

impl<S> FromRequest<S> for JsonBytes
where
    S: Send + Sync,
    BodyLimits: FromRef<S>,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limits = BodyLimits::from_ref(state);
        let read = async {
            limits.check_declared(request.headers())?;
            limits.read(request.into_body()).await
        };
        read.await.map(Self).map_err(IntoResponse::into_response)
    }
}
