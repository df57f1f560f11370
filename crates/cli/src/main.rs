//! `podvisor`: the command-line interface. Parses arguments, formats output
//! and handles the terminal; the work itself is done by the library crates.

mod config;
mod host;
mod host_options;
mod image;
mod kube;
mod pull_view;
mod run;
mod server_cmd;
mod server_config;
mod template;
mod terminal;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for errors of podvisor itself (as `docker run` uses 125).
const EXIT_PODVISOR_ERROR: u8 = 125;

#[derive(Parser, Debug)]
#[command(
    name = "podvisor",
    version,
    about = "Run containers in lightweight per-pod VMs"
)]
struct Cli {
    /// Log level for podvisor's own diagnostics (error, warn, info, debug).
    #[arg(long, global = true, env = "PODVISOR_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command in a new pod VM from an image.
    Run(run::RunArgs),
    /// Run the management server (or: server init, server token create).
    Server(server_cmd::ServerArgs),
    /// Create or update pods and volumes from YAML/JSON files.
    Apply(kube::ApplyArgs),
    /// List pods, hosts or images (a table, or -o json|yaml).
    Get(kube::GetArgs),
    /// Show a pod (or host) in detail.
    Describe(kube::DescribeArgs),
    /// Delete a pod.
    Delete(kube::DeleteArgs),
    /// Manage persistent volumes (create, ls, inspect, rm, revoke, audit).
    Volume(kube::volume::VolumeArgs),
    /// Print a container's output.
    Logs(kube::LogsArgs),
    /// Run a command in a pod's container.
    Exec(kube::ExecArgs),
    /// Hibernate a pod: its host saves the VM's state to disk and stops
    /// the VM; the pod wakes on the first network request, on exec or
    /// logs -f, or on `podvisor wake`.
    Hibernate(kube::PodArgs),
    /// Wake a hibernated pod: its host loads the VM's state again.
    Wake(kube::PodArgs),
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
    Template(template::TemplateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
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
            Command::Run(args) => run::run(args).await,
            Command::Server(args) => server_cmd::run(args).await,
            Command::Apply(args) => kube::apply(args).await,
            Command::Get(args) => kube::get(args).await,
            Command::Describe(args) => kube::describe(args).await,
            Command::Delete(args) => kube::delete(args).await,
            Command::Volume(args) => kube::volume::run(args).await,
            Command::Logs(args) => kube::logs(args).await,
            Command::Exec(args) => kube::exec(args).await,
            Command::Hibernate(args) => kube::hibernate(args).await,
            Command::Wake(args) => kube::wake(args).await,
            Command::Host(args) => host::run(args).await,
            Command::Up(args) => up::run(args).await,
            Command::Image(args) => image::run(args).await,
            Command::Login(args) => image::login(args).await,
            Command::Template(args) => template::run(args).await,
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
