//! The response body from an upstream, passed on as it arrives, with an idle timeout between frames.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use forge_layer::sse::DoneTail;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// Why an upstream body ended early.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    /// No frame arrived within the idle timeout.
    #[error("upstream sent nothing for {0:?}")]
    Idle(Duration),
    /// The connection to the upstream failed mid-body.
    #[error("upstream body failed: {0}")]
    Upstream(Box<dyn std::error::Error + Send + Sync>),
}

/// The most a burst gathers before it is passed on, so a fast upstream never makes the gateway
/// hold much.
const BURST_MAX: usize = 64 * 1024;

pin_project! {
    /// Forwards every frame as soon as it arrives; never waits for data that has not.
    ///
    /// Frames that have already arrived are passed on together: the inner body yields an HTTP
    /// chunk at a time, so an upstream that sent a whole stream in one write would otherwise
    /// reach the client as one socket write per SSE event (28 for a 24-word answer, where the
    /// upstream made 2), each of them a TCP segment the client wakes for. The inner body is
    /// read until it has nothing more at hand, and what it gave goes out as one frame. A stream
    /// whose events come apart in time still goes out event by event.
    ///
    /// The idle timer restarts at each frame, so a long stream that keeps sending is never cut.
    /// When an SSE stream fails, the client receives a final OpenAI-style `data: {"error":…}`
    /// event (which the SDKs raise as `APIError`) and a clean end, rather than a cut connection
    /// it cannot tell from a network fault. Other bodies end with an error, which aborts the
    /// connection, so a truncated JSON body is never mistaken for a complete one.
    pub struct UpstreamBody<B> {
        #[pin]
        inner: B,
        #[pin]
        idle_timer: Sleep,
        idle: Duration,
        // When the last frame arrived. The timer is moved only when it fires, not at every
        // frame: a long stream costs a clock read per chunk, not a timer-wheel update.
        last_frame: Instant,
        is_sse: bool,
        // Data received and not yet passed on.
        burst: Burst,
        // What ended the body, once it has; passed on after the burst.
        end: Option<End>,
        // Whether what was passed on so far ends between two SSE events.
        at_boundary: bool,
        // The last bytes passed on, to see whether they end with the `data: [DONE]` event.
        tail: DoneTail,
        // Whether a clean end must come after `[DONE]` (chat completions streams): one that
        // does not was cut short by the upstream, and the client is told so.
        needs_done: bool,
        // Whether the upstream already sent an error event, which then explains the end.
        saw_error: bool,
    }
}

/// How an upstream body ended.
enum End {
    /// Cleanly; `Some` when it ended with trailers.
    Complete(Option<Frame<Bytes>>),
    /// Early.
    Failed(UpstreamBodyError),
    /// Everything has been passed on.
    Done,
}

/// Data frames gathered, passed on as one: copied once, into a buffer of the exact size, and
/// only when there is more than one.
#[derive(Default)]
struct Burst {
    frames: Vec<Bytes>,
    len: usize,
}

impl Burst {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        self.frames.push(data);
    }

    fn take(&mut self) -> Option<Bytes> {
        let joined = match self.frames.len() {
            0 => return None,
            1 => self.frames.pop(),
            _ => {
                let mut joined = BytesMut::with_capacity(self.len);
                for frame in self.frames.drain(..) {
                    joined.extend_from_slice(&frame);
                }
                Some(joined.freeze())
            }
        };
        self.len = 0;
        joined
    }
}

impl<B> std::fmt::Debug for UpstreamBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("idle", &self.idle)
            .field("is_sse", &self.is_sse)
            .field("gathered", &self.burst.len())
            .finish_non_exhaustive()
    }
}

impl<B> UpstreamBody<B> {
    /// Wraps an upstream body.
    pub fn new(inner: B, idle: Duration, is_sse: bool) -> Self {
        Self {
            inner,
            idle_timer: tokio::time::sleep(idle),
            idle,
            last_frame: Instant::now(),
            is_sse,
            burst: Burst::default(),
            end: None,
            at_boundary: true,
            tail: DoneTail::default(),
            needs_done: false,
            saw_error: false,
        }
    }

    /// Whether a clean end now would still need the error event of [`Self::expecting_done`].
    fn owes_error_event(&self) -> bool {
        self.needs_done && !self.saw_error && !self.tail.is_done()
    }

    /// Makes a clean end of an SSE body without `[DONE]` end with an error event, as a failure
    /// does. For chat completions, whose streams always end with `[DONE]`: the SDKs stop at the
    /// end of the body without complaint, so a cut answer would pass for a whole one.
    pub fn expecting_done(mut self) -> Self {
        self.needs_done = self.is_sse;
        self
    }
}

