//! `podvisor run`: one pod VM with one container, attached to the user's
//! stdio, from start to finish.
//!
//! [`run`] takes a pod request (image, resources, overrides), gets the
//! image's layer disks from the global cache, pulling or importing what is
//! missing and holding them in the catalog while the pod runs
//! ([`podvisor_image::acquire()`]), prepares the guest boot artifacts
//! ([`podvisor_guest`]), forks the pod VM from a template or boots it cold
//! ([`podvisor_template::fork`], [`podvisor_podvm::PodVm`]), then starts the
//! container, relays stdio, signals and terminal resizes, and reports how
//! the container ended, with the time of each stage. Terminal handling and
//! output formatting belong to the CLI. The pod's network (CNI, `-p`
//! ports) is attached for the run and removed when it ends, also when the
//! run fails ([`NetworkChoice`], [`RunNetwork`]).

use std::sync::Arc;
use std::time::Instant;

use podvisor_image::progress::PullProgress;
use podvisor_image::{HoldFor, ImageSource, LayerAttachments};
use podvisor_podvm::agent_link::{sanitize_guest_text, sanitize_profile};
use podvisor_podvm::container::{ContainerOverrides, ContainerSpecError, process_spec};
use podvisor_podvm::network;
use podvisor_podvm::pod_vm::new_pod_id;
use podvisor_podvm::{
    LayerBus, NodeConfig, PodVm, PodVmError, PodVmSpec, Timings, layer_devices, layer_mounts,
};
use podvisor_proto::{
    ContainerSpec, ExitStatus, GuestMessage, HostMessage, RuntimeSizing, StartError, Stream,
    TerminalSize,
};
use podvisor_template::{ForkRequest, TemplateChoice, TemplateError, build::WARM_CONTAINER_ID};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

mod network_choice;
mod volumes;
pub use network_choice::{NetworkChoice, RunNetwork, remove_abandoned};
pub use volumes::{
    DEFAULT_VOLUME_BYTES, NamedVolume, RunVolumeError, RunVolumes, parse_volume_arg,
};

/// Id of the one container of a `podvisor run` pod (a warm template's
/// container has it too: a clone attaches to it).
const CONTAINER_ID: &str = WARM_CONTAINER_ID;

/// What to run.
#[derive(Debug, Clone)]
pub struct PodRequest {
    /// Pod name; also the container's hostname. `None`: the pod id.
    pub name: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The image: a registry reference or a local layout or archive.
    pub image: ImageSource,
    pub overrides: ContainerOverrides,
    /// Which VM template to fork from (`Auto`: the deepest that serves it).
    pub template: TemplateChoice,
    /// Share no memory with other pods: boot cold, never from a template,
    /// layers on virtio-blk (never mapped from the host's page cache).
    pub isolated: bool,
    /// Size the container's language runtime to the VM (`--runtime-profile
    /// auto`, the default); `false` leaves it to its own defaults.
    pub runtime_profile: bool,
    /// The pod's network: CNI (with published ports) or only `lo`.
    pub network: NetworkChoice,
    /// The pod's resolver settings and `/etc/hosts` aliases (docker's
    /// `--dns`, `--dns-search`, `--dns-option`, `--add-host`), applied to
    /// the network's DNS by [`network::apply_pod_dns`].
    pub dns: network::PodDns,
    /// Named volumes (`-v NAME:/path[:ro]`), kept in `volume_dir`.
    pub volumes: Vec<NamedVolume>,
    /// Where named volumes' disks are kept.
    pub volume_dir: std::path::PathBuf,
}

