//! The registry of the guest's containers and their processes: every rule
//! the agent API enforces about them (valid ids, no duplicates, what a
//! running or exited process allows, init versus exec) in one place. It
//! reaches the guest only through [`Runtime`] (the runtime helper) and
//! [`Syscall`], so the rules are unit-tested below with recording doubles.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use husk_protocols::{
    agent::{StatsContainerResponse, Stdio},
    POD_PID_NAMESPACE,
};
use nix::sys::signal::Signal;
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    helper::{Helper, Op, Runtime},
    joins_pod_pid_namespace, own_mount_namespace,
    process::Process,
    syscall::{Linux, Syscall},
    valid_id, ContainerError, Result,
};
use crate::{cgroups, podns::PodPidNamespace};

/// How long the cgroup of a container whose create failed may take to
/// empty before the agent gives up removing it.
const FAILED_CGROUP_PATIENCE: Duration = Duration::from_secs(15);

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
pub struct Containers<R = Helper, S = Linux> {
    runtime: R,
    sys: S,
    map: Mutex<HashMap<String, Entry>>,
    oom_tx: mpsc::Sender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::Receiver<String>>,
    /// The pod's shared PID namespace, made when a container first asks.
    pod_pid: PodPidNamespace,
}

impl Default for Containers {
    fn default() -> Self {
        Self::with(Helper, Linux)
    }
}

