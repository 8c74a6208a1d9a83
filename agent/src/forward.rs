//! Port forwarding into the guest (Kubernetes' PortForward).
//!
//! containerd forwards a port by dialling `localhost:PORT` inside the
//! pod's network namespace on the host, where the guest is not. So the host
//! mirrors what listens in the guest: the agent reports the guest's
//! listening TCP ports (`WaitListeners`; the pod's containers share the
//! guest's network namespace, so `/proc/net/tcp{,6}` of the agent shows
//! them all), the shim listens on the same ports on the namespace's
//! loopback, and relays each connection over vsock port
//! [`FORWARD_VSOCK_PORT`] to here, where the agent connects to the port on
//! the guest's loopback. Only the host (CID 2) may connect, as with the API.
//!
//! The listening ports are read every second while the host waits: a few
//! system calls per second, no process.

use std::{collections::BTreeSet, time::Duration};

use futures::StreamExt;
use husk_protocols::FORWARD_VSOCK_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

/// TCP state LISTEN in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";
/// How often the listening ports are read while the host waits.
pub const POLL: Duration = Duration::from_secs(1);
/// The longest a WaitListeners call waits.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The listening ports in a `/proc/net/tcp` or `/proc/net/tcp6` table.
pub fn parse_listeners(table: &str) -> BTreeSet<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            if state != TCP_LISTEN {
                return None;
            }
            let port = local.rsplit_once(':')?.1;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// The TCP ports something in the guest listens on (IPv4 and IPv6).
pub fn listening_ports() -> BTreeSet<u16> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| parse_listeners(&t))
        .collect()
}

/// Waits until the listening ports differ from `known` or `max_wait` has
/// passed; returns them.
pub async fn wait_listeners(known: &BTreeSet<u16>, max_wait: Duration) -> BTreeSet<u16> {
    let deadline = tokio::time::Instant::now() + max_wait.min(MAX_WAIT);
    loop {
        let now = listening_ports();
        if &now != known || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Serves forwarded connections from the host until the listener fails.
pub async fn serve() -> std::io::Result<()> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, FORWARD_VSOCK_PORT))?;
    let mut conns = Box::pin(crate::listener::host_connections(
        listener,
        FORWARD_VSOCK_PORT,
    ));
    while let Some(conn) = conns.next().await {
        match conn {
            Ok(stream) => {
                tokio::spawn(async move {
                    if let Err(e) = relay(stream).await {
                        tracing::debug!("port forward: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!("port forward: accepting: {e}"),
        }
    }
    Ok(())
}

/// One forwarded connection: the port, then bytes both ways.
async fn relay(mut host: tokio_vsock::VsockStream) -> std::io::Result<()> {
    let mut port = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(10), host.read_exact(&mut port))
        .await
        .map_err(|_| std::io::Error::other("no port within 10 s"))??;
    let port = u16::from_be_bytes(port);
    let target = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(t) => Ok(t),
        Err(_) => tokio::net::TcpStream::connect(("::1", port)).await,
    };
    let mut target = match target {
        Ok(t) => t,
        Err(e) => {
            host.write_all(&[1]).await?;
            return Err(std::io::Error::other(format!("port {port}: {e}")));
        }
    };
    host.write_all(&[0]).await?;
    tokio::io::copy_bidirectional(&mut host, &mut target).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_ports_are_read_from_the_tcp_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1235 1 0 100 0 0 10 0
   2: 0200580A:0050 0100580A:C350 01 00000000:00000000 00:00000000 00000000     0        0 1236 1 0 20 4 29 10 -1
";
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0 100 0 0 10 0
";
        assert_eq!(parse_listeners(v4), BTreeSet::from([80, 8080]));
        assert_eq!(parse_listeners(v6), BTreeSet::from([443]));
        assert!(parse_listeners("").is_empty());
        assert!(parse_listeners("header\n garbage line\n0: zz:zz 0A\n").is_empty());
    }
}
