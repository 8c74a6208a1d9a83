//! The pod's shared PID namespace (Kubernetes' `shareProcessNamespace`).
//!
//! Under runc the pause container is PID 1 of such a pod: every container
//! joins its PID namespace, sees the others' processes, and orphans are
//! reaped by pause. husk runs no pause container in the guest (the sandbox
//! is the VM), so the agent makes the namespace itself, on the first
//! container that asks for it: a holder process, PID 1 of the new
//! namespace, that does nothing but sleep and let the kernel reap its
//! adopted orphans (`SIGCHLD` ignored). Containers join it through a
//! symlink at a well-known path ([`husk_protocols::POD_PID_NAMESPACE`]) to
//! the holder's `/proc/<pid>/ns/pid`, which the shim writes into their
//! specs. Pods that do not ask pay nothing (a PID namespace costs about
//! 0.2 s of emulated guest kernel work here).
//!
//! Every container of the pod sees the holder, so it holds nothing and can
//! do nothing: before it sleeps it closes every descriptor, leaves the
//! agent's mount namespace for one of its own holding only an empty,
//! read-only tmpfs (no vsock socket can be made outside the guest's
//! initial mount namespace, and the pod's share is not there), drops every
//! capability (bounding and ambient sets too, set-uid fixups locked off),
//! sets `no_new_privs`, becomes not dumpable and loads a seccomp filter
//! that kills it on any system call but the few its sleep needs. The guest
//! kernel keeps containers from ptrace-inspecting it at all (it is a PID
//! namespace's init in a mount namespace of its own:
//! `guest-image/kernel/patches/0008-*`), so its memory, a copy of the
//! agent's, cannot be read either. It has no signal handler, so processes
//! inside the namespace cannot signal it; the agent can, and the VM's end
//! ends it.

use std::{
    os::{fd::AsRawFd, unix::fs::MetadataExt},
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
    /// The holder's seccomp filter could not be built.
    #[error("building the PID namespace holder's seccomp filter: {0}")]
    Filter(String),
    /// The holder died confining itself.
    #[error("the PID namespace holder (pid {0}) could not confine itself")]
    Confine(i32),
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
        let root = self
            .link
            .parent()
            .unwrap_or(Path::new("/"))
            .join("holder-root");
        let pid = spawn_holder(&root)?;
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

/// The system calls the holder may make once its filter is loaded: its
/// sleep, the one-byte report that it is ready, and its end.
const HOLDER_SYSCALLS: &[&str] = &[
    "pause",
    "rt_sigreturn",
    "restart_syscall",
    "write",
    "close",
    "exit",
    "exit_group",
];

/// A seccomp filter program, built before the clone so that the child only
/// has to load it.
struct Filter {
    insns: Vec<libc::sock_filter>,
    len: libc::c_ushort,
}

impl Filter {
    /// The `sock_fprog` that `PR_SET_SECCOMP` takes; it points into `self`.
    fn prog(&self) -> libc::sock_fprog {
        libc::sock_fprog {
            len: self.len,
            filter: self.insns.as_ptr().cast_mut(),
        }
    }
}

/// The holder's seccomp filter: the calls above, anything else (or
/// another architecture) kills it.
fn holder_filter() -> Result<Filter, PodNsError> {
    use libseccomp::{ScmpAction, ScmpFilterContext, ScmpSyscall};
    let fail = |e: &dyn std::fmt::Display| PodNsError::Filter(e.to_string());
    let mut ctx = ScmpFilterContext::new(ScmpAction::KillProcess).map_err(|e| fail(&e))?;
    ctx.set_act_badarch(ScmpAction::KillProcess)
        .map_err(|e| fail(&e))?;
    for name in HOLDER_SYSCALLS {
        let call = ScmpSyscall::from_name(name).map_err(|e| fail(&e))?;
        ctx.add_rule(ScmpAction::Allow, call)
            .map_err(|e| fail(&e))?;
    }
    // libseccomp writes the program to a descriptor: a pipe is enough for
    // a few dozen instructions.
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fail(&e))?;
    ctx.export_bpf(&w).map_err(|e| fail(&e))?;
    drop(w);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut bytes).map_err(|e| fail(&e))?;
    let insn = std::mem::size_of::<libc::sock_filter>();
    if bytes.is_empty() || bytes.len() % insn != 0 {
        return Err(PodNsError::Filter(format!(
            "libseccomp wrote {} bytes of BPF",
            bytes.len()
        )));
    }
    let insns: Vec<libc::sock_filter> = bytes
        .chunks_exact(insn)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    let len = libc::c_ushort::try_from(insns.len())
        .map_err(|_| PodNsError::Filter(format!("{} BPF instructions", insns.len())))?;
    Ok(Filter { insns, len })
}

