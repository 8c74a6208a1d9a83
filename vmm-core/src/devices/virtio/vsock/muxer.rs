//! The host side of hybrid vsock: guest streams multiplexed onto Unix sockets.
//!
//! * Host-initiated: a host process connects to the device's Unix socket and
//!   writes `CONNECT <port>\n`; the muxer asks the guest for a connection to
//!   that port and, once the guest accepts, answers `OK <host port>\n`. From
//!   then on the Unix stream carries the connection's bytes.
//! * Guest-initiated: a guest connection to host port P is forwarded to the
//!   Unix socket `<uds>_<P>`, if something listens there; otherwise the guest
//!   gets a reset.
//!
//! Flow control is virtio-vsock's credit scheme in both directions: the muxer
//! never sends the guest more than the guest's advertised free buffer space,
//! and it buffers at most [`BUF_ALLOC`] bytes per connection for a slow host
//! reader, which is exactly the credit it grants the guest. A guest that
//! sends beyond its credit, or anything malformed, gets a reset for that
//! connection; other connections and the VM go on.
//!
//! All sockets are non-blocking and owned by one thread (the VMM's event
//! loop); [`Poller`] is how the muxer tells that loop which descriptors it
//! wants to hear about.

// Byte counters (fwd_cnt, rx_cnt, ...) are 32-bit and wrap by design (virtio
// 1.2, 5.10.6.3); lengths cast into them are bounded by MAX_PAYLOAD/BUF_ALLOC.
#![allow(clippy::cast_possible_truncation)]

use std::{
    collections::{HashMap, VecDeque},
    io::{self, Read, Write},
    net::Shutdown,
    num::Wrapping,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
};

use super::packet::{op, Header, HDR_SIZE, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Receive buffer each connection grants the guest (and buffers at most).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Most connections (established or being set up) at once.
pub const MAX_CONNECTIONS: usize = 1023;
/// Most host connections still sending their `CONNECT` line.
pub const MAX_PENDING: usize = 64;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Most control packets waiting for room in the guest's RX queue.
const MAX_CTRL_QUEUE: usize = 4096;
/// First port the muxer assigns to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// What the muxer wants to hear about a descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interest {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
}

impl Interest {
    const NONE: Self = Self {
        read: false,
        write: false,
    };
    const READ: Self = Self {
        read: true,
        write: false,
    };
    fn is_none(self) -> bool {
        !self.read && !self.write
    }
}

/// Registers descriptors with the event loop. A descriptor with no interest
/// is removed, so that hang-up events (always reported by epoll) cannot spin.
pub trait Poller {
    /// Starts watching `fd`.
    fn add(&mut self, fd: RawFd, interest: Interest);
    /// Changes what is watched on `fd`.
    fn modify(&mut self, fd: RawFd, interest: Interest);
    /// Stops watching `fd`.
    fn remove(&mut self, fd: RawFd);
}

/// Events on a descriptor, as the event loop saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Hang-up.
    pub hangup: bool,
    /// Error.
    pub error: bool,
}

/// Where the muxer writes a packet for the guest (an RX descriptor chain).
pub trait RxSink {
    /// Bytes the buffer can hold, header included.
    fn capacity(&self) -> usize;
    /// Writes one packet; `payload.len()` equals `hdr.len`.
    fn write_packet(&mut self, hdr: &Header, payload: &[u8]) -> io::Result<()>;
}

