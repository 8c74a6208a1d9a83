//! The pod's network inside the guest: the VM's one network card takes the
//! identity of the pod's interface on the host (MAC, MTU, addresses,
//! routes), over netlink ([`crate::rtnl`]); loopback comes up with it. The pod's containers
//! stay in the guest's network namespace, so they share it, as the
//! containers of a pod share the pause container's under runc.
//!
//! The host sends this after every start (a template's guest knows none of
//! it). Every value is checked before anything changes.

use std::net::IpAddr;

use husk_protocols::agent::ConfigureNetworkRequest;

use crate::rtnl::{Request, Rtnl};

/// A network setting the agent refused or could not apply.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A value in the request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// A netlink call failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The netlink error.
        #[source]
        source: std::io::Error,
    },
    /// No network card in the guest.
    #[error("the guest has no network card")]
    NoDevice,
}

/// A route: destination network (none: default) and next hop (none: on
/// the link).
pub type Route = (Option<(IpAddr, u8)>, Option<IpAddr>);

/// A checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The card's MAC.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Addresses with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Routes: destination network (none: default), next hop (none: on
    /// link).
    pub routes: Vec<Route>,
}

const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65_535;
const MAX_ENTRIES: usize = 64;

fn invalid(m: impl Into<String>) -> NetworkError {
    NetworkError::Invalid(m.into())
}

fn parse_net(address: &str, prefix: u32, what: &str) -> Result<(IpAddr, u8), NetworkError> {
    let ip: IpAddr = address
        .parse()
        .map_err(|_| invalid(format!("{what}: {address:?} is not an IP address")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = u8::try_from(prefix)
        .ok()
        .filter(|p| u32::from(*p) <= max)
        .ok_or_else(|| invalid(format!("{what}: prefix length {prefix} for {ip}")))?;
    Ok((ip, prefix))
}

/// Checks `req` and turns it into a [`Plan`].
pub fn plan(req: &ConfigureNetworkRequest) -> Result<Plan, NetworkError> {
    let mac: [u8; 6] = req
        .mac
        .as_slice()
        .try_into()
        .map_err(|_| invalid(format!("MAC of {} bytes", req.mac.len())))?;
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(invalid("the MAC is not a unicast address"));
    }
    if !(MIN_MTU..=MAX_MTU).contains(&req.mtu) {
        return Err(invalid(format!(
            "MTU {} is outside {MIN_MTU}..={MAX_MTU}",
            req.mtu
        )));
    }
    if req.addresses.len() > MAX_ENTRIES || req.routes.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "at most {MAX_ENTRIES} addresses and routes"
        )));
    }
    let addresses = req
        .addresses
        .iter()
        .map(|a| parse_net(&a.address, a.prefix_len, "address"))
        .collect::<Result<Vec<_>, _>>()?;
    let routes = req
        .routes
        .iter()
        .map(|r| {
            let dest = if r.destination.is_empty() {
                None
            } else {
                Some(parse_net(&r.destination, r.prefix_len, "route")?)
            };
            let gw = if r.gateway.is_empty() {
                None
            } else {
                Some(
                    r.gateway
                        .parse::<IpAddr>()
                        .map_err(|_| invalid(format!("gateway {:?}", r.gateway)))?,
                )
            };
            if let (Some((d, _)), Some(g)) = (dest, gw) {
                if d.is_ipv4() != g.is_ipv4() {
                    return Err(invalid(format!("route to {d} via {g}: mixed families")));
                }
            }
            if dest.is_none() && gw.is_none() {
                return Err(invalid("a default route needs a gateway"));
            }
            Ok((dest, gw))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Plan {
        mac,
        mtu: req.mtu,
        addresses,
        routes,
    })
}

