//! The agent's container API in a real guest, without the shim: a VM
//! restored from the template mounts its shared directory, and containers
//! made from OCI bundles in that directory (a busybox root file system,
//! Spec::default() as runc would generate it) run with their stdio on vsock
//! streams, exec, signals, pause/resume, pids and delete. One VM for all
//! of it: guest kernels are slow on PVM hosts.

use std::{path::Path, time::Duration};

use husk_e2e::{
    busybox_rootfs, make_template, require_kvm, Artifacts, FsDaemon, TestDir, VmOptions, VmProcess,
};
use husk_protocols::{
    agent::{
        ContainerRequest, CreateContainerRequest, DeleteContainerRequest, ExecProcessRequest,
        MountSharedRequest, PersonalizeRequest, ProcessRequest, ShutdownRequest,
        SignalProcessRequest, Stdio,
    },
    agent_ttrpc::AgentClient,
    connect_agent, hybrid_vsock, STDIO_TOKEN_LEN,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(120_000_000_000)
}

/// Writes a bundle for container `id` under `shared`: a busybox root file
/// system and runc's default spec running `args`.
fn bundle(shared: &Path, id: &str, args: &[&str]) -> serde_json::Value {
    let dir = shared.join(id);
    busybox_rootfs(&dir.join("rootfs")).expect("rootfs");
    let mut spec = serde_json::to_value(oci_spec::runtime::Spec::default()).expect("spec");
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["root"]["readonly"] = serde_json::json!(false);
    spec["hostname"] = serde_json::json!(id);
    spec["linux"]["cgroupsPath"] = serde_json::json!(format!("/husk-test/{id}"));
    write_spec(shared, id, &spec);
    spec
}

fn write_spec(shared: &Path, id: &str, spec: &serde_json::Value) {
    std::fs::write(
        shared.join(id).join("config.json"),
        serde_json::to_vec_pretty(spec).expect("json"),
    )
    .expect("config.json");
}

/// The stdio token these tests hand the agent.
const TOKEN: [u8; STDIO_TOKEN_LEN] = *b"husk-test-token!";

/// Host listeners for a process's stdio ports.
struct StdioPorts {
    vsock: std::path::PathBuf,
    ports: [u32; 3],
    listeners: [Option<UnixListener>; 3],
}

impl StdioPorts {
    fn new(vsock: &Path, ports: [u32; 3]) -> Self {
        let listeners = ports.map(|p| {
            (p != 0).then(|| {
                UnixListener::bind(hybrid_vsock::port_socket_path(vsock, p)).expect("bind")
            })
        });
        Self {
            vsock: vsock.to_path_buf(),
            ports,
            listeners,
        }
    }

    fn stdio(&self) -> Stdio {
        let mut s = Stdio::new();
        s.stdin_port = self.ports[0];
        s.stdout_port = self.ports[1];
        s.stderr_port = self.ports[2];
        s.token = TOKEN.to_vec();
        s
    }

    /// Accepts the agent's connections (it makes them while creating);
    /// each starts with the process's token.
    async fn accept(&mut self) -> [Option<UnixStream>; 3] {
        let mut out = [None, None, None];
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if let Some(l) = l.take() {
                let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), l.accept())
                    .await
                    .expect("the agent connects its stdio")
                    .expect("accept");
                let mut token = [0u8; STDIO_TOKEN_LEN];
                s.read_exact(&mut token).await.expect("the token");
                assert_eq!(token, TOKEN, "the agent presents the process's token");
                out[i] = Some(s);
            }
        }
        out
    }
}

impl Drop for StdioPorts {
    fn drop(&mut self) {
        for p in self.ports.iter().filter(|p| **p != 0) {
            let _ = std::fs::remove_file(hybrid_vsock::port_socket_path(&self.vsock, *p));
        }
    }
}

async fn read_all(s: Option<UnixStream>) -> String {
    let mut v = Vec::new();
    if let Some(mut s) = s {
        s.read_to_end(&mut v).await.expect("read");
    }
    String::from_utf8_lossy(&v).into_owned()
}

