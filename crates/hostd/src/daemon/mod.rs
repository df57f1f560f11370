//! The host daemon (`podvisor host`): registers this machine with the
//! management server and keeps its lease alive, watches the pods assigned to
//! it (resuming after the last revision seen when the connection drops, and
//! re-listing when the server no longer has that history), makes them real
//! through the host runtime ([`crate::host`]), reports their status, and
//! serves their logs and exec sessions on its own HTTP endpoint ([`http`]),
//! to which the server proxies.
//!
//! The daemon's death does not stop pods: VMs outlive it, and a new daemon
//! adopts them ([`crate::host::PodRuntime::open`]). It exits the same way on
//! SIGTERM: VMs keep running.
//!
//! With `--ksm` ([`DaemonConfig::ksm`], [`ksm`]) the daemon turns KSM on
//! for this machine while it runs, has the pods that do not ask for
//! isolation launched mergeable, and reports what KSM saves and costs
//! with each heartbeat (the host's `status.ksm`).
//!
//! `ack-without-vm` ([`RuntimeMode::AckWithoutVm`]) is for measuring the
//! control plane alone: the host runtime runs its pods in sandboxes that
//! run nothing ([`crate::host::AckLauncher`]), so they are reported Running
//! at once. It is never the default.

pub mod convert;
pub mod http;
pub mod ksm;
mod reconcile;
mod reporter;
mod volume_files;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use podvisor_api as api;
use podvisor_api::client::PodFeedEvent;
use podvisor_api::{Client, ClientError, PodFilter};
use tokio::sync::oneshot;

use crate::host::hibernation::{KeyCustody, ServerCustody};
use crate::host::volumes::{ServerAuthority, VolumeAuthority};
use crate::host::{AckLauncher, HostConfig, Launcher, PodRuntime, RuntimeError, VmLauncher};
use reconcile::Reconciler;

/// How the daemon runs pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeMode {
    /// Each pod in its own VM (the default).
    Vm,
    /// For control-plane benchmarks only: acknowledge pods as Running
    /// without booting anything.
    AckWithoutVm,
}

