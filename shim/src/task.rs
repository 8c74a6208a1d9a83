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

use std::{
    collections::HashMap,
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
use husk_protocols::agent::{
    ContainerRequest, CreateContainerRequest, DeleteContainerRequest, Empty as AgentEmpty,
    ExecProcessRequest, ProcessRequest, ResizePtyRequest, SignalProcessRequest,
    UpdateContainerRequest,
};
use husk_shim::metrics;
use tokio::sync::{watch, Mutex};

use crate::{
    config::{config_path_from_options, Config},
    exits::Exits,
    io::ProcessIo,
    rootfs,
    sandbox::{self, Role},
    vm::Vm,
};

type TtrpcResult<T> = shim_ttrpc::Result<T>;

/// How long output may keep flowing after the agent reported an exit.
const DRAIN: Duration = Duration::from_secs(5);

fn err(code: shim_ttrpc::Code, msg: impl Into<String>) -> shim_ttrpc::Error {
    shim_ttrpc::Error::RpcStatus(shim_ttrpc::get_status(code, msg.into()))
}

fn not_found(what: impl Into<String>) -> shim_ttrpc::Error {
    err(shim_ttrpc::Code::NOT_FOUND, what)
}

/// Maps an agent error to a shim error, keeping its code and message.
fn agent_err(what: &str, e: ttrpc::Error) -> shim_ttrpc::Error {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let code = <shim_ttrpc::Code as protobuf::Enum>::from_i32(s.code.value())
                .unwrap_or(shim_ttrpc::Code::UNKNOWN);
            err(code, format!("{what}: {}", s.message))
        }
        other => err(shim_ttrpc::Code::UNAVAILABLE, format!("{what}: {other}")),
    }
}

/// The agent's request naming container `id`.
fn container_request(id: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = id.to_string();
    r
}

fn ctx(secs: u64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(secs * 1_000_000_000).unwrap_or(i64::MAX))
}

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    t.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    t
}

/// A process's life as containerd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Phase {
    fn status(self) -> api::Status {
        match self {
            Phase::Created => api::Status::CREATED,
            Phase::Running => api::Status::RUNNING,
            Phase::Paused => api::Status::PAUSED,
            Phase::Stopped => api::Status::STOPPED,
        }
    }
}

#[derive(Debug, Clone)]
struct Exited {
    code: u32,
    at: Timestamp,
}

#[derive(Debug)]
struct Proc {
    pid: u32,
    phase: Phase,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    io: Option<ProcessIo>,
    exit_tx: watch::Sender<Option<Exited>>,
    /// An exec's OCI Process (JSON), until it starts.
    spec: Vec<u8>,
}

impl Proc {
    fn new(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Self {
        Self {
            pid: 0,
            phase: Phase::Created,
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal,
            io: None,
            exit_tx: watch::channel(None).0,
            spec: Vec::new(),
        }
    }

    fn exited(&self) -> Option<Exited> {
        self.exit_tx.borrow().clone()
    }
}

#[derive(Debug)]
struct Container {
    bundle: String,
    init: Proc,
    execs: HashMap<String, Proc>,
    /// CRI's sandbox container: the pod VM, with no process in the guest.
    sandbox: bool,
}

#[derive(Debug, Default)]
struct State {
    vm: Option<Arc<Vm>>,
    containers: HashMap<String, Container>,
}

/// The Task service.
#[derive(Clone)]
pub struct HuskTask {
    state: Arc<Mutex<State>>,
    publisher: Arc<RemotePublisher>,
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
        Self {
            state: Arc::default(),
            publisher: Arc::new(publisher),
            namespace: namespace.to_string(),
            exit,
            exits,
        }
    }

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

    async fn vm(&self) -> TtrpcResult<Arc<Vm>> {
        self.state.lock().await.vm.clone().ok_or_else(|| {
            err(
                shim_ttrpc::Code::FAILED_PRECONDITION,
                "the pod VM is not running",
            )
        })
    }

