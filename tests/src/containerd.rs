//! A private containerd for end-to-end tests and benchmarks: its own root,
//! state and socket under a test directory (never the system's), husk's
//! binaries first on its PATH, and a busybox image built locally and
//! imported — no registry. The CRI plugin is off for `ctr` tests; CRI tests
//! ([`Containerd::start_cri`]) run it inside a network namespace of their
//! own with a CNI bridge, husk's shipped containerd drop-in and a locally
//! built pause image.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::{busybox_rootfs, Artifacts};

/// The containerd namespace tests use.
pub const NAMESPACE: &str = "husk-e2e";
/// The containerd namespace of CRI's containers and images.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The runtime name of husk.
pub const RUNTIME: &str = "io.containerd.husk.v2";
/// The test image.
pub const IMAGE: &str = "husk.test/busybox:1";

/// A running private containerd.
#[derive(Debug)]
pub struct Containerd {
    child: std::process::Child,
    /// Its directory (root, state, sockets, logs, husk.toml).
    pub dir: PathBuf,
    /// The gRPC socket.
    pub socket: PathBuf,
    /// husk.toml for the shim (passed with --runtime-config-path).
    pub husk_toml: PathBuf,
    /// The shim's pod state directory (from husk.toml).
    pub pods: PathBuf,
    /// Where pod VM templates are kept (from husk.toml).
    pub templates: PathBuf,
    path_env: String,
    /// The network namespace containerd runs in (CRI tests).
    netns: Option<PathBuf>,
    artifacts: Artifacts,
    /// Ids of the containers `ctr run` was asked for (their shim sockets
    /// must be gone once they are).
    ids: Mutex<std::collections::BTreeSet<String>>,
}

impl Containerd {
    /// Starts containerd in `dir` with husk's binaries on its PATH;
    /// templates go to `templates`.
    pub fn start(artifacts: &Artifacts, dir: &Path, templates: &Path) -> Result<Self> {
        Self::start_with(artifacts, dir, templates, None)
    }

    /// Starts containerd with its CRI plugin inside `netns`: runtime
    /// handlers `runc` and `husk` (the latter the table of
    /// `deploy/containerd-husk.toml` as `install.sh` adds it, its settings
    /// path pointed at the test's husk.toml), a CNI
    /// bridge on 10.88.0.0/16 (plugins from `/usr/lib/cni`, IP leases under
    /// the test directory), network namespaces pinned under its state
    /// directory, and [`PAUSE_IMAGE`] as the sandbox image (imported by
    /// [`Self::import_test_image`]).
    pub fn start_cri(
        artifacts: &Artifacts,
        dir: &Path,
        templates: &Path,
        netns: &crate::netns::NetNs,
    ) -> Result<Self> {
        Self::start_with(artifacts, dir, templates, Some(netns))
    }

