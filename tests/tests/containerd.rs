//! containerd drives husk through the real `ctr`: a private containerd
//! (own root, state and socket), a busybox image built and imported
//! locally, and `ctr run --runtime io.containerd.husk.v2`. Each `ctr run`
//! is a pod VM restored from the template, so the suite keeps their number
//! small and checks several things per container.

use std::{
    io::Write,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use husk_e2e::{
    containerd::{Containerd, Events, IMAGE},
    describe,
    hostmem::host_memory,
    process_tree, require_kvm, text, Artifacts, TestDir,
};

fn run(c: &Containerd, extra: &[&str], id: &str, cmd: &[&str]) -> Output {
    let mut args: Vec<String> = c.run_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(IMAGE.into());
    args.push(id.into());
    args.extend(cmd.iter().map(|s| s.to_string()));
    c.ctr(&args).expect("ctr run")
}

/// A shell command line running `ctr` with `args` against `c`.
fn ctr_line(c: &Containerd, args: &[String]) -> String {
    let cmd = c.ctr_command::<&str>(&[]);
    let mut line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    line.extend(args.iter().cloned());
    line.join(" ")
}

/// Runs shell `line` in a fresh pseudo-terminal of 45 rows and 123 columns
/// (util-linux `script`), returning its output and exit status.
fn in_terminal(c: &Containerd, line: &str) -> Output {
    std::process::Command::new("script")
        .args([
            "-qec",
            &format!("stty cols 123 rows 45; {line}"),
            "/dev/null",
        ])
        .env("PATH", c.path_env())
        .stdin(Stdio::null())
        .output()
        .expect("script (package bsdutils)")
}

fn task_status(c: &Containerd, id: &str) -> String {
    c.task_status(id).expect("ctr task ls")
}

#[test]
fn ctr_runs_containers_in_husk_microvms() {
    require_kvm();
    let artifacts = Artifacts::locate().expect("artifacts");
    let dir = TestDir::new("containerd").expect("dir");
    let templates = TestDir::new("containerd-templates").expect("dir");
    let c = Containerd::start(&artifacts, dir.path(), templates.path()).expect("containerd");
    c.import_test_image().expect("image");

    // 1. Output and a clean exit (the first run also makes the template).
    let started = Instant::now();
    let o = run(&c, &["--rm"], "c1", &["echo", "hello"]);
    assert!(o.status.success(), "{}\n{}", describe(&o), c.log());
    assert_eq!(text(&o.stdout), "hello\n");
    eprintln!("first ctr run (template made): {:?}", started.elapsed());

    // 2. stdin to EOF, 16 MiB of stdout intact and in full, stderr, an
    //    exit code. The data is made in user space (husk-testprog) from a
    //    seed, so every byte is checked.
    const BIG: usize = 16 << 20;
    let started = Instant::now();
    let mut args = c.run_args();
    args.extend(["--rm", IMAGE, "c2", "sh", "-c"].map(String::from));
    args.push(format!(
        "cat; echo to-stderr >&2; husk-testprog rand {BIG} 7; exit 42"
    ));
    let mut child = c.spawn_ctr(&args, Stdio::piped()).expect("ctr run");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"piped\n")
        .expect("write stdin");
    let o = child.wait_with_output().expect("ctr run");
    eprintln!("ctr run with 16 MiB out: {:?}", started.elapsed());
    assert_eq!(o.status.code(), Some(42), "{}", describe(&o));
    assert!(o.stdout.starts_with(b"piped\n"), "{}", describe(&o));
    assert_eq!(text(&o.stderr), "to-stderr\n");
    let big = &o.stdout[6..];
    assert_eq!(big.len(), BIG, "all of stdout arrived");
    assert!(
        big == husk_testprog::bytes(7, BIG).as_slice(),
        "stdout arrived intact"
    );

    // 3. A terminal: `ctr run -t` under `script` (ctr needs a terminal of
    //    its own); the size set on the outer terminal reaches the container
    //    through ResizePty.
    let o = in_terminal(
        &c,
        &format!(
            "{} -t --rm {IMAGE} c3 sh -c 'tty; stty size; exit 3'",
            ctr_line(&c, &c.run_args())
        ),
    );
    assert_eq!(o.status.code(), Some(3), "{}", describe(&o));
    let out = text(&o.stdout);
    assert!(out.contains("/dev/pts/0"), "a terminal inside: {out}");
    assert!(out.contains("45 123"), "the size arrived: {out}");

    // 4. A detached container: exec, exit codes, ps, pause/resume, a bind
    //    mount both ways, kill, delete.
    let host_dir = dir.path().join("bind");
    std::fs::create_dir(&host_dir).expect("bind dir");
    std::fs::write(host_dir.join("from-host"), "host says hi\n").expect("write");
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        host_dir.display()
    );
    let events = c.events().expect("ctr events");
    // The OCI spec is enforced as containerd wrote it: environment, working
    // directory, read-only root, capabilities, seccomp, rlimits, masked and
    // read-only paths, the user of an exec.
    let o = run(
        &c,
        &[
            "-d",
            "--mount",
            &mount,
            "--env",
            "FOO=bar",
            "--cwd",
            "/tmp",
            "--read-only",
            "--seccomp",
            "--cap-drop",
            "CAP_CHOWN",
        ],
        "c4",
        &["sleep", "1000"],
    );
    assert!(o.status.success(), "{}\n{}", describe(&o), c.log());
    assert_eq!(task_status(&c, "c4"), "RUNNING");
    let exec = |id: &str, script: &str| {
        c.ctr(&["task", "exec", "--exec-id", id, "c4", "sh", "-c", script])
            .expect("ctr task exec")
    };
    let o = exec(
        "e1",
        "cat /data/from-host; echo from-guest > /data/from-guest",
    );
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(text(&o.stdout), "host says hi\n");
    assert_eq!(
        std::fs::read_to_string(host_dir.join("from-guest")).expect("written inside"),
        "from-guest\n"
    );
    // A volume keeps close-to-open consistency (only the image's files
    // keep the guest's page cache across opens): the host rewrites a file
    // the container has read, and the next open reads the new bytes.
    std::fs::write(host_dir.join("from-host"), "host says yo\n").expect("rewrite");
    let o = exec(
        "spec",
        "cat /data/from-host; echo FOO=$FOO; echo cwd=$(pwd); grep -E '^(CapEff|Seccomp|Seccomp_filters):' /proc/self/status; \
         echo nofile=$(ulimit -Sn)/$(ulimit -Hn); touch /new 2>/dev/null && echo root=rw || echo root=ro; \
         grep -E '^Seccomp(_filters)?:' /proc/1/status | tr '\\t' ' '; \
         echo timer_list=$(wc -c < /proc/timer_list); grep ' /proc/sys ' /proc/mounts | cut -d' ' -f4",
    );
    assert!(o.status.success(), "{}", describe(&o));
    let out = text(&o.stdout);
    for want in [
        "host says yo\n",
        "FOO=bar\n",
        "cwd=/tmp\n",
        // ctr's default set (docker's 0xa80425fb) without CAP_CHOWN (bit 0).
        "CapEff:\t00000000a80425fa\n",
        // The exec runs under the container's seccomp profile, as the init:
        // one filter each.
        "Seccomp:\t2\n",
        "Seccomp_filters:\t1\n",
        "Seccomp: 2\n",
        "Seccomp_filters: 1\n",
        // The spec's RLIMIT_NOFILE (containerd's default, 1024 both); the
        // guest kernel would leave the hard limit at 4096.
        "nofile=1024/1024\n",
        "root=ro\n",
        // Masked: /dev/null over it (the guest kernel has no /proc/kcore).
        "timer_list=0\n",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
    assert!(
        out.lines()
            .last()
            .is_some_and(|l| l.split(',').any(|o| o == "ro")),
        "/proc/sys mounted read-only:\n{out}"
    );
    let o = c
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "user",
            "--user",
            "1000",
            "c4",
            "id",
        ])
        .expect("ctr task exec --user");
    assert!(o.status.success(), "{}", describe(&o));
    let id = text(&o.stdout);
    assert!(id.starts_with("uid=1000(app) gid=1000(app)"), "{id}");
    assert_eq!(exec("e2", "exit 42").status.code(), Some(42));
    let o = in_terminal(
        &c,
        &format!(
            "{} -t --exec-id t1 c4 sh -c 'tty; stty size'",
            ctr_line(&c, &["task".into(), "exec".into()])
        ),
    );
    assert!(o.status.success(), "{}", describe(&o));
    assert!(text(&o.stdout).contains("45 123"), "{}", describe(&o));
    assert_eq!(exec("e3", "kill -9 $$").status.code(), Some(137));
    let since = Instant::now();
    let o = c.ctr(&["task", "ps", "c4"]).expect("ps");
    eprintln!("ctr task ps: {:?}", since.elapsed());
    assert!(o.status.success(), "{}", describe(&o));
    assert!(text(&o.stdout).lines().count() >= 2, "{}", describe(&o));
    paused_container_stands_still(&c, &host_dir);
    metrics_update_and_oom(&c, &events);
    let before_kill = events.mark();
    c.kill_and_remove("c4").expect("kill, stop and remove c4");
    // The container's own exit (its id is the container's; an exec's
    // would carry the exec id), after the kill, with SIGKILL's status.
    events
        .wait_for_since(
            before_kill,
            |l| {
                l.contains("/tasks/exit")
                    && l.contains("\"container_id\":\"c4\"")
                    && l.contains("\"id\":\"c4\"")
                    && l.contains("\"exit_status\":137")
            },
            Duration::from_secs(30),
        )
        .expect("c4's own TaskExit, status 137, after the kill");
    // Every event of the Task API reached containerd for c4.
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/oom",
        "/tasks/delete",
    ] {
        events
            .wait_for(
                |l| l.contains(topic) && l.contains("\"c4\""),
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("{topic} for c4: {e}"));
    }

    // 5. A missing binary: a clear error, nothing left.
    let o = run(&c, &["--rm"], "c5", &["/nonexistent"]);
    assert!(!o.status.success(), "{}", describe(&o));
    assert!(
        describe(&o).contains("nonexistent"),
        "the error names the binary: {}",
        describe(&o)
    );
    // ctr's --rm and the shim clean up on their own: nothing is removed
    // by hand before looking.
    let o = c.ctr(&["containers", "ls", "-q"]).expect("ls");
    assert_eq!(text(&o.stdout), "", "no container left");
    c.assert_nothing_left();
}

