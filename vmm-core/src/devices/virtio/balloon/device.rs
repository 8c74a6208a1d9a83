//! The balloon device: feature negotiation, config space, the queue
//! parsers and the hole punching.
//!
//! The state sits behind a mutex shared by the vCPU thread (activation,
//! reset and config space through the MMIO transport), the event loop
//! thread (queues, statistics timer) and the control API ([`BalloonControl`]).
//!
//! Nothing the guest puts in a buffer is trusted: every reported range and
//! frame number is checked to be page aligned, not to overflow, and to lie
//! inside one guest RAM region before anything is punched; a buffer that
//! fails a check is returned unused (nothing of it punched) and counted.
//! Punching guest memory the guest still uses can only hurt that guest (it
//! reads zeros), never the host or another VM: the range is always inside
//! this VM's own memfd.

use std::{
    os::fd::AsRawFd,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use serde::Serialize;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, GuestMemoryRegion as _, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{PAGE_SIZE, QUEUE_SIZE, VIRTIO_ID_BALLOON};
use crate::{
    devices::virtio::{
        read_config_bytes, signal_activation, ActivateError, ActiveQueues, Interrupt, VirtioDevice,
        INT_CONFIG, VIRTIO_F_VERSION_1,
    },
    memory::GuestMemory,
    BalloonConfig,
};

/// `VIRTIO_BALLOON_F_STATS_VQ`: a statistics queue.
pub const F_STATS_VQ: u32 = 1;
/// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: the guest deflates before it OOMs.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// `VIRTIO_BALLOON_F_REPORTING`: free page reporting queue.
pub const F_REPORTING: u32 = 5;

/// Most `(tag, value)` pairs a statistics buffer may hold (Linux 6.1
/// sends 10; later kernels a few more).
pub const MAX_STATS: usize = 32;
/// Size of one statistics pair: `le16 tag; le64 val;` packed.
const STAT_SIZE: usize = 10;
/// Most frame numbers one inflate or deflate buffer may hold (Linux sends
/// at most 256).
pub const MAX_PFNS: usize = 1024;

/// What each queue is for. Queues are numbered in this order, skipping
/// those whose feature was not negotiated (as the Linux driver and the
/// virtio spec number them): with statistics, reporting is queue 3,
/// without it queue 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Pages the guest gives up (inflate).
    Inflate,
    /// Pages the guest takes back (deflate).
    Deflate,
    /// The statistics buffer.
    Stats,
    /// Free page reports.
    Reporting,
}

impl Role {
    /// Whether the queue is in use with `acked` features.
    fn in_use(self, acked: u64) -> bool {
        match self {
            Self::Inflate | Self::Deflate => true,
            Self::Stats => acked & (1 << F_STATS_VQ) != 0,
            Self::Reporting => acked & (1 << F_REPORTING) != 0,
        }
    }
}

/// The queues in use with `acked` features, in queue order.
pub fn roles(acked: u64) -> impl Iterator<Item = Role> {
    [Role::Inflate, Role::Deflate, Role::Stats, Role::Reporting]
        .into_iter()
        .filter(move |r| r.in_use(acked))
}

/// Why a buffer from the guest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BufferError {
    /// The buffer has no descriptors, or no bytes.
    #[error("empty buffer")]
    Empty,
    /// A descriptor is device-writable where the device must only read.
    #[error("descriptor {0} is device-writable, expected device-readable")]
    Writable(usize),
    /// A descriptor is device-readable where a device-writable one is due.
    #[error("descriptor {0} is device-readable, expected device-writable")]
    Readable(usize),
    /// A range is not aligned to the balloon's 4 KiB pages.
    #[error("range {addr:#x}+{len:#x} is not 4 KiB aligned")]
    Unaligned {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A range wraps around the address space.
    #[error("range {addr:#x}+{len:#x} overflows")]
    Overflow {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A range is not inside one guest RAM region.
    #[error("range {addr:#x}+{len:#x} is outside guest memory")]
    Outside {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The bytes are not a whole number of entries.
    #[error("{0} bytes are not a whole number of entries")]
    Partial(usize),
    /// More entries than a buffer may hold.
    #[error("{got} entries, more than {max}")]
    TooMany {
        /// Entries in the buffer.
        got: usize,
        /// The most allowed.
        max: usize,
    },
    /// Reading the buffer from guest memory failed.
    #[error("reading the buffer: {0}")]
    Read(String),
}

/// Checks that `[addr, addr + len)` is whole 4 KiB pages inside one guest
/// RAM region; returns that region.
pub fn check_range(
    mem: &GuestMemory,
    addr: u64,
    len: u64,
) -> Result<&GuestRegionMmap, BufferError> {
    if len == 0 {
        return Err(BufferError::Empty);
    }
    if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(BufferError::Unaligned { addr, len });
    }
    let end = addr
        .checked_add(len)
        .ok_or(BufferError::Overflow { addr, len })?;
    let region = mem
        .find_region(GuestAddress(addr))
        .ok_or(BufferError::Outside { addr, len })?;
    let region_end = region.start_addr().0.saturating_add(region.len());
    if end > region_end {
        return Err(BufferError::Outside { addr, len });
    }
    Ok(region)
}

/// The ranges of one free page report: each descriptor of the chain is one
/// free range (device-writable: the driver adds reports as input buffers,
/// though the device writes nothing). Every range is checked; one bad
/// descriptor refuses the whole report.
pub fn reported_ranges<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
) -> Result<Vec<(u64, u64)>, BufferError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory + Sized,
{
    let mut ranges = Vec::new();
    for (i, desc) in chain.enumerate() {
        if !desc.is_write_only() {
            return Err(BufferError::Readable(i));
        }
        let (addr, len) = (desc.addr().0, u64::from(desc.len()));
        check_range(mem, addr, len)?;
        ranges.push((addr, len));
    }
    if ranges.is_empty() {
        return Err(BufferError::Empty);
    }
    Ok(ranges)
}

