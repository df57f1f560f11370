//! The QEMU command line, built from typed argument groups.
//!
//! Each struct here is one group of QEMU arguments and knows how to render
//! itself ([`ArgGroup::push_args`]); [`QemuCommandLine`] holds the groups of
//! one VM in a fixed order. Nothing here runs QEMU, so every group is
//! unit-tested by comparing argument vectors.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::Accel;
use crate::device::{MacAddress, PciAddress};

/// One group of QEMU arguments.
pub trait ArgGroup {
    /// Appends this group's arguments.
    fn push_args(&self, args: &mut Vec<OsString>);
}

/// Escapes a value for QEMU's `key=value,key=value` option syntax, where a
/// literal comma is written as two.
pub fn opt_value(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_value(path: &Path) -> String {
    opt_value(&path.to_string_lossy())
}

fn push(args: &mut Vec<OsString>, flag: &str, value: impl Into<OsString>) {
    args.push(flag.into());
    args.push(value.into());
}

/// Fixed options every podvisor VM gets: no default devices, no user config,
/// no graphics, exit instead of rebooting, and a process name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseOptions {
    pub name: String,
}

impl ArgGroup for BaseOptions {
    fn push_args(&self, args: &mut Vec<OsString>) {
        args.extend(["-nodefaults", "-no-user-config", "-no-reboot"].map(OsString::from));
        push(args, "-display", "none");
        push(
            args,
            "-name",
            format!("{},debug-threads=on", opt_value(&self.name)),
        );
    }
}

/// `-machine` and `-accel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Machine type, e.g. `pc`.
    pub kind: String,
    pub accel: Accel,
    /// Id of a memory backend object to use as guest RAM.
    pub memory_backend: Option<String>,
    /// TCG translation cache size in MiB (QEMU's default is large; a small
    /// cache keeps the host memory of many emulated VMs down).
    pub tcg_tb_size_mib: Option<u32>,
    /// `mem-merge`: whether guest RAM is marked mergeable
    /// (`MADV_MERGEABLE`), so that KSM may merge its identical pages with
    /// other processes' (other VMs'). QEMU's own default is on; podvisor
    /// always says which, so a VM is merged only when asked.
    pub mem_merge: bool,
}

impl ArgGroup for Machine {
    fn push_args(&self, args: &mut Vec<OsString>) {
        let mut machine = opt_value(&self.kind);
        if let Some(mem) = &self.memory_backend {
            machine.push_str(&format!(",memory-backend={}", opt_value(mem)));
        }
        machine.push_str(&format!(",mem-merge={}", on_off(self.mem_merge)));
        push(args, "-machine", machine);
        let mut accel = self.accel.as_str().to_string();
        if let (Accel::Tcg, Some(tb)) = (self.accel, self.tcg_tb_size_mib) {
            accel.push_str(&format!(",tb-size={tb}"));
        }
        push(args, "-accel", accel);
    }
}

/// `-cpu`: the host CPU under KVM, the richest emulated one under TCG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    pub model: String,
}

impl Cpu {
    /// The model podvisor uses for an accelerator.
    pub fn for_accel(accel: Accel) -> Self {
        Self {
            model: match accel {
                Accel::Kvm => "host",
                Accel::Tcg => "max",
            }
            .into(),
        }
    }
}

impl ArgGroup for Cpu {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(args, "-cpu", opt_value(&self.model));
    }
}

/// `-smp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smp {
    pub cpus: u32,
}

impl ArgGroup for Smp {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(args, "-smp", self.cpus.to_string());
    }
}

/// `-m`: guest RAM, with hotplug slots when devices such as virtio-pmem need
/// address space beyond RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memory {
    pub size_mib: u64,
    /// `(slots, maxmem in MiB)`.
    pub hotplug: Option<(u32, u64)>,
}

impl ArgGroup for Memory {
    fn push_args(&self, args: &mut Vec<OsString>) {
        let mut v = format!("{}M", self.size_mib);
        if let Some((slots, max)) = self.hotplug {
            v.push_str(&format!(",slots={slots},maxmem={max}M"));
        }
        push(args, "-m", v);
    }
}

