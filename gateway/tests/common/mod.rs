//! Starting the real `forge` binary for the tests that run it as an operator would.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const FORGE: &str = env!("CARGO_BIN_EXE_forge");

/// The running gateway; killed if a test fails half-way, so no gateway outlives its test.
pub struct Forge(pub Child);

impl Drop for Forge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `forge serve` on `config` (written to `dir/forge.toml`) with `env`, its stderr in
/// `dir/forge.log`; returns it and the proxy base URL it printed.
pub fn serve(config: &str, dir: &Path, env: &[(&str, &str)]) -> (Forge, String) {
    let path = dir.join("forge.toml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join("forge.log")).unwrap();
    let mut child = Command::new(FORGE)
        .args(["serve", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let forge = Forge(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| {
            let log = std::fs::read_to_string(dir.join("forge.log")).unwrap_or_default();
            panic!("no URL in {line:?}; the log:\n{log}")
        })
        .to_string();
    (forge, url)
}

/// A figure from `/proc/PID/status` of process `pid` (`VmRSS`, `VmHWM`), in bytes.
#[allow(dead_code)] // Each test crate uses the helpers it needs.
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    kib * 1024
}

/// The capture counters from the gateway's `/metrics` at `root`: eligible, captured, dropped,
/// failed.
#[allow(dead_code)]
pub async fn capture_counters(http: &reqwest::Client, root: &str) -> [u64; 4] {
    let text = http
        .get(format!("{root}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    ["eligible", "captured", "dropped", "failed"].map(|name| {
        let prefix = format!("forge_capture_{name}_total ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{prefix} in /metrics"))
    })
}
