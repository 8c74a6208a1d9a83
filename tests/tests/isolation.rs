//! Containers cannot reach vsock, and a process's streams take exactly the
//! agent's connection.
//!
//! vsock is the guest's channel to the host: the agent's API listens on it
//! and every process's stdio travels over it. Under a private containerd:
//! a static probe (`husk-testprog vsock-probe`) tries every way to get a
//! vsock socket in an unprivileged container with its own seccomp profile,
//! in an exec there, and in a privileged container and an exec there: all
//! must be refused with EPERM, while the container's own profile stays
//! enforced; and a read-only volume refuses the privileged container's
//! writes even after it remounts its view read-write. Then, from the guest side (the agent's StreamCheck connects
//! out from inside the guest), connections to host ports whose stream is
//! already connected and to ports no stream was given are refused, and the
//! container's output arrives intact.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use husk_e2e::{
    containerd::{Containerd, Events, IMAGE},
    describe, require_kvm, text, Artifacts, TestDir,
};
use husk_protocols::{
    agent::{stream_check_request::Direction, StreamCheckRequest},
    connect_agent,
};

/// The first line of `/proc/self/status` for `field` in `report`
/// (e.g. "Seccomp_filters"), its value trimmed.
fn status_field<'a>(report: &'a str, field: &str) -> Option<&'a str> {
    report
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(str::trim)
}

/// Checks a probe report: every attempt refused with EPERM, io_uring's
/// socket operation included.
fn assert_refused(what: &str, report: &str) {
    for line in [
        "socket(AF_VSOCK, SOCK_STREAM): EPERM",
        "socket(AF_VSOCK, SOCK_SEQPACKET): EPERM",
        "socket(AF_VSOCK, SOCK_DGRAM): EPERM",
        "inherited vsock descriptors: 0",
        "vsock-probe: all refused",
        "rc=0",
    ] {
        assert!(report.contains(line), "{what}: {line:?} in:\n{report}");
    }
    assert!(
        report.contains("io_uring socket(AF_VSOCK): EPERM"),
        "{what}: io_uring's IORING_OP_SOCKET refused in:\n{report}"
    );
}

