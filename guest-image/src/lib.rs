//! Builds the guest initramfs: a newc cpio archive whose `/init` is the
//! static husk agent.
//!
//! The archive holds only what the kernel needs before the agent runs: the
//! mount points the agent mounts on, and `/dev/console` (the kernel opens it
//! for PID 1 before any devtmpfs is mounted). Everything else the agent sets
//! up itself. Entries are written with fixed owners and timestamps, so the
//! same agent binary always gives the same archive (byte for byte), which
//! lets template snapshots be keyed by the image's hash.
//!
//! Compression is a choice, not a default: on hosts that emulate guest kernel
//! code (KVM PVM) gunzip runs in the slow emulated kernel, so an uncompressed
//! archive boots faster even though it is larger (see docs/boot-time.md).

use std::io::{self, Cursor, Read, Write};

use cpio::newc::{Builder, ModeFileType};
use flate2::{write::GzEncoder, Compression as GzLevel};

/// How the cpio archive is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain newc cpio: the kernel copies it without decompressing.
    None,
    /// gzip (the kernel's `CONFIG_RD_GZIP`).
    Gzip,
}

impl std::str::FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "none" => Ok(Self::None),
            "gzip" => Ok(Self::Gzip),
            other => Err(Error::UnknownCompression(other.to_string())),
        }
    }
}

