//! The runtime helper server: container operations without a fresh
//! process image each time.
//!
//! Every container operation runs the runtime helper ([`crate::runtime`])
//! in a process of its own, for the reasons given there (libcontainer forks
//! and must do so from a single-threaded process; a crash must not take
//! PID 1 down; the helper's stdio becomes the container's). Starting that
//! process with `fork` + `exec` of the agent binary costs seconds where
//! guest kernel code is emulated: the kernel loads a 6 MB static binary,
//! its relocations and start-up touch fresh pages (about 1 ms each), and
//! each operation pays it again.
//!
//! So the agent starts one helper *server* (`husk-agent runtime-server`)
//! while it boots, before it announces readiness: a template snapshot
//! holds it already started, with its pages resident. The server is
//! single-threaded and does nothing but wait on a `SOCK_SEQPACKET` socket
//! shared with the agent. Each request carries the helper's arguments and,
//! as `SCM_RIGHTS`, the descriptors that become its stdin, stdout and
//! stderr. The server clones a child with `CLONE_PARENT`, so the child is
//! the agent's child, exactly like a helper the agent spawned itself: the
//! agent's reaper gets its exit status, and the containers it creates are
//! reparented to the agent as before. The child runs the operation and
//! exits; the server answers with the child's pid at once and waits for
//! the next request. Requests are answered in order; concurrent callers
//! take turns only for the few milliseconds a clone takes.
//!
//! The child is a copy of the server, not a new program: it closes the
//! server's socket first thing, so nothing the helper starts (a
//! container's init waits in the helper's image until it execs) holds a
//! way to ask for more. If the server is gone or refuses, the agent falls
//! back to spawning the helper binary, as before.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Mutex, OnceLock},
};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

/// The largest request (the helper's arguments); an OCI process spec goes
/// in a file, not here.
const MAX_REQUEST: usize = 16 * 1024;
/// The argument that starts the server in the agent binary.
pub const SERVER_ARG: &str = "runtime-server";
/// The byte the server sends once it is ready for requests.
const READY: u8 = b'R';

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// The server's socket failed (the server is gone).
    #[error("runtime helper server: {0}")]
    Socket(#[source] nix::Error),
    /// The server answered something that is not an answer.
    #[error("runtime helper server: malformed answer {0:?}")]
    Malformed(String),
    /// The server could not start the helper.
    #[error("runtime helper server: {0}")]
    Refused(String),
    /// Starting the server failed.
    #[error("starting the runtime helper server: {0}")]
    Start(#[source] std::io::Error),
}

/// One request: the helper's arguments (its descriptors travel beside).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    /// `husk-agent runtime` arguments, operation first.
    pub args: Vec<String>,
}

/// The server's answer.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Reply {
    /// The helper runs as this pid (a child of the agent).
    Started(i32),
    /// No helper was started, and why.
    Refused(String),
}

/// The agent's server, once started.
static SERVER: OnceLock<HelperClient> = OnceLock::new();

/// Starts the agent's helper server (a child of the agent); its pid.
pub fn start_server() -> Result<u32, HelperError> {
    let (client, pid) = HelperClient::start("/proc/self/exe")?;
    let _ = SERVER.set(client);
    Ok(pid)
}

/// The agent's helper server, while it works.
pub fn server() -> Option<&'static HelperClient> {
    SERVER.get().filter(|c| c.is_open())
}

/// The agent's side: the socket to the server.
#[derive(Debug)]
pub struct HelperClient {
    sock: Mutex<Option<OwnedFd>>,
}

