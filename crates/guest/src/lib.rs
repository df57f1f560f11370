//! Guest boot artifacts: what a pod VM boots.
//!
//! This crate owns the kernel and initramfs QEMU is given: it finds the guest
//! kernel ([`kernel`]), resolves the kernel modules a pod needs from the
//! kernel's `modules.dep` ([`modules`]), finds the agent binary ([`agent`]),
//! and builds the initramfs ([`initramfs`], written by the [`cpio`] newc
//! writer) with the agent as `/init`, the modules and the load list the agent
//! reads ([`podvisor_proto::MODULES_LOAD_LIST`]).
//!
//! [`prepare`] does all of it and caches the initramfs under a digest of
//! every input ([`cache`]), so it is rebuilt only when the kernel, the agent,
//! a module or the module list changes; [`GuestArtifacts::inputs_digest`]
//! tells a VM template built from older artifacts that it is stale.

pub mod agent;
pub mod cache;
pub mod cpio;
mod error;
pub mod initramfs;
pub mod kernel;
pub mod modules;

use std::path::PathBuf;

pub use agent::find_agent;
pub use error::GuestError;
pub use kernel::{Kernel, KernelLocations};

use initramfs::InitramfsContents;
use modules::ModuleIndex;

/// Modules every pod VM needs, by module name (as in modules.dep basenames,
/// '-' and '_' equivalent). The network card's (`failover`,
/// `net_failover`, `virtio_net`) are in every initramfs, NIC or not: loading
/// them cost about 10 ms of a 4.5 s boot under TCG (the agent's `modules`
/// step; a NIC's probe about as much again), which is not worth a second
/// initramfs and template variant for `--network none` pods.
pub const BASE_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "erofs",
    "overlay",
    "failover",
    "net_failover",
    "virtio_net",
];

/// Modules loaded at boot when the kernel has them as modules (one built
/// in, or a kernel without it, needs nothing): `virtio_balloon`, for free
/// page reporting (a VM with the vmm's `FreePageReporting` device gives
/// the memory its guest freed back to the host).
pub const BOOT_MODULES_IF_PRESENT: &[&str] = &["virtio_balloon"];

/// Modules of encrypted volumes (device-mapper, dm-crypt and AES-XTS from
/// the generic pieces), loaded by the agent with the first volume key
/// request ([`podvisor_proto::MODULES_VOLUMES_LIST`]). AES itself is built
/// into Debian's kernel; a module of these the kernel does not list in
/// `modules.dep` is taken as built in.
pub const VOLUME_MODULES: &[&str] = &["dm_mod", "dm_crypt", "xts", "ecb"];

/// The AES-NI driver and what it needs, loaded after [`VOLUME_MODULES`]
/// when the guest's CPU has the `aes` flag
/// ([`podvisor_proto::MODULES_VOLUMES_AESNI_LIST`]).
pub const VOLUME_AESNI_MODULES: &[&str] = &["cryptd", "crypto_simd", "aesni_intel"];

/// Modules of virtio-pmem devices (DAX layers: the device, libnvdimm and
/// the pmem block driver with its dependencies), loaded by the agent when
/// it first mounts a layer from one ([`podvisor_proto::MODULES_PMEM_LIST`]).
pub const PMEM_MODULES: &[&str] = &["virtio_pmem", "nd_pmem"];

/// The modules of `names` that `index` lists (others are taken as built
/// in), resolved with their dependencies, without those in `loaded`
/// already (the boot list).
pub fn resolve_lazy(
    index: &ModuleIndex,
    names: &[&str],
    loaded: &[modules::ResolvedModule],
) -> Result<Vec<modules::ResolvedModule>, GuestError> {
    let present: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| index.contains(n))
        .collect();
    Ok(index
        .resolve(&present)?
        .into_iter()
        .filter(|m| !loaded.iter().any(|l| l.name == m.name))
        .collect())
}

