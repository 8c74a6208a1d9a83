//! The agent API service: each RPC validates its input, does its work and
//! maps failures to ttrpc status codes the shim can act on.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use husk_protocols::{
    agent::{
        stream_check_request::Direction, ConfigureNetworkRequest, ContainerRequest,
        CreateContainerRequest, CreateContainerResponse, DeleteContainerRequest, Empty,
        ExecProcessRequest, ExecProcessResponse, HealthRequest, HealthResponse, ListPidsResponse,
        ListenersResponse, MountSharedRequest, MountSharedResponse, OomEvent, PersonalizeRequest,
        PersonalizeResponse, PrepareVolumeRequest, ProcessRequest, ResizePtyRequest,
        ShutdownRequest, ShutdownResponse, SignalProcessRequest, StartContainerResponse,
        StatsContainerResponse, StreamCheckRequest, StreamCheckResponse, UpdateContainerRequest,
        VersionRequest, VersionResponse, WaitListenersRequest, WaitProcessResponse,
    },
    agent_ttrpc, pattern, API_VERSION, HOST_CID,
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};
use ttrpc::{r#async::TtrpcContext, Code};

use crate::{
    container::{ContainerError, Containers},
    AGENT_VERSION,
};

/// Serves the agent API.
#[derive(Debug)]
pub struct AgentService {
    shutdown: mpsc::Sender<()>,
    containers: Containers,
}

impl AgentService {
    /// `shutdown` receives one message when the host asks for a shutdown.
    pub fn new(shutdown: mpsc::Sender<()>) -> Self {
        Self {
            shutdown,
            containers: Containers::default(),
        }
    }
}

fn container_err(e: ContainerError) -> ttrpc::Error {
    let code = match &e {
        ContainerError::NotFound(_) => Code::NOT_FOUND,
        ContainerError::Exists(_) => Code::ALREADY_EXISTS,
        ContainerError::Invalid(_) => Code::INVALID_ARGUMENT,
        ContainerError::State(_) => Code::FAILED_PRECONDITION,
        ContainerError::Failed(_) => Code::UNKNOWN,
    };
    status(code, e.to_string())
}

fn status(code: Code, msg: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn internal(msg: String) -> ttrpc::Error {
    status(Code::INTERNAL, msg)
}

/// Bounds of the entropy a Personalize call brings.
const MIN_ENTROPY: usize = 32;
const MAX_ENTROPY: usize = 4096;

/// Largest LinuxResources document an update may carry.
const MAX_RESOURCES_JSON: usize = 64 * 1024;

/// Largest stream a check may move (1 GiB).
const MAX_CHECK_BYTES: u64 = 1 << 30;
/// Default and largest time a stream check may take.
const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(600);
const CHUNK: usize = 64 * 1024;

/// Where files for stream checks and shared mounts may live in the guest.
const HUSK_RUN_DIR: &str = "/run/husk/";

/// Checks that `path` is an absolute path under /run/husk/ without `..`.
fn husk_path(path: &str) -> Result<std::path::PathBuf, ttrpc::Error> {
    let p = std::path::Path::new(path);
    let ok = p.is_absolute()
        && path.starts_with(HUSK_RUN_DIR)
        && path.len() > HUSK_RUN_DIR.len()
        && p.components()
            .all(|c| !matches!(c, std::path::Component::ParentDir));
    if ok {
        Ok(p.to_path_buf())
    } else {
        Err(status(
            Code::INVALID_ARGUMENT,
            format!("{path:?} is not a path under {HUSK_RUN_DIR}"),
        ))
    }
}

async fn receive_stream(
    port: u32,
    file: Option<std::path::PathBuf>,
) -> Result<(u64, Vec<u8>, Duration), ttrpc::Error> {
    let mut out = match &file {
        Some(path) => Some(tokio::fs::File::create(path).await.map_err(|e| {
            status(
                Code::FAILED_PRECONDITION,
                format!("creating {}: {e}", path.display()),
            )
        })?),
        None => None,
    };
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port)).map_err(|e| {
        status(
            Code::FAILED_PRECONDITION,
            format!("listening on vsock port {port}: {e}"),
        )
    })?;
    // Only the host's connection counts; one from inside the guest is closed.
    let mut stream = crate::listener::accept_from_host(&listener, port)
        .await
        .map_err(|e| {
            status(
                Code::UNAVAILABLE,
                format!("accepting on vsock port {port}: {e}"),
            )
        })?;
    drop(listener);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    let mut started = None;
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| status(Code::UNAVAILABLE, format!("reading vsock port {port}: {e}")))?;
        if n == 0 {
            break;
        }
        started.get_or_insert_with(Instant::now);
        hasher.update(&buf[..n]);
        if let Some(f) = out.as_mut() {
            f.write_all(&buf[..n])
                .await
                .map_err(|e| status(Code::INTERNAL, format!("writing the file: {e}")))?;
        }
        total += n as u64;
        if total > MAX_CHECK_BYTES {
            return Err(status(
                Code::OUT_OF_RANGE,
                format!("more than {MAX_CHECK_BYTES} bytes"),
            ));
        }
    }
    if let Some(f) = out.as_mut() {
        f.sync_all()
            .await
            .map_err(|e| status(Code::INTERNAL, format!("syncing the file: {e}")))?;
    }
    Ok((
        total,
        hasher.finalize().to_vec(),
        started.map_or(Duration::ZERO, |s| s.elapsed()),
    ))
}