async fn create(
    client: &AgentClient,
    id: &str,
    ports: &mut StdioPorts,
) -> (ttrpc::Result<u32>, [Option<UnixStream>; 3]) {
    let mut req = CreateContainerRequest::new();
    req.container_id = id.into();
    req.bundle = format!("/run/husk/shared/{id}");
    req.stdio = Some(ports.stdio()).into();
    let (resp, streams) = tokio::join!(client.create_container(ctx(), &req), async {
        if ports.listeners.iter().any(Option::is_some) {
            Some(ports.accept().await)
        } else {
            None
        }
    });
    (resp.map(|r| r.pid), streams.unwrap_or([None, None, None]))
}

/// An ExecProcess request for `args` as root in `/` of container `id`,
/// with environment `env` (no stdio).
fn exec_request(id: &str, exec_id: &str, args: &[&str], env: &[&str]) -> ExecProcessRequest {
    let mut exec = ExecProcessRequest::new();
    exec.container_id = id.into();
    exec.exec_id = exec_id.into();
    exec.process_json = serde_json::to_vec(&serde_json::json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": env,
        "cwd": "/"
    }))
    .expect("json");
    exec
}

fn container(id: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = id.into();
    r
}

fn process(id: &str, exec_id: &str) -> ProcessRequest {
    let mut r = ProcessRequest::new();
    r.container_id = id.into();
    r.exec_id = exec_id.into();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_containers_from_bundles_on_the_shared_directory() {
    require_kvm();
    let artifacts = Artifacts::locate().expect("artifacts");
    let store = TestDir::new("ctr-template").expect("dir");
    let template = make_template(&artifacts, store.path(), 128)
        .await
        .expect("template");
    let dir = TestDir::new("ctr-vm").expect("dir");
    let mut fs = FsDaemon::spawn(&artifacts, dir.path())
        .await
        .expect("husk-virtiofsd");
    let mut opts = VmOptions::restored_from(&template);
    opts.vmm_args.extend(fs.vmm_args());
    let mut vm = VmProcess::spawn(&artifacts, dir.path(), &opts).expect("spawn");
    let client = match connect_agent(&vm.vsock, Duration::from_secs(60)).await {
        Ok(c) => c,
        Err(e) => panic!("agent: {e}\n{}", vm.log_text()),
    };
    let mut req = PersonalizeRequest::new();
    req.entropy = vec![7u8; 64];
    client.personalize(ctx(), &req).await.expect("Personalize");
    let mut mount = MountSharedRequest::new();
    mount.tag = "husk".into();
    mount.target = "/run/husk/shared".into();
    client
        .mount_shared(ctx(), &mount)
        .await
        .expect("MountShared");
    let shared = fs.shared.clone();

    // 1. A container with stdin, stdout, stderr and an exit code; its
    //    write lands in the host directory.
    bundle(
        &shared,
        "c1",
        &[
            "/bin/sh",
            "-c",
            "echo hello; echo oops >&2; cat; echo written > /from-container; \
             echo to-dev-stdout > /dev/stdout; exit 3",
        ],
    );
    let mut ports = StdioPorts::new(&vm.vsock, [7001, 7002, 7003]);
    let (pid, [stdin, stdout, stderr]) = create(&client, "c1", &mut ports).await;
    let pid = match pid {
        Ok(p) => p,
        Err(e) => panic!("CreateContainer: {e}\n{}", vm.log_text()),
    };
    assert!(pid > 1, "init pid {pid}");
    let started = client
        .start_container(ctx(), &container("c1"))
        .await
        .expect("StartContainer");
    assert_eq!(started.pid, pid);
    let mut stdin = stdin.expect("stdin stream");
    stdin.write_all(b"piped input\n").await.expect("stdin");
    stdin.shutdown().await.expect("close stdin");
    let init_c1 = process("c1", "");
    let (out, err, waited) = tokio::join!(
        read_all(stdout),
        read_all(stderr),
        client.wait_process(ctx(), &init_c1)
    );
    assert_eq!(waited.expect("WaitProcess").exit_status, 3);
    assert_eq!(out, "hello\npiped input\nto-dev-stdout\n");
    assert_eq!(err, "oops\n");
    assert_eq!(
        std::fs::read_to_string(shared.join("c1/rootfs/from-container")).expect("host sees it"),
        "written\n"
    );
    let mut del = DeleteContainerRequest::new();
    del.container_id = "c1".into();
    client.delete_container(ctx(), &del).await.expect("Delete");
    assert!(
        client
            .wait_process(ctx(), &process("c1", ""))
            .await
            .is_err(),
        "a deleted container is gone"
    );
    drop(ports);

    // 2. A long-running container: exec, pids, pause/resume, kill.
    bundle(&shared, "c2", &["/bin/sleep", "1000"]);
    let mut none = StdioPorts::new(&vm.vsock, [0, 0, 0]);
    let (pid, _) = create(&client, "c2", &mut none).await;
    pid.expect("create c2");
    client
        .start_container(ctx(), &container("c2"))
        .await
        .expect("start c2");
    let mut exec_ports = StdioPorts::new(&vm.vsock, [0, 7012, 0]);
    let mut exec = exec_request(
        "c2",
        "e1",
        &[
            "/bin/sh",
            "-c",
            "echo exec-out $(hostname); sleep 1; exit 5",
        ],
        &["PATH=/bin"],
    );
    exec.stdio = Some(exec_ports.stdio()).into();
    let (execd, streams) = tokio::join!(client.exec_process(ctx(), &exec), exec_ports.accept());
    execd.expect("ExecProcess");
    let [_, exec_out, _] = streams;
    let pids = client
        .list_pids(ctx(), &container("c2"))
        .await
        .expect("ListPids")
        .pids;
    assert!(pids.len() >= 2, "sleep and the exec'd shell: {pids:?}");
    let e1 = process("c2", "e1");
    let (out, waited) = tokio::join!(read_all(exec_out), client.wait_process(ctx(), &e1));
    assert_eq!(waited.expect("wait exec").exit_status, 5);
    assert_eq!(out, "exec-out c2\n");
    client
        .delete_process(ctx(), &process("c2", "e1"))
        .await
        .expect("DeleteProcess");
    // runc's rule for commands: a path runs without PATH in the
    // environment (CRI's pause image sets none); a bare name without PATH
    // is refused with a reason.
    let mut no_path_ports = StdioPorts::new(&vm.vsock, [0, 7013, 0]);
    let mut exec = exec_request(
        "c2",
        "e-no-path",
        &["/bin/sh", "-c", "echo ran without PATH"],
        &[],
    );
    exec.stdio = Some(no_path_ports.stdio()).into();
    let (execd, streams) = tokio::join!(client.exec_process(ctx(), &exec), no_path_ports.accept());
    execd.expect("ExecProcess of /bin/sh without PATH");
    let [_, out_stream, _] = streams;
    let e = process("c2", "e-no-path");
    let (out, waited) = tokio::join!(read_all(out_stream), client.wait_process(ctx(), &e));
    assert_eq!(waited.expect("wait").exit_status, 0);
    assert_eq!(out, "ran without PATH\n");
    client
        .delete_process(ctx(), &e)
        .await
        .expect("DeleteProcess");
    let exec = exec_request("c2", "e-bare", &["sh", "-c", "true"], &[]);
    let refused = client.exec_process(ctx(), &exec).await;
    let why = format!("{refused:?}");
    assert!(
        refused.is_err() && why.contains("no PATH"),
        "a bare command without PATH: {why}"
    );
    client
        .pause_container(ctx(), &container("c2"))
        .await
        .expect("pause");
    client
        .resume_container(ctx(), &container("c2"))
        .await
        .expect("resume");
    let mut kill = SignalProcessRequest::new();
    kill.container_id = "c2".into();
    kill.signal = 9;
    client.signal_process(ctx(), &kill).await.expect("kill");
    let waited = client
        .wait_process(ctx(), &process("c2", ""))
        .await
        .expect("wait c2");
    assert_eq!(waited.exit_status, 137);
    let mut del = DeleteContainerRequest::new();
    del.container_id = "c2".into();
    client
        .delete_container(ctx(), &del)
        .await
        .expect("delete c2");

    // 3. Bad input gets clear errors and breaks nothing.
    let mut spec = bundle(&shared, "c3", &["/nonexistent"]);
    std::fs::write(shared.join("c3/config.json"), b"{ not json").expect("write");
    let (r, _) = create(&client, "c3", &mut none).await;
    let e = r.expect_err("malformed config.json");
    assert!(format!("{e:?}").contains("not a valid OCI spec"), "{e:?}");
    spec["process"]["args"] = serde_json::json!(["/nonexistent"]);
    write_spec(&shared, "c3", &spec);
    let (r, _) = create(&client, "c3", &mut none).await;
    let failed = match r {
        Err(e) => format!("{e:?}"),
        Ok(_) => {
            let started = client.start_container(ctx(), &container("c3")).await;
            let waited = client.wait_process(ctx(), &process("c3", "")).await;
            format!("{started:?} {waited:?}")
        }
    };
    assert!(failed.contains("nonexistent"), "missing binary: {failed}");
    let mut del = DeleteContainerRequest::new();
    del.container_id = "c3".into();
    del.force = true;
    let _ = client.delete_container(ctx(), &del).await;
    // A container that would share the agent's mount namespace: refused.
    spec["process"]["args"] = serde_json::json!(["/bin/true"]);
    spec["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}, {"type": "ipc"}]);
    write_spec(&shared, "c3", &spec);
    let (r, _) = create(&client, "c3", &mut none).await;
    let e = r.expect_err("no mount namespace");
    assert!(
        format!("{e:?}").contains("no mount namespace of its own"),
        "{e:?}"
    );

    // Streams without a proper token: refused before anything connects.
    let mut untokened = StdioPorts::new(&vm.vsock, [0, 7021, 0]);
    let mut stdio = untokened.stdio();
    stdio.token.truncate(4);
    let mut req = CreateContainerRequest::new();
    req.container_id = "c4".into();
    req.bundle = "/run/husk/shared/c2".into();
    req.stdio = Some(stdio).into();
    let e = client
        .create_container(ctx(), &req)
        .await
        .expect_err("a 4-byte stdio token");
    match &e {
        ttrpc::Error::RpcStatus(status) => {
            assert_eq!(status.code(), ttrpc::Code::INVALID_ARGUMENT, "{e:?}");
            assert!(
                status.message.contains("stdio token must be 16 bytes"),
                "{e:?}"
            );
        }
        other => panic!("not a status: {other:?}"),
    }
    let listener = untokened.listeners[1].take().expect("listener");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), listener.accept())
            .await
            .is_err(),
        "nothing connected to the stream's port"
    );
    // An id that is a path, and a bundle path that climbs out of
    // /run/husk: each is refused for exactly that. The bundle resolves to
    // c2's valid bundle, so only the path check can refuse it.
    let mut bad = CreateContainerRequest::new();
    bad.container_id = "../x".into();
    bad.bundle = "/run/husk/shared/c2".into();
    match client.create_container(ctx(), &bad).await {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT, "{s:?}");
            assert!(s.message.contains("invalid container id \"../x\""), "{s:?}");
        }
        other => panic!("id \"../x\" was not refused as invalid: {other:?}"),
    }
    bad.container_id = "climber".into();
    bad.bundle = "/run/husk/shared/../shared/c2".into();
    husk_e2e::refused_as_outside(
        client.create_container(ctx(), &bad).await,
        "/run/husk/shared/../shared/c2",
    )
    .expect("a bundle path with ..");

    client
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .expect("Shutdown");
    let status = vm.wait_exit(Duration::from_secs(60)).await.expect("exit");
    assert!(status.success(), "{status}\n{}", vm.log_text());
    let daemon = fs.wait_exit(Duration::from_secs(10)).await;
    assert!(daemon.is_ok_and(|s| s.success()));
}
