//! A process's standard streams. Each is a vsock stream of its own to a
//! host port the shim listens on, and presents the process's token first:
//! the shim relays only a connection that starts with its stream's token.
//! Between the process and the agent sit pipes (a program that opens
//! `/dev/stdout` works, as with runc) with one copy task per stream, or a
//! terminal whose master side the container's init sends over a console
//! socket.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use husk_protocols::{agent::Stdio, HOST_CID, STDIO_TOKEN_LEN};
use nix::fcntl::OFlag;
use tokio::{
    io::{unix::AsyncFd, AsyncWriteExt, Interest},
    net::UnixListener,
    task::JoinHandle,
};
use tokio_vsock::{VsockAddr, VsockStream};

use super::{ContainerError, Result};

/// Console sockets for terminals.
pub const CONSOLE_DIR: &str = "/run/husk/console";
/// How long connecting a stdio stream to the host may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the container's init may take to send its terminal.
const PTY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes copied at a time between a terminal and the host.
pub const CHUNK: usize = 32 * 1024;

/// `/dev/null`, for a helper stream nobody reads or writes.
pub fn devnull() -> Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| ContainerError::Failed(format!("opening /dev/null: {e}")))
}

/// The process's stdio token, checked: required when any stream is asked for.
pub fn stdio_token(stdio: &Stdio) -> Result<&[u8]> {
    let any = stdio.stdin_port != 0 || stdio.stdout_port != 0 || stdio.stderr_port != 0;
    if any && stdio.token.len() != STDIO_TOKEN_LEN {
        return Err(ContainerError::Invalid(format!(
            "the stdio token must be {STDIO_TOKEN_LEN} bytes, not {}",
            stdio.token.len()
        )));
    }
    Ok(&stdio.token)
}

/// Opens a stream to host `port` (0: none) and presents `token` on it: the
/// host relays only a connection that starts with its stream's token.
pub async fn connect_host(port: u32, token: &[u8]) -> Result<Option<VsockStream>> {
    if port == 0 {
        return Ok(None);
    }
    let failed = |why: String| {
        ContainerError::Failed(format!("connecting stdio to host port {port}: {why}"))
    };
    let connect = async {
        let mut s = VsockStream::connect(VsockAddr::new(HOST_CID, port)).await?;
        s.write_all(token).await?;
        Ok::<_, std::io::Error>(s)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(s)) => Ok(Some(s)),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed("timed out".into())),
    }
}

pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| ContainerError::Failed(format!("creating a pipe: {e}")))
}

pub fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| ContainerError::Failed(format!("fcntl: {e}")))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| ContainerError::Failed(format!("fcntl: {e}")))?;
    Ok(())
}

/// Copies from the host stream into a pipe; EOF closes the pipe.
pub fn feed_stdin(
    mut from: tokio::io::ReadHalf<VsockStream>,
    to: OwnedFd,
) -> Result<JoinHandle<()>> {
    let mut to = tokio::net::unix::pipe::Sender::from_owned_fd(to)
        .map_err(|e| ContainerError::Failed(format!("stdin pipe: {e}")))?;
    Ok(tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from, &mut to).await;
    }))
}

/// Copies a pipe to the host stream until the pipe's writers are gone,
/// then closes the stream's sending side.
pub fn drain_output(
    from: OwnedFd,
    mut to: impl tokio::io::AsyncWrite + Unpin + Send + 'static,
) -> Result<JoinHandle<()>> {
    let mut from = tokio::net::unix::pipe::Receiver::from_owned_fd(from)
        .map_err(|e| ContainerError::Failed(format!("output pipe: {e}")))?;
    Ok(tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from, &mut to).await;
        let _ = to.shutdown().await;
    }))
}

/// Reads from the terminal master; EIO means the last slave closed.
pub async fn pty_read(pty: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut guard = pty.ready(Interest::READABLE).await?;
        match guard.try_io(|fd| {
            nix::unistd::read(fd.get_ref().as_raw_fd(), buf).map_err(std::io::Error::from)
        }) {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

pub async fn pty_write_all(pty: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        let mut guard = pty.ready(Interest::WRITABLE).await?;
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Receives the terminal master the container's init sends over the
/// console socket.
pub async fn receive_pty(listener: &UnixListener) -> Result<OwnedFd> {
    let (stream, _) = tokio::time::timeout(PTY_TIMEOUT, listener.accept())
        .await
        .map_err(|_| ContainerError::Failed("no terminal arrived on the console socket".into()))?
        .map_err(|e| ContainerError::Failed(format!("console socket: {e}")))?;
    let std_stream = stream
        .into_std()
        .map_err(|e| ContainerError::Failed(format!("console socket: {e}")))?;
    std_stream
        .set_nonblocking(false)
        .map_err(|e| ContainerError::Failed(format!("console socket: {e}")))?;
    let fd = std_stream.as_raw_fd();
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| ContainerError::Failed(format!("receiving the terminal: {e}")))?;
    let cmsgs = msg
        .cmsgs()
        .map_err(|e| ContainerError::Failed(format!("receiving the terminal: {e}")))?;
    for c in cmsgs {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&first) = fds.first() {
                for &extra in &fds[1..] {
                    // SAFETY: descriptors received with SCM_RIGHTS are ours
                    // to close.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                // SAFETY: as above; this one is kept.
                return Ok(unsafe { OwnedFd::from_raw_fd(first) });
            }
        }
    }
    Err(ContainerError::Failed(
        "the console socket carried no terminal".into(),
    ))
}
