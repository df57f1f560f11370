//! Running one pod VM with one container, start to finish.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podvisor_image::{Image, LayerCache};
use podvisor_proto::{
    ContainerSpec, ExitStatus, GuestMessage, HostMessage, LAYER_SERIAL_PREFIX, StartError, Stream,
    TerminalSize,
};
use podvisor_vmm::{DiskSpec, Vm, VmSpec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::agent_link::{self, AgentLinkError, AgentReceiver, AgentSender, sanitize_guest_text};
use crate::container::{ContainerOverrides, process_spec};
use crate::{NodeConfig, NodeError, Timings};

/// Kernel command line of every pod VM. The i8042 options skip probing for
/// a PS/2 controller the VM does not have (seconds under emulation).
pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=t \
    i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd cryptomgr.notests";

/// Id of the one container of a `podvisor run` pod.
const CONTAINER_ID: &str = "main";

/// What to run.
#[derive(Debug, Clone)]
pub struct PodRequest {
    /// Pod name; also the container's hostname. `None`: the pod id.
    pub name: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Image source: an OCI layout directory or an image archive.
    pub image: PathBuf,
    /// Which image of a multi-image source.
    pub image_select: Option<String>,
    pub overrides: ContainerOverrides,
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

/// Runs a pod to completion: import the image, boot the VM, run the
/// container, relay its stdio, shut the VM down and remove its files.
pub async fn run(cfg: &NodeConfig, req: PodRequest, io: PodIo) -> Result<RunReport, NodeError> {
    let t0 = Instant::now();
    let mut timings = Timings::default();

    let cache = LayerCache::open(&cfg.cache_dir)?;
    let image = podvisor_image::import(&cache, &req.image, req.image_select.as_deref())?;
    let process = process_spec(&image.config, &req.overrides)?;
    let guest = podvisor_guest::prepare(&podvisor_guest::GuestOptions {
        kernel: cfg.kernel.clone(),
        agent: cfg.agent.clone(),
        extra_modules: vec![],
        cache_dir: cfg.cache_dir.clone(),
    })?;

    let pod_id = new_pod_id();
    let pod_dir = PodDir::create(&cfg.run_dir.join("pods").join(&pod_id))?;
    let hostname = req.name.clone().unwrap_or_else(|| pod_id.clone());
    let spec = VmSpec {
        name: format!("podvisor-{pod_id}"),
        cpus: req.cpus,
        memory_mib: req.memory_mib,
        kernel: guest.kernel.clone(),
        initramfs: guest.initramfs.clone(),
        kernel_cmdline: kernel_cmdline(&cfg.extra_kernel_args),
        disks: layer_disks(&image),
        run_dir: pod_dir.path.clone(),
        accel: cfg.accel,
        die_with_parent: true,
    };
    let container = ContainerSpec {
        id: CONTAINER_ID.into(),
        hostname,
        layers: (0..image.layers.len())
            .map(|i| format!("{LAYER_SERIAL_PREFIX}{i}"))
            .collect(),
        process,
    };
    timings.prepare = t0.elapsed();

    let hypervisor = podvisor_vmm::hypervisor(&cfg.hypervisor)?;
    let vm_start = Instant::now();
    let mut vm = hypervisor.launch(&spec).await?;
    let result = drive(cfg, vm.as_mut(), container, io, vm_start, &mut timings).await;
    // Whatever happened, the VM must be gone before its files are removed.
    if !matches!(vm.try_wait(), Ok(Some(_))) {
        let _ = vm.kill().await;
    }
    drop(pod_dir);
    let (outcome, ended_at) = result?;
    timings.shutdown = ended_at.elapsed();
    timings.total = t0.elapsed();
    Ok(RunReport {
        pod_id,
        outcome,
        timings,
    })
}

/// podvisor's kernel command line with the user's extra arguments.
pub fn kernel_cmdline(extra: &[String]) -> String {
    let mut line = KERNEL_CMDLINE.to_string();
    for arg in extra {
        line.push(' ');
        line.push_str(arg);
    }
    line
}

/// Layer disks of an image as read-only VM disks, bottom layer first.
pub fn layer_disks(image: &Image) -> Vec<DiskSpec> {
    image
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| DiskSpec {
            path: l.path.clone(),
            read_only: true,
            serial: format!("{LAYER_SERIAL_PREFIX}{i}"),
        })
        .collect()
}

/// Talks to the agent from connection to power-off. On return the VM has
/// exited, or must be killed by the caller. Returns how the container ended
/// and when.
async fn drive(
    cfg: &NodeConfig,
    vm: &mut dyn Vm,
    container: ContainerSpec,
    mut io: PodIo,
    vm_start: Instant,
    timings: &mut Timings,
) -> Result<(Outcome, Instant), NodeError> {
    let (mut tx, mut rx) = agent_link::connect(&vm.paths().agent_socket)
        .await
        .map_err(NodeError::Link)?;

    // Boot: wait for Ready, watching for a dead VM and the boot timeout.
    let info = tokio::select! {
        msg = rx.recv() => match msg {
            Ok(GuestMessage::Ready(info)) => info,
            Ok(other) => return Err(hostile(vm, format!("expected Ready, got {other:?}")).await),
            Err(e) => return Err(link_failure(vm, e).await),
        },
        exit = vm.wait() => return Err(NodeError::VmDied {
            exit: exit?,
            console_tail: vm.console_tail(3000),
        }),
        _ = tokio::time::sleep(cfg.boot_timeout) => return Err(NodeError::BootTimeout {
            timeout: cfg.boot_timeout,
            console_tail: vm.console_tail(3000),
        }),
    };
    let ready_at = Instant::now();
    let guest_uptime = Duration::from_millis(info.boottime_ms);
    let since_start = ready_at - vm_start;
    timings.kernel_to_agent = guest_uptime.min(since_start);
    timings.vmm_to_kernel = since_start.saturating_sub(guest_uptime);
    tracing::debug!(agent = %info.agent_version, kernel = %info.kernel_release, "agent ready");

    let wants_stdin = container.process.stdin;
    tx.send(&HostMessage::StartContainer(container))
        .await
        .map_err(NodeError::Link)?;

    let mut stdin_rx = match (wants_stdin, io.stdin.take()) {
        (true, Some(stdin)) => Some(spawn_stdin_reader(stdin)),
        _ => None,
    };
    let mut started_at: Option<Instant> = None;
    let mut control_open = true;
    let outcome = loop {
        tokio::select! {
            msg = rx.recv() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => return Err(link_failure(vm, e).await),
                };
                match msg {
                    GuestMessage::Started { id, .. } if id == CONTAINER_ID => {
                        started_at = Some(Instant::now());
                        timings.container_start = ready_at.elapsed();
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
                    other => {
                        return Err(hostile(vm, format!("unexpected message {other:?}")).await);
                    }
                }
            }
            chunk = recv_stdin(&mut stdin_rx) => {
                let msg = match chunk {
                    Some(data) => HostMessage::Stdin { id: CONTAINER_ID.into(), data },
                    None => {
                        stdin_rx = None;
                        HostMessage::CloseStdin { id: CONTAINER_ID.into() }
                    }
                };
                tx.send(&msg).await.map_err(NodeError::Link)?;
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
                tx.send(&msg).await.map_err(NodeError::Link)?;
            }
            exit = vm.wait() => return Err(NodeError::VmDied {
                exit: exit?,
                console_tail: vm.console_tail(3000),
            }),
        }
    };
    let ended_at = Instant::now();
    if let Some(started) = started_at {
        timings.container_run = ended_at - started;
    }
    let _ = io.stdout.flush().await;
    let _ = io.stderr.flush().await;

    // The container is done: ask the agent to power the VM off.
    shutdown(vm, &mut tx, &mut rx).await;
    Ok((outcome, ended_at))
}

