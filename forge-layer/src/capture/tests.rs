//! The body wrapper's ends: empty, trailers, early drop, an error, and a full queue.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use forge_router::Arm;
use http::{HeaderMap, Response};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{Layer, ServiceExt};

use super::*;
use crate::redact::Redactor;
use crate::trace::Outcome;

#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<PendingTrace>>>);

impl TraceSink for Collect {
    fn submit(&self, trace: PendingTrace) -> Option<DurableAck> {
        self.0.lock().unwrap().push(trace);
        None
    }
}

impl Collect {
    fn outcomes(&self) -> Vec<Outcome> {
        self.0
            .lock()
            .unwrap()
            .drain(..)
            .map(|t| t.into_trace(&Redactor::default(), 1 << 20).outcome)
            .collect()
    }
}

fn meta(stream: bool) -> ExchangeMeta {
    ExchangeMeta {
        tenant: Some("t".into()),
        key_id: None,
        alias: "a".into(),
        upstream: "u".into(),
        model: "m".into(),
        arm: Arm::Teacher,
        route_version: 3,
        stream,
        canary: false,
    }
}

fn session() -> CaptureSession {
    let mut s = CaptureSession::new(
        crate::store::Ticket::untracked(),
        meta(false),
        Bytes::from_static(b"{\"model\":\"a\",\"messages\":[]}"),
        1 << 20,
    );
    s.on_response(200, false);
    s
}

/// A session of a streamed exchange whose response head has come.
fn stream_session() -> CaptureSession {
    let mut s = CaptureSession::new(
        crate::store::Ticket::untracked(),
        meta(true),
        Bytes::from_static(b"{\"model\":\"a\",\"stream\":true,\"messages\":[]}"),
        1 << 20,
    );
    s.on_response(200, true);
    s
}

type Frames = Vec<Result<Frame<Bytes>, std::io::Error>>;
type Streamed = StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
>;

fn streamed(frames: Frames) -> Streamed {
    StreamBody::new(futures_util::stream::iter(frames))
}

const OK_BODY: &[u8] = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;

#[tokio::test]
async fn empty_body_is_finished_without_being_polled() {
    let sink = Collect::default();
    let body = CaptureBody::new(Full::new(Bytes::new()), session(), sink.clone());
    assert!(body.is_end_stream());
    assert_eq!(sink.0.lock().unwrap().len(), 1, "finished at construction");
    drop(body);
    // An empty 200 is not a chat completion: it parses to nothing, and Drop adds no second trace.
    assert_eq!(sink.outcomes().len(), 1);
}

#[tokio::test]
async fn full_body_is_completed_once() {
    let sink = Collect::default();
    let body = CaptureBody::new(
        Full::new(Bytes::from_static(OK_BODY)),
        session(),
        sink.clone(),
    );
    let bytes = body.collect().await.unwrap().to_bytes();
    assert_eq!(
        bytes.as_ref(),
        OK_BODY,
        "the client gets the bytes untouched"
    );
    assert_eq!(sink.outcomes(), vec![Outcome::Completed]);
}

#[tokio::test]
async fn trailers_finish_the_trace() {
    let sink = Collect::default();
    let frames: Frames = vec![
        Ok(Frame::data(Bytes::from_static(OK_BODY))),
        Ok(Frame::trailers(HeaderMap::new())),
    ];
    let collected = CaptureBody::new(streamed(frames), session(), sink.clone())
        .collect()
        .await
        .unwrap();
    assert!(collected.trailers().is_some());
    assert_eq!(sink.outcomes(), vec![Outcome::Completed]);
}

#[tokio::test]
async fn early_drop_is_cancelled() {
    let sink = Collect::default();
    let frames: Frames = vec![
        Ok(Frame::data(Bytes::from_static(b"{\"choi"))),
        Ok(Frame::data(Bytes::from_static(b"ces\":[]}"))),
    ];
    let mut body = CaptureBody::new(streamed(frames), session(), sink.clone());
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap().as_ref(), b"{\"choi");
    assert!(
        sink.0.lock().unwrap().is_empty(),
        "nothing finished mid-body"
    );
    drop(body);
    assert_eq!(sink.outcomes(), vec![Outcome::Cancelled]);
}

#[tokio::test]
async fn body_error_is_errored_and_passed_on() {
    let sink = Collect::default();
    let frames: Frames = vec![
        Ok(Frame::data(Bytes::from_static(b"{"))),
        Err(std::io::Error::other("reset")),
    ];
    let err = CaptureBody::new(streamed(frames), session(), sink.clone())
        .collect()
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "reset");
    assert_eq!(sink.outcomes(), vec![Outcome::Errored]);
}

