//! The husk agent API shared by the shim (client) and the agent (server).
//!
//! The API is defined in `protos/agent.proto`; this crate holds the code
//! generated from it plus the few constants both sides must agree on (vsock
//! ports, the readiness message). Keeping them here means a change to the
//! wire contract is one change in one place.

#![allow(missing_debug_implementations)]

/// Protobuf messages of the agent API.
#[allow(
    warnings,
    clippy::all,
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::undocumented_unsafe_blocks
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent/agent.rs"));
}

/// ttrpc client and server for the agent API (async).
#[allow(
    warnings,
    clippy::all,
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::undocumented_unsafe_blocks
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent/agent_ttrpc.rs"));
}

pub mod hybrid_vsock;
pub mod pack;
pub mod pattern;

/// Version of the agent API; bumped when a message or RPC is added.
pub const API_VERSION: u32 = 6;

/// Length of a process's stdio token (`Stdio.token`): the first bytes the
/// agent writes on each of the process's stream connections.
pub const STDIO_TOKEN_LEN: usize = 16;

/// Connects an agent API client over hybrid vsock (`uds` is the VM's vsock
/// socket), retrying for up to `within` while the agent starts listening.
pub async fn connect_agent(
    uds: &std::path::Path,
    within: std::time::Duration,
) -> std::io::Result<agent_ttrpc::AgentClient> {
    let stream = hybrid_vsock::connect_retry(uds, AGENT_VSOCK_PORT, within).await?;
    let socket = ttrpc::r#async::transport::Socket::from(stream);
    Ok(agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(
        socket,
    )))
}

/// Guest vsock port the agent's ttrpc server listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Host vsock port the agent connects to once it is ready to serve. The host
/// side of a guest-initiated hybrid vsock connection is the Unix socket
/// `<vsock uds>_<port>` (see vmm-core's vsock device).
pub const READY_VSOCK_PORT: u32 = 1025;

/// The vsock CID of the host, as seen from the guest.
pub const HOST_CID: u32 = 2;

/// The guest vsock port of port forwarding (see WaitListeners in the
/// agent API): the host sends a TCP port, the agent relays to it.
pub const FORWARD_VSOCK_PORT: u32 = 1026;

/// The guest path that names a pod's shared PID namespace in a container's
/// spec (CRI's `shareProcessNamespace`): the shim puts it where the host
/// spec names the sandbox's PID namespace, and the agent makes it exist
/// (a holder process, PID 1 of that namespace) before the container does.
pub const POD_PID_NAMESPACE: &str = "/run/husk/pod/pid";

/// Where the guest copies of watched volumes live (`PrepareVolume`'s
/// mirrors): `<GUEST_MIRRORS>/<container id>/<n>`, removed with the
/// container.
pub const GUEST_MIRRORS: &str = "/run/husk/volumes/mirror";

/// Where the pod's memory-backed emptyDirs are mounted in the guest
/// (`PrepareVolume`'s tmpfs), one per host volume, for the pod's life.
pub const GUEST_MEMORY_VOLUMES: &str = "/run/husk/volumes/memory";

/// Prefix of the one line the agent sends on the readiness connection:
/// `husk-agent ready <agent version> api <API_VERSION>\n`.
pub const READY_PREFIX: &str = "husk-agent ready ";

/// Builds the readiness line the agent sends.
pub fn ready_line(agent_version: &str) -> String {
    format!("{READY_PREFIX}{agent_version} api {API_VERSION}\n")
}

/// Parses a readiness line; returns the agent version and API version.
pub fn parse_ready_line(line: &str) -> Option<(&str, u32)> {
    let rest = line
        .strip_suffix('\n')
        .unwrap_or(line)
        .strip_prefix(READY_PREFIX)?;
    let (version, api) = rest.split_once(" api ")?;
    if version.is_empty() || version.contains(char::is_whitespace) {
        return None;
    }
    Some((version, api.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trips() {
        let line = ready_line("1.2.3");
        assert_eq!(parse_ready_line(&line), Some(("1.2.3", API_VERSION)));
    }

    #[test]
    fn ready_line_rejects_garbage() {
        assert_eq!(parse_ready_line(""), None);
        assert_eq!(parse_ready_line("hello\n"), None);
        assert_eq!(parse_ready_line("husk-agent ready  api 1\n"), None);
        assert_eq!(parse_ready_line("husk-agent ready 1 api x\n"), None);
    }
}
