//! The guest profiler: where a guest spends its time, kernel stacks
//! included, sampled from the host.
//!
//! Nothing inside the guest helps (no perf, no guest agent involvement):
//! a sampling thread of `husk-vmm` asks every vCPU for a sample at a fixed
//! rate and knocks its thread out of `KVM_RUN` with the kick signal that
//! pause uses. The vCPU thread, on its way back in, reads its registers
//! (`KVM_GET_REGS`, `KVM_GET_SREGS`) and, for a sample in the guest kernel,
//! walks the kernel's frame-pointer chain through guest memory (addresses
//! translated by `KVM_TRANSLATE`, so any paging mode works). A sample in
//! user mode counts as `[user]`, told apart by the guest's page table root
//! (CR3), which is one per process. Samples are kept as raw addresses and
//! counted; names come from the guest kernel's `System.map` when the
//! profile is written (`report`): folded stacks, an SVG flame graph and a
//! table of the functions the kernel was in.
//!
//! Cost: one extra exit and two register reads per vCPU per sample, plus a
//! translation and a read per stack frame, on the host side; the guest
//! itself does nothing. At the default 97 Hz that is well under 1% of a
//! vCPU (measured in `docs/profiling.md`).
//!
//! Stacks are only as good as the guest kernel's frame pointers: a kernel
//! built without them (`CONFIG_FRAME_POINTER`) gives the sampled function
//! alone, which still makes a correct flat profile.

pub mod report;
pub mod session;
pub mod symbols;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use crate::vstate::control::VcpuControl;

/// The deepest kernel stack kept.
pub const MAX_DEPTH: usize = 48;
/// Distinct stacks kept; later new ones are counted as dropped.
const MAX_STACKS: usize = 50_000;
/// Kernel stacks are 16 KiB; a frame link that jumps further up than this
/// has left the stack (garbage in RBP), except across stacks (IRQ stack to
/// task stack), which the cap on depth bounds anyway.
const MAX_FRAME: u64 = 64 * 1024;

/// Where a sample was taken.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sample {
    /// Guest user mode, in the address space whose page table root is
    /// this CR3 (one per process).
    User(u64),
    /// Guest kernel mode: the instruction pointer, then return addresses,
    /// innermost first.
    Kernel(Vec<u64>),
}

/// Reads guest memory by guest virtual address (the vCPU's view).
pub trait GuestStack {
    /// The 8 bytes at `gva`, if mapped.
    fn read_u64(&mut self, gva: u64) -> Option<u64>;
}

/// Whether `addr` is in the kernel half of the address space.
pub fn is_kernel_address(addr: u64) -> bool {
    addr >= 0xffff_8000_0000_0000
}

/// The kernel stack of a sample at `rip` with frame pointer `rbp`: `rip`,
/// then each frame's return address, while the chain stays sane (aligned,
/// in the kernel half, going up the stack, at most [`MAX_DEPTH`]).
pub fn walk_kernel_stack(rip: u64, rbp: u64, mem: &mut impl GuestStack) -> Vec<u64> {
    let mut pcs = vec![rip];
    let mut fp = rbp;
    while pcs.len() < MAX_DEPTH {
        if fp == 0 || fp % 8 != 0 || !is_kernel_address(fp) {
            break;
        }
        let (Some(next), Some(ret)) = (mem.read_u64(fp), mem.read_u64(fp.wrapping_add(8))) else {
            break;
        };
        if !is_kernel_address(ret) {
            break;
        }
        pcs.push(ret);
        if next <= fp || next - fp > MAX_FRAME {
            break;
        }
        fp = next;
    }
    pcs
}

/// The profiler of one VM: sample requests per vCPU, the counts so far.
#[derive(Debug)]
pub struct Profiler {
    period: Duration,
    walk_stacks: bool,
    requests: Vec<AtomicBool>,
    counts: Mutex<HashMap<Sample, u64>>,
    dropped: AtomicU64,
    stop: AtomicBool,
}

impl Profiler {
    /// A profiler for `vcpus` vCPUs sampling at `hz` per vCPU; with
    /// `walk_stacks` the kernel's frame pointers are followed.
    pub fn new(vcpus: u8, hz: u32, walk_stacks: bool) -> Self {
        Self {
            period: Duration::from_secs(1) / hz.clamp(1, 10_000),
            walk_stacks,
            requests: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            counts: Mutex::default(),
            dropped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }
    }

    /// Whether kernel stacks are walked (else the sampled function alone).
    pub fn walks_stacks(&self) -> bool {
        self.walk_stacks
    }

