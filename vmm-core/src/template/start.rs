//! Template start: the template snapshot for a VM, made first (one boot of
//! a template VM) if there is none yet.
//!
//! Concurrent starts of the same VM shape serialize on a lock file next to
//! the template, so each template is built once. The template VM is a
//! `husk-vmm --make-template` child with the same kernel, initramfs,
//! command line, shape and devices as the VMs that will restore it (the
//! template key says which), but its own vsock socket, a placeholder MAC on
//! an uncabled network card, and a virtio-fs daemon of its own serving an
//! empty directory the template guest never mounts.
//!
//! Templates are never edited, only replaced: a new guest image, husk
//! version or VM shape names a new one, and the old one would stay on disk
//! for ever (about 22 MB each). So every start marks its template as used
//! (its modification time), and starts remove templates that no VM has
//! started from for [`UNUSED_FOR`], then the least recently used beyond
//! the [`Retention`] caps on their number and bytes (pods that vary their
//! limits make new shapes; the directory must not grow with them).
//! Removing one is safe at any time: a restore copies the template into
//! the VM's own memory and keeps nothing of the file; a start that loses
//! the race to a removal boots cold.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant, SystemTime},
};

use crate::{arch::cpuid::CpuProfile, VmConfig};

/// The MAC of a template VM's network device (locally administered); each
/// restored VM's agent sets its own.
pub const TEMPLATE_MAC: &str = "02:68:75:73:6b:00";

/// Templates no VM has started from for this long are removed.
pub const UNUSED_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a template directory keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Templates unused this long go.
    pub unused_for: Duration,
    /// The most templates kept (the least recently used go first).
    pub max_count: usize,
    /// The most bytes of templates kept.
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            unused_for: UNUSED_FOR,
            max_count: 16,
            max_bytes: 4 << 30,
        }
    }
}

/// Errors finding or making a template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// Template start needs the agent's vsock device.
    #[error("template start needs a vsock device (--vsock-uds)")]
    NoVsock,
    /// A file system operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The template VM's virtio-fs daemon did not serve.
    #[error("the template's virtio-fs daemon {0}")]
    Daemon(String),
    /// The template VM did not write the template.
    #[error("making the template {} failed ({status})", path.display())]
    Failed {
        /// The template that was to be written.
        path: PathBuf,
        /// How the template VM ended.
        status: String,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Io { what, path, source }
}

/// The programs a template VM runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `husk-vmm`.
    pub vmm: PathBuf,
    /// `husk-virtiofsd` (for a VM with a virtio-fs device).
    pub virtiofsd: PathBuf,
}

/// The template for `config` in `dir`, made first if it does not exist.
pub fn ensure(
    config: &VmConfig,
    dir: &Path,
    bins: &Binaries,
    keep: &Retention,
) -> Result<PathBuf, TemplateError> {
    let uds = config.vsock.as_ref().ok_or(TemplateError::NoVsock)?;
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let key = super::key(config, CpuProfile::detect()).map_err(io(
        "reading the guest image to name its template",
        &config.kernel,
    ))?;
    let path = dir.join(format!("{key}.snap"));
    if mark_used(&path) {
        prune(dir, keep, &path);
        return Ok(path);
    }
    let lock_path = dir.join(format!("{key}.lock"));
    let lock = std::fs::File::create(&lock_path).map_err(io("creating", &lock_path))?;
    // SAFETY: flock on a descriptor this function owns; the result is
    // checked. The lock goes with the descriptor when `lock` drops.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io("locking", &lock_path)(std::io::Error::last_os_error()));
    }
    if path.exists() {
        return Ok(path);
    }
    tracing::info!(template = %path.display(), "no template for this VM yet: booting once to make it");
    let build_uds = uds.uds_path.with_extension("template.sock");
    let mut cmd = Command::new(&bins.vmm);
    cmd.args(template_args(config, &path, &build_uds));
    let fs_daemon = match &config.fs {
        Some(fs) => {
            let daemon = TemplateFsDaemon::start(&bins.virtiofsd, dir, &key)?;
            cmd.arg("--fs-socket")
                .arg(&daemon.socket)
                .args(["--fs-tag", &fs.tag]);
            Some(daemon)
        }
        None => None,
    };
    let status = cmd.status();
    if let Some(daemon) = fs_daemon {
        daemon.finish();
    }
    let status = status.map_err(io("starting the template VM", &bins.vmm))?;
    let _ = std::fs::remove_file(&lock_path);
    if !status.success() || !path.exists() {
        return Err(TemplateError::Failed {
            path,
            status: status.to_string(),
        });
    }
    prune(dir, keep, &path);
    Ok(path)
}

/// Records that a VM starts from template `path` now; false if there is
/// no such template.
fn mark_used(path: &Path) -> bool {
    match std::fs::File::options().write(true).open(path) {
        Ok(f) => {
            if let Err(e) = f.set_modified(SystemTime::now()) {
                tracing::warn!(template = %path.display(), "marking the template used: {e}");
            }
            true
        }
        Err(_) => false,
    }
}

