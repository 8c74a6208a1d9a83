//! What the Task service asks of the guest's agent, as a trait.
//!
//! The Task service's logic (phases, exit recording, which OOM events reach
//! containerd) depends on the agent's answers, not on how they travel. With
//! the calls behind `Agent`, that logic is unit-tested against a fake
//! (`tests::FakeAgent` in `task`'s and `container`'s tests) without a VM;
//! `TtrpcAgent` is the real one, over the pod VM's vsock, and owns the
//! deadline of each call.
//!
//! Calls that set the VM up (network, shared directory, identity, shutdown)
//! belong to the VM and stay on `vm::Vm`'s own client.

use async_trait::async_trait;
use husk_protocols::{
    agent::{
        ContainerRequest, CreateContainerRequest, DeleteContainerRequest, Empty,
        ExecProcessRequest, PrepareVolumeRequest, ProcessRequest, ResizePtyRequest,
        SignalProcessRequest, StatsContainerResponse, Stdio, UpdateContainerRequest,
    },
    agent_ttrpc::AgentClient,
};

/// An agent call's result; the error keeps the agent's status.
pub type AgentResult<T> = Result<T, ttrpc::Error>;

/// The container operations of the guest's agent.
#[async_trait]
pub trait Agent: Send + Sync {
    /// Creates container `id` from the guest bundle `bundle` with `stdio`;
    /// returns its init process's guest pid.
    async fn create_container(&self, id: &str, bundle: &str, stdio: Stdio) -> AgentResult<u32>;
    /// Starts container `id`'s init process; returns its pid.
    async fn start_container(&self, id: &str) -> AgentResult<u32>;
    /// Starts exec `exec_id` (an OCI Process as JSON) in container `id`.
    async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: Stdio,
    ) -> AgentResult<u32>;
    /// Sends `signal` to a process (`all`: every process of the container).
    async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> AgentResult<()>;
    /// Waits, with no deadline, until a process exits; its exit status.
    async fn wait_process(&self, id: &str, exec_id: &str) -> AgentResult<i32>;
    /// Forgets an exited exec.
    async fn delete_process(&self, id: &str, exec_id: &str) -> AgentResult<()>;
    /// Deletes container `id` (`force`: even if it runs).
    async fn delete_container(&self, id: &str, force: bool) -> AgentResult<()>;
    /// Sets a process's terminal size.
    async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32)
        -> AgentResult<()>;
    /// The guest pids of container `id`'s processes.
    async fn list_pids(&self, id: &str) -> AgentResult<Vec<u32>>;
    /// Freezes (`true`) or thaws container `id`.
    async fn set_paused(&self, id: &str, paused: bool) -> AgentResult<()>;
    /// Container `id`'s cgroup statistics.
    async fn stats(&self, id: &str) -> AgentResult<StatsContainerResponse>;
    /// Applies OCI LinuxResources (JSON) to container `id`.
    async fn update(&self, id: &str, resources_json: &[u8]) -> AgentResult<()>;
    /// Waits for the next OOM kill in the guest; the container id it names.
    async fn wait_oom_event(&self) -> AgentResult<String>;
    /// Makes, or brings up to date, a volume the guest holds itself.
    async fn prepare_volume(&self, req: PrepareVolumeRequest) -> AgentResult<()>;
}

/// The agent over ttrpc.
pub struct TtrpcAgent {
    client: AgentClient,
}

impl TtrpcAgent {
    /// Calls through `client`.
    pub fn new(client: AgentClient) -> Self {
        Self { client }
    }
}

/// A call deadline of `secs`.
fn ctx(secs: u64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(secs * 1_000_000_000).unwrap_or(i64::MAX))
}

fn container(id: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = id.to_string();
    r
}

fn process(id: &str, exec_id: &str) -> ProcessRequest {
    let mut r = ProcessRequest::new();
    r.container_id = id.to_string();
    r.exec_id = exec_id.to_string();
    r
}

#[async_trait]
impl Agent for TtrpcAgent {
    async fn create_container(&self, id: &str, bundle: &str, stdio: Stdio) -> AgentResult<u32> {
        let mut r = CreateContainerRequest::new();
        r.container_id = id.to_string();
        r.bundle = bundle.to_string();
        r.stdio = Some(stdio).into();
        Ok(self.client.create_container(ctx(120), &r).await?.pid)
    }

    async fn start_container(&self, id: &str) -> AgentResult<u32> {
        Ok(self
            .client
            .start_container(ctx(60), &container(id))
            .await?
            .pid)
    }