/// The SSE event sent to the client when the upstream stream fails.
pub fn sse_error_event(message: &str) -> Bytes {
    let event = serde_json::json!({
        "error": {"message": message, "type": "server_error", "param": null, "code": "upstream_error"}
    });
    Bytes::from(format!("data: {event}\n\n"))
}

/// An error event to pass on after what was sent. Cut mid-event, the error must not join the
/// event's last line: a blank line ends what was sent (an SSE client then sees a broken event,
/// as it would have anyway), and the error event stands on its own.
fn framed(event: Bytes, at_boundary: bool) -> Bytes {
    if at_boundary {
        event
    } else {
        Bytes::from([&b"\n\n"[..], &event].concat())
    }
}

/// Whether `data` ends with a blank line, the end of an SSE event. A blank line split across
/// two frames is taken for none: the error event then follows an extra blank line, which SSE
/// ignores.
fn ends_an_event(data: &[u8]) -> bool {
    data.ends_with(b"\n\n") || data.ends_with(b"\r\r") || data.ends_with(b"\r\n\r\n")
}

impl<B> Body for UpstreamBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        while this.end.is_none() && this.burst.len() < BURST_MAX {
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    *this.last_frame = Instant::now();
                    match frame.into_data() {
                        Ok(data) => this.burst.push(data),
                        Err(trailers) => *this.end = Some(End::Complete(Some(trailers))),
                    }
                }
                Poll::Ready(None) => *this.end = Some(End::Complete(None)),
                Poll::Ready(Some(Err(e))) => {
                    *this.end = Some(End::Failed(UpstreamBodyError::Upstream(e.into())));
                }
                // Nothing more at hand: pass on what came.
                Poll::Pending if !this.burst.is_empty() => break,
                Poll::Pending => {
                    ready!(this.idle_timer.as_mut().poll(cx));
                    let due = *this.last_frame + *this.idle;
                    if Instant::now() >= due {
                        *this.end = Some(End::Failed(UpstreamBodyError::Idle(*this.idle)));
                    } else {
                        // Frames came since the timer was set: wait out the rest from the last one.
                        this.idle_timer.as_mut().reset(due);
                    }
                }
            }
        }
        if let Some(data) = this.burst.take() {
            if *this.is_sse {
                *this.at_boundary = ends_an_event(&data);
                this.tail.push(&data);
                if *this.needs_done && !*this.saw_error {
                    // Inside a JSON string a quote is escaped, so this is an error object.
                    *this.saw_error = memchr::memmem::find(&data, b"{\"error\"").is_some();
                }
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        // The loop ends with data gathered or with the end known, so `end` is set here.
        match this.end.replace(End::Done) {
            Some(End::Complete(trailers))
                if *this.needs_done && !*this.saw_error && !this.tail.is_done() =>
            {
                tracing::warn!("upstream stream ended without [DONE]");
                *this.needs_done = false;
                // The trailers, if any, follow the error event.
                *this.end = Some(trailers.map_or(End::Done, |t| End::Complete(Some(t))));
                let event = sse_error_event("The upstream stream ended before [DONE].");
                Poll::Ready(Some(Ok(Frame::data(framed(event, *this.at_boundary)))))
            }
            None | Some(End::Done) | Some(End::Complete(None)) => Poll::Ready(None),
            Some(End::Complete(Some(trailers))) => Poll::Ready(Some(Ok(trailers))),
            // The stream's last event has been passed on: what failed after it (the connection
            // dropped, or held open, before its last chunk) lost nothing, and an error event
            // after `[DONE]` would break the stream's framing.
            Some(End::Failed(failure))
                if *this.is_sse && *this.at_boundary && this.tail.is_done() =>
            {
                tracing::debug!(error = %failure, "upstream stream failed after [DONE]; ended cleanly");
                Poll::Ready(None)
            }
            Some(End::Failed(failure)) => {
                tracing::warn!(error = %failure, "upstream body ended early");
                if *this.is_sse {
                    let message = match failure {
                        UpstreamBodyError::Idle(d) => {
                            format!("The upstream stream stalled for {} ms.", d.as_millis())
                        }
                        UpstreamBodyError::Upstream(_) => {
                            "The upstream connection failed mid-stream.".to_string()
                        }
                    };
                    let event = sse_error_event(&message);
                    Poll::Ready(Some(Ok(Frame::data(framed(event, *this.at_boundary)))))
                } else {
                    Poll::Ready(Some(Err(failure)))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.burst.is_empty()
            && !self.owes_error_event()
            && match &self.end {
                Some(End::Done) | Some(End::Complete(None)) => true,
                Some(End::Complete(Some(_))) | Some(End::Failed(_)) => false,
                None => self.inner.is_end_stream(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        // An SSE body may gain a final error event, so its length is never known in advance
        // (the server would put back the Content-Length the upstream sent and cut that event).
        if self.is_sse || self.end.is_some() || !self.burst.is_empty() {
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    use super::*;

    const IDLE: Duration = Duration::from_secs(30);

    type TestFrame = Result<Frame<Bytes>, std::io::Error>;

    /// A body whose frames have all arrived already.
    fn at_hand(
        frames: Vec<TestFrame>,
    ) -> http_body_util::StreamBody<futures_util::stream::Iter<std::vec::IntoIter<TestFrame>>> {
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    fn data(text: &str) -> TestFrame {
        Ok(Frame::data(Bytes::copy_from_slice(text.as_bytes())))
    }

    /// Every frame the body yields, data as text and trailers as their header count.
    async fn frames<B>(body: UpstreamBody<B>) -> Vec<String>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut body = std::pin::pin!(body);
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => {
                    out.push(format!("error: {e}"));
                    break;
                }
            };
            match frame.into_data() {
                Ok(data) => out.push(String::from_utf8_lossy(&data).into_owned()),
                Err(frame) => out.push(format!(
                    "trailers: {}",
                    frame.into_trailers().map_or(0, |t| t.len())
                )),
            }
        }
        assert!(body.is_end_stream(), "the body says it has ended");
        out
    }

    #[tokio::test]
    async fn an_error_event_after_a_cut_event_stands_on_its_own() {
        let cut =
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choi";
        for (sent, expect_blank) in [
            (cut, true),
            ("data: {}\n\n", false),
            ("data: {}\r\n\r\n", false),
        ] {
            let inner = at_hand(vec![data(sent), Err(std::io::Error::other("reset"))]);
            let got = frames(UpstreamBody::new(inner, IDLE, true)).await.concat();
            let error = String::from_utf8(
                sse_error_event("The upstream connection failed mid-stream.").to_vec(),
            )
            .unwrap();
            let blank = if expect_blank { "\n\n" } else { "" };
            assert_eq!(got, format!("{sent}{blank}{error}"));
            let mut r = forge_layer::reassemble::StreamReassembler::new(1 << 20);
            r.feed(got.as_bytes());
            assert!(
                r.finish().error.is_some(),
                "no readable error event in {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_failure_after_done_ends_the_stream_cleanly() {
        // At hand together: the last event and the failure in one read.
        let sent = "data: {}\n\ndata: [DONE]\n\n";
        let inner = at_hand(vec![data(sent), Err(std::io::Error::other("reset"))]);
        let got = frames(UpstreamBody::new(inner, IDLE, true)).await;
        assert_eq!(got.concat(), sent, "nothing after [DONE]");

        // Apart in time, `[DONE]` cut in two, CRLF line ends, no space after the colon.
        let (tx, mut rx) = mpsc::channel::<TestFrame>(1);
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut body = std::pin::pin!(UpstreamBody::new(
            http_body_util::StreamBody::new(stream),
            IDLE,
            true
        ));
        for part in ["data: {}\r\n\r\ndata:[DO", "NE]\r\n\r\n"] {
            tx.send(data(part)).await.unwrap();
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), part.as_bytes());
        }
        tx.send(Err(std::io::Error::other("reset"))).await.unwrap();
        assert!(body.frame().await.is_none(), "a clean end");

        // Not the end: a text that mentions [DONE], or an event not yet ended, still gets the
        // error event.
        for sent in ["data: say [DONE]\n\n", "data: [DONE]"] {
            let inner = at_hand(vec![data(sent), Err(std::io::Error::other("reset"))]);
            let got = frames(UpstreamBody::new(inner, IDLE, true)).await.concat();
            assert!(got.contains("upstream_error"), "{sent:?}: {got:?}");
        }
    }

    #[tokio::test]
    async fn a_chat_stream_cut_before_done_ends_with_an_error_event() {
        let error =
            String::from_utf8(sse_error_event("The upstream stream ended before [DONE].").to_vec())
                .unwrap();
        let chunk = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}";
        for (sent, blank) in [
            (format!("{chunk}\n\n"), ""),
            (format!("{chunk}\r\n\r\n"), ""),
            (chunk.to_string(), "\n\n"),
        ] {
            let inner = at_hand(vec![data(&sent)]);
            let got = frames(UpstreamBody::new(inner, IDLE, true).expecting_done()).await;
            assert_eq!(got.concat(), format!("{sent}{blank}{error}"));
        }
        // Trailers still follow, after the error event.
        let inner = at_hand(vec![
            data(&format!("{chunk}\n\n")),
            Ok(Frame::trailers(HeaderMap::new())),
        ]);
        let got = frames(UpstreamBody::new(inner, IDLE, true).expecting_done()).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[1], error);
        assert_eq!(got[2], "trailers: 0");
    }

    #[tokio::test]
    async fn a_clean_end_needs_no_error_event_when_it_is_explained() {
        let with_done = "data: {}\n\ndata: [DONE]\n\n";
        let upstream_error = "data: {}\n\ndata: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        for sent in [with_done, upstream_error] {
            let inner = at_hand(vec![data(sent)]);
            let got = frames(UpstreamBody::new(inner, IDLE, true).expecting_done()).await;
            assert_eq!(got.concat(), sent);
        }
        // Other streams (the Responses API's, say) have no `[DONE]` to wait for; nor has JSON.
        for is_sse in [true, false] {
            let inner = at_hand(vec![data("data: {}\n\n")]);
            let got = frames(UpstreamBody::new(inner, IDLE, is_sse)).await;
            assert_eq!(got.concat(), "data: {}\n\n");
        }
        let inner = at_hand(vec![data("{\"a\":1}")]);
        let got = frames(UpstreamBody::new(inner, IDLE, false).expecting_done()).await;
        assert_eq!(got.concat(), "{\"a\":1}");
    }

    #[tokio::test]
    async fn frames_already_at_hand_go_out_as_one() {
        let events = ["data: a\n\n", "data: b\n\n", "data: [DONE]\n\n"];
        let inner = at_hand(events.iter().map(|e| data(e)).collect());
        let got = frames(UpstreamBody::new(inner, IDLE, true)).await;
        assert_eq!(got, vec![events.concat()]);
    }

    #[tokio::test]
    async fn frames_apart_in_time_go_out_one_by_one() {
        let (tx, mut rx) = mpsc::channel::<TestFrame>(1);
        let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let inner = http_body_util::StreamBody::new(frames);
        let mut body = std::pin::pin!(UpstreamBody::new(inner, IDLE, true));
        for event in ["data: a\n\n", "data: b\n\n"] {
            tx.send(data(event)).await.unwrap();
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), event.as_bytes());
        }
        drop(tx);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_burst_is_passed_on_at_its_cap() {
        let event = "x".repeat(1000);
        let count = BURST_MAX / event.len() * 2 + 3;
        let inner = at_hand((0..count).map(|_| data(&event)).collect());
        let got = frames(UpstreamBody::new(inner, IDLE, true)).await;
        assert!(got.len() >= 3, "{} frames", got.len());
        assert!(got.iter().all(|f| f.len() < BURST_MAX + event.len()));
        assert_eq!(got.concat(), event.repeat(count));
    }

    #[tokio::test]
    async fn trailers_follow_the_data() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "1".parse().unwrap());
        let inner = at_hand(vec![
            data("{\"a\":"),
            data("1}"),
            Ok(Frame::trailers(trailers)),
        ]);
        let got = frames(UpstreamBody::new(inner, IDLE, false)).await;
        assert_eq!(
            got,
            vec!["{\"a\":1}".to_string(), "trailers: 1".to_string()]
        );
    }

    #[tokio::test]
    async fn a_failed_stream_passes_on_what_came_then_an_error_event() {
        let inner = at_hand(vec![
            data("data: a\n\n"),
            Err(std::io::Error::other("reset")),
        ]);
        let got = frames(UpstreamBody::new(inner, IDLE, true)).await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], "data: a\n\n");
        assert!(got[1].starts_with("data: {\"error\""), "{}", got[1]);
        assert!(got[1].contains("failed mid-stream"), "{}", got[1]);
    }

    #[tokio::test]
    async fn an_sse_body_never_claims_a_length_it_may_outgrow() {
        let body = || http_body_util::Full::new(Bytes::from_static(b"data: a\n\n"));
        assert_eq!(
            UpstreamBody::new(body(), IDLE, false).size_hint().exact(),
            Some(9)
        );
        assert_eq!(
            UpstreamBody::new(body(), IDLE, true).size_hint().exact(),
            None
        );
    }

    #[tokio::test]
    async fn a_failed_json_body_passes_on_what_came_then_fails() {
        let inner = at_hand(vec![data("{\"a\":"), Err(std::io::Error::other("reset"))]);
        let got = frames(UpstreamBody::new(inner, IDLE, false)).await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], "{\"a\":");
        assert!(
            got[1].starts_with("error: upstream body failed"),
            "{}",
            got[1]
        );
    }
}
