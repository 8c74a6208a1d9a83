//! vCPUs: boot state and the run loop, one thread each.
//!
//! A vCPU thread is a small state machine driven by its [`VcpuControl`]:
//! `Running` until the guest resets or shuts down, a fatal exit happens, or
//! the VMM asks it to stop; `Paused` (parked, guest state stable) while the
//! VMM wants it paused. The VMM knocks it out of `KVM_RUN` with a signal.
//! Whatever ends the loop is reported once on the VMM's channel as a
//! [`VcpuExit`], and the thread ends.
//!
//! Exit decoding is a free function over the two buses, so no device knows
//! about vCPUs and no port numbers live in this loop.

use std::sync::{mpsc::Sender, Arc};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::{
    arch::{
        cpuid::{apply_policy, CpuProfile},
        emulate::{self, Regs},
        regs::{
            segment_from_gdt, Segment, BOOT_GDT, BOOT_MSRS, GDT_BASE, PVH_CR0, PVH_RBX, PVH_RFLAGS,
        },
        xsave,
    },
    bus::Bus,
    memory::GuestMemory,
    profile::{is_kernel_address, walk_kernel_stack, GuestStack, Profiler, Sample},
    vstate::control::{VcpuControl, Wake, Wanted},
};

/// Why a vCPU stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// The guest reset the machine (its way to power off, see i8042).
    Reset,
    /// The guest shut down (triple fault or a KVM shutdown event).
    Shutdown,
    /// The VMM asked the vCPU to stop.
    Stopped,
    /// A fatal error; the message says what and where.
    Error(String),
}

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {0}: {1}")]
    Kvm(u8, &'static str, #[source] kvm_ioctls::Error),
    /// The CPUID list could not be built.
    #[error("vCPU {0}: building CPUID")]
    Cpuid(u8, #[source] vmm_sys_util::fam::Error),
    /// The MSR list could not be built.
    #[error("vCPU {0}: building the MSR list")]
    Msrs(u8, #[source] vmm_sys_util::fam::Error),
}

/// Everything KVM keeps about one vCPU: what a snapshot saves and a
/// restore puts back, in the order KVM needs it back.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was created with.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE state (XSAVE layout).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers (index, value).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// One vCPU and what its exits reach.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemory,
    control: Arc<VcpuControl>,
    /// Instructions stepped over because the host could not emulate them.
    pub stepped: u64,
    /// XSAVE/XRSTOR executed for the guest (`arch/xsave.rs`).
    pub xstate_ops: u64,
    /// Where the guest's XSAVE components lie, read from the vCPU's CPUID
    /// on the first XSAVE/XRSTOR this VMM executes.
    xsave_layout: Option<xsave::Layout>,
    /// The guest profiler, when one samples this VM.
    profiler: Option<Arc<Profiler>>,
}

/// CR4.OSXSAVE: the guest kernel enabled XSAVE.
const CR4_OSXSAVE: u64 = 1 << 18;
/// CR0.PE: protected mode.
const CR0_PE: u64 = 1 << 0;
/// EFER.LMA: long mode is active.
const EFER_LMA: u64 = 1 << 10;
/// CR0.WP: supervisor writes honour read-only pages.
const CR0_WP: u64 = 1 << 16;
/// The size of KVM's (non-XSAVE2) state buffer.
const KVM_XSAVE_BYTES: usize = 4096;

/// An exception the VMM raises in the guest instead of finishing an
/// instruction it executes for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuestFault {
    /// #UD.
    InvalidOpcode,
    /// #GP(0).
    Protection,
    /// #PF at `addr` with the error code `code`.
    Page { addr: u64, code: u32 },
}

