//! The KVM VM: opening `/dev/kvm`, checking capabilities, memory slots and
//! the in-kernel IOAPIC/PIC/PIT.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_msr_entry, kvm_pit_config, kvm_pit_state2,
    kvm_userspace_memory_region, Msrs, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemory as _, GuestMemoryRegion};

use crate::{arch::layout::KVM_TSS_ADDRESS, memory::GuestMemory};

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device could not be opened.
    #[error("cannot open {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(String, #[source] kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("unsupported KVM API version {0} (expected 12)")]
    ApiVersion(i32),
    /// A capability husk needs is missing.
    #[error("KVM lacks a capability husk needs: {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// The capabilities husk relies on.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Opens KVM at `device` and checks it can run a husk VM.
pub fn open_kvm(device: &std::path::Path) -> Result<Kvm, VmError> {
    let name = device.display().to_string();
    let path = std::ffi::CString::new(device.as_os_str().as_encoded_bytes())
        .map_err(|_| VmError::OpenKvm(name.clone(), kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(&path).map_err(|e| VmError::OpenKvm(name, e))?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Creates the VM with its interrupt controllers and maps `mem` into it.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemory) -> Result<VmFd, VmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
    // The PIT is there for guests that calibrate against it; its speaker
    // port is a dummy so the guest cannot make it drive anything.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| VmError::MissingCap("memory slots"))?,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VMM
        // keeps alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(vm)
}

/// The VM-wide state KVM keeps: interrupt controllers, PIT, clock.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC (in that order).
    pub irqchips: [kvm_irqchip; 3],
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// The kvm-clock value.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Reads the VM-wide state (vCPUs paused).
pub fn save_vm_state(vm: &VmFd) -> Result<VmState, VmError> {
    let mut irqchips = [kvm_irqchip::default(); 3];
    for (chip, id) in irqchips.iter_mut().zip(IRQCHIPS) {
        chip.chip_id = id;
        vm.get_irqchip(chip)
            .map_err(|e| VmError::Kvm("KVM_GET_IRQCHIP", e))?;
    }
    let pit = vm.get_pit2().map_err(|e| VmError::Kvm("KVM_GET_PIT2", e))?;
    let mut clock = vm
        .get_clock()
        .map_err(|e| VmError::Kvm("KVM_GET_CLOCK", e))?;
    // Only the clock value goes back; KVM_SET_CLOCK refuses these flags.
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    Ok(VmState {
        irqchips,
        pit,
        clock,
    })
}

/// Puts VM-wide state back (before the vCPUs run).
pub fn restore_vm_state(vm: &VmFd, s: &VmState) -> Result<(), VmError> {
    for chip in &s.irqchips {
        vm.set_irqchip(chip)
            .map_err(|e| VmError::Kvm("KVM_SET_IRQCHIP", e))?;
    }
    vm.set_pit2(&s.pit)
        .map_err(|e| VmError::Kvm("KVM_SET_PIT2", e))?;
    vm.set_clock(&s.clock)
        .map_err(|e| VmError::Kvm("KVM_SET_CLOCK", e))
}

/// The MSRs a snapshot saves: KVM's list of saveable MSRs, minus those this
/// host cannot read on a vCPU (probed on `vcpu`).
pub fn msrs_to_save(kvm: &Kvm, vcpu: &kvm_ioctls::VcpuFd) -> Result<Vec<u32>, VmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| VmError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    let mut out = Vec::new();
    for &index in list.as_slice() {
        let entry = [kvm_msr_entry {
            index,
            ..Default::default()
        }];
        let Ok(mut msrs) = Msrs::from_entries(&entry) else {
            continue;
        };
        if matches!(vcpu.get_msrs(&mut msrs), Ok(1)) {
            out.push(index);
        }
    }
    Ok(out)
}
