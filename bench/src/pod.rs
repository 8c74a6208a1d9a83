//! `husk-bench-pod` (`make bench-pod`): Kubernetes pods through CRI, husk
//! and runc side by side on one private containerd (its CRI plugin, a CNI
//! bridge, all inside a network namespace the benchmark makes), alternating
//! run by run:
//!
//! - pod start: `RunPodSandbox` + `CreateContainer` + `StartContainer` of a
//!   busybox httpd until the first HTTP answer on the pod's IP, as a
//!   client in the cluster network would get it;
//! - TCP throughput from the network namespace to the pod: a sender here,
//!   `husk-testprog sink` in the pod, which reads everything and answers the
//!   byte count.
//!
//! husk starts pod VMs from its template; a warm-up pod makes it first (it
//! is kept in `--template-dir` between runs). The last line of output is one
//! JSON object.

use std::{
    io::{Read, Write},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use husk_e2e::{
    containerd::{Containerd, IMAGE},
    cri::{Cri, Pod, PodSpec},
    median,
    netns::NetNs,
    ratio, require_kvm, Artifacts, TestDir,
};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(about = "husk and runc pods side by side through CRI")]
struct Args {
    /// Measured pods of each runtime.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// MiB sent per throughput run.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// Where husk's VM template is kept between benchmark runs.
    #[arg(long, default_value = "/var/lib/husk/templates")]
    template_dir: std::path::PathBuf,
}

const HTTPD: &[&str] = &[
    "sh",
    "-c",
    "mkdir -p /www && echo ok > /www/index.html && exec busybox httpd -f -p 80 -h /www",
];
const SINK_PORT: u16 = 5001;

struct Bench {
    cri: Cri,
    netns: NetNs,
    dir: TestDir,
    _c: Containerd,
}

impl Bench {
    fn spec(&self, name: &str) -> Result<PodSpec> {
        let log_dir = self.dir.path().join("logs").join(name);
        std::fs::create_dir_all(&log_dir)?;
        Ok(PodSpec {
            hostname: name.into(),
            ..PodSpec::new(name, log_dir)
        })
    }