fn nl(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// The addresses on link `name`, with prefix lengths.
fn addresses_of(name: &str) -> Result<Vec<(IpAddr, u8)>, NetworkError> {
    let all = nix::ifaddrs::getifaddrs().map_err(|e| nl("listing addresses")(e.into()))?;
    Ok(all
        .filter(|a| a.interface_name == name)
        .filter_map(|a| {
            let ip = a.address.as_ref().and_then(sockaddr_ip)?;
            let prefix = a
                .netmask
                .as_ref()
                .and_then(sockaddr_ip)
                .map_or(0, |m| match m {
                    IpAddr::V4(m) => u32::from(m).count_ones(),
                    IpAddr::V6(m) => u128::from(m).count_ones(),
                });
            // At most 128 ones.
            let prefix = u8::try_from(prefix).unwrap_or(u8::MAX);
            Some((ip, prefix))
        })
        .collect())
}

fn sockaddr_ip(a: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// Applies `plan` to the guest's network card (the one link that is not
/// loopback) and brings loopback up.
pub async fn apply(plan: &Plan) -> Result<(), NetworkError> {
    let plan = plan.clone();
    tokio::task::spawn_blocking(move || apply_now(&plan))
        .await
        .map_err(|e| invalid(format!("network setup: {e}")))?
}

fn apply_now(plan: &Plan) -> Result<(), NetworkError> {
    let links: Vec<(u32, String)> = nix::net::if_::if_nameindex()
        .map_err(|e| nl("listing links")(e.into()))?
        .iter()
        .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
        .collect();
    let lo = links.iter().find(|(_, n)| n == "lo").map(|(i, _)| *i);
    let (card, card_name) = links
        .iter()
        .find(|(_, n)| n != "lo")
        .cloned()
        .ok_or(NetworkError::NoDevice)?;
    let mut rtnl = Rtnl::open().map_err(|e| invalid(format!("opening a netlink socket: {e}")))?;
    if let Some(lo) = lo {
        rtnl.call(Request::link_up(lo, true))
            .map_err(nl("bringing loopback up"))?;
    }
    // The MAC changes only while the link is down.
    rtnl.call(Request::link_up(card, false))
        .map_err(nl("taking the card down"))?;
    rtnl.call(Request::link_mac_mtu(card, plan.mac, plan.mtu))
        .map_err(nl("setting the MAC and MTU"))?;
    // Replace, not add: drop whatever an earlier call set.
    for (ip, prefix) in addresses_of(&card_name)? {
        rtnl.call(Request::del_address(card, ip, prefix))
            .map_err(nl(format!("removing the old address {ip}/{prefix}")))?;
    }
    for (ip, prefix) in &plan.addresses {
        rtnl.call(Request::add_address(card, *ip, *prefix))
            .map_err(nl(format!("adding {ip}/{prefix}")))?;
    }
    rtnl.call(Request::link_up(card, true))
        .map_err(nl("bringing the card up"))?;
    // On-link routes first: a gateway must be reachable when its route is
    // added.
    let mut routes = plan.routes.clone();
    routes.sort_by_key(|(_, gw)| gw.is_some());
    for (dest, gw) in routes {
        rtnl.call(Request::replace_route(card, dest, gw))
            .map_err(nl(format!("adding a route to {dest:?} via {gw:?}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use husk_protocols::agent::{IpNetwork, NetworkRoute};

    use super::*;

    fn req() -> ConfigureNetworkRequest {
        let mut r = ConfigureNetworkRequest::new();
        r.mac = vec![0x0a, 0x58, 0x0a, 0x58, 0, 5];
        r.mtu = 1500;
        let mut a = IpNetwork::new();
        a.address = "10.88.0.5".into();
        a.prefix_len = 16;
        r.addresses.push(a);
        let mut gw = NetworkRoute::new();
        gw.gateway = "10.88.0.1".into();
        r.routes.push(gw);
        r
    }

    /// `ip ARGS` in the calling thread's network namespace.
    fn ip(args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("ip (package iproute2)");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The plan reaches a real link: a tap card in a network namespace of
    /// the test's own (needs root, as the agent has in the guest).
    #[test]
    fn a_plan_is_applied_to_a_real_link_and_replaces_the_last_one() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it makes a network namespace"
        );
        std::thread::spawn(|| {
            // Network namespaces are per thread: this one goes with it.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            ip(&["tuntap", "add", "dev", "eth0", "mode", "tap"]);
            let first = plan(&req()).expect("plan");
            apply_now(&first).expect("first");
            let mut r = req();
            r.addresses[0].address = "10.99.0.7".into();
            r.addresses[0].prefix_len = 24;
            r.routes[0].gateway = "10.99.0.1".into();
            let mut net = NetworkRoute::new();
            net.destination = "192.168.7.0".into();
            net.prefix_len = 24;
            net.gateway = "10.99.0.254".into();
            r.routes.push(net);
            r.mtu = 1400;
            apply_now(&plan(&r).expect("plan")).expect("second");

            let link = ip(&["-o", "link", "show", "eth0"]);
            assert!(link.contains("0a:58:0a:58:00:05"), "{link}");
            assert!(link.contains("mtu 1400"), "{link}");
            assert!(link.contains(",UP"), "{link}");
            assert!(ip(&["-o", "link", "show", "lo"]).contains(",UP"));
            let addrs = ip(&["-o", "-4", "addr", "show", "dev", "eth0"]);
            assert!(
                addrs.contains("inet 10.99.0.7/24 brd 10.99.0.255"),
                "{addrs}"
            );
            assert!(
                !addrs.contains("10.88.0.5"),
                "the first address stays: {addrs}"
            );
            let routes = ip(&["-4", "route", "show"]);
            assert!(
                routes.contains("default via 10.99.0.1 dev eth0"),
                "{routes}"
            );
            assert!(!routes.contains("10.88.0.1"), "{routes}");
            assert!(
                routes.contains("192.168.7.0/24 via 10.99.0.254 dev eth0"),
                "{routes}"
            );
        })
        .join()
        .expect("the test thread");
    }

    #[test]
    fn a_pod_network_is_planned() {
        let p = plan(&req()).expect("plan");
        assert_eq!(p.mac, [0x0a, 0x58, 0x0a, 0x58, 0, 5]);
        assert_eq!(p.addresses, vec![("10.88.0.5".parse().expect("ip"), 16)]);
        assert_eq!(
            p.routes,
            vec![(None, Some("10.88.0.1".parse().expect("ip")))]
        );
    }

    #[test]
    fn bad_values_are_refused_before_anything_changes() {
        type Edit = Box<dyn Fn(&mut ConfigureNetworkRequest)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("MAC of 5 bytes", Box::new(|r| r.mac.truncate(5))),
            ("unicast", Box::new(|r| r.mac[0] = 1)),
            ("MTU 67", Box::new(|r| r.mtu = 67)),
            (
                "not an IP",
                Box::new(|r| r.addresses[0].address = "10.88.0".into()),
            ),
            (
                "prefix length 33",
                Box::new(|r| r.addresses[0].prefix_len = 33),
            ),
            ("gateway", Box::new(|r| r.routes[0].gateway = "x".into())),
            ("needs a gateway", Box::new(|r| r.routes[0].gateway.clear())),
            (
                "mixed families",
                Box::new(|r| {
                    r.routes[0].destination = "fd00::".into();
                    r.routes[0].prefix_len = 8;
                }),
            ),
            (
                "at most",
                Box::new(|r| {
                    let a = r.addresses[0].clone();
                    r.addresses = vec![a; 65];
                }),
            ),
        ];
        for (want, edit) in cases {
            let mut r = req();
            edit(&mut r);
            match plan(&r) {
                Err(NetworkError::Invalid(m)) => assert!(m.contains(want), "{want}: {m}"),
                other => panic!("{want}: {other:?}"),
            }
        }
    }
}
