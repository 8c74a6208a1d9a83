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
//!
//! A pod cannot share the host's namespaces (`hostNetwork`, `hostPID`,
//! `hostIPC`): its VM has a kernel of its own. Such a sandbox is refused
//! with an error naming the pod field and the way out (a runc
//! RuntimeClass), before anything is made. And no container ever shares
//! the agent's namespaces: a spec that leaves out a mount, PID, IPC or UTS
//! namespace gets a new one in the guest (the guest's own would be the
//! agent's: its processes, its vsock, its files).

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

/// Refuses a CRI sandbox that asks for one of the host's namespaces: a
/// sandbox spec without a PID namespace is a `hostPID` pod, without an IPC
/// namespace a `hostIPC` one (`hostNetwork` is refused where the pod
/// network is wired, `network.rs`).
pub fn refuse_host_namespaces(spec: &Spec) -> Result<(), String> {
    let has = |typ: LinuxNamespaceType| {
        spec.linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| ns.iter().any(|n| n.typ() == typ))
    };
    for (typ, ns, field, flag, what) in [
        (
            LinuxNamespaceType::Pid,
            "PID",
            "hostPID",
            "--pid=host",
            "processes",
        ),
        (
            LinuxNamespaceType::Ipc,
            "IPC",
            "hostIPC",
            "--ipc=host",
            "IPC objects",
        ),
    ] {
        if !has(typ) {
            return Err(format!(
                "husk does not run pods in the host's {ns} namespace ({field}: true, or \
                 {flag}): a pod VM has a kernel of its own and cannot see or share the host's \
                 {what}; use a runc RuntimeClass (or runtime) for this pod"
            ));
        }
    }
    Ok(())
}

/// The namespaces every container gets in the guest, new unless the spec
/// names one: without them it would share the agent's.
const ALWAYS_OWN: [LinuxNamespaceType; 4] = [
    LinuxNamespaceType::Mount,
    LinuxNamespaceType::Pid,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
];

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
/// path means nothing in the guest, so that namespace is made new. A
/// mount, PID, IPC or UTS namespace the spec leaves out is made new too
/// (see the module documentation); the IPC and UTS ones a CRI container
/// names by the sandbox's path are the guest's, which are the pod's, never
/// the agent's to reach through (the agent keeps no IPC objects).
pub fn guest_namespaces(namespaces: Vec<LinuxNamespace>) -> Vec<LinuxNamespace> {
    let mut out: Vec<LinuxNamespace> = namespaces
        .iter()
        .filter(|n| n.path().is_none() || !pod_shared(n.typ()))
        .cloned()
        .map(|mut n| {
            let shared_pid = n.typ() == LinuxNamespaceType::Pid && n.path().is_some();
            n.set_path(shared_pid.then(|| POD_PID_NAMESPACE.into()));
            n
        })
        .collect();
    for typ in ALWAYS_OWN {
        // A pod namespace named by path (IPC, UTS) stays the guest's.
        if !namespaces.iter().any(|n| n.typ() == typ) {
            let mut n = LinuxNamespace::default();
            n.set_typ(typ);
            n.set_path(None);
            out.push(n);
        }
    }
    out
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
        // A container of its own PID namespace gets a new one, and the
        // namespaces its spec leaves out are new too: none is the agent's.
        let own = guest_namespaces(vec![ns(LinuxNamespaceType::Pid, None)]);
        let kinds: Vec<_> = own.iter().map(|n| (n.typ(), n.path().clone())).collect();
        assert_eq!(
            kinds,
            vec![
                (LinuxNamespaceType::Pid, None),
                (LinuxNamespaceType::Mount, None),
                (LinuxNamespaceType::Ipc, None),
                (LinuxNamespaceType::Uts, None),
            ]
        );
        // Without any: all four made, the network left to the pod's.
        let bare = guest_namespaces(Vec::new());
        assert_eq!(bare.len(), 4);
        assert!(!bare.iter().any(|n| n.typ() == LinuxNamespaceType::Network));
    }

    #[test]
    fn host_namespaces_are_refused_by_name() {
        let with = |types: &[LinuxNamespaceType]| {
            let mut s = spec(&[("io.kubernetes.cri.container-type", "sandbox")], None);
            let ns: Vec<LinuxNamespace> = types
                .iter()
                .map(|&t| {
                    let mut n = LinuxNamespace::default();
                    n.set_typ(t);
                    n
                })
                .collect();
            s.set_linux(Some(
                oci_spec::runtime::LinuxBuilder::default()
                    .namespaces(ns)
                    .build()
                    .expect("linux"),
            ));
            s
        };
        use LinuxNamespaceType::{Ipc, Mount, Network, Pid, Uts};
        assert_eq!(
            refuse_host_namespaces(&with(&[Pid, Ipc, Uts, Network, Mount])),
            Ok(())
        );
        let e = refuse_host_namespaces(&with(&[Ipc, Uts, Network, Mount])).expect_err("hostPID");
        assert!(
            e.contains("hostPID: true") && e.contains("runc RuntimeClass"),
            "{e}"
        );
        let e = refuse_host_namespaces(&with(&[Pid, Uts, Network, Mount])).expect_err("hostIPC");
        assert!(e.contains("hostIPC: true"), "{e}");
    }
}
