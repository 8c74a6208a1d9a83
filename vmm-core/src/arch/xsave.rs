//! `XSAVE` and `XRSTOR` done by the VMM, for hosts whose emulator of guest
//! kernel code lacks them (KVM PVM).
//!
//! On such hosts guest user code runs natively with the host's XCR0 (AVX,
//! AVX-512), so the guest kernel must switch the whole extended state
//! between processes, which only XSAVE/XRSTOR do; but the host's emulator
//! stops the VM on them (`KVM_EXIT_INTERNAL_ERROR`, emulation failure, RIP
//! at the instruction). husk-vmm executes them itself: it decodes the
//! instruction and its memory operand ([`decode`]), reads the vCPU's state
//! in the standard format (`KVM_GET_XSAVE`), and moves the components the
//! requested-feature bitmap names between it and the guest's save area
//! ([`save`], [`restore`]), with the checks the CPU makes (alignment, the
//! header, MXCSR's reserved bits) answered by the fault the CPU would raise
//! ([`Fault`]). Only the standard (non-compacted) format exists here: the
//! CPUID husk gives such guests hides XSAVEC, XSAVES and XSAVEOPT, so the
//! guest kernel uses plain XSAVE and XRSTOR (XSAVEOPT, should a guest run
//! it anyway, is executed as XSAVE: its optimisation is optional).
//!
//! Everything here is pure (bytes in, bytes out) and unit-tested; the vCPU
//! loop (`vstate/vcpu.rs`) does the KVM and guest-memory parts. On
//! hardware KVM the CPU executes these instructions and nothing here runs.

use std::ops::Range;

/// The legacy (FXSAVE) region's size.
pub const LEGACY: usize = 512;
/// Where the XSAVE header starts; it is 64 bytes.
pub const HEADER: usize = 512;
/// The legacy region plus the header: the least a save area holds.
pub const MIN_AREA: usize = LEGACY + 64;
/// How a save area must be aligned.
pub const ALIGN: u64 = 64;

/// Component 0 (x87) and 1 (SSE) live in the legacy region; 2 (AVX) is the
/// first of the others, each at the offset CPUID leaf 0xD gives.
const X87: u64 = 1 << 0;
const SSE: u64 = 1 << 1;
const AVX: u64 = 1 << 2;

/// The x87 state's bytes in the legacy region (control, status, tag,
/// opcode, instruction and data pointers; then the eight registers).
const X87_RANGES: [Range<usize>; 2] = [0..24, 32..160];
/// The SSE registers' bytes.
const XMM_RANGE: Range<usize> = 160..416;
/// MXCSR and MXCSR_MASK.
const MXCSR_RANGE: Range<usize> = 24..32;
/// The header's XSTATE_BV.
const XSTATE_BV: Range<usize> = 512..520;

/// The instructions handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `XSAVE`/`XSAVE64` (and `XSAVEOPT`, executed as XSAVE).
    Save,
    /// `XRSTOR`/`XRSTOR64`.
    Restore,
}

/// A segment override that means something in 64-bit mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// No override, or one of CS/DS/ES/SS (base 0 in 64-bit mode).
    Flat,
    /// `FS:`.
    Fs,
    /// `GS:`.
    Gs,
}

/// A memory operand: `segment:[base + index * scale + disp]`, or
/// `[rip + disp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    /// The segment override.
    pub segment: Segment,
    /// The base register (0 = rax .. 15 = r15), if any.
    pub base: Option<u8>,
    /// The index register and its scale, if any.
    pub index: Option<(u8, u8)>,
    /// The displacement.
    pub disp: i64,
    /// Relative to the next instruction's address.
    pub rip_relative: bool,
    /// A 32-bit address (the 0x67 prefix).
    pub addr32: bool,
}

impl Operand {
    /// The operand's linear address, given the general registers in
    /// encoding order, the address of the next instruction, and the FS and
    /// GS bases.
    pub fn address(&self, gpr: &[u64; 16], next_rip: u64, fs_base: u64, gs_base: u64) -> u64 {
        let mut a = if self.rip_relative { next_rip } else { 0 };
        if let Some(b) = self.base {
            a = a.wrapping_add(gpr[usize::from(b & 15)]);
        }
        if let Some((i, scale)) = self.index {
            a = a.wrapping_add(gpr[usize::from(i & 15)].wrapping_mul(u64::from(scale)));
        }
        a = a.wrapping_add(self.disp as u64);
        if self.addr32 {
            a &= 0xffff_ffff;
        }
        match self.segment {
            Segment::Flat => a,
            Segment::Fs => a.wrapping_add(fs_base),
            Segment::Gs => a.wrapping_add(gs_base),
        }
    }
}

