//! The PCI slot allocator of a QEMU `pc` VM.
//!
//! The root bus has slots 0–31; 0 is the host bridge and 1 the PIIX3
//! functions, so devices get 2–31. When they do not fit, PCI bridges are
//! added from the top of the root bus down (bridge *n* in root slot
//! 32 − *n*, its devices in its slots 1–31), each giving 31 more slots at
//! the cost of one root slot. Bridges exist from the start: devices behind
//! a hot-plugged bridge could not be hot-plugged themselves.
//!
//! A VM restored from a saved state must have every device where the saved
//! VM had it, hot-plugged ones included: the allocator takes a
//! [`PciLayout`] to pin devices and places the others in the lowest free
//! slot, in the order given.

use std::collections::BTreeMap;

use crate::VmmError;
use crate::device::{DeviceKind, PciAddress, PciLayout};

/// First root-bus slot a device may take.
pub const FIRST_ROOT_SLOT: u8 = 2;
/// Highest slot of a bus.
pub const LAST_SLOT: u8 = 31;
/// First slot of a bridge a device may take.
pub const FIRST_BRIDGE_SLOT: u8 = 1;
/// Most bridges a VM gets (28 + 4 × 31 = 152 devices).
pub const MAX_BRIDGES: u8 = 4;

/// A device holding a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotUser {
    pub id: String,
    pub kind: DeviceKind,
}

/// Which slots of a VM's PCI buses are taken, and by what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciSlots {
    bridges: u8,
    used: BTreeMap<PciAddress, SlotUser>,
}

impl PciSlots {
    /// Empty buses behind `bridges` bridges.
    pub fn new(bridges: u8) -> Result<Self, VmmError> {
        if bridges > MAX_BRIDGES {
            return Err(VmmError::InvalidSpec(format!(
                "{bridges} PCI bridges asked for (at most {MAX_BRIDGES})"
            )));
        }
        Ok(Self {
            bridges,
            used: BTreeMap::new(),
        })
    }

    /// Places `devices` (id and kind, in order), pinning those `layout`
    /// names and putting the rest in the lowest free slots. Adds bridges
    /// beyond `layout.bridges` while the devices do not fit (never on a
    /// layout that pins devices: a restored VM has the saved one's buses).
    /// Returns the allocator and each device's address, in order.
    pub fn place_all(
        devices: &[(String, DeviceKind)],
        layout: &PciLayout,
    ) -> Result<(Self, Vec<PciAddress>), VmmError> {
        for id in layout.slots.keys() {
            if !devices.iter().any(|(d, _)| d == id) {
                return Err(VmmError::InvalidSpec(format!(
                    "the PCI layout places device {id:?}, which the VM does not have"
                )));
            }
        }
        let most = if layout.slots.is_empty() {
            MAX_BRIDGES.max(layout.bridges)
        } else {
            layout.bridges
        };
        let mut bridges = layout.bridges;
        loop {
            match Self::try_place_all(devices, layout, bridges) {
                Err(VmmError::NoPciSlot(_)) if bridges < most => bridges += 1,
                other => return other,
            }
        }
    }

    fn try_place_all(
        devices: &[(String, DeviceKind)],
        layout: &PciLayout,
        bridges: u8,
    ) -> Result<(Self, Vec<PciAddress>), VmmError> {
        let mut slots = Self::new(bridges)?;
        for (id, kind) in devices {
            if let Some(addr) = layout.slots.get(id) {
                slots.pin(id, *kind, *addr)?;
            }
        }
        let mut out = Vec::with_capacity(devices.len());
        for (id, kind) in devices {
            let addr = match layout.slots.get(id) {
                Some(addr) => *addr,
                None => slots.place(id, *kind)?,
            };
            out.push(addr);
        }
        Ok((slots, out))
    }

    /// Number of bridges.
    pub fn bridges(&self) -> u8 {
        self.bridges
    }

    /// Root-bus address of bridge `n` (1-based).
    pub fn bridge_address(n: u8) -> PciAddress {
        PciAddress {
            bus: 0,
            slot: LAST_SLOT + 1 - n,
        }
    }