    fn start_with(
        artifacts: &Artifacts,
        dir: &Path,
        templates: &Path,
        netns: Option<&crate::netns::NetNs>,
    ) -> Result<Self> {
        let bin_dir = artifacts
            .vmm
            .parent()
            .context("husk-vmm has no directory")?
            .to_path_buf();
        let shim = bin_dir.join("containerd-shim-husk-v2");
        if !shim.exists() {
            bail!(
                "{} is missing (cargo build --workspace --bins)",
                shim.display()
            );
        }
        let socket = dir.join("containerd.sock");
        let pods = dir.join("pods");
        let config = dir.join("containerd.toml");
        let husk_toml = dir.join("husk.toml");
        let (disabled, cri) = match netns {
            None => (
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_string(),
                String::new(),
            ),
            Some(_) => (String::new(), cri_config(dir, &husk_toml)?),
        };
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{disabled}\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n{cri}",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
            ),
        )?;
        // HUSK_E2E_SERIAL=1 keeps each pod VM's console in its pod
        // directory (`serial.log`), for debugging a failing test.
        let serial = std::env::var_os("HUSK_E2E_SERIAL").is_some_and(|v| v == "1");
        std::fs::write(
            &husk_toml,
            format!(
                "kernel = \"{}\"\ninitramfs = \"{}\"\ntemplate_dir = \"{}\"\nstate_dir = \"{}\"\n\
                 kubelet_root = \"{}\"\nserial_console = {serial}\n",
                artifacts.kernel.display(),
                artifacts.initramfs.display(),
                templates.display(),
                pods.display(),
                dir.join("kubelet").display(),
            ),
        )?;
        let path_env = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let netns = netns.map(crate::netns::NetNs::path);
        let child = spawn_containerd(dir, &path_env, netns.as_deref())?;
        let c = Self {
            child,
            dir: dir.to_path_buf(),
            socket,
            husk_toml,
            pods,
            templates: templates.to_path_buf(),
            path_env,
            netns,
            artifacts: artifacts.clone(),
            ids: Mutex::default(),
        };
        c.wait_ready()?;
        Ok(c)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.ctr(&["version"]).is_ok_and(|o| o.status.success()) {
                if self.netns.is_some() {
                    self.check_cri_loaded()?;
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("containerd did not come up:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fails with containerd's reason if its CRI plugin did not load.
    fn check_cri_loaded(&self) -> Result<()> {
        let o = self.ctr_ok(&["plugins", "ls", "id==cri"])?;
        let text = String::from_utf8_lossy(&o.stdout);
        if !text
            .lines()
            .any(|l| l.contains("cri") && l.trim_end().ends_with("ok"))
        {
            let log = self.log();
            let why: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("io.containerd.grpc.v1.cri") && l.contains("error="))
                .map(str::trim)
                .collect();
            bail!(
                "containerd's CRI plugin did not load:\n{text}\n{}",
                why.join("\n")
            );
        }
        Ok(())
    }

    /// Stops containerd (SIGTERM, as a service manager does) and starts it
    /// again on the same root, state and sockets; the shims keep running.
    pub fn restart(&mut self) -> Result<()> {
        let pid = i32::try_from(self.child.id()).context("containerd pid")?;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.child.wait().context("waiting for containerd")?;
        self.child = spawn_containerd(&self.dir, &self.path_env, self.netns.as_deref())?;
        self.wait_ready()
    }

    /// The containerd namespace `ctr` works in: CRI's `k8s.io` under a CRI
    /// containerd, else [`NAMESPACE`].
    pub fn namespace(&self) -> &'static str {
        if self.netns.is_some() {
            CRI_NAMESPACE
        } else {
            NAMESPACE
        }
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// A `ctr` command against this containerd and namespace.
    pub fn ctr_command<S: AsRef<OsStr>>(&self, args: &[S]) -> std::process::Command {
        // `ctr run [flags] IMAGE ID ...`: remember ID.
        if args.first().is_some_and(|a| a.as_ref() == "run") {
            if let Some(i) = args.iter().position(|a| a.as_ref() == IMAGE) {
                if let Some(id) = args.get(i + 1) {
                    let id = id.as_ref().to_string_lossy().into_owned();
                    self.ids
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id);
                }
            }
        }
        let mut cmd = std::process::Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", self.namespace()])
            .args(args)
            .env("PATH", &self.path_env);
        cmd
    }

    /// Starts `ctr` with `stdin`, its stdout and stderr piped (for a `ctr
    /// run` whose output a test reads while it runs).
    pub fn spawn_ctr<S: AsRef<OsStr>>(
        &self,
        args: &[S],
        stdin: Stdio,
    ) -> Result<std::process::Child> {
        self.ctr_command(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ctr")
    }

    /// Runs `ctr` and returns its output.
    pub fn ctr<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        self.ctr_command(args)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")
    }

    /// Runs `ctr` and fails, with its stderr, unless it succeeds.
    pub fn ctr_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        let o = self.ctr(args)?;
        if !o.status.success() {
            let line: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
            bail!(
                "ctr {}: {}: {}",
                line.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(o)
    }

    /// The PATH containerd and ctr run with (husk's binaries first).
    pub fn path_env(&self) -> &str {
        &self.path_env
    }

    /// The shim processes serving this containerd (a shim stays until
    /// containerd shuts it down after its last container is deleted).
    pub fn shims(&self) -> Vec<u32> {
        crate::processes_mentioning(&self.socket.display().to_string())
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.starts_with("containerd-shim"))
            })
            .collect()
    }

    /// The pod directory the shim keeps for pod `id`.
    pub fn pod_dir(&self, id: &str) -> PathBuf {
        husk_shim::poddir::pod_dir(&self.pods, self.namespace(), id)
    }

    /// The pid of `what` ("vmm" or "virtiofsd") of pod `id`, from its pid
    /// file (waits up to 2 minutes for the shim to write it).
    pub fn pod_pid(&self, id: &str, what: &str) -> Result<i32> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let pids = std::fs::read_to_string(self.pod_dir(id).join("pids")).unwrap_or_default();
            if let Some(pid) = pids
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{what} ")))
                .and_then(|p| p.trim().parse().ok())
            {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!("no {what} pid for pod {id}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The status column of `ctr task ls` for task `id` (empty: no task).
    pub fn task_status(&self, id: &str) -> Result<String> {
        let o = self.ctr_ok(&["task", "ls"])?;
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2).map(String::from))
            .unwrap_or_default())
    }

    /// Waits until task `id` has status `want` (e.g. "RUNNING").
    pub fn wait_status(&self, id: &str, want: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while self.task_status(id)? != want {
            if Instant::now() > deadline {
                bail!("task {id} not {want} after {within:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// `ctr task kill -s KILL`, waits for the task to stop, then removes
    /// the task and the container.
    pub fn kill_and_remove(&self, id: &str) -> Result<()> {
        self.ctr_ok(&["task", "kill", "-s", "KILL", id])?;
        self.wait_status(id, "STOPPED", Duration::from_secs(60))?;
        self.ctr_ok(&["task", "rm", id])?;
        self.ctr_ok(&["container", "rm", id])?;
        Ok(())
    }

    /// Sets `key` in the shim's husk.toml to `value` (a TOML value, e.g.
    /// `"\"/x\""` or `250`): the key's line is replaced if there is one,
    /// else added. Pod VMs started afterwards see it.
    pub fn set_husk(&self, key: &str, value: &str) -> Result<()> {
        let text = std::fs::read_to_string(&self.husk_toml)?;
        let line = format!("{key} = {value}");
        let mut found = false;
        let mut lines: Vec<String> = text
            .lines()
            .map(|l| {
                if l.split('=').next().is_some_and(|k| k.trim() == key) {
                    found = true;
                    line.clone()
                } else {
                    l.to_string()
                }
            })
            .collect();
        if !found {
            lines.push(line);
        }
        std::fs::write(&self.husk_toml, lines.join("\n") + "\n")?;
        Ok(())
    }

    /// `ctr run --runtime husk` arguments (before the image and id).
    pub fn run_args(&self) -> Vec<String> {
        vec![
            "run".into(),
            "--runtime".into(),
            RUNTIME.into(),
            "--runtime-config-path".into(),
            self.husk_toml.display().to_string(),
        ]
    }

    /// Follows containerd's events (`ctr events`) from now on.
    pub fn events(&self) -> Result<Events> {
        let mut child = self
            .ctr_command(&["events"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("ctr events")?;
        let stdout = child.stdout.take().context("ctr events' stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        // The subscription is made once ctr is connected; give it a moment
        // so that nothing right after this call is missed.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Events { child, lines })
    }

    /// `ctr task metrics --format json`: the task's metrics as containerd
    /// decoded them.
    pub fn metrics(&self, id: &str) -> Result<serde_json::Value> {
        let o = self.ctr_ok(&["task", "metrics", "--format", "json", id])?;
        serde_json::from_slice(&o.stdout).with_context(|| {
            format!(
                "ctr task metrics printed no JSON: {}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
    }

    /// The ttrpc address of the shim serving task `id`, as containerd
    /// recorded it in the task's bundle.
    pub fn shim_address(&self, id: &str) -> Result<String> {
        let file = self
            .dir
            .join("state/io.containerd.runtime.v2.task")
            .join(self.namespace())
            .join(id)
            .join("address");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        Ok(text.trim().to_string())
    }

    /// The Task API's Update with OCI `LinuxResources` (JSON), sent to the
    /// task's shim the way containerd sends it (a JSON-typed Any). This
    /// `ctr` has no update command; a Kubernetes resize reaches the shim
    /// through the same call.
    pub fn update_resources(&self, id: &str, resources: &serde_json::Value) -> Result<()> {
        use containerd_shim_protos::{
            protobuf::well_known_types::any::Any, shim::shim::UpdateTaskRequest,
            shim_async::TaskClient, ttrpc,
        };
        let address = self.shim_address(id)?;
        let mut any = Any::new();
        any.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into();
        any.value = serde_json::to_vec(resources)?;
        let mut req = UpdateTaskRequest::new();
        req.id = id.into();
        req.resources = Some(any).into();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let client = ttrpc::r#async::Client::connect(&address)
                .with_context(|| format!("connecting to the shim at {address}"))?;
            TaskClient::new(client)
                .update(ttrpc::context::with_timeout(120_000_000_000), &req)
                .await
                .context("Update")?;
            Ok(())
        })
    }

    /// The socket containerd's shim for container `id` listens on:
    /// `/run/containerd/s/<sha256 of "<containerd socket>/<namespace>/<id>">`
    /// (the shim crate's `socket_address`; containerd fixes the directory).
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        let key = format!("{}/{}/{id}", self.socket.display(), self.namespace());
        Path::new("/run/containerd/s").join(format!("{:x}", Sha256::digest(key.as_bytes())))
    }

    /// What of any container is left now: processes (pod VMs, daemons,
    /// the template's builders), shims, their sockets, mounts, pod
    /// directories, containerd's bundle directories, and files in the
    /// template directory other than finished templates. Empty: nothing.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let pods_path = self.pods.display().to_string();
        let templates_path = self.templates.display().to_string();
        for pid in crate::processes_mentioning(&pods_path)
            .into_iter()
            .chain(crate::processes_mentioning(&templates_path))
        {
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            left.push(format!("process {pid}: {}", cmd.replace('\0', " ")));
        }
        left.extend(self.shims().into_iter().map(|p| format!("shim {p}")));
        for id in self.ids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let sock = self.shim_socket(id);
            if sock.exists() {
                left.push(format!("shim socket of {id}: {}", sock.display()));
            }
        }
        left.extend(
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&*pods_path))
                .map(|l| format!("mount {l}")),
        );
        let names = |dir: PathBuf| -> Vec<String> {
            std::fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        left.extend(
            names(husk_shim::poddir::namespace_dir(
                &self.pods,
                self.namespace(),
            ))
            .into_iter()
            .map(|p| format!("pod directory {p}")),
        );
        let bundles = self
            .dir
            .join("state/io.containerd.runtime.v2.task")
            .join(self.namespace());
        left.extend(
            names(bundles)
                .into_iter()
                .map(|b| format!("containerd bundle {b}")),
        );
        left.extend(
            names(self.templates.clone())
                .into_iter()
                .filter(|f| !f.ends_with(".snap"))
                .map(|f| format!("template directory file {f}")),
        );
        left
    }

    /// Waits (up to 30 s) until nothing of any container is left (see
    /// [`Self::leftovers`]) and containerd still answers, and checks that no
    /// shim's Shutdown timed out. Panics with what is wrong otherwise (for
    /// tests).
    pub fn assert_nothing_left(&self) {
        self.assert_nothing_left_within(Duration::from_secs(30));
    }

    /// Like [`Self::assert_nothing_left`], giving teardown `within`.
    pub fn assert_nothing_left_within(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "left behind:\n  {}\n{}",
                left.join("\n  "),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(self.ctr(&["version"]).is_ok_and(|o| o.status.success()));
        // Every shim shut its pod VM down within containerd's Shutdown
        // deadline (containerd logs this when a shim's Shutdown times out).
        let log = self.log();
        assert!(
            !log.contains("failed to shutdown shim task"),
            "a shim's Shutdown outlasted containerd's deadline:\n{log}"
        );
    }

    /// Builds the busybox test image and imports it as [`IMAGE`] (and the
    /// sandbox image [`PAUSE_IMAGE`]) into the namespace `ctr` uses.
    pub fn import_test_image(&self) -> Result<()> {
        let tar = build_image(&self.artifacts, &self.dir.join("image"))?;
        self.ctr_ok(&["images", "import", &tar.display().to_string()])?;
        Ok(())
    }
}

impl Drop for Containerd {
    /// Stops containerd and, when a test failed half-way, what it left
    /// running: shims and their pod VMs and daemons (a passing test has
    /// already checked that none are left).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pods = self.pods.display().to_string();
        for pid in self
            .shims()
            .into_iter()
            .chain(crate::processes_mentioning(&pods))
        {
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: kill(2) on a pid; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // Detach the root file systems and bind mounts the shims made, so
        // removing the test directory cannot reach through them.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&pods))
            .collect();
        points.reverse();
        for p in points {
            if let Ok(c) = std::ffi::CString::new(p) {
                // SAFETY: umount2(2) reads a NUL-terminated path that lives
                // across the call.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// containerd's events as `ctr events` prints them, one line each
/// ("TIME NAMESPACE TOPIC {event}").
#[derive(Debug)]
pub struct Events {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Events {
    /// How many event lines have arrived so far (a mark for
    /// [`Self::wait_for_since`]).
    pub fn mark(&self) -> usize {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The first event line so far, or arriving within `within`, that
    /// `matches`.
    pub fn wait_for(&self, matches: impl Fn(&str) -> bool, within: Duration) -> Result<String> {
        self.wait_for_since(0, matches, within)
    }

    /// Like [`Self::wait_for`], among the lines after `mark`.
    pub fn wait_for_since(
        &self,
        mark: usize,
        matches: impl Fn(&str) -> bool,
        within: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            {
                let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(l) = lines.iter().skip(mark).find(|l| matches(l)) {
                    return Ok(l.clone());
                }
                if Instant::now() > deadline {
                    bail!(
                        "no such event within {within:?}; events:\n{}",
                        lines.join("\n")
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts containerd with the configuration in `dir`, appending to its log,
/// inside network namespace `netns` if one is given.
fn spawn_containerd(
    dir: &Path,
    path_env: &str,
    netns: Option<&Path>,
) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))?;
    let mut cmd = std::process::Command::new("containerd");
    cmd.arg("--config")
        .arg(dir.join("containerd.toml"))
        .env("PATH", path_env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(netns) = netns {
        let fd =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only setns(2), which is async-signal-safe; `fd` is owned by
        // the closure and open across the fork.
        unsafe {
            cmd.pre_exec(move || crate::netns::enter(&fd).map_err(std::io::Error::other));
        }
    }
    cmd.spawn()
        .context("starting containerd (package containerd)")
}

/// The sandbox image of the CRI tests: `husk-testprog pause` as `/pause`,
/// no PATH in its environment (as Kubernetes' pause image).
pub const PAUSE_IMAGE: &str = "husk.test/pause:1";
/// The CNI network of the CRI tests.
pub const POD_SUBNET: &str = "10.88.0.0/16";

/// The CRI part of the test containerd's configuration (see
/// [`Containerd::start_cri`]); writes the CNI configuration.
fn cri_config(dir: &Path, husk_toml: &Path) -> Result<String> {
    let shipped = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/containerd-husk.toml"
    ));
    let table = std::fs::read_to_string(shipped)
        .with_context(|| format!("reading {}", shipped.display()))?;
    // As install.sh adds it: without the comment lines.
    let table: String = table
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let husk = table.replace(
        "\"/etc/husk/husk.toml\"",
        &format!("\"{}\"", husk_toml.display()),
    );
    if husk == table {
        bail!("{} no longer names /etc/husk/husk.toml", shipped.display());
    }
    let cni = dir.join("cni");
    std::fs::create_dir_all(cni.join("net.d"))?;
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "husk-e2e",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "promiscMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": cni.join("ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    });
    std::fs::write(
        cni.join("net.d/10-husk-e2e.conflist"),
        serde_json::to_vec_pretty(&conflist)?,
    )?;
    Ok(format!(
        "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
         \x20 sandbox_image = \"{PAUSE_IMAGE}\"\n\
         \x20 restrict_oom_score_adj = true\n\
         \x20 netns_mounts_under_state_dir = true\n\
         \x20 stream_server_address = \"127.0.0.1\"\n\
         \x20 stream_server_port = \"10010\"\n\
         \x20 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
         \x20   bin_dir = \"/usr/lib/cni\"\n\
         \x20   conf_dir = \"{conf}\"\n\
         \x20 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
         \x20   default_runtime_name = \"runc\"\n\
         \x20   [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
         \x20     runtime_type = \"io.containerd.runc.v2\"\n{husk}",
        conf = cni.join("net.d").display(),
    ))
}

fn blob(dir: &Path, data: &[u8]) -> Result<(String, usize)> {
    let digest = format!("{:x}", Sha256::digest(data));
    std::fs::write(dir.join("blobs/sha256").join(&digest), data)?;
    Ok((format!("sha256:{digest}"), data.len()))
}

/// The static `husk-testprog` (built by `make agent` beside the agent):
/// `HUSK_TESTPROG`, else found from husk-vmm's target directory.
pub fn testprog(artifacts: &Artifacts) -> Result<PathBuf> {
    let p = match std::env::var_os("HUSK_TESTPROG") {
        Some(p) => PathBuf::from(p),
        None => artifacts
            .vmm
            .parent()
            .and_then(Path::parent)
            .context("husk-vmm is not in a target directory")?
            .join("x86_64-unknown-linux-gnu/agent/husk-testprog"),
    };
    if !p.exists() {
        bail!("{} is missing (run `make agent`)", p.display());
    }
    Ok(p)
}

/// Writes an OCI image layout tarball of a busybox root file system with
/// `husk-testprog` in /bin, in `dir`, as [`IMAGE`] and [`PAUSE_IMAGE`];
/// returns its path.
pub fn build_image(artifacts: &Artifacts, dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs)?;
    std::fs::copy(testprog(artifacts)?, rootfs.join("bin/husk-testprog"))
        .context("copying husk-testprog into the image")?;
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    let layer = dir.join("layer.tar");
    let status = std::process::Command::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
        ])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar failed: {status}");
    }
    let layer_bytes = std::fs::read(&layer)?;
    std::fs::remove_file(&layer)?;
    let (layer_digest, layer_size) = blob(dir, &layer_bytes)?;
    // Two images on the one layer: the busybox test image, and the pause
    // image (as Kubernetes' own: an entrypoint and no environment).
    let mut manifests = Vec::new();
    for (name, config) in [
        (
            IMAGE,
            serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}),
        ),
        (
            PAUSE_IMAGE,
            serde_json::json!({"Entrypoint": ["/bin/husk-testprog", "pause"]}),
        ),
    ] {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        });
        let (config_digest, config_size) = blob(dir, &serde_json::to_vec(&config)?)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
        });
        let (manifest_digest, manifest_size) = blob(dir, &serde_json::to_vec(&manifest)?)?;
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": name},
        }));
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let tar = dir.join("image.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(&tar)
        .args(["oci-layout", "index.json", "blobs"])
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar failed: {status}");
    }
    Ok(tar)
}
