//! One pod's microVM: its directory, virtio-fs daemon, VMM and agent.
//!
//! Layout of `<state_dir>/<namespace>/<sandbox id>/` (every directory
//! 0700, every file 0600: no local user reaches a pod's files or sockets):
//!
//! * `work/`: the shim's tree: each container's directory with its root
//!   file system and bind mounts mounted below it, its guest spec and its
//!   volume packs (`rootfs.rs`, `volwatch.rs`). Only the shim writes here;
//!   the guest never sees this path.
//! * `shared/`: what husk-virtiofsd serves, the guest's
//!   `/run/husk/shared`: a bind of `work/` that is read-only, `nosuid` and
//!   `nodev`. The guest can change nothing of the tree itself (no name can
//!   be planted, swapped or removed: `EROFS`); it writes only inside the
//!   mounts below it (root file systems, writable volumes), which the shim
//!   never looks into. So nothing the shim opens, writes, mounts or
//!   unmounts by path can be redirected by the guest (`docs/security.md`).
//! * `fs.sock` (the daemon's vhost-user socket), `vsock.sock` (hybrid
//!   vsock), `api.sock` (the VMM's control socket), `pids` (VMM and
//!   daemon) and `cgroup` (where they are accounted), for cleanup after a
//!   dead shim, and the two processes' logs.
//!
//! Both processes start through `husk-jailer` (`husk_shim::jail`), so they
//! run in the pod's cgroup, under its limits, with its `oom_score_adj`
//! ([`HostSide`]) from their first instruction.
//!
//! `work/` is a shared mount and `shared/` its peer, both made before the
//! daemon starts: the daemon's sandbox holds a copy of the mount tree, and
//! only mounts that propagate (root file systems mounted later, per
//! container) reach it.

