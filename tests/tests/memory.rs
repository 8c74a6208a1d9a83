//! Free page reporting end to end, through the real `ctr`: memory a
//! container frees goes back to the host within seconds (the guest memfd's
//! allocated size and husk-vmm's RSS fall back), memory that is still in
//! use is untouched (a 64 MiB buffer keeps its checksum; 64 MiB files cross
//! virtio-fs intact both ways afterwards, the daemon mapping the same
//! memfd), the pod VM was restored from a template that carries the balloon
//! and still reports; with `free_page_reporting = false` the freed memory
//! stays allocated, which shows the feature is what returns it.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    process::{Child, Stdio},
    sync::mpsc::{channel, Receiver},
    time::{Duration, Instant},
};

use husk_e2e::{
    containerd::{Containerd, IMAGE},
    describe,
    hostmem::host_memory,
    require_kvm, text, Artifacts, TestDir,
};

const MIB: u64 = 1 << 20;
/// The buffer a second process holds through the cycle.
const HOLD_MIB: u64 = 64;
/// The file that crosses virtio-fs each way.
const FILE_BYTES: usize = 64 << 20;

/// Guest RAM allocated on the host (the memfd, each page once) and
/// husk-vmm's resident set, bytes.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    memfd: u64,
    rss: u64,
}

fn footprint(vmm: i32) -> Footprint {
    let pid = u32::try_from(vmm).expect("pid");
    let mem = host_memory(&[pid]);
    assert_eq!(
        mem.guest_ram_files, 1,
        "husk-vmm {vmm} maps one guest memfd"
    );
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).expect("status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(husk_e2e::kib_value)
        .expect("VmRSS");
    Footprint {
        memfd: mem.guest_ram_kib * 1024,
        rss: rss_kib * 1024,
    }
}

/// One request on the pod VM's control API.
fn vmm_api(c: &Containerd, id: &str, request: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(c.pod_dir(id).join("api.sock")).expect("API socket");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    writeln!(s, "{request}").expect("request");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("answer");
    serde_json::from_str(&line).expect("JSON answer")
}

/// A `ctr task exec` left running, its output lines on a channel.
struct Exec {
    child: Child,
    lines: Receiver<String>,
    what: String,
}

impl Exec {
    fn start(c: &Containerd, id: &str, exec_id: &str, cmd: &[&str]) -> Self {
        let mut args = vec!["task", "exec", "--exec-id", exec_id, id];
        args.extend(cmd);
        let mut child = c
            .ctr_command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ctr task exec");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            what: cmd.join(" "),
        }
    }

    /// The next output line, within `limit`.
    fn line(&self, limit: Duration) -> String {
        self.lines
            .recv_timeout(limit)
            .unwrap_or_else(|e| panic!("no line from `{}` within {limit:?}: {e}", self.what))
    }
}

/// Waits until the footprint stops changing (two reads 1 s apart agree
/// within 1 MiB), at most `limit`; returns the last read.
fn settled(vmm: i32, limit: Duration) -> Footprint {
    let end = Instant::now() + limit;
    let mut last = footprint(vmm);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = footprint(vmm);
        if now.memfd.abs_diff(last.memfd) < MIB || Instant::now() > end {
            return now;
        }
        last = now;
    }
}

/// How much above the baseline counts as "back": 10% or 16 MiB.
fn slack(baseline: u64) -> u64 {
    (baseline / 10).max(16 * MIB)
}

/// A private containerd whose pods have 512 MiB (room for a 64 MiB
/// buffer, 256 MiB more and the guest's own), with `free_page_reporting`
/// as given, and the template made by a first container.
fn containerd(dir: &TestDir, templates: &TestDir, reporting: bool) -> Containerd {
    let artifacts = Artifacts::locate().expect("artifacts");
    let c = Containerd::start(&artifacts, dir.path(), templates.path()).expect("containerd");
    c.import_test_image().expect("image");
    c.set_husk("mem_mib", "512").expect("husk.toml");
    c.set_husk("free_page_reporting", &reporting.to_string())
        .expect("husk.toml");
    let mut args = c.run_args();
    args.extend(["--rm", IMAGE, "warm", "true"].map(String::from));
    let o = c.ctr(&args).expect("ctr run");
    assert!(o.status.success(), "{}\n{}", describe(&o), c.log());
    c
}

