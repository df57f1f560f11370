//! What booting pod VMs of one local image needs, without a host daemon
//! (tests, benchmarks): host settings whose cache and run directories are
//! in a directory of their own, the image archive imported into that cache,
//! the guest's boot artifacts, and the image's layers as the VM's disks.

use std::path::Path;

use podvisor_guest::{GuestArtifacts, GuestOptions};
use podvisor_image::{LayerAttachments, LayerCache};
use podvisor_vmm::{AccelChoice, Device, MemoryBacking};

use crate::{NodeConfig, PodVmError, PodVmSpec, layer_disks};

/// Pod VMs of one image on this host.
pub struct ImageBoot {
    pub cfg: NodeConfig,
    pub guest: GuestArtifacts,
    /// The image's layers as block devices, bottom first.
    pub disks: Vec<Device>,
    /// Their serials, as the containers' mounts name them.
    pub serials: Vec<String>,
}

impl ImageBoot {
    /// Settings with `dir/cache` and `dir/run` (and the accelerator
    /// [`AccelChoice::resolve`] picks), the OCI or docker archive `archive`
    /// imported, the guest artifacts prepared with the default options.
    pub fn prepare(dir: &Path, archive: &Path) -> Result<ImageBoot, PodVmError> {
        let mut cfg = NodeConfig::with_defaults(AccelChoice::resolve(None).accel);
        cfg.cache_dir = dir.join("cache");
        cfg.run_dir = dir.join("run");
        let cache = LayerCache::open(&cfg.cache_dir)?;
        let image = podvisor_image::import(&cache, archive, None)?;
        let guest = podvisor_guest::prepare(&GuestOptions::new(&cfg.cache_dir))?;
        let mut layers = LayerAttachments::default();
        let serials = layers.add_image(&image);
        let disks = layer_disks(&layers)
            .into_iter()
            .map(Device::Block)
            .collect();
        Ok(ImageBoot {
            cfg,
            guest,
            disks,
            serials,
        })
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