/// Errors setting up the muxer.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// Binding the host socket failed.
    #[error("binding the vsock socket {0}")]
    Bind(PathBuf, #[source] io::Error),
    /// Something else listens on the path.
    #[error("vsock socket {0} is in use by another process")]
    InUse(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    local_port: u32,
    peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated; waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    state: State,
    /// Guest bytes not yet written to the host stream.
    tx_buf: VecDeque<u8>,
    /// Bytes received from the guest, ever.
    rcv_cnt: Wrapping<u32>,
    /// Bytes written to the host, ever (our fwd_cnt).
    fwd_cnt: Wrapping<u32>,
    /// The fwd_cnt the guest last heard from us.
    sent_fwd_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest, ever.
    rx_cnt: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// The host stream reached EOF (we told the guest SHUTDOWN_SEND).
    host_eof: bool,
    host_write_shut: bool,
    /// Host bytes read during the handshake, sent before the stream's.
    rx_prefix: Vec<u8>,
    /// The host stream may have data to read.
    readable: bool,
    needs_credit_update: bool,
    queued: bool,
    interest: Interest,
}

impl Connection {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            tx_buf: VecDeque::new(),
            rcv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            sent_fwd_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_shutdown: 0,
            host_eof: false,
            host_write_shut: false,
            rx_prefix: Vec::new(),
            readable: false,
            needs_credit_update: false,
            queued: false,
            interest: Interest::NONE,
        }
    }

    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    fn wanted_interest(&self) -> Interest {
        Interest {
            read: self.can_send_data() && !self.readable,
            write: !self.tx_buf.is_empty(),
        }
    }

    /// Writes buffered guest bytes to the host; returns bytes written.
    fn flush(&mut self) -> io::Result<usize> {
        let mut total = 0;
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.fwd_cnt += Wrapping(total as u32);
        Ok(total)
    }

    /// Whether the guest should hear about freed buffer space now.
    fn credit_update_due(&self) -> bool {
        let guest_view_free = BUF_ALLOC.saturating_sub((self.rcv_cnt - self.sent_fwd_cnt).0);
        self.fwd_cnt != self.sent_fwd_cnt && guest_view_free < BUF_ALLOC / 2
    }
}

#[derive(Debug)]
struct Pending {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The vsock muxer of one VM.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    pending: HashMap<RawFd, Pending>,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    ctrl: VecDeque<Header>,
    rx_ready: VecDeque<Key>,
    next_local_port: u32,
    scratch: Vec<u8>,
}

fn bind_listener(path: &Path) -> Result<UnixListener, MuxerError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            // A socket file left by a VMM that died: reuse the path only if
            // nobody answers on it.
            if UnixStream::connect(path).is_ok() {
                return Err(MuxerError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|e| MuxerError::Bind(path.to_path_buf(), e))?;
            UnixListener::bind(path).map_err(|e| MuxerError::Bind(path.to_path_buf(), e))
        }
        Err(e) => Err(MuxerError::Bind(path.to_path_buf(), e)),
    }
}

/// Connects to a Unix socket without ever blocking: a listener with a full
/// backlog counts as refusing (the guest sees a reset and may retry).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; `fd` is a socket.
    let ret = unsafe { libc::connect(owned.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        // EAGAIN: the listener's backlog is full. EINPROGRESS cannot happen
        // for Unix sockets, but treat it the same: refuse rather than wait.
        return Err(err);
    }
    Ok(UnixStream::from(owned))
}

fn make_hdr(guest_cid: u64, key: Key, op: u16, flags: u32, fwd_cnt: Wrapping<u32>) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: key.local_port,
        dst_port: key.peer_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: fwd_cnt.0,
    }
}

/// Parses `CONNECT <port>` (case-insensitive keyword, decimal port).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    let keyword = words.next()?;
    if !keyword.eq_ignore_ascii_case("connect") {
        return None;
    }
    let port = words.next()?.parse().ok()?;
    words.next().is_none().then_some(port)
}

