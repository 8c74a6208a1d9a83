//! Keeps container processes away from vsock.
//!
//! vsock is the guest's channel to the host: the agent's API listens on it
//! and every process's standard streams travel over it. `AF_VSOCK` is not
//! namespaced in the guest kernel, so without a guard any process in any
//! container could connect to the agent (which runs as guest root and
//! creates, execs and kills on request) or to the host ports that carry
//! other containers' streams.
//!
//! The guard is a seccomp filter that refuses `socket(AF_VSOCK, ...)` with
//! `EPERM`. The runtime helper installs it on itself before libcontainer
//! forks anything, so the container's init and every exec (which are the
//! helper's descendants) inherit it, privileged or not, with or without a
//! seccomp profile of their own:
//!
//! * Filters stack and are never removed: the profile libcontainer installs
//!   later is evaluated too, and the kernel takes the most severe verdict of
//!   all filters, so this rule never weakens the container's profile and the
//!   profile can never allow what this rule refuses.
//! * Installed while the helper still has `CAP_SYS_ADMIN` (before
//!   libcontainer drops capabilities), it needs no `no_new_privs`: set-uid
//!   programs in containers keep working as under runc. Installing it as
//!   the last step before `execve` would force `no_new_privs` on every
//!   unprivileged container.
//!
//! The filter checks x86_64 system calls only; the guest kernel has neither
//! the 32-bit nor the x32 ABI (`guest-image/kernel/husk.config`), so there is
//! no `socketcall(2)` to bypass it with. io_uring's `IORING_OP_SOCKET` makes
//! sockets without a system call a filter could see; husk's guest kernel
//! refuses `AF_VSOCK` there (`guest-image/kernel/patches/0004-*`).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing the guard.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The filter could not be built (a bug).
    #[error("building the vsock seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("installing the vsock seccomp filter")]
    Install(#[source] std::io::Error),
}

/// The filter: `socket(AF_VSOCK, ...)` fails with `EPERM`, everything else
/// is left to the other filters (and the kernel).
pub fn vsock_filter() -> Result<BpfProgram, ConfineError> {
    // The domain is an int: compare the low 32 bits only.
    let vsock = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(libc::AF_VSOCK.unsigned_abs()),
    )
    .map_err(ConfineError::Build)?;
    let rules = BTreeMap::from([(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![vsock]).map_err(ConfineError::Build)?],
    )]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        TargetArch::x86_64,
    )
    .map_err(ConfineError::Build)?;
    filter.try_into().map_err(ConfineError::Build)
}

/// Installs [`vsock_filter`] on the calling thread (and so on every process
/// it forks from now on). Without `CAP_SYS_ADMIN` the kernel only takes a
/// filter from a thread with `no_new_privs`; the caller decides about that,
/// this function never sets it.
pub fn forbid_vsock() -> Result<(), ConfineError> {
    let program = vsock_filter()?;
    let len = u16::try_from(program.len())
        .map_err(|_| ConfineError::Install(std::io::Error::other("filter too long")))?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut().cast(),
    };
    // SAFETY: seccomp(2) copies the program from `fprog`, which points into
    // `program`; both outlive the call. No flags: this thread only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &raw const fprog,
        )
    };
    if rc != 0 {
        return Err(ConfineError::Install(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `socket(domain, SOCK_STREAM)` gives: Ok, or the errno.
    fn try_socket(domain: libc::c_int) -> Result<(), i32> {
        // SAFETY: socket(2) with constant arguments; the descriptor is
        // closed right away.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        // SAFETY: `fd` was just returned by socket(2) and is ours.
        unsafe { libc::close(fd) };
        Ok(())
    }

    #[test]
    fn vsock_sockets_are_refused_and_others_are_not() {
        // Seccomp filters and no_new_privs belong to a thread: this one
        // ends with the test, the rest of the test process is untouched.
        let verdicts = std::thread::spawn(|| {
            let before = try_socket(libc::AF_VSOCK);
            if nix::unistd::geteuid().as_raw() != 0 {
                // Unprivileged test runs: the kernel needs no_new_privs.
                nix::sys::prctl::set_no_new_privs().expect("no_new_privs");
            }
            forbid_vsock().expect("install the filter");
            (
                before,
                try_socket(libc::AF_VSOCK),
                try_socket(libc::AF_UNIX),
            )
        })
        .join()
        .expect("test thread");
        let (before, vsock, unix) = verdicts;
        // Before: whatever the host gives (a socket, or EAFNOSUPPORT where
        // vsock is missing), but never EPERM.
        assert_ne!(before, Err(libc::EPERM), "EPERM before the filter");
        assert_eq!(vsock, Err(libc::EPERM), "AF_VSOCK refused by the filter");
        assert_eq!(unix, Ok(()), "other families untouched");
    }

    #[test]
    fn filter_is_small() {
        let program = vsock_filter().expect("filter");
        assert!(program.len() < 64, "{} instructions", program.len());
    }
}
