//! Helpers shared by husk's end-to-end tests, the demo and the boot
//! benchmark: finding the built artifacts, running `husk-vmm` as a real
//! process in a private directory, waiting for the agent's readiness, and
//! checking that nothing is left behind.
//!
//! Nothing here is a test double: the VMM, the guest kernel and the agent
//! are the real ones.

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

pub mod containerd;
pub mod cri;
pub mod hostcgroup;
pub mod hostmem;
pub mod netns;
pub mod stream;

use anyhow::{bail, Context, Result};
use husk_protocols::{hybrid_vsock::port_socket_path, parse_ready_line, READY_VSOCK_PORT};
use tokio::{
    io::AsyncReadExt,
    net::UnixListener,
    process::{Child, Command},
};

/// Where the built pieces are.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The `husk-vmm` binary.
    pub vmm: PathBuf,
    /// The `husk-virtiofsd` binary (next to husk-vmm).
    pub virtiofsd: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs.
    pub initramfs: PathBuf,
}

impl Artifacts {
    /// The profiling flavour of the guest kernel (frame pointers), which
    /// `make kernel-profiling` installs beside the default one; fails with
    /// that command when it is missing.
    pub fn profiling_kernel(&self) -> Result<PathBuf> {
        let k = self
            .kernel
            .parent()
            .unwrap_or(Path::new("/"))
            .join("profiling/vmlinux");
        if !k.exists() {
            bail!(
                "profiling guest kernel not found at {} (run `make kernel-profiling` first)",
                k.display()
            );
        }
        Ok(k)
    }
}

impl Artifacts {
    /// Finds the artifacts: `HUSK_VMM` or `husk-vmm` next to this
    /// executable's target directory; the guest image in `HUSK_GUEST_DIR`
    /// or `/var/lib/husk/guest`. Fails with the command that builds what is
    /// missing.
    pub fn locate() -> Result<Self> {
        let vmm = match std::env::var_os("HUSK_VMM") {
            Some(p) => PathBuf::from(p),
            None => {
                let exe = std::env::current_exe()?;
                // target/<profile>/deps/<test> or target/<profile>/<bin>
                let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
                if dir.ends_with("deps") {
                    dir.pop();
                }
                dir.join("husk-vmm")
            }
        };
        let guest = std::env::var_os("HUSK_GUEST_DIR")
            .map_or_else(|| PathBuf::from("/var/lib/husk/guest"), PathBuf::from);
        let a = Self {
            virtiofsd: vmm.with_file_name("husk-virtiofsd"),
            vmm,
            kernel: guest.join("vmlinux"),
            initramfs: guest.join("initramfs.cpio"),
        };
        for (what, p) in [
            ("husk-vmm", &a.vmm),
            ("guest kernel", &a.kernel),
            ("guest initramfs", &a.initramfs),
        ] {
            if !p.exists() {
                bail!(
                    "{what} not found at {} (run `make build` first)",
                    p.display()
                );
            }
        }
        Ok(a)
    }
}

/// Fails loudly when KVM is missing: these tests must never pass by
/// skipping.
pub fn require_kvm() {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert!(
        ok,
        "/dev/kvm is missing or not accessible: the end-to-end tests need KVM and do not skip"
    );
}

/// A private directory removed on drop.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// A fresh directory under /tmp named after `tag`.
    pub fn new(tag: &str) -> Result<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "husk-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the entries left in the directory.
    pub fn entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.path)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// How to run a VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest memory (MiB).
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Keep the serial console in `serial.log`.
    pub serial: bool,
    /// Extra kernel command line.
    pub cmdline: String,
    /// Extra husk-vmm arguments.
    pub vmm_args: Vec<String>,
    /// Listen for the agent's readiness announcement (a cold boot makes
    /// one; a restored guest made it before its snapshot).
    pub await_ready: bool,
}

impl VmOptions {
    /// Options for a VM restored from `snapshot` (no cold-boot fallback, no
    /// readiness announcement to wait for).
    pub fn restored_from(snapshot: &Path) -> Self {
        Self {
            vmm_args: vec![
                "--restore-from".into(),
                snapshot.display().to_string(),
                "--no-cold-boot-fallback".into(),
            ],
            await_ready: false,
            ..Self::default()
        }
    }
}