impl Muxer {
    /// Listens on `uds_path` for host connections to guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        let listener = bind_listener(uds_path)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| MuxerError::Bind(uds_path.to_path_buf(), e))?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            ctrl: VecDeque::new(),
            rx_ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            scratch: vec![0; MAX_PAYLOAD as usize],
        })
    }

    /// The listening socket, for the event loop.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The next port host-initiated connections get (snapshots keep it).
    pub fn next_local_port(&self) -> u32 {
        self.next_local_port
    }

    /// Continues port numbering where a snapshot left it.
    pub fn set_next_local_port(&mut self, port: u32) {
        self.next_local_port = port.max(FIRST_LOCAL_PORT);
    }

    /// Number of connections (any state) and pending handshakes.
    pub fn connection_count(&self) -> (usize, usize) {
        (self.conns.len(), self.pending.len())
    }

    /// Whether `fd` belongs to the muxer.
    pub fn owns_fd(&self, fd: RawFd) -> bool {
        self.by_fd.contains_key(&fd) || self.pending.contains_key(&fd)
    }

    fn hdr_for(&self, key: Key, op: u16, flags: u32, fwd_cnt: Wrapping<u32>) -> Header {
        make_hdr(self.guest_cid, key, op, flags, fwd_cnt)
    }

    fn push_ctrl(&mut self, hdr: Header) {
        if self.ctrl.len() >= MAX_CTRL_QUEUE {
            // The guest is not taking packets; dropping a control packet only
            // delays a reset or credit update the guest is not reading anyway.
            crate::logger::guest_warn!(
                "vsock: control queue full, dropping a packet for port {}",
                hdr.dst_port
            );
            return;
        }
        self.ctrl.push_back(hdr);
    }

    fn rst(&mut self, key: Key) {
        let hdr = self.hdr_for(key, op::RST, 0, Wrapping(0));
        self.push_ctrl(hdr);
    }

    fn enqueue(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued {
                c.queued = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    fn update_interest(&mut self, key: Key, poller: &mut dyn Poller) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want = c.wanted_interest();
        if want == c.interest {
            return;
        }
        let fd = c.stream.as_raw_fd();
        if want.is_none() {
            poller.remove(fd);
        } else if c.interest.is_none() {
            poller.add(fd, want);
        } else {
            poller.modify(fd, want);
        }
        c.interest = want;
    }

    fn remove(&mut self, key: Key, poller: &mut dyn Poller) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            if !c.interest.is_none() {
                poller.remove(fd);
            }
            self.by_fd.remove(&fd);
        }
    }

    /// Resets a connection: tells the guest and closes the host stream.
    fn abort(&mut self, key: Key, poller: &mut dyn Poller) {
        self.remove(key, poller);
        self.rst(key);
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = if port == u32::MAX {
                FIRST_LOCAL_PORT
            } else {
                port + 1
            };
            if !self.conns.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }

    /// Accepts new host connections.
    pub fn accept(&mut self, poller: &mut dyn Poller) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() >= MAX_PENDING || self.conns.len() >= MAX_CONNECTIONS {
                        crate::logger::guest_warn!(
                            "vsock: too many connections; refusing a host connection"
                        );
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        crate::logger::guest_warn!("vsock: accepted stream: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    poller.add(fd, Interest::READ);
                    self.pending.insert(
                        fd,
                        Pending {
                            stream,
                            buf: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::logger::guest_warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    break;
                }
            }
        }
    }

    /// Handles readiness of a host stream (pending or connected).
    pub fn handle_fd(&mut self, fd: RawFd, ev: Readiness, poller: &mut dyn Poller) {
        if self.pending.contains_key(&fd) {
            self.handle_pending(fd, ev, poller);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            // Not ours (any more): stop hearing about it.
            poller.remove(fd);
            return;
        };
        if ev.error {
            self.abort(key, poller);
            return;
        }
        if ev.write {
            let Some(c) = self.conns.get_mut(&key) else {
                return;
            };
            let flushed = c.flush();
            let due = c.credit_update_due();
            if let Err(e) = flushed {
                crate::logger::guest_debug!("vsock: writing to host port {}: {e}", key.local_port);
                self.abort(key, poller);
                return;
            }
            if due {
                c.needs_credit_update = true;
                self.enqueue(key);
            }
            if self.finish_if_done(key, poller) {
                return;
            }
        }
        if ev.read || ev.hangup {
            if let Some(c) = self.conns.get_mut(&key) {
                c.readable = true;
                if c.can_send_data() {
                    self.enqueue(key);
                } else if ev.hangup && !ev.read {
                    // Nothing will ever come: the host closed the stream.
                    if c.state == State::Connecting
                        || c.host_eof
                        || c.peer_shutdown & SHUTDOWN_RCV != 0
                    {
                        self.abort(key, poller);
                        return;
                    }
                }
            }
        }
        self.update_interest(key, poller);
    }

    fn handle_pending(&mut self, fd: RawFd, ev: Readiness, poller: &mut dyn Poller) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - p.buf.len();
        let outcome = match p.stream.read(&mut buf[..room]) {
            Ok(0) => Err("closed before CONNECT"),
            Ok(n) => {
                p.buf.extend_from_slice(&buf[..n]);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !ev.error => return,
            Err(_) => Err("read error"),
        };
        let Some(p) = self.pending.get(&fd) else {
            return;
        };
        let newline = p.buf.iter().position(|&b| b == b'\n');
        let result = outcome.and_then(|()| match newline {
            Some(i) => parse_connect(&p.buf[..i])
                .map(|port| (port, i))
                .ok_or("malformed CONNECT line"),
            None if p.buf.len() >= MAX_CONNECT_LINE => Err("CONNECT line too long"),
            None => Err(""),
        });
        match result {
            Err("") => {} // need more bytes
            Err(why) => {
                crate::logger::guest_debug!("vsock: dropping host connection: {why}");
                poller.remove(fd);
                self.pending.remove(&fd);
            }
            Ok((port, nl)) => {
                poller.remove(fd);
                let Some(p) = self.pending.remove(&fd) else {
                    return;
                };
                if self.conns.len() >= MAX_CONNECTIONS {
                    crate::logger::guest_warn!(
                        "vsock: too many connections; refusing CONNECT {port}"
                    );
                    return;
                }
                let key = Key {
                    local_port: self.alloc_local_port(),
                    peer_port: port,
                };
                let mut c = Connection::new(p.stream, State::Connecting);
                c.rx_prefix = p.buf[nl + 1..].to_vec();
                self.by_fd.insert(fd, key);
                self.conns.insert(key, c);
                let hdr = self.hdr_for(key, op::REQUEST, 0, Wrapping(0));
                self.push_ctrl(hdr);
            }
        }
    }

    /// Closes a connection whose both directions are done. Returns whether
    /// it was removed.
    fn finish_if_done(&mut self, key: Key, poller: &mut dyn Poller) -> bool {
        let Some(c) = self.conns.get_mut(&key) else {
            return true;
        };
        if !c.tx_buf.is_empty() {
            return false;
        }
        if c.peer_shutdown & SHUTDOWN_SEND != 0 && !c.host_write_shut {
            let _ = c.stream.shutdown(Shutdown::Write);
            c.host_write_shut = true;
        }
        let guest_done = c.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND;
        let both_done = c.peer_shutdown & SHUTDOWN_SEND != 0 && c.host_eof;
        if guest_done || both_done {
            self.abort(key, poller);
            return true;
        }
        false
    }

    /// Handles a packet the guest sent (header already checked).
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8], poller: &mut dyn Poller) {
        let key = Key {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.op == op::REQUEST {
            self.guest_connect(key, hdr, poller);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if hdr.op != op::RST {
                self.rst(key);
            }
            return;
        };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            op::RESPONSE => {
                if c.state != State::Connecting {
                    self.abort(key, poller);
                    return;
                }
                let ok = format!("OK {}\n", key.local_port);
                // A fresh Unix stream always has room for a dozen bytes.
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.abort(key, poller);
                    return;
                }
                c.state = State::Established;
                if !c.rx_prefix.is_empty() {
                    c.readable = true;
                    self.enqueue(key);
                }
            }
            op::RST => {
                self.remove(key, poller);
                return;
            }
            op::RW => {
                if c.state != State::Established || c.peer_shutdown & SHUTDOWN_SEND != 0 {
                    self.abort(key, poller);
                    return;
                }
                if c.tx_buf.len() + payload.len() > BUF_ALLOC as usize {
                    crate::logger::guest_warn!(
                        "vsock: guest port {} sent beyond its credit; resetting",
                        key.peer_port
                    );
                    self.abort(key, poller);
                    return;
                }
                c.rcv_cnt += Wrapping(payload.len() as u32);
                c.tx_buf.extend(payload);
                if let Err(e) = c.flush() {
                    crate::logger::guest_debug!(
                        "vsock: writing to host port {}: {e}",
                        key.local_port
                    );
                    self.abort(key, poller);
                    return;
                }
                if c.credit_update_due() {
                    c.needs_credit_update = true;
                    self.enqueue(key);
                }
            }
            op::CREDIT_REQUEST => {
                c.needs_credit_update = true;
                self.enqueue(key);
            }
            op::CREDIT_UPDATE => {}
            op::SHUTDOWN => {
                c.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.finish_if_done(key, poller) {
                    return;
                }
            }
            _ => {
                self.abort(key, poller);
                return;
            }
        }
        // New credit may let pending host data go out.
        if let Some(c) = self.conns.get(&key) {
            if c.readable && c.can_send_data() {
                self.enqueue(key);
            }
        }
        self.update_interest(key, poller);
    }

    fn guest_connect(&mut self, key: Key, hdr: &Header, poller: &mut dyn Poller) {
        if self.conns.contains_key(&key) {
            // A second REQUEST for a live connection: the guest is confused.
            self.abort(key, poller);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.rst(key);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let mut c = Connection::new(stream, State::Established);
                c.peer_buf_alloc = hdr.buf_alloc;
                c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
                self.by_fd.insert(c.stream.as_raw_fd(), key);
                self.conns.insert(key, c);
                let resp = self.hdr_for(key, op::RESPONSE, 0, Wrapping(0));
                self.push_ctrl(resp);
                self.update_interest(key, poller);
            }
            Err(e) => {
                crate::logger::guest_debug!(
                    "vsock: guest connect to host port {}: {e}",
                    key.local_port
                );
                self.rst(key);
            }
        }
    }

    /// Whether there may be a packet for the guest.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty() || !self.rx_ready.is_empty()
    }

    /// Writes the next packet for the guest into `sink`. Returns false when
    /// there was nothing to send (the caller gives the buffer back).
    pub fn fill_rx(&mut self, sink: &mut dyn RxSink, poller: &mut dyn Poller) -> bool {
        if sink.capacity() < HDR_SIZE {
            return false;
        }
        if let Some(mut hdr) = self.ctrl.pop_front() {
            if let Some(c) = self.conns.get_mut(&Key {
                local_port: hdr.src_port,
                peer_port: hdr.dst_port,
            }) {
                hdr.fwd_cnt = c.fwd_cnt.0;
                c.sent_fwd_cnt = c.fwd_cnt;
            }
            if let Err(e) = sink.write_packet(&hdr, &[]) {
                crate::logger::guest_warn!("vsock: writing a packet to the guest: {e}");
            }
            return true;
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            if c.readable && c.can_send_data() {
                let max = (c.peer_credit() as usize)
                    .min(sink.capacity() - HDR_SIZE)
                    .min(MAX_PAYLOAD as usize);
                let read = if c.rx_prefix.is_empty() {
                    c.stream.read(&mut self.scratch[..max])
                } else {
                    let n = c.rx_prefix.len().min(max);
                    self.scratch[..n].copy_from_slice(&c.rx_prefix[..n]);
                    c.rx_prefix.drain(..n);
                    Ok(n)
                };
                match read {
                    Ok(0) => {
                        c.readable = false;
                        c.host_eof = true;
                        let hdr =
                            make_hdr(self.guest_cid, key, op::SHUTDOWN, SHUTDOWN_SEND, c.fwd_cnt);
                        c.sent_fwd_cnt = c.fwd_cnt;
                        c.needs_credit_update = false;
                        let _ = sink.write_packet(&hdr, &[]);
                        if !self.finish_if_done(key, poller) {
                            self.update_interest(key, poller);
                        }
                        return true;
                    }
                    Ok(n) => {
                        c.rx_cnt += Wrapping(n as u32);
                        c.sent_fwd_cnt = c.fwd_cnt;
                        c.needs_credit_update = false;
                        let hdr = Header {
                            len: n as u32,
                            ..make_hdr(self.guest_cid, key, op::RW, 0, c.fwd_cnt)
                        };
                        if let Err(e) = sink.write_packet(&hdr, &self.scratch[..n]) {
                            crate::logger::guest_warn!("vsock: writing a packet to the guest: {e}");
                        }
                        // Keep reading on the next buffer.
                        self.enqueue(key);
                        return true;
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        c.readable = false;
                        self.update_interest(key, poller);
                    }
                    Err(e) => {
                        crate::logger::guest_debug!(
                            "vsock: reading host port {}: {e}",
                            key.local_port
                        );
                        self.remove(key, poller);
                        let hdr = self.hdr_for(key, op::RST, 0, Wrapping(0));
                        let _ = sink.write_packet(&hdr, &[]);
                        return true;
                    }
                }
            }
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if c.needs_credit_update {
                c.needs_credit_update = false;
                c.sent_fwd_cnt = c.fwd_cnt;
                let hdr = make_hdr(self.guest_cid, key, op::CREDIT_UPDATE, 0, c.fwd_cnt);
                let _ = sink.write_packet(&hdr, &[]);
                return true;
            }
        }
        false
    }

    /// The guest's driver went away (device reset): drop every connection.
    pub fn reset(&mut self, poller: &mut dyn Poller) {
        for (fd, _) in self.pending.drain() {
            poller.remove(fd);
        }
        for (_, c) in self.conns.drain() {
            if !c.interest.is_none() {
                poller.remove(c.stream.as_raw_fd());
            }
        }
        self.by_fd.clear();
        self.ctrl.clear();
        self.rx_ready.clear();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours; leave nothing behind.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests;
