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

/// Runs every attempt; returns the report (one line each, then the
/// process's own seccomp and capability lines from `/proc/self/status`,
/// then `rc=0` if all were refused, `rc=1` otherwise) and whether all were.
pub fn run() -> (String, bool) {
    let mut out = String::new();
    let mut ok = true;
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    for (name, kind) in [
        ("SOCK_STREAM", libc::SOCK_STREAM),
        ("SOCK_SEQPACKET", libc::SOCK_SEQPACKET),
        ("SOCK_DGRAM", libc::SOCK_DGRAM),
    ] {
        let v = socket(kind);
        line(format!("socket(AF_VSOCK, {name}): {v}"));
        ok &= v == Verdict::Refused;
    }
    let v = io_uring_socket();
    line(format!("io_uring socket(AF_VSOCK): {v}"));
    ok &= matches!(v, Verdict::Refused | Verdict::Unavailable(_));
    let fds = inherited_vsock();
    line(format!("inherited vsock descriptors: {}", fds.len()));
    ok &= fds.is_empty();
    line(format!(
        "vsock-probe: {}",
        if ok { "all refused" } else { "REACHABLE" }
    ));
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for l in status.lines().filter(|l| {
        ["Seccomp:", "Seccomp_filters:", "CapEff:"]
            .iter()
            .any(|f| l.starts_with(f))
    }) {
        line(l.to_string());
    }
    line(format!("rc={}", u8::from(!ok)));
    (out, ok)
}

/// `vsock-probe [--report FILE [--then-sleep]]`: the report goes to stdout
/// (exit status 0 if all was refused), or into FILE, written whole under a
/// temporary name first; `--then-sleep` then keeps the process alive (a
/// container's init that the test then execs into).
pub fn main(args: &[String]) -> i32 {
    let (report, ok) = run();
    match args.first().map(String::as_str) {
        Some("--report") => {
            let Some(file) = args.get(1) else {
                eprintln!("vsock-probe: --report needs a file");
                return 2;
            };
            let tmp = format!("{file}.tmp");
            if let Err(e) = std::fs::write(&tmp, &report).and_then(|()| std::fs::rename(&tmp, file))
            {
                eprintln!("vsock-probe: writing {file}: {e}");
                return 2;
            }
            if args.get(2).map(String::as_str) == Some("--then-sleep") {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
        }
        Some(other) => {
            eprintln!("vsock-probe: unexpected argument {other:?}");
            return 2;
        }
        None => print!("{report}"),
    }
    i32::from(!ok)
}
