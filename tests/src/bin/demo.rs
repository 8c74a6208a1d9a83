//! `husk-demo`: boots a husk microVM, waits for its agent to announce itself
//! over vsock, asks it for its version and health, and shuts it down.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use husk_e2e::{require_kvm, Artifacts, TestDir, VmOptions, VmProcess};
use husk_protocols::{
    agent::{HealthRequest, ShutdownRequest, VersionRequest},
    connect_agent,
};

#[derive(Debug, Parser)]
#[command(about = "Boot a husk microVM and talk to its agent")]
struct Args {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Print the guest's serial console at the end.
    #[arg(long)]
    console: bool,
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    require_kvm();
    let artifacts = Artifacts::locate()?;
    let dir = TestDir::new("demo")?;
    println!(
        "husk demo: booting {} + {} in husk-vmm ({} MiB, 1 vCPU)",
        artifacts.kernel.display(),
        artifacts.initramfs.display(),
        args.mem_mib
    );
    let mut vm = VmProcess::spawn(
        &artifacts,
        dir.path(),
        &VmOptions {
            mem_mib: args.mem_mib,
            serial: args.console,
            ..Default::default()
        },
    )?;
    let ready = match vm.wait_ready(Duration::from_secs(600)).await {
        Ok(r) => r,
        Err(e) => bail!("{e:#}\n{}", vm.log_text()),
    };
    println!(
        "husk demo: agent ready after {:.2} s (announced over vsock: agent {}, API {})",
        ready.elapsed.as_secs_f64(),
        ready.agent_version,
        ready.api_version
    );
    let client = connect_agent(&vm.vsock, Duration::from_secs(30))
        .await
        .context("connecting to the agent")?;
    let v = client
        .version(ctx(), &VersionRequest::new())
        .await
        .context("Version")?;
    println!(
        "husk demo: Version -> agent {}, API {}, guest kernel {} ({}), guest uptime {:.1} s",
        v.agent_version, v.api_version, v.kernel_release, v.kernel_version, v.uptime_seconds
    );
    let h = client
        .health(ctx(), &HealthRequest::new())
        .await
        .context("Health")?;
    println!(
        "husk demo: Health -> {:?}",
        h.status.enum_value_or_default()
    );
    let t = Instant::now();
    client
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .context("Shutdown")?;
    let status = vm.wait_exit(Duration::from_secs(60)).await?;
    println!(
        "husk demo: Shutdown -> husk-vmm exited with {status} after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    if args.console {
        println!(
            "--- guest serial console ---\n{}",
            std::fs::read_to_string(dir.path().join("serial.log")).unwrap_or_default()
        );
    }
    if !status.success() {
        bail!("husk-vmm did not exit cleanly:\n{}", vm.log_text());
    }
    Ok(())
}
