//! Muxer tests over real Unix sockets, with the guest side played by the
//! test (packets in, packets out) and the event loop by a recording poller.

use std::{
    collections::HashMap,
    io::{Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    time::Duration,
};

use super::*;

const GUEST_CID: u64 = 3;

#[derive(Default)]
struct TestPoller {
    watched: HashMap<RawFd, Interest>,
}

impl Poller for TestPoller {
    fn add(&mut self, fd: RawFd, interest: Interest) {
        assert!(
            self.watched.insert(fd, interest).is_none(),
            "fd {fd} added twice"
        );
    }
    fn modify(&mut self, fd: RawFd, interest: Interest) {
        assert!(
            self.watched.insert(fd, interest).is_some(),
            "fd {fd} modified before add"
        );
    }
    fn remove(&mut self, fd: RawFd) {
        self.watched.remove(&fd);
    }
}

struct Sink {
    cap: usize,
    packets: Vec<(Header, Vec<u8>)>,
}

impl RxSink for Sink {
    fn capacity(&self) -> usize {
        self.cap
    }
    fn write_packet(&mut self, hdr: &Header, payload: &[u8]) -> io::Result<()> {
        assert_eq!(hdr.len as usize, payload.len());
        self.packets.push((*hdr, payload.to_vec()));
        Ok(())
    }
}

struct Harness {
    _dir: TempDir,
    path: PathBuf,
    mux: Muxer,
    poller: TestPoller,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn harness() -> Harness {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "husk-muxer-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("v.sock");
    let mux = Muxer::new(GUEST_CID, &path).expect("muxer");
    Harness {
        _dir: TempDir(dir),
        path,
        mux,
        poller: TestPoller::default(),
    }
}

fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

impl Harness {
    fn drain(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut sink = Sink {
            cap: 4096 + HDR_SIZE,
            packets: Vec::new(),
        };
        while self.mux.fill_rx(&mut sink, &mut self.poller) {}
        sink.packets
    }

    fn pump(&mut self) {
        // Deliver readiness for every watched descriptor, as epoll would
        // after a short wait.
        std::thread::sleep(Duration::from_millis(5));
        let fds: Vec<(RawFd, Interest)> =
            self.poller.watched.iter().map(|(f, i)| (*f, *i)).collect();
        for (fd, interest) in fds {
            if fd == self.mux.listener_fd() {
                self.mux.accept(&mut self.poller);
            } else {
                let ev = Readiness {
                    read: interest.read,
                    write: interest.write,
                    ..Default::default()
                };
                self.mux.handle_fd(fd, ev, &mut self.poller);
            }
        }
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let hdr = Header {
            len: payload.len() as u32,
            ..hdr
        };
        hdr.check(GUEST_CID, HOST_CID)
            .expect("test packet is valid");
        self.mux
            .handle_guest_packet(&hdr, payload, &mut self.poller);
    }

    /// Connects from the host to guest `port`; returns the stream and the
    /// REQUEST the guest received.
    fn host_connect(&mut self, port: u32) -> (UnixStream, Header) {
        let mut s = UnixStream::connect(&self.path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        writeln!(s, "CONNECT {port}").expect("write");
        self.poller
            .watched
            .insert(self.mux.listener_fd(), Interest::READ);
        self.pump();
        self.pump();
        let pkts = self.drain();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        let req = pkts[0].0;
        assert_eq!(
            (req.op, req.dst_port, req.dst_cid, req.src_cid),
            (op::REQUEST, port, GUEST_CID, HOST_CID)
        );
        (s, req)
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).expect("read") == 1 {
        out.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(out).expect("utf8")
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let mut h = harness();
    let (mut s, req) = h.host_connect(1024);
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    h.send(guest_hdr(1024, req.src_port, op::RESPONSE), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));

    s.write_all(b"hello").expect("write");
    h.pump();
    let pkts = h.drain();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, op::RW);
    assert_eq!(pkts[0].1, b"hello");

    h.send(guest_hdr(1024, req.src_port, op::RW), b"world");
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"world");
}

#[test]
fn connect_keyword_is_case_insensitive_and_validated() {
    assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
    assert_eq!(parse_connect(b"connect 7"), Some(7));
    assert_eq!(parse_connect(b"Connect  9 "), Some(9));
    assert_eq!(parse_connect(b"CONNECT"), None);
    assert_eq!(parse_connect(b"CONNECT -1"), None);
    assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    assert_eq!(parse_connect(b"CONNECT 1 2"), None);
    assert_eq!(parse_connect(b"GET / HTTP/1.1"), None);
    assert_eq!(parse_connect(b"\xff\xfe"), None);
}

#[test]
fn garbage_handshakes_are_dropped() {
    let mut h = harness();
    h.poller.watched.insert(h.mux.listener_fd(), Interest::READ);
    let mut bad = UnixStream::connect(&h.path).expect("connect");
    bad.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    bad.write_all(b"HELLO THERE\n").expect("write");
    let mut long = UnixStream::connect(&h.path).expect("connect");
    long.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    long.write_all(&[b'A'; 64]).expect("write");
    h.pump();
    h.pump();
    h.pump();
    // Closed: EOF, or a reset when unread bytes were still queued.
    let closed = |s: &mut UnixStream| {
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    assert!(closed(&mut bad));
    assert!(closed(&mut long));
    assert!(h.drain().is_empty());
    assert_eq!(h.mux.connection_count(), (0, 0));
}

#[test]
fn guest_reset_of_a_host_connect_closes_the_stream() {
    let mut h = harness();
    let (mut s, req) = h.host_connect(4000);
    h.send(guest_hdr(4000, req.src_port, op::RST), &[]);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).expect("eof"), 0);
    assert_eq!(h.mux.connection_count(), (0, 0));
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let mut h = harness();
    let mut port_path = h.path.clone().into_os_string();
    port_path.push("_1025");
    let listener = UnixListener::bind(&port_path).expect("bind");
    h.send(guest_hdr(5000, 1025, op::REQUEST), &[]);
    let pkts = h.drain();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port),
        (op::RESPONSE, 1025, 5000)
    );
    let (mut host, _) = listener.accept().expect("accept");
    host.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    h.send(guest_hdr(5000, 1025, op::RW), b"ready\n");
    assert_eq!(read_line(&mut host), "ready\n");
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mut h = harness();
    h.send(guest_hdr(5000, 9999, op::REQUEST), &[]);
    let pkts = h.drain();
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (op::RST, 5000));
}

