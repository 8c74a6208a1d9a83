//! `husk-bench-run` (`make bench-run`): husk and runc side by side on one
//! private containerd, the same image, alternating run by run:
//!
//! - `ctr run --rm IMG ID /bin/true`, start to exit;
//! - `ctr task exec` of `/bin/true` in a running container;
//! - `ctr task metrics` of a running container (what the kubelet's stats
//!   polling costs: for husk a round trip to the guest's cgroup files);
//! - the time of each step of a husk container's life (VM start, shared
//!   directory mount, create, start, first output, exit, an exec's start
//!   and exit, delete, VM gone),
//!   from the step lines the shim logs ([`husk_shim::steps`]): medians
//!   over the measured runs, and for the first output and the execs over
//!   the idle container (the one that prints and is exec'd into);
//! - host memory of one idle container, each page once
//!   ([`husk_e2e::hostmem`]): the PSS of the shim and everything it started
//!   (runc: the container's processes; husk: husk-vmm and husk-virtiofsd)
//!   without their guest-RAM mappings, plus for husk the guest-RAM memfd's
//!   allocated pages, once (both husk-vmm and the virtio-fs daemon map it;
//!   restored pages the VMM wrote with pwrite are resident but mapped by
//!   no one, so PSS alone would undercount them).
//!
//! husk starts pod VMs from its template; the template is made before the
//! measured runs (it is cached in `--template-dir` between runs). The last
//! line of output is one JSON object.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use husk_bench::{shim_pid, Idle, Runtime, RUNC};
use husk_e2e::{
    containerd::{Containerd, IMAGE, RUNTIME},
    hostmem::host_memory,
    median, process_tree, ratio, require_kvm, Artifacts, TestDir,
};
use husk_shim::steps::{self, Step};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(about = "husk and runc side by side on one containerd")]
struct Args {
    /// Measured runs of each runtime (and execs per runtime).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where husk's VM template is kept between benchmark runs.
    #[arg(long, default_value = "/var/lib/husk/templates")]
    template_dir: std::path::PathBuf,
    /// A husk.toml setting for husk's pods, `KEY=VALUE` with a TOML value
    /// (e.g. `free_page_reporting=false`), for experiments; repeatable.
    #[arg(long = "husk-set", value_name = "KEY=VALUE")]
    husk_set: Vec<String>,
}

/// Seconds `ctr run --rm` of /bin/true takes.
fn run_true(c: &Containerd, rt: Runtime, id: &str) -> Result<f64> {
    let mut args = rt.run_args(c);
    args.extend(["--rm", IMAGE, id, "/bin/true"].map(String::from));
    let t = Instant::now();
    c.ctr_ok(&args)?;
    Ok(t.elapsed().as_secs_f64())
}

/// What one idle container measured.
struct IdleRun {
    execs: Vec<f64>,
    metrics: Vec<f64>,
    idle: Idle,
}

/// Starts an idle container, measures exec and metrics latency and its
/// memory, removes it.
fn idle_container(c: &Containerd, rt: Runtime, runs: usize) -> Result<IdleRun> {
    let id = format!("{}-idle", rt.name());
    let mut args = rt.run_args(c);
    // It prints one line, for the first-output step, then sleeps.
    args.extend(["-d", IMAGE, &id, "sh", "-c", "echo up; exec sleep 100000"].map(String::from));
    c.ctr_ok(&args)?;
    let mut execs = Vec::new();
    for i in 0..runs {
        let exec_id = format!("x{i}");
        let t = Instant::now();
        c.ctr_ok(&["task", "exec", "--exec-id", &exec_id, &id, "/bin/true"])?;
        execs.push(t.elapsed().as_secs_f64());
    }
    let mut metrics = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        c.ctr_ok(&["task", "metrics", &id])?;
        metrics.push(t.elapsed().as_secs_f64());
    }
    // Let start-up work settle before measuring memory.
    std::thread::sleep(Duration::from_secs(3));
    let shim = shim_pid(rt, &id).with_context(|| format!("no {} for {id}", rt.shim()))?;
    let idle = Idle::from(host_memory(&process_tree(shim)));
    c.kill_and_remove(&id)?;
    Ok(IdleRun {
        execs,
        metrics,
        idle,
    })
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    runs: usize,
    husk_run_true_median_s: f64,
    runc_run_true_median_s: f64,
    run_true_ratio_husk_over_runc: f64,
    husk_exec_median_s: f64,
    runc_exec_median_s: f64,
    exec_ratio_husk_over_runc: f64,
    husk_metrics_median_s: f64,
    runc_metrics_median_s: f64,
    metrics_ratio_husk_over_runc: f64,
    /// Median seconds of each step of a husk container's life.
    husk_steps: std::collections::BTreeMap<String, f64>,
    /// How many samples each step's median is of.
    husk_steps_samples: std::collections::BTreeMap<String, usize>,
    husk_idle: Idle,
    runc_idle: Idle,
    idle_memory_ratio_husk_over_runc: f64,
    husk_run_true_s: Vec<f64>,
    runc_run_true_s: Vec<f64>,
    husk_exec_s: Vec<f64>,
    runc_exec_s: Vec<f64>,
    husk_metrics_s: Vec<f64>,
    runc_metrics_s: Vec<f64>,
}

