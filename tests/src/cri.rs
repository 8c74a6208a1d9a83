//! A CRI client for the end-to-end tests: containerd's CRI v1 gRPC API (the
//! `k8s-cri` crate's generated client over `tonic`), called the way kubelet
//! calls it. Synchronous on the outside, like the rest of the harness: each
//! call runs on the client's own runtime.

use std::{collections::HashMap, path::Path, time::Duration};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient, *,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// What a CRI test runs on: a private containerd with its CRI plugin and
/// husk's runtime handler inside a network namespace of its own, the test
/// images imported, and a connected client.
#[derive(Debug)]
pub struct Setup {
    /// The CRI client.
    pub cri: Cri,
    /// The containerd.
    pub c: crate::containerd::Containerd,
    /// The network namespace containerd and the pods live in.
    pub netns: crate::netns::NetNs,
    /// The test's directory (containerd's, the logs, kubelet's root).
    pub dir: crate::TestDir,
    _templates: crate::TestDir,
}

/// A [`Setup`] for the test `name`.
pub fn setup(name: &str) -> Setup {
    let artifacts = crate::Artifacts::locate().expect("artifacts");
    let dir = crate::TestDir::new(name).expect("dir");
    let templates = crate::TestDir::new(&format!("{name}-templates")).expect("dir");
    let netns =
        crate::netns::NetNs::new(&format!("husk-{name}-{}", std::process::id())).expect("netns");
    let c =
        crate::containerd::Containerd::start_cri(&artifacts, dir.path(), templates.path(), &netns)
            .expect("containerd with CRI");
    c.import_test_image().expect("images");
    let cri = Cri::connect(&c.socket).expect("CRI client");
    Setup {
        cri,
        c,
        netns,
        dir,
        _templates: templates,
    }
}

impl Setup {
    /// A pod spec named `name` whose logs go to the test's directory.
    pub fn pod_spec(&self, name: &str) -> PodSpec {
        let log_dir = self.dir.path().join("logs").join(name);
        std::fs::create_dir_all(&log_dir).expect("log dir");
        PodSpec::new(name, log_dir)
    }

    /// The kubelet root the test's husk.toml names (`<dir>/kubelet`).
    pub fn kubelet_root(&self) -> std::path::PathBuf {
        self.dir.path().join("kubelet")
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("containerd log:\n{}", self.c.log());
            self.cri.remove_all_pods();
        }
    }
}

/// A connected CRI client.
#[derive(Debug)]
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// What a pod sandbox is made from; [`Cri::run_pod`] fills in the rest of
/// kubelet's config.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Pod name (also its uid's stem).
    pub name: String,
    /// The pod's hostname.
    pub hostname: String,
    /// Directory for the containers' CRI log files.
    pub log_dir: std::path::PathBuf,
    /// The pod's DNS settings.
    pub dns: Option<DnsConfig>,
    /// Annotations kubelet passes through.
    pub annotations: HashMap<String, String>,
    /// `shareProcessNamespace`: one PID namespace for the pod's containers.
    pub share_processes: bool,
    /// Whether the pod may run privileged containers.
    pub privileged: bool,
    /// The pod's namespace options when not kubelet's usual ones (network
    /// and IPC of the pod, PID per container or shared): e.g. `hostPID`.
    pub namespace_options: Option<NamespaceOption>,
    /// The pod's summed resources, as kubelet computes them (containerd
    /// passes them to the runtime as sandbox annotations).
    pub resources: Option<k8s_cri::v1::LinuxContainerResources>,
    /// kubelet's pod cgroup (`/kubepods/<qos>/pod<uid>` with the cgroupfs
    /// driver); empty: none.
    pub cgroup_parent: String,
}

impl PodSpec {
    /// A pod called `name` (hostname `<name>-host`) logging below
    /// `log_dir`, asking for nothing else.
    pub fn new(name: &str, log_dir: std::path::PathBuf) -> Self {
        Self {
            name: name.into(),
            hostname: format!("{name}-host"),
            log_dir,
            dns: None,
            annotations: HashMap::new(),
            share_processes: false,
            privileged: false,
            namespace_options: None,
            resources: None,
            cgroup_parent: String::new(),
        }
    }
}

/// A pod that runs: its id and the config it was made with (CreateContainer
/// needs both).
#[derive(Debug, Clone)]
pub struct Pod {
    /// The sandbox id.
    pub id: String,
    /// The sandbox config.
    pub config: PodSandboxConfig,
}

/// An ExecSync result.
#[derive(Debug)]
pub struct ExecOutput {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// The exit code.
    pub exit_code: i32,
}

