//! Adopting a QEMU process another process launched (a host daemon before
//! it restarted): check that the recorded pid is still that QEMU, hold it
//! through a pidfd, and reconnect its QMP socket.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::pci::{FIRST_ROOT_SLOT, PciSlots};
use super::qmp::Qmp;
use super::vm::{QemuProcess, QemuVm};
use crate::cgroup::{CgroupRoot, VmCgroup};
use crate::device::{DeviceKind, PciAddress};
use crate::process::{ProcessHandle, VmmProcess, cmdline};
use crate::{VmPaths, VmmError};

/// How long to retry connecting QMP (QEMU accepts a new client once it has
/// noticed that the previous one, a dead process, is gone).
const QMP_RECONNECT: Duration = Duration::from_secs(10);

fn not_adoptable(record: &VmmProcess, why: String) -> VmmError {
    VmmError::NotAdoptable {
        pid: record.pid,
        reason: why,
    }
}

/// Adopts the QEMU process `record` describes; `cgroups`: where its
/// control group would be, to remove it once the process exits.
pub async fn adopt(record: &VmmProcess, cgroups: Option<&CgroupRoot>) -> Result<QemuVm, VmmError> {
    let paths = VmPaths::in_dir(&record.run_dir);
    record
        .check_alive()
        .map_err(|why| not_adoptable(record, why))?;
    // The pid must belong to the QEMU that serves this run directory.
    let control = paths.control_socket.display().to_string();
    let args = cmdline(record.pid).map_err(|e| not_adoptable(record, e.to_string()))?;
    if !args.contains(&control) {
        return Err(not_adoptable(
            record,
            format!("it is not the VMM whose control socket is {control}"),
        ));
    }
    let process =
        ProcessHandle::open(record.pid).map_err(|e| not_adoptable(record, e.to_string()))?;
    // The pidfd now pins the process; check again that it is still the one
    // recorded (not a new process that got the pid in between).
    record
        .check_alive()
        .map_err(|why| not_adoptable(record, why))?;
    let started = Instant::now();
    let qmp = loop {
        if process.has_exited() {
            return Err(not_adoptable(record, "it exited".into()));
        }
        // QEMU serves one QMP client at a time: while another holds it, the
        // greeting never comes.
        match tokio::time::timeout(QMP_RECONNECT, Qmp::connect(&paths.control_socket)).await {
            Ok(Ok(q)) => break q,
            Ok(Err(e)) if started.elapsed() > QMP_RECONNECT => return Err(e.into()),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => {
                return Err(not_adoptable(
                    record,
                    format!("its QMP socket gave no greeting within {QMP_RECONNECT:?}"),
                ));
            }
        }
    };
    let mut qmp = qmp;
    let pci = qmp.execute("query-pci", None).await?;
    // Only hot-plugging needs to know the slots: a VM whose devices are
    // not understood is still adopted (a device_add would then fail).
    let slots = slots_in_use(&pci).unwrap_or_else(|why| {
        tracing::warn!(
            pid = record.pid,
            "the PCI slots of the adopted VM are unknown: {why}"
        );
        PciSlots::new(0).expect("no bridges is valid")
    });
    tracing::debug!(pid = record.pid, "adopted qemu");
    Ok(QemuVm::new(
        QemuProcess::Adopted(process),
        record.pid,
        paths,
        qmp,
        // RAM in a file is the machine's memory backend; a pmem device
        // maps a file too.
        args.contains("memory-backend=") || args.contains("virtio-pmem-pci"),
        slots,
    )
    .with_cgroup(cgroups.and_then(|root| VmCgroup::of_process(root, record.pid))))
}

