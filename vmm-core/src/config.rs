//! The VM configuration: a plain, validated description of one microVM.
//!
//! Everything the builder needs is here and checked up front, so a bad value
//! is reported before any KVM or file state exists (nothing to clean up).

use std::path::{Path, PathBuf};

/// Directory where the guest image (kernel, initramfs) is installed and read
/// from by default; `HUSK_GUEST_DIR` overrides it.
pub const DEFAULT_GUEST_DIR: &str = "/var/lib/husk/guest";

/// The guest image directory in effect (`HUSK_GUEST_DIR` or the default).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("HUSK_GUEST_DIR")
        .map_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR), PathBuf::from)
}

/// Smallest guest memory that boots the husk kernel with its initramfs.
pub const MIN_MEM_MIB: u64 = 32;
/// Largest guest memory husk accepts (a sanity bound, not a KVM limit).
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Largest number of vCPUs (the guest kernel is built with NR_CPUS=16).
pub const MAX_VCPUS: u8 = 16;
/// Lowest guest CID a VM may use (0-2 are reserved by the vsock spec).
pub const MIN_GUEST_CID: u64 = 3;

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    /// Memory size out of range.
    #[error("memory must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB, got {0}")]
    Memory(u64),
    /// A required file does not exist.
    #[error("{what} {path} does not exist")]
    Missing {
        /// What the file is for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// The guest CID is reserved or too large.
    #[error("guest CID must be between {MIN_GUEST_CID} and 4294967294, got {0}")]
    Cid(u64),
    /// A Unix socket path is too long for `sockaddr_un`.
    #[error("socket path {0} is longer than 100 bytes (with the _<port> suffix it must fit sockaddr_un)")]
    SocketPath(PathBuf),
    /// Extra kernel command line words that would confuse the device list.
    #[error("extra kernel command line must not contain {0:?}")]
    Cmdline(String),
}

/// Vsock device settings (Firecracker-style hybrid vsock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id.
    pub guest_cid: u64,
    /// Host Unix socket for host-initiated connections; guest-initiated
    /// connections to port P go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// A virtio-fs device served by a vhost-user daemon (husk-virtiofsd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The daemon's vhost-user socket.
    pub socket: PathBuf,
    /// The tag the guest mounts by.
    pub tag: String,
}

/// The description of one microVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Uncompressed ELF `vmlinux` with a PVH entry point.
    pub kernel: PathBuf,
    /// Initramfs (newc cpio, optionally compressed).
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command line words, appended after husk's own.
    pub extra_cmdline: String,
    /// Serial console output goes here; `None` means no console at all
    /// (every console byte is a VM exit, so it is off by default).
    pub serial_log: Option<PathBuf>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// The control API socket, if any.
    pub api_socket: Option<PathBuf>,
    /// The virtio-fs device, if any.
    pub fs: Option<FsConfig>,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Confine every VMM thread with its seccomp filter (see `seccomp`).
    pub seccomp: bool,
    /// Start from this snapshot instead of booting the kernel.
    pub restore_from: Option<PathBuf>,
    /// Boot, snapshot to this path when the agent is ready, and stop.
    pub make_template: Option<PathBuf>,
}

impl VmConfig {
    /// A configuration with the default guest image and sizes.
    pub fn with_defaults() -> Self {
        let dir = guest_dir();
        Self {
            vcpus: 1,
            mem_mib: 128,
            kernel: dir.join("vmlinux"),
            initramfs: Some(dir.join("initramfs.cpio")),
            extra_cmdline: String::new(),
            serial_log: None,
            vsock: None,
            api_socket: None,
            fs: None,
            kvm_device: PathBuf::from("/dev/kvm"),
            seccomp: true,
            restore_from: None,
            make_template: None,
        }
    }

    /// Checks every value; returns the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        check_exists("kernel", &self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            check_exists("initramfs", initramfs)?;
        }
        if let Some(snapshot) = &self.restore_from {
            check_exists("snapshot", snapshot)?;
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < MIN_GUEST_CID || vsock.guest_cid >= u64::from(u32::MAX) {
                return Err(ConfigError::Cid(vsock.guest_cid));
            }
            check_socket_path(&vsock.uds_path)?;
        }
        if let Some(api) = &self.api_socket {
            check_socket_path(api)?;
        }
        if let Some(fs) = &self.fs {
            check_exists("virtio-fs socket", &fs.socket)?;
        }
        for word in self.extra_cmdline.split_ascii_whitespace() {
            if word.starts_with("virtio_mmio.device=") || word.starts_with("8250.nr_uarts=") {
                return Err(ConfigError::Cmdline(word.to_string()));
            }
        }
        Ok(())
    }
}

fn check_exists(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.exists() {
        Ok(())
    } else {
        Err(ConfigError::Missing {
            what,
            path: path.to_path_buf(),
        })
    }
}

fn check_socket_path(path: &Path) -> Result<(), ConfigError> {
    // sun_path is 108 bytes; leave room for "_<port>" (up to 11 bytes).
    if path.as_os_str().len() > 96 {
        Err(ConfigError::SocketPath(path.to_path_buf()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/proc/self/exe"),
            initramfs: None,
            ..VmConfig::with_defaults()
        }
    }

    #[test]
    fn accepts_defaults_with_existing_files() {
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn rejects_bad_values() {
        assert_eq!(
            VmConfig {
                vcpus: 0,
                ..valid()
            }
            .validate(),
            Err(ConfigError::Vcpus(0))
        );
        assert_eq!(
            VmConfig {
                vcpus: 17,
                ..valid()
            }
            .validate(),
            Err(ConfigError::Vcpus(17))
        );
        assert_eq!(
            VmConfig {
                mem_mib: 8,
                ..valid()
            }
            .validate(),
            Err(ConfigError::Memory(8))
        );
        let missing = VmConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..valid()
        };
        assert!(matches!(
            missing.validate(),
            Err(ConfigError::Missing { what: "kernel", .. })
        ));
        let cid = VmConfig {
            vsock: Some(VsockConfig {
                guest_cid: 2,
                uds_path: "/tmp/v.sock".into(),
            }),
            ..valid()
        };
        assert_eq!(cid.validate(), Err(ConfigError::Cid(2)));
        let long = VmConfig {
            api_socket: Some(PathBuf::from("/".repeat(120))),
            ..valid()
        };
        assert!(matches!(long.validate(), Err(ConfigError::SocketPath(_))));
        let cmd = VmConfig {
            extra_cmdline: "quiet virtio_mmio.device=1@2:3".into(),
            ..valid()
        };
        assert!(matches!(cmd.validate(), Err(ConfigError::Cmdline(_))));
    }
}
