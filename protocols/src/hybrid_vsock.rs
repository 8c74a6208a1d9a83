//! The host side of hybrid vsock (Firecracker's protocol, which husk-vmm
//! speaks): connect to the VM's vsock Unix socket, send `CONNECT <port>\n`,
//! and read `OK <host port>\n`. After that the Unix stream is a plain byte
//! stream to the guest port.
//!
//! Guest-initiated connections arrive the other way round: the VMM connects
//! to `<vsock uds>_<port>`, so a host service listens there
//! ([`port_socket_path`]).

use std::{
    ffi::OsString,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    time::{sleep, timeout, Instant},
};

/// Longest answer line accepted ("OK 4294967295\n" is 14 bytes).
const MAX_ANSWER: usize = 32;

/// The Unix socket a host service listens on for guest connections to
/// host vsock port `port`.
pub fn port_socket_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = OsString::from(uds.as_os_str());
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects once to guest `port`; fails if the guest refuses.
pub async fn connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    // Read the answer byte by byte: nothing after the newline belongs to it.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        if stream.read(&mut b).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("guest vsock port {port} refused the connection"),
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > MAX_ANSWER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hybrid vsock answer too long",
            ));
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text.strip_prefix("OK ").map(str::parse::<u32>) {
        Some(Ok(_)) => Ok(stream),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected hybrid vsock answer {text:?}"),
        )),
    }
}

/// Connects to guest `port`, retrying refusals until `deadline` passes
/// (a guest service may not be listening yet).
pub async fn connect_retry(uds: &Path, port: u32, within: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + within;
    let mut delay = Duration::from_millis(5);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match timeout(remaining.max(Duration::from_millis(1)), connect(uds, port)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) if Instant::now() + delay >= deadline => return Err(e),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to guest vsock port {port}"),
                ))
            }
            Ok(Err(_)) => {}
        }
        sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}
