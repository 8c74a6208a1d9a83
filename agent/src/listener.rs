//! Who may talk to the agent: the host, and nobody inside the guest.
//!
//! The agent API creates privileged containers, execs into any container,
//! mounts and shuts the VM down, so it must only be reachable from the
//! host (vsock CID 2, through husk-vmm's hybrid vsock). A connection from
//! inside the guest arrives with the guest's own CID or the loopback CID 1;
//! the listener closes it before ttrpc reads a byte. Container processes
//! cannot open vsock sockets at all (the guest kernel refuses them outside
//! the initial mount namespace); this is the second wall,
//! for whatever else runs in the guest.
//!
//! `husk.selfcheck=local-api` on the kernel command line makes the agent
//! try its own API from inside the guest once it listens and print what
//! happened on the console: the end-to-end proof that the wall stands.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use futures::stream::{self, Stream};
use husk_protocols::{agent::HealthRequest, agent_ttrpc::AgentClient, HOST_CID};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

/// The loopback CID (`VMADDR_CID_LOCAL`).
pub const LOCAL_CID: u32 = 1;

/// Whether a connection from `peer_cid` may use the agent API.
pub fn admitted(peer_cid: u32) -> bool {
    peer_cid == HOST_CID
}

/// Refused connections so far (all listeners): logged sparingly, so a
/// process that keeps knocking cannot flood the console.
static REFUSED: AtomicU64 = AtomicU64::new(0);

fn log_refusal(port: u32, peer: VsockAddr) {
    let n = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= 10 || n.is_power_of_two() {
        tracing::warn!(
            port,
            peer_cid = peer.cid(),
            peer_port = peer.port(),
            refused = n,
            "refused a vsock connection from inside the guest (only the host, CID {HOST_CID}, may connect)"
        );
    }
}

/// Accepts the next connection from the host on `listener`, closing any
/// from elsewhere.
pub async fn accept_from_host(listener: &VsockListener, port: u32) -> std::io::Result<VsockStream> {
    loop {
        let (stream, peer) = listener.accept().await?;
        if admitted(peer.cid()) {
            return Ok(stream);
        }
        log_refusal(port, peer);
        drop(stream);
    }
}

/// The connections from the host on `listener`, as a stream for ttrpc's
/// server. Accept errors (out of descriptors, say) are passed on after a
/// short pause, so that a persistent one cannot spin the agent.
pub fn host_connections(
    listener: VsockListener,
    port: u32,
) -> impl Stream<Item = std::io::Result<VsockStream>> + Send + 'static {
    stream::unfold(listener, move |listener| async move {
        let next = match accept_from_host(&listener, port).await {
            Ok(s) => Ok(s),
            Err(e) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err(e)
            }
        };
        Some((next, listener))
    })
}

/// What one connection to the API from inside the guest got.
async fn probe(cid: u32, port: u32) -> String {
    let connect = tokio::time::timeout(
        Duration::from_secs(10),
        VsockStream::connect(VsockAddr::new(cid, port)),
    )
    .await;
    let stream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return format!("refused at connect ({e})"),
        Err(_) => return "refused at connect (timed out)".into(),
    };
    let client = AgentClient::new(ttrpc::r#async::Client::new(
        ttrpc::r#async::transport::Socket::from(stream),
    ));
    let ctx = ttrpc::context::with_timeout(5_000_000_000);
    match client.health(ctx, &HealthRequest::new()).await {
        Ok(_) => "SERVED".into(),
        Err(e) => format!("refused ({e})"),
    }
}

/// Tries the agent API on `port` from inside the guest, over loopback and
/// over the guest's own CID, and prints one console line per attempt:
/// `husk-agent: self-check: API from CID <cid>: <outcome>`.
pub async fn self_check_local_api(port: u32) {
    let mut cids = vec![LOCAL_CID];
    match vsock::get_local_cid() {
        Ok(own) if own != LOCAL_CID => cids.push(own),
        Ok(_) => {}
        Err(e) => eprintln!("husk-agent: self-check: no local CID: {e}"),
    }
    for cid in cids {
        let outcome = probe(cid, port).await;
        eprintln!("husk-agent: self-check: API from CID {cid}: {outcome}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_is_admitted() {
        assert!(admitted(HOST_CID));
        for cid in [0, LOCAL_CID, 3, 4, 1000, u32::MAX] {
            assert!(!admitted(cid), "CID {cid}");
        }
    }
}
