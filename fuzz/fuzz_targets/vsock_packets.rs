//! The vsock muxer's connection state machine, driven from both sides at
//! once: the guest's packets (44-byte headers and payloads, most of them
//! steered onto live ports), and the host's actions on real Unix sockets
//! (`CONNECT` lines on the device socket, accepts on a listening service,
//! writes, reads, half-closes and closes). Every input gets a fresh muxer, so
//! a crash reproduces from its input alone.
//!
//! Asserted on every packet the muxer gives the guest: addressed from the
//! host to this guest, a known operation, a length equal to its payload and
//! within the buffer; data only on a connection the guest has seen set up,
//! and never more than the guest's advertised credit (`buf_alloc` minus the
//! bytes in flight, from the guest's latest `fwd_cnt`). Asserted after every
//! guest packet: only a REQUEST can add a connection, and at most one.
//! Asserted always: connection and handshake counts stay within the muxer's
//! limits; the muxer never registers a descriptor twice nor changes one it
//! did not register; a reset leaves no connection and nothing registered;
//! and no file descriptor outlives the input.
#![no_main]

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::Shutdown,
    os::{
        fd::RawFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::PathBuf,
    sync::OnceLock,
};

use husk_vmm_core::devices::virtio::vsock::{
    muxer::{
        Interest, Muxer, Poller, Readiness, RxSink, BUF_ALLOC, HOST_CID, MAX_CONNECTIONS,
        MAX_PENDING,
    },
    packet::{op, Header, HDR_SIZE, MAX_PAYLOAD, TYPE_STREAM},
};
use libfuzzer_sys::fuzz_target;

const GUEST_CID: u64 = 3;
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const SINK_CAPACITY: usize = 4096;

/// Registrations as epoll would hold them; misuse is a bug in the muxer.
#[derive(Default)]
struct StrictPoller(HashMap<RawFd, Interest>);
impl Poller for StrictPoller {
    fn add(&mut self, fd: RawFd, interest: Interest) {
        assert!(
            self.0.insert(fd, interest).is_none(),
            "fd {fd} registered twice"
        );
    }
    fn modify(&mut self, fd: RawFd, interest: Interest) {
        assert!(
            self.0.insert(fd, interest).is_some(),
            "fd {fd} modified but never registered"
        );
    }
    fn remove(&mut self, fd: RawFd) {
        // Removing an unknown descriptor is harmless (the muxer does it for
        // descriptors that are no longer its own).
        self.0.remove(&fd);
    }
}

/// What the guest has told the muxer about one connection.
#[derive(Debug, Default, Clone, Copy)]
struct Conn {
    established: bool,
    buf_alloc: u32,
    fwd_cnt: u32,
    /// Data bytes the muxer sent the guest on it.
    sent: u32,
}

/// Keyed (host port, guest port).
type Model = HashMap<(u32, u32), Conn>;

struct Sink<'a> {
    model: &'a mut Model,
    packets: usize,
}
impl RxSink for Sink<'_> {
    fn capacity(&self) -> usize {
        SINK_CAPACITY
    }
    fn write_packet(&mut self, hdr: &Header, payload: &[u8]) -> std::io::Result<()> {
        assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID), "{hdr:?}");
        assert_eq!(hdr.type_, TYPE_STREAM);
        assert!(
            (op::REQUEST..=op::CREDIT_REQUEST).contains(&hdr.op),
            "{hdr:?}"
        );
        assert_eq!(hdr.len as usize, payload.len());
        assert!(payload.len() + HDR_SIZE <= SINK_CAPACITY && hdr.len <= MAX_PAYLOAD);
        assert_eq!(hdr.buf_alloc, BUF_ALLOC);
        let key = (hdr.src_port, hdr.dst_port);
        match hdr.op {
            op::REQUEST => {
                assert!(
                    hdr.src_port >= FIRST_LOCAL_PORT,
                    "host-initiated ports come from the muxer's range"
                );
                self.model.insert(key, Conn::default());
            }
            op::RW => {
                assert!(!payload.is_empty(), "empty data packet");
                let c = self
                    .model
                    .get_mut(&key)
                    .unwrap_or_else(|| panic!("data on {key:?}, never set up"));
                assert!(
                    c.established,
                    "data on {key:?} before the guest accepted it"
                );
                let in_flight = c.sent.wrapping_sub(c.fwd_cnt);
                assert!(
                    u64::from(in_flight) + payload.len() as u64 <= u64::from(c.buf_alloc),
                    "{} bytes beyond the guest's credit on {key:?}: {c:?}",
                    payload.len()
                );
                c.sent = c.sent.wrapping_add(hdr.len);
            }
            _ => {}
        }
        self.packets += 1;
        Ok(())
    }
}

struct Fixture {
    dir: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("husk-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        Fixture { dir }
    })
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Delivers the readiness poll(2) reports for every registered descriptor.
fn dispatch(mux: &mut Muxer, poller: &mut StrictPoller) {
    for _ in 0..4 {
        let mut fds: Vec<libc::pollfd> = poller
            .0
            .iter()
            .map(|(&fd, i)| libc::pollfd {
                fd,
                events: (if i.read { libc::POLLIN } else { 0 })
                    | (if i.write { libc::POLLOUT } else { 0 }),
                revents: 0,
            })
            .collect();
        fds.sort_by_key(|p| p.fd);
        if fds.is_empty() {
            return;
        }
        // SAFETY: `fds` is a valid array of pollfd of the length passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n <= 0 {
            return;
        }
        for p in fds.iter().filter(|p| p.revents != 0) {
            let ev = Readiness {
                read: p.revents & libc::POLLIN != 0,
                write: p.revents & libc::POLLOUT != 0,
                hangup: p.revents & libc::POLLHUP != 0,
                error: p.revents & libc::POLLERR != 0,
            };
            mux.handle_fd(p.fd, ev, poller);
        }
    }
}

