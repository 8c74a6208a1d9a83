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
    /// vhost-user socket of a virtio-fs daemon (husk-virtiofsd) to attach.
    #[arg(long)]
    fs_socket: Option<PathBuf>,
    /// The virtio-fs tag the guest mounts by.
    #[arg(long, default_value = "husk")]
    fs_tag: String,
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
    /// Template start: restore from the template in this directory that
    /// matches this VM (guest image, command line, shape, husk version),
    /// making it first (one boot) if there is none. A template that cannot
    /// be used is removed and the VM boots cold.
    #[arg(long, conflicts_with_all = ["restore_from", "make_template"])]
    template_dir: Option<PathBuf>,
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
        fs: args
            .fs_socket
            .map(|socket| husk_vmm_core::config::FsConfig {
                socket,
                tag: args.fs_tag.clone(),
            }),
        kvm_device: args.kvm_device,
        seccomp: !args.no_seccomp,
        restore_from: args.restore_from,
        make_template: args.make_template,
    };
    let mut config = config;
    let template = match &args.template_dir {
        Some(dir) => {
            let path = ensure_template(&config, dir)?;
            config.restore_from = Some(path.clone());
            Some(path)
        }
        None => None,
    };
    // A snapshot is refused before any guest state exists, so falling back
    // to a cold boot with the same devices is safe.
    let vmm = match Vmm::build(config.clone(), signals) {
        Err(husk_vmm_core::VmmError::Restore(e)) if !args.no_cold_boot_fallback => {
            tracing::warn!(
                "snapshot refused, booting cold instead: {}",
                husk_vmm_core::error_chain(&e)
            );
            if let Some(t) = &template {
                // Made for another host or corrupted: the next start rebuilds it.
                let _ = std::fs::remove_file(t);
            }
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

/// The template for `config` in `dir`, made first if it does not exist.
/// Concurrent starts serialize on a lock file, so a template is built once.
fn ensure_template(config: &VmConfig, dir: &std::path::Path) -> Result<PathBuf> {
    use anyhow::Context;
    use std::os::fd::AsRawFd;
    let uds = config
        .vsock
        .as_ref()
        .context("template start needs a vsock device (--vsock-uds)")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key =
        husk_vmm_core::template::key(config, husk_vmm_core::arch::cpuid::CpuProfile::detect())
            .context("reading the guest image to name its template")?;
    let path = dir.join(format!("{key}.snap"));
    if path.exists() {
        return Ok(path);
    }
    let lock_path = dir.join(format!("{key}.lock"));
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own; the result is checked.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("locking the template");
    }
    if path.exists() {
        return Ok(path);
    }
    tracing::info!(template = %path.display(), "no template for this VM yet: booting once to make it");
    // The template VM gets its own vsock socket next to this VM's.
    let build_uds = uds.uds_path.with_extension("template.sock");
    let mut cmd = std::process::Command::new(std::env::current_exe().context("locating husk-vmm")?);
    cmd.arg("--kernel").arg(&config.kernel);
    match &config.initramfs {
        Some(i) => cmd.arg("--initramfs").arg(i),
        None => cmd.args(["--initramfs", "none"]),
    };
    cmd.args([
        "--vcpus",
        &config.vcpus.to_string(),
        "--mem-mib",
        &config.mem_mib.to_string(),
    ])
    .args(["--cmdline", &config.extra_cmdline])
    .arg("--vsock-uds")
    .arg(&build_uds)
    .arg("--make-template")
    .arg(&path)
    .args(["--log", "warn"]);
    if let Some(serial) = &config.serial_log {
        cmd.arg("--serial-log")
            .arg(serial.with_extension("template.log"));
    }
    let status = cmd.status().context("starting the template VM")?;
    let _ = std::fs::remove_file(&lock_path);
    if !status.success() || !path.exists() {
        anyhow::bail!("making the template {} failed ({status})", path.display());
    }
    Ok(path)
}