/// Clones the holder: PID 1 of a new PID namespace, in a new mount
/// namespace, confined as the module documentation says. Returns once the
/// holder reports that it is confined (or fails when it died trying).
fn spawn_holder(root: &Path) -> Result<Pid, PodNsError> {
    let filter = holder_filter()?;
    let link_err = |source| PodNsError::Link {
        path: root.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(root).map_err(link_err)?;
    let root = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())
        .map_err(|_| link_err(std::io::Error::other("a NUL in the path")))?;
    let (ready_r, ready_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(PodNsError::Clone)?;
    let report = ready_w.as_raw_fd();
    let mut stack = vec![0u8; 64 * 1024];
    // The child runs `hold` on its own copy of `stack`, `filter` and the
    // strings: without CLONE_VM it gets a copy of the address space, so
    // the parent freeing them cannot touch it.
    let child = Box::new(move || hold(&filter, &root, report));
    // SAFETY: a private stack copy, and `hold` makes only async-signal-safe
    // system calls on memory prepared before the clone, as a child of a
    // multi-threaded process must.
    let pid = unsafe {
        clone(
            child,
            &mut stack,
            CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(PodNsError::Clone)?;
    drop(ready_w);
    // One byte once confined; end of file if it died on the way.
    let mut byte = [0u8; 1];
    let got = std::io::Read::read(&mut std::fs::File::from(ready_r), &mut byte).unwrap_or(0);
    if got != 1 {
        let _ = kill(pid, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(PodNsError::Confine(pid.as_raw()));
    }
    Ok(pid)
}

/// The holder's life (see the module documentation): confine itself,
/// report through `report`, sleep until killed. Any failure ends it, which
/// the parent sees as the report's end of file.
fn hold(filter: &Filter, root: &std::ffi::CStr, report: libc::c_int) -> isize {
    let die = || -> isize {
        // SAFETY: _exit(2) ends the process at once; nothing to unwind.
        unsafe { libc::_exit(1) }
    };
    let dot = c".";
    let tmpfs = c"tmpfs";
    let opts = c"size=4k,mode=0500";
    let name = c"pause";
    // SAFETY: plain system calls on memory of this process (the copies
    // made by the clone and static strings); each is async-signal-safe.
    unsafe {
        // Descriptors: none but the report's.
        if report > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, (report - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (report + 1) as u32, u32::MAX, 0u32);
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        let mut unblocked: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut unblocked);
        libc::sigprocmask(libc::SIG_SETMASK, &unblocked, std::ptr::null_mut());
        // Named as under runc, where pause is PID 1 of a shared namespace.
        libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0);

        // A mount namespace holding one empty, read-only tmpfs.
        let none = std::ptr::null::<libc::c_char>();
        if libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
            || libc::mount(
                tmpfs.as_ptr(),
                root.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
                opts.as_ptr().cast(),
            ) != 0
            || libc::chdir(root.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0
            || libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            return die();
        }

        // No capabilities, now or after any exec, and no way back.
        for cap in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        // SECBIT_NOROOT, SECBIT_NO_SETUID_FIXUP, SECBIT_KEEP_CAPS_LOCKED,
        // SECBIT_NO_CAP_AMBIENT_RAISE, each with its lock.
        let securebits: libc::c_ulong = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80;
        if libc::prctl(libc::PR_SET_SECUREBITS, securebits, 0, 0, 0) != 0 {
            return die();
        }
        let mut header = CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
        {
            return die();
        }
        let prog = filter.prog();
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
            0,
            0,
        ) != 0
        {
            return die();
        }
        // Confined: say so, and keep nothing open. Only raw system calls
        // from here on (the filter knows no others).
        libc::syscall(libc::SYS_write, report, [1u8].as_ptr(), 1usize);
        libc::syscall(libc::SYS_close, report);
        loop {
            libc::syscall(libc::SYS_pause);
        }
    }
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The holder's filter lets through what its sleep needs and kills on
    /// anything else (here `getppid`).
    #[test]
    fn the_holders_filter_kills_on_any_other_call() {
        let filter = holder_filter().expect("filter");
        // SAFETY: the child only makes raw system calls and exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                // SAFETY: prctl and syscall on memory of this process.
                unsafe {
                    let prog = filter.prog();
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    if libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &prog as *const libc::sock_fprog,
                        0,
                        0,
                    ) != 0
                    {
                        libc::_exit(3);
                    }
                    libc::syscall(libc::SYS_getppid);
                    libc::syscall(libc::SYS_exit_group, 0);
                }
                unreachable!("exit_group returned");
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).expect("wait");
                assert!(
                    matches!(
                        status,
                        nix::sys::wait::WaitStatus::Signaled(_, Signal::SIGSYS, _)
                    ),
                    "{status:?}"
                );
            }
        }
    }

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
        // Confined before ensure() returned: no capabilities, no way to
        // gain any, not dumpable, under a filter, alone in a mount
        // namespace holding one empty read-only tmpfs.
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("{name} in {status}"))
        };
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(caps), "0000000000000000", "{caps}");
        }
        assert_eq!(field("NoNewPrivs"), "1");
        assert_eq!(field("Seccomp"), "2", "{status}");
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mounts");
        let lines: Vec<&str> = mounts.lines().collect();
        assert_eq!(lines.len(), 1, "{mounts}");
        assert!(
            lines[0].contains(" / / ro,") && lines[0].contains(" - tmpfs "),
            "{mounts}"
        );
        assert_ne!(
            std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
                .expect("mnt")
                .ino(),
            std::fs::metadata("/proc/self/ns/mnt").expect("own").ino()
        );
        // Not dumpable: its /proc files belong to root, not its uid.
        let exe_owner = std::fs::metadata(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .uid();
        assert_eq!(exe_owner, 0);
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