    /// Called by vCPU `index` after each `KVM_RUN`: whether a sample is
    /// wanted (and the request is taken).
    pub fn wanted(&self, index: u8) -> bool {
        self.requests
            .get(usize::from(index))
            .is_some_and(|r| r.swap(false, Ordering::Relaxed))
    }

    /// Counts one sample.
    pub fn record(&self, sample: Sample) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.len();
        match counts.get_mut(&sample) {
            Some(c) => *c += 1,
            None if n < MAX_STACKS => {
                counts.insert(sample, 1);
            }
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The samples so far, and how many were dropped for want of room.
    pub fn snapshot(&self) -> (HashMap<Sample, u64>, u64) {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        (counts.clone(), self.dropped.load(Ordering::Relaxed))
    }

    /// The sampling loop: asks each vCPU for a sample and kicks it, once
    /// per period, until [`Profiler::finish`]. Runs on a thread of its own.
    pub fn run(&self, controls: &[Arc<VcpuControl>]) {
        while !self.stop.load(Ordering::Relaxed) {
            for (req, ctl) in self.requests.iter().zip(controls) {
                req.store(true, Ordering::Relaxed);
                ctl.kick();
            }
            std::thread::sleep(self.period);
        }
    }

    /// Ends the sampling loop.
    pub fn finish(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(HashMap<u64, u64>);

    impl GuestStack for Mem {
        fn read_u64(&mut self, gva: u64) -> Option<u64> {
            self.0.get(&gva).copied()
        }
    }

    const K: u64 = 0xffff_c900_0000_0000;
    const T: u64 = 0xffff_ffff_8100_0000;

    #[test]
    fn the_frame_chain_is_followed_up_the_stack_and_stops_at_anything_odd() {
        // rbp -> [K+0x100] = K+0x180 (next), [K+0x108] = T+0x50 (return)...
        let mut mem = Mem(HashMap::from([
            (K + 0x100, K + 0x180),
            (K + 0x108, T + 0x50),
            (K + 0x180, K + 0x200),
            (K + 0x188, T + 0x90),
            (K + 0x200, 0),
            (K + 0x208, T + 0x20),
        ]));
        assert_eq!(
            walk_kernel_stack(T + 0x10, K + 0x100, &mut mem),
            [T + 0x10, T + 0x50, T + 0x90, T + 0x20]
        );
        // A user-mode return address ends the walk (the syscall entry).
        mem.0.insert(K + 0x188, 0x40_1000);
        assert_eq!(walk_kernel_stack(T, K + 0x100, &mut mem), [T, T + 0x50]);
        // A link that goes down the stack (a loop) ends it after that frame.
        mem.0.insert(K + 0x180, K + 0x100);
        mem.0.insert(K + 0x188, T + 0x90);
        assert_eq!(
            walk_kernel_stack(T, K + 0x100, &mut mem),
            [T, T + 0x50, T + 0x90]
        );
        // No frame pointer, a misaligned or a user one, unmapped memory.
        assert_eq!(walk_kernel_stack(T, 0, &mut mem), [T]);
        assert_eq!(walk_kernel_stack(T, K + 0x101, &mut mem), [T]);
        assert_eq!(walk_kernel_stack(T, 0x7fff_0000, &mut mem), [T]);
        assert_eq!(walk_kernel_stack(T, K + 0x9000, &mut mem), [T]);
    }

    #[test]
    fn a_self_referencing_chain_cannot_run_away() {
        let mut mem = Mem(HashMap::new());
        // Every frame links to the next one up, forever.
        for i in 0..1000u64 {
            mem.0.insert(K + i * 16, K + (i + 1) * 16);
            mem.0.insert(K + i * 16 + 8, T + i);
        }
        assert_eq!(walk_kernel_stack(T, K, &mut mem).len(), MAX_DEPTH);
    }

    #[test]
    fn requests_are_taken_once_and_samples_counted() {
        let p = Profiler::new(2, 100, true);
        assert!(!p.wanted(0));
        p.requests[1].store(true, Ordering::Relaxed);
        assert!(!p.wanted(0) && p.wanted(1) && !p.wanted(1));
        assert!(!p.wanted(7), "no such vCPU");
        p.record(Sample::User(0x1000));
        p.record(Sample::User(0x1000));
        p.record(Sample::Kernel(vec![T]));
        let (counts, dropped) = p.snapshot();
        assert_eq!(counts[&Sample::User(0x1000)], 2);
        assert_eq!(counts[&Sample::Kernel(vec![T])], 1);
        assert_eq!(dropped, 0);
    }
}
