//! The QEMU backend: builds the command line from a [`VmSpec`], starts
//! `qemu-system-x86_64` (or adopts one started earlier, [`adopt`]), and
//! connects its QMP socket; [`vm::QemuVm`] is the running VM either way.
//! Devices get PCI slots from [`pci`]; saving and loading states is
//! [`snapshot`] (migration through a pipe, `x-ignore-shared` for RAM in a
//! file, `-S -incoming defer`); hot-plugging devices is [`hotplug`].

pub mod adopt;
pub mod cmdline;
#[cfg(test)]
mod fake_qemu;
pub mod hotplug;
pub mod pci;
pub mod qmp;
pub mod snapshot;
pub mod vm;

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::process::Command;

use crate::cgroup::{CgroupRoot, Limits, VmCgroup};
use crate::device::{Device, PMEM_ALIGN, Tap};
use crate::{Accel, Hypervisor, MemoryBacking, Vm, VmPaths, VmSpec, VmmError};
use cmdline::*;
use pci::PciSlots;
use qmp::Qmp;
use vm::{QemuProcess, QemuVm};

/// How long QEMU may take to create its QMP socket.
const CONTROL_SOCKET_TIMEOUT: Duration = Duration::from_secs(15);
/// How long saving or loading a VM state may take.
const STATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Id of the memory backend object holding guest RAM in a file.
const RAM_BACKEND_ID: &str = "ram0";
/// Version of the devices and addresses podvisor gives a VM. Bump it when
/// the command line changes in a way a saved state would notice (a device
/// added or moved), so templates saved before are seen as stale.
pub const DEVICE_LAYOUT: u32 = 2;

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
    /// Where each QEMU process gets its control group; `None` where no
    /// usable hierarchy is mounted (or podvisor may not write it).
    pub cgroups: Option<CgroupRoot>,
}

impl Qemu {
    /// Uses `$PODVISOR_QEMU` if set, else `qemu-system-x86_64` from `PATH`.
    pub fn from_env() -> Self {
        let cgroups = match CgroupRoot::detect() {
            Ok(root) => Some(root),
            Err(e) => {
                tracing::warn!(error = %e, "QEMU processes get no control group");
                None
            }
        };
        Self {
            binary: std::env::var_os("PODVISOR_QEMU")
                .map(PathBuf::from)
                .unwrap_or_else(|| "qemu-system-x86_64".into()),
            cgroups,
        }
    }

