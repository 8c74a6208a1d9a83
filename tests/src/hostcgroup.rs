//! The host's cgroups as the tests read them: which cgroup a process is
//! in, a cgroup's CPU quota, memory limit, CPU time and memory peak,
//! whether it exists; on cgroup v1 (one hierarchy per controller, as on
//! the CI machines) and v2 (one unified hierarchy).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

const ROOT: &str = "/sys/fs/cgroup";

/// Whether the host runs cgroup v2 only.
pub fn unified() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// The cgroup path of process `pid` per controller (`cpu`, `memory`,
/// `cpuacct`, ...; on v2 every controller maps to the one path).
pub fn of_process(pid: i32) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if unified() {
            if controllers.is_empty() {
                for c in ["cpu", "cpuacct", "memory", "pids"] {
                    out.insert(c.to_string(), path.to_string());
                }
            }
        } else {
            for c in controllers.split(',').filter(|c| !c.is_empty()) {
                out.insert(c.to_string(), path.to_string());
            }
        }
    }
    Ok(out)
}

/// The directory of cgroup `path` in `controller`'s hierarchy.
fn dir(controller: &str, path: &str) -> PathBuf {
    let rel = path.trim_start_matches('/');
    if unified() {
        Path::new(ROOT).join(rel)
    } else {
        Path::new(ROOT).join(controller).join(rel)
    }
}

fn read(controller: &str, path: &str, v1: &str, v2: &str) -> Result<String> {
    let file = dir(controller, path).join(if unified() { v2 } else { v1 });
    Ok(std::fs::read_to_string(&file)
        .with_context(|| format!("reading {}", file.display()))?
        .trim()
        .to_string())
}

/// The CPU quota and period of cgroup `path` (µs; quota None: no limit).
pub fn cpu_max(path: &str) -> Result<(Option<u64>, u64)> {
    if unified() {
        let text = read("cpu", path, "", "cpu.max")?;
        let mut w = text.split_whitespace();
        let quota = w.next().and_then(|q| q.parse().ok());
        let period = w.next().context("cpu.max has no period")?.parse()?;
        Ok((quota, period))
    } else {
        let quota: i64 = read("cpu", path, "cpu.cfs_quota_us", "")?.parse()?;
        let period = read("cpu", path, "cpu.cfs_period_us", "")?.parse()?;
        Ok((u64::try_from(quota).ok(), period))
    }
}

/// The memory limit of cgroup `path`, bytes (None: no limit).
pub fn memory_max(path: &str) -> Result<Option<u64>> {
    let text = read("memory", path, "memory.limit_in_bytes", "memory.max")?;
    // v1 writes "no limit" as the largest page-aligned i64.
    Ok(text.parse::<u64>().ok().filter(|&b| b < 1 << 62))
}

/// The memory cgroup `path` is charged now, bytes.
pub fn memory_usage(path: &str) -> Result<u64> {
    Ok(read("memory", path, "memory.usage_in_bytes", "memory.current")?.parse()?)
}

/// The most memory cgroup `path` was ever charged, bytes.
pub fn memory_peak(path: &str) -> Result<u64> {
    Ok(read("memory", path, "memory.max_usage_in_bytes", "memory.peak")?.parse()?)
}

/// The CPU time cgroup `path` used so far, nanoseconds.
pub fn cpu_usage_ns(path: &str) -> Result<u64> {
    if unified() {
        let stat = read("cpu", path, "", "cpu.stat")?;
        let usec: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .context("cpu.stat has no usage_usec")?
            .parse()?;
        Ok(usec * 1000)
    } else {
        Ok(read("cpuacct", path, "cpuacct.usage", "")?.parse()?)
    }
}

/// Whether cgroup `path` exists in any hierarchy.
pub fn exists(path: &str) -> bool {
    ["cpu", "cpuacct", "memory", "pids"]
        .iter()
        .any(|c| dir(c, path).exists())
}

/// Removes cgroup `path` and every cgroup below it (deepest first) in
/// every hierarchy; an error if one cannot go (a process still in it).
pub fn remove_tree(path: &str) -> Result<()> {
    let hierarchies: Vec<PathBuf> = if unified() {
        vec![PathBuf::from(ROOT)]
    } else {
        std::fs::read_dir(ROOT)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && !p.ends_with("unified"))
            .collect()
    };
    let mut failed = Vec::new();
    for h in hierarchies {
        let top = h.join(path.trim_start_matches('/'));
        if !top.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        collect_dirs(&top, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            if let Err(e) = std::fs::remove_dir(&d) {
                failed.push(format!("{}: {e}", d.display()));
            }
        }
    }
    if !failed.is_empty() {
        bail!("cgroups left: {failed:?}");
    }
    Ok(())
}

fn collect_dirs(d: &Path, out: &mut Vec<PathBuf>) {
    out.push(d.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(d) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                collect_dirs(&p, out);
            }
        }
    }
}
