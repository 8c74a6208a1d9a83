//! x86_64 specifics that need no KVM: the guest physical layout, CPUID
//! policy, the MP table, boot register values and the small instruction
//! stepper for what the host cannot emulate. Everything here is pure and
//! unit-tested; `vstate` applies it to KVM.

pub mod cpuid;
pub mod emulate;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod xsave;
