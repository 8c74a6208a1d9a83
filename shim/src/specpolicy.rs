//! What of containerd's spec reaches the guest: a written policy, applied
//! to every container before its spec is written for the guest.
//!
//! * **OCI hooks are dropped**, each one logged with its stage and path.
//!   A hook is a host program (its path is a host path), written for the
//!   host's namespaces and the host's pid of the container. In the guest it
//!   would run a program of the guest's choosing as guest root, outside any
//!   container, in the agent's own mount namespace (where vsock and the
//!   pod's share are reachable); husk does not run hooks on the host
//!   either (they would act on a VM, not on the process they expect).
//!   Dropping rather than refusing keeps specs that carry hooks for the
//!   host's benefit (nerdctl's networking hook, NRI plugins) running, with
//!   the hook's effect missing and said in the shim's log.
//! * **Host devices are dropped**: `--privileged` (and device plugins)
//!   list the host's device nodes by major and minor number. In the guest
//!   those numbers name the guest's own devices or none, never the host's
//!   hardware, and creating hundreds of nodes costs seconds of emulated
//!   guest kernel work. Only the pseudo-devices every kernel has are kept
//!   (null, zero, full, random, urandom, tty, console, ptmx, net/tun,
//!   fuse); the others are logged, as a count.

use oci_spec::runtime::{LinuxDeviceType, Spec};

/// The devices kept: (type, major, minor), the pseudo-devices of any
/// Linux kernel, the guest's included.
const PSEUDO_DEVICES: &[(LinuxDeviceType, i64, i64)] = &[
    (LinuxDeviceType::C, 1, 3),    // null
    (LinuxDeviceType::C, 1, 5),    // zero
    (LinuxDeviceType::C, 1, 7),    // full
    (LinuxDeviceType::C, 1, 8),    // random
    (LinuxDeviceType::C, 1, 9),    // urandom
    (LinuxDeviceType::C, 5, 0),    // tty
    (LinuxDeviceType::C, 5, 1),    // console
    (LinuxDeviceType::C, 5, 2),    // ptmx
    (LinuxDeviceType::C, 10, 200), // net/tun
    (LinuxDeviceType::C, 10, 229), // fuse
];

/// Applies the policy to `spec`; returns what it dropped, one line each,
/// for the log.
pub fn apply(spec: &mut Spec) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(hooks) = spec.hooks().clone() {
        let stages = [
            ("prestart", hooks.prestart()),
            ("createRuntime", hooks.create_runtime()),
            ("createContainer", hooks.create_container()),
            ("startContainer", hooks.start_container()),
            ("poststart", hooks.poststart()),
            ("poststop", hooks.poststop()),
        ];
        for (stage, list) in stages {
            for h in list.iter().flatten() {
                notes.push(format!(
                    "dropped the OCI {stage} hook {}: hooks do not run in a husk pod",
                    h.path().display()
                ));
            }
        }
        spec.set_hooks(None);
    }
    if let Some(linux) = spec.linux_mut() {
        if let Some(devices) = linux.devices().clone() {
            let (kept, dropped): (Vec<_>, Vec<_>) = devices.into_iter().partition(|d| {
                PSEUDO_DEVICES
                    .iter()
                    .any(|(t, ma, mi)| d.typ() == *t && d.major() == *ma && d.minor() == *mi)
            });
            if !dropped.is_empty() {
                let some: Vec<String> = dropped
                    .iter()
                    .take(5)
                    .map(|d| d.path().display().to_string())
                    .collect();
                notes.push(format!(
                    "dropped {} host device(s) the guest does not have ({}{})",
                    dropped.len(),
                    some.join(", "),
                    if dropped.len() > some.len() {
                        ", …"
                    } else {
                        ""
                    }
                ));
            }
            linux.set_devices(Some(kept));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{HookBuilder, HooksBuilder, LinuxBuilder, LinuxDeviceBuilder};

    fn device(
        path: &str,
        typ: LinuxDeviceType,
        major: i64,
        minor: i64,
    ) -> oci_spec::runtime::LinuxDevice {
        LinuxDeviceBuilder::default()
            .path(path)
            .typ(typ)
            .major(major)
            .minor(minor)
            .build()
            .expect("device")
    }

    #[test]
    fn hooks_and_host_devices_do_not_reach_the_guest() {
        let hook = |p: &str| HookBuilder::default().path(p).build().expect("hook");
        let mut spec = Spec::default();
        spec.set_hooks(Some(
            HooksBuilder::default()
                .create_runtime(vec![hook("/usr/local/bin/nerdctl")])
                .poststop(vec![hook("/usr/bin/cleanup")])
                .build()
                .expect("hooks"),
        ));
        spec.set_linux(Some(
            LinuxBuilder::default()
                .devices(vec![
                    device("/dev/null", LinuxDeviceType::C, 1, 3),
                    device("/dev/sda", LinuxDeviceType::B, 8, 0),
                    device("/dev/net/tun", LinuxDeviceType::C, 10, 200),
                    device("/dev/kvm", LinuxDeviceType::C, 10, 232),
                    // A block device with a pseudo-device's numbers is not
                    // one.
                    device("/dev/fake", LinuxDeviceType::B, 1, 3),
                ])
                .build()
                .expect("linux"),
        ));
        let notes = apply(&mut spec);
        assert!(spec.hooks().is_none());
        let kept: Vec<String> = spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().clone())
            .expect("devices")
            .iter()
            .map(|d| d.path().display().to_string())
            .collect();
        assert_eq!(kept, ["/dev/null", "/dev/net/tun"]);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(
            notes[0].contains("createRuntime hook /usr/local/bin/nerdctl"),
            "{notes:?}"
        );
        assert!(
            notes[1].contains("poststop hook /usr/bin/cleanup"),
            "{notes:?}"
        );
        assert!(
            notes[2].contains("dropped 3 host device(s)") && notes[2].contains("/dev/sda"),
            "{notes:?}"
        );
        // A spec without either is left alone.
        let mut plain = Spec::default();
        let before = serde_json::to_string(&plain).expect("json");
        assert!(apply(&mut plain).is_empty());
        assert_eq!(serde_json::to_string(&plain).expect("json"), before);
    }
}
