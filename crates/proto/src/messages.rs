//! The messages: what the host asks of the agent, and what the agent reports.
//!
//! New variants go at the end of an enum: postcard encodes variants by index.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::mounts::Mount;
use crate::volumes::EncryptedVolume;

/// A message from the host to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// Make the container's mounts and start its process.
    StartContainer(ContainerSpec),
    /// Bytes for the stdin of process `id` (only if it was started with stdin).
    Stdin { id: String, data: Vec<u8> },
    /// The host's stdin reached end of file.
    CloseStdin { id: String },
    /// The host terminal changed size (only for processes with a terminal).
    Resize { id: String, size: TerminalSize },
    /// Deliver a signal (Linux number) to process `id`.
    Signal { id: String, signal: i32 },
    /// Stop container `id`: SIGTERM, then SIGKILL after `grace_ms`.
    Stop { id: String, grace_ms: u64 },
    /// Stop everything (SIGTERM, then SIGKILL after `grace_ms`) and power off.
    Shutdown { grace_ms: u64 },
    /// Start another process inside a running container's namespaces (as
    /// `kubectl exec` does). Answered like a container start: `Started` or
    /// `StartFailed`, `Output`, then `Exited`, all with the exec's own id.
    Exec(ExecSpec),
    /// Which processes run now? Answered by [`GuestMessage::Processes`],
    /// after everything already queued for the host: a host that
    /// reconnects (a restarted host daemon) learns what ended meanwhile
    /// from the queued `Exited`s and what still runs from the answer.
    ListProcesses,
    /// This VM was just restored from a template (it is a clone): take on
    /// its own identity before anything else runs. Answered by
    /// [`GuestMessage::IdentitySet`].
    Identity(CloneIdentity),
    /// Make these shared mounts now, ahead of any container (each target
    /// is [`MountTarget::Shared`](crate::MountTarget::Shared)): an image template is saved with its
    /// image's layer disks probed and mounted. Answered by
    /// [`GuestMessage::SharedMounted`].
    MountShared { mounts: Vec<Mount> },
    /// Configure the pod's network: the NIC (found by MAC), its addresses
    /// and routes, and the `/etc/resolv.conf` and `/etc/hosts` every
    /// container gets. Sent before the first container starts, and again
    /// after a clone took on its [`HostMessage::Identity`] (a template is
    /// saved with its NIC down and without addresses). Each message
    /// replaces the previous configuration. Answered by
    /// [`GuestMessage::NetworkConfigured`].
    ConfigureNetwork(NetworkConfig),
    /// Ask the server, through the host, for the keys of these encrypted
    /// volumes (at most [`MAX_VOLUMES`](crate::volumes::MAX_VOLUMES)).
    /// `context` names this start of the pod (`namespace/name/uid/instance`,
    /// the instance id issued by the server; at most 512 bytes) and is
    /// bound into the sealed answer. The agent makes a fresh key pair and
    /// answers [`GuestMessage::VolumeKeyRequest`]. Sent after the pod has
    /// its identity, again after a wake from hibernation. See
    /// [`volumes`](crate::volumes).
    RequestVolumeKeys {
        context: String,
        volumes: Vec<EncryptedVolume>,
    },
    /// The server's sealed answer to the last [`GuestMessage::VolumeKeyRequest`]
    /// (opened with that request's key pair and context). The agent opens
    /// a dm-crypt mapping for each released volume (formatting it first
    /// when the answer says so; a mapping suspended by
    /// [`HostMessage::SuspendVolumes`] gets its key back and resumes) and
    /// answers [`GuestMessage::VolumesOpened`]. Volumes the server refused
    /// are not in it; the host keeps their containers waiting.
    VolumeKeys { sealed: Vec<u8> },
    /// The pod is about to be saved (hibernation): suspend every open
    /// volume mapping (file systems frozen, writes flushed), wipe its key
    /// from the kernel (`key wipe`) and from the agent. Answered by
    /// [`GuestMessage::VolumesSuspended`]; after a wake the host runs the
    /// key request again and the mappings resume.
    SuspendVolumes,
    /// The volume's key was revoked: stop the containers that mount it
    /// (SIGTERM, SIGKILL after `grace_ms`), unmount it, remove its mapping
    /// and wipe its key. Answered by [`GuestMessage::VolumeClosed`].
    CloseVolume { name: String, grace_ms: u64 },
    /// Read up to [`MAX_FILE_CHUNK`] bytes at `offset` of the regular
    /// file `path` (relative, without `..`) inside the shared mount `name`
    /// (a training run's output: it outlives the container that wrote it).
    /// The path is resolved inside the mount (a symlink never leads out of
    /// it). Answered by [`GuestMessage::SharedFileData`].
    ReadSharedFile {
        name: String,
        path: String,
        offset: u64,
    },
}

