//! A container's cgroup (v2) as the agent reads it: resource usage for the
//! shim's Stats, its processes for Pids, and the OOM kill counter behind
//! TaskOOM events.
//!
//! Why not libcgroups' `stats()`: it fails as a whole when a single file is
//! missing — the PSI files need `CONFIG_PSI`, which the guest kernel leaves
//! out, and a controller that is not enabled has no files — and it would
//! run inside PID 1. Here every file is optional (what the kernel does not
//! provide reads as zero), parsing never panics, and only plain reads of a
//! handful of small files happen, so no helper process is needed and a
//! Stats call stays cheap even where guest kernel code is slow.

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Component, Path, PathBuf},
    time::Duration,
};

use husk_protocols::agent::{
    CpuStats, IoDeviceStats, MemoryStats, PidsStats, StatsContainerResponse,
};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::{io::unix::AsyncFd, sync::mpsc};

/// Where the guest's cgroup2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// What "max" (no limit) reads as.
pub const UNLIMITED: u64 = u64::MAX;

/// The directory of a container's cgroup, from its path in the hierarchy
/// (the OCI spec's `cgroupsPath` as the runtime resolved it). Refuses paths
/// that would leave the hierarchy.
pub fn cgroup_dir(cgroup_path: &str) -> Result<PathBuf, String> {
    let rel = Path::new(cgroup_path);
    let mut dir = PathBuf::from(CGROUP_ROOT);
    for c in rel.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => dir.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("cgroup path {cgroup_path:?} leaves {CGROUP_ROOT}"))
            }
        }
    }
    if dir == Path::new(CGROUP_ROOT) {
        return Err(format!("cgroup path {cgroup_path:?} is the root cgroup"));
    }
    Ok(dir)
}

/// Removes the cgroup at `dir` (without children) once its processes are
/// gone: kills what is left in it (`cgroup.kill`) and retries while the
/// kernel still counts them, for up to `within`. A cgroup that does not
/// exist is fine; one that stays is logged.
pub async fn remove(dir: &Path, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if std::time::Instant::now() >= deadline {
                    tracing::warn!(cgroup = %dir.display(), "still in use after {within:?}; left behind");
                    return;
                }
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                tracing::warn!(cgroup = %dir.display(), "removing: {e}");
                return;
            }
        }
    }
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

/// A single-value file (`memory.current`, `pids.max`): "max" is
/// [`UNLIMITED`]; an empty or unreadable file is 0.
fn single(text: &str) -> u64 {
    match text.trim() {
        "max" => UNLIMITED,
        v => v.parse().unwrap_or(0),
    }
}

/// A flat keyed file (`cpu.stat`, `memory.stat`, `memory.events`): one
/// "key value" pair per line. Lines that do not parse are skipped.
fn flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_ascii_whitespace();
            let (k, v) = (it.next()?, it.next()?);
            Some((k.to_string(), single(v)))
        })
        .collect()
}

/// `io.stat`: "MAJ:MIN rbytes=N wbytes=N rios=N wios=N ..." per device.
fn io_stat(text: &str) -> Vec<IoDeviceStats> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_ascii_whitespace();
            let (major, minor) = it.next()?.split_once(':')?;
            let mut d = IoDeviceStats::new();
            d.major = major.parse().ok()?;
            d.minor = minor.parse().ok()?;
            for kv in it {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => d.read_bytes = v,
                    "wbytes" => d.write_bytes = v,
                    "rios" => d.read_ios = v,
                    "wios" => d.write_ios = v,
                    _ => {}
                }
            }
            Some(d)
        })
        .collect()
}

