//! `husk-demo` (`make demo`): starts a private containerd (its own root,
//! state and socket under /tmp; never the system's), builds and imports a
//! small busybox image, and runs a container in a husk microVM with
//! `ctr run --rm --runtime io.containerd.husk.v2`, printing its output, how
//! long it took and that nothing was left behind. The first run also makes
//! the VM template (a cold guest boot); later runs restore it.
//!
//! `--vm-only` instead boots a bare microVM and talks to its agent, which is
//! how to check the VMM and guest image without containerd.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use husk_e2e::{
    containerd::{Containerd, IMAGE},
    processes_mentioning, require_kvm, Artifacts, TestDir, VmOptions, VmProcess,
};
use husk_protocols::{
    agent::{HealthRequest, ShutdownRequest, VersionRequest},
    connect_agent,
};

#[derive(Debug, Parser)]
#[command(about = "Run a container in a husk microVM under a private containerd")]
struct Args {
    /// Boot a bare microVM and talk to its agent instead (no containerd).
    #[arg(long)]
    vm_only: bool,
    /// Guest memory in MiB (--vm-only).
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Print the guest's serial console at the end (--vm-only).
    #[arg(long)]
    console: bool,
    /// Where VM templates are kept between runs.
    #[arg(long, default_value = "/var/lib/husk/templates")]
    template_dir: std::path::PathBuf,
    /// Profile the pod VM's guest and write the profile (folded stacks,
    /// flame graph, table) into this directory (docs/profiling.md).
    #[arg(long)]
    profile_dir: Option<std::path::PathBuf>,
    /// Profile samples per second per vCPU (with --profile-dir).
    #[arg(long, default_value_t = 250)]
    profile_hz: u32,
    /// Extra guest kernel command line words for the pod VM (`kernel_cmdline`
    /// in husk.toml), for experiments.
    #[arg(long)]
    kernel_cmdline: Option<String>,
    /// Run the container privileged (`ctr run --privileged`): it sees the
    /// whole guest, e.g. `husk-demo --privileged -- cat /proc/slabinfo`.
    #[arg(long)]
    privileged: bool,
    /// The command the container runs instead of the demo script, e.g.
    /// `husk-demo --profile-dir /tmp/p -- /bin/true`.
    #[arg(last = true)]
    command: Vec<String>,
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

/// The script the demo container runs: shows that it is inside its own
/// guest kernel, not the host's.
const SCRIPT: &str = "echo \"hello from a husk microVM\"; \
     echo \"  guest kernel: $(uname -r) (host: HOST_KERNEL)\"; \
     echo \"  CPUs: $(nproc), memory: $(free -m | grep Mem: | tr -s ' ' | cut -d' ' -f2) MiB\"; \
     echo \"  root fs: $(mount | grep ' / ' | cut -d' ' -f1,5)\"";

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn container_demo(args: &Args, artifacts: &Artifacts) -> Result<()> {
    let dir = TestDir::new("demo")?;
    std::fs::create_dir_all(&args.template_dir)
        .with_context(|| format!("creating {}", args.template_dir.display()))?;
    let c = Containerd::start(artifacts, dir.path(), &args.template_dir)?;
    println!(
        "husk demo: private containerd on {} (root and state in {})",
        c.socket.display(),
        dir.path().display()
    );
    c.import_test_image()?;
    println!("husk demo: built and imported {IMAGE} (busybox-static)");
    if let Some(words) = &args.kernel_cmdline {
        c.set_husk("kernel_cmdline", &format!("{words:?}"))?;
    }
    if let Some(profiles) = &args.profile_dir {
        let profiles = std::path::absolute(profiles)?;
        std::fs::create_dir_all(&profiles)
            .with_context(|| format!("creating {}", profiles.display()))?;
        let quoted = |p: &std::path::Path| format!("{:?}", p.display().to_string());
        // Stacks need the kernel with frame pointers; without it the
        // profile is flat (the function sampled only).
        match artifacts.profiling_kernel() {
            Ok(k) => {
                c.set_husk("kernel", &quoted(&k))?;
                println!("husk demo: on the profiling kernel {}", k.display());
            }
            Err(e) => println!("husk demo: flat profile only: {e}"),
        }
        c.set_husk("profile_dir", &quoted(&profiles))?;
        c.set_husk("profile_hz", &args.profile_hz.to_string())?;
        println!(
            "husk demo: profiling the guest at {} Hz into {}",
            args.profile_hz,
            profiles.display()
        );
    }
    let mut argv = c.run_args();
    if args.privileged {
        argv.push("--privileged".into());
    }
    argv.extend(["--rm", IMAGE, "husk-demo"].map(String::from));
    if args.command.is_empty() {
        argv.extend(["sh", "-c"].map(String::from));
        argv.push(SCRIPT.replace("HOST_KERNEL", &host_kernel()));
    } else {
        argv.extend(args.command.iter().cloned());
    }
    println!(
        "husk demo: ctr run --rm --runtime {} {IMAGE} husk-demo {}",
        husk_e2e::containerd::RUNTIME,
        if args.command.is_empty() {
            "sh -c ...".to_string()
        } else {
            args.command.join(" ")
        }
    );
    let started = Instant::now();
    let out = c.ctr(&argv)?;
    let took = started.elapsed();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "ctr run failed ({}): {}\n--- containerd log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            c.log()
        );
    }
    println!(
        "husk demo: container exited 0 after {:.1} s (a first run also boots the guest once to make the template in {})",
        took.as_secs_f64(),
        args.template_dir.display()
    );
    // --rm removed the container; its microVM, daemon and shim go too.
    let pods = c.pods.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !processes_mentioning(&pods).is_empty() {
        if Instant::now() > deadline {
            bail!("processes left behind: {:?}", processes_mentioning(&pods));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("husk demo: no husk-vmm or husk-virtiofsd of the pod is left");
    let steps: Vec<String> = husk_shim::steps::parse(&c.log())
        .into_iter()
        .filter(|t| t.container == "husk-demo")
        .map(|t| format!("{} {:.2} s", t.step, t.seconds))
        .collect();
    println!("husk demo: steps: {}", steps.join(", "));
    Ok(())
}

async fn vm_demo(args: &Args, artifacts: &Artifacts) -> Result<()> {
    let dir = TestDir::new("demo")?;
    println!(
        "husk demo: booting {} + {} in husk-vmm ({} MiB, 1 vCPU)",
        artifacts.kernel.display(),
        artifacts.initramfs.display(),
        args.mem_mib
    );
    let mut vm = VmProcess::spawn(
        artifacts,
        dir.path(),
        &VmOptions {
            mem_mib: args.mem_mib,
            serial: args.console,
            ..Default::default()
        },
    )?;
    let ready = match vm.wait_ready(Duration::from_secs(600)).await {
        Ok(r) => r,
        Err(e) => bail!("{e:#}\n{}", vm.log_text()),
    };
    println!(
        "husk demo: agent ready after {:.2} s (announced over vsock: agent {}, API {})",
        ready.elapsed.as_secs_f64(),
        ready.agent_version,
        ready.api_version
    );
    let client = connect_agent(&vm.vsock, Duration::from_secs(30))
        .await
        .context("connecting to the agent")?;
    let v = client
        .version(ctx(), &VersionRequest::new())
        .await
        .context("Version")?;
    println!(
        "husk demo: Version -> agent {}, API {}, guest kernel {} ({}), guest uptime {:.1} s",
        v.agent_version, v.api_version, v.kernel_release, v.kernel_version, v.uptime_seconds
    );
    let h = client
        .health(ctx(), &HealthRequest::new())
        .await
        .context("Health")?;
    println!(
        "husk demo: Health -> {:?}",
        h.status.enum_value_or_default()
    );
    let t = Instant::now();
    client
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .context("Shutdown")?;
    let status = vm.wait_exit(Duration::from_secs(60)).await?;
    println!(
        "husk demo: Shutdown -> husk-vmm exited with {status} after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    if args.console {
        println!(
            "--- guest serial console ---\n{}",
            std::fs::read_to_string(dir.path().join("serial.log")).unwrap_or_default()
        );
    }
    if !status.success() {
        bail!("husk-vmm did not exit cleanly:\n{}", vm.log_text());
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    require_kvm();
    let artifacts = Artifacts::locate()?;
    if args.vm_only {
        vm_demo(&args, &artifacts).await
    } else {
        let a = artifacts.clone();
        tokio::task::spawn_blocking(move || container_demo(&args, &a)).await?
    }
}