/// Runs a detached container `id` whose init is the probe: it writes its
/// report to `/out/<id>.txt` (a bind mount of `out`), then sleeps; returns
/// the report.
fn run_probe_container(c: &Containerd, out: &Path, id: &str, extra: &[&str]) -> String {
    let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
    let report = format!("/out/{id}.txt");
    let mut args = c.run_args();
    args.extend(["-d", "--mount", &mount].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(
        [
            IMAGE,
            id,
            "husk-testprog",
            "vsock-probe",
            "--report",
            &report,
            "--then-sleep",
        ]
        .map(String::from),
    );
    let o = c.ctr(&args).expect("ctr run");
    assert!(o.status.success(), "{}\n{}", describe(&o), c.log());
    let file = out.join(format!("{id}.txt"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !file.exists() {
        assert!(
            Instant::now() < deadline,
            "{id}'s init wrote no report\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::read_to_string(&file).expect("report")
}

/// The probe as an exec in container `id`.
fn exec_probe(c: &Containerd, events: &Events, id: &str) -> String {
    let o = c
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "probe",
            id,
            "husk-testprog",
            "vsock-probe",
        ])
        .expect("ctr task exec");
    if !o.status.success() {
        let console = std::fs::read_to_string(c.pod_dir(id).join("serial.log")).unwrap_or_default();
        let tasks = c.ctr(&["task", "ls"]).map(|o| text(&o.stdout));
        let exit = events.wait_for(
            |l| l.contains("/tasks/exit") && l.contains(&format!("\"{id}\"")),
            Duration::from_secs(5),
        );
        panic!(
            "{}\ntasks: {tasks:?}\nexits: {exit:?}\n\
             console (HUSK_E2E_SERIAL=1 keeps it):\n{console}",
            describe(&o),
        );
    }
    text(&o.stdout)
}

#[test]
fn containers_cannot_reach_vsock_nor_write_read_only_volumes() {
    require_kvm();
    let artifacts = Artifacts::locate().expect("artifacts");
    let dir = TestDir::new("isolation").expect("dir");
    let templates = TestDir::new("isolation-templates").expect("dir");
    let c = Containerd::start(&artifacts, dir.path(), templates.path()).expect("containerd");
    c.import_test_image().expect("image");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("out dir");
    let events = c.events().expect("events");

    // 1. Unprivileged, with the container's own seccomp profile (ctr's
    //    default, containerd's): init and an exec.
    let init = run_probe_container(&c, &out, "u1", &["--seccomp"]);
    assert_refused("unprivileged init", &init);
    let exec = exec_probe(&c, &events, "u1");
    assert_refused("exec in the unprivileged container", &exec);
    // The container's own profile is still enforced, for the init and for
    // the exec: one filter, the profile (the vsock refusal is the guest
    // kernel's, not a filter).
    for (what, report) in [("init", &init), ("exec", &exec)] {
        assert_eq!(
            status_field(report, "Seccomp"),
            Some("2"),
            "{what}:\n{report}"
        );
        assert_eq!(
            status_field(report, "Seccomp_filters"),
            Some("1"),
            "{what}: the container's profile:\n{report}"
        );
    }

    // 2. Privileged: every capability, no seccomp profile, io_uring offered
    //    (so its socket operation is tried and must be refused as well).
    //    It also gets a read-only volume.
    let volume = dir.path().join("volume");
    std::fs::create_dir(&volume).expect("volume dir");
    std::fs::write(volume.join("config"), "v1\n").expect("write");
    let ro = format!(
        "type=bind,src={},dst=/ro,options=rbind:ro",
        volume.display()
    );
    let init = run_probe_container(&c, &out, "p1", &["--privileged", "--mount", &ro]);
    assert_refused("privileged init", &init);
    let exec = exec_probe(&c, &events, "p1");
    assert_refused("exec in the privileged container", &exec);
    for (what, report) in [("init", &init), ("exec", &exec)] {
        assert_eq!(
            status_field(report, "Seccomp"),
            Some("0"),
            "{what}:\n{report}"
        );
        let cap_eff = status_field(report, "CapEff").expect("CapEff");
        assert!(
            u64::from_str_radix(cap_eff, 16).is_ok_and(|c| c & (1 << 21) != 0),
            "{what}: privileged (CAP_SYS_ADMIN) in:\n{report}"
        );
    }

    // 3. A read-only volume stays read-only even to guest root: the
    //    privileged container can remount its own view read-write, but the
    //    pod's share refuses the write on the host side.
    let o = c
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "ro",
            "p1",
            "sh",
            "-c",
            "cat /ro/config; echo x > /ro/config && echo wrote-ro; \
             mount -o remount,rw /ro && echo remounted; \
             echo x > /ro/config && echo wrote; echo x > /ro/new && echo created; \
             echo devices:; ls /dev; true",
        ])
        .expect("ctr task exec");
    assert!(o.status.success(), "{}", describe(&o));
    let out = text(&o.stdout);
    assert!(out.starts_with("v1\n"), "the volume is readable: {out}");
    assert!(
        !out.contains("wrote-ro"),
        "the container's view is read-only: {out}"
    );
    assert!(
        out.contains("remounted"),
        "guest root remounts its view: {out}"
    );
    assert!(
        !out.contains("wrote") && !out.contains("created"),
        "the share refuses guest root's writes: {out}\n{}",
        text(&o.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(volume.join("config")).expect("volume"),
        "v1\n"
    );
    assert!(
        !volume.join("new").exists(),
        "nothing created in the volume"
    );
    // 4. `--privileged` lists the host's devices in the spec; none of the
    //    host's disks reaches the guest (the spec policy drops them, and
    //    says so in the log).
    let devices: Vec<&str> = out
        .split("devices:\n")
        .nth(1)
        .expect("the device listing")
        .lines()
        .collect();
    assert!(devices.contains(&"null"), "{devices:?}");
    let host_disks: Vec<String> = std::fs::read_dir("/sys/block")
        .expect("/sys/block")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!host_disks.is_empty());
    for disk in &host_disks {
        assert!(
            !devices.contains(&disk.as_str()),
            "the host's {disk} in a privileged container: {devices:?}"
        );
    }
    assert!(
        c.log().contains("host device(s) the guest does not have"),
        "the spec policy's note in the shim's log"
    );

    for id in ["u1", "p1"] {
        c.kill_and_remove(id).expect("kill and remove");
    }
    c.assert_nothing_left();
}

/// The pod directory's `vsock.sock_<port>` listeners (streams still
/// waiting for their connection).
fn stream_listeners(pod: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(pod)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vsock.sock_"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_stream_takes_only_its_own_connection() {
    require_kvm();
    let artifacts = Artifacts::locate().expect("artifacts");
    let dir = TestDir::new("isolation-streams").expect("dir");
    let templates = TestDir::new("isolation-streams-templates").expect("dir");
    let c = Containerd::start(&artifacts, dir.path(), templates.path()).expect("containerd");
    c.import_test_image().expect("image");

    // A container that waits, then writes 4 MiB the test can check. Its
    // stdin, stdout and stderr are the pod's first streams: host ports
    // 10000, 10001 and 10002.
    const BIG: usize = 4 << 20;
    let mut args = c.run_args();
    args.extend(["--rm", IMAGE, "s1", "sh", "-c"].map(String::from));
    args.push(format!("sleep 15; husk-testprog rand {BIG} 5"));
    let child = c.spawn_ctr(&args, Stdio::null()).expect("ctr run");
    c.wait_status("s1", "RUNNING", Duration::from_secs(120))
        .expect("s1 runs");
    let pod = c.pod_dir("s1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stream_listeners(&pod).is_empty() {
        assert!(
            Instant::now() < deadline,
            "every stream of s1 has its connection: {:?} still listen",
            stream_listeners(&pod)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // From inside the guest: connections to the three ports in use and to
    // three no stream was given. Each is refused; none reaches the FIFOs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let refusals = rt.block_on(async {
        let agent = connect_agent(&pod.join("vsock.sock"), Duration::from_secs(30))
            .await
            .expect("agent client");
        let mut refusals = Vec::new();
        for port in 10_000..10_006u32 {
            let mut req = StreamCheckRequest::new();
            req.direction = Direction::FROM_GUEST.into();
            req.port = port;
            req.bytes = 4096;
            req.seed = u64::from(port);
            req.timeout_ms = 10_000;
            let r = agent
                .stream_check(ttrpc::context::with_timeout(30_000_000_000), &req)
                .await;
            refusals.push((port, r.map(|r| r.bytes).map_err(|e| e.to_string())));
        }
        refusals
    });
    for (port, r) in &refusals {
        let err = r.as_ref().expect_err(&format!(
            "a guest connection to host port {port} is refused"
        ));
        assert!(
            err.contains(&format!("connecting to host vsock port {port}")),
            "port {port}: refused at connect: {err}"
        );
    }

    let o = child.wait_with_output().expect("ctr run");
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(o.stdout.len(), BIG, "all of stdout arrived");
    assert!(
        o.stdout == husk_testprog::bytes(5, BIG),
        "stdout arrived intact"
    );
    assert!(o.stderr.is_empty(), "stderr: {}", text(&o.stderr));
    c.assert_nothing_left();
}
