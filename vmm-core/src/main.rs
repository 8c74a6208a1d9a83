//! `husk-vmm`: runs one husk microVM until the guest powers off (resets),
//! a stop is requested on the control socket, or SIGTERM/SIGINT arrives.
//!
//! Exit status: 0 for an orderly end, 1 for a guest or vCPU failure, 2 when
//! the VM could not be built (the message says which step failed and why).

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use husk_vmm_core::{
    config::guest_dir, device_manager::Backends, vmm::take_termination_signals, VmConfig, Vmm,
    VsockConfig,
};

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
    /// A virtio-net device: `mac=02:..:01[,mtu=1500][,fd=N|,tap=NAME]`;
    /// `fd=` takes an open tap this process inherited, `tap=` opens one by
    /// name; with neither, the device has no cable (a template VM).
    #[arg(long, value_parser = husk_vmm_core::NetConfig::parse)]
    net: Option<husk_vmm_core::NetConfig>,
    /// A virtio-balloon device:
    /// `[reporting=on|off][,stats=SECONDS][,deflate-on-oom=on|off]`
    /// (free page reporting and deflate-on-OOM are on unless turned off;
    /// statistics only with stats=N, N > 0).
    #[arg(long, value_parser = husk_vmm_core::BalloonConfig::parse)]
    balloon: Option<husk_vmm_core::BalloonConfig>,
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
    /// The most templates --template-dir keeps (the least recently used
    /// go first).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    template_max_count: u32,
    /// The most MiB of templates --template-dir keeps.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    template_max_mib: u64,
    /// The virtio-fs daemon a template VM gets when this VM has a virtio-fs
    /// device (--template-dir with --fs-socket) [default: husk-virtiofsd
    /// next to husk-vmm].
    #[arg(long)]
    virtiofsd: Option<PathBuf>,
    /// Profile the guest while it runs and write, when the VM ends, folded
    /// stacks here, a flame graph as FILE.svg and the busiest functions as
    /// FILE.top (docs/profiling.md).
    #[arg(long, value_name = "FILE")]
    profile_guest: Option<PathBuf>,
    /// Profile samples per second per vCPU.
    #[arg(long, default_value_t = 97, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    profile_hz: u32,
    /// The guest kernel's symbols for the profile [default: System.map
    /// beside the kernel]. Kernel stacks are walked when the kernel's
    /// `config` beside it has CONFIG_FRAME_POINTER=y.
    #[arg(long)]
    system_map: Option<PathBuf>,
    /// Log filter (tracing syntax), e.g. "info" or "husk_vmm_core=debug".
    #[arg(long, default_value = "info")]
    log: String,
    /// The most KiB this process writes to its log in all; further lines
    /// are dropped and counted.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    log_max_kib: u64,
}

