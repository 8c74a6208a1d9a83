//! containerd's Task API, served by the shim and carried out in the pod VM.
//!
//! The first Create of a shim starts the pod VM (one per sandbox; with
//! `ctr run` every container is its own sandbox); each container's root
//! file system and bind mounts go into the pod's shared directory
//! (`rootfs`), its processes run through the agent, their stdio on vsock
//! streams (`io`). A waiter per started process collects its exit from the
//! agent, lets its output drain, records the status and publishes TaskExit.
//! If the VM dies, every process's wait fails and each is reported exited
//! (status 255) the same way.
//!
//! A CRI sandbox container runs nothing in the guest (`sandbox`): its task
//! stands for the pod VM, with `husk-vmm`'s pid.
//!
//! The handlers are thin: lookups and phase rules live in `container`,
//! errors and their codes in `error`, guest calls behind `agent::Agent`,
//! events behind `Events`. So the lifecycle below is unit-tested with a
//! fake agent and a recording publisher, without a VM (the tests at the
//! end); what needs the VM itself (Create, a sandbox's start, Shutdown) is
//! covered end to end.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use containerd_shim::{
    api,
    asynchronous::{publisher::RemotePublisher, ExitSignal},
    protos::{
        events::task::{
            TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM,
            TaskPaused, TaskResumed, TaskStart,
        },
        protobuf::{well_known_types::timestamp::Timestamp, MessageDyn},
        shim_async::Task,
        topics,
        ttrpc::{self as shim_ttrpc, r#async::TtrpcContext},
        types::task::ProcessInfo,
    },
    util::convert_to_any,
};
use husk_shim::{
    metrics,
    steps::{self, Step},
};
use tokio::sync::Mutex;

use crate::{
    agent::{Agent, AgentResult},
    config::{config_path_from_options, Config},
    container::{Container, Containers, Exited, Phase, Proc},
    error::TaskError,
    exits::Exits,
    io::ProcessIo,
    rootfs,
    sandbox::{self, Role},
    vm::{HostSide, Vm},
};

type TtrpcResult<T> = shim_ttrpc::Result<T>;
type TaskResult<T> = Result<T, TaskError>;

/// How long output may keep flowing after the agent reported an exit.
const DRAIN: Duration = Duration::from_secs(5);

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    t.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    t
}

/// Where task events go: containerd's event service.
#[async_trait]
pub trait Events: Send + Sync {
    /// Publishes `event` on `topic`; a failure is logged, not returned
    /// (containerd also learns the state from the Task API).
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);
}

/// containerd's event service, for one containerd namespace.
struct Publisher {
    publisher: RemotePublisher,
    namespace: String,
}

#[async_trait]
impl Events for Publisher {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(
                containerd_shim::Context::default(),
                topic,
                &self.namespace,
                event,
            )
            .await
        {
            tracing::warn!("publishing {topic}: {e}");
        }
    }
}

#[derive(Default)]
struct State {
    vm: Option<Arc<Vm>>,
    /// The pod VM's agent (set with `vm`; alone in unit tests).
    agent: Option<Arc<dyn Agent>>,
    containers: Containers,
}

/// The Task service.
#[derive(Clone)]
pub struct HuskTask {
    state: Arc<Mutex<State>>,
    events: Arc<dyn Events>,
    namespace: String,
    exit: Arc<ExitSignal>,
    exits: Arc<Exits>,
}

impl HuskTask {
    /// A service publishing to `publisher` for containerd namespace
    /// `namespace`; `exit` ends the shim.
    pub fn new(
        publisher: RemotePublisher,
        namespace: &str,
        exit: Arc<ExitSignal>,
        exits: Arc<Exits>,
    ) -> Self {
        let events = Publisher {
            publisher,
            namespace: namespace.to_string(),
        };
        Self::with_events(Arc::new(events), namespace, exit, exits)
    }

    fn with_events(
        events: Arc<dyn Events>,
        namespace: &str,
        exit: Arc<ExitSignal>,
        exits: Arc<Exits>,
    ) -> Self {
        Self {
            state: Arc::default(),
            events,
            namespace: namespace.to_string(),
            exit,
            exits,
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        self.events.publish(topic, event).await;
    }

    async fn vm(&self) -> TaskResult<Arc<Vm>> {
        self.state.lock().await.vm.clone().ok_or(TaskError::NoVm)
    }

    async fn agent(&self) -> TaskResult<Arc<dyn Agent>> {
        self.state.lock().await.agent.clone().ok_or(TaskError::NoVm)
    }

    /// Waits for process `exec_id` of `id` in the guest, then records and
    /// publishes its exit.
    fn spawn_waiter(&self, id: String, exec_id: String, pid: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            let code = match this.agent().await {
                Ok(agent) => exit_status(agent.wait_process(&id, &exec_id).await, &id, &exec_id),
                Err(_) => 255,
            };
            let (io, started) = {
                let mut st = this.state.lock().await;
                match st.containers.process_mut(&id, &exec_id) {
                    Ok(p) => (p.io.take(), p.started),
                    Err(_) => (None, None),
                }
            };
            let mut first_output = None;
            if let Some(mut io) = io {
                io.wait_outputs(DRAIN).await;
                first_output = io.first_output();
            }
            this.record_exit(&id, &exec_id, pid, code).await;
            if let Some(started) = started {
                let init = exec_id.is_empty();
                if let (Some(first), true) = (first_output, init) {
                    steps::record(
                        &id,
                        Step::FirstOutput,
                        first.saturating_duration_since(started),
                    );
                }
                let step = if init { Step::Exit } else { Step::ExecExit };
                if let Ok(vm) = this.vm().await {
                    vm.step(&id, step, started.elapsed()).await;
                }
            }
        });
    }

    /// Records that process `exec_id` of `id` exited with `code` and
    /// publishes TaskExit, once: a process already stopped is left as it is.
    async fn record_exit(&self, id: &str, exec_id: &str, pid: u32, code: u32) {
        let at = now();
        let exit = Exited {
            code,
            at: at.clone(),
        };
        if !self
            .state
            .lock()
            .await
            .containers
            .record_exit(id, exec_id, exit)
        {
            return;
        }
        let mut ev = TaskExit::new();
        ev.container_id = id.to_string();
        ev.id = if exec_id.is_empty() { id } else { exec_id }.to_string();
        ev.pid = pid;
        ev.exit_status = code;
        ev.exited_at = Some(at).into();
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
            .await;
    }

    /// The pod VM, started for `sandbox` with `hostname` (and cabled to
    /// `net`) if it is not yet.
    async fn ensure_vm(
        &self,
        cfg: &Config,
        sandbox: &str,
        hostname: &str,
        net: Option<crate::network::PodNetwork>,
        host: &HostSide,
    ) -> TaskResult<Arc<Vm>> {
        let mut st = self.state.lock().await;
        if let Some(vm) = &st.vm {
            return Ok(vm.clone());
        }
        let vm = Vm::start(
            cfg,
            &self.namespace,
            sandbox,
            hostname,
            net,
            host,
            &self.exits,
        )
        .await
        .map_err(TaskError::VmStart)?;
        let vm = Arc::new(vm);
        st.vm = Some(vm.clone());
        st.agent = Some(vm.guest.clone());
        let gone = vm.clone();
        tokio::spawn(
            self.clone()
                .relay_oom_events(vm.guest.clone(), move || gone.stopping() || !gone.alive()),
        );
        let watched = vm.clone();
        tokio::spawn(async move {
            let who = watched.watch_death().await;
            if !watched.stopping() {
                tracing::error!(
                    pod = %watched.dir.display(),
                    "{who} exited unexpectedly; the pod VM is gone and its processes with it"
                );
            }
        });
        Ok(vm)
    }
}