/// Makes a template snapshot of the default guest with one boot
/// (`husk-vmm --make-template`), with the devices every pod has (vsock and
/// virtio-fs, served by a daemon of its own); returns its path in `dir`.
/// Nothing but the template is left in `dir`.
pub async fn make_template(artifacts: &Artifacts, dir: &Path, mem_mib: u64) -> Result<PathBuf> {
    let template = dir.join("template.snap");
    let fs_dir = dir.join("template-fs");
    std::fs::create_dir_all(&fs_dir)?;
    let mut fs = FsDaemon::spawn(artifacts, &fs_dir).await?;
    let out = Command::new(&artifacts.vmm)
        .arg("--kernel")
        .arg(&artifacts.kernel)
        .arg("--initramfs")
        .arg(&artifacts.initramfs)
        .args(["--mem-mib", &mem_mib.to_string()])
        .arg("--vsock-uds")
        .arg(dir.join("t.sock"))
        .args(fs.vmm_args())
        .arg("--make-template")
        .arg(&template)
        .kill_on_drop(true)
        .output()
        .await
        .context("running husk-vmm --make-template")?;
    let daemon = fs.wait_exit(Duration::from_secs(10)).await;
    std::fs::remove_dir(&fs.shared)?;
    std::fs::remove_dir(&fs_dir)?;
    if !out.status.success() || !template.exists() {
        bail!(
            "making the template failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let daemon = daemon?;
    if !daemon.success() {
        bail!("the template's virtio-fs daemon failed: {daemon}");
    }
    Ok(template)
}

/// A `<field>: N kB` value from a /proc file of `pid` (status, smaps_rollup).
pub fn proc_kib(pid: u32, file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(kib_value)
}

/// A capability set of process `pid` as /proc/<pid>/status shows it
/// (`field`: CapEff, CapPrm, CapInh, CapBnd or CapAmb).
pub fn proc_caps(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hex = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Bytes a program wrote, as text (invalid UTF-8 replaced).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A finished command for an assertion message: its status, the first
/// 2,000 characters of stdout and all of stderr.
pub fn describe(o: &std::process::Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        text(&o.stdout).chars().take(2000).collect::<String>(),
        text(&o.stderr)
    )
}

/// A /proc size value ("  1234 kB") in KiB.
pub fn kib_value(v: &str) -> Option<u64> {
    v.trim().trim_end_matches("kB").trim().parse().ok()
}

/// `pid` and all its descendants (from /proc's parent links).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and parens.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            mem_mib: 128,
            vcpus: 1,
            serial: false,
            cmdline: String::new(),
            vmm_args: Vec::new(),
            await_ready: true,
        }
    }
}

/// A running `husk-vmm` with a vsock device and an API socket in `dir`.
#[derive(Debug)]
pub struct VmProcess {
    child: Child,
    /// The VM's directory (sockets, logs).
    pub dir: PathBuf,
    /// The hybrid vsock socket.
    pub vsock: PathBuf,
    /// The control API socket.
    pub api: PathBuf,
    /// The serial log, if kept.
    pub serial: Option<PathBuf>,
    /// The VMM's stderr.
    pub log: PathBuf,
    ready: Option<UnixListener>,
    ready_path: PathBuf,
    /// When the process was started.
    pub started: Instant,
}

/// What the agent said when it became ready.
#[derive(Debug, Clone)]
pub struct Ready {
    /// Time from starting husk-vmm to the readiness line.
    pub elapsed: Duration,
    /// The agent's version.
    pub agent_version: String,
    /// The agent API version.
    pub api_version: u32,
}

impl VmProcess {
    /// Starts a VM. The readiness socket is bound first, so the agent's
    /// announcement cannot be missed.
    pub fn spawn(artifacts: &Artifacts, dir: &Path, opts: &VmOptions) -> Result<Self> {
        let vsock = dir.join("vsock.sock");
        let api = dir.join("api.sock");
        let log = dir.join("vmm.log");
        let ready_path = port_socket_path(&vsock, READY_VSOCK_PORT);
        let ready = if opts.await_ready {
            Some(
                UnixListener::bind(&ready_path)
                    .with_context(|| format!("binding {}", ready_path.display()))?,
            )
        } else {
            None
        };
        let serial = opts.serial.then(|| dir.join("serial.log"));
        let mut cmd = Command::new(&artifacts.vmm);
        cmd.arg("--kernel")
            .arg(&artifacts.kernel)
            .arg("--initramfs")
            .arg(&artifacts.initramfs)
            .arg("--mem-mib")
            .arg(opts.mem_mib.to_string())
            .arg("--vcpus")
            .arg(opts.vcpus.to_string())
            .arg("--vsock-uds")
            .arg(&vsock)
            .arg("--api-socket")
            .arg(&api)
            .arg("--cmdline")
            .arg(&opts.cmdline);
        if let Some(s) = &serial {
            cmd.arg("--serial-log").arg(s);
        }
        cmd.args(&opts.vmm_args);
        let log_file = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", artifacts.vmm.display()))?;
        Ok(Self {
            child,
            dir: dir.to_path_buf(),
            vsock,
            api,
            serial,
            log,
            ready,
            ready_path,
            started,
        })
    }

