//! Boot register values for PVH direct entry.
//!
//! The PVH ABI starts the kernel in 32-bit protected mode with paging off,
//! flat 4 GiB code and data segments, and `%ebx` pointing at the start info.
//! These are plain values; `vstate::vcpu` writes them into KVM.

use super::layout::{BOOT_GDT_START, PVH_INFO_START};

/// One GDT entry packed in the CPU's format.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// The boot GDT: null, 32-bit code (0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// A segment as KVM's `kvm_segment` wants it, decoded from a GDT entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (granularity applied).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type field.
    pub type_: u8,
    /// Present bit.
    pub present: u8,
    /// Privilege level.
    pub dpl: u8,
    /// Default operation size (32-bit).
    pub db: u8,
    /// Descriptor type (code/data vs system).
    pub s: u8,
    /// Long mode.
    pub l: u8,
    /// Granularity.
    pub g: u8,
    /// Available bit.
    pub avl: u8,
}

/// Decodes GDT entry `index` of `gdt` into a segment with its selector.
// Bit fields of the descriptor are extracted with masks before narrowing.
#[allow(clippy::cast_possible_truncation)]
pub fn segment_from_gdt(gdt: &[u64], index: u8) -> Segment {
    let e = gdt[usize::from(index)];
    let g = ((e >> 55) & 1) as u8;
    let raw_limit = (((e >> 32) & 0x000f_0000) | (e & 0xffff)) as u32;
    Segment {
        base: ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
    }
}

/// CR0.PE | CR0.ET: protected mode, no paging.
pub const PVH_CR0: u64 = 0x11;
/// RFLAGS with only the reserved bit 1 set.
pub const PVH_RFLAGS: u64 = 0x2;
/// `%rbx` at entry: the start info's address.
pub const PVH_RBX: u64 = PVH_INFO_START;
/// GDT base in guest memory.
pub const GDT_BASE: u64 = BOOT_GDT_START;

/// Model-specific registers set at boot (index, value). Only what the kernel
/// expects from firmware: fast strings on, MTRRs enabled write-back.
pub const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x10, 0),              // TSC
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_flat_32_bit() {
        let cs = segment_from_gdt(&BOOT_GDT, 1);
        assert_eq!(cs.selector, 0x08);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(
            (cs.type_, cs.present, cs.s, cs.db, cs.l, cs.g),
            (0xb, 1, 1, 1, 0, 1)
        );
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = segment_from_gdt(&BOOT_GDT, 2);
        assert_eq!((ds.selector, ds.type_, ds.limit), (0x10, 0x3, 0xffff_ffff));
        let tss = segment_from_gdt(&BOOT_GDT, 3);
        assert_eq!(
            (tss.selector, tss.type_, tss.s, tss.limit, tss.g),
            (0x18, 0xb, 0, 0x67, 0)
        );
    }
}
