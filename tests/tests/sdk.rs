//! The official OpenAI Python SDK, unchanged, against Forge: it must behave as it does against OpenAI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use forge_gateway::sim::SimConfig;
use forge_tests::{config_text, start_gateway, start_sim};

/// A virtualenv under `target/` with the `openai` package, made once and reused.
fn python_with_openai() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let venv = target.join("sdk-venv");
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is needed for the SDK test");
        assert!(made.success(), "python3 -m venv failed");
        let installed = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai>=1.40,<3",
            ])
            .status()
            .unwrap();
        assert!(
            installed.success(),
            "pip install openai failed (the registry must be reachable)"
        );
    }
    assert!(ready(), "openai is not importable in {}", venv.display());
    python
}

const SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="sk-app-key", max_retries=0)
out = {}

r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "What is a proxy?"}])
out["text"] = r.choices[0].message.content
out["finish"] = r.choices[0].finish_reason

parts, usage = [], None
for chunk in client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "What is a proxy?"}],
        stream=True, stream_options={"include_usage": True}):
    if chunk.usage:
        usage = chunk.usage.total_tokens
    for c in chunk.choices:
        parts.append(c.delta.content or "")
out["streamed"] = "".join(parts)
out["usage"] = usage

tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "look this up"}], tools=tools)
call = r.choices[0].message.tool_calls[0]
out["tool"] = [call.function.name, json.loads(call.function.arguments) is not None]

try:
    client.chat.completions.create(model="no-such-alias", messages=[{"role": "user", "content": "x"}])
    out["not_found"] = "no error"
except openai.NotFoundError as e:
    out["not_found"] = e.code

out["models"] = sorted(m.id for m in client.models.list())
print(json.dumps(out))
"#;

#[tokio::test]
async fn openai_python_sdk_works_unchanged() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let sim = start_sim(SimConfig::default()).await;
    let gw = start_gateway(&config_text(
        &sim.base_url(),
        "",
        &[("gpt-4o", "gpt-4o"), ("mini", "gpt-4o-mini")],
    ))
    .await;
    let base = gw.base_url();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python).args(["-c", SCRIPT, &base]).output()
    })
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "SDK script failed:\n{stderr}");
    let out: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    let text = out["text"].as_str().unwrap();
    assert!(!text.is_empty());
    assert_eq!(out["finish"], "stop");
    assert_eq!(
        out["streamed"], text,
        "streamed content equals the non-stream answer"
    );
    assert!(out["usage"].as_u64().unwrap() > 0);
    assert_eq!(out["tool"], serde_json::json!(["lookup", true]));
    assert_eq!(out["not_found"], "model_not_found");
    assert_eq!(out["models"], serde_json::json!(["gpt-4o", "mini"]));
    gw.shutdown().await;
}
