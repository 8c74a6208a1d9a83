//! `husk-virtiofsd`: the virtio-fs daemon of one pod.
//!
//! A vhost-user backend that serves one host directory (the pod's shared
//! directory, where the shim mounts container root file systems) to the
//! VMM's virtio-fs device. The file system and the vhost-user protocol come
//! from the `virtiofsd` crate (husk does not write a FUSE server); this
//! binary only chooses husk's defaults and confines the daemon:
//!
//! * it enters a sandbox before serving: by default new mount, PID, IPC,
//!   UTS and network namespaces with the shared directory as root, so a
//!   compromised daemon sees nothing else of the host;
//! * once the file system is open it keeps only the capabilities a file
//!   server needs ([`SERVING_CAPS`], virtiofsd's own default set: no
//!   `CAP_SYS_ADMIN`, no `CAP_DAC_READ_SEARCH`, so `open_by_handle_at`,
//!   which its filter allows, cannot reach outside the shared directory),
//!   with an empty bounding set; the sandbox's waiting parent keeps none;
//! * a seccomp filter (virtiofsd's allow-list) kills it on any other
//!   system call;
//! * it serves exactly one VMM connection and exits when that VMM goes
//!   away, so no daemon outlives its pod.

use std::{path::PathBuf, sync::Arc};

mod image_cache;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use virtiofsd::{
    passthrough::{self, CachePolicy, PassthroughFs},
    sandbox::{Sandbox, SandboxMode},
    seccomp::{enable_seccomp, SeccompAction},
    vhost_user::{VhostUserFsBackendBuilder, MAX_TAG_LEN},
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::image_cache::ImageCache;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Sandboxing {
    /// New namespaces, the shared directory as root (needs root or user namespaces).
    Namespace,
    /// chroot into the shared directory (needs root).
    Chroot,
    /// No sandbox (debugging only).
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Cache {
    /// Guest caches nothing: every access reaches the host.
    Never,
    /// Guest caches metadata and data with close-to-open consistency.
    Auto,
    /// `auto`, except that container images (`<id>/rootfs/`) keep their
    /// cached pages across opens: only the guest changes them.
    Images,
    /// Guest caches everything (the host directory must not change behind it).
    Always,
}

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Serve one directory to a husk microVM over vhost-user virtio-fs"
)]
struct Args {
    /// The vhost-user socket to listen on (the VMM connects to it).
    #[arg(long)]
    socket: PathBuf,
    /// The directory to share.
    #[arg(long)]
    shared_dir: PathBuf,
    /// The virtio-fs tag the guest mounts by.
    #[arg(long, default_value = "husk")]
    tag: String,
    /// How the daemon confines itself.
    #[arg(long, value_enum, default_value = "namespace")]
    sandbox: Sandboxing,
    /// Guest caching.
    #[arg(long, value_enum, default_value = "images")]
    cache: Cache,
    /// Worker threads for file system requests (0: serve on the queue thread).
    #[arg(long, default_value_t = 0)]
    thread_pool_size: usize,
    /// Log filter (tracing syntax).
    #[arg(long, default_value = "info")]
    log: String,
    /// The most KiB this process writes to its log in all; further lines
    /// are dropped and counted.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    log_max_kib: u64,
}