/// The median of each step and how many samples it has. The life steps
/// come from the measured `/bin/true` runs (`husk-N`) alone; the idle
/// container (`husk-idle`), whose life is different (it prints, is
/// exec'd into, then killed), gives only what those runs lack: the first
/// output and the exec steps.
fn step_medians(
    log: &str,
    runs: usize,
) -> (
    std::collections::BTreeMap<String, f64>,
    std::collections::BTreeMap<String, usize>,
) {
    let runs: Vec<String> = (0..runs).map(|i| format!("husk-{i}")).collect();
    let from_idle = [Step::FirstOutput, Step::ExecStart, Step::ExecExit].map(Step::name);
    let mut by_step: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for t in steps::parse(log) {
        let wanted = if from_idle.contains(&t.step.as_str()) {
            t.container == "husk-idle"
        } else {
            runs.contains(&t.container)
        };
        if wanted {
            by_step.entry(t.step).or_default().push(t.seconds);
        }
    }
    let counts = by_step.iter().map(|(k, v)| (k.clone(), v.len())).collect();
    let medians = by_step
        .into_iter()
        .map(|(k, mut v)| (k, median(&mut v)))
        .collect();
    (medians, counts)
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_kvm();
    let artifacts = Artifacts::locate()?;
    let dir = TestDir::new("bench-run")?;
    std::fs::create_dir_all(&args.template_dir)?;
    let c = Containerd::start(&artifacts, dir.path(), &args.template_dir)?;
    c.import_test_image()?;
    for kv in &args.husk_set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--husk-set {kv:?} is not KEY=VALUE"))?;
        c.set_husk(k, v)?;
        println!("husk.toml: {k} = {v}");
    }
    println!(
        "run benchmark: husk ({RUNTIME}) vs runc ({RUNC}), {} runs each, one private containerd, image {IMAGE}",
        args.runs
    );
    // Warm-up, not measured: husk's template, both runtimes' first start.
    let t = Instant::now();
    run_true(&c, Runtime::Husk, "warm-husk")?;
    println!(
        "warm-up husk run (makes the template if missing): {:.2} s",
        t.elapsed().as_secs_f64()
    );
    run_true(&c, Runtime::Runc, "warm-runc")?;

    let (mut husk_runs, mut runc_runs) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        let h = run_true(&c, Runtime::Husk, &format!("husk-{i}"))?;
        let r = run_true(&c, Runtime::Runc, &format!("runc-{i}"))?;
        println!("run {i}: ctr run --rm /bin/true: husk {h:.3} s, runc {r:.3} s");
        husk_runs.push(h);
        runc_runs.push(r);
    }
    let husk = idle_container(&c, Runtime::Husk, args.runs)?;
    let runc = idle_container(&c, Runtime::Runc, args.runs)?;

    let (husk_steps, husk_steps_samples) = step_medians(&c.log(), args.runs);
    let husk_run = median(&mut husk_runs.clone());
    let runc_run = median(&mut runc_runs.clone());
    let husk_exec_median = median(&mut husk.execs.clone());
    let runc_exec_median = median(&mut runc.execs.clone());
    let husk_metrics_median = median(&mut husk.metrics.clone());
    let runc_metrics_median = median(&mut runc.metrics.clone());
    let report = Report {
        bench: "run",
        runs: args.runs,
        husk_run_true_median_s: husk_run,
        runc_run_true_median_s: runc_run,
        run_true_ratio_husk_over_runc: ratio(husk_run, runc_run),
        husk_exec_median_s: husk_exec_median,
        runc_exec_median_s: runc_exec_median,
        exec_ratio_husk_over_runc: ratio(husk_exec_median, runc_exec_median),
        husk_metrics_median_s: husk_metrics_median,
        runc_metrics_median_s: runc_metrics_median,
        metrics_ratio_husk_over_runc: ratio(husk_metrics_median, runc_metrics_median),
        idle_memory_ratio_husk_over_runc: ratio(
            husk.idle.total_kib as f64,
            runc.idle.total_kib as f64,
        ),
        husk_steps,
        husk_steps_samples,
        husk_idle: husk.idle,
        runc_idle: runc.idle,
        husk_run_true_s: husk_runs,
        runc_run_true_s: runc_runs,
        husk_exec_s: husk.execs,
        runc_exec_s: runc.execs,
        husk_metrics_s: husk.metrics,
        runc_metrics_s: runc.metrics,
    };
    println!(
        "ctr run --rm /bin/true: husk {:.3} s, runc {:.3} s (median), husk/runc {:.2}",
        report.husk_run_true_median_s,
        report.runc_run_true_median_s,
        report.run_true_ratio_husk_over_runc
    );
    println!(
        "ctr task exec /bin/true: husk {:.3} s, runc {:.3} s (median), husk/runc {:.2}",
        report.husk_exec_median_s, report.runc_exec_median_s, report.exec_ratio_husk_over_runc
    );
    println!(
        "ctr task metrics: husk {:.3} s, runc {:.3} s (median), husk/runc {:.2}",
        report.husk_metrics_median_s,
        report.runc_metrics_median_s,
        report.metrics_ratio_husk_over_runc
    );
    let steps: Vec<String> = Step::ALL
        .iter()
        .filter_map(|s| {
            let m = report.husk_steps.get(s.name())?;
            Some(format!("{} {m:.3}", s.name()))
        })
        .collect();
    println!("husk steps (median s): {}", steps.join(", "));
    println!(
        "idle container host memory, each page once: husk {} KiB (PSS of {} processes without guest RAM {} KiB + guest RAM resident {} KiB in {} memfd), runc {} KiB (PSS of {} processes), husk/runc {:.2}",
        report.husk_idle.total_kib,
        report.husk_idle.processes,
        report.husk_idle.processes_pss_kib,
        report.husk_idle.guest_ram_kib,
        report.husk_idle.guest_ram_files,
        report.runc_idle.total_kib,
        report.runc_idle.processes,
        report.idle_memory_ratio_husk_over_runc
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