#[tokio::test]
async fn layer_adds_the_trace_id_and_skips_requests_without_meta() {
    let sink = Collect::default();
    let upstream = tower::service_fn(|_req: http::Request<Bytes>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(OK_BODY))))
    });
    let service = CaptureLayer::new(sink.clone(), 1 << 20).layer(upstream);

    let plain = service
        .clone()
        .oneshot(http::Request::new(Bytes::new()))
        .await
        .unwrap();
    assert!(!plain.headers().contains_key(TRACE_ID_HEADER));
    plain.into_body().collect().await.unwrap();
    assert!(sink.0.lock().unwrap().is_empty());

    let mut request = http::Request::new(Bytes::from_static(b"{}"));
    request.extensions_mut().insert(meta(false));
    let response = service.oneshot(request).await.unwrap();
    let id = response.headers()[TRACE_ID_HEADER]
        .to_str()
        .unwrap()
        .to_string();
    response.into_body().collect().await.unwrap();
    let traces = sink.0.lock().unwrap().drain(..).collect::<Vec<_>>();
    assert_eq!(traces.len(), 1);
    assert_eq!(traces[0].id().to_string(), id);
}

#[tokio::test]
async fn capture_cap_truncates_the_trace_not_the_response() {
    let sink = Collect::default();
    let mut s = CaptureSession::new(
        crate::store::Ticket::untracked(),
        meta(false),
        Bytes::from_static(b"{}"),
        10,
    );
    s.on_response(200, false);
    let bytes = CaptureBody::new(Full::new(Bytes::from_static(OK_BODY)), s, sink.clone())
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(bytes.as_ref(), OK_BODY);
    assert_eq!(sink.outcomes(), vec![Outcome::Truncated]);
}

#[tokio::test]
async fn full_queue_drops_and_counts_while_the_body_flows() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open_dir(dir.path()).unwrap();
    // Hold redb's write lock so the writer stalls and its queue (capacity 1) fills.
    let stall = store.hold_write_lock().unwrap();
    let config = crate::store::WriterConfig {
        queue_capacity: 1,
        batch_max: 1,
        ..Default::default()
    };
    let (writer, task) = crate::store::TraceWriter::start(store.clone(), config);
    for _ in 0..20 {
        let body = CaptureBody::new(
            Full::new(Bytes::from_static(OK_BODY)),
            session(),
            writer.clone(),
        );
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(
            bytes.as_ref(),
            OK_BODY,
            "the client is served whatever the queue does"
        );
    }
    let during = writer.counters();
    assert_eq!(during.eligible, 20);
    // At most the queue (1), a batch being encoded and a batch committing hold traces.
    assert!(during.dropped >= 17, "at most three traces fit: {during:?}");
    let counters = writer.counters_handle();
    drop(stall);
    drop(writer);
    task.join().await;
    let done = counters.snapshot();
    assert_eq!(done.captured + done.dropped + done.failed, done.eligible);
    assert_eq!((done.pending, done.failed), (0, 0));
    assert_eq!(
        store.trace_count().unwrap(),
        done.captured,
        "every trace not dropped was written"
    );
}

/// A sink whose commits are acknowledged by hand, like a slow durable writer.
#[derive(Clone, Default)]
struct ManualCommit(Arc<Mutex<Vec<tokio::sync::oneshot::Sender<bool>>>>);

impl TraceSink for ManualCommit {
    fn submit(&self, _trace: PendingTrace) -> Option<DurableAck> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.lock().unwrap().push(tx);
        Some(Box::pin(async move { rx.await.unwrap_or(false) }))
    }
}

#[tokio::test]
async fn durable_end_holds_the_last_bytes_until_the_commit() {
    // Regression: with a Content-Length body the client had the whole response (and could
    // count it as delivered) before the commit, because the last frame went out first.
    let sink = ManualCommit::default();
    let frames: Frames = vec![
        Ok(Frame::data(Bytes::from_static(b"{\"a\":"))),
        Ok(Frame::data(Bytes::from_static(b"1}"))),
    ];
    let body = http_body_util::combinators::BoxBody::new(streamed(frames));
    // A body that knows its length, as one with Content-Length does.
    struct Sized<B>(B);
    impl<B: http_body::Body + Unpin> http_body::Body for Sized<B> {
        type Data = B::Data;
        type Error = B::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<B::Data>, B::Error>>> {
            std::pin::Pin::new(&mut self.0).poll_frame(cx)
        }
        fn size_hint(&self) -> http_body::SizeHint {
            http_body::SizeHint::with_exact(7)
        }
    }
    let mut body = CaptureBody::new(Sized(body), session(), sink.clone());
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap().as_ref(), b"{\"a\":");
    let mut next = Box::pin(body.frame());
    let held = futures_util::poll!(next.as_mut());
    assert!(held.is_pending(), "the last frame waits for the commit");
    let ack = sink
        .0
        .lock()
        .unwrap()
        .pop()
        .expect("trace submitted at the last frame");
    ack.send(true).unwrap();
    let last = next.await.unwrap().unwrap();
    assert_eq!(last.into_data().unwrap().as_ref(), b"1}");
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn durable_end_is_cut_short_when_its_commit_fails() {
    // A whole response promises a stored trace: when the commit fails, the client must not get
    // the last bytes (and take the exchange for done), but a broken body.
    let sink = ManualCommit::default();
    let frames: Frames = vec![
        Ok(Frame::data(Bytes::from_static(b"{\"a\":"))),
        Ok(Frame::data(Bytes::from_static(b"1}"))),
    ];
    let mut body = CaptureBody::new(streamed(frames), session(), sink.clone());
    for _ in 0..2 {
        body.frame().await.unwrap().unwrap();
    }
    // Without a known length the end is the body's own: a chunked response's last chunk.
    let mut next = Box::pin(body.frame());
    assert!(futures_util::poll!(next.as_mut()).is_pending());
    let ack = sink.0.lock().unwrap().pop().expect("submitted at the end");
    ack.send(false).unwrap();
    let error = next.await.unwrap().expect_err("the end is not sent");
    assert!(error.is::<NotStored>(), "{error}");
}

