//! How a pod VM's host processes are launched: through `husk-jailer`.
//!
//! `husk-vmm` and `husk-virtiofsd` are the pod's footprint on the node: its
//! guest RAM, its vCPU time, the daemon's page cache. Kubernetes accounts
//! and limits a pod through its cgroup, so both processes must live in the
//! sandbox's cgroup from their first instruction (memory the VMM touches
//! before it moved would stay charged to containerd), with the pod's CPU
//! quota and memory bound, and the `oom_score_adj` its QoS class gives it
//! (not the shim's, which is containerd's: close to -1000).
//!
//! A multithreaded shim cannot safely join a cgroup between `fork` and
//! `exec` (it would allocate and open files in a child of a threaded
//! process), so it runs a small program in between, as Firecracker's
//! jailer does: `husk-jailer` joins the cgroup (creating it, through
//! libcgroups: cgroup v1, v2 and systemd), applies the limits, sets its
//! `oom_score_adj`, then `execv`s the program, which inherits all of it.
//! The shim removes the cgroup when the VM is gone (killing whatever is
//! left in it).
//!
//! The command line between them is typed ([`Jail`]): built by the shim,
//! parsed by the jailer, and tested for a round trip here.

use std::{
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
};

use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResources, LinuxResourcesBuilder,
};
use serde::{Deserialize, Serialize};

/// What a jailed launch can get wrong.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The jailer's command line is not one the shim writes.
    #[error("husk-jailer: {0}")]
    Usage(String),
    /// A cgroup path that is not one husk places a pod in.
    #[error("cgroup path {0:?}: {1}")]
    Path(String, &'static str),
    /// The cgroup could not be made, joined or limited.
    #[error("cgroup {path}: {what}: {detail}")]
    Cgroup {
        /// The cgroup path.
        path: String,
        /// The step that failed.
        what: &'static str,
        /// The cause.
        detail: String,
    },
    /// A file of the process could not be written.
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
}

/// Where a pod's host processes are accounted: a cgroup path as the OCI
/// spec's `cgroupsPath` gives it, and the driver it is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// A cgroupfs path (`/kubepods/burstable/pod<uid>/<id>`) or a systemd
    /// one (`<slice>:<prefix>:<name>`).
    pub path: String,
    /// Whether `path` is a systemd one (made through systemd's D-Bus API).
    pub systemd: bool,
}

impl Placement {
    /// The cgroup of sandbox `id` (in containerd `namespace`) whose spec
    /// names `spec_path` (its `linux.cgroupsPath`, set by containerd from
    /// CRI's `cgroup_parent`, and by `ctr` as `/<namespace>/<id>`): that
    /// path, else `<parent>/<namespace>-<id>`. A systemd path has the form
    /// `slice:prefix:name` (what containerd writes with `SystemdCgroup`);
    /// a relative cgroupfs path is taken below `parent`.
    pub fn for_sandbox(
        spec_path: Option<&str>,
        parent: &str,
        namespace: &str,
        id: &str,
    ) -> Result<Self, JailError> {
        let path = match spec_path.filter(|p| !p.is_empty()) {
            Some(p) if is_systemd(p) => {
                return Ok(Self {
                    path: p.to_string(),
                    systemd: true,
                })
            }
            Some(p) if p.starts_with('/') => p.to_string(),
            Some(p) => format!("{}/{p}", parent.trim_end_matches('/')),
            None => format!("{}/{namespace}-{id}", parent.trim_end_matches('/')),
        };
        let bad = |why| Err(JailError::Path(path.clone(), why));
        if !path.starts_with('/') {
            return bad("is not absolute");
        }
        if path.split('/').any(|c| c == "." || c == "..") {
            return bad("has `.` or `..` components");
        }
        if Path::new(&path).components().count() < 2 {
            return bad("is the root cgroup");
        }
        Ok(Self {
            path,
            systemd: false,
        })
    }

