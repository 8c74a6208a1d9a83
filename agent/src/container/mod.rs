//! The guest's containers and their processes.
//!
//! Each container is created by the runtime helper ([`crate::runtime`])
//! from an OCI bundle on the shared file system. The pieces, split where
//! they can be reasoned about (and tested) alone:
//!
//! - [`registry`] — which containers and processes exist and what state
//!   they are in; every rule the API enforces (ids, duplicates, "still
//!   running", init versus exec) lives here, and reaches the guest only
//!   through two small traits, so it is unit-tested with doubles.
//! - [`helper`] — the [`helper::Runtime`] those rules drive: each operation
//!   a run of the runtime helper, cloned from the helper server
//!   ([`crate::helper`]) or, without one, a fresh process of the agent.
//! - [`syscall`] — the few system calls the registry makes itself (a
//!   signal to one process, removing a failed container's cgroup).
//! - [`process`] — one process (a container's init or an exec): its exit
//!   status from the agent's reaper, and waiting for its output to drain
//!   so that everything it wrote reaches the host before its exit does.
//! - [`stdio`] — a process's standard streams: vsock streams of its own to
//!   host ports the shim listens on, each presenting the process's token
//!   first (the shim relays nothing else); pipes between process and agent
//!   (a program that opens `/dev/stdout` works, as with runc), or a
//!   terminal whose master side the container's init sends over a console
//!   socket.

mod helper;
mod process;
mod registry;
mod stdio;
mod syscall;

pub use registry::Containers;

use std::path::Path;

/// Why a container operation failed; the RPC layer maps it to a ttrpc code.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    /// It exists already.
    #[error("{0}")]
    Exists(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Not in a state that allows this.
    #[error("{0}")]
    State(String),
    /// The operation itself failed.
    #[error("{0}")]
    Failed(String),
}

type Result<T> = std::result::Result<T, ContainerError>;

/// Container and exec ids become file names in the guest: a short set of
/// characters, never a dot first.
fn valid_id(kind: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ContainerError::Invalid(format!("invalid {kind} id {id:?}")))
    }
}

/// Refuses a spec whose container would share a mount namespace with the
/// agent: it would see the agent's files and, being in the guest's initial
/// mount namespace, could open vsock sockets (the guest kernel only refuses
/// them outside it). A container gets a new mount namespace, never a path.
fn own_mount_namespace(spec: &oci_spec::runtime::Spec) -> Result<()> {
    use oci_spec::runtime::LinuxNamespaceType;
    let mount = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Mount));
    match mount {
        Some(n) if n.path().is_none() => Ok(()),
        Some(_) => Err(ContainerError::Invalid(
            "a container cannot join an existing mount namespace in the guest".into(),
        )),
        None => Err(ContainerError::Invalid(
            "the spec gives the container no mount namespace of its own".into(),
        )),
    }
}

/// Whether `spec` joins the pod's shared PID namespace, named by `link`.
fn joins_pod_pid_namespace(spec: &oci_spec::runtime::Spec, link: &Path) -> bool {
    use oci_spec::runtime::LinuxNamespaceType;
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::Pid && n.path().as_deref() == Some(link))
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocols::POD_PID_NAMESPACE;

    fn spec_with(namespaces: serde_json::Value) -> oci_spec::runtime::Spec {
        let mut v = serde_json::to_value(oci_spec::runtime::Spec::default()).expect("json");
        v["linux"]["namespaces"] = namespaces;
        serde_json::from_value(v).expect("spec")
    }

    #[test]
    fn containers_need_a_mount_namespace_of_their_own() {
        let ok = spec_with(serde_json::json!([{"type": "pid"}, {"type": "mount"}]));
        assert!(own_mount_namespace(&ok).is_ok());
        let none = spec_with(serde_json::json!([{"type": "pid"}]));
        assert!(matches!(
            own_mount_namespace(&none),
            Err(ContainerError::Invalid(m)) if m.contains("no mount namespace")
        ));
        let joined = spec_with(serde_json::json!([{"type": "mount", "path": "/proc/1/ns/mnt"}]));
        assert!(matches!(
            own_mount_namespace(&joined),
            Err(ContainerError::Invalid(m)) if m.contains("existing mount namespace")
        ));
    }

    #[test]
    fn only_the_pod_pid_namespace_link_means_the_pod() {
        let link = Path::new(POD_PID_NAMESPACE);
        let pod = spec_with(serde_json::json!([{"type": "pid", "path": POD_PID_NAMESPACE}]));
        assert!(joins_pod_pid_namespace(&pod, link));
        let own = spec_with(serde_json::json!([{"type": "pid"}, {"type": "mount"}]));
        assert!(!joins_pod_pid_namespace(&own, link));
        let net = spec_with(serde_json::json!([{"type": "network", "path": POD_PID_NAMESPACE}]));
        assert!(!joins_pod_pid_namespace(&net, link));
    }

    #[test]
    fn ids_are_short_plain_names() {
        for ok in ["a", "c-1", "x_y+z.2", &"a".repeat(128)] {
            assert!(valid_id("container", ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "sp ace", &"a".repeat(129), "é"] {
            assert!(
                matches!(valid_id("exec", bad), Err(ContainerError::Invalid(m)) if m.contains("exec id")),
                "{bad}"
            );
        }
    }
}