/// The exit status a WaitProcess answer stands for: 255 when the wait
/// failed (the VM died) or the status is out of range.
fn exit_status(answer: AgentResult<i32>, id: &str, exec_id: &str) -> u32 {
    match answer {
        Ok(s) => u32::try_from(s).unwrap_or(255),
        Err(e) => {
            tracing::error!(container = %id, exec = %exec_id, "waiting for the process: {e}");
            255
        }
    }
}

fn load_config(
    options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
) -> TaskResult<Config> {
    let explicit = options.and_then(|o| config_path_from_options(&o.type_url, &o.value));
    Config::load(explicit.as_deref()).map_err(TaskError::Config)
}

#[async_trait]
impl Task for HuskTask {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        Ok(self.create_task(&req).await?)
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = if !req.exec_id.is_empty() {
            self.start_exec(&req.id, &req.exec_id).await?
        } else if self.state.lock().await.containers.is_sandbox(&req.id) {
            self.start_sandbox(&req.id).await?
        } else {
            self.start_container(&req.id).await?
        };
        let mut resp = api::StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exited) = if req.exec_id.is_empty() {
            self.delete_container(&req.id).await?
        } else {
            self.delete_exec(&req.id, &req.exec_id).await?
        };
        let mut resp = api::DeleteResponse::new();
        resp.pid = pid;
        if let Some(e) = exited {
            resp.exit_status = e.code;
            resp.exited_at = Some(e.at).into();
        }
        Ok(resp)
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let st = self.state.lock().await;
        let bundle = st.containers.get(&req.id)?.bundle.clone();
        let p = st.containers.process(&req.id, &req.exec_id)?;
        let mut resp = api::StateResponse::new();
        resp.id = req.id.clone();
        resp.exec_id = req.exec_id.clone();
        resp.bundle = bundle;
        resp.pid = p.pid;
        resp.status = p.phase.status().into();
        resp.stdin = p.stdin.clone();
        resp.stdout = p.stdout.clone();
        resp.stderr = p.stderr.clone();
        resp.terminal = p.terminal;
        if let Some(e) = p.exited() {
            resp.exit_status = e.code;
            resp.exited_at = Some(e.at).into();
        }
        Ok(resp)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let exited = self.wait_exit(&req.id, &req.exec_id).await?;
        let mut resp = api::WaitResponse::new();
        resp.exit_status = exited.code;
        resp.exited_at = Some(exited.at).into();
        Ok(resp)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.signal(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| TaskError::Invalid("exec without a process spec".into()))?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec)
            .map_err(|e| TaskError::Invalid(format!("invalid process spec: {e}")))?;
        {
            let mut st = self.state.lock().await;
            let c = st.containers.get_mut(&req.id)?;
            c.check_exec(&req.id, &req.exec_id)?;
            let mut p = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
            p.spec = spec;
            c.execs.insert(req.exec_id.clone(), p);
        }
        let mut ev = TaskExecAdded::new();
        ev.container_id = req.id.clone();
        ev.exec_id = req.exec_id.clone();
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.agent()
            .await?
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await
            .map_err(|e| TaskError::agent("resizing the terminal", e))?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            let st = self.state.lock().await;
            if let Some(io) = &st.containers.process(&req.id, &req.exec_id)?.io {
                io.close_stdin();
            }
        }
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pids = if self.state.lock().await.containers.is_sandbox(&req.id) {
            vec![self.vm().await?.vmm_pid()]
        } else {
            self.agent()
                .await?
                .list_pids(&req.id)
                .await
                .map_err(|e| TaskError::agent("listing processes", e))?
        };
        let mut resp = api::PidsResponse::new();
        resp.processes = pids
            .into_iter()
            .map(|pid| {
                let mut p = ProcessInfo::new();
                p.pid = pid;
                p
            })
            .collect();
        Ok(resp)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, true).await?;
        let mut ev = TaskPaused::new();
        ev.container_id = req.id.clone();
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, false).await?;
        let mut ev = TaskResumed::new();
        ev.container_id = req.id.clone();
        self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let st = self.state.lock().await;
        let mut resp = api::ConnectResponse::new();
        resp.shim_pid = std::process::id();
        resp.version = env!("CARGO_PKG_VERSION").into();
        if let Ok(c) = st.containers.get(&req.id) {
            resp.task_pid = c.init.pid;
        }
        Ok(resp)
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        self.state.lock().await.containers.get(&req.id)?;
        let stats = self
            .agent()
            .await?
            .stats(&req.id)
            .await
            .map_err(|e| TaskError::agent("reading the container's metrics", e))?;
        let any = convert_to_any(Box::new(metrics::v1_metrics(&stats)))
            .map_err(|e| TaskError::Internal(format!("encoding metrics: {e}")))?;
        let mut resp = api::StatsResponse::new();
        resp.stats = Some(any).into();
        Ok(resp)
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        self.state.lock().await.containers.get(&req.id)?;
        let json = resources_json(req.resources.as_ref())?;
        self.agent()
            .await?
            .update(&req.id, &json)
            .await
            .map_err(|e| TaskError::agent("updating the container's resources", e))?;
        Ok(api::Empty::new())
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let vm = {
            let mut st = self.state.lock().await;
            if !st.containers.is_empty() {
                return Ok(api::Empty::new());
            }
            st.agent = None;
            st.vm.take()
        };
        // containerd gives Shutdown a few seconds, then drops the call,
        // which cancels this handler; an orderly guest shutdown can take
        // longer where guest kernel code is slow. The work runs in a task
        // of its own, so the VM is always taken down and the shim always
        // exits.
        let exit = self.exit.clone();
        let work = tokio::spawn(async move {
            if let Some(vm) = vm {
                vm.shutdown().await;
            }
            exit.signal();
        });
        let _ = work.await;
        Ok(api::Empty::new())
    }
}

