//! `husk-testprog vsock-probe`: every way a container process could get a
//! vsock socket, tried from inside the container. In a husk guest each one
//! must be refused: vsock reaches the agent's API and the host ports of
//! other processes' streams.
//!
//! Prints one line per attempt and exits 0 only if every attempt was
//! refused as husk refuses it (`EPERM`), 1 otherwise.

use std::os::fd::{FromRawFd, OwnedFd};

/// What one attempt gave.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Refused with `EPERM`: what husk does.
    Refused,
    /// A socket was made.
    Made,
    /// Failed otherwise (the errno).
    Failed(i32),
    /// The mechanism itself is not available here (io_uring refused).
    Unavailable(i32),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused => write!(f, "EPERM"),
            Self::Made => write!(f, "MADE A SOCKET"),
            Self::Failed(e) => write!(f, "failed with errno {e}"),
            Self::Unavailable(e) => write!(f, "io_uring unavailable (errno {e})"),
        }
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn verdict_of(errno: i32) -> Verdict {
    if errno == libc::EPERM {
        Verdict::Refused
    } else {
        Verdict::Failed(errno)
    }
}

fn socket(kind: libc::c_int) -> Verdict {
    // SAFETY: socket(2) with constant arguments; a descriptor it returns is
    // owned (and closed) right away.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, kind | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: just returned by socket(2), owned by nobody else.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        return Verdict::Made;
    }
    verdict_of(errno())
}

/// `IORING_OP_SOCKET`: a socket made without the socket(2) system call.
fn io_uring_socket() -> Verdict {
    let mut ring = match io_uring::IoUring::new(2) {
        Ok(r) => r,
        Err(e) => return Verdict::Unavailable(e.raw_os_error().unwrap_or(0)),
    };
    let sqe = io_uring::opcode::Socket::new(libc::AF_VSOCK, libc::SOCK_STREAM, 0)
        .build()
        .user_data(1);
    // SAFETY: the entry refers to no buffers; it lives in the ring only.
    if unsafe { ring.submission().push(&sqe) }.is_err() {
        return Verdict::Failed(libc::ENOSPC);
    }
    if let Err(e) = ring.submit_and_wait(1) {
        return Verdict::Failed(e.raw_os_error().unwrap_or(0));
    }
    let Some(cqe) = ring.completion().next() else {
        return Verdict::Failed(libc::EIO);
    };
    let res = cqe.result();
    if res >= 0 {
        // SAFETY: a successful IORING_OP_SOCKET returns a new descriptor.
        drop(unsafe { OwnedFd::from_raw_fd(res) });
        return Verdict::Made;
    }
    verdict_of(-res)
}

/// Descriptors this process holds that are vsock sockets (inherited from
/// whoever started it).
fn inherited_vsock() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.into_iter()
        .filter(|&fd| {
            let mut domain: libc::c_int = 0;
            let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
                .unwrap_or(libc::socklen_t::MAX);
            // SAFETY: getsockopt(2) writes at most `len` bytes into `domain`.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_DOMAIN,
                    (&raw mut domain).cast(),
                    &raw mut len,
                )
            };
            rc == 0 && domain == libc::AF_VSOCK
        })
        .collect()
}

/// Runs every attempt; returns whether all were refused.
pub fn run() -> bool {
    let mut ok = true;
    for (name, kind) in [
        ("SOCK_STREAM", libc::SOCK_STREAM),
        ("SOCK_SEQPACKET", libc::SOCK_SEQPACKET),
        ("SOCK_DGRAM", libc::SOCK_DGRAM),
    ] {
        let v = socket(kind);
        println!("socket(AF_VSOCK, {name}): {v}");
        ok &= v == Verdict::Refused;
    }
    let v = io_uring_socket();
    println!("io_uring socket(AF_VSOCK): {v}");
    ok &= matches!(v, Verdict::Refused | Verdict::Unavailable(_));
    let fds = inherited_vsock();
    println!("inherited vsock descriptors: {}", fds.len());
    ok &= fds.is_empty();
    println!(
        "vsock-probe: {}",
        if ok { "all refused" } else { "REACHABLE" }
    );
    ok
}
