//! The CPUID the guest sees.
//!
//! husk starts from what KVM supports and then takes away what the guest must
//! not use. Two profiles exist because hosts differ:
//!
//! * [`CpuProfile::Host`] (hardware KVM): the host's features minus the
//!   paravirtual ones that use hypercalls, which husk's VMM does not serve.
//! * [`CpuProfile::Emulated`] (KVM PVM and similar): the guest kernel's code
//!   runs through an instruction emulator that lacks POPCNT, CMPXCHG16B,
//!   CLAC/STAC, XSAVE/XRSTOR and a few more. Most of these features are
//!   hidden (the kernel command line repeats this, see
//!   [`emulated_cmdline`], because some kernel paths probe the hardware
//!   directly). XSAVE is not: guest user code on such hosts runs natively
//!   with the host's XCR0, so the guest kernel must switch every state
//!   component between processes, and husk-vmm executes XSAVE and XRSTOR
//!   for it (`arch/xsave.rs`). The guest sees plain XSAVE for exactly the
//!   user state components the host offers (x87, SSE, AVX, AVX-512), with
//!   the feature bits the kernel ties them to (AVX, AVX512F), and without
//!   XSAVEOPT, XSAVEC, XSAVES or XGETBV with ECX = 1, so that only the
//!   standard format is ever used.
//!
//! The profile is picked once per VM ([`CpuProfile::detect`]), so the same
//! binary runs unchanged on both kinds of host.

use kvm_bindings::kvm_cpuid_entry2;

/// Which CPUID policy to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuProfile {
    /// Hardware virtualization: pass the host's features through.
    Host,
    /// A host that emulates guest kernel code: hide what it cannot emulate.
    Emulated,
}

impl CpuProfile {
    /// Picks the profile for this host: `Emulated` when the KVM in use is
    /// the PVM module (it emulates guest CPL 0 code), `Host` otherwise.
    pub fn detect() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            Self::Emulated
        } else {
            Self::Host
        }
    }

    /// Kernel command line words this profile needs.
    pub fn cmdline(self) -> &'static str {
        match self {
            Self::Host => "",
            Self::Emulated => emulated_cmdline(),
        }
    }
}

/// The kernel command line words that keep a guest kernel away from
/// instructions an emulating host lacks (among them XSAVEOPT, XSAVEC,
/// XSAVES and XGETBV1: husk-vmm executes plain XSAVE and XRSTOR only, and
/// the guest kernel sees some CPUID leaves as the host has them, whatever
/// the VMM's table says), plus `noreplace-smp`: with one vCPU the kernel
/// would otherwise rewrite every LOCK prefix in its text at boot (2.3 s of
/// emulated code measured, see docs/boot-time.md).
pub const fn emulated_cmdline() -> &'static str {
    "clearcpuid=popcnt,cx16,smap,smep,rdrand,rdseed,fsgsbase,erms,fsrm,xsaveopt,xsavec,xsaves,xgetbv1 \
     noreplace-smp"
}

const fn bit(n: u32) -> u32 {
    1 << n
}

// Leaf 1 ECX.
const L1_ECX_MONITOR: u32 = bit(3);
const L1_ECX_VMX: u32 = bit(5);
const L1_ECX_SMX: u32 = bit(6);
const L1_ECX_CX16: u32 = bit(13);
const L1_ECX_PDCM: u32 = bit(15);
const L1_ECX_POPCNT: u32 = bit(23);
const L1_ECX_XSAVE: u32 = bit(26);
const L1_ECX_AVX: u32 = bit(28);
const L1_ECX_F16C: u32 = bit(29);
const L1_ECX_RDRAND: u32 = bit(30);
const L1_ECX_HYPERVISOR: u32 = bit(31);
// Leaf 1 EDX.
const L1_EDX_HTT: u32 = bit(28);
// Leaf 7.0 EBX.
const L7_EBX_FSGSBASE: u32 = bit(0);
const L7_EBX_SGX: u32 = bit(2);
const L7_EBX_HLE: u32 = bit(4);
const L7_EBX_AVX2: u32 = bit(5);
const L7_EBX_SMEP: u32 = bit(7);
const L7_EBX_ERMS: u32 = bit(9);
const L7_EBX_RTM: u32 = bit(11);
const L7_EBX_MPX: u32 = bit(14);
const L7_EBX_AVX512F: u32 = bit(16);
const L7_EBX_AVX512DQ: u32 = bit(17);
const L7_EBX_RDSEED: u32 = bit(18);
const L7_EBX_SMAP: u32 = bit(20);
const L7_EBX_AVX512IFMA: u32 = bit(21);
const L7_EBX_AVX512PF: u32 = bit(26);
const L7_EBX_AVX512ER: u32 = bit(27);
const L7_EBX_AVX512CD: u32 = bit(28);
const L7_EBX_AVX512BW: u32 = bit(30);
const L7_EBX_AVX512VL: u32 = bit(31);
// Leaf 7.0 ECX: AVX-512 and AVX-encoded extensions, protection keys, LA57.
const L7_ECX_HIDDEN: u32 = bit(1)
    | bit(3)
    | bit(4)
    | bit(5)
    | bit(6)
    | bit(8)
    | bit(9)
    | bit(10)
    | bit(11)
    | bit(12)
    | bit(14)
    | bit(16);
