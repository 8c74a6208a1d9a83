//! Guest physical address layout.
//!
//! ```text
//! 0x0000_0500  boot GDT
//! 0x0000_6000  PVH start info, then its memory map and module list
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (the last KiB of base memory, where Linux scans)
//! 0x0010_0000  kernel (loaded at its ELF physical address, 16 MiB)
//!  ...         initramfs (page aligned, at the top of low RAM)
//! 0xd000_0000  MMIO gap: virtio-mmio devices, 4 KiB each
//! 0xfec0_0000  IOAPIC      0xfee0_0000 local APIC
//! 0x1_0000_0000 RAM above 4 GiB, if any
//! ```

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const MEMMAP_START: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line (the kernel's COMMAND_LINE_SIZE on x86).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of base memory (640 KiB).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the legacy hole (VGA, BIOS) that is not RAM.
pub const LEGACY_HOLE_START: u64 = 0xa0000;
/// First address above the legacy hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB; RAM stops here.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Where RAM continues above the gap.
pub const RAM_64BIT_START: u64 = 1 << 32;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC base address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// TSS area KVM needs on Intel (three pages below the IOAPIC window).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// First IRQ line for virtio devices (0-4 are timer, keyboard, cascade, COM).
pub const VIRTIO_IRQ_START: u32 = 5;
/// Last usable IRQ line (the IOAPIC has 24 pins).
pub const IRQ_MAX: u32 = 23;
/// IRQ of the serial console (COM1).
pub const SERIAL_IRQ: u32 = 4;

/// Port of COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// The i8042 controller's data port; its command port is 0x64.
pub const I8042_PORT: u16 = 0x60;
