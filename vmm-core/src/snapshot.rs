//! The on-disk snapshot container.
//!
//! ```text
//! "HUSKSNAP"  format version (u32)  husk version (u16 len + UTF-8)
//! fingerprint (32 bytes)  guest memory size (u64)
//! state section (u64 len + bytes: vCPU, VM and device state, encoded by the caller)
//! memory runs: (offset u64, len u64, bytes)*, ended by a run of length 0
//! SHA-256 of everything above (32 bytes)
//! ```
//!
//! All integers are little-endian. Memory is sparse: only pages that hold
//! data are stored (the memfd's holes are found with SEEK_DATA/SEEK_HOLE and
//! all-zero pages are skipped), and restoring writes them into a fresh memfd,
//! so untouched guest memory stays unallocated.
//!
//! A snapshot is refused — never half-loaded — when its magic, format
//! version, husk version or fingerprint (CPUID and VM shape, chosen by the
//! caller) differ from what the restoring VMM expects, when a memory run
//! falls outside guest memory, or when the checksum does not match. The
//! checksum is checked before the caller gets the state; the memory it wrote
//! by then is in a memfd no VM uses yet, which the caller drops on error.

// Lengths cast to usize are bounded by MAX_RUN (1 MiB) or checked first;
// husk-vmm is x86_64-only.
#![allow(clippy::cast_possible_truncation)]

use std::{
    fs::File,
    io::{self, Read, Write},
    os::{fd::AsRawFd, unix::fs::FileExt},
};

use sha2::{Digest, Sha256};

/// First bytes of every snapshot.
pub const MAGIC: &[u8; 8] = b"HUSKSNAP";
/// Version of this container format.
pub const FORMAT_VERSION: u32 = 1;
const PAGE: u64 = 4096;
/// Largest memory run written at once.
const MAX_RUN: u64 = 1 << 20;
/// Largest state section accepted (the state of 16 vCPUs is far smaller).
const MAX_STATE: u64 = 64 << 20;

/// What identifies a snapshot's origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The husk version that wrote it.
    pub husk_version: String,
    /// Hash of what must match exactly to restore: CPUID, vCPU count,
    /// memory size, devices, kernel and command line.
    pub fingerprint: [u8; 32],
    /// Guest memory size in bytes.
    pub mem_size: u64,
}

/// Why a snapshot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing failed.
    #[error("snapshot I/O")]
    Io(#[from] io::Error),
    /// Not a husk snapshot.
    #[error("not a husk snapshot (bad magic)")]
    Magic,
    /// Written by a different container format.
    #[error("snapshot format version {0} is not supported (expected {FORMAT_VERSION})")]
    Format(u32),
    /// Written by another husk version.
    #[error("snapshot was taken by husk {found}, this is husk {expected}")]
    HuskVersion {
        /// In the snapshot.
        found: String,
        /// This VMM.
        expected: String,
    },
    /// Taken on another CPU or VM shape.
    #[error("snapshot was taken with another CPU model or VM shape (fingerprint mismatch)")]
    Fingerprint,
    /// Memory size differs.
    #[error("snapshot has {found} bytes of guest memory, this VM has {expected}")]
    MemSize {
        /// In the snapshot.
        found: u64,
        /// This VM.
        expected: u64,
    },
    /// Structurally invalid content.
    #[error("snapshot is corrupt: {0}")]
    Corrupt(&'static str),
    /// The checksum does not match.
    #[error("snapshot checksum mismatch (corrupted or truncated)")]
    Checksum,
}

/// What a written snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Bytes of guest memory stored.
    pub memory_bytes: u64,
    /// Number of memory runs.
    pub runs: u64,
}

/// A writer that hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what goes through it.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

fn seek(fd: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor we own; the result is checked.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(u64::try_from(r).unwrap_or(0)))
}

