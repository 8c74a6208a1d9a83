//! KVM state: the VM (memory slots, in-kernel interrupt controllers) and the
//! vCPUs (boot registers, the run loop). Devices are reached only through the
//! buses handed in, so `vstate` does not depend on `devices`.

pub mod control;
pub mod vcpu;
pub mod vm;
