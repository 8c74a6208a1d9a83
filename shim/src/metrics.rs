//! Container metrics in the form containerd expects from a shim's Stats.
//!
//! The agent reads the container's cgroup v2 files in the guest; containerd
//! 1.6 (`ctr task metrics`, the CRI plugin's container stats) decodes
//! either `io.containerd.cgroups.v1.Metrics` or `...v2.Metrics`, and only
//! the v1 message ships with containerd-shim-protos, so the guest's
//! numbers are mapped onto v1's fields here — as Kata's shim does. The
//! mapping keeps v1's meaning: times in nanoseconds, `swap` is memory plus
//! swap, no pid limit is 0, no memory limit is a value above 2^62 (the
//! CRI plugin's test for "unlimited"), and the `total_*` fields equal the
//! plain ones because every cgroup v2 counter already covers sub-cgroups.

use containerd_shim::protos::cgroups::metrics::{
    BlkIOEntry, BlkIOStat, CPUStat, CPUUsage, MemoryEntry, MemoryOomControl, MemoryStat, Metrics,
    PidsStat, Throttle,
};
use husk_protocols::agent::StatsContainerResponse;

/// What the agent reports for "no limit".
const UNLIMITED: u64 = u64::MAX;

/// containerd's v1 Metrics for the guest's cgroup statistics.
pub fn v1_metrics(s: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();

    let mut pids = PidsStat::new();
    pids.current = s.pids.current;
    pids.limit = if s.pids.limit == UNLIMITED {
        0
    } else {
        s.pids.limit
    };
    m.pids = Some(pids).into();

    let usec = |v: u64| v.saturating_mul(1000);
    let mut usage = CPUUsage::new();
    usage.total = usec(s.cpu.usage_usec);
    usage.kernel = usec(s.cpu.system_usec);
    usage.user = usec(s.cpu.user_usec);
    let mut throttling = Throttle::new();
    throttling.periods = s.cpu.nr_periods;
    throttling.throttled_periods = s.cpu.nr_throttled;
    throttling.throttled_time = usec(s.cpu.throttled_usec);
    let mut cpu = CPUStat::new();
    cpu.usage = Some(usage).into();
    cpu.throttling = Some(throttling).into();
    m.cpu = Some(cpu).into();

    m.memory = Some(memory(s)).into();

    let mut oom = MemoryOomControl::new();
    oom.oom_kill = s.memory.oom_kill_events;
    m.memory_oom_control = Some(oom).into();

    let entry = |d: &husk_protocols::agent::IoDeviceStats, op: &str, value: u64| {
        let mut e = BlkIOEntry::new();
        e.op = op.into();
        e.major = d.major.into();
        e.minor = d.minor.into();
        e.value = value;
        e
    };
    let mut blkio = BlkIOStat::new();
    for d in &s.io {
        blkio.io_service_bytes_recursive.extend([
            entry(d, "Read", d.read_bytes),
            entry(d, "Write", d.write_bytes),
        ]);
        blkio
            .io_serviced_recursive
            .extend([entry(d, "Read", d.read_ios), entry(d, "Write", d.write_ios)]);
    }
    m.blkio = Some(blkio).into();
    m
}

fn memory(s: &StatsContainerResponse) -> MemoryStat {
    let mem = &s.memory;
    let stat = |k: &str| mem.stat.get(k).copied().unwrap_or(0);
    let mut m = MemoryStat::new();
    m.cache = stat("file");
    m.rss = stat("anon");
    m.rss_huge = stat("anon_thp");
    m.mapped_file = stat("file_mapped");
    m.dirty = stat("file_dirty");
    m.writeback = stat("file_writeback");
    m.pg_fault = stat("pgfault");
    m.pg_maj_fault = stat("pgmajfault");
    m.inactive_anon = stat("inactive_anon");
    m.active_anon = stat("active_anon");
    m.inactive_file = stat("inactive_file");
    m.active_file = stat("active_file");
    m.unevictable = stat("unevictable");
    m.hierarchical_memory_limit = mem.limit;
    let memsw_limit = if mem.limit == UNLIMITED || mem.swap_limit == UNLIMITED {
        UNLIMITED
    } else {
        mem.limit.saturating_add(mem.swap_limit)
    };
    m.hierarchical_swap_limit = memsw_limit;

    m.total_cache = m.cache;
    m.total_rss = m.rss;
    m.total_rss_huge = m.rss_huge;
    m.total_mapped_file = m.mapped_file;
    m.total_dirty = m.dirty;
    m.total_writeback = m.writeback;
    m.total_pg_fault = m.pg_fault;
    m.total_pg_maj_fault = m.pg_maj_fault;
    m.total_inactive_anon = m.inactive_anon;
    m.total_active_anon = m.active_anon;
    m.total_inactive_file = m.inactive_file;
    m.total_active_file = m.active_file;
    m.total_unevictable = m.unevictable;

    let mut usage = MemoryEntry::new();
    usage.usage = mem.usage;
    usage.limit = mem.limit;
    usage.failcnt = mem.max_events;
    m.usage = Some(usage).into();

    let mut swap = MemoryEntry::new();
    swap.usage = mem.usage.saturating_add(mem.swap_usage);
    swap.limit = memsw_limit;
    m.swap = Some(swap).into();

    // Newer kernels sum it up as "kernel"; 6.1 lists the parts.
    let kernel = mem.stat.get("kernel").copied().unwrap_or_else(|| {
        ["kernel_stack", "pagetables", "percpu", "sock", "slab"]
            .iter()
            .map(|k| stat(k))
            .fold(0u64, u64::saturating_add)
    });
    let mut k = MemoryEntry::new();
    k.usage = kernel;
    m.kernel = Some(k).into();
    m
}