async fn send_stream(
    port: u32,
    bytes: u64,
    seed: u64,
    file: Option<std::path::PathBuf>,
) -> Result<(u64, Vec<u8>, Duration), ttrpc::Error> {
    let mut input =
        match &file {
            Some(path) => Some(tokio::fs::File::open(path).await.map_err(|e| {
                status(Code::NOT_FOUND, format!("opening {}: {e}", path.display()))
            })?),
            None => None,
        };
    let mut stream = VsockStream::connect(VsockAddr::new(HOST_CID, port))
        .await
        .map_err(|e| {
            status(
                Code::UNAVAILABLE,
                format!("connecting to host vsock port {port}: {e}"),
            )
        })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut state = seed | 1;
    let mut left = if input.is_some() { u64::MAX } else { bytes };
    let mut sent = 0u64;
    let started = Instant::now();
    while left > 0 {
        let n = match input.as_mut() {
            Some(f) => {
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| status(Code::INTERNAL, format!("reading the file: {e}")))?;
                if n == 0 {
                    break;
                }
                n
            }
            None => {
                let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
                state = pattern::fill(&mut buf[..n], state);
                n
            }
        };
        hasher.update(&buf[..n]);
        stream.write_all(&buf[..n]).await.map_err(|e| {
            status(
                Code::UNAVAILABLE,
                format!("writing host vsock port {port}: {e}"),
            )
        })?;
        left -= n as u64;
        sent += n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write).ok();
    // Wait for the host to close its end, so every byte was taken.
    let mut b = [0u8; 1];
    let _ = stream.read(&mut b).await;
    Ok((sent, hasher.finalize().to_vec(), started.elapsed()))
}

