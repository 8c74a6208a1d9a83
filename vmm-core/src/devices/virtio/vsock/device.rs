//! The vsock device: config space (the guest CID), queue ownership, and the
//! packet loops that move descriptors between the queues and the muxer.
//!
//! The device state lives behind a mutex shared by two threads: the vCPU
//! thread that activates or resets the device through the MMIO transport,
//! and the event loop thread that processes queues. The event loop learns
//! about (de)activation through `activate_evt`.

use std::{
    ops::Deref,
    sync::{Arc, Mutex},
};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmm_sys_util::eventfd::EventFd;

use super::{
    muxer::{Muxer, Poller, RxSink, HOST_CID},
    packet::{Header, PacketError, HDR_SIZE},
    QUEUE_SIZE, RX_QUEUE_SIZE, VIRTIO_ID_VSOCK,
};
use crate::{
    devices::virtio::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1},
    memory::GuestMemory,
};

pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
pub(super) const EVQ: usize = 2;
/// The only vsock event: the transport was reset (connections are gone).
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// Why a TX descriptor chain was dropped.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The chain points outside guest memory, overflows, or is otherwise
    /// unusable.
    #[error("bad descriptor chain: {0}")]
    Chain(#[source] virtio_queue::Error),
    /// The header is short or fails [`Header::check`].
    #[error(transparent)]
    Header(#[from] PacketError),
    /// Fewer readable bytes follow the header than it says.
    #[error("payload shorter than its length {0}")]
    ShortPayload(u32),
}

/// Reads one guest packet from a TX descriptor chain: the header (checked
/// for guest `guest_cid`) and its payload, into `payload`. Only the chain's
/// device-readable descriptors count; every address and length is the
/// guest's and is checked against `mem` by the reader.
pub fn read_tx_packet<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    guest_cid: u64,
    payload: &mut Vec<u8>,
) -> Result<Header, TxError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory + Sized,
{
    let mut r = Reader::new(mem, chain).map_err(TxError::Chain)?;
    let mut raw = [0u8; HDR_SIZE];
    std::io::Read::read_exact(&mut r, &mut raw).map_err(|_| PacketError::Short)?;
    let hdr = Header::from_bytes(&raw);
    hdr.check(guest_cid, HOST_CID)?;
    payload.resize(hdr.len as usize, 0);
    std::io::Read::read_exact(&mut r, payload).map_err(|_| TxError::ShortPayload(hdr.len))?;
    Ok(hdr)
}

/// Queues of an activated device.
pub(super) use crate::devices::virtio::ActiveQueues as Active;

/// State shared between the device and its event handler.
#[derive(Debug)]
pub(super) struct Inner {
    pub muxer: Muxer,
    pub active: Option<Active>,
    /// Set by reset; the handler drops the muxer's connections.
    pub reset_pending: bool,
    /// Guest packets dropped as malformed (for diagnostics).
    pub bad_packets: u64,
    /// A transport reset event must reach the guest (after a restore).
    pub transport_reset_pending: bool,
    /// The reset event was delivered; until the guest has handled it (it
    /// refills the event queue and notifies it) no packet goes to the guest,
    /// or the reset would also kill connections made after the restore.
    pub awaiting_reset_ack: bool,
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
                transport_reset_pending: false,
                awaiting_reset_ack: false,
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
        &[RX_QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
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
        crate::devices::virtio::read_config_bytes(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::logger::guest_warn!(offset, "vsock: guest wrote read-only config space");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        self.lock().active = Some(Active::new(3, mem, interrupt, queues, evts)?);
        crate::devices::virtio::signal_activation(&self.activate_evt)
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.lock().active.as_ref().map(Active::states)
    }

    fn save_device_state(&self) -> Vec<u8> {
        // The next host port: a restored VM must not reuse the 4-tuple of a
        // connection its guest may still be closing.
        self.lock().muxer.next_local_port().to_le_bytes().to_vec()
    }

    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        let bytes: [u8; 4] = state
            .try_into()
            .map_err(|_| format!("vsock state of {} bytes", state.len()))?;
        self.lock()
            .muxer
            .set_next_local_port(u32::from_le_bytes(bytes));
        Ok(())
    }

