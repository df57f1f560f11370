//! The devices of a VM, independent of the backend: what a [`crate::VmSpec`]
//! lists and what [`crate::Vm::add_device`] attaches to a running VM.
//!
//! Each kind is data plus one handler in the backend (Kata runtime-rs'
//! `DeviceType` is the model): a new kind of device is a new variant here
//! and one arm in the backend's command line and hot-plug code. Devices on
//! the PCI bus get their address from the backend's slot allocator; the
//! addresses a VM ended up with ([`PciLayout`]) go with its saved state, so
//! a VM restored from that state gets the same ones.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::VmmError;

/// Longest virtio-blk serial number.
pub const MAX_SERIAL_LEN: usize = 20;
/// Longest device id (QEMU ids are short names; ours get a prefix or two).
pub const MAX_ID_LEN: usize = 32;
/// Granularity of a pmem device's size (the guest maps it in 2 MiB pages).
pub const PMEM_ALIGN: u64 = 2 << 20;

/// One device of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// A disk (virtio-blk).
    Block(BlockDevice),
    /// A network card on a tap device (virtio-net).
    Network(NetworkDevice),
    /// A file mapped into the guest's physical memory (virtio-pmem), so the
    /// guest can mount it with DAX and share the host's page cache.
    Pmem(PmemDevice),
    /// The agent channel: a virtio-serial port named `port_name` whose host
    /// end is [`crate::VmPaths::agent_socket`].
    AgentChannel { port_name: String },
    /// The guest's first serial port, captured to
    /// [`crate::VmPaths::console_log`].
    Console,
    /// A hardware RNG fed from the host's `/dev/urandom` (virtio-rng).
    Rng,
    /// A VM generation ID (ACPI): each VMM process gets a new one, so a
    /// restored guest's kernel knows to reseed its RNG.
    VmGenId,
    /// A virtio-balloon that never inflates, there for free page
    /// reporting: the guest reports the memory it freed (in blocks of
    /// 2 MiB) and the VMM gives it back to the host. Only for guest RAM
    /// that is anonymous memory or a shared file: QEMU discards reported
    /// pages of a file by punching holes into it, which must never reach
    /// a template's RAM file that clones map privately.
    FreePageReporting,
}

/// The id of [`Device::FreePageReporting`].
pub const FREE_PAGE_REPORTING_ID: &str = "balloon";

impl Device {
    /// The device's id: unique within a VM, what
    /// [`crate::Vm::remove_device`] and [`PciLayout`] name it by.
    pub fn id(&self) -> &str {
        match self {
            Device::Block(b) => &b.id,
            Device::Network(n) => &n.id,
            Device::Pmem(p) => &p.id,
            Device::AgentChannel { .. } => "agent",
            Device::Console => "console",
            Device::Rng => "rng",
            Device::VmGenId => "vmgenid",
            Device::FreePageReporting => FREE_PAGE_REPORTING_ID,
        }
    }

    /// What kind of device it is.
    pub fn kind(&self) -> DeviceKind {
        match self {
            Device::Block(_) => DeviceKind::Block,
            Device::Network(_) => DeviceKind::Network,
            Device::Pmem(_) => DeviceKind::Pmem,
            Device::AgentChannel { .. } => DeviceKind::AgentChannel,
            Device::Console => DeviceKind::Console,
            Device::Rng => DeviceKind::Rng,
            Device::VmGenId => DeviceKind::VmGenId,
            Device::FreePageReporting => DeviceKind::FreePageReporting,
        }
    }

    /// The devices every pod VM has, in the order that gives them their
    /// usual addresses: console, agent channel, RNG, generation ID.
    pub fn pod_basics(agent_port: &str) -> Vec<Device> {
        vec![
            Device::Console,
            Device::AgentChannel {
                port_name: agent_port.to_string(),
            },
            Device::Rng,
            Device::VmGenId,
        ]
    }

