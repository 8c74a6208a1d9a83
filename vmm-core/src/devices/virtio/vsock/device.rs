//! The vsock device: config space (the guest CID), queue ownership, and the
//! packet loops that move descriptors between the queues and the muxer.
//!
//! The device state lives behind a mutex shared by two threads: the vCPU
//! thread that activates or resets the device through the MMIO transport,
//! and the event loop thread that processes queues. The event loop learns
//! about (de)activation through `activate_evt`.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmm_sys_util::eventfd::EventFd;

use super::{
    muxer::{Muxer, Poller, RxSink, HOST_CID},
    packet::{Header, HDR_SIZE},
    QUEUE_SIZE, VIRTIO_ID_VSOCK,
};
use crate::{
    devices::virtio::{ActivateError, Interrupt, VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1},
    memory::GuestMemory,
};

pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
pub(super) const EVQ: usize = 2;

/// Queues of an activated device.
#[derive(Debug)]
pub(super) struct Active {
    pub mem: GuestMemory,
    pub interrupt: Arc<Interrupt>,
    pub queues: Vec<Queue>,
    pub evts: Vec<EventFd>,
}

/// State shared between the device and its event handler.
#[derive(Debug)]
pub(super) struct Inner {
    pub muxer: Muxer,
    pub active: Option<Active>,
    /// Set by reset; the handler drops the muxer's connections.
    pub reset_pending: bool,
    /// Guest packets dropped as malformed (for diagnostics).
    pub bad_packets: u64,
}

/// The vsock device (what the MMIO transport holds).
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    acked_features: u64,
    pub(super) inner: Arc<Mutex<Inner>>,
    activate_evt: EventFd,
}

impl Vsock {
    /// A device for guest `cid` whose host side is `muxer`.
    pub fn new(cid: u64, muxer: Muxer) -> std::io::Result<Self> {
        Ok(Self {
            cid,
            acked_features: 0,
            inner: Arc::new(Mutex::new(Inner {
                muxer,
                active: None,
                reset_pending: false,
                bad_packets: 0,
            })),
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The handler to register with the VMM's event loop.
    pub fn handler(&self) -> std::io::Result<super::VsockHandler> {
        Ok(super::VsockHandler::new(
            self.inner.clone(),
            self.activate_evt.try_clone()?,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.cid.to_le_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(data.len())
            .and_then(|end| cfg.get(start..end))
        {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::warn!(offset, "vsock: guest wrote read-only config space");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 || evts.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        self.lock().active = Some(Active {
            mem,
            interrupt,
            queues,
            evts,
        });
        self.activate_evt
            .write(1)
            .map_err(|e| ActivateError::Device(format!("signalling activation: {e}")))
    }

    fn reset(&mut self) -> Option<Vec<EventFd>> {
        let mut inner = self.lock();
        let active = inner.active.take();
        inner.reset_pending = true;
        drop(inner);
        let _ = self.activate_evt.write(1);
        active.map(|a| a.evts)
    }
}

/// An RX descriptor chain as the muxer's packet sink.
struct ChainSink<'a, 'b> {
    writer: &'b mut Writer<'a>,
    written: usize,
}

impl RxSink for ChainSink<'_, '_> {
    fn capacity(&self) -> usize {
        self.writer.available_bytes()
    }

    fn write_packet(&mut self, hdr: &Header, payload: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.writer.write_all(&hdr.to_bytes())?;
        self.writer.write_all(payload)?;
        self.written = HDR_SIZE + payload.len();
        Ok(())
    }
}

impl Inner {
    /// Moves guest packets from the TX queue to the muxer.
    pub fn process_tx(&mut self, poller: &mut dyn Poller) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used = false;
        let mut payload = Vec::new();
        while let Some(chain) = active.queues[TXQ].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            used = true;
            let parsed = Reader::new(&mem, chain)
                .map_err(|e| format!("bad descriptor chain: {e}"))
                .and_then(|mut r| {
                    let mut raw = [0u8; HDR_SIZE];
                    std::io::Read::read_exact(&mut r, &mut raw)
                        .map_err(|_| "chain shorter than a header".to_string())?;
                    let hdr = Header::from_bytes(&raw);
                    hdr.check(self.muxer.guest_cid(), HOST_CID)
                        .map_err(|e| e.to_string())?;
                    payload.resize(hdr.len as usize, 0);
                    std::io::Read::read_exact(&mut r, &mut payload)
                        .map_err(|_| format!("payload shorter than its length {}", hdr.len))?;
                    Ok(hdr)
                });
            match parsed {
                Ok(hdr) => self.muxer.handle_guest_packet(&hdr, &payload, poller),
                Err(why) => {
                    self.bad_packets += 1;
                    if self.bad_packets <= 10 || self.bad_packets % 1000 == 0 {
                        tracing::warn!(
                            count = self.bad_packets,
                            "vsock: dropping a malformed guest packet: {why}"
                        );
                    }
                }
            }
            if let Err(e) = active.queues[TXQ].add_used(&mem, head, 0) {
                tracing::error!("vsock: returning a TX buffer: {e}");
            }
        }
        if used {
            Self::notify(active, TXQ);
        }
    }

    /// Moves packets from the muxer into the guest's RX buffers.
    pub fn process_rx(&mut self, poller: &mut dyn Poller) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(chain) = active.queues[RXQ].pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let mut writer = match Writer::new(&mem, chain) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!("vsock: bad RX descriptor chain: {e}");
                    let _ = active.queues[RXQ].add_used(&mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let mut sink = ChainSink {
                writer: &mut writer,
                written: 0,
            };
            if !self.muxer.fill_rx(&mut sink, poller) {
                active.queues[RXQ].go_to_previous_position();
                break;
            }
            let len = u32::try_from(sink.written).unwrap_or(0);
            if let Err(e) = active.queues[RXQ].add_used(&mem, head, len) {
                tracing::error!("vsock: returning an RX buffer: {e}");
            }
            used = true;
        }
        if used {
            Self::notify(active, RXQ);
        }
    }

    fn notify(active: &mut Active, queue: usize) {
        match active.queues[queue].needs_notification(&active.mem) {
            Ok(true) => active.interrupt.signal(INT_VRING),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("vsock: checking queue {queue} notification: {e}");
                active.interrupt.signal(INT_VRING);
            }
        }
    }
}