    /// Seconds from RunPodSandbox to the first HTTP answer on the pod IP;
    /// the pod is left running.
    fn start_http_pod(&self, name: &str, handler: &str) -> Result<(f64, Pod, String)> {
        let spec = self.spec(name)?;
        let t = Instant::now();
        let pod = self.cri.run_pod(&spec, handler)?;
        let ip = self.cri.pod_ip(&pod.id)?;
        let c = self.cri.create_container(&pod, "web", IMAGE, HTTPD)?;
        self.cri.start_container(&c)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if http_ok(&self.netns, &ip)? {
                return Ok((t.elapsed().as_secs_f64(), pod, ip));
            }
            if Instant::now() > deadline {
                bail!("{name}: no HTTP answer on {ip}:80 within 120 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn remove(&self, pod: &Pod) -> Result<()> {
        self.cri.stop_pod(&pod.id)?;
        self.cri.remove_pod(&pod.id)
    }

    /// MiB/s of `mib` MiB sent to a sink in a new pod of `handler`.
    fn throughput(&self, name: &str, handler: &str, mib: u64) -> Result<f64> {
        let spec = self.spec(name)?;
        let pod = self.cri.run_pod(&spec, handler)?;
        let ip = self.cri.pod_ip(&pod.id)?;
        let port = SINK_PORT.to_string();
        let c =
            self.cri
                .create_container(&pod, "sink", IMAGE, &["husk-testprog", "sink", &port])?;
        self.cri.start_container(&c)?;
        let bytes = mib << 20;
        let addr: std::net::SocketAddr = format!("{ip}:{SINK_PORT}").parse()?;
        let secs = self.netns.run(move || -> Result<f64> {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut s = loop {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => return Err(e).context("connecting to the sink"),
                }
            };
            let chunk = vec![0x5au8; 1 << 20];
            let t = Instant::now();
            for _ in 0..(bytes >> 20) {
                s.write_all(&chunk)?;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            let secs = t.elapsed().as_secs_f64();
            if answer.trim() != bytes.to_string() {
                bail!("the sink got {answer:?} bytes of {bytes}");
            }
            Ok(secs)
        })??;
        self.remove(&pod)?;
        Ok(mib as f64 / secs)
    }
}

/// Whether `GET /` on `ip:80` from the namespace answers 200.
fn http_ok(netns: &NetNs, ip: &str) -> Result<bool> {
    let addr: std::net::SocketAddr = format!("{ip}:80").parse()?;
    netns.run(move || {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.starts_with("HTTP/1.") && out.contains(" 200 ")
    })
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    runs: usize,
    mib: u64,
    husk_pod_to_http_median_s: f64,
    runc_pod_to_http_median_s: f64,
    pod_to_http_ratio_husk_over_runc: f64,
    husk_throughput_median_mib_s: f64,
    runc_throughput_median_mib_s: f64,
    throughput_ratio_husk_over_runc: f64,
    husk_pod_to_http_s: Vec<f64>,
    runc_pod_to_http_s: Vec<f64>,
    husk_throughput_mib_s: Vec<f64>,
    runc_throughput_mib_s: Vec<f64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_kvm();
    let artifacts = Artifacts::locate()?;
    let dir = TestDir::new("bench-pod")?;
    std::fs::create_dir_all(&args.template_dir)?;
    let netns = NetNs::new(&format!("husk-bench-pod-{}", std::process::id()))?;
    let c = Containerd::start_cri(&artifacts, dir.path(), &args.template_dir, &netns)?;
    c.import_test_image()?;
    let cri = Cri::connect(&c.socket)?;
    let b = Bench {
        cri,
        netns,
        dir,
        _c: c,
    };
    println!(
        "pod benchmark: husk vs runc through CRI, {} pods each, one private containerd, CNI bridge in its own network namespace",
        args.runs
    );
    // Warm-up, not measured: husk's template, both runtimes' first pod.
    for h in ["husk", "runc"] {
        let t = Instant::now();
        let (_, pod, _) = b.start_http_pod(&format!("warm-{h}"), h)?;
        b.remove(&pod)?;
        println!("warm-up {h} pod: {:.2} s", t.elapsed().as_secs_f64());
    }
    let (mut husk_start, mut runc_start) = (Vec::new(), Vec::new());
    let (mut husk_tput, mut runc_tput) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        let start = |h: &str| -> Result<f64> {
            let (s, pod, _) = b.start_http_pod(&format!("{h}-{i}"), h)?;
            b.remove(&pod)?;
            Ok(s)
        };
        let hs = start("husk")?;
        let rs = start("runc")?;
        let ht = b.throughput(&format!("husk-tput-{i}"), "husk", args.mib)?;
        let rt = b.throughput(&format!("runc-tput-{i}"), "runc", args.mib)?;
        println!(
            "run {i}: pod to first HTTP answer: husk {hs:.3} s, runc {rs:.3} s; TCP to the pod: husk {ht:.3} MiB/s, runc {rt:.1} MiB/s"
        );
        husk_start.push(hs);
        runc_start.push(rs);
        husk_tput.push(ht);
        runc_tput.push(rt);
    }
    let hs = median(&mut husk_start.clone());
    let rs = median(&mut runc_start.clone());
    let ht = median(&mut husk_tput.clone());
    let rt = median(&mut runc_tput.clone());
    let report = Report {
        bench: "pod",
        runs: args.runs,
        mib: args.mib,
        husk_pod_to_http_median_s: hs,
        runc_pod_to_http_median_s: rs,
        pod_to_http_ratio_husk_over_runc: ratio(hs, rs),
        husk_throughput_median_mib_s: ht,
        runc_throughput_median_mib_s: rt,
        throughput_ratio_husk_over_runc: ratio(ht, rt),
        husk_pod_to_http_s: husk_start,
        runc_pod_to_http_s: runc_start,
        husk_throughput_mib_s: husk_tput,
        runc_throughput_mib_s: runc_tput,
    };
    println!(
        "pod to first HTTP answer: husk {hs:.3} s, runc {rs:.3} s (median), husk/runc {:.2}",
        report.pod_to_http_ratio_husk_over_runc
    );
    println!(
        "TCP throughput into the pod ({} MiB): husk {ht:.3} MiB/s, runc {rt:.1} MiB/s (median), husk/runc {:.3}",
        args.mib, report.throughput_ratio_husk_over_runc
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