/// Errors of running a pod.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    PodVm(#[from] PodVmError),
    #[error(transparent)]
    Guest(#[from] podvisor_guest::GuestError),
    #[error(transparent)]
    Spec(#[from] ContainerSpecError),
    #[error(transparent)]
    Network(#[from] podvisor_net::pod_network::PodNetworkError),
    #[error(transparent)]
    Volume(#[from] RunVolumeError),
    /// A template the pod named does not fit, or templates are unusable in
    /// a way a cold boot would not help with.
    #[error(transparent)]
    Template(TemplateError),
}

impl From<TemplateError> for RunError {
    /// A template's guest that does not boot is the pod VM's failure: a
    /// cold boot would fail alike.
    fn from(e: TemplateError) -> RunError {
        match e {
            TemplateError::Boot(e) => RunError::PodVm(e),
            e => RunError::Template(e),
        }
    }
}

/// Requests from the user while the container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The user's terminal changed size.
    Resize(TerminalSize),
    /// Deliver this signal to the container's process.
    Signal(i32),
    /// Stop the container (SIGTERM, then SIGKILL after the grace period).
    Stop,
}

/// The user's side of the container's stdio.
pub struct PodIo {
    pub stdout: Box<dyn AsyncWrite + Unpin + Send>,
    pub stderr: Box<dyn AsyncWrite + Unpin + Send>,
    /// Forwarded to the container when it was started with stdin.
    pub stdin: Option<Box<dyn AsyncRead + Unpin + Send>>,
    pub control: mpsc::Receiver<Control>,
    /// Told how a pull of the image goes.
    pub pull_progress: Arc<dyn PullProgress>,
}

/// How the container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exited(ExitStatus),
    StartFailed(StartError),
}

/// Result of a pod run.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub pod_id: String,
    pub outcome: Outcome,
    pub timings: Timings,
}

impl RunReport {
    /// The exit code `podvisor run` exits with, as `docker run` would.
    pub fn exit_code(&self) -> i32 {
        match &self.outcome {
            Outcome::Exited(s) => s.shell_code(),
            Outcome::StartFailed(e) => e.kind.exit_code(),
        }
    }
}

/// Runs a pod to completion: get the image (pulling or importing it into
/// the global cache, its layers held for the pod until it ends), boot the
/// VM, run the container, relay its stdio, shut the VM down and remove its
/// files.
pub async fn run(cfg: &NodeConfig, req: PodRequest, io: PodIo) -> Result<RunReport, RunError> {
    let t0 = Instant::now();
    let pod_id = new_pod_id().map_err(PodVmError::from)?;
    let hostname = req.name.clone().unwrap_or_else(|| pod_id.clone());
    let network = match &req.network {
        NetworkChoice::None => None,
        NetworkChoice::Cni { conf_dir, ports } => {
            Some(RunNetwork::attach(&cfg.run_dir, conf_dir, &pod_id, &hostname, ports).await?)
        }
    };
    let result = run_pod(cfg, req, io, t0, &pod_id, &hostname, network.as_ref()).await;
    if let Some(network) = network {
        network.remove().await;
    }
    result
}

