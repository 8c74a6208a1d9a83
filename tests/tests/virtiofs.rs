//! husk-vmm's vhost-user virtio-fs frontend with the real husk-virtiofsd:
//! the frontend hands the daemon guest memory and a queue, a FUSE_INIT
//! request placed in that queue (as a guest driver would) is answered by the
//! daemon, and the answer reaches the device's interrupt.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use husk_e2e::{proc_caps as caps, Artifacts, TestDir};
use husk_vmm_core::{
    devices::virtio::{fs::VhostUserFs, Interrupt, InterruptLine, VirtioDevice},
    memory::create_guest_memory,
};
use virtio_queue::{
    desc::{split::Descriptor as SplitDescriptor, RawDescriptor},
    mock::MockSplitQueue,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Default, Clone)]
struct Counter(Arc<AtomicUsize>);
impl InterruptLine for Counter {
    fn raise(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

const FUSE_INIT: u32 = 26;
const REQ: u64 = 0x10_0000;
const RESP: u64 = 0x20_0000;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

#[test]
fn fuse_init_through_the_daemon_reaches_the_guest_queue() {
    let artifacts = Artifacts::locate().expect("artifacts");
    let dir = TestDir::new("vfs").expect("dir");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("shared dir");
    let socket = dir.path().join("fs.sock");
    let mut daemon = std::process::Command::new(&artifacts.virtiofsd)
        .arg("--socket")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&shared)
        .args(["--tag", "pod", "--log", "warn"])
        .spawn()
        .expect("spawn husk-virtiofsd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "daemon socket");
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut fs = VhostUserFs::connect(&socket, "pod").expect("connect");
    let mut cfg = [0u8; 40];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..3], b"pod");
    assert_eq!(u32::from_le_bytes([cfg[36], cfg[37], cfg[38], cfg[39]]), 1);
    fs.ack_features(fs.features());

    // Guest memory with the two queues and one FUSE_INIT request in queue 1.
    let (mem, _memfd) = create_guest_memory(4 << 20).expect("memory");
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let requests = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let mut req = Vec::new();
    req.extend_from_slice(&104u32.to_le_bytes()); // len: in header + init_in
    req.extend_from_slice(&FUSE_INIT.to_le_bytes());
    req.extend_from_slice(&7u64.to_le_bytes()); // unique
    req.extend_from_slice(&[0u8; 24]); // nodeid, uid, gid, pid, extlen, padding
    req.extend_from_slice(&7u32.to_le_bytes()); // major
    req.extend_from_slice(&38u32.to_le_bytes()); // minor
    req.extend_from_slice(&[0u8; 56]);
    mem.write_slice(&req, GuestAddress(REQ)).expect("request");
    let chain = [
        RawDescriptor::from(SplitDescriptor::new(REQ, 104, VRING_DESC_F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(RESP, 4096, VRING_DESC_F_WRITE, 0)),
    ];
    requests.add_desc_chains(&chain, 0).expect("chain");

    let irqs = Counter::default();
    let interrupt = Interrupt::new(Box::new(irqs.clone()));
    let kicks: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("evt"))
        .collect();
    let queues = vec![
        hiprio.create_queue().expect("q0"),
        requests.create_queue().expect("q1"),
    ];

    // The device talks to the daemon from the VMM's event loop.
    type Handler = Arc<std::sync::Mutex<husk_vmm_core::devices::virtio::fs::FsHandler>>;
    let mut event_loop = event_manager::EventManager::<Handler>::new().expect("event manager");
    let handler = Arc::new(std::sync::Mutex::new(fs.handler().expect("handler")));
    event_manager::SubscriberOps::add_subscriber(&mut event_loop, handler);
    fs.activate(
        mem.clone(),
        interrupt.clone(),
        queues,
        kicks
            .iter()
            .map(|k| k.try_clone().expect("clone"))
            .collect(),
    )
    .expect("activate");

    // The "guest" notifies queue 1; the daemon answers into guest memory and
    // its call eventfd, relayed by the handler, raises the device interrupt.
    kicks[1].write(1).expect("kick");
    let deadline = Instant::now() + Duration::from_secs(10);
    while requests.used().idx().load() == 0 || irqs.0.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "no answer or no interrupt from the daemon"
        );
        event_loop.run_with_timeout(50).expect("event loop");
    }
    assert_ne!(
        interrupt.status() & husk_vmm_core::devices::virtio::INT_VRING,
        0
    );
    let mut out = [0u8; 16 + 8];
    mem.read_slice(&mut out, GuestAddress(RESP))
        .expect("response");
    let error = i32::from_le_bytes([out[4], out[5], out[6], out[7]]);
    let unique = u64::from_le_bytes([
        out[8], out[9], out[10], out[11], out[12], out[13], out[14], out[15],
    ]);
    let major = u32::from_le_bytes([out[16], out[17], out[18], out[19]]);
    assert_eq!((error, unique, major), (0, 7, 7), "FUSE_INIT answered");

    fs.reset();
    event_loop.run_with_timeout(100).expect("event loop");
    // The VMM goes: the daemon exits cleanly.
    drop(event_loop);
    drop(fs);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = daemon.try_wait().expect("wait") {
            assert!(status.success(), "daemon exit {status}");
            break;
        }
        assert!(Instant::now() < deadline, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!socket.exists());
}

/// The serving daemon keeps only what a file server needs (CHOWN,
/// DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID, MKNOD, SETFCAP: no
/// SYS_ADMIN, no DAC_READ_SEARCH for open_by_handle_at), none inheritable
/// and an empty bounding set; the sandbox's waiting parent keeps none.
#[test]
fn the_serving_daemon_keeps_only_file_server_capabilities() {
    const SERVING: u64 = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 4 | 1 << 6 | 1 << 7 | 1 << 27 | 1 << 31;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let a = Artifacts::locate().expect("artifacts");
        let dir = TestDir::new("fs-caps").expect("dir");
        let daemon = husk_e2e::FsDaemon::spawn(&a, dir.path())
            .await
            .expect("daemon");
        let parent = daemon.pid().expect("pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        let (server, seen) = loop {
            let server = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                .ok()
                .and_then(|c| {
                    c.split_whitespace()
                        .next()
                        .and_then(|p| p.parse::<u32>().ok())
                });
            let seen = server.map(|s| {
                (
                    caps(s, "CapEff"),
                    caps(s, "CapPrm"),
                    caps(s, "CapInh"),
                    caps(s, "CapBnd"),
                )
            });
            if seen.is_some_and(|c| c.0 == Some(SERVING)) || Instant::now() > deadline {
                break (server, seen);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(server.is_some(), "no serving child of {parent}");
        assert_eq!(
            seen,
            Some((Some(SERVING), Some(SERVING), Some(0), Some(0))),
            "the serving daemon's CapEff, CapPrm, CapInh, CapBnd"
        );
        assert_eq!(caps(parent, "CapEff"), Some(0), "the waiting parent");
        // The serving child outlives a killed parent (in husk, the pod's
        // cgroup takes both): end it here.
        if let Some(s) = server {
            let _ = std::process::Command::new("kill")
                .args(["-9", &s.to_string()])
                .status();
        }
        drop(daemon);
    });
}