/// Errors of the initramfs builder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The compression name is not one this builder knows.
    #[error("unknown compression {0:?} (expected \"none\" or \"gzip\")")]
    UnknownCompression(String),
    /// The agent binary is not a static ELF executable.
    #[error("the agent is not a static x86_64 ELF executable: {0}")]
    BadAgent(&'static str),
    /// The agent is larger than a newc entry can hold.
    #[error("the agent is too large for a cpio entry ({0} bytes)")]
    TooLarge(usize),
    /// Writing the archive failed.
    #[error("writing the archive")]
    Io(#[from] io::Error),
}

const S_IFDIR: u32 = 0o040000;
const S_IFCHR: u32 = 0o020000;

/// Directories created in the archive (mount points of the agent).
const DIRS: &[&str] = &["dev", "proc", "sys", "run", "tmp", "etc", "mnt"];

/// Checks that `agent` looks like something the guest kernel can exec as
/// PID 1: a 64-bit little-endian x86_64 ELF executable without an interpreter
/// (the initramfs has no dynamic loader).
pub fn check_agent(agent: &[u8]) -> Result<(), Error> {
    if agent.len() < 64 || &agent[..4] != b"\x7fELF" {
        return Err(Error::BadAgent("no ELF header"));
    }
    if agent[4] != 2 || agent[5] != 1 {
        return Err(Error::BadAgent("not a 64-bit little-endian ELF"));
    }
    let e_machine = u16::from_le_bytes([agent[18], agent[19]]);
    if e_machine != 62 {
        return Err(Error::BadAgent("not built for x86_64"));
    }
    // An interpreter path ("/lib64/ld-linux-x86-64.so.2") means a dynamic
    // executable; look for a PT_INTERP program header.
    let phoff = u64::from_le_bytes(
        agent[32..40]
            .try_into()
            .map_err(|_| Error::BadAgent("bad header"))?,
    );
    let phentsize = u16::from_le_bytes([agent[54], agent[55]]) as usize;
    let phnum = u16::from_le_bytes([agent[56], agent[57]]) as usize;
    let phoff = usize::try_from(phoff).map_err(|_| Error::BadAgent("bad program header offset"))?;
    for i in 0..phnum {
        let at = phoff
            .checked_add(
                i.checked_mul(phentsize)
                    .ok_or(Error::BadAgent("bad program headers"))?,
            )
            .ok_or(Error::BadAgent("bad program headers"))?;
        let p_type = agent
            .get(at..at + 4)
            .ok_or(Error::BadAgent("truncated program headers"))?;
        if p_type == 3u32.to_le_bytes() {
            return Err(Error::BadAgent(
                "dynamically linked (has PT_INTERP); build it with +crt-static",
            ));
        }
        // A static-pie has a dynamic section for its own relocations, but
        // must not need shared libraries (a library linked as a dylib makes
        // rustc fall back to exactly that).
        if p_type == 2u32.to_le_bytes() && needs_libraries(agent, at)? {
            return Err(Error::BadAgent(
                "needs shared libraries (DT_NEEDED); link every library statically",
            ));
        }
    }
    Ok(())
}

/// Whether the PT_DYNAMIC program header at `ph` lists a DT_NEEDED entry.
fn needs_libraries(elf: &[u8], ph: usize) -> Result<bool, Error> {
    let u64_at = |at: usize| -> Result<u64, Error> {
        at.checked_add(8)
            .and_then(|end| elf.get(at..end))
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or(Error::BadAgent("truncated dynamic section"))
    };
    let offset = usize::try_from(u64_at(ph + 8)?).map_err(|_| Error::BadAgent("bad offset"))?;
    let size = usize::try_from(u64_at(ph + 32)?).map_err(|_| Error::BadAgent("bad size"))?;
    for entry in (0..size / 16).map(|i| offset + i * 16) {
        match u64_at(entry)? {
            0 => break,           // DT_NULL
            1 => return Ok(true), // DT_NEEDED
            _ => {}
        }
    }
    Ok(false)
}

fn entry(name: &str, ino: u32, mode: u32) -> Builder {
    Builder::new(name)
        .ino(ino)
        .mode(mode)
        .uid(0)
        .gid(0)
        .nlink(1)
        .mtime(0)
}

/// Writes the initramfs with `agent` as `/init` to `out`.
pub fn write_initramfs<W: Write>(
    agent: &[u8],
    compression: Compression,
    out: W,
) -> Result<W, Error> {
    check_agent(agent)?;
    let size = u32::try_from(agent.len()).map_err(|_| Error::TooLarge(agent.len()))?;
    match compression {
        Compression::None => write_cpio(agent, size, out),
        Compression::Gzip => {
            let gz = write_cpio(agent, size, GzEncoder::new(out, GzLevel::best()))?;
            Ok(gz.finish()?)
        }
    }
}

fn write_cpio<W: Write>(agent: &[u8], size: u32, mut out: W) -> Result<W, Error> {
    let mut ino = 1;
    for dir in DIRS {
        out = entry(dir, ino, S_IFDIR | 0o755)
            .nlink(2)
            .write(out, 0)
            .finish()?;
        ino += 1;
    }
    out = entry("dev/console", ino, S_IFCHR | 0o600)
        .rdev_major(5)
        .rdev_minor(1)
        .write(out, 0)
        .finish()?;
    ino += 1;
    out = entry("dev/null", ino, S_IFCHR | 0o666)
        .rdev_major(1)
        .rdev_minor(3)
        .write(out, 0)
        .finish()?;
    ino += 1;
    let mut w = entry("init", ino, 0o755)
        .set_mode_file_type(ModeFileType::Regular)
        .write(out, size);
    io::copy(&mut Cursor::new(agent).take(u64::from(size)), &mut w)?;
    out = w.finish()?;
    Ok(cpio::newc::trailer(out)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpio::NewcReader;

    /// A minimal static-looking ELF header for x86_64 with no program headers.
    fn fake_static_elf() -> Vec<u8> {
        let mut e = vec![0u8; 128];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[18] = 62;
        e
    }

    fn names(archive: &[u8]) -> Vec<(String, u32, usize)> {
        let mut out = Vec::new();
        let mut rest = archive;
        loop {
            let r = NewcReader::new(rest).expect("entry");
            if r.entry().is_trailer() {
                break;
            }
            let e = r.entry();
            let (name, mode, size) = (e.name().to_string(), e.mode(), e.file_size() as usize);
            rest = r.finish().expect("finish");
            out.push((name, mode, size));
        }
        out
    }

    #[test]
    fn archive_has_init_console_and_mount_points() {
        let agent = fake_static_elf();
        let archive = write_initramfs(&agent, Compression::None, Vec::new()).expect("write");
        let entries = names(&archive);
        assert!(entries.contains(&("init".into(), 0o100755, agent.len())));
        assert!(entries.contains(&("dev/console".into(), S_IFCHR | 0o600, 0)));
        for d in DIRS {
            assert!(
                entries
                    .iter()
                    .any(|(n, m, _)| n == d && *m == S_IFDIR | 0o755),
                "{d}"
            );
        }
    }

    #[test]
    fn archive_is_reproducible() {
        let agent = fake_static_elf();
        let a = write_initramfs(&agent, Compression::Gzip, Vec::new()).expect("write");
        let b = write_initramfs(&agent, Compression::Gzip, Vec::new()).expect("write");
        assert_eq!(a, b);
        assert_eq!(&a[..2], &[0x1f, 0x8b]);
    }

    #[test]
    fn rejects_non_elf_and_dynamic_agents() {
        assert!(matches!(
            check_agent(b"#!/bin/sh\n"),
            Err(Error::BadAgent(_))
        ));
        let mut dynamic = fake_static_elf();
        // One program header of type PT_INTERP at offset 64.
        dynamic[32..40].copy_from_slice(&64u64.to_le_bytes());
        dynamic[54..56].copy_from_slice(&56u16.to_le_bytes());
        dynamic[56..58].copy_from_slice(&1u16.to_le_bytes());
        dynamic[64..68].copy_from_slice(&3u32.to_le_bytes());
        assert!(
            matches!(check_agent(&dynamic), Err(Error::BadAgent(m)) if m.contains("PT_INTERP"))
        );
    }

    #[test]
    fn static_pie_must_not_need_libraries() {
        // One PT_DYNAMIC program header at 64 whose section (at 256, 48
        // bytes) holds `tags`.
        let elf_with = |tags: &[u64]| {
            let mut elf = fake_static_elf();
            elf.resize(512, 0);
            elf[32..40].copy_from_slice(&64u64.to_le_bytes());
            elf[54..56].copy_from_slice(&56u16.to_le_bytes());
            elf[56..58].copy_from_slice(&1u16.to_le_bytes());
            elf[64..68].copy_from_slice(&2u32.to_le_bytes());
            elf[72..80].copy_from_slice(&256u64.to_le_bytes());
            elf[96..104].copy_from_slice(&48u64.to_le_bytes());
            for (i, tag) in tags.iter().enumerate() {
                elf[256 + i * 16..264 + i * 16].copy_from_slice(&tag.to_le_bytes());
            }
            elf
        };
        // DT_RELA (7), then DT_NULL: a static-pie.
        assert!(check_agent(&elf_with(&[7, 0])).is_ok());
        // DT_RELA, DT_NEEDED (1): needs libseccomp.so, say.
        assert!(
            matches!(check_agent(&elf_with(&[7, 1, 0])), Err(Error::BadAgent(m)) if m.contains("DT_NEEDED"))
        );
    }
}