/// Pause freezes c4 and resume thaws it, shown by a counter a process in
/// it writes to the bind mount: it stands still while paused and moves
/// again after resume (the status column alone is the shim's bookkeeping).
fn paused_container_stands_still(c: &Containerd, host_dir: &std::path::Path) {
    let tick_file = host_dir.join("tick");
    let tick = || -> Option<u64> {
        // The writer truncates then writes: an empty read is retried.
        (0..50).find_map(|_| {
            let v = std::fs::read_to_string(&tick_file)
                .ok()?
                .trim()
                .parse()
                .ok();
            if v.is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            v
        })
    };
    let moved_past = |than: u64, within: Duration| -> Option<u64> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = tick().filter(|&v| v > than) {
                return Some(v);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let o = c
        .ctr(&[
            "task",
            "exec",
            "--detach",
            "--exec-id",
            "ticker",
            "c4",
            "sh",
            "-c",
            "i=0; while [ ! -e /data/stop ]; do i=$((i+1)); echo $i > /data/tick; done",
        ])
        .expect("ctr task exec ticker");
    assert!(o.status.success(), "{}", describe(&o));
    let first = moved_past(0, Duration::from_secs(60)).expect("the ticker counts");
    let counted = moved_past(first, Duration::from_secs(30)).expect("the ticker keeps counting");

    let o = c.ctr(&["task", "pause", "c4"]).expect("pause");
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(task_status(c, "c4"), "PAUSED");
    // The file as the freeze left it: possibly empty, when the freeze came
    // between the writer's truncate and its write.
    let raw = || std::fs::read_to_string(&tick_file).unwrap_or_default();
    let at_pause = raw();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        raw(),
        at_pause,
        "the counter moved while the container was paused"
    );
    let at_pause: u64 = at_pause.trim().parse().unwrap_or(counted);

    let o = c.ctr(&["task", "resume", "c4"]).expect("resume");
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(task_status(c, "c4"), "RUNNING");
    moved_past(at_pause, Duration::from_secs(30)).expect("the counter moves again after resume");
    std::fs::write(host_dir.join("stop"), b"").expect("stop the ticker");
}

