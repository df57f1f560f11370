//! Attaching devices to and detaching them from a running VM over QMP, one
//! handler per kind: the backend (`blockdev-add`, `netdev_add`,
//! `object-add`), then `device_add` in the slot the allocator gave; removal
//! is `device_del`, the guest's `DEVICE_DELETED`, then the backend's
//! deletion. A device that cannot be added leaves no backend behind.

use std::os::fd::AsFd;
use std::time::Duration;

use serde_json::{Value, json};

use super::cmdline::{bus_name, frontend_id};
use super::qmp::Qmp;
use crate::VmmError;
use crate::device::{BlockDevice, Device, DeviceKind, NetworkDevice, PciAddress, PmemDevice, Tap};

/// How long the guest may take to release a device being removed.
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(20);

/// `bus` and `addr` of `device_add`.
fn placed(mut args: Value, addr: PciAddress) -> Value {
    args["bus"] = json!(bus_name(addr.bus));
    args["addr"] = json!(format!("0x{:x}", addr.slot));
    args
}

/// Arguments of `blockdev-add` for a disk: a raw image on a file, opened
/// like the command line's `-drive` (direct I/O, thread pool).
pub fn blockdev_add_args(disk: &BlockDevice) -> Value {
    json!({
        "node-name": disk.id,
        "driver": "raw",
        "read-only": disk.read_only,
        "file": {
            "driver": "file",
            "filename": disk.path.to_string_lossy(),
            "aio": "threads",
            "cache": { "direct": true },
        },
    })
}

/// Arguments of `device_add` for a disk at `addr`.
pub fn blk_device_args(disk: &BlockDevice, addr: PciAddress) -> Value {
    placed(
        json!({
            "driver": "virtio-blk-pci",
            "id": frontend_id(&disk.id),
            "drive": disk.id,
            "serial": disk.serial,
        }),
        addr,
    )
}

/// `getfd` name of a tap descriptor being handed to QEMU.
pub fn tap_fd_name(id: &str) -> String {
    format!("tap-{id}")
}

/// Arguments of `netdev_add` for a card's tap, like the command line's
/// `-netdev tap` (no vhost-net).
pub fn netdev_add_args(nic: &NetworkDevice) -> Value {
    match &nic.tap {
        Tap::Fd(_) => json!({
            "type": "tap",
            "id": nic.id,
            "fd": tap_fd_name(&nic.id),
            "vhost": false,
        }),
        Tap::Name(name) => json!({
            "type": "tap",
            "id": nic.id,
            "ifname": name,
            "script": "no",
            "downscript": "no",
            "vhost": false,
        }),
    }
}

/// Arguments of `device_add` for a card at `addr`.
pub fn net_device_args(nic: &NetworkDevice, addr: PciAddress) -> Value {
    let mut args = json!({
        "driver": "virtio-net-pci",
        "id": frontend_id(&nic.id),
        "netdev": nic.id,
        "mac": nic.mac.to_string(),
    });
    if let Some(mtu) = nic.mtu {
        args["host_mtu"] = json!(mtu);
    }
    placed(args, addr)
}

/// Arguments of `object-add` for a pmem device's memory backend, like the
/// command line's (shared mapping of the file).
pub fn pmem_object_args(pmem: &PmemDevice) -> Value {
    json!({
        "qom-type": "memory-backend-file",
        "id": pmem.id,
        "mem-path": pmem.path.to_string_lossy(),
        "size": pmem.size_bytes,
        "share": true,
        "readonly": pmem.read_only,
    })
}

/// Arguments of `device_add` for a pmem device at `addr`.
pub fn pmem_device_args(pmem: &PmemDevice, addr: PciAddress) -> Value {
    placed(
        json!({
            "driver": "virtio-pmem-pci",
            "id": frontend_id(&pmem.id),
            "memdev": pmem.id,
        }),
        addr,
    )
}