use std::{
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use husk_protocols::{
    agent::{
        ConfigureNetworkRequest, IpNetwork, MountSharedRequest, NetworkRoute, PersonalizeRequest,
        ShutdownRequest,
    },
    agent_ttrpc::AgentClient,
    connect_agent,
};
use husk_shim::{
    jail::{self, Jail, Placement},
    steps::{self, Step},
};
use nix::{
    mount::{mount, MsFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tokio::sync::watch;

use crate::{
    agent::{Agent, TtrpcAgent},
    config::Config,
    exits::Exits,
    hostfs,
    network::{self, PodNetwork},
};

/// The guest path of the shared directory.
pub const GUEST_SHARED: &str = "/run/husk/shared";
/// The virtio-fs tag.
const FS_TAG: &str = "husk";
/// First host vsock port handed out for stdio streams.
const FIRST_STDIO_PORT: u32 = 10_000;

/// Errors starting or talking to a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Host-side setup failed.
    #[error("{0}: {1}")]
    Setup(String, #[source] std::io::Error),
    /// A process could not be started.
    #[error("starting {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
    /// The VM did not come up.
    #[error("{0}")]
    Boot(String),
    /// The settings do not allow a pod VM here.
    #[error("{0}")]
    Config(String),
    /// The agent refused or failed a call.
    #[error("agent: {0}")]
    Agent(String),
}

/// A running pod VM.
pub struct Vm {
    /// The sandbox the VM was started for.
    pub sandbox: String,
    /// The pod directory.
    pub dir: PathBuf,
    /// The shim's tree, which the guest sees read-only at
    /// /run/husk/shared (see the module documentation).
    pub work: PathBuf,
    /// The hybrid vsock socket.
    pub vsock: PathBuf,
    /// The agent's client, for the VM's own calls (setup, listeners,
    /// shutdown).
    pub agent: AgentClient,
    /// The agent's container operations, for the Task service.
    pub guest: Arc<dyn Agent>,
    vmm_pid: i32,
    daemon_pid: i32,
    next_port: AtomicU32,
    /// Becomes `Some(status)` when the VMM exits.
    pub vmm_exit: watch::Receiver<Option<i32>>,
    daemon_exit: watch::Receiver<Option<i32>>,
    stopping: AtomicBool,
    /// The pod's network namespace, whose wiring goes with the VM.
    netns: Option<PathBuf>,
    /// Whether husk-vmm profiles the guest (`profile_dir`): each step
    /// then also ends a slice of the profile.
    profiled: bool,
    /// The `oom_score_adj` the pod's containers asked for so far (the
    /// highest: the VM goes as a whole), once one has.
    containers_oom_score_adj: std::sync::Mutex<Option<i32>>,
}

/// Where and how a pod VM's host processes are accounted.
#[derive(Debug, Clone)]
pub struct HostSide {
    /// The pod's cgroup.
    pub placement: Placement,
    /// Its limits (`jail::pod_limits`).
    pub limits: oci_spec::runtime::LinuxResources,
    /// The processes' `oom_score_adj` until a container says otherwise.
    pub oom_score_adj: i32,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("dir", &self.dir)
            .field("vmm_pid", &self.vmm_pid)
            .finish_non_exhaustive()
    }
}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |e| VmError::Setup(what, e)
}

fn nix_io(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// The descriptor husk-vmm finds the pod's tap on.
const TAP_FD: i32 = 3;
/// The MAC of a VM's network card when it has no pod network (`ctr run`).
const UNCABLED_MAC: &str = "02:68:75:73:6b:01";

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The agent's ConfigureNetwork request for `net`.
fn network_request(net: &PodNetwork) -> ConfigureNetworkRequest {
    let mut req = ConfigureNetworkRequest::new();
    req.mac = net.mac.to_vec();
    req.mtu = net.mtu;
    for (ip, prefix) in &net.addresses {
        let mut a = IpNetwork::new();
        a.address = ip.to_string();
        a.prefix_len = u32::from(*prefix);
        req.addresses.push(a);
    }
    for (dest, gw) in &net.routes {
        let mut r = NetworkRoute::new();
        if let Some((d, p)) = dest {
            r.destination = d.to_string();
            r.prefix_len = u32::from(*p);
        }
        if let Some(g) = gw {
            r.gateway = g.to_string();
        }
        req.routes.push(r);
    }
    req
}

/// The pod directory of sandbox `id` in `namespace`.
pub fn pod_dir(cfg: &Config, namespace: &str, id: &str) -> PathBuf {
    husk_shim::poddir::pod_dir(&cfg.state_dir, namespace, id)
}

fn log_file(path: &Path) -> Result<std::fs::File, VmError> {
    std::fs::File::create(path).map_err(setup(format!("creating {}", path.display())))
}

async fn wait_for_path(
    path: &Path,
    exit: &watch::Receiver<Option<i32>>,
    what: &str,
) -> Result<(), VmError> {
    for _ in 0..1000 {
        if path.exists() {
            return Ok(());
        }
        if let Some(code) = *exit.borrow() {
            return Err(VmError::Boot(format!("{what} exited with status {code}")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(VmError::Boot(format!(
        "{what} did not create {}",
        path.display()
    )))
}

impl Vm {
    /// Starts the pod VM for sandbox `id` and gets its agent ready: fresh
    /// identity, shared directory mounted.
    pub async fn start(
        cfg: &Config,
        namespace: &str,
        id: &str,
        hostname: &str,
        net: Option<PodNetwork>,
        host: &HostSide,
        exits: &Exits,
    ) -> Result<Self, VmError> {
        let dir = pod_dir(cfg, namespace, id);
        husk_shim::poddir::check_socket_room(&dir).map_err(VmError::Config)?;
        if dir.exists() {
            // Left by a shim that died: take it down first.
            cleanup_pod_dir(&dir);
        }
        let started = Self::start_in(cfg, namespace, id, hostname, net, host, exits).await;
        if started.is_err() {
            // Nothing of a VM that did not start stays: its processes (from
            // the pid file), its mounts, its directory.
            cleanup_pod_dir(&dir);
        }
        started
    }

    async fn start_in(
        cfg: &Config,
        namespace: &str,
        id: &str,
        hostname: &str,
        net: Option<PodNetwork>,
        host: &HostSide,
        exits: &Exits,
    ) -> Result<Self, VmError> {
        let since = std::time::Instant::now();
        let dir = pod_dir(cfg, namespace, id);
        let (work, shared) = make_share(&dir)?;
        // Recorded before anything runs in the cgroup: cleanup after a
        // dead shim removes it too.
        write_placement(&dir, &host.placement)?;
        let jailed = |program: PathBuf| {
            let mut j = Jail::new(program);
            j.cgroup = Some((host.placement.clone(), host.limits.clone()));
            j.oom_score_adj = Some(host.oom_score_adj);
            j
        };

        let fs_sock = dir.join("fs.sock");
        let mut daemon = jailed(cfg.virtiofsd_binary());
        daemon.args.extend(os_args(&[
            "--socket".as_ref(),
            fs_sock.as_os_str(),
            "--shared-dir".as_ref(),
            shared.as_os_str(),
            "--tag".as_ref(),
            FS_TAG.as_ref(),
            "--log".as_ref(),
            "warn".as_ref(),
            "--log-max-kib".as_ref(),
            cfg.log_max_kib.to_string().as_ref(),
        ]));
        let daemon_log = dir.join("virtiofsd.log");
        let daemon = std::process::Command::new(cfg.jailer_binary())
            .args(daemon.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&daemon_log)?)
            .spawn()
            .map_err(|e| VmError::Spawn(cfg.jailer_binary().display().to_string(), e))?;
        let daemon_pid = i32::try_from(daemon.id()).unwrap_or(0);
        let daemon_exit = exits.watch(daemon_pid);
        write_pids(&dir, &[("virtiofsd", daemon_pid)])?;
        if let Err(e) = wait_for_path(&fs_sock, &daemon_exit, "the virtio-fs daemon").await {
            let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
            return Err(VmError::Boot(format!("{e}; its log: {}", log.trim())));
        }

        let vsock = dir.join("vsock.sock");
        let mut vmm = jailed(cfg.vmm_binary());
        let args = &mut vmm.args;
        if let Some(k) = &cfg.kernel {
            args.extend(os_args(&["--kernel".as_ref(), k.as_os_str()]));
        }
        if let Some(i) = &cfg.initramfs {
            args.extend(os_args(&["--initramfs".as_ref(), i.as_os_str()]));
        }
        let api_sock = dir.join("api.sock");
        let log_max_kib = cfg.log_max_kib.to_string();
        let virtiofsd = cfg.virtiofsd_binary();
        args.extend(os_args(&[
            "--vcpus".as_ref(),
            cfg.vcpus.to_string().as_ref(),
            "--mem-mib".as_ref(),
            cfg.mem_mib.to_string().as_ref(),
            "--cmdline".as_ref(),
            cfg.kernel_cmdline.as_ref(),
            "--vsock-uds".as_ref(),
            vsock.as_os_str(),
            "--api-socket".as_ref(),
            api_sock.as_os_str(),
            "--fs-socket".as_ref(),
            fs_sock.as_os_str(),
            "--fs-tag".as_ref(),
            FS_TAG.as_ref(),
            "--log".as_ref(),
            "info".as_ref(),
            "--log-max-kib".as_ref(),
            log_max_kib.as_ref(),
            "--virtiofsd".as_ref(),
            virtiofsd.as_os_str(),
        ]));
        // Every VM has a balloon: the host can always take memory back
        // through the VMM's API; free page reporting gives it back unasked.
        args.push("--balloon".into());
        args.push(
            format!(
                "reporting={},stats={}",
                if cfg.free_page_reporting { "on" } else { "off" },
                cfg.balloon_stats_secs
            )
            .into(),
        );
        if cfg.template_start {
            args.extend(os_args(&[
                "--template-dir".as_ref(),
                cfg.template_dir.as_os_str(),
                "--template-max-count".as_ref(),
                cfg.template_max_count.to_string().as_ref(),
                "--template-max-mib".as_ref(),
                cfg.template_max_mib.to_string().as_ref(),
            ]));
        }
        if cfg.serial_console {
            args.extend(os_args(&[
                "--serial-log".as_ref(),
                dir.join("serial.log").as_os_str(),
            ]));
        }
        if let Some(out) = &cfg.profile_dir {
            std::fs::create_dir_all(out).map_err(setup("creating the profile directory"))?;
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let name = dir
                .file_name()
                .map_or_else(|| id.to_string(), |n| n.to_string_lossy().into_owned());
            args.extend(os_args(&[
                "--profile-guest".as_ref(),
                out.join(format!("{namespace}-{name}-{secs}.folded"))
                    .as_os_str(),
                "--profile-hz".as_ref(),
                cfg.profile_hz.to_string().as_ref(),
            ]));
        }
        // Every VM has a network card, so one template serves all; only a
        // CRI pod's is cabled (its tap, as fd 3 of husk-vmm, kept open
        // through the jailer's exec).
        args.push("--net".into());
        args.push(match &net {
            Some(n) => format!("mac={},mtu={},fd={TAP_FD}", format_mac(&n.mac), n.mtu).into(),
            None => format!("mac={UNCABLED_MAC},mtu=1500").into(),
        });
        let mut cmd = std::process::Command::new(cfg.jailer_binary());
        cmd.args(vmm.to_args());
        if let Some(n) = &net {
            let tap = n.tap.as_raw_fd();
            // SAFETY: runs in the child between fork and exec and calls
            // only dup2(2)/fcntl(2), which are async-signal-safe; `tap`
            // is open in the parent across the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if tap == TAP_FD {
                        if libc::fcntl(tap, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(tap, TAP_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // A cold boot announces readiness; listen before the VM starts.
        let ready_path = husk_protocols::hybrid_vsock::port_socket_path(
            &vsock,
            husk_protocols::READY_VSOCK_PORT,
        );
        let ready = if cfg.template_start {
            None
        } else {
            Some(
                tokio::net::UnixListener::bind(&ready_path)
                    .map_err(setup("listening for the agent's readiness"))?,
            )
        };
        let vmm = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir.join("vmm.log"))?)
            .spawn()
            .map_err(|e| VmError::Spawn(cfg.jailer_binary().display().to_string(), e))?;
        let vmm_pid = i32::try_from(vmm.id()).unwrap_or(0);
        // husk-vmm holds the tap now; the shim's copy would keep it alive
        // after the VM is gone.
        let net_config = net.as_ref().map(network_request);
        let netns = net.map(|n| n.netns);
        let vmm_exit = exits.watch(vmm_pid);
        write_pids(&dir, &[("vmm", vmm_pid), ("virtiofsd", daemon_pid)])?;

        let within = Duration::from_secs(cfg.agent_timeout_secs);
        let vm_log = || std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
        let connected = async {
            if let Some(listener) = ready {
                let _ = listener.accept().await;
                let _ = std::fs::remove_file(&ready_path);
            }
            connect_agent(&vsock, within).await
        };
        let mut exit_rx = vmm_exit.clone();
        let agent = tokio::select! {
            r = tokio::time::timeout(within, connected) => match r {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    let _ = kill(Pid::from_raw(vmm_pid), Signal::SIGKILL);
                    return Err(VmError::Boot(format!("the agent did not answer: {e}; VMM log: {}", vm_log())));
                }
                Err(_) => {
                    let _ = kill(Pid::from_raw(vmm_pid), Signal::SIGKILL);
                    return Err(VmError::Boot(format!("the agent did not answer within {within:?}; VMM log: {}", vm_log())));
                }
            },
            _ = exit_rx.wait_for(Option::is_some) => {
                return Err(VmError::Boot(format!("husk-vmm exited during start: {}", vm_log())));
            }
        };
        let vm = Self {
            sandbox: id.to_string(),
            dir,
            work,
            vsock,
            guest: Arc::new(TtrpcAgent::new(agent.clone())),
            agent,
            vmm_pid,
            daemon_pid,
            next_port: AtomicU32::new(FIRST_STDIO_PORT),
            vmm_exit,
            daemon_exit,
            stopping: AtomicBool::new(false),
            netns,
            profiled: cfg.profile_dir.is_some(),
            containers_oom_score_adj: std::sync::Mutex::new(None),
        };
        vm.prepare_guest(id, hostname, since).await?;
        if let Some(req) = net_config {
            vm.agent
                .configure_network(ttrpc::context::with_timeout(60_000_000_000), &req)
                .await
                .map_err(|e| VmError::Agent(format!("ConfigureNetwork: {e}")))?;
        }
        Ok(vm)
    }

    /// Personalizes the restored guest and mounts the shared directory;
    /// logs the VM's start (from `since`) and the mount as steps.
    async fn prepare_guest(
        &self,
        id: &str,
        hostname: &str,
        since: std::time::Instant,
    ) -> Result<(), VmError> {
        let ctx = || ttrpc::context::with_timeout(30_000_000_000);
        let mut req = PersonalizeRequest::new();
        let mut entropy = vec![0u8; 64];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(setup("opening /dev/urandom"))?,
            &mut entropy,
        )
        .map_err(setup("reading /dev/urandom"))?;
        req.entropy = entropy;
        req.hostname = hostname.to_string();
        req.sandbox_id = id.to_string();
        self.agent
            .personalize(ctx(), &req)
            .await
            .map_err(|e| VmError::Agent(format!("Personalize: {e}")))?;
        self.step(id, Step::VmStart, since.elapsed()).await;
        let mounting = std::time::Instant::now();
        let mut mount = MountSharedRequest::new();
        mount.tag = FS_TAG.into();
        mount.target = GUEST_SHARED.into();
        self.agent
            .mount_shared(ctx(), &mount)
            .await
            .map_err(|e| VmError::Agent(format!("MountShared: {e}")))?;
        self.step(id, Step::SharedMount, mounting.elapsed()).await;
        Ok(())
    }

    /// Logs that `step` of `container` took `took`; in a profiled VM, also
    /// ends the profile's slice for the step (husk-vmm's `profile_mark`),
    /// so that each step has a profile of its own.
    pub async fn step(&self, container: &str, step: Step, took: Duration) {
        steps::record(container, step, took);
        if !self.profiled {
            return;
        }
        let line = format!(
            "{{\"action\":\"profile_mark\",\"label\":\"{}\"}}\n",
            step.name()
        );
        let api = self.dir.join("api.sock");
        let asked = async {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            let mut conn = tokio::net::UnixStream::connect(&api).await?;
            conn.write_all(line.as_bytes()).await?;
            let mut answer = String::new();
            tokio::io::BufReader::new(conn)
                .read_line(&mut answer)
                .await?;
            Ok::<_, std::io::Error>(answer)
        };
        match tokio::time::timeout(Duration::from_secs(10), asked).await {
            Ok(Ok(a)) if a.contains("\"ok\":true") => {}
            Ok(Ok(a)) => tracing::warn!("profile mark {}: {}", step.name(), a.trim()),
            Ok(Err(e)) => tracing::warn!("profile mark {}: {e}", step.name()),
            Err(_) => tracing::warn!("profile mark {}: no answer within 10 s", step.name()),
        }
    }

    /// The pid of `husk-vmm` (the sandbox task's pid).
    pub fn vmm_pid(&self) -> u32 {
        u32::try_from(self.vmm_pid).unwrap_or(0)
    }

    /// A host vsock port for a stdio stream, unique in this VM.
    pub fn next_port(&self) -> u32 {
        self.next_port.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits until the VMM or the virtio-fs daemon exits and takes the
    /// other one down with it: a VM whose daemon died cannot reach its
    /// containers' files, and a daemon without its VM serves no one. The
    /// agent connection breaks with the VMM, which ends every pending
    /// `WaitProcess`, so each process's exit is published. Returns which
    /// one went first (also after an orderly shutdown, which callers tell
    /// apart with [`Vm::stopping`]).
    pub async fn watch_death(&self) -> &'static str {
        let mut vmm = self.vmm_exit.clone();
        let mut daemon = self.daemon_exit.clone();
        let who = tokio::select! {
            _ = vmm.wait_for(Option::is_some) => "husk-vmm",
            _ = daemon.wait_for(Option::is_some) => "husk-virtiofsd",
        };
        // Only signal a process not yet reaped (its pid cannot be reused).
        // In an orderly shutdown the daemon leaves as soon as the VMM lets
        // go of it, while the VMM may still be finishing (writing a guest
        // profile): `shutdown` gives it time and kills it if need be.
        if self.vmm_exit.borrow().is_none() && !self.stopping() {
            let _ = kill(Pid::from_raw(self.vmm_pid), Signal::SIGKILL);
        }
        if self.daemon_exit.borrow().is_none() {
            let _ = kill(Pid::from_raw(self.daemon_pid), Signal::SIGKILL);
        }
        who
    }

    /// Whether [`Vm::shutdown`] was called.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Gives the VM's host processes the `oom_score_adj` a new container
    /// asks for (kubelet's value for its QoS class): the first container's,
    /// then the highest any asked for, as the VM is killed as a whole.
    pub fn adopt_oom_score_adj(&self, adj: i32) {
        let mut current = self
            .containers_oom_score_adj
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = current.map_or(adj, |c| c.max(adj)).clamp(-1000, 1000);
        if *current == Some(next) {
            return;
        }
        *current = Some(next);
        for pid in [self.vmm_pid, self.daemon_pid] {
            if let Err(e) = jail::set_oom_score_adj(&pid.to_string(), next) {
                tracing::warn!(pid, "{e}");
            }
        }
    }

    /// Whether the VMM still runs.
    pub fn alive(&self) -> bool {
        self.vmm_exit.borrow().is_none()
    }

    /// Ends the VM: an orderly agent shutdown, then force if it takes too
    /// long; removes the pod directory.
    pub async fn shutdown(&self) {
        let since = std::time::Instant::now();
        self.stopping.store(true, Ordering::Relaxed);
        if self.alive() {
            let ctx = ttrpc::context::with_timeout(5_000_000_000);
            let _ = self.agent.shutdown(ctx, &ShutdownRequest::new()).await;
        }
        // The agent answers once the guest's file systems are flushed; the
        // pod's containers are gone, so nothing in the guest needs an
        // orderly end. End the VM now (on SIGTERM husk-vmm stops the vCPUs,
        // writes what it owes, such as a guest profile, and exits) instead
        // of waiting for the guest kernel's reboot, which takes seconds
        // where guest kernel code is emulated and outlasted containerd's
        // Shutdown deadline.
        if self.vmm_exit.borrow().is_none() {
            let _ = kill(Pid::from_raw(self.vmm_pid), Signal::SIGTERM);
        }
        let mut vmm = self.vmm_exit.clone();
        if tokio::time::timeout(Duration::from_secs(10), vmm.wait_for(Option::is_some))
            .await
            .is_err()
        {
            tracing::warn!("husk-vmm did not exit; killing it");
            let _ = kill(Pid::from_raw(self.vmm_pid), Signal::SIGKILL);
            let _ =
                tokio::time::timeout(Duration::from_secs(5), vmm.wait_for(Option::is_some)).await;
        }
        let mut daemon = self.daemon_exit.clone();
        if tokio::time::timeout(Duration::from_secs(5), daemon.wait_for(Option::is_some))
            .await
            .is_err()
        {
            tracing::warn!("husk-virtiofsd did not exit; killing it");
            let _ = kill(Pid::from_raw(self.daemon_pid), Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(5), daemon.wait_for(Option::is_some))
                .await;
        }
        self.detach_network().await;
        cleanup_pod_dir(&self.dir);
        steps::record(&self.sandbox, Step::VmGone, since.elapsed());
    }

    /// Takes the pod network's wiring apart (see `network::detach`); safe
    /// to repeat.
    pub async fn detach_network(&self) {
        if let Some(netns) = &self.netns {
            network::detach(netns.clone()).await;
        }
    }
}

/// Owned copies of command-line words.
fn os_args(words: &[&std::ffi::OsStr]) -> Vec<std::ffi::OsString> {
    words.iter().map(|w| w.to_os_string()).collect()
}

/// Records the pod's cgroup (what `cleanup_pod_dir` removes).
fn write_placement(dir: &Path, placement: &Placement) -> Result<(), VmError> {
    let text = serde_json::to_vec(placement)
        .map_err(|e| VmError::Config(format!("recording the pod's cgroup: {e}")))?;
    std::fs::write(dir.join("cgroup"), text).map_err(setup("recording the pod's cgroup"))
}

/// Writes the pod's pid file (what `cleanup_pod_dir` kills), replacing it.
fn write_pids(dir: &Path, pids: &[(&str, i32)]) -> Result<(), VmError> {
    let text: String = pids.iter().map(|(n, p)| format!("{n} {p}\n")).collect();
    let tmp = dir.join("pids.new");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, dir.join("pids")))
        .map_err(setup("writing the pid file"))
}

/// Makes the pod directory `dir` and its share (see the module
/// documentation): `work/`, a shared mount, and `shared/`, its read-only,
/// `nosuid`, `nodev` peer. Returns both.
fn make_share(dir: &Path) -> Result<(PathBuf, PathBuf), VmError> {
    for d in dir.ancestors().skip(1).take(2) {
        // The namespace directory and the state directory.
        hostfs::private_dir(d).map_err(setup(format!("making {} private", d.display())))?;
    }
    let (work, shared) = (dir.join("work"), dir.join("shared"));
    for d in [dir, &work, &shared] {
        hostfs::private_dir(d).map_err(setup(format!("creating {}", d.display())))?;
    }
    let mnt = |what: &str, src: Option<&Path>, target: &Path, flags: MsFlags| {
        mount(src, target, None::<&str>, flags, None::<&str>)
            .map_err(|e| VmError::Setup(format!("{what} ({})", target.display()), nix_io(e)))
    };
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mnt(
        "bind-mounting the pod's tree",
        Some(&work),
        &work,
        MsFlags::MS_BIND,
    )?;
    mnt(
        "hardening the pod's tree",
        None,
        &work,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | hardened,
    )?;
    mnt(
        "making the pod's tree a shared mount",
        None,
        &work,
        MsFlags::MS_SHARED,
    )?;
    mnt("binding the share", Some(&work), &shared, MsFlags::MS_BIND)?;
    mnt(
        "making the share read-only",
        None,
        &shared,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | hardened,
    )?;
    Ok((work, shared))
}

/// Whether `pid` runs the program `name` (guards against reused pids).
fn runs(pid: i32, name: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(name))
        .unwrap_or(false)
}

/// Takes down whatever a pod directory still holds: its processes (from
/// the pid file), every mount below it, the directory itself. Safe to
/// repeat.
pub fn cleanup_pod_dir(dir: &Path) {
    if let Ok(text) = std::fs::read_to_string(dir.join("pids")) {
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if let (Some(name), Some(Ok(pid))) = (words.next(), words.next().map(str::parse::<i32>))
            {
                let binary = if name == "vmm" {
                    "husk-vmm"
                } else {
                    "husk-virtiofsd"
                };
                if pid > 0 && runs(pid, binary) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
    // Whatever else runs in the pod's cgroup goes with it (children the
    // VMM made, such as a template build's daemon), then the cgroup.
    if let Ok(text) = std::fs::read(dir.join("cgroup")) {
        match serde_json::from_slice::<Placement>(&text) {
            Ok(place) => {
                if let Err(e) = place.remove() {
                    tracing::warn!("{e}");
                }
            }
            Err(e) => tracing::warn!("{}/cgroup: {e}", dir.display()),
        }
    }
    let left = hostfs::unmount_below(dir);
    if !left.is_empty() {
        // Never delete through a mount: it may be a container's snapshot.
        tracing::error!("not removing {}: still mounted: {left:?}", dir.display());
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}
