//! A pod VM's size from what the pod asks for.
//!
//! Kubernetes sums a pod's container limits and containerd (1.6 and later,
//! kubelet 1.23 and later) hands them to the sandbox container as
//! annotations: CPU quota and period, CPU shares, memory limit in bytes.
//! runc needs none of that at sandbox time (each container's cgroup carries
//! its own limits); a VM does, because its vCPUs and memory are fixed when
//! it starts. Without them every pod would get `husk.toml`'s default shape
//! whatever it asked for: a pod limited to 2 GiB OOM-killed at 128 MiB.
//!
//! The shape:
//! - vCPUs: `ceil(quota / period)` when both are positive (a CPU limit),
//!   else `ceil(shares / 1024)` when the pod asked for more than a minimal
//!   share (a CPU request without a limit), else `vcpus`; at most
//!   `max_vcpus`.
//! - memory: the pod's limit plus `pod_overhead_mib` (the guest kernel, the
//!   agent, page tables, the image's page cache), rounded up to its
//!   bucket ([`bucket_mib`]: four sizes per doubling, so at most a quarter
//!   more), within `min_mem_mib` and `max_mem_mib`; `mem_mib`
//!   when the pod sets no limit (some container without one).
//!
//! Each shape has a template of its own (the template key holds vCPUs and
//! memory), made on first use; rounding memory keeps the number of shapes,
//! and of cold boots, small. The containers' own limits still apply inside
//! the guest, to each container's cgroup.

use oci_spec::runtime::Spec;

use crate::config::Config;

/// CPU period of the pod's limit (µs).
pub const CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// CPU quota of the pod's limit (µs per period; ≤ 0: none).
pub const CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// CPU shares of the pod's requests (1024 per CPU).
pub const CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";
/// Memory limit of the pod, bytes (0: none).
pub const MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The smallest step between two guest memory sizes, MiB.
pub const MEM_STEP_MIB: u64 = 32;

/// `mib` rounded up to its bucket: a multiple of a quarter of the power of
/// two below it (at least [`MEM_STEP_MIB`]): 128, 160, 192, 224, 256, 320,
/// 384, 448, 512, 640, ... So a guest gets at most a quarter more memory
/// than asked (which its containers cannot use: their own limits hold in
/// the guest, and free page reporting returns what the guest frees), and
/// pods that vary their limits make few shapes, hence few cold boots and
/// templates: 29 from 128 MiB to 16 GiB, against 509 with 32 MiB steps.
pub fn bucket_mib(mib: u64) -> u64 {
    let below = if mib <= 1 {
        1
    } else {
        1u64 << (63 - mib.leading_zeros())
    };
    let step = (below / 4).max(MEM_STEP_MIB);
    mib.div_ceil(step).saturating_mul(step)
}

/// Shares the kubelet gives a pod that requests no CPU (the kernel's
/// minimum): no request at all.
const MIN_SHARES: u64 = 2;
/// Shares per CPU.
const SHARES_PER_CPU: u64 = 1024;

/// An annotation that is not what containerd writes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("pod annotation {name}={value:?} is not {what}")]
pub struct SizingError {
    /// The annotation.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// What it should be.
    pub what: &'static str,
}

/// What a pod asks for, as its sandbox's annotations say.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// CPU period, µs.
    pub cpu_period: Option<u64>,
    /// CPU quota, µs per period (negative: no limit).
    pub cpu_quota: Option<i64>,
    /// CPU shares.
    pub cpu_shares: Option<u64>,
    /// Memory limit, bytes (0: none).
    pub memory: Option<u64>,
}

