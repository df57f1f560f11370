//! `podvisor host`: the host daemon, which runs the pods the management
//! server assigns to this machine (see `podvisor_hostd::daemon`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use podvisor_api::Quantity;
use podvisor_hostd::daemon::ksm::ScanRate;
use podvisor_hostd::daemon::{self, DaemonConfig, RuntimeMode};
use podvisor_hostd::host::HostConfig;
use podvisor_net::pod_network::PodNetworkConfig;

use crate::host_options::PodVmArgs;

/// Default state directory of the host daemon.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/podvisor/host";

#[derive(clap::Args, Debug, Clone)]
pub struct HostDaemonArgs {
    /// The management server's URL.
    #[arg(long, env = "PODVISOR_SERVER")]
    pub server: String,
    /// This host's token (made with `podvisor server token create --host NAME`).
    #[arg(long, env = "PODVISOR_TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// Read the token from this file.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The host's name (default: this machine's hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// Where the daemon keeps its pod records, container logs and VM
    /// sockets (its VMs are adopted from here after a restart).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Address of the daemon's logs/exec endpoint (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The endpoint's URL as the server reaches it (default: http://LISTEN).
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// How pods run. `vm` (the default): each pod in its own VM.
    /// `ack-without-vm`: for control-plane benchmarks only: pods are
    /// reported Running at once and NOTHING is started.
    #[arg(long, value_enum, default_value = "vm")]
    pub runtime: RuntimeArg,
    /// CPU pods may use here, e.g. `4` or `3500m` (default: all CPUs).
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory pods may use here, e.g. `8Gi` (default: all memory).
    #[arg(long)]
    pub memory: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat: u64,
    /// Seconds between SIGTERM and SIGKILL when a deleted pod's
    /// containers are stopped.
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    /// Where persistent volumes' data files are kept (default: `volumes`
    /// in the state directory).
    #[arg(long, value_name = "DIR")]
    pub volume_dir: Option<PathBuf>,
    /// The --volume-dir is on a shared filesystem, named NAME by every
    /// host that mounts it: a volume first used on such a host lives
    /// there, and its pods may run on any host naming the same storage.
    #[arg(long, value_name = "NAME", requires = "volume_dir")]
    pub volume_storage: Option<String>,
    /// Seconds a JVM training run warms up before its class-data archive
    /// is dumped (once per image and command, for the whole cluster);
    /// 0: make and use no JVM archives on this host.
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    pub jvm_archive_warm_up: u64,
    #[command(flatten)]
    pub network: PodNetworkArgs,
    #[command(flatten)]
    pub ksm: KsmArgs,
    #[command(flatten)]
    pub host: PodVmArgs,
}

/// KSM for a host's pods (`podvisor host`, `podvisor up`).
#[derive(clap::Args, Debug, Clone)]
pub struct KsmArgs {
    /// Run KSM (kernel samepage merging) while the daemon runs: ksmd
    /// merges identical pages of the pods' guest RAM, except for pods
    /// annotated `podvisor.io/isolated: "true"`. It costs ksmd's CPU time
    /// (`podvisor describe host` shows both). KSM is machine-wide: the
    /// settings from before are put back when the daemon stops.
    #[arg(long)]
    pub ksm: bool,
    /// With --ksm: pages ksmd scans each time it wakes up [default: 1000].
    #[arg(long, value_name = "PAGES", requires = "ksm")]
    pub ksm_pages_to_scan: Option<u64>,
    /// With --ksm: milliseconds ksmd sleeps between scans [default: 20].
    #[arg(long, value_name = "MS", requires = "ksm")]
    pub ksm_sleep_ms: Option<u64>,
}

impl KsmArgs {
    /// The scan rate for `--ksm`, `None` without it.
    pub fn scan_rate(&self) -> Option<ScanRate> {
        let default = ScanRate::default();
        self.ksm.then(|| ScanRate {
            pages_to_scan: self.ksm_pages_to_scan.unwrap_or(default.pages_to_scan),
            sleep_millisecs: self.ksm_sleep_ms.unwrap_or(default.sleep_millisecs),
        })
    }
}

/// How a host's pods get their network (`podvisor host`, `podvisor up`).
#[derive(clap::Args, Debug, Clone)]
pub struct PodNetworkArgs {
    /// Pod networking. `cni` (the default): each pod gets an address from
    /// the first CNI configuration in --cni-conf-dir (podvisor writes a
    /// bridge network on 10.87.0.0/24 there when it has none) and may
    /// publish hostPorts. `none`: pods have only loopback.
    #[arg(long, value_enum, default_value = "cni", env = "PODVISOR_POD_NETWORK")]
    pub pod_network: PodNetworkArg,
    /// The CNI configuration directory.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
}