    fn after_restore(&mut self) {
        // Connections do not survive a snapshot: the guest must drop its own
        // (its listeners stay). The event loop handler delivers the event.
        self.lock().transport_reset_pending = true;
        let _ = self.activate_evt.write(1);
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
            let parsed = read_tx_packet(&mem, chain, self.muxer.guest_cid(), &mut payload);
            match parsed {
                Ok(hdr) => self.muxer.handle_guest_packet(&hdr, &payload, poller),
                Err(why) => {
                    self.bad_packets += 1;
                    crate::logger::guest_warn!(
                        count = self.bad_packets,
                        "vsock: dropping a malformed guest packet: {why}"
                    );
                }
            }
            if let Err(e) = active.queues[TXQ].add_used(&mem, head, 0) {
                crate::logger::guest_error!("vsock: returning a TX buffer: {e}");
            }
        }
        if used {
            active.notify(TXQ, "vsock");
        }
    }

    /// Moves packets from the muxer into the guest's RX buffers.
    pub fn process_rx(&mut self, poller: &mut dyn Poller) {
        if self.awaiting_reset_ack || self.transport_reset_pending {
            return;
        }
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
                    crate::logger::guest_warn!("vsock: bad RX descriptor chain: {e}");
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
                crate::logger::guest_error!("vsock: returning an RX buffer: {e}");
            }
            used = true;
        }
        if used {
            active.notify(RXQ, "vsock");
        }
    }

    /// Delivers a pending transport reset event, if the guest has posted an
    /// event buffer (otherwise it stays pending until it does).
    pub fn process_events(&mut self) {
        if !self.transport_reset_pending {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let Some(chain) = active.queues[EVQ].pop_descriptor_chain(&mem) else {
            return;
        };
        let head = chain.head_index();
        // struct virtio_vsock_event { le32 id; }
        let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = match Writer::new(&mem, chain) {
            Ok(mut w) => std::io::Write::write_all(&mut w, &event).is_ok(),
            Err(_) => false,
        };
        let len = if written { 4 } else { 0 };
        if let Err(e) = active.queues[EVQ].add_used(&mem, head, len) {
            crate::logger::guest_error!("vsock: returning an event buffer: {e}");
        }
        self.transport_reset_pending = !written;
        self.awaiting_reset_ack = written;
        active.notify(EVQ, "vsock");
    }

    /// The guest notified the event queue: it handled the reset event.
    pub fn event_queue_notified(&mut self) {
        self.awaiting_reset_ack = false;
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::os::unix::net::UnixListener;

    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::{
        desc::split::Descriptor as SplitDescriptor, desc::RawDescriptor, mock::MockSplitQueue,
    };
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::{
        vsock::{
            muxer::{Interest, Poller},
            packet::{op, TYPE_STREAM},
        },
        IrqCounter,
    };

    const CID: u64 = 3;

    #[derive(Default)]
    struct NullPoller;
    impl Poller for NullPoller {
        fn add(&mut self, _fd: std::os::fd::RawFd, _i: Interest) {}
        fn modify(&mut self, _fd: std::os::fd::RawFd, _i: Interest) {}
        fn remove(&mut self, _fd: std::os::fd::RawFd) {}
    }

    struct Fixture {
        dir: std::path::PathBuf,
        mem: GuestMemory,
        irqs: IrqCounter,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture(tag: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("husk-vsock-dev-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        Fixture {
            dir,
            mem,
            irqs: IrqCounter::default(),
        }
    }

    /// Queues at fixed places: rx at 0x0, tx at 0x1_0000, evq at 0x2_0000.
    fn inner(
        f: &Fixture,
        rxq: &MockSplitQueue<GuestMemory>,
        txq: &MockSplitQueue<GuestMemory>,
    ) -> Inner {
        let evq = MockSplitQueue::create(&f.mem, GuestAddress(0x2_0000), 16);
        let muxer = Muxer::new(CID, &f.dir.join("v.sock")).expect("muxer");
        let evts = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("evt"))
            .collect();
        Inner {
            muxer,
            active: Some(Active {
                mem: f.mem.clone(),
                interrupt: Interrupt::new(Box::new(f.irqs.clone())),
                queues: vec![
                    rxq.create_queue().expect("rxq"),
                    txq.create_queue().expect("txq"),
                    evq.create_queue().expect("evq"),
                ],
                evts,
            }),
            reset_pending: false,
            bad_packets: 0,
            transport_reset_pending: false,
            awaiting_reset_ack: false,
        }
    }

    fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
    }

    fn guest_hdr(op_: u16, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: 2,
            src_port: 7000,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op: op_,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn request_on_tx_gets_a_response_on_rx() {
        let f = fixture("req");
        let listener = UnixListener::bind(f.dir.join("v.sock_1025")).expect("bind");
        let rxq = MockSplitQueue::create(&f.mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&f.mem, GuestAddress(0x1_0000), 16);
        f.mem
            .write_slice(
                &guest_hdr(op::REQUEST, 1025, 0).to_bytes(),
                GuestAddress(0x10_0000),
            )
            .expect("write");
        txq.add_desc_chains(&[desc(0x10_0000, HDR_SIZE as u32, 0)], 0)
            .expect("tx chain");
        rxq.add_desc_chains(&[desc(0x20_0000, 4096, VRING_DESC_F_WRITE)], 0)
            .expect("rx chain");
        let mut inner = inner(&f, &rxq, &txq);

        inner.process_tx(&mut NullPoller);
        assert_eq!(txq.used().idx().load(), 1, "TX buffer returned");
        inner.process_rx(&mut NullPoller);
        assert_eq!(rxq.used().idx().load(), 1, "RX buffer used");
        let used = rxq.used().ring().ref_at(0).expect("used elem").load();
        assert_eq!(used.len(), HDR_SIZE as u32);
        let mut raw = [0u8; HDR_SIZE];
        f.mem
            .read_slice(&mut raw, GuestAddress(0x20_0000))
            .expect("read");
        let resp = Header::from_bytes(&raw);
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port, resp.dst_cid),
            (op::RESPONSE, 1025, 7000, CID)
        );
        assert!(
            listener.accept().is_ok(),
            "the host socket got the connection"
        );
        assert!(f.irqs.count() >= 2, "the guest was notified");
    }

    #[test]
    fn data_split_across_descriptors_reaches_the_host() {
        let f = fixture("split");
        let listener = UnixListener::bind(f.dir.join("v.sock_1025")).expect("bind");
        let rxq = MockSplitQueue::create(&f.mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&f.mem, GuestAddress(0x1_0000), 16);
        let mut inner = inner(&f, &rxq, &txq);
        let h = guest_hdr(op::REQUEST, 1025, 0);
        inner.muxer.handle_guest_packet(&h, &[], &mut NullPoller);
        let (mut host, _) = listener.accept().expect("accept");
        // Header in one descriptor, payload split over two.
        f.mem
            .write_slice(
                &guest_hdr(op::RW, 1025, 10).to_bytes(),
                GuestAddress(0x10_0000),
            )
            .expect("write");
        f.mem
            .write_slice(b"hello", GuestAddress(0x11_0000))
            .expect("write");
        f.mem
            .write_slice(b"world", GuestAddress(0x12_0000))
            .expect("write");
        let chain = [
            desc(0x10_0000, HDR_SIZE as u32, 1),
            desc(0x11_0000, 5, 1),
            desc(0x12_0000, 5, 0),
        ];
        let chain: Vec<RawDescriptor> = chain
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let s = SplitDescriptor::from(*d);
                RawDescriptor::from(SplitDescriptor::new(
                    s.addr().0,
                    s.len(),
                    s.flags(),
                    i as u16 + 1,
                ))
            })
            .collect();
        txq.add_desc_chains(&chain, 0).expect("tx chain");
        inner.process_tx(&mut NullPoller);
        let mut got = [0u8; 10];
        std::io::Read::read_exact(&mut host, &mut got).expect("read");
        assert_eq!(&got, b"helloworld");
        assert_eq!(inner.bad_packets, 0);
    }

    #[test]
    fn malformed_tx_chains_are_dropped_and_returned() {
        let f = fixture("bad");
        let rxq = MockSplitQueue::create(&f.mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&f.mem, GuestAddress(0x1_0000), 16);
        // Each chain fails for the one reason it names; every other field is
        // valid, so a check that goes missing lets its chain through.
        f.mem
            .write_slice(
                &guest_hdr(op::RW, 1025, 100).to_bytes(),
                GuestAddress(0x10_0000),
            )
            .expect("write");
        let wrong_cid = Header {
            src_cid: 99,
            ..guest_hdr(op::REQUEST, 1025, 0)
        };
        f.mem
            .write_slice(&wrong_cid.to_bytes(), GuestAddress(0x11_0000))
            .expect("write");
        f.mem
            .write_slice(
                &guest_hdr(op::REQUEST, 1025, 0).to_bytes(),
                GuestAddress(0x12_0000),
            )
            .expect("write");
        let chains = [
            // Shorter than a header.
            desc(0x10_0000, 10, 0),
            // Payload shorter than its length (100).
            desc(0x10_0000, HDR_SIZE as u32 + 50, 0),
            // Wrong source CID.
            desc(0x11_0000, HDR_SIZE as u32, 0),
            // A valid header, but in a device-writable descriptor: the
            // device must not read what it may only write.
            desc(0x12_0000, HDR_SIZE as u32, VRING_DESC_F_WRITE),
            // Past the end of guest memory.
            desc(0xfff_0000, HDR_SIZE as u32, 0),
        ];
        let expect: [fn(&TxError) -> bool; 5] = [
            |e| matches!(e, TxError::Header(PacketError::Short)),
            |e| matches!(e, TxError::ShortPayload(100)),
            |e| matches!(e, TxError::Header(PacketError::SrcCid(99))),
            |e| matches!(e, TxError::Header(PacketError::Short)),
            |e| matches!(e, TxError::Chain(_)),
        ];
        // The reasons, one chain at a time.
        let probe = MockSplitQueue::create(&f.mem, GuestAddress(0x3_0000), 16);
        probe.add_desc_chains(&chains, 0).expect("probe chains");
        let mut q: Queue = probe.create_queue().expect("queue");
        let mut payload = Vec::new();
        for (i, check) in expect.iter().enumerate() {
            let chain = q.pop_descriptor_chain(&f.mem).expect("a chain");
            let err = read_tx_packet(&f.mem, chain, 3, &mut payload)
                .expect_err(&format!("chain {i} must be refused"));
            assert!(check(&err), "chain {i}: {err}");
        }
        // The device loop drops each one, answers nothing, returns all.
        txq.add_desc_chains(&chains, 0).expect("tx chains");
        let mut inner = inner(&f, &rxq, &txq);
        inner.process_tx(&mut NullPoller);
        assert_eq!(txq.used().idx().load(), 5, "every buffer is given back");
        assert_eq!(inner.bad_packets, 5);
        assert!(!inner.muxer.has_rx(), "nothing is answered for garbage");
    }

    #[test]
    fn rx_without_packets_leaves_buffers_alone() {
        let f = fixture("idle");
        let rxq = MockSplitQueue::create(&f.mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&f.mem, GuestAddress(0x1_0000), 16);
        rxq.add_desc_chains(&[desc(0x20_0000, 4096, VRING_DESC_F_WRITE)], 0)
            .expect("rx chain");
        let mut inner = inner(&f, &rxq, &txq);
        inner.process_rx(&mut NullPoller);
        assert_eq!(rxq.used().idx().load(), 0);
        assert_eq!(f.irqs.count(), 0);
        // A reply for an unknown connection then uses that same buffer.
        inner
            .muxer
            .handle_guest_packet(&guest_hdr(op::RW, 1, 0), &[], &mut NullPoller);
        inner.process_rx(&mut NullPoller);
        assert_eq!(rxq.used().idx().load(), 1);
    }

    #[test]
    fn config_space_holds_the_cid() {
        let f = fixture("cfg");
        let muxer = Muxer::new(0x1234_5678, &f.dir.join("v.sock")).expect("muxer");
        let dev = Vsock::new(0x1234_5678, muxer).expect("vsock");
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x1234_5678);
        let mut hi = [0u8; 4];
        dev.read_config(4, &mut hi);
        assert_eq!(hi, [0, 0, 0, 0]);
        let mut past = [0xaau8; 4];
        dev.read_config(6, &mut past);
        assert_eq!(past, [0, 0, 0, 0], "reads past the config space read zeros");
    }
}
