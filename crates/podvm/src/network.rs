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
use std::path::Path;
use std::sync::Arc;

use podvisor_net::PodNetworks;
use podvisor_net::pod_network::{GuestNetwork, PodNetworkError};
use podvisor_net::vm_nic::{self, TapMode};
use podvisor_proto::{
    DnsConfig, GuestMessage, HostMessage, HostsEntry, InterfaceConfig, IpPrefix, MacAddr,
    NetworkConfig, RouteConfig,
};
use podvisor_vmm::{Device, MacAddress, NetworkDevice, Tap};
use serde::{Deserialize, Serialize};

use crate::{PodVm, PodVmError};

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

/// The host's resolvers as a pod should use them: `/etc/resolv.conf`, or
/// when that names only loopback resolvers (systemd-resolved's stub), the
/// upstream list systemd-resolved keeps, as the kubelet does. Loopback
/// nameservers are dropped: in the guest they would be its own loopback.
pub fn host_dns() -> DnsConfig {
    let main = read_resolv_conf(Path::new("/etc/resolv.conf"));
    if !main.nameservers.is_empty() {
        return main;
    }
    let upstream = read_resolv_conf(Path::new("/run/systemd/resolve/resolv.conf"));
    if upstream.nameservers.is_empty() {
        main
    } else {
        upstream
    }
}

fn read_resolv_conf(path: &Path) -> DnsConfig {
    std::fs::read_to_string(path)
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

/// `nameserver`, `search`/`domain` and `options` lines, within the proto's
/// limits; loopback nameservers left out.
pub fn parse_resolv_conf(text: &str) -> DnsConfig {
    let mut dns = DnsConfig::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok())
                    && !ip.is_loopback()
                    && dns.nameservers.len() < podvisor_proto::MAX_NAMESERVERS
                {
                    dns.nameservers.push(ip);
                }
            }
            Some("search") | Some("domain") => {
                dns.search = words
                    .take(podvisor_proto::MAX_SEARCH_DOMAINS)
                    .map(str::to_string)
                    .collect();
            }
            Some("options") => dns.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    dns
}

/// Kubernetes' `dnsPolicy`: where a pod's resolver settings start from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DnsPolicy {
    /// Kubernetes' default: the cluster DNS service. podvisor has none, so
    /// this is [`DnsPolicy::Default`], as the kubelet does when it has no
    /// `clusterDNS`.
    #[default]
    ClusterFirst,
    /// As `ClusterFirst` (it differs only for `hostNetwork` pods, which
    /// podvisor does not run).
    ClusterFirstWithHostNet,
    /// The base: the CNI result's DNS, else the host's resolvers.
    Default,
    /// Nothing but the pod's `dnsConfig`.
    None,
}

/// How the pod's own settings combine with the base.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DnsMerge {
    /// Kubernetes' `dnsConfig`, as the kubelet merges it: nameservers and
    /// search domains appended to the base's (duplicates dropped), options
    /// merged by name (the pod's value wins).
    #[default]
    Append,
    /// docker's `--dns`, `--dns-search`, `--dns-option`: each one given
    /// replaces that part of the base (a search list of only `.` means
    /// none).
    Replace,
}

/// A resolver option (`ndots` with value `2` is `ndots:2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsOption {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
}

impl DnsOption {
    /// `name` or `name:value`, as `resolv.conf` and docker write it.
    pub fn parse(word: &str) -> DnsOption {
        match word.split_once(':') {
            Some((name, value)) => DnsOption {
                name: name.into(),
                value: Some(value.into()),
            },
            None => DnsOption {
                name: word.into(),
                value: None,
            },
        }
    }
}

impl std::fmt::Display for DnsOption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(v) if !v.is_empty() => write!(f, "{}:{v}", self.name),
            _ => f.write_str(&self.name),
        }
    }
}

/// The pod's own resolver settings (Kubernetes' `dnsConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodDnsConfig {
    #[serde(default)]
    pub nameservers: Vec<IpAddr>,
    #[serde(default)]
    pub searches: Vec<String>,
    #[serde(default)]
    pub options: Vec<DnsOption>,
}

/// Extra `/etc/hosts` names for an address (Kubernetes' `hostAliases`,
/// docker's `--add-host`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAlias {
    pub ip: IpAddr,
    pub hostnames: Vec<String>,
}

/// A pod's DNS settings: policy, its own resolver settings and how they
/// combine with the base, and its `/etc/hosts` aliases. The default is a
/// Kubernetes pod that states none (`ClusterFirst`: the base as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodDns {
    #[serde(default)]
    pub policy: DnsPolicy,
    #[serde(default)]
    pub merge: DnsMerge,
    #[serde(default)]
    pub config: Option<PodDnsConfig>,
    #[serde(default)]
    pub host_aliases: Vec<HostAlias>,
}

