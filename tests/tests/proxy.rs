//! The proxy end to end: real gateway, simulated upstream, both on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use forge_gateway::sim::{ModelBehavior, SimConfig};
use forge_tests::{
    align_ids, behaviors, chat_body, client, config_text, eventually, mask_padding, sse_events,
    start_gateway, start_sim, trickle,
};
use futures_util::StreamExt;
use serde_json::{Value, json};

#[tokio::test]
async fn non_stream_and_stream_reach_the_client_byte_for_byte() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway(&config_text(&sim.base_url(), "", &[("alias-4o", "gpt-4o")])).await;
    let http = client();

    for stream in [false, true] {
        let via = http
            .post(format!("{}/chat/completions", gw.base_url()))
            .json(&chat_body("alias-4o", "Explain TCP slow start", stream))
            .send()
            .await
            .unwrap();
        let direct = http
            .post(format!("{}/chat/completions", sim.base_url()))
            .json(&chat_body("gpt-4o", "Explain TCP slow start", stream))
            .send()
            .await
            .unwrap();
        assert_eq!(via.status(), 200);
        assert_eq!(via.status(), direct.status());
        assert_eq!(
            via.headers()["content-type"],
            direct.headers()["content-type"]
        );
        // The upstream's request id reaches the client; Forge's account there does not.
        assert!(via.headers().contains_key("x-request-id"));
        for name in ["openai-organization", "openai-project", "set-cookie"] {
            assert!(direct.headers().contains_key(name), "{name}");
            assert!(!via.headers().contains_key(name), "{name}");
        }
        let via = via.text().await.unwrap();
        let direct = direct.text().await.unwrap();
        // The padding is random in each answer; everything else is the same, byte for byte.
        assert_eq!(
            mask_padding(&align_ids(&via, &direct)),
            mask_padding(&direct),
            "stream={stream}"
        );
        if stream {
            assert!(via.ends_with("data: [DONE]\n\n"));
            assert_eq!(via.matches("\"obfuscation\":\"").count(), 26, "{via}");
        }
    }

    // The upstream saw the target model, never the alias, and nothing else changed.
    let sent: Value = serde_json::from_slice(&sim.requests()[0].body).unwrap();
    assert_eq!(sent, chat_body("gpt-4o", "Explain TCP slow start", false));
    gw.shutdown().await;
}

