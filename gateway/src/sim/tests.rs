//! End-to-end tests of the simulated upstream over real loopback sockets.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use super::*;

pub(super) const DEADLINE: Duration = Duration::from_secs(30);

pub(super) fn client() -> reqwest::Client {
    // reqwest is built without a default crypto provider; plain HTTP still needs one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub(super) async fn start(config: SimConfig) -> SimHandle {
    SimUpstream::start(config, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap()
}

pub(super) async fn post_json(sim: &SimHandle, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", sim.base_url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

pub(super) async fn get_json(sim: &SimHandle, path: &str) -> (u16, Value) {
    let response = client()
        .get(format!("{}{path}", sim.base_url()))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Sends `request` and reads its answer's body as text, whatever its status.
pub(super) async fn body_text(request: reqwest::RequestBuilder) -> String {
    request.send().await.unwrap().text().await.unwrap()
}

pub(super) async fn chat(sim: &SimHandle, body: &Value) -> Value {
    let response = post_json(sim, "/chat/completions", body).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The events of an SSE body, checking OpenAI's framing on the way: only `data: ` lines, each
/// event ends with a blank line, and nothing trails the last event.
fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "body must end with a blank line: {body:?}"
    );
    body[..body.len() - 2]
        .split("\n\n")
        .map(|event| {
            assert!(!event.contains('\n'), "one line per event: {event:?}");
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {event:?}"))
                .to_owned()
        })
        .collect()
}

async fn chat_stream(sim: &SimHandle, body: &Value) -> Vec<String> {
    let response = post_json(sim, "/chat/completions", body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    sse_events(&response.text().await.unwrap())
}

fn json_chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event).unwrap())
        .collect()
}

pub(super) fn question(text: &str) -> Value {
    json!([{"role": "system", "content": "Be helpful."}, {"role": "user", "content": text}])
}

fn with(mut body: Value, extra: Value) -> Value {
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"timezone": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "get_news"}}
    ])
}

/// Concatenated content deltas per choice index.
fn stream_contents(chunks: &[Value]) -> HashMap<u64, String> {
    let mut contents: HashMap<u64, String> = HashMap::new();
    for chunk in chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            if let Some(text) = choice["delta"]["content"].as_str() {
                contents
                    .entry(choice["index"].as_u64().unwrap())
                    .or_default()
                    .push_str(text);
            }
        }
    }
    contents
}

#[tokio::test]
async fn stream_content_matches_the_non_streamed_answer() {
    let sim = start(SimConfig::default()).await;
    let request = json!({"model": "gpt-4o", "messages": question("How do tides work?")});
    let whole = chat(&sim, &request).await;
    let events = chat_stream(&sim, &with(request.clone(), json!({"stream": true}))).await;
    let chunks = json_chunks(&events);

    let message = &whole["choices"][0]["message"];
    let content = message["content"].as_str().unwrap();
    assert_eq!(content.split(' ').count(), 24);
    assert!(
        content.contains("tides"),
        "a good answer refers to the question: {content}"
    );
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(
        whole["model"], "gpt-4o-2024-08-06",
        "the snapshot the alias resolves to"
    );
    assert_eq!(whole["system_fingerprint"], "fp_sim");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["refusal"], Value::Null);
    assert!(message.get("tool_calls").is_none());
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    assert_eq!(whole["choices"][0]["logprobs"], Value::Null);
    // 3 per message, plus the words "Be helpful." and "How do tides work?".
    assert_eq!(
        whole["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 24, "total_tokens": 36,
               "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                   "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}})
    );
    assert_eq!(whole["service_tier"], "default");

    // Role first, one chunk per word, then an empty delta with the finish reason.
    assert_eq!(chunks.len(), 1 + 24 + 1);
    assert_eq!(
        chunks[0]["choices"][0],
        json!({"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null},
               "logprobs": null, "finish_reason": null})
    );
    for chunk in &chunks[1..25] {
        let delta = chunk["choices"][0]["delta"].as_object().unwrap();
        assert_eq!(delta.len(), 1, "a word chunk carries only content: {chunk}");
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
    }
    assert_eq!(
        chunks[1]["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        2
    );
    assert_eq!(
        chunks[25]["choices"][0],
        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"})
    );
    let id = &chunks[0]["id"];
    for chunk in &chunks {
        assert_eq!(&chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["created"], chunks[0]["created"]);
        assert_eq!(chunk["model"], "gpt-4o-2024-08-06");
        assert_eq!(chunk["system_fingerprint"], "fp_sim");
        assert_eq!(chunk["service_tier"], "default");
        assert_eq!(chunk["usage"], Value::Null);
        assert!(chunk.as_object().unwrap().contains_key("usage"));
        // On by default: random padding that hides the size of each chunk.
        let padding = chunk["obfuscation"].as_str().unwrap();
        assert!(
            (1..=16).contains(&padding.len()) && padding.bytes().all(|b| b.is_ascii_alphanumeric()),
            "{chunk}"
        );
    }
    let paddings: std::collections::HashSet<&str> = chunks
        .iter()
        .map(|chunk| chunk["obfuscation"].as_str().unwrap())
        .collect();
    assert!(paddings.len() > 1, "the padding varies from chunk to chunk");
    assert_eq!(stream_contents(&chunks)[&0], content);
    sim.shutdown().await;
}

