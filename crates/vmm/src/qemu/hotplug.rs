//! Hot-plugging disks into a running VM over QMP: `blockdev-add` for the
//! backing file, then `device_add` of a virtio-blk PCI device in the slot
//! the disk would have had on the command line ([`cmdline::disk_slot`]), so
//! a state saved afterwards restores with the disk given at start.

use serde_json::{Value, json};

use super::cmdline::{self, disk_slot};
use super::qmp::Qmp;
use crate::{DiskSpec, VmmError};

/// Block node name of disk `index` (the command line's drive id).
pub fn node_name(index: usize) -> String {
    format!("disk{index}")
}

/// Arguments of `blockdev-add` for disk `index`: a raw image on a file,
/// opened like the command line's `-drive` (direct I/O, thread pool).
pub fn blockdev_add_args(index: usize, disk: &DiskSpec) -> Value {
    json!({
        "node-name": node_name(index),
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

/// Arguments of `device_add` for disk `index` in PCI slot `slot`.
pub fn device_add_args(index: usize, disk: &DiskSpec, slot: u8) -> Value {
    json!({
        "driver": "virtio-blk-pci",
        "id": format!("dev-{}", node_name(index)),
        "drive": node_name(index),
        "serial": disk.serial,
        "bus": "pci.0",
        "addr": format!("0x{slot:x}"),
    })
}

/// Attaches `disk` as disk `index`. A device that cannot be added leaves
/// no block node behind.
pub async fn hotplug_disk(qmp: &mut Qmp, index: usize, disk: &DiskSpec) -> Result<(), VmmError> {
    let fail = |reason: String| VmmError::Hotplug {
        index,
        path: disk.path.display().to_string(),
        reason,
    };
    cmdline::check_serial(&disk.serial).map_err(|e| fail(e.to_string()))?;
    let slot =
        disk_slot(index).ok_or_else(|| fail("no free PCI slot for that many disks".into()))?;
    qmp.execute("blockdev-add", Some(blockdev_add_args(index, disk)))
        .await
        .map_err(|e| fail(e.to_string()))?;
    if let Err(e) = qmp
        .execute("device_add", Some(device_add_args(index, disk, slot)))
        .await
    {
        let _ = qmp
            .execute(
                "blockdev-del",
                Some(json!({ "node-name": node_name(index) })),
            )
            .await;
        return Err(fail(e.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::fake_qemu::FakeQemu;

    fn disk() -> DiskSpec {
        DiskSpec {
            path: "/cache/layers/ab/disk.erofs".into(),
            read_only: true,
            serial: "pvl1".into(),
        }
    }

    #[test]
    fn payloads_match_the_command_line_disk() {
        assert_eq!(
            blockdev_add_args(1, &disk()),
            json!({
                "node-name": "disk1",
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
        // Slot 5 is where disk 1 sits on the command line.
        assert_eq!(
            device_add_args(1, &disk(), disk_slot(1).unwrap()),
            json!({
                "driver": "virtio-blk-pci",
                "id": "dev-disk1",
                "drive": "disk1",
                "serial": "pvl1",
                "bus": "pci.0",
                "addr": "0x5",
            })
        );
    }

    #[tokio::test]
    async fn a_rejected_device_removes_its_block_node() {
        let fake = FakeQemu::start(Box::new(|req, _| {
            Some(vec![match req["execute"].as_str().unwrap() {
                "device_add" => json!({ "error": {
                    "class": "GenericError", "desc": "PCI: slot 5 function 0 not available" } }),
                _ => json!({ "return": {} }),
            }])
        }));
        let mut qmp = Qmp::connect(&fake.socket).await.unwrap();
        let err = hotplug_disk(&mut qmp, 1, &disk()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "hot-plugging disk 1 (/cache/layers/ab/disk.erofs): QMP command device_add failed: \
             GenericError: PCI: slot 5 function 0 not available"
        );
        assert_eq!(
            fake.commands(),
            [
                "qmp_capabilities",
                "blockdev-add",
                "device_add",
                "blockdev-del"
            ]
        );

        let long = DiskSpec {
            serial: "x".repeat(21),
            ..disk()
        };
        let err = hotplug_disk(&mut qmp, 0, &long).await.unwrap_err();
        assert!(
            err.to_string().contains("longer than the 20 bytes"),
            "{err}"
        );
        let err = hotplug_disk(&mut qmp, 28, &disk()).await.unwrap_err();
        assert!(err.to_string().contains("no free PCI slot"), "{err}");
    }
}