/// A decoded instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// Which.
    pub op: Op,
    /// Its memory operand.
    pub operand: Operand,
    /// Its length in bytes.
    pub len: usize,
}

/// The processor mode an instruction is decoded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 64-bit mode (where a Linux kernel runs).
    Long,
    /// 32-bit protected mode with 32-bit addresses (a boot stub, a test).
    Protected32,
}

/// Decodes `bytes` as XSAVE, XSAVE64, XSAVEOPT, XRSTOR or XRSTOR64 with a
/// memory operand, in `mode`; `None` for anything else (including the
/// forms a 66, F2 or F3 prefix turns into other instructions, and 16-bit
/// addressing).
pub fn decode(bytes: &[u8], mode: Mode) -> Option<Insn> {
    let long = mode == Mode::Long;
    let mut i = 0;
    let mut segment = Segment::Flat;
    let mut addr32 = !long;
    loop {
        match *bytes.get(i)? {
            // Operand-size and repeat prefixes make these opcodes other
            // instructions (CLWB, PTWRITE, ...).
            0x66 | 0xf2 | 0xf3 => return None,
            0x67 if long => addr32 = true,
            // 16-bit addressing.
            0x67 => return None,
            0x64 => segment = Segment::Fs,
            0x65 => segment = Segment::Gs,
            0x2e | 0x36 | 0x3e | 0x26 => segment = Segment::Flat,
            // LOCK on these is #UD.
            0xf0 => return None,
            _ => break,
        }
        i += 1;
    }
    let mut rex = 0u8;
    // Outside 64-bit mode these bytes are INC/DEC, not REX.
    if long && (0x40..=0x4f).contains(&bytes[i]) {
        rex = bytes[i];
        i += 1;
    }
    if bytes.get(i..i + 2)? != [0x0f, 0xae] {
        return None;
    }
    i += 2;
    let modrm = *bytes.get(i)?;
    i += 1;
    let md = modrm >> 6;
    let reg = (modrm >> 3) & 7;
    let rm = modrm & 7;
    if md == 3 {
        return None;
    }
    let op = match reg {
        4 | 6 => Op::Save,
        5 => Op::Restore,
        _ => return None,
    };
    let rex_b = (rex & 1) << 3;
    let rex_x = (rex & 2) << 2;
    let mut operand = Operand {
        segment,
        base: None,
        index: None,
        disp: 0,
        rip_relative: false,
        addr32,
    };
    let disp_len;
    if rm == 4 {
        let sib = *bytes.get(i)?;
        i += 1;
        let scale = 1u8 << (sib >> 6);
        let index = ((sib >> 3) & 7) | rex_x;
        let base = sib & 7;
        if index != 4 {
            operand.index = Some((index, scale));
        }
        if base == 5 && md == 0 {
            disp_len = 4;
        } else {
            operand.base = Some(base | rex_b);
            disp_len = [0, 1, 4][usize::from(md)];
        }
    } else if rm == 5 && md == 0 {
        // RIP-relative in 64-bit mode, an absolute address otherwise.
        operand.rip_relative = long;
        disp_len = 4;
    } else {
        operand.base = Some(rm | rex_b);
        disp_len = [0, 1, 4][usize::from(md)];
    }
    let disp = bytes.get(i..i + disp_len)?;
    operand.disp = match disp_len {
        1 => i64::from(disp[0] as i8),
        4 => i64::from(i32::from_le_bytes([disp[0], disp[1], disp[2], disp[3]])),
        _ => 0,
    };
    i += disp_len;
    if i > crate::arch::emulate::MAX_INSN_LEN {
        return None;
    }
    Some(Insn {
        op,
        operand,
        len: i,
    })
}

/// Where each state component above SSE lives in the standard format, from
/// CPUID leaf 0xD: `(offset, size)` by component number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    components: Vec<(usize, usize)>,
}

impl Layout {
    /// A layout from `(component, offset, size)` triples (CPUID leaf 0xD
    /// sub-leaf `component`: EBX, EAX). Components 0 and 1 are fixed and
    /// ignored here.
    pub fn new(entries: impl IntoIterator<Item = (u32, u32, u32)>) -> Self {
        let mut components = vec![(0, 0); 64];
        for (c, offset, size) in entries {
            if (2..64).contains(&c) {
                components[c as usize] = (offset as usize, size as usize);
            }
        }
        Self { components }
    }