// Leaf 7.0 EDX: FSRM, AVX-512 4VNNIW/4FMAPS, AMX, AVX512-FP16, ARCH_CAPABILITIES.
const L7_EDX_FSRM: u32 = bit(4);
const L7_EDX_HIDDEN: u32 = bit(2) | bit(3) | bit(22) | bit(23) | bit(24) | bit(25);
const L7_EDX_ARCH_CAPABILITIES: u32 = bit(29);

// Leaf 0xD.0 EAX: the XSAVE state components an emulated guest may use:
// x87, SSE, AVX, AVX-512 opmask, ZMM_Hi256 and Hi16_ZMM (the user state
// components whose feature bits the guest keeps). MPX is gone from CPUs and
// hidden; PKRU needs RDPKRU/WRPKRU in the guest kernel, which the emulator
// is not known to run; AMX is a dynamic feature the guest cannot enable.
const XSAVE_COMPONENTS: u32 = 0xe7;
// Leaf 0xD.1 EAX: XSAVEOPT, XSAVEC, XGETBV with ECX = 1, XSAVES.
const L0D1_EAX_HIDDEN: u32 = bit(0) | bit(1) | bit(2) | bit(3);
/// The legacy region and the header of an XSAVE area.
const XSAVE_MIN_AREA: u32 = 576;

// KVM paravirtual features (leaf 0x4000_0001 EAX) that need no hypercall.
const KVM_FEATURE_CLOCKSOURCE: u32 = bit(0);
const KVM_FEATURE_NOP_IO_DELAY: u32 = bit(1);
const KVM_FEATURE_CLOCKSOURCE2: u32 = bit(3);
const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = bit(24);
const KVM_FEATURES_KEPT: u32 = KVM_FEATURE_CLOCKSOURCE
    | KVM_FEATURE_NOP_IO_DELAY
    | KVM_FEATURE_CLOCKSOURCE2
    | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT;

/// Applies husk's CPUID policy to `entries` (as KVM reported them) for vCPU
/// `cpu_index` of `cpu_count`.
pub fn apply_policy(
    entries: &mut Vec<kvm_cpuid_entry2>,
    profile: CpuProfile,
    cpu_index: u8,
    cpu_count: u8,
) {
    let apic_id = u32::from(cpu_index);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(cpu_count) << 16);
                e.ecx &= !(L1_ECX_MONITOR | L1_ECX_VMX | L1_ECX_SMX | L1_ECX_PDCM);
                e.ecx |= L1_ECX_HYPERVISOR;
                if cpu_count > 1 {
                    e.edx |= L1_EDX_HTT;
                }
                if profile == CpuProfile::Emulated {
                    e.ecx &= !(L1_ECX_CX16 | L1_ECX_POPCNT | L1_ECX_F16C | L1_ECX_RDRAND);
                }
            }
            0x6 | 0xa => {
                // Thermal/power management and the PMU: not emulated.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x7 if e.index == 0 => {
                e.ebx &= !(L7_EBX_SGX | L7_EBX_HLE | L7_EBX_RTM | L7_EBX_MPX);
                e.edx &= !L7_EDX_ARCH_CAPABILITIES;
                if profile == CpuProfile::Emulated {
                    // AVX512F stays: the guest kernel ties the AVX-512
                    // state components to it.
                    e.ebx &= !(L7_EBX_FSGSBASE
                        | L7_EBX_AVX2
                        | L7_EBX_SMEP
                        | L7_EBX_ERMS
                        | L7_EBX_AVX512DQ
                        | L7_EBX_RDSEED
                        | L7_EBX_SMAP
                        | L7_EBX_AVX512IFMA
                        | L7_EBX_AVX512PF
                        | L7_EBX_AVX512ER
                        | L7_EBX_AVX512CD
                        | L7_EBX_AVX512BW
                        | L7_EBX_AVX512VL);
                    e.ecx &= !L7_ECX_HIDDEN;
                    e.edx &= !(L7_EDX_FSRM | L7_EDX_HIDDEN);
                }
            }
            0x7 if e.index == 1 && profile == CpuProfile::Emulated => {
                // AVX-VNNI, AVX512-BF16 and friends.
                e.eax = 0;
            }
            0xb | 0x1f => {
                e.edx = apic_id;
            }
            0xd if e.index == 1 && profile == CpuProfile::Emulated => {
                e.eax &= !L0D1_EAX_HIDDEN;
                // No supervisor components (IA32_XSS), no XSAVES area.
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x4000_0001 => {
                e.eax &= KVM_FEATURES_KEPT;
            }
            0x8000_001e => {
                e.eax = apic_id;
            }
            _ => {}
        }
    }
    if profile == CpuProfile::Emulated {
        emulated_xsave(entries);
    }
}

