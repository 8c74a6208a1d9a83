//! The guest's containers and their processes.
//!
//! Each container is created by the runtime helper ([`crate::runtime`])
//! from an OCI bundle on the shared file system. Each process (a
//! container's init, or an exec) gets its stdio on vsock streams of its
//! own, which the agent opens to host ports the shim listens on, presenting
//! the process's token first (the shim relays nothing else): pipes
//! between process and agent (a program that opens `/dev/stdout` works, as
//! with runc) and a copy task per stream, or a terminal whose master side
//! the container's init sends over a console socket. A process's exit
//! status comes from the agent's reaper; waiting for a process returns once
//! it has exited and its output streams are drained, so everything it
//! wrote reaches the host before the exit is reported.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use husk_protocols::{
    agent::{StatsContainerResponse, Stdio},
    HOST_CID, POD_PID_NAMESPACE, STDIO_TOKEN_LEN,
};
use nix::{
    fcntl::OFlag,
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tokio::{
    io::{unix::AsyncFd, AsyncReadExt, AsyncWriteExt, Interest},
    net::UnixListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_vsock::{VsockAddr, VsockStream};

use crate::{cgroups, podns::PodPidNamespace, reaper::Reaper, runtime::Outcome};

/// Scratch files of the runtime helper (results, exec process specs).
const RT_DIR: &str = "/run/husk/rt";
/// Console sockets for terminals.
const CONSOLE_DIR: &str = "/run/husk/console";
/// How long a runtime helper run may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long output may keep flowing after a process exited (a child it
/// left behind may hold its stdout open).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting a stdio stream to the host may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the cgroup of a container whose create failed may take to
/// empty before the agent gives up removing it.
const FAILED_CGROUP_PATIENCE: Duration = Duration::from_secs(15);
const CHUNK: usize = 32 * 1024;

/// Why a container operation failed; the RPC layer maps it to a ttrpc code.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    /// It exists already.
    #[error("{0}")]
    Exists(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Not in a state that allows this.
    #[error("{0}")]
    State(String),
    /// The operation itself failed.
    #[error("{0}")]
    Failed(String),
}

type Result<T> = std::result::Result<T, ContainerError>;

/// One process: a container's init or an exec.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    exit: watch::Receiver<Option<i32>>,
    outputs: Mutex<Vec<JoinHandle<()>>>,
    stdin: Mutex<Option<JoinHandle<()>>>,
    pty: Option<Arc<AsyncFd<OwnedFd>>>,
    /// The container's cgroup in the hierarchy (the runtime reports it for
    /// a container's init).
    cgroup_path: Option<String>,
}

impl Process {
    /// The exit status, if it has exited.
    pub fn exited(&self) -> Option<i32> {
        *self.exit.borrow()
    }

    /// Waits for the exit, then for its output to drain.
    pub async fn wait(&self) -> i32 {
        let mut rx = self.exit.clone();
        let code = loop {
            if let Some(code) = *rx.borrow_and_update() {
                break code;
            }
            if rx.changed().await.is_err() {
                // The watcher is gone without a status: cannot happen while
                // the agent runs; report a failure rather than hang.
                break 255;
            }
        };
        let outputs: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.outputs.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        for mut h in outputs {
            if tokio::time::timeout_at(deadline, &mut h).await.is_err() {
                tracing::warn!(pid = self.pid, "output still open after exit; cutting it");
                h.abort();
            }
        }
        code
    }

    /// Stops feeding stdin (the process sees EOF unless it has a terminal).
    pub fn close_stdin(&self) {
        if let Some(h) = self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, width: u16, height: u16) -> Result<()> {
        let pty = self
            .pty
            .as_ref()
            .ok_or_else(|| ContainerError::State("the process has no terminal".into()))?;
        let ws = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct that lives across the
        // call; the descriptor is the terminal master we own.
        let rc = unsafe { libc::ioctl(pty.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc != 0 {
            return Err(ContainerError::Failed(format!(
                "resizing the terminal: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    fn abort_io(&self) {
        self.close_stdin();
        for h in self
            .outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }
}

#[derive(Debug)]
struct Entry {
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    /// The container's cgroup directory.
    cgroup: Option<PathBuf>,
    /// Reports the container's OOM kills while it exists.
    oom_watch: Option<JoinHandle<()>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(h) = self.oom_watch.take() {
            h.abort();
        }
    }
}

/// How many OOM kills may wait for the host to collect them.
const OOM_QUEUE: usize = 256;

/// All containers of this guest.
#[derive(Debug)]
pub struct Containers {
    map: Mutex<HashMap<String, Entry>>,
    oom_tx: mpsc::Sender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::Receiver<String>>,
    /// The pod's shared PID namespace, made when a container first asks.
    pod_pid: PodPidNamespace,
}

impl Default for Containers {
    fn default() -> Self {
        let (oom_tx, oom_rx) = mpsc::channel(OOM_QUEUE);
        Self {
            map: Mutex::default(),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
            pod_pid: PodPidNamespace::new(POD_PID_NAMESPACE),
        }
    }
}

fn valid_id(kind: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ContainerError::Invalid(format!("invalid {kind} id {id:?}")))
    }
}

impl Containers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The process `exec_id` ("" for init) of `container_id`.
    pub fn process(&self, container_id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let map = self.lock();
        let entry = map
            .get(container_id)
            .ok_or_else(|| ContainerError::NotFound(format!("no container {container_id}")))?;
        if exec_id.is_empty() {
            return Ok(entry.init.clone());
        }
        entry.execs.get(exec_id).cloned().ok_or_else(|| {
            ContainerError::NotFound(format!("no process {exec_id} in container {container_id}"))
        })
    }

    /// Creates a container from the bundle at `bundle` (a guest path).
    pub async fn create(&self, id: &str, bundle: &Path, stdio: &Stdio) -> Result<u32> {
        valid_id("container", id)?;
        if self.lock().contains_key(id) {
            return Err(ContainerError::Exists(format!("container {id} exists")));
        }
        let config = bundle.join("config.json");
        let text = std::fs::read(&config)
            .map_err(|e| ContainerError::Invalid(format!("reading {}: {e}", config.display())))?;
        let spec: oci_spec::runtime::Spec = serde_json::from_slice(&text).map_err(|e| {
            ContainerError::Invalid(format!("{} is not a valid OCI spec: {e}", config.display()))
        })?;
        own_mount_namespace(&spec)?;
        if joins_pod_pid_namespace(&spec, self.pod_pid.link()) {
            self.pod_pid
                .ensure()
                .map_err(|e| ContainerError::Failed(e.to_string()))?;
        }
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        if terminal != stdio.terminal {
            return Err(ContainerError::Invalid(format!(
                "the spec says terminal={terminal}, the request terminal={}",
                stdio.terminal
            )));
        }
        let bundle_arg = bundle.display().to_string();
        let created = spawn_process(id, "", stdio, |extra| {
            let mut args = vec!["create", "--id", id, "--bundle", bundle_arg.as_str()];
            args.extend(extra.iter().map(String::as_str));
            args.into_iter().map(String::from).collect()
        })
        .await;
        let proc = match created {
            Ok(p) => p,
            Err(e) => {
                // libcontainer removes a failed container's cgroup but gives
                // up after a few hundred milliseconds, and its processes take
                // longer than that to die where guest kernel code is slow:
                // the empty cgroup would stay until the pod goes.
                let path = libcontainer::utils::get_cgroup_path(
                    &spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()),
                    id,
                );
                if let Ok(dir) = cgroups::cgroup_dir(&path.display().to_string()) {
                    cgroups::remove(&dir, FAILED_CGROUP_PATIENCE).await;
                }
                return Err(e);
            }
        };
        let pid = proc.pid;
        let cgroup = match proc.cgroup_path.as_deref().map(cgroups::cgroup_dir) {
            Some(Ok(dir)) => Some(dir),
            Some(Err(e)) => {
                tracing::warn!(container = id, "no stats or OOM events: {e}");
                None
            }
            None => None,
        };
        let mut map = self.lock();
        if map.contains_key(id) {
            proc.abort_io();
            return Err(ContainerError::Exists(format!("container {id} exists")));
        }
        let oom_watch = cgroup
            .clone()
            .map(|dir| tokio::spawn(cgroups::watch_oom(id.to_string(), dir, self.oom_tx.clone())));
        map.insert(
            id.to_string(),
            Entry {
                init: Arc::new(proc),
                execs: HashMap::new(),
                cgroup,
                oom_watch,
            },
        );
        Ok(pid)
    }

    /// Starts a created container's init process.
    pub async fn start(&self, id: &str) -> Result<u32> {
        let init = self.process(id, "")?;
        run_helper(&["start", "--id", id]).await?;
        Ok(init.pid)
    }

    /// Starts process `exec_id` described by `process_json` (an OCI
    /// Process) in container `id`.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: &Stdio,
    ) -> Result<u32> {
        valid_id("exec", exec_id)?;
        {
            let map = self.lock();
            let entry = map
                .get(id)
                .ok_or_else(|| ContainerError::NotFound(format!("no container {id}")))?;
            if entry.execs.contains_key(exec_id) {
                return Err(ContainerError::Exists(format!(
                    "process {exec_id} exists in container {id}"
                )));
            }
            if entry.init.exited().is_some() {
                return Err(ContainerError::State(format!(
                    "container {id} is not running"
                )));
            }
        }
        let process: oci_spec::runtime::Process = serde_json::from_slice(process_json)
            .map_err(|e| ContainerError::Invalid(format!("invalid OCI process: {e}")))?;
        if process.terminal().unwrap_or(false) != stdio.terminal {
            return Err(ContainerError::Invalid(
                "the process's terminal setting and the request's differ".into(),
            ));
        }
        std::fs::create_dir_all(RT_DIR)
            .map_err(|e| ContainerError::Failed(format!("creating {RT_DIR}: {e}")))?;
        let spec_path = Path::new(RT_DIR).join(format!("{id}.{exec_id}.process.json"));
        std::fs::write(&spec_path, process_json)
            .map_err(|e| ContainerError::Failed(format!("writing the process spec: {e}")))?;
        let spec_arg = spec_path.display().to_string();
        let result = spawn_process(id, exec_id, stdio, |extra| {
            let mut args = vec!["exec", "--id", id, "--process", spec_arg.as_str()];
            args.extend(extra.iter().map(String::as_str));
            args.into_iter().map(String::from).collect()
        })
        .await;
        let _ = std::fs::remove_file(&spec_path);
        let proc = result?;
        let pid = proc.pid;
        let mut map = self.lock();
        match map.get_mut(id) {
            Some(entry) => {
                entry.execs.insert(exec_id.to_string(), Arc::new(proc));
                Ok(pid)
            }
            None => {
                proc.abort_io();
                Err(ContainerError::NotFound(format!(
                    "container {id} went away"
                )))
            }
        }
    }

    /// Sends `signal` to a process, or with `all` (init only) to every
    /// process of the container.
    pub async fn signal(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Result<()> {
        let proc = self.process(id, exec_id)?;
        let sig = Signal::try_from(signal)
            .map_err(|_| ContainerError::Invalid(format!("invalid signal {signal}")))?;
        if all && exec_id.is_empty() {
            let signal = signal.to_string();
            run_helper(&["kill", "--id", id, "--signal", &signal, "--all"]).await?;
            return Ok(());
        }
        if proc.exited().is_some() {
            return Err(ContainerError::State(format!(
                "process {} has exited",
                if exec_id.is_empty() { id } else { exec_id }
            )));
        }
        let pid = i32::try_from(proc.pid)
            .map_err(|_| ContainerError::Failed("pid out of range".into()))?;
        kill(Pid::from_raw(pid), sig)
            .map_err(|e| ContainerError::Failed(format!("signalling pid {pid}: {e}")))
    }

    /// The pids of the container's processes.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let dir = self.cgroup(id)?;
        tokio::task::spawn_blocking(move || cgroups::pids(&dir))
            .await
            .map_err(|e| ContainerError::Failed(format!("listing processes: {e}")))?
            .map_err(ContainerError::Failed)
    }

    /// Freezes or thaws the container.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        self.process(id, "")?;
        let op = if paused { "pause" } else { "resume" };
        run_helper(&[op, "--id", id]).await.map(|_| ())
    }

    /// Removes a container; with `force`, kills what still runs first.
    pub async fn delete(&self, id: &str, force: bool) -> Result<()> {
        let init = self.process(id, "")?;
        if init.exited().is_none() && !force {
            return Err(ContainerError::State(format!(
                "container {id} is still running"
            )));
        }
        let mut args = vec!["delete", "--id", id];
        if force {
            args.push("--force");
        }
        run_helper(&args).await?;
        if let Some(entry) = self.lock().remove(id) {
            entry.init.abort_io();
            for p in entry.execs.values() {
                p.abort_io();
            }
        }
        Ok(())
    }

    /// Resource usage of the container, from its cgroup.
    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        let dir = self.cgroup(id)?;
        tokio::task::spawn_blocking(move || cgroups::stats(&dir))
            .await
            .map_err(|e| ContainerError::Failed(format!("reading cgroup stats: {e}")))
    }

    fn cgroup(&self, id: &str) -> Result<PathBuf> {
        let map = self.lock();
        let entry = map
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(format!("no container {id}")))?;
        entry.cgroup.clone().ok_or_else(|| {
            ContainerError::State(format!("container {id} has no cgroup the agent knows"))
        })
    }

    /// Applies `resources_json` (OCI LinuxResources) to a running
    /// container.
    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let init = self.process(id, "")?;
        if init.exited().is_some() {
            return Err(ContainerError::State(format!(
                "container {id} is not running"
            )));
        }
        let _: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| ContainerError::Invalid(format!("invalid OCI LinuxResources: {e}")))?;
        std::fs::create_dir_all(RT_DIR)
            .map_err(|e| ContainerError::Failed(format!("creating {RT_DIR}: {e}")))?;
        let path = unique("resources").with_extension("json");
        std::fs::write(&path, resources_json)
            .map_err(|e| ContainerError::Failed(format!("writing the resources: {e}")))?;
        let arg = path.display().to_string();
        let result = run_helper(&["update", "--id", id, "--resources", &arg]).await;
        let _ = std::fs::remove_file(&path);
        result.map(|_| ())
    }

    /// The next OOM kill in any container (its id), waiting for one.
    pub async fn next_oom(&self) -> Option<String> {
        self.oom_rx.lock().await.recv().await
    }

    /// Forgets an exec process once its exit has been collected.
    pub fn remove_exec(&self, id: &str, exec_id: &str) -> Result<()> {
        let proc = self.process(id, exec_id)?;
        if exec_id.is_empty() {
            return Err(ContainerError::Invalid(
                "the init process goes with its container".into(),
            ));
        }
        if proc.exited().is_none() {
            return Err(ContainerError::State(format!(
                "process {exec_id} is still running"
            )));
        }
        if let Some(entry) = self.lock().get_mut(id) {
            if let Some(p) = entry.execs.remove(exec_id) {
                p.abort_io();
            }
        }
        Ok(())
    }
}

