//! Port forwarding for CRI pods: the guest's listening ports, mirrored on
//! the loopback of the pod's network namespace.
//!
//! containerd serves Kubernetes' PortForward by dialling `localhost:PORT`
//! inside the pod's network namespace; in husk nothing of the pod listens
//! there. The shim asks the agent which TCP ports the guest listens on
//! (`WaitListeners`, answered when they change), listens on `127.0.0.1` with
//! the same ports in the pod's namespace, and relays each connection to the
//! agent's forwarding port, which connects to the port on the guest's
//! loopback (`agent/src/forward.rs`). Any port a container listens on can
//! be forwarded, with no iptables rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use husk_protocols::{agent::WaitListenersRequest, hybrid_vsock, FORWARD_VSOCK_PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::vm::Vm;

/// How long one WaitListeners call may wait in the guest.
const WAIT_MS: u32 = 30_000;
/// The least time between two WaitListeners calls.
const MIN_INTERVAL: Duration = Duration::from_millis(250);
/// The most ports mirrored for one pod. The list comes from the guest,
/// which is not trusted: a guest claiming every port must not make the
/// shim hold 65,535 sockets.
const MAX_PORTS: usize = 256;

/// The ports to mirror of what the guest reported: valid, non-zero, at
/// most [`MAX_PORTS`] (the lowest ones).
fn ports_to_mirror(reported: &[u32]) -> BTreeSet<u16> {
    let ports: BTreeSet<u16> = reported
        .iter()
        .filter_map(|p| u16::try_from(*p).ok())
        .filter(|p| *p != 0)
        .collect();
    if ports.len() > MAX_PORTS {
        tracing::warn!(
            reported = ports.len(),
            "the guest reports more listening ports than husk mirrors; forwarding the lowest {MAX_PORTS}"
        );
    }
    ports.into_iter().take(MAX_PORTS).collect()
}

/// Binds `127.0.0.1:port` inside network namespace `netns` (a socket
/// belongs to the namespace of the thread that makes it).
fn bind_in(netns: &Path, port: u16) -> std::io::Result<std::net::TcpListener> {
    let ns = std::fs::File::open(netns)?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
        let l = std::net::TcpListener::bind(("127.0.0.1", port))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}

/// Mirrors the guest's listening ports in `netns` until the VM stops.
pub async fn mirror(vm: Arc<Vm>, netns: PathBuf) {
    let mut listeners: BTreeMap<u16, tokio::task::JoinHandle<()>> = BTreeMap::new();
    let mut known: BTreeSet<u16> = BTreeSet::new();
    loop {
        let mut req = WaitListenersRequest::new();
        req.known = known.iter().map(|p| u32::from(*p)).collect();
        req.max_wait_ms = WAIT_MS;
        let ctx = ttrpc::context::with_timeout(i64::from(WAIT_MS + 30_000) * 1_000_000);
        let reported = match vm.agent.wait_listeners(ctx, &req).await {
            Ok(r) => r.ports,
            Err(e) => {
                if vm.stopping() || !vm.alive() {
                    break;
                }
                if let ttrpc::Error::RpcStatus(s) = &e {
                    if s.code.value() == ttrpc::Code::UNIMPLEMENTED as i32 {
                        tracing::warn!(
                            "the agent does not report listening ports: no port forwarding"
                        );
                        break;
                    }
                }
                tracing::warn!("waiting for the guest's listening ports: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // `known` is what the guest said (so it answers only on a change);
        // what is mirrored is bounded.
        let ports = ports_to_mirror(&reported);
        let all: BTreeSet<u16> = reported
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect();
        listeners.retain(|port, task| {
            let keep = ports.contains(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for port in &ports {
            if listeners.contains_key(port) {
                continue;
            }
            match bind_in(&netns, *port).and_then(tokio::net::TcpListener::from_std) {
                Ok(l) => {
                    let vm = vm.clone();
                    let port = *port;
                    listeners.insert(port, tokio::spawn(accept_loop(l, vm, port)));
                }
                Err(e) => {
                    tracing::warn!(port, "mirroring a guest port in the pod's namespace: {e}")
                }
            }
        }
        tracing::debug!(?ports, "guest listening ports mirrored");
        known = all;
        // A guest that answers at once, call after call, gets at most four
        // calls a second.
        tokio::time::sleep(MIN_INTERVAL).await;
    }
    for (_, task) in listeners {
        task.abort();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, vm: Arc<Vm>, port: u16) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let vm = vm.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay(conn, &vm, port).await {
                        tracing::debug!(port, "port forward: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(port, "port forward: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One forwarded connection: to the agent's forwarding port, the port,
/// its answer, then bytes both ways.
async fn relay(mut conn: tokio::net::TcpStream, vm: &Vm, port: u16) -> std::io::Result<()> {
    let mut guest = hybrid_vsock::connect(&vm.vsock, FORWARD_VSOCK_PORT).await?;
    guest.write_all(&port.to_be_bytes()).await?;
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(30), guest.read_exact(&mut answer))
        .await
        .map_err(|_| std::io::Error::other("the agent did not answer within 30 s"))??;
    if answer[0] != 0 {
        return Err(std::io::Error::other(format!(
            "nothing answers on port {port} in the guest"
        )));
    }
    tokio::io::copy_bidirectional(&mut conn, &mut guest).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_reported_ports_are_bounded_and_checked() {
        assert_eq!(
            ports_to_mirror(&[80, 0, 70_000, 443, 80]),
            BTreeSet::from([80, 443])
        );
        let all: Vec<u32> = (0..=65_535).collect();
        let got = ports_to_mirror(&all);
        assert_eq!(got.len(), MAX_PORTS);
        assert_eq!(got.first(), Some(&1));
    }
}