/// Resource usage of the cgroup at `dir`.
pub fn stats(dir: &Path) -> StatsContainerResponse {
    let cpu_stat = flat_keyed(&read(dir, "cpu.stat"));
    let get = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let mut cpu = CpuStats::new();
    cpu.usage_usec = get(&cpu_stat, "usage_usec");
    cpu.user_usec = get(&cpu_stat, "user_usec");
    cpu.system_usec = get(&cpu_stat, "system_usec");
    cpu.nr_periods = get(&cpu_stat, "nr_periods");
    cpu.nr_throttled = get(&cpu_stat, "nr_throttled");
    cpu.throttled_usec = get(&cpu_stat, "throttled_usec");

    let events = flat_keyed(&read(dir, "memory.events"));
    let mut memory = MemoryStats::new();
    memory.usage = single(&read(dir, "memory.current"));
    memory.limit = limit(&read(dir, "memory.max"));
    memory.swap_usage = single(&read(dir, "memory.swap.current"));
    memory.swap_limit = limit(&read(dir, "memory.swap.max"));
    memory.stat = flat_keyed(&read(dir, "memory.stat"));
    memory.max_events = get(&events, "max");
    memory.oom_events = get(&events, "oom");
    memory.oom_kill_events = get(&events, "oom_kill");

    let mut pids = PidsStats::new();
    pids.current = single(&read(dir, "pids.current"));
    pids.limit = limit(&read(dir, "pids.max"));

    let mut s = StatsContainerResponse::new();
    s.cpu = Some(cpu).into();
    s.memory = Some(memory).into();
    s.pids = Some(pids).into();
    s.io = io_stat(&read(dir, "io.stat"));
    s
}

/// A limit file: missing (controller not enabled) means no limit.
fn limit(text: &str) -> u64 {
    if text.trim().is_empty() {
        UNLIMITED
    } else {
        single(text)
    }
}