#[tokio::test]
async fn usage_chunk_comes_after_the_finish_chunk_and_before_done() {
    let sim = start(SimConfig::default()).await;
    let request = json!({"model": "m", "messages": question("What is rust?")});
    let whole = chat(&sim, &request).await;
    let events = chat_stream(
        &sim,
        &with(
            request,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    let chunks = json_chunks(&events);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["usage"], Value::Null);
    assert!(usage_chunk.get("obfuscation").is_none(), "no delta to pad");
    sim.shutdown().await;
}

#[tokio::test]
async fn stream_options_turn_obfuscation_off_and_a_model_may_leave_null_usage_out() {
    let recorded_2024 = ModelBehavior {
        omit_null_usage: true,
        ..ModelBehavior::default()
    };
    let sim = start(SimConfig {
        models: HashMap::from([("recorded-2024".to_string(), recorded_2024)]),
        ..SimConfig::default()
    })
    .await;
    let request = |model: &str, options: Value| {
        json!({"model": model, "messages": question("What is rust?"), "stream": true,
               "stream_options": options})
    };
    let plain = json_chunks(
        &chat_stream(
            &sim,
            &request(
                "m",
                json!({"include_obfuscation": false, "include_usage": true}),
            ),
        )
        .await,
    );
    assert!(plain.iter().all(|chunk| chunk.get("obfuscation").is_none()));
    assert!(
        plain[..plain.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null())
    );

    let recorded = json_chunks(
        &chat_stream(
            &sim,
            &request("recorded-2024", json!({"include_usage": true})),
        )
        .await,
    );
    let (usage_chunk, before) = recorded.split_last().unwrap();
    assert!(
        before.iter().all(|chunk| chunk.get("usage").is_none()),
        "the key is left out"
    );
    assert!(before.iter().all(|chunk| chunk["obfuscation"].is_string()));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 24);
    sim.shutdown().await;
}

