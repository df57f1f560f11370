//! The rtnetlink requests the agent makes to configure the guest's network
//! (links, addresses, routes), behind a trait so that the configuration
//! steps ([`crate::network`]) are unit-tested without a kernel.
//!
//! [`RouteSocket`] is the real thing: a synchronous `NETLINK_ROUTE` socket
//! (netlink-sys) speaking netlink-packet-route messages, one request at a
//! time, each answered by the kernel's ACK or error (or, for dumps, ended
//! by `NLMSG_DONE`). The agent is a single-threaded poll loop, so a request
//! blocks it; the socket has a receive timeout so nothing waits forever.

use std::net::IpAddr;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_MULTIPART, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::errno::Errno;
use podvisor_proto::{IpPrefix, MacAddr};

/// How long one request may wait for the kernel's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel refused the request.
    #[error("{0}")]
    Kernel(Errno),
    /// The socket failed (or timed out). (Not a `source`: these errors
    /// travel to the host as one string.)
    #[error("netlink socket: {0}")]
    Io(std::io::Error),
    /// The kernel's answer did not parse.
    #[error("undecodable netlink answer: {0}")]
    Decode(String),
}

impl NetlinkError {
    /// The kernel's errno, if it was the kernel that refused.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetlinkError::Kernel(e) => Some(*e),
            _ => None,
        }
    }
}

/// A network interface as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware address, for Ethernet-like links.
    pub mac: Option<MacAddr>,
    pub up: bool,
    pub loopback: bool,
}

/// What to change on a link; `None` leaves that property alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkChange {
    pub up: Option<bool>,
    pub name: Option<String>,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u32>,
}

/// A route in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: IpPrefix,
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub index: u32,
}

/// The rtnetlink requests of the network configuration.
pub trait Rtnetlink {
    /// Every link (`RTM_GETLINK` dump).
    fn links(&mut self) -> Result<Vec<Link>, NetlinkError>;
    /// The addresses of link `index` (`RTM_GETADDR` dump).
    fn addresses(&mut self, index: u32) -> Result<Vec<IpPrefix>, NetlinkError>;
    /// Changes link `index` (`RTM_SETLINK`). A rename needs the link down.
    fn set_link(&mut self, index: u32, change: &LinkChange) -> Result<(), NetlinkError>;
    /// Adds (or replaces) an address on link `index` (`RTM_NEWADDR`).
    fn add_address(&mut self, index: u32, address: IpPrefix) -> Result<(), NetlinkError>;
    /// Removes an address from link `index` (`RTM_DELADDR`).
    fn del_address(&mut self, index: u32, address: IpPrefix) -> Result<(), NetlinkError>;
    /// Adds (or replaces) a route (`RTM_NEWROUTE`).
    fn add_route(&mut self, route: &Route) -> Result<(), NetlinkError>;
}

/// A synchronous `NETLINK_ROUTE` socket.
pub struct RouteSocket {
    socket: Socket,
    sequence: u32,
}

impl std::fmt::Debug for RouteSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteSocket").finish_non_exhaustive()
    }
}

fn family(address: &IpAddr) -> AddressFamily {
    match address {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

impl RouteSocket {
    /// Opens a socket bound to a kernel-chosen port, with a receive timeout
    /// of [`REQUEST_TIMEOUT`].
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Io)?;
        socket.bind_auto().map_err(NetlinkError::Io)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Io)?;
        let timeout = nix::sys::time::TimeVal::new(
            REQUEST_TIMEOUT.as_secs() as libc::time_t,
            REQUEST_TIMEOUT.subsec_micros() as libc::suseconds_t,
        );
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| NetlinkError::Io(e.into()))?;
        Ok(RouteSocket {
            socket,
            sequence: 0,
        })
    }

    /// Sends one request and collects the messages of its answer until the
    /// ACK (or `NLMSG_DONE` for a dump).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | flags;
        request.header.sequence_number = self.sequence;
        request.finalize();
        let mut buf = vec![0u8; request.buffer_len()];
        request.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(NetlinkError::Io)?;

        let mut answer = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(NetlinkError::Io)?;
            let mut offset = 0;
            while offset < data.len() {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                let length = message.header.length as usize;
                if length == 0 {
                    return Err(NetlinkError::Decode("zero-length message".into()));
                }
                offset += length.next_multiple_of(4);
                if message.header.sequence_number != self.sequence {
                    continue;
                }
                let multipart = message.header.flags & NLM_F_MULTIPART != 0;
                match message.payload {
                    NetlinkPayload::Done(_) => return Ok(answer),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answer),
                            Some(code) => Err(NetlinkError::Kernel(Errno::from_raw(-code.get()))),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        answer.push(inner);
                        if !multipart && flags & NLM_F_ACK == 0 {
                            return Ok(answer);
                        }
                    }
                    NetlinkPayload::Noop | NetlinkPayload::Overrun(_) => {}
                    _ => {}
                }
            }
        }
    }

    fn change(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<(), NetlinkError> {
        self.request(message, NLM_F_ACK | flags).map(drop)
    }
}

