//! podvisor's management server: the HTTP API (axum) over the state store
//! (`podvisor-store`: SQLite by default, etcd for several replicas), bearer
//! tokens, the pod watch cache, the scheduler and host liveness checks (run
//! by the elected leader replica), the OpenAPI document, and the proxy of
//! logs, exec, hibernation and wake to host daemons. Replicas keep no state of their own
//! beyond caches derived from the store, so any replica serves any request.

pub mod api;
mod connections;
mod error;
mod kek;
mod keys;
mod leader;
mod liveness;
mod objects;
mod pod_cache;
mod scheduler;
mod tokens;

use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use api::limits::MAX_BODY_BYTES;
pub use connections::ConnectionLimits;
pub use error::{ApiError, ServerError};
pub use kek::Rotated;
pub use tokens::{Revoke, Role, TokenEntry, TokenRecord};

use podvisor_store::Store;

/// Name of the admin token file in the state directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// How a server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to listen on (`127.0.0.1:7443`; port 0 picks a free one).
    pub listen: String,
    /// Directory of the admin token and (by default) the SQLite store.
    pub state_dir: PathBuf,
    /// The store: `sqlite:/path` or `etcd://host:port[,...]`; `None` is
    /// `sqlite:STATE_DIR/state.db`.
    pub store_url: Option<String>,
    /// TTL of a host's heartbeat lease: a host silent this long is NotReady.
    pub host_ttl: Duration,
    /// TTL of the leader lease: how soon another replica takes over the
    /// scheduler when the leader dies.
    pub leader_ttl: Duration,
    /// Pod changes kept for watches that resume.
    pub watch_history: usize,
    /// The global image cache's catalog (`sqlite:CACHE_DIR/catalog.db` or
    /// an etcd URL), served at `/api/v1/images`; `None`: not served.
    pub catalog_url: Option<String>,
    /// The key-encryption key file (made if missing); `None` is
    /// `STATE_DIR/key-encryption.key`. Replicas must share it.
    pub kek_file: Option<PathBuf>,
    /// Timeouts and connection limits of the HTTP server.
    pub limits: ConnectionLimits,
}

impl ServerConfig {
    /// Defaults: SQLite in `state_dir`, 15 s host leases, 5 s leader lease.
    pub fn new(listen: &str, state_dir: &Path) -> ServerConfig {
        ServerConfig {
            listen: listen.to_string(),
            state_dir: state_dir.to_path_buf(),
            store_url: None,
            host_ttl: Duration::from_secs(15),
            leader_ttl: Duration::from_secs(5),
            watch_history: 20_000,
            catalog_url: None,
            kek_file: None,
            limits: ConnectionLimits::default(),
        }
    }

    /// The key-encryption key file in use.
    pub fn kek_file(&self) -> PathBuf {
        self.kek_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("key-encryption.key"))
    }

    /// The store URL in use.
    pub fn store_url(&self) -> String {
        store_url(&self.state_dir, self.store_url.as_deref())
    }
}

fn store_url(state_dir: &Path, url: Option<&str>) -> String {
    match url {
        Some(url) => url.to_string(),
        None => format!("sqlite:{}", state_dir.join("state.db").display()),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the state directory (mode 0700).
fn make_state_dir(state_dir: &Path) -> Result<(), ServerError> {
    std::fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(state_dir))
}

/// Writes `line` and a newline into a file `path` readable by its owner
/// only (mode 0600), complete or not at all: into a temporary file of its
/// own (a random name), synced, then put in place. `Replace::No` leaves a file
/// that is already there (another process made it first) and says so
/// with `Ok(false)`.
fn write_private_file(path: &Path, line: &str, replace: Replace) -> Result<bool, ServerError> {
    use std::io::Write;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", podvisor_store::random_hex(8)?));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    writeln!(file, "{line}").map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    let placed = match replace {
        Replace::Yes => std::fs::rename(&tmp, path).map(|()| true),
        // A link fails if the name exists: two processes never both win.
        Replace::No => match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        },
    };
    let _ = std::fs::remove_file(&tmp);
    placed.map_err(io_err(path))
}

