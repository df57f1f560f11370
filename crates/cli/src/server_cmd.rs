//! `podvisor server`: run the management server, initialize its state
//! directory, make tokens.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use podvisor_server::{Revoke, Role, ServerConfig};

use crate::config::{CacheArgs, RegistryArgs, Settings};

/// The default state directory of the server.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/podvisor/server";

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    command: Option<ServerCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand, Debug)]
enum ServerCommand {
    /// Create the state directory and the admin token (printed once, and
    /// written to STATE_DIR/admin.token).
    Init(StateArgs),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Replace the key-encryption key with a new one, rewrapping every
    /// secret wrapped by it (snapshot and volume keys; no disk changes).
    /// Stop every server replica first, then give them all the new file.
    RotateKek(RotateKekArgs),
    /// Serve the API (the default).
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RotateKekArgs {
    #[command(flatten)]
    state: StateArgs,
    /// The key-encryption key file (default: STATE_DIR/key-encryption.key).
    #[arg(long, value_name = "FILE", env = "PODVISOR_KEY_ENCRYPTION_KEY")]
    key_encryption_key: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
enum TokenCommand {
    /// Make a token for a user or a host daemon and print it.
    Create(TokenCreateArgs),
    /// List the tokens: id (a hash: tokens are not stored), role, name, age.
    #[command(alias = "list")]
    Ls(StateArgs),
    /// Revoke tokens: one by id (at least 8 digits, from `token ls`), or
    /// all of a user's or a host's. Running servers refuse them within 10 s.
    Revoke(TokenRevokeArgs),
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("which").required(true)))]
struct TokenRevokeArgs {
    /// The token's id, or its first 8 or more digits.
    #[arg(group = "which")]
    id: Option<String>,
    /// Every token of the user NAME.
    #[arg(long, value_name = "NAME", group = "which")]
    user: Option<String>,
    /// Every token of the host NAME.
    #[arg(long, value_name = "NAME", group = "which")]
    host: Option<String>,
    #[command(flatten)]
    state: StateArgs,
}

/// Where the server keeps its state.
#[derive(clap::Args, Debug, Clone)]
pub struct StateArgs {
    /// State directory: the admin token and the SQLite store.
    #[arg(long, env = "PODVISOR_SERVER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The store: sqlite:PATH, or etcd://HOST:PORT[,HOST:PORT...] for
    /// several replicas (default: sqlite:STATE_DIR/state.db).
    #[arg(long, env = "PODVISOR_STORE")]
    pub store: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: String,
    #[command(flatten)]
    state: StateArgs,
    /// Seconds without a heartbeat after which a host is NotReady.
    #[arg(long, default_value_t = 15, value_name = "SECONDS")]
    host_ttl: u64,
    /// The key-encryption key: secrets the server keeps for hosts (the keys
    /// of hibernated pods' snapshots) are stored wrapped by it. Made (mode
    /// 0600) if missing; every replica must have the same file (default:
    /// STATE_DIR/key-encryption.key).
    #[arg(long, value_name = "FILE", env = "PODVISOR_KEY_ENCRYPTION_KEY")]
    key_encryption_key: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false, id = "who")]
struct TokenCreateArgs {
    /// A token for the user NAME (pods, hosts, images; logs and exec).
    #[arg(long, value_name = "NAME", group = "who")]
    user: Option<String>,
    /// A token for the host daemon of host NAME (only that host's things).
    #[arg(long, value_name = "NAME", group = "who")]
    host: Option<String>,
    /// The namespace(s) the user's token may see and change (repeat, or
    /// separate with commas); a user token needs this or
    /// --all-namespaces.
    #[arg(
        long = "namespace",
        short = 'n',
        value_name = "NS",
        value_delimiter = ',',
        requires = "user",
        conflicts_with = "all_namespaces"
    )]
    namespaces: Vec<String>,
    /// The user's token reaches every namespace.
    #[arg(long, requires = "user")]
    all_namespaces: bool,
    #[command(flatten)]
    state: StateArgs,
}

