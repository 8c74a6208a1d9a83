//! `husk-bench-density` (`make bench-density`): how much host memory an
//! idle pod costs, husk and runc side by side on one private containerd.
//!
//! For each runtime in turn, N idle containers (`sleep`; each husk one its
//! own pod VM) are started one after another, then measured right after
//! the last start and again after some idle time:
//!
//! - the drop of the host's `MemAvailable` since before the first start,
//!   per pod (what the kernel says the pods took, whoever holds it);
//! - the pods' memory counted once ([`husk_e2e::hostmem`]): the PSS of
//!   every shim and all it started, without guest-RAM mappings, plus each
//!   guest-RAM memfd's allocated pages once, per pod;
//! - the start time of each pod (`ctr run -d` until it returns).
//!
//! Idle time matters for husk: free page reporting returns what the guest
//! freed after its container started a few seconds later. The last line
//! of output is one JSON object (`husk_per_pod_kib`, `runc_per_pod_kib`:
//! counted once, after the idle time).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use husk_bench::{shim_pid, Runtime};
use husk_e2e::{
    containerd::{Containerd, IMAGE, RUNTIME},
    hostmem::host_memory,
    median, process_tree, ratio, require_kvm, Artifacts, TestDir,
};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(about = "host memory per idle pod: husk and runc side by side on one containerd")]
struct Args {
    /// Idle pods of each runtime.
    #[arg(long, default_value_t = 20)]
    pods: usize,
    /// Seconds the pods idle before the second measurement.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Where husk's VM template is kept between benchmark runs.
    #[arg(long, default_value = "/var/lib/husk/templates")]
    template_dir: std::path::PathBuf,
    /// Extra guest kernel command line words for husk's pod VMs
    /// (`kernel_cmdline` in husk.toml), for experiments, e.g.
    /// `page_reporting.page_reporting_order=5`.
    #[arg(long, default_value = "")]
    kernel_cmdline: String,
    /// Also write the JSON report to this file, e.g.
    /// `bench/results/density.json`, the measurement the RuntimeClass's pod
    /// overhead is derived from (`deploy/runtimeclass.yaml`).
    #[arg(long)]
    record: Option<std::path::PathBuf>,
}

/// The host's `MemAvailable`, KiB.
fn mem_available_kib() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(husk_e2e::kib_value)
        .context("no MemAvailable in /proc/meminfo")
}

/// Memory of all pods at one moment, per pod.
#[derive(Debug, Default, Clone, Serialize)]
struct PerPod {
    /// Drop of `MemAvailable` since before the first start, per pod, KiB.
    mem_available_drop_kib: u64,
    /// Counted once: processes' PSS without guest RAM plus guest RAM, KiB.
    counted_once_kib: u64,
    /// Of which the processes' PSS, KiB.
    processes_pss_kib: u64,
    /// Of which guest RAM resident on the host, KiB.
    guest_ram_kib: u64,
}

fn measure(rt: Runtime, ids: &[String], available_before: u64) -> Result<PerPod> {
    let mut pids = Vec::new();
    for id in ids {
        let shim = shim_pid(rt, id).with_context(|| format!("no {} for {id}", rt.shim()))?;
        pids.extend(process_tree(shim));
    }
    let mem = host_memory(&pids);
    let n = ids.len().max(1) as u64;
    Ok(PerPod {
        mem_available_drop_kib: available_before.saturating_sub(mem_available_kib()?) / n,
        counted_once_kib: mem.total_kib() / n,
        processes_pss_kib: mem.processes_pss_kib / n,
        guest_ram_kib: mem.guest_ram_kib / n,
    })
}

/// What one runtime's pods measured.
#[derive(Debug, Serialize)]
struct Density {
    start_s: Vec<f64>,
    start_median_s: f64,
    after_start: PerPod,
    after_idle: PerPod,
}

