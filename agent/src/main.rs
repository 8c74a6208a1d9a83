//! `husk-agent`: PID 1 of a husk microVM.
//!
//! The agent is the only process the guest kernel starts. It makes the guest
//! usable for containers (mounts, zombie reaping), serves the agent API over
//! ttrpc on vsock port 1024, and tells the host it is ready by connecting out
//! to a host vsock port, so the host never has to poll the guest.
//!
//! PID 1 must never exit (the kernel panics when it does): every fatal error
//! is logged and turned into an orderly VM reset instead.

mod cgroups;
mod codemap;
mod container;
mod forward;
mod helper;
mod identity;
mod init;
mod listener;
mod network;
mod podns;
mod reaper;
mod rpc;
mod rtnl;
mod runtime;
mod settings;
mod volumes;

use std::time::Duration;

use anyhow::{Context, Result};
use husk_protocols::{agent_ttrpc, ready_line, AGENT_VSOCK_PORT, HOST_CID, READY_VSOCK_PORT};
use tokio::{io::AsyncWriteExt, sync::mpsc};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

use crate::settings::Settings;

/// The agent's version, reported by `Version` and in the readiness line.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("runtime") {
        // The container runtime helper (see `runtime`), started by the agent.
        std::process::exit(runtime::main(&argv[2..]));
    }
    if argv.get(1).map(String::as_str) == Some(helper::SERVER_ARG) {
        // The runtime helper server (see `helper`), started by the agent.
        std::process::exit(helper::serve(&argv[2..]));
    }
    let is_init = std::process::id() == 1;
    if is_init {
        init::early_setup();
    }
    let settings = Settings::from_kernel_cmdline();
    init_logging(&settings);
    // The first line on the console: boot benchmarks use it as their marker.
    eprintln!("husk-agent {AGENT_VERSION} starting");

    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(run(settings, is_init)));

    let code = match result {
        Ok(()) => {
            tracing::info!("shutting down");
            0
        }
        Err(e) => {
            tracing::error!("fatal: {e:#}");
            1
        }
    };
    if is_init {
        init::power_off();
    }
    std::process::exit(code);
}

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_ansi(false)
        .with_target(false)
        .init();
}

async fn run(settings: Settings, is_init: bool) -> Result<()> {
    // PID 1 inherits every orphan; outside a VM the agent still reaps its
    // own children (the runtime helper) this way.
    init::spawn_reaper().context("installing the SIGCHLD reaper")?;

    let (shutdown_tx, mut shutdown_rx) = mpsc::channel::<()>(1);
    let service = rpc::AgentService::new(shutdown_tx);
    let services = agent_ttrpc::create_agent(std::sync::Arc::new(service));
    let port = settings.agent_port;
    let vsock = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
        .with_context(|| format!("listening on vsock port {port}"))?;
    // Only the host may use the API (`listener`).
    let incoming =
        ttrpc::r#async::transport::Listener::new(listener::host_connections(vsock, port));
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(incoming)
        .register_service(services);
    server.start().await.context("starting the ttrpc server")?;
    tracing::info!(port, "agent API listening (host connections only)");
    if settings.selfcheck_local_api {
        tokio::spawn(listener::self_check_local_api(port));
    }
    // Bound before readiness, so a template's guest has it too.
    tokio::spawn(async {
        if let Err(e) = forward::serve().await {
            tracing::warn!("port forwarding is unavailable: {e}");
        }
    });

    // Before readiness, so that a template's guest holds it started.
    let since = std::time::Instant::now();
    match tokio::task::spawn_blocking(helper::start_server).await {
        Ok(Ok(pid)) => tracing::info!(
            pid,
            ms = since.elapsed().as_millis(),
            "runtime helper server ready"
        ),
        Ok(Err(e)) => tracing::warn!("{e}; each operation starts the helper binary"),
        Err(e) => tracing::warn!("starting the runtime helper server: {e}"),
    }

    if let Err(e) = announce_ready(settings.ready_port).await {
        // The host may have given up waiting; the API still works, so keep
        // serving rather than taking the VM down.
        tracing::warn!("could not announce readiness: {e:#}");
    }

    shutdown_rx.recv().await;
    tracing::info!("shutdown requested");
    // Give the Shutdown reply time to leave before the listener goes away.
    tokio::time::sleep(Duration::from_millis(20)).await;
    server.shutdown().await.ok();
    if is_init {
        init::stop_all_processes().await;
    }
    Ok(())
}

/// Connects to the host's readiness port and sends the readiness line.
async fn announce_ready(port: u32) -> Result<()> {
    let line = ready_line(AGENT_VERSION);
    let mut last_err = None;
    // The host listens before it starts the VM, so the first try normally
    // succeeds; a few retries cover a host that is slow to accept.
    for attempt in 0..5u32 {
        match VsockStream::connect(VsockAddr::new(HOST_CID, port)).await {
            Ok(mut stream) => {
                stream
                    .write_all(line.as_bytes())
                    .await
                    .context("writing the readiness line")?;
                AsyncWriteExt::shutdown(&mut stream).await.ok();
                tracing::info!(port, "readiness announced");
                return Ok(());
            }
            Err(e) => {
                last_err = Some(e);
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
        }
    }
    Err(anyhow::anyhow!(
        "connecting to host vsock port {port}: {}",
        last_err.map_or_else(|| "no attempt".to_string(), |e| e.to_string())
    ))
}

#[allow(dead_code)]
const _: () = {
    assert!(AGENT_VSOCK_PORT == 1024);
    assert!(READY_VSOCK_PORT == 1025);
};
