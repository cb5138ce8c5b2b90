//! Capture end to end: real gateway, real redb file, simulated upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use forge_gateway::sim::{ModelBehavior, SimConfig};
use forge_layer::trace::{Outcome, TraceId};
use forge_tests::{
    behaviors, chat_body, client, clients_toml, config_text, eventually, sse_events, start_gateway,
    start_gateway_with, start_sim, trickle,
};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// What the client received, parsed here independently of the gateway's reassembler. Per choice
/// index: content, calls as (name, arguments), finish reason. A deprecated `function_call` is
/// a call named `legacy:<name>`.
type ChoiceView = (Option<String>, Vec<(String, String)>, Option<String>);

fn client_view(body: &str, stream: bool) -> BTreeMap<u64, ChoiceView> {
    let mut out: BTreeMap<u64, ChoiceView> = BTreeMap::new();
    if !stream {
        let v: Value = serde_json::from_str(body).unwrap();
        for c in v["choices"].as_array().unwrap() {
            let calls = c["message"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    (
                        t["function"]["name"].as_str().unwrap().to_string(),
                        t["function"]["arguments"].as_str().unwrap().to_string(),
                    )
                })
                .chain(c["message"]["function_call"].as_object().map(|f| {
                    (
                        format!("legacy:{}", f["name"].as_str().unwrap()),
                        f["arguments"].as_str().unwrap().to_string(),
                    )
                }))
                .collect();
            out.insert(
                c["index"].as_u64().unwrap(),
                (
                    c["message"]["content"].as_str().map(str::to_string),
                    calls,
                    c["finish_reason"].as_str().map(str::to_string),
                ),
            );
        }
        return out;
    }
    for event in sse_events(body).into_iter().filter(|e| e != "[DONE]") {
        let chunk: Value = serde_json::from_str(&event).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            let entry = out.entry(c["index"].as_u64().unwrap()).or_default();
            if let Some(text) = c["delta"]["content"].as_str() {
                entry.0.get_or_insert_with(String::new).push_str(text);
            }
            for frag in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                let i = frag["index"].as_u64().unwrap() as usize;
                if entry.1.len() <= i {
                    entry.1.push((
                        frag["function"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        String::new(),
                    ));
                }
                entry.1[i]
                    .1
                    .push_str(frag["function"]["arguments"].as_str().unwrap_or_default());
            }
            if let Some(f) = c["delta"]["function_call"].as_object() {
                if let Some(name) = f.get("name").and_then(Value::as_str) {
                    entry.1.push((format!("legacy:{name}"), String::new()));
                }
                let args = f.get("arguments").and_then(Value::as_str);
                entry
                    .1
                    .last_mut()
                    .unwrap()
                    .1
                    .push_str(args.unwrap_or_default());
            }
            if let Some(r) = c["finish_reason"].as_str() {
                entry.2 = Some(r.to_string());
            }
        }
    }
    out
}

/// The model the answer names and its usage object: the JSON body's, or a stream's first
/// chunk's model and its usage chunk's usage.
fn answered_model_and_usage(body: &str, stream: bool) -> (String, Option<Value>) {
    let (first, usage) = if stream {
        let chunks: Vec<Value> = sse_events(body)
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let usage = chunks
            .iter()
            .find_map(|c| c.get("usage").filter(|u| !u.is_null()).cloned());
        (chunks[0].clone(), usage)
    } else {
        let answer: Value = serde_json::from_str(body).unwrap();
        let usage = answer.get("usage").cloned();
        (answer, usage)
    };
    (first["model"].as_str().unwrap().to_owned(), usage)
}