/// The slot allocator of a running VM, from its `query-pci` answer:
/// podvisor's bridges and every device with an id, of the kind its PCI ids
/// say.
pub fn slots_in_use(query_pci: &Value) -> Result<PciSlots, String> {
    let root = query_pci
        .as_array()
        .and_then(|buses| buses.iter().find(|b| b["bus"] == 0))
        .and_then(|b| b["devices"].as_array())
        .ok_or("query-pci has no root bus")?;
    let bridges: Vec<&Value> = root
        .iter()
        .filter(|d| {
            d["qdev_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("pci."))
        })
        .collect();
    let mut slots = PciSlots::new(bridges.len() as u8).map_err(|e| e.to_string())?;
    let mut place = |devices: &Value, bus: u8| -> Result<(), String> {
        for d in devices.as_array().into_iter().flatten() {
            let slot = d["slot"].as_u64().unwrap_or(0) as u8;
            let frontend = d["qdev_id"].as_str().unwrap_or_default();
            if bus == 0 && (slot < FIRST_ROOT_SLOT || frontend.starts_with("pci.")) {
                continue;
            }
            let (id, kind) = match (frontend, kind_of(d)) {
                ("vserial0", _) => ("agent".to_string(), DeviceKind::AgentChannel),
                ("", Some(DeviceKind::Rng)) => ("rng".to_string(), DeviceKind::Rng),
                (f, Some(kind)) if !f.is_empty() => {
                    (f.strip_prefix("dev-").unwrap_or(f).to_string(), kind)
                }
                (f, _) => {
                    return Err(format!("unknown PCI device {f:?} at bus {bus} slot {slot}"));
                }
            };
            slots
                .pin(&id, kind, PciAddress { bus, slot })
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    place(&Value::Array(root.clone()), 0)?;
    for b in bridges {
        let n = b["qdev_id"]
            .as_str()
            .and_then(|id| id[4..].parse::<u8>().ok());
        let n = n.ok_or_else(|| format!("unexpected bridge {}", b["qdev_id"]))?;
        place(&b["pci_bridge"]["devices"], n)?;
    }
    Ok(slots)
}

/// The kind of a virtio PCI device, from its vendor and device id
/// (transitional ids 0x1000-0x103f, modern ones 0x1040 + virtio type).
fn kind_of(device: &Value) -> Option<DeviceKind> {
    if device["id"]["vendor"] != 0x1af4 {
        return None;
    }
    match device["id"]["device"].as_u64()? {
        0x1000 | 0x1041 => Some(DeviceKind::Network),
        0x1001 | 0x1042 => Some(DeviceKind::Block),
        0x1002 | 0x1045 => Some(DeviceKind::FreePageReporting),
        0x1003 | 0x1043 => Some(DeviceKind::AgentChannel),
        0x1005 | 0x1044 => Some(DeviceKind::Rng),
        0x105b => Some(DeviceKind::Pmem),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn dev(slot: u8, qdev_id: &str, vendor: u64, device: u64) -> Value {
        json!({ "bus": 0, "slot": slot, "function": 0, "qdev_id": qdev_id,
                "id": { "vendor": vendor, "device": device } })
    }

    #[test]
    fn the_slots_of_an_adopted_vm_come_from_query_pci() {
        // What QEMU answers for a pod VM with a bridge (PIIX3 functions and
        // the host bridge have no ids; the RNG of layout 1 had none).
        let answer = json!([{ "bus": 0, "devices": [
            dev(0, "", 0x8086, 0x1237),
            dev(1, "", 0x8086, 0x7000),
            dev(2, "vserial0", 0x1af4, 0x1003),
            dev(3, "", 0x1af4, 0x1005),
            dev(4, "dev-layer0", 0x1af4, 0x1001),
            dev(5, "dev-eth0", 0x1af4, 0x1000),
            dev(6, "balloon", 0x1af4, 0x1002),
            { "bus": 0, "slot": 31, "qdev_id": "pci.1", "id": { "vendor": 0x1b36, "device": 1 },
              "pci_bridge": { "bus": { "number": 1 }, "devices": [
                  dev(1, "dev-layer27", 0x1af4, 0x1001),
                  dev(2, "dev-dax0", 0x1af4, 0x105b),
              ] } },
        ] }]);
        let slots = slots_in_use(&answer).unwrap();
        assert_eq!(slots.bridges(), 1);
        let at = |bus, slot| PciAddress { bus, slot };
        let layout = slots.layout();
        let expect: Vec<(&str, PciAddress)> = vec![
            ("agent", at(0, 2)),
            ("balloon", at(0, 6)),
            ("dax0", at(1, 2)),
            ("eth0", at(0, 5)),
            ("layer0", at(0, 4)),
            ("layer27", at(1, 1)),
            ("rng", at(0, 3)),
        ];
        let got: Vec<(&str, PciAddress)> =
            layout.slots.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(got, expect);
        assert_eq!(slots.user(at(0, 5)).unwrap().kind, DeviceKind::Network);
        assert_eq!(slots.user(at(1, 2)).unwrap().kind, DeviceKind::Pmem);
        assert_eq!(
            slots.user(at(0, 6)).unwrap().kind,
            DeviceKind::FreePageReporting
        );

        let unknown = json!([{ "bus": 0, "devices": [dev(6, "", 0x8086, 0x100e)] }]);
        assert!(
            slots_in_use(&unknown)
                .unwrap_err()
                .contains("unknown PCI device")
        );
    }
}
