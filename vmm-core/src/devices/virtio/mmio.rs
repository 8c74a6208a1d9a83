//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).
//!
//! The register file is driven from vCPU threads (MMIO exits); everything
//! the guest writes here is untrusted: sizes, addresses and the order of
//! status transitions are checked, and a driver that gets them wrong sees
//! the device refuse (FAILED / NEEDS_RESET) instead of the VMM misbehaving.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice, INT_CONFIG};
use crate::{bus::BusDevice, memory::GuestMemory};

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b53_5548; // "HUSK"

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// A queue as a snapshot keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Set up by the driver.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

/// The transport's registers and queues, as a snapshot keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device type (checked on restore).
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// QueueSel.
    pub queue_select: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Whether the device was activated.
    pub activated: bool,
    /// The queues.
    pub queues: Vec<QueueSnapshot>,
    /// Device-specific state.
    pub device_state: Vec<u8>,
}

/// Errors restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot is of another kind of device.
    #[error("snapshot holds device type {found}, this slot has {expected}")]
    DeviceType {
        /// In the snapshot.
        found: u32,
        /// Here.
        expected: u32,
    },
    /// Queue count or sizes differ.
    #[error("snapshot queues do not match the device")]
    Queues,
    /// The driver had features this device does not offer (the VM was
    /// configured differently when the snapshot was taken).
    #[error("snapshot's driver took features {0:#x} this device does not offer")]
    Features(u64),
    /// Activating the device failed.
    #[error("re-activating the device: {0}")]
    Activate(String),
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue size the virtio-queue crate rejects.
    #[error("invalid queue size {0}")]
    QueueSize(u16),
    /// Creating a queue eventfd failed.
    #[error("creating a queue eventfd")]
    EventFd(#[source] std::io::Error),
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is its interrupt line.
    pub fn new(
        mem: GuestMemory,
        device: Box<dyn VirtioDevice>,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &size in device.queue_max_sizes() {
            queues.push(Queue::new(size).map_err(|_| MmioError::QueueSize(size))?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The eventfds signalled on QueueNotify, one per queue, for the VMM to
    /// register as KVM ioeventfds (datamatch = queue index).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The wrapped device's type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Whether the driver has activated the device.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device, for the VMM's event loop.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The interrupt of this device.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Why the device cannot be captured in a snapshot now (vCPUs
    /// paused), or `None`.
    pub fn snapshot_blocker(&self) -> Option<String> {
        if !self.activated {
            return None;
        }
        self.device.snapshot_blocker()
    }

    /// The transport's state for a snapshot (vCPUs paused).
    pub fn save_state(&self) -> TransportState {
        let queues = match self.device.queue_states().filter(|_| self.activated) {
            Some(live) => live.into_iter().map(QueueSnapshot::from).collect(),
            None => self
                .queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect(),
        };
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues,
            device_state: self.device.save_device_state(),
        }
    }

    /// Puts a saved state into this fresh transport; re-activates the
    /// device if it was active.
    pub fn restore_state(&mut self, s: &TransportState) -> Result<(), RestoreError> {
        let expected = self.device.device_type();
        if s.device_type != expected {
            return Err(RestoreError::DeviceType {
                found: s.device_type,
                expected,
            });
        }
        let sizes_match = s.queues.len() == self.queues.len()
            && s.queues
                .iter()
                .zip(self.device.queue_max_sizes())
                .all(|(q, &max)| q.max_size == max);
        if !sizes_match {
            return Err(RestoreError::Queues);
        }
        let unoffered = s.driver_features & !self.device.features();
        if unoffered != 0 {
            return Err(RestoreError::Features(unoffered));
        }
        self.device
            .restore_device_state(&s.device_state)
            .map_err(RestoreError::Activate)?;
        let queues: Result<Vec<Queue>, _> = s
            .queues
            .iter()
            .map(|q| Queue::try_from(QueueState::from(*q)))
            .collect();
        self.queues = queues.map_err(|_| RestoreError::Queues)?;
        self.status = s.status;
        self.driver_features = s.driver_features;
        self.device_features_select = s.device_features_select;
        self.driver_features_select = s.driver_features_select;
        self.queue_select = s.queue_select;
        self.config_generation = s.config_generation;
        self.interrupt.restore_status(s.interrupt_status);
        if s.status & status::FEATURES_OK != 0 {
            self.device.ack_features(s.driver_features);
        }
        if s.activated {
            self.activate_device().map_err(RestoreError::Activate)?;
            self.device.after_restore();
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let i = usize::try_from(self.queue_select).ok()?;
        self.queues.get_mut(i)
    }

    fn with_queue<F: FnOnce(&mut Queue)>(&mut self, f: F) {
        // Queue registers may only change before the driver says DRIVER_OK.
        if self.status & status::DRIVER_OK != 0 {
            crate::logger::guest_warn!(
                "virtio-mmio: queue register written after DRIVER_OK; ignored"
            );
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    // The 64-bit feature word is read in two 32-bit halves.
    #[allow(clippy::cast_possible_truncation)]
    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MMIO_MAGIC,
            0x004 => MMIO_VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let f = self.device.features();
                match self.device_features_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => {
                crate::logger::guest_debug!(offset, "virtio-mmio: read of an unknown register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x014 => self.device_features_select = v,
            0x020 => {
                if self.status & status::FEATURES_OK != 0 {
                    crate::logger::guest_warn!(
                        "virtio-mmio: features written after FEATURES_OK; ignored"
                    );
                    return;
                }
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features = (self.driver_features & !mask) | (u64::from(v) << shift);
            }
            0x024 => self.driver_features_select = v,
            0x030 => self.queue_select = v,
            0x038 => self.with_queue(|q| q.set_size(u16::try_from(v).unwrap_or(0))),
            0x044 => self.with_queue(|q| q.set_ready(v == 1)),
            0x050 => {
                // Notifications normally arrive through ioeventfds; this path
                // only runs if the ioeventfd is missing.
                if let Some(evt) = usize::try_from(v).ok().and_then(|i| self.queue_evts.get(i)) {
                    let _ = evt.write(1);
                }
            }
            0x064 => self.interrupt.ack(v),
            0x070 => self.set_status(v),
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => crate::logger::guest_debug!(offset, "virtio-mmio: write to an unknown register"),
        }
    }

    fn set_status(&mut self, v: u32) {
        // The status is 8 bits wide (virtio 1.2, 4.2.2); the rest of the
        // register is reserved and ignored.
        let v = v & 0xff;
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // Bits may only be added, never removed, except by a reset.
        if v & old != old {
            crate::logger::guest_warn!(
                old,
                new = v,
                "virtio-mmio: driver cleared status bits without a reset"
            );
            self.status |= status::FAILED;
            return;
        }
        if v & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 {
                crate::logger::guest_warn!(
                    offered,
                    asked = self.driver_features,
                    "virtio-mmio: driver accepted features the device does not offer"
                );
                // Leave FEATURES_OK clear: the driver must see it refused.
                self.status = v & !status::FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        self.status = v;
        if v & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & (status::FAILED | status::DEVICE_NEEDS_RESET) != 0 {
            // Found by the mmio_transport fuzz target: DRIVER_OK written
            // together with FAILED (the driver gave up) or with the
            // device's own NEEDS_RESET bit activated the device.
            crate::logger::guest_warn!(
                status = self.status,
                "virtio-mmio: DRIVER_OK with FAILED or DEVICE_NEEDS_RESET; not activating"
            );
            self.status |= status::FAILED;
            return;
        }
        if self.status & status::FEATURES_OK == 0 {
            crate::logger::guest_warn!("virtio-mmio: DRIVER_OK without FEATURES_OK");
            self.status |= status::FAILED;
            return;
        }
        let in_use = self.device.queues_in_use().min(self.queues.len());
        for (i, q) in self.queues[..in_use].iter().enumerate() {
            if !q.is_valid(&self.mem) {
                crate::logger::guest_warn!(
                    queue = i,
                    "virtio-mmio: queue is not valid for guest memory"
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal(INT_CONFIG);
                return;
            }
        }
        if let Err(e) = self.activate_device() {
            crate::logger::guest_error!(
                "virtio-mmio: activating device type {}: {e}",
                self.device.device_type()
            );
            self.status |= status::DEVICE_NEEDS_RESET;
            self.interrupt.signal(INT_CONFIG);
        }
    }

    /// Hands the device its own copies of the queues (the transport keeps
    /// the originals for register reads until the next reset) and the
    /// queue eventfds, and activates it.
    fn activate_device(&mut self) -> Result<(), String> {
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let queues = queues.map_err(|e| format!("queue state is not valid: {e:?}"))?;
        let evts: Result<Vec<EventFd>, _> =
            self.queue_evts.iter().map(EventFd::try_clone).collect();
        let evts = evts.map_err(|e| format!("cloning queue eventfds: {e}"))?;
        self.device
            .activate(self.mem.clone(), self.interrupt.clone(), queues, evts)
            .map_err(|e| e.to_string())?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.queue_select = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.interrupt.ack(u32::MAX);
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            crate::logger::guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: unaligned register read"
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::logger::guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: unaligned register write"
            );
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

/// A transport shared between the bus (vCPU threads) and the event loop.
pub type SharedTransport = Arc<Mutex<MmioTransport>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, IrqCounter, VIRTIO_F_VERSION_1};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Dummy {
        acked: u64,
        /// Queues in use (`None`: all).
        in_use: Option<usize>,
        activated: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
        config: [u8; 8],
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn queues_in_use(&self) -> usize {
            self.in_use.unwrap_or(2)
        }
        fn features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 1
        }
        fn ack_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let o = usize::try_from(offset).unwrap_or(usize::MAX);
            if let Some(src) = o
                .checked_add(data.len())
                .and_then(|end| self.config.get(o..end))
            {
                data.copy_from_slice(src);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _m: GuestMemory,
            _i: Arc<Interrupt>,
            q: Vec<Queue>,
            e: Vec<EventFd>,
        ) -> Result<(), ActivateError> {
            assert_eq!((q.len(), e.len()), (2, 2));
            self.activated.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) -> Option<Vec<EventFd>> {
            self.resets.fetch_add(1, Ordering::SeqCst);
            None
        }
        fn queue_states(&self) -> Option<Vec<QueueState>> {
            None
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> (MmioTransport, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        transport_using(None)
    }

    fn transport_using(
        in_use: Option<usize>,
    ) -> (MmioTransport, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        let dev = Dummy {
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            in_use,
            ..Default::default()
        };
        let (a, r) = (dev.activated.clone(), dev.resets.clone());
        let irq = Interrupt::new(Box::new(IrqCounter::default()));
        (
            MmioTransport::new(mem, Box::new(dev), irq).expect("transport"),
            a,
            r,
        )
    }

    /// A driver's steps up to DRIVER_OK: DRIVER, VIRTIO_F_VERSION_1,
    /// FEATURES_OK, then both queues set up.
    fn negotiate(t: &mut MmioTransport) {
        wr(t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, 0x024, 1);
        wr(t, 0x020, 1);
        wr(
            t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        setup_queues(t);
    }

    fn setup_queues(t: &mut MmioTransport) {
        for q in 0..2u32 {
            wr(t, 0x030, q);
            assert_eq!(rd(t, 0x034), 16);
            wr(t, 0x038, 16);
            let base = 0x1000 * (q + 1);
            wr(t, 0x080, base);
            wr(t, 0x090, base + 0x200);
            wr(t, 0x0a0, base + 0x400);
            wr(t, 0x044, 1);
        }
    }

    #[test]
    fn identifies_itself() {
        let (mut t, _, _) = transport();
        assert_eq!(rd(&mut t, 0x000), MMIO_MAGIC);
        assert_eq!(rd(&mut t, 0x004), 2);
        assert_eq!(rd(&mut t, 0x008), 42);
        wr(&mut t, 0x014, 1);
        assert_eq!(rd(&mut t, 0x010), 1);
        wr(&mut t, 0x014, 0);
        assert_eq!(rd(&mut t, 0x010), 1);
        let mut cfg = [0u8; 2];
        t.read(0x102, &mut cfg);
        assert_eq!(cfg, [3, 4]);
    }

    #[test]
    fn full_handshake_activates_and_reset_resets() {
        let (mut t, activated, resets) = transport();
        wr(&mut t, 0x070, status::ACKNOWLEDGE);
        negotiate(&mut t);
        assert_ne!(rd(&mut t, 0x070) & status::FEATURES_OK, 0);
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(activated.load(Ordering::SeqCst), 1);
        assert!(t.is_activated());
        // Queue registers are frozen after DRIVER_OK.
        wr(&mut t, 0x030, 0);
        wr(&mut t, 0x044, 0);
        assert_eq!(rd(&mut t, 0x044), 1);
        wr(&mut t, 0x070, 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut t, 0x070), 0);
        assert_eq!(rd(&mut t, 0x044), 0);
    }

    #[test]
    fn refuses_unoffered_features() {
        let (mut t, _, _) = transport();
        wr(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x024, 0);
        wr(&mut t, 0x020, 0x2);
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&mut t, 0x070) & status::FEATURES_OK, 0);
    }

    #[test]
    fn refuses_invalid_queues_and_bad_transitions() {
        let (mut t, activated, _) = transport();
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        // Queue 0 points outside guest memory.
        wr(&mut t, 0x030, 0);
        wr(&mut t, 0x038, 16);
        wr(&mut t, 0x080, 0xffff_0000);
        wr(&mut t, 0x044, 1);
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(activated.load(Ordering::SeqCst), 0);
        assert_ne!(rd(&mut t, 0x070) & status::DEVICE_NEEDS_RESET, 0);
        // Clearing bits without a reset fails the device.
        wr(&mut t, 0x070, status::ACKNOWLEDGE);
        assert_ne!(rd(&mut t, 0x070) & status::FAILED, 0);
        // DRIVER_OK without FEATURES_OK after a reset.
        wr(&mut t, 0x070, 0);
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_ne!(rd(&mut t, 0x070) & status::FAILED, 0);
    }

    /// A device that uses fewer queues than it has (the balloon, by the
    /// features taken) activates with the rest left unset; a queue in use
    /// must still be set up.
    #[test]
    fn only_the_queues_in_use_must_be_ready() {
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        for (in_use, activates) in [(1, true), (2, false)] {
            let (mut t, activated, _) = transport_using(Some(in_use));
            wr(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
            wr(&mut t, 0x024, 1);
            wr(&mut t, 0x020, 1);
            wr(&mut t, 0x070, ok & !status::DRIVER_OK);
            // Only queue 0 is set up.
            wr(&mut t, 0x030, 0);
            wr(&mut t, 0x038, 16);
            wr(&mut t, 0x080, 0x1000);
            wr(&mut t, 0x090, 0x1200);
            wr(&mut t, 0x0a0, 0x1400);
            wr(&mut t, 0x044, 1);
            wr(&mut t, 0x070, ok);
            assert_eq!(
                activated.load(Ordering::SeqCst) == 1,
                activates,
                "{in_use} in use"
            );
            assert_eq!(
                rd(&mut t, 0x070) & status::DEVICE_NEEDS_RESET != 0,
                !activates,
                "{in_use} in use"
            );
        }
    }

    #[test]
    fn driver_ok_with_failed_does_not_activate() {
        let (mut t, activated, _) = transport();
        negotiate(&mut t);
        // Reserved high bits are ignored; FAILED with DRIVER_OK is not an
        // activation.
        wr(
            &mut t,
            0x070,
            0xff00_0000
                | status::ACKNOWLEDGE
                | status::DRIVER
                | status::FEATURES_OK
                | status::DRIVER_OK
                | status::FAILED,
        );
        assert_eq!(activated.load(Ordering::SeqCst), 0);
        assert!(!t.is_activated());
        assert_eq!(rd(&mut t, 0x070) >> 8, 0, "reserved bits read as zero");
    }

    #[test]
    fn state_round_trips_into_a_fresh_transport() {
        let (mut t, activated, _) = transport();
        negotiate(&mut t);
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(activated.load(Ordering::SeqCst), 1);
        let saved = t.save_state();
        assert!(saved.activated);
        assert_eq!(saved.queues.len(), 2);

        let (mut fresh, activated2, _) = transport();
        fresh.restore_state(&saved).expect("restore");
        assert!(fresh.is_activated());
        assert_eq!(
            activated2.load(Ordering::SeqCst),
            1,
            "the device was re-activated"
        );
        assert_eq!(fresh.save_state(), saved);
        assert_eq!(rd(&mut fresh, 0x070), saved.status);
        wr(&mut fresh, 0x030, 1);
        assert_eq!(rd(&mut fresh, 0x044), 1, "queue 1 is ready again");

        // A snapshot of another device type or queue layout is refused.
        let (mut other, _, _) = transport();
        let wrong = TransportState {
            device_type: 19,
            ..saved.clone()
        };
        assert!(matches!(
            other.restore_state(&wrong),
            Err(RestoreError::DeviceType { .. })
        ));
        let fewer = TransportState {
            queues: saved.queues[..1].to_vec(),
            ..saved
        };
        assert!(matches!(
            other.restore_state(&fewer),
            Err(RestoreError::Queues)
        ));
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut t, _, _) = transport();
        let mut b = [0u8; 2];
        t.read(0x002, &mut b);
        t.write(0x001, &[1, 2]);
        wr(&mut t, 0x030, 99);
        assert_eq!(rd(&mut t, 0x034), 0);
        wr(&mut t, 0x038, 8);
        wr(&mut t, 0x050, 7);
        wr(&mut t, 0x0f0, 1);
        let mut cfg = [0u8; 4];
        t.read(0x1000, &mut cfg);
    }
}