/// On the running container c4: `ctr task metrics` shows the guest's
/// cgroup numbers; Update sets a memory limit that the metrics then show;
/// an exec allocating beyond it is OOM-killed (137) with TaskOOM published,
/// and the container keeps running.
fn metrics_update_and_oom(c: &Containerd, events: &Events) {
    let o = c.ctr(&["task", "metrics", "c4"]).expect("ctr task metrics");
    assert!(o.status.success(), "{}", describe(&o));
    let table = text(&o.stdout);
    for row in ["pids.current", "memory.usage_in_bytes", "cpuacct.usage"] {
        assert!(table.contains(row), "{row} in:\n{table}");
    }
    let m = c.metrics("c4").expect("metrics");
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    // sleep (the init) at least; ps lists the same processes.
    let pids = n(&m["pids"]["current"]);
    let ps = c.ctr_ok(&["task", "ps", "c4"]).expect("ps");
    assert_eq!(
        pids,
        text(&ps.stdout).lines().skip(1).count() as u64,
        "pids.current vs ctr task ps:\n{m:#}\n{}",
        text(&ps.stdout)
    );
    assert!(n(&m["memory"]["usage"]["usage"]) > 0, "memory usage: {m:#}");
    assert!(
        n(&m["memory"]["usage"]["limit"]) > 1 << 62,
        "no limit yet: {m:#}"
    );
    assert!(n(&m["cpu"]["usage"]["total"]) > 0, "cpu time: {m:#}");

    // Update: 24 MiB for the running container.
    let limit: u64 = 24 << 20;
    c.update_resources("c4", &serde_json::json!({"memory": {"limit": limit}}))
        .expect("update");
    let m = c.metrics("c4").expect("metrics");
    assert_eq!(n(&m["memory"]["usage"]["limit"]), limit, "{m:#}");
    // Nonsense is refused with a clear error and changes nothing.
    let bad = c
        .update_resources("c4", &serde_json::json!({"memory": {"limit": "lots"}}))
        .expect_err("a string limit");
    assert!(
        format!("{bad:#}").contains("invalid LinuxResources"),
        "{bad:#}"
    );

    // OOM: an exec allocating 64 MiB is killed, and containerd hears of it.
    let o = c
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "oom",
            "c4",
            "husk-testprog",
            "alloc",
            "64",
        ])
        .expect("ctr task exec");
    assert_eq!(o.status.code(), Some(137), "{}", describe(&o));
    let oom = events
        .wait_for(|l| l.contains("/tasks/oom"), Duration::from_secs(30))
        .expect("TaskOOM");
    assert!(oom.contains("c4"), "{oom}");
    let m = c.metrics("c4").expect("metrics");
    assert!(n(&m["memory_oom_control"]["oom_kill"]) >= 1, "{m:#}");
    assert_eq!(task_status(c, "c4"), "RUNNING", "only the exec was killed");
}