/// Removes the templates in `dir` that no VM has started from for
/// `keep.unused_for`, then the least recently used ones beyond
/// `keep.max_count` and `keep.max_bytes`, never `current` (the one a VM
/// starts from now); returns how many it removed. Failures are logged, not
/// returned: a template left behind costs disk space, not a VM start.
pub fn prune(dir: &Path, keep: &Retention, current: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    // (last used, bytes, path), the current template first.
    let mut templates: Vec<(SystemTime, u64, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "snap"))
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            let used = if p == current {
                now
            } else {
                m.modified().ok()?
            };
            Some((used, m.len(), p))
        })
        .collect();
    templates.sort_by_key(|t| std::cmp::Reverse(t.0));
    let mut removed = 0;
    let mut count = 0;
    let mut bytes = 0u64;
    for (used, len, path) in templates {
        let idle = now.duration_since(used).unwrap_or_default();
        let why = if path == current {
            None
        } else if idle > keep.unused_for {
            Some(format!("unused for {} days", idle.as_secs() / 86_400))
        } else if count >= keep.max_count || bytes.saturating_add(len) > keep.max_bytes {
            Some(format!(
                "least recently used beyond {} templates / {} MiB",
                keep.max_count,
                keep.max_bytes >> 20
            ))
        } else {
            None
        };
        match why {
            None => {
                count += 1;
                bytes = bytes.saturating_add(len);
            }
            Some(why) => match std::fs::remove_file(&path) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(template = %path.display(), "removed a template: {why}");
                }
                Err(e) => {
                    tracing::warn!(template = %path.display(), "removing a template ({why}): {e}")
                }
            },
        }
    }
    removed
}

/// The `husk-vmm` arguments of the VM that makes the template `out` for
/// `config` (all but its virtio-fs daemon's socket), its vsock socket at
/// `uds`.
pub fn template_args(config: &VmConfig, out: &Path, uds: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = Vec::new();
    let mut push = |k: &str, v: &std::ffi::OsStr| {
        a.push(k.into());
        a.push(v.to_os_string());
    };
    push("--kernel", config.kernel.as_os_str());
    match &config.initramfs {
        Some(i) => push("--initramfs", i.as_os_str()),
        None => push("--initramfs", "none".as_ref()),
    }
    push("--vcpus", config.vcpus.to_string().as_ref());
    push("--mem-mib", config.mem_mib.to_string().as_ref());
    push("--cmdline", config.extra_cmdline.as_ref());
    push("--vsock-uds", uds.as_os_str());
    push("--make-template", out.as_os_str());
    push("--log", "warn".as_ref());
    // No tap: each restored VM brings its own, and its agent sets the MAC
    // and MTU.
    if let Some(net) = &config.net {
        push(
            "--net",
            format!("mac={TEMPLATE_MAC},mtu={}", net.mtu).as_ref(),
        );
    }
    if let Some(balloon) = &config.balloon {
        push("--balloon", balloon.to_arg().as_ref());
    }
    if let Some(serial) = &config.serial_log {
        push(
            "--serial-log",
            serial.with_extension("template.log").as_os_str(),
        );
    }
    a
}

/// The virtio-fs daemon of a template VM, with its empty shared directory.
struct TemplateFsDaemon {
    child: Child,
    socket: PathBuf,
    share: PathBuf,
}

impl TemplateFsDaemon {
    /// How long the daemon may take to listen, and to leave after its VMM.
    const WAIT: Duration = Duration::from_secs(10);

