//! `podvisor`: the command-line interface. Parses arguments, formats output
//! and handles the terminal; the work itself is done by the library crates.

mod config;
mod host;
mod image;
mod kube;
mod pull_view;
mod run;
mod server_cmd;
mod server_config;
mod template;
mod terminal;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use podvisor_vmm::{Accel, AccelChoice};

/// Exit code for errors of podvisor itself (as `docker run` uses 125).
const EXIT_PODVISOR_ERROR: u8 = 125;

#[derive(Parser, Debug)]
#[command(
    name = "podvisor",
    version,
    about = "Run containers in lightweight per-pod VMs"
)]
struct Cli {
    #[command(flatten)]
    host: HostArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options about this host, shared by every subcommand.
#[derive(clap::Args, Debug, Clone)]
struct HostArgs {
    /// Image cache directory, may be a shared filesystem (default: the
    /// config file's `cache_dir`, else /var/lib/podvisor/cache).
    #[arg(long, global = true, env = "PODVISOR_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Image catalog: sqlite:PATH or etcd://HOST:PORT (default: the config
    /// file's `catalog`, else sqlite:CACHE_DIR/catalog.db).
    #[arg(long, global = true, env = "PODVISOR_CATALOG")]
    catalog: Option<String>,
    /// A registry (host:port) reached over plain HTTP; repeatable. Loopback
    /// registries always are.
    #[arg(long = "insecure-registry", global = true, value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// Directory for the runtime files of running pods.
    #[arg(
        long,
        global = true,
        env = "PODVISOR_RUN_DIR",
        default_value = "/run/podvisor"
    )]
    run_dir: PathBuf,
    /// Directory of VM template RAM files (best on tmpfs).
    #[arg(
        long,
        global = true,
        env = "PODVISOR_TEMPLATE_RAM_DIR",
        default_value = "/dev/shm/podvisor/templates"
    )]
    template_ram_dir: PathBuf,
    /// Accelerator: kvm or tcg (default: kvm if it really works here, else tcg).
    #[arg(long, global = true, env = "PODVISOR_ACCEL")]
    accel: Option<Accel>,
    /// Guest kernel image (default: newest /boot/vmlinuz-*-cloud-amd64).
    #[arg(long, global = true, env = "PODVISOR_KERNEL")]
    kernel: Option<PathBuf>,
    /// Guest agent binary (default: next to podvisor, or /usr/local/lib/podvisor).
    #[arg(long, global = true, env = "PODVISOR_AGENT")]
    agent: Option<PathBuf>,
    /// Seconds a pod VM may take to boot to a ready agent (default: 30 with
    /// KVM, 120 under emulation).
    #[arg(long, global = true, value_name = "SECONDS")]
    boot_timeout: Option<u64>,
    /// Extra guest kernel argument (repeatable), for debugging guests.
    #[arg(long = "kernel-arg", global = true, value_name = "ARG")]
    kernel_args: Vec<String>,
    /// Log level for podvisor's own diagnostics (error, warn, info, debug).
    #[arg(long, global = true, env = "PODVISOR_LOG", default_value = "warn")]
    log: String,
}

impl HostArgs {
    /// The node configuration these options describe. Tells the user once
    /// when podvisor falls back to software emulation.
    fn node_config(&self) -> anyhow::Result<podvisor_podvm::NodeConfig> {
        let settings = config::Settings::load(self)?;
        let choice = AccelChoice::resolve(self.accel);
        if self.accel.is_none() && choice.accel == Accel::Tcg {
            eprintln!("podvisor: {}", choice.reason);
        }
        let mut cfg = podvisor_podvm::NodeConfig::with_defaults(choice.accel);
        cfg.cache_dir = settings.cache_dir;
        cfg.catalog = Some(settings.catalog);
        cfg.registry = settings.registry;
        cfg.run_dir = self.run_dir.clone();
        cfg.template_ram_dir = self.template_ram_dir.clone();
        cfg.kernel = self.kernel.clone();
        cfg.agent = self.agent.clone();
        if let Some(secs) = self.boot_timeout {
            cfg.boot_timeout = std::time::Duration::from_secs(secs);
        }
        cfg.extra_kernel_args = self.kernel_args.clone();
        Ok(cfg)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command in a new pod VM from an image.
    Run(run::RunArgs),
    /// Run the management server (or: server init, server token create).
    Server(server_cmd::ServerArgs),
    /// Create or update pods from YAML/JSON files.
    Apply(kube::ApplyArgs),
    /// List pods, hosts or images (a table, or -o json|yaml).
    Get(kube::GetArgs),
    /// Show a pod (or host) in detail.
    Describe(kube::DescribeArgs),
    /// Delete a pod.
    Delete(kube::DeleteArgs),
    /// Print a container's output.
    Logs(kube::LogsArgs),
    /// Run a command in a pod's container.
    Exec(kube::ExecArgs),
    /// Run the host daemon: the pods the management server assigns to
    /// this machine, each in its own VM.
    Host(host::HostDaemonArgs),
    /// Run a management server (SQLite) and a host daemon on this machine,
    /// in this process, and point the CLI config at it.
    Up(up::UpArgs),
    /// Manage the global image cache (pull, ls, inspect, rm, gc, import).
    Image(image::ImageArgs),
    /// Save credentials for a registry in the docker config file.
    Login(image::LoginArgs),
    /// Manage VM templates, the paused VMs pods fork from.
    #[command(subcommand)]
    Template(template::TemplateCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.host.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // Long-running daemons log with timestamps; one-shot commands without.
    if matches!(cli.command, Command::Host(_) | Command::Up(_)) {
        logs.init();
    } else {
        logs.without_time().init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("podvisor: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_PODVISOR_ERROR);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(&cli.host, args).await,
            Command::Server(args) => server_cmd::run(&cli.host, args).await,
            Command::Apply(args) => kube::apply(args).await,
            Command::Get(args) => kube::get(args).await,
            Command::Describe(args) => kube::describe(args).await,
            Command::Delete(args) => kube::delete(args).await,
            Command::Logs(args) => kube::logs(args).await,
            Command::Exec(args) => kube::exec(args).await,
            Command::Host(args) => host::run(&cli.host, args).await,
            Command::Up(args) => up::run(&cli.host, args).await,
            Command::Image(args) => image::run(&cli.host, args).await,
            Command::Login(args) => image::login(&cli.host, args).await,
            Command::Template(cmd) => template::run(&cli.host, cmd).await,
        }
    });
    // A reader blocked on stdin must not hold the process open.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("podvisor: {e:#}");
            ExitCode::from(EXIT_PODVISOR_ERROR)
        }
    }
}