static NEXT: AtomicU64 = AtomicU64::new(1);

fn unique(prefix: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Path::new(RT_DIR).join(format!("{prefix}-{n}"))
}

/// `/dev/null`, for a helper stream nobody reads or writes.
fn devnull() -> Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| ContainerError::Failed(format!("opening /dev/null: {e}")))
}

/// Starts `husk-agent runtime <args>` with `stdio` as its standard streams:
/// a child of the helper server ([`crate::helper`]), or, without one, a
/// fresh process of the agent binary. Its pid.
async fn start_helper(args: Vec<String>, stdio: [OwnedFd; 3]) -> Result<i32> {
    let (mut args, mut stdio) = (args, stdio);
    if let Some(server) = crate::helper::server() {
        // The arguments and descriptors come back for the fallback.
        let (answer, back) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let answer = server.run(&refs, [&stdio[0], &stdio[1], &stdio[2]]);
            (answer, (args, stdio))
        })
        .await
        .map_err(|e| ContainerError::Failed(format!("runtime helper server: {e}")))?;
        match answer {
            Ok(pid) => return Ok(pid),
            Err(e) => tracing::warn!("{e}; starting the runtime helper binary instead"),
        }
        (args, stdio) = back;
    }
    let [stdin, stdout, stderr] = stdio;
    let child = std::process::Command::new("/proc/self/exe")
        .arg("runtime")
        .args(&args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| ContainerError::Failed(format!("starting the runtime helper: {e}")))?;
    i32::try_from(child.id()).map_err(|_| ContainerError::Failed("helper pid out of range".into()))
}

