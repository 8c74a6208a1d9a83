//! `husk.toml`: the shim's settings.
//!
//! Looked up in this order: the path in the runtime options containerd
//! passes (`ConfigPath` of the runtime's `options`), `/etc/husk/husk.toml`,
//! else built-in defaults. A file that exists but does not parse, or names
//! an unknown key, is an error: a typo must not silently change how pods
//! are isolated.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the shim looks when containerd names no file.
pub const DEFAULT_PATH: &str = "/etc/husk/husk.toml";

/// Errors loading the settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not valid husk.toml.
    #[error("parsing {0}")]
    Parse(PathBuf, #[source] toml::de::Error),
    /// A value is out of range.
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
}

/// The shim's settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The VMM binary [default: husk-vmm next to the shim].
    pub vmm: Option<PathBuf>,
    /// The virtio-fs daemon [default: husk-virtiofsd next to the shim].
    pub virtiofsd: Option<PathBuf>,
    /// The jailer binary (default: next to the shim).
    pub jailer: Option<PathBuf>,
    /// Guest kernel [default: husk-vmm's, /var/lib/husk/guest/vmlinux].
    pub kernel: Option<PathBuf>,
    /// Guest initramfs [default: husk-vmm's].
    pub initramfs: Option<PathBuf>,
    /// vCPUs per pod VM.
    pub vcpus: u8,
    /// Guest memory per pod VM, MiB.
    pub mem_mib: u64,
    /// Size CRI pod VMs from the pod's resources (`sizing.rs`); `vcpus`
    /// and `mem_mib` are then what a pod that asks for nothing gets.
    pub pod_sizing: bool,
    /// Guest memory added to a pod's memory limit, MiB.
    pub pod_overhead_mib: u64,
    /// The most vCPUs a sized pod gets.
    pub max_vcpus: u8,
    /// The least guest memory a sized pod gets, MiB.
    pub min_mem_mib: u64,
    /// The most guest memory a sized pod gets, MiB.
    pub max_mem_mib: u64,
    /// Extra guest kernel command line.
    pub kernel_cmdline: String,
    /// Start pod VMs from a template snapshot (made on first use) instead
    /// of booting each one.
    pub template_start: bool,
    /// Where templates are kept.
    pub template_dir: PathBuf,
    /// The most templates kept in `template_dir` (least recently used go).
    pub template_max_count: u32,
    /// The most MiB of templates kept in `template_dir`.
    pub template_max_mib: u64,
    /// Per-pod runtime state (sockets, shared directory).
    pub state_dir: PathBuf,
    /// How long the agent of a new VM may take to answer, seconds (a cold
    /// boot, or the first template build, takes tens of seconds on hosts
    /// whose KVM emulates guest kernel code).
    pub agent_timeout_secs: u64,
    /// The shim's log level (tracing filter syntax).
    pub log_level: String,
    /// Keep the guest's serial console in the pod directory (debugging).
    pub serial_console: bool,
    /// Profile every pod VM's guest and write each profile here when its VM
    /// ends (docs/profiling.md) [default: off].
    pub profile_dir: Option<PathBuf>,
    /// Profile samples per second per vCPU.
    pub profile_hz: u32,
    /// Free page reporting: memory the guest frees goes back to the host
    /// (virtio-balloon; docs/memory.md).
    pub free_page_reporting: bool,
    /// How often the guest's balloon driver refreshes its memory
    /// statistics, seconds (0: no statistics).
    pub balloon_stats_secs: u32,
    /// kubelet's root directory: only bind sources exactly at
    /// `<kubelet_root>/pods/<uid>/volumes/kubernetes.io~<kind>/<name>` are
    /// taken for kubelet's volumes (`kubelet.rs`).
    pub kubelet_root: PathBuf,
    /// The most entries (files, directories, symlinks) one ConfigMap-style
    /// volume may hold to be copied into the guest.
    pub volume_max_entries: u64,
    /// The most bytes such a volume may hold in all, MiB.
    pub volume_max_mib: u64,
    /// The most bytes one file of such a volume may hold, MiB.
    pub volume_max_file_mib: u64,
    /// The cgroup a pod VM is placed below when its spec names none (a
    /// cgroupfs path; `ctr` names `/<namespace>/<id>`, CRI pods kubelet's).
    pub cgroup_parent: String,
    /// Memory a pod's cgroup may use beyond its guest RAM, MiB: husk-vmm,
    /// husk-virtiofsd, their page cache, the kernel's KVM structures.
    pub host_overhead_mib: u64,
    /// The most KiB each of a pod VM's host processes (husk-vmm,
    /// husk-virtiofsd) writes to its log in the pod directory.
    pub log_max_kib: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            vmm: None,
            virtiofsd: None,
            jailer: None,
            kernel: None,
            initramfs: None,
            vcpus: 1,
            mem_mib: 128,
            pod_sizing: true,
            pod_overhead_mib: 64,
            max_vcpus: 8,
            min_mem_mib: 128,
            max_mem_mib: 16 * 1024,
            kernel_cmdline: String::new(),
            template_start: true,
            template_dir: PathBuf::from("/var/lib/husk/templates"),
            template_max_count: 16,
            template_max_mib: 4096,
            state_dir: PathBuf::from("/run/husk"),
            agent_timeout_secs: 300,
            log_level: "info".into(),
            serial_console: false,
            profile_dir: None,
            profile_hz: 97,
            free_page_reporting: true,
            balloon_stats_secs: 0,
            kubelet_root: PathBuf::from("/var/lib/kubelet"),
            volume_max_entries: 10_000,
            volume_max_mib: 64,
            volume_max_file_mib: 16,
            cgroup_parent: "/husk".into(),
            host_overhead_mib: 64,
            log_max_kib: 4096,
        }
    }
}

