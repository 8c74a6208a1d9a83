//! Loading the guest: kernel (ELF, PVH entry), initramfs, command line, PVH
//! start info with the memory map, MP table and boot GDT.
//!
//! A malformed or truncated kernel or initramfs is refused here with an
//! error that names the file, before any vCPU runs.

use std::{fs::File, io::Read, path::Path};

use linux_loader::{
    configurator::{pvh::PvhBootConfigurator, BootConfigurator, BootParams},
    loader::{
        elf::{
            start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info},
            Elf, PvhBootCapability,
        },
        KernelLoader,
    },
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _, GuestMemoryRegion};

use crate::{
    arch::{
        layout::{
            BOOT_GDT_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START,
            LEGACY_HOLE_START, MEMMAP_START, MODLIST_START, PVH_INFO_START,
        },
        mptable,
        regs::BOOT_GDT,
    },
    memory::GuestMemory,
};

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE_SIZE: u64 = 4096;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("opening kernel {0}")]
    OpenKernel(String, #[source] std::io::Error),
    /// The kernel is not a loadable ELF.
    #[error("kernel {0} is not a loadable uncompressed ELF vmlinux")]
    LoadKernel(String, #[source] linux_loader::loader::Error),
    /// The kernel has no PVH entry point.
    #[error("kernel {0} has no PVH entry point (build it with CONFIG_PVH=y)")]
    NoPvh(String),
    /// The initramfs could not be read.
    #[error("reading initramfs {0}")]
    ReadInitramfs(String, #[source] std::io::Error),
    /// The initramfs does not look like one.
    #[error("initramfs {0} is not a cpio archive (newc, optionally gzip/lz4-compressed): {1}")]
    BadInitramfs(String, &'static str),
    /// The initramfs does not fit.
    #[error("initramfs {0} ({1} bytes) does not fit in guest memory above the kernel")]
    InitramfsTooBig(String, u64),
    /// The command line is too long or invalid.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The MP table could not be built.
    #[error("building the MP table")]
    Mptable(#[from] mptable::MptableError),
    /// Writing boot data to guest memory failed.
    #[error("writing {0} to guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
    /// Writing the PVH start info failed.
    #[error("writing the PVH start info")]
    StartInfo(#[source] linux_loader::configurator::Error),
}

/// What the vCPUs need to start the loaded guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// The PVH entry point.
    pub entry: u64,
    /// First byte after the kernel.
    pub kernel_end: u64,
}

/// Checks the start of an initramfs: a newc cpio ("070701"/"070702"), or
/// gzip / lz4 (legacy) / zstd-compressed data the kernel can unpack.
pub fn check_initramfs_magic(head: &[u8]) -> Result<(), &'static str> {
    if head.len() < 6 {
        return Err("too short");
    }
    let ok = head.starts_with(b"070701")
        || head.starts_with(b"070702")
        || head.starts_with(&[0x1f, 0x8b])
        || head.starts_with(&[0x02, 0x21, 0x4c, 0x18]);
    if ok {
        Ok(())
    } else {
        Err("unknown header")
    }
}

/// Loads the kernel ELF; returns its PVH entry and end.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<BootInfo, BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|e| BootError::OpenKernel(name.clone(), e))?;
    let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| BootError::LoadKernel(name.clone(), e))?;
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.raw_value(),
        _ => return Err(BootError::NoPvh(name)),
    };
    Ok(BootInfo {
        entry,
        kernel_end: result.kernel_end,
    })
}

/// Loads the initramfs at the top of low RAM; returns (address, size).
pub fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| BootError::ReadInitramfs(name.clone(), e))?;
    check_initramfs_magic(&data).map_err(|why| BootError::BadInitramfs(name.clone(), why))?;
    let size = data.len() as u64;
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0);
    let addr = low_end.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    let addr = match addr {
        Some(a) if a >= kernel_end.max(HIMEM_START) => a,
        _ => return Err(BootError::InitramfsTooBig(name, size)),
    };
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| BootError::Write("the initramfs", e))?;
    Ok((addr, size))
}

