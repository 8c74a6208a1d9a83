//! husk-virtiofsd as a VMM sees it: a real vhost-user handshake over its
//! socket (features, protocol features, the config space with the tag), one
//! VMM per daemon, and a clean exit when the VMM goes away.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use vhost::{
    vhost_user::{
        message::{VhostUserConfigFlags, VhostUserProtocolFeatures},
        Frontend, VhostUserFrontend,
    },
    VhostBackend,
};

const BIN: &str = env!("CARGO_BIN_EXE_husk-virtiofsd");
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let p = std::env::temp_dir().join(format!("husk-vfs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(p.join("shared")).expect("dir");
    Dir(p)
}

fn spawn(socket: &Path, shared: &Path, tag: &str) -> Child {
    Command::new(BIN)
        .arg("--socket")
        .arg(socket)
        .arg("--shared-dir")
        .arg(shared)
        .args(["--tag", tag, "--log", "warn"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn husk-virtiofsd")
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "husk-virtiofsd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serves_one_vmm_with_its_tag_then_exits() {
    let d = dir("ok");
    std::fs::write(d.0.join("shared/hello"), b"hi").expect("write");
    let socket = d.0.join("fs.sock");
    let mut child = spawn(&socket, &d.0.join("shared"), "podfs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }

    // hiprio + one request queue.
    let mut fe = Frontend::connect(&socket, 2).expect("connect");
    fe.set_owner().expect("set_owner");
    let features = fe.get_features().expect("get_features");
    assert_ne!(features & VIRTIO_F_VERSION_1, 0, "virtio 1.0");
    assert_ne!(
        features & VHOST_USER_F_PROTOCOL_FEATURES,
        0,
        "protocol features"
    );
    fe.set_features(features).expect("set_features");
    let proto = fe.get_protocol_features().expect("get_protocol_features");
    assert!(
        proto.contains(VhostUserProtocolFeatures::CONFIG),
        "config space over vhost-user"
    );
    fe.set_protocol_features(proto)
        .expect("set_protocol_features");
    // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
    let (_, config) = fe
        .get_config(0, 40, VhostUserConfigFlags::WRITABLE, &[0u8; 40])
        .expect("get_config");
    assert_eq!(&config[..5], b"podfs");
    assert!(config[5..36].iter().all(|&b| b == 0));
    assert!(u32::from_le_bytes([config[36], config[37], config[38], config[39]]) >= 1);

    // One VMM per daemon: a second one is refused at once, and the first
    // is still served.
    let second = std::os::unix::net::UnixStream::connect(&socket);
    assert!(second.is_err(), "a second VMM could connect: {second:?}");
    let again = fe.get_features().expect("the first VMM is still served");
    assert_eq!(again, features);

    // The VMM goes away: the daemon exits cleanly and leaves no socket.
    drop(fe);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(!socket.exists(), "socket removed");
    assert_eq!(
        std::fs::read(d.0.join("shared/hello")).expect("read"),
        b"hi",
        "the share is untouched"
    );
}

#[test]
fn bad_arguments_are_clear_errors() {
    let d = dir("bad");
    for (args, expect) in [
        (
            vec!["--shared-dir", "/nonexistent/dir"],
            "shared directory /nonexistent/dir",
        ),
        (vec!["--shared-dir", "/etc/hostname"], "is not a directory"),
        (
            vec!["--shared-dir", "/tmp", "--tag", &"x".repeat(40)],
            "the tag must be",
        ),
    ] {
        let out = Command::new(BIN)
            .arg("--socket")
            .arg(d.0.join("s.sock"))
            .args(&args)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}