#[test]
fn failures_are_clear_and_contained() {
    require_kvm();
    let artifacts = Artifacts::locate().expect("artifacts");
    let dir = TestDir::new("containerd-fail").expect("dir");
    let templates = TestDir::new("containerd-fail-templates").expect("dir");
    let mut c = Containerd::start(&artifacts, dir.path(), templates.path()).expect("containerd");
    c.import_test_image().expect("image");

    // A bystander that must keep running through everything below.
    let o = run(&c, &["-d"], "keep", &["sleep", "1000"]);
    assert!(o.status.success(), "{}\n{}", describe(&o), c.log());

    // A config.json that is JSON but not a valid OCI spec.
    let spec = c.ctr(&["oci", "spec"]).expect("ctr oci spec");
    let mut spec: serde_json::Value = serde_json::from_slice(&spec.stdout).expect("spec");
    spec["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
        .push(serde_json::json!({"type": "bogus"}));
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, serde_json::to_vec(&spec).expect("json")).expect("write");
    let mut args = c.run_args();
    args.extend([
        "--rm".into(),
        "-c".into(),
        bad.display().to_string(),
        "bad1".into(),
    ]);
    let o = c.ctr(&args).expect("ctr run -c");
    assert!(!o.status.success(), "{}", describe(&o));
    let e = text(&o.stderr);
    assert!(e.contains("config.json") && e.contains("bogus"), "{e}");

    // Root file systems that are missing or not directories.
    for (id, rootfs, why) in [
        ("bad2", "/nonexistent-rootfs", "No such file or directory"),
        ("bad3", "/etc/hostname", "Not a directory"),
    ] {
        let mut args = c.run_args();
        args.extend(["--rm", "--rootfs", rootfs, id, "true"].map(String::from));
        let o = c.ctr(&args).expect("ctr run --rootfs");
        assert!(!o.status.success(), "{}", describe(&o));
        let e = text(&o.stderr);
        assert!(e.contains(rootfs) && e.contains(why), "{e}");
    }

    // The VMM or the virtio-fs daemon killed: the task exits non-zero
    // within seconds, and --rm cleans up.
    for (id, victim) in [("d1", "vmm"), ("d2", "virtiofsd")] {
        let mut args = c.run_args();
        args.extend(["--rm", IMAGE, id, "sleep", "1000"].map(String::from));
        let mut child = c.spawn_ctr(&args, Stdio::null()).expect("ctr run");
        c.wait_status(id, "RUNNING", Duration::from_secs(120))
            .expect("running");
        let pid = c.pod_pid(id, victim).expect("pod pid");
        // SAFETY: plain kill(2) of a process this test's containerd started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let killed = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "ctr run {id} did not end after {victim} was killed"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        eprintln!(
            "{victim} killed: ctr run ended after {:?} with {status}",
            killed.elapsed()
        );
        // Every process of a pod whose VM died exits 255 (docs/architecture.md).
        assert_eq!(status.code(), Some(255), "the task of {id} exits 255");
        assert!(!c.pod_dir(id).exists(), "pod directory of {id} removed");
    }

    // The bystander is untouched.
    assert_eq!(task_status(&c, "keep"), "RUNNING");
    let o = c
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "keep",
            "echo",
            "still here",
        ])
        .expect("exec");
    assert_eq!(text(&o.stdout), "still here\n", "{}", describe(&o));

    // A forced delete of a task that has already exited returns at once,
    // as with runc (containerd's CRI deletes that way).
    let o = run(&c, &["-d"], "done", &["true"]);
    assert!(o.status.success(), "{}", describe(&o));
    c.wait_status("done", "STOPPED", Duration::from_secs(120))
        .expect("stopped");
    let t = Instant::now();
    let o = c
        .ctr(&["task", "rm", "-f", "done"])
        .expect("ctr task rm -f");
    assert!(o.status.success(), "{}", describe(&o));
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "ctr task rm -f of an exited task took {:?}",
        t.elapsed()
    );
    c.ctr_ok(&["container", "rm", "done"])
        .expect("container rm");

    // containerd restarts (an upgrade, a crash): it reconnects to the
    // running shim through the bundle's address file, the container keeps
    // running and serving, and its exit still reaches containerd as an
    // event.
    c.restart().expect("restart containerd");
    assert_eq!(task_status(&c, "keep"), "RUNNING", "{}", c.log());
    let o = c
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e2",
            "keep",
            "echo",
            "after restart",
        ])
        .expect("exec");
    assert_eq!(text(&o.stdout), "after restart\n", "{}", describe(&o));
    let events = c.events().expect("ctr events");
    c.kill_and_remove("keep")
        .expect("kill, stop and remove keep");
    events
        .wait_for(
            |l| l.contains("/tasks/exit") && l.contains("keep"),
            Duration::from_secs(30),
        )
        .expect("TaskExit after the restart");
    c.assert_nothing_left();
}

