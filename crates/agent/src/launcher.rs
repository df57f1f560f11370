//! What the agent's state machine drives to run processes: the
//! [`Launcher`] trait, and [`LinuxLauncher`], the real one, which makes a
//! container's mounts ([`crate::storage`]), starts it ([`crate::container`]) or an exec
//! in it ([`crate::exec`]), and gives a clone its identity.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::MntFlags;
use nix::unistd::Pid;
use podvisor_proto::volumes::EncryptedVolume;
use podvisor_proto::{
    CloneIdentity, ContainerSpec, ExecSpec, Mount, NetworkConfig, StartError, StartErrorKind,
    VolumeOpened,
};

use crate::boot::VmResources;
use crate::disks::{self, DiskFinder, SysBlock};
use crate::dm_crypt::{DeviceMapper, DmControl};
use crate::mounts::{self, ContainerDirs, Op};
use crate::network;
use crate::process::{Launched, err};
use crate::spec;
use crate::storage::{self, SharedMounts};
use crate::syscall::{LinuxSyscall, Syscall};
use crate::volumes::{LinuxVolumeEnv, Volumes};

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
    /// `RequestVolumeKeys` ([`crate::volumes::Volumes::request`]): the
    /// public key of a fresh key pair, or why not.
    fn request_volume_keys(
        &mut self,
        context: &str,
        volumes: &[EncryptedVolume],
    ) -> Result<Vec<u8>, String>;
    /// `VolumeKeys`: opens the released volumes.
    fn volume_keys(&mut self, sealed: &[u8]) -> Vec<VolumeOpened>;
    /// `SuspendVolumes`: suspends every open mapping, keys wiped.
    fn suspend_volumes(&mut self) -> Option<String>;
    /// Unmounts the shared mounts of `volume` and removes its mapping
    /// (its containers are gone).
    fn close_volume(&mut self, volume: &str) -> Option<String>;
    /// `ReadSharedFile` ([`crate::shared_file::read_chunk`]): a chunk of a
    /// file in a shared mount and whether it reaches the end.
    fn read_shared_file(
        &mut self,
        name: &str,
        path: &str,
        offset: u64,
    ) -> Result<(Vec<u8>, bool), String>;
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
    /// Encrypted volumes.
    volumes: Volumes,
    volume_env: LinuxVolumeEnv,
    /// Device-mapper, opened with the first volume keys.
    dm: Option<DmControl>,
    /// What the VM left to containers at boot (runtime profiles).
    vm: VmResources,
}

impl LinuxLauncher {
    /// A launcher for a VM that left `vm` to its containers at boot.
    pub fn new(vm: VmResources) -> Self {
        Self {
            shared: SharedMounts::default(),
            disks: SysBlock::new(disks::DISK_WAIT, crate::boot::kernel_release()),
            network_files: None,
            volumes: Volumes::default(),
            volume_env: LinuxVolumeEnv {
                release: crate::boot::kernel_release(),
            },
            dm: None,
            vm,
        }
    }
}

/// Disks by serial, pmem devices by EROFS UUID, and the open mappings of
/// encrypted volumes.
struct Sources<'a> {
    disks: &'a SysBlock,
    volumes: &'a Volumes,
}

impl DiskFinder for Sources<'_> {
    fn find(&self, serial: &str) -> Result<PathBuf, disks::DiskNotFound> {
        self.disks.find(serial)
    }
    fn find_pmem(&self, uuid: &str) -> Result<PathBuf, disks::PmemNotFound> {
        self.disks.find_pmem(uuid)
    }
    fn dax(&self, target: &Path) -> Option<bool> {
        self.disks.dax(target)
    }
    fn mapping(&self, volume: &str) -> Option<PathBuf> {
        self.volumes.node(volume)
    }
}

impl Launcher for LinuxLauncher {
    fn start(&mut self, spec: &ContainerSpec) -> Result<Launched, StartError> {
        let mounts = spec::validate(spec)?;
        let sources = Sources {
            disks: &self.disks,
            volumes: &self.volumes,
        };
        self.shared.make(&LinuxSyscall, &sources, &mounts.shared)?;
        let dirs = ContainerDirs::new(&spec.id);
        let plan = mounts::container_plan(&dirs, storage::root_plan(&sources, mounts.root, &dirs)?);
        if let Err((i, errno)) = mounts::apply(&LinuxSyscall, &plan) {
            self.cleanup(&spec.id);
            return Err(err(
                StartErrorKind::Mount,
                format!("{}: {errno}", plan[i].describe()),
            ));
        }
        let result = storage::stage_shared_paths(&LinuxSyscall, &mounts.inside, &dirs)
            .and_then(|staged| storage::inside_plan(&sources, &mounts.inside, &dirs, &staged))
            .and_then(|mut extra| {
                extra.extend(self.network_file_mounts(&dirs)?);
                Ok(extra)
            })
            .and_then(|extra| crate::container::launch(spec, &dirs, extra, &self.vm));
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
        let sources = Sources {
            disks: &self.disks,
            volumes: &self.volumes,
        };
        self.shared.make(&LinuxSyscall, &sources, &mounts)
    }

    fn request_volume_keys(
        &mut self,
        context: &str,
        volumes: &[EncryptedVolume],
    ) -> Result<Vec<u8>, String> {
        self.volumes.request(&mut self.volume_env, context, volumes)
    }

    fn volume_keys(&mut self, sealed: &[u8]) -> Vec<VolumeOpened> {
        if self.dm.is_none() {
            match DmControl::open() {
                Ok(dm) => self.dm = Some(dm),
                Err(e) => crate::log!("opening {}: {e}", crate::dm_crypt::CONTROL),
            }
        }
        let dm = self.dm.as_ref().map(|d| d as &dyn DeviceMapper);
        self.volumes
            .open_sealed(dm, &self.volume_env, &self.disks, sealed)
    }

    fn suspend_volumes(&mut self) -> Option<String> {
        let dm = self.dm.as_ref().map(|d| d as &dyn DeviceMapper);
        self.volumes.suspend_all(dm)
    }

    fn read_shared_file(
        &mut self,
        name: &str,
        path: &str,
        offset: u64,
    ) -> Result<(Vec<u8>, bool), String> {
        crate::shared_file::read_chunk(&self.shared, name, path, offset)
    }

    fn close_volume(&mut self, volume: &str) -> Option<String> {
        let mut errors = Vec::new();
        for name in self.shared.unmake_volume(&LinuxSyscall, volume) {
            errors.push(name);
        }
        let dm = self.dm.as_ref().map(|d| d as &dyn DeviceMapper);
        errors.extend(self.volumes.close(dm, volume));
        (!errors.is_empty()).then(|| errors.join("; "))
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