impl Ask {
    /// Reads the sandbox annotations of `spec`; a value that is not a
    /// number is an error naming it.
    pub fn from_spec(spec: &Spec) -> Result<Self, SizingError> {
        let annotations = spec.annotations().as_ref();
        let get = |name: &'static str| {
            annotations
                .and_then(|a| a.get(name))
                .map(|v| (name, v.trim()))
                .filter(|(_, v)| !v.is_empty())
        };
        fn number<T: std::str::FromStr>(
            (name, value): (&'static str, &str),
            what: &'static str,
        ) -> Result<T, SizingError> {
            value.parse().map_err(|_| SizingError {
                name,
                value: value.to_string(),
                what,
            })
        }
        Ok(Self {
            cpu_period: get(CPU_PERIOD)
                .map(|v| number(v, "a period in microseconds"))
                .transpose()?,
            cpu_quota: get(CPU_QUOTA)
                .map(|v| number(v, "a quota in microseconds"))
                .transpose()?,
            cpu_shares: get(CPU_SHARES)
                .map(|v| number(v, "a number of CPU shares"))
                .transpose()?,
            memory: get(MEMORY)
                .map(|v| number(v, "a memory limit in bytes"))
                .transpose()?,
        })
    }

    /// The vCPUs this asks for, if any.
    fn vcpus(&self) -> Option<u64> {
        match (self.cpu_quota, self.cpu_period) {
            (Some(quota), Some(period)) if quota > 0 && period > 0 => {
                return Some((quota as u64).div_ceil(period));
            }
            _ => {}
        }
        self.cpu_shares
            .filter(|&s| s > MIN_SHARES)
            .map(|s| s.div_ceil(SHARES_PER_CPU))
    }

    /// The memory this asks for, MiB (rounded up), if any.
    fn mem_mib(&self) -> Option<u64> {
        self.memory.filter(|&m| m > 0).map(|m| m.div_ceil(1 << 20))
    }
}

/// A pod VM's vCPUs and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub mem_mib: u64,
}

/// The shape of a pod that asks for `ask`, under `cfg`.
pub fn shape(cfg: &Config, ask: &Ask) -> Shape {
    let default = Shape {
        vcpus: cfg.vcpus,
        mem_mib: cfg.mem_mib,
    };
    if !cfg.pod_sizing {
        return default;
    }
    let vcpus = ask.vcpus().map_or(cfg.vcpus, |v| {
        u8::try_from(v.clamp(1, u64::from(cfg.max_vcpus))).unwrap_or(cfg.max_vcpus)
    });
    let mem_mib = ask.mem_mib().map_or(cfg.mem_mib, |m| {
        bucket_mib(m.saturating_add(cfg.pod_overhead_mib)).clamp(cfg.min_mem_mib, cfg.max_mem_mib)
    });
    Shape { vcpus, mem_mib }
}

