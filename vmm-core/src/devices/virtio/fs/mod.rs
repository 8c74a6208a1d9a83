//! virtio-fs as a vhost-user frontend.
//!
//! The file system runs in a separate, sandboxed daemon (`husk-virtiofsd`);
//! the VMM only hands it what it needs to serve the queues itself: the
//! guest memory (the memfd, mapped by the daemon), each queue's addresses
//! and index, the kick eventfd (the KVM ioeventfd on QueueNotify) and a
//! call eventfd. On virtio-mmio the guest's interrupt handler reads
//! InterruptStatus, so the daemon's call eventfds come to the VMM's event
//! loop ([`FsHandler`]), which sets the status bit and raises the IRQ.
//!
//! The vhost-user conversation itself also runs on the event loop thread:
//! a driver activates the device from a vCPU (an MMIO write), and vCPU
//! threads are not allowed to talk on sockets (see `seccomp`), so
//! activation and reset only hand the work over.
//!
//! Snapshots: the rings' indices live in the daemon, and so does the FUSE
//! session (inode numbers, open files) once the guest has mounted the file
//! system. A session cannot move to another daemon, so a snapshot is taken
//! only while the guest has never sent a request — which is when templates
//! are made (the agent mounts virtio-fs only when a pod asks). The indices
//! are then zero by construction, checked in guest memory with the vCPUs
//! paused; a restore replays memory table, ring addresses and indices to the
//! new VM's fresh daemon through the same path as a driver's activation.

use std::{
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Mutex},
};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vhost::{
    vhost_user::{Frontend, VhostUserFrontend},
    VhostBackend, VhostUserMemoryRegionInfo, VringConfigData,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, Interrupt, VirtioDevice, INT_VRING};
use crate::memory::GuestMemory;

/// virtio device type of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;
/// Queue size of each queue.
pub const QUEUE_SIZE: u16 = 1024;
/// Request queues (the guest also gets one high-priority queue).
const NUM_REQUEST_QUEUES: u32 = 1;
/// The high-priority queue plus the request queues.
const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES as usize;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Length of the tag field of the config space.
pub const TAG_LEN: usize = 36;

/// Errors connecting to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or too long.
    #[error("virtio-fs tag must be 1 to {TAG_LEN} bytes, got {0:?}")]
    Tag(String),
    /// Talking to the daemon failed.
    #[error("vhost-user virtio-fs daemon: {0}")]
    VhostUser(&'static str, #[source] vhost::Error),
    /// An eventfd could not be created.
    #[error("creating an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// What the event loop must do with the daemon.
enum Pending {
    Activate {
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
    },
    Reset,
}

/// The daemon connection, used from the event loop thread.
struct Inner {
    frontend: Frontend,
    backend_features: u64,
    acked: u64,
    call_evts: Vec<EventFd>,
    interrupt: Option<Arc<Interrupt>>,
    pending: Vec<Pending>,
}

/// The VMM side of one virtio-fs device.
pub struct VhostUserFs {
    tag: String,
    backend_features: u64,
    acked: u64,
    /// What the driver asked for (a restored driver may ask for features
    /// this daemon does not offer).
    requested: u64,
    /// Guest memory and each queue's available ring while active, to tell
    /// whether the guest has used the device.
    rings: Option<(GuestMemory, Vec<GuestAddress>)>,
    inner: Arc<Mutex<Inner>>,
    work_evt: EventFd,
}

impl std::fmt::Debug for VhostUserFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFs")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// A negotiated connection to a virtio-fs daemon, not yet used by a
/// device. The daemon serves one connection only, so this outlives a VM
/// build that fails (a refused snapshot) and is handed to the cold-boot
/// build that follows.
#[derive(Clone)]
pub struct FsBackend {
    inner: Arc<Mutex<Inner>>,
    backend_features: u64,
}

impl std::fmt::Debug for FsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsBackend")
            .field("backend_features", &self.backend_features)
            .finish_non_exhaustive()
    }
}

