//! Host memory of a pod's processes, each page counted once.
//!
//! A husk pod's guest RAM is one memfd that several processes hold: husk-vmm
//! maps it, the virtio-fs daemon maps it too (vhost-user), and pages a
//! restore wrote with `pwrite` are resident without being mapped by anyone.
//! Adding up the processes' PSS and the memfd's size counts guest pages two
//! or three times. Here each process contributes its PSS without its
//! guest-RAM mappings, and each distinct guest-RAM memfd (by device and
//! inode) contributes its allocated blocks once: every resident page once.

use std::{collections::BTreeMap, os::unix::fs::MetadataExt};

use crate::kib_value;

/// The name husk-vmm gives its guest-RAM memfd (`memfd:<name>` in /proc).
pub const GUEST_RAM_MEMFD: &str = "memfd:husk-guest-ram";

/// Host memory of a set of processes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostMemory {
    /// PSS of the processes without their guest-RAM mappings, KiB.
    pub processes_pss_kib: u64,
    /// The same, per process: (pid, KiB).
    pub pss_by_pid: Vec<(u32, u64)>,
    /// Guest RAM resident on the host: the allocated size of each distinct
    /// guest-RAM memfd, once, KiB.
    pub guest_ram_kib: u64,
    /// Distinct guest-RAM memfds found.
    pub guest_ram_files: usize,
    /// Processes that were read.
    pub processes: usize,
}

impl HostMemory {
    /// Every resident page once, KiB.
    pub fn total_kib(&self) -> u64 {
        self.processes_pss_kib + self.guest_ram_kib
    }

    /// PSS without guest RAM of the processes among `pids`, KiB.
    pub fn pss_of(&self, pids: &[u32]) -> u64 {
        self.pss_by_pid
            .iter()
            .filter(|(p, _)| pids.contains(p))
            .map(|(_, k)| k)
            .sum()
    }
}

/// A file identity: (major, minor, inode).
type FileId = (u64, u64, u64);

/// What one process's smaps says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Smaps {
    pss_kib: u64,
    guest_pss_kib: u64,
    /// Guest-RAM mappings: file identity and address range ("a-b").
    guest_maps: Vec<(FileId, String)>,
}

/// Parses /proc/PID/smaps text.
fn parse_smaps(text: &str) -> Smaps {
    let mut s = Smaps::default();
    let mut in_guest = false;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.ends_with(':') {
            if first == "Pss:" {
                let v = kib_value(&line[4..]).unwrap_or(0);
                s.pss_kib += v;
                if in_guest {
                    s.guest_pss_kib += v;
                }
            }
            continue;
        }
        // A mapping header: "range perms offset major:minor inode [path]".
        let fields: Vec<&str> = line.split_whitespace().collect();
        in_guest = fields.get(5).is_some_and(|p| is_guest_ram(p));
        if in_guest {
            let dev = fields.get(3).and_then(|d| d.split_once(':'));
            let id = dev.and_then(|(ma, mi)| {
                Some((
                    u64::from_str_radix(ma, 16).ok()?,
                    u64::from_str_radix(mi, 16).ok()?,
                    fields.get(4)?.parse().ok()?,
                ))
            });
            if let Some(id) = id {
                s.guest_maps.push((id, first.to_string()));
            }
        }
    }
    s
}

/// Whether a /proc path ("/memfd:NAME (deleted)") names guest RAM.
fn is_guest_ram(path: &str) -> bool {
    path.trim_start_matches('/').starts_with(GUEST_RAM_MEMFD)
}

fn file_id(m: &std::fs::Metadata) -> FileId {
    let dev = m.dev();
    (
        u64::from(libc::major(dev)),
        u64::from(libc::minor(dev)),
        m.ino(),
    )
}

/// Guest-RAM memfds a process holds open: identity and allocated KiB.
fn open_guest_ram(pid: u32, into: &mut BTreeMap<FileId, u64>) {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return;
    };
    for e in fds.flatten() {
        let is_guest =
            std::fs::read_link(e.path()).is_ok_and(|l| is_guest_ram(&l.to_string_lossy()));
        if let (true, Ok(m)) = (is_guest, std::fs::metadata(e.path())) {
            into.insert(file_id(&m), m.blocks() * 512 / 1024);
        }
    }
}

/// Measures `pids` (processes that are gone are skipped).
pub fn host_memory(pids: &[u32]) -> HostMemory {
    let mut files = BTreeMap::new();
    let mut out = HostMemory::default();
    for &pid in pids {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
            continue;
        };
        let smaps = parse_smaps(&text);
        out.processes += 1;
        let own = smaps.pss_kib.saturating_sub(smaps.guest_pss_kib);
        out.processes_pss_kib += own;
        out.pss_by_pid.push((pid, own));
        open_guest_ram(pid, &mut files);
        // A mapping whose descriptor was closed: stat it through map_files.
        for (id, range) in smaps.guest_maps {
            if files.contains_key(&id) {
                continue;
            }
            if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/map_files/{range}")) {
                files.insert(file_id(&m), m.blocks() * 512 / 1024);
            }
        }
    }
    out.guest_ram_files = files.len();
    out.guest_ram_kib = files.values().sum();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/husk-vmm
Size:               1024 kB
Pss:                 300 kB
Pss_Shmem:             0 kB
7f0000000000-7f0008000000 rw-s 00000000 00:01 5678 /memfd:husk-guest-ram (deleted)
Size:             131072 kB
Pss:               15000 kB
Pss_Shmem:         15000 kB
7f0010000000-7f0010021000 rw-p 00000000 00:00 0 
Size:                132 kB
Pss:                 120 kB
";

    #[test]
    fn guest_mappings_are_set_apart() {
        let s = parse_smaps(SMAPS);
        assert_eq!(s.pss_kib, 15_420);
        assert_eq!(s.guest_pss_kib, 15_000);
        assert_eq!(
            s.guest_maps,
            [((0, 1, 5678), "7f0000000000-7f0008000000".to_string())]
        );
    }

    #[test]
    fn a_memfd_two_processes_share_counts_once() {
        // This process fills a memfd named like guest RAM; a child inherits
        // the descriptor: two processes, one file, counted once.
        let name = std::ffi::CString::new("husk-guest-ram").expect("name");
        // SAFETY: plain memfd_create with a valid C string; no CLOEXEC, so
        // the child below inherits it.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor this test owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(8 << 20).expect("size");
        std::os::unix::fs::FileExt::write_all_at(&file, &vec![1u8; 4 << 20], 0).expect("fill");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let me = std::process::id();
        let child_pid = child.id();
        let both = host_memory(&[me, child_pid]);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(both.processes, 2);
        assert_eq!(
            both.pss_of(&[me]) + both.pss_of(&[child_pid]),
            both.processes_pss_kib,
            "the parts add up"
        );
        assert_eq!(both.guest_ram_files, 1, "one file");
        assert!(
            (4096..4096 + 64).contains(&both.guest_ram_kib),
            "{} KiB allocated, counted once",
            both.guest_ram_kib
        );
    }
}
