//! Pods' attachments to the host's CNI network, made crash-safe by an intent
//! record per pod: written (atomically) before the pod's namespace exists,
//! updated with the CNI result after ADD, removed only after DEL has
//! finished and the namespace is gone. The records also hold the pods'
//! published ports, so the host-port registry survives a restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::atomic_file::{remove_durably, write_atomically};
use crate::cni::conf::{DefaultNetwork, NetworkConfList, load_or_write_default};
use crate::cni::{CniAttachment, CniError, CniResult, CniRuntime, IpPrefix, PodIdentity};
use crate::host_ports::{PortHold, PortMapping, first_collision};
use crate::netns::{self, NetnsError};
use crate::plugin_quirks;
use crate::vm_nic::{self, TapMode, VmNic, VmNicError};

const RECORD_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PodNetworkError {
    #[error(
        "pod network id {0:?} is not 1-64 letters, digits, '-', '_' or '.' (not starting with '.')"
    )]
    BadId(String),
    #[error("pod {0} already has a network attachment")]
    AlreadyAttached(String),
    #[error("pod {0} has no network attachment")]
    NotAttached(String),
    #[error("pod {0}'s network attachment is being changed by another call")]
    Busy(String),
    #[error("{0}")]
    BadPortMapping(String),
    #[error("host port {wanted} of pod {pod} is taken by pod {holder} ({held})")]
    HostPortTaken {
        pod: String,
        wanted: PortMapping,
        holder: String,
        held: PortMapping,
    },
    #[error("host port {wanted} of pod {pod} is in use on this host")]
    HostPortInUse {
        pod: String,
        wanted: PortMapping,
        #[source]
        source: io::Error,
    },
    #[error("the network state directory {dir} is used by another podvisor process")]
    StateLocked { dir: PathBuf },
    #[error("network state {path}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    VmNic(#[from] VmNicError),
    #[error("CNI ADD of pod {pod} failed{}", if *left_for_reconcile { "; undoing it failed too, its record stays for reconcile" } else { "; what it set up was removed" })]
    AddFailed {
        pod: String,
        left_for_reconcile: bool,
        #[source]
        source: Box<PodNetworkError>,
    },
    #[error("CNI DEL of pod {pod} failed; its namespace and record stay for another try")]
    DelFailed {
        pod: String,
        #[source]
        source: CniError,
    },
    #[error("CNI result of pod {pod}: {reason}")]
    BadResult { pod: String, reason: String },
}

/// Where and how pods are attached.
#[derive(Debug, Clone)]
pub struct PodNetworkConfig {
    /// The CNI configuration directory; its first file by name is used.
    pub conf_dir: PathBuf,
    /// Written to `conf_dir` when it has no configuration.
    pub default_network: DefaultNetwork,
    pub cni: CniRuntime,
    /// Pods' namespace pins, `<netns_dir>/<id>`.
    pub netns_dir: PathBuf,
    /// Intent records, `<state_dir>/<id>.json`. Keep it on disk that
    /// survives a reboot as host-local's IPAM files do: after a reboot the
    /// records still tell reconcile which addresses to release.
    pub state_dir: PathBuf,
    /// The pod's interface name (`CNI_IFNAME`).
    pub ifname: String,
}

impl Default for PodNetworkConfig {
    fn default() -> Self {
        Self {
            conf_dir: "/etc/cni/net.d".into(),
            default_network: DefaultNetwork::default(),
            cni: CniRuntime::default(),
            netns_dir: "/run/podvisor/netns".into(),
            state_dir: "/var/lib/podvisor/net".into(),
            ifname: "eth0".into(),
        }
    }
}

/// What ADD has reached for a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachmentPhase {
    /// Written before the namespace exists; ADD has not finished.
    Intended,
    /// ADD finished; `result` is its result.
    Attached,
}

/// The intent record of one pod's attachment, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub version: u32,
    pub id: String,
    pub pod: PodIdentity,
    pub netns: PathBuf,
    pub ifname: String,
    /// The network list ADD ran (DEL runs the same, whatever the
    /// configuration directory holds by then).
    pub network: Value,
    pub port_mappings: Vec<PortMapping>,
    pub phase: AttachmentPhase,
    /// The last result the chain produced: the full ADD result once
    /// attached, the partial one of an ADD that stopped halfway.
    pub result: Option<Value>,
}