    /// The VMM's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The VMM's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log).unwrap_or_default();
        if let Some(serial) = &self.serial {
            let console = std::fs::read_to_string(serial).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(30).collect();
            s.push_str("\n--- serial console (last lines) ---\n");
            for l in tail.iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Waits for the agent's readiness line.
    pub async fn wait_ready(&mut self, within: Duration) -> Result<Ready> {
        let listener = self.ready.take().context("readiness already consumed")?;
        let accept = async {
            let (mut stream, _) = listener.accept().await?;
            let mut line = String::new();
            stream.read_to_string(&mut line).await?;
            anyhow::Ok(line)
        };
        let exited = async {
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let line = tokio::select! {
            r = tokio::time::timeout(within, accept) => r.map_err(|_| anyhow::anyhow!("no readiness within {within:?}"))??,
            status = exited => bail!("husk-vmm exited ({status}) before the agent was ready"),
        };
        let elapsed = self.started.elapsed();
        let _ = std::fs::remove_file(&self.ready_path);
        let (version, api) =
            parse_ready_line(&line).with_context(|| format!("bad readiness line {line:?}"))?;
        Ok(Ready {
            elapsed,
            agent_version: version.to_string(),
            api_version: api,
        })
    }

    /// Waits for the VMM to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .map_err(|_| anyhow::anyhow!("husk-vmm still running after {within:?}"))?
            .context("waiting for husk-vmm")
    }

    /// Peak resident memory of the VMM process (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        proc_kib(self.pid()?, "status", "VmHWM")
    }

    /// Sends one request to the control API; returns the response line.
    pub async fn api(&self, request: &str) -> Result<String> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let mut s = tokio::net::UnixStream::connect(&self.api).await?;
        s.write_all(request.as_bytes()).await?;
        s.write_all(b"\n").await?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).await?;
        Ok(line)
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.ready_path);
    }
}

/// A real `husk-virtiofsd` serving `<dir>/shared` on `<dir>/fs.sock`
/// (killed if dropped while running).
#[derive(Debug)]
pub struct FsDaemon {
    child: Child,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// The directory it serves.
    pub shared: PathBuf,
}

