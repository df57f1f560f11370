//! The slot allocator: many devices, bridges, a restored VM's layout,
//! removal and re-adding.

use super::*;

fn disks(n: usize) -> Vec<(String, DeviceKind)> {
    (0..n)
        .map(|i| (format!("layer{i}"), DeviceKind::Block))
        .collect()
}

fn pod(n_disks: usize) -> Vec<(String, DeviceKind)> {
    let mut d = vec![
        ("agent".to_string(), DeviceKind::AgentChannel),
        ("rng".to_string(), DeviceKind::Rng),
    ];
    d.extend(disks(n_disks));
    d
}

fn at(bus: u8, slot: u8) -> PciAddress {
    PciAddress { bus, slot }
}

#[test]
fn a_pod_gets_the_usual_addresses_on_the_root_bus() {
    let (slots, addrs) = PciSlots::place_all(&pod(3), &PciLayout::default()).unwrap();
    assert_eq!(slots.bridges(), 0);
    assert_eq!(addrs, [at(0, 2), at(0, 3), at(0, 4), at(0, 5), at(0, 6)]);
    // 30 root slots: agent, rng and 28 disks fill it without a bridge.
    let (slots, addrs) = PciSlots::place_all(&pod(28), &PciLayout::default()).unwrap();
    assert_eq!(slots.bridges(), 0);
    assert_eq!(addrs.last(), Some(&at(0, 31)));
}

#[test]
fn devices_beyond_the_root_bus_go_behind_bridges() {
    let (slots, addrs) = PciSlots::place_all(&pod(29), &PciLayout::default()).unwrap();
    // The bridge takes root slot 31; the last two disks go behind it.
    assert_eq!(slots.bridges(), 1);
    assert_eq!(PciSlots::bridge_address(1), at(0, 31));
    assert_eq!(&addrs[28..], [at(0, 30), at(1, 1), at(1, 2)]);

    let (slots, addrs) = PciSlots::place_all(&pod(100), &PciLayout::default()).unwrap();
    assert_eq!(slots.bridges(), 3);
    assert_eq!(addrs.last(), Some(&at(3, 13)));
    let mut unique = addrs.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), addrs.len(), "an address given twice");
    assert!(addrs.iter().all(|a| slots.is_device_slot(*a)));

    let err = PciSlots::place_all(&pod(200), &PciLayout::default()).unwrap_err();
    assert!(err.to_string().contains("no free PCI slot"), "{err}");
}

#[test]
fn hot_plugged_devices_fill_the_bridges_a_vm_was_started_with() {
    let layout = PciLayout {
        bridges: 1,
        slots: Default::default(),
    };
    let (mut slots, _) = PciSlots::place_all(&pod(0), &layout).unwrap();
    for i in 0..28 {
        slots
            .place(&format!("layer{i}"), DeviceKind::Block)
            .unwrap();
    }
    assert_eq!(slots.address_of("layer27"), Some(at(1, 1)));
    for i in 28..58 {
        slots
            .place(&format!("layer{i}"), DeviceKind::Block)
            .unwrap();
    }
    assert_eq!(slots.address_of("layer57"), Some(at(1, 31)));
    let err = slots.place("layer58", DeviceKind::Block).unwrap_err();
    assert!(matches!(err, VmmError::NoPciSlot(_)), "{err}");
    let err = slots.place("layer1", DeviceKind::Block).unwrap_err();
    assert!(err.to_string().contains("two devices"), "{err}");
}

#[test]
fn a_restored_vm_gets_the_saved_vms_slots_including_hot_plugged_and_readded_ones() {
    // The VM being saved: booted with two disks, one more hot-plugged, one
    // removed, a NIC added into the freed slot, the removed disk re-added.
    let (mut saved, _) = PciSlots::place_all(&pod(2), &PciLayout::default()).unwrap();
    saved.place("layer2", DeviceKind::Block).unwrap();
    assert_eq!(saved.release("layer0"), Some((at(0, 4), DeviceKind::Block)));
    assert_eq!(saved.place("eth0", DeviceKind::Network).unwrap(), at(0, 4));
    assert_eq!(saved.place("layer0", DeviceKind::Block).unwrap(), at(0, 7));
    let layout = saved.layout();

    // The restored VM lists its devices in another order: every one still
    // gets its saved address.
    let devices = vec![
        ("layer0".to_string(), DeviceKind::Block),
        ("rng".to_string(), DeviceKind::Rng),
        ("eth0".to_string(), DeviceKind::Network),
        ("layer2".to_string(), DeviceKind::Block),
        ("agent".to_string(), DeviceKind::AgentChannel),
        ("layer1".to_string(), DeviceKind::Block),
    ];
    let (restored, addrs) = PciSlots::place_all(&devices, &layout).unwrap();
    assert_eq!(
        addrs,
        [at(0, 7), at(0, 3), at(0, 4), at(0, 6), at(0, 2), at(0, 5)]
    );
    assert_eq!(restored.layout(), layout);

    // The layout survives a trip through the template's metadata.
    let json = serde_json::to_string(&layout).unwrap();
    assert_eq!(serde_json::from_str::<PciLayout>(&json).unwrap(), layout);
}

#[test]
fn a_layout_that_does_not_fit_the_vm_is_refused() {
    let (saved, _) = PciSlots::place_all(&pod(1), &PciLayout::default()).unwrap();
    let layout = saved.layout();
    // A device the layout places is missing from the VM.
    let err = PciSlots::place_all(&pod(0), &layout).unwrap_err();
    assert!(err.to_string().contains("layer0"), "{err}");
    // Two devices pinned to one slot.
    let mut clash = layout.clone();
    clash.slots.insert("layer0".into(), at(0, 2));
    let err = PciSlots::place_all(&pod(1), &clash).unwrap_err();
    assert!(err.to_string().contains("both at bus 0 slot 0x02"), "{err}");
    // A slot a bridge holds, or a bus that does not exist.
    let mut bad = layout.clone();
    bad.slots.insert("layer0".into(), at(1, 1));
    assert!(PciSlots::place_all(&pod(1), &bad).is_err());
    // A pinned layout never grows bridges: the restored VM would differ.
    let err = PciSlots::place_all(&pod(40), &layout).unwrap_err();
    assert!(matches!(err, VmmError::NoPciSlot(_)), "{err}");
}