/// A request to attach a pod.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    /// The pod sandbox id (`CNI_CONTAINERID`, the namespace and record name).
    pub id: String,
    pub pod: PodIdentity,
    pub port_mappings: Vec<PortMapping>,
}

/// An attached pod: its namespace and the CNI's result.
#[derive(Debug, Clone, PartialEq)]
pub struct PodAttachment {
    pub id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub network_name: String,
    pub result: CniResult,
    pub port_mappings: Vec<PortMapping>,
}

/// What the guest agent needs to configure the pod's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNetwork {
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Addresses for the guest's eth0, with prefix lengths.
    pub addresses: Vec<crate::cni::IpPrefix>,
    /// Routes from the CNI result; a route without `gw` goes via the
    /// gateway of the address in its family, as the CNI spec says.
    pub routes: Vec<crate::cni::CniRoute>,
    pub gateways: Vec<std::net::IpAddr>,
    pub dns: crate::cni::CniDns,
}

impl PodAttachment {
    /// Combines the CNI result with the NIC that was made for the VM.
    pub fn guest_network(&self, nic: &VmNic) -> GuestNetwork {
        let ips = self.result.pod_ips(&self.ifname);
        GuestNetwork {
            mac: nic.mac,
            mtu: nic.mtu,
            addresses: ips.iter().map(|ip| ip.address).collect(),
            gateways: ips.iter().filter_map(|ip| ip.gateway).collect(),
            routes: self.result.routes.clone(),
            dns: self.result.dns.clone(),
        }
    }

    /// The pod's addresses without prefix (status.podIPs).
    pub fn pod_ips(&self) -> Vec<std::net::IpAddr> {
        self.result
            .pod_ips(&self.ifname)
            .iter()
            .map(|ip| ip.address.addr)
            .collect()
    }
}

/// What [`PodNetworks::reconcile`] did.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// Attachments of pods no longer live that were torn down.
    pub removed: Vec<String>,
    /// Attachments whose teardown failed (left for the next round).
    pub failed: Vec<(String, PodNetworkError)>,
    /// Namespace pins with no record, removed.
    pub stray_namespaces: Vec<PathBuf>,
}

struct Registry {
    records: HashMap<String, AttachmentRecord>,
    /// The sockets holding each pod's published ports (see
    /// [`crate::host_ports`]), for as long as its record exists.
    holds: HashMap<String, PortHold>,
    busy: HashSet<String>,
}

/// The host's pod attachments: attach, detach, check, reconcile.
pub struct PodNetworks {
    config: PodNetworkConfig,
    registry: Mutex<Registry>,
    _lock: File,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Marks an id busy for the life of the guard.
struct BusyGuard<'a> {
    networks: &'a PodNetworks,
    id: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.networks.registry.lock().unwrap().busy.remove(&self.id);
    }
}

