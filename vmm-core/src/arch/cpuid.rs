//! The CPUID the guest sees.
//!
//! husk starts from what KVM supports and then takes away what the guest must
//! not use. Two profiles exist because hosts differ:
//!
//! * [`CpuProfile::Host`] (hardware KVM): the host's features minus the
//!   paravirtual ones that use hypercalls, which husk's VMM does not serve.
//! * [`CpuProfile::Emulated`] (KVM PVM and similar): the guest kernel's code
//!   runs through an instruction emulator that lacks XSAVE/XRSTOR, POPCNT,
//!   CMPXCHG16B, CLAC/STAC and a few more, so these features (and the ones
//!   that depend on XSAVE, such as AVX) are hidden. The kernel command line
//!   repeats this (`noxsave clearcpuid=...`, see [`emulated_cmdline`])
//!   because some kernel paths probe the hardware directly.
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
/// instructions an emulating host lacks, plus `noreplace-smp`: with one vCPU
/// the kernel would otherwise rewrite every LOCK prefix in its text at boot
/// (2.3 s of emulated code measured, see docs/boot-time.md).
///
/// The last word is not for the kernel: it becomes an environment variable
/// of the guest's init (the agent), which hands the mask on to every
/// container process. Guest user code on such hosts runs natively and sees
/// the host's CPUID and XCR0 (AVX, AVX-512), but the guest kernel, without
/// XSAVE, switches only x87/SSE registers between processes; glibc's AVX
/// string functions then stored other processes' register contents (about
/// one container exec in three crashed). The mask keeps glibc on its SSE2
/// code. It does not stop programs that use AVX by themselves
/// (docs/security.md, "Guest register state").
pub const fn emulated_cmdline() -> &'static str {
    "noxsave clearcpuid=popcnt,cx16,smap,smep,rdrand,rdseed,fsgsbase,erms,fsrm noreplace-smp \
     GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512BW,-AVX512VL,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load"
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
const L1_ECX_OSXSAVE: u32 = bit(27);
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
                    e.ecx &= !(L1_ECX_CX16
                        | L1_ECX_POPCNT
                        | L1_ECX_XSAVE
                        | L1_ECX_OSXSAVE
                        | L1_ECX_AVX
                        | L1_ECX_F16C
                        | L1_ECX_RDRAND);
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
                    e.ebx &= !(L7_EBX_FSGSBASE
                        | L7_EBX_AVX2
                        | L7_EBX_SMEP
                        | L7_EBX_ERMS
                        | L7_EBX_AVX512F
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
            0xd if profile == CpuProfile::Emulated => {
                e.eax = 0;
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
        // Nothing may describe XSAVE state components when XSAVE is hidden.
        entries.retain(|e| e.function != 0xd || e.index == 0);
    }
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

    fn host_like() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x1, 0, 0, 0x0008_0800, u32::MAX, !L1_EDX_HTT),
            entry(0x7, 0, 0, u32::MAX, u32::MAX, u32::MAX),
            entry(0xd, 0, 7, 0, 0, 0),
            entry(0xd, 1, 1, 0, 0, 0),
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
        for hidden in [
            L1_ECX_POPCNT,
            L1_ECX_CX16,
            L1_ECX_XSAVE,
            L1_ECX_AVX,
            L1_ECX_RDRAND,
        ] {
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
        assert_eq!(find(&e, 0xd, 0).eax, 0);
        assert!(!e.iter().any(|x| x.function == 0xd && x.index == 1));
    }

    #[test]
    fn host_profile_keeps_features_but_drops_hypercall_pv() {
        let mut e = host_like();
        apply_policy(&mut e, CpuProfile::Host, 0, 1);
        assert_ne!(find(&e, 1, 0).ecx & L1_ECX_POPCNT, 0);
        assert_ne!(find(&e, 7, 0).ebx & L7_EBX_SMAP, 0);
        assert_eq!(find(&e, 0x4000_0001, 0).eax, KVM_FEATURES_KEPT);
        assert_eq!(find(&e, 0xd, 1).eax, 1);
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
