//! The pod's network: CNI gave the pod's network namespace an interface
//! (`eth0`, a veth with the pod's IP); husk connects the VM to it.
//!
//! In the pod's namespace the shim makes a tap (`husk0`) and joins it to
//! `eth0` with an ingress qdisc on each and a u32 "match everything" filter
//! whose mirred action redirects every frame to the other one, the same
//! wiring Kata calls tcfilter. Frames pass through the namespace without its
//! IP stack ever seeing them; the guest takes `eth0`'s MAC, MTU, addresses
//! and routes (the agent's ConfigureNetwork), so for the rest of the
//! network the guest *is* the pod. All of it over netlink (no `ip` or `tc`
//! binaries). The tap is not persistent: it goes when `husk-vmm`, which
//! holds its descriptor, exits; [`detach`] removes the qdiscs and filters.
//!
//! Pods on the host's network (`hostNetwork: true`) are refused: a VM
//! cannot share the host's network namespace, and taking over a host
//! interface would take it from the host.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::LinkAttribute,
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteProtocol},
    },
    Handle, LinkUnspec,
};

/// The interface CNI gives a pod (containerd's CNI ifname).
pub const POD_IFNAME: &str = "eth0";
/// The tap husk puts beside it.
pub const TAP_NAME: &str = "husk0";
/// ETH_P_ALL, in network byte order as tc wants the filter protocol.
const ETH_P_ALL_BE: u16 = 0x0003_u16.to_be();

/// A pod network setup failure.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The pod asks for something husk does not do.
    #[error("{0}")]
    Unsupported(String),
    /// A host call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A netlink call failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: rtnetlink::Error,
    },
    /// The namespace holds no interface to connect.
    #[error("{0}")]
    Missing(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// The network namespace of a CRI sandbox spec: `Ok(None)` when the spec
/// asks for a fresh one (no pod network to connect); an error for a pod on
/// the host's network.
pub fn pod_netns(spec: &Spec) -> Result<Option<PathBuf>, NetError> {
    let ns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
    match ns {
        None => Err(NetError::Unsupported(
            "husk does not run pods on the host's network (hostNetwork: true): a pod VM cannot \
             share the host's network namespace; use a runc RuntimeClass for this pod"
                .into(),
        )),
        Some(n) => Ok(n.path().clone()),
    }
}

/// A route: destination network (none: default) and next hop (none: on
/// the link).
pub type Route = (Option<(IpAddr, u8)>, Option<IpAddr>);

/// What the guest must look like to be the pod on the network.
#[derive(Debug)]
pub struct PodNetwork {
    /// The pod's network namespace.
    pub netns: PathBuf,
    /// The tap, for `husk-vmm` to take over.
    pub tap: OwnedFd,
    /// `eth0`'s MAC.
    pub mac: [u8; 6],
    /// `eth0`'s MTU.
    pub mtu: u32,
    /// `eth0`'s addresses (link-local IPv6 left out: the guest makes its own).
    pub addresses: Vec<(IpAddr, u8)>,
    /// Routes through `eth0`: (destination network or none for default,
    /// gateway or none for on-link).
    pub routes: Vec<Route>,
}

/// Runs `f` on a thread of its own inside network namespace `netns`, with a
/// runtime for netlink (a netlink socket belongs to the namespace of the
/// thread that opens it).
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce(Handle) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, NetError>>>>
        + Send
        + 'static,
) -> Result<T, NetError> {
    let ns = std::fs::File::open(netns).map_err(io_err(format!(
        "opening network namespace {}",
        netns.display()
    )))?;
    std::thread::spawn(move || -> Result<T, NetError> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Io {
            what: "entering the pod's network namespace".into(),
            source: std::io::Error::from_raw_os_error(e as i32),
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err("a runtime for netlink"))?;
        rt.block_on(async move {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(io_err("opening a netlink socket"))?;
            let conn = tokio::spawn(conn);
            let r = f(handle).await;
            conn.abort();
            r
        })
    })
    .join()
    .map_err(|_| NetError::Missing("the network namespace thread panicked".into()))?
}

/// The index of link `name`, if it exists.
async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut s = handle.link().get().match_name(name).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("looking up {name}"))(e)),
    }
}