/// A durable sink whose commits have failed already (its writer stopped, say).
#[derive(Clone, Default)]
struct Refusing;

impl TraceSink for Refusing {
    fn submit(&self, _trace: PendingTrace) -> Option<DurableAck> {
        Some(Box::pin(std::future::ready(false)))
    }
}

#[tokio::test]
async fn durable_end_is_cut_short_when_its_commit_failed_at_once() {
    for shape in ["sized", "chunked"] {
        let frames: Frames = vec![
            Ok(Frame::data(Bytes::from_static(b"{\"a\":"))),
            Ok(Frame::data(Bytes::from_static(b"1}"))),
        ];
        let inner = if shape == "sized" {
            http_body_util::combinators::UnsyncBoxBody::new(
                Full::new(Bytes::from_static(b"{\"a\":1}")).map_err(
                    |never: std::convert::Infallible| -> std::io::Error { match never {} },
                ),
            )
        } else {
            http_body_util::combinators::UnsyncBoxBody::new(streamed(frames))
        };
        let error = CaptureBody::new(inner, session(), Refusing)
            .collect()
            .await
            .expect_err(shape);
        assert!(error.is::<NotStored>(), "{shape}: {error}");
    }
}

#[tokio::test]
async fn a_request_dropped_before_the_response_head_is_one_cancelled_trace() {
    // The client left (or shutdown cut it off) while the upstream had not answered yet.
    let sink = Collect::default();
    let upstream = tower::service_fn(|_req: http::Request<Bytes>| {
        std::future::pending::<Result<Response<Full<Bytes>>, std::convert::Infallible>>()
    });
    let service = CaptureLayer::new(sink.clone(), 1 << 20).layer(upstream);
    let mut request = http::Request::new(Bytes::from_static(b"{}"));
    request.extensions_mut().insert(meta(false));
    let mut waiting = Box::pin(service.oneshot(request));
    assert!(futures_util::poll!(waiting.as_mut()).is_pending());
    assert!(sink.0.lock().unwrap().is_empty());
    drop(waiting);
    let traces = sink.0.lock().unwrap().drain(..).collect::<Vec<_>>();
    assert_eq!(traces.len(), 1, "one trace, submitted once");
    assert_eq!(traces[0].status(), 0, "no response head came");
    let trace = traces
        .into_iter()
        .next()
        .unwrap()
        .into_trace(&Redactor::default(), 1 << 20);
    assert_eq!(trace.outcome, Outcome::Cancelled);
}

#[tokio::test]
async fn durable_empty_response_is_held_until_its_commit() {
    // Regression: a response with an empty body (a 429 with Content-Length: 0) is written by the
    // server without polling its body, so the body cannot hold it back; the head must wait.
    let sink = ManualCommit::default();
    let upstream = tower::service_fn(|_req: http::Request<Bytes>| async {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
        Ok::<_, std::convert::Infallible>(response)
    });
    let service = CaptureLayer::new(sink.clone(), 1 << 20).layer(upstream);
    let mut request = http::Request::new(Bytes::from_static(b"{}"));
    request.extensions_mut().insert(meta(false));
    let mut responding = Box::pin(service.oneshot(request));
    assert!(
        futures_util::poll!(responding.as_mut()).is_pending(),
        "the head waits for the commit"
    );
    let ack = sink.0.lock().unwrap().pop().expect("trace submitted");
    ack.send(true).unwrap();
    let response = responding.await.unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.body().is_end_stream());
    assert!(sink.0.lock().unwrap().is_empty(), "submitted once");
}

