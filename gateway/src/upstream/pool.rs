//! Upstream HTTP/1.1 connections driven by the request that uses them, kept in a pool between requests.
//!
//! A hyper client connection does its reading and writing only when its `Connection` future is
//! polled. A pooled client usually spawns that future as a task of its own, which then hands
//! the response to the request's task through channels: a task switch for the response head
//! and one for every body chunk (a 24-word SSE answer has 27). Here the request's task
//! polls the connection itself, right before it looks for the next piece of the response, so
//! whatever has arrived is decoded and passed on in the same poll.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1};
use tokio::time::Instant;
use tower::Service;

use super::{BoxError, Connect};

/// The stream a connection runs on: TCP, or TLS over TCP.
type Io = <Connect as Service<Uri>>::Response;

/// How long an idle connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The most idle connections kept per upstream; more are closed when they come back.
const MAX_IDLE: usize = 1024;
/// How often idle connections are checked for expiry and for the upstream having closed them.
const REAP_EVERY: Duration = Duration::from_secs(30);

/// One upstream connection: the handle that sends requests, and the connection itself, which
/// makes progress only when whoever holds it polls it.
pub(super) struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    /// `None` once the connection has ended. Dropping it then is what fails a request still
    /// queued on it, so that the request is not left waiting for a connection that is gone.
    driver: Option<http1::Connection<Io, Full<Bytes>>>,
    /// It served a request before, so the upstream may have closed it meanwhile.
    reused: bool,
}

impl Conn {
    /// Lets the connection read and write what it can now. False once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = &mut self.driver
            && Pin::new(driver).poll(cx).is_ready()
        {
            self.driver = None;
        }
        self.driver.is_some()
    }

    /// Whether an idle connection can take a request: it has not ended (a poll that waits
    /// for nothing would see the upstream's close) and it is ready for the next exchange.
    fn is_usable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }

    /// Sends `request` and waits for the response head, driving the connection meanwhile. A
    /// request that was not sent at all comes back in the error.
    pub(super) async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Full<Bytes>>>> {
        let mut response = std::pin::pin!(self.sender.try_send_request(request));
        std::future::poll_fn(|cx| {
            // The connection first: it writes the request and reads what has come back.
            self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }

    /// Whether the connection served a request before this one.
    pub(super) fn is_reused(&self) -> bool {
        self.reused
    }
}

/// The idle connections to one upstream, and how to open new ones.
pub(super) struct Pool {
    idle: Mutex<Vec<(Conn, Instant)>>,
    connect: Connect,
    /// The upstream's scheme, host and port.
    origin: Uri,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map_or(0, |idle| idle.len());
        f.debug_struct("Pool").field("idle", &idle).finish()
    }
}

impl Pool {
    pub(super) fn new(connect: Connect, origin: Uri) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            connect,
            origin,
        }
    }

    /// The most recently used idle connection that can still take a request, or a new one.
    pub(super) async fn checkout(&self) -> Result<Conn, BoxError> {
        while let Some(mut conn) = self.pop_idle() {
            if conn.is_usable() {
                conn.reused = true;
                return Ok(conn);
            }
        }
        self.connect().await
    }

    /// Opens a new connection: TCP and TLS within the connect timeout, then the HTTP/1.1 state.
    pub(super) async fn connect(&self) -> Result<Conn, BoxError> {
        let io = self.connect.clone().call(self.origin.clone()).await?;
        let (sender, driver) = http1::handshake(io).await?;
        Ok(Conn {
            sender,
            driver: Some(driver),
            reused: false,
        })
    }

    pub(super) fn pop_idle(&self) -> Option<Conn> {
        let mut idle = self.lock_idle();
        let now = Instant::now();
        // Oldest first: drop the connections idle too long, then take the newest.
        let expired = idle
            .iter()
            .take_while(|(_, since)| now.duration_since(*since) >= IDLE_TIMEOUT)
            .count();
        idle.drain(..expired);
        idle.pop().map(|(conn, _)| conn)
    }

    /// Closes the idle connections that have expired or that the upstream has closed, so that
    /// a pool nobody uses does not keep half-closed sockets. Returns how many are left.
    pub(super) fn reap(&self) -> usize {
        let mut idle = self.lock_idle();
        let now = Instant::now();
        idle.retain_mut(|(conn, since)| {
            now.duration_since(*since) < IDLE_TIMEOUT && conn.is_usable()
        });
        idle.len()
    }

    /// Reaps the pool every [`REAP_EVERY`] for as long as it exists.
    pub(super) fn spawn_reaper(pool: &Arc<Pool>) {
        // Without a runtime (a client built outside one) there is nothing to run it on; the
        // checkouts still drop what has expired.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = Arc::downgrade(pool);
        runtime.spawn(async move {
            let mut every = tokio::time::interval(REAP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(pool) = pool.upgrade() else { break };
                pool.reap();
            }
        });
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<(Conn, Instant)>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes back a connection whose exchange is over, if it can serve another.
    fn checkin(&self, mut conn: Conn) {
        if !conn.is_usable() {
            return;
        }
        let mut idle = self.lock_idle();
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }
}

/// A response body that drives its connection as it is read, and hands the connection back to
/// the pool once the body has ended cleanly. Dropped early, it closes the connection.
pub struct DrivenBody {
    incoming: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    /// The body has yielded its end.
    ended: bool,
}

impl DrivenBody {
    pub(super) fn new(incoming: Incoming, conn: Conn, pool: Arc<Pool>) -> Self {
        Self {
            incoming,
            conn: Some(conn),
            pool,
            ended: false,
        }
    }
}

impl DrivenBody {
    /// Gives the connection back if the response has been read to its end. The server may stop
    /// polling a body whose length says it is done, so this also runs on drop.
    fn release(&mut self) {
        if (self.ended || self.incoming.is_end_stream())
            && let Some(conn) = self.conn.take()
        {
            self.pool.checkin(conn);
        }
    }
}

impl Drop for DrivenBody {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for DrivenBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrivenBody")
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl Body for DrivenBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(conn) = &mut this.conn {
            conn.drive(cx);
        }
        let frame = Pin::new(&mut this.incoming).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.ended = true;
            this.release();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}
