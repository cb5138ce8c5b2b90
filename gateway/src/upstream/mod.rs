//! Clients for the configured upstreams: pooled connections, the key from the environment, timeouts.

mod pool;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::{KeyHeader, Timeouts};
use crate::error::Error;
use crate::proxy::body::UpstreamBody;
pub use pool::DrivenBody;
use pool::Pool;

/// One upstream: where it is, its key, and a pooled client with its timeouts.
///
/// The proxy sends with hyper's own HTTP/1.1 connections, pooled here (see [`pool`]), rather
/// than reqwest: on the hot path reqwest's redirect and retry layers and its URL handling cost
/// about as much CPU as the rest of the upstream call (profiled under the load bench), and the
/// proxy needs none of them.
#[derive(Debug)]
pub struct Upstream {
    name: String,
    base_url: String,
    /// `Authorization: Bearer …`, marked sensitive so it never shows in debug output.
    auth: Option<(HeaderName, HeaderValue)>,
    pool: Arc<Pool>,
    timeouts: Timeouts,
    /// The base URL's path (`/v1`), which every request target starts with.
    base_path: String,
    /// The chat request target (`/v1/chat/completions`), formed once: it is the hot path.
    chat_target: Uri,
    /// `Host`, formed once: the client would otherwise format it for every request.
    host: HeaderValue,
}

/// The chat completions path under an upstream's base URL.
pub const CHAT_PATH: &str = "/chat/completions";

/// What an upstream request says it is, unless the client said.
const USER_AGENT: HeaderValue =
    HeaderValue::from_static(concat!("forge/", env!("CARGO_PKG_VERSION")));

/// A request that could not be built or configured at start-up.
#[derive(Debug, thiserror::Error)]
#[error("upstream `{name}`: {reason}")]
pub struct UpstreamSetupError {
    name: String,
    reason: String,
}

impl Upstream {
    /// Builds the client. `api_key` comes from the environment variable the config names, and
    /// goes in the `key_header` of every request.
    pub fn new(
        name: &str,
        base_url: &str,
        api_key: Option<&str>,
        key_header: KeyHeader,
        timeouts: Timeouts,
    ) -> Result<Self, UpstreamSetupError> {
        let setup_err = |reason: String| UpstreamSetupError {
            name: name.to_string(),
            reason,
        };
        let auth = api_key
            .map(|key| {
                let (name, value) = match key_header {
                    KeyHeader::Authorization => (header::AUTHORIZATION, format!("Bearer {key}")),
                    KeyHeader::ApiKey => (HeaderName::from_static("api-key"), key.to_string()),
                };
                let mut value = HeaderValue::from_str(&value).map_err(|_| {
                    setup_err("the API key has characters not allowed in a header".into())
                })?;
                value.set_sensitive(true);
                Ok((name, value))
            })
            .transpose()?;
        let base_url = base_url.trim_end_matches('/').to_string();
        let base = base_url
            .parse::<Uri>()
            .map_err(|e| setup_err(format!("base_url is not a URL: {e}")))?;
        let host = host_header(&base).ok_or_else(|| setup_err("base_url has no host".into()))?;
        // Where connections go: the scheme, host and port; the path travels in each request.
        let origin = Uri::builder()
            .scheme(base.scheme_str().unwrap_or("http"))
            .authority(base.authority().map_or("", |a| a.as_str()))
            .path_and_query("/")
            .build()
            .map_err(|e| setup_err(format!("base_url is not a URL: {e}")))?;
        let base_path = base.path().trim_end_matches('/').to_string();
        let chat_target = format!("{base_path}{CHAT_PATH}")
            .parse::<Uri>()
            .map_err(|e| setup_err(format!("base_url is not a URL: {e}")))?;
        let connect = Connect::new(timeouts.connect)
            .map_err(|e| setup_err(format!("cannot set up TLS: {e}")))?;
        let pool = Arc::new(Pool::new(connect, origin));
        Pool::spawn_reaper(&pool);
        Ok(Self {
            base_path,
            chat_target,
            host,
            name: name.to_string(),
            base_url,
            auth,
            pool,
            timeouts,
        })
    }