impl PodNetworks {
    /// Opens the state directory (one process at a time: it is locked) and
    /// loads the records there.
    pub fn open(config: PodNetworkConfig) -> Result<Self, PodNetworkError> {
        let state = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PodNetworkError::State { path, source }
        };
        fs::create_dir_all(&config.state_dir).map_err(state(&config.state_dir))?;
        let lock_path = config.state_dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(state(&lock_path))?;
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(PodNetworkError::StateLocked {
                dir: config.state_dir.clone(),
            });
        }
        netns::prepare_dir(&config.netns_dir)?;
        let mut records = HashMap::new();
        for entry in fs::read_dir(&config.state_dir).map_err(state(&config.state_dir))? {
            let path = entry.map_err(state(&config.state_dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(state(&path))?;
            match serde_json::from_slice::<AttachmentRecord>(&bytes) {
                Ok(r) if r.version == RECORD_VERSION && valid_id(&r.id) => {
                    records.insert(r.id.clone(), r);
                }
                Ok(r) => {
                    tracing::warn!(path = %path.display(), version = r.version, "ignoring a network record of another version")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable network record")
                }
            }
        }
        // Hold the ports of the pods this process takes over again (a
        // restarted host daemon). One that something else took meanwhile
        // stays redirected to its pod by portmap, but is not held.
        let mut holds = HashMap::new();
        for r in records.values() {
            match PortHold::bind(&r.port_mappings) {
                Ok(hold) => {
                    holds.insert(r.id.clone(), hold);
                }
                Err((pm, e)) => {
                    tracing::warn!(pod = %r.id, port = %pm, error = %e, "cannot hold a published port again")
                }
            }
        }
        Ok(Self {
            config,
            registry: Mutex::new(Registry {
                records,
                holds,
                busy: HashSet::new(),
            }),
            _lock: lock,
        })
    }

    pub fn config(&self) -> &PodNetworkConfig {
        &self.config
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.config.state_dir.join(format!("{id}.json"))
    }

    fn store(&self, record: &AttachmentRecord) -> Result<(), PodNetworkError> {
        let path = self.record_path(&record.id);
        let bytes = serde_json::to_vec_pretty(record).expect("a record serializes");
        write_atomically(&path, &bytes, 0o600)
            .map_err(|source| PodNetworkError::State { path, source })?;
        self.registry
            .lock()
            .unwrap()
            .records
            .insert(record.id.clone(), record.clone());
        Ok(())
    }

    fn forget(&self, id: &str) -> Result<(), PodNetworkError> {
        let path = self.record_path(id);
        remove_durably(&path).map_err(|source| PodNetworkError::State { path, source })?;
        let mut reg = self.registry.lock().unwrap();
        reg.records.remove(id);
        reg.holds.remove(id);
        Ok(())
    }

    fn claim(&self, id: &str) -> Result<BusyGuard<'_>, PodNetworkError> {
        if !self.registry.lock().unwrap().busy.insert(id.to_string()) {
            return Err(PodNetworkError::Busy(id.to_string()));
        }
        Ok(BusyGuard {
            networks: self,
            id: id.to_string(),
        })
    }

    /// The ids that have a record (attached or half-made).
    pub fn attached_ids(&self) -> Vec<String> {
        let mut ids: Vec<_> = self
            .registry
            .lock()
            .unwrap()
            .records
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// The record of `id`, as stored.
    pub fn record(&self, id: &str) -> Option<AttachmentRecord> {
        self.registry.lock().unwrap().records.get(id).cloned()
    }

    /// The attachment of `id` once ADD has finished (e.g. to adopt a running
    /// pod after a restart).
    pub fn attachment(&self, id: &str) -> Option<PodAttachment> {
        let record = self.record(id)?;
        if record.phase != AttachmentPhase::Attached {
            return None;
        }
        attachment_of(&record).ok()
    }

    /// Every published port and the pod holding it.
    pub fn host_ports(&self) -> Vec<(PortMapping, String)> {
        let reg = self.registry.lock().unwrap();
        let mut ports: Vec<_> = reg
            .records
            .values()
            .flat_map(|r| r.port_mappings.iter().map(|p| (*p, r.id.clone())))
            .collect();
        ports.sort_by_key(|(p, id)| (p.host_port, id.clone()));
        ports
    }

    /// Checks, reserves (in the intent record) and sets up: namespace, then
    /// CNI ADD. Fails before anything exists when the configuration is bad,
    /// a plugin is missing or a host port is taken; an ADD that fails halfway
    /// is undone.
    pub async fn attach(&self, req: AttachRequest) -> Result<PodAttachment, PodNetworkError> {
        let id = req.id.clone();
        if !valid_id(&id) {
            return Err(PodNetworkError::BadId(id));
        }
        for pm in &req.port_mappings {
            pm.validate().map_err(PodNetworkError::BadPortMapping)?;
        }
        for (i, pm) in req.port_mappings.iter().enumerate() {
            if let Some(dup) = req.port_mappings[..i].iter().find(|p| p.collides_with(pm)) {
                return Err(PodNetworkError::HostPortTaken {
                    pod: id.clone(),
                    wanted: *pm,
                    holder: id.clone(),
                    held: *dup,
                });
            }
        }
        let (list, _path) =
            load_or_write_default(&self.config.conf_dir, &self.config.default_network)?;
        self.config.cni.check_plugins_installed(&list)?;
        let _busy = self.claim(&id)?;
        let record = AttachmentRecord {
            version: RECORD_VERSION,
            id: id.clone(),
            pod: req.pod.clone(),
            netns: self.config.netns_dir.join(&id),
            ifname: self.config.ifname.clone(),
            network: list.to_json(),
            port_mappings: req.port_mappings.clone(),
            phase: AttachmentPhase::Intended,
            result: None,
        };
        // The port reservation and the intent are one write, made before
        // the namespace exists.
        self.store_reserving(&record)?;
        if let Err(e) = netns::create_pinned(&record.netns).await {
            self.forget(&id)?;
            return Err(e.into());
        }
        let caps = capability_args(&record.port_mappings);
        let att = CniAttachment {
            container_id: &id,
            netns: Some(&record.netns),
            ifname: &record.ifname,
            pod: &record.pod,
            capability_args: &caps,
        };
        let started = std::time::Instant::now();
        // Each plugin's result is recorded as soon as it changes, so that
        // after a crash DEL gets the addresses the chain had reached.
        let mut progress = record.clone();
        let mut failure = None;
        for i in 0..list.plugins.len() {
            match self
                .config
                .cni
                .add_plugin(&list, i, progress.result.as_ref(), &att)
                .await
            {
                Ok(result) => {
                    if progress.result.as_ref() != Some(&result) {
                        progress.result = Some(result);
                        if i + 1 < list.plugins.len() {
                            self.store(&progress)?;
                        }
                    }
                }
                Err(e) => {
                    failure = Some(PodNetworkError::Cni(e));
                    break;
                }
            }
        }
        tracing::debug!(pod = %id, elapsed = ?started.elapsed(), "CNI ADD");
        let failure = match failure {
            Some(e) => (e, progress.result),
            None => {
                let raw = progress.result.clone().unwrap_or(Value::Null);
                match CniResult::from_json(&raw) {
                    Ok(_) => {
                        let attached = AttachmentRecord {
                            phase: AttachmentPhase::Attached,
                            ..progress
                        };
                        self.store(&attached)?;
                        return attachment_of(&attached);
                    }
                    Err(reason) => (
                        PodNetworkError::BadResult {
                            pod: id.clone(),
                            reason,
                        },
                        Some(raw),
                    ),
                }
            }
        };
        let (error, partial) = failure;
        let half_made = AttachmentRecord {
            result: partial,
            ..record.clone()
        };
        // Keep what DEL needs on disk first: if podvisor dies while undoing,
        // reconcile finishes the job.
        self.store(&half_made)?;
        let left_for_reconcile = match self.teardown(&half_made).await {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(pod = %id, error = %e, "undoing a failed CNI ADD failed");
                true
            }
        };
        Err(PodNetworkError::AddFailed {
            pod: id,
            left_for_reconcile,
            source: Box::new(error),
        })
    }

    /// Inserts a new record in the registry, refusing an id that has one or
    /// a host port another pod holds (both checked under the registry lock)
    /// or that cannot be held on the host (another process has it), and
    /// writes it.
    fn store_reserving(&self, record: &AttachmentRecord) -> Result<(), PodNetworkError> {
        {
            let mut reg = self.registry.lock().unwrap();
            if reg.records.contains_key(&record.id) {
                return Err(PodNetworkError::AlreadyAttached(record.id.clone()));
            }
            let held: Vec<(PortMapping, String)> = reg
                .records
                .values()
                .flat_map(|r| r.port_mappings.iter().map(|p| (*p, r.id.clone())))
                .collect();
            if let Some((wanted, h)) =
                first_collision(&record.port_mappings, held.iter().map(|(p, _)| p))
            {
                let holder = held
                    .iter()
                    .find(|(p, _)| p == h)
                    .map(|(_, id)| id.clone())
                    .unwrap_or_default();
                return Err(PodNetworkError::HostPortTaken {
                    pod: record.id.clone(),
                    wanted: *wanted,
                    holder,
                    held: *h,
                });
            }
            let hold = PortHold::bind(&record.port_mappings).map_err(|(wanted, source)| {
                PodNetworkError::HostPortInUse {
                    pod: record.id.clone(),
                    wanted,
                    source,
                }
            })?;
            reg.records.insert(record.id.clone(), record.clone());
            reg.holds.insert(record.id.clone(), hold);
        }
        let path = self.record_path(&record.id);
        let bytes = serde_json::to_vec_pretty(record).expect("a record serializes");
        if let Err(source) = write_atomically(&path, &bytes, 0o600) {
            let mut reg = self.registry.lock().unwrap();
            reg.records.remove(&record.id);
            reg.holds.remove(&record.id);
            return Err(PodNetworkError::State { path, source });
        }
        Ok(())
    }

    /// Tears down the attachment of a pod: CNI DEL with the stored result
    /// (the namespace still there), then the namespace, then the record.
    pub async fn detach(&self, id: &str) -> Result<(), PodNetworkError> {
        let _busy = self.claim(id)?;
        let record = self
            .record(id)
            .ok_or_else(|| PodNetworkError::NotAttached(id.to_string()))?;
        self.teardown(&record).await
    }

    async fn teardown(&self, record: &AttachmentRecord) -> Result<(), PodNetworkError> {
        let list = NetworkConfList::parse(
            record.network.to_string().as_bytes(),
            &self.record_path(&record.id),
        )?;
        let mut pinned = netns::is_pinned(&record.netns);
        if !pinned {
            // An empty mount point left by a crash before the mount, if any.
            netns::remove_pinned(&record.netns)?;
            let addrs: Vec<IpPrefix> = record
                .result
                .as_ref()
                .and_then(|raw| CniResult::from_json(raw).ok())
                .map(|r| {
                    r.pod_ips(&record.ifname)
                        .iter()
                        .map(|ip| ip.address)
                        .collect()
                })
                .unwrap_or_default();
            if !addrs.is_empty() {
                match stand_in_namespace(&record.netns, &record.ifname, addrs).await {
                    Ok(()) => pinned = true,
                    Err(e) => {
                        tracing::warn!(pod = %record.id, error = %e, "no stand-in namespace for DEL")
                    }
                }
            }
        }
        let caps = capability_args(&record.port_mappings);
        let att = CniAttachment {
            container_id: &record.id,
            netns: pinned.then_some(record.netns.as_path()),
            ifname: &record.ifname,
            pod: &record.pod,
            capability_args: &caps,
        };
        let started = std::time::Instant::now();
        let masquerade_chain = plugin_quirks::bridge_masquerade_chain(&list, &record.id);
        if let Some(chain) = &masquerade_chain {
            plugin_quirks::before_del(chain).await;
        }
        let deleted = self
            .config
            .cni
            .del(&list, &att, record.result.as_ref())
            .await;
        if let Some(chain) = &masquerade_chain {
            plugin_quirks::after_del(chain).await;
        }
        deleted.map_err(|source| PodNetworkError::DelFailed {
            pod: record.id.clone(),
            source,
        })?;
        tracing::debug!(pod = %record.id, elapsed = ?started.elapsed(), "CNI DEL");
        netns::remove_pinned(&record.netns)?;
        self.forget(&record.id)
    }

    /// CNI CHECK of an attached pod.
    pub async fn check(&self, id: &str) -> Result<(), PodNetworkError> {
        let record = self
            .record(id)
            .ok_or_else(|| PodNetworkError::NotAttached(id.to_string()))?;
        let (Some(result), AttachmentPhase::Attached) = (&record.result, record.phase) else {
            return Err(PodNetworkError::NotAttached(id.to_string()));
        };
        let list =
            NetworkConfList::parse(record.network.to_string().as_bytes(), &self.record_path(id))?;
        let caps = capability_args(&record.port_mappings);
        let att = CniAttachment {
            container_id: &record.id,
            netns: Some(&record.netns),
            ifname: &record.ifname,
            pod: &record.pod,
            capability_args: &caps,
        };
        Ok(self.config.cni.check(&list, &att, result).await?)
    }

    /// Tears down every attachment whose pod is not in `live` (half-made ones
    /// included), and removes namespace pins that have no record.
    pub async fn reconcile(&self, live: &HashSet<String>) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        for id in self.attached_ids() {
            if live.contains(&id) {
                continue;
            }
            match self.detach(&id).await {
                Ok(()) => report.removed.push(id),
                Err(PodNetworkError::Busy(_)) => {}
                Err(e) => report.failed.push((id, e)),
            }
        }
        if let Ok(entries) = fs::read_dir(&self.config.netns_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let known = {
                    let reg = self.registry.lock().unwrap();
                    reg.records.contains_key(&name) || reg.busy.contains(&name)
                };
                if !known && !live.contains(&name) && netns::remove_pinned(&entry.path()).is_ok() {
                    report.stray_namespaces.push(entry.path());
                }
            }
        }
        report
    }

    /// Makes the VM's tap in the pod's namespace, joined to its CNI
    /// interface, and returns it with what the guest needs.
    pub async fn attach_vm_nic(
        &self,
        id: &str,
        tap_name: &str,
        mode: TapMode,
    ) -> Result<(VmNic, GuestNetwork), PodNetworkError> {
        let attachment = self
            .attachment(id)
            .ok_or_else(|| PodNetworkError::NotAttached(id.to_string()))?;
        let nic = vm_nic::attach(&attachment.netns, &attachment.ifname, tap_name, mode).await?;
        let guest = attachment.guest_network(&nic);
        Ok((nic, guest))
    }
}

