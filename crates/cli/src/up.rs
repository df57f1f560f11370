//! `podvisor up`: a whole podvisor on this machine in one process: the
//! management server (SQLite) and one host daemon, with the CLI config
//! written so that `podvisor apply/get/logs/exec` work right away. Its
//! pods are on the host's CNI network, as `podvisor host`'s are
//! (`--pod-network none` for loopback only).

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use podvisor_hostd::daemon::{self, DaemonConfig, RuntimeMode};
use podvisor_hostd::host::HostConfig;
use podvisor_server::{Role, ServerConfig};

use crate::config::ConfigFile;
use crate::host::{KsmArgs, PodNetworkArgs, shutdown_signal};
use crate::host_options::PodVmArgs;

/// Default root of `podvisor up`'s state.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/podvisor";
/// The CLI config file written when `PODVISOR_CONFIG` is not set.
const DEFAULT_CONFIG: &str = "/etc/podvisor/config.toml";

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Root of the state: the server's in STATE_DIR/server (SQLite store,
    /// admin token), the host daemon's in STATE_DIR/host.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Address the API listens on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// The host's name (default: this machine's hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// CPU pods may use, e.g. `4` or `3500m` (default: all CPUs).
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory pods may use, e.g. `8Gi` (default: all memory).
    #[arg(long)]
    pub memory: Option<String>,
    /// Do not write the CLI config file.
    #[arg(long)]
    pub no_config: bool,
    #[command(flatten)]
    pub network: PodNetworkArgs,
    #[command(flatten)]
    pub ksm: KsmArgs,
    #[command(flatten)]
    pub host: PodVmArgs,
}

/// A host name usable as an object name: the hostname, lower-cased.
fn default_host_name() -> anyhow::Result<String> {
    let name = nix::unistd::gethostname()
        .context("read this machine's hostname (or give --name)")?
        .to_string_lossy()
        .to_ascii_lowercase();
    if let Some(problem) = podvisor_api::validate::dns_subdomain_problem(&name) {
        bail!("this machine's hostname {name:?} cannot name a host ({problem}): give --name");
    }
    Ok(name)
}

/// The host daemon's token, made once and kept (mode 0600) in the
/// server's state directory, so that `up` can be run again.
async fn host_token(server_dir: &Path, name: &str) -> anyhow::Result<String> {
    let path = server_dir.join(format!("host-{name}.token"));
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_string());
    }
    let token = podvisor_server::create_token(server_dir, None, Role::Host, name)
        .await
        .context("create the host daemon's token")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("write {}", path.display()))?;
    use std::io::Write;
    writeln!(f, "{token}").with_context(|| format!("write {}", path.display()))?;
    Ok(token)
}

/// Sets `[server] url` and `token_file` in the CLI config file, keeping
/// everything else in it.
fn write_cli_config(url: &str, token_file: &Path) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PODVISOR_CONFIG")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CONFIG), PathBuf::from);
    let mut doc: toml::Table = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .parse()
            .with_context(|| format!("config file {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let server = doc
        .entry("server")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(server) = server.as_table_mut() else {
        bail!("config file {}: [server] is not a table", path.display());
    };
    server.remove("token");
    server.insert("url".into(), url.into());
    server.insert("token_file".into(), token_file.display().to_string().into());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, toml::to_string(&doc)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Runs the server and a host daemon until SIGINT or SIGTERM. Pods keep
/// running afterwards; the next `podvisor up` adopts them.
pub async fn run(args: UpArgs) -> anyhow::Result<u8> {
    // `up` writes the CLI config file: one that does not exist yet is
    // created below, not an error.
    let file = || {
        if args.no_config {
            ConfigFile::load()
        } else {
            ConfigFile::load_to_rewrite()
        }
    };
    let node = args.host.node_config_with(file()?)?;
    let server_dir = args.state_dir.join("server");
    let mut config = ServerConfig::new(&args.listen.to_string(), &server_dir);
    config.host_ttl = Duration::from_secs(15);
    config.catalog_url = node.catalog.clone();
    let server = podvisor_server::start(config).await.with_context(|| {
        format!(
            "start the server on {} (is another `podvisor up` or server running?)",
            args.listen
        )
    })?;
    let url = server.url();
    let name = match &args.name {
        Some(n) => n.clone(),
        None => default_host_name()?,
    };
    let token = host_token(&server_dir, &name).await?;

    let mut capacity = daemon::machine_capacity();
    if let Some(cpu) = &args.cpu {
        capacity.cpu = podvisor_api::Quantity::new(cpu.as_str())
            .millicores()
            .context("--cpu")?;
    }
    if let Some(memory) = &args.memory {
        capacity.memory = podvisor_api::Quantity::new(memory.as_str())
            .bytes()
            .context("--memory")?;
    }
    let host_dir = args.state_dir.join("host");
    let mut host = HostConfig::new(node, host_dir.clone());
    host.network = args.network.config(&host_dir);
    let cfg = DaemonConfig {
        name: name.clone(),
        server: url.clone(),
        token,
        listen: "127.0.0.1:0".parse().expect("a socket address"),
        advertise: None,
        capacity,
        runtime: RuntimeMode::Vm,
        host,
        heartbeat: Duration::from_secs(5),
        volume_storage: None,
        ksm: args.ksm.scan_rate(),
    };
    let admin_token = server.admin_token_path().to_path_buf();
    let config_note = if args.no_config {
        String::new()
    } else {
        let path = write_cli_config(&url, &admin_token)?;
        format!(
            "; `podvisor get pods` etc. use it through {}",
            path.display()
        )
    };
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<daemon::Started>();
    tokio::spawn(async move {
        if started_rx.await.is_ok() {
            eprintln!(
                "podvisor up: server {url} (admin token in {}), host {name} ready{config_note}",
                admin_token.display()
            );
        }
    });
    let result = tokio::select! {
        r = daemon::run(cfg, shutdown_signal(), Some(started_tx)) => r.map_err(anyhow::Error::from),
        _ = server.wait() => Err(anyhow::anyhow!("the server stopped")),
    };
    result?;
    eprintln!("podvisor up: stopped (pods keep running; the next `podvisor up` adopts them)");
    Ok(0)
}