impl Config {
    /// Loads `explicit` if given, else the default file if it exists,
    /// else the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_PATH).exists() => PathBuf::from(DEFAULT_PATH),
            None => return Ok(Self::default()),
        };
        let text =
            std::fs::read_to_string(&path).map_err(|e| ConfigError::Read(path.clone(), e))?;
        Self::parse(&text, &path)
    }

    /// Parses husk.toml text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(path.into(), e))?;
        let invalid = |m: &str| Err(ConfigError::Invalid(path.into(), m.into()));
        if cfg.vcpus == 0 || cfg.vcpus > 16 {
            return invalid("vcpus must be 1 to 16");
        }
        if cfg.mem_mib < 64 || cfg.mem_mib > 64 * 1024 {
            return invalid("mem_mib must be 64 to 65536");
        }
        if cfg.max_vcpus < cfg.vcpus || cfg.max_vcpus > 16 {
            return invalid("max_vcpus must be vcpus to 16");
        }
        if cfg.min_mem_mib < 64 || cfg.min_mem_mib > cfg.max_mem_mib {
            return invalid("min_mem_mib must be 64 to max_mem_mib");
        }
        if cfg.max_mem_mib > 64 * 1024 {
            return invalid("max_mem_mib must be at most 65536");
        }
        if cfg.pod_overhead_mib > 64 * 1024 {
            return invalid("pod_overhead_mib must be at most 65536");
        }
        if cfg.agent_timeout_secs == 0 {
            return invalid("agent_timeout_secs must be positive");
        }
        if cfg.profile_hz == 0 || cfg.profile_hz > 10_000 {
            return invalid("profile_hz must be 1 to 10000");
        }
        if cfg.balloon_stats_secs > 3600 {
            return invalid("balloon_stats_secs must be 0 to 3600");
        }
        if cfg.profile_dir.as_ref().is_some_and(|d| !d.is_absolute()) {
            return invalid("profile_dir must be an absolute path");
        }
        if cfg.volume_max_entries == 0 || cfg.volume_max_mib == 0 || cfg.volume_max_file_mib == 0 {
            return invalid(
                "volume_max_entries, volume_max_mib and volume_max_file_mib must be positive",
            );
        }
        if cfg.volume_max_mib > 4096 || cfg.volume_max_file_mib > cfg.volume_max_mib {
            return invalid(
                "volume_max_mib must be at most 4096, volume_max_file_mib at most volume_max_mib",
            );
        }
        if !cfg.cgroup_parent.starts_with('/')
            || cfg.cgroup_parent.split('/').any(|c| c == "." || c == "..")
        {
            return invalid("cgroup_parent must be an absolute cgroup path without . or ..");
        }
        if cfg.template_max_count == 0 || cfg.template_max_count > 4096 || cfg.template_max_mib == 0
        {
            return invalid("template_max_count must be 1 to 4096, template_max_mib positive");
        }
        if cfg.log_max_kib == 0 || cfg.log_max_kib > 1 << 20 {
            return invalid("log_max_kib must be 1 to 1048576");
        }
        if cfg.host_overhead_mib < 16 || cfg.host_overhead_mib > 4096 {
            return invalid("host_overhead_mib must be 16 to 4096");
        }
        for (name, p) in [
            ("template_dir", &cfg.template_dir),
            ("state_dir", &cfg.state_dir),
            ("kubelet_root", &cfg.kubelet_root),
        ] {
            if !p.is_absolute() {
                return invalid(&format!("{name} must be an absolute path"));
            }
        }
        Ok(cfg)
    }

    /// A binary next to the running shim, unless configured.
    fn sibling(configured: &Option<PathBuf>, name: &str) -> PathBuf {
        if let Some(p) = configured {
            return p.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join(name)))
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// The VMM binary.
    pub fn vmm_binary(&self) -> PathBuf {
        Self::sibling(&self.vmm, "husk-vmm")
    }

    /// The jailer every pod VM process starts through.
    pub fn jailer_binary(&self) -> PathBuf {
        Self::sibling(&self.jailer, "husk-jailer")
    }

    /// The virtio-fs daemon binary.
    pub fn virtiofsd_binary(&self) -> PathBuf {
        Self::sibling(&self.virtiofsd, "husk-virtiofsd")
    }

    /// The bounds on a volume copied into the guest.
    pub fn volume_limits(&self) -> husk_protocols::pack::Limits {
        husk_protocols::pack::Limits {
            entries: self.volume_max_entries,
            bytes: self.volume_max_mib << 20,
            file_bytes: self.volume_max_file_mib << 20,
        }
    }
}

