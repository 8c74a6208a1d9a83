//! Boots the real guest kernel and initramfs in husk-vmm and talks to the
//! agent over hybrid vsock. One VM does it all: a boot costs tens of seconds
//! on hosts that emulate guest kernel code.

use std::time::Duration;

use husk_e2e::{
    processes_mentioning, require_kvm, shared_directory_round_trip, Artifacts, FsDaemon, TestDir,
    VmOptions, VmProcess,
};
use husk_protocols::{
    agent::{
        health_response::Status, stream_check_request::Direction, HealthRequest, ShutdownRequest,
        StreamCheckRequest, VersionRequest,
    },
    agent_ttrpc::AgentClient,
    connect_agent, hybrid_vsock, pattern, API_VERSION,
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
};

/// Generous: a cold boot on a PVM host takes 40-90 s, more on a loaded one.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(120_000_000_000)
}

fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

fn pattern_bytes(n: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; usize::try_from(n).expect("fits in memory")];
    pattern::fill(&mut v, seed | 1);
    v
}

/// Host -> guest: the agent reads a stream to EOF and reports its hash.
async fn to_guest(client: &AgentClient, vsock: &std::path::Path, port: u32, bytes: u64, seed: u64) {
    let mut req = StreamCheckRequest::new();
    req.direction = Direction::TO_GUEST.into();
    req.port = port;
    let call = client.stream_check(ctx(), &req);
    let data = pattern_bytes(bytes, seed);
    let expected = sha256(&data);
    let send = async {
        let mut s = hybrid_vsock::connect_retry(vsock, port, Duration::from_secs(30))
            .await
            .expect("connect to guest port");
        s.write_all(&data).await.expect("write");
        s.shutdown().await.expect("shutdown");
        s
    };
    let (resp, _stream) = tokio::join!(call, send);
    let resp = resp.expect("StreamCheck TO_GUEST");
    assert_eq!(
        resp.bytes, bytes,
        "guest received every byte on port {port}"
    );
    assert_eq!(
        resp.sha256, expected,
        "guest received the right bytes on port {port}"
    );
}