/// Connects the pod's `eth0` in `netns` to a new tap (see the module docs)
/// and reads what the guest needs to take its place.
pub async fn attach(netns: PathBuf) -> Result<PodNetwork, NetError> {
    tokio::task::spawn_blocking(move || {
        let ns = netns.clone();
        in_netns(&netns, move |h| Box::pin(attach_in(h, ns)))
    })
    .await
    .map_err(|e| NetError::Missing(format!("network setup task: {e}")))?
}

async fn attach_in(handle: Handle, netns: PathBuf) -> Result<PodNetwork, NetError> {
    let mut links = handle.link().get().match_name(POD_IFNAME).execute();
    let link = links.try_next().await.ok().flatten().ok_or_else(|| {
        NetError::Missing(format!(
            "the pod's network namespace has no {POD_IFNAME} (did CNI run?)"
        ))
    })?;
    let index = link.header.index;
    let mut mac = None;
    let mut mtu = 1500;
    for a in &link.attributes {
        match a {
            LinkAttribute::Address(m) if m.len() == 6 => {
                let mut b = [0u8; 6];
                b.copy_from_slice(m);
                mac = Some(b);
            }
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let mac = mac.ok_or_else(|| NetError::Missing(format!("{POD_IFNAME} has no MAC")))?;

    let mut addresses = Vec::new();
    let mut s = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(a) = s.try_next().await.map_err(nl("listing addresses"))? {
        for attr in &a.attributes {
            if let AddressAttribute::Address(ip) = attr {
                let link_local =
                    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
                if !link_local {
                    addresses.push((*ip, a.header.prefix_len));
                }
            }
        }
    }

    let mut routes = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let mut msg = rtnetlink::packet_route::route::RouteMessage::default();
        msg.header.address_family = if family == libc::AF_INET {
            rtnetlink::packet_route::AddressFamily::Inet
        } else {
            rtnetlink::packet_route::AddressFamily::Inet6
        };
        let mut s = handle.route().get(msg).execute();
        while let Some(r) = s.try_next().await.map_err(nl("listing routes"))? {
            if let Some(route) = pod_route(&r.header, &r.attributes, index) {
                routes.push(route);
            }
        }
    }

    // A tap left by an earlier attempt would keep the old wiring: start
    // clean.
    if let Some(old) = link_index(&handle, TAP_NAME).await? {
        let _ = handle.link().del(old).execute().await;
    }
    let tap = open_tap(TAP_NAME)?;
    let tap_index = link_index(&handle, TAP_NAME)
        .await?
        .ok_or_else(|| NetError::Missing(format!("{TAP_NAME} vanished after it was made")))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {TAP_NAME} up")))?;
    for (from, to) in [(index, tap_index), (tap_index, index)] {
        let from_i = i32::try_from(from).unwrap_or(i32::MAX);
        // An ingress qdisc left from before on eth0 is replaced.
        del_ingress(&handle, from_i).await;
        handle
            .qdisc()
            .add(from_i)
            .ingress()
            .execute()
            .await
            .map_err(nl("adding an ingress qdisc"))?;
        handle
            .traffic_filter(from_i)
            .add()
            .ingress()
            .protocol(ETH_P_ALL_BE)
            .redirect(to)
            .map_err(nl("building the redirect filter"))?
            .execute()
            .await
            .map_err(nl("adding the redirect filter"))?;
    }
    Ok(PodNetwork {
        netns,
        tap,
        mac,
        mtu,
        addresses,
        routes,
    })
}

/// Deletes link `index`'s ingress qdisc (with its filters), if it has one.
async fn del_ingress(handle: &Handle, index: i32) {
    use rtnetlink::packet_route::tc::TcHandle;
    let mut req = handle.qdisc().del(index);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(0xffff_0000);
    let _ = req.execute().await;
}

/// A route of the main table through link `index` that the guest needs:
/// those via a gateway and on-link ones the kernel did not derive from an
/// address (the guest derives those itself); IPv6 link-local and multicast
/// routes are left out.
fn pod_route(header: &RouteHeader, attributes: &[RouteAttribute], index: u32) -> Option<Route> {
    if header.table != RouteHeader::RT_TABLE_MAIN || header.protocol == RouteProtocol::Kernel {
        return None;
    }
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut oif = None;
    let mut dest = None;
    let mut gw = None;
    for a in attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(d) => dest = ip(d),
            RouteAttribute::Gateway(g) => gw = ip(g),
            _ => {}
        }
    }
    if oif != Some(index) {
        return None;
    }
    let dest = dest.map(|d| (d, header.destination_prefix_length));
    if let Some((IpAddr::V6(d), _)) = dest {
        if d.segments()[0] & 0xffc0 == 0xfe80 || d.segments()[0] & 0xff00 == 0xff00 {
            return None;
        }
    }
    if dest.is_none() && gw.is_none() {
        return None;
    }
    Some((dest, gw))
}

