//! JVM class-data archives for the host's pods (issue 12).
//!
//! A container whose command runs a JVM (found from its command and
//! environment, never from the image's files) gets an archive key: a hash
//! of the image's top layer, the command and the environment variables
//! that change what the JVM loads ([`archive_key`]). When the catalog has
//! a derived layer for that key, the pod holds it and mounts it over the
//! image (the archive appears at `/.podvisor/jvm/app.jsa`), and the agent
//! starts the JVM with it mapped at its base address, with the class and
//! thread counts the training run measured. When it has none, the daemon
//! makes one in the background ([`train`]): one training run per cluster
//! (the derived layer's lock, on this daemon's lease), in a pod VM of its
//! own that runs the container as a pod would, with the JDK told to dump a
//! dynamic archive at exit; after the warm-up the JVM gets SIGTERM, the
//! archive and logs are read out of the VM through the agent (the host
//! never mounts what the guest wrote) and become a layer disk. The pod
//! that asked starts at once without it; its later starts and other pods
//! of the image use it. A JVM that rejects its archive (it says so on its
//! output) gets it forgotten, so the next start makes a new one.
//!
//! The training run uses only the image and the container's command and
//! environment, so its archive holds nothing the image's own code would
//! not load; pods that ask for isolation neither make nor use archives.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podvisor_image::derived::add_derived_layer;
use podvisor_image::{Catalog, ChainId, LayerCache};
use podvisor_podvm::network::no_network;
use podvisor_podvm::{NodeConfig, PodVm, PodVmError, PodVmSpec};
use podvisor_proto::{
    ContainerSpec, GuestMessage, HostMessage, MAX_FILE_CHUNK, Mount, MountSource, MountTarget,
    ProcessSpec, RuntimeSizing,
};
use podvisor_runtime_profile::Runtime;
use podvisor_runtime_profile::jvm_archive::{
    ARCHIVE_IN_LAYER, ARCHIVE_RELEVANT_ENV, TRAINING_ARCHIVE, TRAINING_CLASSES_LOG, TRAINING_DIR,
    TRAINING_THREADS_LOG, is_dynamic_archive, loaded_classes, peak_threads, training_options,
};
use podvisor_vmm::Device;
use sha2::{Digest as _, Sha256};

/// Largest archive read out of a training VM.
const MAX_ARCHIVE: u64 = 512 << 20;
/// Largest training log read.
const MAX_LOG: u64 = 32 << 20;
/// How long the JVM has to dump its archive and exit after SIGTERM.
const DUMP_GRACE: Duration = Duration::from_secs(60);
/// The shared mount the training run writes to (a tmpfs of the VM's).
const TRAINING_MOUNT: &str = "jvm-training";
/// The id of the training run's container.
const TRAINING_CONTAINER: &str = "training";

/// Fact names of a derived archive layer.
pub const FACT_CLASSES: &str = "loadedClasses";
pub const FACT_THREADS: &str = "peakThreads";
pub const FACT_RUNTIME: &str = "runtime";

/// The archive key of a container that runs `process` over an image whose
/// top layer is `top`; `None` unless the process is a JVM.
pub fn archive_key(top: &ChainId, process: &ProcessSpec) -> Option<String> {
    if podvisor_runtime_profile::detect(&process.args, &process.env) != Some(Runtime::Jvm) {
        return None;
    }
    let mut h = Sha256::new();
    h.update(b"podvisor-jvm-archive/1\n");
    h.update(top.to_string().as_bytes());
    for a in &process.args {
        h.update(b"\narg ");
        h.update(a.as_bytes());
    }
    let mut env: Vec<&String> = process
        .env
        .iter()
        .filter(|e| {
            e.split_once('=')
                .is_some_and(|(k, _)| ARCHIVE_RELEVANT_ENV.contains(&k))
        })
        .collect();
    env.sort();
    for e in env {
        h.update(b"\nenv ");
        h.update(e.as_bytes());
    }
    h.update(b"\nuser ");
    h.update(process.user.as_bytes());
    Some(format!("{:x}", h.finalize()))
}

