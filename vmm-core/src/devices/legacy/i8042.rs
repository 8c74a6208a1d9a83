//! The i8042 keyboard controller, reduced to its reset line.
//!
//! The guest has no ACPI, so it cannot power itself off; husk's guest resets
//! instead (`reboot=k`: write 0xFE to port 0x64), and the VMM treats the reset
//! as the end of the VM. The agent does this for an orderly shutdown and the
//! kernel does it on panic (`panic=-1`).

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// Ports 0x60-0x64; a reset command signals the wrapped eventfd.
#[derive(Debug)]
pub struct ResetLine {
    dev: I8042Device<EventFdTrigger>,
}

impl ResetLine {
    /// A controller that signals `reset` when the guest resets the machine.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            dev: I8042Device::new(reset),
        }
    }
}

impl BusDevice for ResetLine {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.dev.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.dev.write(off, *value) {
                crate::logger::guest_warn!("i8042 reset signal failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut dev = ResetLine::new(EventFdTrigger(evt.try_clone().expect("clone")));
        assert!(evt.read().is_err(), "no reset yet");
        // The kernel waits for the input buffer to be empty (status bit 1).
        let mut status = [0u8];
        dev.read(4, &mut status);
        assert_eq!(status[0] & 0x2, 0);
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().expect("reset signalled"), 1);
    }
}