    /// The name routes use.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base URL, e.g. `https://api.openai.com/v1`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Sends one request to `{base_url}{path}` and returns the upstream's response with its body
    /// still streaming. `path` starts after the `/v1` prefix (e.g. `/chat/completions?x=1`).
    ///
    /// The caller's headers are sent as given; the upstream key replaces any credentials.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<http::Response<UpstreamBody<DrivenBody>>, Error> {
        strip_credentials(&mut headers);
        if let Some((name, value)) = &self.auth {
            headers.insert(name.clone(), value.clone());
        }
        headers.entry(header::USER_AGENT).or_insert(USER_AGENT);
        headers.insert(header::HOST, self.host.clone());
        // hyper writes the request target as given: the path and query, with the host in `Host`.
        let target = if path == CHAT_PATH {
            self.chat_target.clone()
        } else {
            format!("{}{}", self.base_path, path)
                .parse::<Uri>()
                .map_err(|e| {
                    tracing::warn!(upstream = %self.name, path, error = %e, "cannot form the upstream URI");
                    Error::UpstreamUnreachable
                })?
        };
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = target;
        *request.headers_mut() = headers;
        let first_byte = self.timeouts.first_byte;
        let (response, conn) = match tokio::time::timeout(first_byte, self.exchange(request)).await
        {
            Err(_) => return Err(Error::UpstreamTimeout(millis(first_byte))),
            Ok(Err(e)) if connect_timed_out(e.as_ref()) => {
                return Err(Error::UpstreamTimeout(millis(self.timeouts.connect)));
            }
            Ok(Err(e)) => {
                tracing::warn!(upstream = %self.name, error = %ErrorChain(e.as_ref()), "upstream request failed");
                return Err(Error::UpstreamUnreachable);
            }
            Ok(Ok(exchanged)) => exchanged,
        };
        let (mut parts, body) = response.into_parts();
        let body = DrivenBody::new(body, conn, Arc::clone(&self.pool));
        if matches!(
            parts.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            // Clients never bring their own key for an upstream: this one is Forge's. Only the
            // answer's error code is logged: its message may quote part of the key.
            let code = refusal_code(body).await;
            tracing::error!(
                upstream = %self.name,
                status = parts.status.as_u16(),
                code = code.as_deref().unwrap_or("-"),
                "the upstream refused Forge's credentials; check the key its `api_key_env` names"
            );
            return Err(Error::UpstreamRefusedCredentials(parts.status.as_u16()));
        }
        strip_hop_by_hop(&mut parts.headers);
        strip_account_headers(&mut parts.headers);
        let is_sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        if is_sse {
            // An SSE body may gain a final error event if the upstream fails, so its length is
            // not known in advance.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let body = UpstreamBody::new(body, self.timeouts.idle, is_sse);
        let body = if path == CHAT_PATH {
            body.expecting_done()
        } else {
            body
        };
        Ok(http::Response::from_parts(parts, body))
    }

    /// Sends `request` on a pooled connection, or on a new one if the pooled one turns out to
    /// have been closed before the request went out; returns the response head and the
    /// connection its body arrives on.
    async fn exchange(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<(http::Response<hyper::body::Incoming>, pool::Conn), BoxError> {
        let mut conn = self.pool.checkout().await?;
        match conn.send(request).await {
            Ok(response) => Ok((response, conn)),
            Err(mut e) => match e.take_message() {
                // Not sent at all on a connection that had been idle: safe to send again.
                Some(request) if conn.is_reused() => {
                    let mut conn = self.pool.connect().await?;
                    let response = conn.send(request).await.map_err(|e| e.into_error())?;
                    Ok((response, conn))
                }
                _ => Err(e.into_error().into()),
            },
        }
    }
}

/// `Host` for requests to `uri`: the host, and the port unless it is the scheme's default (as
/// hyper's client forms it).
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let value = match uri.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_string(),
    };
    HeaderValue::from_str(&value).ok()
}