    /// The bytes of component `c` (2 and above) in a save area.
    fn range(&self, c: usize) -> Range<usize> {
        let (o, s) = self.components.get(c).copied().unwrap_or((0, 0));
        o..o + s
    }

    /// How many bytes of a save area an instruction with feature bitmap
    /// `rfbm` reads or writes: the legacy region, the header and each
    /// requested component.
    pub fn extent(&self, rfbm: u64) -> usize {
        (2..64)
            .filter(|c| rfbm & (1 << c) != 0)
            .map(|c| self.range(c).end)
            .fold(MIN_AREA, usize::max)
    }

    /// Whether every component of `mask` has a place that fits in `len`
    /// bytes (KVM's state buffer), outside the legacy region and header.
    pub fn fits(&self, mask: u64, len: usize) -> bool {
        (2..64).filter(|c| mask & (1 << c) != 0).all(|c| {
            let r = self.range(c);
            !r.is_empty() && r.start >= MIN_AREA && r.end <= len
        })
    }
}

/// The fault the CPU raises instead of executing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// General protection, error code 0.
    Gp,
}

fn u64_at(b: &[u8], r: Range<usize>) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[r]);
    u64::from_le_bytes(a)
}

/// XSAVE: writes the components of `rfbm` from the vCPU's state `cpu`
/// (standard format, as `KVM_GET_XSAVE` gives it) into the save area
/// `area` (at least [`Layout::extent`] bytes), and updates its
/// XSTATE_BV. Returns the byte ranges of `area` it wrote (nothing else of
/// the area may change: the guest may keep data there).
pub fn save(cpu: &[u8], area: &mut [u8], rfbm: u64, layout: &Layout) -> Vec<Range<usize>> {
    let mut written = Vec::new();
    let mut copy = |r: Range<usize>, area: &mut [u8]| {
        area[r.clone()].copy_from_slice(&cpu[r.clone()]);
        written.push(r);
    };
    if rfbm & X87 != 0 {
        for r in X87_RANGES {
            copy(r, area);
        }
    }
    if rfbm & SSE != 0 {
        copy(XMM_RANGE, area);
    }
    if rfbm & (SSE | AVX) != 0 {
        copy(MXCSR_RANGE, area);
    }
    for c in 2..64 {
        if rfbm & (1 << c) != 0 {
            copy(layout.range(c), area);
        }
    }
    let old = u64_at(area, XSTATE_BV);
    let new = (old & !rfbm) | (u64_at(cpu, XSTATE_BV) & rfbm);
    area[XSTATE_BV].copy_from_slice(&new.to_le_bytes());
    written.push(XSTATE_BV);
    written
}