/// `-object memory-backend-file`: guest RAM (or a pmem region) in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBackendFile {
    pub id: String,
    pub mem_path: PathBuf,
    pub size_mib: u64,
    /// `share=on`: writes go to the file (a template); `off`: private
    /// copy-on-write mapping (a clone).
    pub share: bool,
    pub read_only: bool,
}

impl ArgGroup for MemoryBackendFile {
    fn push_args(&self, args: &mut Vec<OsString>) {
        let mut v = format!(
            "memory-backend-file,id={},size={}M,mem-path={},share={}",
            opt_value(&self.id),
            self.size_mib,
            path_value(&self.mem_path),
            on_off(self.share)
        );
        if self.read_only {
            v.push_str(",readonly=on");
        }
        push(args, "-object", v);
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// Direct kernel boot: `-kernel`, `-initrd`, `-append`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
}

impl ArgGroup for DirectBoot {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(args, "-kernel", self.kernel.as_os_str());
        push(args, "-initrd", self.initramfs.as_os_str());
        push(args, "-append", self.cmdline.as_str());
    }
}

/// `bus=pci.N,addr=0xNN`: bus 0 is the root bus, bus *n* the bridge
/// whose id is `pci.n`.
fn pci_addr(addr: PciAddress) -> String {
    format!("bus={},addr=0x{:x}", bus_name(addr.bus), addr.slot)
}

/// QEMU's name of PCI bus `bus` (the root bus, or a bridge's id).
pub fn bus_name(bus: u8) -> String {
    format!("pci.{bus}")
}

/// Id of the QEMU device (the guest-visible part) of podvisor device `id`;
/// its host-side backend (drive, netdev, memory object) is named `id`.
pub fn frontend_id(id: &str) -> String {
    format!("dev-{id}")
}

/// A PCI-to-PCI bridge on the root bus, adding a bus of 31 slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciBridge {
    /// Bridge number, 1-based: its bus is `pci.<n>`.
    pub n: u8,
    pub addr: PciAddress,
}

impl ArgGroup for PciBridge {
    fn push_args(&self, args: &mut Vec<OsString>) {
        // ACPI hot-plug (the pc machine's) serves slots behind bridges too;
        // SHPC would compete with it.
        push(
            args,
            "-device",
            format!(
                "pci-bridge,id={},chassis_nr={},shpc=off,{}",
                bus_name(self.n),
                self.n,
                pci_addr(self.addr)
            ),
        );
    }
}

/// A raw file attached as a virtio-blk PCI disk with a serial number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioBlk {
    /// The drive's id (block node); the device is [`frontend_id`] of it.
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: String,
    pub addr: PciAddress,
}

impl ArgGroup for VirtioBlk {
    fn push_args(&self, args: &mut Vec<OsString>) {
        let mut drive = format!(
            "file={},format=raw,if=none,id={},cache=none,aio=threads",
            path_value(&self.path),
            opt_value(&self.id)
        );
        if self.read_only {
            drive.push_str(",readonly=on");
        }
        push(args, "-drive", drive);
        push(
            args,
            "-device",
            format!(
                "virtio-blk-pci,drive={},id={},serial={},{}",
                opt_value(&self.id),
                opt_value(&frontend_id(&self.id)),
                opt_value(&self.serial),
                pci_addr(self.addr)
            ),
        );
    }
}

/// How QEMU gets a tap device: an inherited descriptor or a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapArg {
    /// Descriptor number in the QEMU process.
    Fd(i32),
    Ifname(String),
}

/// A virtio-net card on a tap device (`-netdev tap` + `virtio-net-pci`),
/// without vhost-net (this host kind has no `/dev/vhost-net`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioNet {
    /// The netdev's id; the device is [`frontend_id`] of it.
    pub id: String,
    pub tap: TapArg,
    pub mac: MacAddress,
    pub mtu: Option<u16>,
    pub addr: PciAddress,
}

