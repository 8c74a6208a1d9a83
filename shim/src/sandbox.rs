//! How husk maps a CRI pod onto its VM, decided from the OCI spec alone
//! (pure functions, unit-tested here).
//!
//! The VM is the pod. CRI first creates a *sandbox* container (Kubernetes'
//! pause image), whose only job under runc is to hold the pod's network,
//! IPC and UTS namespaces for the app containers to join. In husk the guest
//! itself holds them: its root network namespace carries the pod's
//! interface, its hostname is the pod's. So the sandbox container runs
//! nothing in the guest: its task is the pod VM (its pid is `husk-vmm`'s),
//! it exits when killed or when the VM dies, and deleting it lets the shim
//! take the VM down. That saves a container start (seconds where guest
//! kernel code is emulated) and a process in every pod.
//!
//! App containers that name a pod namespace by host path (CRI's
//! `/proc/<sandbox pid>/ns/{net,ipc,uts}`) stay in the guest's. A PID
//! namespace named by host path (`shareProcessNamespace`) is the pod's
//! shared one, which the agent makes in the guest when a container first
//! joins it (no cost to pods that do not share); every other namespace is
//! made new in the guest.

use husk_protocols::POD_PID_NAMESPACE;
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Spec};

const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// What a container is to its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// CRI's sandbox (pause) container: the pod VM itself.
    Sandbox,
    /// An app container of CRI pod `sandbox`.
    Member {
        /// The sandbox id.
        sandbox: String,
    },
    /// A container on its own (`ctr run`): its own pod VM.
    Alone,
}

impl Role {
    /// The sandbox (pod VM) a container with this role and `id` belongs to.
    pub fn pod(&self, id: &str) -> String {
        match self {
            Role::Member { sandbox } => sandbox.clone(),
            Role::Sandbox | Role::Alone => id.to_string(),
        }
    }
}

/// The role of container `spec` as CRI's annotations give it.
pub fn role(spec: &Spec) -> Role {
    let annotations = spec.annotations().as_ref();
    let get = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
    match (get(CONTAINER_TYPE), get(SANDBOX_ID)) {
        (Some("sandbox"), _) => Role::Sandbox,
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => Role::Member {
            sandbox: sandbox.to_string(),
        },
        _ => Role::Alone,
    }
}

/// The guest's hostname for a pod whose first container is `spec` (`id`):
/// the spec's hostname (CRI's pod hostname, `ctr run --hostname`), else the
/// id cut to the 63 bytes a hostname may have.
pub fn hostname(spec: &Spec, id: &str) -> String {
    spec.hostname()
        .as_deref()
        .filter(|h| !h.is_empty())
        .unwrap_or(id)
        .chars()
        .take(63)
        .collect()
}

/// Whether a namespace of type `typ` named by a host path is one the pod
/// shares, which in husk is the guest's own.
fn pod_shared(typ: LinuxNamespaceType) -> bool {
    matches!(
        typ,
        LinuxNamespaceType::Network | LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts
    )
}

/// The guest's namespaces for a container whose spec asks for `namespaces`:
/// a pod namespace named by host path is left out (the container stays in
/// the guest's, which is the pod's); a PID namespace named by host path
/// (CRI's `shareProcessNamespace`: the sandbox's) becomes the pod's shared
/// one in the guest, which the agent makes on first use; any other host
/// path means nothing in the guest, so that namespace is made new.
pub fn guest_namespaces(namespaces: Vec<LinuxNamespace>) -> Vec<LinuxNamespace> {
    namespaces
        .into_iter()
        .filter(|n| n.path().is_none() || !pod_shared(n.typ()))
        .map(|mut n| {
            let shared_pid = n.typ() == LinuxNamespaceType::Pid && n.path().is_some();
            n.set_path(shared_pid.then(|| POD_PID_NAMESPACE.into()));
            n
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A spec with `annotations` and `hostname` (also `sizing`'s tests).
    pub(crate) fn spec(annotations: &[(&str, &str)], hostname: Option<&str>) -> Spec {
        let mut s = Spec::default();
        s.set_annotations(Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        s.set_hostname(hostname.map(str::to_string));
        s
    }

    #[test]
    fn cri_containers_join_their_sandbox_and_others_stand_alone() {
        let pause = spec(
            &[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "pod1")],
            Some("web"),
        );
        assert_eq!(role(&pause), Role::Sandbox);
        assert_eq!(role(&pause).pod("pod1"), "pod1");
        let app = spec(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "pod1")], None);
        assert_eq!(role(&app).pod("app1"), "pod1");
        // Without a sandbox id (or without CRI) a container stands alone.
        let orphan = spec(&[(CONTAINER_TYPE, "container")], None);
        assert_eq!(role(&orphan), Role::Alone);
        assert_eq!(role(&Spec::default()), Role::Alone);
        assert_eq!(role(&Spec::default()).pod("c1"), "c1");
    }

    #[test]
    fn the_pod_hostname_comes_from_the_spec() {
        assert_eq!(hostname(&spec(&[], Some("web-0")), "abc"), "web-0");
        assert_eq!(hostname(&spec(&[], None), "abc"), "abc");
        assert_eq!(hostname(&spec(&[], Some("")), "abc"), "abc");
        assert_eq!(hostname(&spec(&[], None), &"x".repeat(64)).len(), 63);
    }

    #[test]
    fn pod_namespaces_are_the_guests_and_the_rest_are_new() {
        let ns = |typ, path: Option<&str>| {
            let mut n = LinuxNamespace::default();
            n.set_typ(typ);
            n.set_path(path.map(Into::into));
            n
        };
        let got = guest_namespaces(vec![
            ns(LinuxNamespaceType::Network, Some("/proc/42/ns/net")),
            ns(LinuxNamespaceType::Ipc, Some("/proc/42/ns/ipc")),
            ns(LinuxNamespaceType::Uts, Some("/proc/42/ns/uts")),
            ns(LinuxNamespaceType::Pid, Some("/proc/42/ns/pid")),
            ns(LinuxNamespaceType::Mount, None),
            ns(LinuxNamespaceType::Network, None),
        ]);
        let kinds: Vec<_> = got
            .iter()
            .map(|n| (n.typ(), n.path().as_ref().map(|p| p.display().to_string())))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (LinuxNamespaceType::Pid, Some(POD_PID_NAMESPACE.to_string())),
                (LinuxNamespaceType::Mount, None),
                (LinuxNamespaceType::Network, None),
            ]
        );
        // A container of its own PID namespace gets a new one.
        let own = guest_namespaces(vec![ns(LinuxNamespaceType::Pid, None)]);
        assert_eq!(own[0].path(), &None);
    }
}