/// Opens upstream connections: TCP_NODELAY, rustls with the platform's roots when the URL is
/// `https`, and TCP and TLS together within the connect timeout (the TCP connector's own
/// timeout would not cover the handshake). Redirects are never followed (nothing here follows
/// them), so the provider key cannot be carried to wherever an upstream points (S4).
#[derive(Debug, Clone)]
struct Connect {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

impl Connect {
    fn new(timeout: Duration) -> Result<Self, rustls::Error> {
        use rustls_platform_verifier::BuilderVerifierExt;

        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        // The TLS layer takes `https` URIs; it needs the TCP layer to accept them.
        tcp.enforce_http(false);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_platform_verifier()?
            .with_no_client_auth();
        let inner = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        Ok(Self { inner, timeout })
    }
}

/// The connect timeout ran out.
#[derive(Debug, thiserror::Error)]
#[error("connecting took longer than {0:?}")]
struct ConnectTimeout(Duration);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connect {
    type Response = <HttpsConnector<HttpConnector> as tower::Service<Uri>>::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            tokio::time::timeout(timeout, connecting)
                .await
                .map_err(|_| ConnectTimeout(timeout))?
        })
    }
}

/// Whether connecting ran out of time.
fn connect_timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    sources(e).any(|s| s.is::<ConnectTimeout>())
}