impl ArgGroup for VirtioNet {
    fn push_args(&self, args: &mut Vec<OsString>) {
        let tap = match &self.tap {
            // QEMU refuses script options next to fd=.
            TapArg::Fd(fd) => format!("tap,id={},fd={fd},vhost=off", opt_value(&self.id)),
            TapArg::Ifname(name) => format!(
                "tap,id={},ifname={},script=no,downscript=no,vhost=off",
                opt_value(&self.id),
                opt_value(name)
            ),
        };
        push(args, "-netdev", tap);
        let mut device = format!(
            "virtio-net-pci,netdev={},id={},mac={}",
            opt_value(&self.id),
            opt_value(&frontend_id(&self.id)),
            self.mac
        );
        if let Some(mtu) = self.mtu {
            device.push_str(&format!(",host_mtu={mtu}"));
        }
        device.push(',');
        device.push_str(&pci_addr(self.addr));
        push(args, "-device", device);
    }
}

/// A file mapped into guest memory through virtio-pmem: a memory backend
/// on the file and the device presenting it. Needs memory hot-plug room
/// ([`Memory::hotplug`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioPmem {
    /// The memory backend's id; the device is [`frontend_id`] of it.
    pub id: String,
    pub path: PathBuf,
    pub size_mib: u64,
    pub read_only: bool,
    pub addr: PciAddress,
}

impl ArgGroup for VirtioPmem {
    fn push_args(&self, args: &mut Vec<OsString>) {
        // Shared: a private mapping would give each VM its own copy of
        // the pages (read-only, the guest cannot write them anyway).
        MemoryBackendFile {
            id: self.id.clone(),
            mem_path: self.path.clone(),
            size_mib: self.size_mib,
            share: true,
            read_only: self.read_only,
        }
        .push_args(args);
        push(
            args,
            "-device",
            format!(
                "virtio-pmem-pci,memdev={},id={},{}",
                opt_value(&self.id),
                opt_value(&frontend_id(&self.id)),
                pci_addr(self.addr)
            ),
        );
    }
}

/// The agent channel: a virtio-serial controller with one named port whose
/// host end is a unix socket QEMU listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentChannel {
    pub socket: PathBuf,
    pub port_name: String,
    pub addr: PciAddress,
}

impl ArgGroup for AgentChannel {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(
            args,
            "-device",
            format!("virtio-serial-pci,id=vserial0,{}", pci_addr(self.addr)),
        );
        push(
            args,
            "-chardev",
            format!(
                "socket,id=agent0,path={},server=on,wait=off",
                path_value(&self.socket)
            ),
        );
        push(
            args,
            "-device",
            format!(
                "virtserialport,bus=vserial0.0,chardev=agent0,name={}",
                opt_value(&self.port_name)
            ),
        );
    }
}

/// The guest's first serial port, written to a log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConsole {
    pub log: PathBuf,
}

impl ArgGroup for SerialConsole {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(
            args,
            "-chardev",
            // Appending: the log is cut while the VM runs (crate::console),
            // and QEMU's writes must follow the file's end.
            format!("file,id=console0,path={},append=on", path_value(&self.log)),
        );
        push(args, "-serial", "chardev:console0");
    }
}

/// The QMP control socket (QEMU listens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpSocket {
    pub path: PathBuf,
}

impl ArgGroup for QmpSocket {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(
            args,
            "-chardev",
            format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                path_value(&self.path)
            ),
        );
        push(args, "-mon", "chardev=qmp0,mode=control");
    }
}

/// A hardware random number generator for the guest, fed from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioRng {
    pub addr: PciAddress,
}

impl ArgGroup for VirtioRng {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(args, "-object", "rng-random,id=rng0,filename=/dev/urandom");
        push(
            args,
            "-device",
            format!("virtio-rng-pci,rng=rng0,{}", pci_addr(self.addr)),
        );
    }
}