impl<R: Runtime, S: Syscall> Containers<R, S> {
    /// Containers made and changed by `runtime`, signalled through `sys`.
    pub fn with(runtime: R, sys: S) -> Self {
        let (oom_tx, oom_rx) = mpsc::channel(OOM_QUEUE);
        Self {
            runtime,
            sys,
            map: Mutex::default(),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
            pod_pid: PodPidNamespace::new(POD_PID_NAMESPACE),
        }
    }

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
        let created = self.runtime.create(id, bundle, stdio).await;
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
                    self.sys.remove_cgroup(dir, FAILED_CGROUP_PATIENCE).await;
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
        self.runtime.run(Op::Start(id)).await?;
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
        let proc = self.runtime.exec(id, exec_id, process_json, stdio).await?;
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
            return self.runtime.run(Op::KillAll { id, signal }).await;
        }
        if proc.exited().is_some() {
            return Err(ContainerError::State(format!(
                "process {} has exited",
                if exec_id.is_empty() { id } else { exec_id }
            )));
        }
        let pid = i32::try_from(proc.pid)
            .map_err(|_| ContainerError::Failed("pid out of range".into()))?;
        self.sys
            .kill(pid, sig)
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
        let op = if paused {
            Op::Pause(id)
        } else {
            Op::Resume(id)
        };
        self.runtime.run(op).await
    }

    /// Removes a container; with `force`, kills what still runs first.
    pub async fn delete(&self, id: &str, force: bool) -> Result<()> {
        let init = self.process(id, "")?;
        if init.exited().is_none() && !force {
            return Err(ContainerError::State(format!(
                "container {id} is still running"
            )));
        }
        self.runtime.run(Op::Delete { id, force }).await?;
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
        self.runtime.run(Op::Update { id, resources_json }).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::{helper::test::Recording, syscall::test as sys};

    type Doubles = Containers<Recording, sys::Recording>;

    fn doubles() -> Doubles {
        Containers::with(Recording::default(), sys::Recording::default())
    }

    /// A bundle whose config.json is the default OCI spec (own mount
    /// namespace, no terminal).
    fn bundle() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = oci_spec::runtime::Spec::default();
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec(&spec).expect("json"),
        )
        .expect("write");
        dir
    }

    /// An exec's OCI process: the default one.
    fn process_json() -> Vec<u8> {
        serde_json::to_vec(&oci_spec::runtime::Process::default()).expect("json")
    }

    fn stdio() -> Stdio {
        Stdio::new()
    }

    #[tokio::test]
    async fn create_refuses_bad_ids_duplicates_and_bad_bundles_before_the_runtime() {
        let c = doubles();
        let b = bundle();
        assert!(matches!(
            c.create("../x", b.path(), &stdio()).await,
            Err(ContainerError::Invalid(_))
        ));
        assert_eq!(
            c.create("c1", b.path(), &stdio()).await.expect("create"),
            101
        );
        assert!(matches!(
            c.create("c1", b.path(), &stdio()).await,
            Err(ContainerError::Exists(_))
        ));
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            c.create("c2", empty.path(), &stdio()).await,
            Err(ContainerError::Invalid(m)) if m.contains("config.json")
        ));
        std::fs::write(empty.path().join("config.json"), b"{not json").expect("write");
        assert!(matches!(
            c.create("c2", empty.path(), &stdio()).await,
            Err(ContainerError::Invalid(m)) if m.contains("not a valid OCI spec")
        ));
        let mut tty = stdio();
        tty.terminal = true;
        assert!(matches!(
            c.create("c3", b.path(), &tty).await,
            Err(ContainerError::Invalid(m)) if m.contains("terminal")
        ));
        assert_eq!(c.runtime.calls(), ["create c1"]);
        assert!(c.sys.calls().is_empty());
    }

    #[tokio::test]
    async fn a_failed_create_removes_the_cgroup_libcontainer_left() {
        let mut runtime = Recording::default();
        runtime.failing.insert("c1".into());
        let c = Containers::with(runtime, sys::Recording::default());
        let b = tempfile::tempdir().expect("tempdir");
        let mut spec = serde_json::to_value(oci_spec::runtime::Spec::default()).expect("json");
        spec["linux"]["cgroupsPath"] = "/pods/c1".into();
        std::fs::write(
            b.path().join("config.json"),
            serde_json::to_vec(&spec).expect("json"),
        )
        .expect("write");
        assert!(matches!(
            c.create("c1", b.path(), &stdio()).await,
            Err(ContainerError::Failed(_))
        ));
        assert_eq!(
            c.sys.calls(),
            [sys::Call::RemoveCgroup("/sys/fs/cgroup/pods/c1".into())]
        );
        assert!(matches!(
            c.process("c1", ""),
            Err(ContainerError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn execs_need_a_running_container_and_a_new_id() {
        let c = doubles();
        let b = bundle();
        let json = process_json();
        assert!(matches!(
            c.exec("nope", "e1", &json, &stdio()).await,
            Err(ContainerError::NotFound(_))
        ));
        c.create("c1", b.path(), &stdio()).await.expect("create");
        assert!(matches!(
            c.exec("c1", "e1", b"{", &stdio()).await,
            Err(ContainerError::Invalid(m)) if m.contains("invalid OCI process")
        ));
        assert!(matches!(
            c.exec("c1", "", &json, &stdio()).await,
            Err(ContainerError::Invalid(_))
        ));
        assert_eq!(
            c.exec("c1", "e1", &json, &stdio()).await.expect("exec"),
            102
        );
        assert!(matches!(
            c.exec("c1", "e1", &json, &stdio()).await,
            Err(ContainerError::Exists(_))
        ));
        c.runtime.exit(0).set(0);
        assert!(matches!(
            c.exec("c1", "e2", &json, &stdio()).await,
            Err(ContainerError::State(m)) if m.contains("not running")
        ));
        assert_eq!(c.runtime.calls(), ["create c1", "exec c1 e1"]);
    }

    #[tokio::test]
    async fn signals_go_to_the_process_or_through_the_runtime_to_all() {
        let c = doubles();
        let b = bundle();
        let json = process_json();
        c.create("c1", b.path(), &stdio()).await.expect("create");
        c.exec("c1", "e1", &json, &stdio()).await.expect("exec");
        c.signal("c1", "e1", libc::SIGTERM, false)
            .await
            .expect("one");
        c.signal("c1", "", libc::SIGKILL, true).await.expect("all");
        // `all` means the container's processes only for its init.
        c.signal("c1", "e1", libc::SIGINT, true)
            .await
            .expect("exec all");
        assert!(matches!(
            c.signal("c1", "e1", 9999, false).await,
            Err(ContainerError::Invalid(_))
        ));
        c.runtime.exit(1).set(0);
        assert!(matches!(
            c.signal("c1", "e1", libc::SIGTERM, false).await,
            Err(ContainerError::State(m)) if m.contains("has exited")
        ));
        assert_eq!(
            c.sys.calls(),
            [
                sys::Call::Kill(102, Signal::SIGTERM),
                sys::Call::Kill(102, Signal::SIGINT)
            ]
        );
        assert_eq!(
            c.runtime.calls(),
            [
                "create c1",
                "exec c1 e1",
                "KillAll { id: \"c1\", signal: 9 }"
            ]
        );
    }

    #[tokio::test]
    async fn a_running_container_is_deleted_only_with_force() {
        let c = doubles();
        let b = bundle();
        c.create("c1", b.path(), &stdio()).await.expect("create");
        c.create("c2", b.path(), &stdio()).await.expect("create");
        assert!(matches!(
            c.delete("c1", false).await,
            Err(ContainerError::State(m)) if m.contains("still running")
        ));
        c.delete("c1", true).await.expect("forced");
        assert!(matches!(
            c.process("c1", ""),
            Err(ContainerError::NotFound(_))
        ));
        c.runtime.exit(1).set(0);
        c.delete("c2", false).await.expect("exited");
        assert!(matches!(
            c.delete("c2", false).await,
            Err(ContainerError::NotFound(_))
        ));
        assert_eq!(
            c.runtime.calls(),
            [
                "create c1",
                "create c2",
                "Delete { id: \"c1\", force: true }",
                "Delete { id: \"c2\", force: false }"
            ]
        );
    }

    #[tokio::test]
    async fn an_exec_is_forgotten_only_after_it_exited() {
        let c = doubles();
        let b = bundle();
        let json = process_json();
        c.create("c1", b.path(), &stdio()).await.expect("create");
        c.exec("c1", "e1", &json, &stdio()).await.expect("exec");
        assert!(matches!(
            c.remove_exec("c1", ""),
            Err(ContainerError::Invalid(_))
        ));
        assert!(matches!(
            c.remove_exec("c1", "e1"),
            Err(ContainerError::State(_))
        ));
        c.runtime.exit(1).set(5);
        assert_eq!(c.process("c1", "e1").expect("exec").wait().await, 5);
        c.remove_exec("c1", "e1").expect("removed");
        assert!(matches!(
            c.process("c1", "e1"),
            Err(ContainerError::NotFound(_))
        ));
        // The id is free again.
        c.exec("c1", "e1", &json, &stdio()).await.expect("again");
    }

    #[tokio::test]
    async fn updates_and_pauses_reach_only_a_running_container() {
        let c = doubles();
        let b = bundle();
        c.create("c1", b.path(), &stdio()).await.expect("create");
        assert!(matches!(
            c.update("c1", br#"{"memory": 5}"#).await,
            Err(ContainerError::Invalid(m)) if m.contains("LinuxResources")
        ));
        c.update("c1", b"{}").await.expect("update");
        c.set_paused("c1", true).await.expect("pause");
        c.set_paused("c1", false).await.expect("resume");
        c.start("c1").await.expect("start");
        c.runtime.exit(0).set(0);
        assert!(matches!(
            c.update("c1", b"{}").await,
            Err(ContainerError::State(_))
        ));
        assert!(matches!(
            c.set_paused("nope", true).await,
            Err(ContainerError::NotFound(_))
        ));
        assert_eq!(
            c.runtime.calls(),
            [
                "create c1",
                "Update { id: \"c1\", resources_json: [123, 125] }",
                "Pause(\"c1\")",
                "Resume(\"c1\")",
                "Start(\"c1\")"
            ]
        );
    }
}
