//! The QEMU backend: builds the command line from a [`VmSpec`], starts
//! `qemu-system-x86_64`, and connects its QMP socket.

pub mod adopt;
pub mod cmdline;
pub mod qmp;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::process::{Child, Command};

use crate::{Accel, Hypervisor, Vm, VmExit, VmPaths, VmSpec, VmmError};
use cmdline::*;
use qmp::Qmp;

/// How long QEMU may take to create its QMP socket.
const CONTROL_SOCKET_TIMEOUT: Duration = Duration::from_secs(15);

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
}

impl Qemu {
    /// Uses `$PODVISOR_QEMU` if set, else `qemu-system-x86_64` from `PATH`.
    pub fn from_env() -> Self {
        Self {
            binary: std::env::var_os("PODVISOR_QEMU")
                .map(PathBuf::from)
                .unwrap_or_else(|| "qemu-system-x86_64".into()),
        }
    }

    /// The typed command line for a spec.
    pub fn command_line(spec: &VmSpec) -> Result<QemuCommandLine, VmmError> {
        if spec.cpus == 0 || spec.memory_mib < 64 {
            return Err(VmmError::InvalidSpec(format!(
                "need at least 1 CPU and 64 MiB (got {} CPUs, {} MiB)",
                spec.cpus, spec.memory_mib
            )));
        }
        let paths = VmPaths::in_dir(&spec.run_dir);
        let mut disks = Vec::new();
        for (i, d) in spec.disks.iter().enumerate() {
            if d.serial.len() > 20 {
                return Err(VmmError::InvalidSpec(format!(
                    "disk serial {:?} is longer than the 20 bytes virtio-blk allows",
                    d.serial
                )));
            }
            disks.push(VirtioBlk {
                id: format!("disk{i}"),
                path: d.path.clone(),
                read_only: d.read_only,
                serial: d.serial.clone(),
            });
        }
        Ok(QemuCommandLine {
            base: BaseOptions {
                name: spec.name.clone(),
            },
            machine: Machine {
                kind: "pc".into(),
                accel: spec.accel,
                memory_backend: None,
                tcg_tb_size_mib: Some(64),
            },
            cpu: Cpu::for_accel(spec.accel),
            smp: Smp { cpus: spec.cpus },
            memory: Memory {
                size_mib: spec.memory_mib,
                hotplug: None,
            },
            memory_backends: vec![],
            boot: DirectBoot {
                kernel: spec.kernel.clone(),
                initramfs: spec.initramfs.clone(),
                cmdline: spec.kernel_cmdline.clone(),
            },
            console: SerialConsole {
                log: paths.console_log,
            },
            qmp: QmpSocket {
                path: paths.control_socket,
            },
            agent: AgentChannel {
                socket: paths.agent_socket,
                port_name: podvisor_proto::AGENT_PORT_NAME.into(),
            },
            disks,
            rng: Some(VirtioRng),
        })
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError> {
        let cl = Self::command_line(spec)?;
        let paths = VmPaths::in_dir(&spec.run_dir);
        let stderr_log = spec.run_dir.join("qemu.log");
        let stderr = std::fs::File::create(&stderr_log).map_err(|source| VmmError::Io {
            what: format!("create {}", stderr_log.display()),
            source,
        })?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(cl.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(false);
        if spec.die_with_parent {
            // Own process group: a Ctrl-C at the user's terminal goes to
            // podvisor, which stops the container, never straight to QEMU.
            cmd.process_group(0);
            // SAFETY: prctl is async-signal-safe and touches no memory of ours.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        } else {
            // A VM that outlives its launcher (a host daemon) gets its own
            // session: no signal or hang-up of the launcher's terminal or
            // process group reaches it.
            // SAFETY: setsid is async-signal-safe and touches no memory of ours.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        tracing::debug!(pid, accel = %spec.accel, "qemu started");

        // QEMU creates its sockets before it starts the guest. Wait for QMP,
        // failing fast if QEMU exits (bad arguments, missing file).
        let qmp = loop {
            if let Some(status) = child.try_wait().map_err(|source| VmmError::Io {
                what: "wait for qemu".into(),
                source,
            })? {
                let exit = to_exit(status);
                let qemu_err = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                return Err(VmmError::EarlyExit {
                    exit,
                    console_tail: format!(
                        "{}{}",
                        qemu_err.trim(),
                        crate::console_tail(&paths.console_log, 2000)
                    ),
                });
            }
            if paths.control_socket.exists() {
                match Qmp::connect(&paths.control_socket).await {
                    Ok(q) => break q,
                    Err(e) if started.elapsed() > CONTROL_SOCKET_TIMEOUT => return Err(e.into()),
                    Err(_) => {}
                }
            }
            if started.elapsed() > CONTROL_SOCKET_TIMEOUT {
                let _ = child.start_kill();
                return Err(VmmError::Timeout(
                    CONTROL_SOCKET_TIMEOUT,
                    "the QEMU control socket".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        Ok(Box::new(QemuVm {
            child,
            pid,
            paths,
            qmp: Some(qmp),
            accel: spec.accel,
        }))
    }

    async fn adopt(&self, record: &crate::VmmProcess) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(adopt::adopt(record).await?))
    }
}

/// A QEMU process started by [`Qemu::launch`].
pub struct QemuVm {
    child: Child,
    pid: u32,
    paths: VmPaths,
    qmp: Option<Qmp>,
    accel: Accel,
}

impl QemuVm {
    /// The QMP session, for backend-specific operations inside this crate.
    pub fn qmp(&mut self) -> Option<&mut Qmp> {
        self.qmp.as_mut()
    }

    /// The accelerator this VM runs on.
    pub fn accel(&self) -> Accel {
        self.accel
    }
}

fn to_exit(status: std::process::ExitStatus) -> VmExit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => VmExit::Exited(c),
        (None, Some(s)) => VmExit::Killed(s),
        (None, None) => VmExit::Exited(-1),
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn paths(&self) -> &VmPaths {
        &self.paths
    }

    async fn wait(&mut self) -> Result<VmExit, VmmError> {
        let status = self.child.wait().await.map_err(|source| VmmError::Io {
            what: "wait for qemu".into(),
            source,
        })?;
        self.qmp = None;
        Ok(to_exit(status))
    }

    fn try_wait(&mut self) -> Result<Option<VmExit>, VmmError> {
        let status = self.child.try_wait().map_err(|source| VmmError::Io {
            what: "wait for qemu".into(),
            source,
        })?;
        Ok(status.map(to_exit))
    }

    async fn kill(&mut self) -> Result<VmExit, VmmError> {
        if let Some(exit) = self.try_wait()? {
            return Ok(exit);
        }
        let _ = self.child.start_kill();
        self.wait().await
    }

    fn start_kill(&mut self) {
        let _ = self.child.start_kill();
    }
}