/// A namespace in place of one that vanished before DEL (deleted by hand,
/// or a crash in the middle of removal), holding an `ifname` with the pod's
/// addresses: the bridge plugin's DEL reads them there to remove the pod's
/// masquerade rules, which it otherwise leaves behind.
async fn stand_in_namespace(
    path: &Path,
    ifname: &str,
    addrs: Vec<IpPrefix>,
) -> Result<(), PodNetworkError> {
    netns::create_pinned(path).await?;
    let ifname = ifname.to_string();
    let made = netns::run_netlink_in(path, move |handle| async move {
        handle
            .link()
            .add(rtnetlink::LinkVeth::new(&ifname, "podvisor-peer").build())
            .execute()
            .await?;
        let mut links = handle.link().get().match_name(ifname).execute();
        let Some(link) = futures_util::TryStreamExt::try_next(&mut links).await? else {
            return Ok(());
        };
        for a in addrs {
            handle
                .address()
                .add(link.header.index, a.addr, a.prefix_len)
                .execute()
                .await?;
        }
        Ok::<(), rtnetlink::Error>(())
    })
    .await?;
    made.map_err(|source| {
        PodNetworkError::VmNic(VmNicError::Netlink {
            step: "making a stand-in namespace".into(),
            source,
        })
    })
}

