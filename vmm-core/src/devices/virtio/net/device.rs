//! The virtio-net device: config space (MAC, MTU), queue ownership, and the
//! loops that move frames between the queues and the tap.
//!
//! Like vsock, the state sits behind a mutex shared by the vCPU thread
//! (activation and reset through the MMIO transport) and the event loop
//! thread (queues and tap), which learns about (de)activation through
//! `activate_evt`.
//!
//! Nothing the guest puts in a descriptor is trusted: a TX chain must hold
//! a header and a frame of sane size; a header asking for checksum or
//! segmentation offload (features husk does not offer) is refused. Frames
//! that do not fit are dropped and counted, never truncated.

use std::{
    io::{Read, Write},
    sync::{Arc, Mutex},
};

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vmm_sys_util::eventfd::EventFd;

use super::{tap::FrameBackend, QUEUE_SIZE, VIRTIO_ID_NET};
use crate::{
    devices::virtio::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1},
    memory::GuestMemory,
};

pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;

/// `VIRTIO_NET_F_MTU`: the config space carries the MTU.
const VIRTIO_NET_F_MTU: u32 = 3;
/// `VIRTIO_NET_F_MAC`: the config space carries the MAC.
const VIRTIO_NET_F_MAC: u32 = 5;

/// `struct virtio_net_hdr_v1` (with `num_buffers`, as virtio 1.0 requires).
pub const NET_HDR_SIZE: usize = 12;
/// The largest frame either way: an Ethernet header and VLAN tag on the
/// largest IP packet. Without offloads nothing larger can be valid.
pub const MAX_FRAME: usize = 65_535 + 18;

/// Why a TX chain was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TxError {
    /// The chain points outside guest memory or is otherwise unusable.
    #[error("bad descriptor chain: {0}")]
    Chain(String),
    /// Fewer bytes than a header and an Ethernet header.
    #[error("{0} bytes: shorter than a header and a frame")]
    Short(usize),
    /// More bytes than a header and the largest frame.
    #[error("{0} bytes: longer than the largest frame")]
    Long(usize),
    /// The header asks for an offload that was not negotiated.
    #[error("header asks for offload (flags {flags:#x}, gso type {gso_type})")]
    Offload {
        /// `flags` of the header.
        flags: u8,
        /// `gso_type` of the header.
        gso_type: u8,
    },
}

/// Reads one guest frame from a TX descriptor chain into `frame` (the
/// header is checked and dropped). Every address and length is the guest's
/// and is checked against `mem` by the reader.
pub fn read_tx_frame<M>(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<M>,
    frame: &mut Vec<u8>,
) -> Result<(), TxError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory + Sized,
{
    let mut r = Reader::new(mem, chain).map_err(|e| TxError::Chain(e.to_string()))?;
    let total = r.available_bytes();
    if total < NET_HDR_SIZE + 14 {
        return Err(TxError::Short(total));
    }
    if total > NET_HDR_SIZE + MAX_FRAME {
        return Err(TxError::Long(total));
    }
    let mut hdr = [0u8; NET_HDR_SIZE];
    r.read_exact(&mut hdr)
        .map_err(|e| TxError::Chain(e.to_string()))?;
    let (flags, gso_type) = (hdr[0], hdr[1]);
    if flags != 0 || gso_type != 0 {
        return Err(TxError::Offload { flags, gso_type });
    }
    frame.resize(total - NET_HDR_SIZE, 0);
    r.read_exact(frame)
        .map_err(|e| TxError::Chain(e.to_string()))?;
    Ok(())
}

/// Queues of an activated device.
pub(super) use crate::devices::virtio::ActiveQueues as Active;

/// Frame counters, for diagnostics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames the guest sent that reached the backend.
    pub tx_frames: u64,
    /// Frames the guest sent that were dropped (malformed, no backend,
    /// backend error).
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames from the backend dropped (larger than the guest's buffer).
    pub rx_dropped: u64,
}