/// Every pid in the cgroup at `dir` and its sub-cgroups, sorted.
pub fn pids(dir: &Path) -> Result<Vec<u32>, String> {
    let mut pids = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let procs = d.join("cgroup.procs");
        let text = std::fs::read_to_string(&procs)
            .map_err(|e| format!("reading {}: {e}", procs.display()))?;
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        if let Ok(rd) = std::fs::read_dir(&d) {
            dirs.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// How many processes of the cgroup at `dir` the OOM killer has killed.
pub fn oom_kills(dir: &Path) -> u64 {
    flat_keyed(&read(dir, "memory.events"))
        .get("oom_kill")
        .copied()
        .unwrap_or(0)
}

/// An inotify instance tokio can poll.
struct Watch(Inotify);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Watches the cgroup at `dir` of container `id` and sends `id` to `tx`
/// for every OOM kill in it, until the cgroup goes away (the container is
/// deleted) or the receiver does. The kernel notifies a modification of
/// `memory.events` whenever one of its counters changes.
pub async fn watch_oom(id: String, dir: PathBuf, tx: mpsc::Sender<String>) {
    let events = dir.join("memory.events");
    let watch = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .and_then(|i| i.add_watch(&events, AddWatchFlags::IN_MODIFY).map(|_| i))
    {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(container = %id, "no OOM events: watching {}: {e}", events.display());
            return;
        }
    };
    // SAFETY: the Inotify owns its descriptor and keeps it open, unchanged,
    // for as long as the AsyncFd owns the Inotify.
    let fd = match unsafe { AsyncFd::register(Watch(watch)) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(container = %id, "no OOM events: {e}");
            return;
        }
    };
    let mut seen = oom_kills(&dir);
    loop {
        let mut ready = match fd.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(container = %id, "OOM watch ended: {e}");
                return;
            }
        };
        let evs = match ready.get_inner().0.read_events() {
            Ok(evs) => evs,
            Err(nix::errno::Errno::EAGAIN) => {
                ready.clear_ready();
                continue;
            }
            Err(e) => {
                tracing::warn!(container = %id, "OOM watch ended: {e}");
                return;
            }
        };
        if evs
            .iter()
            .any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED))
        {
            // The file is gone: the cgroup was removed.
            return;
        }
        let now = oom_kills(&dir);
        for _ in seen..now {
            tracing::info!(container = %id, "OOM kill");
            match tx.try_send(id.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(container = %id, "OOM event queue full; event dropped");
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        seen = seen.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_dirs_stay_in_the_hierarchy() {
        assert_eq!(
            cgroup_dir("/husk-e2e/c1").expect("ok"),
            Path::new("/sys/fs/cgroup/husk-e2e/c1")
        );
        assert_eq!(
            cgroup_dir("pod/./c1").expect("ok"),
            Path::new("/sys/fs/cgroup/pod/c1")
        );
        assert!(cgroup_dir("/a/../../etc").is_err());
        assert!(cgroup_dir("/").is_err());
        assert!(cgroup_dir("").is_err());
    }

    #[test]
    fn parses_cgroup_files_and_tolerates_garbage() {
        assert_eq!(single("max\n"), UNLIMITED);
        assert_eq!(single("123\n"), 123);
        assert_eq!(single(""), 0);
        assert_eq!(single("bogus"), 0);
        assert_eq!(limit(""), UNLIMITED);
        let m = flat_keyed("usage_usec 10\nuser_usec 7\n\nodd\nsystem_usec x\n");
        assert_eq!(m.get("usage_usec"), Some(&10));
        assert_eq!(m.get("user_usec"), Some(&7));
        assert_eq!(m.get("system_usec"), Some(&0));
        assert!(!m.contains_key("odd"));
        let io = io_stat("254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\nbad\n8:x\n");
        assert_eq!(io.len(), 1);
        assert_eq!((io[0].major, io[0].minor), (254, 0));
        assert_eq!((io[0].read_bytes, io[0].write_bytes), (4096, 8192));
        assert_eq!((io[0].read_ios, io[0].write_ios), (1, 2));
    }

    #[test]
    fn reads_a_cgroup_directory() {
        let dir = std::env::temp_dir().join(format!("husk-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for (f, t) in [
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
            ),
            ("memory.current", "4096\n"),
            ("memory.max", "16777216\n"),
            ("memory.stat", "anon 2048\nfile 1024\ninactive_file 512\n"),
            ("memory.events", "low 0\nhigh 0\nmax 3\noom 4\noom_kill 1\n"),
            ("pids.current", "2\n"),
            ("pids.max", "max\n"),
        ] {
            std::fs::write(dir.join(f), t).expect("write");
        }
        let s = stats(&dir);
        assert_eq!(s.cpu.usage_usec, 1500);
        assert_eq!(s.cpu.system_usec, 500);
        assert_eq!(s.memory.usage, 4096);
        assert_eq!(s.memory.limit, 16 << 20);
        assert_eq!(s.memory.swap_limit, UNLIMITED, "no swap controller files");
        assert_eq!(s.memory.stat.get("inactive_file"), Some(&512));
        // Every counter differs, so a mixed-up key shows.
        assert_eq!(
            (
                s.memory.max_events,
                s.memory.oom_events,
                s.memory.oom_kill_events
            ),
            (3, 4, 1)
        );
        assert_eq!((s.pids.current, s.pids.limit), (2, UNLIMITED));
        assert!(s.io.is_empty());
        assert_eq!(oom_kills(&dir), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pids_include_sub_cgroups() {
        let dir = std::env::temp_dir().join(format!("husk-cg-pids-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("dir");
        std::fs::write(dir.join("cgroup.procs"), "12\n3\n").expect("write");
        std::fs::write(dir.join("sub/cgroup.procs"), "7\n").expect("write");
        assert_eq!(pids(&dir).expect("pids"), [3, 7, 12]);
        assert!(pids(&dir.join("gone")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn oom_kills_are_reported_as_memory_events_changes() {
        let dir = std::env::temp_dir().join(format!("husk-cg-oom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let events = dir.join("memory.events");
        std::fs::write(&events, "oom 0\noom_kill 0\n").expect("write");
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(watch_oom("c1".into(), dir.clone(), tx));
        // Let the watch be set up before the first change.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        std::fs::write(&events, "oom 1\noom_kill 0\n").expect("write");
        // `oom` counts every time the limit was hit, `oom_kill` only the
        // kills: five of one and two of the other tell them apart.
        std::fs::write(&events, "oom 5\noom_kill 2\n").expect("write");
        for _ in 0..2 {
            let id = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .expect("an OOM event in time");
            assert_eq!(id.as_deref(), Some("c1"));
        }
        std::fs::remove_file(&events).expect("remove");
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the watch ends when the cgroup goes")
            .expect("task");
        assert!(rx.try_recv().is_err(), "no event without an OOM kill");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn remove_takes_an_empty_cgroup_and_leaves_anything_else() {
        let dir = std::env::temp_dir().join(format!("husk-cg-rm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        remove(&dir, Duration::from_secs(1)).await;
        assert!(!dir.exists(), "an empty one goes");
        remove(&dir, Duration::from_secs(1)).await;
        // Not a cgroup with processes but a directory with files: not
        // EBUSY, so it is not retried or emptied, only logged.
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("keep"), "x").expect("write");
        let since = std::time::Instant::now();
        remove(&dir, Duration::from_secs(5)).await;
        assert!(since.elapsed() < Duration::from_secs(1));
        assert!(dir.join("keep").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
