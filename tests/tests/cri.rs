//! Kubernetes pods through containerd's CRI gRPC API, called the way kubelet
//! calls it: a private containerd with its CRI plugin, husk's shipped
//! containerd drop-in (runtime handler `husk`) and a CNI bridge, all inside
//! a network namespace the test creates, so no pod traffic leaves it.

use std::{collections::HashMap, time::Duration};

use husk_e2e::{
    containerd::{Containerd, IMAGE, PAUSE_IMAGE},
    cri::{Cri, PodSpec},
    netns::NetNs,
    require_kvm, Artifacts, TestDir,
};

struct Setup {
    cri: Cri,
    c: Containerd,
    netns: NetNs,
    dir: TestDir,
    _templates: TestDir,
}

fn setup(name: &str) -> Setup {
    let artifacts = Artifacts::locate().expect("artifacts");
    let dir = TestDir::new(name).expect("dir");
    let templates = TestDir::new(&format!("{name}-templates")).expect("dir");
    let netns = NetNs::new(&format!("husk-{name}-{}", std::process::id())).expect("netns");
    let c = Containerd::start_cri(&artifacts, dir.path(), templates.path(), &netns)
        .expect("containerd with CRI");
    c.import_test_image().expect("images");
    let cri = Cri::connect(&c.socket).expect("CRI client");
    Setup {
        cri,
        c,
        netns,
        dir,
        _templates: templates,
    }
}

impl Setup {
    fn pod_spec(&self, name: &str) -> PodSpec {
        let log_dir = self.dir.path().join("logs").join(name);
        std::fs::create_dir_all(&log_dir).expect("log dir");
        PodSpec {
            name: name.into(),
            hostname: format!("{name}-host"),
            log_dir,
            dns: None,
            annotations: HashMap::new(),
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("containerd log:\n{}", self.c.log());
            self.cri.remove_all_pods();
        }
    }
}

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

/// An HTTP GET of `/` on `ip:port`, from inside `netns`: the body.
fn http_get(netns: &NetNs, ip: &str, port: u16) -> Result<String, String> {
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().map_err(|e| format!("{e}"))?;
    netns
        .run(move || -> Result<String, String> {
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

/// A husk pod: RunPodSandbox starts one pod VM cabled to the CNI network;
/// a container serves HTTP on the pod's IP, reachable from the test's
/// network namespace, and answers ExecSync with the pod's hostname; a
/// second container reaches the first over localhost (one network
/// namespace per pod); removing the pod leaves nothing behind.
#[test]
fn husk_pod_serves_on_the_pod_network() {
    require_kvm();
    let s = setup("cri-husk");
    let pod = s.cri.run_pod(&s.pod_spec("web"), "husk").expect("pod");
    let ip = s.cri.pod_ip(&pod.id).expect("pod ip");
    let vmms = husk_e2e::processes_mentioning(&s.c.pods.display().to_string());
    let web = s
        .cri
        .create_container(&pod, "web", IMAGE, HTTPD)
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
    let out = s.cri.exec_sync(&web, &["hostname"], 120).expect("exec");
    assert_eq!(out.stdout.trim(), "web-host", "{out:?}");
    let out = s
        .cri
        .exec_sync(&web, &["sh", "-c", "exit 7"], 120)
        .expect("exec");
    assert_eq!(out.exit_code, 7, "{out:?}");

    // A second container of the pod: same VM, same network namespace.
    let client = s
        .cri
        .create_container(&pod, "client", IMAGE, &["sleep", "3600"])
        .expect("create");
    s.cri.start_container(&client).expect("start");
    let out = s
        .cri
        .exec_sync(
            &client,
            &["busybox", "wget", "-q", "-O", "-", "http://localhost:80/"],
            120,
        )
        .expect("exec");
    assert!(out.stdout.contains("hello-from-husk"), "{out:?}");
    assert_eq!(
        husk_e2e::processes_mentioning(&s.c.pods.display().to_string()),
        vmms,
        "the second container started no VM of its own"
    );

    s.cri.stop_pod(&pod.id).expect("stop");
    s.cri.remove_pod(&pod.id).expect("remove");
    assert!(s.cri.pods().expect("list").is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = s.c.leftovers();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