/// What to build a pod VM's boot artifacts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestOptions {
    /// A `vmlinuz` path; `None` = newest `/boot/vmlinuz-*-cloud-amd64`.
    pub kernel: Option<PathBuf>,
    /// The agent binary; `None` = [`find_agent()`].
    pub agent: Option<PathBuf>,
    /// Modules needed besides [`BASE_MODULES`], e.g. `virtio_net`,
    /// `virtio_pmem`, `nd_pmem`, `dm_crypt`.
    pub extra_modules: Vec<String>,
    /// Cache directory; initramfs images are cached in `<cache_dir>/guest/`.
    pub cache_dir: PathBuf,
}

impl GuestOptions {
    /// Options for the host's newest cloud kernel, the agent [`find_agent`]
    /// finds and the base modules only, caching in `cache_dir`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        GuestOptions {
            kernel: None,
            agent: None,
            extra_modules: Vec::new(),
            cache_dir: cache_dir.into(),
        }
    }
}

/// The files a pod VM boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestArtifacts {
    /// vmlinuz to pass to `-kernel`.
    pub kernel: PathBuf,
    /// cpio newc archive to pass to `-initrd`.
    pub initramfs: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// SHA-256 hex over every input (kernel image bytes, agent bytes, module
    /// files, module list, format version); a VM template recorded with
    /// another digest is stale.
    pub inputs_digest: String,
}

/// Finds the kernel and agent, resolves the modules and returns the
/// artifacts, building the initramfs only if no cached one has the same
/// inputs. Kernels and modules come from `/boot` and `/lib/modules`.
pub fn prepare(opts: &GuestOptions) -> Result<GuestArtifacts, GuestError> {
    prepare_with(opts, &KernelLocations::default())
}

/// [`prepare`], with kernels and their modules looked up in `locations`
/// (an explicit `opts.kernel` still takes its modules from
/// `locations.modules_root`).
pub fn prepare_with(
    opts: &GuestOptions,
    locations: &KernelLocations,
) -> Result<GuestArtifacts, GuestError> {
    let kernel = match &opts.kernel {
        Some(image) => Kernel::from_image(image, &locations.modules_root)?,
        None => Kernel::discover_in(locations)?,
    };
    let agent = match &opts.agent {
        Some(agent) => agent.clone(),
        None => find_agent()?,
    };
    let index = ModuleIndex::load(&kernel.modules_dir)?;
    let wanted: Vec<&str> = BASE_MODULES
        .iter()
        .copied()
        .chain(opts.extra_modules.iter().map(String::as_str))
        .chain(
            BOOT_MODULES_IF_PRESENT
                .iter()
                .copied()
                .filter(|m| index.contains(m)),
        )
        .collect();
    let resolved = index.resolve(&wanted)?;
    let volumes = resolve_lazy(&index, VOLUME_MODULES, &resolved)?;
    let aesni = resolve_lazy(&index, VOLUME_AESNI_MODULES, &resolved)?;
    let pmem = resolve_lazy(&index, PMEM_MODULES, &resolved)?;
    let contents = InitramfsContents::load_with_lazy(
        &kernel.release,
        &agent,
        &resolved,
        &[
            (podvisor_proto::MODULES_VOLUMES_LIST, volumes),
            (podvisor_proto::MODULES_VOLUMES_AESNI_LIST, aesni),
            (podvisor_proto::MODULES_PMEM_LIST, pmem),
        ],
    )?;
    // Never an agent the guest cannot execute as /init.
    agent::check_static(&agent, &contents.agent)?;
    let inputs_digest = cache::inputs_digest(&kernel, &contents)?;
    let initramfs = cache::initramfs_path(&opts.cache_dir, &inputs_digest);
    cache::store_initramfs(&initramfs, &contents)?;
    Ok(GuestArtifacts {
        kernel: kernel.image,
        initramfs,
        kernel_release: kernel.release,
        inputs_digest,
    })
}