/// Runs `husk-agent runtime <args> --result F` with `stdio` as its standard
/// streams and returns its outcome.
async fn run_helper_with(args: &[&str], stdio: [OwnedFd; 3]) -> Result<(Outcome, Instant)> {
    std::fs::create_dir_all(RT_DIR)
        .map_err(|e| ContainerError::Failed(format!("creating {RT_DIR}: {e}")))?;
    let result = unique("result").with_extension("json");
    let log = result.with_extension("log");
    let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    full.extend([
        "--result".to_string(),
        result.display().to_string(),
        "--log".to_string(),
        log.display().to_string(),
    ]);
    // Before the helper exists: its exit counts from here.
    let since = Instant::now();
    let pid = start_helper(full, stdio).await?;
    let exited = Reaper::global().watch(pid, since);
    let code = match tokio::time::timeout(HELPER_TIMEOUT, exited).await {
        Ok(Ok(code)) => code,
        Ok(Err(_)) => 255,
        Err(_) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = std::fs::remove_file(&result);
            return Err(ContainerError::Failed(format!(
                "the runtime helper ({}) did not finish within {HELPER_TIMEOUT:?}",
                args.first().unwrap_or(&"?")
            )));
        }
    };
    tracing::info!(
        op = args.first().unwrap_or(&"?"),
        code,
        ms = since.elapsed().as_millis(),
        "runtime helper done"
    );
    let text = std::fs::read(&result);
    let _ = std::fs::remove_file(&result);
    let _ = std::fs::remove_file(&log);
    let outcome: Outcome = match text.ok().and_then(|t| serde_json::from_slice(&t).ok()) {
        Some(o) => o,
        None => {
            return Err(ContainerError::Failed(format!(
                "the runtime helper ({}) died with status {code} without an answer",
                args.first().unwrap_or(&"?")
            )))
        }
    };
    if !outcome.ok {
        let why = outcome.error.unwrap_or_else(|| "unknown error".into());
        return Err(ContainerError::Failed(why));
    }
    Ok((outcome, since))
}