#[test]
fn packets_for_unknown_connections_are_reset_but_resets_are_not() {
    let mut h = harness();
    h.send(guest_hdr(1, 2, op::RW), b"x");
    h.send(guest_hdr(1, 2, op::RST), &[]);
    h.send(guest_hdr(1, 2, op::CREDIT_UPDATE), &[]);
    let ops: Vec<u16> = h.drain().iter().map(|p| p.0.op).collect();
    assert_eq!(ops, vec![op::RST, op::RST]);
}

#[test]
fn host_data_respects_guest_credit() {
    let mut h = harness();
    let (mut s, req) = h.host_connect(1024);
    let small = Header {
        buf_alloc: 10,
        ..guest_hdr(1024, req.src_port, op::RESPONSE)
    };
    h.send(small, &[]);
    read_line(&mut s);
    s.write_all(&[7u8; 100]).expect("write");
    h.pump();
    let pkts = h.drain();
    let sent: usize = pkts.iter().map(|p| p.1.len()).sum();
    assert_eq!(sent, 10, "no more than the guest's credit");
    h.pump();
    assert!(h.drain().is_empty());
    // The guest consumed the 10 bytes and says so.
    h.send(
        Header {
            buf_alloc: 10,
            fwd_cnt: 10,
            ..guest_hdr(1024, req.src_port, op::CREDIT_UPDATE)
        },
        &[],
    );
    h.pump();
    let sent: usize = h.drain().iter().map(|p| p.1.len()).sum();
    assert_eq!(sent, 10);
}

