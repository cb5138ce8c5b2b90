//! Extractors whose rejections are OpenAI-shaped JSON errors, not axum's plain text.

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use http::request::Parts;
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

/// The whole body as bytes, refused in the JSON error shape with the status axum chose (413
/// past its body limit).
#[derive(Debug)]
pub struct JsonBytes(pub Bytes);

impl<S> FromRequest<S> for JsonBytes
where
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(request, state).await {
            Ok(bytes) => Ok(Self(bytes)),
            Err(rejection) => {
                let status = rejection.status();
                let mut response = Error::invalid(rejection.body_text(), None).into_response();
                if status != StatusCode::BAD_REQUEST {
                    *response.status_mut() = status;
                }
                Err(response)
            }
        }
    }
}