async fn run_helper(args: &[&str]) -> Result<Outcome> {
    run_helper_with(args, [devnull()?, devnull()?, devnull()?])
        .await
        .map(|(o, _)| o)
}

/// Refuses a spec whose container would share a mount namespace with the
/// agent: it would see the agent's files and, being in the guest's initial
/// mount namespace, could open vsock sockets (the guest kernel only refuses
/// them outside it). A container gets a new mount namespace, never a path.
fn own_mount_namespace(spec: &oci_spec::runtime::Spec) -> Result<()> {
    use oci_spec::runtime::LinuxNamespaceType;
    let mount = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Mount));
    match mount {
        Some(n) if n.path().is_none() => Ok(()),
        Some(_) => Err(ContainerError::Invalid(
            "a container cannot join an existing mount namespace in the guest".into(),
        )),
        None => Err(ContainerError::Invalid(
            "the spec gives the container no mount namespace of its own".into(),
        )),
    }
}

/// Whether `spec` joins the pod's shared PID namespace, named by `link`.
fn joins_pod_pid_namespace(spec: &oci_spec::runtime::Spec, link: &Path) -> bool {
    use oci_spec::runtime::LinuxNamespaceType;
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::Pid && n.path().as_deref() == Some(link))
}

/// The process's stdio token, checked: required when any stream is asked for.
fn stdio_token(stdio: &Stdio) -> Result<&[u8]> {
    let any = stdio.stdin_port != 0 || stdio.stdout_port != 0 || stdio.stderr_port != 0;
    if any && stdio.token.len() != STDIO_TOKEN_LEN {
        return Err(ContainerError::Invalid(format!(
            "the stdio token must be {STDIO_TOKEN_LEN} bytes, not {}",
            stdio.token.len()
        )));
    }
    Ok(&stdio.token)
}