/// The `ConfigPath` of containerd's runtime options
/// (`runtimeoptions.v1.Options { string type_url = 1; string config_path = 2; }`),
/// if the options are of that type.
pub fn config_path_from_options(type_url: &str, value: &[u8]) -> Option<PathBuf> {
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = protobuf::CodedInputStream::from_bytes(value);
    let mut found = None;
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        match (field, wire) {
            (2, 2) => found = input.read_string().ok(),
            (_, 2) => {
                if input.read_bytes().is_err() {
                    break;
                }
            }
            (_, 0) => {
                if input.read_raw_varint64().is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    found.filter(|p| !p.is_empty()).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let p = Path::new("husk.toml");
        assert_eq!(Config::parse("", p).expect("empty"), Config::default());
        let c = Config::parse("mem_mib = 256\ntemplate_start = false\n", p).expect("parse");
        assert_eq!(c.mem_mib, 256);
        assert!(!c.template_start);
        assert_eq!(c.vcpus, 1);
    }

    #[test]
    fn the_shipped_husk_toml_is_the_defaults() {
        let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/husk.toml"));
        let text = std::fs::read_to_string(p).expect("deploy/husk.toml");
        assert_eq!(Config::parse(&text, p).expect("parse"), Config::default());
        // The commented-out paths are the real defaults too.
        assert!(text.contains("# kernel = \"/var/lib/husk/guest/vmlinux\""));
    }

    #[test]
    fn refuses_typos_and_bad_values() {
        let p = Path::new("husk.toml");
        let e = Config::parse("mem_mb = 256\n", p).expect_err("unknown key");
        assert!(format!("{:?}", e).contains("mem_mb"));
        assert!(Config::parse("vcpus = 0\n", p).is_err());
        assert!(Config::parse("mem_mib = 1\n", p).is_err());
        assert!(Config::parse("state_dir = \"relative\"\n", p).is_err());
        assert!(Config::parse("vcpus = \"two\"\n", p).is_err());
        assert!(Config::parse("vcpus = 4\nmax_vcpus = 2\n", p).is_err());
        assert!(Config::parse("min_mem_mib = 4096\nmax_mem_mib = 1024\n", p).is_err());
        assert!(Config::parse("max_mem_mib = 100000\n", p).is_err());
        assert!(Config::parse("kubelet_root = \"var/lib/kubelet\"\n", p).is_err());
        assert!(Config::parse("volume_max_entries = 0\n", p).is_err());
        assert!(Config::parse("volume_max_mib = 8\nvolume_max_file_mib = 9\n", p).is_err());
        assert!(matches!(
            Config::load(Some(Path::new("/nonexistent/husk.toml"))),
            Err(ConfigError::Read(..))
        ));
    }

    #[test]
    fn reads_config_path_from_runtime_options() {
        // field 1 "x", field 2 "/etc/husk/pod.toml"
        let mut v = vec![0x0a, 1, b'x', 0x12, 18];
        v.extend_from_slice(b"/etc/husk/pod.toml");
        assert_eq!(
            config_path_from_options("type.googleapis.com/runtimeoptions.v1.Options", &v),
            Some(PathBuf::from("/etc/husk/pod.toml"))
        );
        assert_eq!(config_path_from_options("other.Type", &v), None);
        assert_eq!(
            config_path_from_options("runtimeoptions.v1.Options", &[0xff, 0xff]),
            None
        );
    }
}
