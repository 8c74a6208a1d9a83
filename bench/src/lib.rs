//! What husk's benchmarks share: the two runtimes side by side on one
//! containerd, finding a container's shim, counting its host memory once.

use husk_e2e::{containerd::Containerd, hostmem::HostMemory};
use serde::Serialize;

/// runc's runtime name on containerd.
pub const RUNC: &str = "io.containerd.runc.v2";

/// The runtime a benchmark container runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// husk (`io.containerd.husk.v2`).
    Husk,
    /// runc (`io.containerd.runc.v2`) on the same containerd.
    Runc,
}

impl Runtime {
    /// Its short name (`husk`, `runc`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Husk => "husk",
            Self::Runc => "runc",
        }
    }

    /// Its shim binary.
    pub fn shim(self) -> &'static str {
        match self {
            Self::Husk => "containerd-shim-husk-v2",
            Self::Runc => "containerd-shim-runc-v2",
        }
    }

    /// `ctr run` and the runtime arguments.
    pub fn run_args(self, c: &Containerd) -> Vec<String> {
        match self {
            Self::Husk => c.run_args(),
            Self::Runc => vec!["run".into(), "--runtime".into(), RUNC.into()],
        }
    }
}

/// The shim process serving container `id`.
pub fn shim_pid(rt: Runtime, id: &str) -> Option<u32> {
    let rd = std::fs::read_dir("/proc").ok()?;
    rd.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with(rt.shim().as_bytes()));
        let serves = args
            .windows(2)
            .any(|w| w[0] == b"-id" && w[1] == id.as_bytes());
        (is_shim && serves).then_some(pid)
    })
}

/// Host memory of one idle container, each page once.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Idle {
    /// Host memory of the container, each page once:
    /// `processes_pss_kib` plus `guest_ram_kib`, KiB.
    pub total_kib: u64,
    /// PSS of the shim and all it started, without guest-RAM mappings, KiB.
    pub processes_pss_kib: u64,
    /// Processes counted.
    pub processes: usize,
    /// husk: guest RAM resident on the host (allocated size of each
    /// distinct guest-RAM memfd, once, whoever maps it), KiB.
    pub guest_ram_kib: u64,
    /// husk: distinct guest-RAM memfds found (one per pod VM).
    pub guest_ram_files: usize,
}

impl From<HostMemory> for Idle {
    fn from(m: HostMemory) -> Self {
        Self {
            total_kib: m.total_kib(),
            processes_pss_kib: m.processes_pss_kib,
            processes: m.processes,
            guest_ram_kib: m.guest_ram_kib,
            guest_ram_files: m.guest_ram_files,
        }
    }
}