/// Bytes of the files under `dir`, recursively.
fn du(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => du(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `HUSK_CYCLES` (default 5; `make soak` sets 50) create/run/delete cycles
/// leave nothing behind, a pod costs no more host memory in the last cycle
/// than in the first (its own processes and guest RAM, each page once,
/// measured at the same point of the same workload; tests running beside
/// this one do not count), and husk's files (templates, pod state) do not
/// grow once the template exists.
#[test]
fn run_delete_cycles_leave_nothing_behind() {
    require_kvm();
    let cycles: usize = std::env::var("HUSK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let artifacts = Artifacts::locate().expect("artifacts");
    let dir = TestDir::new("containerd-cycles").expect("dir");
    let templates = TestDir::new("containerd-cycles-templates").expect("dir");
    let c = Containerd::start(&artifacts, dir.path(), templates.path()).expect("containerd");
    c.import_test_image().expect("image");
    let mut first = None;
    for i in 0..cycles {
        let id = format!("cycle{i}");
        let started = Instant::now();
        let mut args = c.run_args();
        args.extend(["--rm", IMAGE, &id, "sh", "-c", "echo $((6 * 7)); sleep 3"].map(String::from));
        let mut child = c.spawn_ctr(&args, Stdio::null()).expect("ctr run");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).expect("read");
        assert_eq!(line, "42\n", "{}", c.log());
        // The pod, at the same point every cycle: its output is out.
        let shims = c.shims();
        assert_eq!(shims.len(), 1, "one pod, one shim: {shims:?}");
        let pod = host_memory(&process_tree(shims[0]));
        let o = child.wait_with_output().expect("ctr run");
        assert!(o.status.success(), "{}\n{}", describe(&o), c.log());
        c.assert_nothing_left();
        let files = du(templates.path()) + du(&c.pods);
        eprintln!(
            "cycle {i}: {:?}, pod host memory {} KiB ({} KiB processes + {} KiB guest RAM), husk files {} KiB",
            started.elapsed(),
            pod.total_kib(),
            pod.processes_pss_kib,
            pod.guest_ram_kib,
            files / 1024
        );
        assert_eq!(pod.guest_ram_files, 1, "one guest RAM per pod");
        let (first_pod, first_files) = first.get_or_insert((pod.clone(), files)).clone();
        assert_eq!(files, first_files, "husk's files grew in cycle {i}");
        if i + 1 == cycles {
            let grown = pod.total_kib().saturating_sub(first_pod.total_kib());
            assert!(
                grown < 16 * 1024,
                "a pod costs {} KiB more after {cycles} cycles ({first_pod:?} -> {pod:?})",
                grown
            );
        }
    }
    let o = c.ctr(&["containers", "ls", "-q"]).expect("ls");
    assert_eq!(text(&o.stdout), "", "no containers left");
}