    /// Waits for process `exec_id` of `id` in the guest, then records and
    /// publishes its exit.
    fn spawn_waiter(&self, id: String, exec_id: String, pid: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            let code = match this.vm().await {
                Ok(vm) => {
                    let mut req = ProcessRequest::new();
                    req.container_id = id.clone();
                    req.exec_id = exec_id.clone();
                    // No deadline: a container may run for months.
                    match vm
                        .agent
                        .wait_process(ttrpc::context::Context::default(), &req)
                        .await
                    {
                        Ok(r) => u32::try_from(r.exit_status).unwrap_or(255),
                        Err(e) => {
                            tracing::error!(container = %id, exec = %exec_id, "waiting for the process: {e}");
                            255
                        }
                    }
                }
                Err(_) => 255,
            };
            let io = {
                let mut st = this.state.lock().await;
                st.containers
                    .get_mut(&id)
                    .and_then(|c| {
                        if exec_id.is_empty() {
                            Some(&mut c.init)
                        } else {
                            c.execs.get_mut(&exec_id)
                        }
                    })
                    .and_then(|p| p.io.take())
            };
            if let Some(mut io) = io {
                io.wait_outputs(DRAIN).await;
            }
            this.record_exit(&id, &exec_id, pid, code).await;
        });
    }

    /// Records that process `exec_id` of `id` exited with `code` and
    /// publishes TaskExit, once: a process already stopped is left as it is.
    async fn record_exit(&self, id: &str, exec_id: &str, pid: u32, code: u32) {
        let at = now();
        {
            let mut st = self.state.lock().await;
            let proc = st.containers.get_mut(id).and_then(|c| {
                if exec_id.is_empty() {
                    Some(&mut c.init)
                } else {
                    c.execs.get_mut(exec_id)
                }
            });
            match proc {
                Some(p) if p.phase != Phase::Stopped => {
                    p.phase = Phase::Stopped;
                    // send_replace, not send: send drops the value when no
                    // Wait is listening at this moment (a detached task),
                    // and every later Wait (containerd's forced delete
                    // waits first) then blocked forever.
                    p.exit_tx.send_replace(Some(Exited {
                        code,
                        at: at.clone(),
                    }));
                }
                _ => return,
            }
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
    ) -> TtrpcResult<Arc<Vm>> {
        let mut st = self.state.lock().await;
        if let Some(vm) = &st.vm {
            return Ok(vm.clone());
        }
        let vm = Vm::start(cfg, &self.namespace, sandbox, hostname, net, &self.exits)
            .await
            .map_err(|e| {
                err(
                    shim_ttrpc::Code::UNAVAILABLE,
                    format!("starting the pod VM: {e}"),
                )
            })?;
        let vm = Arc::new(vm);
        st.vm = Some(vm.clone());
        tokio::spawn(self.clone().relay_oom_events(vm.clone()));
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

fn load_config(
    options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
) -> TtrpcResult<Config> {
    let explicit = options.and_then(|o| config_path_from_options(&o.type_url, &o.value));
    Config::load(explicit.as_deref()).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        err(
            shim_ttrpc::Code::INVALID_ARGUMENT,
            format!("husk.toml: {msg}"),
        )
    })
}

