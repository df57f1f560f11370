//! The agent's state machine: host messages, process output, exits and
//! timers in; [`GuestMessage`]s and process actions out. It owns the agent
//! ends of every container's stdio but does no polling itself; the
//! event loop tells it what is ready.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::wait::WaitStatus;
use podvisor_proto::{
    ContainerSpec, ExecSpec, ExitStatus, GuestMessage, HostMessage, MAX_CHUNK, ProcessInfo,
    StartError, StartErrorKind, Stream,
};

use crate::launcher::Launcher;
use crate::process::{self, Launched};

/// How long after the grace period of a shutdown the agent powers off even
/// if exits could not be reported (host gone, process stuck).
pub const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);

/// The terminal's end-of-file character (VEOF, ^D).
const VEOF: u8 = 0x04;

/// A descriptor the event loop should poll, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watch {
    /// Output of container `id` on `stream` (the pty master is `Stdout`).
    Output { id: String, stream: Stream },
    /// The stdin of container `id` has pending data.
    Stdin { id: String },
}

/// Where stdin data for a process goes.
#[derive(Debug)]
struct StdinSink {
    fd: OwnedFd,
    pending: Vec<u8>,
    /// Close the pipe once `pending` is written (`CloseStdin`).
    close_when_flushed: bool,
    /// The last byte written, to know whether a VEOF starts a line.
    last: Option<u8>,
}

#[derive(Debug)]
struct Container {
    pid: i32,
    terminal: bool,
    stdin: Option<StdinSink>,
    outputs: Vec<(Stream, OwnedFd)>,
    status_pipe: Option<OwnedFd>,
    /// Set when the init has been reaped; `Exited` goes out once the
    /// outputs are drained too.
    exit: Option<ExitStatus>,
    /// When to send SIGKILL (after `Stop` or `Shutdown`).
    kill_at: Option<Instant>,
    /// For an exec process: the container it runs in. Only containers are
    /// unmounted when they end.
    exec_in: Option<String>,
    /// The encrypted volumes the container's mounts use.
    volumes: BTreeSet<String>,
}

/// A `CloseVolume` waiting for the containers using the volume to end.
#[derive(Debug)]
struct Closing {
    volume: String,
    waiting: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy)]
struct Shutdown {
    give_up_at: Instant,
}

/// The state machine. `L` starts the processes.
#[derive(Debug)]
pub struct Agent<L: Launcher> {
    pub(crate) launcher: L,
    containers: BTreeMap<String, Container>,
    outbox: VecDeque<GuestMessage>,
    shutdown: Option<Shutdown>,
    closing: Vec<Closing>,
}

impl<L: Launcher> Agent<L> {
    pub fn new(launcher: L) -> Self {
        Self {
            launcher,
            containers: BTreeMap::new(),
            outbox: VecDeque::new(),
            shutdown: None,
            closing: Vec::new(),
        }
    }