/// Opens a stream to host `port` (0: none) and presents `token` on it: the
/// host relays only a connection that starts with its stream's token.
async fn connect_host(port: u32, token: &[u8]) -> Result<Option<VsockStream>> {
    if port == 0 {
        return Ok(None);
    }
    let failed = |why: String| {
        ContainerError::Failed(format!("connecting stdio to host port {port}: {why}"))
    };
    let connect = async {
        let mut s = VsockStream::connect(VsockAddr::new(HOST_CID, port)).await?;
        s.write_all(token).await?;
        Ok::<_, std::io::Error>(s)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(s)) => Ok(Some(s)),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed("timed out".into())),
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| ContainerError::Failed(format!("creating a pipe: {e}")))
}

fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| ContainerError::Failed(format!("fcntl: {e}")))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| ContainerError::Failed(format!("fcntl: {e}")))?;
    Ok(())
}

/// Copies from the host stream into a pipe; EOF closes the pipe.
fn feed_stdin(mut from: tokio::io::ReadHalf<VsockStream>, to: OwnedFd) -> Result<JoinHandle<()>> {
    let mut to = tokio::net::unix::pipe::Sender::from_owned_fd(to)
        .map_err(|e| ContainerError::Failed(format!("stdin pipe: {e}")))?;
    Ok(tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from, &mut to).await;
    }))
}