#[async_trait]
impl Task for HuskTask {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.state.lock().await.containers.contains_key(&req.id) {
            return Err(err(
                shim_ttrpc::Code::ALREADY_EXISTS,
                format!("container {} exists", req.id),
            ));
        }
        let cfg = load_config(req.options.as_ref())?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = rootfs::read_spec(&bundle)
            .map_err(|e| err(shim_ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let role = sandbox::role(&spec);
        if role == Role::Sandbox {
            return self.create_sandbox(&cfg, &req, &spec).await;
        }
        rootfs::check(&bundle, &req.rootfs, &spec)
            .map_err(|e| err(shim_ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let pod = role.pod(&req.id);
        let vm = self
            .ensure_vm(&cfg, &pod, &sandbox::hostname(&spec, &pod), None)
            .await?;
        // Lets `delete` find the pod after a shim crash.
        let _ = std::fs::write(bundle.join("husk-pod"), vm.dir.display().to_string());

        let guest_bundle = rootfs::prepare(&vm.shared, &req.id, &bundle, &req.rootfs, spec)
            .map_err(|e| err(shim_ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let mut proc = Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let io = ProcessIo::setup(&vm, &req.stdin, &req.stdout, &req.stderr, req.terminal)
            .map_err(|e| {
                rootfs::release(&vm.shared, &req.id);
                err(shim_ttrpc::Code::INTERNAL, e.to_string())
            })?;
        let mut creq = CreateContainerRequest::new();
        creq.container_id = req.id.clone();
        creq.bundle = guest_bundle;
        creq.stdio = Some(io.stdio()).into();
        let created = vm.agent.create_container(ctx(120), &creq).await;
        let pid = match created {
            Ok(r) => r.pid,
            Err(e) => {
                drop(io);
                rootfs::release(&vm.shared, &req.id);
                return Err(agent_err("creating the container in the guest", e));
            }
        };
        proc.pid = pid;
        proc.io = Some(io);
        self.state.lock().await.containers.insert(
            req.id.clone(),
            Container {
                bundle: req.bundle.clone(),
                init: proc,
                execs: HashMap::new(),
                sandbox: false,
            },
        );
        self.publish_create(&req, pid).await;
        let mut resp = api::CreateTaskResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let vm = self.vm().await?;
        let pid = if req.exec_id.is_empty() && self.is_sandbox(&req.id).await {
            let pid = self.start_sandbox(&req.id, vm).await?;
            let mut ev = TaskStart::new();
            ev.container_id = req.id.clone();
            ev.pid = pid;
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
                .await;
            pid
        } else if req.exec_id.is_empty() {
            {
                let st = self.state.lock().await;
                let c = st
                    .containers
                    .get(&req.id)
                    .ok_or_else(|| not_found(format!("container {}", req.id)))?;
                if c.init.phase != Phase::Created {
                    return Err(err(
                        shim_ttrpc::Code::FAILED_PRECONDITION,
                        format!("container {} was started", req.id),
                    ));
                }
            }
            let r = container_request(&req.id);
            let pid = vm
                .agent
                .start_container(ctx(60), &r)
                .await
                .map_err(|e| agent_err("starting the container", e))?
                .pid;
            if let Some(c) = self.state.lock().await.containers.get_mut(&req.id) {
                c.init.phase = Phase::Running;
            }
            self.spawn_waiter(req.id.clone(), String::new(), pid);
            let mut ev = TaskStart::new();
            ev.container_id = req.id.clone();
            ev.pid = pid;
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
                .await;
            pid
        } else {
            let (spec, io) = {
                let st = self.state.lock().await;
                let p = st
                    .containers
                    .get(&req.id)
                    .and_then(|c| c.execs.get(&req.exec_id))
                    .ok_or_else(|| not_found(format!("process {}", req.exec_id)))?;
                if p.phase != Phase::Created {
                    return Err(err(
                        shim_ttrpc::Code::FAILED_PRECONDITION,
                        format!("process {} was started", req.exec_id),
                    ));
                }
                let io = ProcessIo::setup(&vm, &p.stdin, &p.stdout, &p.stderr, p.terminal)
                    .map_err(|e| err(shim_ttrpc::Code::INTERNAL, e.to_string()))?;
                (p.spec.clone(), io)
            };
            let mut r = ExecProcessRequest::new();
            r.container_id = req.id.clone();
            r.exec_id = req.exec_id.clone();
            r.process_json = spec;
            r.stdio = Some(io.stdio()).into();
            let pid = vm
                .agent
                .exec_process(ctx(60), &r)
                .await
                .map_err(|e| agent_err("starting the process", e))?
                .pid;
            if let Some(p) = self
                .state
                .lock()
                .await
                .containers
                .get_mut(&req.id)
                .and_then(|c| c.execs.get_mut(&req.exec_id))
            {
                p.pid = pid;
                p.phase = Phase::Running;
                p.io = Some(io);
            }
            self.spawn_waiter(req.id.clone(), req.exec_id.clone(), pid);
            let mut ev = TaskExecStarted::new();
            ev.container_id = req.id.clone();
            ev.exec_id = req.exec_id.clone();
            ev.pid = pid;
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
                .await;
            pid
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
        let vm = self.state.lock().await.vm.clone();
        let mut resp = api::DeleteResponse::new();
        if !req.exec_id.is_empty() {
            let mut st = self.state.lock().await;
            let c = st
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            let p = c
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(format!("process {}", req.exec_id)))?;
            if p.phase == Phase::Running {
                return Err(err(
                    shim_ttrpc::Code::FAILED_PRECONDITION,
                    format!("process {} is running", req.exec_id),
                ));
            }
            if let Some(e) = p.exited() {
                resp.exit_status = e.code;
                resp.exited_at = Some(e.at).into();
            }
            resp.pid = p.pid;
            if let (Some(vm), true) = (&vm, p.phase == Phase::Stopped) {
                let mut r = ProcessRequest::new();
                r.container_id = req.id.clone();
                r.exec_id = req.exec_id.clone();
                let _ = vm.agent.delete_process(ctx(30), &r).await;
            }
            c.execs.remove(&req.exec_id);
            return Ok(resp);
        }
        let (pid, exited, is_sandbox) = {
            let st = self.state.lock().await;
            let c = st
                .containers
                .get(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            if matches!(c.init.phase, Phase::Running | Phase::Paused) {
                return Err(err(
                    shim_ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {} is running", req.id),
                ));
            }
            (c.init.pid, c.init.exited(), c.sandbox)
        };
        // The sandbox has nothing in the guest; the VM goes at Shutdown.
        if let (Some(vm), false) = (&vm, is_sandbox) {
            if vm.alive() {
                let mut r = DeleteContainerRequest::new();
                r.container_id = req.id.clone();
                // A created container that never ran is taken down too.
                r.force = true;
                if let Err(e) = vm.agent.delete_container(ctx(60), &r).await {
                    tracing::warn!(container = %req.id, "deleting in the guest: {e}");
                }
            }
            rootfs::release(&vm.shared, &req.id);
        }
        self.state.lock().await.containers.remove(&req.id);
        let exited = exited.unwrap_or(Exited { code: 0, at: now() });
        resp.pid = pid;
        resp.exit_status = exited.code;
        resp.exited_at = Some(exited.at.clone()).into();
        let mut ev = TaskDelete::new();
        ev.container_id = req.id.clone();
        ev.id = req.id.clone();
        ev.pid = pid;
        ev.exit_status = exited.code;
        ev.exited_at = Some(exited.at).into();
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(resp)
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let st = self.state.lock().await;
        let c = st
            .containers
            .get(&req.id)
            .ok_or_else(|| not_found(format!("container {}", req.id)))?;
        let p = if req.exec_id.is_empty() {
            &c.init
        } else {
            c.execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(format!("process {}", req.exec_id)))?
        };
        let mut resp = api::StateResponse::new();
        resp.id = req.id.clone();
        resp.exec_id = req.exec_id.clone();
        resp.bundle = c.bundle.clone();
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
        let mut rx = {
            let st = self.state.lock().await;
            let c = st
                .containers
                .get(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            let p = if req.exec_id.is_empty() {
                &c.init
            } else {
                c.execs
                    .get(&req.exec_id)
                    .ok_or_else(|| not_found(format!("process {}", req.exec_id)))?
            };
            p.exit_tx.subscribe()
        };
        let exited = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| err(shim_ttrpc::Code::UNAVAILABLE, "the process went away"))?
            .clone()
            .unwrap_or(Exited {
                code: 255,
                at: now(),
            });
        let mut resp = api::WaitResponse::new();
        resp.exit_status = exited.code;
        resp.exited_at = Some(exited.at).into();
        Ok(resp)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let vm = self.vm().await?;
        {
            let st = self.state.lock().await;
            let c = st
                .containers
                .get(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            let p = if req.exec_id.is_empty() {
                &c.init
            } else {
                c.execs
                    .get(&req.exec_id)
                    .ok_or_else(|| not_found(format!("process {}", req.exec_id)))?
            };
            if p.phase == Phase::Stopped && !req.all {
                return Err(not_found("process already finished"));
            }
            if c.sandbox && req.exec_id.is_empty() {
                let pid = p.pid;
                drop(st);
                self.kill_sandbox(&req.id, pid, req.signal).await;
                return Ok(api::Empty::new());
            }
        }
        let mut r = SignalProcessRequest::new();
        r.container_id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.signal = req.signal;
        r.all = req.all;
        vm.agent
            .signal_process(ctx(30), &r)
            .await
            .map_err(|e| agent_err("signalling", e))?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let spec = req.spec.as_ref().map(|a| a.value.clone()).ok_or_else(|| {
            err(
                shim_ttrpc::Code::INVALID_ARGUMENT,
                "exec without a process spec",
            )
        })?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec).map_err(|e| {
            err(
                shim_ttrpc::Code::INVALID_ARGUMENT,
                format!("invalid process spec: {e}"),
            )
        })?;
        {
            let mut st = self.state.lock().await;
            let c = st
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            if c.sandbox {
                return Err(err(
                    shim_ttrpc::Code::FAILED_PRECONDITION,
                    format!(
                        "{} is the pod's sandbox, which runs no processes in husk",
                        req.id
                    ),
                ));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(err(
                    shim_ttrpc::Code::ALREADY_EXISTS,
                    format!("process {} exists", req.exec_id),
                ));
            }
            if c.init.phase != Phase::Running {
                return Err(err(
                    shim_ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {} is not running", req.id),
                ));
            }
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
        let vm = self.vm().await?;
        let mut r = ResizePtyRequest::new();
        r.container_id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.width = req.width;
        r.height = req.height;
        vm.agent
            .resize_pty(ctx(30), &r)
            .await
            .map_err(|e| agent_err("resizing the terminal", e))?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            let st = self.state.lock().await;
            let c = st
                .containers
                .get(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            let p = if req.exec_id.is_empty() {
                &c.init
            } else {
                c.execs
                    .get(&req.exec_id)
                    .ok_or_else(|| not_found(format!("process {}", req.exec_id)))?
            };
            if let Some(io) = &p.io {
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
        let vm = self.vm().await?;
        if self.is_sandbox(&req.id).await {
            let mut p = ProcessInfo::new();
            p.pid = vm.vmm_pid();
            let mut resp = api::PidsResponse::new();
            resp.processes = vec![p];
            return Ok(resp);
        }
        let r = container_request(&req.id);
        let pids = vm
            .agent
            .list_pids(ctx(30), &r)
            .await
            .map_err(|e| agent_err("listing processes", e))?
            .pids;
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
        if let Some(c) = st.containers.get(&req.id) {
            resp.task_pid = c.init.pid;
        }
        Ok(resp)
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        self.known(&req.id).await?;
        let vm = self.vm().await?;
        let r = container_request(&req.id);
        let stats = vm
            .agent
            .stats_container(ctx(30), &r)
            .await
            .map_err(|e| agent_err("reading the container's metrics", e))?;
        let any = convert_to_any(Box::new(metrics::v1_metrics(&stats)))
            .map_err(|e| err(shim_ttrpc::Code::INTERNAL, format!("encoding metrics: {e}")))?;
        let mut resp = api::StatsResponse::new();
        resp.stats = Some(any).into();
        Ok(resp)
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        self.known(&req.id).await?;
        let json = resources_json(req.resources.as_ref())?;
        let vm = self.vm().await?;
        let mut r = UpdateContainerRequest::new();
        r.container_id = req.id.clone();
        r.resources_json = json;
        vm.agent
            .update_container(ctx(90), &r)
            .await
            .map_err(|e| agent_err("updating the container's resources", e))?;
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
                let since = std::time::Instant::now();
                vm.shutdown().await;
                tracing::info!(ms = since.elapsed().as_millis(), "pod VM shut down");
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
) -> TtrpcResult<Vec<u8>> {
    let any = any.ok_or_else(|| {
        err(
            shim_ttrpc::Code::INVALID_ARGUMENT,
            "the update carries no resources",
        )
    })?;
    if !any.type_url.ends_with("/LinuxResources") {
        return Err(err(
            shim_ttrpc::Code::INVALID_ARGUMENT,
            format!(
                "resources of type {:?}: husk takes OCI LinuxResources",
                any.type_url
            ),
        ));
    }
    serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&any.value).map_err(|e| {
        err(
            shim_ttrpc::Code::INVALID_ARGUMENT,
            format!("invalid LinuxResources: {e}"),
        )
    })?;
    Ok(any.value.clone())
}

impl HuskTask {
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
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let netns = crate::network::pod_netns(spec)
            .map_err(|e| err(shim_ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let net = match netns {
            Some(ns) => Some(crate::network::attach(ns.clone()).await.map_err(|e| {
                err(
                    shim_ttrpc::Code::UNAVAILABLE,
                    format!("connecting the pod network: {e}"),
                )
            })?),
            None => None,
        };
        let netns = net.as_ref().map(|n| n.netns.clone());
        let vm = match self
            .ensure_vm(cfg, &req.id, &sandbox::hostname(spec, &req.id), net)
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
        self.state.lock().await.containers.insert(
            req.id.clone(),
            Container {
                bundle: req.bundle.clone(),
                init: proc,
                execs: HashMap::new(),
                sandbox: true,
            },
        );
        self.publish_create(req, vm.vmm_pid()).await;
        let mut resp = api::CreateTaskResponse::new();
        resp.pid = vm.vmm_pid();
        Ok(resp)
    }

    /// Starts the sandbox task: it runs until it is killed or the VM dies.
    async fn start_sandbox(&self, id: &str, vm: Arc<Vm>) -> TtrpcResult<u32> {
        {
            let mut st = self.state.lock().await;
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| not_found(format!("container {id}")))?;
            if c.init.phase != Phase::Created {
                return Err(err(
                    shim_ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {id} was started"),
                ));
            }
            c.init.phase = Phase::Running;
        }
        let pid = vm.vmm_pid();
        let this = self.clone();
        let id = id.to_string();
        let mut vmm_exit = vm.vmm_exit.clone();
        tokio::spawn(async move {
            let _ = vmm_exit.wait_for(Option::is_some).await;
            // The pod VM is gone (a kill recorded the exit already).
            this.record_exit(&id, "", pid, 255).await;
        });
        Ok(pid)
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

    /// Whether `id` is the pod's sandbox container.
    async fn is_sandbox(&self, id: &str) -> bool {
        self.state
            .lock()
            .await
            .containers
            .get(id)
            .is_some_and(|c| c.sandbox)
    }

    /// Fails with NOT_FOUND unless container `id` exists in this shim.
    async fn known(&self, id: &str) -> TtrpcResult<()> {
        if self.state.lock().await.containers.contains_key(id) {
            Ok(())
        } else {
            Err(not_found(format!("container {id}")))
        }
    }

    /// Relays the guest's OOM kills as TaskOOM events while the VM runs.
    /// The container id comes from the guest: only ids of this shim's
    /// containers are published.
    async fn relay_oom_events(self, vm: Arc<Vm>) {
        loop {
            let ev = vm
                .agent
                .wait_oom_event(ttrpc::context::Context::default(), &AgentEmpty::new())
                .await;
            match ev {
                Ok(ev) => {
                    if self
                        .state
                        .lock()
                        .await
                        .containers
                        .contains_key(&ev.container_id)
                    {
                        let mut oom = TaskOOM::new();
                        oom.container_id = ev.container_id;
                        self.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(oom))
                            .await;
                    } else {
                        tracing::warn!(id = %ev.container_id, "OOM event for an unknown container dropped");
                    }
                }
                Err(e) => {
                    if vm.stopping() || !vm.alive() {
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

    async fn set_paused(&self, id: &str, paused: bool) -> TtrpcResult<()> {
        let vm = self.vm().await?;
        {
            let st = self.state.lock().await;
            let c = st
                .containers
                .get(id)
                .ok_or_else(|| not_found(format!("container {id}")))?;
            let ok = if paused {
                c.init.phase == Phase::Running
            } else {
                c.init.phase == Phase::Paused
            };
            if !ok {
                return Err(err(
                    shim_ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {id} is {:?}", c.init.phase),
                ));
            }
        }
        let r = container_request(id);
        let res = if paused {
            vm.agent.pause_container(ctx(30), &r).await
        } else {
            vm.agent.resume_container(ctx(30), &r).await
        };
        res.map_err(|e| agent_err(if paused { "pausing" } else { "resuming" }, e))?;
        if let Some(c) = self.state.lock().await.containers.get_mut(id) {
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
    use super::*;

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
        let code = |r: TtrpcResult<Vec<u8>>| match r {
            Err(shim_ttrpc::Error::RpcStatus(s)) => (s.code.value(), s.message),
            other => panic!("expected a status, got {other:?}"),
        };
        let (c, m) = code(resources_json(None));
        assert_eq!(c, shim_ttrpc::Code::INVALID_ARGUMENT as i32);
        assert!(m.contains("no resources"), "{m}");
        let (_, m) = code(resources_json(Some(&any(
            "types.containerd.io/WindowsResources",
            "{}",
        ))));
        assert!(m.contains("LinuxResources"), "{m}");
        let (c, m) = code(resources_json(Some(&any(
            url,
            r#"{"memory":{"limit":"lots"}}"#,
        ))));
        assert_eq!(c, shim_ttrpc::Code::INVALID_ARGUMENT as i32);
        assert!(m.contains("invalid LinuxResources"), "{m}");
    }
}