/// Adds `device` at `addr` (which the caller has reserved).
pub async fn add(qmp: &mut Qmp, device: &Device, addr: PciAddress) -> Result<(), VmmError> {
    let fail = |reason: String| VmmError::Hotplug {
        kind: device.kind(),
        id: device.id().to_string(),
        reason,
    };
    device.validate().map_err(|e| fail(e.to_string()))?;
    // The backend first; a backend without its device is deleted again.
    let (device_args, undo) = match device {
        Device::Block(disk) => {
            qmp.execute("blockdev-add", Some(blockdev_add_args(disk)))
                .await
                .map_err(|e| fail(e.to_string()))?;
            (
                blk_device_args(disk, addr),
                ("blockdev-del", json!({ "node-name": disk.id })),
            )
        }
        Device::Network(nic) => {
            if let Tap::Fd(fd) = &nic.tap {
                qmp.execute_with_fd(
                    "getfd",
                    Some(json!({ "fdname": tap_fd_name(&nic.id) })),
                    fd.as_fd(),
                )
                .await
                .map_err(|e| fail(e.to_string()))?;
            }
            if let Err(e) = qmp.execute("netdev_add", Some(netdev_add_args(nic))).await {
                if nic.tap.raw_fd().is_some() {
                    let _ = qmp
                        .execute("closefd", Some(json!({ "fdname": tap_fd_name(&nic.id) })))
                        .await;
                }
                return Err(fail(e.to_string()));
            }
            (
                net_device_args(nic, addr),
                ("netdev_del", json!({ "id": nic.id })),
            )
        }
        Device::Pmem(pmem) => {
            qmp.execute("object-add", Some(pmem_object_args(pmem)))
                .await
                .map_err(|e| fail(e.to_string()))?;
            (
                pmem_device_args(pmem, addr),
                ("object-del", json!({ "id": pmem.id })),
            )
        }
        other => {
            return Err(fail(format!(
                "a {} device cannot be added to a running VM",
                other.kind()
            )));
        }
    };
    if let Err(e) = qmp.execute("device_add", Some(device_args)).await {
        let _ = qmp.execute(undo.0, Some(undo.1)).await;
        return Err(fail(e.to_string()));
    }
    Ok(())
}

/// Removes device `id` of `kind`: `device_del`, waits for the guest to
/// release it (`DEVICE_DELETED`), deletes its backend.
pub async fn remove(
    qmp: &mut Qmp,
    id: &str,
    kind: DeviceKind,
    timeout: Duration,
) -> Result<(), VmmError> {
    let fail = |reason: String| VmmError::Unplug {
        id: id.to_string(),
        reason,
    };
    if !kind.is_hotpluggable() {
        return Err(fail(format!(
            "a {kind} device cannot be removed from a running VM"
        )));
    }
    let frontend = frontend_id(id);
    qmp.execute("device_del", Some(json!({ "id": frontend })))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let deleted = |e: &super::qmp::QmpEvent| {
        e.name == "DEVICE_DELETED" && e.data["device"].as_str() == Some(frontend.as_str())
    };
    // device_del only asks the guest; the device is gone at its event
    // (which may have arrived while device_del was answered).
    let mut seen = qmp.take_events().iter().any(deleted);
    let wait = async {
        while !seen {
            let event = qmp.next_event().await?;
            seen = deleted(&event);
        }
        Ok::<(), super::qmp::QmpError>(())
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(fail(e.to_string())),
        Err(_) => {
            return Err(fail(format!(
                "the guest did not release it within {timeout:?}"
            )));
        }
    }
    let (command, args) = match kind {
        DeviceKind::Block => ("blockdev-del", json!({ "node-name": id })),
        DeviceKind::Network => ("netdev_del", json!({ "id": id })),
        _ => ("object-del", json!({ "id": id })),
    };
    qmp.execute(command, Some(args))
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
#[path = "hotplug_tests.rs"]
mod tests;
