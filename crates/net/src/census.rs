//! A count of what pod networking leaves on a host (in the calling
//! process's network namespace): namespace pins, links, iptables rules and
//! chains, host-local IPAM allocations. Leak tests take one before and one
//! after and compare.
//!
//! The plugins create some shared state on first use and keep it: the
//! `CNI-FORWARD` / `CNI-ADMIN` chains of firewall, the `CNI-HOSTPORT-*`
//! chains of portmap, the bridge itself, host-local's `last_reserved_ip.*`
//! and `lock` files (not counted). Compare against a census taken after one
//! pod has come and gone, as on a host that has run pods before.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use tokio::process::Command;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNetworkCensus {
    /// Entries in the namespace pin directory.
    pub netns_pins: usize,
    /// Links in this namespace (veths, bridges, taps, ...).
    pub links: Vec<String>,
    /// `iptables-save` / `ip6tables-save` rule lines (`-A ...`) of the nat and
    /// filter tables.
    pub iptables_rules: Vec<String>,
    /// Chain lines (`:NAME ...`) of the same tables.
    pub iptables_chains: Vec<String>,
    /// host-local allocation files (named by an address) in the IPAM dirs.
    pub ipam_allocations: Vec<PathBuf>,
}

impl HostNetworkCensus {
    /// Counts. `ipam_dirs` are host-local network directories
    /// (`/var/lib/cni/networks/<name>` or `<dataDir>/<name>`).
    pub async fn take(netns_dir: &Path, ipam_dirs: &[PathBuf]) -> io::Result<Self> {
        let netns_pins = match fs::read_dir(netns_dir) {
            Ok(d) => d.count(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let conn = tokio::spawn(connection);
        let mut links = Vec::new();
        let mut stream = handle.link().get().execute();
        while let Some(link) = stream.try_next().await.map_err(io::Error::other)? {
            let name = link.attributes.iter().find_map(|a| match a {
                rtnetlink::packet_route::link::LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            links.push(name.unwrap_or_else(|| format!("#{}", link.header.index)));
        }
        conn.abort();
        links.sort();
        let mut iptables_rules = Vec::new();
        let mut iptables_chains = Vec::new();
        for tool in ["iptables-save", "ip6tables-save"] {
            for table in ["nat", "filter"] {
                let out = match Command::new(tool).args(["-t", table]).output().await {
                    Ok(out) if out.status.success() => out.stdout,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for line in String::from_utf8_lossy(&out).lines() {
                    if line.starts_with("-A ") {
                        iptables_rules.push(format!("{tool} {table} {line}"));
                    } else if let Some(chain) = line.strip_prefix(':') {
                        let name = chain.split_whitespace().next().unwrap_or_default();
                        iptables_chains.push(format!("{tool} {table} {name}"));
                    }
                }
            }
        }
        iptables_rules.sort();
        iptables_chains.sort();
        let mut ipam_allocations = Vec::new();
        for dir in ipam_dirs {
            let entries = match fs::read_dir(dir) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                if entry
                    .file_name()
                    .to_string_lossy()
                    .parse::<IpAddr>()
                    .is_ok()
                {
                    ipam_allocations.push(entry.path());
                }
            }
        }
        ipam_allocations.sort();
        Ok(Self {
            netns_pins,
            links,
            iptables_rules,
            iptables_chains,
            ipam_allocations,
        })
    }
}