/// Makes tap `name` in the calling thread's network namespace; returns its
/// descriptor (not persistent: the tap goes with its last descriptor).
fn open_tap(name: &str) -> Result<OwnedFd, NetError> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    // _IOW('T', 202, int)
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(io_err("opening /dev/net/tun"))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    let n = name.len().min(libc::IFNAMSIZ - 1);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: TUNSETIFF reads and may update the ifreq, which lives across
    // the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(NetError::Io {
            what: format!("making tap {name}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file.into())
}

/// Undoes [`attach`] in `netns`: the ingress qdiscs (their filters go with
/// them) and the tap if it is still there. Safe to repeat; a namespace that
/// is already gone (CNI and containerd removed it) is fine.
pub async fn detach(netns: PathBuf) {
    if !netns.exists() {
        return;
    }
    let r = tokio::task::spawn_blocking(move || {
        in_netns(&netns, |handle| {
            Box::pin(async move {
                if let Some(i) = link_index(&handle, POD_IFNAME).await? {
                    del_ingress(&handle, i32::try_from(i).unwrap_or(i32::MAX)).await;
                }
                if let Some(i) = link_index(&handle, TAP_NAME).await? {
                    let _ = handle.link().del(i).execute().await;
                }
                Ok(())
            })
        })
    })
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("taking the pod network apart: {e}"),
        Err(e) => tracing::warn!("taking the pod network apart: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder};

    use super::*;

    fn spec(ns: Option<Option<&str>>) -> Spec {
        let mut list = vec![LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Mount)
            .build()
            .expect("ns")];
        if let Some(path) = ns {
            let mut b = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
            if let Some(p) = path {
                b = b.path(p);
            }
            list.push(b.build().expect("ns"));
        }
        let mut s = Spec::default();
        s.set_linux(Some(
            LinuxBuilder::default()
                .namespaces(list)
                .build()
                .expect("linux"),
        ));
        s
    }

    #[test]
    fn the_pod_namespace_comes_from_the_sandbox_spec() {
        assert_eq!(
            pod_netns(&spec(Some(Some("/var/run/netns/cni-1")))).expect("ns"),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        assert_eq!(pod_netns(&spec(Some(None))).expect("ns"), None);
        let e = pod_netns(&spec(None)).expect_err("host network");
        assert!(e.to_string().contains("hostNetwork"), "{e}");
    }

    #[test]
    fn only_the_routes_the_guest_needs_are_taken() {
        let header = |proto: RouteProtocol, prefix: u8| RouteHeader {
            table: RouteHeader::RT_TABLE_MAIN,
            protocol: proto,
            destination_prefix_length: prefix,
            ..Default::default()
        };
        let gw = RouteAttribute::Gateway(RouteAddress::Inet("10.88.0.1".parse().expect("ip")));
        let default = pod_route(
            &header(RouteProtocol::Boot, 0),
            &[RouteAttribute::Oif(2), gw.clone()],
            2,
        );
        assert_eq!(
            default,
            Some((None, Some("10.88.0.1".parse().expect("ip"))))
        );
        // Another link's route, and the kernel's connected route: left out.
        assert_eq!(
            pod_route(
                &header(RouteProtocol::Boot, 0),
                &[RouteAttribute::Oif(3), gw],
                2
            ),
            None
        );
        let connected = [
            RouteAttribute::Oif(2),
            RouteAttribute::Destination(RouteAddress::Inet("10.88.0.0".parse().expect("ip"))),
        ];
        assert_eq!(
            pod_route(&header(RouteProtocol::Kernel, 16), &connected, 2),
            None
        );
        // An on-link route someone added is kept.
        assert_eq!(
            pod_route(&header(RouteProtocol::Static, 16), &connected, 2),
            Some((Some(("10.88.0.0".parse().expect("ip"), 16)), None))
        );
        let ll = [
            RouteAttribute::Oif(2),
            RouteAttribute::Destination(RouteAddress::Inet6("fe80::".parse().expect("ip"))),
        ];
        assert_eq!(pod_route(&header(RouteProtocol::Static, 64), &ll, 2), None);
    }
}