    fn manager(&self) -> Result<libcgroups::common::AnyCgroupManager, JailError> {
        libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path: PathBuf::from(&self.path),
            systemd_cgroup: self.systemd,
            container_name: self.path.rsplit([':', '/']).next().unwrap_or("").into(),
        })
        .map_err(|e| self.error("finding the cgroup driver", e))
    }

    fn error(&self, what: &'static str, e: impl std::fmt::Display) -> JailError {
        JailError::Cgroup {
            path: self.path.clone(),
            what,
            detail: e.to_string(),
        }
    }

    /// Moves the calling process into the cgroup (made if needed) and
    /// applies `resources` to it.
    pub fn join(&self, resources: &LinuxResources) -> Result<(), JailError> {
        use libcgroups::common::{CgroupManager, ControllerOpt};
        let m = self.manager()?;
        m.add_task(nix::unistd::getpid())
            .map_err(|e| self.error("joining", e))?;
        m.apply(&ControllerOpt {
            resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(|e| self.error("applying the pod's limits", e))
    }

    /// Kills whatever is left in the cgroup and removes it; nothing to do
    /// if it is gone.
    pub fn remove(&self) -> Result<(), JailError> {
        use libcgroups::common::CgroupManager;
        self.manager()?
            .remove()
            .map_err(|e| self.error("removing", e))
    }
}

/// Whether `p` is a systemd cgroup path: `slice:prefix:name`, no `/`.
fn is_systemd(p: &str) -> bool {
    !p.contains('/') && p.split(':').count() == 3
}

/// The host limits of a pod VM: its CPU quota (the pod's CPU limit, so
/// the vCPUs and the VMM's own threads get no more than runc's containers
/// would) and its memory (the guest's RAM plus `host_overhead_mib` for
/// husk-vmm, husk-virtiofsd, their page cache and the kernel's KVM
/// structures), each only when the pod has such a limit.
pub fn pod_limits(
    cpu: Option<(i64, u64)>,
    guest_mem_mib: Option<u64>,
    host_overhead_mib: u64,
) -> LinuxResources {
    let mut r = LinuxResourcesBuilder::default();
    if let Some((quota, period)) = cpu.filter(|&(q, p)| q > 0 && p > 0) {
        if let Ok(c) = LinuxCpuBuilder::default()
            .quota(quota)
            .period(period)
            .build()
        {
            r = r.cpu(c);
        }
    }
    if let Some(mib) = guest_mem_mib {
        let bytes = (mib.saturating_add(host_overhead_mib)).saturating_mul(1 << 20);
        if let Ok(m) = LinuxMemoryBuilder::default()
            .limit(i64::try_from(bytes).unwrap_or(i64::MAX))
            .build()
        {
            r = r.memory(m);
        }
    }
    r.build().unwrap_or_default()
}

/// One jailed launch: what `husk-jailer` does before it becomes `program`.
#[derive(Debug, Clone, PartialEq)]
pub struct Jail {
    /// The cgroup to join, and its limits.
    pub cgroup: Option<(Placement, LinuxResources)>,
    /// The process's `oom_score_adj`.
    pub oom_score_adj: Option<i32>,
    /// The program to run (absolute).
    pub program: PathBuf,
    /// Its arguments (after `argv[0]`).
    pub args: Vec<OsString>,
}

impl Jail {
    /// A launch of `program` with `args`, nothing applied yet.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            cgroup: None,
            oom_score_adj: None,
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// The jailer's arguments for this launch.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        if let Some((place, resources)) = &self.cgroup {
            a.push("--cgroup".into());
            a.push(place.path.clone().into());
            if place.systemd {
                a.push("--systemd".into());
            }
            a.push("--resources".into());
            a.push(
                serde_json::to_string(resources)
                    .unwrap_or_else(|_| "{}".into())
                    .into(),
            );
        }
        if let Some(adj) = self.oom_score_adj {
            a.push("--oom-score-adj".into());
            a.push(adj.to_string().into());
        }
        a.push("--".into());
        a.push(self.program.clone().into());
        a.extend(self.args.iter().cloned());
        a
    }

    /// Parses the jailer's arguments (without `argv[0]`).
    pub fn parse(args: &[OsString]) -> Result<Self, JailError> {
        let usage = |m: String| JailError::Usage(m);
        let mut path: Option<String> = None;
        let mut systemd = false;
        let mut resources: Option<LinuxResources> = None;
        let mut oom_score_adj = None;
        let mut it = args.iter();
        let text = |v: Option<&OsString>, flag: &str| -> Result<String, JailError> {
            v.and_then(|v| v.to_str())
                .map(str::to_string)
                .ok_or_else(|| usage(format!("{flag} wants a UTF-8 value")))
        };
        loop {
            let Some(arg) = it.next() else {
                return Err(usage("no `-- PROGRAM` given".into()));
            };
            match arg.to_str() {
                Some("--cgroup") => path = Some(text(it.next(), "--cgroup")?),
                Some("--systemd") => systemd = true,
                Some("--resources") => {
                    let json = text(it.next(), "--resources")?;
                    resources = Some(
                        serde_json::from_str(&json)
                            .map_err(|e| usage(format!("--resources: {e}")))?,
                    );
                }
                Some("--oom-score-adj") => {
                    let v: i32 = text(it.next(), "--oom-score-adj")?
                        .parse()
                        .map_err(|e| usage(format!("--oom-score-adj: {e}")))?;
                    if !(-1000..=1000).contains(&v) {
                        return Err(usage(format!("--oom-score-adj {v} is not -1000..1000")));
                    }
                    oom_score_adj = Some(v);
                }
                Some("--") => break,
                _ => return Err(usage(format!("unknown argument {arg:?}"))),
            }
        }
        let program = PathBuf::from(
            it.next()
                .ok_or_else(|| usage("no program after `--`".into()))?,
        );
        if !program.is_absolute() {
            return Err(usage(format!("program {program:?} is not absolute")));
        }
        let cgroup = match (path, resources) {
            (Some(path), r) => Some((Placement { path, systemd }, r.unwrap_or_default())),
            (None, None) if !systemd => None,
            _ => return Err(usage("--systemd and --resources want --cgroup".into())),
        };
        Ok(Self {
            cgroup,
            oom_score_adj,
            program,
            args: it.cloned().collect(),
        })
    }

    /// Applies the launch to the calling process and becomes `program`;
    /// returns only on failure.
    pub fn enter(&self) -> JailError {
        if let Some((place, resources)) = &self.cgroup {
            if let Err(e) = place.join(resources) {
                return e;
            }
        }
        if let Some(adj) = self.oom_score_adj {
            if let Err(e) = set_oom_score_adj("self", adj) {
                return e;
            }
        }
        let err = exec(&self.program, &self.args);
        JailError::Io("executing the program", err)
    }
}

