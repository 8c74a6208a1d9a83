//! `husk-vmm`: runs one husk microVM until the guest powers off (resets),
//! a stop is requested on the control socket, or SIGTERM/SIGINT arrives.
//!
//! Exit status: 0 for an orderly end, 1 for a guest or vCPU failure, 2 when
//! the VM could not be built (the message says which step failed and why).

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use husk_vmm_core::{config::guest_dir, vmm::take_termination_signals, VmConfig, Vmm, VsockConfig};

#[derive(Debug, Parser)]
#[command(version, about = "Run one husk microVM")]
struct Args {
    /// Uncompressed vmlinux with a PVH entry point [default: <guest dir>/vmlinux].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs [default: <guest dir>/initramfs.cpio]; "none" for none.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Extra kernel command line words.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Write the guest's serial console here (off by default).
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Guest vsock CID (needs --vsock-uds).
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// Host Unix socket of the hybrid vsock device.
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Control API socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// The KVM device node.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Run without seccomp filters (debugging only, e.g. under strace).
    #[arg(long)]
    no_seccomp: bool,
    /// Start from this snapshot (taken by `{"action":"snapshot"}` on the
    /// API) instead of booting. If it cannot be used (corrupt, another husk
    /// version or CPU, another VM shape) the VM boots cold instead, saying why.
    #[arg(long)]
    restore_from: Option<PathBuf>,
    /// With --restore-from: fail instead of booting cold.
    #[arg(long)]
    no_cold_boot_fallback: bool,
    /// Boot, write a template snapshot here when the agent is ready, and
    /// exit 0 (needs --vsock-uds).
    #[arg(long, conflicts_with = "restore_from")]
    make_template: Option<PathBuf>,
    /// Log filter (tracing syntax), e.g. "info" or "husk_vmm_core=debug".
    #[arg(long, default_value = "info")]
    log: String,
}

fn print_error_chain(e: &anyhow::Error) {
    eprintln!("husk-vmm: error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Before any thread exists, so every thread inherits the blocked mask.
    let signals = take_termination_signals();
    match run(args, signals) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            print_error_chain(&e);
            std::process::exit(2);
        }
    }
}

fn run(args: Args, signals: Option<nix::sys::signalfd::SignalFd>) -> Result<i32> {
    let dir = guest_dir();
    let initramfs = match args.initramfs {
        Some(p) if p.as_os_str() == "none" => None,
        Some(p) => Some(p),
        None => Some(dir.join("initramfs.cpio")),
    };
    let config = VmConfig {
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        kernel: args.kernel.unwrap_or_else(|| dir.join("vmlinux")),
        initramfs,
        extra_cmdline: args.cmdline,
        serial_log: args.serial_log,
        vsock: args.vsock_uds.map(|uds_path| VsockConfig {
            guest_cid: args.vsock_cid,
            uds_path,
        }),
        api_socket: args.api_socket,
        kvm_device: args.kvm_device,
        seccomp: !args.no_seccomp,
        restore_from: args.restore_from,
        make_template: args.make_template,
    };
    // A snapshot is refused before any guest state exists, so falling back
    // to a cold boot with the same devices is safe.
    let vmm = match Vmm::build(config.clone(), signals) {
        Err(husk_vmm_core::VmmError::Restore(e)) if !args.no_cold_boot_fallback => {
            tracing::warn!(
                "snapshot refused, booting cold instead: {}",
                husk_vmm_core::error_chain(&e)
            );
            let cold = VmConfig {
                restore_from: None,
                ..config
            };
            Vmm::build(cold, take_termination_signals())?
        }
        other => other?,
    };
    tracing::info!(cmdline = %vmm.cmdline, "starting the VM");
    let reason = vmm.run()?;
    tracing::info!("VM ended: {reason}");
    if reason.exit_code() != 0 {
        eprintln!("husk-vmm: {reason}");
    }
    Ok(reason.exit_code())
}