/// Writes the command line, GDT, MP table and PVH start info.
pub fn write_boot_data(
    mem: &GuestMemory,
    cmdline: &str,
    vcpus: u8,
    initramfs: Option<(u64, u64)>,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "{} bytes is longer than {}",
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| BootError::Write("the command line", e))?;

    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(BOOT_GDT_START))
        .map_err(|e| BootError::Write("the boot GDT", e))?;

    let (mp_addr, mp) = mptable::build(vcpus)?;
    mem.write_slice(&mp, GuestAddress(mp_addr))
        .map_err(|e| BootError::Write("the MP table", e))?;

    let mut memmap = vec![
        hvm_memmap_table_entry {
            addr: 0,
            size: EBDA_START,
            type_: E820_RAM,
            reserved: 0,
        },
        hvm_memmap_table_entry {
            addr: EBDA_START,
            size: LEGACY_HOLE_START - EBDA_START,
            type_: E820_RESERVED,
            reserved: 0,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            memmap.push(hvm_memmap_table_entry {
                addr: start,
                size: end - start,
                type_: E820_RAM,
                reserved: 0,
            });
        }
    }
    let modules: Vec<hvm_modlist_entry> = initramfs
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: u32::try_from(memmap.len()).unwrap_or(u32::MAX),
        nr_modules: u32::try_from(modules.len()).unwrap_or(u32::MAX),
        modlist_paddr: if modules.is_empty() { 0 } else { MODLIST_START },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem).map_err(BootError::StartInfo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn temp_file(name: &str, contents: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("husk-boot-{}-{name}", std::process::id()));
        std::fs::write(&p, contents).expect("write");
        p
    }

    #[test]
    fn initramfs_magic() {
        assert_eq!(check_initramfs_magic(b"070701000"), Ok(()));
        assert_eq!(check_initramfs_magic(&[0x1f, 0x8b, 8, 0, 0, 0]), Ok(()));
        assert!(check_initramfs_magic(b"hello world").is_err());
        assert!(check_initramfs_magic(b"07").is_err());
    }

    #[test]
    fn rejects_a_kernel_that_is_not_elf() {
        let (mem, _) = create_guest_memory(64 << 20).expect("mem");
        let p = temp_file("notelf", b"this is not a kernel at all, not even close");
        let err = load_kernel(&mem, &p).expect_err("not ELF");
        assert!(err.to_string().contains("not a loadable"), "{err}");
        let _ = std::fs::remove_file(p);
        let err = load_kernel(&mem, Path::new("/nonexistent")).expect_err("missing");
        assert!(matches!(err, BootError::OpenKernel(..)));
    }

    #[test]
    fn rejects_a_truncated_elf() {
        let (mem, _) = create_guest_memory(64 << 20).expect("mem");
        // An ELF header claiming program headers that are not there.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[6] = 1;
        elf[16] = 2;
        elf[18] = 62;
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54] = 56;
        elf[56] = 4;
        let p = temp_file("truncated", &elf);
        assert!(load_kernel(&mem, &p).is_err());
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn initramfs_goes_to_the_top_of_memory_or_is_refused() {
        let (mem, _) = create_guest_memory(64 << 20).expect("mem");
        let mut data = b"070701".to_vec();
        data.resize(10_000, 0);
        let p = temp_file("initrd", &data);
        let (addr, size) = load_initramfs(&mem, &p, 0x200_0000).expect("load");
        assert_eq!(size, 10_000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= 64 << 20);
        assert!(matches!(
            load_initramfs(&mem, &p, 64 << 20),
            Err(BootError::InitramfsTooBig(..))
        ));
        let _ = std::fs::remove_file(&p);
        let bad = temp_file("badinitrd", b"garbage garbage");
        assert!(matches!(
            load_initramfs(&mem, &bad, 0),
            Err(BootError::BadInitramfs(..))
        ));
        let _ = std::fs::remove_file(bad);
    }

    #[test]
    fn boot_data_is_written() {
        let (mem, _) = create_guest_memory(64 << 20).expect("mem");
        write_boot_data(&mem, "console=ttyS0 quiet", 2, Some((0x300_0000, 4096)))
            .expect("boot data");
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("read");
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(MODLIST_START)).expect("read");
        assert_eq!((m.paddr, m.size), (0x300_0000, 4096));
        let mut cmd = [0u8; 20];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .expect("read");
        assert_eq!(&cmd[..19], b"console=ttyS0 quiet");
        assert_eq!(cmd[19], 0);
        assert!(write_boot_data(&mem, &"x".repeat(5000), 1, None).is_err());
    }
}