/// [`run`] once the pod's network (if any) is attached.
async fn run_pod(
    cfg: &NodeConfig,
    req: PodRequest,
    io: PodIo,
    t0: Instant,
    pod_id: &str,
    hostname: &str,
    network: Option<&RunNetwork>,
) -> Result<RunReport, RunError> {
    let mut timings = Timings::default();
    let pod_id = pod_id.to_string();
    let (cache, catalog) = cfg.open_images().await.map_err(PodVmError::from)?;
    let held = podvisor_image::acquire(
        &cache,
        &catalog,
        &req.image,
        &cfg.pull_options(),
        &HoldFor::process(format!("pod {pod_id}")),
        io.pull_progress.clone(),
    )
    .await
    .map_err(PodVmError::from)?;
    let image = &held.image;
    let mut layers = LayerAttachments::default();
    let serials = layers.add_image(image);
    let process = process_spec(&image.config, &req.overrides)?;
    let volumes = RunVolumes::open(&req.volume_dir, &req.volumes)?;
    let guest = podvisor_guest::prepare(&podvisor_guest::GuestOptions {
        kernel: cfg.kernel.clone(),
        agent: cfg.agent.clone(),
        extra_modules: vec![],
        cache_dir: cfg.cache_dir.clone(),
    })?;
    // The container and the VM with the layers on `bus`: a template's
    // clone has them on virtio-blk, as its template; a cold boot on
    // virtio-pmem with DAX unless the pod asks for isolation.
    let container_on = |bus| {
        let mut mounts = layer_mounts(&layers, &serials, bus);
        volumes.add_mounts(&mut mounts);
        ContainerSpec {
            id: CONTAINER_ID.into(),
            hostname: hostname.to_string(),
            mounts,
            process: process.clone(),
            runtime: req.runtime_profile.then(RuntimeSizing::whole_vm),
        }
    };
    let container = container_on(LayerBus::Block);
    let nic = match network {
        Some(n) => Some(podvisor_podvm::network::pod_nic(&n.networks, &n.id).await?),
        None => None,
    };
    let mut net_config = match &nic {
        Some(nic) => network::guest_config(&nic.guest, hostname, &network::host_dns()),
        None => network::no_network(hostname),
    };
    for w in network::apply_pod_dns(&mut net_config, &req.dns) {
        tracing::warn!("dns: {w}");
    }
    // The NIC is this pod's alone: never part of what a template is made
    // from or chosen by. A clone gets it hot-plugged after it took on its
    // identity (a template has no NIC); a cold boot has it from the start.
    let spec_on = |bus| PodVmSpec {
        id: pod_id.clone(),
        cpus: req.cpus,
        memory_mib: req.memory_mib,
        guest: guest.clone(),
        devices: layer_devices(&layers, bus),
        pci: Default::default(),
        netns: None,
        memory: podvisor_vmm::MemoryBacking::Anonymous,
        // `podvisor run` never asks KSM to merge its VM (QEMU would).
        memory_merge: false,
        die_with_parent: true,
    };
    let spec = spec_on(LayerBus::Block);
    timings.prepare = t0.elapsed();

    let fork = ForkRequest {
        choice: &req.template,
        isolated: req.isolated,
        source: &req.image,
        image,
        container: &container,
        cold: &spec,
    };
    let forked = podvisor_template::from_template(cfg, &fork, &mut timings).await?;
    let (mut pod, warm, container) = match forked {
        Some((mut pod, warm)) => {
            // A clone gets the volumes' disks hot-plugged: they are this
            // pod's, never a template's.
            for disk in &volumes.disks {
                pod.add_device(podvisor_vmm::Device::Block(disk.clone()))
                    .await?;
            }
            if let Some(nic) = &nic {
                pod.add_device(nic.vm_device()).await?;
            }
            (pod, warm, container)
        }
        None => {
            let bus = cfg.layer_bus(req.isolated);
            let mut spec = spec_on(bus);
            spec.devices.extend(
                volumes
                    .disks
                    .iter()
                    .cloned()
                    .map(podvisor_vmm::Device::Block),
            );
            spec.devices.extend(nic.as_ref().map(|n| n.vm_device()));
            let pod = PodVm::boot(cfg, spec).await?;
            timings.set_boot(pod.ready_at - pod.launched_at, &pod.agent);
            (pod, false, container_on(bus))
        }
    };
    // The VMM has its copy of the tap.
    drop(nic);

    let result = match pod.configure_network(&net_config).await {
        Ok(_) => attach(cfg, &mut pod, container, io, &mut timings, warm).await,
        Err(e) => Err(e),
    };
    let ended_at = Instant::now();
    match &result {
        Ok(_) => pod.shutdown(std::time::Duration::ZERO).await,
        Err(_) => pod.kill().await,
    }
    held.hold.release().await;
    catalog.close().await;
    let outcome = result?;
    timings.shutdown = ended_at.elapsed();
    timings.total = t0.elapsed();
    Ok(RunReport {
        pod_id,
        outcome,
        timings,
    })
}

