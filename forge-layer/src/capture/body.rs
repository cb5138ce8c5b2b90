//! `CaptureBody`: forwards every frame untouched and finishes the trace exactly once.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::{BodyEnd, CaptureSession, DurableAck, TraceSink};

/// The error a body passes on: the inner body's own, or [`NotStored`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// In durable mode, the commit that held the exchange's trace failed (after its retries): the
/// response is cut before its last bytes, since a whole response promises a stored trace. The
/// client sees a broken response, which the SDKs retry.
#[derive(Debug, thiserror::Error)]
#[error("durable capture: the exchange's trace could not be stored, so its response is cut short")]
pub struct NotStored;

pin_project! {
    /// The response body, teed into the capture session.
    ///
    /// The session is taken out of its `Option` when the trace is finished, so whichever end
    /// comes first (the last frame, trailers, an error, or `Drop`) finishes it, and no other can.
    pub struct CaptureBody<B, K: TraceSink> {
        #[pin]
        inner: B,
        session: Option<(CaptureSession, K)>,
        // In durable mode: the commit the end of the body waits for…
        commit: Option<DurableAck>,
        // …and the last data frame, held back until then: a client that knows the length
        // (Content-Length) has the whole response once it has the last byte.
        held: Option<Frame<Bytes>>,
        // Bytes still due when the length is known in advance.
        remaining: Option<u64>,
    }

    impl<B, K: TraceSink> PinnedDrop for CaptureBody<B, K> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((session, sink)) = this.session.take() {
                // The client went away before the end; nothing can wait for the commit now.
                drop(sink.submit(session.finish(BodyEnd::Dropped)));
            }
        }
    }
}

impl<B: Body, K: TraceSink> CaptureBody<B, K> {
    /// Captures `inner` into `session`. An already-empty body is finished at once, since the
    /// server may never poll it.
    pub fn new(inner: B, session: CaptureSession, sink: K) -> Self {
        let mut body = Self {
            session: Some((session, sink)),
            commit: None,
            held: None,
            remaining: inner.size_hint().exact(),
            inner,
        };
        if body.inner.is_end_stream() {
            body.commit = finish(&mut body.session, BodyEnd::Complete);
        }
        body
    }
}

impl<B, K: TraceSink> CaptureBody<B, K> {
    /// Waits for a durable commit the body's end is holding, if any. A body that was over
    /// before it began is never polled by the server, so its response waits here instead (and
    /// goes out whatever the commit's fate: it holds no answer to cut).
    pub(super) fn poll_commit(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        poll_commit(&mut self.commit, cx).map(drop)
    }

    /// A body that is not captured.
    pub fn passthrough(inner: B) -> Self {
        Self {
            inner,
            session: None,
            commit: None,
            held: None,
            remaining: None,
        }
    }
}

/// Waits for the commit in `commit`, if any, and clears it: whether it stored its traces (true
/// with none to wait for).
fn poll_commit(commit: &mut Option<DurableAck>, cx: &mut Context<'_>) -> Poll<bool> {
    let Some(ack) = commit.as_mut() else {
        return Poll::Ready(true);
    };
    let stored = ready!(ack.as_mut().poll(cx));
    *commit = None;
    Poll::Ready(stored)
}

/// Logs a response cut short, at most once a second, with the count since the last line: a
/// full or stalled disk in durable mode cuts every response.
fn warn_cut_short() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static UNREPORTED: AtomicU64 = AtomicU64::new(0);
    // Milliseconds since the first call, plus one, when the last line was written; 0 for never.
    // A monotonic clock: a wall clock set back would silence the warning until it caught up.
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    UNREPORTED.fetch_add(1, Ordering::AcqRel);
    let elapsed = START.get_or_init(std::time::Instant::now).elapsed();
    let now = u64::try_from(elapsed.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let last = LAST_MS.load(Ordering::Acquire);
    if (last == 0 || now.saturating_sub(last) >= 1000)
        && LAST_MS
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        let responses = UNREPORTED.swap(0, Ordering::AcqRel);
        tracing::warn!(
            responses,
            "durable capture: responses cut short before their last bytes, their traces not committed (the commit failed, or did not come within `capture.durable_wait_secs`)"
        );
    }
}

/// The body's end (its last frame in `held`, or none for the end itself) once the durable
/// commit in `commit`, if any, has stored its trace; a failed commit cuts the response short
/// instead, whether it failed at once (a writer that has stopped) or later.
fn end_after_commit(
    commit: &mut Option<DurableAck>,
    held: &mut Option<Frame<Bytes>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    let stored = ready!(poll_commit(commit, cx));
    let end = held.take();
    if !stored {
        warn_cut_short();
        return Poll::Ready(Some(Err(NotStored.into())));
    }
    Poll::Ready(end.map(Ok))
}

fn finish<K: TraceSink>(
    session: &mut Option<(CaptureSession, K)>,
    end: BodyEnd,
) -> Option<DurableAck> {
    let (session, sink) = session.take()?;
    sink.submit(session.finish(end))
}

impl<B, K> Body for CaptureBody<B, K>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    K: TraceSink,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if this.commit.is_some() {
            return end_after_commit(this.commit, this.held, cx);
        }
        match ready!(this.inner.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => {
                let mut last = frame.is_trailers();
                if let Some(data) = frame.data_ref() {
                    let mut done = false;
                    if let Some((session, _)) = this.session.as_mut() {
                        session.on_chunk(data);
                        // A chat stream is over at `[DONE]`: the SDKs stop reading there, and
                        // may close before the body's own end comes.
                        done = session.stream_done();
                    }
                    if let Some(remaining) = this.remaining.as_mut() {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    // The server stops polling a body that reports its end, so finish now.
                    last = done || this.inner.is_end_stream() || *this.remaining == Some(0);
                }
                if last {
                    *this.commit = finish(this.session, BodyEnd::Complete);
                    *this.held = Some(frame);
                    return end_after_commit(this.commit, this.held, cx);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                // The connection is failing; don't hold the error back for the commit.
                drop(finish(this.session, BodyEnd::Failed));
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                *this.commit = finish(this.session, BodyEnd::Complete);
                end_after_commit(this.commit, this.held, cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Until a durable commit is acknowledged, the body is not over.
        self.commit.is_none() && self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
