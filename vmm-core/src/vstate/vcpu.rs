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
    /// The guest profiler, when one samples this VM.
    profiler: Option<Arc<Profiler>>,
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
        if self.stepped > 0 {
            tracing::debug!(
                vcpu = self.index,
                stepped = self.stepped,
                "instructions stepped over for the host emulator"
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