/// What the agent is told about a container's archive: where it is in the
/// container and what the training run measured.
pub fn use_archive(sizing: &mut RuntimeSizing, facts: &BTreeMap<String, String>) {
    sizing.jvm_archive = Some(format!("/{ARCHIVE_IN_LAYER}"));
    sizing.loaded_classes = facts.get(FACT_CLASSES).and_then(|v| v.parse().ok());
    sizing.peak_threads = facts.get(FACT_THREADS).and_then(|v| v.parse().ok());
}

/// A training run to make: the container as a pod runs it, over the
/// image's layer disks.
#[derive(Debug, Clone)]
pub struct TrainingJob {
    pub key: String,
    /// The image's top layer (the archive layer's parent).
    pub top: ChainId,
    /// The image's layers, bottom first (held during the run).
    pub chains: Vec<ChainId>,
    /// The pod's layer devices (virtio-pmem or virtio-blk, as the
    /// container's mounts expect them).
    pub devices: Vec<Device>,
    /// The container as a pod starts it.
    pub container: ContainerSpec,
    pub cpus: u32,
    pub memory_mib: u64,
}

/// Why a training run made no archive.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error("the image catalog")]
    Catalog(#[source] podvisor_image::ImageError),
    #[error("the training VM")]
    Vm(#[source] PodVmError),
    #[error("the training container could not start: {0}")]
    StartFailed(String),
    #[error("reading {path} from the training VM: {reason}")]
    Read { path: String, reason: String },
    #[error("the JVM wrote no dynamic archive (did it exit before its warm-up ended?)")]
    NoArchive,
    #[error("the training VM did not finish within {0:?}")]
    Timeout(Duration),
    #[error("making the archive layer")]
    Layer(#[source] std::io::Error),
}

/// The training runs this daemon has going, by key (one at a time each).
#[derive(Debug, Default, Clone)]
pub struct Trainings {
    running: Arc<Mutex<HashSet<String>>>,
}

impl Trainings {
    /// Starts `job` in the background unless one for its key runs here.
    pub fn spawn(
        &self,
        node: NodeConfig,
        guest: podvisor_guest::GuestArtifacts,
        job: TrainingJob,
        warm_up: Duration,
    ) {
        if !self.running.lock().unwrap().insert(job.key.clone()) {
            return;
        }
        let running = self.running.clone();
        tokio::spawn(async move {
            let key = job.key.clone();
            match train(&node, guest, job, warm_up).await {
                Ok(Some(classes)) => {
                    tracing::info!(archive = %key, loaded_classes = classes, "JVM class-data archive made")
                }
                Ok(None) => {
                    tracing::debug!(archive = %key, "JVM archive made or being made elsewhere")
                }
                Err(e) => {
                    tracing::warn!(archive = %key, "JVM training run: {}", podvisor_errors::ErrorChain(&e))
                }
            }
            running.lock().unwrap().remove(&key);
        });
    }
}

/// Forgets the archive of `key` (a JVM rejected it), logging what happens.
pub async fn forget(node: &NodeConfig, key: &str) {
    let result = match Catalog::open(&node.catalog_url()).await {
        Ok(catalog) => {
            let r = catalog.forget_derived(key).await;
            catalog.close().await;
            r
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            tracing::warn!(archive = %key, "a JVM rejected its class-data archive: forgotten, the next start makes a new one")
        }
        Err(e) => {
            tracing::warn!(archive = %key, "forgetting a rejected JVM archive: {}", podvisor_errors::ErrorChain(&e))
        }
    }
}

/// Runs `job` unless its archive exists or another process is making it;
/// returns the loaded class count of the archive it made.
pub async fn train(
    node: &NodeConfig,
    guest: podvisor_guest::GuestArtifacts,
    job: TrainingJob,
    warm_up: Duration,
) -> Result<Option<u64>, TrainingError> {
    let catalog = Catalog::open(&node.catalog_url())
        .await
        .map_err(TrainingError::Catalog)?;
    let result = train_locked(node, &catalog, guest, job, warm_up).await;
    catalog.close().await;
    result
}

async fn train_locked(
    node: &NodeConfig,
    catalog: &Catalog,
    guest: podvisor_guest::GuestArtifacts,
    job: TrainingJob,
    warm_up: Duration,
) -> Result<Option<u64>, TrainingError> {
    // An archive whose disk is not in this cache (removed, or of an older
    // layer format) is made again.
    let made = catalog
        .derived(&job.key)
        .await
        .map_err(TrainingError::Catalog)?
        .is_some_and(|e| {
            podvisor_image::LayerCache::open(&node.cache_dir)
                .is_ok_and(|cache| cache.get(&e.chain_id).is_some())
        });
    if made
        || !catalog
            .try_lock_derived(&job.key, "jvm training")
            .await
            .map_err(TrainingError::Catalog)?
    {
        return Ok(None);
    }
    let hold = catalog
        .hold_layers(&job.chains, "jvm training", true)
        .await
        .map_err(TrainingError::Catalog)?;
    let result = run_and_record(node, catalog, guest, &job, warm_up).await;
    hold.release().await;
    let _ = catalog.unlock_derived(&job.key).await;
    result.map(Some)
}

async fn run_and_record(
    node: &NodeConfig,
    catalog: &Catalog,
    guest: podvisor_guest::GuestArtifacts,
    job: &TrainingJob,
    warm_up: Duration,
) -> Result<u64, TrainingError> {
    let output = run_training_vm(node, guest, job, warm_up).await?;
    let classes = loaded_classes(&String::from_utf8_lossy(&output.classes_log));
    let mut facts = BTreeMap::from([
        (FACT_CLASSES.to_string(), classes.to_string()),
        (
            FACT_THREADS.to_string(),
            peak_threads(&String::from_utf8_lossy(&output.threads_log)).to_string(),
        ),
    ]);
    if let Some(r) = output.runtime.clone() {
        facts.insert(FACT_RUNTIME.to_string(), r);
    }
    let cache = LayerCache::open(&node.cache_dir).map_err(TrainingError::Catalog)?;
    let dir = tempfile::tempdir_in(cache.root()).map_err(TrainingError::Layer)?;
    let tar = dir.path().join("archive.tar");
    write_archive_tar(&tar, &output.archive).map_err(TrainingError::Layer)?;
    drop(output);
    let (_, _, hold) = add_derived_layer(
        &cache,
        catalog,
        &job.key,
        &job.top,
        &tar,
        facts,
        "jvm archive",
    )
    .await
    .map_err(TrainingError::Catalog)?;
    hold.release().await;
    Ok(classes)
}

/// The layer tar holding `archive` at [`ARCHIVE_IN_LAYER`], read-only,
/// owned by root.
fn write_archive_tar(path: &std::path::Path, archive: &[u8]) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(std::fs::File::create(path)?);
    let mut dirs = String::new();
    let parent = std::path::Path::new(ARCHIVE_IN_LAYER)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    for comp in parent.split('/').filter(|c| !c.is_empty()) {
        dirs.push_str(comp);
        dirs.push('/');
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_cksum();
        builder.append_data(&mut h, &dirs, std::io::empty())?;
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o444);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(archive.len() as u64);
    h.set_cksum();
    builder.append_data(&mut h, ARCHIVE_IN_LAYER, archive)?;
    builder.into_inner()?.sync_all()
}

/// What a training VM left.
struct TrainingOutput {
    archive: Vec<u8>,
    classes_log: Vec<u8>,
    threads_log: Vec<u8>,
    /// The runtime the agent found (`JVM 17.0.15`).
    runtime: Option<String>,
}

/// The training container: the pod's, with a tmpfs of the VM's at
/// [`TRAINING_DIR`] and the JDK told to write there.
fn training_container(job: &TrainingJob) -> ContainerSpec {
    let mut c = job.container.clone();
    c.id = TRAINING_CONTAINER.into();
    if let Some(sizing) = &mut c.runtime {
        sizing.jvm_archive = None;
    }
    let options = training_options();
    match c
        .process
        .env
        .iter_mut()
        .find(|e| e.starts_with("JAVA_TOOL_OPTIONS="))
    {
        Some(e) => {
            e.push(' ');
            e.push_str(&options);
        }
        None => c.process.env.push(format!("JAVA_TOOL_OPTIONS={options}")),
    }
    let shared = Mount {
        source: MountSource::Anonymous,
        fstype: "tmpfs".into(),
        target: MountTarget::Shared {
            name: TRAINING_MOUNT.into(),
        },
        options: vec!["mode=1777".into()],
        read_only: false,
    };
    let bind = Mount {
        source: MountSource::Shared {
            name: TRAINING_MOUNT.into(),
        },
        fstype: "bind".into(),
        target: MountTarget::Container {
            path: TRAINING_DIR.into(),
        },
        options: vec![],
        read_only: false,
    };
    podvisor_proto::add_volume_mounts(&mut c.mounts, vec![shared], vec![bind]);
    c
}

async fn run_training_vm(
    node: &NodeConfig,
    guest: podvisor_guest::GuestArtifacts,
    job: &TrainingJob,
    warm_up: Duration,
) -> Result<TrainingOutput, TrainingError> {
    let id = podvisor_podvm::pod_vm::new_pod_id().map_err(|e| {
        TrainingError::Vm(PodVmError::Io {
            what: "make a training VM id".into(),
            source: std::io::Error::other(e),
        })
    })?;
    let spec = PodVmSpec {
        id,
        cpus: job.cpus,
        memory_mib: job.memory_mib,
        guest,
        devices: job.devices.clone(),
        pci: Default::default(),
        memory: podvisor_vmm::MemoryBacking::Anonymous,
        memory_merge: false,
        // A daemon that dies takes its training runs with it.
        die_with_parent: true,
        netns: None,
    };
    let mut vm = PodVm::boot(node, spec).await.map_err(TrainingError::Vm)?;
    let limit = warm_up + DUMP_GRACE + Duration::from_secs(60);
    let result = tokio::time::timeout(limit, drive(&mut vm, job, warm_up)).await;
    vm.shutdown(Duration::from_secs(2)).await;
    result.map_err(|_| TrainingError::Timeout(limit))?
}

async fn drive(
    vm: &mut PodVm,
    job: &TrainingJob,
    warm_up: Duration,
) -> Result<TrainingOutput, TrainingError> {
    vm.configure_network(&no_network(&job.container.hostname))
        .await
        .map_err(TrainingError::Vm)?;
    vm.send(&HostMessage::StartContainer(training_container(job)))
        .await
        .map_err(TrainingError::Vm)?;
    let mut runtime = None;
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        let event = match stop_at {
            Some(at) => match tokio::time::timeout_at(at, vm.next_event()).await {
                Ok(e) => e,
                Err(_) => {
                    vm.send(&HostMessage::Stop {
                        id: TRAINING_CONTAINER.into(),
                        grace_ms: DUMP_GRACE.as_millis() as u64,
                    })
                    .await
                    .map_err(TrainingError::Vm)?;
                    stop_at = None;
                    continue;
                }
            },
            None => vm.next_event().await,
        }
        .map_err(TrainingError::Vm)?;
        match event {
            GuestMessage::Started { id, .. } if id == TRAINING_CONTAINER => {
                stop_at = Some(tokio::time::Instant::now() + warm_up);
            }
            GuestMessage::ProfileApplied { id, profile } if id == TRAINING_CONTAINER => {
                runtime = Some(podvisor_podvm::agent_link::sanitize_profile(profile).runtime);
            }
            GuestMessage::StartFailed { error, .. } => {
                return Err(TrainingError::StartFailed(
                    podvisor_podvm::agent_link::sanitize_guest_text(&error.message),
                ));
            }
            GuestMessage::Exited { id, .. } if id == TRAINING_CONTAINER => break,
            _ => {}
        }
    }
    let archive = read_file(vm, TRAINING_ARCHIVE, MAX_ARCHIVE).await?;
    if !is_dynamic_archive(&archive) {
        return Err(TrainingError::NoArchive);
    }
    Ok(TrainingOutput {
        archive,
        classes_log: read_file(vm, TRAINING_CLASSES_LOG, MAX_LOG).await?,
        threads_log: read_file(vm, TRAINING_THREADS_LOG, MAX_LOG).await?,
        runtime,
    })
}