/// Guest -> host: the agent connects to a host port and writes a pattern.
async fn from_guest(
    client: &AgentClient,
    vsock: &std::path::Path,
    port: u32,
    bytes: u64,
    seed: u64,
) {
    let path = hybrid_vsock::port_socket_path(vsock, port);
    let listener = UnixListener::bind(&path).expect("bind host port");
    let mut req = StreamCheckRequest::new();
    req.direction = Direction::FROM_GUEST.into();
    req.port = port;
    req.bytes = bytes;
    req.seed = seed;
    let call = client.stream_check(ctx(), &req);
    let recv = async {
        let (mut s, _) = listener.accept().await.expect("accept guest connection");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read");
        got
    };
    let (resp, got) = tokio::join!(call, recv);
    let _ = std::fs::remove_file(&path);
    let resp = resp.expect("StreamCheck FROM_GUEST");
    assert_eq!(
        got.len() as u64,
        bytes,
        "host received every byte on port {port}"
    );
    assert_eq!(
        sha256(&got),
        resp.sha256,
        "host received what the guest sent on port {port}"
    );
    assert_eq!(got, pattern_bytes(bytes, seed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_boots_agent_serves_streams_and_shuts_down_cleanly() {
    require_kvm();
    let artifacts = Artifacts::locate().expect("artifacts");
    let dir = TestDir::new("e2e-boot").expect("dir");
    // A virtio-fs daemon for the VM's shared directory.
    let mut fs_daemon = FsDaemon::spawn(&artifacts, dir.path())
        .await
        .expect("husk-virtiofsd");
    let opts = VmOptions {
        serial: true,
        vmm_args: fs_daemon.vmm_args(),
        // The agent tries its own API from inside the guest and reports.
        cmdline: "husk.selfcheck=local-api".into(),
        ..Default::default()
    };
    let mut vm = VmProcess::spawn(&artifacts, dir.path(), &opts).expect("spawn");

    // Readiness comes to us; we never poll the guest.
    let ready = match vm.wait_ready(BOOT_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => panic!("{e:#}\n{}", vm.log_text()),
    };
    assert_eq!(ready.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(ready.api_version, API_VERSION);
    eprintln!("agent ready after {:?}", ready.elapsed);

    let client = connect_agent(&vm.vsock, Duration::from_secs(30))
        .await
        .expect("agent client");
    let health = client
        .health(ctx(), &HealthRequest::new())
        .await
        .expect("Health");
    assert_eq!(health.status.enum_value(), Ok(Status::SERVING));
    let version = client
        .version(ctx(), &VersionRequest::new())
        .await
        .expect("Version");
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_version, API_VERSION);
    assert!(
        version.kernel_release.starts_with("6.1."),
        "kernel {}",
        version.kernel_release
    );
    assert!(version.uptime_seconds > 0.0);

    // The agent API refuses connections from inside the guest: over
    // loopback (CID 1) and over the guest's own CID the agent's self-check
    // got no answer, and the agent logged each refusal.
    let console_path = dir.path().join("serial.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let console = loop {
        let console = std::fs::read_to_string(&console_path).unwrap_or_default();
        if console.matches("self-check: API from CID").count() >= 2 {
            break console;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no self-check report on the console:\n{}",
            vm.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for cid in [1, 3] {
        let line = console
            .lines()
            .find(|l| l.contains(&format!("self-check: API from CID {cid}:")))
            .unwrap_or_else(|| panic!("no self-check from CID {cid}:\n{console}"));
        assert!(
            line.contains(": refused (") && !line.contains("refused at connect"),
            "CID {cid}: connected, then closed by the agent unserved: {line}"
        );
    }
    assert!(
        console
            .matches("refused a vsock connection from inside the guest")
            .count()
            >= 2,
        "the agent logged its refusals:\n{console}"
    );
    // The runtime helper server is up before the agent announces itself
    // ready (so templates hold it started).
    assert!(
        console.contains("runtime helper server ready"),
        "the agent started no runtime helper server:\n{console}"
    );

    // Garbage on the vsock socket: that connection is dropped, nothing else.
    for garbage in [
        &b"HELLO\n"[..],
        &b"CONNECT banana\n"[..],
        &[0xffu8; 200][..],
        &b"CONNECT 1024"[..],
    ] {
        let mut s = tokio::net::UnixStream::connect(&vm.vsock)
            .await
            .expect("connect");
        let _ = s.write_all(garbage).await;
        let _ = s.shutdown().await;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(
            r.is_ok(),
            "garbage {garbage:?} must not hang the connection"
        );
        assert!(!buf.starts_with(b"OK"), "no OK for garbage {garbage:?}");
    }
    // A port nobody listens on in the guest: refused, not hung.
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        hybrid_vsock::connect(&vm.vsock, 4444),
    )
    .await;
    assert!(
        matches!(refused, Ok(Err(_))),
        "connecting to a closed guest port is refused"
    );

    // 8 MiB each way, four streams at once.
    let v = vm.vsock.clone();
    tokio::join!(
        to_guest(&client, &v, 5001, 4 * MIB, 11),
        to_guest(&client, &v, 5002, 4 * MIB, 12),
        from_guest(&client, &v, 6001, 4 * MIB, 21),
        from_guest(&client, &v, 6002, 4 * MIB, 22),
    );

    // A host peer that disconnects mid-stream: the guest gets a reset and
    // the check fails cleanly; the VM keeps serving.
    let path = hybrid_vsock::port_socket_path(&vm.vsock, 6003);
    let listener = UnixListener::bind(&path).expect("bind");
    let mut req = StreamCheckRequest::new();
    req.direction = Direction::FROM_GUEST.into();
    req.port = 6003;
    req.bytes = 64 * MIB;
    req.timeout_ms = 60_000;
    let call = client.stream_check(ctx(), &req);
    let cut = async {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 100_000];
        let _ = s.read_exact(&mut buf).await;
        drop(s);
    };
    let (resp, ()) = tokio::join!(call, cut);
    let _ = std::fs::remove_file(&path);
    let err = resp.expect_err("a stream cut by the host must fail");
    assert!(
        err.to_string().contains("6003"),
        "error names the port: {err}"
    );
    client
        .health(ctx(), &HealthRequest::new())
        .await
        .expect("Health after a cut stream");

    // The pod's shared directory over virtio-fs: the guest reads a file the
    // host wrote and writes one the host then reads.
    shared_directory_round_trip(&client, &vm.vsock, &fs_daemon.shared)
        .await
        .expect("shared directory over virtio-fs");

    // The control API reports the VM, and pauses and resumes its vCPUs:
    // a paused guest does not answer, a resumed one does.
    let state = vm.api("{\"action\":\"state\"}").await.expect("api");
    assert!(state.contains("\"running\""), "{state}");
    let paused = vm.api("{\"action\":\"pause\"}").await.expect("api");
    assert!(paused.contains("\"paused\""), "{paused}");
    let short = ttrpc::context::with_timeout(1_500_000_000);
    assert!(
        client.health(short, &HealthRequest::new()).await.is_err(),
        "a paused guest cannot answer"
    );
    let resumed = vm.api("{\"action\":\"resume\"}").await.expect("api");
    assert!(resumed.contains("\"running\""), "{resumed}");
    client
        .health(ctx(), &HealthRequest::new())
        .await
        .expect("Health after resume");

    // Orderly shutdown: the VMM exits 0 and leaves nothing behind.
    client
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .expect("Shutdown");
    let status = vm
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("VMM exits");
    assert!(
        status.success(),
        "husk-vmm exit status {status}\n{}",
        vm.log_text()
    );
    // The VMM was the daemon's one client: it exits with it and removes its socket.
    let daemon_status = fs_daemon.wait_exit(Duration::from_secs(10)).await;
    assert!(
        daemon_status.as_ref().is_ok_and(|s| s.success()),
        "virtio-fs daemon: {daemon_status:?}"
    );
    let _ = std::fs::remove_dir(&fs_daemon.shared);
    let mut left = dir.entries();
    left.retain(|e| e != "vmm.log" && e != "serial.log");
    assert!(left.is_empty(), "files left behind: {left:?}");
    assert!(
        processes_mentioning(&dir.path().display().to_string()).is_empty(),
        "processes left behind"
    );
}