impl HelperClient {
    /// Starts the server (`exe runtime-server --fd N`) and waits until it
    /// is ready. The server is a child of the calling process.
    pub fn start(exe: &str) -> Result<(Self, u32), HelperError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(HelperError::Socket)?;
        // The server's end must survive its exec: clear close-on-exec on a
        // duplicate that only the child keeps.
        let fd = nix::unistd::dup(theirs.as_raw_fd()).map_err(HelperError::Socket)?;
        // SAFETY: `dup` just returned this descriptor; nothing else owns it.
        let inherited = unsafe { OwnedFd::from_raw_fd(fd) };
        drop(theirs);
        let child = std::process::Command::new(exe)
            .arg(SERVER_ARG)
            .arg("--fd")
            .arg(inherited.as_raw_fd().to_string())
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(HelperError::Start)?;
        drop(inherited);
        let mut byte = [0u8; 1];
        let n = nix::unistd::read(ours.as_raw_fd(), &mut byte).map_err(HelperError::Socket)?;
        if n != 1 || byte[0] != READY {
            return Err(HelperError::Malformed(format!(
                "{:?} instead of the ready byte",
                &byte[..n]
            )));
        }
        Ok((
            Self {
                sock: Mutex::new(Some(ours)),
            },
            child.id(),
        ))
    }

    /// Whether the server still answers (no socket failure so far).
    pub fn is_open(&self) -> bool {
        self.sock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Asks the server to run the helper with `args` and `stdio` (stdin,
    /// stdout, stderr); the helper's pid. Blocks for the length of a
    /// clone. After a socket failure the client is closed for good and
    /// every later call fails at once.
    pub fn run(&self, args: &[&str], stdio: [&OwnedFd; 3]) -> Result<i32, HelperError> {
        let mut guard = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let sock = guard
            .as_ref()
            .ok_or(HelperError::Socket(nix::Error::EPIPE))?;
        let answer = exchange(sock.as_raw_fd(), args, stdio);
        if matches!(
            answer,
            Err(HelperError::Socket(_) | HelperError::Malformed(_))
        ) {
            *guard = None;
        }
        answer
    }
}

fn exchange(sock: RawFd, args: &[&str], stdio: [&OwnedFd; 3]) -> Result<i32, HelperError> {
    let request = Request {
        args: args.iter().map(|s| s.to_string()).collect(),
    };
    let body = serde_json::to_vec(&request).map_err(|e| HelperError::Malformed(e.to_string()))?;
    let fds = stdio.map(|f| f.as_raw_fd());
    let rights = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        sock,
        &[IoSlice::new(&body)],
        &rights,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(HelperError::Socket)?;
    let mut buf = vec![0u8; 512];
    let n = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        recvmsg::<()>(sock, &mut iov, None, MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(HelperError::Socket)?
            .bytes
    };
    if n == 0 {
        return Err(HelperError::Socket(nix::Error::ECONNRESET));
    }
    match serde_json::from_slice(&buf[..n]) {
        Ok(Reply::Started(pid)) if pid > 0 => Ok(pid),
        Ok(Reply::Refused(why)) => Err(HelperError::Refused(why)),
        _ => Err(HelperError::Malformed(
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        )),
    }
}

/// A request as the server read it: arguments and exactly three
/// descriptors, or why not.
fn parse_request(body: &[u8], fds: Vec<OwnedFd>) -> Result<(Vec<String>, [OwnedFd; 3]), String> {
    let request: Request =
        serde_json::from_slice(body).map_err(|e| format!("malformed request: {e}"))?;
    if request.args.is_empty() {
        return Err("a request without an operation".into());
    }
    let stdio: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|v: Vec<OwnedFd>| format!("a request with {} descriptors, not 3", v.len()))?;
    Ok((request.args, stdio))
}

/// Clones a child of this process's parent (`CLONE_PARENT`) that runs
/// `child` and exits with its code. Returns the child's pid.
///
/// Raw `clone3` with fork semantics, as youki's libcontainer does for a
/// container's processes: the caller must be single-threaded (the server
/// is), so no lock is held that the child would inherit held.
fn clone_sibling(child: impl FnOnce() -> i32) -> nix::Result<i32> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    // With CLONE_PARENT the kernel takes the exit signal from the caller
    // (SIGCHLD for the server) and refuses one given here.
    let mut args = CloneArgs {
        flags: libc::CLONE_PARENT as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 with no new stack and no CLONE_VM has fork's
    // semantics: the child runs on a copy of this address space, and the
    // server is single-threaded, so nothing is half-done in the copy.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of_mut!(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        -1 => Err(nix::Error::last()),
        0 => std::process::exit(child()),
        pid => i32::try_from(pid).map_err(|_| nix::Error::EOVERFLOW),
    }
}