/// Most bytes one [`GuestMessage::SharedFileData`] carries.
pub const MAX_FILE_CHUNK: usize = 512 * 1024;

/// What makes a clone of a VM template its own machine. Every clone resumes
/// with the template's RNG state, clock and hostname; the agent mixes
/// `entropy` into the kernel RNG and reseeds it, sets `CLOCK_REALTIME` to
/// `unix_time_ns`, and sets `hostname` in the guest and in every container
/// already running (a template may hold a warm one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneIdentity {
    pub hostname: String,
    /// The host's clock when it sent this, in nanoseconds since the epoch.
    pub unix_time_ns: u64,
    /// Fresh random bytes from the host, at most [`MAX_IDENTITY_ENTROPY`].
    pub entropy: Vec<u8>,
}

/// A message from the agent to the host. The host treats every field as
/// untrusted input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMessage {
    /// The agent has loaded its modules and is ready for work.
    Ready(AgentInfo),
    /// Process `id` is running, as `pid` in the agent's PID namespace.
    Started { id: String, pid: u32 },
    /// Process `id` could not be started.
    StartFailed { id: String, error: StartError },
    /// Output of process `id`, in the order it was written.
    Output {
        id: String,
        stream: Stream,
        data: Vec<u8>,
    },
    /// Process `id` ended; all of its output has been sent before this.
    Exited { id: String, status: ExitStatus },
    /// A request the agent could not act on (unknown id, bad state).
    Error { message: String },
    /// The answer to [`HostMessage::ListProcesses`]: every container and
    /// exec process that has not been reported `Exited` yet.
    Processes { processes: Vec<ProcessInfo> },
    /// The answer to [`HostMessage::Identity`]: every step that failed, each
    /// named; empty when the clone fully took on its identity.
    IdentitySet { errors: Vec<String> },
    /// The answer to [`HostMessage::MountShared`]: `None` when every mount
    /// is made, else what failed.
    SharedMounted { error: Option<String> },
    /// The answer to [`HostMessage::ConfigureNetwork`]: `error` is `None`
    /// when everything asked for is in place, else what failed (the
    /// network is then in an unknown state; the host should not start
    /// containers). `warnings` are things the agent changed or left out,
    /// e.g. a loopback nameserver it dropped.
    NetworkConfigured {
        error: Option<String>,
        warnings: Vec<String>,
    },
    /// The answer to [`HostMessage::RequestVolumeKeys`]: the guest's
    /// ephemeral X25519 public key
    /// ([`PUBLIC_KEY_LEN`](crate::volumes::PUBLIC_KEY_LEN) bytes), to which
    /// the server seals the keys. `error` instead when the agent cannot
    /// take part (a bad request, no randomness).
    VolumeKeyRequest {
        public_key: Vec<u8>,
        error: Option<String>,
    },
    /// The answer to [`HostMessage::VolumeKeys`]: one entry per volume
    /// the answer released, `error` `None` when its mapping is open (and,
    /// if asked, formatted). An envelope that does not open is one entry
    /// with an empty name.
    VolumesOpened { results: Vec<VolumeOpened> },
    /// The answer to [`HostMessage::SuspendVolumes`].
    VolumesSuspended { error: Option<String> },
    /// The answer to [`HostMessage::CloseVolume`], after the containers
    /// that mounted it have been reported `Exited`.
    VolumeClosed { name: String, error: Option<String> },
    /// Sent just before `Started` for a container whose spec asked for
    /// runtime sizing and whose runtime the agent recognised: what it set.
    ProfileApplied {
        id: String,
        profile: crate::AppliedProfile,
    },
    /// The answer to [`HostMessage::ReadSharedFile`]: the bytes at the
    /// offset asked for (at most [`MAX_FILE_CHUNK`]; fewer only at the end
    /// of the file, then `eof`), or what went wrong.
    SharedFileData {
        data: Vec<u8>,
        eof: bool,
        error: Option<String>,
    },
}

