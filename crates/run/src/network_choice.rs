//! The network of a `podvisor run` pod: a CNI attachment of its own for the
//! run's lifetime ([`RunNetwork`]), removed when the run ends, whatever way
//! it ends short of the process being killed; what a killed run left is
//! removed by the next run ([`remove_abandoned`]).
//!
//! Each run keeps its attachment's record and namespace pin in a
//! directory of its own under `<run dir>/run-net/<pod id>`, locked by the
//! run's process (the lock of [`PodNetworks`]): runs never see each
//! other's attachments, so none can take another's for a leftover.

use std::path::{Path, PathBuf};

use podvisor_net::PodNetworks;
use podvisor_net::cni::PodIdentity;
use podvisor_net::host_ports::PortMapping;
use podvisor_net::pod_network::{AttachRequest, PodNetworkConfig, PodNetworkError};

/// How old a run's network directory must be before another run may take
/// it for abandoned (when its lock is free).
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Which network a run's pod gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkChoice {
    /// Only `lo` (`--network none`).
    None,
    /// The host's CNI network (the first configuration in `conf_dir`, or
    /// podvisor's default bridge written there), with these published
    /// ports (`-p`).
    Cni {
        conf_dir: PathBuf,
        ports: Vec<PortMapping>,
    },
}

impl Default for NetworkChoice {
    fn default() -> Self {
        NetworkChoice::Cni {
            conf_dir: "/etc/cni/net.d".into(),
            ports: vec![],
        }
    }
}

/// A run's attached network.
pub struct RunNetwork {
    pub networks: PodNetworks,
    pub id: String,
    dir: PathBuf,
}

/// Where runs keep their networks' state.
fn runs_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("run-net")
}

fn config_in(dir: &Path, conf_dir: &Path) -> PodNetworkConfig {
    PodNetworkConfig {
        conf_dir: conf_dir.to_path_buf(),
        netns_dir: dir.join("netns"),
        state_dir: dir.join("state"),
        ..Default::default()
    }
}

impl RunNetwork {
    /// Attaches pod `id` (named `name`) with `ports` published. Nothing is
    /// left when this fails.
    pub async fn attach(
        run_dir: &Path,
        conf_dir: &Path,
        id: &str,
        name: &str,
        ports: &[PortMapping],
    ) -> Result<RunNetwork, PodNetworkError> {
        remove_abandoned(run_dir, conf_dir).await;
        let dir = runs_dir(run_dir).join(id);
        let networks = PodNetworks::open(config_in(&dir, conf_dir));
        let networks = match networks {
            Ok(n) => n,
            Err(e) => {
                remove_dir(&dir);
                return Err(e);
            }
        };
        let request = AttachRequest {
            id: id.to_string(),
            pod: PodIdentity {
                namespace: "default".into(),
                name: name.to_string(),
                uid: id.to_string(),
            },
            port_mappings: ports.to_vec(),
        };
        if let Err(e) = networks.attach(request).await {
            drop(networks);
            remove_dir(&dir);
            return Err(e);
        }
        Ok(RunNetwork {
            networks,
            id: id.to_string(),
            dir,
        })
    }

    /// The pod's addresses.
    pub fn pod_ips(&self) -> Vec<std::net::IpAddr> {
        self.networks
            .attachment(&self.id)
            .map(|a| a.pod_ips())
            .unwrap_or_default()
    }

    /// CNI DEL, then the namespace, the record and the run's directory.
    /// A DEL that fails leaves the directory for the next run to retry.
    pub async fn remove(self) {
        match self.networks.detach(&self.id).await {
            Ok(()) => {
                drop(self.networks);
                remove_dir(&self.dir);
            }
            Err(e) => {
                tracing::warn!(pod = %self.id, "removing the pod's network failed: {e}", e = podvisor_errors::ErrorChain(&e))
            }
        }
    }
}

/// The directory of a run's network state, its namespace directory (a
/// mount point) unmounted first.
fn remove_dir(dir: &Path) {
    let _ = nix::mount::umount2(&dir.join("netns"), nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(dir);
}

/// Removes the networks of runs whose process is gone (killed before it
/// could remove its own): a directory whose lock can be taken belongs to
/// no live run.
pub async fn remove_abandoned(run_dir: &Path, conf_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(runs_dir(run_dir)) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        // A run creates its directory just before it locks it.
        let young = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < ABANDONED_AFTER));
        if young {
            continue;
        }
        let Ok(networks) = PodNetworks::open(config_in(&dir, conf_dir)) else {
            continue;
        };
        let report = networks.reconcile(&Default::default()).await;
        if report.failed.is_empty() {
            drop(networks);
            remove_dir(&dir);
            for id in report.removed {
                tracing::info!(pod = %id, "removed the network of a run that was killed");
            }
        }
    }
}
