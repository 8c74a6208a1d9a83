//! A network namespace a test creates and removes: the CRI tests run
//! containerd, the CNI bridge and every pod inside one, so no pod traffic
//! can reach a real network. Made with iproute2 (`ip netns add`, a test-time
//! tool; husk itself runs no `ip`), entered per thread with setns(2).

use std::{
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    process::Command,
};

use anyhow::{bail, Context, Result};

/// A named network namespace (`/run/netns/NAME`) with its loopback up;
/// deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    /// Its name for `ip netns`.
    pub name: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (package iproute2)")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

impl NetNs {
    /// Creates namespace `name` (a stale one of that name is replaced).
    pub fn new(name: &str) -> Result<Self> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its bind-mounted file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// An open handle to the namespace, for setns(2).
    pub fn open(&self) -> Result<OwnedFd> {
        Ok(std::fs::File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?
            .into())
    }

    /// Runs `f` on a thread of its own inside the namespace (network
    /// namespaces are per thread, so the caller's stays as it is).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        run_in(&self.path(), f)
    }

    /// The names of the links in the namespace.
    pub fn links(&self) -> Result<Vec<String>> {
        let o = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show"])
            .output()
            .context("running ip")?;
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect())
    }
}

/// Runs `f` on a thread of its own inside the network namespace at `path`
/// (e.g. a pod's, pinned by containerd).
pub fn run_in<T: Send + 'static>(
    path: &std::path::Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let fd: OwnedFd = std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .into();
    std::thread::spawn(move || -> Result<T> {
        enter(&fd)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in the namespace panicked"))?
}

/// Moves the calling thread into the network namespace `fd`.
pub fn enter(fd: &impl AsRawFd) -> Result<()> {
    // SAFETY: setns(2) on an open namespace fd; affects only this thread.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("removing network namespace {}: {e}", self.name);
        }
    }
}
