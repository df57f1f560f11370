//! The pod's network inside the guest: the host's [`NetworkConfig`] checked,
//! applied through rtnetlink ([`crate::netlink`]) and turned into the
//! `/etc/resolv.conf` and `/etc/hosts` every container gets.
//!
//! Order of [`configure`]: check everything first (a bad config changes
//! nothing), drop loopback nameservers (the host's `127.0.0.53` stub would
//! be the guest's own loopback) with a warning, write the two files, bring
//! `lo` up, wait (bounded) for each NIC to appear, then per NIC: down,
//! remove its old addresses, set its MAC (a clone's), name and MTU, add the
//! addresses, up; then the routes, connected ones before those via a
//! gateway. Taking the link down first makes a second configuration (a
//! clone's new identity after a fork) start from a clean state: the kernel
//! drops the link's IPv4 routes and IPv6 addresses when it goes down.
//!
//! The files live in [`NETWORK_DIR`] and are rewritten in place, so the
//! bind mounts of containers already running (a warm template's) see a
//! clone's new entries.

use std::collections::HashSet;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use podvisor_proto::{
    DnsConfig, InterfaceConfig, IpPrefix, MAX_ADDRESSES, MAX_HOSTS_ENTRIES, MAX_INTERFACES,
    MAX_NAMESERVERS, MAX_ROUTES, MAX_SEARCH_DOMAINS, MacAddr, NetworkConfig,
};

use crate::netlink::{Link, LinkChange, NetlinkError, Route, Rtnetlink};
use crate::path_lookup::resolve_in_root;

/// Where the agent keeps the pod's `resolv.conf` and `hosts`.
pub const NETWORK_DIR: &str = "/run/podvisor/network";

/// How long to wait for a NIC to show up: virtio-net probes when its
/// module loads, so it is normally there at once; a hot-plugged one takes
/// a moment.
pub const NIC_WAIT: Duration = Duration::from_secs(5);

/// The files every container gets, by their path in the container.
pub const CONTAINER_FILES: [(&str, &str); 2] =
    [("/etc/resolv.conf", "resolv.conf"), ("/etc/hosts", "hosts")];

/// Lowest MTU IPv4 allows.
const MIN_MTU: u32 = 68;
/// Longest interface name (`IFNAMSIZ` - 1).
const MAX_IFNAME_LEN: usize = 15;
/// Longest domain or host name.
const MAX_NAME_LEN: usize = 253;
/// Most names on one `/etc/hosts` line, and most `options` entries.
const MAX_NAMES_PER_ENTRY: usize = 32;

/// What went wrong configuring the network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid network configuration: {0}")]
    Invalid(String),
    /// (The cause is part of the message, not a `source`: this error
    /// travels to the host as one string.)
    #[error("writing {path}: {cause}")]
    File {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("no network interface with MAC {mac} appeared within {waited_ms} ms")]
    NicMissing { mac: MacAddr, waited_ms: u64 },
    #[error("{what}: {cause}")]
    Netlink { what: String, cause: NetlinkError },
}

fn invalid(message: String) -> NetworkError {
    NetworkError::Invalid(message)
}

fn netlink(what: impl Into<String>) -> impl FnOnce(NetlinkError) -> NetworkError {
    let what = what.into();
    move |cause| NetworkError::Netlink { what, cause }
}

/// Whether a nameserver is the guest's own loopback (or "this host"):
/// inside the VM that is no resolver at all.
pub fn is_loopback_nameserver(ip: &IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || ip.is_unspecified()
}

fn check_ifname(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if !ok {
        return Err(invalid(format!(
            "interface name {name:?}: need 1 to {MAX_IFNAME_LEN} printable bytes without '/' or ':'"
        )));
    }
    if name == "lo" {
        return Err(invalid("interface name \"lo\" is the loopback's".into()));
    }
    Ok(())
}

fn check_prefix(what: &str, p: &IpPrefix) -> Result<(), NetworkError> {
    let max = if p.address.is_ipv4() { 32 } else { 128 };
    if p.prefix_len > max {
        return Err(invalid(format!("{what} {p}: prefix longer than {max}")));
    }
    Ok(())
}

/// A name that goes into `/etc/hosts` or `resolv.conf`: no whitespace,
/// control characters or `#` (they would change the file's structure).
fn check_word(what: &str, word: &str, max: usize) -> Result<(), NetworkError> {
    let ok = !word.is_empty()
        && word.len() <= max
        && word.bytes().all(|b| b.is_ascii_graphic() && b != b'#');
    if !ok {
        return Err(invalid(format!(
            "{what} {word:?}: need 1 to {max} printable bytes without spaces or '#'"
        )));
    }
    Ok(())
}

