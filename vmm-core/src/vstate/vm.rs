//! The KVM VM: opening `/dev/kvm`, checking capabilities, memory slots and
//! the in-kernel IOAPIC/PIC/PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
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
