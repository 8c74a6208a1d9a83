//! The pod's shared PID namespace (Kubernetes' `shareProcessNamespace`).
//!
//! Under runc the pause container is PID 1 of such a pod: every container
//! joins its PID namespace, sees the others' processes, and orphans are
//! reaped by pause. husk runs no pause container in the guest (the sandbox
//! is the VM), so the agent makes the namespace itself, on the first
//! container that asks for it: a holder process cloned with
//! `CLONE_NEWPID`, PID 1 of the new namespace, that does nothing but
//! sleep and let the kernel reap its adopted orphans (`SIGCHLD` ignored).
//! Containers join it through a symlink at a well-known path
//! ([`husk_protocols::POD_PID_NAMESPACE`]) to the holder's
//! `/proc/<pid>/ns/pid`, which the shim writes into their specs. Pods that
//! do not ask pay nothing (a PID namespace costs about 0.2 s of emulated
//! guest kernel work here).
//!
//! The holder keeps no descriptor of the agent's (it closes them all
//! first: a copy of a stream socket would keep the far end from ever
//! seeing the stream end) and has no signal handler, so processes inside
//! the namespace cannot signal it; the agent can, and the VM's end ends it.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use nix::{
    sched::{clone, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// Why the pod's PID namespace could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PodNsError {
    /// clone(CLONE_NEWPID) failed.
    #[error("making the pod's PID namespace: {0}")]
    Clone(nix::Error),
    /// The link could not be written.
    #[error("linking {path} to the pod's PID namespace: {source}")]
    Link {
        /// The link's path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The holder of a pod PID namespace linked at a path.
#[derive(Debug)]
struct Holder {
    pid: Pid,
    /// The namespace's inode: tells the holder from a process that got
    /// its pid after it died.
    ns_inode: u64,
}

/// The pod PID namespace linked at `link`, made on first use.
#[derive(Debug)]
pub struct PodPidNamespace {
    link: PathBuf,
    holder: Mutex<Option<Holder>>,
}

impl PodPidNamespace {
    /// The namespace that containers name by `link`.
    pub fn new(link: impl Into<PathBuf>) -> Self {
        Self {
            link: link.into(),
            holder: Mutex::new(None),
        }
    }

    /// The link containers join through.
    pub fn link(&self) -> &Path {
        &self.link
    }

    /// Makes sure the namespace exists and the link points at it; returns
    /// the holder's pid (in the agent's namespace).
    pub fn ensure(&self) -> Result<Pid, PodNsError> {
        let mut holder = self.holder.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = holder.as_ref() {
            if ns_inode(h.pid) == Some(h.ns_inode) && self.link_inode() == Some(h.ns_inode) {
                return Ok(h.pid);
            }
            tracing::warn!(
                pid = h.pid.as_raw(),
                "the pod's PID namespace holder is gone; making a new one"
            );
            let _ = kill(h.pid, Signal::SIGKILL);
            *holder = None;
        }
        let pid = spawn_holder()?;
        let made = ns_inode(pid)
            .ok_or_else(|| {
                std::io::Error::other(format!("holder {pid} has no PID namespace in /proc"))
            })
            .and_then(|inode| self.write_link(pid).map(|()| inode));
        match made {
            Ok(ns_inode) => {
                tracing::info!(pid = pid.as_raw(), "made the pod's PID namespace");
                *holder = Some(Holder { pid, ns_inode });
                Ok(pid)
            }
            Err(source) => {
                let _ = kill(pid, Signal::SIGKILL);
                Err(PodNsError::Link {
                    path: self.link.clone(),
                    source,
                })
            }
        }
    }

    fn link_inode(&self) -> Option<u64> {
        std::fs::metadata(&self.link).ok().map(|m| m.ino())
    }

    /// Points the link at `pid`'s PID namespace (replacing a stale one).
    fn write_link(&self, pid: Pid) -> std::io::Result<()> {
        if let Some(dir) = self.link.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.link.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("/proc/{pid}/ns/pid"), &tmp)?;
        std::fs::rename(&tmp, &self.link)
    }
}

impl Drop for PodPidNamespace {
    fn drop(&mut self) {
        let holder = self.holder.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = holder.take() {
            let _ = kill(h.pid, Signal::SIGKILL);
            let _ = std::fs::remove_file(&self.link);
        }
    }
}

/// The inode of `pid`'s PID namespace.
fn ns_inode(pid: Pid) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|m| m.ino())
}

/// Clones the holder: PID 1 of a new PID namespace.
fn spawn_holder() -> Result<Pid, PodNsError> {
    let mut stack = vec![0u8; 64 * 1024];
    // The child runs `hold` on its own copy of `stack`: without CLONE_VM it
    // gets a copy of the address space, so the parent freeing the buffer
    // cannot touch it.
    // SAFETY: a private stack copy, and `hold` makes only async-signal-safe
    // system calls, as a child of a multi-threaded process must.
    unsafe {
        clone(
            Box::new(hold),
            &mut stack,
            CloneFlags::CLONE_NEWPID,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(PodNsError::Clone)
}

/// The holder's life: no descriptors, default signal dispositions (so no
/// process in the namespace can signal it), orphans reaped by the kernel,
/// and sleep until killed.
fn hold() -> isize {
    // SAFETY: plain system calls on no memory of ours; each is
    // async-signal-safe.
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        // Named as under runc, where pause is PID 1 of a shared namespace.
        libc::prctl(libc::PR_SET_NAME, c"pause".as_ptr(), 0, 0, 0);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        loop {
            libc::pause();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (CLONE_NEWPID), as the agent has in the guest.
    #[test]
    fn the_holder_is_pid_1_of_a_new_namespace_and_is_made_once() {
        let dir = std::env::temp_dir().join(format!("husk-podns-{}", std::process::id()));
        let ns = PodPidNamespace::new(dir.join("pod/pid"));
        let pid = ns.ensure().expect("made");
        assert_eq!(ns.ensure().expect("again"), pid, "made once");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let nspid = status
            .lines()
            .find(|l| l.starts_with("NSpid:"))
            .expect("NSpid");
        assert!(nspid.trim_end().ends_with("\t1"), "{nspid:?}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .as_deref()
            != Some("pause\n")
        {
            assert!(std::time::Instant::now() < deadline, "named pause");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_ne!(
            std::fs::metadata(ns.link()).expect("link").ino(),
            std::fs::metadata("/proc/self/ns/pid").expect("own").ino(),
            "a namespace of its own"
        );
        // It closes its descriptors as it starts.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .expect("fds")
                .count();
            if fds == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{fds} descriptors open"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }

        // A holder that died is replaced.
        kill(pid, Signal::SIGKILL).expect("kill");
        nix::sys::wait::waitpid(pid, None).expect("reap");
        let again = ns.ensure().expect("remade");
        assert_ne!(again, pid);
        drop(ns);
        nix::sys::wait::waitpid(again, None).expect("the drop killed it");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