fn address_message(index: u32, address: IpPrefix) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.family = family(&address.address);
    message.header.prefix_len = address.prefix_len;
    message.header.index = index;
    message
        .attributes
        .push(AddressAttribute::Local(address.address));
    message
        .attributes
        .push(AddressAttribute::Address(address.address));
    match address.address {
        IpAddr::V4(v4) if address.prefix_len < 31 => {
            let host_bits = u32::MAX
                .checked_shr(u32::from(address.prefix_len))
                .unwrap_or(0);
            let broadcast = std::net::Ipv4Addr::from(u32::from(v4) | host_bits);
            message
                .attributes
                .push(AddressAttribute::Broadcast(broadcast));
        }
        IpAddr::V4(_) => {}
        // The host assigned the address; duplicate detection would only
        // keep it tentative (unusable) for a second or more.
        IpAddr::V6(_) => message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad)),
    }
    message
}

impl Rtnetlink for RouteSocket {
    fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let answer = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answer
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .map(|link| {
                let mut name = String::new();
                let mut mac = None;
                for attribute in &link.attributes {
                    match attribute {
                        LinkAttribute::IfName(n) => name = n.clone(),
                        LinkAttribute::Address(bytes) => {
                            mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr)
                        }
                        _ => {}
                    }
                }
                Link {
                    index: link.header.index,
                    name,
                    mac,
                    up: link.header.flags.contains(LinkFlags::Up),
                    loopback: link.header.flags.contains(LinkFlags::Loopback)
                        || link.header.link_layer_type == LinkLayerType::Loopback,
                }
            })
            .collect())
    }

    fn addresses(&mut self, index: u32) -> Result<Vec<IpPrefix>, NetlinkError> {
        let answer = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answer
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => Some(a),
                _ => None,
            })
            .filter_map(|a| {
                // IFA_LOCAL is the interface's own address (IFA_ADDRESS is
                // the peer's on point-to-point links); IPv6 has only the latter.
                let local = a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let address = local.or_else(|| {
                    a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })?;
                Some(IpPrefix {
                    address,
                    prefix_len: a.header.prefix_len,
                })
            })
            .collect())
    }

    fn set_link(&mut self, index: u32, change: &LinkChange) -> Result<(), NetlinkError> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        if let Some(up) = change.up {
            message.header.change_mask = LinkFlags::Up;
            if up {
                message.header.flags = LinkFlags::Up;
            }
        }
        if let Some(name) = &change.name {
            message.attributes.push(LinkAttribute::IfName(name.clone()));
        }
        if let Some(mac) = change.mac {
            message
                .attributes
                .push(LinkAttribute::Address(mac.0.to_vec()));
        }
        if let Some(mtu) = change.mtu {
            message.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.change(RouteNetlinkMessage::SetLink(message), 0)
    }

    fn add_address(&mut self, index: u32, address: IpPrefix) -> Result<(), NetlinkError> {
        self.change(
            RouteNetlinkMessage::NewAddress(address_message(index, address)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    fn del_address(&mut self, index: u32, address: IpPrefix) -> Result<(), NetlinkError> {
        let mut message = AddressMessage::default();
        message.header.family = family(&address.address);
        message.header.prefix_len = address.prefix_len;
        message.header.index = index;
        message
            .attributes
            .push(AddressAttribute::Local(address.address));
        self.change(RouteNetlinkMessage::DelAddress(message), 0)
    }

    fn add_route(&mut self, route: &Route) -> Result<(), NetlinkError> {
        let mut message = RouteMessage::default();
        let header = &mut message.header;
        header.address_family = family(&route.destination.address);
        header.destination_prefix_length = route.destination.prefix_len;
        header.table = RouteHeader::RT_TABLE_MAIN;
        header.protocol = RouteProtocol::Boot;
        header.kind = RouteType::Unicast;
        header.scope = match route.gateway {
            None => RouteScope::Link,
            Some(_) => RouteScope::Universe,
        };
        if route.destination.prefix_len > 0 {
            message
                .attributes
                .push(RouteAttribute::Destination(RouteAddress::from(
                    route.destination.address,
                )));
        }
        if let Some(gateway) = route.gateway {
            message
                .attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
        }
        message.attributes.push(RouteAttribute::Oif(route.index));
        self.change(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }
}

/// Test double: a kernel's links and addresses in memory; records every
/// change as a line of text and fails the calls whose record starts with a
/// configured prefix.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeRtnetlink {
    pub links: Vec<Link>,
    pub addresses: Vec<(u32, IpPrefix)>,
    /// Changes made, in order, e.g. `set_link 2 up=false`.
    pub calls: Vec<String>,
    /// Calls whose record starts with one of these prefixes fail.
    pub failures: Vec<(String, Errno)>,
    /// Links that appear only after this many `links()` calls.
    pub late_links: Vec<(usize, Link)>,
    pub dumps: usize,
}

#[cfg(test)]
impl FakeRtnetlink {
    fn record(&mut self, line: String) -> Result<(), NetlinkError> {
        let failure = self.failures.iter().find(|(p, _)| line.starts_with(p));
        let result = match failure {
            Some((_, errno)) => Err(NetlinkError::Kernel(*errno)),
            None => Ok(()),
        };
        self.calls.push(line);
        result
    }
}

#[cfg(test)]
impl Rtnetlink for FakeRtnetlink {
    fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        self.dumps += 1;
        let dumps = self.dumps;
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.late_links)
            .into_iter()
            .partition(|(after, _)| dumps > *after);
        self.late_links = later;
        self.links.extend(now.into_iter().map(|(_, l)| l));
        Ok(self.links.clone())
    }

    fn addresses(&mut self, index: u32) -> Result<Vec<IpPrefix>, NetlinkError> {
        Ok(self
            .addresses
            .iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, a)| *a)
            .collect())
    }

    fn set_link(&mut self, index: u32, change: &LinkChange) -> Result<(), NetlinkError> {
        let mut parts = vec![format!("set_link {index}")];
        if let Some(name) = &change.name {
            parts.push(format!("name={name}"));
        }
        if let Some(mac) = change.mac {
            parts.push(format!("mac={mac}"));
        }
        if let Some(mtu) = change.mtu {
            parts.push(format!("mtu={mtu}"));
        }
        if let Some(up) = change.up {
            parts.push(format!("up={up}"));
        }
        self.record(parts.join(" "))?;
        if let Some(link) = self.links.iter_mut().find(|l| l.index == index) {
            if let Some(up) = change.up {
                link.up = up;
            }
            if let Some(name) = &change.name {
                link.name = name.clone();
            }
            if let Some(mac) = change.mac {
                link.mac = Some(mac);
            }
        }
        Ok(())
    }

    fn add_address(&mut self, index: u32, address: IpPrefix) -> Result<(), NetlinkError> {
        self.record(format!("add_address {index} {address}"))?;
        self.addresses.push((index, address));
        Ok(())
    }

    fn del_address(&mut self, index: u32, address: IpPrefix) -> Result<(), NetlinkError> {
        self.record(format!("del_address {index} {address}"))?;
        self.addresses.retain(|a| *a != (index, address));
        Ok(())
    }

    fn add_route(&mut self, route: &Route) -> Result<(), NetlinkError> {
        let via = route
            .gateway
            .map_or_else(String::new, |g| format!(" via {g}"));
        self.record(format!(
            "add_route {}{via} dev {}",
            route.destination, route.index
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_addresses_carry_their_broadcast_and_v6_skip_duplicate_detection() {
        let v4 = address_message(
            2,
            IpPrefix {
                address: "10.88.0.5".parse().unwrap(),
                prefix_len: 16,
            },
        );
        assert!(v4.attributes.contains(&AddressAttribute::Broadcast(
            "10.88.255.255".parse().unwrap()
        )));
        let host = address_message(
            2,
            IpPrefix {
                address: "10.88.0.5".parse().unwrap(),
                prefix_len: 32,
            },
        );
        assert!(
            !host
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Broadcast(_)))
        );
        let v6 = address_message(
            2,
            IpPrefix {
                address: "fd00::5".parse().unwrap(),
                prefix_len: 64,
            },
        );
        assert_eq!(v6.header.family, AddressFamily::Inet6);
        assert!(
            v6.attributes
                .contains(&AddressAttribute::Flags(AddressFlags::Nodad))
        );
    }
}