/// Reads `path` of the training mount out of the VM, at most `max` bytes.
async fn read_file(vm: &mut PodVm, path: &str, max: u64) -> Result<Vec<u8>, TrainingError> {
    let fail = |reason: String| TrainingError::Read {
        path: format!("{TRAINING_DIR}/{path}"),
        reason,
    };
    let mut data = Vec::new();
    loop {
        vm.send(&HostMessage::ReadSharedFile {
            name: TRAINING_MOUNT.into(),
            path: path.into(),
            offset: data.len() as u64,
        })
        .await
        .map_err(TrainingError::Vm)?;
        let (chunk, eof) = loop {
            match vm.next_event().await.map_err(TrainingError::Vm)? {
                GuestMessage::SharedFileData { error: Some(e), .. } => {
                    return Err(fail(podvisor_podvm::agent_link::sanitize_guest_text(&e)));
                }
                GuestMessage::SharedFileData { data, eof, .. } => break (data, eof),
                _ => {}
            }
        };
        if chunk.len() > MAX_FILE_CHUNK || data.len() as u64 + chunk.len() as u64 > max {
            return Err(fail(format!("larger than {max} bytes")));
        }
        let empty = chunk.is_empty();
        data.extend_from_slice(&chunk);
        if eof || empty {
            return Ok(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_image::Digest;

    fn process(args: &[&str], env: &[&str]) -> ProcessSpec {
        ProcessSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            cwd: "/".into(),
            user: String::new(),
            terminal: None,
            stdin: false,
        }
    }

    #[test]
    fn a_jvm_gets_a_key_that_follows_what_it_loads() {
        let top = ChainId::extend(None, &Digest::sha256_of(b"layer"));
        let jar = process(&["java", "-jar", "/app/app.jar"], &["PATH=/bin", "DB=x"]);
        let key = archive_key(&top, &jar).unwrap();
        assert_eq!(key.len(), 64);
        // What does not change the loaded classes keeps the key.
        let other_db = process(&["java", "-jar", "/app/app.jar"], &["PATH=/bin", "DB=y"]);
        assert_eq!(archive_key(&top, &other_db).unwrap(), key);
        // The class path, the flags, the command and the image change it.
        let cp = process(
            &["java", "-jar", "/app/app.jar"],
            &["CLASSPATH=/x", "PATH=/bin"],
        );
        assert_ne!(archive_key(&top, &cp).unwrap(), key);
        let args = process(&["java", "-jar", "/app/other.jar"], &[]);
        assert_ne!(archive_key(&top, &args).unwrap(), key);
        let image = ChainId::extend(Some(&top), &Digest::sha256_of(b"more"));
        assert_ne!(archive_key(&image, &jar).unwrap(), key);
        assert_eq!(archive_key(&top, &process(&["node", "app.js"], &[])), None);
    }

    #[test]
    fn the_training_container_writes_to_its_own_tmpfs() {
        let job = TrainingJob {
            key: "k".into(),
            top: ChainId::extend(None, &Digest::sha256_of(b"layer")),
            chains: vec![],
            devices: vec![],
            container: ContainerSpec {
                id: "app".into(),
                hostname: "web".into(),
                mounts: podvisor_proto::image_mounts(&["pvl0".into()]),
                process: process(&["java", "-jar", "/a.jar"], &["JAVA_TOOL_OPTIONS=-Xss512k"]),
                runtime: Some(RuntimeSizing::whole_vm()),
            },
            cpus: 1,
            memory_mib: 512,
        };
        let c = training_container(&job);
        assert_eq!(c.id, TRAINING_CONTAINER);
        let tool = c
            .process
            .env
            .iter()
            .find_map(|e| e.strip_prefix("JAVA_TOOL_OPTIONS="))
            .unwrap();
        assert!(
            tool.starts_with("-Xss512k -XX:ArchiveClassesAtExit="),
            "{tool}"
        );
        let names: Vec<_> = c.mounts.iter().map(|m| (&m.fstype, &m.target)).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert_eq!(c.mounts[1].fstype, "tmpfs");
        assert_eq!(c.mounts[2].target, MountTarget::Root);
        assert_eq!(
            c.mounts[3].target,
            MountTarget::Container {
                path: TRAINING_DIR.into()
            }
        );
    }

    #[test]
    fn the_archive_tar_is_a_layer_with_the_file_where_pods_look() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        write_archive_tar(&path, b"archive").unwrap();
        let mut ar = tar::Archive::new(std::fs::File::open(&path).unwrap());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec![".podvisor/", ".podvisor/jvm/", ARCHIVE_IN_LAYER]
        );
    }
}