impl PodNetworkArgs {
    /// The pod networking of a host daemon whose state lives in
    /// `state_dir`, or `None` for `--pod-network none`.
    pub fn config(&self, state_dir: &std::path::Path) -> Option<PodNetworkConfig> {
        match self.pod_network {
            PodNetworkArg::Cni => Some(pod_network_config(state_dir, self.cni_conf_dir.clone())),
            PodNetworkArg::None => None,
        }
    }
}

/// `--pod-network`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetworkArg {
    /// Each pod gets its network from CNI.
    Cni,
    /// Pods have only loopback.
    None,
}

/// The pod networking of a host daemon whose state lives in `state_dir`:
/// its attachment records and namespace pins there, so that daemons with
/// different state directories never touch each other's.
pub fn pod_network_config(state_dir: &std::path::Path, conf_dir: PathBuf) -> PodNetworkConfig {
    PodNetworkConfig {
        conf_dir,
        netns_dir: state_dir.join("netns"),
        state_dir: state_dir.join("net"),
        ..Default::default()
    }
}

/// `--runtime`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeArg {
    /// Each pod in its own VM.
    Vm,
    /// Benchmarks only: acknowledge pods as Running without booting VMs.
    AckWithoutVm,
}

/// The daemon's configuration from the command line.
pub fn daemon_config(args: &HostDaemonArgs) -> anyhow::Result<DaemonConfig> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("read the token file {}", path.display()))?
            .trim()
            .to_string(),
        (None, None) => {
            anyhow::bail!("give the host's token with --token, PODVISOR_TOKEN or --token-file")
        }
    };
    let name = match &args.name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .context("read this machine's hostname (or give --name)")?
            .to_string_lossy()
            .into_owned(),
    };
    let mut capacity = daemon::machine_capacity();
    if let Some(cpu) = &args.cpu {
        capacity.cpu = Quantity::new(cpu.as_str()).millicores().context("--cpu")?;
    }
    if let Some(memory) = &args.memory {
        capacity.memory = Quantity::new(memory.as_str()).bytes().context("--memory")?;
    }
    let runtime = match args.runtime {
        RuntimeArg::Vm => RuntimeMode::Vm,
        RuntimeArg::AckWithoutVm => {
            eprintln!(
                "podvisor host: --runtime ack-without-vm: pods are reported Running but nothing runs (benchmarks only)"
            );
            RuntimeMode::AckWithoutVm
        }
    };
    let node = match runtime {
        RuntimeMode::Vm => args.host.node_config()?,
        RuntimeMode::AckWithoutVm => {
            podvisor_podvm::NodeConfig::with_defaults(podvisor_vmm::Accel::Tcg)
        }
    };
    let mut host_cfg = HostConfig::new(node, args.state_dir.clone());
    host_cfg.delete_grace = Duration::from_secs(args.grace);
    host_cfg.jvm_archive_warm_up =
        (args.jvm_archive_warm_up > 0).then(|| Duration::from_secs(args.jvm_archive_warm_up));
    if let Some(dir) = &args.volume_dir {
        host_cfg.volume_dirs.volumes = dir.clone();
    }
    if runtime == RuntimeMode::Vm {
        host_cfg.network = args.network.config(&args.state_dir);
    }
    Ok(DaemonConfig {
        name,
        server: args.server.clone(),
        token,
        listen: args.listen,
        advertise: args.advertise.clone(),
        capacity,
        runtime,
        host: host_cfg,
        heartbeat: Duration::from_secs(args.heartbeat.max(1)),
        volume_storage: args.volume_storage.clone(),
        ksm: args.ksm.scan_rate(),
    })
}

/// Runs the daemon until SIGINT or SIGTERM; its VMs keep running.
pub async fn run(args: HostDaemonArgs) -> anyhow::Result<u8> {
    let cfg = daemon_config(&args)?;
    let name = cfg.name.clone();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<daemon::Started>();
    tokio::spawn(async move {
        if let Ok(s) = started_rx.await {
            eprintln!(
                "podvisor host: {name} registered; logs/exec endpoint on {}",
                s.listening
            );
        }
    });
    daemon::run(cfg, shutdown_signal(), Some(started_tx)).await?;
    Ok(0)
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