#[tokio::test]
async fn tool_call_streams_and_n_choices_pass_through_intact() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway(&config_text(&sim.base_url(), "", &[("a", "gpt-4o")])).await;
    let http = client();
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    ]);
    let mut body = chat_body("a", "Weather and time in Paris?", false);
    body["tools"] = tools;

    let whole: Value = http
        .post(format!("{}/chat/completions", gw.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected_calls = whole["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(expected_calls.len(), 2, "parallel tool calls: {whole}");
    assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls");

    body["stream"] = json!(true);
    let text = http
        .post(format!("{}/chat/completions", gw.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Reassemble independently: per tool index, id/name from the first fragment, then arguments.
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    for event in sse_events(&text) {
        if event == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&event).unwrap();
        for choice in chunk["choices"].as_array().unwrap() {
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_string());
            }
            for frag in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let i = frag["index"].as_u64().unwrap() as usize;
                if i == calls.len() {
                    calls.push((
                        frag["id"]
                            .as_str()
                            .expect("first fragment has the id")
                            .to_string(),
                        frag["function"]["name"]
                            .as_str()
                            .expect("first fragment has the name")
                            .to_string(),
                        String::new(),
                    ));
                } else {
                    assert!(
                        frag.get("id").is_none(),
                        "later fragments carry only the index"
                    );
                }
                calls[i]
                    .2
                    .push_str(frag["function"]["arguments"].as_str().unwrap_or(""));
            }
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(calls.len(), expected_calls.len());
    for ((_, name, args), expected) in calls.iter().zip(&expected_calls) {
        assert_eq!(name, expected["function"]["name"].as_str().unwrap());
        assert_eq!(args, expected["function"]["arguments"].as_str().unwrap());
        serde_json::from_str::<Value>(args).expect("arguments are a JSON string");
    }

    // n = 3: three choices, indices 0..3, in both modes.
    let mut body = chat_body("a", "Name a colour", false);
    body["n"] = json!(3);
    let whole: Value = http
        .post(format!("{}/chat/completions", gw.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let indices: Vec<u64> = whole["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, vec![0, 1, 2]);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = http
        .post(format!("{}/chat/completions", gw.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut content: HashMap<u64, String> = HashMap::new();
    let mut usage_chunks = 0;
    for event in sse_events(&text).iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        if chunk["usage"].is_object() {
            usage_chunks += 1;
            assert_eq!(chunk["choices"], json!([]));
        }
        for choice in chunk["choices"].as_array().unwrap() {
            let text = choice["delta"]["content"].as_str().unwrap_or("");
            content
                .entry(choice["index"].as_u64().unwrap())
                .or_default()
                .push_str(text);
        }
    }
    assert_eq!(usage_chunks, 1);
    for (i, choice) in whole["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            content[&(i as u64)],
            choice["message"]["content"].as_str().unwrap()
        );
    }
    gw.shutdown().await;
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "status {status}"
    );
    let body: Value = resp.json().await.unwrap();
    let err = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("OpenAI error shape: {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(err.contains_key(key), "error.{key} missing in {body}");
    }
    (status, body)
}

#[tokio::test]
async fn a_model_alias_with_slashes_is_answered_by_forge() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway(&config_text(
        &sim.base_url(),
        "",
        &[("meta-llama/Llama-3-8B", "gpt-4o")],
    ))
    .await;
    let http = client();
    let model = |path: &str| http.get(format!("{}/models/{path}", gw.base_url())).send();
    let seen = sim.request_count();
    let found: Value = model("meta-llama/Llama-3-8B")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["id"], "meta-llama/Llama-3-8B", "{found}");
    assert_eq!(found["object"], "model");
    let (status, err) = error_of(model("meta-llama/Llama-3-70B").await.unwrap()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    // Nor does another method reach the upstream (OpenAI's deletes a fine-tuned model).
    let deleted = http
        .delete(format!("{}/models/meta-llama/Llama-3-8B", gw.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 405);
    assert_eq!(sim.request_count(), seen, "none reached the upstream");
    gw.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_get_openai_shaped_400s_and_404s() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway(&config_text(&sim.base_url(), "", &[("a", "gpt-4o")])).await;
    let http = client();
    let url = format!("{}/chat/completions", gw.base_url());
    let cases: [(&str, u16, Option<&str>); 6] = [
        ("{not json", 400, None),
        (r#"{"messages":[{"role":"user","content":"x"}]}"#, 400, None),
        (r#"{"model":"a"}"#, 400, None),
        (r#"{"model":"a","messages":"hi"}"#, 400, None),
        (
            r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#,
            404,
            Some("model_not_found"),
        ),
        (
            r#"{"model":"a","model":"b","messages":[{"role":"user","content":"x"}]}"#,
            400,
            None,
        ),
    ];
    for (body, status, code) in cases {
        let resp = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (got, err) = error_of(resp).await;
        assert_eq!(got, status, "{body} -> {err}");
        if let Some(code) = code {
            assert_eq!(err["error"]["code"], code);
        }
    }
    // None of the refused requests reached the upstream.
    assert_eq!(sim.request_count(), 0);

    let (status, err) = error_of(
        http.get(format!("http://{}/nowhere", gw.addr()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("unknown_url"))
    );
    let (status, _) = error_of(http.get(&url).send().await.unwrap()).await;
    assert_eq!(status, 405);

    let models: Value = http
        .get(format!("{}/models", gw.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "a");
    gw.shutdown().await;
}

/// A raw chat request with `fields` after its own four (host, content type, length and
/// `connection: close`), and how many bytes its header names and values add up to.
fn request_with_fields(addr: std::net::SocketAddr, fields: &[(String, String)]) -> (String, usize) {
    let body = chat_body("a", "hi", false).to_string();
    let mut all = vec![
        ("host".to_string(), addr.to_string()),
        ("content-type".to_string(), "application/json".to_string()),
        ("content-length".to_string(), body.len().to_string()),
        ("connection".to_string(), "close".to_string()),
    ];
    all.extend_from_slice(fields);
    let bytes = all.iter().map(|(n, v)| n.len() + v.len()).sum();
    let head: String = all.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
    (
        format!("POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n{body}"),
        bytes,
    )
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_a_json_431_and_never_reach_the_upstream() {
    let sim = start_sim(SimConfig::default()).await;
    // The defaults: 100 header fields, 64 KiB of names and values.
    let gw = start_gateway(&config_text(&sim.base_url(), "", &[("a", "gpt-4o")])).await;
    let numbered = |n: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("x-h{i}"), "v".to_string()))
            .collect()
    };
    let padded_to = |total: usize| -> Vec<(String, String)> {
        let (_, base) = request_with_fields(gw.addr(), &[("x-big".into(), String::new())]);
        vec![("x-big".to_string(), "a".repeat(total - base))]
    };

    let at_limits = [numbered(96), padded_to(64 * 1024)];
    for fields in at_limits {
        let (request, bytes) = request_with_fields(gw.addr(), &fields);
        let answer = raw_request(gw.addr(), &request).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 "),
            "{} fields, {bytes} bytes: {answer:.300}",
            fields.len() + 4
        );
    }

    let over = [
        (numbered(97), "101 header fields, and the limit is 100"),
        (numbered(300), "304 header fields, and the limit is 100"),
        (
            padded_to(64 * 1024 + 1),
            "65537 bytes of header names and values",
        ),
        (
            padded_to(2 * 1024 * 1024),
            "bytes of header names and values, and the limit is 65536",
        ),
    ];
    for (fields, message) in over {
        let (request, _) = request_with_fields(gw.addr(), &fields);
        let answer = raw_request(gw.addr(), &request).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:.300}");
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.contains("content-type: application/json"), "{head}");
        let body: Value = serde_json::from_str(body).expect("a JSON body");
        assert_eq!(body["error"]["code"], "request_header_fields_too_large");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let text = body["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "{text}");
    }
    // Only the two requests within the limits reached the upstream.
    assert_eq!(sim.request_count(), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_failures_map_to_502_504_or_pass_through() {
    let slow = ModelBehavior {
        first_byte_delay: Duration::from_secs(5),
        ..ModelBehavior::default()
    };
    let stalls = trickle(Duration::from_secs(5), 3);
    let limited = ModelBehavior {
        fail_status: Some(429),
        ..ModelBehavior::default()
    };
    let breaks = ModelBehavior {
        error_after_chunks: Some(2),
        ..ModelBehavior::default()
    };
    let sim = start_sim(behaviors(&[
        ("slow", slow),
        ("stalls", stalls),
        ("limited", limited),
        ("breaks", breaks),
    ]))
    .await;

    // A port that was just bound and released: nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut text = config_text(
        &sim.base_url(),
        "",
        &[("limited", "limited"), ("breaks", "breaks")],
    );
    // Short timeouts only where a timeout is the point: on a loaded machine the other answers
    // may be slower than 300 ms to start.
    text.push_str(&format!(
        "\n[[upstreams]]\nname = \"short\"\nbase_url = \"{}\"\nfirst_byte_timeout_ms = 300\nidle_timeout_ms = 300\n",
        sim.base_url()
    ));
    for alias in ["slow", "stalls"] {
        text.push_str(&format!(
            "\n[[routes]]\nalias = \"{alias}\"\nteacher = {{ upstream = \"short\", model = \"{alias}\" }}\n"
        ));
    }
    text.push_str(&format!(
        "\n[[upstreams]]\nname = \"dead\"\nbase_url = \"http://{dead}/v1\"\n\n[[routes]]\nalias = \"dead\"\nteacher = {{ upstream = \"dead\", model = \"m\" }}\n"
    ));
    let gw = start_gateway(&text).await;
    let http = client();
    let url = format!("{}/chat/completions", gw.base_url());
    let post = |model: &str, stream: bool| {
        http.post(&url)
            .json(&chat_body(model, "hello", stream))
            .send()
    };

    let (status, err) = error_of(post("dead", false).await.unwrap()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (502, Some("upstream_unreachable"))
    );
    let (status, err) = error_of(post("slow", false).await.unwrap()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (504, Some("upstream_timeout"))
    );

    // The upstream's own error passes through untouched, headers included.
    let resp = post("limited", false).await.unwrap();
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let via = resp.text().await.unwrap();
    let direct = http
        .post(format!("{}/chat/completions", sim.base_url()))
        .json(&chat_body("limited", "hello", false))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(via, direct);

    // A mid-stream error event from the upstream reaches the client as sent.
    let text = post("breaks", true).await.unwrap().text().await.unwrap();
    let events = sse_events(&text);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["error"].is_object(), "{text}");
    assert!(!text.contains("[DONE]"));

    // A stream that stalls past the idle timeout ends with an OpenAI-style error event.
    let resp = post("stalls", true).await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let last: Value = serde_json::from_str(sse_events(&text).last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_refusing_forges_key_is_a_502_that_passes_none_of_its_answer_on() {
    // The simulated upstream wants a key that only the `keyed` upstream's variable holds.
    let key = std::env::var("PATH").unwrap();
    let forbidden = ModelBehavior {
        fail_status: Some(403),
        ..ModelBehavior::default()
    };
    let sim = start_sim(SimConfig {
        api_key: Some(key.clone()),
        ..behaviors(&[("forbidden", forbidden)])
    })
    .await;
    let mut text = config_text(&sim.base_url(), "", &[("keyless", "m")]);
    text.push_str(&format!(
        "\n[[upstreams]]\nname = \"keyed\"\nbase_url = \"{}\"\napi_key_env = \"PATH\"\n\n[[routes]]\nalias = \"keyed\"\nteacher = {{ upstream = \"keyed\", model = \"m\" }}\n\n[[routes]]\nalias = \"forbidden\"\nteacher = {{ upstream = \"keyed\", model = \"forbidden\" }}\n",
        sim.base_url()
    ));
    let gw = start_gateway(&text).await;
    let http = client();
    let url = format!("{}/chat/completions", gw.base_url());
    let post = |model: &str, stream: bool| {
        http.post(&url)
            .json(&chat_body(model, "hello", stream))
            .send()
    };
    assert_eq!(post("keyed", false).await.unwrap().status(), 200);

    let mut answers = Vec::new();
    for (alias, stream, status) in [
        ("keyless", false, 401),
        ("keyless", true, 401),
        ("forbidden", false, 403),
        ("forbidden", true, 403),
    ] {
        let resp = post(alias, stream).await.unwrap();
        assert_eq!(resp.headers()["x-should-retry"], "false", "{alias}");
        let (got, err) = error_of(resp).await;
        assert_eq!(
            (
                got,
                err["error"]["code"].as_str(),
                err["error"]["type"].as_str()
            ),
            (
                502,
                Some("upstream_credentials_refused"),
                Some("server_error")
            ),
            "{alias} stream {stream}: {err}"
        );
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("HTTP {status}")),
            "{err}"
        );
        answers.push(err.to_string());
    }
    // The passthrough goes out with the same key, and is answered the same way.
    let resp = http
        .post(format!("{}/embeddings", gw.base_url()))
        .json(&json!({"model": "m", "input": "hi"}))
        .send()
        .await
        .unwrap();
    let (got, err) = error_of(resp).await;
    assert_eq!(
        (got, err["error"]["code"].as_str()),
        (502, Some("upstream_credentials_refused"))
    );
    answers.push(err.to_string());
    // Each request reached the upstream and was refused there, but nothing of its answer (which
    // says the key is the client's, and for a wrong key shows part of it) reached the client.
    assert_eq!(sim.request_count(), 6);
    for answer in &answers {
        for upstream_words in ["API key", "Country", "region"] {
            assert!(!answer.contains(upstream_words), "{answer}");
        }
    }
    // The traces record what the clients saw.
    let counters = gw.settled_capture_counters().await;
    assert_eq!(counters.captured, 5);
    gw.shutdown().await;
}

#[tokio::test]
async fn body_limit_is_a_413_and_in_flight_cap_a_fast_503() {
    let held = ModelBehavior {
        first_byte_delay: Duration::from_secs(3),
        ..ModelBehavior::default()
    };
    let sim = start_sim(behaviors(&[("held", held)])).await;
    let gw = start_gateway(&config_text(
        &sim.base_url(),
        "max_body_bytes = 2048\nmax_in_flight = 2",
        &[("held", "held"), ("fast", "gpt-4o")],
    ))
    .await;
    let http = client();
    let url = format!("{}/chat/completions", gw.base_url());

    let big = chat_body("fast", &"x".repeat(4096), false);
    let (status, err) = error_of(http.post(&url).json(&big).send().await.unwrap()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (413, Some("request_too_large"))
    );
    // A chunked body with no Content-Length is cut off at the limit too.
    let chunks =
        futures_util::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![b' '; 512])));
    let resp = http
        .post(&url)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, 413);

    // Two slow requests hold both slots; the third is refused at once, not queued.
    let first = tokio::spawn(
        http.post(&url)
            .json(&chat_body("held", "one", false))
            .send(),
    );
    let second = tokio::spawn(
        http.post(&url)
            .json(&chat_body("held", "two", false))
            .send(),
    );
    eventually("both slow requests reach the upstream", || {
        sim.request_count() == 2
    })
    .await;
    let resp = http
        .post(&url)
        .json(&chat_body("fast", "three", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["retry-after"], "1");
    let (status, err) = error_of(resp).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (503, Some("overloaded"))
    );
    assert_eq!(
        sim.request_count(),
        2,
        "the refused request never reached the upstream"
    );
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(second.await.unwrap().unwrap().status(), 200);
    // Slots are released when the responses end.
    let resp = http
        .post(&url)
        .json(&chat_body("fast", "four", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_stream_holds_its_slot_until_it_ends() {
    // A minute of words: the stream is still running whatever the machine's pace.
    let trickle = trickle(Duration::from_millis(100), 600);
    let sim = start_sim(behaviors(&[("trickle", trickle)])).await;
    let gw = start_gateway(&config_text(
        &sim.base_url(),
        "max_in_flight = 1",
        &[("trickle", "trickle"), ("fast", "gpt-4o")],
    ))
    .await;
    let http = client();
    let url = format!("{}/chat/completions", gw.base_url());
    let mut stream = http
        .post(&url)
        .json(&chat_body("trickle", "long", true))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // Its headers are long sent, and some words too; the slot is still taken.
    let first = stream.chunk().await.unwrap().expect("a first event");
    assert!(first.starts_with(b"data: "));
    let fast = |prompt: &'static str| {
        http.post(&url)
            .json(&chat_body("fast", prompt, false))
            .send()
    };
    let (status, err) = error_of(fast("refused").await.unwrap()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (503, Some("overloaded"))
    );

    // The client goes away: the slot is free again.
    drop(stream);
    let start = tokio::time::Instant::now();
    loop {
        let resp = fast("served").await.unwrap();
        if resp.status() == 200 {
            break;
        }
        assert_eq!(resp.status(), 503);
        assert!(
            start.elapsed() < forge_tests::DEADLINE,
            "the slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_body_that_never_finishes_is_a_408_and_frees_its_slot() {
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway(&config_text(
        &sim.base_url(),
        "max_in_flight = 1\nbody_timeout_secs = 1",
        &[("fast", "gpt-4o")],
    ))
    .await;
    let answer = forge_tests::answer_to_a_stalled_body(
        gw.addr(),
        "POST /v1/chat/completions HTTP/1.1\r\nhost: forge\r\ncontent-type: application/json\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    // Its in-flight slot is free again: the cap is one.
    let resp = client()
        .post(format!("{}/chat/completions", gw.base_url()))
        .json(&chat_body("fast", "after the slow one", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn first_chunk_reaches_the_client_before_the_stream_ends() {
    let trickle = trickle(Duration::from_millis(150), 12);
    let sim = start_sim(behaviors(&[("trickle", trickle)])).await;
    let gw = start_gateway(&config_text(&sim.base_url(), "", &[("t", "trickle")])).await;
    let resp = client()
        .post(format!("{}/chat/completions", gw.base_url()))
        .json(&chat_body("t", "stream slowly", true))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let first_events = sse_events(&String::from_utf8_lossy(&first)).len();
    let mut all = first.to_vec();
    all.extend_from_slice(&rest);
    let total = sse_events(&String::from_utf8_lossy(&all)).len();
    // 12 words, 150 ms apart: a gateway that buffered would deliver them all in one piece.
    assert!(
        total >= 14,
        "role + 12 words + finish + [DONE], got {total}"
    );
    assert!(
        first_events <= 3,
        "first read held {first_events} of {total} events: the stream was buffered"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn body_fields_cannot_redirect_the_gateway() {
    let real = start_sim(SimConfig::default()).await;
    let attacker = start_sim(SimConfig::default()).await;
    let gw = start_gateway(&config_text(&real.base_url(), "", &[("a", "gpt-4o")])).await;
    let mut body = chat_body("a", "hi", false);
    for key in ["api_base", "base_url", "api_url", "endpoint"] {
        body[key] = json!(attacker.base_url());
    }
    let resp = client()
        .post(format!("{}/chat/completions", gw.base_url()))
        .header("authorization", "Bearer sk-client-secret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(attacker.request_count(), 0);
    assert_eq!(real.request_count(), 1);
    // The client's own key never travels upstream.
    let seen = &real.requests()[0];
    assert!(
        seen.headers
            .iter()
            .all(|(_, v)| !v.contains("sk-client-secret")),
        "{:?}",
        seen.headers
    );
    gw.shutdown().await;
}

/// An upstream that answers every request with a redirect to `to`, as a moved or compromised
/// endpoint might.
async fn redirecting_upstream(to: String) -> std::net::SocketAddr {
    let app = axum::Router::new().fallback(move || {
        let to = to.clone();
        async move {
            (
                http::StatusCode::TEMPORARY_REDIRECT,
                [(http::header::LOCATION, to)],
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn upstream_redirects_are_never_followed() {
    let attacker = start_sim(SimConfig::default()).await;
    let moved = redirecting_upstream(format!("{}/chat/completions", attacker.base_url())).await;
    let gw = start_gateway(&config_text(
        &format!("http://{moved}/v1"),
        "",
        &[("a", "gpt-4o")],
    ))
    .await;
    // A client that does not follow redirects either: what comes back is what the gateway did.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for stream in [false, true] {
        let resp = http
            .post(format!("{}/chat/completions", gw.base_url()))
            .json(&chat_body("a", "hi", stream))
            .send()
            .await
            .unwrap();
        let (status, err) = error_of(resp).await;
        assert_eq!(status, 502, "stream {stream}");
        assert_eq!(err["error"]["code"], "upstream_redirect");
    }
    // Other paths: a request with content (a prompt to embed) must not be sent on by a client
    // that follows redirects, so the redirect is an error as for chat; one without content
    // passes through as it is, the redirect included, but unfollowed.
    let with_content = http
        .post(format!("{}/embeddings", gw.base_url()))
        .json(&json!({"model": "a", "input": "hi"}))
        .send()
        .await
        .unwrap();
    let (status, err) = error_of(with_content).await;
    assert_eq!(status, 502);
    assert_eq!(err["error"]["code"], "upstream_redirect");
    let without = http
        .get(format!("{}/embeddings", gw.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(without.status(), 307);
    // Not one request, so not the upstream's key either, went where the redirect pointed.
    assert_eq!(attacker.request_count(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn other_v1_paths_pass_through_to_the_upstream() {
    let sim = start_sim(SimConfig::default()).await;
    // The account's files and jobs are the paths with bodies and bodyless POSTs to try.
    let gw = start_gateway(&config_text(
        &sim.base_url(),
        "passthrough_account_apis = true",
        &[("a", "gpt-4o")],
    ))
    .await;
    let http = client();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"{\"messages\":[]}\n".to_vec()).file_name("d.jsonl"),
        );
    let file: Value = http
        .post(format!("{}/files", gw.base_url()))
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(file["object"], "file", "{file}");
    let id = file["id"].as_str().unwrap();
    let listed = http
        .get(format!("{}/files", gw.base_url()))
        .send()
        .await
        .unwrap();
    assert!(!listed.headers().contains_key("openai-organization"));
    let content = http
        .get(format!("{}/files/{id}/content", gw.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(content.status(), 200);
    assert_eq!(
        content.bytes().await.unwrap().as_ref(),
        b"{\"messages\":[]}\n"
    );
    // The upstream's 404 for an unknown file passes through as it is.
    let resp = http
        .get(format!("{}/files/file-missing", gw.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, 404);
    // A bodyless POST (an SDK's cancel) keeps its Content-Length: 0.
    let seen = sim.request_count();
    http.post(format!("{}/fine_tuning/jobs/ftjob-x/cancel", gw.base_url()))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    let cancel = &sim.requests()[seen];
    assert!(
        cancel
            .headers
            .iter()
            .any(|(k, v)| k == "content-length" && v == "0"),
        "{:?}",
        cancel.headers
    );
    // What a client says of its address, of the path or method it meant, and its sticky key
    // stay here; its own headers of the request pass.
    let seen = sim.request_count();
    let mut asked = http.get(format!("{}/files", gw.base_url()));
    for name in [
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-prefix",
        "x-real-ip",
        "x-original-url",
        "x-http-method-override",
        "x-forge-sticky-key",
    ] {
        asked = asked.header(name, "/v1/elsewhere");
    }
    asked.header("x-app-trace", "kept").send().await.unwrap();
    let forwarded = &sim.requests()[seen];
    assert_eq!(forwarded.header("x-app-trace"), Some("kept"));
    for (name, _) in &forwarded.headers {
        assert!(
            !(name.starts_with("x-forwarded")
                || [
                    "forwarded",
                    "x-real-ip",
                    "x-original-url",
                    "x-http-method-override",
                    "x-forge-sticky-key"
                ]
                .contains(&name.as_str())),
            "{name} was forwarded"
        );
    }
    // Paths a server on the way could read as another path (with Forge's key attached), or
    // that would slip the chat endpoint past routing and capture, never leave.
    let seen = sim.request_count();
    for path in [
        "/v1/../admin/x",
        "/v1/%2e%2e/%2E%2E/internal",
        "/v1//chat/completions",
        "/v1/chat/completions/",
        "/v1/chat/completions;x",
    ] {
        let answer = raw_request(
            gw.addr(),
            &format!("GET {path} HTTP/1.1\r\nhost: forge\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(
            answer.contains("\"type\":\"invalid_request_error\""),
            "{path}: {answer}"
        );
    }
    assert_eq!(sim.request_count(), seen, "none reached the upstream");
    // A model id that is not UTF-8 once decoded gets a JSON 400 too.
    let answer = raw_request(
        gw.addr(),
        "GET /v1/models/%FF HTTP/1.1\r\nhost: forge\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("\"type\":\"invalid_request_error\""),
        "{answer}"
    );
    gw.shutdown().await;
}

/// Sends `request` as it is (no client normalises its path) and reads the whole answer.
async fn raw_request(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(forge_tests::DEADLINE, socket.read_to_end(&mut answer))
        .await
        .expect("an answer before the deadline")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn shutdown_refuses_new_connections_and_lets_streams_finish() {
    // 80 words, 100 ms apart: the streams are still running when the listener closes, on a
    // slow machine too.
    let trickle = trickle(Duration::from_millis(100), 80);
    let sim = start_sim(behaviors(&[("trickle", trickle)])).await;
    let gw = start_gateway(&config_text(
        &sim.base_url(),
        "shutdown_grace_secs = 60",
        &[("t", "trickle")],
    ))
    .await;
    let addr = gw.addr();
    let url = format!("{}/chat/completions", gw.base_url());
    let http = client();

    let mut streams = Vec::new();
    for i in 0..3 {
        let resp = http
            .post(&url)
            .json(&chat_body("t", &format!("stream {i}"), true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        streams.push(tokio::spawn(async move { resp.text().await.unwrap() }));
    }
    let shutdown = tokio::spawn(gw.shutdown());
    // The listener closes while the streams are still running.
    let start = tokio::time::Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            start.elapsed() < forge_tests::DEADLINE,
            "listener still accepting"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !shutdown.is_finished(),
        "shutdown returned before in-flight streams ended"
    );
    for stream in streams {
        let text = stream.await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "stream cut: {text}");
    }
    shutdown.await.unwrap();
}

#[tokio::test]
async fn account_apis_are_not_passed_through_unless_allowed() {
    let sim = start_sim(SimConfig::default()).await;
    for allowed in [false, true] {
        let server = format!("passthrough_account_apis = {allowed}");
        let gw = start_gateway(&config_text(&sim.base_url(), &server, &[("a", "gpt-4o")])).await;
        let http = client();
        // The distiller's uploads, every client's traces among them, live under the upstream
        // key's account.
        let files = http
            .get(format!("{}/files", gw.base_url()))
            .send()
            .await
            .unwrap();
        let job = http
            .get(format!("{}/fine_tuning/jobs/ftjob-x/events", gw.base_url()))
            .send()
            .await
            .unwrap();
        // vLLM's adapter loading: a client must not unload a canary's student.
        let unload = http
            .post(format!("{}/unload_lora_adapter", gw.base_url()))
            .json(&json!({"lora_name": "student"}))
            .send()
            .await
            .unwrap();
        // What the account stored of every client's exchanges: stored chat completions and
        // responses, read or deleted by id.
        let stored_chat = http
            .get(format!(
                "{}/chat/completions/chatcmpl-x/messages",
                gw.base_url()
            ))
            .send()
            .await
            .unwrap();
        let stored_response = http
            .delete(format!("{}/responses/resp_x", gw.base_url()))
            .send()
            .await
            .unwrap();
        // A computation that would build on another client's stored response.
        let continued = http
            .post(format!("{}/responses", gw.base_url()))
            .json(&json!({"model": "a", "input": "and then?", "previous_response_id": "resp_x"}))
            .send()
            .await
            .unwrap();
        // Generated videos, and credentials for sessions that would run outside Forge.
        let videos = http
            .get(format!("{}/videos", gw.base_url()))
            .send()
            .await
            .unwrap();
        let secret = http
            .post(format!("{}/realtime/client_secrets", gw.base_url()))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        // The same, by the ids of stored files, vector stores, containers and items.
        let mut by_id = Vec::new();
        for body in [
            json!({"model": "a", "input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["vs_x"]}]}),
            json!({"model": "a", "input": [{"type": "item_reference", "id": "msg_x"}]}),
            json!({"model": "a", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-x"}]}]}),
            json!({"model": "a", "input": "x", "tools": [{"type": "code_interpreter", "container": "cntr_x"}]}),
            json!({"model": "a", "input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file", "file_id": "file-x"}]}]}),
            json!({"model": "a", "input": "x", "prompt": {"id": "pmpt_x", "variables": {"doc": {"type": "input_file", "file_id": "file-x"}}}}),
            json!({"model": "a", "input": "x", "tools": [{"type": "image_generation", "input_image_mask": {"file_id": "file-x"}}]}),
            json!({"model": "a", "input": [{"id": "msg_x"}]}),
        ] {
            by_id.push(
                http.post(format!("{}/responses", gw.base_url()))
                    .json(&body)
                    .send()
                    .await
                    .unwrap(),
            );
        }
        // A chat message that names an earlier audio answer, stored on the account, by id.
        by_id.push(
            http.post(format!("{}/chat/completions", gw.base_url()))
                .json(&json!({"model": "a", "messages": [
                    {"role": "assistant", "audio": {"id": "audio_x"}},
                    {"role": "user", "content": "and again?"},
                ]}))
                .send()
                .await
                .unwrap(),
        );
        // A chat message that names a file on the account by id, its key spelt plainly or not.
        for key in ["file_id", "file\\u005fid"] {
            let body = format!(
                r#"{{"model":"a","messages":[{{"role":"user","content":[{{"type":"text","text":"sum it up"}},{{"type":"file","file":{{"{key}":"file-x"}}}}]}}]}}"#
            );
            by_id.push(
                http.post(format!("{}/chat/completions", gw.base_url()))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap(),
            );
        }
        // The same APIs in another case, for upstreams whose routers ignore it.
        let mut cased = Vec::new();
        for path in [
            "Files",
            "FILES/file-x/content",
            "chat/Completions/chatcmpl-x",
        ] {
            cased.push(
                http.get(format!("{}/{path}", gw.base_url()))
                    .send()
                    .await
                    .unwrap(),
            );
        }
        // Forge's own routes in another case would reach the upstream past routing and capture.
        for path in ["Chat/Completions", "Models"] {
            let resp = http
                .post(format!("{}/{path}", gw.base_url()))
                .json(&chat_body("a", "hi", false))
                .send()
                .await
                .unwrap();
            let (status, err) = error_of(resp).await;
            assert_eq!(status, 400, "{path}: {err}");
            assert!(
                err["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("another case"),
                "{err}"
            );
        }
        // Together's fine-tuning jobs, their weights, and its billed dedicated endpoints.
        let mut together = Vec::new();
        for path in ["fine-tunes", "finetune/download?ft_id=ft-x", "endpoints"] {
            together.push(
                http.get(format!("{}/{path}", gw.base_url()))
                    .send()
                    .await
                    .unwrap(),
            );
        }
        let others = [
            job,
            unload,
            stored_chat,
            stored_response,
            continued,
            videos,
            secret,
        ]
        .into_iter()
        .chain(by_id)
        .chain(cased)
        .chain(together);
        if allowed {
            assert_eq!(files.status(), 200);
            for resp in others {
                assert_ne!(resp.status(), 403);
            }
        } else {
            // A body read twice ways, or with a byte order mark, could hide the field from
            // the check and not from the upstream: refused as unreadable.
            for body in [
                r#"{"model":"a","input":"x","previous_response_id":null,"previous_response_id":"resp_x"}"#,
                "\u{feff}{\"model\":\"a\",\"input\":\"x\",\"previous_response_id\":\"resp_x\"}",
            ] {
                let resp = http
                    .post(format!("{}/responses", gw.base_url()))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let (status, err) = error_of(resp).await;
                assert_eq!(status, 400, "{body}: {err}");
            }
            for resp in std::iter::once(files).chain(others) {
                let (status, err) = error_of(resp).await;
                assert_eq!(status, 403);
                assert_eq!(err["error"]["code"], "passthrough_refused");
                assert_eq!(err["error"]["type"], "invalid_request_error");
            }
        }
        // A function of the client's own whose parameters include a `file_id`, and a file sent
        // inline, are not references to the account's files: they pass either way.
        let own_schema = http
            .post(format!("{}/responses", gw.base_url()))
            .json(&json!({
                "model": "a",
                "input": [{"role": "user", "content": [{"type": "input_file", "filename": "a.txt", "file_data": "data:text/plain;base64,aGk="}]}],
                "tools": [{"type": "function", "name": "get_file", "parameters": {"type": "object", "properties": {"file_id": {"type": "string"}, "container": {"type": "string"}}}}],
            }))
            .send()
            .await
            .unwrap();
        assert_ne!(own_schema.status(), 403);
        let inline_file = http
            .post(format!("{}/chat/completions", gw.base_url()))
            .json(&json!({
                "model": "a",
                "messages": [{"role": "user", "content": [{"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}}]}],
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(inline_file.status(), 200);
        // Computations and the model list pass either way.
        let embeddings = http
            .post(format!("{}/embeddings", gw.base_url()))
            .json(&json!({"model": "a", "input": "hi"}))
            .send()
            .await
            .unwrap();
        assert_ne!(embeddings.status(), 403);
        for path in ["responses", "responses/input_tokens"] {
            let response = http
                .post(format!("{}/{path}", gw.base_url()))
                .json(&json!({"model": "a", "input": "hi", "previous_response_id": null}))
                .send()
                .await
                .unwrap();
            assert_ne!(response.status(), 403, "{path}");
        }
        let models = http
            .get(format!("{}/models", gw.base_url()))
            .send()
            .await
            .unwrap();
        assert_ne!(models.status(), 403);
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn every_v1_answer_is_counted_refusals_included() {
    let held = ModelBehavior {
        first_byte_delay: Duration::from_secs(2),
        ..ModelBehavior::default()
    };
    let sim = start_sim(behaviors(&[("held", held)])).await;
    let text = format!(
        "{}{}",
        config_text(
            &sim.base_url(),
            "max_in_flight = 1",
            &[("held", "held"), ("fast", "gpt-4o")]
        ),
        forge_tests::clients_toml(&[("app", None, "sk-app-0123456789")])
    );
    let gw = start_gateway(&text).await;
    let http = client();
    let url = format!("{}/chat/completions", gw.base_url());
    let unauthenticated = http
        .post(&url)
        .json(&chat_body("fast", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let first = tokio::spawn(
        http.post(&url)
            .bearer_auth("sk-app-0123456789")
            .json(&chat_body("held", "one", false))
            .send(),
    );
    eventually("the slow request reaches the upstream", || {
        sim.request_count() == 1
    })
    .await;
    let overloaded = http
        .post(&url)
        .bearer_auth("sk-app-0123456789")
        .json(&chat_body("fast", "two", false))
        .send()
        .await
        .unwrap();
    assert_eq!(overloaded.status(), 503);
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    let feedback = http
        .post(format!("{}/feedback", gw.base_url()))
        .bearer_auth("sk-app-0123456789")
        .json(&json!({"trace_id": "not-an-id", "score": 50}))
        .send()
        .await
        .unwrap();
    let feedback_status = feedback.status().as_u16();
    for (model, status) in [("fast", 200), ("no-such-alias", 404)] {
        let answer = http
            .get(format!("{}/models/{model}", gw.base_url()))
            .bearer_auth("sk-app-0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), status);
    }
    let metrics = http
        .get(format!("http://{}/metrics", gw.addr()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |endpoint: &str, status: u16| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "forge_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} "
                ))
            })
            .map(|n| n.parse::<u64>().unwrap())
    };
    assert_eq!(count("chat", 401), Some(1), "{metrics}");
    assert_eq!(count("chat", 503), Some(1), "{metrics}");
    assert_eq!(count("chat", 200), Some(1), "{metrics}");
    assert_eq!(count("feedback", feedback_status), Some(1), "{metrics}");
    assert_eq!(count("models", 200), Some(1), "{metrics}");
    assert_eq!(count("models", 404), Some(1), "{metrics}");
    assert_eq!(count("passthrough", 200), None, "{metrics}");
    assert_eq!(count("passthrough", 404), None, "{metrics}");
    gw.shutdown().await;
}