#[tokio::test]
async fn choices_interleave_round_robin_with_n() {
    let sim = start(SimConfig {
        default_behavior: ModelBehavior {
            words: 5,
            ..ModelBehavior::default()
        },
        ..SimConfig::default()
    })
    .await;
    let request = json!({"model": "m", "messages": question("Name three rivers."), "n": 3});
    let whole = chat(&sim, &request).await;
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    assert_eq!(whole["usage"]["completion_tokens"], 15);

    let chunks = json_chunks(&chat_stream(&sim, &with(request, json!({"stream": true}))).await);
    let order: Vec<u64> = chunks
        .iter()
        .map(|chunk| chunk["choices"][0]["index"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (0..7).flat_map(|_| [0, 1, 2]).collect();
    assert_eq!(order, expected);
    let contents = stream_contents(&chunks);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(
            contents[&(i as u64)],
            choice["message"]["content"].as_str().unwrap()
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn same_request_same_answer_other_model_other_answer() {
    let sim = start(SimConfig::default()).await;
    let request =
        json!({"model": "gpt-4o", "messages": question("Explain photosynthesis briefly."), "n": 2});
    let first = chat(&sim, &request).await;
    let second = chat(&sim, &request).await;
    assert_eq!(first["choices"], second["choices"]);
    assert_ne!(first["id"], second["id"]);
    let other = chat(&sim, &with(request, json!({"model": "gpt-4o-mini"}))).await;
    assert_ne!(
        first["choices"][0]["message"]["content"],
        other["choices"][0]["message"]["content"]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn tool_call_fragments_reassemble_to_the_non_streamed_calls() {
    let sim = start(SimConfig::default()).await;
    let request = json!({"model": "gpt-4o", "messages": question("Weather and time in Lisbon?"),
                         "tools": weather_tools()});
    let whole = chat(&sim, &request).await;
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "parallel calls to the first two tools");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[1]["function"]["name"], "get_time");
    assert_eq!(calls[0]["type"], "function");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    let arguments: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(
        arguments,
        json!({"city": "Weather and time in Lisbon?", "days": 3})
    );

    let chunks = json_chunks(&chat_stream(&sim, &with(request, json!({"stream": true}))).await);
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0,
            "id": calls[0]["id"], "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}], "refusal": null})
    );
    let mut rebuilt: Vec<(String, String, String)> = Vec::new();
    let mut fragments = 0;
    for chunk in &chunks[..chunks.len() - 1] {
        let delta = &chunk["choices"][0]["delta"];
        let call = &delta["tool_calls"][0];
        let index = call["index"].as_u64().unwrap() as usize;
        if let Some(id) = call.get("id") {
            assert_eq!(
                index,
                rebuilt.len(),
                "a new index opens with its id and name"
            );
            rebuilt.push((
                id.as_str().unwrap().to_owned(),
                call["function"]["name"].as_str().unwrap().to_owned(),
                call["function"]["arguments"].as_str().unwrap().to_owned(),
            ));
        } else {
            assert!(call.get("type").is_none() && call["function"].get("name").is_none());
            assert_eq!(
                delta.as_object().unwrap().len(),
                1,
                "fragments carry only tool_calls"
            );
            rebuilt[index]
                .2
                .push_str(call["function"]["arguments"].as_str().unwrap());
            fragments += 1;
        }
    }
    assert!(fragments > 4, "arguments arrive in several fragments");
    let expected: Vec<(String, String, String)> = calls
        .iter()
        .map(|call| {
            (
                call["id"].as_str().unwrap().to_owned(),
                call["function"]["name"].as_str().unwrap().to_owned(),
                call["function"]["arguments"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(rebuilt, expected);
    assert_eq!(
        chunks.last().unwrap()["choices"][0],
        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"})
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn tool_choice_decides_which_tools_are_called() {
    let sim = start(SimConfig::default()).await;
    let base = json!({"model": "m", "messages": question("Any news?"), "tools": weather_tools()});
    let names = |response: &Value| -> Vec<String> {
        response["choices"][0]["message"]["tool_calls"]
            .as_array()
            .map(|calls| {
                calls
                    .iter()
                    .map(|call| call["function"]["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let named = chat(
        &sim,
        &with(
            base.clone(),
            json!({"tool_choice": {"type": "function", "function": {"name": "get_news"}}}),
        ),
    )
    .await;
    assert_eq!(names(&named), ["get_news"]);
    let arguments =
        named["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"].clone();
    assert_eq!(arguments, json!("{\"query\":\"Any news?\"}"));
    let single = chat(
        &sim,
        &with(base.clone(), json!({"parallel_tool_calls": false})),
    )
    .await;
    assert_eq!(names(&single), ["get_weather"]);
    let none = chat(&sim, &with(base.clone(), json!({"tool_choice": "none"}))).await;
    assert!(none["choices"][0]["message"]["content"].is_string());
    assert_eq!(none["choices"][0]["finish_reason"], "stop");

    let unknown = post_json(
        &sim,
        "/chat/completions",
        &with(
            base,
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        ),
    )
    .await;
    assert_eq!(unknown.status(), 400);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["param"], "tool_choice");
    sim.shutdown().await;
}

#[tokio::test]
async fn deprecated_functions_are_answered_with_one_function_call_either_way() {
    let sim = start(SimConfig::default()).await;
    let functions = json!([
        {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "get_time"}
    ]);
    let base =
        json!({"model": "m", "messages": question("Weather in Oslo?"), "functions": functions});
    let whole = chat(&sim, &base).await;
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "function_call");
    assert!(choice["message"]["content"].is_null());
    assert!(choice["message"].get("tool_calls").is_none(), "{whole}");
    let call = &choice["message"]["function_call"];
    assert_eq!(call["name"], "get_weather");
    assert_eq!(
        call.as_object().unwrap().len(),
        2,
        "name and arguments only"
    );

    // Streamed: the name and the role first, then the arguments in pieces.
    let chunks =
        json_chunks(&chat_stream(&sim, &with(base.clone(), json!({"stream": true}))).await);
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    assert_eq!(deltas[0]["role"], "assistant");
    assert_eq!(
        deltas[0]["function_call"],
        json!({"name": "get_weather", "arguments": ""})
    );
    let mut arguments = String::new();
    for delta in &deltas[1..deltas.len() - 1] {
        assert_eq!(delta.as_object().unwrap().len(), 1, "{delta}");
        assert!(delta["function_call"].get("name").is_none());
        arguments.push_str(delta["function_call"]["arguments"].as_str().unwrap());
    }
    assert!(deltas.len() > 3, "arguments come in pieces");
    assert_eq!(arguments, call["arguments"].as_str().unwrap());
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "function_call"
    );

    let named = chat(
        &sim,
        &with(base.clone(), json!({"function_call": {"name": "get_time"}})),
    )
    .await;
    assert_eq!(
        named["choices"][0]["message"]["function_call"]["name"],
        "get_time"
    );
    let none = chat(&sim, &with(base.clone(), json!({"function_call": "none"}))).await;
    assert_eq!(none["choices"][0]["finish_reason"], "stop");
    let answered = chat(
        &sim,
        &with(
            base.clone(),
            json!({"messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": null, "function_call": {"name": "get_weather", "arguments": "{}"}},
                {"role": "function", "name": "get_weather", "content": "Minus three"}
            ]}),
        ),
    )
    .await;
    assert_eq!(answered["choices"][0]["finish_reason"], "stop");
    for (extra, param) in [
        (json!({"function_call": {"name": "nope"}}), "function_call"),
        (json!({"functions": []}), "functions"),
        (
            json!({"functions": [{"name": "bad name"}]}),
            "functions[0].name",
        ),
    ] {
        let refused = post_json(&sim, "/chat/completions", &with(base.clone(), extra)).await;
        assert_eq!(refused.status(), 400);
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["param"], param, "{body}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn after_a_tool_result_the_answer_is_text_that_uses_it() {
    let sim = start(SimConfig::default()).await;
    let whole = chat(
        &sim,
        &json!({"model": "m", "tools": weather_tools(), "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Minus three and snowing"}
        ]}),
    )
    .await;
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Minus three and snowing"), "{content}");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    sim.shutdown().await;
}

#[tokio::test]
async fn max_tokens_cuts_the_answer_with_finish_reason_length() {
    let sim = start(SimConfig::default()).await;
    let request =
        json!({"model": "m", "messages": question("Tell me about owls."), "max_tokens": 5});
    let whole = chat(&sim, &request).await;
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.split(' ').count(), 5);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 5);
    let full = chat(
        &sim,
        &json!({"model": "m", "messages": question("Tell me about owls.")}),
    )
    .await;
    assert!(
        full["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with(content)
    );

    let chunks = json_chunks(
        &chat_stream(
            &sim,
            &json!({"model": "m", "messages": question("Tell me about owls."),
            "max_completion_tokens": 5, "stream": true}),
        )
        .await,
    );
    assert_eq!(stream_contents(&chunks)[&0], content);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_get_openai_errors_naming_the_parameter() {
    let sim = start(SimConfig::default()).await;
    let cases = [
        (json!({"messages": question("hi")}), "model"),
        (json!({"model": "m"}), "messages"),
        (json!({"model": "m", "messages": []}), "messages"),
        (json!({"model": "m", "messages": "hi"}), "messages"),
        (
            json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "hi", "name": 42}]}),
            "messages[0].name",
        ),
        (
            json!({"model": "m", "messages": question("hi"), "stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (
            json!({"model": "m", "messages": question("hi"), "stream": true,
                   "stream_options": {"include_obfuscation": "no"}}),
            "stream_options.include_obfuscation",
        ),
        (
            json!({"model": "m", "messages": question("hi"), "n": 0}),
            "n",
        ),
        (
            json!({"model": "m", "messages": question("hi"), "n": 129}),
            "n",
        ),
        (
            json!({"model": "m", "messages": question("hi"), "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"model": "m", "messages": question("hi"), "tool_choice": "auto"}),
            "tool_choice",
        ),
        (
            json!({"model": "m", "messages": question("hi"), "tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
        ),
    ];
    for (body, param) in cases {
        let response = post_json(&sim, "/chat/completions", &body).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert!(error["error"].as_object().unwrap().contains_key("code"));
    }
    let response = client()
        .post(format!("{}/chat/completions", sim.base_url()))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    sim.shutdown().await;
}

#[tokio::test]
async fn injected_failures_carry_retry_headers_and_can_be_set_at_run_time() {
    let sim = start(SimConfig::default()).await;
    let request = json!({"model": "gpt-4o", "messages": question("hi")});
    assert_eq!(
        post_json(&sim, "/chat/completions", &request)
            .await
            .status(),
        200
    );

    for (status, kind, code, retry_after) in [
        (429, "requests", Some("rate_limit_exceeded"), true),
        (503, "server_error", None, true),
        (500, "server_error", None, false),
        (404, "invalid_request_error", Some("model_not_found"), false),
    ] {
        sim.set_behavior(
            "gpt-4o",
            ModelBehavior {
                fail_status: Some(status),
                ..ModelBehavior::default()
            },
        );
        let response = post_json(&sim, "/chat/completions", &request).await;
        assert_eq!(response.status().as_u16(), status);
        let headers = response.headers().clone();
        assert_eq!(
            headers.get("retry-after").is_some(),
            retry_after,
            "{status}"
        );
        assert_eq!(
            headers.get("x-should-retry").map(|v| v.to_str().unwrap()),
            (status != 404).then_some("true"),
            "{status}"
        );
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], kind);
        assert_eq!(error["error"]["code"].as_str(), code);
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(error["error"].as_object().unwrap().contains_key("param"));
    }
    // Other models keep the default behaviour.
    let other = post_json(
        &sim,
        "/chat/completions",
        &with(request, json!({"model": "x"})),
    )
    .await;
    assert_eq!(other.status(), 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn error_after_chunks_cuts_the_stream_with_an_error_event() {
    let mut models = HashMap::new();
    models.insert(
        "flaky".to_owned(),
        ModelBehavior {
            error_after_chunks: Some(3),
            ..ModelBehavior::default()
        },
    );
    let sim = start(SimConfig {
        models,
        ..SimConfig::default()
    })
    .await;
    let events = chat_stream(
        &sim,
        &json!({"model": "flaky", "messages": question("hi"), "stream": true}),
    )
    .await;
    assert_eq!(
        events.len(),
        1 + 3 + 1,
        "role, three words, error: {events:?}"
    );
    let error: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    assert!(error["error"]["message"].is_string());
    assert!(!events.iter().any(|event| event == "[DONE]"));
    // Non-streamed requests to the same model are unaffected.
    let whole = chat(&sim, &json!({"model": "flaky", "messages": question("hi")})).await;
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    sim.shutdown().await;
}

#[tokio::test]
async fn chunks_are_sent_as_they_are_produced() {
    let sim = start(SimConfig {
        default_behavior: ModelBehavior {
            chunk_delay: Duration::from_millis(300),
            words: 3,
            ..ModelBehavior::default()
        },
        ..SimConfig::default()
    })
    .await;
    let mut response = post_json(
        &sim,
        "/chat/completions",
        &json!({"model": "m", "messages": question("hi"), "stream": true}),
    )
    .await;
    // With a delay between chunks, the first read returns the first event alone: the body is
    // streamed, not buffered until the end.
    let first = response.chunk().await.unwrap().unwrap();
    let first = std::str::from_utf8(&first).unwrap();
    assert!(
        first.starts_with("data: {") && first.ends_with("\n\n"),
        "{first}"
    );
    assert_eq!(first.matches("data: ").count(), 1, "{first}");
    assert!(first.contains("\"role\":\"assistant\""));
    let mut rest = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(rest.ends_with("data: [DONE]\n\n"));
    sim.shutdown().await;
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let sim = start(SimConfig {
        api_key: Some("sk-sim-test-key".into()),
        ..SimConfig::default()
    })
    .await;
    let url = format!("{}/models", sim.base_url());
    let missing = client().get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_api_key");
    assert_eq!(error["error"]["type"], "invalid_request_error");

    let wrong = client()
        .get(&url)
        .bearer_auth("sk-wrong-key-1234")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let error: Value = wrong.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_api_key");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Incorrect API key provided")
    );
    assert!(
        !error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sk-wrong-key-1234")
    );

    let right = client()
        .get(&url)
        .bearer_auth("sk-sim-test-key")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    // Unknown paths are checked too, before routing.
    let unknown = client()
        .get(format!("{}/nothing", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 401);
    assert_eq!(sim.request_count(), 4);
    sim.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let sim = start(SimConfig::default()).await;
    let (status, error) = get_json(&sim, "/does/not/exist").await;
    assert_eq!(status, 404);
    assert_eq!(
        error["error"]["message"],
        "Invalid URL (GET /v1/does/not/exist)"
    );
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let response = client()
        .get(format!("{}/chat/completions", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["content-type"], "application/json");
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].is_string());
    let outside = client()
        .get(format!("http://{}/", sim.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(outside.status(), 404);
    let error: Value = outside.json().await.unwrap();
    assert!(error["error"]["message"].is_string());
    sim.shutdown().await;
}

#[tokio::test]
async fn requests_are_recorded_in_order_with_headers_and_body() {
    let sim = start(SimConfig::default()).await;
    let body = json!({"model": "m", "messages": question("hi")});
    client()
        .post(format!("{}/chat/completions", sim.base_url()))
        .header("X-Stainless-Retry-Count", "0")
        .json(&body)
        .send()
        .await
        .unwrap();
    get_json(&sim, "/files?purpose=fine-tune").await;
    let requests = sim.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(sim.request_count(), 2);
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/v1/chat/completions");
    assert_eq!(requests[0].header("x-stainless-retry-count"), Some("0"));
    assert_eq!(requests[0].json(), Some(body));
    assert_eq!(requests[1].method, "GET");
    assert_eq!(requests[1].path, "/v1/files?purpose=fine-tune");
    sim.shutdown().await;
}

#[tokio::test]
async fn models_lists_configured_and_base_models() {
    let mut models = HashMap::new();
    models.insert("teacher-x".to_owned(), ModelBehavior::default());
    let sim = start(SimConfig {
        models,
        ..SimConfig::default()
    })
    .await;
    let (status, list) = get_json(&sim, "/models").await;
    assert_eq!(status, 200);
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|model| model["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "gpt-4o",
            "gpt-4o-2024-08-06",
            "gpt-4o-mini",
            "gpt-4o-mini-2024-07-18",
            "teacher-x"
        ]
    );
    assert_eq!(list["data"][0]["object"], "model");
    assert!(list["data"][0]["created"].is_u64());
    assert!(list["data"][0]["owned_by"].is_string());
    let (status, _) = get_json(&sim, "/models/teacher-x").await;
    assert_eq!(status, 200);
    let (status, error) = get_json(&sim, "/models/nope").await;
    assert_eq!(status, 404);
    assert_eq!(error["error"]["code"], "model_not_found");
    sim.shutdown().await;
}

#[tokio::test]
async fn poor_quality_is_generic_and_an_untrained_fine_tuned_name_is_not_found() {
    let sim = start(SimConfig {
        default_behavior: ModelBehavior {
            quality: Quality::Poor,
            ..ModelBehavior::default()
        },
        ..SimConfig::default()
    })
    .await;
    let messages = question("Why do volcanoes erupt?");
    let poor = chat(&sim, &json!({"model": "gpt-4o-mini", "messages": messages})).await;
    let poor = poor["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        poor.starts_with("I am not sure. Please ask again."),
        "{poor}"
    );
    assert!(!poor.contains("volcanoes"));
    // No job produced this model (a route to a student whose job has not succeeded, say).
    let untrained = post_json(
        &sim,
        "/chat/completions",
        &json!({"model": "ft:gpt-4o-mini:forge-sim::abcd1234", "messages": messages}),
    )
    .await;
    assert_eq!(untrained.status(), 404);
    let error: Value = untrained.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");
    sim.shutdown().await;
}

// ---- Files ----

pub(super) async fn upload(
    sim: &SimHandle,
    filename: &str,
    purpose: &str,
    content: Vec<u8>,
) -> reqwest::Response {
    let form = Form::new()
        .text("purpose", purpose.to_owned())
        .part("file", Part::bytes(content).file_name(filename.to_owned()));
    client()
        .post(format!("{}/files", sim.base_url()))
        .multipart(form)
        .send()
        .await
        .unwrap()
}

pub(super) async fn upload_ok(
    sim: &SimHandle,
    filename: &str,
    purpose: &str,
    content: Vec<u8>,
) -> Value {
    let response = upload(sim, filename, purpose, content).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn files_round_trip() {
    let sim = start(SimConfig::default()).await;
    let content = b"{\"a\":1}\n\xc3\xa9\n".to_vec();
    let file = upload_ok(&sim, "data.jsonl", "fine-tune", content.clone()).await;
    let id = file["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("file-"));
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], content.len());
    assert_eq!(file["filename"], "data.jsonl");
    assert_eq!(file["purpose"], "fine-tune");
    assert_eq!(file["status"], "processed");
    assert!(file["created_at"].is_u64());
    let other = upload_ok(&sim, "batch.jsonl", "batch", b"x".to_vec()).await;
    let third = upload_ok(&sim, "more.jsonl", "fine-tune", b"y".to_vec()).await;

    let (_, fetched) = get_json(&sim, &format!("/files/{id}")).await;
    assert_eq!(fetched, file);
    let raw = client()
        .get(format!("{}/files/{id}/content", sim.base_url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(raw.as_ref(), content.as_slice());

    let (_, list) = get_json(&sim, "/files?purpose=fine-tune&order=asc").await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str(), third["id"].as_str().unwrap()]);
    assert_eq!(list["object"], "list");
    assert_eq!(list["first_id"], id.as_str());
    assert_eq!(list["last_id"], third["id"]);
    assert_eq!(list["has_more"], false);
    let (_, page) = get_json(&sim, "/files?order=asc&limit=1").await;
    assert_eq!(page["data"][0]["id"], id.as_str());
    assert_eq!(page["has_more"], true);
    let (_, next) = get_json(&sim, &format!("/files?order=asc&limit=1&after={id}")).await;
    assert_eq!(next["data"][0]["id"], other["id"]);

    let deleted = client()
        .delete(format!("{}/files/{id}", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(
        deleted.json::<Value>().await.unwrap(),
        json!({"id": id, "object": "file", "deleted": true})
    );
    let (status, error) = get_json(&sim, &format!("/files/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(
        error["error"]["message"],
        format!("No such File object: {id}")
    );
    let (status, _) = get_json(&sim, &format!("/files/{id}/content")).await;
    assert_eq!(status, 404);
    sim.shutdown().await;
}

#[tokio::test]
async fn uploads_beyond_axums_default_body_limit_are_accepted() {
    // axum refuses bodies over 2 MiB unless told otherwise; training files are often larger.
    let sim = start(SimConfig::default()).await;
    let content = vec![b'x'; 3 * 1024 * 1024];
    let file = upload_ok(&sim, "big.jsonl", "fine-tune", content.clone()).await;
    assert_eq!(file["bytes"], content.len());
    assert!(sim.requests()[0].body.len() > content.len());
    sim.shutdown().await;
}

#[tokio::test]
async fn upload_needs_file_and_a_known_purpose() {
    let sim = start(SimConfig::default()).await;
    let no_file = client()
        .post(format!("{}/files", sim.base_url()))
        .multipart(Form::new().text("purpose", "fine-tune"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_file.status(), 400);
    assert_eq!(
        no_file.json::<Value>().await.unwrap()["error"]["param"],
        "file"
    );
    let no_purpose = client()
        .post(format!("{}/files", sim.base_url()))
        .multipart(Form::new().part("file", Part::bytes(b"x".to_vec()).file_name("a.jsonl")))
        .send()
        .await
        .unwrap();
    assert_eq!(no_purpose.status(), 400);
    assert_eq!(
        no_purpose.json::<Value>().await.unwrap()["error"]["param"],
        "purpose"
    );
    let bad_purpose = upload(&sim, "a.jsonl", "training", b"x".to_vec()).await;
    assert_eq!(bad_purpose.status(), 400);
    let not_jsonl = upload(&sim, "a.csv", "fine-tune", b"x".to_vec()).await;
    assert_eq!(not_jsonl.status(), 400);
    let not_multipart = post_json(&sim, "/files", &json!({"purpose": "fine-tune"})).await;
    assert_eq!(not_multipart.status(), 400);
    sim.shutdown().await;
}

// ---- Fine-tuning ----

pub(super) fn training_file(examples: usize) -> Vec<u8> {
    let plain = json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}
    ]});
    let tool_use = json!({
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "-3C"},
            {"role": "assistant", "content": "It is -3C in Oslo."}
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}]
    });
    (0..examples)
        .map(|i| if i % 3 == 0 { tool_use.to_string() } else { plain.to_string() } + "\n")
        .collect::<String>()
        .into_bytes()
}

pub(super) fn tiny_timings() -> SimConfig {
    SimConfig {
        fine_tune: FineTuneTimings {
            validating: Duration::from_millis(20),
            queued: Duration::from_millis(20),
            running: Duration::from_millis(100),
        },
        ..SimConfig::default()
    }
}

pub(super) async fn create_job(sim: &SimHandle, body: &Value) -> Value {
    let response = post_json(sim, "/fine_tuning/jobs", body).await;
    let status = response.status();
    let job: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{job}");
    job
}

/// Polls the job until its status is final.
pub(super) async fn wait_for_final(sim: &SimHandle, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, job) = get_json(sim, &format!("/fine_tuning/jobs/{id}")).await;
        assert_eq!(status, 200);
        if matches!(
            job["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never finished: {job}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn fine_tuning_job_succeeds_and_its_model_is_served() {
    // Base models answer poorly here, so a good answer is the fine-tuned model's own.
    let sim = start(SimConfig {
        default_behavior: ModelBehavior {
            quality: Quality::Poor,
            ..ModelBehavior::default()
        },
        ..tiny_timings()
    })
    .await;
    let file = upload_ok(&sim, "train.jsonl", "fine-tune", training_file(12)).await;
    let file_id = file["id"].as_str().unwrap();
    let job = create_job(
        &sim,
        &json!({"model": "gpt-4o-mini", "training_file": file_id, "suffix": "support",
                "metadata": {"route": "gpt-4o"}, "seed": 42}),
    )
    .await;
    let keys: Vec<&str> = job
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for key in [
        "id",
        "object",
        "created_at",
        "finished_at",
        "model",
        "fine_tuned_model",
        "organization_id",
        "status",
        "training_file",
        "validation_file",
        "result_files",
        "trained_tokens",
        "hyperparameters",
        "method",
        "seed",
        "estimated_finish",
        "integrations",
        "metadata",
        "error",
        "user_provided_suffix",
    ] {
        assert!(keys.contains(&key), "missing {key} in {job}");
    }
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "validating_files");
    assert_eq!(job["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(job["fine_tuned_model"], Value::Null);
    assert_eq!(job["finished_at"], Value::Null);
    assert_eq!(job["trained_tokens"], Value::Null);
    assert_eq!(job["hyperparameters"]["n_epochs"], "auto");
    assert_eq!(job["seed"], 42);
    assert_eq!(job["user_provided_suffix"], "support");
    assert_eq!(job["metadata"], json!({"route": "gpt-4o"}));
    assert_eq!(job["method"]["type"], "supervised");
    let id = job["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ftjob-"));

    let done = wait_for_final(&sim, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let model = done["fine_tuned_model"].as_str().unwrap().to_owned();
    assert_eq!(
        model,
        format!("ft:gpt-4o-mini-2024-07-18:forge-sim:support:{}", &id[6..14]),
        "named after the snapshot the base resolved to"
    );
    assert!(done["finished_at"].as_u64().unwrap() >= done["created_at"].as_u64().unwrap());
    assert!(done["trained_tokens"].as_u64().unwrap() > 0);
    assert_eq!(done["hyperparameters"]["n_epochs"], 3);
    assert_eq!(
        done["method"]["supervised"]["hyperparameters"],
        done["hyperparameters"]
    );
    assert_eq!(done["error"], Value::Null);
    assert_eq!(done["estimated_finish"], Value::Null);

    // The result file: one row per step (12 examples, batch 1, 3 epochs), loss going down.
    let result_id = done["result_files"][0].as_str().unwrap();
    let (_, result) = get_json(&sim, &format!("/files/{result_id}")).await;
    assert_eq!(result["purpose"], "fine-tune-results");
    let csv =
        body_text(client().get(format!("{}/files/{result_id}/content", sim.base_url()))).await;
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy")
    );
    let rows: Vec<Vec<&str>> = lines.map(|line| line.split(',').collect()).collect();
    assert_eq!(rows.len(), 36);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], (i + 1).to_string());
        assert_eq!(&row[3..], ["", ""], "no validation file, empty cells");
    }
    let loss = |row: &Vec<&str>| row[1].parse::<f64>().unwrap();
    assert!(rows.windows(2).all(|pair| loss(&pair[1]) < loss(&pair[0])));

    // Events: newest first, in the order the job went through them.
    let (_, events) = get_json(&sim, &format!("/fine_tuning/jobs/{id}/events?limit=1000")).await;
    let events = events["data"].as_array().unwrap();
    let messages: Vec<&str> = events
        .iter()
        .rev()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    let position = |needle: &str| {
        messages
            .iter()
            .position(|m| m.starts_with(needle))
            .unwrap_or_else(|| panic!("no event {needle:?} in {messages:?}"))
    };
    let created = position("Created fine-tuning job");
    let validating = position(&format!("Validating training file: {file_id}"));
    let validated = position("Files validated, moving job to queued state");
    let started = position("Fine-tuning job started");
    let first_step = position("Step 1/36");
    let new_model = position(&format!("New fine-tuned model created: {model}"));
    let completed = position("The job has successfully completed");
    assert!(created < validating && validating < validated && validated < started);
    assert!(started < first_step && first_step < new_model && new_model < completed);
    assert_eq!(completed, messages.len() - 1);
    let metrics = events.iter().find(|e| e["type"] == "metrics").unwrap();
    assert_eq!(metrics["object"], "fine_tuning.job.event");
    assert!(metrics["data"]["step"].is_u64());
    assert!(metrics["data"]["train_loss"].is_f64());
    assert!(metrics["data"]["train_mean_token_accuracy"].is_f64());
    let created_at: Vec<u64> = events
        .iter()
        .map(|e| e["created_at"].as_u64().unwrap())
        .collect();
    assert!(
        created_at.windows(2).all(|pair| pair[0] >= pair[1]),
        "newest first"
    );

    // Checkpoints: one per epoch for the last three epochs, newest first.
    let (_, checkpoints) = get_json(&sim, &format!("/fine_tuning/jobs/{id}/checkpoints")).await;
    let data = checkpoints["data"].as_array().unwrap();
    let steps: Vec<u64> = data
        .iter()
        .map(|c| c["step_number"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [36, 24, 12]);
    assert_eq!(data[0]["object"], "fine_tuning.job.checkpoint");
    assert_eq!(data[0]["fine_tuning_job_id"], id.as_str());
    assert_eq!(
        data[0]["fine_tuned_model_checkpoint"],
        format!("{model}:ckpt-step-36")
    );
    assert!(data[0]["metrics"]["train_loss"].is_f64());
    assert_eq!(checkpoints["first_id"], data[0]["id"]);
    assert_eq!(checkpoints["last_id"], data[2]["id"]);
    assert_eq!(checkpoints["has_more"], false);

    // The model is listed and answers well.
    let (_, models) = get_json(&sim, "/models").await;
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == model.as_str())
    );
    let answer = chat(
        &sim,
        &json!({"model": model, "messages": question("What is a fjord?")}),
    )
    .await;
    assert_eq!(answer["model"], model.as_str());
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("fjord")
    );

    // Listing finds the job by metadata and not by other metadata.
    let (_, jobs) = get_json(&sim, "/fine_tuning/jobs?metadata[route]=gpt-4o").await;
    assert_eq!(jobs["data"][0]["id"], id.as_str());
    assert_eq!(jobs["has_more"], false);
    let (_, jobs) = get_json(&sim, "/fine_tuning/jobs?metadata[route]=other").await;
    assert_eq!(jobs["data"], json!([]));
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_training_file_fails_in_validation_with_the_reason() {
    let sim = start(tiny_timings()).await;
    let few = upload_ok(&sim, "few.jsonl", "fine-tune", training_file(4)).await;
    let mut broken = training_file(12);
    broken.extend_from_slice(b"{\"messages\": [{\"role\": \"developer\", \"content\": \"x\"}]}\n");
    let broken = upload_ok(&sim, "broken.jsonl", "fine-tune", broken).await;

    let job = create_job(
        &sim,
        &json!({"model": "gpt-4o-mini", "training_file": few["id"]}),
    )
    .await;
    let done = wait_for_final(&sim, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["fine_tuned_model"], Value::Null);
    assert_eq!(done["error"]["code"], "invalid_training_file");
    assert_eq!(done["error"]["param"], "training_file");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at least 10"),
        "{done}"
    );
    assert!(done["finished_at"].is_u64());
    let (_, events) = get_json(
        &sim,
        &format!("/fine_tuning/jobs/{}/events", job["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(events["data"][0]["level"], "error");
    assert!(
        !events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"] == "Fine-tuning job started")
    );

    let job = create_job(
        &sim,
        &json!({"model": "gpt-4o-mini", "training_file": broken["id"]}),
    )
    .await;
    let done = wait_for_final(&sim, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("line 13") && message.contains("developer"),
        "{message}"
    );

    let (_, models) = get_json(&sim, "/models").await;
    assert!(
        !models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"].as_str().unwrap().starts_with("ft:"))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn job_creation_checks_its_parameters() {
    let sim = start(tiny_timings()).await;
    let file = upload_ok(&sim, "train.jsonl", "fine-tune", training_file(10)).await;
    let batch = upload_ok(&sim, "batch.jsonl", "batch", training_file(10)).await;
    let cases = [
        (json!({"training_file": file["id"]}), Some("model")),
        (json!({"model": "gpt-4o-mini"}), Some("training_file")),
        (
            json!({"model": "gpt-4o-mini", "training_file": "file-missing"}),
            Some("training_file"),
        ),
        (
            json!({"model": "gpt-4o-mini", "training_file": batch["id"]}),
            Some("training_file"),
        ),
        (
            json!({"model": "gpt-4o-mini", "training_file": file["id"], "validation_file": "file-missing"}),
            Some("validation_file"),
        ),
        (
            json!({"model": "gpt-4o-mini", "training_file": file["id"], "suffix": "x".repeat(65)}),
            Some("suffix"),
        ),
        (
            json!({"model": "gpt-4o-mini", "training_file": file["id"], "seed": -1}),
            Some("seed"),
        ),
        (
            json!({"model": "gpt-4o-mini", "training_file": file["id"], "hyperparameters": {"n_epochs": 0}}),
            Some("hyperparameters.n_epochs"),
        ),
        (
            json!({"model": "gpt-4o-mini", "training_file": file["id"],
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 999}}}}),
            Some("method.supervised.hyperparameters.batch_size"),
        ),
        (
            json!({"model": "gpt-4o-mini", "training_file": file["id"], "method": {"type": "dpo"}}),
            Some("method.type"),
        ),
        (
            json!({"model": "gpt-4o-mini", "training_file": file["id"], "epochs": 3}),
            None,
        ),
    ];
    for (body, param) in cases {
        let response = post_json(&sim, "/fine_tuning/jobs", &body).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"].as_str(), param, "{body}: {error}");
    }
    // Both spellings of hyperparameters are accepted and shown under `method`.
    let job = create_job(
        &sim,
        &json!({"model": "gpt-4o-mini", "training_file": file["id"], "hyperparameters": {"n_epochs": 2}}),
    )
    .await;
    assert_eq!(
        job["method"]["supervised"]["hyperparameters"]["n_epochs"],
        2
    );
    let job = create_job(
        &sim,
        &json!({"model": "gpt-4o-mini", "training_file": file["id"],
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "learning_rate_multiplier": 0.5}}}}),
    )
    .await;
    assert_eq!(job["hyperparameters"]["n_epochs"], 4);
    assert_eq!(job["hyperparameters"]["learning_rate_multiplier"], 0.5);
    let done = wait_for_final(&sim, job["id"].as_str().unwrap()).await;
    assert_eq!(done["hyperparameters"]["n_epochs"], 4);
    assert_eq!(done["hyperparameters"]["batch_size"], 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn validation_file_fills_the_valid_columns() {
    let sim = start(tiny_timings()).await;
    let train = upload_ok(&sim, "train.jsonl", "fine-tune", training_file(10)).await;
    let valid = upload_ok(&sim, "valid.jsonl", "fine-tune", training_file(2)).await;
    let job = create_job(
        &sim,
        &json!({"model": "gpt-4o-mini", "training_file": train["id"], "validation_file": valid["id"],
                "hyperparameters": {"n_epochs": 1}}),
    )
    .await;
    let done = wait_for_final(&sim, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["validation_file"], valid["id"]);
    assert_eq!(
        done["fine_tuned_model"].as_str().unwrap().split(':').nth(3),
        Some("")
    );
    let csv = body_text(client().get(format!(
        "{}/files/{}/content",
        sim.base_url(),
        done["result_files"][0].as_str().unwrap()
    )))
    .await;
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(row.len(), 5);
    assert!(
        row[3].parse::<f64>().is_ok() && row[4].parse::<f64>().is_ok(),
        "{csv}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn cancel_pause_and_resume() {
    let sim = start(SimConfig {
        fine_tune: FineTuneTimings {
            validating: Duration::ZERO,
            queued: Duration::ZERO,
            running: Duration::from_secs(3600),
        },
        ..SimConfig::default()
    })
    .await;
    let file = upload_ok(&sim, "train.jsonl", "fine-tune", training_file(10)).await;
    let job = create_job(
        &sim,
        &json!({"model": "gpt-4o-mini", "training_file": file["id"]}),
    )
    .await;
    let id = job["id"].as_str().unwrap();
    let action = |name: &'static str| {
        let url = format!("{}/fine_tuning/jobs/{id}/{name}", sim.base_url());
        async move { client().post(url).send().await.unwrap() }
    };
    let (_, running) = get_json(&sim, &format!("/fine_tuning/jobs/{id}")).await;
    assert_eq!(running["status"], "running");
    assert!(running["estimated_finish"].is_u64());
    assert_eq!(
        action("resume").await.status(),
        400,
        "only a paused job resumes"
    );
    let paused: Value = action("pause").await.json().await.unwrap();
    assert_eq!(paused["status"], "paused");
    let resumed: Value = action("resume").await.json().await.unwrap();
    assert_eq!(resumed["status"], "queued");
    let cancelled = action("cancel").await;
    assert_eq!(cancelled.status(), 200);
    let cancelled: Value = cancelled.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["fine_tuned_model"], Value::Null);
    let (_, again) = get_json(&sim, &format!("/fine_tuning/jobs/{id}")).await;
    assert_eq!(
        again["status"], "cancelled",
        "a cancelled job stays cancelled"
    );
    assert_eq!(action("cancel").await.status(), 400);
    assert_eq!(action("pause").await.status(), 400);

    let (status, error) = get_json(&sim, "/fine_tuning/jobs/ftjob-nope").await;
    assert_eq!(status, 404);
    assert!(error["error"]["message"].is_string());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_job_waits_in_validation_until_its_time_is_up() {
    let sim = start(SimConfig {
        fine_tune: FineTuneTimings {
            validating: Duration::from_secs(3600),
            ..FineTuneTimings::default()
        },
        ..SimConfig::default()
    })
    .await;
    // Even a file that will fail shows `validating_files` until validation ends.
    let file = upload_ok(&sim, "few.jsonl", "fine-tune", training_file(1)).await;
    let job = create_job(
        &sim,
        &json!({"model": "gpt-4o-mini", "training_file": file["id"]}),
    )
    .await;
    let (_, again) = get_json(
        &sim,
        &format!("/fine_tuning/jobs/{}", job["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(again["status"], "validating_files");
    assert_eq!(again["error"], Value::Null);
    sim.shutdown().await;
}

#[tokio::test]
async fn job_list_is_newest_first_and_pages() {
    let sim = start(tiny_timings()).await;
    let file = upload_ok(&sim, "train.jsonl", "fine-tune", training_file(10)).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let job = create_job(
            &sim,
            &json!({"model": "gpt-4o-mini", "training_file": file["id"]}),
        )
        .await;
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    let (_, page) = get_json(&sim, "/fine_tuning/jobs?limit=2").await;
    let listed: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()]);
    assert_eq!(page["has_more"], true);
    assert!(page.get("first_id").is_none());
    let (_, rest) = get_json(&sim, &format!("/fine_tuning/jobs?limit=2&after={}", ids[1])).await;
    assert_eq!(rest["data"][0]["id"], ids[0].as_str());
    assert_eq!(rest["has_more"], false);

    let (_, events) = get_json(
        &sim,
        &format!("/fine_tuning/jobs/{}/events?limit=1", ids[0]),
    )
    .await;
    assert_eq!(events["has_more"], true);
    let newest = events["data"][0]["id"].as_str().unwrap();
    let (_, older) = get_json(
        &sim,
        &format!("/fine_tuning/jobs/{}/events?limit=1&after={newest}", ids[0]),
    )
    .await;
    assert_ne!(older["data"][0]["id"], newest);
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_a_stream_in_flight_finish() {
    let sim = start(SimConfig {
        default_behavior: ModelBehavior {
            chunk_delay: Duration::from_millis(20),
            words: 10,
            ..ModelBehavior::default()
        },
        ..SimConfig::default()
    })
    .await;
    let mut response = post_json(
        &sim,
        "/chat/completions",
        &json!({"model": "m", "messages": question("hi"), "stream": true}),
    )
    .await;
    let first = response.chunk().await.unwrap().unwrap();
    let addr = sim.addr();
    let shutdown = tokio::spawn(sim.shutdown());
    let mut body = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = response.chunk().await.unwrap() {
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    tokio::time::timeout(DEADLINE, shutdown)
        .await
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn serve_runs_until_its_shutdown_future_resolves() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(SimConfig::default(), listener, async move {
        let _ = stopped.await;
    }));
    let response = client()
        .get(format!("http://{addr}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    stop.send(()).unwrap();
    tokio::time::timeout(DEADLINE, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
