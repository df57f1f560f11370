//! The podvisor guest agent: PID 1 inside a pod VM.
//!
//! The agent owns the PID-1 duties of the guest: it mounts the basic file
//! systems, loads the kernel modules listed by the initramfs, moves off the
//! initramfs root, finds the virtio-serial port to the host and reports
//! `Ready`. Then a single-threaded event loop serves the host: it makes
//! the mounts each container's spec lists (EROFS layer disks once per VM,
//! the root overlay over them with a tmpfs upper, tmpfs and binds inside),
//! starts the container's process in new mount/PID/UTS/IPC namespaces with
//! `pivot_root`, streams its output, reports its exit, reaps every zombie,
//! and on `Shutdown` stops what is left and powers the VM off. In a VM
//! restored from a template it takes on the clone's own identity
//! ([`identity`]: RNG reseed, clock, hostname) when the host asks. It
//! brings `lo` up at boot and configures the pod's network (NIC, addresses,
//! routes, each container's `/etc/resolv.conf` and `/etc/hosts`) through
//! rtnetlink when the host sends it ([`network`]). When a container's spec
//! asks for it, it sizes the container's language runtime (JVM, Go,
//! Node.js, CPython) to its share of the VM ([`runtime_profiles`]).
//!
//! The contract with the host is in `docs/ARCHITECTURE.md` ("Host ↔ guest
//! contract", "Container inside the guest"); the messages are
//! [`podvisor_proto`]'s. Plans (mounts, modules, user switch) are data run
//! through the [`syscall::Syscall`] trait so they are unit-tested without
//! root or a VM.

pub mod agent;
pub mod boot;
pub mod child;
pub mod container;
pub mod disks;
pub mod dm_crypt;
pub mod event_loop;
pub mod exec;
pub mod identity;
pub mod launcher;
pub mod modules;
pub mod mount_spec;
pub mod mounts;
pub mod netlink;
pub mod network;
pub mod path_lookup;
pub mod port;
pub mod process;
pub mod runtime_profiles;
pub mod shared_file;
pub mod spec;
pub mod storage;
pub mod syscall;
pub mod user;
pub mod volumes;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Writes one line to stderr (the console), prefixed `podvisor-agent:`.
/// Never panics, even without a console.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "podvisor-agent: {}", format_args!($($arg)*));
    }};
}

/// A fatal error of the agent: logged, then the VM is powered off.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("cannot open the host channel")]
    Port(#[from] port::PortError),
    #[error("cannot set up SIGCHLD handling: {0}")]
    Signal(nix::errno::Errno),
    #[error("event loop failed")]
    Loop(#[from] event_loop::LoopError),
}

/// Everything PID 1 does, from boot until a shutdown is due. The caller
/// powers off afterwards (also on error).
pub fn run() -> Result<(), AgentError> {
    let sys = syscall::LinuxSyscall;
    let mut steps = vec![("init".to_string(), boot::uptime_ms())];
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    boot::mount_basics(&sys)?;
    boot::ensure_console();
    let release = boot::kernel_release();
    boot::load_modules(&sys, &release);
    steps.push(("modules".to_string(), boot::uptime_ms()));
    boot::keep_initramfs(&sys);
    boot::switch_root(&sys)?;
    // Always, even without a NIC: containers expect a working localhost.
    if let Err(e) = netlink::RouteSocket::open()
        .map_err(|cause| network::NetworkError::Netlink {
            what: "opening a netlink socket".into(),
            cause,
        })
        .and_then(|mut socket| network::loopback_up(&mut socket))
    {
        log!("network: {e}");
    }
    // Before any container: what the VM leaves to containers.
    let vm = boot::VmResources::read();
    // SAFETY: single-threaded; nothing reads the environment concurrently.
    unsafe { std::env::set_var("PATH", path_lookup::DEFAULT_PATH) };

    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block().map_err(AgentError::Signal)?;
    let sigchld = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(AgentError::Signal)?;

    let fd = port::open_agent_port(port::PORT_WAIT)?;
    steps.push(("port".to_string(), boot::uptime_ms()));
    let mut port = port::Port::new(fd);
    let info = boot::agent_info(release, steps);
    let mut agent = agent::Agent::new(launcher::LinuxLauncher::new(vm));
    event_loop::run(&mut port, &sigchld, &mut agent, &info)?;
    Ok(())
}