/// `cfg` with the VM shape of the pod whose sandbox spec is `spec`.
pub fn sized(cfg: &Config, spec: &Spec) -> Result<Config, SizingError> {
    let s = shape(cfg, &Ask::from_spec(spec)?);
    let mut sized = cfg.clone();
    sized.vcpus = s.vcpus;
    sized.mem_mib = s.mem_mib;
    Ok(sized)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotations: &[(&str, &str)]) -> Spec {
        crate::sandbox::tests::spec(annotations, None)
    }

    fn shape_of(cfg: &Config, annotations: &[(&str, &str)]) -> Shape {
        let c = sized(cfg, &spec(annotations)).expect("sized");
        Shape {
            vcpus: c.vcpus,
            mem_mib: c.mem_mib,
        }
    }

    #[test]
    fn a_pod_gets_what_it_asks_for_plus_the_overhead() {
        let cfg = Config::default();
        // 2 CPUs (quota 200 ms per 100 ms), 512 MiB.
        let s = shape_of(
            &cfg,
            &[
                (CPU_PERIOD, "100000"),
                (CPU_QUOTA, "200000"),
                (CPU_SHARES, "2048"),
                (MEMORY, "536870912"),
            ],
        );
        assert_eq!(
            s,
            Shape {
                vcpus: 2,
                // 576 in the 512..1024 buckets (128 MiB apart).
                mem_mib: 640
            }
        );
        // 1.5 CPUs round up; memory rounds up to the step.
        let s = shape_of(
            &cfg,
            &[
                (CPU_PERIOD, "100000"),
                (CPU_QUOTA, "150000"),
                (MEMORY, &(100 * 1024 * 1024 + 1).to_string()),
            ],
        );
        assert_eq!(s.vcpus, 2);
        // 165 MiB: in the 128..256 buckets (32 MiB apart).
        assert_eq!(s.mem_mib, 192);
    }

    #[test]
    fn memory_buckets_are_few_and_never_a_quarter_over() {
        let mut shapes = std::collections::BTreeSet::new();
        for mib in 1..=16 * 1024 {
            let b = bucket_mib(mib);
            assert!(b >= mib && b % MEM_STEP_MIB == 0, "{mib} -> {b}");
            if mib >= 128 {
                assert!(b * 4 <= mib * 5 + 3 * MEM_STEP_MIB, "{mib} -> {b}");
                shapes.insert(b);
            }
        }
        assert_eq!(shapes.len(), 29, "{shapes:?}");
        assert_eq!(
            [100, 128, 129, 300, 320, 321, 576, 1000, 5000].map(bucket_mib),
            [128, 128, 160, 320, 320, 384, 640, 1024, 5120]
        );
    }

    #[test]
    fn requests_without_limits_size_by_shares() {
        let cfg = Config::default();
        // No quota (-1), 3 CPUs requested.
        let s = shape_of(
            &cfg,
            &[
                (CPU_PERIOD, "100000"),
                (CPU_QUOTA, "-1"),
                (CPU_SHARES, "3072"),
            ],
        );
        assert_eq!(s.vcpus, 3);
        assert_eq!(s.mem_mib, cfg.mem_mib, "no memory limit: the default");
        // 250m requested: one vCPU.
        assert_eq!(shape_of(&cfg, &[(CPU_SHARES, "256")]).vcpus, 1);
        // BestEffort (the kernel's minimum share): the default.
        assert_eq!(shape_of(&cfg, &[(CPU_SHARES, "2")]).vcpus, cfg.vcpus);
    }

    #[test]
    fn a_pod_that_asks_nothing_gets_the_defaults() {
        let cfg = Config::default();
        let default = Shape {
            vcpus: cfg.vcpus,
            mem_mib: cfg.mem_mib,
        };
        assert_eq!(shape_of(&cfg, &[]), default);
        assert_eq!(shape_of(&cfg, &[(MEMORY, "0"), (CPU_QUOTA, "0")]), default);
        // Sizing off: the defaults whatever the pod asks.
        let off = Config {
            pod_sizing: false,
            ..Config::default()
        };
        assert_eq!(
            shape_of(&off, &[(MEMORY, "1073741824"), (CPU_SHARES, "4096")]),
            default
        );
    }

    #[test]
    fn shapes_stay_within_the_bounds() {
        let cfg = Config {
            max_vcpus: 4,
            min_mem_mib: 160,
            max_mem_mib: 1024,
            ..Config::default()
        };
        let big = shape_of(
            &cfg,
            &[
                (CPU_PERIOD, "100000"),
                (CPU_QUOTA, "6400000"),
                (MEMORY, "68719476736"),
            ],
        );
        assert_eq!(
            big,
            Shape {
                vcpus: 4,
                mem_mib: 1024
            }
        );
        let small = shape_of(&cfg, &[(MEMORY, "1048576")]);
        assert_eq!(small.mem_mib, 160);
    }

    #[test]
    fn bad_values_are_errors_that_name_the_annotation() {
        let e = sized(&Config::default(), &spec(&[(MEMORY, "lots")])).expect_err("bad");
        assert_eq!(e.name, MEMORY);
        assert!(e.to_string().contains("\"lots\""), "{e}");
        assert!(sized(&Config::default(), &spec(&[(CPU_SHARES, "-5")])).is_err());
        assert!(sized(&Config::default(), &spec(&[(CPU_QUOTA, "1.5")])).is_err());
    }
}