fn check_mac(mac: &MacAddr) -> Result<(), NetworkError> {
    if mac.0 == [0; 6] || mac.0[0] & 1 != 0 {
        return Err(invalid(format!(
            "MAC {mac}: not a unicast address (all zero or multicast)"
        )));
    }
    Ok(())
}

fn check_interface(i: &InterfaceConfig) -> Result<(), NetworkError> {
    check_ifname(&i.name)?;
    check_mac(&i.mac)?;
    if let Some(current) = &i.current_mac {
        check_mac(current)?;
    }
    if !(MIN_MTU..=65535).contains(&i.mtu) {
        return Err(invalid(format!(
            "interface {}: MTU {} is not within {MIN_MTU}..=65535",
            i.name, i.mtu
        )));
    }
    if i.addresses.len() > MAX_ADDRESSES {
        return Err(invalid(format!(
            "interface {}: {} addresses, at most {MAX_ADDRESSES}",
            i.name,
            i.addresses.len()
        )));
    }
    for a in &i.addresses {
        check_prefix(&format!("interface {} address", i.name), a)?;
        let ip = a.address;
        if ip.is_unspecified() || ip.is_multicast() || ip.to_canonical().is_loopback() {
            return Err(invalid(format!(
                "interface {} address {a}: not a unicast address for a NIC",
                i.name
            )));
        }
    }
    Ok(())
}

/// Whether `p` has bits set beyond its prefix (the kernel refuses such a
/// route destination).
fn has_host_bits(p: &IpPrefix) -> bool {
    match p.address {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shr(u32::from(p.prefix_len)).unwrap_or(0);
            u32::from(v4) & mask != 0
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shr(u32::from(p.prefix_len)).unwrap_or(0);
            u128::from(v6) & mask != 0
        }
    }
}

/// Checks everything the agent would act on; returns the first problem.
pub fn validate(config: &NetworkConfig) -> Result<(), NetworkError> {
    if config.interfaces.len() > MAX_INTERFACES {
        return Err(invalid(format!(
            "{} interfaces, at most {MAX_INTERFACES}",
            config.interfaces.len()
        )));
    }
    let mut names = HashSet::new();
    let mut macs = HashSet::new();
    for i in &config.interfaces {
        check_interface(i)?;
        if !names.insert(i.name.as_str()) {
            return Err(invalid(format!("interface name {} given twice", i.name)));
        }
        if !macs.insert(i.mac) {
            return Err(invalid(format!("MAC {} given twice", i.mac)));
        }
    }
    if config.routes.len() > MAX_ROUTES {
        return Err(invalid(format!(
            "{} routes, at most {MAX_ROUTES}",
            config.routes.len()
        )));
    }
    for r in &config.routes {
        let what = format!("route to {}", r.destination);
        check_prefix(&what, &r.destination)?;
        if has_host_bits(&r.destination) {
            return Err(invalid(format!(
                "{what}: address has bits set beyond the prefix"
            )));
        }
        match config.interfaces.iter().find(|i| i.name == r.interface) {
            None => {
                return Err(invalid(format!(
                    "{what}: no interface {:?} in the configuration",
                    r.interface
                )));
            }
            Some(i) if !i.up => {
                return Err(invalid(format!(
                    "{what}: interface {} is configured down",
                    i.name
                )));
            }
            Some(_) => {}
        }
        if let Some(gw) = r.gateway
            && (gw.is_ipv4() != r.destination.address.is_ipv4()
                || gw.is_unspecified()
                || gw.is_multicast())
        {
            return Err(invalid(format!("{what}: gateway {gw} is not usable")));
        }
    }
    let dns = &config.dns;
    if dns.nameservers.len() > MAX_NAMESERVERS {
        return Err(invalid(format!(
            "{} nameservers, at most {MAX_NAMESERVERS}",
            dns.nameservers.len()
        )));
    }
    if dns.search.len() > MAX_SEARCH_DOMAINS {
        return Err(invalid(format!(
            "{} search domains, at most {MAX_SEARCH_DOMAINS}",
            dns.search.len()
        )));
    }
    for s in &dns.search {
        check_word("search domain", s, MAX_NAME_LEN)?;
    }
    if dns.options.len() > MAX_NAMES_PER_ENTRY {
        return Err(invalid(format!(
            "{} resolver options, at most {MAX_NAMES_PER_ENTRY}",
            dns.options.len()
        )));
    }
    for o in &dns.options {
        check_word("resolver option", o, 64)?;
    }
    if config.hosts.len() > MAX_HOSTS_ENTRIES {
        return Err(invalid(format!(
            "{} /etc/hosts entries, at most {MAX_HOSTS_ENTRIES}",
            config.hosts.len()
        )));
    }
    for h in &config.hosts {
        if h.names.is_empty() || h.names.len() > MAX_NAMES_PER_ENTRY {
            return Err(invalid(format!(
                "/etc/hosts entry for {}: need 1 to {MAX_NAMES_PER_ENTRY} names",
                h.address
            )));
        }
        for n in &h.names {
            check_word("host name", n, MAX_NAME_LEN)?;
        }
    }
    Ok(())
}

