//! Snapshot and restore of a real guest: boot once, snapshot through the
//! control API, restore into a new husk-vmm process, and the agent answers
//! there; a corrupted snapshot is refused with a clear error. The VM has
//! a virtio-fs device: it can be snapshotted until the guest mounts the
//! file system (whose session lives in the daemon), not after.

use std::time::Duration;

use husk_e2e::{require_kvm, Artifacts, FsDaemon, TestDir, VmOptions, VmProcess};
use husk_protocols::{
    agent::{
        health_response::Status, stream_check_request::Direction, HealthRequest,
        MountSharedRequest, ShutdownRequest, StreamCheckRequest, VersionRequest,
    },
    connect_agent, hybrid_vsock,
};
use sha2::{Digest, Sha256};
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
    let mut fs_a = FsDaemon::spawn(&artifacts, dir_a.path())
        .await
        .expect("husk-virtiofsd");
    let opts = VmOptions {
        vmm_args: fs_a.vmm_args(),
        ..Default::default()
    };
    let mut a = VmProcess::spawn(&artifacts, dir_a.path(), &opts).expect("spawn");
    if let Err(e) = a.wait_ready(Duration::from_secs(300)).await {
        panic!("{e:#}\n{}", a.log_text());
    }
    let client_a = connect_agent(&a.vsock, Duration::from_secs(30))
        .await
        .expect("agent");
    let uptime_a = client_a
        .version(ctx(), &VersionRequest::new())
        .await
        .expect("Version")
        .uptime_seconds;
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

    // Once the guest has mounted virtio-fs, its FUSE session is in the
    // daemon: a snapshot is refused, clearly, and the VM keeps running.
    let mut mount = MountSharedRequest::new();
    mount.tag = "husk".into();
    mount.target = "/run/husk/shared".into();
    client_a
        .mount_shared(ctx(), &mount)
        .await
        .expect("MountShared");
    let late = keep.path().join("late.snap");
    let resp = a
        .api(&format!(
            "{{\"action\":\"snapshot\",\"path\":\"{}\"}}",
            late.display()
        ))
        .await
        .expect("api");
    assert!(
        resp.contains("\"ok\":false") && resp.contains("has used virtio-fs"),
        "snapshot after mount: {resp}"
    );
    // Nothing of the refused snapshot is left: neither the file nor the
    // temporary one it would have been written to (`late.tmp`).
    let mut left: Vec<String> = std::fs::read_dir(keep.path())
        .expect("read the snapshot directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["vm.snap"], "no partial snapshot is left");
    let health = client_a
        .health(ctx(), &HealthRequest::new())
        .await
        .expect("Health after a refused snapshot");
    assert_eq!(health.status.enum_value(), Ok(Status::SERVING));

    a.api("{\"action\":\"stop\"}").await.expect("stop");
    assert!(a
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exit")
        .success());
    let daemon = fs_a.wait_exit(Duration::from_secs(10)).await;
    assert!(daemon.is_ok_and(|s| s.success()));

    // 2. Restore into a new process: the agent answers without a boot.
    let dir_b = TestDir::new("snap-b").expect("dir");
    let fs_b = FsDaemon::spawn(&artifacts, dir_b.path())
        .await
        .expect("husk-virtiofsd");
    let mut opts = VmOptions::restored_from(&snap);
    opts.vmm_args.extend(fs_b.vmm_args());
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
    // All of it, and the bytes the guest meant to send.
    let resp = resp.expect("StreamCheck");
    assert_eq!(got.len(), 1 << 20, "the whole MiB arrived");
    assert_eq!(resp.bytes, got.len() as u64);
    assert_eq!(resp.sha256, Sha256::digest(&got).to_vec(), "intact");

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
    let fs_c = FsDaemon::spawn(&artifacts, dir_c.path())
        .await
        .expect("husk-virtiofsd");
    let mut opts = VmOptions::restored_from(&bad);
    opts.vmm_args.extend(fs_c.vmm_args());
    let mut c = VmProcess::spawn(&artifacts, dir_c.path(), &opts).expect("spawn");
    let status = c.wait_exit(Duration::from_secs(60)).await.expect("exit");
    assert_eq!(status.code(), Some(2), "{}", c.log_text());
    assert!(
        c.log_text().contains("checksum mismatch"),
        "{}",
        c.log_text()
    );
}
