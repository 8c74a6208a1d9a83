//! The pod's network inside the guest: the VM's one network card takes the
//! identity of the pod's interface on the host (MAC, MTU, addresses,
//! routes), over netlink; loopback comes up with it. The pod's containers
//! stay in the guest's network namespace, so they share it, as the
//! containers of a pod share the pause container's under runc.
//!
//! The host sends this after every start (a template's guest knows none of
//! it). Every value is checked before anything changes.

use std::net::IpAddr;

use futures::TryStreamExt;
use husk_protocols::agent::ConfigureNetworkRequest;
use rtnetlink::{
    packet_route::{address::AddressAttribute, link::LinkAttribute},
    Handle, LinkUnspec, RouteMessageBuilder,
};

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
        source: rtnetlink::Error,
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

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// The guest's links: (index, name), loopback included.
async fn links(handle: &Handle) -> Result<Vec<(u32, String)>, NetworkError> {
    let mut out = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(nl("listing links"))? {
        let name = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        out.push((msg.header.index, name.unwrap_or_default()));
    }
    Ok(out)
}

/// Applies `plan` to the guest's network card (the one link that is not
/// loopback) and brings loopback up.
pub async fn apply(plan: &Plan) -> Result<(), NetworkError> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| invalid(format!("opening a netlink socket: {e}")))?;
    let conn = tokio::spawn(conn);
    let result = apply_with(&handle, plan).await;
    conn.abort();
    result
}

async fn apply_with(handle: &Handle, plan: &Plan) -> Result<(), NetworkError> {
    let links = links(handle).await?;
    let lo = links.iter().find(|(_, n)| n == "lo").map(|(i, _)| *i);
    let card = links
        .iter()
        .find(|(_, n)| n != "lo")
        .map(|(i, _)| *i)
        .ok_or(NetworkError::NoDevice)?;
    if let Some(lo) = lo {
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .map_err(nl("bringing loopback up"))?;
    }
    // The MAC changes only while the link is down.
    handle
        .link()
        .set(LinkUnspec::new_with_index(card).down().build())
        .execute()
        .await
        .map_err(nl("taking the card down"))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(card)
                .address(plan.mac.to_vec())
                .mtu(plan.mtu)
                .build(),
        )
        .execute()
        .await
        .map_err(nl("setting the MAC and MTU"))?;
    // Replace, not add: drop whatever an earlier call set.
    let mut old = handle.address().get().set_link_index_filter(card).execute();
    let mut stale = Vec::new();
    while let Some(a) = old.try_next().await.map_err(nl("listing addresses"))? {
        if a.attributes
            .iter()
            .any(|x| matches!(x, AddressAttribute::Address(_)))
        {
            stale.push(a);
        }
    }
    for a in stale {
        handle
            .address()
            .del(a)
            .execute()
            .await
            .map_err(nl("removing an old address"))?;
    }
    for (ip, prefix) in &plan.addresses {
        handle
            .address()
            .add(card, *ip, *prefix)
            .execute()
            .await
            .map_err(nl(format!("adding {ip}/{prefix}")))?;
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(card).up().build())
        .execute()
        .await
        .map_err(nl("bringing the card up"))?;
    // On-link routes first: a gateway must be reachable when its route is
    // added.
    let mut routes = plan.routes.clone();
    routes.sort_by_key(|(_, gw)| gw.is_some());
    for (dest, gw) in routes {
        let v4 = dest.map(|(d, _)| d.is_ipv4()).or(gw.map(|g| g.is_ipv4()));
        let msg = match v4 {
            Some(false) => {
                let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new().output_interface(card);
                if let Some((IpAddr::V6(d), p)) = dest {
                    b = b.destination_prefix(d, p);
                }
                if let Some(IpAddr::V6(g)) = gw {
                    b = b.gateway(g);
                }
                b.build()
            }
            _ => {
                let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new().output_interface(card);
                if let Some((IpAddr::V4(d), p)) = dest {
                    b = b.destination_prefix(d, p);
                }
                if let Some(IpAddr::V4(g)) = gw {
                    b = b.gateway(g);
                }
                b.build()
            }
        };
        match handle.route().add(msg).replace().execute().await {
            Ok(()) => {}
            Err(e) => return Err(nl(format!("adding a route to {dest:?} via {gw:?}"))(e)),
        }
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