/// Reads the device-readable bytes of a chain, at most `max` of them.
fn read_chain<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    max: usize,
) -> Result<Vec<u8>, BufferError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory + Sized,
{
    let mut bytes = Vec::new();
    for (i, desc) in chain.enumerate() {
        if desc.is_write_only() {
            return Err(BufferError::Writable(i));
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        let total = bytes.len().saturating_add(len);
        if total > max {
            return Err(BufferError::TooMany { got: total, max });
        }
        let start = bytes.len();
        bytes.resize(total, 0);
        mem.read_slice(&mut bytes[start..], desc.addr())
            .map_err(|e| BufferError::Read(e.to_string()))?;
    }
    if bytes.is_empty() {
        return Err(BufferError::Empty);
    }
    Ok(bytes)
}

/// The frame numbers of an inflate or deflate buffer (`le32` each), each
/// checked to be a page of guest RAM.
pub fn read_pfns<M>(mem: &GuestMemory, chain: DescriptorChain<M>) -> Result<Vec<u32>, BufferError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory + Sized,
{
    let bytes = read_chain(mem, chain, MAX_PFNS * 4).map_err(|e| match e {
        BufferError::TooMany { got, .. } => BufferError::TooMany {
            got: got / 4,
            max: MAX_PFNS,
        },
        e => e,
    })?;
    if bytes.len() % 4 != 0 {
        return Err(BufferError::Partial(bytes.len()));
    }
    let pfns: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for &pfn in &pfns {
        check_range(mem, u64::from(pfn) * PAGE_SIZE, PAGE_SIZE)?;
    }
    Ok(pfns)
}

/// Runs of consecutive frame numbers as `(guest address, length)`.
pub fn pfn_ranges(pfns: &[u32]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &pfn in pfns {
        let addr = u64::from(pfn) * PAGE_SIZE;
        match out.last_mut() {
            Some((start, len)) if *start + *len == addr => *len += PAGE_SIZE,
            _ => out.push((addr, PAGE_SIZE)),
        }
    }
    out
}

/// The pairs of a statistics buffer (`le16 tag; le64 val;`, packed).
pub fn parse_stats<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
) -> Result<Vec<(u16, u64)>, BufferError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory + Sized,
{
    let bytes = read_chain(mem, chain, MAX_STATS * STAT_SIZE).map_err(|e| match e {
        BufferError::TooMany { got, .. } => BufferError::TooMany {
            got: got / STAT_SIZE,
            max: MAX_STATS,
        },
        e => e,
    })?;
    if bytes.len() % STAT_SIZE != 0 {
        return Err(BufferError::Partial(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(STAT_SIZE)
        .map(|c| {
            let tag = u16::from_le_bytes([c[0], c[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&c[2..10]);
            (tag, u64::from_le_bytes(v))
        })
        .collect())
}

/// Errors returning memory to the host.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range is not guest RAM (checked before, so a bug if seen).
    #[error(transparent)]
    Range(#[from] BufferError),
    /// The region is not backed by a file (anonymous memory in tests).
    #[error("guest memory at {0:#x} is not backed by a file")]
    NoFile(u64),
    /// fallocate failed.
    #[error("punching {len:#x} bytes at file offset {offset:#x}")]
    Punch {
        /// Offset in the memfd.
        offset: u64,
        /// Length.
        len: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Returns `[addr, addr + len)` of guest RAM to the host: punches it out
/// of the file behind the region (the memfd), so every mapping of it (the
/// VMM's, KVM's, a vhost-user daemon's) reads zeros from fresh pages next
/// time and the host frees the old ones now.
pub fn discard(mem: &GuestMemory, addr: u64, len: u64) -> Result<(), DiscardError> {
    let region = check_range(mem, addr, len)?;
    let file = region.file_offset().ok_or(DiscardError::NoFile(addr))?;
    let offset = file.start() + (addr - region.start_addr().0);
    let (off, l) = match (i64::try_from(offset), i64::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(BufferError::Overflow { addr, len }.into()),
    };
    // SAFETY: fallocate on the descriptor the region holds open, for a
    // range checked to lie in the region's window of the file (this guest's
    // own RAM); no memory of this process is touched through a pointer.
    let rc = unsafe {
        libc::fallocate(
            file.file().as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if rc != 0 {
        return Err(DiscardError::Punch {
            offset,
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The guest's memory statistics as its driver last reported them (each
/// in bytes or counts as the virtio spec defines; `None`: not reported).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GuestStats {
    /// Bytes swapped in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Free memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Available memory (free plus reclaimable), bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Page cache, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// Huge page allocations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Huge page allocation failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

impl GuestStats {
    /// Statistics from a buffer's pairs; tags this version does not know
    /// are skipped (newer guests send more).
    pub fn from_pairs(pairs: &[(u16, u64)]) -> Self {
        let mut s = Self::default();
        for &(tag, val) in pairs {
            let field = match tag {
                0 => &mut s.swap_in,
                1 => &mut s.swap_out,
                2 => &mut s.major_faults,
                3 => &mut s.minor_faults,
                4 => &mut s.free_memory,
                5 => &mut s.total_memory,
                6 => &mut s.available_memory,
                7 => &mut s.disk_caches,
                8 => &mut s.hugetlb_allocations,
                9 => &mut s.hugetlb_failures,
                _ => continue,
            };
            *field = Some(val);
        }
        s
    }
}

/// What the device did so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BalloonCounters {
    /// Free page reports handled.
    pub reports: u64,
    /// Bytes returned to the host by free page reporting.
    pub reported_bytes: u64,
    /// Pages the guest put in the balloon (inflate).
    pub inflated_pages: u64,
    /// Pages the guest took back (deflate).
    pub deflated_pages: u64,
    /// Buffers refused as malformed (nothing of them punched).
    pub bad_buffers: u64,
    /// Ranges the host failed to punch.
    pub discard_errors: u64,
}

/// The balloon as the control API reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BalloonReport {
    /// The target the host set, MiB.
    pub target_mib: u64,
    /// What the guest says it holds in the balloon, MiB.
    pub actual_mib: u64,
    /// Whether the driver took free page reporting.
    pub free_page_reporting: bool,
    /// Whether the driver took deflate-on-OOM.
    pub deflate_on_oom: bool,
    /// The guest's last statistics, if the driver sends them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<GuestStats>,
    /// How old those statistics are, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats_age_ms: Option<u64>,
    /// What the device did so far.
    pub counters: BalloonCounters,
}

/// State shared by the device, its event handler and the control API.
#[derive(Debug)]
pub(super) struct Inner {
    pub active: Option<ActiveQueues>,
    /// Features the driver accepted.
    pub acked: u64,
    /// Guest RAM in balloon pages (the largest target).
    mem_pages: u64,
    /// `num_pages`: the host's target.
    target_pages: u32,
    /// `actual`: what the driver says the balloon holds.
    actual_pages: u32,
    /// The statistics buffer the device holds until it wants new numbers.
    pub stats_head: Option<u16>,
    stats: Option<GuestStats>,
    stats_at: Option<Instant>,
    pub counters: BalloonCounters,
}

/// Locks the state, surviving a panicked holder (the state stays usable).
pub(super) fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// The queue index of `role`, if that queue is in use.
    pub fn queue_of(&self, role: Role) -> Option<usize> {
        roles(self.acked).position(|r| r == role)
    }

    /// Handles every buffer waiting on queue `index`.
    pub fn process_queue(&mut self, index: usize) {
        match roles(self.acked).nth(index) {
            Some(Role::Reporting) => self.process_reporting(index),
            Some(Role::Inflate) => self.process_pages(index, true),
            Some(Role::Deflate) => self.process_pages(index, false),
            Some(Role::Stats) => self.process_stats(index),
            None => {}
        }
    }

    /// Takes every buffer waiting on queue `index`, hands each to `handle`
    /// with the device's counters, and returns it to the driver (the
    /// device writes nothing into these buffers).
    fn drain<F>(&mut self, index: usize, mut handle: F)
    where
        F: FnMut(&GuestMemory, DescriptorChain<&GuestMemory>, &mut BalloonCounters),
    {
        let Inner {
            active, counters, ..
        } = self;
        let Some(active) = active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used = false;
        while let Some(chain) = active.queues[index].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            used = true;
            handle(&mem, chain, counters);
            if let Err(e) = active.queues[index].add_used(&mem, head, 0) {
                crate::logger::guest_error!("balloon: returning a buffer: {e}");
            }
        }
        if used {
            active.notify(index, "balloon");
        }
    }

    fn process_reporting(&mut self, index: usize) {
        self.drain(index, |mem, chain, counters| {
            match reported_ranges(mem, chain) {
                Ok(ranges) => {
                    counters.reports += 1;
                    for (addr, len) in ranges {
                        match discard(mem, addr, len) {
                            Ok(()) => counters.reported_bytes += len,
                            Err(e) => {
                                counters.discard_errors += 1;
                                crate::logger::guest_error!(
                                    "balloon: returning a reported range: {e}"
                                );
                            }
                        }
                    }
                }
                Err(e) => {
                    counters.bad_buffers += 1;
                    crate::logger::guest_warn!(
                        "balloon: ignoring a malformed free page report: {e}"
                    );
                }
            }
        });
    }

    fn process_pages(&mut self, index: usize, inflate: bool) {
        self.drain(index, |mem, chain, counters| match read_pfns(mem, chain) {
            Ok(pfns) if inflate => {
                counters.inflated_pages += pfns.len() as u64;
                for (addr, len) in pfn_ranges(&pfns) {
                    if let Err(e) = discard(mem, addr, len) {
                        counters.discard_errors += 1;
                        crate::logger::guest_error!("balloon: returning inflated pages: {e}");
                    }
                }
            }
            // Deflated pages need nothing from the host: the guest's next
            // touch of a punched page gets a fresh zero page.
            Ok(pfns) => counters.deflated_pages += pfns.len() as u64,
            Err(e) => {
                counters.bad_buffers += 1;
                crate::logger::guest_warn!(inflate, "balloon: ignoring a malformed page list: {e}");
            }
        });
    }

    fn process_stats(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut returned = false;
        while let Some(chain) = active.queues[index].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match parse_stats(&mem, chain) {
                Ok(pairs) => {
                    self.stats = Some(GuestStats::from_pairs(&pairs));
                    self.stats_at = Some(Instant::now());
                }
                Err(e) => {
                    self.counters.bad_buffers += 1;
                    crate::logger::guest_warn!(
                        "balloon: ignoring a malformed statistics buffer: {e}"
                    );
                }
            }
            // The driver keeps one buffer in flight; should it post
            // another, the older goes back at once rather than leak.
            if let Some(old) = self.stats_head.replace(head) {
                if let Err(e) = active.queues[index].add_used(&mem, old, 0) {
                    crate::logger::guest_error!("balloon: returning a statistics buffer: {e}");
                }
                returned = true;
            }
        }
        if returned {
            active.notify(index, "balloon");
        }
    }

    /// Asks the driver for fresh statistics: returns the buffer it holds.
    pub fn request_stats(&mut self) {
        let Some(index) = self.queue_of(Role::Stats) else {
            return;
        };
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(head) = self.stats_head.take() else {
            return;
        };
        let mem = active.mem.clone();
        if let Err(e) = active.queues[index].add_used(&mem, head, 0) {
            crate::logger::guest_error!("balloon: returning the statistics buffer: {e}");
        }
        active.notify(index, "balloon");
    }

    fn report(&self) -> BalloonReport {
        BalloonReport {
            target_mib: (u64::from(self.target_pages) * PAGE_SIZE) >> 20,
            actual_mib: (u64::from(self.actual_pages) * PAGE_SIZE) >> 20,
            free_page_reporting: self.acked & (1 << F_REPORTING) != 0,
            deflate_on_oom: self.acked & (1 << F_DEFLATE_ON_OOM) != 0,
            stats: self.stats.clone(),
            stats_age_ms: self
                .stats_at
                .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
            counters: self.counters,
        }
    }
}

/// The host's handle on a balloon: set its target, read what it did.
#[derive(Debug, Clone)]
pub struct BalloonControl {
    inner: Arc<Mutex<Inner>>,
}

impl BalloonControl {
    /// Sets the balloon's target: the driver inflates to `mib` MiB (takes
    /// that much memory from the guest and returns it to the host) or
    /// deflates down to it. Fails if the guest has less memory than that.
    pub fn set_target_mib(&self, mib: u64) -> Result<(), String> {
        let mut inner = lock(&self.inner);
        let pages = mib.saturating_mul((1 << 20) / PAGE_SIZE);
        if pages > inner.mem_pages {
            return Err(format!(
                "target {mib} MiB is more than the guest's {} MiB",
                (inner.mem_pages * PAGE_SIZE) >> 20
            ));
        }
        inner.target_pages =
            u32::try_from(pages).map_err(|_| format!("target {mib} MiB is too large"))?;
        if let Some(active) = &inner.active {
            active.interrupt.signal(INT_CONFIG);
        }
        Ok(())
    }

    /// The balloon's target, state, statistics and counters.
    pub fn report(&self) -> BalloonReport {
        lock(&self.inner).report()
    }
}

/// The balloon device (what the MMIO transport holds).
#[derive(Debug)]
pub struct Balloon {
    config: BalloonConfig,
    pub(super) inner: Arc<Mutex<Inner>>,
    activate_evt: EventFd,
}

/// What a snapshot keeps of the balloon (beyond config space and queues,
/// which the transport saves): versioned, so a later layout can refuse or
/// convert an older one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonState {
    /// Layout version ([`BalloonState::VERSION`]).
    pub version: u16,
    /// `num_pages`: the host's target.
    pub target_pages: u32,
    /// `actual`: what the driver said the balloon holds.
    pub actual_pages: u32,
    /// The statistics buffer the device held (a descriptor head).
    pub stats_head: Option<u16>,
}

impl BalloonState {
    /// The layout this version writes.
    pub const VERSION: u16 = 1;

    fn encode(&self) -> Vec<u8> {
        // Encoding a struct of integers into a Vec cannot fail.
        bincode::serde::encode_to_vec(self, bincode::config::standard()).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let (s, used): (Self, usize) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard())
                .map_err(|e| format!("balloon state: {e}"))?;
        if used != bytes.len() {
            return Err("balloon state: trailing bytes".into());
        }
        if s.version != Self::VERSION {
            return Err(format!(
                "balloon state version {}, expected {}",
                s.version,
                Self::VERSION
            ));
        }
        Ok(s)
    }
}

impl Balloon {
    /// A balloon for a guest with `mem_bytes` of RAM.
    pub fn new(config: BalloonConfig, mem_bytes: u64) -> std::io::Result<Self> {
        Ok(Self {
            config,
            inner: Arc::new(Mutex::new(Inner {
                active: None,
                acked: 0,
                mem_pages: mem_bytes / PAGE_SIZE,
                target_pages: 0,
                actual_pages: 0,
                stats_head: None,
                stats: None,
                stats_at: None,
                counters: BalloonCounters::default(),
            })),
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The handle for the control API.
    pub fn control(&self) -> BalloonControl {
        BalloonControl {
            inner: self.inner.clone(),
        }
    }

    /// The handler to register with the VMM's event loop.
    pub fn handler(&self) -> std::io::Result<super::BalloonHandler> {
        super::BalloonHandler::new(
            self.inner.clone(),
            self.activate_evt.try_clone()?,
            self.config.stats_interval(),
        )
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // Inflate, deflate, and room for statistics and reporting; which
        // of the last two are used depends on the features taken.
        &[QUEUE_SIZE; 4]
    }

    fn queues_in_use(&self) -> usize {
        roles(self.lock().acked).count()
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1;
        if self.config.stats_interval().is_some() {
            f |= 1 << F_STATS_VQ;
        }
        if self.config.deflate_on_oom {
            f |= 1 << F_DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            f |= 1 << F_REPORTING;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        let offered = self.features();
        self.lock().acked = features & offered;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_balloon_config { le32 num_pages; le32 actual; ... }
        // (the fields after these belong to features husk does not offer).
        let inner = self.lock();
        let mut cfg = [0u8; 8];
        cfg[..4].copy_from_slice(&inner.target_pages.to_le_bytes());
        cfg[4..].copy_from_slice(&inner.actual_pages.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write.
        match (offset, <[u8; 4]>::try_from(data)) {
            (4, Ok(bytes)) => self.lock().actual_pages = u32::from_le_bytes(bytes),
            _ => crate::logger::guest_warn!(
                offset,
                len = data.len(),
                "balloon: guest wrote read-only config space"
            ),
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        let active = ActiveQueues::new(self.queue_max_sizes().len(), mem, interrupt, queues, evts)?;
        let mut inner = self.lock();
        let needed = roles(inner.acked).count();
        if let Some(i) = active.queues[..needed].iter().position(|q| !q.ready()) {
            return Err(ActivateError::Device(format!(
                "balloon: queue {i} is in use with the features taken but not ready"
            )));
        }
        inner.active = Some(active);
        drop(inner);
        signal_activation(&self.activate_evt)
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.lock().active.as_ref().map(ActiveQueues::states)
    }

    fn reset(&mut self) -> Option<Vec<EventFd>> {
        let mut inner = self.lock();
        let active = inner.active.take();
        inner.stats_head = None;
        inner.actual_pages = 0;
        drop(inner);
        let _ = self.activate_evt.write(1);
        active.map(|a| a.evts)
    }

    fn save_device_state(&self) -> Vec<u8> {
        let inner = self.lock();
        BalloonState {
            version: BalloonState::VERSION,
            target_pages: inner.target_pages,
            actual_pages: inner.actual_pages,
            stats_head: inner.stats_head,
        }
        .encode()
    }

    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        let s = BalloonState::decode(state)?;
        let mut inner = self.lock();
        if u64::from(s.target_pages) > inner.mem_pages {
            return Err(format!(
                "balloon target of {} pages exceeds guest memory",
                s.target_pages
            ));
        }
        if s.stats_head.is_some_and(|h| h >= QUEUE_SIZE) {
            return Err(format!(
                "balloon statistics buffer {:?} is outside the queue",
                s.stats_head
            ));
        }
        inner.target_pages = s.target_pages;
        inner.actual_pages = s.actual_pages;
        inner.stats_head = s.stats_head;
        Ok(())
    }

    fn after_restore(&mut self) {
        // The handler registers the restored queues and arms the timer.
        let _ = self.activate_evt.write(1);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::{fs::File, os::unix::fs::MetadataExt};

    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::{
        desc::split::Descriptor as SplitDescriptor, desc::RawDescriptor, mock::MockSplitQueue,
    };

    use super::*;
    use crate::{devices::virtio::IrqCounter, memory::create_guest_memory};

    const MEM: u64 = 8 << 20;
    /// Where test data pages start (the queues live below).
    const DATA: u64 = 1 << 20;

    struct Fixture {
        mem: GuestMemory,
        memfd: File,
        irqs: IrqCounter,
        queues: Vec<MockSplitQueue<'static, GuestMemory>>,
    }

    fn fixture() -> Fixture {
        let (mem, memfd) = create_guest_memory(MEM).expect("memory");
        // Allocate the pages the queues and buffers live in, so that what
        // the tests measure is only what the device punched.
        mem.write_slice(&vec![0; DATA as usize], GuestAddress(0))
            .expect("touch");
        // The mock queues borrow the memory for their lifetime; a leaked
        // clone keeps it alive for the test.
        let leaked: &'static GuestMemory = Box::leak(Box::new(mem.clone()));
        let queues = (0..4)
            .map(|i| MockSplitQueue::create(leaked, GuestAddress(0x1000 * i), 16))
            .collect();
        Fixture {
            mem,
            memfd,
            irqs: IrqCounter::default(),
            queues,
        }
    }

    /// A balloon device activated on the fixture's queues with `acked`.
    fn device(f: &Fixture, config: BalloonConfig, acked: u64) -> Balloon {
        let mut b = Balloon::new(config, MEM).expect("balloon");
        b.ack_features(acked);
        let mut queues: Vec<Queue> = f
            .queues
            .iter()
            .map(|q| q.create_queue().expect("queue"))
            .collect();
        for q in &mut queues {
            q.set_ready(true);
        }
        let evts = (0..4)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("evt"))
            .collect();
        b.activate(
            f.mem.clone(),
            Interrupt::new(Box::new(f.irqs.clone())),
            queues,
            evts,
        )
        .expect("activate");
        b
    }

    fn all() -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << F_STATS_VQ) | (1 << F_DEFLATE_ON_OOM) | (1 << F_REPORTING)
    }

    fn config() -> BalloonConfig {
        BalloonConfig {
            stats_interval_s: 1,
            ..BalloonConfig::default()
        }
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// Allocated bytes of the memfd.
    fn allocated(f: &Fixture) -> u64 {
        f.memfd.metadata().expect("stat").blocks() * 512
    }

    /// Fills `len` bytes at `addr` (allocating them in the memfd).
    fn fill(f: &Fixture, addr: u64, len: u64) {
        f.mem
            .write_slice(&vec![0x5a; len as usize], GuestAddress(addr))
            .expect("fill");
    }

    fn byte_at(f: &Fixture, addr: u64) -> u8 {
        f.mem.read_obj(GuestAddress(addr)).expect("read")
    }

    fn used(f: &Fixture, q: usize) -> u16 {
        f.queues[q].used().idx().load()
    }

    #[test]
    fn queues_are_numbered_by_the_features_taken() {
        let base = 1 << VIRTIO_F_VERSION_1;
        let list = |acked| roles(acked).collect::<Vec<_>>();
        assert_eq!(list(base), [Role::Inflate, Role::Deflate]);
        assert_eq!(list(base | (1 << F_REPORTING))[2], Role::Reporting);
        assert_eq!(list(all())[2..], [Role::Stats, Role::Reporting]);
    }

    #[test]
    fn features_follow_the_configuration() {
        let b = Balloon::new(config(), MEM).expect("balloon");
        assert_eq!(b.features(), all());
        let plain = Balloon::new(
            BalloonConfig {
                free_page_reporting: false,
                stats_interval_s: 0,
                deflate_on_oom: false,
                ..BalloonConfig::default()
            },
            MEM,
        )
        .expect("balloon");
        assert_eq!(plain.features(), 1 << VIRTIO_F_VERSION_1);
        assert_eq!(plain.queues_in_use(), 2);
    }

    #[test]
    fn a_free_page_report_returns_its_pages_to_the_host() {
        let f = fixture();
        let b = device(&f, config(), all());
        fill(&f, DATA, 4 << 20);
        let before = allocated(&f);
        // Two 2 MiB ranges, as the guest's page allocator reports them.
        f.queues[3]
            .add_desc_chains(
                &[
                    desc(DATA, 2 << 20, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                    desc(DATA + (2 << 20), 2 << 20, VRING_DESC_F_WRITE, 0),
                ],
                0,
            )
            .expect("chain");
        lock(&b.inner).process_queue(3);
        assert_eq!(used(&f, 3), 1, "the report buffer is returned");
        // (Measured before reading them back: a read of a punched shmem
        // page allocates it again.)
        assert_eq!(before - allocated(&f), 4 << 20, "4 MiB left the memfd");
        assert_eq!(byte_at(&f, DATA), 0);
        assert_eq!(byte_at(&f, DATA + (4 << 20) - 1), 0);
        let c = b.control().report().counters;
        assert_eq!(
            (c.reports, c.reported_bytes, c.bad_buffers),
            (1, 4 << 20, 0)
        );
        assert!(f.irqs.count() >= 1);
    }

    #[test]
    fn a_bad_report_punches_nothing_and_is_returned() {
        let bad: [(u64, u32, u32); 5] = [
            (DATA + 512, 4096, VRING_DESC_F_WRITE), // unaligned address
            (DATA, 4095, VRING_DESC_F_WRITE),       // unaligned length
            (MEM - 4096, 8192, VRING_DESC_F_WRITE), // runs past guest RAM
            (u64::MAX - 4095, 4096, VRING_DESC_F_WRITE), // outside, wraps
            (DATA, 4096, 0),                        // device-readable
        ];
        for (i, (addr, len, flags)) in bad.into_iter().enumerate() {
            let f = fixture();
            let b = device(&f, config(), all());
            fill(&f, DATA, 2 << 20);
            fill(&f, MEM - 4096, 4096);
            let before = allocated(&f);
            // A good range first: one bad descriptor refuses the whole report.
            f.queues[3]
                .add_desc_chains(
                    &[
                        desc(
                            DATA + (1 << 20),
                            4096,
                            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                            1,
                        ),
                        desc(addr, len, flags, 0),
                    ],
                    0,
                )
                .expect("chain");
            lock(&b.inner).process_queue(3);
            assert_eq!(used(&f, 3), 1, "case {i}: returned");
            assert_eq!(allocated(&f), before, "case {i}: nothing punched");
            assert_eq!(byte_at(&f, DATA + (1 << 20)), 0x5a, "case {i}");
            assert_eq!(b.control().report().counters.bad_buffers, 1, "case {i}");
        }
    }

    #[test]
    fn inflated_pages_are_punched_and_deflated_ones_counted() {
        let f = fixture();
        let b = device(&f, config(), all());
        fill(&f, DATA, 1 << 20);
        let before = allocated(&f);
        let first = (DATA / PAGE_SIZE) as u32;
        // 3 consecutive pages and one apart: two runs.
        let pfns: Vec<u8> = [first, first + 1, first + 2, first + 10]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        f.mem
            .write_slice(&pfns, GuestAddress(0x8_0000))
            .expect("pfns");
        f.queues[0]
            .add_desc_chains(&[desc(0x8_0000, pfns.len() as u32, 0, 0)], 0)
            .expect("chain");
        lock(&b.inner).process_queue(0);
        assert_eq!(used(&f, 0), 1);
        assert_eq!(before - allocated(&f), 4 * PAGE_SIZE);
        assert_eq!(byte_at(&f, DATA + 10 * PAGE_SIZE), 0);
        assert_eq!(
            byte_at(&f, DATA + 3 * PAGE_SIZE),
            0x5a,
            "page 3 was not listed"
        );
        f.queues[1]
            .add_desc_chains(&[desc(0x8_0000, 8, 0, 0)], 0)
            .expect("chain");
        lock(&b.inner).process_queue(1);
        assert_eq!(used(&f, 1), 1);
        let c = b.control().report().counters;
        assert_eq!((c.inflated_pages, c.deflated_pages), (4, 2));
    }

    #[test]
    fn bad_page_lists_are_refused_whole() {
        let f = fixture();
        let b = device(&f, config(), all());
        fill(&f, DATA, 1 << 20);
        fill(&f, MEM - 4096, 4096);
        let before = allocated(&f);
        let good = (DATA / PAGE_SIZE) as u32;
        let outside = (MEM / PAGE_SIZE) as u32;
        let list: Vec<u8> = [good, outside]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        f.mem
            .write_slice(&list, GuestAddress(0x8_0000))
            .expect("list");
        f.queues[0]
            .add_desc_chains(&[desc(0x8_0000, 8, 0, 0)], 0) // a page outside RAM
            .expect("chain");
        f.queues[0]
            .add_desc_chains(&[desc(0x8_0000, 6, 0, 0)], 1) // half a frame number
            .expect("chain");
        f.queues[0]
            .add_desc_chains(&[desc(0x8_0000, 4, VRING_DESC_F_WRITE, 0)], 2) // writable
            .expect("chain");
        f.queues[0]
            .add_desc_chains(&[desc(0x8_0000, 4 * MAX_PFNS as u32 + 4, 0, 0)], 3) // too long
            .expect("chain");
        f.queues[0]
            .add_desc_chains(&[desc(MEM - 2, 4, 0, 0)], 4) // list outside RAM
            .expect("chain");
        lock(&b.inner).process_queue(0);
        assert_eq!(used(&f, 0), 5, "every buffer returned");
        assert_eq!(allocated(&f), before, "nothing punched");
        assert_eq!(b.control().report().counters.bad_buffers, 5);
        assert_eq!(b.control().report().counters.inflated_pages, 0);
    }

    /// Writes a statistics buffer of `pairs` at `addr`.
    fn stats_buffer(f: &Fixture, addr: u64, pairs: &[(u16, u64)]) -> u32 {
        let bytes: Vec<u8> = pairs
            .iter()
            .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
            .collect();
        f.mem
            .write_slice(&bytes, GuestAddress(addr))
            .expect("stats");
        bytes.len() as u32
    }

    #[test]
    fn statistics_are_read_held_and_asked_for_again() {
        let f = fixture();
        let b = device(&f, config(), all());
        let len = stats_buffer(&f, 0x9_0000, &[(4, 1 << 20), (5, 128 << 20), (99, 7)]);
        f.queues[2]
            .add_desc_chains(&[desc(0x9_0000, len, 0, 0)], 0)
            .expect("chain");
        lock(&b.inner).process_queue(2);
        assert_eq!(used(&f, 2), 0, "the device holds the buffer");
        let r = b.control().report();
        let stats = r.stats.expect("stats");
        assert_eq!(stats.free_memory, Some(1 << 20));
        assert_eq!(stats.total_memory, Some(128 << 20));
        assert_eq!(stats.swap_in, None);
        lock(&b.inner).request_stats();
        assert_eq!(used(&f, 2), 1, "returned to be refilled");
        lock(&b.inner).request_stats();
        assert_eq!(used(&f, 2), 1, "nothing held, nothing returned");
        // A malformed buffer is held all the same (the driver refills it)
        // but changes no numbers.
        f.queues[2]
            .add_desc_chains(&[desc(0x9_0000, 7, 0, 0)], 1)
            .expect("chain");
        lock(&b.inner).process_queue(2);
        assert_eq!(b.control().report().counters.bad_buffers, 1);
        assert_eq!(
            b.control().report().stats.expect("stats").free_memory,
            Some(1 << 20)
        );
    }

    #[test]
    fn without_statistics_reporting_is_queue_two() {
        let f = fixture();
        let acked = (1 << VIRTIO_F_VERSION_1) | (1 << F_REPORTING);
        let b = device(&f, config(), acked);
        fill(&f, DATA, 2 << 20);
        f.queues[2]
            .add_desc_chains(&[desc(DATA, 2 << 20, VRING_DESC_F_WRITE, 0)], 0)
            .expect("chain");
        lock(&b.inner).process_queue(2);
        assert_eq!(byte_at(&f, DATA), 0);
        assert_eq!(b.control().report().counters.reported_bytes, 2 << 20);
    }

    #[test]
    fn features_not_offered_are_not_taken() {
        let mut b = Balloon::new(
            BalloonConfig {
                free_page_reporting: false,
                ..config()
            },
            MEM,
        )
        .expect("balloon");
        b.ack_features(all());
        assert!(!b.control().report().free_page_reporting);
        assert_eq!(b.queues_in_use(), 3);
    }

    #[test]
    fn activation_needs_the_queues_the_features_use() {
        let f = fixture();
        let mut b = Balloon::new(config(), MEM).expect("balloon");
        b.ack_features(all());
        let mut queues: Vec<Queue> = f
            .queues
            .iter()
            .map(|q| q.create_queue().expect("queue"))
            .collect();
        let evts = (0..4)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("evt"))
            .collect();
        // The driver set up the first three queues but not reporting's.
        queues[3].set_ready(false);
        let err = b
            .activate(
                f.mem.clone(),
                Interrupt::new(Box::new(f.irqs.clone())),
                queues,
                evts,
            )
            .expect_err("not ready");
        assert!(err.to_string().contains("not ready"), "{err}");
    }

    #[test]
    fn the_target_is_config_space_and_raises_a_config_interrupt() {
        let f = fixture();
        let mut b = device(&f, config(), all());
        let irqs = f.irqs.count();
        b.control().set_target_mib(4).expect("target");
        assert_eq!(f.irqs.count(), irqs + 1);
        let mut num_pages = [0u8; 4];
        b.read_config(0, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 1024);
        b.write_config(4, &512u32.to_le_bytes());
        b.write_config(0, &1u32.to_le_bytes()); // num_pages is the host's
        let r = b.control().report();
        assert_eq!((r.target_mib, r.actual_mib), (4, 2));
        assert!(
            b.control().set_target_mib(9).is_err(),
            "more than the guest has"
        );
    }

    #[test]
    fn state_survives_a_snapshot_and_bad_state_is_refused() {
        let f = fixture();
        let b = device(&f, config(), all());
        b.control().set_target_mib(2).expect("target");
        let len = stats_buffer(&f, 0x9_0000, &[(4, 1)]);
        f.queues[2]
            .add_desc_chains(&[desc(0x9_0000, len, 0, 0)], 5)
            .expect("chain");
        lock(&b.inner).process_queue(2);
        let state = b.save_device_state();
        let mut restored = Balloon::new(config(), MEM).expect("balloon");
        restored.restore_device_state(&state).expect("restore");
        assert_eq!(restored.save_device_state(), state);
        assert_eq!(lock(&restored.inner).stats_head, Some(5));
        assert_eq!(restored.control().report().target_mib, 2);
        let encode = |s: &BalloonState| s.encode();
        let good = BalloonState::decode(&state).expect("decode");
        let bad = [
            encode(&BalloonState {
                version: 9,
                ..good.clone()
            }),
            encode(&BalloonState {
                target_pages: u32::MAX,
                ..good.clone()
            }),
            encode(&BalloonState {
                stats_head: Some(QUEUE_SIZE),
                ..good.clone()
            }),
            state[..state.len() - 1].to_vec(),
            [state.as_slice(), &[0]].concat(),
        ];
        for (i, b) in bad.iter().enumerate() {
            assert!(restored.restore_device_state(b).is_err(), "case {i}");
        }
    }

    #[test]
    fn a_storm_of_bad_accesses_and_buffers_leaves_a_bounded_log() {
        use std::sync::atomic::{AtomicU64, Ordering};

        use crate::{bus::BusDevice, devices::virtio::mmio::MmioTransport, logger::EventCounter};

        let f = fixture();
        let seen = Arc::new(AtomicU64::new(0));
        let b = device(&f, config(), all());
        tracing::subscriber::with_default(EventCounter(seen.clone()), || {
            // Registers: wrong-sized reads and writes, writes to the host's
            // half of the config space.
            let balloon = Balloon::new(config(), MEM).expect("balloon");
            let mut t = MmioTransport::new(
                f.mem.clone(),
                Box::new(balloon),
                Interrupt::new(Box::new(f.irqs.clone())),
            )
            .expect("transport");
            for i in 0..20_000u64 {
                let mut two = [0u8; 2];
                t.read((i * 4) % 0x100, &mut two);
                t.write(0x30, &[1, 2]);
                t.write(0x100, &[1, 2, 3, 4]);
            }
            // Queues: 10,000 reports, each with a bad descriptor.
            for round in 0..1_000u64 {
                let q = MockSplitQueue::create(&f.mem, GuestAddress(0x3000), 16);
                for i in 0..10u16 {
                    q.add_desc_chains(
                        &[desc(DATA + round * 512 + 1, 4096, VRING_DESC_F_WRITE, 0)],
                        i,
                    )
                    .expect("chain");
                }
                let mut queue = q.create_queue::<Queue>().expect("queue");
                queue.set_ready(true);
                let mut inner = lock(&b.inner);
                if let Some(a) = inner.active.as_mut() {
                    a.queues[3] = queue;
                }
                inner.process_queue(3);
            }
        });
        assert_eq!(b.control().report().counters.bad_buffers, 10_000);
        // A handful of call sites, each at most a burst (and the line that
        // says how many were dropped) per window; the storm spans at most
        // a few windows.
        let lines = seen.load(Ordering::Relaxed);
        assert!(
            (1..=200).contains(&lines),
            "{lines} log lines for 70,000 bad accesses and buffers"
        );
    }

    #[test]
    fn consecutive_frames_make_one_range() {
        assert_eq!(
            pfn_ranges(&[1, 2, 3, 7, 8, 2]),
            vec![(4096, 3 * 4096), (7 * 4096, 2 * 4096), (2 * 4096, 4096)]
        );
        assert!(pfn_ranges(&[]).is_empty());
    }

    #[test]
    fn discard_refuses_memory_without_a_file() {
        let anon = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        assert!(matches!(
            discard(&anon, 0, 4096),
            Err(DiscardError::NoFile(0))
        ));
        assert!(matches!(
            discard(&anon, 1 << 20, 4096),
            Err(DiscardError::Range(BufferError::Outside { .. }))
        ));
    }
}