/// Starts the container (unless it already runs: `warm`, a clone of a
/// warm template) and relays its stdio, signals and resizes until it ends;
/// returns how it ended.
async fn attach(
    cfg: &NodeConfig,
    pod: &mut PodVm,
    container: ContainerSpec,
    mut io: PodIo,
    timings: &mut Timings,
    warm: bool,
) -> Result<Outcome, PodVmError> {
    let wants_stdin = container.process.stdin;
    let mut started_at: Option<Instant> = None;
    if warm {
        started_at = Some(Instant::now());
        if let Some(size) = container.process.terminal {
            let id = CONTAINER_ID.into();
            pod.send(&HostMessage::Resize { id, size }).await?;
        }
    } else {
        pod.send(&HostMessage::StartContainer(container)).await?;
    }

    let mut stdin_rx = match (wants_stdin, io.stdin.take()) {
        (true, Some(stdin)) => Some(spawn_stdin_reader(stdin)),
        _ => None,
    };
    let mut control_open = true;
    let outcome = loop {
        tokio::select! {
            msg = pod.next_event() => match msg? {
                GuestMessage::Started { id, .. } if id == CONTAINER_ID => {
                    started_at = Some(Instant::now());
                    timings.container_start = pod.ready_at.elapsed();
                }
                GuestMessage::Output { id, stream, data } if id == CONTAINER_ID => {
                    let out = match stream {
                        Stream::Stdout => &mut io.stdout,
                        Stream::Stderr => &mut io.stderr,
                    };
                    // A closed stdout (e.g. `| head`) is the user's choice, not an error.
                    if out.write_all(&data).await.is_ok() {
                        let _ = out.flush().await;
                    }
                }
                GuestMessage::Exited { id, status } if id == CONTAINER_ID => {
                    break Outcome::Exited(status);
                }
                GuestMessage::StartFailed { id, error } if id == CONTAINER_ID => {
                    break Outcome::StartFailed(StartError {
                        kind: error.kind,
                        message: sanitize_guest_text(&error.message),
                    });
                }
                GuestMessage::Error { message } => {
                    tracing::warn!("agent: {}", sanitize_guest_text(&message));
                }
                GuestMessage::ProfileApplied { id, profile } if id == CONTAINER_ID => {
                    let p = sanitize_profile(profile);
                    tracing::info!(runtime = %p.runtime, settings = ?p.env, reasons = ?p.reasons, "runtime profile applied");
                }
                other => return Err(pod.reject(format!("unexpected message {other:?}")).await),
            },
            chunk = recv_stdin(&mut stdin_rx) => {
                let msg = match chunk {
                    Some(data) => HostMessage::Stdin { id: CONTAINER_ID.into(), data },
                    None => {
                        stdin_rx = None;
                        HostMessage::CloseStdin { id: CONTAINER_ID.into() }
                    }
                };
                pod.send(&msg).await?;
            }
            ctl = io.control.recv(), if control_open => {
                let msg = match ctl {
                    Some(Control::Resize(size)) => HostMessage::Resize { id: CONTAINER_ID.into(), size },
                    Some(Control::Signal(signal)) => HostMessage::Signal { id: CONTAINER_ID.into(), signal },
                    Some(Control::Stop) => HostMessage::Stop {
                        id: CONTAINER_ID.into(),
                        grace_ms: cfg.stop_grace.as_millis() as u64,
                    },
                    None => { control_open = false; continue; }
                };
                pod.send(&msg).await?;
            }
        }
    };
    if let Some(started) = started_at {
        timings.container_run = started.elapsed();
    }
    let _ = io.stdout.flush().await;
    let _ = io.stderr.flush().await;
    Ok(outcome)
}

/// Reads stdin in its own task so the select loop stays cancel-safe.
/// `None` on the channel means end of file.
fn spawn_stdin_reader(
    mut stdin: Box<dyn AsyncRead + Unpin + Send>,
) -> mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut buf = vec![0u8; podvisor_proto::MAX_CHUNK];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None).await;
                    return;
                }
                Ok(n) => {
                    if tx.send(Some(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

async fn recv_stdin(rx: &mut Option<mpsc::Receiver<Option<Vec<u8>>>>) -> Option<Vec<u8>> {
    match rx {
        Some(rx) => rx.recv().await.flatten(),
        None => std::future::pending().await,
    }
}