impl FsBackend {
    /// Connects to the daemon listening on `socket` and negotiates what
    /// husk needs.
    pub fn connect(socket: &Path) -> Result<Self, FsError> {
        let vu = |what| move |e| FsError::VhostUser(what, e);
        let mut frontend =
            Frontend::connect(socket, NUM_QUEUES as u64).map_err(vu("connecting"))?;
        frontend.set_owner().map_err(vu("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            // husk needs none of the optional protocol features: the config
            // space (the tag) is the VMM's own.
            let _ = frontend
                .get_protocol_features()
                .map_err(vu("GET_PROTOCOL_FEATURES"))?;
            frontend
                .set_protocol_features(
                    vhost::vhost_user::message::VhostUserProtocolFeatures::empty(),
                )
                .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        }
        let call_evts = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::EventFd)?;
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                frontend,
                backend_features,
                acked: 0,
                call_evts,
                interrupt: None,
                pending: Vec::new(),
            })),
            backend_features,
        })
    }
}

impl VhostUserFs {
    /// Connects to the daemon listening on `socket`.
    pub fn connect(socket: &Path, tag: &str) -> Result<Self, FsError> {
        Self::new(&FsBackend::connect(socket)?, tag)
    }

    /// The device on an established daemon connection. Whatever a
    /// previous (failed) build left in it is dropped: the queues were
    /// never handed to the daemon, since that happens on the event loop.
    pub fn new(backend: &FsBackend, tag: &str) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.to_string()));
        }
        {
            let mut inner = backend.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.acked = 0;
            inner.interrupt = None;
            inner.pending.clear();
            for evt in &inner.call_evts {
                let _ = evt.read();
            }
        }
        Ok(Self {
            tag: tag.to_string(),
            backend_features: backend.backend_features,
            acked: 0,
            requested: 0,
            rings: None,
            inner: backend.inner.clone(),
            work_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd)?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn post(&self, work: Pending) {
        self.lock().pending.push(work);
        let _ = self.work_evt.write(1);
    }

    /// The device's event loop handler (register it with the VMM's event
    /// loop).
    pub fn handler(&self) -> Result<FsHandler, FsError> {
        let inner = self.lock();
        let call_evts = inner
            .call_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>();
        Ok(FsHandler {
            call_evts: call_evts.map_err(FsError::EventFd)?,
            work_evt: self.work_evt.try_clone().map_err(FsError::EventFd)?,
            inner: self.inner.clone(),
        })
    }
}