fn main() {
    // Its vhost-user socket is its owner's alone from the moment it
    // exists. (The file system clears the mask again when it starts: files
    // the guest creates get the modes the guest asks for.)
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
    let result = run(args);
    budget.report(std::io::stderr());
    if let Err(e) = result {
        eprintln!("husk-virtiofsd: error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if args.tag.is_empty() || args.tag.len() > MAX_TAG_LEN {
        bail!("the tag must be 1 to {MAX_TAG_LEN} bytes");
    }
    let shared = args
        .shared_dir
        .canonicalize()
        .with_context(|| format!("shared directory {}", args.shared_dir.display()))?;
    if !shared.is_dir() {
        bail!("{} is not a directory", shared.display());
    }
    let shared = shared
        .to_str()
        .context("the shared directory path is not UTF-8")?
        .to_string();

    let listener = Listener::new(&args.socket, true)
        .with_context(|| format!("listening on {}", args.socket.display()))?;
    // Inside the sandbox the socket's path is out of sight; a handle on its
    // directory lets the daemon remove it when it is done.
    let socket_dir = SocketDir::open(&args.socket)?;
    let mode = match args.sandbox {
        Sandboxing::Namespace => SandboxMode::Namespace,
        Sandboxing::Chroot => SandboxMode::Chroot,
        Sandboxing::None => SandboxMode::None,
    };
    let mut sandbox = Sandbox::new(shared, mode, Vec::new(), Vec::new());
    let mountinfo_prefix = sandbox
        .get_mountinfo_prefix()
        .context("reading the mount table")?;
    // From here on the daemon only sees the shared directory.
    let listener = sandbox
        .enter(listener)
        .map_err(|e| anyhow::anyhow!("entering the sandbox: {e}"))?;

    let cfg = passthrough::Config {
        cache_policy: match args.cache {
            Cache::Never => CachePolicy::Never,
            Cache::Auto | Cache::Images => CachePolicy::Auto,
            Cache::Always => CachePolicy::Always,
        },
        root_dir: sandbox.get_root_dir(),
        mountinfo_prefix,
        proc_sfd_rawfd: sandbox.get_proc_self_fd(),
        proc_mountinfo_rawfd: sandbox.get_mountinfo_fd(),
        ..Default::default()
    };
    let fs = PassthroughFs::new(cfg)
        .map_err(|e| anyhow::anyhow!("opening the shared directory: {e}"))?;
    let fs = ImageCache::new(fs, matches!(args.cache, Cache::Images));
    keep_only_serving_caps()?;
    enable_seccomp(SeccompAction::Kill, false)
        .map_err(|e| anyhow::anyhow!("installing the seccomp filter: {e}"))?;

    let backend = Arc::new(
        VhostUserFsBackendBuilder::default()
            .set_thread_pool_size(args.thread_pool_size)
            .set_tag(Some(args.tag))
            .build(fs)
            .map_err(|e| anyhow::anyhow!("creating the vhost-user backend: {e}"))?,
    );
    let mut daemon = VhostUserDaemon::new(
        "husk-virtiofsd".to_string(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| anyhow::anyhow!("creating the daemon: {e:?}"))?;
    let mut listener = listener;
    tracing::info!("waiting for the VMM");
    daemon
        .start(&mut listener)
        .map_err(|e| anyhow::anyhow!("accepting the VMM: {e:?}"))?;
    tracing::info!("VMM connected");
    // One VMM per daemon: stop listening, so a second VMM is refused at
    // once instead of waiting in the backlog for a server that never comes.
    drop(listener);
    match daemon.wait() {
        Ok(()) => {}
        Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => {}
        Err(e) => bail!("serving the VMM: {e:?}"),
    }
    tracing::info!("VMM disconnected; exiting");
    socket_dir.remove_socket();
    Ok(())
}

/// The capabilities the serving daemon keeps: what passing through a guest's
/// file operations needs (ownership, modes, set-id bits, device nodes,
/// file capabilities, acting as the guest's uid/gid), nothing more.
pub const SERVING_CAPS: [&str; 8] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "SETGID",
    "SETUID",
    "MKNOD",
    "SETFCAP",
];

/// Drops every capability but [`SERVING_CAPS`] (permitted and effective;
/// none inheritable, an empty bounding set).
fn keep_only_serving_caps() -> Result<()> {
    capng::clear(capng::Set::BOTH);
    capng::updatev(
        capng::Action::ADD,
        capng::Type::PERMITTED | capng::Type::EFFECTIVE,
        SERVING_CAPS.to_vec(),
    )
    .map_err(|e| anyhow::anyhow!("choosing the capabilities to keep: {e}"))?;
    capng::apply(capng::Set::BOTH).map_err(|e| anyhow::anyhow!("dropping capabilities: {e}"))
}

/// The directory of the vhost-user socket, held open across the sandbox.
struct SocketDir {
    dir: std::fs::File,
    name: std::ffi::CString,
}

impl SocketDir {
    fn open(socket: &std::path::Path) -> Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let parent = match socket.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = socket
            .file_name()
            .context("the socket path has no file name")?;
        let dir = std::fs::File::open(&parent)
            .with_context(|| format!("opening {}", parent.display()))?;
        let name = std::ffi::CString::new(name.as_bytes())
            .context("the socket name contains a NUL byte")?;
        Ok(Self { dir, name })
    }

    fn remove_socket(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: a directory descriptor we own and a NUL-terminated name.
        if unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) } != 0 {
            tracing::warn!("removing the socket: {}", std::io::Error::last_os_error());
        }
    }
}
