//! QMP payloads per device kind, and the add/remove sequences against a
//! scripted fake QEMU.

use std::sync::Arc;

use super::*;
use crate::device::MacAddress;
use crate::qemu::fake_qemu::FakeQemu;

fn disk() -> BlockDevice {
    BlockDevice {
        id: "layer1".into(),
        path: "/cache/layers/ab/disk.erofs".into(),
        read_only: true,
        serial: "pvl1".into(),
    }
}

fn nic(tap: Tap) -> NetworkDevice {
    NetworkDevice {
        id: "eth0".into(),
        tap,
        mac: "02:00:0a:58:00:05".parse().unwrap(),
        mtu: Some(1450),
    }
}

fn at(bus: u8, slot: u8) -> PciAddress {
    PciAddress { bus, slot }
}

#[test]
fn block_payloads_match_the_command_line_disk() {
    assert_eq!(
        blockdev_add_args(&disk()),
        json!({
            "node-name": "layer1",
            "driver": "raw",
            "read-only": true,
            "file": {
                "driver": "file",
                "filename": "/cache/layers/ab/disk.erofs",
                "aio": "threads",
                "cache": { "direct": true },
            },
        })
    );
    assert_eq!(
        blk_device_args(&disk(), at(0, 5)),
        json!({
            "driver": "virtio-blk-pci",
            "id": "dev-layer1",
            "drive": "layer1",
            "serial": "pvl1",
            "bus": "pci.0",
            "addr": "0x5",
        })
    );
    // Behind a bridge, the bus is the bridge's.
    assert_eq!(blk_device_args(&disk(), at(2, 0x1f))["bus"], "pci.2");
}

#[test]
fn network_payloads_by_name_and_by_descriptor() {
    let by_name = nic(Tap::Name("tap0".into()));
    assert_eq!(
        netdev_add_args(&by_name),
        json!({ "type": "tap", "id": "eth0", "ifname": "tap0",
                "script": "no", "downscript": "no", "vhost": false })
    );
    let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let by_fd = nic(Tap::Fd(Arc::new(fd)));
    assert_eq!(
        netdev_add_args(&by_fd),
        json!({ "type": "tap", "id": "eth0", "fd": "tap-eth0", "vhost": false })
    );
    assert_eq!(
        net_device_args(&by_fd, at(0, 6)),
        json!({ "driver": "virtio-net-pci", "id": "dev-eth0", "netdev": "eth0",
                "mac": "02:00:0a:58:00:05", "host_mtu": 1450, "bus": "pci.0", "addr": "0x6" })
    );
}

#[test]
fn pmem_payloads_map_the_file_shared() {
    let pmem = PmemDevice {
        id: "dax0".into(),
        path: "/cache/layers/ab/disk.erofs".into(),
        size_bytes: 4 << 20,
        read_only: true,
    };
    assert_eq!(
        pmem_object_args(&pmem),
        json!({ "qom-type": "memory-backend-file", "id": "dax0",
                "mem-path": "/cache/layers/ab/disk.erofs", "size": 4194304,
                "share": true, "readonly": true })
    );
    assert_eq!(
        pmem_device_args(&pmem, at(1, 1)),
        json!({ "driver": "virtio-pmem-pci", "id": "dev-dax0", "memdev": "dax0",
                "bus": "pci.1", "addr": "0x1" })
    );
}

fn ok() -> Option<Vec<Value>> {
    Some(vec![json!({ "return": {} })])
}

