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
    /// A network device setting is malformed or out of range.
    #[error("network device: {0}")]
    Net(String),
    /// A balloon device setting is malformed or out of range.
    #[error("balloon device: {0}")]
    Balloon(String),
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

/// Where a network device's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// An open tap descriptor this process inherited (the shim makes the
    /// tap in the pod's network namespace and passes it).
    Fd(i32),
    /// A tap to open (or create) by name in husk-vmm's own network
    /// namespace (running husk-vmm by hand).
    Name(String),
}

/// A virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The MAC address the device reports.
    pub mac: [u8; 6],
    /// The MTU the device reports.
    pub mtu: u16,
    /// Its tap; none: frames are dropped (a template VM, whose restored
    /// copies get their tap).
    pub tap: Option<TapSource>,
}

/// Smallest MTU (IPv4's minimum).
pub const MIN_MTU: u16 = 68;

impl NetConfig {
    /// Parses `mac=02:00:00:00:00:01[,mtu=1500][,fd=N|,tap=NAME]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = |m: String| ConfigError::Net(m);
        let mut mac = None;
        let mut mtu = 1500;
        let mut tap = None;
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            match k {
                "mac" => mac = Some(parse_mac(v).ok_or_else(|| bad(format!("bad MAC {v:?}")))?),
                "mtu" => mtu = v.parse().map_err(|_| bad(format!("bad MTU {v:?}")))?,
                "fd" if tap.is_none() => {
                    tap = Some(TapSource::Fd(
                        v.parse()
                            .ok()
                            .filter(|fd| *fd > 2)
                            .ok_or_else(|| bad(format!("bad fd {v:?} (3 or more)")))?,
                    ))
                }
                "tap" if tap.is_none() => tap = Some(TapSource::Name(v.to_string())),
                "fd" | "tap" => return Err(bad("give one of fd= and tap=".into())),
                _ => return Err(bad(format!("unknown key {k:?} (mac, mtu, fd, tap)"))),
            }
        }
        let net = Self {
            mac: mac.ok_or_else(|| bad("mac= is required".into()))?,
            mtu,
            tap,
        };
        net.validate()?;
        Ok(net)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.mac[0] & 1 != 0 || self.mac == [0; 6] {
            return Err(ConfigError::Net(format!(
                "MAC {} is not a unicast address",
                format_mac(&self.mac)
            )));
        }
        if self.mtu < MIN_MTU {
            return Err(ConfigError::Net(format!(
                "MTU {} is below {MIN_MTU}",
                self.mtu
            )));
        }
        if let Some(TapSource::Name(n)) = &self.tap {
            if n.is_empty() || n.len() > 15 || n.contains('/') {
                return Err(ConfigError::Net(format!("bad tap name {n:?}")));
            }
        }
        Ok(())
    }
}

/// Longest statistics interval, seconds (a sanity bound).
pub const MAX_STATS_INTERVAL_S: u32 = 3600;
/// Largest free page reporting order the guest kernel takes (its
/// `MAX_ORDER - 1`: 4 MiB blocks).
pub const MAX_REPORTING_ORDER: u8 = 10;
/// The default free page reporting order: 128 KiB blocks. Measured
/// (docs/memory.md): an idle pod keeps 2.1 MiB less guest RAM than at the
/// kernel's own 4 MiB or at 2 MiB, and going lower returns nothing more.
pub const DEFAULT_REPORTING_ORDER: u8 = 5;

/// A virtio-balloon device (see `devices::virtio::balloon`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer free page reporting: the guest returns pages it freed.
    pub free_page_reporting: bool,
    /// The smallest free block the guest reports: 2^order pages
    /// (`page_reporting.page_reporting_order` on its command line).
    pub reporting_order: u8,
    /// Offer the statistics queue, refreshed every this many seconds
    /// (0: no statistics).
    pub stats_interval_s: u32,
    /// Offer deflate-on-OOM: the guest takes pages back from the balloon
    /// before it would OOM-kill.
    pub deflate_on_oom: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            free_page_reporting: true,
            reporting_order: DEFAULT_REPORTING_ORDER,
            stats_interval_s: 0,
            deflate_on_oom: true,
        }
    }
}