/// The data extents of `fd` within `[0, size)` (holes skipped).
fn data_extents(fd: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(start) = seek(fd, pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = seek(fd, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// Writes a snapshot of `state` and the guest memory in `memfd` to `out`.
pub fn write<W: Write>(
    out: W,
    id: &Identity,
    state: &[u8],
    memfd: &File,
) -> Result<Stats, SnapshotError> {
    let mut w = Hashing {
        inner: out,
        hash: Sha256::new(),
    };
    w.write_all(MAGIC)?;
    w.write_all(&FORMAT_VERSION.to_le_bytes())?;
    let version = id.husk_version.as_bytes();
    let vlen = u16::try_from(version.len())
        .map_err(|_| SnapshotError::Corrupt("husk version too long"))?;
    w.write_all(&vlen.to_le_bytes())?;
    w.write_all(version)?;
    w.write_all(&id.fingerprint)?;
    w.write_all(&id.mem_size.to_le_bytes())?;
    w.write_all(&(state.len() as u64).to_le_bytes())?;
    w.write_all(state)?;

    let mut stats = Stats::default();
    let mut page = vec![0u8; PAGE as usize];
    let mut run: Vec<u8> = Vec::with_capacity(MAX_RUN as usize);
    let mut run_start = 0u64;
    let flush =
        |w: &mut Hashing<W>, start: u64, run: &mut Vec<u8>, stats: &mut Stats| -> io::Result<()> {
            if run.is_empty() {
                return Ok(());
            }
            w.write_all(&start.to_le_bytes())?;
            w.write_all(&(run.len() as u64).to_le_bytes())?;
            w.write_all(run)?;
            stats.memory_bytes += run.len() as u64;
            stats.runs += 1;
            run.clear();
            Ok(())
        };
    for (start, end) in data_extents(memfd, id.mem_size)? {
        let mut off = start - start % PAGE;
        while off < end {
            let len = PAGE.min(id.mem_size - off);
            let buf = &mut page[..len as usize];
            memfd.read_exact_at(buf, off)?;
            let contiguous = run_start + run.len() as u64 == off;
            if buf.iter().all(|&b| b == 0) {
                flush(&mut w, run_start, &mut run, &mut stats)?;
            } else {
                if !contiguous || run.len() as u64 >= MAX_RUN {
                    flush(&mut w, run_start, &mut run, &mut stats)?;
                }
                if run.is_empty() {
                    run_start = off;
                }
                run.extend_from_slice(buf);
            }
            off += len;
        }
    }
    flush(&mut w, run_start, &mut run, &mut stats)?;
    w.write_all(&0u64.to_le_bytes())?;
    w.write_all(&0u64.to_le_bytes())?;
    let digest = w.hash.finalize();
    w.inner.write_all(&digest)?;
    w.inner.flush()?;
    Ok(stats)
}

fn read_u64<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads the identity at the start of a snapshot (to decide early whether
/// to use it at all).
pub fn read_identity<R: Read>(input: &mut R) -> Result<Identity, SnapshotError> {
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(SnapshotError::Magic);
    }
    let mut v = [0u8; 4];
    input.read_exact(&mut v)?;
    let format = u32::from_le_bytes(v);
    if format != FORMAT_VERSION {
        return Err(SnapshotError::Format(format));
    }
    let mut l = [0u8; 2];
    input.read_exact(&mut l)?;
    let mut version = vec![0u8; usize::from(u16::from_le_bytes(l))];
    input.read_exact(&mut version)?;
    let husk_version = String::from_utf8(version)
        .map_err(|_| SnapshotError::Corrupt("husk version is not UTF-8"))?;
    let mut fingerprint = [0u8; 32];
    input.read_exact(&mut fingerprint)?;
    let mem_size = read_u64(input)?;
    Ok(Identity {
        husk_version,
        fingerprint,
        mem_size,
    })
}

/// Reads a snapshot taken by `expected`'s husk version and fingerprint:
/// writes its memory into `memfd` (fresh, sized to the guest) and returns
/// the state section once the checksum has been verified.
pub fn read<R: Read>(
    input: R,
    expected: &Identity,
    memfd: &File,
) -> Result<Vec<u8>, SnapshotError> {
    let mut r = HashingReader {
        inner: input,
        hash: Sha256::new(),
    };
    let id = read_identity(&mut r)?;
    if id.husk_version != expected.husk_version {
        return Err(SnapshotError::HuskVersion {
            found: id.husk_version,
            expected: expected.husk_version.clone(),
        });
    }
    if id.fingerprint != expected.fingerprint {
        return Err(SnapshotError::Fingerprint);
    }
    if id.mem_size != expected.mem_size {
        return Err(SnapshotError::MemSize {
            found: id.mem_size,
            expected: expected.mem_size,
        });
    }
    let state_len = read_u64(&mut r)?;
    if state_len > MAX_STATE {
        return Err(SnapshotError::Corrupt("state section too large"));
    }
    let mut state =
        vec![0u8; usize::try_from(state_len).map_err(|_| SnapshotError::Corrupt("state length"))?];
    r.read_exact(&mut state)?;

    let mut buf = vec![0u8; MAX_RUN as usize];
    let mut last_end = 0u64;
    loop {
        let offset = read_u64(&mut r)?;
        let len = read_u64(&mut r)?;
        if len == 0 {
            break;
        }
        let end = offset
            .checked_add(len)
            .ok_or(SnapshotError::Corrupt("memory run overflows"))?;
        if len > MAX_RUN || end > expected.mem_size || offset % PAGE != 0 || offset < last_end {
            return Err(SnapshotError::Corrupt(
                "memory run out of bounds or out of order",
            ));
        }
        let chunk = &mut buf[..len as usize];
        r.read_exact(chunk)?;
        memfd.write_all_at(chunk, offset)?;
        last_end = end;
    }
    let digest = r.hash.finalize();
    let mut stored = [0u8; 32];
    r.inner
        .read_exact(&mut stored)
        .map_err(|_| SnapshotError::Checksum)?;
    if digest.as_slice() != stored {
        return Err(SnapshotError::Checksum);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    const SIZE: u64 = 8 << 20;

    fn id() -> Identity {
        Identity {
            husk_version: "0.1.0".into(),
            fingerprint: [7; 32],
            mem_size: SIZE,
        }
    }

    fn guest_with_data() -> File {
        let (_mem, fd) = create_guest_memory(SIZE).expect("memory");
        fd.write_all_at(b"kernel text", 0x10_0000).expect("write");
        fd.write_all_at(&[0xab; 3 * PAGE as usize], 0x20_0000)
            .expect("write");
        // A page the guest touched but that holds only zeros.
        fd.write_all_at(&[0; PAGE as usize], 0x40_0000)
            .expect("write");
        fd.write_all_at(b"last page", SIZE - 9).expect("write");
        fd
    }

    fn snapshot(fd: &File, state: &[u8]) -> (Vec<u8>, Stats) {
        let mut out = Vec::new();
        let stats = write(&mut out, &id(), state, fd).expect("snapshot");
        (out, stats)
    }

    #[test]
    fn round_trip_keeps_data_and_skips_holes_and_zero_pages() {
        let fd = guest_with_data();
        let (bytes, stats) = snapshot(&fd, b"vcpu state");
        assert_eq!(
            stats.memory_bytes,
            5 * PAGE,
            "only the pages with data: {stats:?}"
        );
        assert!(bytes.len() < (6 * PAGE) as usize);
        let (_m, restored) = create_guest_memory(SIZE).expect("memory");
        let state = read(&bytes[..], &id(), &restored).expect("restore");
        assert_eq!(state, b"vcpu state");
        let mut a = vec![0u8; SIZE as usize];
        let mut b = vec![0u8; SIZE as usize];
        fd.read_exact_at(&mut a, 0).expect("read");
        restored.read_exact_at(&mut b, 0).expect("read");
        assert!(a == b, "guest memory differs after restore");
        // The zero page stayed a hole in the restored memfd.
        assert_eq!(
            data_extents(&restored, SIZE)
                .expect("extents")
                .iter()
                .filter(|(s, e)| *s <= 0x40_0000 && 0x40_0000 < *e)
                .count(),
            0
        );
    }

    #[test]
    fn any_flipped_byte_or_truncation_is_refused() {
        let fd = guest_with_data();
        let (bytes, _) = snapshot(&fd, b"state");
        for at in [100, bytes.len() / 2, bytes.len() - 40, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x55;
            let (_m, target) = create_guest_memory(SIZE).expect("memory");
            assert!(
                read(&bad[..], &id(), &target).is_err(),
                "flip at {at} accepted"
            );
        }
        for len in [0, 7, 60, bytes.len() / 2, bytes.len() - 1] {
            let (_m, target) = create_guest_memory(SIZE).expect("memory");
            assert!(
                read(&bytes[..len], &id(), &target).is_err(),
                "truncation to {len} accepted"
            );
        }
    }

    #[test]
    fn mismatched_snapshots_are_refused_with_a_reason() {
        let fd = guest_with_data();
        let (bytes, _) = snapshot(&fd, b"state");
        let (_m, target) = create_guest_memory(SIZE).expect("memory");
        let other = Identity {
            husk_version: "9.9.9".into(),
            ..id()
        };
        let e = read(&bytes[..], &other, &target).expect_err("version");
        assert_eq!(
            e.to_string(),
            "snapshot was taken by husk 0.1.0, this is husk 9.9.9"
        );
        let other = Identity {
            fingerprint: [8; 32],
            ..id()
        };
        assert!(matches!(
            read(&bytes[..], &other, &target),
            Err(SnapshotError::Fingerprint)
        ));
        let other = Identity {
            mem_size: SIZE * 2,
            ..id()
        };
        assert!(matches!(
            read(&bytes[..], &other, &target),
            Err(SnapshotError::MemSize { .. })
        ));
        assert!(matches!(
            read(&b"NOTASNAPSHOT"[..], &id(), &target),
            Err(SnapshotError::Magic)
        ));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(
            read(&v2[..], &id(), &target),
            Err(SnapshotError::Format(2))
        ));
        assert_eq!(read_identity(&mut &bytes[..]).expect("identity"), id());
    }

    #[test]
    fn runs_outside_guest_memory_are_refused() {
        // A hand-made snapshot whose only run ends past the guest's memory.
        let mut body = Vec::new();
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        body.extend_from_slice(&5u16.to_le_bytes());
        body.extend_from_slice(b"0.1.0");
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&SIZE.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&(SIZE - PAGE).to_le_bytes());
        body.extend_from_slice(&(2 * PAGE).to_le_bytes());
        body.extend_from_slice(&vec![1u8; 2 * PAGE as usize]);
        body.extend_from_slice(&[0u8; 16]);
        let digest = Sha256::digest(&body);
        body.extend_from_slice(&digest);
        let (_m, target) = create_guest_memory(SIZE).expect("memory");
        assert!(matches!(
            read(&body[..], &id(), &target),
            Err(SnapshotError::Corrupt(_))
        ));
    }
}
