//! The `forge` binary: parses the command line and runs the chosen command.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use forge_gateway::cli::{dataset, jobs, routes, traces};
use forge_gateway::config::Config;
use forge_gateway::env::{ENV_FORGE_CONFIG, ENV_FORGE_LOG};
use forge_gateway::sim::{SimConfig, SimUpstream};

// A proxy allocates a little per request on every thread; glibc's malloc was a tenth of the
// load bench's profile, mimalloc's thread-local heaps make that cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "forge",
    version,
    about = "An OpenAI-compatible LLM gateway that distills its own traffic."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole loop on the built-in simulated upstream, in under a minute, with no keys.
    Demo,
    /// Run the gateway. With no config, an embedded default on the simulated upstream.
    Serve {
        /// The config file (forge.toml).
        #[arg(long, env = ENV_FORGE_CONFIG)]
        config: Option<PathBuf>,
        /// Print the embedded default config and exit.
        #[arg(long)]
        print_default_config: bool,
    },
    /// Read captured traces: from the data directory, or a running gateway's admin API.
    Traces {
        #[command(subcommand)]
        action: traces::Action,
        /// The data directory (`capture.data_dir`). The gateway must be stopped to read it.
        #[arg(
            long,
            global = true,
            default_value = "forge-data",
            conflicts_with = "admin"
        )]
        data_dir: PathBuf,
        /// A running gateway's admin API, e.g. http://127.0.0.1:8081 (token from FORGE_ADMIN_TOKEN).
        #[arg(long, global = true)]
        admin: Option<String>,
    },
    /// Build a fine-tuning dataset from the store by hand (the gateway must be stopped).
    Dataset {
        #[command(subcommand)]
        action: DatasetAction,
    },
    /// Distillation jobs and the model registry of a running gateway (admin API).
    Jobs {
        #[command(subcommand)]
        action: jobs::Action,
        /// The admin API's address.
        #[arg(long, global = true, default_value = "http://127.0.0.1:8081")]
        admin: String,
    },
    /// Show or steer the routing table of a running gateway (admin API; token from FORGE_ADMIN_TOKEN).
    Routes {
        #[command(subcommand)]
        action: routes::Action,
        /// The admin API's address.
        #[arg(long, global = true, default_value = "http://127.0.0.1:8081")]
        admin: String,
    },
    /// Run the simulated OpenAI-compatible upstream on its own.
    SimUpstream {
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
        /// A TOML file of model behaviours and fine-tuning timings.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum DatasetAction {
    /// Stream the golden traces of a route into validated JSONL, with a manifest.
    Export(dataset::Export),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo prints its own timeline; the gateway's logs would drown it unless asked for.
    let default_filter = if matches!(cli.command, Command::Demo) {
        "warn"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env(ENV_FORGE_LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Logs go to stderr: stdout carries only what a command prints for its user.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match cli.command {
        Command::Serve {
            print_default_config: true,
            ..
        } => {
            forge_gateway::cli::print_line(forge_gateway::config::DEFAULT_CONFIG.trim_end())?;
            Ok(())
        }
        Command::Serve { config, .. } => serve(config).await,
        Command::Demo => forge_gateway::demo::run().await,
        Command::SimUpstream { listen, config } => sim_upstream(listen, config).await,
        Command::Dataset {
            action: DatasetAction::Export(export),
        } => tokio::task::spawn_blocking(move || dataset::run(export)).await?,
        Command::Jobs { action, admin } => {
            jobs::run(&admin, action).await.map_err(anyhow::Error::msg)
        }
        Command::Routes { action, admin } => routes::run(&admin, action)
            .await
            .map_err(anyhow::Error::msg),
        Command::Traces {
            action,
            data_dir,
            admin,
        } => {
            let source = match admin {
                Some(url) => traces::Source::Admin(url),
                None => traces::Source::DataDir(data_dir),
            };
            match traces::run(source, action).await {
                // The reader has gone (`forge traces list | head`): done, not failed.
                Err(traces::TracesError::Output(e))
                    if e.kind() == std::io::ErrorKind::BrokenPipe =>
                {
                    Ok(())
                }
                done => Ok(done?),
            }
        }
    }
}

async fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = match &path {
        Some(path) => Config::load(path)?,
        None => {
            tracing::info!(
                "no --config given: running the embedded default on the simulated upstream"
            );
            Config::embedded_default()?
        }
    };
    let gateway = forge_gateway::server::start(config).await?;
    // Listening for the signals before saying "ready": a SIGTERM sent as soon as the line
    // appears must drain, not kill.
    let signal = shutdown_signal();
    println!(
        "Forge is ready. Point your OpenAI client's base_url at {}",
        gateway.base_url()
    );
    signal.await;
    tracing::info!("signal received: draining");
    gateway.shutdown().await;
    Ok(())
}

async fn sim_upstream(listen: SocketAddr, path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = match &path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            SimConfig::from_toml_str(&text)
                .map_err(|e| anyhow::anyhow!("invalid sim config: {e}"))?
        }
        None => SimConfig::default(),
    };
    let sim = SimUpstream::start(config, listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let signal = shutdown_signal();
    println!("Simulated upstream listening at {}", sim.base_url());
    signal.await;
    sim.shutdown().await;
    Ok(())
}

/// Listens for SIGINT (Ctrl-C) and SIGTERM from now on, not from the first poll; the future
/// resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{Signal, SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        let wait = |s: std::io::Result<Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        async move {
            tokio::select! {
                () = wait(interrupt) => {}
                () = wait(terminate) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