/// Whether [`write_private_file`] replaces a file already there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replace {
    Yes,
    No,
}

/// What [`init`] did.
#[derive(Debug)]
pub struct InitOutcome {
    /// `STATE_DIR/admin.token`.
    pub admin_token_path: PathBuf,
    /// The new admin token, or `None` if the state directory already had one.
    pub new_token: Option<String>,
}

/// Prepares a state directory: opens (creating) the store and, unless the
/// directory has one, makes an admin token, stores its hash and writes it
/// to `STATE_DIR/admin.token` (mode 0600).
pub async fn init(state_dir: &Path, store_url: Option<&str>) -> Result<InitOutcome, ServerError> {
    make_state_dir(state_dir)?;
    let store = podvisor_store::open(&self::store_url(state_dir, store_url)).await?;
    init_with(store.as_ref(), state_dir).await
}

async fn init_with(store: &dyn Store, state_dir: &Path) -> Result<InitOutcome, ServerError> {
    let path = state_dir.join(ADMIN_TOKEN_FILE);
    if path.exists() {
        return Ok(InitOutcome {
            admin_token_path: path,
            new_token: None,
        });
    }
    let token = tokens::create(store, Role::Admin, "admin", None).await?;
    write_private_file(&path, &token, Replace::Yes)?;
    Ok(InitOutcome {
        admin_token_path: path,
        new_token: Some(token),
    })
}

/// Makes a token for a user or a host (`role`, `name`) in the store of
/// `state_dir` (or `store_url`) and returns it; a user's reaches every
/// namespace.
pub async fn create_token(
    state_dir: &Path,
    store_url: Option<&str>,
    role: Role,
    name: &str,
) -> Result<String, ServerError> {
    create_scoped_token(state_dir, store_url, role, name, None).await
}

/// [`create_token`] for a user limited to `namespaces` (`None`: all).
pub async fn create_scoped_token(
    state_dir: &Path,
    store_url: Option<&str>,
    role: Role,
    name: &str,
    namespaces: Option<Vec<String>>,
) -> Result<String, ServerError> {
    if let Some(problem) = podvisor_api::validate::dns_subdomain_problem(name) {
        return Err(ServerError::Config(format!("token name: {problem}")));
    }
    if let Some(namespaces) = &namespaces {
        if role != Role::User {
            return Err(ServerError::Config(
                "only user tokens are limited to namespaces".into(),
            ));
        }
        if namespaces.is_empty() {
            return Err(ServerError::Config(
                "a user token limited to namespaces needs at least one".into(),
            ));
        }
        for ns in namespaces {
            if let Some(problem) = podvisor_api::validate::dns_label_problem(ns) {
                return Err(ServerError::Config(format!("namespace {ns:?}: {problem}")));
            }
        }
    }
    let store = existing_store(state_dir, store_url).await?;
    tokens::create(store.as_ref(), role, name, namespaces).await
}

/// The tokens in the store of `state_dir` (or `store_url`), oldest first.
pub async fn list_tokens(
    state_dir: &Path,
    store_url: Option<&str>,
) -> Result<Vec<TokenEntry>, ServerError> {
    let store = existing_store(state_dir, store_url).await?;
    Ok(tokens::list(store.as_ref()).await?)
}

/// Deletes the tokens `which` selects from the store of `state_dir` (or
/// `store_url`) and returns them; running servers stop accepting them
/// within 10 s.
pub async fn revoke_tokens(
    state_dir: &Path,
    store_url: Option<&str>,
    which: &Revoke,
) -> Result<Vec<TokenEntry>, ServerError> {
    let store = existing_store(state_dir, store_url).await?;
    tokens::revoke(store.as_ref(), which)
        .await
        .map_err(|e| match e {
            tokens::RevokeError::Store(e) => e.into(),
            other => ServerError::Config(other.to_string()),
        })
}