/// How opening one encrypted volume went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeOpened {
    pub name: String,
    pub error: Option<String>,
}

/// A process the agent runs, as listed in [`GuestMessage::Processes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub id: String,
    /// For an exec process, the container it runs in; `None` for a container.
    pub exec_in: Option<String>,
}

/// Most entropy bytes the agent accepts in one [`HostMessage::Identity`].
pub const MAX_IDENTITY_ENTROPY: usize = 4096;

/// Longest hostname Linux accepts (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME_LEN: usize = 64;

/// The pod's network, as the guest should see it. A VM without a network
/// (`--network none`) gets no interfaces and no routes: only `lo`, which the
/// agent always brings up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// At most [`MAX_INTERFACES`].
    pub interfaces: Vec<InterfaceConfig>,
    /// Routes, at most [`MAX_ROUTES`]. The agent adds those without a
    /// gateway (connected, scope link) first, then those via a gateway, so
    /// a gateway outside the address's prefix is reachable when its route
    /// goes in.
    pub routes: Vec<RouteConfig>,
    /// The containers' `/etc/resolv.conf`.
    pub dns: DnsConfig,
    /// The containers' `/etc/hosts`, one line per entry, in order
    /// (localhost lines, the pod's own hostname → its IP, ...). At most
    /// [`MAX_HOSTS_ENTRIES`].
    pub hosts: Vec<HostsEntry>,
}

/// One network interface of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceConfig {
    /// The MAC address the interface must have: the pod's (the CNI
    /// interface's). The agent finds the NIC by this address or by
    /// `current_mac`.
    pub mac: MacAddr,
    /// The MAC the NIC has in the guest now, when that is not `mac`: in a
    /// clone of a VM template, the template's (the guest kernel and the
    /// device state come from the template). The agent then sets `mac`.
    pub current_mac: Option<MacAddr>,
    /// The interface's name in the guest, e.g. `eth0` (at most 15 bytes).
    pub name: String,
    /// MTU in bytes (68 to 65535); the CNI interface's.
    pub mtu: u32,
    /// Addresses with their prefix length, at most [`MAX_ADDRESSES`].
    pub addresses: Vec<IpPrefix>,
    /// Whether the interface is up. A template's NIC is down, without
    /// addresses.
    pub up: bool,
}

/// A route in the main table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    /// Destination; `0.0.0.0/0` (or `::/0`) is the default route.
    pub destination: IpPrefix,
    /// Next hop; `None` for a connected route (scope link).
    pub gateway: Option<IpAddr>,
    /// Name of the interface (one of [`NetworkConfig::interfaces`], up).
    pub interface: String,
}

/// An address or network with its prefix length (`10.88.0.5/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpPrefix {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl std::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;

    /// Parses `aa:bb:cc:dd:ee:ff` (as CNI results and QEMU write it).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("invalid MAC address {s:?}: expected six hex pairs like 02:42:ac:11:00:02");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        match parts.next() {
            Some(_) => Err(bad()),
            None => Ok(MacAddr(out)),
        }
    }
}

/// The containers' resolver configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// At most [`MAX_NAMESERVERS`]. A loopback address (the host's
    /// `127.0.0.53` stub resolver, say) would be the guest's own loopback:
    /// the agent drops it and says so in a warning.
    pub nameservers: Vec<IpAddr>,
    /// Search domains, at most [`MAX_SEARCH_DOMAINS`].
    pub search: Vec<String>,
    /// `options` entries such as `ndots:5`.
    pub options: Vec<String>,
}

/// One line of `/etc/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostsEntry {
    pub address: IpAddr,
    /// Host names, canonical name first.
    pub names: Vec<String>,
}