    async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: Stdio,
    ) -> AgentResult<u32> {
        let mut r = ExecProcessRequest::new();
        r.container_id = id.to_string();
        r.exec_id = exec_id.to_string();
        r.process_json = process_json.to_vec();
        r.stdio = Some(stdio).into();
        Ok(self.client.exec_process(ctx(60), &r).await?.pid)
    }

    async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> AgentResult<()> {
        let mut r = SignalProcessRequest::new();
        r.container_id = id.to_string();
        r.exec_id = exec_id.to_string();
        r.signal = signal;
        r.all = all;
        self.client.signal_process(ctx(30), &r).await.map(drop)
    }

    async fn wait_process(&self, id: &str, exec_id: &str) -> AgentResult<i32> {
        // No deadline: a container may run for months.
        let r = self
            .client
            .wait_process(ttrpc::context::Context::default(), &process(id, exec_id))
            .await?;
        Ok(r.exit_status)
    }

    async fn delete_process(&self, id: &str, exec_id: &str) -> AgentResult<()> {
        self.client
            .delete_process(ctx(30), &process(id, exec_id))
            .await
            .map(drop)
    }

    async fn delete_container(&self, id: &str, force: bool) -> AgentResult<()> {
        let mut r = DeleteContainerRequest::new();
        r.container_id = id.to_string();
        r.force = force;
        self.client.delete_container(ctx(60), &r).await.map(drop)
    }

    async fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> AgentResult<()> {
        let mut r = ResizePtyRequest::new();
        r.container_id = id.to_string();
        r.exec_id = exec_id.to_string();
        r.width = width;
        r.height = height;
        self.client.resize_pty(ctx(30), &r).await.map(drop)
    }

    async fn list_pids(&self, id: &str) -> AgentResult<Vec<u32>> {
        Ok(self.client.list_pids(ctx(30), &container(id)).await?.pids)
    }

    async fn set_paused(&self, id: &str, paused: bool) -> AgentResult<()> {
        let r = container(id);
        if paused {
            self.client.pause_container(ctx(30), &r).await.map(drop)
        } else {
            self.client.resume_container(ctx(30), &r).await.map(drop)
        }
    }

    async fn stats(&self, id: &str) -> AgentResult<StatsContainerResponse> {
        self.client.stats_container(ctx(30), &container(id)).await
    }

    async fn update(&self, id: &str, resources_json: &[u8]) -> AgentResult<()> {
        let mut r = UpdateContainerRequest::new();
        r.container_id = id.to_string();
        r.resources_json = resources_json.to_vec();
        self.client.update_container(ctx(90), &r).await.map(drop)
    }

    async fn prepare_volume(&self, req: PrepareVolumeRequest) -> AgentResult<()> {
        // A large payload is copied file by file in the guest.
        self.client.prepare_volume(ctx(300), &req).await.map(drop)
    }

    async fn wait_oom_event(&self) -> AgentResult<String> {
        let ev = self
            .client
            .wait_oom_event(ttrpc::context::Context::default(), &Empty::new())
            .await?;
        Ok(ev.container_id)
    }
}

/// A scripted agent for unit tests: records every call, answers with
/// increasing pids, lets a test end processes (`exit`), raise OOM kills
/// (`oom`) and make any operation fail with a status (`fail`).
#[cfg(test)]
pub mod fake {
    use std::{
        collections::HashMap,
        sync::{
            atomic::{AtomicU32, Ordering},
            Mutex,
        },
    };

    use tokio::sync::{mpsc, watch};

    use super::*;

    type Key = (String, String);

    /// The fake.
    pub struct FakeAgent {
        calls: Mutex<Vec<String>>,
        exits: Mutex<HashMap<Key, watch::Sender<Option<AgentResult<i32>>>>>,
        failures: Mutex<HashMap<&'static str, ttrpc::Error>>,
        oom_tx: mpsc::UnboundedSender<AgentResult<String>>,
        oom_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<AgentResult<String>>>,
        next_pid: AtomicU32,
    }

    impl Default for FakeAgent {
        fn default() -> Self {
            let (oom_tx, oom_rx) = mpsc::unbounded_channel();
            Self {
                calls: Mutex::default(),
                exits: Mutex::default(),
                failures: Mutex::default(),
                oom_tx,
                oom_rx: tokio::sync::Mutex::new(oom_rx),
                next_pid: AtomicU32::new(100),
            }
        }
    }

    impl FakeAgent {
        /// The calls so far, one line each ("start app", ...).
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().expect("calls").clone()
        }

