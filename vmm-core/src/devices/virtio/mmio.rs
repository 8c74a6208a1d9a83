//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).
//!
//! The register file is driven from vCPU threads (MMIO exits); everything
//! the guest writes here is untrusted: sizes, addresses and the order of
//! status transitions are checked, and a driver that gets them wrong sees
//! the device refuse (FAILED / NEEDS_RESET) instead of the VMM misbehaving.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
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

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let i = usize::try_from(self.queue_select).ok()?;
        self.queues.get_mut(i)
    }

    fn with_queue<F: FnOnce(&mut Queue)>(&mut self, f: F) {
        // Queue registers may only change before the driver says DRIVER_OK.
        if self.status & status::DRIVER_OK != 0 {
            tracing::warn!("virtio-mmio: queue register written after DRIVER_OK; ignored");
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
                tracing::debug!(offset, "virtio-mmio: read of an unknown register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x014 => self.device_features_select = v,
            0x020 => {
                if self.status & status::FEATURES_OK != 0 {
                    tracing::warn!("virtio-mmio: features written after FEATURES_OK; ignored");
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
            _ => tracing::debug!(offset, "virtio-mmio: write to an unknown register"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // Bits may only be added, never removed, except by a reset.
        if v & old != old {
            tracing::warn!(
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
                tracing::warn!(
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
        if self.status & status::FEATURES_OK == 0 {
            tracing::warn!("virtio-mmio: DRIVER_OK without FEATURES_OK");
            self.status |= status::FAILED;
            return;
        }
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                tracing::warn!(
                    queue = i,
                    "virtio-mmio: queue is not valid for guest memory"
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal(INT_CONFIG);
                return;
            }
        }
        // The device gets its own copies of the queues; the transport keeps
        // the originals for register reads until the next reset.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let Ok(queues) = queues else {
            tracing::warn!("virtio-mmio: queue state is not valid");
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        };
        let evts: Result<Vec<EventFd>, _> =
            self.queue_evts.iter().map(EventFd::try_clone).collect();
        let evts = match evts {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-mmio: cloning queue eventfds: {e}");
                self.status |= status::DEVICE_NEEDS_RESET;
                return;
            }
        };
        match self
            .device
            .activate(self.mem.clone(), self.interrupt.clone(), queues, evts)
        {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!(
                    "virtio-mmio: activating device type {}: {e}",
                    self.device.device_type()
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal(INT_CONFIG);
            }
        }
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
            tracing::warn!(
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
            tracing::warn!(
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
    use crate::devices::virtio::{ActivateError, InterruptLine, VIRTIO_F_VERSION_1};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    #[derive(Debug, Default)]
    struct Counter(AtomicUsize);
    impl InterruptLine for Arc<Counter> {
        fn raise(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Default)]
    struct Dummy {
        acked: u64,
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
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        let dev = Dummy {
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            ..Default::default()
        };
        let (a, r) = (dev.activated.clone(), dev.resets.clone());
        let irq = Interrupt::new(Box::new(Arc::new(Counter::default())));
        (
            MmioTransport::new(mem, Box::new(dev), irq).expect("transport"),
            a,
            r,
        )
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
        wr(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x024, 1);
        wr(&mut t, 0x020, 1);
        wr(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(rd(&mut t, 0x070) & status::FEATURES_OK, 0);
        setup_queues(&mut t);
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
