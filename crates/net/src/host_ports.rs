//! Published ports (`hostPort`, `run -p`) and the rule that one host port
//! belongs to one pod: the portmap plugin itself is last-write-wins, so
//! podvisor checks before anything is set up. Within one process the
//! registry of attachments knows every pod's ports; across processes (two
//! `podvisor run -p`, a host daemon and a run, any other program on the
//! host) each published port is held by a socket bound to it for as long as
//! the pod has it, as the kubelet's hostport manager and docker's proxy do:
//! whoever binds the port next gets `EADDRINUSE`. The socket is bound
//! without `SO_REUSEADDR` and never listens, so nothing can share the port
//! and a connection that is not redirected to the pod is refused rather
//! than accepted by podvisor.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use socket2::{Domain, Socket, Type};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

/// One published port, in the form of the CNI `portMappings` capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    pub protocol: Protocol,
    /// The host address it listens on; `None` (or an unspecified address)
    /// is every address.
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(ip) => write!(f, "{ip}:")?,
            None => {}
        }
        write!(
            f,
            "{}->{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

impl PortMapping {
    fn host_ip_is_wildcard(&self) -> bool {
        self.host_ip.is_none_or(|ip| ip.is_unspecified())
    }

    /// Whether both cannot be published at once: same protocol and host
    /// port, and host addresses that overlap (equal, or either is every
    /// address).
    pub fn collides_with(&self, other: &PortMapping) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (self.host_ip_is_wildcard()
                || other.host_ip_is_wildcard()
                || self.host_ip == other.host_ip)
    }

    /// Refuses port 0 (nothing to publish).
    pub fn validate(&self) -> Result<(), String> {
        if self.host_port == 0 || self.container_port == 0 {
            return Err(format!("port mapping {self}: ports must be 1-65535"));
        }
        Ok(())
    }
}

/// The sockets holding a pod's published ports; dropping it frees them.
#[derive(Debug)]
pub struct PortHold {
    _sockets: Vec<Socket>,
}

impl PortHold {
    /// Binds each mapping's host address and port (TCP or UDP; SCTP ports
    /// are not held). The first that cannot be bound fails the whole hold
    /// and frees what was bound.
    pub fn bind(mappings: &[PortMapping]) -> Result<PortHold, (PortMapping, io::Error)> {
        let mut sockets = Vec::with_capacity(mappings.len());
        for pm in mappings {
            let ty = match pm.protocol {
                Protocol::Tcp => Type::STREAM,
                Protocol::Udp => Type::DGRAM,
                Protocol::Sctp => continue,
            };
            let ip = match pm.host_ip {
                Some(ip) => ip,
                None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            };
            let addr = SocketAddr::new(ip, pm.host_port);
            let socket = Socket::new(Domain::for_address(addr), ty, None)
                .and_then(|s| {
                    if ip.is_ipv6() {
                        s.set_only_v6(true)?;
                    }
                    // Datagrams that reach it (none should: portmap
                    // redirects them) are never read; keep that queue small.
                    if pm.protocol == Protocol::Udp {
                        s.set_recv_buffer_size(4096)?;
                    }
                    s.bind(&addr.into())?;
                    Ok(s)
                })
                .map_err(|e| (*pm, e))?;
            sockets.push(socket);
        }
        Ok(PortHold { _sockets: sockets })
    }
}

/// The first pair (wanted, held) that collides, if any.
pub fn first_collision<'a>(
    wanted: &'a [PortMapping],
    held: impl IntoIterator<Item = &'a PortMapping>,
) -> Option<(&'a PortMapping, &'a PortMapping)> {
    let held: Vec<_> = held.into_iter().collect();
    wanted
        .iter()
        .find_map(|w| held.iter().find(|h| w.collides_with(h)).map(|h| (w, *h)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(ip: Option<&str>, port: u16, protocol: Protocol) -> PortMapping {
        PortMapping {
            host_port: port,
            container_port: 80,
            protocol,
            host_ip: ip.map(|s| s.parse().unwrap()),
        }
    }

    #[test]
    fn collisions_follow_protocol_port_and_address_overlap() {
        let any = pm(None, 8080, Protocol::Tcp);
        assert!(any.collides_with(&pm(Some("127.0.0.1"), 8080, Protocol::Tcp)));
        assert!(pm(Some("0.0.0.0"), 8080, Protocol::Tcp).collides_with(&pm(
            Some("10.0.0.1"),
            8080,
            Protocol::Tcp
        )));
        assert!(!any.collides_with(&pm(None, 8080, Protocol::Udp)));
        assert!(!any.collides_with(&pm(None, 8081, Protocol::Tcp)));
        assert!(
            !pm(Some("127.0.0.1"), 8080, Protocol::Tcp).collides_with(&pm(
                Some("127.0.0.2"),
                8080,
                Protocol::Tcp
            ))
        );
    }

    #[test]
    fn a_held_port_cannot_be_bound_by_anyone_else() {
        // Port 0 lets the kernel pick a free port; hold that one again.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let tcp = pm(Some("127.0.0.1"), port, Protocol::Tcp);
        let hold = PortHold::bind(&[tcp]).unwrap();
        // std's listener sets SO_REUSEADDR: still refused.
        let err = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let (which, err) = PortHold::bind(&[pm(None, port, Protocol::Tcp)]).unwrap_err();
        assert_eq!(
            (which, err.kind()),
            (pm(None, port, Protocol::Tcp), io::ErrorKind::AddrInUse)
        );
        // UDP on that port is another port.
        let udp = PortHold::bind(&[pm(Some("127.0.0.1"), port, Protocol::Udp)]).unwrap();
        assert!(std::net::UdpSocket::bind(("127.0.0.1", port)).is_err());
        drop((hold, udp));
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    }

    #[test]
    fn serializes_as_the_cni_capability() {
        let v = serde_json::to_value(pm(Some("127.0.0.1"), 8080, Protocol::Udp)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"hostPort": 8080, "containerPort": 80, "protocol": "udp", "hostIP": "127.0.0.1"})
        );
        assert_eq!(pm(None, 8080, Protocol::Tcp).to_string(), "8080->80/tcp");
        assert!(pm(None, 0, Protocol::Tcp).validate().is_err());
    }
}
