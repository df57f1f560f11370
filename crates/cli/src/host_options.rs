//! The host options of the commands that run pod VMs or manage VM
//! templates: where pods' runtime files live and how VMs start. Each
//! subcommand takes only the groups it uses (`get` takes none), and only a
//! command that is about to boot a VM says that it falls back to TCG.

use std::path::PathBuf;

use podvisor_podvm::NodeConfig;
use podvisor_vmm::{Accel, AccelChoice};

use crate::config::{CacheArgs, ConfigFile, RegistryArgs, Settings};

/// The static guest agent built with this podvisor (see build.rs); empty
/// when that build was skipped.
static EMBEDDED_AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/podvisor-agent"));
/// Its length and hash, naming the file it is written to.
const EMBEDDED_AGENT_ID: &str = env!("PODVISOR_EMBEDDED_AGENT_ID");

/// `--run-dir` and `--template-ram-dir`: the runtime files of running pods
/// and of VM templates.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Host options")]
pub struct RuntimeDirArgs {
    /// Directory for the runtime files of running pods.
    #[arg(
        long,
        global = true,
        env = "PODVISOR_RUN_DIR",
        default_value = "/run/podvisor"
    )]
    pub run_dir: PathBuf,
    /// Directory of VM template RAM files (best on tmpfs).
    #[arg(
        long,
        global = true,
        env = "PODVISOR_TEMPLATE_RAM_DIR",
        default_value = "/dev/shm/podvisor/templates"
    )]
    pub template_ram_dir: PathBuf,
}

/// How pod VMs start: accelerator, guest kernel and agent, boot timeout.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "VM options")]
pub struct VmArgs {
    /// Accelerator: kvm or tcg (default: kvm if it really works here, else tcg).
    #[arg(long, env = "PODVISOR_ACCEL")]
    pub accel: Option<Accel>,
    /// Guest kernel image (default: newest /boot/vmlinuz-*-cloud-amd64).
    #[arg(long, env = "PODVISOR_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// Guest agent binary, statically linked (default: the one built into
    /// podvisor, else next to podvisor, else /usr/local/lib/podvisor).
    #[arg(long, env = "PODVISOR_AGENT")]
    pub agent: Option<PathBuf>,
    /// Seconds a pod VM may take to boot to a ready agent (default: 30 with
    /// KVM, 120 under emulation).
    #[arg(long, value_name = "SECONDS")]
    pub boot_timeout: Option<u64>,
    /// Extra guest kernel argument (repeatable), for debugging guests.
    #[arg(long = "kernel-arg", value_name = "ARG")]
    pub kernel_args: Vec<String>,
}

/// Every host option of a command that boots pod VMs (`run`, `host`, `up`).
#[derive(clap::Args, Debug, Clone)]
pub struct PodVmArgs {
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub dirs: RuntimeDirArgs,
    #[command(flatten)]
    pub vm: VmArgs,
    /// Attach image layers as virtio-blk disks only (each pod VM caches
    /// what it reads), never as shared virtio-pmem mappings mounted with
    /// DAX (pods reading a layer share the host's page cache of it).
    #[arg(long, help_heading = "VM options")]
    pub no_dax: bool,
    /// Give pod VMs no free page reporting device: memory a guest freed
    /// stays with its VM instead of returning to the host.
    #[arg(long, help_heading = "VM options")]
    pub no_free_page_reporting: bool,
}

impl RuntimeDirArgs {
    /// A node configuration for `settings` and these directories, with
    /// `accel` and default VM options.
    pub fn node_config(&self, settings: Settings, accel: Accel) -> NodeConfig {
        let mut cfg = NodeConfig::with_defaults(accel);
        cfg.cache_dir = settings.cache_dir;
        cfg.catalog = Some(settings.catalog);
        cfg.registry = settings.registry;
        cfg.run_dir = self.run_dir.clone();
        cfg.template_ram_dir = self.template_ram_dir.clone();
        cfg
    }

    /// The node configuration of a command that boots nothing (`template
    /// ls`, `rm`, `prune`): the accelerator is chosen silently.
    pub fn quiet_node_config(&self, cache: &CacheArgs) -> anyhow::Result<NodeConfig> {
        let settings = Settings::load(cache, &RegistryArgs::default())?;
        Ok(self.node_config(settings, AccelChoice::resolve(None).accel))
    }
}

impl VmArgs {
    /// The node configuration of a command that boots VMs. Tells the user
    /// once when podvisor falls back to software emulation. The agent is
    /// the one named, else the one built into podvisor (written to the
    /// cache directory), else whatever `podvisor_guest::find_agent` finds.
    pub fn node_config(
        &self,
        settings: Settings,
        dirs: &RuntimeDirArgs,
    ) -> anyhow::Result<NodeConfig> {
        let choice = AccelChoice::resolve(self.accel);
        if self.accel.is_none() && choice.accel == Accel::Tcg {
            eprintln!("podvisor: {}", choice.reason);
        }
        let mut cfg = dirs.node_config(settings, choice.accel);
        cfg.kernel = self.kernel.clone();
        cfg.agent = match &self.agent {
            Some(agent) => Some(agent.clone()),
            None if !EMBEDDED_AGENT.is_empty() => Some(podvisor_guest::agent::store_embedded(
                &cfg.cache_dir,
                EMBEDDED_AGENT_ID,
                EMBEDDED_AGENT,
            )?),
            None => None,
        };
        if let Some(secs) = self.boot_timeout {
            cfg.boot_timeout = std::time::Duration::from_secs(secs);
        }
        cfg.extra_kernel_args = self.kernel_args.clone();
        Ok(cfg)
    }
}

impl PodVmArgs {
    /// The node configuration with the config file read as `file`.
    pub fn node_config_with(&self, file: ConfigFile) -> anyhow::Result<NodeConfig> {
        let settings = Settings::resolve(&self.cache, &self.registry, file);
        let mut cfg = self.vm.node_config(settings, &self.dirs)?;
        cfg.dax_layers = !self.no_dax;
        cfg.free_page_reporting = !self.no_free_page_reporting;
        Ok(cfg)
    }

    /// The node configuration these options and the config file describe.
    pub fn node_config(&self) -> anyhow::Result<NodeConfig> {
        self.node_config_with(ConfigFile::load()?)
    }
}