    /// Messages for the host, in order.
    pub fn take_outbox(&mut self) -> impl Iterator<Item = GuestMessage> + '_ {
        self.outbox.drain(..)
    }

    fn error(&mut self, message: String) {
        self.outbox.push_back(GuestMessage::Error { message });
    }

    /// Acts on one message from the host.
    pub fn handle(&mut self, msg: HostMessage, now: Instant) {
        match msg {
            HostMessage::StartContainer(spec) => self.start(spec),
            HostMessage::Stdin { id, data } => {
                match self.containers.get_mut(&id).and_then(|c| c.stdin.as_mut()) {
                    Some(sink) if !sink.close_when_flushed => {
                        sink.pending.extend_from_slice(&data);
                        self.flush_stdin(&id);
                    }
                    _ => self.error(format!("container {id:?} has no open stdin")),
                }
            }
            HostMessage::CloseStdin { id } => {
                if let Some(c) = self.containers.get_mut(&id) {
                    let terminal = c.terminal;
                    if let Some(sink) = c.stdin.as_mut() {
                        if terminal {
                            let at_line_start = matches!(
                                sink.pending.last().or(sink.last.as_ref()),
                                None | Some(b'\n')
                            );
                            if !at_line_start {
                                sink.pending.push(VEOF);
                            }
                            sink.pending.push(VEOF);
                        } else {
                            sink.close_when_flushed = true;
                        }
                        self.flush_stdin(&id);
                    }
                }
            }
            HostMessage::Resize { id, size } => {
                let fd = self
                    .containers
                    .get(&id)
                    .filter(|c| c.terminal)
                    .and_then(|c| c.stdin.as_ref())
                    .map(|s| s.fd.as_raw_fd());
                match fd {
                    Some(fd) => {
                        if let Err(e) = process::set_winsize(fd, size) {
                            self.error(format!("resizing the terminal of {id:?}: {e}"));
                        }
                    }
                    None => self.error(format!("container {id:?} has no terminal")),
                }
            }
            HostMessage::Signal { id, signal } => match self.running_pid(&id) {
                Some(pid) => {
                    if let Err(e) = self.launcher.signal(pid, signal) {
                        self.error(format!("signal {signal} to {id:?}: {e}"));
                    }
                }
                None => self.error(format!("no running container {id:?}")),
            },
            HostMessage::Stop { id, grace_ms } => {
                if self.containers.contains_key(&id) {
                    self.stop(&id, now, now + Duration::from_millis(grace_ms));
                } else {
                    self.error(format!("no container {id:?}"));
                }
            }
            HostMessage::Exec(spec) => self.exec(spec),
            HostMessage::ListProcesses => {
                let processes = self
                    .containers
                    .iter()
                    .map(|(id, c)| ProcessInfo {
                        id: id.clone(),
                        exec_in: c.exec_in.clone(),
                    })
                    .collect();
                self.outbox.push_back(GuestMessage::Processes { processes });
            }
            HostMessage::Identity(identity) => {
                let pids: Vec<i32> = self
                    .containers
                    .values()
                    .filter(|c| c.exit.is_none())
                    .map(|c| c.pid)
                    .collect();
                let errors = self.launcher.apply_identity(&identity, &pids);
                for e in &errors {
                    crate::log!("clone identity: {e}");
                }
                self.outbox.push_back(GuestMessage::IdentitySet { errors });
            }
            HostMessage::ReadSharedFile { name, path, offset } => {
                let reply = match self.launcher.read_shared_file(&name, &path, offset) {
                    Ok((data, eof)) => GuestMessage::SharedFileData {
                        data,
                        eof,
                        error: None,
                    },
                    Err(e) => GuestMessage::SharedFileData {
                        data: vec![],
                        eof: true,
                        error: Some(e),
                    },
                };
                self.outbox.push_back(reply);
            }
            HostMessage::MountShared { mounts } => {
                let error = match crate::mount_spec::check_shared(&mounts) {
                    Err(e) => Some(e.message),
                    Ok(()) => self.launcher.mount_shared(&mounts).err().map(|e| e.message),
                };
                self.outbox.push_back(GuestMessage::SharedMounted { error });
            }
            HostMessage::ConfigureNetwork(config) => {
                let outcome = self.launcher.configure_network(&config);
                for w in &outcome.warnings {
                    crate::log!("network: {w}");
                }
                if let Some(e) = &outcome.error {
                    crate::log!("network: {e}");
                }
                self.outbox.push_back(GuestMessage::NetworkConfigured {
                    error: outcome.error.map(|e| e.to_string()),
                    warnings: outcome.warnings,
                });
            }
            HostMessage::RequestVolumeKeys { context, volumes } => {
                let msg = match self.launcher.request_volume_keys(&context, &volumes) {
                    Ok(public_key) => GuestMessage::VolumeKeyRequest {
                        public_key,
                        error: None,
                    },
                    Err(e) => GuestMessage::VolumeKeyRequest {
                        public_key: vec![],
                        error: Some(e),
                    },
                };
                self.outbox.push_back(msg);
            }
            HostMessage::VolumeKeys { sealed } => {
                let results = self.launcher.volume_keys(&sealed);
                self.outbox
                    .push_back(GuestMessage::VolumesOpened { results });
            }
            HostMessage::SuspendVolumes => {
                let error = self.launcher.suspend_volumes();
                self.outbox
                    .push_back(GuestMessage::VolumesSuspended { error });
            }
            HostMessage::CloseVolume { name, grace_ms } => {
                self.close_volume(name, now, now + Duration::from_millis(grace_ms));
            }
            HostMessage::Shutdown { grace_ms } => {
                let grace = Duration::from_millis(grace_ms);
                self.shutdown = Some(Shutdown {
                    give_up_at: now + grace + SHUTDOWN_SLACK,
                });
                let ids: Vec<String> = self.containers.keys().cloned().collect();
                for id in ids {
                    self.stop(&id, now, now + grace);
                }
            }
        }
    }

    /// Stops every container using `volume` and closes it once they are
    /// all reported `Exited` (see [`Agent::finish_if_done`]).
    fn close_volume(&mut self, volume: String, now: Instant, kill_at: Instant) {
        let waiting: BTreeSet<String> = self
            .containers
            .iter()
            .filter(|(_, c)| c.volumes.contains(&volume))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &waiting {
            self.stop(id, now, kill_at);
        }
        if waiting.is_empty() {
            let error = self.launcher.close_volume(&volume);
            self.outbox.push_back(GuestMessage::VolumeClosed {
                name: volume,
                error,
            });
        } else if let Some(c) = self.closing.iter_mut().find(|c| c.volume == volume) {
            c.waiting.extend(waiting);
        } else {
            self.closing.push(Closing { volume, waiting });
        }
    }

    fn running_pid(&self, id: &str) -> Option<i32> {
        self.containers
            .get(id)
            .filter(|c| c.exit.is_none())
            .map(|c| c.pid)
    }

    /// SIGTERM now, SIGKILL at `kill_at` (at once if that is now).
    fn stop(&mut self, id: &str, now: Instant, kill_at: Instant) {
        let Some(pid) = self.running_pid(id) else {
            return;
        };
        let _ = self.launcher.signal(pid, libc::SIGTERM);
        if let Some(c) = self.containers.get_mut(id) {
            c.kill_at = Some(kill_at);
        }
        if kill_at <= now {
            self.tick(now);
        }
    }

    fn start(&mut self, spec: ContainerSpec) {
        let id = spec.id.clone();
        let fail = |kind, message: String| GuestMessage::StartFailed {
            id: id.clone(),
            error: StartError { kind, message },
        };
        if self.shutdown.is_some() {
            let msg = fail(StartErrorKind::Other, "the agent is shutting down".into());
            self.outbox.push_back(msg);
            return;
        }
        if self.containers.contains_key(&id) {
            let msg = fail(
                StartErrorKind::InvalidSpec,
                format!("container {id:?} already exists"),
            );
            self.outbox.push_back(msg);
            return;
        }
        let volumes = crate::mount_spec::volumes_used(&spec.mounts);
        if let Some(c) = self.closing.iter().find(|c| volumes.contains(&c.volume)) {
            let msg = fail(
                StartErrorKind::Mount,
                format!("encrypted volume {} is being closed", c.volume),
            );
            self.outbox.push_back(msg);
            return;
        }
        match self.launcher.start(&spec) {
            Ok(l) => {
                self.track(&id, l, None);
                if let Some(c) = self.containers.get_mut(&id) {
                    c.volumes = volumes;
                }
            }
            Err(error) => self
                .outbox
                .push_back(GuestMessage::StartFailed { id, error }),
        }
    }

    /// Starts an exec process in a running container.
    fn exec(&mut self, spec: ExecSpec) {
        let id = spec.id.clone();
        let refuse = |kind, message: String| GuestMessage::StartFailed {
            id: id.clone(),
            error: StartError { kind, message },
        };
        let init = self
            .containers
            .get(&spec.container)
            .filter(|c| c.exec_in.is_none())
            .and_then(|_| self.running_pid(&spec.container));
        let refusal = if self.shutdown.is_some() {
            Some(refuse(
                StartErrorKind::Other,
                "the agent is shutting down".into(),
            ))
        } else if self.containers.contains_key(&id) {
            Some(refuse(
                StartErrorKind::InvalidSpec,
                format!("a process with id {id:?} already exists"),
            ))
        } else if init.is_none() {
            Some(refuse(
                StartErrorKind::InvalidSpec,
                format!("no running container {:?}", spec.container),
            ))
        } else {
            None
        };
        if let Some(msg) = refusal {
            self.outbox.push_back(msg);
            return;
        }
        match self.launcher.exec(&spec, init.unwrap_or_default()) {
            Ok(l) => {
                self.track(&id, l, Some(spec.container));
            }
            Err(error) => self
                .outbox
                .push_back(GuestMessage::StartFailed { id, error }),
        }
    }

    /// Records a started process and reports `Started` (after
    /// `ProfileApplied` when its runtime was sized).
    fn track(&mut self, id: &str, l: Launched, exec_in: Option<String>) {
        if let Some(profile) = l.profile {
            self.outbox.push_back(GuestMessage::ProfileApplied {
                id: id.to_string(),
                profile,
            });
        }
        let mut outputs = vec![(Stream::Stdout, l.stdout)];
        outputs.extend(l.stderr.map(|fd| (Stream::Stderr, fd)));
        let stdin = l.stdin.map(|fd| StdinSink {
            fd,
            pending: Vec::new(),
            close_when_flushed: false,
            last: None,
        });
        self.containers.insert(
            id.to_string(),
            Container {
                pid: l.pid,
                terminal: l.terminal,
                stdin,
                outputs,
                status_pipe: l.status,
                exit: None,
                kill_at: None,
                exec_in,
                volumes: BTreeSet::new(),
            },
        );
        self.outbox.push_back(GuestMessage::Started {
            id: id.to_string(),
            pid: l.pid as u32,
        });
    }

    /// Writes pending stdin data without blocking; closes the pipe when asked.
    fn flush_stdin(&mut self, id: &str) {
        let Some(c) = self.containers.get_mut(id) else {
            return;
        };
        let Some(sink) = c.stdin.as_mut() else {
            return;
        };
        while !sink.pending.is_empty() {
            match nix::unistd::write(&sink.fd, &sink.pending) {
                Ok(n) => {
                    sink.last = sink.pending.get(n.wrapping_sub(1)).copied();
                    sink.pending.drain(..n);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    // The process closed its stdin (EPIPE) or is gone.
                    c.stdin = None;
                    return;
                }
            }
        }
        if sink.close_when_flushed {
            c.stdin = None;
        }
    }

    /// The descriptors to poll. Output is left out when `with_output` is
    /// false (the host is not taking data: back-pressure on the process).
    pub fn watches(&self, with_output: bool) -> Vec<(RawFd, PollFlags, Watch)> {
        let mut out = Vec::new();
        for (id, c) in &self.containers {
            if let Some(sink) = c.stdin.as_ref().filter(|s| !s.pending.is_empty()) {
                out.push((
                    sink.fd.as_raw_fd(),
                    PollFlags::POLLOUT,
                    Watch::Stdin { id: id.clone() },
                ));
            }
            if with_output {
                for (stream, fd) in &c.outputs {
                    out.push((
                        fd.as_raw_fd(),
                        PollFlags::POLLIN,
                        Watch::Output {
                            id: id.clone(),
                            stream: *stream,
                        },
                    ));
                }
            }
        }
        out
    }

    /// A watched descriptor is ready.
    pub fn ready(&mut self, watch: &Watch) {
        match watch {
            Watch::Stdin { id } => self.flush_stdin(id),
            Watch::Output { id, stream } => self.read_output(id, *stream),
        }
    }

    fn read_output(&mut self, id: &str, stream: Stream) {
        let Some(c) = self.containers.get_mut(id) else {
            return;
        };
        let Some(pos) = c.outputs.iter().position(|(s, _)| *s == stream) else {
            return;
        };
        let mut buf = vec![0u8; MAX_CHUNK];
        let closed = match nix::unistd::read(&c.outputs[pos].1, &mut buf) {
            Ok(0) => true,
            Ok(n) => {
                buf.truncate(n);
                self.outbox.push_back(GuestMessage::Output {
                    id: id.to_string(),
                    stream,
                    data: buf,
                });
                false
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => false,
            // EIO: the pty's last slave closed.
            Err(_) => true,
        };
        if closed {
            c.outputs.remove(pos);
            self.finish_if_done(id);
        }
    }

    /// A child was reaped. Unknown pids (orphans that ended up with PID 1)
    /// are ignored.
    pub fn reaped(&mut self, status: WaitStatus) {
        let Some(pid) = status.pid() else {
            return;
        };
        let Some((id, c)) = self
            .containers
            .iter_mut()
            .find(|(_, c)| c.pid == pid.as_raw() && c.exit.is_none())
        else {
            return;
        };
        c.exit = Some(process::exit_status(status, c.status_pipe.as_ref()));
        c.kill_at = None;
        c.stdin = None;
        let id = id.clone();
        self.finish_if_done(&id);
    }

    /// Reports `Exited` once the process is gone and its output drained,
    /// and unmounts the container.
    fn finish_if_done(&mut self, id: &str) {
        let done = self
            .containers
            .get(id)
            .is_some_and(|c| c.exit.is_some() && c.outputs.is_empty());
        if !done {
            return;
        }
        if let Some(c) = self.containers.remove(id) {
            self.outbox.push_back(GuestMessage::Exited {
                id: id.to_string(),
                status: c.exit.unwrap_or(ExitStatus::Code(255)),
            });
            if c.exec_in.is_none() {
                self.launcher.cleanup(id);
            }
            let mut done = Vec::new();
            self.closing.retain_mut(|closing| {
                closing.waiting.remove(id);
                if closing.waiting.is_empty() {
                    done.push(std::mem::take(&mut closing.volume));
                    false
                } else {
                    true
                }
            });
            for volume in done {
                let error = self.launcher.close_volume(&volume);
                self.outbox.push_back(GuestMessage::VolumeClosed {
                    name: volume,
                    error,
                });
            }
        }
    }

    /// Runs due timers: SIGKILL for stops whose grace is over.
    pub fn tick(&mut self, now: Instant) {
        let due: Vec<i32> = self
            .containers
            .values_mut()
            .filter(|c| c.kill_at.is_some_and(|t| t <= now))
            .map(|c| {
                c.kill_at = None;
                c.pid
            })
            .collect();
        for pid in due {
            let _ = self.launcher.signal(pid, libc::SIGKILL);
        }
    }

    /// The next timer, for the poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.containers
            .values()
            .filter_map(|c| c.kill_at)
            .chain(self.shutdown.map(|s| s.give_up_at))
            .min()
    }

    /// Whether a shutdown was asked for.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_some()
    }

    /// Whether it is time to power off: shutting down, and every container
    /// has been reported and the reports sent (`flushed`), or the slack
    /// after the grace period is over.
    pub fn power_off_due(&self, now: Instant, flushed: bool) -> bool {
        match self.shutdown {
            None => false,
            Some(s) => {
                (self.containers.is_empty() && self.outbox.is_empty() && flushed)
                    || now >= s.give_up_at
            }
        }
    }
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