        /// Process `exec_id` of `id` ends: its WaitProcess answers `status`.
        pub fn exit(&self, id: &str, exec_id: &str, status: AgentResult<i32>) {
            self.exit_channel(id, exec_id).send_replace(Some(status));
        }

        /// The next WaitOomEvent answers `answer`.
        pub fn oom(&self, answer: AgentResult<String>) {
            let _ = self.oom_tx.send(answer);
        }

        /// Operation `op` (the first word of its call line) fails with
        /// `code` and `message` from now on.
        pub fn fail(&self, op: &'static str, code: ttrpc::Code, message: &str) {
            self.failures.lock().expect("failures").insert(
                op,
                ttrpc::Error::RpcStatus(ttrpc::get_status(code, message)),
            );
        }

        fn exit_channel(&self, id: &str, exec_id: &str) -> watch::Sender<Option<AgentResult<i32>>> {
            self.exits
                .lock()
                .expect("exits")
                .entry((id.to_string(), exec_id.to_string()))
                .or_insert_with(|| watch::channel(None).0)
                .clone()
        }

        fn call(&self, op: &'static str, args: String) -> AgentResult<()> {
            self.calls
                .lock()
                .expect("calls")
                .push(format!("{op} {args}").trim_end().to_string());
            match self.failures.lock().expect("failures").get(op) {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            }
        }

        fn pid(&self) -> u32 {
            self.next_pid.fetch_add(1, Ordering::Relaxed)
        }
    }

    #[async_trait]
    impl Agent for FakeAgent {
        async fn create_container(&self, id: &str, bundle: &str, _: Stdio) -> AgentResult<u32> {
            self.call("create", format!("{id} {bundle}"))?;
            Ok(self.pid())
        }

        async fn start_container(&self, id: &str) -> AgentResult<u32> {
            self.call("start", id.to_string())?;
            Ok(self.pid())
        }

        async fn exec_process(
            &self,
            id: &str,
            exec_id: &str,
            _: &[u8],
            _: Stdio,
        ) -> AgentResult<u32> {
            self.call("exec", format!("{id} {exec_id}"))?;
            Ok(self.pid())
        }

        async fn signal_process(
            &self,
            id: &str,
            exec_id: &str,
            signal: u32,
            all: bool,
        ) -> AgentResult<()> {
            let all = if all { " all" } else { "" };
            self.call("signal", format!("{id} {exec_id} {signal}{all}"))
        }

        async fn wait_process(&self, id: &str, exec_id: &str) -> AgentResult<i32> {
            self.call("wait", format!("{id} {exec_id}"))?;
            let mut rx = self.exit_channel(id, exec_id).subscribe();
            let answer = rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| ttrpc::Error::Others("the fake went away".into()))?
                .clone();
            answer.unwrap_or(Err(ttrpc::Error::Others("no answer".into())))
        }

        async fn delete_process(&self, id: &str, exec_id: &str) -> AgentResult<()> {
            self.call("delete-process", format!("{id} {exec_id}"))
        }

        async fn delete_container(&self, id: &str, force: bool) -> AgentResult<()> {
            let force = if force { " force" } else { "" };
            self.call("delete", format!("{id}{force}"))
        }

        async fn resize_pty(&self, id: &str, exec_id: &str, w: u32, h: u32) -> AgentResult<()> {
            self.call("resize", format!("{id} {exec_id} {w}x{h}"))
        }

        async fn list_pids(&self, id: &str) -> AgentResult<Vec<u32>> {
            self.call("pids", id.to_string())?;
            Ok(vec![1, 2])
        }

        async fn set_paused(&self, id: &str, paused: bool) -> AgentResult<()> {
            self.call(if paused { "pause" } else { "resume" }, id.to_string())
        }

        async fn stats(&self, id: &str) -> AgentResult<StatsContainerResponse> {
            self.call("stats", id.to_string())?;
            Ok(StatsContainerResponse::new())
        }

        async fn update(&self, id: &str, _: &[u8]) -> AgentResult<()> {
            self.call("update", id.to_string())
        }

        async fn prepare_volume(&self, req: PrepareVolumeRequest) -> AgentResult<()> {
            self.call("volume", req.target)
        }

        async fn wait_oom_event(&self) -> AgentResult<String> {
            match self.oom_rx.lock().await.recv().await {
                Some(answer) => answer,
                None => Err(ttrpc::Error::Others("no more OOM events".into())),
            }
        }
    }
}
