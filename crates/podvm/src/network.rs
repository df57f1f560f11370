//! A pod VM's network: the NIC it boots with (a virtio-net card on the tap
//! [`podvisor_net`] made in the pod's namespace, handed to the VMM as an
//! fd) and the [`NetworkConfig`] its agent applies before the first
//! container starts ([`PodVm::configure_network`]). A pod without a
//! network gets no card and a configuration without interfaces: only `lo`.
//!
//! The CNI attachment itself (namespace, ADD/DEL, host ports) belongs to
//! whoever owns the pod's lifetime (`podvisor run`, the host daemon); this
//! module only turns an attachment into a VM's NIC and the guest's view.

use std::net::IpAddr;
use std::sync::Arc;

use podvisor_net::PodNetworks;
use podvisor_net::pod_network::{GuestNetwork, PodNetworkError};
use podvisor_net::vm_nic::{self, TapMode};
use podvisor_proto::{
    DnsConfig, GuestMessage, HostMessage, HostsEntry, InterfaceConfig, IpPrefix, MacAddr,
    NetworkConfig, RouteConfig,
};
use podvisor_vmm::{Device, MacAddress, NetworkDevice, Tap};

use crate::{PodVm, PodVmError};

mod dns;

pub use dns::{
    DnsMerge, DnsOption, DnsPolicy, HostAlias, MAX_SEARCH_LIST_CHARS, PodDns, PodDnsConfig,
    apply_pod_dns, host_dns, parse_resolv_conf, resolv_word,
};

/// The guest's name for the pod's NIC.
pub const GUEST_IFNAME: &str = "eth0";
/// The VM device id of the pod's NIC.
pub const NIC_DEVICE_ID: &str = "net0";
/// The tap's name inside the pod's namespace.
pub const TAP_NAME: &str = "tap0";

/// How long the agent may take to configure the network (it waits up to
/// 5 s for a NIC to appear).
const CONFIGURE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The pod's NIC, ready to boot a VM with.
#[derive(Debug)]
pub struct PodNic {
    /// The virtio-net card, on the tap's fd.
    pub device: NetworkDevice,
    /// What the NIC gets in the guest (addresses, routes, DNS).
    pub guest: GuestNetwork,
    /// The pod's network namespace and its CNI interface there (where
    /// frames kept while the pod slept are sent in again).
    pub netns: std::path::PathBuf,
    pub ifname: String,
}

/// Makes a fresh tap for the pod's VM in its (already attached) network
/// namespace, joined to the CNI interface, replacing any tap a previous VM
/// of the pod left there (a VM that was killed, a restart).
pub async fn pod_nic(networks: &PodNetworks, id: &str) -> Result<PodNic, PodNetworkError> {
    let att = networks
        .attachment(id)
        .ok_or_else(|| PodNetworkError::NotAttached(id.to_string()))?;
    vm_nic::detach(&att.netns, &att.ifname, TAP_NAME).await?;
    let (nic, guest) = networks.attach_vm_nic(id, TAP_NAME, TapMode::Fd).await?;
    let fd = nic.tap_fd.ok_or_else(|| PodNetworkError::BadResult {
        pod: id.to_string(),
        reason: "the tap was made without an fd".into(),
    })?;
    let mtu = u16::try_from(nic.mtu).ok();
    Ok(PodNic {
        device: NetworkDevice {
            id: NIC_DEVICE_ID.into(),
            tap: Tap::Fd(Arc::new(fd)),
            mac: MacAddress(nic.mac),
            mtu,
        },
        guest,
        netns: att.netns.clone(),
        ifname: att.ifname.clone(),
    })
}

impl PodNic {
    /// The device for [`crate::PodVmSpec::devices`].
    pub fn vm_device(&self) -> Device {
        Device::Network(self.device.clone())
    }

