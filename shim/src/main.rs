//! `containerd-shim-husk-v2`: containerd's shim v2 for husk.
//!
//! containerd runs this binary with `start` (fork the long-lived shim
//! server and print its ttrpc address), `delete` (clean up after a shim
//! that is gone; containerd 1.6 also calls it after every normal exit, so
//! it is idempotent), or as the server itself, which serves the Task API
//! (`task`) until containerd calls Shutdown. The server logs to the
//! bundle's `log` FIFO, which containerd copies into its own log.

mod config;
mod exits;
mod io;
mod rootfs;
mod task;
mod vm;

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
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimError> {
        // Containers of one pod share its shim (and VM): CRI names the
        // sandbox in the annotations; without them the container is alone.
        let grouping = rootfs::read_spec(&self.bundle)
            .map(|spec| task::sandbox_of(&spec, &opts.id))
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
            let own_pod = pod.file_name().is_some_and(|n| n == self.id.as_str());
            if own_pod {
                vm::cleanup_pod_dir(&pod);
            } else {
                rootfs::release(&pod.join("shared"), &self.id);
            }
            let _ = std::fs::remove_file(self.bundle.join("husk-pod"));
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
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let exits = exits::Exits::start().await;
        task::HuskTask::new(publisher, &self.namespace, self.exit.clone(), exits)
    }
}

#[tokio::main]
async fn main() {
    run::<HuskShim>(RUNTIME_ID, None).await;
}

/// Writes `address` to `path` (in the bundle) atomically.
fn write_address(path: &Path, address: &str) -> Result<(), ShimError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, address)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| ShimError::Other(format!("writing {}: {e}", path.display())))
}
