//! `latency-relay`: a TCP relay that delays every byte by the one-way time
//! of its link, chosen by the connection's source address (see
//! `failsafe_harness::relay`). Chaos starts one in front of each host, in the
//! host's network namespace, to put the hosts and mounts in cities on one
//! machine. Stops on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use failsafe_harness::relay::{LinkSource, Relay};

#[derive(Parser)]
#[command(about = "Relays TCP connections, delaying each link by its one-way time")]
struct Args {
    /// Address to accept connections on, e.g. 0.0.0.0:7000.
    #[arg(long)]
    listen: SocketAddr,
    /// Where to forward them, e.g. 127.0.0.1:7001.
    #[arg(long)]
    to: SocketAddr,
    /// The links file: `SOURCE-IP ONE-WAY-MS` per line, `default MS` for any
    /// other source; re-read when it changes.
    #[arg(long)]
    links: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latency-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // One thread moves gigabytes a second; the hosts need the other cores.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let links = LinkSource::file(&args.links)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let relay = Relay::start(listener, args.to, links)?;
        eprintln!(
            "latency-relay: {} -> {}, links from {}",
            relay.local_addr(),
            args.to,
            args.links.display()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        relay.shutdown().await;
        Ok(())
    })
}
