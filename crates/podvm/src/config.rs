//! Host configuration: where caches and runtime files live, how VMs start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use podvisor_image::pull::PullOptions;
use podvisor_image::{Catalog, ImageError, LayerCache, Platform, RegistryOptions};
use podvisor_vmm::{Accel, Hypervisor};

/// Settings of this host, shared by every pod it runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The image cache (layer disks, guest artifacts).
    pub cache_dir: PathBuf,
    /// Runtime files of running pods (sockets, console logs) and the
    /// metadata and saved states of VM templates.
    pub run_dir: PathBuf,
    /// RAM files of VM templates; tmpfs, so clones share page-cache pages.
    pub template_ram_dir: PathBuf,
    /// The hypervisor backend, built once.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// Accelerator for pod VMs.
    pub accel: Accel,
    /// Guest kernel; `None` picks the newest cloud kernel in /boot.
    pub kernel: Option<PathBuf>,
    /// Guest agent binary; `None` searches the usual places.
    pub agent: Option<PathBuf>,
    /// How long a VM may take from start to a ready agent.
    pub boot_timeout: Duration,
    /// Grace period between SIGTERM and SIGKILL when stopping containers.
    pub stop_grace: Duration,
    /// Extra guest kernel arguments, appended to podvisor's own.
    pub extra_kernel_args: Vec<String>,
    /// The image catalog's store URL; `None`: SQLite in the cache directory.
    pub catalog: Option<String>,
    /// How to reach registries (insecure ones, credentials file).
    pub registry: RegistryOptions,
    /// The platform pulled from multi-platform images.
    pub platform: Platform,
    /// Attach image layers as virtio-pmem devices mounted with DAX (pods
    /// share the host's page cache of them) unless a pod asks for
    /// isolation; `false` (`--no-dax`): always as virtio-blk disks.
    pub dax_layers: bool,
    /// Give pod VMs booted with anonymous RAM a free page reporting device
    /// (virtio-balloon), so the memory their guests free returns to the
    /// host; `false` (`--no-free-page-reporting`): guest RAM once touched
    /// stays the VM's. Templates and their clones never have it.
    pub free_page_reporting: bool,
}

/// Default cache directory.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/podvisor/cache";
/// Default runtime directory.
pub const DEFAULT_RUN_DIR: &str = "/run/podvisor";
/// Default directory of template RAM files.
pub const DEFAULT_TEMPLATE_RAM_DIR: &str = "/dev/shm/podvisor/templates";

impl NodeConfig {
    /// Defaults for `accel`, with directories from `PODVISOR_CACHE_DIR`,
    /// `PODVISOR_RUN_DIR` and `PODVISOR_TEMPLATE_RAM_DIR` when set.
    pub fn with_defaults(accel: Accel) -> Self {
        let env_dir = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Self {
            cache_dir: env_dir("PODVISOR_CACHE_DIR", DEFAULT_CACHE_DIR),
            run_dir: env_dir("PODVISOR_RUN_DIR", DEFAULT_RUN_DIR),
            template_ram_dir: env_dir("PODVISOR_TEMPLATE_RAM_DIR", DEFAULT_TEMPLATE_RAM_DIR),
            hypervisor: Arc::new(podvisor_vmm::qemu::Qemu::from_env()),
            accel,
            kernel: None,
            agent: None,
            // Emulated boots take seconds and slow down under load; KVM
            // boots take well under one.
            boot_timeout: match accel {
                Accel::Kvm => Duration::from_secs(30),
                Accel::Tcg => Duration::from_secs(120),
            },
            stop_grace: Duration::from_secs(10),
            extra_kernel_args: vec![],
            catalog: None,
            registry: RegistryOptions::default(),
            platform: Platform::default(),
            dax_layers: true,
            free_page_reporting: true,
        }
    }

    /// How a pod's layers are attached on this host: virtio-pmem with DAX
    /// unless the pod asks for isolation or DAX is off here.
    pub fn layer_bus(&self, isolated: bool) -> crate::LayerBus {
        crate::LayerBus::for_pod(self.dax_layers, isolated)
    }

    /// The image catalog's store URL.
    pub fn catalog_url(&self) -> String {
        self.catalog
            .clone()
            .unwrap_or_else(|| Catalog::default_url(&self.cache_dir))
    }

    /// How this host pulls images.
    pub fn pull_options(&self) -> PullOptions {
        PullOptions {
            registry: self.registry.clone(),
            platform: self.platform.clone(),
        }
    }

    /// The layer cache and the image catalog this host gets images through
    /// ([`podvisor_image::acquire()`]). Holds taken through the catalog on
    /// its lease last until the catalog is closed or the process dies.
    pub async fn open_images(&self) -> Result<(LayerCache, Catalog), ImageError> {
        let cache = LayerCache::open(&self.cache_dir)?;
        let catalog = Catalog::open(&self.catalog_url()).await?;
        Ok((cache, catalog))
    }
}