impl Inner {
    fn setup(
        &mut self,
        mem: &GuestMemory,
        queues: &[Queue],
        kicks: &[EventFd],
    ) -> Result<(), String> {
        let e = |what: &'static str| move |err: vhost::Error| format!("{what}: {err}");
        let mut features = self.acked;
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            features |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        self.frontend
            .set_features(features)
            .map_err(e("SET_FEATURES"))?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let file = r.file_offset().ok_or("guest memory is not file-backed")?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            });
        }
        self.frontend
            .set_mem_table(&regions)
            .map_err(e("SET_MEM_TABLE"))?;
        let host = |a: u64| -> Result<u64, String> {
            mem.get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|_| format!("queue address {a:#x} is outside guest memory"))
        };
        for (i, q) in queues.iter().enumerate() {
            self.frontend
                .set_vring_num(i, q.size())
                .map_err(e("SET_VRING_NUM"))?;
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(i, &cfg)
                .map_err(e("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, q.next_avail())
                .map_err(e("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &self.call_evts[i])
                .map_err(e("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &kicks[i])
                .map_err(e("SET_VRING_KICK"))?;
            if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(e("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        self.backend_features & !VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.requested = features;
        self.acked = features & self.features();
        let acked = self.acked;
        self.lock().acked = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut cfg = [0u8; TAG_LEN + 4];
        cfg[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        cfg[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        crate::devices::virtio::read_config_bytes(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::logger::guest_warn!(offset, "virtio-fs: guest wrote read-only config space");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        crate::devices::virtio::check_queue_count(NUM_QUEUES, &queues, &queue_evts)?;
        let missing = self.requested & !self.features();
        if missing != 0 {
            return Err(ActivateError::Device(format!(
                "the virtio-fs daemon does not offer features {missing:#x} the guest driver uses"
            )));
        }
        self.rings = Some((
            mem.clone(),
            queues
                .iter()
                .map(|q| GuestAddress(q.avail_ring()))
                .collect(),
        ));
        self.post(Pending::Activate {
            mem,
            interrupt,
            queues,
            kicks: queue_evts,
        });
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<EventFd>> {
        self.rings = None;
        self.post(Pending::Reset);
        None
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        // Snapshots happen only before the first request (see
        // `snapshot_blocker`), so the transport's copies are current.
        None
    }

    fn snapshot_blocker(&self) -> Option<String> {
        let (mem, avail_rings) = self.rings.as_ref()?;
        let mut sent = 0u64;
        for (i, ring) in avail_rings.iter().enumerate() {
            // struct virtq_avail { le16 flags; le16 idx; ... }
            let idx = ring
                .checked_add(2)
                .and_then(|a| mem.read_obj::<u16>(a).ok());
            match idx {
                Some(idx) => sent += u64::from(u16::from_le(idx)),
                None => return Some(format!("virtio-fs queue {i}: available ring unreadable")),
            }
        }
        (sent != 0).then(|| {
            format!(
                "the guest has used virtio-fs ({sent} requests): its FUSE session lives in the \
                 daemon and cannot move to another; snapshot before the guest mounts it \
                 (templates are)"
            )
        })
    }

    fn save_device_state(&self) -> Vec<u8> {
        self.tag.as_bytes().to_vec()
    }

    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state != self.tag.as_bytes() {
            return Err(format!(
                "the snapshot's virtio-fs tag is {:?}, this VM's is {:?}",
                String::from_utf8_lossy(state),
                self.tag
            ));
        }
        Ok(())
    }
}

impl Inner {
    fn run_pending(&mut self) {
        for work in std::mem::take(&mut self.pending) {
            match work {
                Pending::Activate {
                    mem,
                    interrupt,
                    queues,
                    kicks,
                } => match self.setup(&mem, &queues, &kicks) {
                    Ok(()) => self.interrupt = Some(interrupt),
                    Err(e) => {
                        // The guest sees a device that never answers; say why.
                        crate::logger::guest_error!(
                            "virtio-fs: handing the queues to the daemon: {e}"
                        );
                        interrupt.signal(super::INT_CONFIG);
                    }
                },
                Pending::Reset => {
                    for i in 0..NUM_QUEUES {
                        // GET_VRING_BASE stops the ring in the daemon.
                        if let Err(e) = self.frontend.get_vring_base(i) {
                            crate::logger::guest_warn!("virtio-fs: stopping queue {i}: {e}");
                        }
                    }
                    self.interrupt = None;
                }
            }
        }
    }
}

/// The device's part of the event loop: talks to the daemon when the driver
/// activates or resets the device, and relays the daemon's call eventfds
/// into the device's interrupt.
pub struct FsHandler {
    call_evts: Vec<EventFd>,
    work_evt: EventFd,
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for FsHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsHandler").finish_non_exhaustive()
    }
}

impl MutEventSubscriber for FsHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in self.call_evts.iter().chain(std::iter::once(&self.work_evt)) {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                crate::logger::guest_error!("virtio-fs: watching an eventfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if events.fd() == self.work_evt.as_raw_fd() {
            let _ = self.work_evt.read();
            inner.run_pending();
            return;
        }
        if let Some(evt) = self.call_evts.iter().find(|e| e.as_raw_fd() == events.fd()) {
            let _ = evt.read();
        }
        if let Some(irq) = inner.interrupt.as_ref() {
            irq.signal(INT_VRING);
        }
    }
}