/// Copies a pipe to the host stream until the pipe's writers are gone,
/// then closes the stream's sending side.
fn drain_output(
    from: OwnedFd,
    mut to: impl tokio::io::AsyncWrite + Unpin + Send + 'static,
) -> Result<JoinHandle<()>> {
    let mut from = tokio::net::unix::pipe::Receiver::from_owned_fd(from)
        .map_err(|e| ContainerError::Failed(format!("output pipe: {e}")))?;
    Ok(tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from, &mut to).await;
        let _ = to.shutdown().await;
    }))
}

/// Reads from the terminal master; EIO means the last slave closed.
async fn pty_read(pty: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut guard = pty.ready(Interest::READABLE).await?;
        match guard.try_io(|fd| {
            nix::unistd::read(fd.get_ref().as_raw_fd(), buf).map_err(std::io::Error::from)
        }) {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

async fn pty_write_all(pty: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        let mut guard = pty.ready(Interest::WRITABLE).await?;
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Receives the terminal master the container's init sends over the
/// console socket.
async fn receive_pty(listener: &UnixListener) -> Result<OwnedFd> {
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .map_err(|_| ContainerError::Failed("no terminal arrived on the console socket".into()))?
        .map_err(|e| ContainerError::Failed(format!("console socket: {e}")))?;
    let std_stream = stream
        .into_std()
        .map_err(|e| ContainerError::Failed(format!("console socket: {e}")))?;
    std_stream
        .set_nonblocking(false)
        .map_err(|e| ContainerError::Failed(format!("console socket: {e}")))?;
    let fd = std_stream.as_raw_fd();
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| ContainerError::Failed(format!("receiving the terminal: {e}")))?;
    let cmsgs = msg
        .cmsgs()
        .map_err(|e| ContainerError::Failed(format!("receiving the terminal: {e}")))?;
    for c in cmsgs {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&first) = fds.first() {
                for &extra in &fds[1..] {
                    // SAFETY: descriptors received with SCM_RIGHTS are ours
                    // to close.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                // SAFETY: as above; this one is kept.
                return Ok(unsafe { OwnedFd::from_raw_fd(first) });
            }
        }
    }
    Err(ContainerError::Failed(
        "the console socket carried no terminal".into(),
    ))
}

/// Connects the stdio streams, runs the helper with `args(extra)` (extra:
/// the console socket flags, if any) and wires the process's I/O.
async fn spawn_process(
    id: &str,
    exec_id: &str,
    stdio: &Stdio,
    args: impl FnOnce(&[String]) -> Vec<String>,
) -> Result<Process> {
    let token = stdio_token(stdio)?;
    let stdin = connect_host(stdio.stdin_port, token).await?;
    let stdout = connect_host(stdio.stdout_port, token).await?;
    let stderr = if stdio.terminal {
        None
    } else {
        connect_host(stdio.stderr_port, token).await?
    };
    let mut outputs = Vec::new();
    let mut stdin_task = None;

    if stdio.terminal {
        std::fs::create_dir_all(CONSOLE_DIR)
            .map_err(|e| ContainerError::Failed(format!("creating {CONSOLE_DIR}: {e}")))?;
        let sock =
            Path::new(CONSOLE_DIR).join(format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock)
            .map_err(|e| ContainerError::Failed(format!("console socket: {e}")))?;
        let extra = vec!["--console-socket".to_string(), sock.display().to_string()];
        let argv = args(&extra);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let result = match run_helper_with(&argv, [devnull()?, devnull()?, devnull()?]).await {
            Ok(v) => match receive_pty(&listener).await {
                Ok(pty) => Ok((v, pty)),
                Err(e) => {
                    // Created, but without its terminal: take it away again.
                    if exec_id.is_empty() {
                        let _ = run_helper(&["delete", "--id", id, "--force"]).await;
                    } else if let Some(pid) = v.0.pid.and_then(|p| i32::try_from(p).ok()) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&sock);
        let ((outcome, since), pty) = result?;
        set_nonblocking(&pty)?;
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged for
        // as long as the AsyncFd owns it.
        let pty = unsafe { AsyncFd::register(pty) }
            .map_err(|e| ContainerError::Failed(format!("terminal: {e}")))?;
        let pty = Arc::new(pty);
        if let Some(mut out) = stdout {
            let pty = pty.clone();
            outputs.push(tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = pty_read(&pty, &mut buf).await {
                    if n == 0 || out.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = AsyncWriteExt::shutdown(&mut out).await;
            }));
        }
        if let Some(mut input) = stdin {
            let pty = pty.clone();
            stdin_task = Some(tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = input.read(&mut buf).await {
                    if n == 0 || pty_write_all(&pty, &buf[..n]).await.is_err() {
                        break;
                    }
                }
            }));
        }
        return Ok(finish(
            outcome,
            since,
            outputs,
            stdin_task,
            Some(pty),
            id,
            exec_id,
        ));
    }

    // Pipes: the process gets one end, the agent copies the other.
    let child_stdin = match stdin {
        Some(s) => {
            let (r, w) = pipe()?;
            let (read_half, _write_half) = tokio::io::split(s);
            stdin_task = Some(feed_stdin(read_half, w)?);
            r
        }
        None => devnull()?,
    };
    let mut child_out = |stream: Option<VsockStream>| -> Result<OwnedFd> {
        match stream {
            Some(s) => {
                let (r, w) = pipe()?;
                outputs.push(drain_output(r, s)?);
                Ok(w)
            }
            None => devnull(),
        }
    };
    let child_stdout = child_out(stdout)?;
    let child_stderr = child_out(stderr)?;
    let argv = args(&[]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let helper = run_helper_with(&argv, [child_stdin, child_stdout, child_stderr]).await;
    let (outcome, since) = match helper {
        Ok(v) => v,
        Err(e) => {
            if let Some(h) = stdin_task {
                h.abort();
            }
            for h in outputs {
                h.abort();
            }
            return Err(e);
        }
    };
    Ok(finish(
        outcome, since, outputs, stdin_task, None, id, exec_id,
    ))
}

fn finish(
    outcome: Outcome,
    since: Instant,
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
    pty: Option<Arc<AsyncFd<OwnedFd>>>,
    id: &str,
    exec_id: &str,
) -> Process {
    let pid = outcome.pid.unwrap_or(0);
    let (tx, rx) = watch::channel(None);
    let exited = Reaper::global().watch(i32::try_from(pid).unwrap_or(-1), since);
    tokio::spawn(async move {
        let code = exited.await.unwrap_or(255);
        let _ = tx.send(Some(code));
    });
    tracing::info!(container = id, exec = exec_id, pid, "process created");
    Process {
        pid,
        exit: rx,
        outputs: Mutex::new(outputs),
        stdin: Mutex::new(stdin),
        pty,
        cgroup_path: outcome.cgroup_path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(namespaces: serde_json::Value) -> oci_spec::runtime::Spec {
        let mut v = serde_json::to_value(oci_spec::runtime::Spec::default()).expect("json");
        v["linux"]["namespaces"] = namespaces;
        serde_json::from_value(v).expect("spec")
    }

    #[test]
    fn containers_need_a_mount_namespace_of_their_own() {
        let ok = spec_with(serde_json::json!([{"type": "pid"}, {"type": "mount"}]));
        assert!(own_mount_namespace(&ok).is_ok());
        let none = spec_with(serde_json::json!([{"type": "pid"}]));
        assert!(matches!(
            own_mount_namespace(&none),
            Err(ContainerError::Invalid(m)) if m.contains("no mount namespace")
        ));
        let joined = spec_with(serde_json::json!([{"type": "mount", "path": "/proc/1/ns/mnt"}]));
        assert!(matches!(
            own_mount_namespace(&joined),
            Err(ContainerError::Invalid(m)) if m.contains("existing mount namespace")
        ));
    }

    #[test]
    fn only_the_pod_pid_namespace_link_means_the_pod() {
        let link = Path::new(POD_PID_NAMESPACE);
        let pod = spec_with(serde_json::json!([{"type": "pid", "path": POD_PID_NAMESPACE}]));
        assert!(joins_pod_pid_namespace(&pod, link));
        let own = spec_with(serde_json::json!([{"type": "pid"}, {"type": "mount"}]));
        assert!(!joins_pod_pid_namespace(&own, link));
        let net = spec_with(serde_json::json!([{"type": "network", "path": POD_PID_NAMESPACE}]));
        assert!(!joins_pod_pid_namespace(&net, link));
    }
}