fn check_bounds(mux: &Muxer) {
    let (conns, pending) = mux.connection_count();
    assert!(
        conns <= MAX_CONNECTIONS && pending <= MAX_PENDING,
        "{conns} connections, {pending} pending"
    );
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let fds_before = open_fds();
    {
        let uds = f.dir.join("v.sock");
        let service_path = f.dir.join("v.sock_1025");
        let _ = std::fs::remove_file(&service_path);
        let service = UnixListener::bind(&service_path).expect("bind service");
        service.set_nonblocking(true).expect("nonblocking");
        let mut mux = Muxer::new(GUEST_CID, &uds).expect("muxer");
        let mut poller = StrictPoller::default();
        let mut model = Model::new();
        let mut hosts: Vec<UnixStream> = Vec::new();
        let mut rest = data;
        while let Some((&action, tail)) = rest.split_first() {
            rest = tail;
            match action % 8 {
                0..=3 => {
                    if rest.len() < HDR_SIZE {
                        break;
                    }
                    let mut raw = [0u8; HDR_SIZE];
                    raw.copy_from_slice(&rest[..HDR_SIZE]);
                    rest = &rest[HDR_SIZE..];
                    let mut hdr = Header::from_bytes(&raw);
                    // Steer most packets onto live ports so the state machine
                    // runs: guest ports 0-3; host services 1024-1026 (1025
                    // listens) or the first host-initiated ports.
                    let steer = hdr.src_cid;
                    if steer & 1 == 0 {
                        hdr.src_cid = GUEST_CID;
                        hdr.dst_cid = HOST_CID;
                        hdr.type_ = TYPE_STREAM;
                        hdr.op %= 8;
                        hdr.dst_port = if steer & 2 != 0 {
                            FIRST_LOCAL_PORT + (hdr.dst_port % 4)
                        } else {
                            1024 + (hdr.dst_port % 3)
                        };
                        hdr.src_port %= 4;
                        if hdr.op != op::RW {
                            hdr.len = 0;
                        }
                    }
                    let n = (hdr.len as usize).min(rest.len());
                    hdr.len = n as u32;
                    let payload = &rest[..n];
                    rest = &rest[n..];
                    if hdr.check(GUEST_CID, HOST_CID).is_ok() {
                        let key = (hdr.dst_port, hdr.src_port);
                        let c = model.entry(key).or_default();
                        if hdr.op == op::REQUEST {
                            *c = Conn {
                                established: true,
                                ..Conn::default()
                            };
                        } else if hdr.op == op::RESPONSE {
                            c.established = true;
                        }
                        c.buf_alloc = hdr.buf_alloc;
                        c.fwd_cnt = hdr.fwd_cnt;
                        let before = mux.connection_count().0;
                        mux.handle_guest_packet(&hdr, payload, &mut poller);
                        let after = mux.connection_count().0;
                        let most = before + usize::from(hdr.op == op::REQUEST);
                        assert!(
                            after <= most,
                            "op {} took {before} connections to {after}",
                            hdr.op
                        );
                    }
                }
                4 => {
                    // A host process connects to a guest port.
                    let Some((&arg, tail)) = rest.split_first() else {
                        break;
                    };
                    rest = tail;
                    if let Ok(mut s) = UnixStream::connect(&uds) {
                        let _ = s.set_nonblocking(true);
                        let line = if arg & 0x80 != 0 {
                            format!("connect {}\nearly bytes", arg % 4)
                        } else if arg & 0x40 != 0 {
                            format!("CONNECT x{arg}\n")
                        } else {
                            format!("CONNECT {}\n", arg % 4)
                        };
                        let _ = s.write(line.as_bytes());
                        hosts.push(s);
                    }
                    mux.accept(&mut poller);
                }
                5 => {
                    // The host service takes the guest's connections.
                    while let Ok((s, _)) = service.accept() {
                        let _ = s.set_nonblocking(true);
                        hosts.push(s);
                    }
                }
                6 => {
                    // A host stream writes.
                    let Some((&[i, n], tail)) = rest.split_first_chunk::<2>() else {
                        break;
                    };
                    rest = tail;
                    if !hosts.is_empty() {
                        let k = usize::from(i) % hosts.len();
                        let _ = hosts[k].write(&vec![i; usize::from(n) * 64]);
                    }
                }
                _ => {
                    // A host stream reads, half-closes or closes.
                    let Some((&arg, tail)) = rest.split_first() else {
                        break;
                    };
                    rest = tail;
                    if !hosts.is_empty() {
                        let k = usize::from(arg >> 2) % hosts.len();
                        match arg & 3 {
                            0 => {
                                hosts.swap_remove(k);
                            }
                            1 => {
                                let _ = hosts[k].shutdown(Shutdown::Write);
                            }
                            _ => {
                                let mut buf = [0u8; 16384];
                                let _ = hosts[k].read(&mut buf);
                            }
                        }
                    }
                }
            }
            dispatch(&mut mux, &mut poller);
            let mut sink = Sink {
                model: &mut model,
                packets: 0,
            };
            while sink.packets < 64 && mux.fill_rx(&mut sink, &mut poller) {}
            check_bounds(&mux);
        }
        mux.reset(&mut poller);
        assert_eq!(
            mux.connection_count(),
            (0, 0),
            "connections left after a reset"
        );
        assert!(
            poller.0.is_empty(),
            "descriptors still registered after a reset: {:?}",
            poller.0
        );
        drop(hosts);
        drop(mux);
        drop(service);
        let _ = std::fs::remove_file(&service_path);
    }
    assert_eq!(open_fds(), fds_before, "file descriptors leaked");
});