/// Settings of the daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The host's name (its token must be this host's).
    pub name: String,
    /// The server's URL.
    pub server: String,
    pub token: String,
    /// Where the logs/exec endpoint listens (`127.0.0.1:0`: any free port).
    pub listen: SocketAddr,
    /// The endpoint's URL as the server should use it; default
    /// `http://<listen address>`.
    pub advertise: Option<String>,
    /// What pods may use on this host.
    pub capacity: api::HostCapacity,
    pub runtime: RuntimeMode,
    pub host: HostConfig,
    /// How often the heartbeat renews the host's lease.
    pub heartbeat: Duration,
    /// The shared storage the volume directory is on (hosts naming the
    /// same one share volumes); `None`: this host's own.
    pub volume_storage: Option<String>,
    /// Run KSM for this host's pods at this scan rate while the daemon
    /// runs (the machine's settings are put back when it stops); `None`:
    /// KSM is left alone and no pod's memory is mergeable.
    pub ksm: Option<ksm::ScanRate>,
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--listen {0} is not an address the server can reach this host at: give --advertise http://HOST:PORT"
    )]
    NoAddress(SocketAddr),
    #[error("registering host {name} with the server failed")]
    Register {
        name: String,
        #[source]
        source: ClientError,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("no secret for the host endpoint")]
    Secret(#[source] podvisor_store::RandomError),
    #[error("--ksm: cannot turn KSM on")]
    Ksm(#[source] ksm::KsmError),
}

/// What the caller learns once the daemon is registered.
#[derive(Debug, Clone)]
pub struct Started {
    /// The endpoint's address (the port chosen for `:0`).
    pub listening: SocketAddr,
}

/// The capacity of this machine: all its CPUs and its memory.
pub fn machine_capacity() -> api::HostCapacity {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(1 << 30, |kib| kib * 1024);
    api::HostCapacity {
        cpu: cpus * 1000,
        memory,
    }
}

/// Runs the daemon until `shutdown` completes. VMs are left running; KSM
/// settings it changed are put back.
pub async fn run(
    mut cfg: DaemonConfig,
    shutdown: impl Future<Output = ()> + Send,
    started: Option<oneshot::Sender<Started>>,
) -> Result<(), DaemonError> {
    let client =
        Client::new(&cfg.server, Some(&cfg.token)).map_err(|source| DaemonError::Register {
            name: cfg.name.clone(),
            source,
        })?;
    // On before any pod starts, so every pod launched is merged; put back
    // when `ksm` is dropped, on every way out of here.
    let ksm = ksm_for_host(&cfg).map_err(DaemonError::Ksm)?;
    cfg.host.memory_merge = ksm.is_some();
    let launcher: Arc<dyn Launcher> = match cfg.runtime {
        RuntimeMode::Vm => Arc::new(VmLauncher::new(&cfg.host)?),
        RuntimeMode::AckWithoutVm => Arc::new(AckLauncher),
    };
    // The server keeps the keys of hibernated pods' snapshots.
    let keys: Arc<dyn KeyCustody> = Arc::new(ServerCustody(client.clone()));
    let volumes: Arc<dyn VolumeAuthority> = Arc::new(ServerAuthority(client.clone()));
    let (runtime, mut changes) =
        PodRuntime::open_with_server(cfg.host.clone(), launcher, Some(keys), Some(volumes))?;
    let runtime = Arc::new(runtime);

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let address = match &cfg.advertise {
        Some(a) => a.clone(),
        None if local.ip().is_unspecified() => return Err(DaemonError::NoAddress(local)),
        None => format!("http://{local}"),
    };
    let secret = http::EndpointSecret::generate().map_err(DaemonError::Secret)?;
    let endpoint_token = secret.as_str().to_string();
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let runtime_for_http = runtime.clone();
    let server = tokio::spawn(async move {
        let app = http::router(runtime_for_http, secret);
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = http_stopped.await;
            })
            .await;
    });

    let mut host = api::Host::new(&cfg.name, cfg.capacity, &address);
    host.spec.volume_storage = cfg.volume_storage.clone();
    let registered = register(&client, &host, &endpoint_token).await?;
    tracing::info!(host = %cfg.name, %address, "registered");
    // Renew the lease at least three times per TTL, as the server asks.
    let every = match registered.status.lease_duration_seconds {
        Some(ttl) => cfg.heartbeat.min(Duration::from_millis(ttl * 1000 / 3)),
        None => cfg.heartbeat,
    };
    if let Some(tx) = started {
        let _ = tx.send(Started { listening: local });
    }
    let heartbeat = tokio::spawn(heartbeat(
        client.clone(),
        host.clone(),
        endpoint_token.clone(),
        every,
        ksm.as_ref().map(Arc::downgrade),
    ));
    let host_ip = (!local.ip().is_unspecified()).then(|| local.ip().to_string());
    let reports = reporter::start(client.clone());
    let mut reconciler = Reconciler::new(client.clone(), runtime.clone(), host_ip, reports);
    let mut feed = client.pod_feed(PodFilter::on_host(&cfg.name), None);
    let volume_gc = tokio::spawn(volume_files::collect_periodically(
        client.clone(),
        cfg.host.volume_dirs.volumes.clone(),
        cfg.host.volume_dirs.format_images.clone(),
        cfg.name.clone(),
        runtime.clone(),
    ));

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            event = feed.recv() => match event {
                Some(PodFeedEvent::Synced { pods, revision }) => {
                    tracing::debug!(revision, pods = pods.len(), "pods listed");
                    reconciler.synced(pods);
                }
                Some(PodFeedEvent::Changed(event)) => reconciler.changed(event),
                Some(PodFeedEvent::Disconnected { error }) => {
                    tracing::warn!("watching pods: {error}; retrying");
                }
                None => break,
            },
            Some((uid, state)) = changes.recv() => reconciler.state_changed(&uid, &state),
        }
    }
    heartbeat.abort();
    volume_gc.abort();
    let _ = stop_http.send(());
    let _ = server.await;
    runtime.detach_all().await;
    if let Some(ksm) = ksm
        && let Err(e) = ksm.restore()
    {
        tracing::warn!(
            "putting the KSM settings back: {e}",
            e = podvisor_errors::ErrorChain(&e)
        );
    }
    Ok(())
}