/// Asks the agent to power off and waits for the VM to exit; kills it if it
/// does not within a few seconds.
async fn shutdown(vm: &mut dyn Vm, tx: &mut AgentSender, rx: &mut AgentReceiver) {
    if tx
        .send(&HostMessage::Shutdown { grace_ms: 0 })
        .await
        .is_ok()
    {
        let wait = async {
            loop {
                tokio::select! {
                    exit = vm.wait() => return exit.is_ok(),
                    // Keep draining the channel so the agent never blocks on a write.
                    msg = rx.recv() => if msg.is_err() {
                        return vm.wait().await.is_ok();
                    },
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .is_ok()
        {
            return;
        }
        tracing::warn!("the VM did not power off in time; killing it");
    }
    let _ = vm.kill().await;
}

async fn hostile(vm: &mut dyn Vm, what: String) -> NodeError {
    let _ = vm.kill().await;
    NodeError::HostileGuest(AgentLinkError::Unexpected(sanitize_guest_text(&what)))
}

/// The channel failed: a protocol error is the guest's fault (kill it); a
/// closed channel usually means the VM died, which we report as such.
async fn link_failure(vm: &mut dyn Vm, e: AgentLinkError) -> NodeError {
    match e {
        AgentLinkError::Protocol(_) => {
            let _ = vm.kill().await;
            NodeError::HostileGuest(e)
        }
        other => match tokio::time::timeout(Duration::from_secs(5), vm.wait()).await {
            Ok(Ok(exit)) => NodeError::VmDied {
                exit,
                console_tail: vm.console_tail(3000),
            },
            _ => {
                let _ = vm.kill().await;
                NodeError::Link(other)
            }
        },
    }
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

/// A pod's runtime directory, removed with everything in it when dropped.
struct PodDir {
    path: PathBuf,
}

impl PodDir {
    fn create(path: &Path) -> Result<Self, NodeError> {
        std::fs::create_dir_all(path).map_err(|source| NodeError::Io {
            what: format!("create pod directory {}", path.display()),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for PodDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A new random pod id: 12 hex digits, like a short container id.
pub fn new_pod_id() -> String {
    let mut bytes = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