#[tokio::test]
async fn every_exchange_becomes_one_trace_equal_to_what_the_client_got() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway(&config_text(&sim.base_url(), "", &[("gpt-4o", "gpt-4o")])).await;
    let http = client();
    let tools = json!([{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}},
                       {"type": "function", "function": {"name": "fetch", "parameters": {"type": "object"}}}]);
    let mut seen = Vec::new();
    for i in 0..12 {
        let stream = i % 2 == 0;
        let mut body = chat_body("gpt-4o", &format!("question number {i} about Rust"), stream);
        if i % 3 == 0 {
            body["tools"] = tools.clone();
        }
        // Older apps still call functions through the deprecated `functions` API.
        if i % 3 == 1 {
            body["functions"] = json!([{"name": "lookup", "parameters": {"type": "object"}}]);
        }
        if i % 4 == 1 {
            body["n"] = json!(2);
        }
        // Streams carry `obfuscation` padding unless the client turns it off.
        if stream {
            body["stream_options"] =
                json!({"include_usage": i % 4 == 0, "include_obfuscation": i % 8 == 0});
        }
        let resp = http
            .post(format!("{}/chat/completions", gw.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let id: TraceId = trace_id_of(&resp);
        seen.push((id, stream, resp.text().await.unwrap()));
    }
    eventually("all 12 traces committed", || {
        gw.capture_counters().unwrap().captured == 12
    })
    .await;
    let store = gw.store().unwrap();
    assert_eq!(store.trace_count().unwrap(), 12);
    let mut legacy_calls = 0;
    for (id, stream, body) in &seen {
        let trace = store
            .trace(*id)
            .unwrap()
            .expect("trace stored under the header's id");
        assert_eq!(trace.outcome, Outcome::Completed);
        assert_eq!(
            (trace.stream, trace.status, trace.alias.as_str()),
            (*stream, 200, "gpt-4o")
        );
        let stored: BTreeMap<_, _> = trace
            .response
            .choices
            .iter()
            .map(|c| {
                let calls = c
                    .message
                    .tool_calls
                    .iter()
                    .map(|t| (t.function.name.clone(), t.function.arguments.clone()))
                    .chain(
                        c.message
                            .function_call
                            .as_ref()
                            .map(|f| (format!("legacy:{}", f.name), f.arguments.clone())),
                    )
                    .collect();
                (
                    u64::from(c.index),
                    (c.message.content.clone(), calls, c.finish_reason.clone()),
                )
            })
            .collect();
        assert_eq!(stored, client_view(body, *stream), "trace {id}");
        // OpenAI answers an alias with the snapshot it resolved to: the trace keeps both.
        let (answered, usage) = answered_model_and_usage(body, *stream);
        assert_eq!(trace.model, "gpt-4o", "the model Forge asked for");
        assert_eq!(trace.response.model.as_deref(), Some(answered.as_str()));
        assert_eq!(trace.response.model.as_deref(), Some("gpt-4o-2024-08-06"));
        // The usage object as it came, token details included.
        let stored_usage = trace.response.usage.as_ref().map(|u| {
            serde_json::from_str::<Value>(serde_json::to_string(u).unwrap().as_str()).unwrap()
        });
        assert_eq!(stored_usage, usage, "trace {id}");
        assert!(trace.ttfb_us <= trace.latency_us);
        legacy_calls += trace
            .response
            .choices
            .iter()
            .filter(|c| c.finish_reason.as_deref() == Some("function_call"))
            .count();
    }
    // Requests 1 (two choices), 4, 7 and 10 called a function the old way, streamed and not.
    assert_eq!(legacy_calls, 5);
    let c = gw.capture_counters().unwrap();
    assert_eq!(
        (c.eligible, c.captured, c.dropped, c.failed),
        (12, 12, 0, 0)
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_lose_no_trace() {
    // 100 tokens 10 ms apart: every stream is open while the others start.
    let trickle = trickle(Duration::from_millis(10), 100);
    let sim = start_sim(behaviors(&[("trickle", trickle)])).await;
    let gw = start_gateway(&config_text(&sim.base_url(), "", &[("t", "trickle")])).await;
    let http = client();
    let streams: Vec<_> = (0..200)
        .map(|i| {
            let (http, url) = (http.clone(), format!("{}/chat/completions", gw.base_url()));
            tokio::spawn(async move {
                let resp = http
                    .post(url)
                    .json(&chat_body("t", &format!("stream {i}"), true))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200, "stream {i}");
                let id = trace_id_of(&resp);
                let body = resp.text().await.unwrap();
                assert!(body.ends_with("data: [DONE]\n\n"), "stream {i} cut");
                id
            })
        })
        .collect();
    let mut ids = Vec::new();
    for stream in streams {
        ids.push(stream.await.unwrap());
    }
    let c = gw.settled_capture_counters().await;
    assert_eq!(
        (c.eligible, c.captured, c.dropped, c.failed),
        (200, 200, 0, 0)
    );
    let store = gw.store().unwrap();
    for id in ids {
        let trace = store.trace(id).unwrap().expect("stored");
        assert_eq!(trace.outcome, Outcome::Completed);
        let content = trace.response.choices[0].message.content.as_deref();
        assert_eq!(
            content.map(|c| c.split_whitespace().count()),
            Some(100),
            "{id}: the whole answer, reassembled"
        );
    }
    assert_eq!(store.trace_count().unwrap(), 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_stalled_store_never_fails_a_request_and_every_drop_is_counted() {
    let sim = start_sim(SimConfig::default()).await;
    let text = config_text(&sim.base_url(), "", &[("m", "gpt-4o")]);
    let gw = start_gateway_with(&text, |c| {
        let capture = c.capture.as_mut().unwrap();
        capture.writer.queue_capacity = 2;
        capture.writer.batch_max = 1;
    })
    .await;
    let stall = gw.store().unwrap().hold_write_lock().unwrap();
    let http = client();
    let url = format!("{}/chat/completions", gw.base_url());
    let requests = (0..40).map(|i| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let resp = http
                .post(&url)
                .json(&chat_body("m", &format!("q{i}"), i % 2 == 0))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let body = resp.text().await.unwrap();
            assert!(body.contains("choices"), "a whole answer: {body}");
            status
        }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "100% success while the store is stalled: {statuses:?}"
    );
    let during = gw.capture_counters().unwrap();
    assert_eq!(during.eligible, 40);
    assert!(
        during.dropped > 0,
        "the full queue dropped traces: {during:?}"
    );
    drop(stall);
    let after = gw.settled_capture_counters().await;
    assert_eq!(
        after.captured + after.dropped + after.failed,
        after.eligible,
        "{after:?}"
    );
    assert_eq!(
        after.dropped, during.dropped,
        "nothing was dropped after the stall ended"
    );
    assert_eq!(gw.store().unwrap().trace_count().unwrap(), after.captured);

    let metrics = metrics_text(&gw).await;
    assert!(
        metrics.contains(&format!("forge_capture_dropped_total {}", after.dropped)),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("forge_capture_eligible_total {}", after.eligible)));
    // One trace per commit (batch_max 1): the commit histogram counts each commit once, the
    // first of them the one that waited out the stall.
    for line in [
        format!("forge_capture_commit_seconds_count {}\n", after.captured),
        format!(
            "forge_capture_commit_seconds_bucket{{le=\"+Inf\"}} {}\n",
            after.captured
        ),
    ] {
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn large_exchanges_behind_a_stalled_store_fill_the_byte_budget_not_memory() {
    const BUDGET: usize = 1024 * 1024;
    let sim = start_sim(SimConfig::default()).await;
    let text = config_text(&sim.base_url(), "", &[("m", "gpt-4o")]);
    let gw = start_gateway_with(&text, |c| {
        c.capture.as_mut().unwrap().writer.queue_bytes = BUDGET;
    })
    .await;
    let stall = gw.store().unwrap().hold_write_lock().unwrap();
    let http = client();
    // Long-context prompts of 200 KB: the default queue holds thousands of traces, but the
    // budget only about five of these.
    let filler = "lorem ipsum ".repeat(200 * 1024 / 12);
    for i in 0..12 {
        let resp = http
            .post(format!("{}/chat/completions", gw.base_url()))
            .json(&chat_body("m", &format!("q{i} {filler}"), i % 2 == 0))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.unwrap().contains("choices"));
    }
    let during = gw.capture_counters().unwrap();
    assert_eq!((during.eligible, during.captured), (12, 0), "{during:?}");
    assert!(
        during.dropped >= 7 && during.pending >= 1,
        "the budget, not the queue's length, turned traces away: {during:?}"
    );
    assert!(
        during.queued_bytes <= BUDGET as u64 && during.queued_bytes >= 200 * 1024 * during.pending,
        "{during:?}"
    );
    let metrics = metrics_text(&gw).await;
    assert!(
        metrics.contains(&format!(
            "forge_capture_queued_bytes {}",
            during.queued_bytes
        )),
        "{metrics}"
    );

    drop(stall);
    let after = gw.settled_capture_counters().await;
    assert_eq!(
        after.queued_bytes, 0,
        "committed traces give their bytes back"
    );
    assert_eq!(after.dropped, during.dropped);
    assert_eq!(after.captured + after.dropped, after.eligible, "{after:?}");
    assert_eq!(gw.store().unwrap().trace_count().unwrap(), after.captured);
    gw.shutdown().await;
}

/// The trace id a response carries.
fn trace_id_of(resp: &reqwest::Response) -> TraceId {
    resp.headers()["x-forge-trace-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Sends one chat request, reads the whole response, and returns its trace id.
async fn exchange(http: &reqwest::Client, gw: &forge_tests::TestGateway, body: &Value) -> TraceId {
    let resp = http
        .post(format!("{}/chat/completions", gw.base_url()))
        .json(body)
        .send()
        .await
        .unwrap();
    let id = trace_id_of(&resp);
    resp.text().await.unwrap();
    id
}

/// Starts a stream on `alias` and waits for its first chunk; returns its trace id and the
/// rest of the body.
async fn streaming(
    gw: &forge_tests::TestGateway,
    alias: &str,
) -> (
    TraceId,
    impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>>,
) {
    let resp = client()
        .post(format!("{}/chat/completions", gw.base_url()))
        .json(&chat_body(alias, "a long answer please", true))
        .send()
        .await
        .unwrap();
    let id = trace_id_of(&resp);
    let mut body = Box::pin(resp.bytes_stream());
    body.next().await.unwrap().unwrap();
    (id, body)
}

/// A simulated upstream whose `trickle` model streams `words` words, one every 50 ms.
async fn trickle_sim(words: usize) -> forge_gateway::sim::SimHandle {
    start_sim(behaviors(&[(
        "trickle",
        trickle(Duration::from_millis(50), words),
    )]))
    .await
}

/// The trace ids a cursor scan (the judge's, a dataset's) sees now, in order.
fn cursor_scan(gw: &forge_tests::TestGateway) -> Vec<TraceId> {
    let mut ids = Vec::new();
    gw.store()
        .unwrap()
        .for_each_graded_trace(None, |t, _, _| {
            ids.push(t.id);
            true
        })
        .unwrap();
    ids
}

#[tokio::test]
async fn cursor_scans_never_pass_a_stream_still_in_flight() {
    // 600 words at 50 ms a word: half a minute, far longer than the test needs.
    let sim = trickle_sim(600).await;
    let routes = [("long", "trickle"), ("short", "fast")];
    let gw = start_gateway(&config_text(&sim.base_url(), "", &routes)).await;
    let http = client();
    let (long, long_body) = streaming(&gw, "long").await;

    // Short exchanges start after the stream and end before it: their ids are newer, their
    // traces land first.
    let mut ids = vec![long];
    for i in 0..3 {
        let body = chat_body("short", &format!("short question {i}"), false);
        ids.push(exchange(&http, &gw, &body).await);
    }
    eventually("the short traces are committed", || {
        gw.capture_counters().unwrap().captured == 3
    })
    .await;
    assert!(
        gw.store().unwrap().trace(long).unwrap().is_none(),
        "the stream still runs"
    );
    // Operators see what holds the scans back.
    assert!(oldest_unsettled_seconds(&gw).await > 0.0);
    // A scan that keeps the last id it saw as its cursor would pass the stream's id for good.
    assert_eq!(
        cursor_scan(&gw),
        vec![],
        "the scan stops below the stream in flight"
    );

    drop(long_body);
    eventually("the stream's trace is committed", || {
        gw.capture_counters().unwrap().captured == 4
    })
    .await;
    assert_eq!(cursor_scan(&gw), ids, "every trace, oldest id first");
    assert_eq!(oldest_unsettled_seconds(&gw).await, 0.0);
    gw.shutdown().await;
}

/// The gateway's `/metrics` page.
async fn metrics_text(gw: &forge_tests::TestGateway) -> String {
    client()
        .get(format!("http://{}/metrics", gw.addr()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits until the gateway's `/metrics` page has `line`.
async fn metric_eventually(gw: &forge_tests::TestGateway, line: &str) {
    let start = tokio::time::Instant::now();
    loop {
        let metrics = metrics_text(gw).await;
        if metrics.lines().any(|l| l == line) {
            return;
        }
        assert!(
            start.elapsed() < forge_tests::DEADLINE,
            "no `{line}` in {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `forge_capture_oldest_unsettled_seconds` gauge.
async fn oldest_unsettled_seconds(gw: &forge_tests::TestGateway) -> f64 {
    let metrics = metrics_text(gw).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("forge_capture_oldest_unsettled_seconds "))
        .unwrap_or_else(|| panic!("no gauge in {metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_recorded_as_cancelled() {
    let sim = trickle_sim(40).await;
    let gw = start_gateway(&config_text(&sim.base_url(), "", &[("t", "trickle")])).await;
    let (id, body) = streaming(&gw, "t").await;
    drop(body);
    eventually("the cancelled trace is committed", || {
        gw.capture_counters().unwrap().captured == 1
    })
    .await;
    assert_eq!(
        gw.store().unwrap().trace(id).unwrap().unwrap().outcome,
        Outcome::Cancelled
    );
    gw.shutdown().await;
}

/// An upstream whose streams end cleanly but early: chat completions without `[DONE]`, and a
/// Responses stream, which has no `[DONE]` at all.
async fn stream_cutting_upstream() -> String {
    const CHAT: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Half an\"},\"finish_reason\":null}]}\n\n";
    const RESPONSES: &str =
        "event: response.completed\ndata: {\"type\":\"response.completed\"}\n\n";
    let sse = |body: &'static str| ([(http::header::CONTENT_TYPE, "text/event-stream")], body);
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(move || async move { sse(CHAT) }),
        )
        .route(
            "/v1/responses",
            axum::routing::post(move || async move { sse(RESPONSES) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

#[tokio::test]
async fn a_chat_stream_cut_before_done_is_reported_and_recorded_as_errored() {
    let upstream = stream_cutting_upstream().await;
    let gw = start_gateway(&config_text(&upstream, "", &[("a", "m")])).await;
    let http = client();
    let resp = http
        .post(format!("{}/chat/completions", gw.base_url()))
        .json(&chat_body("a", "x", true))
        .send()
        .await
        .unwrap();
    let id = trace_id_of(&resp);
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.len(), 2, "{events:?}");
    let error: Value = serde_json::from_str(&events[1]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_error", "{error}");
    // A stream other than chat completions passes as it came.
    let responses = http
        .post(format!("{}/responses", gw.base_url()))
        .json(&json!({"model": "m", "input": "x", "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        responses,
        "event: response.completed\ndata: {\"type\":\"response.completed\"}\n\n"
    );
    eventually("the trace is committed", || {
        gw.capture_counters().unwrap().captured == 1
    })
    .await;
    let trace = gw.store().unwrap().trace(id).unwrap().unwrap();
    assert_eq!((trace.outcome, trace.status), (Outcome::Errored, 200));
    assert_eq!(
        trace.response.choices[0].message.content.as_deref(),
        Some("Half an"),
        "the part that came is kept"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_errors_are_captured_as_errored() {
    let failing = ModelBehavior {
        fail_status: Some(500),
        ..ModelBehavior::default()
    };
    let breaks = ModelBehavior {
        error_after_chunks: Some(3),
        ..ModelBehavior::default()
    };
    let sim = start_sim(SimConfig {
        models: [
            ("failing".to_string(), failing),
            ("breaks".to_string(), breaks),
        ]
        .into(),
        ..SimConfig::default()
    })
    .await;
    let gw = start_gateway(&config_text(
        &sim.base_url(),
        "",
        &[("f", "failing"), ("b", "breaks")],
    ))
    .await;
    let http = client();
    let mut ids = Vec::new();
    for (model, stream) in [("f", false), ("b", true)] {
        ids.push(exchange(&http, &gw, &chat_body(model, "x", stream)).await);
    }
    eventually("both traces committed", || {
        gw.capture_counters().unwrap().captured == 2
    })
    .await;
    let store = gw.store().unwrap();
    let failed = store.trace(ids[0]).unwrap().unwrap();
    assert_eq!((failed.outcome, failed.status), (Outcome::Errored, 500));
    assert!(failed.response.error.is_some());
    let broken = store.trace(ids[1]).unwrap().unwrap();
    assert_eq!((broken.outcome, broken.status), (Outcome::Errored, 200));
    assert!(
        broken.response.choices[0].message.content.is_some(),
        "the part before the error is kept"
    );
    gw.shutdown().await;
}

/// Feedback that waits for a trace still on its way holds no blocking thread while it waits:
/// on a runtime with four, eight feedbacks waiting for a long stream's trace leave room for
/// another exchange's feedback, which is recorded while they still wait.
#[test]
fn feedback_waiting_for_a_trace_holds_no_blocking_thread() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // 2,400 words 50 ms apart: the stream runs until the test drops it.
        let sim = trickle_sim(2400).await;
        let routes = [("long", "trickle"), ("short", "fast")];
        let gw = start_gateway(&config_text(&sim.base_url(), "", &routes)).await;
        let http = client();
        let url = format!("{}/feedback", gw.base_url());
        let post = |id: TraceId| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                http.post(url)
                    .json(&json!({"trace_id": id.to_string(), "score": 50}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        };
        let (long, long_body) = streaming(&gw, "long").await;
        let waiting: Vec<_> = (0..8).map(|_| tokio::spawn(post(long))).collect();
        // Time for them to reach the gateway and start waiting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let short = exchange(&http, &gw, &chat_body("short", "hi", false)).await;
        assert_eq!(post(short).await, 200);
        assert!(
            waiting.iter().all(|w| !w.is_finished()),
            "the long trace's feedbacks still wait for it"
        );
        drop(long_body);
        for w in waiting {
            assert_eq!(w.await.unwrap(), 200, "recorded once the trace landed");
        }
        gw.shutdown().await;
    });
}

/// The judge grades captured traces on a gateway that distills nothing: datasets built by hand
/// use its scores too.
#[tokio::test]
async fn the_judge_grades_traces_without_a_distilled_route() {
    let sim = start_sim(SimConfig::default()).await;
    let judge = "[judge]\nupstream = \"sim\"\nmodel = \"judge\"\nsample_percent = 100.0\n";
    let text = format!(
        "{}\n{judge}",
        config_text(&sim.base_url(), "", &[("m", "gpt-4o")])
    );
    let gw = start_gateway(&text).await;
    let id = exchange(&client(), &gw, &chat_body("m", "what is a quorum?", false)).await;
    eventually("the judge scores the trace", || {
        gw.store().unwrap().has_evaluation(id).unwrap()
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn feedback_is_validated_and_the_latest_wins() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway(&config_text(&sim.base_url(), "", &[("m", "gpt-4o")])).await;
    let http = client();
    let id = exchange(&http, &gw, &chat_body("m", "hi", false))
        .await
        .to_string();

    let post = |body: Value| {
        http.post(format!("{}/feedback", gw.base_url()))
            .json(&body)
            .send()
    };
    // Sent at once: the trace may still be queued, and feedback waits for it.
    assert_eq!(
        post(json!({"trace_id": id, "score": 40}))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post(json!({"trace_id": id, "score": 97, "approved": true, "comment": "great"}))
            .await
            .unwrap()
            .status(),
        200
    );
    let cases = [
        (json!({"trace_id": id, "score": 101}), 400),
        (json!({"trace_id": id, "score": -1}), 400),
        (json!({"trace_id": id}), 400),
        (json!({"trace_id": "nope", "score": 5}), 400),
        (json!({"trace_id": id, "score": 5, "extra": 1}), 400),
        (
            json!({"trace_id": TraceId::generate().to_string(), "score": 5}),
            404,
        ),
    ];
    for (body, status) in cases {
        let resp = post(body.clone()).await.unwrap();
        assert_eq!(resp.status(), status, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert!(err["error"]["message"].is_string(), "{err}");
    }
    let latest = gw
        .store()
        .unwrap()
        .current_feedback(id.parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        (latest.score, latest.approved, latest.comment.as_deref()),
        (Some(97.0), Some(true), Some("great"))
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn client_keys_map_to_tenants_and_secrets_never_reach_the_store() {
    let sim = start_sim(SimConfig::default()).await;
    let key_a = "sk-tenantA-0123456789abcdefghij";
    let key_b = "sk-tenantB-0123456789abcdefghij";
    let key_none = "sk-tenantless-0123456789abcdefgh";
    let text = format!(
        "{}{}",
        config_text(&sim.base_url(), "", &[("m", "gpt-4o")]),
        clients_toml(&[
            ("app-a", Some("A"), key_a),
            ("app-b", Some("B"), key_b),
            ("no-tenant", None, key_none)
        ])
    );
    let gw = start_gateway_with(&text, |c| {
        c.server.admin_token = Some(forge_gateway::auth::Secret::new("admin-secret"))
    })
    .await;
    let http = client();
    let url = format!("{}/chat/completions", gw.base_url());
    let secret = "sk-proj-PLANTEDsecretKEY0123456789abcd";
    let prompt = format!("my key is {secret} and mail me at someone@example.com");

    assert_eq!(
        http.post(&url)
            .json(&chat_body("m", "x", false))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        http.post(&url)
            .bearer_auth("sk-wrong")
            .json(&chat_body("m", "x", false))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let resp = http
        .post(&url)
        .bearer_auth(key_a)
        .json(&chat_body("m", &prompt, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = trace_id_of(&resp).to_string();
    resp.text().await.unwrap();
    // The upstream saw neither app key.
    assert!(
        sim.requests()
            .iter()
            .all(|r| r.headers.iter().all(|(_, v)| !v.contains("tenantA")))
    );

    // Tenant B cannot attach feedback to tenant A's trace: it does not exist for B.
    // A person's comment may quote a key or an address too.
    let comment_secret = "sk-proj-COMMENTsecretKEY0123456789abcd";
    let fb = json!({"trace_id": id, "score": 99, "comment": format!("it echoed {comment_secret}; ask someone@example.com")});
    let as_b = http
        .post(format!("{}/feedback", gw.base_url()))
        .bearer_auth(key_b)
        .json(&fb)
        .send()
        .await
        .unwrap();
    assert_eq!(as_b.status(), 404);
    // Nor can a key without a tenant: grading makes training data.
    let as_none = http
        .post(format!("{}/feedback", gw.base_url()))
        .bearer_auth(key_none)
        .json(&fb)
        .send()
        .await
        .unwrap();
    assert_eq!(as_none.status(), 404);
    let as_a = http
        .post(format!("{}/feedback", gw.base_url()))
        .bearer_auth(key_a)
        .json(&fb)
        .send()
        .await
        .unwrap();
    assert_eq!(as_a.status(), 200);
    // A trace takes a bounded number of feedbacks; past it, a 400 that says so.
    let post_as_a = || {
        http.post(format!("{}/feedback", gw.base_url()))
            .bearer_auth(key_a)
            .json(&fb)
            .send()
    };
    for _ in 1..forge_layer::store::MAX_FEEDBACK_PER_TRACE {
        assert_eq!(post_as_a().await.unwrap().status(), 200);
    }
    let full = post_as_a().await.unwrap();
    assert_eq!(full.status(), 400);
    let err: Value = full.json().await.unwrap();
    assert_eq!(err["error"]["param"], "trace_id", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("feedback"),
        "{err}"
    );
    // Tenant B's own exchange, to keep out of A's export.
    let resp_b = http
        .post(&url)
        .bearer_auth(key_b)
        .json(&chat_body("m", "B's question", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp_b.status(), 200);
    let id_b = trace_id_of(&resp_b).to_string();
    resp_b.text().await.unwrap();
    let store = gw.store().unwrap();
    eventually("B's trace is stored", || {
        store.has_trace(id_b.parse().unwrap()).unwrap()
    })
    .await;

    let trace = gw
        .store()
        .unwrap()
        .trace(id.parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        (trace.tenant.as_deref(), trace.key_id.as_deref()),
        (Some("A"), Some("app-a"))
    );
    let stored_prompt = trace.request["messages"][0]["content"].as_str().unwrap();
    assert_eq!(
        stored_prompt,
        "my key is [REDACTED:openai_key] and mail me at [REDACTED:email]"
    );

    // The admin API exports the trace, redacted; it needs the token and is not on the proxy port.
    let admin = format!("http://{}/admin/traces?tenant=A", gw.admin_addr().unwrap());
    assert_eq!(http.get(&admin).send().await.unwrap().status(), 401);
    assert_eq!(
        http.get(&admin)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let export_of = |url: String| {
        let request = http.get(url).bearer_auth("admin-secret");
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let export = export_of(admin.clone()).await;
    assert!(
        export.contains(&id) && !export.contains(secret) && !export.contains(key_a),
        "{export}"
    );
    assert!(!export.contains(&id_b), "B's trace in A's export: {export}");
    let export_b = export_of(admin.replace("tenant=A", "tenant=B")).await;
    assert!(
        export_b.contains(&id_b) && !export_b.contains(&id),
        "{export_b}"
    );
    // Golden by the grading rule: A's trace has a score of 99 and approval, B's nothing.
    let golden = export_of(admin.replace("tenant=A", "golden=true")).await;
    assert!(golden.contains(&id) && !golden.contains(&id_b), "{golden}");
    let others = export_of(admin.replace("tenant=A", "golden=false&limit=1")).await;
    assert!(others.contains(&id_b) && !others.contains(&id), "{others}");
    let on_proxy = http
        .get(format!("http://{}/admin/traces", gw.addr()))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(on_proxy.status(), 404);

    let dir = gw.shutdown().await;
    let bytes = std::fs::read(dir.path().join(forge_layer::store::STORE_FILE)).unwrap();
    for needle in [secret, key_a, key_b, "someone@example.com", comment_secret] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} found in the redb file"
        );
    }
}

/// A gateway with the given send timeout in front of a sim whose one model, `flood` (alias
/// `f`), streams tens of megabytes as fast as it can: far more than the socket buffers between
/// the gateway and a slow client hold.
async fn flood_gateway(
    send_timeout_secs: u64,
) -> (forge_gateway::sim::SimHandle, forge_tests::TestGateway) {
    let flood = ModelBehavior {
        words: 300_000,
        ..ModelBehavior::default()
    };
    let sim = start_sim(behaviors(&[("flood", flood)])).await;
    let gw = start_gateway(&config_text(
        &sim.base_url(),
        &format!("send_timeout_secs = {send_timeout_secs}"),
        &[("f", "flood")],
    ))
    .await;
    (sim, gw)
}

/// Opens a raw connection with a small receive window, asks `alias` for a stream and reads the
/// response head; returns the connection and the trace id.
async fn raw_stream(
    gw: &forge_tests::TestGateway,
    alias: &str,
) -> (tokio::net::TcpStream, TraceId) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(gw.addr()).await.unwrap();
    let body = chat_body(alias, "flood me", true).to_string();
    conn.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: forge\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            conn.read(&mut buf).await.unwrap(),
            1,
            "closed before the head"
        );
        head.push(buf[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-forge-trace-id: "))
        .unwrap()
        .trim()
        .to_uppercase()
        .parse()
        .unwrap();
    (conn, id)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_the_send_timeout_and_recorded_as_cancelled() {
    let (_sim, gw) = flood_gateway(1).await;
    // Reads the head, then nothing, with the connection left open.
    let (conn, id) = raw_stream(&gw, "f").await;
    eventually(
        "the stalled exchange is cut and its trace committed",
        || gw.capture_counters().unwrap().captured == 1,
    )
    .await;
    assert_eq!(
        gw.store().unwrap().trace(id).unwrap().unwrap().outcome,
        Outcome::Cancelled
    );
    metric_eventually(&gw, "forge_send_timeouts_total 1").await;
    drop(conn);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_that_reads_slowly_but_steadily_is_not_cut() {
    use tokio::io::AsyncReadExt;
    let (_sim, gw) = flood_gateway(5).await;
    let (mut conn, _id) = raw_stream(&gw, "f").await;
    // About 100 KB/s for 9 s: far below what the gateway could send, so its writes keep
    // waiting, but each wait ends well within the timeout.
    let mut buf = vec![0u8; 2048];
    let reading = tokio::time::Instant::now();
    let (mut last, mut longest_gap, mut ended) = (reading, Duration::ZERO, false);
    while reading.elapsed() < Duration::from_secs(9) {
        if conn.read(&mut buf).await.unwrap_or(0) == 0 {
            ended = true;
            break;
        }
        longest_gap = longest_gap.max(last.elapsed());
        last = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // This process stalling for most of the timeout (a shared machine under load) would make
    // this client a slow reader for real; such a run proves nothing either way.
    if longest_gap > Duration::from_secs(3) {
        eprintln!("inconclusive: the reader stalled for {longest_gap:?}");
        return;
    }
    assert!(!ended, "the gateway cut a client that was reading");
    let metrics = metrics_text(&gw).await;
    assert!(metrics.contains("forge_send_timeouts_total 0"), "{metrics}");
    assert_eq!(
        gw.capture_counters().unwrap().captured,
        0,
        "still streaming"
    );
    drop(conn);
    gw.shutdown().await;
}

#[tokio::test]
async fn traces_past_the_retention_age_are_deleted_with_their_feedback_and_counted() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway_with(&config_text(&sim.base_url(), "", &[("m", "fast")]), |c| {
        // Long enough for the feedback below to reach its trace first on a slow machine.
        c.capture.as_mut().unwrap().retention = Some(Duration::from_secs(10));
    })
    .await;
    let http = client();
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = chat_body("m", &format!("question {i}"), false);
        ids.push(exchange(&http, &gw, &body).await);
    }
    let score = |id: TraceId| {
        http.post(format!("{}/feedback", gw.base_url()))
            .json(&json!({"trace_id": id.to_string(), "score": 95}))
            .send()
    };
    assert_eq!(score(ids[0]).await.unwrap().status(), 200);
    let store = gw.store().unwrap();
    assert_eq!(store.feedback(ids[0]).unwrap().len(), 1);
    eventually("the traces expire", || store.trace_count().unwrap() == 0).await;
    for id in &ids {
        assert!(!store.has_trace(*id).unwrap());
    }
    assert!(store.feedback(ids[0]).unwrap().is_empty());
    // Counted once the deleting step has returned, which may be a moment after the commit.
    metric_eventually(&gw, "forge_capture_expired_total 3").await;
    // Feedback on an expired trace is refused like feedback on an unknown one.
    assert_eq!(score(ids[1]).await.unwrap().status(), 404);
    gw.shutdown().await;
}

/// Requests that are valid JSON but that a JSON tree cannot hold: a number past `f64`, and
/// nesting near the parser's limit (deeper still once inside the trace). Forwarded as they
/// are; their traces must not make the store unreadable.
#[tokio::test]
async fn a_request_no_json_tree_can_hold_leaves_its_trace_and_the_others_readable() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway_with(&config_text(&sim.base_url(), "", &[("m", "gpt-4o")]), |c| {
        c.server.admin_token = Some(forge_gateway::auth::Secret::new("admin-secret"))
    })
    .await;
    let http = client();
    let messages = r#"[{"role":"user","content":"hi"}]"#;
    let deep = format!("{}{}", "[".repeat(126), "]".repeat(126));
    let mut ids = Vec::new();
    for body in [
        format!(r#"{{"model":"m","messages":{messages},"temperature":1e400}}"#),
        format!(r#"{{"model":"m","messages":{messages},"metadata":{deep}}}"#),
        format!(r#"{{"model":"m","messages":{messages}}}"#),
    ] {
        let resp = http
            .post(format!("{}/chat/completions", gw.base_url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        ids.push(trace_id_of(&resp));
        resp.text().await.unwrap();
    }
    let store = gw.store().unwrap();
    eventually("the three traces are stored", || {
        ids.iter().all(|id| store.has_trace(*id).unwrap())
    })
    .await;
    // Each reads back: the number past f64 as a null request, the others as sent.
    let requests: Vec<Value> = ids
        .iter()
        .map(|id| store.trace(*id).unwrap().unwrap().request)
        .collect();
    assert!(requests[0].is_null(), "{}", requests[0]);
    assert!(requests[1]["metadata"].is_array());
    assert_eq!(requests[2]["messages"][0]["content"], "hi");
    // And every listing that walks them still answers.
    for query in ["", "?golden=false"] {
        let listed = http
            .get(format!(
                "http://{}/admin/traces{query}",
                gw.admin_addr().unwrap()
            ))
            .bearer_auth("admin-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(listed.status(), 200, "{query}");
        let text = listed.text().await.unwrap();
        for id in &ids {
            assert!(text.contains(&id.to_string()), "{query}: {id} missing");
        }
    }
    gw.shutdown().await;
}

/// Feedback on a stream still running waits `server.feedback_wait_secs` for its trace, then
/// says so with a 409 the client can act on, not a 404 that says the trace will never be.
#[tokio::test]
async fn feedback_on_a_stream_still_running_is_a_409_then_lands_once_it_ends() {
    let slow = ModelBehavior {
        chunk_delay: Duration::from_millis(200),
        ..ModelBehavior::default()
    };
    let sim = start_sim(behaviors(&[("slow", slow)])).await;
    let gw = start_gateway(&config_text(
        &sim.base_url(),
        "feedback_wait_secs = 1",
        &[("s", "slow")],
    ))
    .await;
    let http = client();
    let resp = http
        .post(format!("{}/chat/completions", gw.base_url()))
        .json(&chat_body("s", "tell me a long story", true))
        .send()
        .await
        .unwrap();
    let id = trace_id_of(&resp).to_string();
    let feedback = || {
        http.post(format!("{}/feedback", gw.base_url()))
            .json(&json!({"trace_id": id, "score": 95}))
            .send()
    };
    // About 25 chunks, 0.2 s apart: the stream outlasts the one second feedback waits.
    let refused = feedback().await.unwrap();
    let status = refused.status();
    let err: Value = refused.json().await.unwrap();
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["code"], "trace_in_progress");
    assert_eq!(err["error"]["param"], "trace_id");
    let body = resp.text().await.unwrap();
    assert!(body.contains("[DONE]"), "{body}");
    // Once committed, it takes feedback at once: not left to the one second of waiting, which
    // a slow disk's commit could outlast.
    eventually("the trace is committed", || {
        gw.capture_counters().unwrap().captured == 1
    })
    .await;
    assert_eq!(feedback().await.unwrap().status(), 200);
    gw.shutdown().await;
}

/// An exchange still under way holds back the scans that keep a cursor (the judge's, the
/// datasets'), not the admin API's listings.
#[tokio::test]
async fn a_long_exchange_hides_no_trace_from_the_golden_listing() {
    let slow = ModelBehavior {
        first_byte_delay: Duration::from_secs(600),
        ..ModelBehavior::default()
    };
    let sim = start_sim(behaviors(&[
        ("fast", ModelBehavior::default()),
        ("slow", slow),
    ]))
    .await;
    let gw = start_gateway_with(
        &config_text(&sim.base_url(), "", &[("f", "fast"), ("s", "slow")]),
        |c| c.server.admin_token = Some(forge_gateway::auth::Secret::new("admin-secret")),
    )
    .await;
    let http = client();
    let url = format!("{}/chat/completions", gw.base_url());
    let ask_and_approve = |prompt: &'static str| {
        let (http, url, feedback) = (
            http.clone(),
            url.clone(),
            format!("{}/feedback", gw.base_url()),
        );
        async move {
            let resp = http
                .post(&url)
                .json(&chat_body("f", prompt, false))
                .send()
                .await
                .unwrap();
            let id = trace_id_of(&resp).to_string();
            resp.text().await.unwrap();
            let fb = json!({"trace_id": id, "approved": true});
            // Feedback waits for its trace to be stored.
            assert_eq!(
                http.post(&feedback)
                    .json(&fb)
                    .send()
                    .await
                    .unwrap()
                    .status(),
                200
            );
            id
        }
    };
    let before = ask_and_approve("before").await;
    let waiting = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.post(&url)
                .json(&chat_body("s", "slow", false))
                .send()
                .await
        }
    });
    eventually("the slow exchange reaches the upstream", || {
        sim.requests()
            .iter()
            .any(|r| r.body.windows(4).any(|w| w == b"slow"))
    })
    .await;
    let after = ask_and_approve("after").await;
    let listed = http
        .get(format!(
            "http://{}/admin/traces?golden=true",
            gw.admin_addr().unwrap()
        ))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listed.contains(&before) && listed.contains(&after),
        "{listed}"
    );
    waiting.abort();
    gw.shutdown().await;
}