/// Starts container `id` (its pod VM restored from the template) with a
/// host directory at /data; returns the directory and husk-vmm's pid.
fn start_pod(c: &Containerd, dir: &TestDir, id: &str) -> (std::path::PathBuf, i32) {
    let host_dir = dir.path().join(id);
    std::fs::create_dir(&host_dir).expect("bind dir");
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        host_dir.display()
    );
    let mut args = c.run_args();
    args.extend(["-d", "--mount", &mount, IMAGE, id, "husk-testprog", "pause"].map(String::from));
    let o = c.ctr(&args).expect("ctr run");
    assert!(o.status.success(), "{}\n{}", describe(&o), c.log());
    let vmm = c.pod_pid(id, "vmm").expect("vmm pid");
    let log = std::fs::read_to_string(c.pod_dir(id).join("vmm.log")).unwrap_or_default();
    assert!(
        log.contains("restored from"),
        "the pod VM starts from the template (which carries the balloon):\n{log}"
    );
    (host_dir, vmm)
}

/// Touches `mib` MiB in a second process, SIGKILLs it, and reads the
/// footprint until `back` holds or 5 s have passed since the exit.
/// Returns the peak and that last footprint.
fn alloc_and_free(
    c: &Containerd,
    id: &str,
    vmm: i32,
    mib: u64,
    back: impl Fn(Footprint) -> bool,
) -> (Footprint, Footprint) {
    let started = Instant::now();
    let mut alloc = Exec::start(
        c,
        id,
        "alloc",
        &["husk-testprog", "alloc", &mib.to_string()],
    );
    assert_eq!(
        alloc.line(Duration::from_secs(900)),
        format!("allocated {mib} MiB")
    );
    eprintln!("{id}: {mib} MiB touched in {:?}", started.elapsed());
    let peak = footprint(vmm);
    let o = c
        .ctr(&["task", "kill", "--exec-id", "alloc", "-s", "SIGKILL", id])
        .expect("ctr task kill");
    assert!(o.status.success(), "{}", describe(&o));
    let status = alloc.child.wait().expect("alloc exec");
    assert_eq!(status.code(), Some(137), "SIGKILLed");
    let freed = Instant::now();
    let after = loop {
        let now = footprint(vmm);
        if back(now) || freed.elapsed() >= Duration::from_secs(5) {
            break now;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "{id}: peak {peak:?}, {:.1} s after the exit {after:?}",
        freed.elapsed().as_secs_f64()
    );
    (peak, after)
}

/// Kills and deletes container `id`.
fn stop_pod(c: &Containerd, id: &str) {
    let o = c
        .ctr(&["task", "kill", "-a", "-s", "SIGKILL", id])
        .expect("ctr task kill");
    assert!(o.status.success(), "{}", describe(&o));
    c.wait_status(id, "STOPPED", Duration::from_secs(120))
        .expect("stopped");
    let o = c.ctr(&["task", "delete", id]).expect("ctr task delete");
    assert!(o.status.success(), "{}", describe(&o));
    let o = c
        .ctr(&["container", "delete", id])
        .expect("ctr container delete");
    assert!(o.status.success(), "{}", describe(&o));
    assert!(
        !c.log().contains("failed to shutdown shim task"),
        "the shim shut down in time:\n{}",
        c.log()
    );
}

#[test]
fn freed_guest_memory_goes_back_to_the_host() {
    require_kvm();
    let dir = TestDir::new("memory").expect("dir");
    let templates = TestDir::new("memory-templates").expect("dir");
    let c = containerd(&dir, &templates, true);
    let id = "reporting";
    let (host_dir, vmm) = start_pod(&c, &dir, id);
    std::fs::write(host_dir.join("in"), husk_testprog::bytes(11, FILE_BYTES)).expect("in");

    // A process that holds 64 MiB of known contents through the cycle.
    let mut hold = Exec::start(
        &c,
        id,
        "hold",
        &["husk-testprog", "hold", &HOLD_MIB.to_string(), "3"],
    );
    let want = format!(
        "{:016x}",
        husk_testprog::checksum(&husk_testprog::bytes(
            3,
            usize::try_from(HOLD_MIB * MIB).expect("size")
        ))
    );
    assert_eq!(
        hold.line(Duration::from_secs(300)),
        format!("holding {want}")
    );
    let before = settled(vmm, Duration::from_secs(15));

    // 256 MiB touched and freed: back on the host within 5 s.
    let limit = slack(before.memfd);
    let (peak, after) = alloc_and_free(&c, id, vmm, 256, |now| {
        now.memfd <= before.memfd + limit && now.rss <= before.rss + limit
    });
    eprintln!("{id}: before {before:?}");
    assert!(
        peak.memfd >= before.memfd + 256 * MIB * 9 / 10,
        "the allocation reached the host: before {before:?}, peak {peak:?}"
    );
    assert!(
        after.memfd <= before.memfd + limit,
        "guest memfd back within {limit} bytes of {before:?} within 5 s: {after:?}"
    );
    assert!(
        after.rss <= before.rss + limit,
        "husk-vmm's RSS back within {limit} bytes of {before:?} within 5 s: {after:?}"
    );
    let balloon = &vmm_api(&c, id, r#"{"action":"balloon"}"#)["balloon"];
    assert_eq!(balloon["free_page_reporting"], true, "{balloon}");
    assert!(
        balloon["counters"]["reported_bytes"].as_u64().unwrap_or(0) >= 256 * MIB * 9 / 10,
        "the restored VM reported the freed memory: {balloon}"
    );
    assert_eq!(balloon["counters"]["bad_buffers"], 0, "{balloon}");

    // The held buffer never changed.
    let o = c
        .ctr(&["task", "kill", "--exec-id", "hold", "-s", "SIGUSR1", id])
        .expect("ctr task kill");
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(
        hold.line(Duration::from_secs(120)),
        format!("checked {want}"),
        "the 64 MiB buffer survived"
    );

    // Files through virtio-fs both ways, after the reclaim (the daemon
    // writes into and reads from the same memfd the balloon punched).
    let started = Instant::now();
    let o = c
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "files",
            id,
            "sh",
            "-c",
            &format!("husk-testprog rand {FILE_BYTES} 9 > /data/out && husk-testprog sum /data/in"),
        ])
        .expect("ctr task exec");
    assert!(o.status.success(), "{}", describe(&o));
    eprintln!(
        "{id}: 64 MiB each way through virtio-fs in {:?}",
        started.elapsed()
    );
    assert_eq!(
        text(&o.stdout),
        format!(
            "{:016x} {FILE_BYTES}\n",
            husk_testprog::checksum(&husk_testprog::bytes(11, FILE_BYTES))
        ),
        "the host's file arrived intact"
    );
    assert!(
        std::fs::read(host_dir.join("out")).expect("out") == husk_testprog::bytes(9, FILE_BYTES),
        "the guest's file arrived intact"
    );

    stop_pod(&c, id);
    let _ = hold.child.wait();
}

#[test]
fn without_reporting_freed_guest_memory_stays_allocated() {
    require_kvm();
    let dir = TestDir::new("memory-off").expect("dir");
    let templates = TestDir::new("memory-off-templates").expect("dir");
    let c = containerd(&dir, &templates, false);
    let id = "no-reporting";
    let (_, vmm) = start_pod(&c, &dir, id);
    let before = settled(vmm, Duration::from_secs(15));
    let mib = 64;
    let (_, after) = alloc_and_free(&c, id, vmm, mib, |_| false);
    assert!(
        after.memfd >= before.memfd + mib * MIB * 8 / 10,
        "without reporting the freed memory stays allocated: before {before:?}, after {after:?}"
    );
    let balloon = &vmm_api(&c, id, r#"{"action":"balloon"}"#)["balloon"];
    assert_eq!(balloon["free_page_reporting"], false, "{balloon}");
    assert_eq!(balloon["counters"]["reported_bytes"], 0, "{balloon}");
    stop_pod(&c, id);
}