#[test]
fn guest_beyond_its_credit_is_reset() {
    let mut h = harness();
    let (mut s, req) = h.host_connect(1024);
    h.send(guest_hdr(1024, req.src_port, op::RESPONSE), &[]);
    read_line(&mut s);
    // The host does not read; the guest may fill BUF_ALLOC plus what the
    // socket buffer takes, but not more than BUF_ALLOC sits in the muxer.
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    let mut reset = false;
    for _ in 0..200 {
        h.send(guest_hdr(1024, req.src_port, op::RW), &chunk);
        if h.mux.connection_count().0 == 0 {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring credit must be reset");
    let pkts = h.drain();
    assert_eq!(pkts.last().map(|p| p.0.op), Some(op::RST));
}

#[test]
fn credit_updates_flow_when_the_host_drains() {
    let mut h = harness();
    let (mut s, req) = h.host_connect(1024);
    h.send(guest_hdr(1024, req.src_port, op::RESPONSE), &[]);
    read_line(&mut s);
    let chunk = vec![2u8; MAX_PAYLOAD as usize];
    for _ in 0..3 {
        h.send(guest_hdr(1024, req.src_port, op::RW), &chunk);
    }
    let mut got = vec![0u8; 3 * chunk.len()];
    s.read_exact(&mut got).expect("read");
    h.pump();
    let pkts = h.drain();
    let update = pkts
        .iter()
        .find(|p| p.0.op == op::CREDIT_UPDATE)
        .expect("a credit update");
    assert_eq!(update.0.fwd_cnt as usize, 3 * chunk.len());
}

#[test]
fn half_close_both_ways_then_reset() {
    let mut h = harness();
    let (mut s, req) = h.host_connect(1024);
    h.send(guest_hdr(1024, req.src_port, op::RESPONSE), &[]);
    read_line(&mut s);
    // Host is done sending: the guest hears SHUTDOWN(SEND) but may answer.
    s.write_all(b"req").expect("write");
    s.shutdown(Shutdown::Write).expect("shutdown");
    h.pump();
    let pkts = h.drain();
    let ops: Vec<u16> = pkts.iter().map(|p| p.0.op).collect();
    assert_eq!(ops, vec![op::RW, op::SHUTDOWN]);
    assert_eq!(pkts[1].0.flags, SHUTDOWN_SEND);
    h.send(guest_hdr(1024, req.src_port, op::RW), b"answer");
    h.send(
        Header {
            flags: SHUTDOWN_SEND | SHUTDOWN_RCV,
            ..guest_hdr(1024, req.src_port, op::SHUTDOWN)
        },
        &[],
    );
    let mut got = String::new();
    s.read_to_string(&mut got).expect("read to EOF");
    assert_eq!(got, "answer");
    let pkts = h.drain();
    assert_eq!(pkts.last().map(|p| p.0.op), Some(op::RST));
    assert_eq!(h.mux.connection_count(), (0, 0));
}

#[test]
fn host_hangup_resets_the_guest() {
    let mut h = harness();
    let (mut s, req) = h.host_connect(1024);
    h.send(guest_hdr(1024, req.src_port, op::RESPONSE), &[]);
    read_line(&mut s);
    drop(s);
    h.pump();
    let ops: Vec<u16> = h.drain().iter().map(|p| p.0.op).collect();
    // EOF first (SHUTDOWN), then the guest's own reset or ours closes it.
    assert_eq!(ops.first(), Some(&op::SHUTDOWN));
    h.send(
        Header {
            flags: SHUTDOWN_SEND | SHUTDOWN_RCV,
            ..guest_hdr(1024, req.src_port, op::SHUTDOWN)
        },
        &[],
    );
    assert_eq!(h.mux.connection_count(), (0, 0));
}

#[test]
fn reset_drops_everything_and_drop_removes_the_socket() {
    let mut h = harness();
    let (_s, _req) = h.host_connect(1024);
    h.mux.reset(&mut h.poller);
    assert_eq!(h.mux.connection_count(), (0, 0));
    assert!(!h.mux.has_rx());
    let path = h.path.clone();
    assert!(path.exists());
    drop(h.mux);
    assert!(!path.exists());
}
