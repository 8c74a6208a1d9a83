//! Legacy PC devices on the port I/O bus.

mod i8042;
mod serial;

pub use i8042::ResetLine;
pub use serial::SerialConsole;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt or event line backed by an eventfd (an irqfd for
/// interrupts, a plain eventfd the VMM polls for reset).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