/// State shared between the device and its event handler.
#[derive(Debug)]
pub(super) struct Inner {
    pub backend: Option<Box<dyn FrameBackend>>,
    pub active: Option<Active>,
    /// A frame read from the backend that waits for an RX buffer.
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    pub counters: NetCounters,
}

/// The virtio-net device (what the MMIO transport holds).
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    mtu: u16,
    acked_features: u64,
    pub(super) inner: Arc<Mutex<Inner>>,
    activate_evt: EventFd,
}

impl Net {
    /// A device with `mac` and `mtu` whose frames go to `backend` (none: the
    /// guest's frames are dropped and none arrive, as on an unplugged cable;
    /// a template VM has no tap yet).
    pub fn new(
        mac: [u8; 6],
        mtu: u16,
        backend: Option<Box<dyn FrameBackend>>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            mac,
            mtu,
            acked_features: 0,
            inner: Arc::new(Mutex::new(Inner {
                backend,
                active: None,
                pending: None,
                buf: vec![0; MAX_FRAME],
                counters: NetCounters::default(),
            })),
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The handler to register with the VMM's event loop.
    pub fn handler(&self) -> std::io::Result<super::NetHandler> {
        let backend_fd = self.lock().backend.as_ref().and_then(|b| b.poll_fd());
        Ok(super::NetHandler::new(
            self.inner.clone(),
            self.activate_evt.try_clone()?,
            backend_fd,
        ))
    }

    /// The frame counters so far.
    pub fn counters(&self) -> NetCounters {
        self.lock().counters
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn config_space(&self) -> [u8; 12] {
        // struct virtio_net_config { u8 mac[6]; le16 status;
        //   le16 max_virtqueue_pairs; le16 mtu; } (status and pairs are
        // only valid with features husk does not offer).
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        cfg
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MTU)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR-less
        // legacy drivers; husk's guests set it through netlink instead.
        crate::logger::guest_warn!(offset, "net: guest wrote read-only config space");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        self.lock().active = Some(Active::new(2, mem, interrupt, queues, evts)?);
        crate::devices::virtio::signal_activation(&self.activate_evt)
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.lock().active.as_ref().map(Active::states)
    }

    fn reset(&mut self) -> Option<Vec<EventFd>> {
        let mut inner = self.lock();
        let active = inner.active.take();
        inner.pending = None;
        drop(inner);
        let _ = self.activate_evt.write(1);
        active.map(|a| a.evts)
    }
}

impl Inner {
    /// Sends the guest's frames to the backend.
    pub fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used = false;
        let mut frame = Vec::new();
        while let Some(chain) = active.queues[TXQ].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            used = true;
            match read_tx_frame(&mem, chain, &mut frame) {
                Ok(()) => match self.backend.as_mut() {
                    Some(b) => match b.write_frame(&frame) {
                        Ok(()) => self.counters.tx_frames += 1,
                        Err(e) => {
                            self.counters.tx_dropped += 1;
                            crate::logger::guest_warn!("net: writing a frame to the tap: {e}");
                        }
                    },
                    None => self.counters.tx_dropped += 1,
                },
                Err(why) => {
                    self.counters.tx_dropped += 1;
                    crate::logger::guest_warn!("net: dropping a malformed guest frame: {why}");
                }
            }
            if let Err(e) = active.queues[TXQ].add_used(&mem, head, 0) {
                crate::logger::guest_error!("net: returning a TX buffer: {e}");
            }
        }
        if used {
            active.notify(TXQ, "net");
        }
    }

    /// Moves frames from the backend into the guest's RX buffers until the
    /// backend has none left or the guest has no buffer; a frame read
    /// without a buffer for it waits in `pending`.
    pub fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(backend) = self.backend.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used = false;
        loop {
            let n = match self.pending.take() {
                Some(p) => {
                    self.buf[..p.len()].copy_from_slice(&p);
                    p.len()
                }
                None => match backend.read_frame(&mut self.buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        crate::logger::guest_error!("net: reading from the tap: {e}");
                        break;
                    }
                },
            };
            let frame = &self.buf[..n];
            let Some(chain) = active.queues[RXQ].pop_descriptor_chain(&mem) else {
                self.pending = Some(frame.to_vec());
                break;
            };
            let head = chain.head_index();
            let len = match Writer::new(&mem, chain) {
                Ok(mut w) if w.available_bytes() >= NET_HDR_SIZE + frame.len() => {
                    let mut hdr = [0u8; NET_HDR_SIZE];
                    // num_buffers: the frame fits in this one chain.
                    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
                    match w.write_all(&hdr).and_then(|()| w.write_all(frame)) {
                        Ok(()) => {
                            self.counters.rx_frames += 1;
                            NET_HDR_SIZE + frame.len()
                        }
                        Err(e) => {
                            self.counters.rx_dropped += 1;
                            crate::logger::guest_warn!("net: writing an RX buffer: {e}");
                            0
                        }
                    }
                }
                Ok(w) => {
                    self.counters.rx_dropped += 1;
                    crate::logger::guest_warn!(
                        "net: dropping a {}-byte frame: the guest's buffer holds {}",
                        frame.len(),
                        w.available_bytes()
                    );
                    0
                }
                Err(e) => {
                    self.counters.rx_dropped += 1;
                    crate::logger::guest_warn!("net: bad RX descriptor chain: {e}");
                    0
                }
            };
            let len = u32::try_from(len).unwrap_or(0);
            if let Err(e) = active.queues[RXQ].add_used(&mem, head, len) {
                crate::logger::guest_error!("net: returning an RX buffer: {e}");
            }
            used = true;
        }
        if used {
            active.notify(RXQ, "net");
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::collections::VecDeque;

    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::{
        desc::split::Descriptor as SplitDescriptor, desc::RawDescriptor, mock::MockSplitQueue,
    };
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::IrqCounter;

    /// Frames in from a queue, frames out to a list: a tap as the device
    /// sees it.
    #[derive(Debug, Default, Clone)]
    struct Wire {
        incoming: Arc<Mutex<VecDeque<Vec<u8>>>>,
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl FrameBackend for Wire {
        fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.incoming.lock().expect("lock").pop_front() {
                Some(f) => {
                    buf[..f.len()].copy_from_slice(&f);
                    Ok(f.len())
                }
                None => Err(std::io::ErrorKind::WouldBlock.into()),
            }
        }
        fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.sent.lock().expect("lock").push(frame.to_vec());
            Ok(())
        }
        fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
    }

    struct Fixture {
        mem: GuestMemory,
        irqs: IrqCounter,
        wire: Wire,
    }

    fn fixture() -> Fixture {
        Fixture {
            mem: GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem"),
            irqs: IrqCounter::default(),
            wire: Wire::default(),
        }
    }

    fn inner(
        f: &Fixture,
        rxq: &MockSplitQueue<GuestMemory>,
        txq: &MockSplitQueue<GuestMemory>,
        backend: bool,
    ) -> Inner {
        let evts = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("evt"))
            .collect();
        Inner {
            backend: backend.then(|| Box::new(f.wire.clone()) as Box<dyn FrameBackend>),
            active: Some(Active {
                mem: f.mem.clone(),
                interrupt: Interrupt::new(Box::new(f.irqs.clone())),
                queues: vec![
                    rxq.create_queue().expect("rxq"),
                    txq.create_queue().expect("txq"),
                ],
                evts,
            }),
            pending: None,
            buf: vec![0; MAX_FRAME],
            counters: NetCounters::default(),
        }
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        vec![fill; len]
    }

    /// Puts a TX chain (header + frame, split over two descriptors) at
    /// `addr`, with `hdr` as the header.
    fn tx_chain(
        f: &Fixture,
        addr: u64,
        hdr: [u8; NET_HDR_SIZE],
        data: &[u8],
    ) -> Vec<RawDescriptor> {
        f.mem.write_slice(&hdr, GuestAddress(addr)).expect("hdr");
        f.mem
            .write_slice(data, GuestAddress(addr + 0x1000))
            .expect("data");
        vec![
            desc(addr, NET_HDR_SIZE as u32, 1, 1),
            desc(addr + 0x1000, data.len() as u32, 0, 0),
        ]
    }

    #[test]
    fn guest_frames_reach_the_tap_without_their_header() {
        let f = fixture();
        let rxq = MockSplitQueue::create(&f.mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&f.mem, GuestAddress(0x1_0000), 16);
        let data = frame(60, 0xab);
        txq.add_desc_chains(&tx_chain(&f, 0x10_0000, [0; NET_HDR_SIZE], &data), 0)
            .expect("chain");
        let mut inner = inner(&f, &rxq, &txq, true);
        inner.process_tx();
        assert_eq!(*f.wire.sent.lock().expect("lock"), vec![data]);
        assert_eq!(txq.used().idx().load(), 1, "TX buffer returned");
        assert_eq!(inner.counters.tx_frames, 1);
        assert!(f.irqs.count() >= 1);
    }

    #[test]
    fn malformed_guest_frames_are_dropped_and_counted() {
        let f = fixture();
        let rxq = MockSplitQueue::create(&f.mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&f.mem, GuestAddress(0x1_0000), 16);
        let mut offload = [0u8; NET_HDR_SIZE];
        offload[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM, not negotiated
        let mut chains = tx_chain(&f, 0x10_0000, offload, &frame(60, 1));
        // A header with a 4-byte frame: shorter than an Ethernet header.
        let short = tx_chain(&f, 0x20_0000, [0; NET_HDR_SIZE], &frame(4, 2));
        let base = chains.len() as u16;
        chains.extend(short.iter().map(|d| {
            let s = SplitDescriptor::from(*d);
            let next = if s.flags() & 1 != 0 {
                s.next() + base
            } else {
                0
            };
            desc(s.addr().0, s.len(), u32::from(s.flags()), next)
        }));
        txq.add_desc_chains(&chains, 0).expect("chains");
        let mut inner = inner(&f, &rxq, &txq, true);
        inner.process_tx();
        assert!(f.wire.sent.lock().expect("lock").is_empty());
        assert_eq!(inner.counters.tx_dropped, 2);
        assert_eq!(txq.used().idx().load(), 2, "both buffers returned");
    }

    #[test]
    fn the_reader_refuses_each_kind_of_bad_chain() {
        let f = fixture();
        let check = |hdr: [u8; NET_HDR_SIZE], len: usize| {
            let q = MockSplitQueue::create(&f.mem, GuestAddress(0x3_0000), 16);
            q.add_desc_chains(&tx_chain(&f, 0x10_0000, hdr, &frame(len, 3)), 0)
                .expect("chain");
            let mut queue: Queue = q.create_queue().expect("queue");
            let chain = queue.pop_descriptor_chain(&f.mem).expect("chain");
            let mut out = Vec::new();
            read_tx_frame(&f.mem, chain, &mut out).map(|()| out.len())
        };
        assert_eq!(check([0; NET_HDR_SIZE], 60), Ok(60));
        assert_eq!(check([0; NET_HDR_SIZE], 13), Err(TxError::Short(25)));
        assert_eq!(
            check([0; NET_HDR_SIZE], MAX_FRAME + 1),
            Err(TxError::Long(NET_HDR_SIZE + MAX_FRAME + 1))
        );
        let mut gso = [0u8; NET_HDR_SIZE];
        gso[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        assert_eq!(
            check(gso, 60),
            Err(TxError::Offload {
                flags: 0,
                gso_type: 1
            })
        );
    }

    #[test]
    fn without_a_tap_guest_frames_are_dropped() {
        let f = fixture();
        let rxq = MockSplitQueue::create(&f.mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&f.mem, GuestAddress(0x1_0000), 16);
        txq.add_desc_chains(
            &tx_chain(&f, 0x10_0000, [0; NET_HDR_SIZE], &frame(60, 1)),
            0,
        )
        .expect("chain");
        let mut inner = inner(&f, &rxq, &txq, false);
        inner.process_tx();
        inner.process_rx();
        assert_eq!(inner.counters.tx_dropped, 1);
        assert_eq!(txq.used().idx().load(), 1, "the buffer still comes back");
    }

    #[test]
    fn tap_frames_fill_rx_buffers_and_wait_for_more() {
        let f = fixture();
        let rxq = MockSplitQueue::create(&f.mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&f.mem, GuestAddress(0x1_0000), 16);
        {
            let mut q = f.wire.incoming.lock().expect("lock");
            q.push_back(frame(100, 1));
            q.push_back(frame(200, 2));
        }
        // One RX buffer only.
        rxq.add_desc_chains(&[desc(0x20_0000, 2048, VRING_DESC_F_WRITE, 0)], 0)
            .expect("rx");
        let mut inner = inner(&f, &rxq, &txq, true);
        inner.process_rx();
        assert_eq!(rxq.used().idx().load(), 1);
        let used = rxq.used().ring().ref_at(0).expect("elem").load();
        assert_eq!(used.len() as usize, NET_HDR_SIZE + 100);
        let mut hdr = [0u8; NET_HDR_SIZE];
        f.mem
            .read_slice(&mut hdr, GuestAddress(0x20_0000))
            .expect("read");
        assert_eq!(&hdr[..10], &[0; 10], "no offload flags");
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
        let mut body = vec![0u8; 100];
        f.mem
            .read_slice(&mut body, GuestAddress(0x20_0000 + NET_HDR_SIZE as u64))
            .expect("read");
        assert_eq!(body, frame(100, 1));
        // The second frame waits for a buffer, then arrives whole.
        assert!(inner.pending.is_some());
        rxq.add_desc_chains(&[desc(0x30_0000, 2048, VRING_DESC_F_WRITE, 0)], 1)
            .expect("rx");
        inner.process_rx();
        assert_eq!(rxq.used().idx().load(), 2);
        let used = rxq.used().ring().ref_at(1).expect("elem").load();
        assert_eq!(used.len() as usize, NET_HDR_SIZE + 200);
        assert_eq!(inner.counters.rx_frames, 2);
        assert!(inner.pending.is_none());
    }

    #[test]
    fn a_frame_larger_than_the_guests_buffer_is_dropped_not_cut() {
        let f = fixture();
        let rxq = MockSplitQueue::create(&f.mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&f.mem, GuestAddress(0x1_0000), 16);
        f.wire
            .incoming
            .lock()
            .expect("lock")
            .push_back(frame(1500, 7));
        rxq.add_desc_chains(&[desc(0x20_0000, 512, VRING_DESC_F_WRITE, 0)], 0)
            .expect("rx");
        let mut inner = inner(&f, &rxq, &txq, true);
        inner.process_rx();
        let used = rxq.used().ring().ref_at(0).expect("elem").load();
        assert_eq!(used.len(), 0);
        assert_eq!(inner.counters.rx_dropped, 1);
        assert_eq!(inner.counters.rx_frames, 0);
    }

    #[test]
    fn config_space_has_the_mac_and_mtu() {
        let net = Net::new([2, 0, 0, 0, 0, 9], 1450, None).expect("net");
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 9]);
        let mut mtu = [0u8; 2];
        net.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 1450);
        let mut beyond = [0xffu8; 4];
        net.read_config(12, &mut beyond);
        assert_eq!(beyond, [0; 4]);
        assert_eq!(
            net.features() & (1 << VIRTIO_NET_F_MAC),
            1 << VIRTIO_NET_F_MAC
        );
    }
}
