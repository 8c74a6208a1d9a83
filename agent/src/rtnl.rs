//! The few route-netlink requests the agent's network setup sends
//! ([`crate::network`]), written out.
//!
//! Why not the `rtnetlink` crate: it (with `netlink-packet-route`) parses
//! every attribute of every kind of link, address and route message, and
//! that cost 0.85 MB of the agent binary. The agent binary lives in the
//! guest's initramfs, which is its only copy, so every byte of it is host
//! memory in every pod (`docs/memory.md`). The agent needs five requests
//! and the kernel's acknowledgement of each; the lists it needs (links,
//! addresses) come from libc (`if_nameindex`, `getifaddrs`). So the only
//! thing parsed here is the acknowledgement, from the guest's own kernel.
//!
//! Blocking calls: the kernel answers a route-netlink request before
//! `send` returns; callers run this off the async runtime anyway.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd, OwnedFd},
};

use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

/// libc's constants, at the widths of the fields they go in (libc declares
/// most of them `c_int`; every value fits).
#[allow(clippy::cast_possible_truncation)]
mod c {
    pub const AF_UNSPEC: u8 = libc::AF_UNSPEC as u8;
    pub const AF_INET: u8 = libc::AF_INET as u8;
    pub const AF_INET6: u8 = libc::AF_INET6 as u8;
    pub const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
    pub const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
    pub const NLM_F_CREATE: u16 = libc::NLM_F_CREATE as u16;
    pub const NLM_F_EXCL: u16 = libc::NLM_F_EXCL as u16;
    pub const NLM_F_REPLACE: u16 = libc::NLM_F_REPLACE as u16;
    pub const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
    pub const IFF_UP: u32 = libc::IFF_UP as u32;
}

/// Length of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;
/// Length of `struct rtattr`'s header.
const RTA_HDRLEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One request: header, family header, attributes.
#[derive(Debug)]
pub struct Request {
    buf: Vec<u8>,
}

impl Request {
    /// A request of type `ty` with `flags` (besides `NLM_F_REQUEST` and
    /// `NLM_F_ACK`, which every request gets) and the family header `head`.
    fn new(ty: u16, flags: u16, head: &[u8]) -> Self {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&ty.to_ne_bytes());
        let flags = flags | c::NLM_F_REQUEST | c::NLM_F_ACK;
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(head);
        buf.resize(align4(buf.len()), 0);
        Self { buf }
    }

    /// Appends attribute `ty` with `data`.
    fn attr(mut self, ty: u16, data: &[u8]) -> Self {
        let len = u16::try_from(RTA_HDRLEN + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// The bytes to send, numbered `seq`.
    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }

    /// Link `index`: up or down.
    pub fn link_up(index: u32, up: bool) -> Self {
        let flags = if up { c::IFF_UP } else { 0 };
        Self::new(libc::RTM_SETLINK, 0, &ifinfomsg(index, flags, c::IFF_UP))
    }

    /// Link `index`: MAC and MTU.
    pub fn link_mac_mtu(index: u32, mac: [u8; 6], mtu: u32) -> Self {
        Self::new(libc::RTM_SETLINK, 0, &ifinfomsg(index, 0, 0))
            .attr(libc::IFLA_ADDRESS, &mac)
            .attr(libc::IFLA_MTU, &mtu.to_ne_bytes())
    }

    /// Adds `ip/prefix` to link `index` (an IPv4 one with its broadcast
    /// address, as `ip addr add ... brd +` would).
    pub fn add_address(index: u32, ip: IpAddr, prefix: u8) -> Self {
        let flags = c::NLM_F_CREATE | c::NLM_F_EXCL;
        let r = Self::new(libc::RTM_NEWADDR, flags, &ifaddrmsg(index, ip, prefix))
            .attr(libc::IFA_LOCAL, &octets(ip))
            .attr(libc::IFA_ADDRESS, &octets(ip));
        match ip {
            IpAddr::V4(v4) if prefix < 31 => {
                let brd = u32::from(v4) | (u32::MAX >> prefix);
                r.attr(libc::IFA_BROADCAST, &brd.to_be_bytes())
            }
            _ => r,
        }
    }

    /// Removes `ip/prefix` from link `index`.
    pub fn del_address(index: u32, ip: IpAddr, prefix: u8) -> Self {
        Self::new(libc::RTM_DELADDR, 0, &ifaddrmsg(index, ip, prefix))
            .attr(libc::IFA_LOCAL, &octets(ip))
            .attr(libc::IFA_ADDRESS, &octets(ip))
    }

    /// Adds or replaces the route to `dest` (none: default) via `gw` (none:
    /// on the link) out of link `index`, in the main table. `dest` and `gw`
    /// are of one family, [`crate::network::plan`] checks that.
    pub fn replace_route(index: u32, dest: Option<(IpAddr, u8)>, gw: Option<IpAddr>) -> Self {
        let rtmsg = [
            dest.map(|(d, _)| d).or(gw).map_or(c::AF_INET, family),
            dest.map_or(0, |(_, p)| p),
            0, // source prefix length
            0, // TOS
            libc::RT_TABLE_MAIN,
            libc::RTPROT_STATIC,
            libc::RT_SCOPE_UNIVERSE,
            libc::RTN_UNICAST,
            0,
            0,
            0,
            0, // flags
        ];
        let flags = c::NLM_F_CREATE | c::NLM_F_REPLACE;
        let mut r = Self::new(libc::RTM_NEWROUTE, flags, &rtmsg);
        if let Some((d, _)) = dest {
            r = r.attr(libc::RTA_DST, &octets(d));
        }
        if let Some(g) = gw {
            r = r.attr(libc::RTA_GATEWAY, &octets(g));
        }
        r.attr(libc::RTA_OIF, &index.to_ne_bytes())
    }
}

fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[0] = c::AF_UNSPEC;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        c::AF_INET
    } else {
        c::AF_INET6
    }
}

fn ifaddrmsg(index: u32, ip: IpAddr, prefix: u8) -> [u8; 8] {
    let mut m = [0u8; 8];
    m[0] = family(ip);
    m[1] = prefix;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Finds the kernel's acknowledgement of request `seq` in `answer`: `None`
/// if it is not there, else the request's result.
pub fn find_ack(answer: &[u8], seq: u32) -> Option<std::io::Result<()>> {
    let mut off = 0;
    while answer.len() - off >= NLMSG_HDRLEN {
        let field = |at: usize| -> [u8; 4] {
            let mut b = [0u8; 4];
            b.copy_from_slice(&answer[off + at..off + at + 4]);
            b
        };
        let len = u32::from_ne_bytes(field(0)) as usize;
        if len < NLMSG_HDRLEN || len > answer.len() - off {
            return Some(Err(std::io::Error::other("malformed netlink answer")));
        }
        let ty = u16::from_ne_bytes([answer[off + 4], answer[off + 5]]);
        if ty == c::NLMSG_ERROR && u32::from_ne_bytes(field(8)) == seq {
            if len < NLMSG_HDRLEN + 4 {
                return Some(Err(std::io::Error::other("short netlink acknowledgement")));
            }
            let code = i32::from_ne_bytes(field(NLMSG_HDRLEN));
            return Some(match code {
                0 => Ok(()),
                e => Err(std::io::Error::from_raw_os_error(e.saturating_neg())),
            });
        }
        off += align4(len).min(answer.len() - off);
    }
    None
}

/// A route-netlink socket.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    /// Where answers are received (one allocation for every call).
    buf: Vec<u8>,
}

