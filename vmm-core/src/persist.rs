//! Snapshots of a whole VM and restoring them: what goes into the state
//! section of a snapshot (see [`crate::snapshot`] for the container), how
//! a running VM is captured, and the fingerprint a restore must match.
//!
//! Capture: every vCPU is paused; each saves its own state on its thread
//! (the vCPU descriptor lives there); then the VM-wide KVM state, each
//! virtio-mmio transport and guest memory are written; vCPUs that were
//! running run again. Restore is the same in reverse, done by
//! [`crate::Vmm::build`] before any vCPU runs.

use std::{
    fs::File,
    io::BufWriter,
    path::{Path, PathBuf},
    sync::{mpsc::channel, Arc, Mutex},
    time::Duration,
};

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    devices::virtio::mmio::{MmioTransport, TransportState},
    snapshot::{self, Identity, Stats},
    vstate::{
        control::{RunState, VcpuControl, Wanted},
        vcpu::VcpuState,
        vm::{save_vm_state, VmState},
    },
};

/// Version of the state section's layout (part of every fingerprint).
const STATE_VERSION: u32 = 1;
const WAIT: Duration = Duration::from_secs(10);

/// The state section of a snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// VM-wide KVM state.
    pub vm: VmState,
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// One per virtio-mmio device, in bus order.
    pub transports: Vec<TransportState>,
}

/// Errors taking or using a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A vCPU did not pause or save in time.
    #[error("vCPU {0} did not {1} within {WAIT:?}")]
    Vcpu(usize, &'static str),
    /// Saving a vCPU failed.
    #[error("saving vCPU {0}: {1}")]
    VcpuState(usize, String),
    /// KVM state could not be read or written.
    #[error("VM state")]
    Vm(#[from] crate::vstate::vm::VmError),
    /// The container could not be written or read.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// The state section could not be encoded or decoded.
    #[error("snapshot state section: {0}")]
    Encoding(String),
    /// The snapshot does not fit this VM's devices.
    #[error("snapshot devices: {0}")]
    Devices(String),
    /// Writing the file failed.
    #[error("writing snapshot {0}")]
    File(PathBuf, #[source] std::io::Error),
}

/// Encodes the state section.
pub fn encode(s: &VmSnapshot) -> Result<Vec<u8>, PersistError> {
    bincode::serde::encode_to_vec(s, bincode::config::standard())
        .map_err(|e| PersistError::Encoding(e.to_string()))
}

/// Decodes the state section.
pub fn decode(bytes: &[u8]) -> Result<VmSnapshot, PersistError> {
    let (s, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| PersistError::Encoding(e.to_string()))?;
    if used != bytes.len() {
        return Err(PersistError::Encoding(
            "trailing bytes after the state".into(),
        ));
    }
    Ok(s)
}

/// What must be identical between the VM that took a snapshot and the one
/// restoring it: the CPU the guest saw, the VM's shape and its devices.
pub fn fingerprint(
    vcpus: u8,
    mem_size: u64,
    cpuid: &[kvm_cpuid_entry2],
    device_types: &[u32],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(STATE_VERSION.to_le_bytes());
    h.update([vcpus]);
    h.update(mem_size.to_le_bytes());
    for e in cpuid {
        for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
            h.update(v.to_le_bytes());
        }
    }
    for t in device_types {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

/// Everything needed to snapshot a running VM (shared with the API).
pub struct Persist {
    /// The VM.
    pub vm: Arc<VmFd>,
    /// Guest memory.
    pub memfd: Arc<File>,
    /// Who this VM is (husk version, fingerprint, memory size).
    pub identity: Identity,
    /// The virtio-mmio devices, in bus order.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The vCPUs.
    pub vcpus: Arc<[Arc<VcpuControl>]>,
    /// MSRs each vCPU saves (probed at build, before seccomp).
    pub msrs: Arc<Vec<u32>>,
}

impl std::fmt::Debug for Persist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persist")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Persist {
    /// Writes a snapshot of the VM to `path` (through a temporary file, so
    /// `path` is either the old content or a complete new snapshot). vCPUs
    /// that were running run again afterwards.
    pub fn snapshot(&self, path: &Path) -> Result<Stats, PersistError> {
        let was_running: Vec<bool> = self
            .vcpus
            .iter()
            .map(|v| v.state() != RunState::Paused)
            .collect();
        for v in self.vcpus.iter() {
            v.request(Wanted::Pause);
        }
        let result = self.capture(path);
        for (v, running) in self.vcpus.iter().zip(&was_running) {
            if *running {
                v.request(Wanted::Run);
            }
        }
        result
    }

    fn capture(&self, path: &Path) -> Result<Stats, PersistError> {
        for (i, v) in self.vcpus.iter().enumerate() {
            if !v.wait_for(RunState::Paused, WAIT) {
                return Err(PersistError::Vcpu(i, "pause"));
            }
        }
        for t in self.transports.iter() {
            if let Some(why) = t
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .snapshot_blocker()
            {
                return Err(PersistError::Devices(why));
            }
        }
        let mut vcpus = Vec::new();
        for (i, v) in self.vcpus.iter().enumerate() {
            let (tx, rx) = channel();
            let msrs = self.msrs.clone();
            let posted = v.post(Box::new(move |vcpu| {
                let _ = tx.send(vcpu.save_state(&msrs).map_err(|e| e.to_string()));
            }));
            if !posted {
                return Err(PersistError::Vcpu(i, "save its state (it exited)"));
            }
            let state = rx
                .recv_timeout(WAIT)
                .map_err(|_| PersistError::Vcpu(i, "save its state"))?;
            vcpus.push(state.map_err(|e| PersistError::VcpuState(i, e))?);
        }
        let vm = save_vm_state(&self.vm)?;
        let transports = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).save_state())
            .collect();
        let state = encode(&VmSnapshot {
            vm,
            vcpus,
            transports,
        })?;

        let tmp = path.with_extension("tmp");
        let file_err = |e| PersistError::File(path.to_path_buf(), e);
        let file = File::create(&tmp).map_err(file_err)?;
        let mut out = BufWriter::new(file);
        let written = snapshot::write(&mut out, &self.identity, &state, &self.memfd);
        let file = out.into_inner().map_err(|e| file_err(e.into_error()))?;
        let stats = match written {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        // A snapshot is either complete under its name or not there at all:
        // the temporary file goes on any failure.
        if let Err(e) = file.sync_all().and_then(|()| std::fs::rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(file_err(e));
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_changes_with_what_matters() {
        let cpuid = [kvm_cpuid_entry2 {
            function: 1,
            eax: 5,
            ..Default::default()
        }];
        let base = fingerprint(1, 128 << 20, &cpuid, &[19]);
        assert_eq!(base, fingerprint(1, 128 << 20, &cpuid, &[19]));
        assert_ne!(base, fingerprint(2, 128 << 20, &cpuid, &[19]));
        assert_ne!(base, fingerprint(1, 256 << 20, &cpuid, &[19]));
        assert_ne!(base, fingerprint(1, 128 << 20, &cpuid, &[19, 26]));
        let other = [kvm_cpuid_entry2 {
            function: 1,
            eax: 6,
            ..Default::default()
        }];
        assert_ne!(base, fingerprint(1, 128 << 20, &other, &[19]));
    }

    #[test]
    fn decode_refuses_garbage() {
        assert!(decode(&[1, 2, 3]).is_err());
        assert!(decode(&[]).is_err());
    }
}