/// Longest search domain the kubelet keeps (glibc aborts on longer ones).
const MAX_SEARCH_DOMAIN_LEN: usize = 253;
/// Longest `search` line (Kubernetes' limit, spaces included).
pub const MAX_SEARCH_LIST_CHARS: usize = 2048;
/// Most `options` entries and names on one `/etc/hosts` line the agent
/// takes.
const MAX_WORDS: usize = 32;
/// Longest option the agent takes.
const MAX_OPTION_LEN: usize = 64;

/// A word `resolv.conf` can hold as it is: printable, no space, no `#`.
fn resolv_word(word: &str, max: usize) -> bool {
    !word.is_empty() && word.len() <= max && word.bytes().all(|b| b.is_ascii_graphic() && b != b'#')
}

/// Applies the pod's DNS settings to `config`, whose `dns` is the base
/// (the CNI result's DNS, else the host's resolvers: [`guest_config`];
/// nothing for a pod without a network: [`no_network`]), as the kubelet
/// does (`pkg/kubelet/network/dns`): `Default` and, with no cluster DNS,
/// `ClusterFirst`/`ClusterFirstWithHostNet` keep the base; `None` starts
/// empty; then the pod's `dnsConfig` is merged in ([`DnsMerge`]) and the
/// result cut to the resolver's limits (3 nameservers; 32 search domains,
/// 2048 characters; the kubelet warns and cuts too). Host aliases become
/// `/etc/hosts` lines after the pod's own. A loopback nameserver would be
/// the VM's own loopback, which the agent drops: it is left out here, with
/// a warning. Returns the warnings (what was left out, and why).
pub fn apply_pod_dns(config: &mut NetworkConfig, pod: &PodDns) -> Vec<String> {
    let mut warnings = Vec::new();
    let base = match pod.policy {
        DnsPolicy::None => DnsConfig::default(),
        DnsPolicy::Default | DnsPolicy::ClusterFirst | DnsPolicy::ClusterFirstWithHostNet => {
            std::mem::take(&mut config.dns)
        }
    };
    let own = pod.config.clone().unwrap_or_default();
    let own_options: Vec<String> = own.options.iter().map(|o| o.to_string()).collect();
    let (mut nameservers, mut search, options) = match pod.merge {
        DnsMerge::Append => {
            let mut ns = base.nameservers;
            ns.extend(own.nameservers);
            let mut search = base.search;
            search.extend(own.searches);
            (ns, search, merge_options(&base.options, &own.options))
        }
        DnsMerge::Replace => {
            let ns = if own.nameservers.is_empty() {
                base.nameservers
            } else {
                own.nameservers
            };
            let search = match own.searches.as_slice() {
                [] => base.search,
                [dot] if dot == "." => vec![],
                s => s.to_vec(),
            };
            let options = if own_options.is_empty() {
                base.options
            } else {
                own_options
            };
            (ns, search, options)
        }
    };
    dedup(&mut nameservers);
    nameservers.retain(|ns| {
        let canonical = ns.to_canonical();
        let loopback = canonical.is_loopback() || canonical.is_unspecified();
        if loopback {
            warnings.push(format!(
                "nameserver {ns} left out: in a pod VM it is the VM's own loopback, not the host's (the agent drops loopback resolvers)"
            ));
        }
        !loopback
    });
    if nameservers.len() > podvisor_proto::MAX_NAMESERVERS {
        nameservers.truncate(podvisor_proto::MAX_NAMESERVERS);
        warnings.push(format!(
            "nameserver limits were exceeded, some nameservers have been omitted, the applied nameserver line is: {}",
            nameservers
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    let mut cut = false;
    dedup(&mut search);
    search.retain(|s| {
        let ok = resolv_word(s, MAX_SEARCH_DOMAIN_LEN);
        cut |= !ok;
        ok
    });
    if search.len() > podvisor_proto::MAX_SEARCH_DOMAINS {
        search.truncate(podvisor_proto::MAX_SEARCH_DOMAINS);
        cut = true;
    }
    while search.join(" ").len() > MAX_SEARCH_LIST_CHARS {
        search.pop();
        cut = true;
    }
    if cut {
        warnings.push(format!(
            "search line limits were exceeded, some search paths have been omitted, the applied search line is: {}",
            search.join(" ")
        ));
    }
    let mut options: Vec<String> = options
        .into_iter()
        .filter(|o| {
            let ok = resolv_word(o, MAX_OPTION_LEN);
            if !ok {
                warnings.push(format!(
                    "resolver option {o:?} left out: not a resolv.conf word"
                ));
            }
            ok
        })
        .collect();
    if options.len() > MAX_WORDS {
        options.truncate(MAX_WORDS);
        warnings.push(format!(
            "more than {MAX_WORDS} resolver options: the applied options are: {}",
            options.join(" ")
        ));
    }
    config.dns = DnsConfig {
        nameservers,
        search,
        options,
    };
    for alias in &pod.host_aliases {
        for names in alias.hostnames.chunks(MAX_WORDS) {
            if config.hosts.len() >= podvisor_proto::MAX_HOSTS_ENTRIES {
                warnings.push(format!(
                    "/etc/hosts is full ({} lines): host alias {} {} left out",
                    podvisor_proto::MAX_HOSTS_ENTRIES,
                    alias.ip,
                    names.join(" ")
                ));
                continue;
            }
            config.hosts.push(HostsEntry {
                address: alias.ip,
                names: names.to_vec(),
            });
        }
    }
    warnings
}

/// Options merged by name, in order: the base's, each with the pod's
/// value if the pod names it, then the pod's other ones.
fn merge_options(base: &[String], own: &[DnsOption]) -> Vec<String> {
    let mut merged: Vec<DnsOption> = Vec::new();
    for o in base
        .iter()
        .map(|w| DnsOption::parse(w))
        .chain(own.iter().cloned())
    {
        match merged.iter_mut().find(|m| m.name == o.name) {
            Some(m) => *m = o,
            None => merged.push(o),
        }
    }
    merged.iter().map(|o| o.to_string()).collect()
}

/// Drops later duplicates, keeping the order.
fn dedup<T: PartialEq + Clone>(items: &mut Vec<T>) {
    let mut seen: Vec<T> = Vec::new();
    items.retain(|i| {
        let new = !seen.contains(i);
        if new {
            seen.push(i.clone());
        }
        new
    });
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

    fn bridge_network() -> GuestNetwork {
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn with_base(nameservers: &[&str], search: &[&str], options: &[&str]) -> NetworkConfig {
        let mut cfg = guest_config(&bridge_network(), "web", &DnsConfig::default());
        cfg.dns = DnsConfig {
            nameservers: nameservers.iter().map(|s| ip(s)).collect(),
            search: search.iter().map(|s| s.to_string()).collect(),
            options: options.iter().map(|s| s.to_string()).collect(),
        };
        cfg
    }

    fn option(name: &str, value: Option<&str>) -> DnsOption {
        DnsOption {
            name: name.into(),
            value: value.map(str::to_string),
        }
    }

    #[test]
    fn default_and_cluster_first_keep_the_base_none_starts_empty() {
        for policy in [
            DnsPolicy::Default,
            DnsPolicy::ClusterFirst,
            DnsPolicy::ClusterFirstWithHostNet,
        ] {
            let mut cfg = with_base(&["10.1.1.1"], &["lan"], &["ndots:1"]);
            let before = cfg.clone();
            let pod = PodDns {
                policy,
                ..Default::default()
            };
            assert!(apply_pod_dns(&mut cfg, &pod).is_empty());
            assert_eq!(cfg, before, "{policy:?}");
        }
        let mut cfg = with_base(&["10.1.1.1"], &["lan"], &["ndots:1"]);
        let pod = PodDns {
            policy: DnsPolicy::None,
            config: Some(PodDnsConfig {
                nameservers: vec![ip("192.0.2.53")],
                searches: vec!["corp.example".into()],
                options: vec![option("edns0", None)],
            }),
            ..Default::default()
        };
        assert!(apply_pod_dns(&mut cfg, &pod).is_empty());
        assert_eq!(cfg.dns.nameservers, vec![ip("192.0.2.53")]);
        assert_eq!(cfg.dns.search, vec!["corp.example".to_string()]);
        assert_eq!(cfg.dns.options, vec!["edns0".to_string()]);
    }

    #[test]
    fn dns_config_is_merged_as_the_kubelet_merges_it() {
        let mut cfg = with_base(
            &["10.1.1.1", "10.1.1.2"],
            &["lan", "corp.example"],
            &["ndots:1", "rotate"],
        );
        let pod = PodDns {
            config: Some(PodDnsConfig {
                nameservers: vec![ip("10.1.1.2"), ip("192.0.2.53"), ip("192.0.2.54")],
                searches: vec!["corp.example".into(), "svc.example".into()],
                options: vec![option("ndots", Some("5")), option("edns0", None)],
            }),
            ..Default::default()
        };
        let warnings = apply_pod_dns(&mut cfg, &pod);
        // Appended, duplicates dropped, cut to three with a warning.
        assert_eq!(
            cfg.dns.nameservers,
            vec![ip("10.1.1.1"), ip("10.1.1.2"), ip("192.0.2.53")]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("applied nameserver line is: 10.1.1.1 10.1.1.2 192.0.2.53"),
            "{warnings:?}"
        );
        assert_eq!(cfg.dns.search, ["lan", "corp.example", "svc.example"]);
        // By name: the pod's value wins.
        assert_eq!(cfg.dns.options, ["ndots:5", "rotate", "edns0"]);
    }

    #[test]
    fn search_limits_are_kept_as_the_kubelet_keeps_them() {
        let mut cfg = with_base(&[], &[], &[]);
        let long = format!("{}.example", "a".repeat(250));
        let many: Vec<String> = (0..40)
            .map(|i| format!("d{i}.{}", "x".repeat(60)))
            .collect();
        let pod = PodDns {
            config: Some(PodDnsConfig {
                searches: std::iter::once(long).chain(many).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let warnings = apply_pod_dns(&mut cfg, &pod);
        assert!(cfg.dns.search.len() <= podvisor_proto::MAX_SEARCH_DOMAINS);
        assert!(cfg.dns.search.join(" ").len() <= MAX_SEARCH_LIST_CHARS);
        assert!(cfg.dns.search.iter().all(|s| s.len() <= 253));
        assert!(cfg.dns.search[0].starts_with("d0."), "{:?}", cfg.dns.search);
        assert!(
            warnings[0].starts_with("search line limits were exceeded"),
            "{warnings:?}"
        );
    }

    #[test]
    fn docker_flags_replace_what_they_name() {
        let mut cfg = with_base(&["10.1.1.1", "10.1.1.2"], &["lan"], &["ndots:1"]);
        let pod = PodDns {
            policy: DnsPolicy::Default,
            merge: DnsMerge::Replace,
            config: Some(PodDnsConfig {
                nameservers: vec![ip("192.0.2.53")],
                ..Default::default()
            }),
            host_aliases: vec![],
        };
        apply_pod_dns(&mut cfg, &pod);
        assert_eq!(cfg.dns.nameservers, vec![ip("192.0.2.53")]);
        assert_eq!(cfg.dns.search, ["lan"]);
        assert_eq!(cfg.dns.options, ["ndots:1"]);
        // `--dns-search .`: no search domains; options replaced.
        let pod = PodDns {
            merge: DnsMerge::Replace,
            config: Some(PodDnsConfig {
                searches: vec![".".into()],
                options: vec![DnsOption::parse("ndots:2"), DnsOption::parse("edns0")],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut cfg = with_base(&["10.1.1.1"], &["lan"], &["ndots:1"]);
        apply_pod_dns(&mut cfg, &pod);
        assert_eq!(cfg.dns.nameservers, vec![ip("10.1.1.1")]);
        assert!(cfg.dns.search.is_empty());
        assert_eq!(cfg.dns.options, ["ndots:2", "edns0"]);
    }

    #[test]
    fn a_loopback_nameserver_is_left_out_with_a_warning() {
        let mut cfg = no_network("p");
        let pod = PodDns {
            policy: DnsPolicy::None,
            config: Some(PodDnsConfig {
                nameservers: vec![ip("127.0.0.1"), ip("::1"), ip("192.0.2.53")],
                ..Default::default()
            }),
            ..Default::default()
        };
        let warnings = apply_pod_dns(&mut cfg, &pod);
        assert_eq!(cfg.dns.nameservers, vec![ip("192.0.2.53")]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("nameserver 127.0.0.1 left out"));
    }

    #[test]
    fn host_aliases_follow_the_pods_own_lines() {
        let mut cfg = guest_config(&bridge_network(), "web", &DnsConfig::default());
        let many: Vec<String> = (0..40).map(|i| format!("h{i}")).collect();
        let pod = PodDns {
            host_aliases: vec![
                HostAlias {
                    ip: ip("192.0.2.7"),
                    hostnames: vec!["db.test".into(), "db".into()],
                },
                HostAlias {
                    ip: ip("2001:db8::7"),
                    hostnames: vec![],
                },
                HostAlias {
                    ip: ip("192.0.2.8"),
                    hostnames: many,
                },
            ],
            ..Default::default()
        };
        assert!(apply_pod_dns(&mut cfg, &pod).is_empty());
        let lines: Vec<String> = cfg
            .hosts
            .iter()
            .map(|h| format!("{} {}", h.address, h.names.len()))
            .collect();
        assert_eq!(
            lines,
            [
                "127.0.0.1 1",
                "::1 3",
                "10.87.0.5 1",
                "192.0.2.7 2",
                "192.0.2.8 32",
                "192.0.2.8 8"
            ]
        );
    }

    #[test]
    fn no_network_is_only_localhost() {
        let cfg = no_network("p");
        assert!(cfg.interfaces.is_empty() && cfg.routes.is_empty());
        assert!(cfg.dns.nameservers.is_empty());
        assert!(cfg.hosts.iter().all(|h| h.address.is_loopback()));
    }
}
