//! The pod VM's NIC on the host side: inside the pod's namespace, a tap
//! joined to the CNI's interface by tc redirects (Kata's "tcfilter" model):
//! an ingress qdisc on each, and on each a u32 match-all filter with
//! `action mirred egress redirect dev <the other>`. No bridge per pod; the
//! CNI interface keeps its addresses (the bridge plugin's DEL reads them to
//! remove the pod's masquerade rules).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec};

use crate::netns::{self, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum VmNicError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("tap name {0:?} is not 1-15 letters, digits, '-', '_' or '.'")]
    BadTapName(String),
    #[error("no interface {ifname:?} in network namespace {netns}")]
    NoInterface { ifname: String, netns: PathBuf },
    #[error("creating tap {tap:?}: {step}")]
    Tap {
        tap: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("netlink: {step}")]
    Netlink {
        step: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("reading the interface counters")]
    Counters(#[source] io::Error),
}

/// How the tap is handed to the hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapMode {
    /// Return the open tap fd (QEMU `-netdev tap,fd=N`); the tap goes away
    /// when the last copy of the fd is closed.
    Fd,
    /// Make the tap persistent and close it; a hypervisor running inside the
    /// namespace opens it by name (`-netdev tap,ifname=NAME`).
    Persistent,
}

/// What the hypervisor and the guest agent need for the pod's NIC.
#[derive(Debug)]
pub struct VmNic {
    /// The tap's name inside the pod namespace.
    pub tap_name: String,
    /// The open tap (`TapMode::Fd`), `IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`, with a
    /// 10-byte `virtio_net_hdr` before each frame.
    pub tap_fd: Option<OwnedFd>,
    /// The CNI interface's MAC: give it to the guest's virtio-net device.
    pub mac: [u8; 6],
    /// The CNI interface's MTU, also set on the tap: give it to the guest.
    pub mtu: u32,
}

impl VmNic {
    /// The MAC as `aa:bb:cc:dd:ee:ff` (QEMU's `mac=`).
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Creates `tap_name` in the namespace at `netns_path` and joins it to
/// `ifname` (the CNI's interface) with tc redirects both ways.
pub async fn attach(
    netns_path: &Path,
    ifname: &str,
    tap_name: &str,
    mode: TapMode,
) -> Result<VmNic, VmNicError> {
    if !valid_ifname(tap_name) {
        return Err(VmNicError::BadTapName(tap_name.to_string()));
    }
    let ns = netns_path.to_path_buf();
    let ifname = ifname.to_string();
    let tap_name = tap_name.to_string();
    netns::run_netlink_in(netns_path, move |handle| async move {
        attach_here(&handle, &ns, &ifname, &tap_name, mode).await
    })
    .await?
}

/// How many frames the tap `tap_name` in the namespace at `netns_path` has
/// handed to its VM so far (its transmit count: what came for the pod), or
/// `None` if there is no such tap. A change between two readings is
/// traffic for the pod.
pub async fn frames_to_vm(netns_path: &Path, tap_name: &str) -> Result<Option<u64>, VmNicError> {
    let tap_name = tap_name.to_string();
    let dev = netns::run_in(netns_path, || {
        // Per thread: this thread's network namespace.
        std::fs::read_to_string("/proc/thread-self/net/dev")
    })
    .await?
    .map_err(VmNicError::Counters)?;
    Ok(transmitted_frames(&dev, &tap_name))
}

/// The transmitted-packets count of `ifname` in a `/proc/net/dev` text.
fn transmitted_frames(dev: &str, ifname: &str) -> Option<u64> {
    dev.lines().skip(2).find_map(|line| {
        let (name, counters) = line.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        // 8 receive counters, then bytes and packets transmitted.
        counters.split_whitespace().nth(9)?.parse().ok()
    })
}

/// Undoes [`attach`]: removes the redirect on `ifname` and the tap (a tap
/// still open elsewhere goes when its last fd closes). Missing pieces are
/// fine. Removing the namespace does all this too.
pub async fn detach(netns_path: &Path, ifname: &str, tap_name: &str) -> Result<(), VmNicError> {
    let ifname = ifname.to_string();
    let tap_name = tap_name.to_string();
    netns::run_netlink_in(netns_path, move |handle| async move {
        if let Some(link) = find_link(&handle, &ifname).await? {
            let mut del = handle.qdisc().del(link.header.index as i32);
            del.message_mut().header.parent = TcHandle::INGRESS;
            del.message_mut().header.handle = TcHandle::from(0xffff_0000);
            ignore_missing(del.execute().await, "deleting the ingress qdisc")?;
        }
        if let Some(tap) = find_link(&handle, &tap_name).await? {
            ignore_missing(
                handle.link().del(tap.header.index).execute().await,
                "deleting the tap",
            )?;
        }
        Ok(())
    })
    .await?
}

fn ignore_missing(r: Result<(), rtnetlink::Error>, step: &str) -> Result<(), VmNicError> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e))
            if matches!(
                e.raw_code().abs(),
                libc::ENOENT | libc::ENODEV | libc::EINVAL
            ) =>
        {
            Ok(())
        }
        other => other.map_err(|source| VmNicError::Netlink {
            step: step.to_string(),
            source,
        }),
    }
}