fn print_error_chain(e: &anyhow::Error) {
    eprintln!("husk-vmm: error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

fn main() {
    // What husk-vmm creates (its sockets, snapshots, templates, profiles)
    // is its owner's alone from the moment it exists.
    // SAFETY: umask(2) only changes the process's file mode mask; no other
    // thread exists yet.
    unsafe { libc::umask(0o077) };
    let args = Args::parse();
    // The log is a file on the host that a guest can make lines for: it
    // gets a total budget (the husk-logbudget crate says why).
    let budget = husk_logbudget::Budget::new(args.log_max_kib.saturating_mul(1024));
    let log = budget.clone();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(move || log.writer(std::io::stderr()))
        .init();
    // Before any thread exists, so every thread inherits the blocked mask.
    let signals = take_termination_signals();
    let result = run(args, signals);
    budget.report(std::io::stderr());
    match result {
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
        net: args.net,
        balloon: args.balloon,
        kvm_device: args.kvm_device,
        seccomp: !args.no_seccomp,
        restore_from: args.restore_from,
        make_template: args.make_template,
    };
    let mut config = config;
    // Read before the VM runs: afterwards this thread may not open files
    // for reading (seccomp).
    let profile = match &args.profile_guest {
        Some(out) => Some(GuestProfile::prepare(
            out,
            args.system_map.as_deref(),
            &config.kernel,
        )?),
        None => None,
    };
    let template = match &args.template_dir {
        Some(dir) => {
            let exe = std::env::current_exe()?;
            let bins = husk_vmm_core::template::start::Binaries {
                virtiofsd: args
                    .virtiofsd
                    .clone()
                    .unwrap_or_else(|| exe.with_file_name("husk-virtiofsd")),
                vmm: exe,
            };
            let keep = husk_vmm_core::template::start::Retention {
                max_count: usize::try_from(args.template_max_count).unwrap_or(16),
                max_bytes: args.template_max_mib.saturating_mul(1 << 20),
                ..Default::default()
            };
            let path = husk_vmm_core::template::start::ensure(&config, dir, &bins, &keep)?;
            config.restore_from = Some(path.clone());
            Some(path)
        }
        None => None,
    };
    // Nothing from here on needs a capability (KVM, the memfd, the tap
    // and the daemons' sockets are reached as their owner or through
    // descriptors), and no thread exists yet, so every thread the VM
    // starts has none: a device-model bug cannot mount, trace, load
    // modules or pass file permissions. (Template builds, above, start a
    // virtio-fs daemon that needs them to enter its sandbox.)
    drop_capabilities()?;
    // A snapshot is refused before any guest state exists, so falling back
    // to a cold boot with the same devices (and the same daemon
    // connections) is safe.
    config.validate()?;
    let backends = Backends::connect(&config)?;
    let vmm = match Vmm::build_with(config.clone(), signals, &backends) {
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
            Vmm::build_with(cold, take_termination_signals(), &backends)?
        }
        other => other?,
    };
    let mut vmm = vmm;
    let session =
        profile.map(|p| vmm.enable_profiler(args.profile_hz, p.walk_stacks, &p.out, p.symbols));
    tracing::info!(cmdline = %vmm.cmdline, "starting the VM");
    let reason = vmm.run()?;
    tracing::info!("VM ended: {reason}");
    if let Some(session) = session {
        write_profile(&session);
    }
    if reason.exit_code() != 0 {
        eprintln!("husk-vmm: {reason}");
    }
    Ok(reason.exit_code())
}

/// Drops every capability of the calling thread, and the bounding set so
/// none can come back through an `execve` (an unprivileged caller, which
/// cannot change its bounding set, only empties the others).
fn drop_capabilities() -> Result<()> {
    capng::clear(capng::Set::BOTH);
    if capng::apply(capng::Set::BOTH).is_err() {
        capng::apply(capng::Set::CAPS)
            .map_err(|e| anyhow::anyhow!("dropping capabilities: {e}"))?;
    }
    Ok(())
}

/// What `--profile-guest` needs before the VM runs.
struct GuestProfile {
    out: PathBuf,
    symbols: husk_vmm_core::profile::symbols::Symbols,
    walk_stacks: bool,
}

impl GuestProfile {
    /// Loads the guest kernel's symbols (`map`, else `System.map` beside
    /// `kernel`) and finds out whether its stacks can be walked.
    fn prepare(
        out: &std::path::Path,
        map: Option<&std::path::Path>,
        kernel: &std::path::Path,
    ) -> Result<Self> {
        use anyhow::Context;
        let beside = |name: &str| kernel.with_file_name(name);
        let map = map.map_or_else(|| beside("System.map"), std::path::Path::to_path_buf);
        let text = std::fs::read_to_string(&map)
            .with_context(|| format!("reading the guest kernel's symbols {}", map.display()))?;
        let symbols = husk_vmm_core::profile::symbols::Symbols::parse(&text);
        anyhow::ensure!(
            !symbols.is_empty(),
            "{} names no kernel code",
            map.display()
        );
        let walk_stacks = std::fs::read_to_string(beside("config"))
            .is_ok_and(|c| c.lines().any(|l| l == "CONFIG_FRAME_POINTER=y"));
        if !walk_stacks {
            tracing::warn!(
                "the guest kernel has no frame pointers (no CONFIG_FRAME_POINTER=y in its config): \
                 the profile has the sampled functions without their callers"
            );
        }
        Ok(Self {
            out: out.to_path_buf(),
            symbols,
            walk_stacks,
        })
    }
}

/// Writes the whole run's profile (and the last slice, if slices were
/// marked); a failure is logged (the VM's outcome stands).
fn write_profile(session: &husk_vmm_core::profile::session::Session) {
    match session.finish() {
        Ok(report) => tracing::info!(
            samples = report.samples,
            kernel = report.kernel,
            "guest profile written to {}\n{}",
            session.out().display(),
            report.table(10)
        ),
        Err(e) => tracing::error!("writing the guest profile {}: {e}", session.out().display()),
    }
}
