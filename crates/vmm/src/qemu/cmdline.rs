//! The QEMU command line, built from typed argument groups.
//!
//! Each struct here is one group of QEMU arguments and knows how to render
//! itself ([`ArgGroup::push_args`]); [`QemuCommandLine`] holds the groups of
//! one VM in a fixed order. Nothing here runs QEMU, so every group is
//! unit-tested by comparing argument vectors.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::Accel;

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
}

impl ArgGroup for Machine {
    fn push_args(&self, args: &mut Vec<OsString>) {
        let mut machine = opt_value(&self.kind);
        if let Some(mem) = &self.memory_backend {
            machine.push_str(&format!(",memory-backend={}", opt_value(mem)));
        }
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

/// A raw file attached as a virtio-blk PCI disk with a serial number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioBlk {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: String,
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
                "virtio-blk-pci,drive={},id=dev-{},serial={}",
                opt_value(&self.id),
                opt_value(&self.id),
                opt_value(&self.serial)
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
}

impl ArgGroup for AgentChannel {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(args, "-device", "virtio-serial-pci,id=vserial0");
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
            format!("file,id=console0,path={}", path_value(&self.log)),
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
pub struct VirtioRng;

impl ArgGroup for VirtioRng {
    fn push_args(&self, args: &mut Vec<OsString>) {
        push(args, "-object", "rng-random,id=rng0,filename=/dev/urandom");
        push(args, "-device", "virtio-rng-pci,rng=rng0");
    }
}

/// All argument groups of one VM, rendered in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCommandLine {
    pub base: BaseOptions,
    pub machine: Machine,
    pub cpu: Cpu,
    pub smp: Smp,
    pub memory: Memory,
    pub memory_backends: Vec<MemoryBackendFile>,
    pub boot: DirectBoot,
    pub console: SerialConsole,
    pub qmp: QmpSocket,
    pub agent: AgentChannel,
    pub disks: Vec<VirtioBlk>,
    pub rng: Option<VirtioRng>,
}

impl QemuCommandLine {
    /// The arguments after the binary name.
    pub fn args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        let groups: Vec<&dyn ArgGroup> = {
            let mut g: Vec<&dyn ArgGroup> = vec![
                &self.base,
                &self.machine,
                &self.cpu,
                &self.smp,
                &self.memory,
            ];
            g.extend(self.memory_backends.iter().map(|b| b as &dyn ArgGroup));
            g.extend([
                &self.boot as &dyn ArgGroup,
                &self.console,
                &self.qmp,
                &self.agent,
            ]);
            g.extend(self.disks.iter().map(|d| d as &dyn ArgGroup));
            if let Some(rng) = &self.rng {
                g.push(rng);
            }
            g
        };
        for group in groups {
            group.push_args(&mut args);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(g: &dyn ArgGroup) -> Vec<String> {
        let mut v = Vec::new();
        g.push_args(&mut v);
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn commas_in_paths_are_doubled() {
        let c = SerialConsole {
            log: "/tmp/a,b/console.log".into(),
        };
        assert_eq!(
            render(&c),
            [
                "-chardev",
                "file,id=console0,path=/tmp/a,,b/console.log",
                "-serial",
                "chardev:console0"
            ]
        );
    }

    #[test]
    fn machine_with_tcg_cache_and_memory_backend() {
        let m = Machine {
            kind: "pc".into(),
            accel: Accel::Tcg,
            memory_backend: Some("mem".into()),
            tcg_tb_size_mib: Some(64),
        };
        assert_eq!(
            render(&m),
            [
                "-machine",
                "pc,memory-backend=mem",
                "-accel",
                "tcg,tb-size=64"
            ]
        );
        let kvm = Machine {
            accel: Accel::Kvm,
            memory_backend: None,
            ..m
        };
        // The TCG cache size is meaningless under KVM and is left out.
        assert_eq!(render(&kvm), ["-machine", "pc", "-accel", "kvm"]);
        assert_eq!(render(&Cpu::for_accel(Accel::Kvm)), ["-cpu", "host"]);
        assert_eq!(render(&Cpu::for_accel(Accel::Tcg)), ["-cpu", "max"]);
    }

    #[test]
    fn read_only_layer_disk_with_serial() {
        let d = VirtioBlk {
            id: "l0".into(),
            path: "/cache/layers/abc/disk.erofs".into(),
            read_only: true,
            serial: "pvl0".into(),
        };
        assert_eq!(
            render(&d),
            [
                "-drive",
                "file=/cache/layers/abc/disk.erofs,format=raw,if=none,id=l0,cache=none,aio=threads,readonly=on",
                "-device",
                "virtio-blk-pci,drive=l0,id=dev-l0,serial=pvl0"
            ]
        );
    }

    #[test]
    fn agent_channel_names_the_port() {
        let a = AgentChannel {
            socket: "/run/p/agent.sock".into(),
            port_name: "io.podvisor.agent.0".into(),
        };
        assert_eq!(
            render(&a),
            [
                "-device",
                "virtio-serial-pci,id=vserial0",
                "-chardev",
                "socket,id=agent0,path=/run/p/agent.sock,server=on,wait=off",
                "-device",
                "virtserialport,bus=vserial0.0,chardev=agent0,name=io.podvisor.agent.0"
            ]
        );
    }

    #[test]
    fn memory_backend_share_and_hotplug_memory() {
        let b = MemoryBackendFile {
            id: "mem".into(),
            mem_path: "/dev/shm/t".into(),
            size_mib: 256,
            share: false,
            read_only: false,
        };
        assert_eq!(
            render(&b),
            [
                "-object",
                "memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/t,share=off"
            ]
        );
        let m = Memory {
            size_mib: 256,
            hotplug: Some((2, 1024)),
        };
        assert_eq!(render(&m), ["-m", "256M,slots=2,maxmem=1024M"]);
    }

    #[test]
    fn whole_command_line_orders_groups() {
        let cl = QemuCommandLine {
            base: BaseOptions {
                name: "pod1".into(),
            },
            machine: Machine {
                kind: "pc".into(),
                accel: Accel::Tcg,
                memory_backend: None,
                tcg_tb_size_mib: None,
            },
            cpu: Cpu::for_accel(Accel::Tcg),
            smp: Smp { cpus: 2 },
            memory: Memory {
                size_mib: 256,
                hotplug: None,
            },
            memory_backends: vec![],
            boot: DirectBoot {
                kernel: "/boot/vmlinuz".into(),
                initramfs: "/c/initrd".into(),
                cmdline: "console=ttyS0 quiet".into(),
            },
            console: SerialConsole {
                log: "/r/console.log".into(),
            },
            qmp: QmpSocket {
                path: "/r/control.sock".into(),
            },
            agent: AgentChannel {
                socket: "/r/agent.sock".into(),
                port_name: "p".into(),
            },
            disks: vec![],
            rng: Some(VirtioRng),
        };
        let args: Vec<String> = cl
            .args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(&args[..3], ["-nodefaults", "-no-user-config", "-no-reboot"]);
        let pos = |flag: &str| args.iter().position(|a| a == flag).unwrap();
        assert!(pos("-machine") < pos("-kernel"));
        assert_eq!(args[pos("-smp") + 1], "2");
        assert_eq!(args[pos("-append") + 1], "console=ttyS0 quiet");
        assert!(args.contains(&"virtio-rng-pci,rng=rng0".to_string()));
    }
}