/// Seconds since boot, from `/proc/uptime` ("12.34 5.67").
fn uptime_seconds() -> Result<f64, String> {
    let text = std::fs::read_to_string("/proc/uptime")
        .map_err(|e| format!("reading /proc/uptime: {e}"))?;
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected /proc/uptime contents {text:?}"))
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn health(
        &self,
        _ctx: &TtrpcContext,
        _req: HealthRequest,
    ) -> ttrpc::Result<HealthResponse> {
        let mut resp = HealthResponse::new();
        resp.status = husk_protocols::agent::health_response::Status::SERVING.into();
        Ok(resp)
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        let uts = nix::sys::utsname::uname().map_err(|e| internal(format!("uname: {e}")))?;
        let mut resp = VersionResponse::new();
        resp.agent_version = AGENT_VERSION.to_string();
        resp.api_version = API_VERSION;
        resp.kernel_release = uts.release().to_string_lossy().into_owned();
        resp.kernel_version = uts.version().to_string_lossy().into_owned();
        resp.uptime_seconds = uptime_seconds().map_err(internal)?;
        Ok(resp)
    }

    async fn stream_check(
        &self,
        _ctx: &TtrpcContext,
        req: StreamCheckRequest,
    ) -> ttrpc::Result<StreamCheckResponse> {
        let port = req.port;
        if port == 0 || port == husk_protocols::AGENT_VSOCK_PORT || port == u32::MAX {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("vsock port {port} cannot be used for a stream check"),
            ));
        }
        if req.bytes > MAX_CHECK_BYTES {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("at most {MAX_CHECK_BYTES} bytes per check"),
            ));
        }
        let limit = match req.timeout_ms {
            0 => DEFAULT_CHECK_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)).min(MAX_CHECK_TIMEOUT),
        };
        let direction = req
            .direction
            .enum_value()
            .map_err(|v| status(Code::INVALID_ARGUMENT, format!("unknown direction {v}")))?;
        let file = if req.path.is_empty() {
            None
        } else {
            Some(husk_path(&req.path)?)
        };
        let work = async {
            match direction {
                Direction::TO_GUEST => receive_stream(port, file).await,
                Direction::FROM_GUEST => send_stream(port, req.bytes, req.seed, file).await,
            }
        };
        let (bytes, sha256, elapsed) =
            tokio::time::timeout(limit, work).await.map_err(|_| {
                status(
                    Code::DEADLINE_EXCEEDED,
                    format!("stream check on port {port} timed out"),
                )
            })??;
        tracing::debug!(port, bytes, ?elapsed, "stream check done");
        let mut resp = StreamCheckResponse::new();
        resp.bytes = bytes;
        resp.sha256 = sha256;
        resp.elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        Ok(resp)
    }

    async fn mount_shared(
        &self,
        _ctx: &TtrpcContext,
        req: MountSharedRequest,
    ) -> ttrpc::Result<MountSharedResponse> {
        if req.tag.is_empty() || req.tag.len() > 36 || req.tag.contains('\0') {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("invalid virtio-fs tag {:?}", req.tag),
            ));
        }
        let target = husk_path(&req.target)?;
        std::fs::create_dir_all(&target).map_err(|e| {
            status(
                Code::INTERNAL,
                format!("creating {}: {e}", target.display()),
            )
        })?;
        nix::mount::mount(
            Some(req.tag.as_str()),
            &target,
            Some("virtiofs"),
            // Container root file systems live here: set-uid programs in
            // them work as they do under runc; device nodes do not.
            nix::mount::MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| {
            status(
                Code::FAILED_PRECONDITION,
                format!(
                    "mounting virtio-fs {:?} on {}: {e}",
                    req.tag,
                    target.display()
                ),
            )
        })?;
        tracing::info!(tag = %req.tag, target = %target.display(), "shared directory mounted");
        Ok(MountSharedResponse::new())
    }

    async fn personalize(
        &self,
        _ctx: &TtrpcContext,
        req: PersonalizeRequest,
    ) -> ttrpc::Result<PersonalizeResponse> {
        if req.entropy.len() < MIN_ENTROPY || req.entropy.len() > MAX_ENTROPY {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!(
                    "entropy must be {MIN_ENTROPY} to {MAX_ENTROPY} bytes, got {}",
                    req.entropy.len()
                ),
            ));
        }
        crate::identity::reseed(&req.entropy)
            .map_err(|e| internal(format!("reseeding the kernel RNG: {e}")))?;
        if !req.hostname.is_empty() {
            crate::identity::set_hostname(&req.hostname)
                .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        }
        if !req.sandbox_id.is_empty() {
            tracing::info!(sandbox = %req.sandbox_id, "personalized");
        }
        let mut resp = PersonalizeResponse::new();
        resp.random_sample = crate::identity::random_sample()
            .map_err(|e| internal(format!("reading /dev/urandom: {e}")))?;
        Ok(resp)
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: ShutdownRequest,
    ) -> ttrpc::Result<ShutdownResponse> {
        tracing::info!("Shutdown called");
        // What the guest wrote through virtio-fs is on the host already,
        // except pages still dirty in its page cache (shared mappings):
        // flush them before answering, so that the host may end the VM as
        // soon as the answer arrives.
        let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
        // A second Shutdown while one is in progress finds the channel full,
        // which is fine: one is enough.
        let _ = self.shutdown.try_send(());
        Ok(ShutdownResponse::new())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let bundle = husk_path(&req.bundle)?;
        let stdio = req.stdio.into_option().unwrap_or_default();
        let pid = self
            .containers
            .create(&req.container_id, &bundle, &stdio)
            .await
            .map_err(container_err)?;
        let mut resp = CreateContainerResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        let pid = self
            .containers
            .start(&req.container_id)
            .await
            .map_err(container_err)?;
        let mut resp = StartContainerResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let stdio = req.stdio.into_option().unwrap_or_default();
        let pid = self
            .containers
            .exec(&req.container_id, &req.exec_id, &req.process_json, &stdio)
            .await
            .map_err(container_err)?;
        let mut resp = ExecProcessResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let signal = i32::try_from(req.signal)
            .map_err(|_| status(Code::INVALID_ARGUMENT, "signal out of range".into()))?;
        self.containers
            .signal(&req.container_id, &req.exec_id, signal, req.all)
            .await
            .map_err(container_err)?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let proc = self
            .containers
            .process(&req.container_id, &req.exec_id)
            .map_err(container_err)?;
        let mut resp = WaitProcessResponse::new();
        resp.exit_status = proc.wait().await;
        Ok(resp)
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.containers
            .process(&req.container_id, &req.exec_id)
            .map_err(container_err)?
            .close_stdin();
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let (Ok(w), Ok(h)) = (u16::try_from(req.width), u16::try_from(req.height)) else {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("window size {}x{} out of range", req.width, req.height),
            ));
        };
        self.containers
            .process(&req.container_id, &req.exec_id)
            .map_err(container_err)?
            .resize(w, h)
            .map_err(container_err)?;
        Ok(Empty::new())
    }

    async fn list_pids(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListPidsResponse> {
        let mut resp = ListPidsResponse::new();
        resp.pids = self
            .containers
            .pids(&req.container_id)
            .await
            .map_err(container_err)?;
        Ok(resp)
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .set_paused(&req.container_id, true)
            .await
            .map_err(container_err)?;
        Ok(Empty::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .set_paused(&req.container_id, false)
            .await
            .map_err(container_err)?;
        Ok(Empty::new())
    }

    async fn delete_container(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .delete(&req.container_id, req.force)
            .await
            .map_err(container_err)?;
        // The container's volume copies go with it (guest memory). Its id
        // is a checked one: only a container the agent created is deleted.
        crate::volumes::remove_mirrors(&req.container_id);
        Ok(Empty::new())
    }

    async fn delete_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .remove_exec(&req.container_id, &req.exec_id)
            .map_err(container_err)?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.containers
            .stats(&req.container_id)
            .await
            .map_err(container_err)
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        if req.resources_json.len() > MAX_RESOURCES_JSON {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("resources larger than {MAX_RESOURCES_JSON} bytes"),
            ));
        }
        self.containers
            .update(&req.container_id, &req.resources_json)
            .await
            .map_err(container_err)?;
        Ok(Empty::new())
    }

    async fn wait_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<OomEvent> {
        let id = self
            .containers
            .next_oom()
            .await
            .ok_or_else(|| internal("the OOM event queue is closed".into()))?;
        let mut ev = OomEvent::new();
        ev.container_id = id;
        Ok(ev)
    }

    async fn prepare_volume(
        &self,
        _ctx: &TtrpcContext,
        req: PrepareVolumeRequest,
    ) -> ttrpc::Result<Empty> {
        use husk_protocols::agent::prepare_volume_request::Kind;
        let target = husk_path(&req.target)?;
        let kind = req.kind.clone();
        let done = tokio::task::spawn_blocking(move || match kind {
            Some(Kind::Tmpfs(t)) => crate::volumes::tmpfs(&target, t.size_bytes),
            Some(Kind::Mirror(m)) => {
                let pack = husk_path(&m.pack).map_err(|e| {
                    crate::volumes::VolumeError::Invalid(format!("mirror pack: {e}"))
                })?;
                crate::volumes::mirror(m.mode, &target, &m.data_dir, &pack)
            }
            _ => Err(crate::volumes::VolumeError::Invalid(
                "a volume of no kind this agent knows".into(),
            )),
        })
        .await
        .map_err(|e| status(Code::INTERNAL, format!("preparing the volume: {e}")))?;
        done.map_err(|e| {
            let code = match e {
                crate::volumes::VolumeError::Invalid(_) => Code::INVALID_ARGUMENT,
                crate::volumes::VolumeError::Io { .. } => Code::FAILED_PRECONDITION,
            };
            status(code, format!("volume {}: {e}", req.target))
        })?;
        Ok(Empty::new())
    }

    async fn wait_listeners(
        &self,
        _ctx: &TtrpcContext,
        req: WaitListenersRequest,
    ) -> ttrpc::Result<ListenersResponse> {
        let known = req
            .known
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect();
        let ports = crate::forward::wait_listeners(
            &known,
            std::time::Duration::from_millis(u64::from(req.max_wait_ms)),
        )
        .await;
        let mut resp = ListenersResponse::new();
        resp.ports = ports.into_iter().map(u32::from).collect();
        Ok(resp)
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> ttrpc::Result<Empty> {
        use crate::network::NetworkError;
        let plan = crate::network::plan(&req)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        crate::network::apply(&plan).await.map_err(|e| match e {
            NetworkError::Invalid(m) => status(Code::INVALID_ARGUMENT, m),
            NetworkError::NoDevice => status(Code::FAILED_PRECONDITION, e.to_string()),
            other => internal(other.to_string()),
        })?;
        tracing::info!(
            addresses = plan.addresses.len(),
            routes = plan.routes.len(),
            "network configured"
        );
        Ok(Empty::new())
    }
}