/// The DNS configuration without loopback nameservers, and a warning for
/// each one dropped.
pub fn without_loopback_nameservers(dns: &DnsConfig) -> (DnsConfig, Vec<String>) {
    let mut warnings = Vec::new();
    let mut kept = dns.clone();
    kept.nameservers.retain(|ns| {
        let loopback = is_loopback_nameserver(ns);
        if loopback {
            warnings.push(format!(
                "dropped nameserver {ns}: a loopback resolver cannot be reached from the pod VM"
            ));
        }
        !loopback
    });
    (kept, warnings)
}

/// The text of the containers' `/etc/resolv.conf`.
pub fn resolv_conf(dns: &DnsConfig) -> String {
    let mut out = String::from("# Generated by podvisor from the pod's network configuration.\n");
    for ns in &dns.nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !dns.search.is_empty() {
        out.push_str(&format!("search {}\n", dns.search.join(" ")));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    out
}

/// The text of the containers' `/etc/hosts`.
pub fn hosts_file(config: &NetworkConfig) -> String {
    let mut out = String::from("# Generated by podvisor from the pod's network configuration.\n");
    for h in &config.hosts {
        out.push_str(&format!("{}\t{}\n", h.address, h.names.join(" ")));
    }
    out
}

/// Writes `text` to `path` in place (same inode: bind mounts of it see the
/// new contents), creating it mode 0644 if missing.
fn rewrite(path: &Path, text: &str) -> Result<(), NetworkError> {
    let fail = |cause| NetworkError::File {
        path: path.to_path_buf(),
        cause,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)
}

/// Brings `lo` up (the kernel gives it 127.0.0.1/8 and ::1 then).
pub fn loopback_up(nl: &mut dyn Rtnetlink) -> Result<(), NetworkError> {
    let links = nl.links().map_err(netlink("listing network interfaces"))?;
    let lo = links
        .iter()
        .find(|l| l.loopback)
        .ok_or_else(|| invalid("the guest has no loopback interface".into()))?;
    if lo.up {
        return Ok(());
    }
    nl.set_link(
        lo.index,
        &LinkChange {
            up: Some(true),
            ..LinkChange::default()
        },
    )
    .map_err(netlink("bringing lo up"))
}

/// Waits up to `wait` until every interface of the config is listed (by
/// `current_mac` or `mac`); returns the links, in the config's order.
fn wait_for_nics(
    nl: &mut dyn Rtnetlink,
    interfaces: &[InterfaceConfig],
    wait: Duration,
) -> Result<Vec<Link>, NetworkError> {
    let start = Instant::now();
    loop {
        let links = nl.links().map_err(netlink("listing network interfaces"))?;
        let find = |i: &InterfaceConfig| {
            links
                .iter()
                .find(|l| !l.loopback && (l.mac == i.current_mac || l.mac == Some(i.mac)))
                .cloned()
        };
        let found: Vec<Option<Link>> = interfaces.iter().map(find).collect();
        if let Some(missing) = found.iter().position(Option::is_none) {
            if start.elapsed() >= wait {
                let i = &interfaces[missing];
                return Err(NetworkError::NicMissing {
                    mac: i.current_mac.unwrap_or(i.mac),
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        return Ok(found.into_iter().flatten().collect());
    }
}

/// Configures one NIC: down, old addresses removed, MAC, name and MTU,
/// the addresses, up.
fn configure_interface(
    nl: &mut dyn Rtnetlink,
    link: &Link,
    want: &InterfaceConfig,
) -> Result<(), NetworkError> {
    let name = &want.name;
    let index = link.index;
    if link.up {
        nl.set_link(
            index,
            &LinkChange {
                up: Some(false),
                ..LinkChange::default()
            },
        )
        .map_err(netlink(format!("taking {} down", link.name)))?;
    }
    let old = nl
        .addresses(index)
        .map_err(netlink(format!("listing the addresses of {}", link.name)))?;
    for a in old {
        match nl.del_address(index, a) {
            // Gone with the link going down (IPv6) meanwhile.
            Err(e) if e.errno() == Some(Errno::EADDRNOTAVAIL) => {}
            r => r.map_err(netlink(format!("removing address {a} from {}", link.name)))?,
        }
    }
    let change = LinkChange {
        up: None,
        name: (link.name != *name).then(|| name.clone()),
        mac: (link.mac != Some(want.mac)).then_some(want.mac),
        mtu: Some(want.mtu),
    };
    nl.set_link(index, &change).map_err(netlink(format!(
        "setting name {name}, MAC {} and MTU {} of {}",
        want.mac, want.mtu, link.name
    )))?;
    for a in &want.addresses {
        nl.add_address(index, *a)
            .map_err(netlink(format!("adding address {a} to {name}")))?;
    }
    if want.up {
        nl.set_link(
            index,
            &LinkChange {
                up: Some(true),
                ..LinkChange::default()
            },
        )
        .map_err(netlink(format!("bringing {name} up")))?;
    }
    Ok(())
}

/// What [`configure`] reports: things it changed or left out, and the
/// error that stopped it, if any.
#[derive(Debug, Default)]
pub struct Outcome {
    pub warnings: Vec<String>,
    pub error: Option<NetworkError>,
}

/// Applies `config` (see the module documentation for the order), writing
/// the containers' files into `files_dir` and waiting up to `nic_wait` for
/// each NIC.
pub fn configure(
    nl: &mut dyn Rtnetlink,
    config: &NetworkConfig,
    files_dir: &Path,
    nic_wait: Duration,
) -> Outcome {
    let mut outcome = Outcome::default();
    if let Err(e) = validate(config) {
        outcome.error = Some(e);
        return outcome;
    }
    let (dns, warnings) = without_loopback_nameservers(&config.dns);
    outcome.warnings = warnings;
    outcome.error = apply(nl, config, &dns, files_dir, nic_wait).err();
    outcome
}

fn apply(
    nl: &mut dyn Rtnetlink,
    config: &NetworkConfig,
    dns: &DnsConfig,
    files_dir: &Path,
    nic_wait: Duration,
) -> Result<(), NetworkError> {
    std::fs::create_dir_all(files_dir).map_err(|cause| NetworkError::File {
        path: files_dir.to_path_buf(),
        cause,
    })?;
    rewrite(&files_dir.join("resolv.conf"), &resolv_conf(dns))?;
    rewrite(&files_dir.join("hosts"), &hosts_file(config))?;
    loopback_up(nl)?;
    let links = wait_for_nics(nl, &config.interfaces, nic_wait)?;
    for (link, want) in links.iter().zip(&config.interfaces) {
        configure_interface(nl, link, want)?;
    }
    // Connected routes first: a gateway must be reachable when the route
    // through it goes in.
    let (connected, via): (Vec<_>, Vec<_>) =
        config.routes.iter().partition(|r| r.gateway.is_none());
    for r in connected.into_iter().chain(via) {
        let index = config
            .interfaces
            .iter()
            .zip(&links)
            .find(|(i, _)| i.name == r.interface)
            .map(|(_, l)| l.index)
            .ok_or_else(|| invalid(format!("route to {}: no interface", r.destination)))?;
        let route = Route {
            destination: r.destination,
            gateway: r.gateway,
            index,
        };
        let via = r.gateway.map_or_else(String::new, |g| format!(" via {g}"));
        nl.add_route(&route).map_err(netlink(format!(
            "adding route {}{via} dev {}",
            r.destination, r.interface
        )))?;
    }
    Ok(())
}

/// Makes sure `path` (absolute, in the container) is a regular file inside
/// `root` that a file can be bind-mounted on, and returns where it is on
/// the agent's side. Symbolic links are resolved inside the root for the
/// directories; the file itself, if it is a symbolic link (images often
/// point `/etc/resolv.conf` elsewhere), is replaced by an empty file, so a
/// mount never lands outside the container. Missing directories and the
/// file are created.
pub fn file_mount_target(root: &Path, path: &str) -> std::io::Result<PathBuf> {
    let (dir, name) = path
        .rsplit_once('/')
        .filter(|(_, name)| !name.is_empty() && *name != "." && *name != "..")
        .ok_or_else(|| std::io::Error::other(format!("{path:?} does not name a file")))?;
    let dir = resolve_in_root(root, Path::new(if dir.is_empty() { "/" } else { dir }))?;
    std::fs::create_dir_all(&dir)?;
    let target = dir.join(name);
    match std::fs::symlink_metadata(&target) {
        Ok(meta) if meta.file_type().is_file() => return Ok(target),
        Ok(meta) if meta.file_type().is_dir() => {
            return Err(std::io::Error::other(format!(
                "{path} is a directory in the image"
            )));
        }
        Ok(_) => std::fs::remove_file(&target)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&target)?;
    Ok(target)
}

#[cfg(test)]
#[path = "network_tests.rs"]
mod tests;
