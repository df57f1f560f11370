//! The agent's end of the host channel: the virtio-serial port named
//! [`AGENT_PORT_NAME`], carrying [`podvisor_proto::frame`]s.
//!
//! The port is non-blocking; outgoing frames wait in a queue. With
//! virtio-serial a host that is not connected (QEMU's socket chardev has no
//! client) shows as `POLLHUP` and reads returning 0; the agent then stops
//! polling the port (it would report `POLLHUP` forever) and probes it every
//! [`RECONNECT_PROBE`] until a host connects again. Each connection starts
//! at a frame boundary and with a fresh decoder.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use podvisor_proto::{AGENT_PORT_NAME, FrameDecoder, GuestMessage, HostMessage, ProtoError};

/// How often a disconnected port is checked for a new host connection. A
/// VM restored from a template resumes disconnected and waits this long at
/// most for its new host, so it is short; a probe is one `poll(2)`.
pub const RECONNECT_PROBE: Duration = Duration::from_millis(10);

/// How long to wait at boot for the port device to appear.
pub const PORT_WAIT: Duration = Duration::from_secs(10);

/// Why the port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// No virtio-serial port with the agent's name appeared.
    #[error("virtio-serial port {name:?} not found in /sys/class/virtio-ports after {waited:?}")]
    NotFound { name: String, waited: Duration },
    /// The device node could not be opened.
    #[error("cannot open {path}: {errno}")]
    Open { path: PathBuf, errno: Errno },
}