    fn tap(&self) -> std::io::Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match &self.device.tap {
            Tap::Fd(fd) => Ok(fd.as_fd()),
            Tap::Name(_) => Err(std::io::Error::other("the pod's tap is not held by an fd")),
        }
    }

    /// The pod's VM is gone for a while (hibernated) and this NIC is kept
    /// for the one that wakes: from now on only frames meant for the pod
    /// (to its MAC, ARP for its IPv4 addresses) wait in the tap's queue
    /// ([`podvisor_net::wake_tap`]).
    pub fn sleep(&self) -> std::io::Result<()> {
        let ipv4 = self
            .guest
            .addresses
            .iter()
            .filter_map(|a| match a.addr {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        let filter = podvisor_net::wake_tap::WakeFilter {
            mac: self.device.mac.0,
            ipv4,
        };
        podvisor_net::wake_tap::attach(self.tap()?, &filter)
    }

    /// Waits until a frame for the sleeping pod is queued (not taking it),
    /// or `timeout` passes (`false`).
    pub async fn first_frame(&self, timeout: Option<std::time::Duration>) -> std::io::Result<bool> {
        podvisor_net::wake_tap::wait_for_frame(self.tap()?, timeout).await
    }

    /// Every frame reaches the tap again, and the frames that waited for
    /// the pod are taken out: give them to [`PodNic::replay`] once the VM
    /// that wakes runs (a VMM that is still loading its state would garble
    /// them; see [`podvisor_net::wake_tap`]).
    pub fn wake(&self) -> std::io::Result<Vec<Vec<u8>>> {
        let tap = self.tap()?;
        podvisor_net::wake_tap::detach(tap)?;
        podvisor_net::wake_tap::take_queued(tap)
    }

    /// Sends the frames [`PodNic::wake`] took to the running VM, the way
    /// they first came (through the pod's interface).
    pub async fn replay(&self, frames: &[Vec<u8>]) -> std::io::Result<()> {
        podvisor_net::wake_tap::replay(&self.netns, &self.ifname, frames).await
    }
}

/// What the guest of a pod without a network is told: no interfaces, no
/// routes, no nameservers; `/etc/hosts` with localhost only.
pub fn no_network(hostname: &str) -> NetworkConfig {
    NetworkConfig {
        interfaces: vec![],
        routes: vec![],
        dns: DnsConfig::default(),
        hosts: hosts_entries(hostname, None),
    }
}

/// The guest's configuration for a pod's NIC: its MAC, MTU and addresses
/// on `eth0`, the CNI's routes (a route without a gateway goes via the
/// gateway of its family, as the CNI spec says; a gateway outside every
/// address's prefix gets a connected route of its own), the CNI's DNS or
/// else the host's resolvers (Kubernetes' `dnsPolicy: Default`, loopback
/// resolvers left out), and `/etc/hosts` naming the pod.
pub fn guest_config(net: &GuestNetwork, hostname: &str, host_dns: &DnsConfig) -> NetworkConfig {
    let addresses: Vec<IpPrefix> = net
        .addresses
        .iter()
        .map(|a| IpPrefix {
            address: a.addr,
            prefix_len: a.prefix_len,
        })
        .collect();
    let gateway_for = |dst: IpAddr| {
        net.gateways
            .iter()
            .copied()
            .find(|g| g.is_ipv4() == dst.is_ipv4())
    };
    let mut routes = Vec::new();
    for gw in &net.gateways {
        if !addresses.iter().any(|a| contains(a, *gw)) {
            routes.push(RouteConfig {
                destination: IpPrefix {
                    address: *gw,
                    prefix_len: if gw.is_ipv4() { 32 } else { 128 },
                },
                gateway: None,
                interface: GUEST_IFNAME.into(),
            });
        }
    }
    for r in &net.routes {
        routes.push(RouteConfig {
            destination: IpPrefix {
                address: r.dst.addr,
                prefix_len: r.dst.prefix_len,
            },
            gateway: r.gw.or_else(|| gateway_for(r.dst.addr)),
            interface: GUEST_IFNAME.into(),
        });
    }
    let cni_nameservers: Vec<IpAddr> = net
        .dns
        .nameservers
        .iter()
        .filter_map(|s| s.parse().ok())
        .filter(|ip: &IpAddr| !ip.is_loopback())
        .collect();
    let dns = if cni_nameservers.is_empty() {
        host_dns.clone()
    } else {
        let mut search = net.dns.search.clone();
        if search.is_empty() && !net.dns.domain.is_empty() {
            search.push(net.dns.domain.clone());
        }
        DnsConfig {
            nameservers: cni_nameservers
                .into_iter()
                .take(podvisor_proto::MAX_NAMESERVERS)
                .collect(),
            search,
            options: net.dns.options.clone(),
        }
    };
    NetworkConfig {
        interfaces: vec![InterfaceConfig {
            mac: MacAddr(net.mac),
            current_mac: None,
            name: GUEST_IFNAME.into(),
            mtu: net.mtu,
            addresses: addresses.clone(),
            up: true,
        }],
        routes,
        dns,
        hosts: hosts_entries(hostname, addresses.first().map(|a| a.address)),
    }
}

fn hosts_entries(hostname: &str, pod_ip: Option<IpAddr>) -> Vec<HostsEntry> {
    let mut hosts = vec![
        HostsEntry {
            address: IpAddr::from([127, 0, 0, 1]),
            names: vec!["localhost".into()],
        },
        HostsEntry {
            address: "::1".parse().expect("an IPv6 address"),
            names: vec![
                "localhost".into(),
                "ip6-localhost".into(),
                "ip6-loopback".into(),
            ],
        },
    ];
    if let Some(ip) = pod_ip {
        hosts.push(HostsEntry {
            address: ip,
            names: vec![hostname.to_string()],
        });
    }
    hosts
}

/// Whether `ip` is inside the network of `prefix`.
fn contains(prefix: &IpPrefix, ip: IpAddr) -> bool {
    match (prefix.address, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let len = u32::from(prefix.prefix_len.min(32));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let len = u32::from(prefix.prefix_len.min(128));
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

impl PodVm {
    /// Sends the pod's network configuration and waits for the agent to
    /// have applied it; returns the agent's warnings (e.g. a loopback
    /// nameserver it dropped). Messages that arrive meanwhile stay queued
    /// for [`PodVm::next_event`]. Call before the first container starts.
    pub async fn configure_network(
        &mut self,
        config: &NetworkConfig,
    ) -> Result<Vec<String>, PodVmError> {
        self.send(&HostMessage::ConfigureNetwork(config.clone()))
            .await?;
        let mut other = Vec::new();
        let answer = tokio::time::timeout(CONFIGURE_TIMEOUT, async {
            loop {
                match self.next_event().await? {
                    GuestMessage::NetworkConfigured { error, warnings } => {
                        return Ok((error, warnings));
                    }
                    m => other.push(m),
                }
            }
        })
        .await;
        for m in other.into_iter().rev() {
            self.requeue_front(m);
        }
        match answer {
            Err(_) => Err(PodVmError::Network(format!(
                "the agent did not configure the network within {CONFIGURE_TIMEOUT:?}"
            ))),
            Ok(Err(e)) => Err(e),
            Ok(Ok((Some(error), _))) => Err(PodVmError::Network(
                crate::agent_link::sanitize_guest_text(&error),
            )),
            Ok(Ok((None, warnings))) => {
                let warnings: Vec<String> = warnings
                    .iter()
                    .map(|w| crate::agent_link::sanitize_guest_text(w))
                    .collect();
                for w in &warnings {
                    tracing::info!(pod = %self.id, "network: {w}");
                }
                Ok(warnings)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_net::cni::{CniDns, CniRoute};

    fn prefix(s: &str) -> podvisor_net::cni::IpPrefix {
        s.parse().unwrap()
    }

    pub(super) fn bridge_network() -> GuestNetwork {
        GuestNetwork {
            mac: [0x0a, 0x58, 0x0a, 0x57, 0x00, 0x05],
            mtu: 1500,
            addresses: vec![prefix("10.87.0.5/24")],
            routes: vec![CniRoute {
                dst: prefix("0.0.0.0/0"),
                gw: None,
            }],
            gateways: vec!["10.87.0.1".parse().unwrap()],
            dns: CniDns::default(),
        }
    }

    #[test]
    fn a_bridge_pod_gets_its_address_a_default_route_via_the_gateway_and_the_hosts_resolver() {
        let host = parse_resolv_conf("nameserver 127.0.0.53\nnameserver 10.1.1.1\nsearch lan\n");
        let cfg = guest_config(&bridge_network(), "web", &host);
        assert_eq!(cfg.interfaces.len(), 1);
        let nic = &cfg.interfaces[0];
        assert_eq!(nic.mac.to_string(), "0a:58:0a:57:00:05");
        assert_eq!(nic.addresses[0].to_string(), "10.87.0.5/24");
        assert!(nic.up);
        assert_eq!(cfg.routes.len(), 1, "{:?}", cfg.routes);
        assert_eq!(cfg.routes[0].destination.to_string(), "0.0.0.0/0");
        assert_eq!(cfg.routes[0].gateway, Some("10.87.0.1".parse().unwrap()));
        assert_eq!(
            cfg.dns.nameservers,
            vec!["10.1.1.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(cfg.dns.search, vec!["lan".to_string()]);
        let pod_line = cfg.hosts.last().unwrap();
        assert_eq!(pod_line.address.to_string(), "10.87.0.5");
        assert_eq!(pod_line.names, vec!["web".to_string()]);
    }

    #[test]
    fn a_gateway_outside_the_pods_prefix_gets_a_connected_route_first() {
        let mut net = bridge_network();
        net.addresses = vec![prefix("10.244.1.7/32")];
        net.gateways = vec!["169.254.1.1".parse().unwrap()];
        let cfg = guest_config(&net, "p", &DnsConfig::default());
        assert_eq!(cfg.routes[0].destination.to_string(), "169.254.1.1/32");
        assert_eq!(cfg.routes[0].gateway, None);
        assert_eq!(cfg.routes[1].gateway, Some("169.254.1.1".parse().unwrap()));
    }

    #[test]
    fn the_cnis_dns_wins_over_the_hosts_and_never_a_loopback_one() {
        let mut net = bridge_network();
        net.dns = CniDns {
            nameservers: vec!["127.0.0.1".into(), "10.96.0.10".into()],
            domain: "cluster.local".into(),
            search: vec![],
            options: vec!["ndots:5".into()],
        };
        let host = parse_resolv_conf("nameserver 10.1.1.1\n");
        let cfg = guest_config(&net, "p", &host);
        assert_eq!(
            cfg.dns.nameservers,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(cfg.dns.search, vec!["cluster.local".to_string()]);
        assert_eq!(cfg.dns.options, vec!["ndots:5".to_string()]);
    }

    #[test]
    fn no_network_is_only_localhost() {
        let cfg = no_network("p");
        assert!(cfg.interfaces.is_empty() && cfg.routes.is_empty());
        assert!(cfg.dns.nameservers.is_empty());
        assert!(cfg.hosts.iter().all(|h| h.address.is_loopback()));
    }
}