/// The OCI LinuxResources JSON an UpdateTaskRequest carries (containerd
/// marshals them as a JSON-typed Any), checked before it goes to the guest.
fn resources_json(
    any: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
) -> TaskResult<Vec<u8>> {
    let any = any.ok_or_else(|| TaskError::Invalid("the update carries no resources".into()))?;
    if !any.type_url.ends_with("/LinuxResources") {
        return Err(TaskError::Invalid(format!(
            "resources of type {:?}: husk takes OCI LinuxResources",
            any.type_url
        )));
    }
    serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&any.value)
        .map_err(|e| TaskError::Invalid(format!("invalid LinuxResources: {e}")))?;
    Ok(any.value.clone())
}

/// Where pod `pod`'s VM (started for `spec`, a VM of `cfg`'s shape with
/// `cpu` as its CPU limit) is accounted on the host: the spec's cgroup,
/// bounded by the pod's CPU limit and by its guest RAM plus the host
/// overhead; `oom_score_adj` 0 until a container gives its own.
fn host_side(
    cfg: &Config,
    spec: &oci_spec::runtime::Spec,
    namespace: &str,
    pod: &str,
    cpu: Option<(i64, u64)>,
) -> TaskResult<HostSide> {
    let path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .and_then(|p| p.to_str());
    let placement =
        husk_shim::jail::Placement::for_sandbox(path, &cfg.cgroup_parent, namespace, pod)
            .map_err(|e| TaskError::Invalid(e.to_string()))?;
    Ok(HostSide {
        placement,
        limits: husk_shim::jail::pod_limits(cpu, Some(cfg.mem_mib), cfg.host_overhead_mib),
        oom_score_adj: 0,
    })
}

impl HuskTask {
    /// Create: a sandbox container starts the pod VM; any other container
    /// starts it too if it is the first (`ctr run`), then is created in
    /// the guest.
    async fn create_task(
        &self,
        req: &api::CreateTaskRequest,
    ) -> TaskResult<api::CreateTaskResponse> {
        self.state.lock().await.containers.check_new(&req.id)?;
        let cfg = load_config(req.options.as_ref())?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = rootfs::read_spec(&bundle).map_err(TaskError::Bundle)?;
        let role = sandbox::role(&spec);
        if role == Role::Sandbox {
            return self.create_sandbox(&cfg, req, &spec).await;
        }
        if role == Role::Alone {
            sandbox::refuse_host_namespaces(&spec).map_err(TaskError::Invalid)?;
        }
        rootfs::check(&bundle, &req.rootfs, &spec).map_err(TaskError::Bundle)?;
        let pod = role.pod(&req.id);
        let oom_score_adj = spec.process().as_ref().and_then(|p| p.oom_score_adj());
        let cpu = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.cpu().as_ref())
            .and_then(|c| c.quota().zip(c.period()));
        let mut host = host_side(&cfg, &spec, &self.namespace, &pod, cpu)?;
        host.oom_score_adj = oom_score_adj.unwrap_or(0);
        let vm = self
            .ensure_vm(&cfg, &pod, &sandbox::hostname(&spec, &pod), None, &host)
            .await?;
        // Lets `delete` find the pod after a shim crash.
        let _ = std::fs::write(bundle.join("husk-pod"), vm.dir.display().to_string());

