//! virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]: its identity, features, config
//! space, and what to do when the driver activates or resets it. The
//! [`mmio::MmioTransport`] owns the queues and the register file and hands
//! the queues to the device on activation. Queue notifications arrive on
//! eventfds (KVM ioeventfds on the QueueNotify register), and interrupts
//! leave on an irqfd, so neither goes through the vCPU thread.

pub mod balloon;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// virtio feature bit: the device conforms to virtio 1.0+.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// The interrupt of one device: the status register the driver reads and
/// acknowledges, and the line (an irqfd) that raises it.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    line: Box<dyn InterruptLine>,
}

/// Something that raises an interrupt: an irqfd in the VMM, a counter in
/// tests.
pub trait InterruptLine: Send + Sync + std::fmt::Debug {
    /// Raises the interrupt.
    fn raise(&self) -> std::io::Result<()>;
}

impl InterruptLine for EventFd {
    fn raise(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

impl Interrupt {
    /// An interrupt raised through `line`.
    pub fn new(line: Box<dyn InterruptLine>) -> Arc<Self> {
        Arc::new(Self {
            status: AtomicU32::new(0),
            line,
        })
    }

    /// Sets `bits` in the status register and raises the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.raise() {
            crate::logger::guest_error!("raising a virtio interrupt failed: {e}");
        }
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Puts a saved status register back (without raising the line: the
    /// restored interrupt controller already holds what was pending).
    pub fn restore_status(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
    }
}

/// An interrupt line for tests that counts how often it was raised.
#[cfg(test)]
#[derive(Debug, Default, Clone)]
pub(crate) struct IrqCounter(pub Arc<std::sync::atomic::AtomicUsize>);

#[cfg(test)]
impl InterruptLine for IrqCounter {
    fn raise(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
impl IrqCounter {
    /// How often the line was raised.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Copies `data.len()` bytes of a device's config space `cfg` from
/// `offset`; reads outside it return zeros.
pub fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    match start
        .checked_add(data.len())
        .and_then(|end| cfg.get(start..end))
    {
        Some(src) => data.copy_from_slice(src),
        None => data.fill(0),
    }
}

/// The queues of an activated device as the transport handed them over,
/// with what a device needs to use them.
#[derive(Debug)]
pub struct ActiveQueues {
    /// Guest memory the queues live in.
    pub mem: GuestMemory,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The queues, in the device's order.
    pub queues: Vec<Queue>,
    /// Their notification eventfds.
    pub evts: Vec<EventFd>,
}

impl ActiveQueues {
    /// The queues the transport handed over on activation, checked to be
    /// the `expected` number, each with its eventfd.
    pub fn new(
        expected: usize,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        evts: Vec<EventFd>,
    ) -> Result<Self, ActivateError> {
        check_queue_count(expected, &queues, &evts)?;
        Ok(Self {
            mem,
            interrupt,
            queues,
            evts,
        })
    }

    /// Raises the interrupt for `queue` if the driver wants to hear of new
    /// used buffers (or if that cannot be told: better a spurious one).
    pub fn notify(&mut self, queue: usize, device: &str) {
        match self.queues[queue].needs_notification(&self.mem) {
            Ok(true) => self.interrupt.signal(INT_VRING),
            Ok(false) => {}
            Err(e) => {
                crate::logger::guest_warn!("{device}: checking queue {queue} notification: {e}");
                self.interrupt.signal(INT_VRING);
            }
        }
    }

    /// The live state of every queue, for snapshots.
    pub fn states(&self) -> Vec<virtio_queue::QueueState> {
        self.queues.iter().map(|q| q.state()).collect()
    }
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer queues than the device needs.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues the transport passed.
        got: usize,
    },
    /// A device-specific failure.
    #[error("{0}")]
    Device(String),
}

/// Refuses an activation with other than `expected` queues (and one
/// eventfd per queue).
pub fn check_queue_count(
    expected: usize,
    queues: &[Queue],
    evts: &[EventFd],
) -> Result<(), ActivateError> {
    if queues.len() != expected || evts.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            got: queues.len(),
        });
    }
    Ok(())
}

/// Tells a device's event-loop handler that its queues changed
/// (activated, reset, restored): the handler re-registers their eventfds.
pub fn signal_activation(evt: &EventFd) -> Result<(), ActivateError> {
    evt.write(1)
        .map_err(|e| ActivateError::Device(format!("signalling activation: {e}")))
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// How many queues, from the first, the device uses with the features
    /// the driver accepted; they must be ready when the driver says
    /// DRIVER_OK. The rest may stay unused (the balloon numbers its queues
    /// by the features taken).
    fn queues_in_use(&self) -> usize {
        self.queue_max_sizes().len()
    }
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// The driver accepted `features` (a subset of [`Self::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads the device config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device config space at `offset` (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start using `queues`. `queue_evts[i]` is
    /// signalled when the driver notifies queue `i`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: drop all queue state. Returns the
    /// queue eventfds so they can be reused.
    fn reset(&mut self) -> Option<Vec<EventFd>>;
    /// The live state of the queues of an activated device (the device
    /// advances them, so the transport's copies are stale), for snapshots.
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>>;
    /// The device was re-activated from a snapshot: tell the driver what
    /// could not be carried over (vsock: its connections are gone).
    fn after_restore(&mut self) {}
    /// Device-specific state a snapshot keeps (beyond config and queues).
    fn save_device_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Why the active device cannot be captured in a snapshot right now
    /// (asked with the vCPUs paused), or `None` if it can.
    fn snapshot_blocker(&self) -> Option<String> {
        None
    }
    /// Puts device-specific state back (before activation).
    fn restore_device_state(&mut self, _state: &[u8]) -> Result<(), String> {
        Ok(())
    }
}