/// The server: `husk-agent runtime-server --fd N`. Returns when the agent
/// closes its end (the process's exit code).
pub fn serve(argv: &[String]) -> i32 {
    let fd = match argv
        .windows(2)
        .find(|w| w[0] == "--fd")
        .and_then(|w| w[1].parse::<RawFd>().ok())
    {
        Some(fd) if fd > 2 => fd,
        _ => {
            eprintln!("husk-agent {SERVER_ARG}: needs --fd N (N > 2)");
            return 2;
        }
    };
    // SAFETY: the agent passed this descriptor for the server to own; it
    // is open (the agent checked nothing else, so a bad number fails the
    // first write below).
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // Before readiness, so that a template holds the result.
    if let Err(e) = crate::codemap::prepare() {
        eprintln!("husk-agent {SERVER_ARG}: code mappings left to page faults: {e}");
    }
    if nix::unistd::write(sock.as_fd(), &[READY]).is_err() {
        return 2;
    }
    let mut body = vec![0u8; MAX_REQUEST];
    loop {
        let (n, fds) = {
            let mut space = nix::cmsg_space!([RawFd; 3]);
            let mut iov = [IoSliceMut::new(&mut body)];
            let msg = match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::Error::EINTR) => continue,
                Err(_) => return 1,
            };
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these
                        // descriptors in this process for us.
                        fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
            }
            (msg.bytes, fds)
        };
        if n == 0 {
            return 0;
        }
        let reply = match parse_request(&body[..n], fds) {
            Ok((args, stdio)) => {
                let started = clone_sibling(|| run_child(&sock, &args, stdio));
                match started {
                    Ok(pid) => Reply::Started(pid),
                    Err(e) => Reply::Refused(format!("cloning the helper: {e}")),
                }
            }
            Err(why) => Reply::Refused(why),
        };
        let text = serde_json::to_vec(&reply).unwrap_or_default();
        if sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&text)],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .is_err()
        {
            return 1;
        }
    }
}

/// The helper child: the server's socket closed, `stdio` as its standard
/// streams, then the operation.
fn run_child(sock: &OwnedFd, args: &[String], stdio: [OwnedFd; 3]) -> i32 {
    // SAFETY: closing the inherited copy of the server's socket; the
    // OwnedFd in this (copied) address space is never used again, since
    // this process exits at the end of this function.
    unsafe { libc::close(sock.as_raw_fd()) };
    for (target, fd) in (0..).zip(stdio.iter()) {
        if fd.as_raw_fd() != target && nix::unistd::dup2(fd.as_raw_fd(), target).is_err() {
            return 2;
        }
    }
    drop(stdio);
    crate::runtime::main(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devnull() -> OwnedFd {
        std::fs::File::open("/dev/null").expect("null").into()
    }

    #[test]
    fn requests_need_an_operation_and_three_descriptors() {
        let ok = serde_json::to_vec(&Request {
            args: vec!["state".into(), "--id".into(), "c".into()],
        })
        .expect("json");
        let (args, _) = parse_request(&ok, vec![devnull(), devnull(), devnull()]).expect("ok");
        assert_eq!(args, ["state", "--id", "c"]);
        let e = parse_request(&ok, vec![devnull()]).expect_err("one fd");
        assert!(e.contains("1 descriptors, not 3"), "{e}");
        let e = parse_request(b"{\"args\":[]}", vec![devnull(), devnull(), devnull()])
            .expect_err("no op");
        assert!(e.contains("without an operation"), "{e}");
        let e = parse_request(b"\x00garbage", vec![]).expect_err("garbage");
        assert!(e.contains("malformed request"), "{e}");
    }

    #[test]
    fn replies_round_trip() {
        for r in [Reply::Started(42), Reply::Refused("no".into())] {
            let text = serde_json::to_vec(&r).expect("json");
            assert_eq!(serde_json::from_slice::<Reply>(&text).expect("back"), r);
        }
    }
}