fn kvm_seg(s: Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: 0,
        padding: 0,
    }
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`.
    pub fn new(
        vm: &VmFd,
        index: u8,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: GuestMemory,
        control: Arc<VcpuControl>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Kvm(index, "KVM_CREATE_VCPU", e))?;
        Ok(Self {
            fd,
            index,
            pio,
            mmio,
            mem,
            control,
            stepped: 0,
            xstate_ops: 0,
            xsave_layout: None,
            profiler: None,
        })
    }

    /// Sets CPUID, MSRs, FPU and the local APIC's LINT pins (every vCPU).
    pub fn configure(&self, kvm: &Kvm, profile: CpuProfile, count: u8) -> Result<(), VcpuError> {
        let i = self.index;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VcpuError::Kvm(i, "KVM_GET_SUPPORTED_CPUID", e))?;
        let mut entries = supported.as_slice().to_vec();
        apply_policy(&mut entries, profile, i, count);
        let cpuid = CpuId::from_entries(&entries).map_err(|e| VcpuError::Cpuid(i, e))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VcpuError::Kvm(i, "KVM_SET_CPUID2", e))?;

        let entries: Vec<kvm_msr_entry> = BOOT_MSRS
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::Msrs(i, e))?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| VcpuError::Kvm(i, "KVM_SET_MSRS", e))?;
        if set != entries.len() {
            // Some hosts refuse an MSR (e.g. MTRRs); the guest copes, so
            // note it and go on.
            tracing::debug!(
                vcpu = i,
                set,
                wanted = entries.len(),
                "not every boot MSR was accepted"
            );
        }

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| VcpuError::Kvm(i, "KVM_SET_FPU", e))?;

        // LINT0: ExtINT (the PIC), LINT1: NMI, as firmware leaves them.
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| VcpuError::Kvm(i, "KVM_GET_LAPIC", e))?;
        let lint0 = get_lapic_reg(&lapic.regs, 0x350);
        let lint1 = get_lapic_reg(&lapic.regs, 0x360);
        set_lapic_reg(&mut lapic.regs, 0x350, (lint0 & !0x700) | 0x700);
        set_lapic_reg(&mut lapic.regs, 0x360, (lint1 & !0x700) | 0x400);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| VcpuError::Kvm(i, "KVM_SET_LAPIC", e))?;
        Ok(())
    }

    /// Puts the boot vCPU at the PVH entry point.
    pub fn set_pvh_entry(&self, entry: u64) -> Result<(), VcpuError> {
        let i = self.index;
        let regs = kvm_regs {
            rip: entry,
            rbx: PVH_RBX,
            rflags: PVH_RFLAGS,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(|e| VcpuError::Kvm(i, "KVM_SET_REGS", e))?;
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| VcpuError::Kvm(i, "KVM_GET_SREGS", e))?;
        let code = kvm_seg(segment_from_gdt(&BOOT_GDT, 1));
        let data = kvm_seg(segment_from_gdt(&BOOT_GDT, 2));
        let tss = kvm_seg(segment_from_gdt(&BOOT_GDT, 3));
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.gdt.base = GDT_BASE;
        sregs.gdt.limit = u16::try_from(BOOT_GDT.len() * 8 - 1).unwrap_or(u16::MAX);
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = PVH_CR0;
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| VcpuError::Kvm(i, "KVM_SET_SREGS", e))
    }

    /// The MSRs a snapshot of this vCPU saves (probed once per VM).
    pub fn msrs_to_save(&self, kvm: &Kvm) -> Result<Vec<u32>, crate::vstate::vm::VmError> {
        crate::vstate::vm::msrs_to_save(kvm, &self.fd)
    }

    /// Reads the vCPU's whole state. `msr_indices` are the MSRs to save
    /// (see [`Vcpu::msrs_to_save`]). The vCPU must not be running.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let i = self.index;
        let k = |what| move |e| VcpuError::Kvm(i, what, e);
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(k("KVM_GET_CPUID2"))?;
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::Msrs(i, e))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(k("KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(VcpuError::Kvm(
                i,
                "KVM_GET_MSRS (not every MSR could be read)",
                kvm_ioctls::Error::new(libc::EINVAL),
            ));
        }
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: self.fd.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?,
            regs: self.fd.get_regs().map_err(k("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(k("KVM_GET_SREGS"))?,
            xsave: self.fd.get_xsave().map_err(k("KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(k("KVM_GET_XCRS"))?,
            debugregs: self.fd.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?,
            lapic: self.fd.get_lapic().map_err(k("KVM_GET_LAPIC"))?,
            msrs: msrs.as_slice().to_vec(),
            events: self
                .fd
                .get_vcpu_events()
                .map_err(k("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Puts a saved state back into this (fresh) vCPU.
    pub fn restore_state(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let i = self.index;
        let k = |what| move |e| VcpuError::Kvm(i, what, e);
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| VcpuError::Cpuid(i, e))?;
        self.fd.set_cpuid2(&cpuid).map_err(k("KVM_SET_CPUID2"))?;
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(k("KVM_SET_MP_STATE"))?;
        self.fd.set_regs(&s.regs).map_err(k("KVM_SET_REGS"))?;
        self.fd.set_sregs(&s.sregs).map_err(k("KVM_SET_SREGS"))?;
        // SAFETY: `s.xsave` is a complete kvm_xsave read back by KVM_GET_XSAVE
        // on a vCPU with the same CPUID; KVM reads exactly its size.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(k("KVM_SET_XSAVE"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(k("KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(k("KVM_SET_DEBUGREGS"))?;
        self.fd.set_lapic(&s.lapic).map_err(k("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&s.msrs).map_err(|e| VcpuError::Msrs(i, e))?;
        let n = self.fd.set_msrs(&msrs).map_err(k("KVM_SET_MSRS"))?;
        if n != s.msrs.len() {
            let index = s.msrs.get(n).map_or(0, |m| m.index);
            tracing::warn!(vcpu = i, index, "KVM refused a saved MSR");
            return Err(VcpuError::Kvm(
                i,
                "KVM_SET_MSRS (an MSR was refused)",
                kvm_ioctls::Error::new(libc::EINVAL),
            ));
        }
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(k("KVM_SET_VCPU_EVENTS"))
    }

    /// Runs the vCPU until it stops; reports why on `events`. `confine`
    /// runs first, on this thread (it installs the seccomp filter).
    pub fn run(
        mut self,
        events: Sender<(u8, VcpuExit)>,
        wake: impl Fn(),
        confine: impl FnOnce() -> Result<(), String>,
    ) {
        self.control.thread_started();
        let exit = match confine() {
            Ok(()) => self.run_loop(),
            Err(e) => VcpuExit::Error(format!("vCPU {}: {e}", self.index)),
        };
        self.control.thread_exiting();
        if self.stepped > 0 || self.xstate_ops > 0 {
            tracing::debug!(
                vcpu = self.index,
                stepped = self.stepped,
                xsave_xrstor = self.xstate_ops,
                "instructions done for the host emulator"
            );
        }
        let _ = events.send((self.index, exit));
        wake();
    }

    fn run_loop(&mut self) -> VcpuExit {
        loop {
            match self.control.wanted() {
                Wanted::Run => {}
                Wanted::Stop => return VcpuExit::Stopped,
                Wanted::Pause => {
                    match self.control.park() {
                        Wake::Job(job) => job(self),
                        Wake::Wanted(Wanted::Stop) => return VcpuExit::Stopped,
                        Wake::Wanted(_) => {}
                    }
                    continue;
                }
            }
            match self.fd.run() {
                Ok(exit) => match handle_exit(exit, &self.pio, &self.mmio) {
                    ExitAction::Continue => {}
                    ExitAction::Stop(reason) => return reason,
                    ExitAction::EmulationFailure => {
                        if let Err(msg) = self.step_over_failed_instruction() {
                            return VcpuExit::Error(format!("vCPU {}: {msg}", self.index));
                        }
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    return VcpuExit::Error(format!("vCPU {}: KVM_RUN failed: {e}", self.index))
                }
            }
            self.sample_if_wanted();
        }
    }

    /// Has this vCPU sampled by `profiler` (before it runs).
    pub fn set_profiler(&mut self, profiler: Arc<Profiler>) {
        self.profiler = Some(profiler);
    }

    /// Takes a profile sample if the profiler asked for one: where the
    /// guest is (user: which address space; kernel: the stack).
    fn sample_if_wanted(&self) {
        let Some(p) = &self.profiler else {
            return;
        };
        if !p.wanted(self.index) {
            return;
        }
        let Ok(regs) = self.fd.get_regs() else {
            return;
        };
        let sample = if is_kernel_address(regs.rip) {
            if p.walks_stacks() {
                let mut stack = VcpuStack {
                    fd: &self.fd,
                    mem: &self.mem,
                    page: None,
                };
                Sample::Kernel(walk_kernel_stack(regs.rip, regs.rbp, &mut stack))
            } else {
                Sample::Kernel(vec![regs.rip])
            }
        } else {
            let cr3 = self.fd.get_sregs().map_or(0, |s| s.cr3);
            Sample::User(cr3 & !0xfff)
        };
        p.record(sample);
    }

    /// Handles `KVM_EXIT_INTERNAL_ERROR`: if it is an emulation failure on
    /// an instruction husk can execute itself, execute it and go on.
    fn step_over_failed_instruction(&mut self) -> Result<(), String> {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM
        // fills the `internal`/`emulation_failure` members of the union.
        let (suberror, ndata, flags, insn) = unsafe {
            let ef = run.__bindgen_anon_1.emulation_failure;
            let insn = ef.__bindgen_anon_1.__bindgen_anon_1;
            (ef.suberror, ef.ndata, ef.flags, insn)
        };
        let mut kregs = self
            .fd
            .get_regs()
            .map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            return Err(format!(
                "KVM internal error, suberror {suberror}, at RIP {:#x}",
                kregs.rip
            ));
        }
        let bytes: Vec<u8> = if ndata >= 3
            && flags & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
                != 0
        {
            let n = usize::from(insn.insn_size).min(insn.insn_bytes.len());
            insn.insn_bytes[..n].to_vec()
        } else {
            self.read_code_at_rip(kregs.rip)
        };
        if bytes.windows(2).any(|w| w == [0x0f, 0xae]) {
            let sregs = self
                .fd
                .get_sregs()
                .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
            let mode = if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
                Some(xsave::Mode::Long)
            } else if sregs.cr0 & CR0_PE != 0 && sregs.cs.db != 0 {
                Some(xsave::Mode::Protected32)
            } else {
                None
            };
            if let Some(insn) = mode.and_then(|m| xsave::decode(&bytes, m)) {
                return self.xstate_instruction(&insn, kregs, sregs);
            }
        }
        let mut regs = to_regs(&kregs);
        let stepped = emulate::step(&bytes, &mut regs).map_err(|e| e.to_string())?;
        from_regs(&regs, &mut kregs);
        self.fd
            .set_regs(&kregs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        self.stepped += 1;
        tracing::trace!(
            vcpu = self.index,
            ?stepped,
            rip = kregs.rip,
            "stepped over an instruction"
        );
        Ok(())
    }

    /// Executes XSAVE or XRSTOR for the guest (`arch/xsave.rs`), or raises
    /// the fault the CPU would; either way the guest goes on.
    fn xstate_instruction(
        &mut self,
        insn: &xsave::Insn,
        mut kregs: kvm_regs,
        sregs: kvm_sregs,
    ) -> Result<(), String> {
        if self.xsave_layout.is_none() {
            self.xsave_layout = Some(self.read_xsave_layout()?);
        }
        let layout = self
            .xsave_layout
            .clone()
            .unwrap_or_else(|| xsave::Layout::new([]));
        let next = kregs.rip.wrapping_add(insn.len as u64);
        match self.xstate_op(insn, &kregs, &sregs, next, &layout)? {
            Ok(()) => {
                kregs.rip = next;
                self.fd
                    .set_regs(&kregs)
                    .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
            }
            Err(fault) => self.raise(fault, sregs)?,
        }
        self.xstate_ops += 1;
        Ok(())
    }

    /// The instruction's work: `Ok(Err(fault))` when the guest must take a
    /// fault instead, `Err` when the VMM itself failed.
    fn xstate_op(
        &self,
        insn: &xsave::Insn,
        kregs: &kvm_regs,
        sregs: &kvm_sregs,
        next: u64,
        layout: &xsave::Layout,
    ) -> Result<Result<(), GuestFault>, String> {
        if sregs.cr4 & CR4_OSXSAVE == 0 {
            return Ok(Err(GuestFault::InvalidOpcode));
        }
        let xcrs = self
            .fd
            .get_xcrs()
            .map_err(|e| format!("KVM_GET_XCRS: {e}"))?;
        let xcr0 = xcrs.xcrs[..usize::try_from(xcrs.nr_xcrs)
            .unwrap_or(0)
            .min(xcrs.xcrs.len())]
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(1, |x| x.value);
        if !layout.fits(xcr0, KVM_XSAVE_BYTES) {
            return Err(format!(
                "XCR0 {xcr0:#x} names state components this VMM cannot move"
            ));
        }
        let rfbm = xcr0 & ((kregs.rdx << 32) | (kregs.rax & 0xffff_ffff));
        let regs = to_regs(kregs);
        let addr = insn
            .operand
            .address(&regs.gpr, next, sregs.fs.base, sregs.gs.base);
        if addr % xsave::ALIGN != 0 {
            return Ok(Err(GuestFault::Protection));
        }
        let write = insn.op == xsave::Op::Save;
        let mut area = vec![0u8; layout.extent(rfbm)];
        let pages = match self.guest_pages(addr, area.len(), write, sregs.cr0 & CR0_WP != 0) {
            Ok(p) => p,
            Err(fault) => return Ok(Err(fault)),
        };
        for (at, gpa, len) in &pages {
            self.mem
                .read_slice(&mut area[*at..*at + *len], GuestAddress(*gpa))
                .map_err(|e| format!("reading the XSAVE area at {gpa:#x}: {e}"))?;
        }
        let mut state = self
            .fd
            .get_xsave()
            .map_err(|e| format!("KVM_GET_XSAVE: {e}"))?;
        let mut cpu: Vec<u8> = state.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        match insn.op {
            xsave::Op::Save => {
                for r in xsave::save(&cpu, &mut area, rfbm, layout) {
                    for (at, gpa, len) in &pages {
                        // The part of `r` on this page.
                        let (lo, hi) = (r.start.max(*at), r.end.min(at + len));
                        if lo < hi {
                            self.mem
                                .write_slice(&area[lo..hi], GuestAddress(gpa + (lo - at) as u64))
                                .map_err(|e| format!("writing the XSAVE area: {e}"))?;
                        }
                    }
                }
            }
            xsave::Op::Restore => {
                if let Err(xsave::Fault::Gp) = xsave::restore(&mut cpu, &area, rfbm, xcr0, layout) {
                    return Ok(Err(GuestFault::Protection));
                }
                for (w, b) in state.region.iter_mut().zip(cpu.chunks_exact(4)) {
                    *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                // SAFETY: `state` is a whole kvm_xsave, which is all that
                // KVM_SET_XSAVE reads.
                unsafe { self.fd.set_xsave(&state) }.map_err(|e| format!("KVM_SET_XSAVE: {e}"))?;
            }
        }
        Ok(Ok(()))
    }

    /// The guest-physical pieces of `len` bytes at guest-virtual `addr`:
    /// `(offset in the range, guest-physical address, length)` per page,
    /// or the page fault a supervisor access (a write if `write`) would
    /// take.
    fn guest_pages(
        &self,
        addr: u64,
        len: usize,
        write: bool,
        wp: bool,
    ) -> Result<Vec<(usize, u64, usize)>, GuestFault> {
        const PAGE: u64 = 4096;
        let mut out = Vec::new();
        let mut done = 0usize;
        while done < len {
            let va = addr.wrapping_add(done as u64);
            let chunk = usize::try_from(PAGE - va % PAGE)
                .unwrap_or(4096)
                .min(len - done);
            let w = u32::from(write) << 1;
            let t = match self.fd.translate_gva(va) {
                Ok(t) if t.valid != 0 => t,
                _ => return Err(GuestFault::Page { addr: va, code: w }),
            };
            if write && wp && t.writeable == 0 {
                return Err(GuestFault::Page {
                    addr: va,
                    code: w | 1,
                });
            }
            out.push((done, t.physical_address, chunk));
            done += chunk;
        }
        Ok(out)
    }

    /// Raises `fault` in the guest: it is delivered when the vCPU runs
    /// next, at the faulting instruction (RIP is not advanced).
    fn raise(&self, fault: GuestFault, mut sregs: kvm_sregs) -> Result<(), String> {
        let (nr, code) = match fault {
            GuestFault::InvalidOpcode => (6, None),
            GuestFault::Protection => (13, Some(0)),
            GuestFault::Page { addr, code } => {
                sregs.cr2 = addr;
                self.fd
                    .set_sregs(&sregs)
                    .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
                (14, Some(code))
            }
        };
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
        events.exception.injected = 1;
        events.exception.nr = nr;
        events.exception.has_error_code = u8::from(code.is_some());
        events.exception.error_code = code.unwrap_or(0);
        events.flags = 0;
        self.fd
            .set_vcpu_events(&events)
            .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))?;
        tracing::debug!(vcpu = self.index, ?fault, "raised a fault for XSAVE/XRSTOR");
        Ok(())
    }

    /// The XSAVE layout of this vCPU's CPUID (leaf 0xD).
    fn read_xsave_layout(&self) -> Result<xsave::Layout, String> {
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| format!("KVM_GET_CPUID2: {e}"))?;
        Ok(xsave::Layout::new(
            cpuid
                .as_slice()
                .iter()
                .filter(|e| e.function == 0xd && e.index >= 2)
                .map(|e| (e.index, e.ebx, e.eax)),
        ))
    }

    fn read_code_at_rip(&self, rip: u64) -> Vec<u8> {
        let Ok(t) = self.fd.translate_gva(rip) else {
            return Vec::new();
        };
        if t.valid == 0 {
            return Vec::new();
        }
        let mut buf = [0u8; 15];
        match self
            .mem
            .read_slice(&mut buf, GuestAddress(t.physical_address))
        {
            Ok(()) => buf.to_vec(),
            Err(_) => Vec::new(),
        }
    }
}

/// Guest memory as a vCPU sees it, for the profiler's stack walk: each
/// page translated once by KVM (`KVM_TRANSLATE`, whatever the paging mode).
struct VcpuStack<'a> {
    fd: &'a VcpuFd,
    mem: &'a GuestMemory,
    /// The last page translated: (guest virtual, guest physical).
    page: Option<(u64, u64)>,
}

impl GuestStack for VcpuStack<'_> {
    fn read_u64(&mut self, gva: u64) -> Option<u64> {
        // Aligned, so never across a page boundary.
        if gva % 8 != 0 {
            return None;
        }
        let virt = gva & !0xfff;
        let phys = match self.page {
            Some((v, p)) if v == virt => p,
            _ => {
                let t = self.fd.translate_gva(virt).ok()?;
                if t.valid == 0 {
                    return None;
                }
                let p = t.physical_address & !0xfff;
                self.page = Some((virt, p));
                p
            }
        };
        self.mem
            .read_obj::<u64>(GuestAddress(phys + (gva & 0xfff)))
            .ok()
    }
}

fn get_lapic_reg(regs: &[libc::c_char; 1024], offset: usize) -> u32 {
    let b: [u8; 4] = [
        regs[offset] as u8,
        regs[offset + 1] as u8,
        regs[offset + 2] as u8,
        regs[offset + 3] as u8,
    ];
    u32::from_le_bytes(b)
}

fn set_lapic_reg(regs: &mut [libc::c_char; 1024], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as libc::c_char;
    }
}

fn to_regs(k: &kvm_regs) -> Regs {
    Regs {
        gpr: [
            k.rax, k.rcx, k.rdx, k.rbx, k.rsp, k.rbp, k.rsi, k.rdi, k.r8, k.r9, k.r10, k.r11,
            k.r12, k.r13, k.r14, k.r15,
        ],
        rip: k.rip,
        rflags: k.rflags,
    }
}

fn from_regs(r: &Regs, k: &mut kvm_regs) {
    let g = r.gpr;
    (k.rax, k.rcx, k.rdx, k.rbx, k.rsp, k.rbp, k.rsi, k.rdi) =
        (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
    (k.r8, k.r9, k.r10, k.r11, k.r12, k.r13, k.r14, k.r15) =
        (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
    k.rip = r.rip;
    k.rflags = r.rflags;
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// Stop the vCPU.
    Stop(VcpuExit),
    /// The host's emulator failed on an instruction; try to step over it.
    EmulationFailure,
}

/// Decodes one exit and dispatches it to the buses.
pub fn handle_exit(exit: KvmExit<'_>, pio: &Bus, mmio: &Bus) -> ExitAction {
    match exit {
        KvmExit::IoIn(port, data) => {
            pio.read(u64::from(port), data);
            ExitAction::Continue
        }
        KvmExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
            ExitAction::Continue
        }
        KvmExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                data.fill(0);
            }
            ExitAction::Continue
        }
        KvmExit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
            ExitAction::Continue
        }
        KvmExit::Hlt | KvmExit::IrqWindowOpen | KvmExit::Intr => ExitAction::Continue,
        KvmExit::Shutdown => ExitAction::Stop(VcpuExit::Shutdown),
        KvmExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(VcpuExit::Reset),
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(VcpuExit::Shutdown),
            other => ExitAction::Stop(VcpuExit::Error(format!(
                "guest system event {other} (crash)"
            ))),
        },
        KvmExit::InternalError => ExitAction::EmulationFailure,
        KvmExit::FailEntry(reason, cpu) => ExitAction::Stop(VcpuExit::Error(format!(
            "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
        ))),
        other => ExitAction::Stop(VcpuExit::Error(format!("unexpected vCPU exit {other:?}"))),
    }
}