/// Leaf 0xD for an emulated guest: the components of [`XSAVE_COMPONENTS`]
/// the host offers, their descriptions and the sizes they add up to; no
/// XSAVE at all (leaf 1's bit and leaf 0xD cleared) when the host offers
/// no XSAVE or its AVX component has no place.
fn emulated_xsave(entries: &mut Vec<kvm_cpuid_entry2>) {
    let offered = entries
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0, |e| e.eax & XSAVE_COMPONENTS);
    // KVM PVM lists the XSAVE components it can hold for the guest (leaf
    // 0xD) but not XSAVE itself in leaf 1: its emulator cannot run it.
    let has_xsave = offered & 0x3 == 0x3;
    let place = |c: u32| {
        entries
            .iter()
            .find(|e| e.function == 0xd && e.index == c && e.eax != 0)
            .map(|e| e.ebx + e.eax)
    };
    // Only components with a place in the standard format.
    let kept = (2..32)
        .filter(|c| offered & (1 << c) != 0 && place(*c).is_some())
        .fold(offered & 0x3, |m, c| m | (1 << c));
    let usable = has_xsave && kept & 0x7 == 0x7;
    let end = (2..32)
        .filter(|c| kept & (1 << c) != 0)
        .filter_map(place)
        .fold(XSAVE_MIN_AREA, u32::max);
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (0x1, _) if !usable => e.ecx &= !(L1_ECX_XSAVE | L1_ECX_AVX),
            (0x1, _) => e.ecx |= L1_ECX_XSAVE | L1_ECX_AVX,
            (0x7, 0) if !usable || kept & 0xe0 != 0xe0 => e.ebx &= !L7_EBX_AVX512F,
            (0xd, 0) if usable => {
                e.eax = kept;
                e.edx = 0;
                // What the components of XCR0 need; KVM keeps EBX current
                // as the guest changes XCR0.
                e.ebx = XSAVE_MIN_AREA;
                e.ecx = end;
            }
            (0xd, 0) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    entries.retain(|e| {
        e.function != 0xd
            || e.index == 0
            || (usable && (e.index == 1 || kept & (1 << e.index) != 0))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// What KVM reports on a host with AVX-512 (and MPX and PKRU, which an
    /// emulated guest does not get).
    fn host_like() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x1, 0, 0, 0x0008_0800, u32::MAX, !L1_EDX_HTT),
            entry(0x7, 0, 0, u32::MAX, u32::MAX, u32::MAX),
            entry(0xd, 0, 0x2ff, 576, 2696, 0),
            entry(0xd, 1, 0xf, 0, 0, 0),
            entry(0xd, 2, 256, 576, 0, 0),
            entry(0xd, 3, 64, 960, 0, 0),
            entry(0xd, 4, 64, 1024, 0, 0),
            entry(0xd, 5, 64, 1088, 0, 0),
            entry(0xd, 6, 512, 1152, 0, 0),
            entry(0xd, 7, 1024, 1664, 0, 0),
            entry(0xd, 9, 8, 2688, 0, 0),
            entry(0xb, 0, 0, 0, 0, 0),
            entry(0x4000_0001, 0, u32::MAX, 0, 0, 0),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("entry")
    }

    #[test]
    fn emulated_profile_hides_what_the_emulator_lacks() {
        let mut e = host_like();
        apply_policy(&mut e, CpuProfile::Emulated, 0, 1);
        let l1 = find(&e, 1, 0);
        for hidden in [L1_ECX_POPCNT, L1_ECX_CX16, L1_ECX_RDRAND] {
            assert_eq!(l1.ecx & hidden, 0);
        }
        assert_ne!(l1.ecx & L1_ECX_HYPERVISOR, 0);
        let l7 = find(&e, 7, 0);
        for hidden in [
            L7_EBX_SMAP,
            L7_EBX_SMEP,
            L7_EBX_FSGSBASE,
            L7_EBX_ERMS,
            L7_EBX_RDSEED,
            L7_EBX_AVX2,
        ] {
            assert_eq!(l7.ebx & hidden, 0);
        }
        assert_eq!(l7.edx & (L7_EDX_FSRM | L7_EDX_ARCH_CAPABILITIES), 0);
    }

    /// The guest kernel switches the AVX and AVX-512 state that its user
    /// code uses natively, with plain XSAVE/XRSTOR only.
    #[test]
    fn emulated_profile_offers_plain_xsave_for_the_user_state() {
        let mut e = host_like();
        apply_policy(&mut e, CpuProfile::Emulated, 0, 1);
        assert_ne!(find(&e, 1, 0).ecx & (L1_ECX_XSAVE | L1_ECX_AVX), 0);
        assert_ne!(find(&e, 7, 0).ebx & L7_EBX_AVX512F, 0);
        let l0 = find(&e, 0xd, 0);
        assert_eq!((l0.eax, l0.edx), (0xe7, 0), "x87 SSE AVX opmask ZMM");
        assert_eq!(l0.ecx, 2688, "the standard area for those");
        let l1 = find(&e, 0xd, 1);
        assert_eq!(l1.eax & 0xf, 0, "no XSAVEOPT, XSAVEC, XGETBV1, XSAVES");
        let subleaves: Vec<u32> = e
            .iter()
            .filter(|x| x.function == 0xd)
            .map(|x| x.index)
            .collect();
        assert_eq!(subleaves, [0, 1, 2, 5, 6, 7], "MPX and PKRU gone");
        assert!(emulated_cmdline().contains(",xsaveopt,xsavec,xsaves,xgetbv1"));
        assert!(!emulated_cmdline().contains("noxsave"));

        // A host without AVX-512: AVX alone, and no AVX512F bit.
        let mut e = host_like();
        e.retain(|x| !(x.function == 0xd && x.index >= 5));
        e.iter_mut()
            .filter(|x| x.function == 0xd && x.index == 0)
            .for_each(|x| x.eax = 0x7);
        apply_policy(&mut e, CpuProfile::Emulated, 0, 1);
        assert_eq!(find(&e, 0xd, 0).eax, 0x7);
        assert_eq!(find(&e, 0xd, 0).ecx, 832);
        assert_eq!(find(&e, 7, 0).ebx & L7_EBX_AVX512F, 0);

        // A host without XSAVE: none offered, nothing described.
        let mut e = host_like();
        e.iter_mut()
            .filter(|x| x.function == 0xd && x.index == 0)
            .for_each(|x| x.eax = 0);
        apply_policy(&mut e, CpuProfile::Emulated, 0, 1);
        assert_eq!(find(&e, 1, 0).ecx & (L1_ECX_XSAVE | L1_ECX_AVX), 0);
        assert_eq!(find(&e, 0xd, 0).eax, 0);
        assert!(!e.iter().any(|x| x.function == 0xd && x.index != 0));
    }

    #[test]
    fn host_profile_keeps_features_but_drops_hypercall_pv() {
        let mut e = host_like();
        apply_policy(&mut e, CpuProfile::Host, 0, 1);
        assert_ne!(find(&e, 1, 0).ecx & L1_ECX_POPCNT, 0);
        assert_ne!(find(&e, 7, 0).ebx & L7_EBX_SMAP, 0);
        assert_eq!(find(&e, 0x4000_0001, 0).eax, KVM_FEATURES_KEPT);
        // Hardware runs every XSAVE form itself: leaf 0xD as KVM gives it,
        // and the guest kernel's command line gets nothing.
        assert_eq!(CpuProfile::Host.cmdline(), "");
        assert_eq!(find(&e, 0xd, 1).eax, 0xf);
        assert_eq!(find(&e, 0xd, 0).eax, 0x2ff);
        assert_eq!(e.iter().filter(|x| x.function == 0xd).count(), 9);
    }

    #[test]
    fn topology_names_each_vcpu() {
        let mut e = host_like();
        apply_policy(&mut e, CpuProfile::Host, 3, 4);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & L1_EDX_HTT, 0);
        assert_eq!(find(&e, 0xb, 0).edx, 3);
    }
}
