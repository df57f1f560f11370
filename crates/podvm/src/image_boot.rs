//! What booting pod VMs of one local image needs, without a host daemon
//! (tests, benchmarks): host settings whose cache and run directories are
//! in a directory of their own, the image archive imported into that cache,
//! the guest's boot artifacts, and the image's layers as the VM's disks.

use std::path::Path;

use podvisor_guest::{GuestArtifacts, GuestOptions};
use podvisor_image::{LayerAttachments, LayerCache};
use podvisor_proto::Mount;
use podvisor_vmm::{AccelChoice, Device, MemoryBacking};

use crate::{LayerBus, NodeConfig, PodVmError, PodVmSpec, layer_devices, layer_mounts};

/// Pod VMs of one image on this host.
pub struct ImageBoot {
    pub cfg: NodeConfig,
    pub guest: GuestArtifacts,
    /// The image's layers as devices on `bus`, bottom first.
    pub disks: Vec<Device>,
    /// Their serials, as the containers' mounts name them.
    pub serials: Vec<String>,
    /// How the layers are attached.
    pub bus: LayerBus,
    layers: LayerAttachments,
}

impl ImageBoot {
    /// Settings with `dir/cache` and `dir/run` (and the accelerator
    /// [`AccelChoice::resolve`] picks), the OCI or docker archive `archive`
    /// imported, the guest artifacts prepared with the default options;
    /// the layers as virtio-blk disks.
    pub fn prepare(dir: &Path, archive: &Path) -> Result<ImageBoot, PodVmError> {
        ImageBoot::prepare_on(dir, archive, LayerBus::Block)
    }

    /// [`ImageBoot::prepare`] with the layers on `bus`.
    pub fn prepare_on(dir: &Path, archive: &Path, bus: LayerBus) -> Result<ImageBoot, PodVmError> {
        let mut cfg = NodeConfig::with_defaults(AccelChoice::resolve(None).accel);
        cfg.cache_dir = dir.join("cache");
        cfg.run_dir = dir.join("run");
        let cache = LayerCache::open(&cfg.cache_dir)?;
        let image = podvisor_image::import(&cache, archive, None)?;
        let guest = podvisor_guest::prepare(&GuestOptions::new(&cfg.cache_dir))?;
        let mut layers = LayerAttachments::default();
        let serials = layers.add_image(&image);
        let disks = layer_devices(&layers, bus);
        Ok(ImageBoot {
            cfg,
            guest,
            disks,
            serials,
            bus,
            layers,
        })
    }

    /// The mounts of a container running the image: its layers, then the
    /// overlay root over them.
    pub fn mounts(&self) -> Vec<Mount> {
        layer_mounts(&self.layers, &self.serials, self.bus)
    }

    /// A pod VM `id` with the image's disks and then `extra` devices, one
    /// CPU, `memory_mib` of anonymous memory.
    pub fn spec(&self, id: &str, memory_mib: u64, extra: Vec<Device>) -> PodVmSpec {
        PodVmSpec {
            id: id.into(),
            cpus: 1,
            memory_mib,
            guest: self.guest.clone(),
            devices: self.disks.iter().cloned().chain(extra).collect(),
            pci: Default::default(),
            netns: None,
            memory: MemoryBacking::Anonymous,
            memory_merge: false,
            die_with_parent: true,
        }
    }
}