    fn start(binary: &Path, dir: &Path, key: &str) -> Result<Self, TemplateError> {
        let share = dir.join(format!("{key}.share"));
        let socket = dir.join(format!("{key}.fs.sock"));
        let _ = std::fs::remove_file(&socket);
        std::fs::create_dir_all(&share).map_err(io("creating", &share))?;
        let child = Command::new(binary)
            .arg("--socket")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&share)
            .args(["--log", "warn"])
            .spawn()
            .map_err(io("starting", binary))?;
        let mut daemon = Self {
            child,
            socket,
            share,
        };
        let deadline = Instant::now() + Self::WAIT;
        while !daemon.socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                daemon.finish();
                return Err(TemplateError::Daemon(format!("exited: {status}")));
            }
            if Instant::now() > deadline {
                daemon.finish();
                return Err(TemplateError::Daemon(format!(
                    "did not listen within {:?}",
                    Self::WAIT
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }

    /// Waits for the daemon to leave (it does when its VMM is gone), kills
    /// it if it does not, and removes its socket and directory.
    fn finish(mut self) {
        let deadline = Instant::now() + Self::WAIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    tracing::warn!("the template's virtio-fs daemon did not exit; killing it");
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir(&self.share);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BalloonConfig, NetConfig, VsockConfig};

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"kernel").expect("kernel");
        VmConfig {
            kernel,
            initramfs: None,
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: dir.join("v.sock"),
            }),
            net: Some(NetConfig::parse("mac=02:00:00:00:00:09,mtu=1400").expect("net")),
            balloon: Some(BalloonConfig::default()),
            ..VmConfig::with_defaults()
        }
    }

    #[test]
    fn the_template_vm_has_the_same_shape_and_devices_but_its_own_identity() {
        let dir = tempfile::tempdir().expect("dir");
        let c = config(dir.path());
        let args: Vec<String> = template_args(&c, Path::new("/t/x.snap"), Path::new("/t/v.sock"))
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        for want in [
            "--initramfs none",
            "--vcpus 1",
            "--mem-mib 128",
            "--vsock-uds /t/v.sock",
            "--make-template /t/x.snap",
            &format!("--net mac={TEMPLATE_MAC},mtu=1400"),
            &format!("--balloon {}", BalloonConfig::default().to_arg()),
        ] {
            assert!(joined.contains(want), "{want:?} in {joined}");
        }
        assert!(
            !joined.contains("02:00:00:00:00:09"),
            "not the VM's own MAC"
        );
    }

    #[test]
    fn an_existing_template_is_used_without_booting() {
        let dir = tempfile::tempdir().expect("dir");
        let c = config(dir.path());
        let key = super::super::key(&c, CpuProfile::detect()).expect("key");
        let templates = dir.path().join("templates");
        std::fs::create_dir(&templates).expect("mkdir");
        let snap = templates.join(format!("{key}.snap"));
        std::fs::write(&snap, b"template").expect("write");
        // A VMM binary that cannot run: nothing may be started.
        let bins = Binaries {
            vmm: dir.path().join("no-such-vmm"),
            virtiofsd: dir.path().join("no-such-virtiofsd"),
        };
        let old = SystemTime::now() - 2 * UNUSED_FOR;
        let set_mtime = |p: &Path, t: SystemTime| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .expect("open")
                .set_modified(t)
                .expect("mtime");
        };
        set_mtime(&snap, old);
        let stale = templates.join("0123456789abcdef01234567.snap");
        std::fs::write(&stale, b"another image's template").expect("write");
        set_mtime(&stale, old);
        let other = templates.join("notes.txt");
        std::fs::write(&other, b"not a template").expect("write");
        set_mtime(&other, old);

        let keep = Retention::default();
        assert_eq!(ensure(&c, &templates, &bins, &keep).expect("ensure"), snap);
        // Used now: kept, and marked; the stale one is gone, other files stay.
        let used = std::fs::metadata(&snap)
            .expect("kept")
            .modified()
            .expect("mtime");
        assert!(used > old + UNUSED_FOR, "the start marks its template used");
        assert!(
            !stale.exists(),
            "a template unused for two weeks is removed"
        );
        assert!(other.exists(), "only templates are removed");
        assert_eq!(prune(&templates, &keep, &snap), 0);
        let failed = ensure(
            &VmConfig {
                mem_mib: 256,
                ..c.clone()
            },
            &templates,
            &bins,
            &keep,
        )
        .expect_err("another shape has no template and the VMM cannot start");
        assert!(
            failed.to_string().contains("starting the template VM"),
            "{failed}"
        );
        assert!(matches!(
            ensure(&VmConfig { vsock: None, ..c }, &templates, &bins, &keep),
            Err(TemplateError::NoVsock)
        ));
    }

    #[test]
    fn the_least_recently_used_templates_go_beyond_the_caps() {
        let dir = tempfile::tempdir().expect("dir");
        let now = SystemTime::now();
        let make = |name: &str, len: usize, age_s: u64| {
            let p = dir.path().join(format!("{name}.snap"));
            std::fs::write(&p, vec![0u8; len]).expect("write");
            std::fs::File::options()
                .write(true)
                .open(&p)
                .expect("open")
                .set_modified(now - Duration::from_secs(age_s))
                .expect("mtime");
            p
        };
        // Six templates, used 1..6 minutes ago; "f" (the oldest) is the
        // one a VM starts from now.
        let paths: Vec<PathBuf> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .zip(1u64..)
            .map(|(n, i)| make(n, 1000, i * 60))
            .collect();
        let keep = Retention {
            unused_for: UNUSED_FOR,
            max_count: 3,
            max_bytes: 1 << 20,
        };
        assert_eq!(prune(dir.path(), &keep, &paths[5]), 3);
        let left: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
        assert_eq!(left, [true, true, false, false, false, true]);
        // The byte cap: 2,500 bytes keep two of 1,000.
        let bytes = Retention {
            max_bytes: 2500,
            ..keep
        };
        assert_eq!(prune(dir.path(), &bytes, &paths[5]), 1);
        assert!(paths[5].exists() && paths[0].exists() && !paths[1].exists());
    }
}
