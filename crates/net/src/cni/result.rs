//! The result of a CNI ADD (spec 0.3.0 to 1.0.0 share this shape): the
//! interfaces made, the addresses with their gateways, routes and DNS.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// An address with its prefix length, `10.87.0.5/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl FromStr for IpPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not in ADDRESS/PREFIX form"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?}: bad address"))?;
        let prefix_len: u8 = len
            .parse()
            .map_err(|_| format!("{s:?}: bad prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!("{s:?}: prefix length over {max}"));
        }
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One interface the chain made or touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniInterface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    /// The namespace path for an interface inside the pod; empty on the host.
    #[serde(default)]
    pub sandbox: String,
}

/// An address given to the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniIp {
    pub address: IpPrefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route for the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRoute {
    pub dst: IpPrefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// DNS settings a plugin returned (most leave them empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniDns {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// A parsed ADD result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<CniInterface>,
    #[serde(default)]
    pub ips: Vec<CniIp>,
    #[serde(default)]
    pub routes: Vec<CniRoute>,
    #[serde(default)]
    pub dns: CniDns,
}

impl CniResult {
    /// Reads a result as a plugin printed it.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        if value.get("ip4").is_some() || value.get("ip6").is_some() {
            return Err("a CNI 0.2.0 result (ip4/ip6), which podvisor does not read".into());
        }
        Self::deserialize(value).map_err(|e| e.to_string())
    }

    /// The addresses on the pod's interface `ifname` (addresses naming no
    /// interface count as the pod's, as the spec allows).
    pub fn pod_ips(&self, ifname: &str) -> Vec<&CniIp> {
        self.ips
            .iter()
            .filter(
                |ip| match ip.interface.and_then(|i| self.interfaces.get(i)) {
                    Some(iface) => iface.name == ifname && !iface.sandbox.is_empty(),
                    None => true,
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_bridge_result_and_finds_the_pod_address() {
        let raw = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "podvisor0", "mac": "aa:bb:cc:00:00:01"},
                {"name": "veth1234", "mac": "aa:bb:cc:00:00:02"},
                {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": "/run/podvisor/netns/p1"}
            ],
            "ips": [{"address": "10.87.0.5/24", "gateway": "10.87.0.1", "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        });
        let result = CniResult::from_json(&raw).unwrap();
        let ips = result.pod_ips("eth0");
        assert_eq!(ips.len(), 1);
        assert_eq!(ips[0].address.to_string(), "10.87.0.5/24");
        assert_eq!(ips[0].gateway, Some("10.87.0.1".parse().unwrap()));
        assert_eq!(result.routes[0].dst.to_string(), "0.0.0.0/0");
        assert!(result.pod_ips("eth1").is_empty());
    }

    #[test]
    fn refuses_old_results_and_bad_addresses() {
        assert!(CniResult::from_json(&serde_json::json!({"ip4": {"ip": "10.0.0.2/24"}})).is_err());
        assert!(
            CniResult::from_json(&serde_json::json!({"ips": [{"address": "10.0.0.2"}]})).is_err()
        );
        assert!(
            CniResult::from_json(&serde_json::json!({"ips": [{"address": "10.0.0.2/33"}]}))
                .is_err()
        );
    }
}
