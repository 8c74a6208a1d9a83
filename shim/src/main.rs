//! `containerd-shim-husk-v2`: containerd's shim v2 for husk.
//!
//! containerd runs this binary with `start` (fork the long-lived shim
//! server and print its ttrpc address), `delete` (clean up after a shim
//! that is gone; containerd 1.6 also calls it after every normal exit, so
//! it is idempotent), or as the server itself, which serves the Task API
//! (`task`) until containerd calls Shutdown. The server logs to the
//! bundle's `log` FIFO, which containerd copies into its own log.

mod agent;
mod config;
mod container;
mod error;
mod exits;
mod hostfs;
mod io;
mod kubelet;
mod network;
mod portfwd;
mod rootfs;
mod sandbox;
mod sizing;
mod specpolicy;
mod task;
mod vm;
mod volwatch;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use containerd_shim::{
    api::DeleteResponse,
    asynchronous::{publisher::RemotePublisher, run, spawn, ExitSignal, Shim},
    Config as ShimConfig, Error as ShimError, Flags, StartOpts,
};

/// The runtime name containerd knows husk by.
const RUNTIME_ID: &str = "io.containerd.husk.v2";

struct HuskShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    bundle: PathBuf,
    /// The server's own socket address (`unix:///run/containerd/s/...`).
    socket: String,
}

/// The file of a `unix://` socket address (none for abstract sockets).
fn socket_file(address: &str) -> Option<&Path> {
    address
        .strip_prefix("unix://")
        .filter(|p| p.starts_with('/'))
        .map(Path::new)
}

/// Removes the socket file of `address` unless a server still answers on
/// it (a pod's shim serves several containers; only a dead one's socket
/// may go).
fn remove_dead_socket(address: &str) {
    let Some(path) = socket_file(address) else {
        return;
    };
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(socket = %path.display(), "removed a dead shim's socket"),
            Err(e) => {
                tracing::warn!(socket = %path.display(), "removing a dead shim's socket: {e}")
            }
        }
    }
}

/// Sends the server's log to the bundle's `log` FIFO (containerd reads it;
/// the server's stderr goes nowhere).
fn init_logging(debug: bool) {
    let level = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUSK_SHIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let fifo = std::fs::OpenOptions::new().write(true).open("log");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let _ = match fifo {
        Ok(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
}

#[async_trait]
impl Shim for HuskShim {
    type T = task::HuskTask;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut ShimConfig) -> Self {
        config.no_setup_logger = true;
        if args.action.is_empty() {
            init_logging(args.debug);
        }
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        Self {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle,
            socket: args.socket.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimError> {
        // Containers of one pod share its shim (and VM): CRI names the
        // sandbox in the annotations; without them the container is alone.
        let grouping = rootfs::read_spec(&self.bundle)
            .map(|spec| sandbox::role(&spec).pod(&opts.id))
            .unwrap_or_else(|_| opts.id.clone());
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd reads the bundle's `address` file to reconnect to its
        // running shims after it restarts (and so may any Task API client).
        write_address(&self.bundle.join("address"), &address)?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, ShimError> {
        // The shim that ran this container is gone: take down what it left.
        if let Some(pod) = task::pod_of_bundle(&self.bundle) {
            let own_pod = pod
                .file_name()
                .is_some_and(|n| *n == *husk_shim::poddir::dir_name(&self.id));
            if own_pod {
                vm::cleanup_pod_dir(&pod);
            } else {
                rootfs::release(&pod.join("work"), &self.id);
            }
            let _ = std::fs::remove_file(self.bundle.join("husk-pod"));
        }
        if let Ok(address) = std::fs::read_to_string(self.bundle.join("address")) {
            remove_dead_socket(address.trim());
        }
        let _ = &self.namespace;
        let mut resp = DeleteResponse::new();
        resp.exit_status = 128 + 9;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut ts =
            containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp::new();
        ts.seconds = i64::try_from(now.as_secs()).unwrap_or(0);
        resp.exited_at = Some(ts).into();
        Ok(resp)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // Unlink the socket now, while the server still answers the
        // Shutdown in flight (open connections are unaffected). The shim
        // crate removes it only after its server is down, by reading the
        // bundle's `address` file, which containerd may have deleted by
        // then: the socket file leaked in /run/containerd/s.
        if let Some(path) = socket_file(&self.socket) {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(socket = %path.display(), "removing the shim socket: {e}");
                }
            }
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let exits = exits::Exits::start().await;
        task::HuskTask::new(publisher, &self.namespace, self.exit.clone(), exits)
    }
}

fn main() {
    // Everything the shim makes for a pod (directories, files, sockets,
    // and what its children husk-vmm and husk-virtiofsd make) is private
    // from the moment it exists: no window between creating a socket or
    // file and narrowing its mode.
    // SAFETY: umask(2) only changes the process's file mode mask; no
    // thread exists yet to race with it.
    unsafe { libc::umask(0o077) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(rt) => rt.block_on(run::<HuskShim>(RUNTIME_ID, None)),
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: starting the runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// Writes `address` to `path` (in the bundle) atomically.
fn write_address(path: &Path, address: &str) -> Result<(), ShimError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, address)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| ShimError::Other(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_shims_socket_is_removed() {
        let dir = std::env::temp_dir().join(format!("husk-shim-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s");
        let address = format!("unix://{}", path.display());
        assert_eq!(socket_file(&address), Some(path.as_path()));
        assert_eq!(socket_file("unix://@abstract"), None);
        assert_eq!(socket_file("/no/scheme"), None);

        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        remove_dead_socket(&address);
        assert!(path.exists(), "a live shim's socket stays");
        drop(listener);
        remove_dead_socket(&address);
        assert!(!path.exists(), "a dead shim's socket goes");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