/// KSM turned on for `--ksm`. Without it, KSM is left alone, except for
/// settings a daemon killed with `--ksm` left to be put back.
fn ksm_for_host(cfg: &DaemonConfig) -> Result<Option<Arc<ksm::KsmOn>>, ksm::KsmError> {
    let state_dir = &cfg.host.state_dir;
    match cfg.ksm {
        Some(rate) => {
            ksm::KsmOn::start(ksm::Ksm::machine(), rate, state_dir).map(|on| Some(Arc::new(on)))
        }
        None => {
            match ksm::restore_left_over(&ksm::Ksm::machine(), state_dir) {
                Ok(Some(s)) => tracing::info!(
                    run = s.run,
                    pages_to_scan = s.pages_to_scan,
                    sleep_millisecs = s.sleep_millisecs,
                    "put back the KSM settings a daemon killed with --ksm had changed"
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    "putting back the KSM settings a daemon killed with --ksm had changed: {e}",
                    e = podvisor_errors::ErrorChain(&e)
                ),
            }
            Ok(None)
        }
    }
}

/// What the host reports with a heartbeat. `ksm` is weak: the daemon
/// alone keeps KSM on, and its end (even by being dropped, when nothing
/// aborts the heartbeat) puts the settings back.
async fn report(ksm: Option<&Weak<ksm::KsmOn>>) -> api::HostReport {
    let ksm = match ksm.and_then(Weak::upgrade) {
        Some(k) => tokio::task::spawn_blocking(move || k.report())
            .await
            .ok()
            .flatten(),
        None => None,
    };
    api::HostReport { ksm }
}

/// Whether an error from the server will not go away by retrying (a bad
/// token, a refused host).
fn is_permanent(e: &ClientError) -> bool {
    matches!(e.code(), Some(400 | 401 | 403 | 409 | 422))
}

/// Registers `host`, retrying while the server cannot be reached.
async fn register(
    client: &Client,
    host: &api::Host,
    endpoint_token: &str,
) -> Result<api::Host, DaemonError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match client.register_host(host, endpoint_token).await {
            Ok(h) => return Ok(h),
            Err(e) if is_permanent(&e) => {
                return Err(DaemonError::Register {
                    name: host.metadata.name.clone(),
                    source: e,
                });
            }
            Err(e) => {
                tracing::warn!(
                    "registering with the server: {e}; retrying",
                    e = podvisor_errors::ErrorChain(&e)
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Renews the host's lease every `every`, the first time at once, each
/// time with the host's report; registers again if the server no longer
/// knows the host.
async fn heartbeat(
    client: Client,
    host: api::Host,
    endpoint_token: String,
    every: Duration,
    ksm: Option<Weak<ksm::KsmOn>>,
) {
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(every).await;
        }
        first = false;
        let report = report(ksm.as_ref()).await;
        match client
            .heartbeat_with_report(&host.metadata.name, &report)
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {
                if let Err(e) = client.register_host(&host, &endpoint_token).await {
                    tracing::warn!(
                        "registering again: {e}",
                        e = podvisor_errors::ErrorChain(&e)
                    );
                }
            }
            Err(e) => tracing::warn!("heartbeat: {e}", e = podvisor_errors::ErrorChain(&e)),
        }
    }
}