        let creating = std::time::Instant::now();
        let settings = rootfs::Settings {
            kubelet_root: cfg.kubelet_root.clone(),
        };
        let prepared = rootfs::prepare(&vm.work, &req.id, &bundle, &req.rootfs, spec, &settings)
            .map_err(TaskError::Bundle)?;
        let limits = cfg.volume_limits();
        let watches = match self
            .guest_volumes(&vm, &req.id, &prepared.volumes, limits)
            .await
        {
            Ok(w) => w,
            Err(e) => {
                rootfs::release(&vm.work, &req.id);
                return Err(e);
            }
        };
        let guest_bundle = prepared.bundle;
        let mut proc = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let io = ProcessIo::setup(&vm, &req.stdin, &req.stdout, &req.stderr, req.terminal)
            .map_err(|e| {
                rootfs::release(&vm.work, &req.id);
                TaskError::Stdio(e)
            })?;
        let created = vm
            .guest
            .create_container(&req.id, &guest_bundle, io.stdio())
            .await;
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                drop(io);
                rootfs::release(&vm.work, &req.id);
                return Err(TaskError::agent("creating the container in the guest", e));
            }
        };
        vm.step(&req.id, Step::Create, creating.elapsed()).await;
        if let (Role::Member { .. }, Some(adj)) = (&role, oom_score_adj) {
            vm.adopt_oom_score_adj(adj);
        }
        proc.pid = pid;
        proc.io = Some(io);
        self.state.lock().await.containers.insert(
            &req.id,
            Container {
                watches,
                ..Container::new(&req.bundle, proc, false)
            },
        )?;
        self.publish_create(req, pid).await;
        let mut resp = api::CreateTaskResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    /// Makes the volumes the guest holds itself for container `id` (memory
    /// emptyDirs, copies of atomically updated directories) and starts
    /// following the host side of the copies.
    async fn guest_volumes(
        &self,
        vm: &Vm,
        id: &str,
        volumes: &[rootfs::GuestVolume],
        limits: husk_protocols::pack::Limits,
    ) -> TaskResult<Vec<crate::volwatch::Watch>> {
        let mut watches = Vec::new();
        for v in volumes {
            // Watch first: a switch between the copy and the watch would
            // otherwise be missed.
            let w = crate::volwatch::watch(vm.guest.clone(), id, v, limits).map_err(|e| {
                TaskError::Bundle(rootfs::RootfsError::Io(format!("watching {v:?}"), e))
            })?;
            let (req, _pack) = crate::volwatch::request(v, &limits).map_err(TaskError::Volume)?;
            vm.guest
                .prepare_volume(req)
                .await
                .map_err(|e| TaskError::agent("preparing a volume in the guest", e))?;
            watches.extend(w);
        }
        Ok(watches)
    }

    /// Publishes TaskCreate for `req`, whose init process has `pid`.
    async fn publish_create(&self, req: &api::CreateTaskRequest, pid: u32) {
        let mut ev = TaskCreate::new();
        ev.container_id = req.id.clone();
        ev.bundle = req.bundle.clone();
        ev.rootfs = req.rootfs.clone();
        let mut tio = TaskIO::new();
        tio.stdin = req.stdin.clone();
        tio.stdout = req.stdout.clone();
        tio.stderr = req.stderr.clone();
        tio.terminal = req.terminal;
        ev.io = Some(tio).into();
        ev.pid = pid;
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev))
            .await;
    }

    /// Creates CRI's sandbox container: starts the pod VM with the pod's
    /// hostname; nothing runs in the guest for it (`sandbox`).
    async fn create_sandbox(
        &self,
        cfg: &Config,
        req: &api::CreateTaskRequest,
        spec: &oci_spec::runtime::Spec,
    ) -> TaskResult<api::CreateTaskResponse> {
        // The VM's vCPUs and memory from what the pod asks for.
        let cfg =
            &crate::sizing::sized(cfg, spec).map_err(|e| TaskError::Invalid(e.to_string()))?;
        tracing::info!(
            pod = %req.id,
            vcpus = cfg.vcpus,
            mem_mib = cfg.mem_mib,
            "pod VM shape"
        );
        sandbox::refuse_host_namespaces(spec).map_err(TaskError::Invalid)?;
        let ask =
            crate::sizing::Ask::from_spec(spec).map_err(|e| TaskError::Invalid(e.to_string()))?;
        let host = host_side(
            cfg,
            spec,
            &self.namespace,
            &req.id,
            ask.cpu_quota.zip(ask.cpu_period),
        )?;
        let netns = crate::network::pod_netns(spec).map_err(TaskError::PodNetwork)?;
        let net = match netns {
            Some(ns) => Some(
                crate::network::attach(ns.clone())
                    .await
                    .map_err(TaskError::Network)?,
            ),
            None => None,
        };
        let netns = net.as_ref().map(|n| n.netns.clone());
        let vm = match self
            .ensure_vm(cfg, &req.id, &sandbox::hostname(spec, &req.id), net, &host)
            .await
        {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(ns) = netns {
                    crate::network::detach(ns).await;
                }
                return Err(e);
            }
        };
        let _ = std::fs::write(
            PathBuf::from(&req.bundle).join("husk-pod"),
            vm.dir.display().to_string(),
        );
        if let Some(ns) = netns {
            tokio::spawn(crate::portfwd::mirror(vm.clone(), ns));
        }
        let mut proc = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        proc.pid = vm.vmm_pid();
        self.state
            .lock()
            .await
            .containers
            .insert(&req.id, Container::new(&req.bundle, proc, true))?;
        self.publish_create(req, vm.vmm_pid()).await;
        let mut resp = api::CreateTaskResponse::new();
        resp.pid = vm.vmm_pid();
        Ok(resp)
    }

    /// Starts container `id`'s init process in the guest.
    async fn start_container(&self, id: &str) -> TaskResult<u32> {
        let agent = self.agent().await?;
        self.state
            .lock()
            .await
            .containers
            .get(id)?
            .check_start(id)?;
        let starting = std::time::Instant::now();
        let pid = agent
            .start_container(id)
            .await
            .map_err(|e| TaskError::agent("starting the container", e))?;
        if let Ok(vm) = self.vm().await {
            vm.step(id, Step::Start, starting.elapsed()).await;
        }
        if let Ok(c) = self.state.lock().await.containers.get_mut(id) {
            // The pid Create reported; the agent's answer is the authority.
            c.init.pid = pid;
            c.init.phase = Phase::Running;
            c.init.started = Some(starting);
        }
        self.spawn_waiter(id.to_string(), String::new(), pid);
        let mut ev = TaskStart::new();
        ev.container_id = id.to_string();
        ev.pid = pid;
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(pid)
    }

    /// Starts exec `exec_id` of container `id`, with its stdio.
    async fn start_exec(&self, id: &str, exec_id: &str) -> TaskResult<u32> {
        let vm = self.vm().await?;
        let (spec, io) = {
            let st = self.state.lock().await;
            let p = st.containers.process(id, exec_id)?;
            p.check_start(exec_id)?;
            let io = ProcessIo::setup(&vm, &p.stdin, &p.stdout, &p.stderr, p.terminal)
                .map_err(TaskError::Stdio)?;
            (p.spec.clone(), io)
        };
        let starting = std::time::Instant::now();
        let pid = vm
            .guest
            .exec_process(id, exec_id, &spec, io.stdio())
            .await
            .map_err(|e| TaskError::agent("starting the process", e))?;
        vm.step(id, Step::ExecStart, starting.elapsed()).await;
        if let Ok(p) = self.state.lock().await.containers.process_mut(id, exec_id) {
            p.pid = pid;
            p.phase = Phase::Running;
            p.io = Some(io);
            p.started = Some(starting);
        }
        self.spawn_waiter(id.to_string(), exec_id.to_string(), pid);
        let mut ev = TaskExecStarted::new();
        ev.container_id = id.to_string();
        ev.exec_id = exec_id.to_string();
        ev.pid = pid;
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(pid)
    }

    /// Starts the sandbox task: it runs until it is killed or the VM dies.
    async fn start_sandbox(&self, id: &str) -> TaskResult<u32> {
        let vm = self.vm().await?;
        {
            let mut st = self.state.lock().await;
            let c = st.containers.get_mut(id)?;
            c.check_start(id)?;
            c.init.phase = Phase::Running;
        }
        let pid = vm.vmm_pid();
        let this = self.clone();
        let watched = id.to_string();
        let mut vmm_exit = vm.vmm_exit.clone();
        tokio::spawn(async move {
            let _ = vmm_exit.wait_for(Option::is_some).await;
            // The pod VM is gone (a kill recorded the exit already).
            this.record_exit(&watched, "", pid, 255).await;
        });
        let mut ev = TaskStart::new();
        ev.container_id = id.to_string();
        ev.pid = pid;
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(pid)
    }

    /// Deletes exec `exec_id` of `id` unless it runs; its pid and exit.
    async fn delete_exec(&self, id: &str, exec_id: &str) -> TaskResult<(u32, Option<Exited>)> {
        let agent = self.state.lock().await.agent.clone();
        let (pid, exited, stopped) = {
            let st = self.state.lock().await;
            let p = st.containers.process(id, exec_id)?;
            p.check_delete(exec_id)?;
            (p.pid, p.exited(), p.phase == Phase::Stopped)
        };
        if let (Some(agent), true) = (agent, stopped) {
            let _ = agent.delete_process(id, exec_id).await;
        }
        if let Ok(c) = self.state.lock().await.containers.get_mut(id) {
            c.execs.remove(exec_id);
        }
        Ok((pid, exited))
    }

    /// Deletes container `id` unless it runs: in the guest, its files on
    /// the host, its record; publishes TaskDelete. Its pid and exit.
    async fn delete_container(&self, id: &str) -> TaskResult<(u32, Option<Exited>)> {
        let (vm, agent) = {
            let st = self.state.lock().await;
            (st.vm.clone(), st.agent.clone())
        };
        let (pid, exited, is_sandbox) = {
            let st = self.state.lock().await;
            let c = st.containers.get(id)?;
            c.check_delete(id)?;
            (c.init.pid, c.init.exited(), c.sandbox)
        };
        // The sandbox has nothing in the guest; the VM goes at Shutdown.
        if !is_sandbox {
            let alive = vm.as_ref().is_none_or(|vm| vm.alive());
            if let (Some(agent), true) = (agent, alive) {
                // A created container that never ran is taken down too.
                let deleting = std::time::Instant::now();
                match (agent.delete_container(id, true).await, &vm) {
                    (Ok(()), Some(vm)) => vm.step(id, Step::Delete, deleting.elapsed()).await,
                    (Ok(()), None) => steps::record(id, Step::Delete, deleting.elapsed()),
                    (Err(e), _) => tracing::warn!(container = %id, "deleting in the guest: {e}"),
                }
            }
            if let Some(vm) = &vm {
                rootfs::release(&vm.work, id);
            }
        }
        self.state.lock().await.containers.remove(id);
        let exited = exited.unwrap_or(Exited { code: 0, at: now() });
        let mut ev = TaskDelete::new();
        ev.container_id = id.to_string();
        ev.id = id.to_string();
        ev.pid = pid;
        ev.exit_status = exited.code;
        ev.exited_at = Some(exited.at.clone()).into();
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok((pid, Some(exited)))
    }

    /// Waits until process `exec_id` of `id` has exited; its exit.
    async fn wait_exit(&self, id: &str, exec_id: &str) -> TaskResult<Exited> {
        let mut rx = self
            .state
            .lock()
            .await
            .containers
            .process(id, exec_id)?
            .subscribe();
        let exited = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| TaskError::Gone)?
            .clone()
            .unwrap_or(Exited {
                code: 255,
                at: now(),
            });
        Ok(exited)
    }

    /// Kill: a signal for a process in the guest, or for the sandbox.
    async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> TaskResult<()> {
        let agent = self.agent().await?;
        let sandbox_pid = {
            let st = self.state.lock().await;
            let p = st.containers.process(id, exec_id)?;
            p.check_signal(all)?;
            (st.containers.is_sandbox(id) && exec_id.is_empty()).then_some(p.pid)
        };
        if let Some(pid) = sandbox_pid {
            self.kill_sandbox(id, pid, signal).await;
            return Ok(());
        }
        agent
            .signal_process(id, exec_id, signal, all)
            .await
            .map_err(|e| TaskError::agent("signalling", e))
    }

    /// Kills the sandbox task as `signal` would kill the pause process:
    /// SIGKILL ends it with status 137, SIGTERM and SIGINT with 0 (pause
    /// exits cleanly on them); other signals do nothing. The VM stays until
    /// the sandbox is deleted.
    async fn kill_sandbox(&self, id: &str, pid: u32, signal: u32) {
        let code = match i32::try_from(signal) {
            Ok(libc::SIGKILL) => 128 + 9,
            Ok(libc::SIGTERM | libc::SIGINT) => 0,
            _ => return,
        };
        // The pod is stopping: unwire its network now, before CNI tears
        // down the namespace.
        if let Ok(vm) = self.vm().await {
            vm.detach_network().await;
        }
        self.record_exit(id, "", pid, code).await;
    }

    /// Relays the guest's OOM kills as TaskOOM events until `gone` says the
    /// VM is going or the agent cannot report them. The container id comes
    /// from the guest: only ids of this shim's containers are published.
    async fn relay_oom_events(self, agent: Arc<dyn Agent>, gone: impl Fn() -> bool + Send) {
        loop {
            match agent.wait_oom_event().await {
                Ok(id) => {
                    if self.state.lock().await.containers.contains(&id) {
                        let mut oom = TaskOOM::new();
                        oom.container_id = id;
                        self.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(oom))
                            .await;
                    } else {
                        tracing::warn!(%id, "OOM event for an unknown container dropped");
                    }
                }
                Err(e) => {
                    if gone() {
                        return;
                    }
                    if let ttrpc::Error::RpcStatus(s) = &e {
                        if s.code.value() == ttrpc::Code::UNIMPLEMENTED as i32 {
                            tracing::warn!("the agent reports no OOM events: {}", s.message);
                            return;
                        }
                    }
                    tracing::warn!("waiting for OOM events: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn set_paused(&self, id: &str, paused: bool) -> TaskResult<()> {
        let agent = self.agent().await?;
        self.state
            .lock()
            .await
            .containers
            .get(id)?
            .check_pause(id, paused)?;
        agent
            .set_paused(id, paused)
            .await
            .map_err(|e| TaskError::agent(if paused { "pausing" } else { "resuming" }, e))?;
        if let Ok(c) = self.state.lock().await.containers.get_mut(id) {
            if c.init.phase != Phase::Stopped {
                c.init.phase = if paused {
                    Phase::Paused
                } else {
                    Phase::Running
                };
            }
        }
        Ok(())
    }
}

/// The pod directory a bundle's container ran in (written at create).
pub fn pod_of_bundle(bundle: &Path) -> Option<PathBuf> {
    std::fs::read_to_string(bundle.join("husk-pod"))
        .ok()
        .map(|s| PathBuf::from(s.trim()))
        .filter(|p| p.is_absolute())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use containerd_shim::protos::protobuf::MessageFull;
    use shim_ttrpc::Code;

    use super::*;
    use crate::agent::fake::FakeAgent;

    /// Keeps what would go to containerd's event service.
    #[derive(Default)]
    struct Recorded(std::sync::Mutex<Vec<(String, Box<dyn MessageDyn>)>>);

    #[async_trait]
    impl Events for Recorded {
        async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
            self.0
                .lock()
                .expect("events")
                .push((topic.to_string(), event));
        }
    }

    impl Recorded {
        fn topics(&self) -> Vec<String> {
            self.0
                .lock()
                .expect("events")
                .iter()
                .map(|(t, _)| t.clone())
                .collect()
        }

        /// The events of type `M` so far.
        fn all<M: MessageFull + Clone>(&self) -> Vec<M> {
            self.0
                .lock()
                .expect("events")
                .iter()
                .filter_map(|(_, e)| e.downcast_ref::<M>().cloned())
                .collect()
        }
    }

    struct Pod {
        task: HuskTask,
        agent: Arc<FakeAgent>,
        events: Arc<Recorded>,
    }

    /// A shim whose pod VM is a fake agent, with a created container `app`
    /// (as Create leaves it) and the sandbox `pod`.
    async fn pod() -> Pod {
        let agent = Arc::new(FakeAgent::default());
        let events = Arc::new(Recorded::default());
        let task = HuskTask::with_events(
            events.clone(),
            "k8s.io",
            Arc::new(ExitSignal::default()),
            Arc::new(Exits::default()),
        );
        {
            let mut st = task.state.lock().await;
            st.agent = Some(agent.clone());
            let mut sandbox = Proc::new("", "", "", false);
            sandbox.pid = 7;
            st.containers
                .insert("pod", Container::new("/b/pod", sandbox, true))
                .expect("sandbox");
            let mut app = Proc::new("", "/fifo/out", "", false);
            app.pid = 99;
            st.containers
                .insert("app", Container::new("/b/app", app, false))
                .expect("app");
        }
        Pod {
            task,
            agent,
            events,
        }
    }

    /// The agent calls in order, without the waiters' (they run when the
    /// runtime gets to them).
    fn guest_calls(p: &Pod) -> Vec<String> {
        let mut calls = p.agent.calls();
        calls.retain(|c| !c.starts_with("wait "));
        calls
    }

    fn ctx() -> TtrpcContext {
        TtrpcContext {
            fd: -1,
            mh: shim_ttrpc::MessageHeader::default(),
            metadata: HashMap::new(),
            timeout_nano: 0,
        }
    }

    /// The code and message of a request that must fail.
    fn refused<T: std::fmt::Debug>(r: TtrpcResult<T>, why: &str) -> (Code, String) {
        code(r.expect_err(why))
    }

    fn code(e: shim_ttrpc::Error) -> (Code, String) {
        match e {
            shim_ttrpc::Error::RpcStatus(s) => (
                <Code as protobuf::Enum>::from_i32(s.code.value()).expect("a known code"),
                s.message,
            ),
            other => panic!("not a status: {other:?}"),
        }
    }

    fn start(id: &str, exec_id: &str) -> api::StartRequest {
        let mut r = api::StartRequest::new();
        r.id = id.into();
        r.exec_id = exec_id.into();
        r
    }

    fn kill(id: &str, signal: u32, all: bool) -> api::KillRequest {
        let mut r = api::KillRequest::new();
        r.id = id.into();
        r.signal = signal;
        r.all = all;
        r
    }

    fn delete(id: &str) -> api::DeleteRequest {
        let mut r = api::DeleteRequest::new();
        r.id = id.into();
        r
    }

    /// Wait for container `id`, failing the test after 10 s.
    async fn waited(task: &HuskTask, id: &str) -> api::WaitResponse {
        let mut r = api::WaitRequest::new();
        r.id = id.into();
        tokio::time::timeout(Duration::from_secs(10), task.wait(&ctx(), r))
            .await
            .expect("Wait returns")
            .expect("wait")
    }

    async fn status(p: &Pod, id: &str) -> api::Status {
        let mut r = api::StateRequest::new();
        r.id = id.into();
        p.task
            .state(&ctx(), r)
            .await
            .expect("state")
            .status
            .enum_value_or_default()
    }

    #[tokio::test]
    async fn a_container_lives_starts_exits_and_goes_through_the_task_api() {
        let p = pod().await;
        let pid = p
            .task
            .start(&ctx(), start("app", ""))
            .await
            .expect("start")
            .pid;
        assert_eq!(status(&p, "app").await, api::Status::RUNNING);
        assert_eq!(p.events.all::<TaskStart>()[0].pid, pid);
        let (c, m) = refused(p.task.start(&ctx(), start("app", "")).await, "twice");
        assert_eq!(
            (c, m.as_str()),
            (Code::FAILED_PRECONDITION, "container app was started")
        );
        let (c, _) = refused(p.task.delete(&ctx(), delete("app")).await, "running");
        assert_eq!(c, Code::FAILED_PRECONDITION);

        p.task
            .kill(&ctx(), kill("app", 15, false))
            .await
            .expect("kill");
        let waiter = {
            let task = p.task.clone();
            tokio::spawn(async move { waited(&task, "app").await })
        };
        p.agent.exit("app", "", Ok(143));
        let first = waiter.await.expect("join");
        assert_eq!(first.exit_status, 143);
        assert_eq!(status(&p, "app").await, api::Status::STOPPED);
        let exits = p.events.all::<TaskExit>();
        assert_eq!(exits.len(), 1, "one TaskExit");
        assert_eq!(
            (exits[0].id.as_str(), exits[0].pid, exits[0].exit_status),
            ("app", pid, 143)
        );
        // A Wait that comes after the exit gets it too.
        let again = waited(&p.task, "app").await;
        assert_eq!(again.exit_status, 143);

        // Killing a finished process is NOT_FOUND (a forced delete goes on
        // on exactly that); a kill of all its processes still goes through.
        let (c, _) = refused(p.task.kill(&ctx(), kill("app", 9, false)).await, "done");
        assert_eq!(c, Code::NOT_FOUND);
        p.task
            .kill(&ctx(), kill("app", 9, true))
            .await
            .expect("kill all");

        let gone = p.task.delete(&ctx(), delete("app")).await.expect("delete");
        assert_eq!((gone.pid, gone.exit_status), (pid, 143));
        assert_eq!(p.events.all::<TaskDelete>()[0].exit_status, 143);
        assert_eq!(
            guest_calls(&p),
            [
                "start app",
                "signal app  15",
                "signal app  9 all",
                "delete app force"
            ]
        );
        let mut r = api::StateRequest::new();
        r.id = "app".into();
        let (c, m) = refused(p.task.state(&ctx(), r).await, "deleted");
        assert_eq!((c, m.as_str()), (Code::NOT_FOUND, "container app"));
        // The sandbox is still there: deleting one container leaves the pod.
        assert_eq!(status(&p, "pod").await, api::Status::CREATED);
    }

    #[tokio::test]
    async fn execs_run_only_in_running_containers_and_never_in_the_sandbox() {
        let p = pod().await;
        let exec = |id: &str, spec: &[u8]| {
            let mut r = api::ExecProcessRequest::new();
            r.id = id.into();
            r.exec_id = "e1".into();
            let mut any = containerd_shim::protos::protobuf::well_known_types::any::Any::new();
            any.value = spec.to_vec();
            r.spec = Some(any).into();
            r
        };
        let good = br#"{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}}"#;
        let (c, m) = refused(p.task.exec(&ctx(), exec("app", b"{not json")).await, "bad");
        assert_eq!(c, Code::INVALID_ARGUMENT);
        assert!(m.starts_with("invalid process spec"), "{m}");
        let (c, m) = refused(p.task.exec(&ctx(), exec("app", good)).await, "created");
        assert_eq!(
            (c, m.as_str()),
            (Code::FAILED_PRECONDITION, "container app is not running")
        );
        let (c, m) = refused(p.task.exec(&ctx(), exec("pod", good)).await, "sandbox");
        assert_eq!(c, Code::FAILED_PRECONDITION);
        assert!(m.contains("sandbox"), "{m}");
        p.task.start(&ctx(), start("app", "")).await.expect("start");
        p.task.exec(&ctx(), exec("app", good)).await.expect("exec");
        assert_eq!(p.events.all::<TaskExecAdded>().len(), 1);
        let (c, _) = refused(p.task.exec(&ctx(), exec("app", good)).await, "twice");
        assert_eq!(c, Code::ALREADY_EXISTS);
        let mut r = api::StateRequest::new();
        r.id = "app".into();
        r.exec_id = "e1".into();
        let st = p.task.state(&ctx(), r).await.expect("state");
        assert_eq!(st.status.enum_value_or_default(), api::Status::CREATED);
        // An exec that never started can be deleted; the guest has none.
        let mut d = delete("app");
        d.exec_id = "e1".into();
        p.task.delete(&ctx(), d).await.expect("delete exec");
        assert!(!p
            .agent
            .calls()
            .iter()
            .any(|c| c.starts_with("delete-process")));
    }

    #[tokio::test]
    async fn the_agents_refusal_keeps_its_code_and_the_container_its_phase() {
        let p = pod().await;
        p.agent.fail(
            "start",
            ttrpc::Code::INVALID_ARGUMENT,
            "exec \"/no/such/binary\": not found",
        );
        let (c, m) = refused(p.task.start(&ctx(), start("app", "")).await, "refused");
        assert_eq!(c, Code::INVALID_ARGUMENT);
        assert!(
            m.contains("starting the container") && m.contains("/no/such/binary"),
            "{m}"
        );
        assert_eq!(status(&p, "app").await, api::Status::CREATED);
        assert!(p.events.all::<TaskStart>().is_empty());
        p.task.delete(&ctx(), delete("app")).await.expect("delete");
        assert_eq!(p.agent.calls(), ["start app", "delete app force"]);
    }

    #[tokio::test]
    async fn a_dead_vm_ends_every_process_with_255() {
        let p = pod().await;
        p.task.start(&ctx(), start("app", "")).await.expect("start");
        p.agent.exit(
            "app",
            "",
            Err(ttrpc::Error::Others("the connection is closed".into())),
        );
        let waited = waited(&p.task, "app").await;
        assert_eq!(waited.exit_status, 255);
    }

    #[tokio::test]
    async fn the_sandbox_dies_as_pause_would_and_runs_nothing_in_the_guest() {
        let p = pod().await;
        p.task
            .state
            .lock()
            .await
            .containers
            .get_mut("pod")
            .expect("pod")
            .init
            .phase = Phase::Running;
        // SIGHUP: pause ignores it.
        p.task
            .kill(&ctx(), kill("pod", 1, false))
            .await
            .expect("hup");
        assert_eq!(status(&p, "pod").await, api::Status::RUNNING);
        p.task
            .kill(&ctx(), kill("pod", 9, false))
            .await
            .expect("kill");
        let waited = waited(&p.task, "pod").await;
        assert_eq!(waited.exit_status, 137);
        let exits = p.events.all::<TaskExit>();
        assert_eq!((exits.len(), exits[0].pid), (1, 7));
        p.task.delete(&ctx(), delete("pod")).await.expect("delete");
        assert!(p.agent.calls().is_empty(), "{:?}", p.agent.calls());
    }

    #[tokio::test]
    async fn pause_and_resume_follow_the_phase() {
        let p = pod().await;
        let pause = |id: &str| {
            let mut r = api::PauseRequest::new();
            r.id = id.into();
            r
        };
        let resume = |id: &str| {
            let mut r = api::ResumeRequest::new();
            r.id = id.into();
            r
        };
        let (c, _) = refused(p.task.pause(&ctx(), pause("app")).await, "created");
        assert_eq!(c, Code::FAILED_PRECONDITION);
        p.task.start(&ctx(), start("app", "")).await.expect("start");
        p.task.pause(&ctx(), pause("app")).await.expect("pause");
        assert_eq!(status(&p, "app").await, api::Status::PAUSED);
        p.task.resume(&ctx(), resume("app")).await.expect("resume");
        assert_eq!(status(&p, "app").await, api::Status::RUNNING);
        let topics = p.events.topics();
        assert!(
            topics.contains(&topics::TASK_PAUSED_EVENT_TOPIC.to_string()),
            "{topics:?}"
        );
        assert!(
            topics.contains(&topics::TASK_RESUMED_EVENT_TOPIC.to_string()),
            "{topics:?}"
        );
        assert_eq!(guest_calls(&p), ["start app", "pause app", "resume app"]);
    }

    #[tokio::test]
    async fn oom_kills_reach_containerd_only_for_this_shims_containers() {
        let p = pod().await;
        p.agent.oom(Ok("app".into()));
        p.agent.oom(Ok("someone-elses".into()));
        p.agent.oom(Ok("app".into()));
        p.agent.oom(Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
            ttrpc::Code::UNIMPLEMENTED,
            "old agent",
        ))));
        // Returns at UNIMPLEMENTED: an agent that cannot report is not
        // asked again and again.
        tokio::time::timeout(
            Duration::from_secs(10),
            p.task.clone().relay_oom_events(p.agent.clone(), || false),
        )
        .await
        .expect("the relay ends");
        let ooms: Vec<String> = p
            .events
            .all::<TaskOOM>()
            .into_iter()
            .map(|e| e.container_id)
            .collect();
        assert_eq!(ooms, ["app", "app"]);
    }

    #[test]
    fn update_resources_are_checked_before_they_reach_the_guest() {
        use containerd_shim::protos::protobuf::well_known_types::any::Any;
        let any = |url: &str, value: &str| {
            let mut a = Any::new();
            a.type_url = url.into();
            a.value = value.as_bytes().to_vec();
            a
        };
        let url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
        let ok = any(
            url,
            r#"{"memory":{"limit":33554432},"cpu":{"quota":50000}}"#,
        );
        assert_eq!(resources_json(Some(&ok)).expect("valid"), ok.value);
        let e = resources_json(None).expect_err("none");
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
        assert!(e.to_string().contains("no resources"), "{e}");
        let e = resources_json(Some(&any("types.containerd.io/WindowsResources", "{}")))
            .expect_err("windows");
        assert!(e.to_string().contains("LinuxResources"), "{e}");
        let e =
            resources_json(Some(&any(url, r#"{"memory":{"limit":"lots"}}"#))).expect_err("lots");
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
        assert!(e.to_string().contains("invalid LinuxResources"), "{e}");
    }
}
