//! Snapshot and restore of a real guest: boot once, snapshot through the
//! control API, restore into a new husk-vmm process, and the agent answers
//! there; a corrupted snapshot is refused with a clear error.

use std::time::Duration;

use husk_e2e::{require_kvm, Artifacts, TestDir, VmOptions, VmProcess};
use husk_protocols::{
    agent::{
        health_response::Status, stream_check_request::Direction, HealthRequest, ShutdownRequest,
        StreamCheckRequest, VersionRequest,
    },
    connect_agent, hybrid_vsock,
};
use tokio::{io::AsyncReadExt, net::UnixListener};

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restores_into_a_new_vmm_and_corrupt_ones_are_refused() {
    require_kvm();
    let artifacts = Artifacts::locate().expect("artifacts");
    let keep = TestDir::new("snap-store").expect("dir");
    let snap = keep.path().join("vm.snap");

    // 1. Boot, snapshot, stop.
    let dir_a = TestDir::new("snap-a").expect("dir");
    let mut a = VmProcess::spawn(&artifacts, dir_a.path(), &VmOptions::default()).expect("spawn");
    if let Err(e) = a.wait_ready(Duration::from_secs(300)).await {
        panic!("{e:#}\n{}", a.log_text());
    }
    let uptime_a = {
        let c = connect_agent(&a.vsock, Duration::from_secs(30))
            .await
            .expect("agent");
        c.version(ctx(), &VersionRequest::new())
            .await
            .expect("Version")
            .uptime_seconds
    };
    let resp = a
        .api(&format!(
            "{{\"action\":\"snapshot\",\"path\":\"{}\"}}",
            snap.display()
        ))
        .await
        .expect("api");
    assert!(
        resp.contains("\"ok\":true"),
        "snapshot: {resp}\n{}",
        a.log_text()
    );
    assert!(snap.exists());
    a.api("{\"action\":\"stop\"}").await.expect("stop");
    assert!(a
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exit")
        .success());

    // 2. Restore into a new process: the agent answers without a boot.
    let dir_b = TestDir::new("snap-b").expect("dir");
    let opts = VmOptions::restored_from(&snap);
    let mut b = VmProcess::spawn(&artifacts, dir_b.path(), &opts).expect("spawn");
    let client = match connect_agent(&b.vsock, Duration::from_secs(60)).await {
        Ok(c) => c,
        Err(e) => {
            let state = b.api("{\"action\":\"state\"}").await.unwrap_or_default();
            panic!("agent after restore: {e}\nstate {state}\n{}", b.log_text())
        }
    };
    let restored_after = b.started.elapsed();
    let health = client
        .health(ctx(), &HealthRequest::new())
        .await
        .expect("Health");
    assert_eq!(health.status.enum_value(), Ok(Status::SERVING));
    let v = client
        .version(ctx(), &VersionRequest::new())
        .await
        .expect("Version");
    assert!(
        v.uptime_seconds >= uptime_a,
        "guest time continues: {} < {uptime_a}",
        v.uptime_seconds
    );
    eprintln!("restored VM answered after {restored_after:?}");

    // Guest-initiated connections work after the restore too.
    let port = 6100;
    let path = hybrid_vsock::port_socket_path(&b.vsock, port);
    let listener = UnixListener::bind(&path).expect("bind");
    let mut req = StreamCheckRequest::new();
    req.direction = Direction::FROM_GUEST.into();
    req.port = port;
    req.bytes = 1 << 20;
    let (resp, got) = tokio::join!(client.stream_check(ctx(), &req), async {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.expect("read");
        v
    });
    assert_eq!(resp.expect("StreamCheck").bytes, got.len() as u64);

    client
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .expect("Shutdown");
    assert!(
        b.wait_exit(Duration::from_secs(60))
            .await
            .expect("exit")
            .success(),
        "{}",
        b.log_text()
    );

    // 3. A corrupted snapshot is refused with a clear error.
    let mut bytes = std::fs::read(&snap).expect("read snapshot");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    let bad = keep.path().join("bad.snap");
    std::fs::write(&bad, &bytes).expect("write");
    let dir_c = TestDir::new("snap-c").expect("dir");
    let opts = VmOptions::restored_from(&bad);
    let mut c = VmProcess::spawn(&artifacts, dir_c.path(), &opts).expect("spawn");
    let status = c.wait_exit(Duration::from_secs(60)).await.expect("exit");
    assert_eq!(status.code(), Some(2), "{}", c.log_text());
    assert!(
        c.log_text().contains("checksum mismatch"),
        "{}",
        c.log_text()
    );
}