fn capability_args(ports: &[PortMapping]) -> BTreeMap<String, Value> {
    let mut caps = BTreeMap::new();
    if !ports.is_empty() {
        caps.insert(
            "portMappings".to_string(),
            serde_json::to_value(ports).expect("ports serialize"),
        );
    }
    caps
}

fn attachment_of(record: &AttachmentRecord) -> Result<PodAttachment, PodNetworkError> {
    let bad = |reason: String| PodNetworkError::BadResult {
        pod: record.id.clone(),
        reason,
    };
    let raw = record
        .result
        .as_ref()
        .ok_or_else(|| bad("no result stored".into()))?;
    let result = CniResult::from_json(raw).map_err(bad)?;
    Ok(PodAttachment {
        id: record.id.clone(),
        netns: record.netns.clone(),
        ifname: record.ifname.clone(),
        network_name: record
            .network
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        result,
        port_mappings: record.port_mappings.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_safe_file_names() {
        assert!(valid_id("pod-1_a.b"));
        for bad in ["", ".hidden", "a/b", "..", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_second_open_of_one_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = PodNetworkConfig {
            state_dir: dir.path().join("state"),
            netns_dir: dir.path().join("netns"),
            ..PodNetworkConfig::default()
        };
        fs::create_dir_all(&config.state_dir).unwrap();
        let first = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(config.state_dir.join("lock"))
            .unwrap();
        // SAFETY: flock on an fd we own.
        let locked = unsafe { libc::flock(first.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(locked, 0);
        match PodNetworks::open(config) {
            Err(PodNetworkError::StateLocked { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a locked state dir was opened"),
        }
    }
}