/// An error and every error under it.
fn sources<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// Displays an error with its causes, `a: b: c`: hyper's own messages say only which step failed.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in sources(self.0).enumerate() {
            if i > 0 {
                f.write_str(": ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Credentials a client sent are for Forge, never for the upstream; nor may a client choose
/// which organization or project of the upstream key's account its request is billed to and
/// acts on.
pub fn strip_credentials(headers: &mut HeaderMap) {
    for name in [
        header::AUTHORIZATION,
        header::COOKIE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    for name in ["api-key", "openai-organization", "openai-project"] {
        headers.remove(name);
    }
}

/// The error code of an upstream's refusal (OpenAI's and Azure's `error.code` or `error.type`,
/// vLLM's `error` string), read from at most 16 KiB within a second. Only a word made of the
/// characters a code is made of is taken, so that no sentence of the answer reaches the log.
async fn refusal_code(body: DrivenBody) -> Option<String> {
    use http_body_util::BodyExt;
    let read = http_body_util::Limited::new(body, 16 * 1024).collect();
    let bytes = tokio::time::timeout(Duration::from_secs(1), read)
        .await
        .ok()?
        .ok()?
        .to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let error = answer.get("error")?;
    let code = ["code", "type"]
        .into_iter()
        .find_map(|field| error.get(field)?.as_str())
        .or_else(|| error.as_str())?;
    let is_code = (1..=64).contains(&code.len())
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    is_code.then(|| code.to_string())
}

/// Removes from an upstream's answer what belongs to Forge's account there, not to the client:
/// the organization and project behind Forge's key, and the cookies the upstream's edge sets for
/// Forge's connection.
fn strip_account_headers(headers: &mut HeaderMap) {
    headers.remove(header::SET_COOKIE);
    headers.remove("openai-organization");
    headers.remove("openai-project");
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1), including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    // A message framed by `Transfer-Encoding` has no length of its own (RFC 9112 §6.3): a
    // `Content-Length` beside it, passed on, would frame the body anew, cut or short.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// All upstreams by name.
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
}

impl Upstreams {
    /// Adds an upstream.
    pub fn insert(&mut self, upstream: Upstream) {
        self.by_name
            .insert(upstream.name.clone(), Arc::new(upstream));
    }

    /// The upstream with this name.
    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(name)
    }

    /// All names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::net::TcpListener;

    use super::*;

    fn timeouts(connect: Duration) -> Timeouts {
        Timeouts {
            connect,
            first_byte: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        }
    }

    /// A loopback server that holds each connection: it says nothing, or answers `reply` to
    /// whatever the client sends first.
    async fn server(reply: Option<&'static [u8]>) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                if let Some(reply) = reply {
                    let mut first = [0; 4096];
                    let _ = socket.read(&mut first).await;
                    let _ = socket.write_all(reply).await;
                }
                held.push(socket);
            }
        });
        addr
    }

    fn upstream(url: String, connect: Duration) -> Upstream {
        Upstream::new("test", &url, None, KeyHeader::default(), timeouts(connect)).unwrap()
    }

    async fn send(upstream: &Upstream) -> Result<http::StatusCode, Error> {
        let response = upstream
            .send(Method::POST, CHAT_PATH, HeaderMap::new(), Bytes::new())
            .await?;
        Ok(response.status())
    }

    /// A keep-alive HTTP/1.1 server that answers `{"ok":true}` to everything (chunked when
    /// `chunked`), and a count of the connections it accepted.
    async fn counting_server(chunked: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(move |_request| async move {
                    let parts: Vec<Result<Frame<Bytes>, Infallible>> = ["{\"ok\"", ":true}"]
                        .map(|part| Ok(Frame::data(Bytes::from_static(part.as_bytes()))))
                        .into();
                    let body = if chunked {
                        StreamBody::new(futures_util::stream::iter(parts)).boxed()
                    } else {
                        Full::new(Bytes::from_static(b"{\"ok\":true}")).boxed()
                    };
                    Ok::<_, Infallible>(http::Response::new(body))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        (addr, accepted)
    }

    /// Sends a request and reads the whole response body.
    async fn read_through(upstream: &Upstream) -> Bytes {
        let response = upstream
            .send(Method::POST, CHAT_PATH, HeaderMap::new(), Bytes::new())
            .await
            .unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn one_connection_serves_request_after_request() {
        for chunked in [false, true] {
            let (addr, accepted) = counting_server(chunked).await;
            let upstream = upstream(format!("http://{addr}/v1"), Duration::from_secs(60));
            for _ in 0..3 {
                assert_eq!(read_through(&upstream).await, "{\"ok\":true}");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "chunked: {chunked}");
            // Open and unexpired: the reaper keeps it.
            assert_eq!(upstream.pool.reap(), 1);
        }
    }

    /// The upstream end of [`closing_server`]: close the current connection, and hear it done.
    struct Closer {
        close: tokio::sync::mpsc::UnboundedSender<()>,
        closed: tokio::sync::mpsc::UnboundedReceiver<()>,
    }

    impl Closer {
        /// Closes the connection the last answer came on, and waits until it is closed.
        async fn close(&mut self) {
            self.close.send(()).unwrap();
            self.closed.recv().await.unwrap();
            // Time for the close to reach this end of the socket; how long it takes is not
            // what the tests are about.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A server that answers each connection once, with an answer that does not say it will
    /// close, and closes the connection when told.
    async fn closing_server() -> (std::net::SocketAddr, Closer) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::sync::mpsc::unbounded_channel;

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (close, mut close_rx) = unbounded_channel::<()>();
        let (closed_tx, closed) = unbounded_channel::<()>();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0; 4096];
                let _ = socket.read(&mut request).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    .await;
                if close_rx.recv().await.is_none() {
                    break;
                }
                drop(socket);
                let _ = closed_tx.send(());
            }
        });
        (addr, Closer { close, closed })
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_replaced() {
        let (addr, mut closer) = closing_server().await;
        let upstream = upstream(format!("http://{addr}/v1"), Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(read_through(&upstream).await, "{}");
            // Back in the pool and open, so the reaper keeps it.
            assert_eq!(upstream.pool.reap(), 1);
            closer.close().await;
        }
        // The last one sits in the pool, closed by the upstream: the reaper drops it.
        assert_eq!(upstream.pool.reap(), 0);
    }

    /// The upstream may close a connection after the pool has checked it: a request sent on it
    /// must come back unsent at once (to be sent again), not wait for a connection that is gone.
    #[tokio::test]
    async fn a_request_on_a_connection_closed_after_checkout_comes_back_unsent() {
        let (addr, mut closer) = closing_server().await;
        let upstream = upstream(format!("http://{addr}/v1"), Duration::from_secs(60));
        assert_eq!(read_through(&upstream).await, "{}");
        closer.close().await;
        // Taken without the check a checkout makes.
        let mut conn = upstream.pool.pop_idle().expect("the connection was pooled");
        let request = http::Request::new(Full::new(Bytes::new()));
        let sent = tokio::time::timeout(Duration::from_secs(30), conn.send(request))
            .await
            .expect("the request does not wait for the closed connection");
        let mut error = sent.expect_err("the connection is closed");
        assert!(error.take_message().is_some(), "{:?}", error.error());
        // And the whole exchange goes through on a new connection.
        assert_eq!(read_through(&upstream).await, "{}");
    }

    #[tokio::test]
    async fn a_tls_handshake_that_hangs_runs_into_the_connect_timeout() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let addr = server(None).await;
        let connect = Duration::from_millis(200);
        let upstream = upstream(format!("https://{addr}/v1"), connect);
        let err = send(&upstream).await.unwrap_err();
        assert!(matches!(err, Error::UpstreamTimeout(200)), "{err:?}");
    }

    #[tokio::test]
    async fn a_server_that_does_not_speak_tls_is_unreachable() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let addr = server(Some(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")).await;
        let upstream = upstream(format!("https://{addr}/v1"), Duration::from_secs(60));
        let err = send(&upstream).await.unwrap_err();
        assert!(matches!(err, Error::UpstreamUnreachable), "{err:?}");
    }

    #[tokio::test]
    async fn plain_http_reaches_the_server() {
        let addr = server(Some(
            b"HTTP/1.1 418 I'm a teapot\r\ncontent-length: 0\r\n\r\n",
        ))
        .await;
        let upstream = upstream(format!("http://{addr}/v1"), Duration::from_secs(60));
        assert_eq!(
            send(&upstream).await.unwrap(),
            http::StatusCode::IM_A_TEAPOT
        );
    }

    #[tokio::test]
    async fn a_chunked_answer_with_a_length_too_is_passed_on_without_the_length() {
        // Both framings: the chunks win, and the length must not frame the body anew for the
        // client (it would cut it to 4 bytes here).
        let addr = server(Some(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\nb\r\n{\"ok\":true}\r\n0\r\n\r\n",
        ))
        .await;
        let upstream = upstream(format!("http://{addr}/v1"), Duration::from_secs(5));
        let response = upstream
            .send(Method::POST, CHAT_PATH, HeaderMap::new(), Bytes::new())
            .await
            .unwrap();
        assert!(
            !response.headers().contains_key(header::CONTENT_LENGTH),
            "{:?}",
            response.headers()
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.as_ref(), b"{\"ok\":true}");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-request-id"));
    }

    #[test]
    fn host_is_the_base_urls_host_and_any_port_but_the_default() {
        let host = |url: &str| host_header(&url.parse().unwrap()).unwrap();
        assert_eq!(host("http://127.0.0.1:8080/v1/x"), "127.0.0.1:8080");
        assert_eq!(host("http://sim.local/v1"), "sim.local");
        assert_eq!(host("http://sim.local:80/v1"), "sim.local");
        assert_eq!(host("https://api.openai.com:443/v1"), "api.openai.com");
        assert_eq!(
            host("https://x.openai.azure.com:8443/openai"),
            "x.openai.azure.com:8443"
        );
        assert_eq!(host("http://[::1]:9000/v1"), "[::1]:9000");
    }

    #[test]
    fn client_credentials_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        h.insert("api-key", HeaderValue::from_static("k"));
        h.insert(header::COOKIE, HeaderValue::from_static("c=1"));
        h.insert("OpenAI-Organization", HeaderValue::from_static("org-other"));
        h.insert("OpenAI-Project", HeaderValue::from_static("proj-other"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_credentials(&mut h);
        assert_eq!(h.len(), 1);
    }
}
