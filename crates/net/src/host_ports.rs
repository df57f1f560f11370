//! Published ports (`hostPort`, `run -p`) and the rule that one host port
//! belongs to one pod: the portmap plugin itself is last-write-wins, so
//! podvisor checks before anything is set up.

use std::fmt;
use std::net::IpAddr;

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
