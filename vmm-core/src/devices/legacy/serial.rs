//! The serial console (COM1, 16550A) on top of vm-superio.
//!
//! Output only: the console exists for debugging and boot measurements; the
//! agent API is the control path. Every byte the guest writes is a VM exit,
//! so the console is only created when a log file is asked for.

use std::io::Write;

use vm_superio::{serial::NoEvents, Serial};

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// COM1 writing to `W`.
pub struct SerialConsole<W: Write + Send> {
    serial: Serial<EventFdTrigger, NoEvents, W>,
}

impl<W: Write + Send> std::fmt::Debug for SerialConsole<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

impl<W: Write + Send> SerialConsole<W> {
    /// A console raising `interrupt` and writing guest output to `out`.
    pub fn new(interrupt: EventFdTrigger, out: W) -> Self {
        Self {
            serial: Serial::new(interrupt, out),
        }
    }
}

impl<W: Write + Send> BusDevice for SerialConsole<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.serial.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.serial.write(off, *value) {
                crate::logger::guest_debug!("serial console write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_bytes_reach_the_sink() {
        let sink = Sink::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut console = SerialConsole::new(EventFdTrigger(evt), sink.clone());
        for b in b"hi\n" {
            console.write(0, &[*b]);
        }
        assert_eq!(sink.0.lock().expect("lock").as_slice(), b"hi\n");
        // The line status register says the transmitter is empty.
        let mut lsr = [0u8];
        console.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