/// Finds the port named `name` under `class_dir` (normally
/// `/sys/class/virtio-ports`); returns the device name (`vport1p1`).
pub fn find_port(class_dir: &Path, name: &str) -> Option<String> {
    let mut ports: Vec<String> = std::fs::read_dir(class_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    ports.sort();
    ports.into_iter().find(|p| {
        std::fs::read_to_string(class_dir.join(p).join("name")).is_ok_and(|n| n.trim_end() == name)
    })
}

/// Waits for the agent port and opens it read/write, non-blocking.
pub fn open_agent_port(timeout: Duration) -> Result<OwnedFd, PortError> {
    let start = Instant::now();
    loop {
        if let Some(dev) = find_port(Path::new("/sys/class/virtio-ports"), AGENT_PORT_NAME) {
            let path = Path::new("/dev").join(dev);
            let flags = OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
            match nix::fcntl::open(&path, flags, Mode::empty()) {
                Ok(fd) => return Ok(fd),
                // The /dev node may lag behind sysfs for a moment.
                Err(Errno::ENOENT) if start.elapsed() < timeout => {}
                Err(errno) => return Err(PortError::Open { path, errno }),
            }
        }
        if start.elapsed() >= timeout {
            return Err(PortError::NotFound {
                name: AGENT_PORT_NAME.to_string(),
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What one read from the port produced.
#[derive(Debug, Default)]
pub struct Received {
    /// Decoded messages and decoding errors, in arrival order.
    pub messages: Vec<Result<HostMessage, ProtoError>>,
    /// The host went away (end of file or an error).
    pub disconnected: bool,
}

/// The framed, non-blocking host channel.
#[derive(Debug)]
pub struct Port {
    fd: OwnedFd,
    decoder: FrameDecoder,
    /// Encoded frames not yet fully written; the front one may be partly written.
    out: VecDeque<Vec<u8>>,
    /// Bytes of the front frame already written.
    written: usize,
    /// Total queued bytes not yet written.
    queued: usize,
    connected: bool,
}

impl Port {
    /// Wraps an open port; it counts as disconnected until [`Port::probe`]
    /// sees a host.
    pub fn new(fd: OwnedFd) -> Self {
        Self {
            fd,
            decoder: FrameDecoder::new(),
            out: VecDeque::new(),
            written: 0,
            queued: 0,
            connected: false,
        }
    }

    /// The port's descriptor, for `poll`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Whether a host is connected.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// Whether there is something to write.
    pub fn wants_write(&self) -> bool {
        !self.out.is_empty()
    }

    /// Queues a message. A message that cannot be encoded (larger than
    /// the frame limit: not produced by the agent) is logged and dropped.
    pub fn send(&mut self, msg: &GuestMessage) {
        match podvisor_proto::encode(msg) {
            Ok(frame) => {
                self.queued += frame.len();
                self.out.push_back(frame);
            }
            Err(e) => crate::log!("dropping an outgoing message: {e}"),
        }
    }

    /// Queues a message ahead of everything not yet started (used for
    /// `Ready` on a new connection).
    pub fn send_first(&mut self, msg: &GuestMessage) {
        if let Ok(frame) = podvisor_proto::encode(msg) {
            self.queued += frame.len();
            let at = usize::from(self.written > 0);
            self.out.insert(at.min(self.out.len()), frame);
        }
    }

    /// Checks without blocking whether a host is connected now. Returns
    /// `true` when the port went from disconnected to connected.
    pub fn probe(&mut self) -> bool {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let hup = match nix::poll::poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(_) => true,
        };
        let was = self.connected;
        self.connected = !hup;
        !was && self.connected
    }

    /// Forgets the connection: the decoder restarts and a partly written
    /// frame is dropped, so the next host sees whole frames only. Whole
    /// frames stay queued for it.
    pub fn disconnect(&mut self) {
        self.connected = false;
        self.decoder = FrameDecoder::new();
        if self.written > 0 {
            if let Some(partial) = self.out.pop_front() {
                self.queued -= partial.len() - self.written;
            }
            self.written = 0;
        }
    }

    /// Reads what is available and decodes it. After a framing error the
    /// decoder starts over on the next bytes (the error is returned for the
    /// caller to log and report).
    pub fn read(&mut self) -> Received {
        let mut got = Received::default();
        let mut buf = [0u8; 64 * 1024];
        loop {
            match nix::unistd::read(&self.fd, &mut buf) {
                Ok(0) => {
                    got.disconnected = true;
                    break;
                }
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                    loop {
                        match self.decoder.next_message::<HostMessage>() {
                            Ok(Some(msg)) => got.messages.push(Ok(msg)),
                            Ok(None) => break,
                            Err(e) => {
                                got.messages.push(Err(e));
                                self.decoder = FrameDecoder::new();
                                break;
                            }
                        }
                    }
                    if n < buf.len() {
                        break;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    crate::log!("reading the host port: {e}");
                    got.disconnected = true;
                    break;
                }
            }
        }
        got
    }

    /// Writes as much of the queue as the port takes now. Returns `false`
    /// if the host went away.
    pub fn flush(&mut self) -> bool {
        while let Some(front) = self.out.front() {
            match nix::unistd::write(&self.fd, &front[self.written..]) {
                Ok(n) => {
                    self.written += n;
                    self.queued -= n;
                    if self.written == front.len() {
                        self.out.pop_front();
                        self.written = 0;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return true,
                Err(e) => {
                    crate::log!("writing the host port: {e}");
                    return false;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_proto::{AgentInfo, Stream};
    use std::os::unix::net::UnixStream;

    #[test]
    fn finds_the_port_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (p, name) in [
            ("vport0p1", "org.qemu.guest_agent.0\n"),
            ("vport1p1", "io.podvisor.agent.0\n"),
        ] {
            std::fs::create_dir(dir.path().join(p)).unwrap();
            std::fs::write(dir.path().join(p).join("name"), name).unwrap();
        }
        assert_eq!(
            find_port(dir.path(), AGENT_PORT_NAME).as_deref(),
            Some("vport1p1")
        );
        assert_eq!(find_port(dir.path(), "other"), None);
    }

    fn pair() -> (Port, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Port::new(OwnedFd::from(a)), b)
    }

    #[test]
    fn frames_round_trip_and_garbage_is_reported_not_fatal() {
        use std::io::{Read, Write};
        let (mut port, mut host) = pair();
        assert!(port.probe());
        let msg = GuestMessage::Ready(AgentInfo {
            agent_version: "1".into(),
            kernel_release: "k".into(),
            boottime_ms: 5,
            boot_steps: vec![],
        });
        port.send(&msg);
        assert!(port.flush());
        assert!(!port.wants_write());
        let mut buf = vec![0u8; 256];
        let n = host.read(&mut buf).unwrap();
        let mut dec = FrameDecoder::new();
        dec.push(&buf[..n]);
        assert_eq!(dec.next_message::<GuestMessage>().unwrap(), Some(msg));

        host.write_all(b"garbage!").unwrap();
        let got = port.read();
        assert!(matches!(got.messages[..], [Err(ProtoError::BadMagic(_))]));
        let stop = HostMessage::Stop {
            id: "c".into(),
            grace_ms: 1,
        };
        host.write_all(&podvisor_proto::encode(&stop).unwrap())
            .unwrap();
        let got = port.read();
        assert_eq!(
            got.messages
                .into_iter()
                .map(Result::unwrap)
                .collect::<Vec<_>>(),
            [stop]
        );
        assert!(!got.disconnected);

        drop(host);
        assert!(port.read().disconnected);
    }

    #[test]
    fn disconnect_drops_only_a_partly_written_frame() {
        let (mut port, _host) = pair();
        let out = |n: usize| GuestMessage::Output {
            id: "c".into(),
            stream: Stream::Stdout,
            data: vec![0; n],
        };
        port.send(&out(10));
        port.send(&out(20));
        let total = port.queued_bytes();
        port.written = 3;
        port.queued -= 3;
        port.disconnect();
        assert_eq!(port.out.len(), 1);
        assert_eq!(port.queued_bytes(), port.out[0].len());
        assert!(total > port.queued_bytes());
        port.send_first(&out(1));
        assert_eq!(port.out.len(), 2);
        assert!(port.out[0].len() < port.out[1].len());
    }
}