/// Most interfaces in one [`NetworkConfig`].
pub const MAX_INTERFACES: usize = 8;
/// Most addresses on one interface.
pub const MAX_ADDRESSES: usize = 16;
/// Most routes in one [`NetworkConfig`].
pub const MAX_ROUTES: usize = 64;
/// Most nameservers (glibc's resolver uses three; Kubernetes allows three).
pub const MAX_NAMESERVERS: usize = 3;
/// Most search domains (Kubernetes' limit).
pub const MAX_SEARCH_DOMAINS: usize = 32;
/// Most `/etc/hosts` entries.
pub const MAX_HOSTS_ENTRIES: usize = 256;

/// What the agent tells about itself when it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's crate version.
    pub agent_version: String,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
    /// Milliseconds from kernel start (CLOCK_BOOTTIME) to the agent being
    /// ready, for the boot-stage breakdown.
    pub boottime_ms: u64,
    /// Guest uptime in milliseconds at the end of each boot step of the
    /// agent (`init` = the agent started, `modules`, `port`), in order.
    pub boot_steps: Vec<(String, u64)>,
}

/// Everything the agent needs to start one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Container id, unique within the pod; also the id of its main process.
    pub id: String,
    /// Hostname inside the container's UTS namespace.
    pub hostname: String,
    /// What to mount, in this order: shared mounts (the image's layer
    /// disks), the container's root (an overlay over the layers), then
    /// mounts inside the container. [`image_mounts`](crate::image_mounts)
    /// makes the list for an image.
    pub mounts: Vec<Mount>,
    /// The main process.
    pub process: ProcessSpec,
    /// Size the container's language runtime to its share of the VM
    /// (see [`runtime`](crate::runtime)); `None` leaves it alone.
    pub runtime: Option<crate::RuntimeSizing>,
}

/// A process to start inside a running container: it joins the container's
/// mount, PID, UTS and IPC namespaces and runs with the container's root.
/// `Stdin`, `Resize`, `Signal` and `Stop` address it by `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Id of the new process; unique among the pod's containers and execs
    /// while it runs.
    pub id: String,
    /// Id of the running container to enter.
    pub container: String,
    /// The process; user, environment and working directory follow the
    /// same rules as a container's.
    pub process: ProcessSpec,
}

/// A process to run inside a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// argv; `args[0]` is looked up in the container's `PATH` when it has no `/`.
    pub args: Vec<String>,
    /// Environment as `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory inside the container (absolute); created if missing.
    pub cwd: String,
    /// The OCI image `User`: empty, `user`, `uid`, `user:group` or `uid:gid`;
    /// names are resolved against the container's `/etc/passwd` and `/etc/group`.
    pub user: String,
    /// Allocate a pseudo-terminal of this size for the process.
    pub terminal: Option<TerminalSize>,
    /// Keep stdin open for [`HostMessage::Stdin`] data.
    pub stdin: bool,
}

/// Size of a terminal in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    pub rows: u16,
    pub cols: u16,
}

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal (Linux number).
    Signaled { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    /// The exit code a shell (and `docker run`) reports: the code, or
    /// 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signaled { signal, .. } => 128 + signal,
        }
    }
}

/// Why a process could not be started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartError {
    pub kind: StartErrorKind,
    pub message: String,
}

/// Class of a start failure; decides the exit code the host reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartErrorKind {
    /// The command was not found in the image (exit code 127).
    NotFound,
    /// The command exists but cannot be executed (exit code 126).
    NotExecutable,
    /// The spec was invalid: bad user, bad working directory, no args.
    InvalidSpec,
    /// A mount could not be made: a disk did not show up, `mount(2)`
    /// failed. (A mount the agent refuses to make is `InvalidSpec`.)
    Mount,
    /// Anything else inside the guest.
    Other,
}

impl StartErrorKind {
    /// The exit code `docker run` uses for this class of failure.
    pub fn exit_code(self) -> i32 {
        match self {
            StartErrorKind::NotFound => 127,
            StartErrorKind::NotExecutable => 126,
            _ => 125,
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