    /// The binary's path, looked up in `PATH` when it has no `/`, with
    /// symbolic links resolved.
    pub fn resolved_binary(&self) -> Option<PathBuf> {
        let found = if self.binary.components().count() > 1 {
            Some(self.binary.clone())
        } else {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(&self.binary))
                    .find(|p| p.is_file())
            })
        }?;
        std::fs::canonicalize(found).ok()
    }

    /// The typed command line for a spec, and the slots its devices got;
    /// `incoming`: wait for a saved state instead of booting.
    pub fn command_line(
        spec: &VmSpec,
        incoming: bool,
    ) -> Result<(QemuCommandLine, PciSlots), VmmError> {
        if spec.cpus == 0 || spec.memory_mib < 64 {
            return Err(VmmError::InvalidSpec(format!(
                "need at least 1 CPU and 64 MiB (got {} CPUs, {} MiB)",
                spec.cpus, spec.memory_mib
            )));
        }
        for d in &spec.devices {
            d.validate()?;
            let singleton = !d.kind().is_hotpluggable();
            if singleton && spec.devices.iter().filter(|o| o.kind() == d.kind()).count() > 1 {
                return Err(VmmError::InvalidSpec(format!(
                    "a VM has at most one {} device",
                    d.kind()
                )));
            }
        }
        let on_pci: Vec<_> = spec
            .devices
            .iter()
            .filter(|d| d.kind().is_pci())
            .map(|d| (d.id().to_string(), d.kind()))
            .collect();
        let (slots, addrs) = PciSlots::place_all(&on_pci, &spec.pci)?;
        let mut addrs = addrs.into_iter();
        let paths = VmPaths::in_dir(&spec.run_dir);
        let mut devices: Vec<DeviceArgs> = (1..=slots.bridges())
            .map(|n| {
                DeviceArgs::Bridge(PciBridge {
                    n,
                    addr: PciSlots::bridge_address(n),
                })
            })
            .collect();
        let mut pmem_mib = 0;
        let mut pmem_count = 0;
        for d in &spec.devices {
            let mut addr = || addrs.next().expect("one address per PCI device");
            devices.push(match d {
                Device::Block(b) => DeviceArgs::Blk(VirtioBlk {
                    id: b.id.clone(),
                    path: b.path.clone(),
                    read_only: b.read_only,
                    serial: b.serial.clone(),
                    addr: addr(),
                }),
                Device::Network(n) => DeviceArgs::Net(VirtioNet {
                    id: n.id.clone(),
                    tap: match &n.tap {
                        Tap::Fd(fd) => TapArg::Fd(fd.as_raw_fd()),
                        Tap::Name(name) => TapArg::Ifname(name.clone()),
                    },
                    mac: n.mac,
                    mtu: n.mtu,
                    addr: addr(),
                }),
                Device::Pmem(p) => {
                    pmem_mib += p.size_bytes >> 20;
                    pmem_count += 1;
                    DeviceArgs::Pmem(VirtioPmem {
                        id: p.id.clone(),
                        path: p.path.clone(),
                        size_mib: p.size_bytes / (1 << 20),
                        read_only: p.read_only,
                        addr: addr(),
                    })
                }
                Device::AgentChannel { port_name } => DeviceArgs::Agent(AgentChannel {
                    socket: paths.agent_socket.clone(),
                    port_name: port_name.clone(),
                    addr: addr(),
                }),
                Device::Console => DeviceArgs::Console(SerialConsole {
                    log: paths.console_log.clone(),
                }),
                Device::Rng => DeviceArgs::Rng(VirtioRng { addr: addr() }),
                Device::VmGenId => DeviceArgs::VmGenId(VmGenId),
                Device::FreePageReporting => {
                    if let MemoryBacking::File {
                        path,
                        shared: false,
                    } = &spec.memory
                    {
                        return Err(VmmError::InvalidSpec(format!(
                            "free page reporting with guest RAM mapped privately from {}: \
                             QEMU would punch the reported pages out of that file",
                            path.display()
                        )));
                    }
                    DeviceArgs::FreePageReporting(FreePageReporting { addr: addr() })
                }
            });
        }
        debug_assert_eq!(PMEM_ALIGN % (1 << 20), 0);
        let (memory_backend, memory_backends) = match &spec.memory {
            MemoryBacking::Anonymous => (None, vec![]),
            MemoryBacking::File { path, shared } => (
                Some(RAM_BACKEND_ID.to_string()),
                vec![MemoryBackendFile {
                    id: RAM_BACKEND_ID.into(),
                    mem_path: path.clone(),
                    size_mib: spec.memory_mib,
                    share: *shared,
                    read_only: false,
                }],
            ),
        };
        let cl = QemuCommandLine {
            base: BaseOptions {
                name: spec.name.clone(),
            },
            sandbox: Sandbox,
            machine: Machine {
                kind: "pc".into(),
                accel: spec.accel,
                memory_backend,
                tcg_tb_size_mib: Some(64),
                mem_merge: spec.memory_merge,
            },
            cpu: Cpu::for_accel(spec.accel),
            smp: Smp { cpus: spec.cpus },
            memory: Memory {
                size_mib: spec.memory_mib,
                // pmem devices live in the memory hot-plug area.
                hotplug: (pmem_count > 0).then(|| (pmem_count.max(2), spec.memory_mib + pmem_mib)),
            },
            memory_backends,
            boot: DirectBoot {
                kernel: spec.kernel.clone(),
                initramfs: spec.initramfs.clone(),
                cmdline: spec.kernel_cmdline.clone(),
            },
            qmp: QmpSocket {
                path: paths.control_socket,
            },
            devices,
            incoming: incoming.then_some(IncomingDeferred),
        };
        Ok((cl, slots))
    }

    /// Starts QEMU for `spec` and connects QMP.
    async fn spawn(&self, spec: &VmSpec, incoming: bool) -> Result<QemuVm, VmmError> {
        let (cl, slots) = Self::command_line(spec, incoming)?;
        let netns = match &spec.netns {
            Some(path) => Some(OwnedFd::from(std::fs::File::open(path).map_err(
                |source| VmmError::Io {
                    what: format!("open network namespace {}", path.display()),
                    source,
                },
            )?)),
            None => None,
        };
        let tap_fds: Vec<i32> = spec
            .devices
            .iter()
            .filter_map(|d| match d {
                Device::Network(n) => n.tap.raw_fd(),
                _ => None,
            })
            .collect();
        let paths = VmPaths::in_dir(&spec.run_dir);
        // A restored VM may reuse a directory: stale sockets would make
        // the wait below connect to nothing.
        for socket in [&paths.control_socket, &paths.agent_socket] {
            let _ = std::fs::remove_file(socket);
        }
        // QEMU appends to the console log (see SerialConsole): each VMM
        // process starts it empty.
        std::fs::File::create(&paths.console_log).map_err(|source| VmmError::Io {
            what: format!("create {}", paths.console_log.display()),
            source,
        })?;
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
        if let Some(netns) = netns {
            // SAFETY: setns is async-signal-safe; the descriptor stays open
            // in the parent until spawn returns (the closure owns it).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if !tap_fds.is_empty() {
            // Tap descriptors are close-on-exec here; QEMU gets them under
            // the numbers its command line names.
            // SAFETY: fcntl is async-signal-safe; the descriptors belong to
            // the spec, which outlives spawn.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &tap_fds {
                        if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        if spec.accel == Accel::Tcg {
            // Under TCG, transparent huge pages (which QEMU asks for on guest
            // RAM and its translation buffer) cost more than they give: each
            // first touch of a 2 MiB region is zeroed whole, a boot to the
            // agent took 13% longer with them (docs/BENCHMARKS.md), and idle
            // VMs keep the untouched rest of every huge page. With KVM they
            // shorten the guest's page walks, so they stay.
            // SAFETY: prctl is async-signal-safe and touches no memory of ours.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let cgroup = self.confine(&mut cmd, spec)?;
        let started = Instant::now();
        let spawned = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        });
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                if let Some(group) = &cgroup {
                    group.remove();
                }
                return Err(e);
            }
        };
        let pid = child.id().unwrap_or(0);
        tracing::debug!(pid, accel = %spec.accel, incoming, "qemu started");

        // QEMU creates its sockets before it starts the guest. Wait for QMP,
        // failing fast if QEMU exits (bad arguments, missing file).
        let qmp = loop {
            if let Some(status) = child.try_wait().map_err(|source| VmmError::Io {
                what: "wait for qemu".into(),
                source,
            })? {
                let exit = vm::to_exit(status);
                let qemu_err = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                return Err(VmmError::EarlyExit {
                    exit,
                    console_tail: format!(
                        "{}{}",
                        qemu_err.trim(),
                        crate::console::tail(&paths.console_log, 2000)
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
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        Ok(QemuVm::new(
            QemuProcess::Child { child, stderr_log },
            pid,
            paths,
            qmp,
            spec.memory != MemoryBacking::Anonymous
                || spec.devices.iter().any(|d| matches!(d, Device::Pmem(_))),
            slots,
        )
        .with_cgroup(cgroup))
    }

    /// What confines every QEMU process besides its seccomp filter
    /// ([`cmdline::Sandbox`]): no new privileges (no setuid binary or file
    /// capability can raise it), no core dumps (they would hold guest
    /// memory), a bound on open files, and a control group sized from the
    /// VM that it joins before it executes.
    fn confine(&self, cmd: &mut Command, spec: &VmSpec) -> Result<Option<VmCgroup>, VmmError> {
        let cgroup = match &self.cgroups {
            Some(root) => {
                root.remove_stale();
                let overhead = match spec.accel {
                    Accel::Tcg => TCG_OVERHEAD_MIB,
                    Accel::Kvm => KVM_OVERHEAD_MIB,
                };
                let limits = Limits::for_vm(spec.cpus, spec.memory_mib, overhead);
                Some(
                    root.create(&cgroup_name(spec), limits)
                        .map_err(|source| VmmError::Confine(Box::new(source)))?,
                )
            }
            None => None,
        };
        let procs = cgroup
            .as_ref()
            .map(VmCgroup::procs_files)
            .unwrap_or_default();
        // SAFETY: prctl, setrlimit and open/write/close are
        // async-signal-safe; the paths were made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                crate::cgroup::join_from_child(&procs)?;
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for (resource, value) in [
                    (libc::RLIMIT_CORE, 0),
                    (libc::RLIMIT_NOFILE, MAX_OPEN_FILES),
                ] {
                    let limit = libc::rlimit {
                        rlim_cur: value,
                        rlim_max: value,
                    };
                    if libc::setrlimit(resource, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(cgroup)
    }
}

/// Memory a QEMU process may use beyond its guest's RAM under TCG: the
/// 64 MiB translation buffer, the soft TLBs (13 MiB and more for a JVM
/// guest), device emulation and its own heap, with room to spare.
const TCG_OVERHEAD_MIB: u64 = 384;
/// The same with KVM, where there is no translation.
const KVM_OVERHEAD_MIB: u64 = 192;
/// Open files a QEMU process may hold (disks, taps, sockets, its own).
const MAX_OPEN_FILES: u64 = 4096;

/// A VM's control group is named after the VM (the pod), made safe as a
/// directory name.
fn cgroup_name(spec: &VmSpec) -> String {
    spec.name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.spawn(spec, false).await?))
    }

    async fn adopt(&self, record: &crate::VmmProcess) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(adopt::adopt(record, self.cgroups.as_ref()).await?))
    }

    async fn load_state(
        &self,
        spec: &VmSpec,
        state: Box<dyn Read + Send>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        let started = Instant::now();
        let mut vm = self.spawn(spec, true).await?;
        tracing::debug!(elapsed = ?started.elapsed(), "qemu waits for the state");
        let shared_memory = vm.shared_memory();
        let result = match vm.qmp() {
            Some(qmp) => snapshot::restore(qmp, shared_memory, state, STATE_TIMEOUT).await,
            None => Err(VmmError::Gone),
        };
        if let Err(e) = result {
            // QEMU exits when it rejects a state; its reason is on stderr.
            let exit = tokio::time::timeout(Duration::from_secs(2), vm.wait()).await;
            let _ = vm.kill().await;
            let qemu_err = vm.stderr().unwrap_or_default();
            let qemu_err = qemu_err.trim();
            return Err(match (exit, qemu_err.is_empty()) {
                (Ok(_), false) => VmmError::Restore(qemu_err.to_string()),
                _ => e,
            });
        }
        Ok(Box::new(vm))
    }

    fn version_fingerprint(&self) -> Result<String, VmmError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.resolved_binary().ok_or_else(|| VmmError::Spawn {
            binary: self.binary.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        let md = std::fs::metadata(&path).map_err(|source| VmmError::Io {
            what: format!("stat {}", path.display()),
            source,
        })?;
        Ok(format!(
            "{} size={} mtime={}.{} ino={} layout={DEVICE_LAYOUT}",
            path.display(),
            md.len(),
            md.mtime(),
            md.mtime_nsec(),
            md.ino()
        ))
    }

    fn version(&self) -> Result<String, VmmError> {
        let out = std::process::Command::new(&self.binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| VmmError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().next().map(str::trim) {
            Some(line) if out.status.success() && !line.is_empty() => {
                Ok(format!("{line}; podvisor device layout {DEVICE_LAYOUT}"))
            }
            _ => Err(VmmError::InvalidSpec(format!(
                "{} --version printed no version",
                self.binary.display()
            ))),
        }
    }
}

#[cfg(test)]
#[path = "launch_tests.rs"]
mod tests;
