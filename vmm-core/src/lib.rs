//! husk's virtual machine monitor.
//!
//! One `husk-vmm` process runs one microVM: KVM with an in-kernel irqchip,
//! guest memory in a shared memfd (so vhost-user devices can map it), PVH
//! direct boot of an uncompressed `vmlinux`, and a few devices: a serial
//! console (off unless asked for), the i8042 reset line, and virtio-mmio
//! devices declared on the kernel command line: virtio-vsock
//! (Firecracker-style hybrid vsock on Unix sockets), virtio-fs over
//! vhost-user, virtio-net on a tap and virtio-balloon.
//!
//! Layout: `arch` (pure x86 knowledge), `vstate` (KVM state and vCPU loop),
//! `devices`, `device_manager` (which devices a VM has and where), `bus` (exit dispatch), `boot` (loading the guest), `api`
//! (control socket), `vmm` (the build steps and the event loop). `arch` and
//! `vstate` never import `devices`.

pub mod api;
pub mod arch;
pub mod boot;
pub mod bus;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod logger;
pub mod memory;
pub mod persist;
pub mod profile;
pub mod seccomp;
pub mod snapshot;
pub mod template;
pub mod vmm;
pub mod vstate;

pub use config::{BalloonConfig, NetConfig, TapSource, VmConfig, VsockConfig};
pub use vmm::{ExitReason, Vmm, VmmError};

/// An error and its causes on one line ("a: b: c"), for logs and API replies.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