/// XRSTOR: loads the components of `rfbm` into the vCPU's state `cpu`
/// (standard format) from the save area `area`: each one whose XSTATE_BV
/// bit is set from the area, each other one to its initial state; MXCSR
/// from the area when SSE or AVX is requested. `xcr0` is the guest's
/// XCR0. Fails as the CPU does: XSTATE_BV naming a component not in XCR0,
/// a compacted or otherwise non-zero XCOMP_BV (bytes 8..24 of the header),
/// reserved MXCSR bits. On failure `cpu` is unchanged.
pub fn restore(
    cpu: &mut [u8],
    area: &[u8],
    rfbm: u64,
    xcr0: u64,
    layout: &Layout,
) -> Result<(), Fault> {
    let bv = u64_at(area, XSTATE_BV);
    if bv & !xcr0 != 0 || area[HEADER + 8..HEADER + 24].iter().any(|&b| b != 0) {
        return Err(Fault::Gp);
    }
    let mut new = cpu.to_vec();
    if rfbm & (SSE | AVX) != 0 {
        let mxcsr = u32::from_le_bytes([area[24], area[25], area[26], area[27]]);
        let mask = match u32::from_le_bytes([cpu[28], cpu[29], cpu[30], cpu[31]]) {
            0 => 0xffbf,
            m => m,
        };
        if mxcsr & !mask != 0 {
            return Err(Fault::Gp);
        }
        new[24..28].copy_from_slice(&mxcsr.to_le_bytes());
    }
    let load = |new: &mut [u8], r: Range<usize>, from_area: bool| {
        if from_area {
            new[r.clone()].copy_from_slice(&area[r]);
        } else {
            new[r].fill(0);
        }
    };
    if rfbm & X87 != 0 {
        let from = bv & X87 != 0;
        for r in X87_RANGES {
            load(&mut new, r, from);
        }
        if !from {
            // FCW's initial value; everything else of x87 starts at 0
            // (an abridged tag of 0: every register empty).
            new[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        }
    }
    if rfbm & SSE != 0 {
        load(&mut new, XMM_RANGE, bv & SSE != 0);
    }
    for c in 2..64 {
        if rfbm & (1 << c) != 0 {
            // Every component above SSE starts at all zeros.
            load(&mut new, layout.range(c), bv & (1 << c) != 0);
        }
    }
    let state_bv = (u64_at(cpu, XSTATE_BV) & !rfbm) | (bv & rfbm);
    new[XSTATE_BV].copy_from_slice(&state_bv.to_le_bytes());
    cpu.copy_from_slice(&new);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of a host with AVX-512 (and the offsets of Intel's
    /// standard format).
    fn layout() -> Layout {
        Layout::new([
            (2, 576, 256),
            (5, 1088, 64),
            (6, 1152, 512),
            (7, 1664, 1024),
            (9, 2688, 8),
        ])
    }

    const XCR0: u64 = 0xe7;

    fn op(bytes: &[u8]) -> Insn {
        decode(bytes, Mode::Long).unwrap_or_else(|| panic!("{bytes:02x?}"))
    }

    #[test]
    fn each_addressing_form_decodes() {
        let gpr: [u64; 16] = std::array::from_fn(|i| 0x1000 * (i as u64 + 1));
        let at = |i: &Insn, rip: u64| {
            i.operand
                .address(&gpr, rip + i.len as u64, 0x7000_0000, 0x9000_0000)
        };
        // xsave64 (%rdi): 48 0f ae 27
        let i = op(&[0x48, 0x0f, 0xae, 0x27]);
        assert_eq!((i.op, i.len), (Op::Save, 4));
        assert_eq!(at(&i, 0), gpr[7]);
        // xrstor64 (%rdi): 48 0f ae 2f
        let i = op(&[0x48, 0x0f, 0xae, 0x2f]);
        assert_eq!((i.op, i.len), (Op::Restore, 4));
        // xsave (%rbx) without REX.W: 0f ae 23
        assert_eq!(op(&[0x0f, 0xae, 0x23]).op, Op::Save);
        // xsaveopt64 (%rdi): 48 0f ae 37, executed as XSAVE
        assert_eq!(op(&[0x48, 0x0f, 0xae, 0x37]).op, Op::Save);
        // xsave64 0x40(%r12): REX.WB, SIB (r12 needs one), disp8
        let i = op(&[0x49, 0x0f, 0xae, 0x64, 0x24, 0x40]);
        assert_eq!(i.len, 6);
        assert_eq!(at(&i, 0), gpr[12] + 0x40);
        // xrstor64 -0x80(%rbp): disp8 negative
        let i = op(&[0x48, 0x0f, 0xae, 0x6d, 0x80]);
        assert_eq!(at(&i, 0), gpr[5] - 0x80);
        // xsave64 0x1000(%r13,%r14,8): REX.WXB, SIB, disp32
        let i = op(&[0x4b, 0x0f, 0xae, 0xa4, 0xf5, 0x00, 0x10, 0x00, 0x00]);
        assert_eq!(i.len, 9);
        assert_eq!(at(&i, 0), gpr[13] + gpr[14] * 8 + 0x1000);
        // xsave64 0x10(%rip)
        let i = op(&[0x48, 0x0f, 0xae, 0x25, 0x10, 0x00, 0x00, 0x00]);
        assert!(i.operand.rip_relative);
        assert_eq!(at(&i, 0x5000), 0x5000 + 8 + 0x10);
        // xsave64 0x2000 (absolute, SIB without base or index)
        let i = op(&[0x48, 0x0f, 0xae, 0x24, 0x25, 0x00, 0x20, 0x00, 0x00]);
        assert_eq!(at(&i, 0), 0x2000);
        // xsave64 %gs:0x18(%rax): a segment override
        let i = op(&[0x65, 0x48, 0x0f, 0xae, 0x60, 0x18]);
        assert_eq!(at(&i, 0), 0x9000_0000 + gpr[0] + 0x18);
        // addr32: xsave (%eax) with rax above 4 GiB
        let mut wide = gpr;
        wide[0] = 0x1_0000_1000;
        let i = op(&[0x67, 0x0f, 0xae, 0x20]);
        assert_eq!(i.operand.address(&wide, 0, 0, 0), 0x1000);
    }

    #[test]
    fn other_instructions_are_not_taken() {
        for bytes in [
            &[0x0f, 0xae, 0xe8][..],         // lfence (register form)
            &[0x0f, 0xae, 0x07],             // fxsave (%rdi)
            &[0x0f, 0xae, 0x0f],             // fxrstor (%rdi)
            &[0x0f, 0xae, 0x3f],             // clflush (%rdi)
            &[0x66, 0x0f, 0xae, 0x37],       // clwb (%rdi)
            &[0xf3, 0x0f, 0xae, 0x27],       // ptwrite (%rdi)
            &[0xf0, 0x0f, 0xae, 0x27],       // lock xsave: #UD
            &[0x48, 0x0f, 0xc7, 0x27],       // xsavec64 (hidden)
            &[0x48, 0x0f, 0xae],             // truncated
            &[0x48, 0x0f, 0xae, 0x64],       // truncated SIB
            &[0x48, 0x0f, 0xae, 0xa7, 0x00], // truncated disp32
            &[],
        ] {
            assert_eq!(decode(bytes, Mode::Long), None, "{bytes:02x?}");
        }
        // More than 15 bytes.
        let mut long = vec![0x3e; 12];
        long.extend([0x48, 0x0f, 0xae, 0x27]);
        assert_eq!(decode(&long, Mode::Long), None);
    }

    #[test]
    fn protected_mode_has_no_rex_and_no_rip() {
        let gpr: [u64; 16] = std::array::from_fn(|i| 0x1_0000_1000 * (i as u64 + 1));
        // xsave [esi]: 0f ae 26, a 32-bit address.
        let i = decode(&[0x0f, 0xae, 0x26], Mode::Protected32).expect("xsave");
        assert_eq!(i.operand.address(&gpr, 3, 0, 0), gpr[6] & 0xffff_ffff);
        // xrstor [0x2000]: mod 0 rm 5 is an absolute address, not RIP.
        let i = decode(
            &[0x0f, 0xae, 0x2d, 0x00, 0x20, 0x00, 0x00],
            Mode::Protected32,
        )
        .expect("xrstor");
        assert_eq!((i.op, i.len), (Op::Restore, 7));
        assert_eq!(i.operand.address(&gpr, 0x5007, 0, 0), 0x2000);
        // 0x48 is DEC EAX there, and 0x67 asks for 16-bit addresses.
        assert_eq!(decode(&[0x48, 0x0f, 0xae, 0x27], Mode::Protected32), None);
        assert_eq!(decode(&[0x67, 0x0f, 0xae, 0x27], Mode::Protected32), None);
    }

    /// A vCPU state with every byte of every component distinct.
    fn cpu() -> Vec<u8> {
        let mut c: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(7) + 3).to_le_bytes()[0])
            .collect();
        c[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        c[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        c[512..520].copy_from_slice(&XCR0.to_le_bytes());
        c[520..576].fill(0);
        c
    }

    #[test]
    fn save_writes_exactly_the_requested_components() {
        let l = layout();
        let cpu = cpu();
        let mut area = vec![0xeeu8; 4096];
        // The guest's own XSTATE_BV bits outside the request are kept.
        area[512..520].copy_from_slice(&(1u64 << 9).to_le_bytes());
        let written = save(&cpu, &mut area, 0x7, &l);
        assert_eq!(&area[..24], &cpu[..24]);
        assert_eq!(&area[24..32], &cpu[24..32], "MXCSR");
        assert_eq!(&area[32..416], &cpu[32..416]);
        assert_eq!(&area[416..512], &[0xee; 96][..], "the available bytes");
        assert_eq!(&area[576..832], &cpu[576..832], "AVX");
        assert!(area[832..].iter().all(|&b| b == 0xee), "AVX-512 not asked");
        assert_eq!(u64_at(&area, 512..520), (1 << 9) | 0x7);
        assert!(written.iter().all(|r| r.end <= l.extent(0x7)));
        assert_eq!(l.extent(0x7), 832);
        assert_eq!(l.extent(XCR0), 2688);
        // AVX alone still saves MXCSR; x87 alone does not.
        let mut area = vec![0u8; 4096];
        save(&cpu, &mut area, AVX, &l);
        assert_eq!(&area[24..28], &cpu[24..28]);
        assert!(area[..24].iter().all(|&b| b == 0));
        let mut area = vec![0u8; 4096];
        save(&cpu, &mut area, X87, &l);
        assert!(area[24..32].iter().all(|&b| b == 0));
    }

    #[test]
    fn restore_loads_present_components_and_inits_the_others() {
        let l = layout();
        let mut src = cpu();
        src.iter_mut().skip(32).for_each(|b| *b = b.wrapping_add(1));
        src[520..576].fill(0);
        // Area: x87, SSE and opmask present; AVX and the ZMM parts absent.
        src[512..520].copy_from_slice(&(X87 | SSE | (1 << 5)).to_le_bytes());
        let mut state = cpu();
        let before = state.clone();
        restore(&mut state, &src, XCR0, XCR0, &l).expect("restore");
        assert_eq!(&state[32..416], &src[32..416]);
        assert_eq!(&state[1088..1152], &src[1088..1152], "opmask");
        assert!(state[576..832].iter().all(|&b| b == 0), "AVX init");
        assert!(state[1152..2688].iter().all(|&b| b == 0), "ZMM init");
        assert_eq!(u64_at(&state, 512..520), X87 | SSE | (1 << 5));
        assert_eq!(&state[2688..], &before[2688..], "not asked: kept");
        // x87 absent: FCW 0x37f, the rest zero.
        let mut area = src.clone();
        area[512..520].copy_from_slice(&SSE.to_le_bytes());
        restore(&mut state, &area, X87 | SSE, XCR0, &l).expect("restore");
        assert_eq!(&state[0..2], &[0x7f, 0x03]);
        assert!(state[2..24].iter().all(|&b| b == 0));
        // Components outside the request keep their state and their bit.
        let mut state = cpu();
        restore(&mut state, &area, SSE, XCR0, &l).expect("restore");
        assert_eq!(&state[0..24], &cpu()[0..24]);
        assert_eq!(u64_at(&state, 512..520), XCR0, "x87 and the rest untouched");
    }

    #[test]
    fn restore_faults_as_the_cpu_does() {
        let l = layout();
        let good = {
            let mut a = cpu();
            a[512..520].copy_from_slice(&0x3u64.to_le_bytes());
            a
        };
        let mut state = cpu();
        let before = state.clone();
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut a = good.clone();
            f(&mut a);
            a
        };
        for (what, area) in [
            (
                "a component not in XCR0",
                bad(&|a| a[512..520].copy_from_slice(&(1u64 << 3).to_le_bytes())),
            ),
            (
                "compacted",
                bad(&|a| a[520..528].copy_from_slice(&(1u64 << 63 | 3).to_le_bytes())),
            ),
            ("header bytes 16..24", bad(&|a| a[530] = 1)),
            (
                "MXCSR reserved bits",
                bad(&|a| a[24..28].copy_from_slice(&0xffff_0000u32.to_le_bytes())),
            ),
        ] {
            assert_eq!(
                restore(&mut state, &area, XCR0, XCR0, &l),
                Err(Fault::Gp),
                "{what}"
            );
            assert_eq!(state, before, "{what}: nothing loaded");
        }
        // Header bytes 24..64 are not checked in the standard form.
        let area = bad(&|a| a[540] = 1);
        assert_eq!(restore(&mut state, &area, XCR0, XCR0, &l), Ok(()));
    }

    #[test]
    fn save_then_restore_round_trips() {
        let l = layout();
        let original = cpu();
        let mut area = vec![0u8; 4096];
        save(&original, &mut area, XCR0, &l);
        let mut other: Vec<u8> = cpu().iter().map(|b| !b).collect();
        other[24..32].copy_from_slice(&original[24..32]);
        other[520..576].fill(0);
        restore(&mut other, &area, XCR0, XCR0, &l).expect("restore");
        for r in [0..24, 24..28, 32..416, 576..832, 1088..2688] {
            assert!(other[r.clone()] == original[r.clone()], "{r:?}");
        }
    }

    #[test]
    fn layouts_must_fit_the_state_buffer() {
        let l = layout();
        assert!(l.fits(XCR0 | (1 << 9), 4096));
        assert!(!l.fits(XCR0, 2000), "ZMM ends at 2688");
        assert!(!l.fits(1 << 17, 4096), "no place given for AMX");
        let overlapping = Layout::new([(2, 100, 256)]);
        assert!(!overlapping.fits(AVX, 4096), "inside the legacy region");
    }
}