async fn find_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, VmNicError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ENODEV => Ok(None),
        Err(source) => Err(VmNicError::Netlink {
            step: format!("looking up {name}"),
            source,
        }),
    }
}

fn link_mac_mtu(link: &LinkMessage) -> ([u8; 6], u32) {
    let mut mac = [0; 6];
    let mut mtu = 1500;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::Address(a) if a.len() == 6 => mac.copy_from_slice(a),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    (mac, mtu)
}

async fn attach_here(
    handle: &Handle,
    netns_path: &Path,
    ifname: &str,
    tap_name: &str,
    mode: TapMode,
) -> Result<VmNic, VmNicError> {
    let nl = |step: &str| {
        let step = step.to_string();
        move |source| VmNicError::Netlink { step, source }
    };
    let eth = find_link(handle, ifname)
        .await?
        .ok_or_else(|| VmNicError::NoInterface {
            ifname: ifname.to_string(),
            netns: netns_path.to_path_buf(),
        })?;
    let (mac, mtu) = link_mac_mtu(&eth);
    let fd = open_tap(tap_name, mode)?;
    let tap = find_link(handle, tap_name)
        .await?
        .ok_or_else(|| VmNicError::NoInterface {
            ifname: tap_name.to_string(),
            netns: netns_path.to_path_buf(),
        })?;
    let (eth_index, tap_index) = (eth.header.index, tap.header.index);
    // The tap is a pipe to the VM, not an interface of the host: with IPv6
    // on it the host's own stack would send router solicitations and DAD
    // out of it, to a running guest as if from the network, and into a
    // sleeping pod's queue, where they would wake it. (This thread is in
    // the pod's namespace, whose sysctls /proc/sys/net shows.)
    let knob = format!("/proc/sys/net/ipv6/conf/{tap_name}/disable_ipv6");
    match std::fs::write(&knob, "1") {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(VmNicError::Tap {
                tap: tap_name.to_string(),
                step: "turning IPv6 off on it",
                source: e,
            });
        }
        _ => {}
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(nl("setting the tap's MTU and bringing it up"))?;
    for (from, to, what) in [
        (eth_index, tap_index, ifname),
        (tap_index, eth_index, tap_name),
    ] {
        handle
            .qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(nl(&format!("adding the ingress qdisc of {what}")))?;
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(0xffff_0000)
            .protocol((libc::ETH_P_ALL as u16).to_be())
            .redirect(to)
            .map_err(nl("building the redirect filter"))?
            .execute()
            .await
            .map_err(nl(&format!("adding the redirect filter of {what}")))?;
    }
    Ok(VmNic {
        tap_name: tap_name.to_string(),
        tap_fd: fd,
        mac,
        mtu,
    })
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating it in the calling thread's namespace) the tap `name`.
fn open_tap(name: &str, mode: TapMode) -> Result<Option<OwnedFd>, VmNicError> {
    let err = |step, source| VmNicError::Tap {
        tap: name.to_string(),
        step,
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| err("opening /dev/net/tun", e))?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes, name then
    // flags), which `req` is laid out as and outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(err("TUNSETIFF", io::Error::last_os_error()));
    }
    match mode {
        TapMode::Fd => Ok(Some(file.into())),
        TapMode::Persistent => {
            // SAFETY: TUNSETPERSIST takes an integer argument, no pointer.
            if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
                return Err(err("TUNSETPERSIST", io::Error::last_os_error()));
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_taps_transmit_count_is_read_from_proc_net_dev() {
        let dev = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
  tap0:    1534      11    0    0    0     0          0         0     9120      42    0    0    0     0       0          0
  eth0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16
";
        assert_eq!(transmitted_frames(dev, "tap0"), Some(42));
        assert_eq!(transmitted_frames(dev, "eth0"), Some(10));
        assert_eq!(transmitted_frames(dev, "tap1"), None);
        assert_eq!(transmitted_frames("garbage", "tap0"), None);
    }

    #[test]
    fn tap_names_are_checked_and_macs_formatted() {
        assert!(valid_ifname("tap0"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("a-name-that-is-too-long"));
        assert!(!valid_ifname("tap/0"));
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0, 1, 0xfe, 0xff]),
            "0a:58:00:01:fe:ff"
        );
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
    }
}
