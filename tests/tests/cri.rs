//! Kubernetes pods through containerd's CRI gRPC API, called the way kubelet
//! calls it: a private containerd with its CRI plugin, husk's shipped
//! containerd drop-in (runtime handler `husk`) and a CNI bridge, all inside
//! a network namespace the test creates, so no pod traffic leaves it.

use std::time::Duration;

use k8s_cri::v1::{NamespaceMode, NamespaceOption};

use husk_e2e::{
    containerd::{IMAGE, PAUSE_IMAGE},
    cri::{setup, Setup},
    netns::NetNs,
    require_kvm,
    stream::{forwarded, Stream, STDERR, STDIN, STDOUT},
};

/// The harness itself, on runc: CRI answers, sees both images, and a runc
/// pod gets an IP on the CNI bridge inside the test's namespace. (husk's
/// own pods are the other tests; this one tells a broken harness from a
/// broken husk.)
#[test]
fn cri_harness_runs_a_runc_pod() {
    let s = setup("cri-runc");
    let v = s.cri.version().expect("version");
    assert_eq!(v.runtime_name, "containerd");
    let tags = s.cri.image_tags().expect("images");
    for want in [IMAGE, PAUSE_IMAGE] {
        assert!(tags.iter().any(|t| t == want), "{want} in {tags:?}");
    }
    let pod = s.cri.run_pod(&s.pod_spec("web"), "runc").expect("pod");
    let ip = s.cri.pod_ip(&pod.id).expect("ip");
    assert!(ip.starts_with("10.88."), "{ip}");
    let ctr = s
        .cri
        .create_container(&pod, "app", IMAGE, &["sleep", "3600"])
        .expect("create");
    s.cri.start_container(&ctr).expect("start");
    let out = s.cri.exec_sync(&ctr, &["hostname"], 30).expect("exec");
    assert_eq!(out.stdout.trim(), "web-host", "{out:?}");
    assert!(s.netns.links().expect("links").iter().any(|l| l == "cni0"));
    s.cri.stop_pod(&pod.id).expect("stop");
    s.cri.remove_pod(&pod.id).expect("remove");
    assert!(s.cri.pods().expect("list").is_empty());
}

/// A pod that asks for one of the host's namespaces (`hostNetwork`,
/// `hostPID`, `hostIPC`) is refused before its VM is made, with an error
/// that names the pod field and the way out (a runc RuntimeClass), and
/// leaves nothing behind.
#[test]
fn host_namespaces_are_refused_cleanly() {
    require_kvm();
    let s = setup("cri-hostns");
    let opts = |network: NamespaceMode, pid: NamespaceMode, ipc: NamespaceMode| NamespaceOption {
        network: network as i32,
        pid: pid as i32,
        ipc: ipc as i32,
        ..Default::default()
    };
    use NamespaceMode::{Container, Node, Pod};
    for (field, options) in [
        ("hostNetwork", opts(Node, Container, Pod)),
        ("hostPID", opts(Pod, Node, Pod)),
        ("hostIPC", opts(Pod, Container, Node)),
    ] {
        let mut spec = s.pod_spec(&field.to_lowercase());
        spec.namespace_options = Some(options);
        let e = s.cri.run_pod(&spec, "husk").expect_err(field);
        let text = format!("{e:#}");
        assert!(
            text.contains(&format!("({field}: true")) && text.contains("runc RuntimeClass"),
            "{field}: {text}"
        );
    }
    assert!(s.cri.pods().expect("pods").is_empty());
    s.c.assert_nothing_left_within(Duration::from_secs(60));
}

/// An HTTP GET of `/` on `ip:port`, from inside `netns`: the body.
fn http_get(netns: &NetNs, ip: &str, port: u16) -> Result<String, String> {
    http_get_in(&netns.path(), ip, port)
}

/// An HTTP GET of `/` on `ip:port`, from inside the namespace at `netns`.
fn http_get_in(netns: &std::path::Path, ip: &str, port: u16) -> Result<String, String> {
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().map_err(|e| format!("{e}"))?;
    husk_e2e::netns::run_in(netns, move || -> Result<String, String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })
    .map_err(|e| e.to_string())?
}

