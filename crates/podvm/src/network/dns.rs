//! The pod's resolver settings and `/etc/hosts` aliases: the host's
//! resolvers as a pod should use them ([`host_dns`]), and a pod's own DNS
//! settings (Kubernetes' `dnsPolicy`, `dnsConfig`, `hostAliases`; docker's
//! `--dns*` and `--add-host`) applied to its network configuration as the
//! kubelet applies them ([`apply_pod_dns`]).

use std::net::IpAddr;
use std::path::Path;

use podvisor_proto::{DnsConfig, HostsEntry, NetworkConfig};
use serde::{Deserialize, Serialize};

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

/// A word `resolv.conf` and `/etc/hosts` hold as it is: printable, no
/// space, no `#`, 1 to `max` bytes.
pub fn resolv_word(word: &str, max: usize) -> bool {
    !word.is_empty() && word.len() <= max && word.bytes().all(|b| b.is_ascii_graphic() && b != b'#')
}

/// Applies the pod's DNS settings to `config`, whose `dns` is the base
/// (the CNI result's DNS, else the host's resolvers: [`guest_config`](super::guest_config);
/// nothing for a pod without a network: [`no_network`](super::no_network)), as the kubelet
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

#[cfg(test)]
mod tests {
    use super::super::tests::bridge_network;
    use super::super::{guest_config, no_network};
    use super::*;

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
}