#[tokio::test]
async fn a_rejected_device_removes_its_backend() {
    let fake = FakeQemu::start(Box::new(|req, _| {
        Some(vec![match req["execute"].as_str().unwrap() {
            "device_add" => json!({ "error": {
                "class": "GenericError", "desc": "PCI: slot 5 function 0 not available" } }),
            _ => json!({ "return": {} }),
        }])
    }));
    let mut qmp = Qmp::connect(&fake.socket).await.unwrap();
    let err = add(&mut qmp, &Device::Block(disk()), at(0, 5))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "hot-plugging block device layer1: QMP command device_add failed: \
         GenericError: PCI: slot 5 function 0 not available"
    );
    let err = add(
        &mut qmp,
        &Device::Network(nic(Tap::Name("tap0".into()))),
        at(0, 6),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("hot-plugging network device eth0"),
        "{err}"
    );
    assert_eq!(
        fake.commands(),
        [
            "qmp_capabilities",
            "blockdev-add",
            "device_add",
            "blockdev-del",
            "netdev_add",
            "device_add",
            "netdev_del"
        ]
    );

    let long = BlockDevice {
        serial: "x".repeat(21),
        ..disk()
    };
    let err = add(&mut qmp, &Device::Block(long), at(0, 5))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("longer than the 20 bytes"),
        "{err}"
    );
    let err = add(&mut qmp, &Device::Rng, at(0, 5)).await.unwrap_err();
    assert!(
        err.to_string().contains("cannot be added to a running VM"),
        "{err}"
    );
}

#[tokio::test]
async fn a_tap_descriptor_is_handed_over_before_its_netdev() {
    let fake = FakeQemu::start(Box::new(|req, fd| {
        if req["execute"] == "getfd" {
            assert_eq!(req["arguments"]["fdname"], "tap-eth0");
            assert!(fd.is_some(), "getfd carries the tap descriptor");
        }
        ok()
    }));
    let mut qmp = Qmp::connect(&fake.socket).await.unwrap();
    let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    add(
        &mut qmp,
        &Device::Network(nic(Tap::Fd(Arc::new(fd)))),
        at(0, 6),
    )
    .await
    .unwrap();
    assert_eq!(
        fake.commands(),
        ["qmp_capabilities", "getfd", "netdev_add", "device_add"]
    );
}

#[tokio::test]
async fn removal_waits_for_the_guest_then_frees_the_backend() {
    let fake = FakeQemu::start(Box::new(|req, _| match req["execute"].as_str().unwrap() {
        // The guest releases the device a moment after device_del.
        "device_del" => Some(vec![
            json!({ "return": {} }),
            json!({ "event": "DEVICE_DELETED", "data": { "path": "/machine/peripheral/dev-layer1/virtio-backend" } }),
            json!({ "event": "DEVICE_DELETED", "data": { "device": "dev-layer1", "path": "/machine/peripheral/dev-layer1" } }),
        ]),
        _ => ok(),
    }));
    let mut qmp = Qmp::connect(&fake.socket).await.unwrap();
    remove(
        &mut qmp,
        "layer1",
        DeviceKind::Block,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(
        fake.commands(),
        ["qmp_capabilities", "device_del", "blockdev-del"]
    );
    let reqs = fake.requests.lock().unwrap();
    assert_eq!(reqs[1]["arguments"], json!({ "id": "dev-layer1" }));
    assert_eq!(reqs[2]["arguments"], json!({ "node-name": "layer1" }));
}

#[tokio::test]
async fn a_guest_that_never_releases_the_device_is_a_timeout() {
    let fake = FakeQemu::start(Box::new(|_, _| ok()));
    let mut qmp = Qmp::connect(&fake.socket).await.unwrap();
    let err = remove(
        &mut qmp,
        "eth0",
        DeviceKind::Network,
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "removing device eth0: the guest did not release it within 200ms"
    );
    // The backend stays: the device may still use it.
    assert_eq!(fake.commands(), ["qmp_capabilities", "device_del"]);
    let err = remove(
        &mut qmp,
        "agent",
        DeviceKind::AgentChannel,
        Duration::from_secs(1),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("cannot be removed"), "{err}");
}

#[test]
fn mac_addresses_parse_and_print() {
    let mac: MacAddress = "02:00:0A:58:00:05".parse().unwrap();
    assert_eq!(mac.to_string(), "02:00:0a:58:00:05");
    assert!("02:00:0a:58:00".parse::<MacAddress>().is_err());
    assert!("02:00:0a:58:00:05:07".parse::<MacAddress>().is_err());
    assert!("0g:00:0a:58:00:05".parse::<MacAddress>().is_err());
    let multicast = NetworkDevice {
        mac: "01:00:5e:00:00:01".parse().unwrap(),
        ..nic(Tap::Name("tap0".into()))
    };
    assert!(Device::Network(multicast).validate().is_err());
}