/// Serves `body` over HTTP on port 80 with busybox httpd.
const HTTPD: &[&str] = &[
    "sh",
    "-c",
    "mkdir -p /www && echo hello-from-husk > /www/index.html && exec busybox httpd -f -p 80 -h /www",
];

/// The lines of a CRI log file: (stream, tag, text), after checking each
/// line's RFC 3339 timestamp.
fn log_lines(path: &std::path::Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut f = l.splitn(4, ' ');
            let (ts, stream, tag, text) = (
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
            );
            assert!(
                ts.len() >= 20 && ts.as_bytes()[4] == b'-' && ts.contains('T'),
                "timestamp of {l:?}"
            );
            (stream.into(), tag.into(), text.into())
        })
        .collect()
}

/// Waits until `path`'s log has `line` (stream, text).
fn wait_log(path: &std::path::Path, stream: &str, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let lines = log_lines(path);
        if lines
            .iter()
            .any(|(s, tag, t)| s == stream && tag == "F" && t == text)
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{stream} {text:?} not in {}: {lines:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A husk pod: RunPodSandbox starts one pod VM cabled to the CNI network;
/// a container serves HTTP on the pod's IP, reachable from the test's
/// network namespace and from a second pod, and answers ExecSync with the
/// pod's hostname, DNS settings and hosts file; a second container reaches
/// the first over localhost (one network namespace per pod) and logs to
/// its CRI log file, which ReopenContainerLog rotates; removing the pods
/// leaves nothing behind.
#[test]
fn husk_pod_serves_on_the_pod_network() {
    require_kvm();
    let s = setup("cri-husk");
    let mut spec = s.pod_spec("web");
    spec.dns = Some(k8s_cri::v1::DnsConfig {
        servers: vec!["10.88.0.53".into()],
        searches: vec!["husk.test".into()],
        options: vec!["ndots:2".into()],
    });
    let pod = s.cri.run_pod(&spec, "husk").expect("pod");
    let ip = s.cri.pod_ip(&pod.id).expect("pod ip");
    let vmms = husk_e2e::processes_mentioning(&s.c.pods.display().to_string());
    // As kubelet does: a hosts file of the pod, mounted over /etc/hosts.
    let hosts = s.dir.path().join("web-hosts");
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n{ip} web-host\n")).expect("hosts");
    let web = s
        .cri
        .create_container_with(&pod, "web", IMAGE, HTTPD, |c| {
            c.mounts.push(k8s_cri::v1::Mount {
                container_path: "/etc/hosts".into(),
                host_path: hosts.display().to_string(),
                ..Default::default()
            });
        })
        .expect("create");
    s.cri.start_container(&web).expect("start");
    // httpd listens within moments of its start; allow for a slow guest.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let page = loop {
        match http_get(&s.netns, &ip, 80) {
            Ok(p) => break p,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "GET {ip}:80: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    assert!(page.contains("hello-from-husk"), "{page}");

    // Port forwarding: containerd dials localhost:PORT inside the pod's
    // network namespace; the guest's port 80 answers there.
    let pod_ns = s.cri.pod_netns(&pod.id).expect("pod netns");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let page = loop {
        match http_get_in(&pod_ns, "127.0.0.1", 80) {
            Ok(p) => break p,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "localhost:80 in the pod: {e}"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    };
    assert!(page.contains("hello-from-husk"), "{page}");
    let out = s
        .cri
        .exec_sync(
            &web,
            &[
                "sh",
                "-c",
                "hostname; cat /etc/hostname /etc/resolv.conf /etc/hosts",
            ],
            120,
        )
        .expect("exec");
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    assert_eq!(lines.first(), Some(&"web-host"), "{out:?}");
    assert_eq!(lines.get(1), Some(&"web-host"), "/etc/hostname: {out:?}");
    for want in [
        "nameserver 10.88.0.53".to_string(),
        "search husk.test".into(),
        "options ndots:2".into(),
        format!("{ip} web-host"),
    ] {
        assert!(lines.contains(&want.as_str()), "{want:?} in {out:?}");
    }
    let out = s
        .cri
        .exec_sync(&web, &["sh", "-c", "exit 7"], 120)
        .expect("exec");
    assert_eq!(out.exit_code, 7, "{out:?}");

    let stats = s.cri.container_stats(&web).expect("stats");
    let mem = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map_or(0, |v| v.value);
    let cpu = stats
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .map_or(0, |v| v.value);
    assert!(mem > 0 && cpu > 0, "memory {mem}, cpu {cpu}");

    // UpdateContainerResources reaches the container's cgroup in the guest
    // (its own cgroup, whether or not it has a cgroup namespace).
    let limit: i64 = 48 << 20;
    s.cri.update_memory_limit(&web, limit).expect("update");
    let out = s
        .cri
        .exec_sync(
            &web,
            &[
                "sh",
                "-c",
                "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max",
            ],
            120,
        )
        .expect("exec");
    assert_eq!(out.stdout.trim(), limit.to_string(), "{out:?}");

    // A second container of the pod: same VM, same network namespace. It
    // logs a line per stream, then echoes what arrives on a FIFO (no
    // process per line: forks are dear in this guest).
    let client = s
        .cri
        .create_container(
            &pod,
            "client",
            IMAGE,
            &[
                "sh",
                "-c",
                "echo out-line; echo err-line >&2; mkfifo /tmp/say; \
                 while true; do read l < /tmp/say && echo \"$l\"; done",
            ],
        )
        .expect("create");
    s.cri.start_container(&client).expect("start");
    let log = spec.log_dir.join("client.log");
    wait_log(&log, "stdout", "out-line");
    wait_log(&log, "stderr", "err-line");
    // Log rotation as kubelet does it: rename, then ReopenContainerLog.
    let rotated = spec.log_dir.join("client.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    s.cri.reopen_log(&client).expect("reopen");
    s.cri
        .exec_sync(&client, &["sh", "-c", "echo after-reopen > /tmp/say"], 120)
        .expect("exec");
    wait_log(&log, "stdout", "after-reopen");
    assert!(
        !log_lines(&rotated)
            .iter()
            .any(|(_, _, t)| t == "after-reopen"),
        "the old file got the new line"
    );
    let out = s
        .cri
        .exec_sync(
            &client,
            &[
                "sh",
                "-c",
                "busybox wget -q -O - http://localhost:80/ && echo processes: && ps",
            ],
            120,
        )
        .expect("exec");
    assert!(out.stdout.contains("hello-from-husk"), "{out:?}");
    // Without shareProcessNamespace each container has its own PID
    // namespace: the client does not see httpd.
    let (_, ps) = out.stdout.split_once("processes:").expect("ps ran");
    assert!(!ps.contains("httpd"), "the client sees its neighbour: {ps}");
    assert_eq!(
        husk_e2e::processes_mentioning(&s.c.pods.display().to_string()),
        vmms,
        "the second container started no VM of its own"
    );

    // A pod that asks for nothing has husk.toml's default shape.
    let (cpus, mem) = vm_shape(&s, &client);
    assert_eq!(cpus, 1, "default vCPUs");
    assert_mem(mem, 128);

    // A second pod, sized from its resources (2 CPUs, 512 MiB: kubelet's
    // sum of its containers' limits), reaches the first by its IP.
    let mut sized = s.pod_spec("other");
    sized.resources = Some(k8s_cri::v1::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 200_000,
        cpu_shares: 2048,
        memory_limit_in_bytes: 512 << 20,
        ..Default::default()
    });
    let other = s.cri.run_pod(&sized, "husk").expect("pod");
    let probe = s
        .cri
        .create_container(&other, "probe", IMAGE, &["sleep", "3600"])
        .expect("create");
    s.cri.start_container(&probe).expect("start");
    let (cpus, mem) = vm_shape(&s, &probe);
    assert_eq!(cpus, 2, "vCPUs from the pod's CPU limit");
    // The limit plus husk.toml's pod_overhead_mib (64 by default), 576,
    // rounded up to its bucket (128 MiB apart between 512 and 1024).
    assert_mem(mem, 640);
    let out = s
        .cri
        .exec_sync(
            &probe,
            &[
                "busybox",
                "wget",
                "-q",
                "-O",
                "-",
                &format!("http://{ip}:80/"),
            ],
            120,
        )
        .expect("exec");
    assert!(out.stdout.contains("hello-from-husk"), "{out:?}");

    // A container over its memory limit is OOM-killed: reason OOMKilled,
    // exit 137, and its pod goes on.
    let hog = s
        .cri
        .create_container_with(
            &other,
            "hog",
            IMAGE,
            &["husk-testprog", "alloc", "64"],
            |c| {
                c.linux.get_or_insert_default().resources =
                    Some(k8s_cri::v1::LinuxContainerResources {
                        memory_limit_in_bytes: 24 << 20,
                        ..Default::default()
                    });
            },
        )
        .expect("create");
    s.cri.start_container(&hog).expect("start");
    let st = s
        .cri
        .wait_exited(&hog, Duration::from_secs(180))
        .expect("exit");
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (137, "OOMKilled"),
        "{st:?}"
    );
    let out = s.cri.exec_sync(&probe, &["true"], 120).expect("neighbour");
    assert_eq!(out.exit_code, 0);

    // Deleting one container leaves its neighbour serving.
    s.cri.stop_container(&client, 0).expect("stop client");
    s.cri.remove_container(&client).expect("remove client");
    let page = http_get(&s.netns, &ip, 80).expect("GET after the neighbour went");
    assert!(page.contains("hello-from-husk"), "{page}");

    for p in [&pod.id, &other.id] {
        s.cri.stop_pod(p).expect("stop");
        s.cri.remove_pod(p).expect("remove");
    }
    assert!(s.cri.pods().expect("list").is_empty());
    s.c.assert_nothing_left_within(Duration::from_secs(60));
}

/// The vCPUs (`nproc`) and guest memory (MemTotal, KiB) a container of a
/// pod sees.
fn vm_shape(s: &Setup, ctr: &str) -> (u32, u64) {
    let out = s
        .cri
        .exec_sync(
            ctr,
            &["sh", "-c", "nproc; grep MemTotal /proc/meminfo"],
            120,
        )
        .expect("exec");
    let mut words = out.stdout.split_whitespace();
    let cpus = words.next().and_then(|w| w.parse().ok());
    let mem = words.nth(1).and_then(|w| w.parse().ok());
    match (cpus, mem) {
        (Some(c), Some(m)) => (c, m),
        _ => panic!("nproc and MemTotal: {out:?}"),
    }
}

/// MemTotal (`kib`) of a guest given `mib`: the guest kernel keeps its own
/// image and page structures (about 1.6% of memory) out of it, so it is a
/// little below what the VM has, never above.
fn assert_mem(kib: u64, mib: u64) {
    let got = kib / 1024;
    assert!(
        got <= mib && got + mib / 50 + 16 >= mib,
        "MemTotal {got} MiB for a {mib} MiB guest"
    );
}

/// Five pods made and removed one after another: each leaves nothing behind
/// (no VM, shim, socket, mount or directory; its network namespace is
/// gone), and a pod costs no more host memory in the last cycle than in the
/// first (its processes and guest RAM, each page once, measured at the same
/// point: its container runs).
#[test]
fn pod_cycles_leave_nothing_behind() {
    use husk_e2e::{hostmem::host_memory, process_tree};
    require_kvm();
    let s = setup("cri-cycles");
    let mut first: Option<u64> = None;
    for i in 0..5 {
        let pod = s
            .cri
            .run_pod(&s.pod_spec(&format!("cycle{i}")), "husk")
            .expect("pod");
        let ns = s.cri.pod_netns(&pod.id).expect("netns");
        let c = s
            .cri
            .create_container(&pod, "app", IMAGE, &["sleep", "3600"])
            .expect("create");
        s.cri.start_container(&c).expect("start");
        let shims = s.c.shims();
        assert_eq!(shims.len(), 1, "one pod, one shim: {shims:?}");
        let kib = host_memory(&process_tree(shims[0])).total_kib();
        s.cri.stop_pod(&pod.id).expect("stop");
        s.cri.remove_pod(&pod.id).expect("remove");
        s.c.assert_nothing_left_within(Duration::from_secs(60));
        assert!(!ns.exists(), "cycle {i}: {} is still there", ns.display());
        eprintln!("cycle {i}: pod host memory {kib} KiB");
        let base = *first.get_or_insert(kib);
        if i == 4 {
            assert!(
                kib < base + 16 * 1024,
                "a pod costs {kib} KiB after 5 cycles, {base} KiB in the first"
            );
        }
    }
    assert!(s.cri.pods().expect("list").is_empty());
}

/// One PortForward session to `port` of `pod` through the streaming
/// server: sends an HTTP GET and returns what came back before the server
/// closed the session.
fn port_forward_get(s: &Setup, pod: &str, port: u16) -> anyhow::Result<String> {
    let url = s.cri.port_forward_url(pod, port)?;
    let mut st = Stream::connect(&s.netns.path(), &url)?;
    st.send(0, b"GET / HTTP/1.0\r\n\r\n")?;
    st.read_to_close(Duration::from_secs(60))?;
    let errors = String::from_utf8_lossy(st.bytes(1).get(2..).unwrap_or_default()).into_owned();
    anyhow::ensure!(errors.is_empty(), "port-forward error: {errors}");
    Ok(String::from_utf8_lossy(forwarded(&st, port)?).into_owned())
}

/// The streaming side of CRI, through containerd's streaming server over
/// WebSocket as the API server proxies `kubectl exec -it`, `attach` and
/// `port-forward`: a shell with a terminal that sees its size and its
/// resize and reports its exit code; attach to a running container's
/// standard streams; port-forward to the pod's port 80. The pod shares one
/// PID namespace (`shareProcessNamespace`): its containers see each other,
/// with `pause` as PID 1 as under runc. A container whose start fails
/// leaves no cgroup in the guest.
#[test]
fn husk_pod_streams_and_shares_processes() {
    require_kvm();
    let s = setup("cri-streams");
    let mut spec = s.pod_spec("tools");
    spec.share_processes = true;
    spec.privileged = true;
    let pod = s.cri.run_pod(&spec, "husk").expect("pod");
    let web = s
        .cri
        .create_container(&pod, "web", IMAGE, HTTPD)
        .expect("create");
    s.cri.start_container(&web).expect("start");
    // Reads lines from standard input (attach's) and answers each; it is
    // privileged so that it sees the guest's whole cgroup tree.
    let echo = s
        .cri
        .create_container_with(
            &pod,
            "echo",
            IMAGE,
            &["sh", "-c", "while read l; do echo \"got $l\"; done"],
            |c| {
                c.stdin = true;
                c.linux
                    .get_or_insert_default()
                    .security_context
                    .get_or_insert_default()
                    .privileged = true;
            },
        )
        .expect("create");
    s.cri.start_container(&echo).expect("start");

    // PortForward: containerd dials localhost:80 in the pod's network
    // namespace, where husk relays to the guest.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let page = loop {
        match port_forward_get(&s, &pod.id, 80) {
            Ok(p) if p.contains("hello-from-husk") => break p,
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "port-forward to 80: {other:?}"
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    assert!(page.starts_with("HTTP/1."), "{page}");

    // Attach: what is written to the container's stdin reaches it, its
    // answer comes back; leaving does not stop it.
    let url = s.cri.attach_url(&echo, false).expect("attach");
    let mut a = Stream::connect(&s.netns.path(), &url).expect("attach stream");
    a.send(STDIN, b"ping\n").expect("send");
    a.read_until(Duration::from_secs(60), |st| {
        st.text(STDOUT).contains("got ping")
    })
    .expect("the answer");
    a.close();
    let st = s.cri.container_status(&echo).expect("status");
    assert_eq!(
        st.state,
        k8s_cri::v1::ContainerState::ContainerRunning as i32,
        "{st:?}"
    );

    // Exec with a terminal: its size is the client's, a resize reaches the
    // running shell, and its exit code comes back on the status channel.
    let url = s.cri.exec_url(&echo, &["sh"], true).expect("exec");
    let mut e = Stream::connect(&s.netns.path(), &url).expect("exec stream");
    e.resize(100, 40).expect("resize");
    e.read_until(Duration::from_secs(120), |st| {
        st.text(STDOUT).contains("# ")
    })
    .expect("a prompt");
    e.send(STDIN, b"stty size; tty\n").expect("send");
    e.read_until(Duration::from_secs(60), |st| {
        st.text(STDOUT).contains("40 100") && st.text(STDOUT).contains("/dev/pts/")
    })
    .expect("the terminal's size");
    e.resize(120, 50).expect("resize");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !e.text(STDOUT).contains("50 120") {
        assert!(std::time::Instant::now() < deadline, "resized: {e:?}");
        e.send(STDIN, b"stty size\n").expect("send");
        let _ = e.read_until(Duration::from_secs(3), |st| {
            st.text(STDOUT).contains("50 120")
        });
    }
    e.send(STDIN, b"exit 3\n").expect("send");
    e.read_until(Duration::from_secs(60), |st| {
        st.exit_code().ok().flatten().is_some()
    })
    .expect("the exit status");
    assert_eq!(e.exit_code().expect("status"), Some(3), "{e:?}");
    assert!(
        e.bytes(STDERR).is_empty(),
        "a terminal has no stderr: {e:?}"
    );
    e.close();

    // One PID namespace for the pod: pause is PID 1, httpd is visible.
    let out = s
        .cri
        .exec_sync(&echo, &["sh", "-c", "cat /proc/1/comm; ps"], 120)
        .expect("exec");
    assert_eq!(out.stdout.lines().next(), Some("pause"), "{out:?}");
    assert!(out.stdout.contains("httpd"), "{out:?}");

    // A container whose start fails (no such binary) reports it and
    // leaves no cgroup in the guest; the privileged neighbour sees the
    // guest's cgroups (its own is there, so the search works).
    let bad = s
        .cri
        .create_container(&pod, "bad", IMAGE, &["/no/such/binary"])
        .expect("create");
    let err = s.cri.start_container(&bad).expect_err("a missing binary");
    assert!(
        format!("{err:#}").contains("/no/such/binary"),
        "the error names the binary: {err:#}"
    );
    // The image's busybox has no find: a glob four levels deep.
    let find = |id: &str| {
        let script = format!(
            "for d in /sys/fs/cgroup/*/ /sys/fs/cgroup/*/*/ /sys/fs/cgroup/*/*/*/ \
             /sys/fs/cgroup/*/*/*/*/; do case $d in *{id}*) echo $d;; esac; done"
        );
        s.cri
            .exec_sync(&echo, &["sh", "-c", &script], 120)
            .expect("find")
            .stdout
    };
    assert!(!find(&echo).trim().is_empty(), "the search finds nothing");
    assert_eq!(find(&bad).trim(), "", "the failed container's cgroup");
    s.cri.remove_container(&bad).expect("remove");

    s.cri.stop_pod(&pod.id).expect("stop");
    s.cri.remove_pod(&pod.id).expect("remove");
    assert!(s.cri.pods().expect("list").is_empty());
    s.c.assert_nothing_left_within(Duration::from_secs(60));
}

/// Writes `files` as a new payload of the volume at `host` the way
/// kubelet's atomic writer does (a new `..<ts>` directory, user-visible
/// symlinks, `..data_tmp` renamed over `..data`, the old payload removed).
fn kubelet_write(host: &std::path::Path, ts: &str, files: &[(String, Vec<u8>)]) {
    use std::os::unix::fs::symlink;
    let old = std::fs::read_link(host.join("..data")).ok();
    let dir = host.join(ts);
    for (name, bytes) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("payload dir");
        std::fs::write(&p, bytes).expect("payload file");
    }
    for (name, _) in files {
        let top = name.split('/').next().expect("name");
        if std::fs::symlink_metadata(host.join(top)).is_err() {
            symlink(std::path::Path::new("..data").join(top), host.join(top)).expect("link");
        }
    }
    symlink(ts, host.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(host.join("..data_tmp"), host.join("..data")).expect("switch");
    if let Some(old) = old {
        std::fs::remove_dir_all(host.join(old)).expect("old payload");
    }
}

/// Unmounts a test's tmpfs whatever happens.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A pod's volumes as kubelet makes them: a ConfigMap-style directory that
/// the host updates while a container watches it with inotify (the update
/// and its events arrive within a second), a 1,000-file 10 MiB one that
/// updates the same way, a memory-backed emptyDir that is a tmpfs of its
/// size in the guest, shared by two containers, and a disk emptyDir they
/// share with the host.
#[test]
fn husk_pod_volumes_follow_the_host() {
    require_kvm();
    let s = setup("cri-volumes");
    let vols = s.dir.path().join("kubelet/pods/vol-uid/volumes");
    let cfg = vols.join("kubernetes.io~configmap/cfg");
    let big = vols.join("kubernetes.io~configmap/big");
    let memory = vols.join("kubernetes.io~empty-dir/cache");
    let disk = vols.join("kubernetes.io~empty-dir/scratch");
    for d in [&cfg, &big, &memory, &disk] {
        std::fs::create_dir_all(d).expect("volume dir");
    }
    // kubelet mounts a memory emptyDir as a tmpfs sized by its sizeLimit.
    nix::mount::mount(
        Some("tmpfs"),
        &memory,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=16m"),
    )
    .expect("tmpfs");
    let _memory = Unmount(memory.clone());
    let text = |s: &str| s.as_bytes().to_vec();
    kubelet_write(
        &cfg,
        "..2026_12_05_09_00_00.1",
        &[
            ("app.conf".into(), text("version=1\n")),
            ("extra/note".into(), text("note\n")),
        ],
    );
    let big_files = |round: u8| -> Vec<(String, Vec<u8>)> {
        (0..1000)
            .map(|i| {
                (
                    format!("f{i:04}"),
                    vec![b'a' + round + (i % 7) as u8; 10 * 1024],
                )
            })
            .collect()
    };
    kubelet_write(&big, "..2026_12_05_09_00_00.1", &big_files(0));

    let pod = s.cri.run_pod(&s.pod_spec("vol"), "husk").expect("pod");
    let mount = |host: &std::path::Path, path: &str, readonly: bool| k8s_cri::v1::Mount {
        container_path: path.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    };
    let watcher = s
        .cri
        .create_container_with(
            &pod,
            "watcher",
            IMAGE,
            &["husk-testprog", "watch", "/etc/cfg"],
            |c| {
                c.mounts.extend([
                    mount(&cfg, "/etc/cfg", true),
                    mount(&big, "/big", true),
                    mount(&memory, "/cache", false),
                    mount(&disk, "/scratch", false),
                ]);
            },
        )
        .expect("create");
    s.cri.start_container(&watcher).expect("start");
    let other = s
        .cri
        .create_container_with(&pod, "other", IMAGE, &["sleep", "3600"], |c| {
            c.mounts.extend([
                mount(&memory, "/cache", false),
                mount(&disk, "/scratch", false),
            ]);
        })
        .expect("create");
    s.cri.start_container(&other).expect("start");
    let log = s.dir.path().join("logs/vol/watcher.log");
    wait_log(&log, "stdout", "watching /etc/cfg");

    // What the containers see at start.
    let out = s
        .cri
        .exec_sync(
            &watcher,
            &[
                "sh",
                "-c",
                "cat /etc/cfg/app.conf /etc/cfg/extra/note; ls /big | wc -l; cat /big/f0999 | wc -c; \
                 grep ' /cache ' /proc/mounts; echo shared > /cache/x; echo on-disk > /scratch/y; \
                 echo nope > /etc/cfg/app.conf 2>/dev/null || echo cfg=ro",
            ],
            120,
        )
        .expect("exec");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[..4],
        ["version=1", "note", "1000", "10240"],
        "{out:?}"
    );
    assert!(
        lines[4].starts_with("tmpfs /cache tmpfs") && lines[4].contains("size=16384k"),
        "a memory emptyDir is a guest tmpfs of its size: {out:?}"
    );
    assert_eq!(lines.get(5), Some(&"cfg=ro"), "{out:?}");
    let out = s
        .cri
        .exec_sync(&other, &["sh", "-c", "cat /cache/x /scratch/y"], 120)
        .expect("exec");
    assert_eq!(
        out.stdout, "shared\non-disk\n",
        "shared by the pod: {out:?}"
    );
    assert_eq!(
        std::fs::read_to_string(disk.join("y")).expect("disk emptyDir on the host"),
        "on-disk\n"
    );
    assert!(
        !memory.join("x").exists(),
        "a memory emptyDir lives in the guest, not in host memory"
    );

    // The host updates the ConfigMap: the watcher's inotify sees kubelet's
    // switch within a second.
    let updated = std::time::Instant::now();
    kubelet_write(
        &cfg,
        "..2026_12_05_09_01_00.2",
        &[("app.conf".into(), text("version=2\n"))],
    );
    let seen = |want: &str| {
        log_lines(&log)
            .iter()
            .any(|(s, _, t)| s == "stdout" && t == want)
    };
    while !seen("moved_to ..data") && updated.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = updated.elapsed();
    eprintln!("ConfigMap update seen by inotify in the container after {took:?}");
    assert!(
        took <= Duration::from_secs(1),
        "the update took {took:?} to reach the container's inotify watch"
    );
    // Then the rest of kubelet's steps: the old payload's name and
    // directory go (after the switch, as on the host).
    let wanted = [
        "create ..2026_12_05_09_01_00.2",
        "create ..data_tmp",
        "moved_from ..data_tmp",
        "moved_to ..data",
        "delete extra",
        "delete ..2026_12_05_09_00_00.1",
    ];
    while !wanted.iter().all(|w| seen(w)) && updated.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let events: Vec<String> = log_lines(&log).into_iter().map(|(_, _, t)| t).collect();
    let at = |want: &str| events.iter().position(|e| e == want);
    for want in wanted {
        assert!(at(want).is_some(), "{want:?} in {events:?}");
    }
    assert!(
        at("create ..2026_12_05_09_01_00.2") < at("moved_to ..data")
            && at("moved_to ..data") < at("delete ..2026_12_05_09_00_00.1"),
        "kubelet's order: {events:?}"
    );
    // The big one updates too, every file. The shim logs each update it
    // has made in the guest (watched from here, so that no polling in the
    // guest competes with the copy for its one vCPU).
    let updated = std::time::Instant::now();
    kubelet_write(&big, "..2026_12_05_09_01_00.2", &big_files(1));
    let done = |log: &str| {
        log.lines().any(|l| {
            l.contains("volume updated in the guest")
                && l.contains("configmap/big")
                && l.contains("..2026_12_05_09_01_00.2")
        })
    };
    while !done(&s.c.log()) && updated.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "1,000 files, 10 MiB: updated in the guest after {:?}",
        updated.elapsed()
    );
    assert!(done(&s.c.log()), "the big volume's update never finished");
    let out = s
        .cri
        .exec_sync(
            &watcher,
            &[
                "sh",
                "-c",
                "cat /etc/cfg/app.conf; ls /etc/cfg; cat /big/* | wc -c; head -c 1 /big/f0000; head -c 1 /big/f0999; echo",
            ],
            120,
        )
        .expect("exec");
    assert_eq!(
        out.stdout, "version=2\napp.conf\n10240000\nbg\n",
        "the new payload, and only it: {out:?}"
    );

    s.cri.stop_pod(&pod.id).expect("stop");
    s.cri.remove_pod(&pod.id).expect("remove");
    s.c.assert_nothing_left_within(Duration::from_secs(60));
}