/// A stream whose upstream has sent its last event, `[DONE]`, and holds the body open: its end
/// (the chunked terminator) has not come yet.
fn done_then_held_open() -> (
    CaptureSession,
    impl http_body::Body<Data = Bytes, Error = std::io::Error> + Unpin,
) {
    let frames: Frames = vec![
        Ok(Frame::data(Bytes::from_static(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\n",
        ))),
        Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))),
    ];
    let open = futures_util::StreamExt::chain(
        futures_util::stream::iter(frames),
        futures_util::stream::pending(),
    );
    (stream_session(), StreamBody::new(open))
}

#[tokio::test]
async fn durable_done_waits_for_the_commit_even_before_the_body_ends() {
    // The SDKs take `[DONE]` for the end of the response: it must not reach the client before
    // the commit that holds the trace, however long the body's own end takes.
    let sink = ManualCommit::default();
    let (session, inner) = done_then_held_open();
    let mut body = CaptureBody::new(inner, session, sink.clone());
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.into_data().unwrap().starts_with(b"data: {"));
    let mut next = Box::pin(body.frame());
    assert!(
        futures_util::poll!(next.as_mut()).is_pending(),
        "[DONE] waits for the commit"
    );
    let ack = sink.0.lock().unwrap().pop().expect("submitted at [DONE]");
    ack.send(true).unwrap();
    let done = next.await.unwrap().unwrap();
    assert_eq!(done.into_data().unwrap().as_ref(), b"data: [DONE]\n\n");
}

#[tokio::test]
async fn a_client_that_leaves_at_done_has_a_completed_trace() {
    let sink = Collect::default();
    let (session, inner) = done_then_held_open();
    let mut body = CaptureBody::new(inner, session, sink.clone());
    for _ in 0..2 {
        body.frame().await.unwrap().unwrap();
    }
    // As the SDKs do: closed at `[DONE]`, before the body's end.
    drop(body);
    assert_eq!(sink.outcomes(), [Outcome::Completed]);
}

#[tokio::test]
async fn done_is_found_however_the_stream_is_cut_into_frames() {
    let event = |content: &str| {
        format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let first = event("The stream ends with ");
    let quoted = event("data: [DONE]");
    // `[DONE]` cut across two frames; and the text `data: [DONE]` inside an event, cut where
    // an event could begin: only the first is the end.
    let (at, end) = (
        quoted.find("data: [DONE]").unwrap(),
        quoted.find("]\"").unwrap() + 1,
    );
    let cases: [(Vec<String>, &str); 2] = [
        (
            vec![first.clone(), "data: [DO".into(), "NE]\n\n".into()],
            "The stream ends with ",
        ),
        (
            vec![
                first.clone(),
                quoted[..at].into(),
                quoted[at..end].into(),
                quoted[end..].into(),
                "data: [DONE]\n\n".into(),
            ],
            "The stream ends with data: [DONE]",
        ),
    ];
    for (chunks, content) in cases {
        let sink = Collect::default();
        let frames: Frames = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from(c.clone()))))
            .collect();
        // The upstream holds the body open after `[DONE]`; the client, as the SDKs do, reads up
        // to `[DONE]` and leaves.
        let open = futures_util::StreamExt::chain(
            futures_util::stream::iter(frames),
            futures_util::stream::pending(),
        );
        let mut body = CaptureBody::new(StreamBody::new(open), stream_session(), sink.clone());
        for _ in &chunks {
            body.frame().await.unwrap().unwrap();
        }
        drop(body);
        let traces: Vec<_> = sink
            .0
            .lock()
            .unwrap()
            .drain(..)
            .map(|t| t.into_trace(&Redactor::default(), 1 << 20))
            .collect();
        assert_eq!(traces.len(), 1, "{chunks:?}");
        assert_eq!(traces[0].outcome, Outcome::Completed, "{chunks:?}");
        let message = &traces[0].response.choices[0].message;
        assert_eq!(message.content.as_deref(), Some(content), "{chunks:?}");
    }
}

#[tokio::test]
async fn done_apart_from_its_blank_line_is_a_completed_stream() {
    // The trace is finished at `[DONE]`; its line end comes in the next frame, or never.
    for tail in [&b"\n\n"[..], b""] {
        let sink = Collect::default();
        let mut frames: Frames = vec![Ok(Frame::data(Bytes::from_static(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]",
        )))];
        if !tail.is_empty() {
            frames.push(Ok(Frame::data(Bytes::from_static(tail))));
        }
        let bytes = CaptureBody::new(streamed(frames), stream_session(), sink.clone())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert!(bytes.ends_with(tail), "the client got every byte");
        assert_eq!(sink.outcomes(), [Outcome::Completed]);
    }
}