/// Rotates the key-encryption key (`kek_file`, default
/// `STATE_DIR/key-encryption.key`) of the store of `state_dir` (or
/// `store_url`): a new key, every wrapped secret rewrapped with it, the
/// store's key id updated, the file replaced. Run it with every server
/// replica stopped, then give them all the new file.
pub async fn rotate_kek(
    state_dir: &Path,
    store_url: Option<&str>,
    kek_file: Option<&Path>,
) -> Result<Rotated, ServerError> {
    let store = existing_store(state_dir, store_url).await?;
    let path = kek_file
        .map(Path::to_path_buf)
        .unwrap_or_else(|| state_dir.join("key-encryption.key"));
    kek::rotate(store.as_ref(), &path).await
}

/// The store of an initialized state directory (or `store_url`).
async fn existing_store(
    state_dir: &Path,
    store_url: Option<&str>,
) -> Result<Arc<dyn Store>, ServerError> {
    if store_url.is_none() && !state_dir.join("state.db").exists() {
        return Err(ServerError::Config(format!(
            "{} has no store: run `podvisor server init --state-dir {}` first (or pass --store)",
            state_dir.display(),
            state_dir.display()
        )));
    }
    Ok(podvisor_store::open(&self::store_url(state_dir, store_url)).await?)
}

/// A running server; dropping it (or [`RunningServer::shutdown`]) stops it.
pub struct RunningServer {
    addr: SocketAddr,
    admin_token_path: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Dropped to stop the HTTP server: it stops accepting and closes each
    /// connection once its request is answered.
    _stop: tokio::sync::watch::Sender<()>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where the admin token is.
    pub fn admin_token_path(&self) -> &Path {
        &self.admin_token_path
    }

    /// Serves until the HTTP server fails (it does not end otherwise).
    pub async fn wait(mut self) {
        if let Some(http) = self.tasks.first_mut() {
            let _ = http.await;
        }
    }

    /// Stops serving and the background tasks (giving up the leader lease).
    pub fn shutdown(self) {}
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts a server: opens the store, initializes the state directory if
/// needed, starts the pod cache, the API and leader election.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    rustls_provider();
    make_state_dir(&config.state_dir)?;
    let store: Arc<dyn Store> = podvisor_store::open(&config.store_url()).await?;
    let admin = init_with(store.as_ref(), &config.state_dir).await?;
    let kek = kek::KeyEncryptionKey::load_or_create(&config.kek_file())?;
    kek.check_against(store.as_ref()).await?;
    let cache = pod_cache::PodCache::start(store.clone(), config.watch_history).await?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| ServerError::Config(format!("cannot build the HTTP client: {e}")))?;
    let state = api::AppState {
        store: store.clone(),
        pods: cache.clone(),
        tokens: tokens::TokenCheck::new(store.clone()),
        http,
        host_ttl: config.host_ttl,
        images: api::ImageCatalog::new(config.catalog_url.clone()),
        kek: Arc::new(kek),
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen.clone(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: config.listen.clone(),
            source,
        })?;
    let app = api::router(state, config.limits.request_timeout);
    let (stop, stopped) = tokio::sync::watch::channel(());
    let http_task = tokio::spawn(connections::serve(
        listener,
        app,
        config.limits.clone(),
        stopped,
    ));
    let identity = format!("{}/{}/{addr}", nix_hostname(), std::process::id());
    let leader_ttl = config.leader_ttl;
    let elected_store = store.clone();
    let leader_task = tokio::spawn(async move {
        leader::run_elected(elected_store.clone(), leader_ttl, identity, move || {
            let (store, cache) = (elected_store.clone(), cache.clone());
            async move {
                tokio::join!(
                    scheduler::run(store.clone(), cache.clone()),
                    liveness::run(store, cache)
                );
            }
        })
        .await
    });
    tracing::info!(%addr, store = config.store_url(), "podvisor server listening");
    Ok(RunningServer {
        addr,
        admin_token_path: admin.admin_token_path,
        tasks: vec![http_task, leader_task],
        _stop: stop,
    })
}

/// rustls (used by reqwest for https host addresses) is built without a
/// default crypto provider: install ring's.
fn rustls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn nix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "server".into())
}
