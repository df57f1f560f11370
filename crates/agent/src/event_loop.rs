//! The single-threaded `poll(2)` loop: the host port, a signalfd for
//! SIGCHLD, every container's stdio, and the agent's timers. Being single
//! threaded is deliberate: it makes `clone` without `exec` safe.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use podvisor_proto::{AgentInfo, GuestMessage};

use crate::agent::Agent;
use crate::launcher::Launcher;
use crate::port::{Port, RECONNECT_PROBE};

/// Output is not read while this many bytes wait for the host: a slow or
/// absent host slows the container down instead of filling the guest's
/// memory.
pub const HIGH_WATER: usize = 1 << 20;

/// Why the loop stopped before a shutdown.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("poll: {0}")]
    Poll(Errno),
}

/// Reaps every child that has ended (PID 1 reaps everything, containers'
/// inits as well as orphans) and tells the agent.
pub fn reap_all<L: Launcher>(agent: &mut Agent<L>) {
    loop {
        match nix::sys::wait::waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(status) => agent.reaped(status),
            Err(Errno::EINTR) => continue,
            Err(e) => {
                crate::log!("waitpid: {e}");
                break;
            }
        }
    }
}

/// Runs until a shutdown is due (the caller powers off).
pub fn run<L: Launcher>(
    port: &mut Port,
    sigchld: &SignalFd,
    agent: &mut Agent<L>,
    info: &AgentInfo,
) -> Result<(), LoopError> {
    let mut next_probe = Instant::now();
    let mut connected_once = false;
    loop {
        let now = Instant::now();
        agent.tick(now);
        for msg in agent.take_outbox() {
            port.send(&msg);
        }
        if !port.is_connected() && now >= next_probe {
            if port.probe() {
                if connected_once {
                    crate::log!("host reconnected");
                }
                connected_once = true;
                port.send_first(&GuestMessage::Ready(info.clone()));
            }
            next_probe = now + RECONNECT_PROBE;
        }
        if port.is_connected() && !port.flush() {
            port.disconnect();
        }
        let flushed = !port.wants_write() || !port.is_connected();
        if agent.power_off_due(now, flushed) {
            return Ok(());
        }

        let watches = agent.watches(port.queued_bytes() < HIGH_WATER);
        let mut fds = Vec::with_capacity(watches.len() + 2);
        fds.push(PollFd::new(sigchld.as_fd(), PollFlags::POLLIN));
        let port_index = port.is_connected().then(|| {
            let mut flags = PollFlags::POLLIN;
            if port.wants_write() {
                flags |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(port.fd(), flags));
            fds.len() - 1
        });
        let first_watch = fds.len();
        for (fd, flags, _) in &watches {
            // SAFETY: the agent owns these descriptors and keeps them open
            // until `fds` is dropped below (nothing closes them during poll).
            fds.push(PollFd::new(unsafe { BorrowedFd::borrow_raw(*fd) }, *flags));
        }

        let mut deadline = agent.next_deadline();
        if !port.is_connected() {
            deadline = Some(deadline.map_or(next_probe, |d| d.min(next_probe)));
        }
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let ms = d.saturating_duration_since(now).as_millis() + 1;
                PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::MAX)
            }
        };
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(LoopError::Poll(e)),
        }
        let revents: Vec<PollFlags> = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect();
        drop(fds);

        if !revents[0].is_empty() {
            while let Ok(Some(_)) = sigchld.read_signal() {}
            reap_all(agent);
        }
        if let Some(i) = port_index {
            let r = revents[i];
            if r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                let now = Instant::now();
                let received = port.read();
                for msg in received.messages {
                    match msg {
                        Ok(msg) => agent.handle(msg, now),
                        Err(e) => {
                            crate::log!("bad frame from the host: {e}");
                            port.send(&GuestMessage::Error {
                                message: format!("agent could not decode a frame: {e}"),
                            });
                        }
                    }
                }
                if received.disconnected || r.contains(PollFlags::POLLHUP) {
                    port.disconnect();
                    next_probe = Instant::now() + RECONNECT_PROBE;
                }
            }
        }
        for ((_, _, watch), r) in watches.iter().zip(&revents[first_watch..]) {
            if !r.is_empty() {
                agent.ready(watch);
            }
        }
    }
}