impl BalloonConfig {
    /// Parses `[reporting=on|off][,order=N][,stats=SECONDS][,deflate-on-oom=on|off]`
    /// (defaults: reporting on at order 5, no statistics, deflate-on-OOM on).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = |m: String| ConfigError::Balloon(m);
        let on_off = |k: &str, v: &str| match v {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(bad(format!("{k}={v:?}: expected on or off"))),
        };
        let mut c = Self::default();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            match k {
                "reporting" => c.free_page_reporting = on_off(k, v)?,
                "deflate-on-oom" => c.deflate_on_oom = on_off(k, v)?,
                "order" => {
                    c.reporting_order = v
                        .parse()
                        .map_err(|_| bad(format!("bad reporting order {v:?}")))?;
                }
                "stats" => {
                    c.stats_interval_s = v
                        .parse()
                        .map_err(|_| bad(format!("bad statistics interval {v:?}")))?;
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key {k:?} (reporting, order, stats, deflate-on-oom)"
                    )))
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.reporting_order > MAX_REPORTING_ORDER {
            return Err(ConfigError::Balloon(format!(
                "reporting order {} is over {MAX_REPORTING_ORDER}",
                self.reporting_order
            )));
        }
        if self.stats_interval_s > MAX_STATS_INTERVAL_S {
            return Err(ConfigError::Balloon(format!(
                "statistics interval {} s is over {MAX_STATS_INTERVAL_S} s",
                self.stats_interval_s
            )));
        }
        Ok(())
    }

    /// How often to ask for statistics, if at all.
    pub fn stats_interval(&self) -> Option<std::time::Duration> {
        (self.stats_interval_s > 0)
            .then(|| std::time::Duration::from_secs(u64::from(self.stats_interval_s)))
    }

    /// The form [`Self::parse`] reads.
    pub fn to_arg(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        format!(
            "reporting={},order={},stats={},deflate-on-oom={}",
            on(self.free_page_reporting),
            self.reporting_order,
            self.stats_interval_s,
            on(self.deflate_on_oom)
        )
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
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
    /// The network device, if any.
    pub net: Option<NetConfig>,
    /// The balloon device, if any.
    pub balloon: Option<BalloonConfig>,
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
            net: None,
            balloon: None,
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
        if let Some(net) = &self.net {
            net.validate()?;
        }
        if let Some(balloon) = &self.balloon {
            balloon.validate()?;
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

    #[test]
    fn balloon_settings_parse_round_trip_and_are_checked() {
        assert_eq!(BalloonConfig::parse(""), Ok(BalloonConfig::default()));
        let c = BalloonConfig::parse("reporting=off,order=5,stats=10,deflate-on-oom=off")
            .expect("parse");
        assert!(!c.free_page_reporting && !c.deflate_on_oom);
        assert_eq!((c.reporting_order, c.stats_interval_s), (5, 10));
        assert_eq!(BalloonConfig::parse(&c.to_arg()), Ok(c));
        assert_eq!(c.stats_interval(), Some(std::time::Duration::from_secs(10)));
        assert_eq!(BalloonConfig::default().stats_interval(), None);
        for bad in [
            "reporting=yes",
            "order=11",
            "order=-1",
            "stats=3601",
            "stats=x",
            "colour=red",
            "reporting",
        ] {
            assert!(
                matches!(BalloonConfig::parse(bad), Err(ConfigError::Balloon(_))),
                "{bad}"
            );
        }
    }

    fn valid() -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/proc/self/exe"),
            initramfs: None,
            ..VmConfig::with_defaults()
        }
    }

    #[test]
    fn net_settings_are_parsed_and_checked() {
        let n = NetConfig::parse("mac=02:00:0a:58:00:05,mtu=1450,fd=7").expect("net");
        assert_eq!(n.mac, [2, 0, 0x0a, 0x58, 0, 5]);
        assert_eq!(n.mtu, 1450);
        assert_eq!(n.tap, Some(TapSource::Fd(7)));
        let n = NetConfig::parse("mac=02:00:00:00:00:01").expect("net");
        assert_eq!((n.mtu, n.tap), (1500, None));
        assert_eq!(
            NetConfig::parse("mac=02:00:00:00:00:01,tap=husk0")
                .expect("net")
                .tap,
            Some(TapSource::Name("husk0".into()))
        );
        for bad in [
            "",
            "mtu=1500",
            "mac=01:00:00:00:00:01",
            "mac=00:00:00:00:00:00",
            "mac=02:00:00:00:00",
            "mac=02:00:00:00:00:01:02",
            "mac=02:00:00:00:00:0g",
            "mac=02:00:00:00:00:01,mtu=67",
            "mac=02:00:00:00:00:01,mtu=70000",
            "mac=02:00:00:00:00:01,fd=2",
            "mac=02:00:00:00:00:01,fd=3,tap=x",
            "mac=02:00:00:00:00:01,tap=a/b",
            "mac=02:00:00:00:00:01,tap=0123456789abcdef",
            "mac=02:00:00:00:00:01,speed=10",
            "mac",
        ] {
            assert!(
                matches!(NetConfig::parse(bad), Err(ConfigError::Net(_))),
                "{bad:?} accepted"
            );
        }
        assert_eq!(format_mac(&[2, 0, 0xa, 0x58, 0, 5]), "02:00:0a:58:00:05");
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