/// Writes `adj` as the `oom_score_adj` of process `pid` (`"self"` or a
/// number).
pub fn set_oom_score_adj(pid: &str, adj: i32) -> Result<(), JailError> {
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), adj.to_string())
        .map_err(|e| JailError::Io("writing oom_score_adj", e))
}

fn exec(program: &Path, args: &[OsString]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(program)
        .arg0(program.file_name().unwrap_or(OsStr::new("")))
        .args(args)
        .exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launch_survives_its_command_line() {
        let mut j = Jail::new("/usr/local/bin/husk-vmm");
        j.args = vec!["--vcpus".into(), "2".into(), "--".into(), "x y".into()];
        j.oom_score_adj = Some(-997);
        j.cgroup = Some((
            Placement {
                path: "/kubepods/pod1/abc".into(),
                systemd: false,
            },
            pod_limits(Some((50_000, 100_000)), Some(256), 64),
        ));
        assert_eq!(Jail::parse(&j.to_args()).expect("parse"), j);

        let mut plain = Jail::new("/bin/true");
        assert_eq!(Jail::parse(&plain.to_args()).expect("parse"), plain);
        plain.cgroup = Some((
            Placement {
                path: "kubepods.slice:cri-containerd:abc".into(),
                systemd: true,
            },
            LinuxResources::default(),
        ));
        assert_eq!(Jail::parse(&plain.to_args()).expect("parse"), plain);
    }

    #[test]
    fn bad_jailer_arguments_are_refused_by_name() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        for (a, want) in [
            (&["/bin/true"][..], "unknown argument"),
            (&["--", "true"], "not absolute"),
            (&["--"], "no program"),
            (&["--cgroup", "/a"], "no `-- PROGRAM`"),
            (&["--oom-score-adj", "2000", "--", "/x"], "not -1000..1000"),
            (&["--resources", "{", "--", "/x"], "--resources"),
            (&["--systemd", "--", "/x"], "want --cgroup"),
        ] {
            let e = Jail::parse(&args(a)).expect_err(want).to_string();
            assert!(e.contains(want), "{a:?}: {e}");
        }
    }

    #[test]
    fn a_sandbox_is_placed_where_its_spec_says() {
        let place = |p: Option<&str>| Placement::for_sandbox(p, "/husk", "k8s.io", "abc");
        let fs = |p: &str| Placement {
            path: p.into(),
            systemd: false,
        };
        assert_eq!(
            place(Some("/kubepods/besteffort/pod1/abc")).expect("fs"),
            fs("/kubepods/besteffort/pod1/abc")
        );
        assert_eq!(
            place(Some("kubepods-pod1.slice:cri-containerd:abc")).expect("systemd"),
            Placement {
                path: "kubepods-pod1.slice:cri-containerd:abc".into(),
                systemd: true
            }
        );
        assert_eq!(place(None).expect("none"), fs("/husk/k8s.io-abc"));
        assert_eq!(place(Some("")).expect("empty"), fs("/husk/k8s.io-abc"));
        assert_eq!(
            place(Some("pods/abc")).expect("relative"),
            fs("/husk/pods/abc")
        );
        for bad in ["/a/../b", "/", "/a/./b"] {
            let e = place(Some(bad)).expect_err(bad).to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn limits_follow_the_pod() {
        let r = pod_limits(Some((50_000, 100_000)), Some(320), 64);
        let cpu = r.cpu().as_ref().expect("cpu");
        assert_eq!((cpu.quota(), cpu.period()), (Some(50_000), Some(100_000)));
        assert_eq!(r.memory().as_ref().and_then(|m| m.limit()), Some(384 << 20));
        // No limits asked: none set (kubelet's pod cgroup still bounds it).
        let none = pod_limits(Some((-1, 100_000)), None, 64);
        assert!(none.cpu().is_none() && none.memory().is_none());
    }
}
