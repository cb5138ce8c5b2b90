//! Refuses requests with too many or too large headers, with an OpenAI-shaped JSON 431.
//!
//! hyper refuses such requests by itself, but with a 431 that has no body, which a client's SDK
//! cannot explain to anyone. So the parser is set to far higher limits (see
//! [`crate::config::PARSED_HEADERS`] and [`crate::config::PARSED_HEAD_BYTES`]) and the limits
//! an operator configures are checked here, before any handler runs.

use std::task::{Context, Poll};

use axum::response::{IntoResponse, Response};
use futures_util::future::{Either, Ready, ready};
use http::{HeaderMap, HeaderValue, Request, header};

use crate::error::Error;

/// `server.max_headers` and `server.max_header_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// The most header fields a request may have (each repeated field counts).
    pub max_headers: usize,
    /// The most bytes its header names and values may add up to.
    pub max_header_bytes: usize,
}

impl HeadLimits {
    /// Refuses headers over either limit.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Error> {
        let count = headers.len();
        if count > self.max_headers {
            return Err(Error::HeadersTooLarge(format!(
                "{count} header fields, and the limit is {}",
                self.max_headers
            )));
        }
        let bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        if bytes > self.max_header_bytes {
            return Err(Error::HeadersTooLarge(format!(
                "{bytes} bytes of header names and values, and the limit is {}",
                self.max_header_bytes
            )));
        }
        Ok(())
    }
}

/// A service that answers requests over [`HeadLimits`] itself and passes the rest to `inner`.
#[derive(Debug, Clone)]
pub struct HeadLimit<S> {
    inner: S,
    limits: HeadLimits,
}

impl<S> HeadLimit<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, limits: HeadLimits) -> Self {
        Self { inner, limits }
    }
}

impl<S, B> tower::Service<Request<B>> for HeadLimit<S>
where
    S: tower::Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.limits.check(request.headers()) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(refused) => {
                let mut response = refused.into_response();
                // A client this far out of bounds is not one to keep a connection open for.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                Either::Left(ready(Ok(response)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(fields: usize, value_len: usize) -> HeaderMap {
        let mut map = HeaderMap::new();
        for _ in 0..fields {
            // Repeated fields count one by one, as the parser counts them.
            map.append(
                "x-h",
                HeaderValue::from_str(&"v".repeat(value_len)).unwrap(),
            );
        }
        map
    }

    #[test]
    fn limits_are_inclusive_and_count_every_field_and_byte() {
        let limits = HeadLimits {
            max_headers: 3,
            max_header_bytes: 30,
        };
        // Three fields of "x-h" (3) + 7 bytes: exactly 30.
        assert!(limits.check(&headers(3, 7)).is_ok());
        let many = limits.check(&headers(4, 1)).unwrap_err();
        assert!(
            many.to_string()
                .contains("4 header fields, and the limit is 3"),
            "{many}"
        );
        let large = limits.check(&headers(3, 8)).unwrap_err();
        assert!(
            large.to_string().contains("33 bytes") && large.to_string().contains("limit is 30"),
            "{large}"
        );
        assert_eq!(
            large.status(),
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }
}
