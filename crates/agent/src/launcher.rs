//! What the agent's state machine drives to run processes: the
//! [`Launcher`] trait, and [`LinuxLauncher`], the real one, which makes a
//! container's mounts ([`crate::storage`]), starts it ([`crate::container`]) or an exec
//! in it ([`crate::exec`]), and gives a clone its identity.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::MntFlags;
use nix::unistd::Pid;
use podvisor_proto::{
    CloneIdentity, ContainerSpec, ExecSpec, Mount, NetworkConfig, StartError, StartErrorKind,
};

use crate::disks::{self, SysBlock};
use crate::mounts::{self, ContainerDirs, Op};
use crate::network;
use crate::process::{Launched, err};
use crate::spec;
use crate::storage::{self, SharedMounts};
use crate::syscall::{LinuxSyscall, Syscall};

/// What the agent needs to run containers; [`LinuxLauncher`] in the guest,
/// a fake in tests.
pub trait Launcher {
    /// Mounts the container and starts its process.
    fn start(&mut self, spec: &ContainerSpec) -> Result<Launched, StartError>;
    /// Sends `signal` to the container's init (which forwards it).
    fn signal(&mut self, pid: i32, signal: i32) -> Result<(), Errno>;
    /// Unmounts what [`Launcher::start`] mounted for container `id`.
    fn cleanup(&mut self, id: &str);
    /// Starts an exec process in the namespaces of the running container
    /// whose init is `init_pid`.
    fn exec(&mut self, spec: &ExecSpec, init_pid: i32) -> Result<Launched, StartError>;
    /// Makes these shared mounts (checked by
    /// [`crate::mount_spec::check_shared`]), each once: a container listing one
    /// later finds it made. Waits for their disks.
    fn mount_shared(&mut self, mounts: &[Mount]) -> Result<(), StartError>;
    /// Gives a clone its identity ([`crate::identity::apply`]); `pids` are
    /// the inits of the running containers. Returns the steps that failed.
    fn apply_identity(&mut self, identity: &CloneIdentity, pids: &[i32]) -> Vec<String>;
    /// Configures the pod's network ([`network::configure`]); from then on
    /// every container started gets its `/etc/resolv.conf` and
    /// `/etc/hosts`.
    fn configure_network(&mut self, config: &NetworkConfig) -> network::Outcome;
}

/// The real launcher: mounts, `clone`, namespaces.
#[derive(Debug)]
pub struct LinuxLauncher {
    /// The shared mounts (layer disks) made so far.
    shared: SharedMounts,
    disks: SysBlock,
    /// The directory holding the pod's `resolv.conf` and `hosts`, once a
    /// network configuration has written them.
    network_files: Option<PathBuf>,
}

impl Default for LinuxLauncher {
    fn default() -> Self {
        Self {
            shared: SharedMounts::default(),
            disks: SysBlock {
                timeout: disks::DISK_WAIT,
            },
            network_files: None,
        }
    }
}

impl Launcher for LinuxLauncher {
    fn start(&mut self, spec: &ContainerSpec) -> Result<Launched, StartError> {
        let mounts = spec::validate(spec)?;
        self.shared
            .make(&LinuxSyscall, &self.disks, &mounts.shared)?;
        let dirs = ContainerDirs::new(&spec.id);
        let plan =
            mounts::container_plan(&dirs, storage::root_plan(&self.disks, mounts.root, &dirs)?);
        if let Err((i, errno)) = mounts::apply(&LinuxSyscall, &plan) {
            self.cleanup(&spec.id);
            return Err(err(
                StartErrorKind::Mount,
                format!("{}: {errno}", plan[i].describe()),
            ));
        }
        let result = storage::inside_plan(&self.disks, &mounts.inside, &dirs)
            .and_then(|mut extra| {
                extra.extend(self.network_file_mounts(&dirs)?);
                Ok(extra)
            })
            .and_then(|extra| crate::container::launch(spec, &dirs, extra));
        if result.is_err() {
            self.cleanup(&spec.id);
        }
        result
    }

    fn signal(&mut self, pid: i32, signal: i32) -> Result<(), Errno> {
        let signal = nix::sys::signal::Signal::try_from(signal)?;
        nix::sys::signal::kill(Pid::from_raw(pid), signal)
    }

    fn cleanup(&mut self, id: &str) {
        let dirs = ContainerDirs::new(id);
        for path in dirs.teardown() {
            match LinuxSyscall.umount2(path, MntFlags::MNT_DETACH) {
                Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
                Err(e) => crate::log!("unmounting {}: {e}", path.display()),
            }
        }
        let _ = std::fs::remove_dir(&dirs.base);
    }

    fn exec(&mut self, spec: &ExecSpec, init_pid: i32) -> Result<Launched, StartError> {
        crate::exec::launch(spec, init_pid, &ContainerDirs::new(&spec.container))
    }

    fn apply_identity(&mut self, identity: &CloneIdentity, pids: &[i32]) -> Vec<String> {
        crate::identity::apply(&LinuxSyscall, identity, pids)
    }

    fn mount_shared(&mut self, mounts: &[Mount]) -> Result<(), StartError> {
        let mounts: Vec<&Mount> = mounts.iter().collect();
        self.shared.make(&LinuxSyscall, &self.disks, &mounts)
    }

    fn configure_network(&mut self, config: &NetworkConfig) -> network::Outcome {
        let dir = Path::new(network::NETWORK_DIR);
        let outcome = match crate::netlink::RouteSocket::open() {
            Ok(mut socket) => network::configure(&mut socket, config, dir, network::NIC_WAIT),
            Err(e) => network::Outcome {
                warnings: vec![],
                error: Some(network::NetworkError::Netlink {
                    what: "opening a netlink socket".into(),
                    cause: e,
                }),
            },
        };
        if network::CONTAINER_FILES
            .iter()
            .all(|(_, file)| dir.join(file).is_file())
        {
            self.network_files = Some(dir.to_path_buf());
        }
        outcome
    }
}

impl LinuxLauncher {
    /// Bind mounts of the pod's network files onto the container's
    /// `/etc/resolv.conf` and `/etc/hosts` (made regular files inside the
    /// root first), for the container's child to make; none before the
    /// host configured the network.
    fn network_file_mounts(&self, dirs: &ContainerDirs) -> Result<Vec<Op>, StartError> {
        let Some(dir) = &self.network_files else {
            return Ok(vec![]);
        };
        network::CONTAINER_FILES
            .iter()
            .map(|(in_container, file)| {
                let target =
                    network::file_mount_target(&dirs.rootfs, in_container).map_err(|e| {
                        err(
                            StartErrorKind::Mount,
                            format!("preparing {in_container} in the container: {e}"),
                        )
                    })?;
                Ok(Op::Mount(mounts::Mount {
                    source: Some(dir.join(file)),
                    target,
                    fstype: None,
                    flags: nix::mount::MsFlags::MS_BIND,
                    data: None,
                }))
            })
            .collect()
    }
}
