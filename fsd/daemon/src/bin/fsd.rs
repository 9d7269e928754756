//! fsd: the storage daemon of one host.

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use failsafe_fsd::{Config, RawConfig};

/// The failsafe storage daemon: a tracker member and a block store.
///
/// Every option can be set in the TOML file given with --config (same names,
/// with underscores) or as a flag; flags win.
#[derive(Parser)]
#[command(name = "fsd", version)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(flatten)]
    raw: RawConfig,
}

fn main() {
    failsafe_cli::generate_if_asked(Args::command, "8");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    if let Err(e) = start() {
        eprintln!("fsd: {e:#}");
        std::process::exit(1);
    }
}

fn start() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = Config::load(args.config.as_deref(), args.raw)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("listen: binding {}", cfg.listen))?;
        let local = listener.local_addr()?;
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("data_dir: creating {}", cfg.data_dir.display()))?;
        // Where scripts and test harnesses find the port when it was 0.
        std::fs::write(cfg.data_dir.join("fsd.addr"), format!("{local}\n"))?;
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
        };
        failsafe_fsd::run(cfg, listener, shutdown).await
    })
}
