//! Argument vectors of the command-line groups.

use super::*;

fn at(bus: u8, slot: u8) -> PciAddress {
    PciAddress { bus, slot }
}

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
            "file,id=console0,path=/tmp/a,,b/console.log,append=on",
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
        mem_merge: false,
    };
    assert_eq!(
        render(&m),
        [
            "-machine",
            "pc,memory-backend=mem,mem-merge=off",
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
    assert_eq!(
        render(&kvm),
        ["-machine", "pc,mem-merge=off", "-accel", "kvm"]
    );
    assert_eq!(render(&Cpu::for_accel(Accel::Kvm)), ["-cpu", "host"]);
    assert_eq!(render(&Cpu::for_accel(Accel::Tcg)), ["-cpu", "max"]);
}

#[test]
fn guest_ram_is_mergeable_only_when_asked() {
    // QEMU's default is mem-merge=on: podvisor always says which.
    let machine = |mem_merge| Machine {
        kind: "pc".into(),
        accel: Accel::Tcg,
        memory_backend: None,
        tcg_tb_size_mib: None,
        mem_merge,
    };
    assert_eq!(
        render(&machine(true)),
        ["-machine", "pc,mem-merge=on", "-accel", "tcg"]
    );
    assert_eq!(
        render(&machine(false)),
        ["-machine", "pc,mem-merge=off", "-accel", "tcg"]
    );
}

#[test]
fn read_only_layer_disk_with_serial() {
    let d = VirtioBlk {
        id: "l0".into(),
        path: "/cache/layers/abc/disk.erofs".into(),
        read_only: true,
        serial: "pvl0".into(),
        addr: at(0, 5),
    };
    assert_eq!(
        render(&d),
        [
            "-drive",
            "file=/cache/layers/abc/disk.erofs,format=raw,if=none,id=l0,cache=none,aio=threads,readonly=on",
            "-device",
            "virtio-blk-pci,drive=l0,id=dev-l0,serial=pvl0,bus=pci.0,addr=0x5"
        ]
    );
    let behind_bridge = VirtioBlk {
        addr: at(1, 0x1f),
        ..d
    };
    assert!(render(&behind_bridge)[3].ends_with(",bus=pci.1,addr=0x1f"));
}

#[test]
fn agent_channel_names_the_port() {
    let a = AgentChannel {
        socket: "/run/p/agent.sock".into(),
        port_name: "io.podvisor.agent.0".into(),
        addr: at(0, 2),
    };
    assert_eq!(
        render(&a),
        [
            "-device",
            "virtio-serial-pci,id=vserial0,bus=pci.0,addr=0x2",
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
        sandbox: Sandbox,
        machine: Machine {
            kind: "pc".into(),
            accel: Accel::Tcg,
            memory_backend: None,
            tcg_tb_size_mib: None,
            mem_merge: false,
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
        qmp: QmpSocket {
            path: "/r/control.sock".into(),
        },
        devices: vec![
            DeviceArgs::Console(SerialConsole {
                log: "/r/console.log".into(),
            }),
            DeviceArgs::Agent(AgentChannel {
                socket: "/r/agent.sock".into(),
                port_name: "p".into(),
                addr: at(0, 2),
            }),
            DeviceArgs::Rng(VirtioRng { addr: at(0, 3) }),
            DeviceArgs::VmGenId(VmGenId),
        ],
        incoming: None,
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
    assert!(args.contains(&"virtio-rng-pci,rng=rng0,bus=pci.0,addr=0x3".to_string()));
    assert!(args.contains(&"vmgenid,guid=auto".to_string()));
    assert!(!args.contains(&"-incoming".to_string()));
    assert!(!args.contains(&"-S".to_string()));
    // The seccomp filter denies all it can.
    assert_eq!(
        args[pos("-sandbox") + 1],
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    );
}

#[test]
fn restored_vm_waits_paused_for_its_state() {
    assert_eq!(render(&IncomingDeferred), ["-S", "-incoming", "defer"]);
}

#[test]
fn template_and_clone_memory_backends() {
    // A template writes its RAM to the file; a clone maps it privately.
    let template = MemoryBackendFile {
        id: "mem".into(),
        mem_path: "/dev/shm/podvisor/t-1.ram".into(),
        size_mib: 256,
        share: true,
        read_only: false,
    };
    assert_eq!(
        render(&template),
        [
            "-object",
            "memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/podvisor/t-1.ram,share=on"
        ]
    );
    let clone = MemoryBackendFile {
        share: false,
        ..template
    };
    assert!(render(&clone)[1].ends_with(",share=off"));
}

#[test]
fn a_bridge_adds_a_bus_without_shpc() {
    let b = PciBridge {
        n: 1,
        addr: at(0, 31),
    };
    assert_eq!(
        render(&b),
        [
            "-device",
            "pci-bridge,id=pci.1,chassis_nr=1,shpc=off,bus=pci.0,addr=0x1f"
        ]
    );
}

#[test]
fn network_card_on_a_tap_by_name_or_descriptor_without_vhost() {
    let by_name = VirtioNet {
        id: "eth0".into(),
        tap: TapArg::Ifname("tap0".into()),
        mac: "02:00:0a:58:00:05".parse().unwrap(),
        mtu: Some(1450),
        addr: at(0, 6),
    };
    assert_eq!(
        render(&by_name),
        [
            "-netdev",
            "tap,id=eth0,ifname=tap0,script=no,downscript=no,vhost=off",
            "-device",
            "virtio-net-pci,netdev=eth0,id=dev-eth0,mac=02:00:0a:58:00:05,host_mtu=1450,bus=pci.0,addr=0x6"
        ]
    );
    let by_fd = VirtioNet {
        tap: TapArg::Fd(7),
        mtu: None,
        ..by_name
    };
    assert_eq!(
        render(&by_fd),
        [
            "-netdev",
            "tap,id=eth0,fd=7,vhost=off",
            "-device",
            "virtio-net-pci,netdev=eth0,id=dev-eth0,mac=02:00:0a:58:00:05,bus=pci.0,addr=0x6"
        ]
    );
}

#[test]
fn pmem_maps_its_file_shared_and_read_only() {
    let p = VirtioPmem {
        id: "dax0".into(),
        path: "/cache/layers/ab/disk.erofs".into(),
        size_mib: 4,
        read_only: true,
        addr: at(0, 7),
    };
    assert_eq!(
        render(&p),
        [
            "-object",
            "memory-backend-file,id=dax0,size=4M,mem-path=/cache/layers/ab/disk.erofs,share=on,readonly=on",
            "-device",
            "virtio-pmem-pci,memdev=dax0,id=dev-dax0,bus=pci.0,addr=0x7"
        ]
    );
}

#[test]
fn rng_console_and_generation_id() {
    assert_eq!(
        render(&VirtioRng { addr: at(0, 3) }),
        [
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            "virtio-rng-pci,rng=rng0,bus=pci.0,addr=0x3"
        ]
    );
    assert_eq!(render(&VmGenId), ["-device", "vmgenid,guid=auto"]);
    assert_eq!(
        render(&FreePageReporting { addr: at(0, 4) }),
        [
            "-device",
            "virtio-balloon-pci,id=balloon,free-page-reporting=on,bus=pci.0,addr=0x4"
        ]
    );
    assert_eq!(
        render(&SerialConsole {
            log: "/r/console.log".into()
        }),
        [
            "-chardev",
            "file,id=console0,path=/r/console.log,append=on",
            "-serial",
            "chardev:console0"
        ]
    );
}