#[cfg(test)]
mod tests {
    use husk_protocols::agent::{CpuStats, IoDeviceStats, MemoryStats, PidsStats};

    use super::*;

    fn sample() -> StatsContainerResponse {
        let mut cpu = CpuStats::new();
        cpu.usage_usec = 1500;
        cpu.user_usec = 1000;
        cpu.system_usec = 500;
        cpu.nr_periods = 7;
        cpu.nr_throttled = 2;
        cpu.throttled_usec = 30;
        let mut memory = MemoryStats::new();
        memory.usage = 8 << 20;
        memory.limit = 16 << 20;
        memory.swap_usage = 0;
        memory.swap_limit = UNLIMITED;
        memory.max_events = 4;
        memory.oom_kill_events = 1;
        for (k, v) in [
            ("anon", 5 << 20),
            ("file", 3 << 20),
            ("inactive_file", 1 << 20),
            ("slab", 4096),
            ("kernel_stack", 8192),
        ] {
            memory.stat.insert(k.into(), v);
        }
        let mut pids = PidsStats::new();
        pids.current = 3;
        pids.limit = UNLIMITED;
        let mut io = IoDeviceStats::new();
        io.major = 254;
        io.minor = 1;
        io.read_bytes = 100;
        io.write_bytes = 200;
        io.read_ios = 1;
        io.write_ios = 2;
        let mut s = StatsContainerResponse::new();
        s.cpu = Some(cpu).into();
        s.memory = Some(memory).into();
        s.pids = Some(pids).into();
        s.io = vec![io];
        s
    }

    #[test]
    fn guest_cgroup_v2_stats_map_onto_v1_metrics() {
        let m = v1_metrics(&sample());
        assert_eq!((m.pids.current, m.pids.limit), (3, 0));
        assert_eq!(m.cpu.usage.total, 1_500_000);
        assert_eq!(m.cpu.usage.kernel, 500_000);
        assert_eq!(m.cpu.usage.user, 1_000_000);
        assert_eq!(m.cpu.throttling.throttled_time, 30_000);
        assert_eq!(m.cpu.throttling.throttled_periods, 2);
        assert_eq!(m.memory.usage.usage, 8 << 20);
        assert_eq!(m.memory.usage.limit, 16 << 20);
        assert_eq!(m.memory.usage.failcnt, 4);
        assert_eq!(m.memory.rss, 5 << 20);
        assert_eq!(m.memory.total_inactive_file, 1 << 20);
        assert_eq!(m.memory.cache, 3 << 20);
        assert_eq!(m.memory.swap.limit, UNLIMITED, "no swap limit: unlimited");
        assert_eq!(m.memory.kernel.usage, 4096 + 8192);
        assert_eq!(m.memory_oom_control.oom_kill, 1);
        let reads: Vec<_> = m
            .blkio
            .io_service_bytes_recursive
            .iter()
            .map(|e| (e.op.as_str(), e.major, e.value))
            .collect();
        assert_eq!(reads, [("Read", 254, 100), ("Write", 254, 200)]);
    }

    #[test]
    fn empty_stats_give_zeroes_not_garbage() {
        let m = v1_metrics(&StatsContainerResponse::new());
        assert_eq!(m.pids.current, 0);
        assert_eq!(m.memory.usage.usage, 0);
        assert_eq!(m.memory.swap.limit, 0);
        assert!(m.blkio.io_service_bytes_recursive.is_empty());
    }
}