impl FsDaemon {
    /// Starts the daemon and waits until it listens.
    pub async fn spawn(artifacts: &Artifacts, dir: &Path) -> Result<Self> {
        let shared = dir.join("shared");
        let socket = dir.join("fs.sock");
        std::fs::create_dir_all(&shared)?;
        let child = Command::new(&artifacts.virtiofsd)
            .arg("--socket")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&shared)
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", artifacts.virtiofsd.display()))?;
        let mut daemon = Self {
            child,
            socket,
            shared,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !daemon.socket.exists() {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("husk-virtiofsd exited before listening: {status}");
            }
            if Instant::now() > deadline {
                bail!("husk-virtiofsd did not listen within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(daemon)
    }

    /// husk-vmm arguments that attach this daemon.
    pub fn vmm_args(&self) -> Vec<String> {
        vec!["--fs-socket".into(), self.socket.display().to_string()]
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the daemon to exit (it does when its VMM goes away).
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .context("husk-virtiofsd did not exit")?
            .context("waiting for husk-virtiofsd")
    }
}

/// Applets the test root file systems link to busybox.
const APPLETS: &[&str] = &[
    "sh",
    "echo",
    "cat",
    "sleep",
    "true",
    "false",
    "ls",
    "id",
    "wc",
    "head",
    "sha256sum",
    "dd",
    "env",
    "pwd",
    "hostname",
    "stty",
    "tr",
    "kill",
    "ps",
    "mkdir",
    "rm",
    "touch",
    "seq",
    "yes",
    "uname",
    "free",
    "grep",
    "nproc",
    "mount",
    "cut",
];

/// Makes a minimal root file system in `rootfs`: Debian's busybox-static
/// as /bin/busybox with links for common applets, and the usual top-level
/// directories.
pub fn busybox_rootfs(rootfs: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin)?;
    for d in ["proc", "sys", "dev", "tmp", "etc", "root", "run"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy(busybox, bin.join("busybox"))
        .with_context(|| format!("copying {} (package busybox-static)", busybox.display()))?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/tmp:/bin/sh\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\napp:x:1000:\n")?;
    Ok(())
}

/// Checks the pod's shared directory through the agent: mounts virtio-fs
/// (tag `husk`) at /run/husk/shared, the guest reads a file the host wrote
/// and writes one the host reads (byte-equal), and paths outside /run/husk
/// are refused. Removes its files afterwards.
pub async fn shared_directory_round_trip(
    client: &husk_protocols::agent_ttrpc::AgentClient,
    vsock: &Path,
    shared: &Path,
) -> Result<()> {
    use husk_protocols::{
        agent::{stream_check_request::Direction, MountSharedRequest, StreamCheckRequest},
        hybrid_vsock, pattern,
    };
    use tokio::io::AsyncWriteExt;
    let ctx = || ttrpc::context::with_timeout(120_000_000_000);

    let mut mount = MountSharedRequest::new();
    mount.tag = "husk".into();
    mount.target = "/run/husk/shared".into();
    client
        .mount_shared(ctx(), &mount)
        .await
        .context("MountShared")?;
    let mut bad = MountSharedRequest::new();
    bad.tag = "husk".into();
    bad.target = "/etc".into();
    refused_as_outside(client.mount_shared(ctx(), &bad).await, "/etc")?;

    // The guest reads a host file.
    let host_text = b"written on the host\n".repeat(1000);
    std::fs::write(shared.join("from-host.txt"), &host_text)?;
    let port = 6201;
    let path = port_socket_path(vsock, port);
    let listener = UnixListener::bind(&path)?;
    let mut req = StreamCheckRequest::new();
    req.direction = Direction::FROM_GUEST.into();
    req.port = port;
    req.path = "/run/husk/shared/from-host.txt".into();
    let (resp, got) = tokio::join!(client.stream_check(ctx(), &req), async {
        let (mut s, _) = listener.accept().await?;
        let mut v = Vec::new();
        s.read_to_end(&mut v).await?;
        Ok::<_, std::io::Error>(v)
    });
    let _ = std::fs::remove_file(&path);
    let resp = resp.context("StreamCheck from a shared file")?;
    let got = got?;
    if resp.bytes != host_text.len() as u64 || got != host_text {
        bail!(
            "the guest read {} bytes of the host's {}-byte file, {} arrived intact",
            resp.bytes,
            host_text.len(),
            if got == host_text { "they" } else { "not" }
        );
    }

    // The guest writes a file the host reads.
    let mut data = vec![0u8; 1 << 20];
    pattern::fill(&mut data, 31);
    let port = 6202;
    let mut req = StreamCheckRequest::new();
    req.direction = Direction::TO_GUEST.into();
    req.port = port;
    req.path = "/run/husk/shared/from-guest.bin".into();
    let (resp, sent) = tokio::join!(client.stream_check(ctx(), &req), async {
        let mut s = hybrid_vsock::connect_retry(vsock, port, Duration::from_secs(30)).await?;
        s.write_all(&data).await?;
        s.shutdown().await?;
        Ok::<_, anyhow::Error>(())
    });
    sent?;
    let resp = resp.context("StreamCheck into a shared file")?;
    if resp.bytes != data.len() as u64 {
        bail!("the guest wrote {} of {} bytes", resp.bytes, data.len());
    }
    if std::fs::read(shared.join("from-guest.bin"))? != data {
        bail!("the host read something else than the guest wrote");
    }

    // A path that climbs out: refused as such, while a host listener
    // waits on the port, so nothing else could make the request fail.
    let port = 6203;
    let path = port_socket_path(vsock, port);
    let listener = UnixListener::bind(&path)?;
    let mut outside = StreamCheckRequest::new();
    outside.direction = Direction::FROM_GUEST.into();
    outside.port = port;
    outside.path = "/run/husk/../../etc/os-release".into();
    let refused = client.stream_check(ctx(), &outside).await;
    drop(listener);
    let _ = std::fs::remove_file(&path);
    refused_as_outside(refused, "/run/husk/../../etc/os-release")?;
    std::fs::remove_file(shared.join("from-host.txt"))?;
    std::fs::remove_file(shared.join("from-guest.bin"))?;
    Ok(())
}

/// Checks that an agent call was refused because `path` is not under
/// /run/husk/ (INVALID_ARGUMENT, naming the path), not for any other reason.
pub fn refused_as_outside<T: std::fmt::Debug>(result: ttrpc::Result<T>, path: &str) -> Result<()> {
    let want = format!("{path:?} is not a path under /run/husk/");
    match result {
        Err(ttrpc::Error::RpcStatus(s))
            if s.code() == ttrpc::Code::INVALID_ARGUMENT && s.message.contains(&want) =>
        {
            Ok(())
        }
        other => bail!("{path}: expected the refusal {want:?}, got {other:?}"),
    }
}

/// Processes whose command line mentions `needle` (to check nothing of a
/// test is left running).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// `a / b` for the benchmarks' husk/peer ratios; 0 when `b` is not
/// positive.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Median of `v` (sorted in place); 0 when empty.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn test_dir_is_removed() {
        let d = TestDir::new("unit").expect("dir");
        let p = d.path().to_path_buf();
        std::fs::write(p.join("x"), b"1").expect("write");
        assert_eq!(d.entries(), vec!["x".to_string()]);
        drop(d);
        assert!(!p.exists());
    }
}