impl Rtnl {
    /// Opens one.
    pub fn open() -> std::io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0u8; 16 * 1024],
        })
    }

    /// Sends `req` and waits for the kernel's answer to it.
    pub fn call(&mut self, req: Request) -> std::io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        send(self.fd.as_raw_fd(), &req.finish(seq), MsgFlags::empty())?;
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
            if n == 0 {
                return Err(std::io::Error::other("netlink socket closed"));
            }
            if let Some(result) = find_ack(&self.buf[..n], seq) {
                return result;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_laid_out_as_the_kernel_reads_them() {
        let bytes = Request::add_address(3, "10.88.0.5".parse().expect("ip"), 16).finish(7);
        // nlmsghdr + ifaddrmsg + 3 IPv4 attributes of 8 bytes.
        assert_eq!(bytes.len(), 16 + 8 + 3 * 8);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().expect("4")), 48);
        assert_eq!(
            u16::from_ne_bytes(bytes[4..6].try_into().expect("2")),
            libc::RTM_NEWADDR
        );
        let flags = u16::from_ne_bytes(bytes[6..8].try_into().expect("2"));
        for f in [
            c::NLM_F_REQUEST,
            c::NLM_F_ACK,
            c::NLM_F_CREATE,
            c::NLM_F_EXCL,
        ] {
            assert_ne!(flags & f, 0, "flag {f:#x}");
        }
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().expect("4")), 7);
        assert_eq!(&bytes[16..24], &[c::AF_INET, 16, 0, 0, 3, 0, 0, 0]);
        // IFA_LOCAL, IFA_ADDRESS, IFA_BROADCAST 10.88.255.255.
        assert_eq!(
            &bytes[40..48],
            &[
                8,
                0,
                (libc::IFA_BROADCAST & 0xff) as u8,
                0,
                10,
                88,
                255,
                255
            ]
        );

        let route = Request::replace_route(2, None, Some("10.88.0.1".parse().expect("ip")));
        let bytes = route.finish(1);
        assert_eq!(bytes.len(), 16 + 12 + 8 + 8);
        assert_eq!(bytes[16], c::AF_INET);
        assert_eq!(bytes[17], 0, "a default route has no destination prefix");
        assert_eq!(
            &bytes[28..36],
            &[8, 0, (libc::RTA_GATEWAY & 0xff) as u8, 0, 10, 88, 0, 1]
        );
        assert_eq!(
            &bytes[36..44],
            &[8, 0, (libc::RTA_OIF & 0xff) as u8, 0, 2, 0, 0, 0]
        );

        let v6 = Request::replace_route(2, Some(("fd00::".parse().expect("ip"), 8)), None);
        let bytes = v6.finish(1);
        assert_eq!(bytes[16], c::AF_INET6);
        assert_eq!(bytes[17], 8);
        assert_eq!(bytes.len(), 16 + 12 + 20 + 8);

        let mac = Request::link_mac_mtu(2, [2, 0, 0, 0, 0, 1], 1500).finish(1);
        // The 6-byte MAC is padded to 4 bytes.
        assert_eq!(mac.len(), 16 + 16 + 12 + 8);
    }

    fn ack(seq: u32, code: i32) -> Vec<u8> {
        let mut m = vec![0u8; 36];
        m[0..4].copy_from_slice(&36u32.to_ne_bytes());
        m[4..6].copy_from_slice(&c::NLMSG_ERROR.to_ne_bytes());
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m[16..20].copy_from_slice(&code.to_ne_bytes());
        m
    }

    #[test]
    fn acknowledgements_are_matched_to_their_request() {
        assert!(matches!(find_ack(&ack(4, 0), 4), Some(Ok(()))));
        assert!(
            find_ack(&ack(3, 0), 4).is_none(),
            "another request's answer"
        );
        let e = find_ack(&ack(4, -libc::EEXIST), 4)
            .expect("answer")
            .expect_err("refused");
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        let mut two = ack(3, -libc::EINVAL);
        two.extend(ack(4, 0));
        assert!(matches!(find_ack(&two, 4), Some(Ok(()))));
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let mut short = ack(4, 0);
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(matches!(find_ack(&short, 4), Some(Err(_))));
        let mut long = ack(4, 0);
        long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(matches!(find_ack(&long, 4), Some(Err(_))));
        let mut truncated = ack(4, 0);
        truncated[0..4].copy_from_slice(&16u32.to_ne_bytes());
        truncated.truncate(16);
        assert!(matches!(find_ack(&truncated, 4), Some(Err(_))));
        assert!(find_ack(&[1, 2, 3], 4).is_none());
    }
}