/// A virtio-balloon for free page reporting only (never inflated): the
/// guest reports freed blocks and QEMU discards them from guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreePageReporting {
    pub addr: PciAddress,
}

impl ArgGroup for FreePageReporting {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(
            args,
            "-device",
            format!(
                "virtio-balloon-pci,id={},free-page-reporting=on,{}",
                crate::device::FREE_PAGE_REPORTING_ID,
                pci_addr(self.addr)
            ),
        );
    }
}

/// A VM generation ID device (`vmgenid`, ACPI): `guid=auto` gives every
/// QEMU process a new ID, and a guest kernel with the vmgenid driver
/// reseeds its RNG when a restored VM sees it change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmGenId;

impl ArgGroup for VmGenId {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(args, "-device", "vmgenid,guid=auto");
    }
}

/// QEMU's seccomp filter (`-sandbox`): every syscall group it can deny
/// while still running a VM is denied: obsolete calls, gaining privileges
/// (set*uid and friends), starting processes (fork, exec), and changing
/// scheduling or memory policy. Saved states travel over a descriptor
/// (`fd:` migration), which needs none of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox;

impl ArgGroup for Sandbox {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(
            args,
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        );
    }
}

/// Start paused, waiting for a saved state on the QMP `migrate-incoming`
/// command: how a VM is restored (`-S -incoming defer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingDeferred;

impl ArgGroup for IncomingDeferred {
    fn push_args(&self, args: &mut Vec<OsString>) {
        args.push("-S".into());
        push(args, "-incoming", "defer");
    }
}

/// The argument group of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceArgs {
    Bridge(PciBridge),
    Blk(VirtioBlk),
    Net(VirtioNet),
    Pmem(VirtioPmem),
    Agent(AgentChannel),
    Console(SerialConsole),
    Rng(VirtioRng),
    VmGenId(VmGenId),
    FreePageReporting(FreePageReporting),
}

impl DeviceArgs {
    fn group(&self) -> &dyn ArgGroup {
        match self {
            DeviceArgs::Bridge(g) => g,
            DeviceArgs::Blk(g) => g,
            DeviceArgs::Net(g) => g,
            DeviceArgs::Pmem(g) => g,
            DeviceArgs::Agent(g) => g,
            DeviceArgs::Console(g) => g,
            DeviceArgs::Rng(g) => g,
            DeviceArgs::VmGenId(g) => g,
            DeviceArgs::FreePageReporting(g) => g,
        }
    }
}

impl ArgGroup for DeviceArgs {
    fn push_args(&self, args: &mut Vec<OsString>) {
        self.group().push_args(args);
    }
}

/// All argument groups of one VM, rendered in a fixed order: machine,
/// memory, boot, control socket, then the devices (bridges first, so the
/// buses exist before devices name them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCommandLine {
    pub base: BaseOptions,
    pub sandbox: Sandbox,
    pub machine: Machine,
    pub cpu: Cpu,
    pub smp: Smp,
    pub memory: Memory,
    pub memory_backends: Vec<MemoryBackendFile>,
    pub boot: DirectBoot,
    pub qmp: QmpSocket,
    pub devices: Vec<DeviceArgs>,
    /// Present when the VM is restored from a saved state.
    pub incoming: Option<IncomingDeferred>,
}

impl QemuCommandLine {
    /// The arguments after the binary name.
    pub fn args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        let mut groups: Vec<&dyn ArgGroup> = vec![
            &self.base,
            &self.sandbox,
            &self.machine,
            &self.cpu,
            &self.smp,
            &self.memory,
        ];
        groups.extend(self.memory_backends.iter().map(|b| b as &dyn ArgGroup));
        groups.push(&self.boot);
        groups.push(&self.qmp);
        groups.extend(self.devices.iter().map(|d| d as &dyn ArgGroup));
        if let Some(incoming) = &self.incoming {
            groups.push(incoming);
        }
        for group in groups {
            group.push_args(&mut args);
        }
        args
    }
}

#[cfg(test)]
#[path = "cmdline_tests.rs"]
mod tests;