    /// Whether a device may sit at `addr` given the bridges.
    pub fn is_device_slot(&self, addr: PciAddress) -> bool {
        if addr.bus == 0 {
            (FIRST_ROOT_SLOT..=LAST_SLOT - self.bridges).contains(&addr.slot)
        } else {
            addr.bus <= self.bridges && (FIRST_BRIDGE_SLOT..=LAST_SLOT).contains(&addr.slot)
        }
    }

    /// Puts device `id` at `addr`.
    pub fn pin(&mut self, id: &str, kind: DeviceKind, addr: PciAddress) -> Result<(), VmmError> {
        if !self.is_device_slot(addr) {
            return Err(VmmError::InvalidSpec(format!(
                "device {id:?} cannot sit at {addr} (with {} bridges)",
                self.bridges
            )));
        }
        self.check_new_id(id)?;
        if let Some(other) = self.used.get(&addr) {
            return Err(VmmError::InvalidSpec(format!(
                "devices {:?} and {id:?} both at {addr}",
                other.id
            )));
        }
        self.used.insert(
            addr,
            SlotUser {
                id: id.to_string(),
                kind,
            },
        );
        Ok(())
    }

    /// Puts device `id` in the lowest free slot, root bus first; a device
    /// that is never hot-plugged or removed and needs no particular slot
    /// (free page reporting) in the highest free root slot instead. The
    /// low root slots are the ones a guest without ACPI interrupt routing
    /// (a 1-vCPU pod VM boots with `acpi=noirq`) can take hot-plugged
    /// devices in: the firmware's interrupt routing table covers slots up
    /// to 6, and a device there at boot would take one from hot-plugging.
    pub fn place(&mut self, id: &str, kind: DeviceKind) -> Result<PciAddress, VmmError> {
        self.check_new_id(id)?;
        let root =
            (FIRST_ROOT_SLOT..=LAST_SLOT - self.bridges).map(|slot| PciAddress { bus: 0, slot });
        let behind = (1..=self.bridges).flat_map(|bus| {
            (FIRST_BRIDGE_SLOT..=LAST_SLOT).map(move |slot| PciAddress { bus, slot })
        });
        let candidates: Box<dyn Iterator<Item = PciAddress>> =
            if kind == DeviceKind::FreePageReporting {
                Box::new(root.rev())
            } else {
                Box::new(root.chain(behind))
            };
        let mut candidates = candidates;
        let addr = candidates
            .find(|a| !self.used.contains_key(a))
            .ok_or_else(|| {
                VmmError::NoPciSlot(format!(
                    "no free PCI slot for device {id:?}: {} devices on the root bus and {} bridges",
                    self.used.len(),
                    self.bridges
                ))
            })?;
        self.used.insert(
            addr,
            SlotUser {
                id: id.to_string(),
                kind,
            },
        );
        Ok(addr)
    }

    /// Frees the slot of device `id`; returns where it was and its kind.
    pub fn release(&mut self, id: &str) -> Option<(PciAddress, DeviceKind)> {
        let addr = self.address_of(id)?;
        self.used.remove(&addr).map(|u| (addr, u.kind))
    }

    /// The address of device `id`.
    pub fn address_of(&self, id: &str) -> Option<PciAddress> {
        self.used.iter().find(|(_, u)| u.id == id).map(|(a, _)| *a)
    }

    /// The device at `addr`.
    pub fn user(&self, addr: PciAddress) -> Option<&SlotUser> {
        self.used.get(&addr)
    }

    /// What a restored VM needs to get the same addresses.
    pub fn layout(&self) -> PciLayout {
        PciLayout {
            bridges: self.bridges,
            slots: self.used.iter().map(|(a, u)| (u.id.clone(), *a)).collect(),
        }
    }

    fn check_new_id(&self, id: &str) -> Result<(), VmmError> {
        if self.address_of(id).is_some() {
            return Err(VmmError::InvalidSpec(format!(
                "two devices have the id {id:?}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
