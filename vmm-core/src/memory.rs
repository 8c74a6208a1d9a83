//! Guest memory: one memfd, mapped shared.
//!
//! vhost-user devices (virtio-fs) need the guest's memory as a file they can
//! map, so guest RAM is a memfd rather than anonymous memory. Pages the guest
//! never touches are never allocated; pages it frees and reports must later
//! be returned with `fallocate(PUNCH_HOLE)` (MADV_DONTNEED does nothing on a
//! shared mapping).
//!
//! Layout: RAM starts at 0 and runs up to the MMIO gap below 4 GiB; what does
//! not fit continues at 4 GiB. Both regions are windows of the same memfd.

use std::{ffi::CString, fs::File, os::fd::FromRawFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::arch::layout::{MMIO_GAP_START, RAM_64BIT_START};

/// The guest memory type used throughout husk.
pub type GuestMemory = GuestMemoryMmap;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("creating the guest memory memfd")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("sizing the guest memory memfd to {0} bytes")]
    Truncate(u64, #[source] std::io::Error),
    /// Mapping a region failed.
    #[error("mapping guest memory")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// A region does not fit the address space.
    #[error("guest memory region at {0:#x} overflows the address space")]
    Region(u64),
    /// Building the region list failed.
    #[error("building the guest memory map")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// Guest RAM ranges (start, length) for a VM of `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(RAM_64BIT_START), size - MMIO_GAP_START),
        ]
    }
}

/// Creates `size` bytes of guest memory backed by one memfd mapped shared.
/// Returns the memory and the memfd (kept for hole punching and vhost-user).
pub fn create_guest_memory(size: u64) -> Result<(GuestMemory, File), MemoryError> {
    let name =
        CString::new("husk-guest-ram").map_err(|e| MemoryError::Memfd(std::io::Error::other(e)))?;
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| MemoryError::Truncate(size, e))?;

    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(size) {
        let file_offset = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        let len_usize =
            usize::try_from(len).map_err(|e| MemoryError::Memfd(std::io::Error::other(e)))?;
        let mmap = MmapRegion::from_file(file_offset, len_usize).map_err(MemoryError::Mmap)?;
        regions.push(GuestRegionMmap::new(mmap, start).ok_or(MemoryError::Region(start.0))?);
        offset += len;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?;
    Ok((mem, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory as _};

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1].0, GuestAddress(RAM_64BIT_START));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn memory_is_shared_with_the_memfd() {
        use std::os::unix::fs::FileExt;
        let (mem, file) = create_guest_memory(2 << 20).expect("memory");
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .expect("write");
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, 0x1000).expect("read");
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(mem.num_regions(), 1);
    }
}