impl Cri {
    /// Connects to containerd's gRPC socket.
    pub fn connect(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let socket = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                // The URI is a placeholder: the connector dials the socket.
                Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let socket = socket.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(socket).await?,
                            ))
                        }
                    }))
                    .await
            })
            .context("connecting to containerd's CRI socket")?;
        Ok(Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    fn call<T>(
        &self,
        what: &str,
        within: Duration,
        f: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        self.rt.block_on(async {
            match tokio::time::timeout(within, f).await {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(s)) => Err(anyhow::anyhow!(
                    "CRI {what}: {:?}: {}",
                    s.code(),
                    s.message()
                )),
                Err(_) => Err(anyhow::anyhow!("CRI {what}: no answer within {within:?}")),
            }
        })
    }

    /// The runtime's name and version (CRI `Version`).
    pub fn version(&self) -> Result<VersionResponse> {
        let mut c = self.runtime.clone();
        self.call(
            "Version",
            Duration::from_secs(10),
            c.version(VersionRequest::default()),
        )
    }

    /// The images CRI knows (its `ListImages`): their tags.
    pub fn image_tags(&self) -> Result<Vec<String>> {
        let mut c = self.images.clone();
        let r = self.call(
            "ListImages",
            Duration::from_secs(10),
            c.list_images(ListImagesRequest::default()),
        )?;
        Ok(r.images.into_iter().flat_map(|i| i.repo_tags).collect())
    }

    /// RunPodSandbox with runtime handler `handler` ("husk" or "runc").
    pub fn run_pod(&self, spec: &PodSpec, handler: &str) -> Result<Pod> {
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: spec.name.clone(),
                uid: format!("{}-uid", spec.name),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: spec.hostname.clone(),
            log_directory: spec.log_dir.display().to_string(),
            dns_config: spec.dns.clone(),
            annotations: spec.annotations.clone(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    // As kubelet sets them: network and IPC of the pod, PID
                    // per container unless the pod shares it.
                    namespace_options: Some(spec.namespace_options.clone().unwrap_or(
                        NamespaceOption {
                            network: NamespaceMode::Pod as i32,
                            pid: if spec.share_processes {
                                NamespaceMode::Pod
                            } else {
                                NamespaceMode::Container
                            } as i32,
                            ipc: NamespaceMode::Pod as i32,
                            ..Default::default()
                        },
                    )),
                    privileged: spec.privileged,
                    ..Default::default()
                }),
                resources: spec.resources.clone(),
                cgroup_parent: spec.cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut c = self.runtime.clone();
        let r = self.call(
            "RunPodSandbox",
            Duration::from_secs(300),
            c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            }),
        )?;
        Ok(Pod {
            id: r.pod_sandbox_id,
            config,
        })
    }

    /// PodSandboxStatus.
    pub fn pod_status(&self, id: &str) -> Result<PodSandboxStatus> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "PodSandboxStatus",
            Duration::from_secs(30),
            c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            }),
        )?;
        r.status.context("PodSandboxStatus without a status")
    }

    /// The pod's network namespace (from the sandbox's runtime spec in
    /// PodSandboxStatus's verbose info).
    pub fn pod_netns(&self, id: &str) -> Result<std::path::PathBuf> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "PodSandboxStatus",
            Duration::from_secs(30),
            c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }),
        )?;
        let info: serde_json::Value =
            serde_json::from_str(r.info.get("info").context("no verbose info")?)?;
        info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .map(std::path::PathBuf::from)
            .context("no network namespace path in the sandbox spec")
    }

    /// The pod's IP (PodSandboxStatus.network.ip).
    pub fn pod_ip(&self, id: &str) -> Result<String> {
        self.pod_status(id)?
            .network
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .context("the pod has no IP")
    }

    /// StopPodSandbox.
    pub fn stop_pod(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        self.call(
            "StopPodSandbox",
            Duration::from_secs(300),
            c.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }),
        )?;
        Ok(())
    }

    /// RemovePodSandbox.
    pub fn remove_pod(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        self.call(
            "RemovePodSandbox",
            Duration::from_secs(300),
            c.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }),
        )?;
        Ok(())
    }

    /// The ids of the pod sandboxes CRI lists.
    pub fn pods(&self) -> Result<Vec<String>> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "ListPodSandbox",
            Duration::from_secs(30),
            c.list_pod_sandbox(ListPodSandboxRequest::default()),
        )?;
        Ok(r.items.into_iter().map(|p| p.id).collect())
    }

    /// CreateContainer `name` from `image` in `pod`, running `command`,
    /// logging to `<pod log dir>/<name>.log`.
    pub fn create_container(
        &self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String> {
        self.create_container_with(pod, name, image, command, |_| {})
    }

    /// Like [`Self::create_container`], with `edit` changing the config.
    pub fn create_container_with(
        &self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
        edit: impl FnOnce(&mut ContainerConfig),
    ) -> Result<String> {
        let mut config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            // kubelet gives each container the pod's namespace options.
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: pod
                        .config
                        .linux
                        .as_ref()
                        .and_then(|l| l.security_context.as_ref())
                        .and_then(|s| s.namespace_options.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        edit(&mut config);
        let mut c = self.runtime.clone();
        let r = self.call(
            "CreateContainer",
            Duration::from_secs(300),
            c.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            }),
        )?;
        Ok(r.container_id)
    }

    /// StartContainer.
    pub fn start_container(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        self.call(
            "StartContainer",
            Duration::from_secs(300),
            c.start_container(StartContainerRequest {
                container_id: id.into(),
            }),
        )?;
        Ok(())
    }

    /// StopContainer with a grace period of `timeout_s` seconds.
    pub fn stop_container(&self, id: &str, timeout_s: i64) -> Result<()> {
        let mut c = self.runtime.clone();
        self.call(
            "StopContainer",
            Duration::from_secs(300),
            c.stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout: timeout_s,
            }),
        )?;
        Ok(())
    }

    /// RemoveContainer.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        self.call(
            "RemoveContainer",
            Duration::from_secs(300),
            c.remove_container(RemoveContainerRequest {
                container_id: id.into(),
            }),
        )?;
        Ok(())
    }

    /// ContainerStatus.
    pub fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "ContainerStatus",
            Duration::from_secs(30),
            c.container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }),
        )?;
        r.status.context("ContainerStatus without a status")
    }

    /// Polls ContainerStatus until the container has exited (within
    /// `within`) and returns that status.
    pub fn wait_exited(&self, id: &str, within: Duration) -> Result<ContainerStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let s = self.container_status(id)?;
            if s.state == ContainerState::ContainerExited as i32 {
                return Ok(s);
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("container {id} still in state {} after {within:?}", s.state);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// ExecSync `cmd` in container `id`, giving it `timeout_s` seconds.
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout_s: i64) -> Result<ExecOutput> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "ExecSync",
            Duration::from_secs(u64::try_from(timeout_s).unwrap_or(0) + 60),
            c.exec_sync(ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout_s,
            }),
        )?;
        Ok(ExecOutput {
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            exit_code: r.exit_code,
        })
    }

    /// ContainerStats.
    pub fn container_stats(&self, id: &str) -> Result<ContainerStats> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "ContainerStats",
            Duration::from_secs(60),
            c.container_stats(ContainerStatsRequest {
                container_id: id.into(),
            }),
        )?;
        r.stats.context("ContainerStats without stats")
    }

    /// UpdateContainerResources: a new memory limit for container `id`.
    pub fn update_memory_limit(&self, id: &str, bytes: i64) -> Result<()> {
        let mut c = self.runtime.clone();
        self.call(
            "UpdateContainerResources",
            Duration::from_secs(60),
            c.update_container_resources(UpdateContainerResourcesRequest {
                container_id: id.into(),
                linux: Some(LinuxContainerResources {
                    memory_limit_in_bytes: bytes,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )?;
        Ok(())
    }

    /// ReopenContainerLog.
    pub fn reopen_log(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        self.call(
            "ReopenContainerLog",
            Duration::from_secs(60),
            c.reopen_container_log(ReopenContainerLogRequest {
                container_id: id.into(),
            }),
        )?;
        Ok(())
    }

    /// Exec: the streaming URL for `cmd` in container `id` with standard
    /// input, standard output and, without a terminal, standard error.
    pub fn exec_url(&self, id: &str, cmd: &[&str], tty: bool) -> Result<String> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "Exec",
            Duration::from_secs(60),
            c.exec(ExecRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                tty,
                stdin: true,
                stdout: true,
                stderr: !tty,
            }),
        )?;
        Ok(r.url)
    }

    /// Attach: the streaming URL for container `id`'s standard streams.
    pub fn attach_url(&self, id: &str, tty: bool) -> Result<String> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "Attach",
            Duration::from_secs(60),
            c.attach(AttachRequest {
                container_id: id.into(),
                stdin: true,
                tty,
                stdout: true,
                stderr: !tty,
            }),
        )?;
        Ok(r.url)
    }

    /// PortForward: the streaming URL for `port` of pod `id`, with the
    /// port in its query as the API server passes it on.
    pub fn port_forward_url(&self, id: &str, port: u16) -> Result<String> {
        let mut c = self.runtime.clone();
        let r = self.call(
            "PortForward",
            Duration::from_secs(60),
            c.port_forward(PortForwardRequest {
                pod_sandbox_id: id.into(),
                port: vec![port.into()],
            }),
        )?;
        let sep = if r.url.contains('?') { '&' } else { '?' };
        Ok(format!("{}{sep}port={port}", r.url))
    }

    /// Stops and removes every pod CRI lists (a failing test's cleanup).
    pub fn remove_all_pods(&self) {
        for id in self.pods().unwrap_or_default() {
            let _ = self.stop_pod(&id);
            let _ = self.remove_pod(&id);
        }
    }
}