pub async fn run(args: ServerArgs) -> anyhow::Result<u8> {
    match args.command {
        None => serve(args.run).await,
        Some(ServerCommand::Run(run)) => serve(run).await,
        Some(ServerCommand::Init(state)) => {
            let outcome = podvisor_server::init(&state.state_dir, state.store.as_deref())
                .await
                .context("initialize the server state")?;
            match outcome.new_token {
                Some(token) => {
                    println!("{token}");
                    eprintln!(
                        "podvisor: admin token created (shown once); it is also in {}",
                        outcome.admin_token_path.display()
                    );
                }
                None => eprintln!(
                    "podvisor: {} is already initialized; the admin token is in {}",
                    state.state_dir.display(),
                    outcome.admin_token_path.display()
                ),
            }
            Ok(0)
        }
        Some(ServerCommand::RotateKek(args)) => {
            let rotated = podvisor_server::rotate_kek(
                &args.state.state_dir,
                args.state.store.as_deref(),
                args.key_encryption_key.as_deref(),
            )
            .await
            .context("rotate the key-encryption key")?;
            println!(
                "key-encryption key rotated: {} -> {} ({} snapshot keys, {} volume keys rewrapped)",
                rotated.old_id, rotated.new_id, rotated.snapshot_keys, rotated.volume_keys
            );
            eprintln!(
                "podvisor: give every server replica the new key file before starting them again"
            );
            Ok(0)
        }
        Some(ServerCommand::Token(TokenCommand::Create(args))) => {
            let (role, name) = match (&args.user, &args.host) {
                (Some(user), _) => (Role::User, user.as_str()),
                (_, Some(host)) => (Role::Host, host.as_str()),
                _ => unreachable!("clap requires --user or --host"),
            };
            let namespaces = match (role, args.all_namespaces, args.namespaces.is_empty()) {
                (Role::User, false, true) => anyhow::bail!(
                    "a user token needs --namespace NS (one or more) or --all-namespaces"
                ),
                (Role::User, false, false) => Some(args.namespaces.clone()),
                _ => None,
            };
            let token = podvisor_server::create_scoped_token(
                &args.state.state_dir,
                args.state.store.as_deref(),
                role,
                name,
                namespaces,
            )
            .await
            .context("create a token")?;
            println!("{token}");
            Ok(0)
        }
        Some(ServerCommand::Token(TokenCommand::Ls(state))) => {
            let entries = podvisor_server::list_tokens(&state.state_dir, state.store.as_deref())
                .await
                .context("list tokens")?;
            print!("{}", crate::kube::show::tokens_table(&entries));
            Ok(0)
        }
        Some(ServerCommand::Token(TokenCommand::Revoke(args))) => {
            let which = match (args.id, args.user, args.host) {
                (Some(id), _, _) => Revoke::Id(id),
                (_, Some(user), _) => Revoke::Holder(Role::User, user),
                (_, _, Some(host)) => Revoke::Holder(Role::Host, host),
                _ => unreachable!("clap requires an id, --user or --host"),
            };
            let revoked = podvisor_server::revoke_tokens(
                &args.state.state_dir,
                args.state.store.as_deref(),
                &which,
            )
            .await
            .context("revoke tokens")?;
            for e in &revoked {
                let role = format!("{:?}", e.record.role).to_lowercase();
                println!("revoked {} ({role} {})", &e.id[..12], e.record.name);
            }
            Ok(0)
        }
    }
}

async fn serve(args: RunArgs) -> anyhow::Result<u8> {
    let mut config = ServerConfig::new(&args.listen, &args.state.state_dir);
    // The image catalog served at /api/v1/images: --catalog, the config
    // file's catalog, or the one in the cache directory.
    config.catalog_url = Some(Settings::load(&args.cache, &RegistryArgs::default())?.catalog);
    config.store_url = args.state.store.clone();
    config.host_ttl = Duration::from_secs(args.host_ttl.max(1));
    config.kek_file = args.key_encryption_key.clone();
    let server = podvisor_server::start(config)
        .await
        .context("start the server")?;
    eprintln!(
        "podvisor: server listening on {} (admin token in {})",
        server.url(),
        server.admin_token_path().display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install a SIGTERM handler")?;
    // Dropping the server (when a signal arrives) stops it and gives up
    // its leader lease.
    tokio::select! {
        _ = server.wait() => anyhow::bail!("the HTTP server stopped"),
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(0)
}
