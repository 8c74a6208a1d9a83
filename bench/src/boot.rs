//! `husk-bench-boot`: boots the same guest kernel and initramfs in husk-vmm
//! and in QEMU (`-M microvm`), alternately, and compares time to the agent's
//! first console line ("husk-agent ... starting"), plus husk's time to vsock
//! readiness and the peak RSS of each VMM process at that line.
//!
//! Both VMMs get the same memory size and the same kernel command line
//! (husk's own, minus its virtio-mmio device list, which QEMU makes itself).
//! It then makes a template snapshot with one more boot and restores from
//! it `--runs` times: time to the agent's first answer (connecting every
//! 2 ms, so no retry back-off is in it) and the host memory of the restored,
//! idle VM: husk-vmm and its virtio-fs daemon without their guest-RAM
//! mappings, plus the guest-RAM memfd once ([`husk_e2e::hostmem`]).
//!
//! The last line of output is one JSON object.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use husk_e2e::{
    hostmem::host_memory, make_template, median, proc_kib, process_tree, require_kvm, Artifacts,
    FsDaemon, TestDir, VmOptions, VmProcess,
};
use husk_protocols::{
    agent::{HealthRequest, PersonalizeRequest, ShutdownRequest},
    agent_ttrpc::AgentClient,
    connect_agent, hybrid_vsock, AGENT_VSOCK_PORT,
};
use husk_vmm_core::arch::cpuid::CpuProfile;
use serde::Serialize;

const MARKER: &str = "husk-agent ";