    /// Checks what can be checked without the backend: ids, serials, sizes.
    pub fn validate(&self) -> Result<(), VmmError> {
        let invalid = |why: String| Err(VmmError::InvalidSpec(why));
        check_id(self.id())?;
        match self {
            Device::Block(b) if b.serial.len() > MAX_SERIAL_LEN => invalid(format!(
                "disk serial {:?} is longer than the {MAX_SERIAL_LEN} bytes virtio-blk allows",
                b.serial
            )),
            Device::Block(b) if b.serial.contains(',') => {
                invalid(format!("disk serial {:?} contains a comma", b.serial))
            }
            Device::Network(n) if n.mtu.is_some_and(|m| !(68..=65535).contains(&m)) => {
                invalid(format!(
                    "network device {}: MTU {} is outside 68..=65535",
                    n.id,
                    n.mtu.unwrap_or_default()
                ))
            }
            Device::Network(NetworkDevice {
                id,
                tap: Tap::Name(name),
                ..
            }) if name.is_empty() || name.len() > 15 || name.contains([',', '/', ' ']) => invalid(
                format!("network device {id}: {name:?} is not a network interface name"),
            ),
            Device::Network(n) if n.mac.is_multicast() => invalid(format!(
                "network device {}: {} is a multicast MAC address",
                n.id, n.mac
            )),
            Device::Pmem(p) if p.size_bytes == 0 || p.size_bytes % PMEM_ALIGN != 0 => {
                invalid(format!(
                    "pmem device {}: size {} is not a positive multiple of 2 MiB",
                    p.id, p.size_bytes
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Device ids are short names QEMU accepts as ids: a letter, then letters,
/// digits, `-`, `_` or `.`.
fn check_id(id: &str) -> Result<(), VmmError> {
    let ok = id.len() <= MAX_ID_LEN
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(VmmError::InvalidSpec(format!(
            "device id {id:?} is not a letter followed by at most {} letters, digits, '-', '_' or '.'",
            MAX_ID_LEN - 1
        )))
    }
}

/// The kinds of [`Device`], without their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    Block,
    Network,
    Pmem,
    AgentChannel,
    Console,
    Rng,
    VmGenId,
    FreePageReporting,
}

impl DeviceKind {
    /// Whether the device sits on the PCI bus (and so gets a slot).
    pub fn is_pci(self) -> bool {
        !matches!(self, DeviceKind::Console | DeviceKind::VmGenId)
    }

    /// Whether it can be attached to and detached from a running VM.
    pub fn is_hotpluggable(self) -> bool {
        matches!(
            self,
            DeviceKind::Block | DeviceKind::Network | DeviceKind::Pmem
        )
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Block => "block",
            DeviceKind::Network => "network",
            DeviceKind::Pmem => "pmem",
            DeviceKind::AgentChannel => "agent channel",
            DeviceKind::Console => "console",
            DeviceKind::Rng => "rng",
            DeviceKind::VmGenId => "vmgenid",
            DeviceKind::FreePageReporting => "free page reporting",
        })
    }
}

/// A raw disk image attached as a virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    /// Device id, unique in the VM (see [`Device::id`]).
    pub id: String,
    /// Host file backing the disk (raw format).
    pub path: PathBuf,
    /// Attach read-only (layer disks always are).
    pub read_only: bool,
    /// Serial number the guest sees (at most 20 bytes for virtio-blk).
    pub serial: String,
}

/// A network card (virtio-net) whose host side is a tap device. The VMM
/// runs the data path itself (no vhost-net).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDevice {
    /// Device id, unique in the VM.
    pub id: String,
    /// The tap device the card sends to and receives from.
    pub tap: Tap,
    /// The card's MAC address as the guest sees it.
    pub mac: MacAddress,
    /// MTU offered to the guest (virtio-net `host_mtu`); `None`: the
    /// driver's default of 1500.
    pub mtu: Option<u16>,
}

/// How the VMM finds its tap device.
#[derive(Debug, Clone)]
pub enum Tap {
    /// An open tap descriptor (`/dev/net/tun` after `TUNSETIFF`, with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), handed to the VMM: it needs no
    /// privilege to open it. Shared so a spec stays cloneable.
    Fd(Arc<OwnedFd>),
    /// A tap interface by name, opened by the VMM itself (in the VM's
    /// network namespace, [`crate::VmSpec::netns`]).
    Name(String),
}

impl Tap {
    /// The descriptor, for a tap passed by descriptor.
    pub fn raw_fd(&self) -> Option<RawFd> {
        match self {
            Tap::Fd(fd) => Some(fd.as_raw_fd()),
            Tap::Name(_) => None,
        }
    }
}

impl PartialEq for Tap {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Tap::Fd(a), Tap::Fd(b)) => a.as_raw_fd() == b.as_raw_fd(),
            (Tap::Name(a), Tap::Name(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Tap {}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// Whether the group bit is set (not a card's address).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for MacAddress {
    type Err = VmmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || VmmError::InvalidSpec(format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddress(out))
    }
}

/// A host file mapped into guest memory as a virtio-pmem device. The VM
/// needs memory hot-plug room for it (the backend sizes it from the
/// spec's pmem devices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemDevice {
    /// Device id, unique in the VM.
    pub id: String,
    /// The backing file, at least `size_bytes` long.
    pub path: PathBuf,
    /// Bytes mapped; a multiple of 2 MiB (pad the file).
    pub size_bytes: u64,
    /// Map the file read-only: the guest cannot change it, and every VM
    /// mapping it shares the host's page cache.
    pub read_only: bool,
}

/// Where a device sits on the guest's PCI buses: `bus` 0 is the root bus,
/// `bus` *n* the *n*th bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PciAddress {
    pub bus: u8,
    pub slot: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bus {} slot {:#04x}", self.bus, self.slot)
    }
}

/// The PCI addresses of a VM's devices, as [`crate::Vm::pci_layout`]
/// reports them after any hot-plugging: what a VM restored from its saved
/// state must be given ([`crate::VmSpec::pci`]), since a saved state only
/// loads onto devices at the addresses it was saved with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciLayout {
    /// PCI bridges behind the root bus (bridge *n* is bus *n*).
    pub bridges: u8,
    /// Device id to address.
    pub slots: BTreeMap<String, PciAddress>,
}
