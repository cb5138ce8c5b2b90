//! Forge: an OpenAI-compatible LLM gateway that distills its own traffic.
//!
//! This crate is the HTTP side: config, the proxy and its tower stack, upstream clients,
//! metrics, the CLI, and the simulated upstream that the demo, tests and benches run against.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = forge_gateway::config::Config::embedded_default()?;
//! let gateway = forge_gateway::server::start(config).await?;
//! println!("point your OpenAI SDK at {}", gateway.base_url());
//! gateway.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod demo;
pub mod distill;
pub mod env;
pub mod error;
pub mod extract;
pub mod head_limit;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod sim;
pub mod upstream;