fn density(c: &Containerd, rt: Runtime, pods: usize, idle: Duration) -> Result<Density> {
    let before = mem_available_kib()?;
    let mut ids = Vec::new();
    let mut start_s = Vec::new();
    for i in 0..pods {
        let id = format!("{}-d{i}", rt.name());
        let mut args = rt.run_args(c);
        args.extend(["-d", IMAGE, &id, "sleep", "100000"].map(String::from));
        let t = Instant::now();
        c.ctr_ok(&args)?;
        start_s.push(t.elapsed().as_secs_f64());
        ids.push(id);
    }
    let after_start = measure(rt, &ids, before)?;
    std::thread::sleep(idle);
    let after_idle = measure(rt, &ids, before)?;
    for id in &ids {
        c.kill_and_remove(id)?;
    }
    Ok(Density {
        start_median_s: median(&mut start_s.clone()),
        start_s,
        after_start,
        after_idle,
    })
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    pods: usize,
    kernel_cmdline: String,
    idle_secs: u64,
    /// Host memory per idle pod after the idle time, counted once, KiB.
    husk_per_pod_kib: u64,
    runc_per_pod_kib: u64,
    per_pod_ratio_husk_over_runc: f64,
    /// The same from `MemAvailable`.
    husk_per_pod_mem_available_kib: u64,
    runc_per_pod_mem_available_kib: u64,
    husk_start_median_s: f64,
    runc_start_median_s: f64,
    start_ratio_husk_over_runc: f64,
    husk: Density,
    runc: Density,
}

fn print(rt: Runtime, d: &Density) {
    for (when, m) in [
        ("right after start", &d.after_start),
        ("after idle", &d.after_idle),
    ] {
        println!(
            "{} per pod {when}: {} KiB counted once (processes {} KiB + guest RAM {} KiB), MemAvailable drop {} KiB",
            rt.name(),
            m.counted_once_kib,
            m.processes_pss_kib,
            m.guest_ram_kib,
            m.mem_available_drop_kib
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_kvm();
    let artifacts = Artifacts::locate()?;
    let dir = TestDir::new("bench-density")?;
    std::fs::create_dir_all(&args.template_dir)?;
    let c = Containerd::start(&artifacts, dir.path(), &args.template_dir)?;
    c.import_test_image()?;
    if !args.kernel_cmdline.is_empty() {
        c.set_husk("kernel_cmdline", &format!("{:?}", args.kernel_cmdline))?;
    }
    println!(
        "density benchmark: {} idle pods of husk ({RUNTIME}) and of runc, one private containerd, image {IMAGE}, {} s idle, extra guest command line {:?}",
        args.pods, args.idle_secs, args.kernel_cmdline
    );
    // Warm-up, not measured: husk's template, both runtimes' first start.
    for rt in [Runtime::Husk, Runtime::Runc] {
        let mut warm = rt.run_args(&c);
        warm.extend(["--rm", IMAGE, &format!("warm-{}", rt.name()), "true"].map(String::from));
        c.ctr_ok(&warm)?;
    }
    let idle = Duration::from_secs(args.idle_secs);
    let husk = density(&c, Runtime::Husk, args.pods, idle)?;
    print(Runtime::Husk, &husk);
    let runc = density(&c, Runtime::Runc, args.pods, idle)?;
    print(Runtime::Runc, &runc);
    let report = Report {
        bench: "density",
        pods: args.pods,
        kernel_cmdline: args.kernel_cmdline.clone(),
        idle_secs: args.idle_secs,
        husk_per_pod_kib: husk.after_idle.counted_once_kib,
        runc_per_pod_kib: runc.after_idle.counted_once_kib,
        per_pod_ratio_husk_over_runc: ratio(
            husk.after_idle.counted_once_kib as f64,
            runc.after_idle.counted_once_kib as f64,
        ),
        husk_per_pod_mem_available_kib: husk.after_idle.mem_available_drop_kib,
        runc_per_pod_mem_available_kib: runc.after_idle.mem_available_drop_kib,
        husk_start_median_s: husk.start_median_s,
        runc_start_median_s: runc.start_median_s,
        start_ratio_husk_over_runc: ratio(husk.start_median_s, runc.start_median_s),
        husk,
        runc,
    };
    println!(
        "per idle pod after {} s: husk {} KiB, runc {} KiB (counted once), husk/runc {:.2}; start: husk {:.2} s, runc {:.3} s (median)",
        args.idle_secs,
        report.husk_per_pod_kib,
        report.runc_per_pod_kib,
        report.per_pod_ratio_husk_over_runc,
        report.husk_start_median_s,
        report.runc_start_median_s
    );
    let json = serde_json::to_string(&report)?;
    println!("{json}");
    if let Some(path) = &args.record {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("recorded in {}", path.display());
    }
    Ok(())
}