#[derive(Debug, Parser)]
#[command(about = "Boot husk-vmm and QEMU side by side and compare")]
struct Args {
    /// Boots of each VMM.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Guest memory in MiB (both VMMs).
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Give up on one boot after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

#[derive(Debug, Default, Serialize)]
struct Sample {
    marker_s: f64,
    ready_s: Option<f64>,
    peak_rss_kib: u64,
}

/// Polls a console log for the marker.
async fn wait_marker(
    log: &Path,
    started: Instant,
    within: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<f64> {
    loop {
        if let Ok(text) = std::fs::read_to_string(log) {
            if text.contains(MARKER) {
                return Ok(started.elapsed().as_secs_f64());
            }
        }
        if !alive() {
            bail!(
                "the VMM exited before the marker; console:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if started.elapsed() > within {
            bail!("no marker within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn peak_rss(pid: u32) -> u64 {
    proc_kib(pid, "status", "VmHWM").unwrap_or(0)
}

async fn boot_husk(a: &Artifacts, mem_mib: u64, within: Duration) -> Result<Sample> {
    let dir = TestDir::new("bench-husk")?;
    let mut vm = VmProcess::spawn(
        a,
        dir.path(),
        &VmOptions {
            mem_mib,
            serial: true,
            ..Default::default()
        },
    )?;
    let serial = vm.serial.clone().context("serial log")?;
    let started = vm.started;
    let pid = vm.pid().context("pid")?;
    let marker_s = wait_marker(&serial, started, within, || {
        Path::new(&format!("/proc/{pid}")).exists()
    })
    .await?;
    // At the marker, as for QEMU.
    let peak_rss_kib = peak_rss(pid);
    let ready = vm.wait_ready(within).await?;
    let client = connect_agent(&vm.vsock, Duration::from_secs(30)).await?;
    client
        .shutdown(
            ttrpc::context::with_timeout(30_000_000_000),
            &ShutdownRequest::new(),
        )
        .await?;
    let status = vm.wait_exit(Duration::from_secs(60)).await?;
    if !status.success() {
        bail!("husk-vmm exited with {status}");
    }
    Ok(Sample {
        marker_s,
        ready_s: Some(ready.elapsed.as_secs_f64()),
        peak_rss_kib,
    })
}

async fn boot_qemu(
    a: &Artifacts,
    qemu: &str,
    mem_mib: u64,
    cmdline: &str,
    within: Duration,
) -> Result<Sample> {
    let dir = TestDir::new("bench-qemu")?;
    let serial = dir.path().join("serial.log");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args([
            "-M",
            "microvm,acpi=off",
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities",
        ])
        .args([
            "-m",
            &mem_mib.to_string(),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.initramfs)
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {qemu}"))?;
    let pid = child.id().context("pid")?;
    let marker_s = wait_marker(&serial, started, within, || {
        Path::new(&format!("/proc/{pid}")).exists()
    })
    .await?;
    let peak_rss_kib = peak_rss(pid);
    child.kill().await.ok();
    Ok(Sample {
        marker_s,
        ready_s: None,
        peak_rss_kib,
    })
}

#[derive(Debug, Default, Serialize)]
struct RestoreSample {
    /// From starting husk-vmm to the agent's first answer (Personalize),
    /// connecting every 2 ms (no back-off in the figure).
    answered_s: f64,
    /// Host memory of the restored VM after 2 s idle, each page once:
    /// `vmm_pss_kib + fs_daemon_pss_kib + guest_ram_kib`.
    total_kib: u64,
    /// PSS of husk-vmm without its guest-RAM mapping.
    vmm_pss_kib: u64,
    /// PSS of the VM's virtio-fs daemon without its guest-RAM mapping.
    fs_daemon_pss_kib: u64,
    /// Guest RAM resident on the host: the memfd's allocated pages (the
    /// template's pages plus those the guest touched since), once.
    guest_ram_kib: u64,
    /// Resident memory of the VMM process (guest pages it maps included),
    /// for comparison with other VMMs' RSS.
    vmm_rss_kib: u64,
}

fn rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "status", "VmRSS").unwrap_or(0)
}

/// Connects to the agent, trying every 2 ms: the restore figure must not
/// include a client's retry back-off.
async fn connect_agent_promptly(uds: &Path, within: Duration) -> Result<AgentClient> {
    let deadline = Instant::now() + within;
    loop {
        match hybrid_vsock::connect(uds, AGENT_VSOCK_PORT).await {
            Ok(stream) => {
                let socket = ttrpc::r#async::transport::Socket::from(stream);
                return Ok(AgentClient::new(ttrpc::r#async::Client::new(socket)));
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context("connecting to the restored agent")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

async fn restore_husk(a: &Artifacts, template: &Path, mem_mib: u64) -> Result<RestoreSample> {
    let dir = TestDir::new("bench-restore")?;
    let mut fs = FsDaemon::spawn(a, dir.path()).await?;
    let mut opts = VmOptions {
        mem_mib,
        ..VmOptions::restored_from(template)
    };
    opts.vmm_args.extend(fs.vmm_args());
    let mut vm = VmProcess::spawn(a, dir.path(), &opts)?;
    let pid = vm.pid().context("pid")?;
    let client = connect_agent_promptly(&vm.vsock, Duration::from_secs(60)).await?;
    let mut req = PersonalizeRequest::new();
    let mut entropy = vec![0u8; 64];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut entropy)?;
    req.entropy = entropy;
    let ctx = || ttrpc::context::with_timeout(30_000_000_000);
    client.personalize(ctx(), &req).await?;
    let answered_s = vm.started.elapsed().as_secs_f64();
    client.health(ctx(), &HealthRequest::new()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // One reading of both, so the parts add up to the total.
    let daemon_pids = fs.pid().map(process_tree).unwrap_or_default();
    let all = host_memory(&[vec![pid], daemon_pids.clone()].concat());
    let sample = RestoreSample {
        answered_s,
        total_kib: all.total_kib(),
        vmm_pss_kib: all.pss_of(&[pid]),
        fs_daemon_pss_kib: all.pss_of(&daemon_pids),
        guest_ram_kib: all.guest_ram_kib,
        vmm_rss_kib: rss_kib(pid),
    };
    client.shutdown(ctx(), &ShutdownRequest::new()).await?;
    let status = vm.wait_exit(Duration::from_secs(60)).await?;
    if !status.success() {
        bail!("restored husk-vmm exited with {status}");
    }
    let daemon = fs.wait_exit(Duration::from_secs(10)).await?;
    if !daemon.success() {
        bail!("the restored VM's virtio-fs daemon exited with {daemon}");
    }
    Ok(sample)
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    runs: usize,
    mem_mib: u64,
    cmdline: String,
    husk_marker_median_s: f64,
    qemu_marker_median_s: f64,
    ratio_husk_over_qemu: f64,
    husk_ready_median_s: f64,
    husk_peak_rss_median_kib: f64,
    qemu_peak_rss_median_kib: f64,
    rss_ratio_husk_over_qemu: f64,
    husk: Vec<Sample>,
    qemu: Vec<Sample>,
    template_build_s: f64,
    restore_answered_median_s: f64,
    ratio_restore_over_cold_ready: f64,
    restored_idle_total_median_kib: f64,
    restored_vmm_pss_median_kib: f64,
    restored_fs_daemon_pss_median_kib: f64,
    restored_guest_ram_median_kib: f64,
    restored_vmm_rss_median_kib: f64,
    restores: Vec<RestoreSample>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    require_kvm();
    let a = Artifacts::locate()?;
    let within = Duration::from_secs(args.timeout_s);
    let detected = CpuProfile::detect();
    // husk-vmm's own words, so both VMMs boot the guest alike.
    let base = husk_vmm_core::vmm::BASE_CMDLINE.join(" ");
    let cmdline = format!(
        "{base} {} console=ttyS0 8250.nr_uarts=1",
        detected.cmdline()
    )
    .replace("  ", " ");
    // Where guest kernel code is emulated, husk-vmm executes the guest's
    // XSAVE/XRSTOR itself (arch/xsave.rs); QEMU cannot, so its guest runs
    // on FXSAVE.
    let qemu_cmdline = if detected == CpuProfile::Emulated {
        format!("{cmdline} noxsave")
    } else {
        cmdline.clone()
    };
    println!(
        "boot benchmark: {} runs each, {} MiB, marker {MARKER:?}",
        args.runs, args.mem_mib
    );
    println!("kernel command line (husk): {cmdline}");
    println!("kernel command line (QEMU): {qemu_cmdline}");
    let (mut husk, mut qemu) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        let h = boot_husk(&a, args.mem_mib, within)
            .await
            .context("husk boot")?;
        println!(
            "run {}: husk  marker {:7.2} s  ready {:7.2} s  peak RSS {:7} KiB",
            i + 1,
            h.marker_s,
            h.ready_s.unwrap_or(0.0),
            h.peak_rss_kib
        );
        husk.push(h);
        let q = boot_qemu(&a, &args.qemu, args.mem_mib, &qemu_cmdline, within)
            .await
            .context("QEMU boot")?;
        println!(
            "run {}: qemu  marker {:7.2} s                   peak RSS {:7} KiB",
            i + 1,
            q.marker_s,
            q.peak_rss_kib
        );
        qemu.push(q);
    }
    let hm = median(&mut husk.iter().map(|s| s.marker_s).collect::<Vec<_>>());
    let qm = median(&mut qemu.iter().map(|s| s.marker_s).collect::<Vec<_>>());
    let hr = median(&mut husk.iter().filter_map(|s| s.ready_s).collect::<Vec<_>>());
    let hrss = median(
        &mut husk
            .iter()
            .map(|s| s.peak_rss_kib as f64)
            .collect::<Vec<_>>(),
    );
    let qrss = median(
        &mut qemu
            .iter()
            .map(|s| s.peak_rss_kib as f64)
            .collect::<Vec<_>>(),
    );
    // Template start: one boot makes the template, then restores.
    let store = TestDir::new("bench-template")?;
    let started = Instant::now();
    let template = make_template(&a, store.path(), args.mem_mib).await?;
    let template_build_s = started.elapsed().as_secs_f64();
    println!("template built in {template_build_s:.2} s");
    let mut restores = Vec::new();
    for i in 0..args.runs {
        let r = restore_husk(&a, &template, args.mem_mib)
            .await
            .context("restore")?;
        println!(
            "run {}: husk restore  answered {:6.2} s  idle host memory {:7} KiB (husk-vmm PSS {} + virtio-fs daemon PSS {} without guest RAM + guest RAM {})  husk-vmm RSS {:7} KiB",
            i + 1,
            r.answered_s,
            r.total_kib,
            r.vmm_pss_kib,
            r.fs_daemon_pss_kib,
            r.guest_ram_kib,
            r.vmm_rss_kib
        );
        restores.push(r);
    }
    let med =
        |f: fn(&RestoreSample) -> f64| median(&mut restores.iter().map(f).collect::<Vec<_>>());
    let rm = med(|r| r.answered_s);
    let rtotal = med(|r| r.total_kib as f64);
    let rvmm = med(|r| r.vmm_pss_kib as f64);
    let rfs = med(|r| r.fs_daemon_pss_kib as f64);
    let rguest = med(|r| r.guest_ram_kib as f64);
    let rrss = med(|r| r.vmm_rss_kib as f64);

    let report = Report {
        bench: "boot",
        runs: args.runs,
        mem_mib: args.mem_mib,
        cmdline,
        husk_marker_median_s: hm,
        qemu_marker_median_s: qm,
        ratio_husk_over_qemu: if qm > 0.0 { hm / qm } else { 0.0 },
        husk_ready_median_s: hr,
        husk_peak_rss_median_kib: hrss,
        qemu_peak_rss_median_kib: qrss,
        rss_ratio_husk_over_qemu: if qrss > 0.0 { hrss / qrss } else { 0.0 },
        husk,
        qemu,
        template_build_s,
        restore_answered_median_s: rm,
        ratio_restore_over_cold_ready: if hr > 0.0 { rm / hr } else { 0.0 },
        restored_idle_total_median_kib: rtotal,
        restored_vmm_pss_median_kib: rvmm,
        restored_fs_daemon_pss_median_kib: rfs,
        restored_guest_ram_median_kib: rguest,
        restored_vmm_rss_median_kib: rrss,
        restores,
    };
    println!(
        "median time to the agent's first line: husk {hm:.2} s, qemu {qm:.2} s, husk/qemu {:.3}",
        report.ratio_husk_over_qemu
    );
    println!("median husk time to vsock readiness: {hr:.2} s");
    println!(
        "median peak RSS: husk {hrss:.0} KiB, qemu {qrss:.0} KiB, husk/qemu {:.3}",
        report.rss_ratio_husk_over_qemu
    );
    println!(
        "median template start (restore to the agent's first answer): {rm:.2} s; cold boot to readiness {hr:.2} s; restore/cold {:.3}",
        report.ratio_restore_over_cold_ready
    );
    println!("median restored idle VM host memory, each page once: {rtotal:.0} KiB (husk-vmm PSS {rvmm:.0} + virtio-fs daemon PSS {rfs:.0} without guest RAM + guest RAM {rguest:.0}); husk-vmm RSS {rrss:.0} KiB");
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
