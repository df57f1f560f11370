//! The host end of the agent channel: framed [`podvisor_proto`] messages over
//! the unix socket QEMU exposes for the agent's virtio-serial port.
//!
//! Everything read here comes from the guest, which is untrusted: a frame
//! that does not decode is an [`AgentLinkError::Protocol`], and the caller
//! kills the VM.

use std::path::Path;

use podvisor_proto::runtime::{MAX_PROFILE_LINE, MAX_PROFILE_LINES};
use podvisor_proto::{AppliedProfile, FrameDecoder, GuestMessage, HostMessage, ProtoError, encode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Errors on the agent channel.
#[derive(Debug, thiserror::Error)]
pub enum AgentLinkError {
    #[error("cannot connect to the agent socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("agent channel I/O")]
    Io(#[from] std::io::Error),
    #[error("the guest sent an invalid message")]
    Protocol(#[from] ProtoError),
    #[error("the agent channel closed")]
    Closed,
    #[error("unexpected message from the guest: {0}")]
    Unexpected(String),
    /// The guest did not take a message within the time allowed: it stops
    /// reading its channel (hung or hostile). The channel is unusable
    /// after this (a frame may be half written).
    #[error("the guest did not read a {len}-byte message within {timeout:?}")]
    WriteTimeout {
        len: usize,
        timeout: std::time::Duration,
    },
}

/// How long one message to the guest may take to be written: the agent
/// reads its channel in its poll loop, so a guest that has not taken a
/// message in this long is hung or hostile, and its VM is killed rather
/// than its pod's task left waiting (which would stop the pod's logs,
/// exec sessions and deletion).
pub const GUEST_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sending half of the agent channel.
pub struct AgentSender {
    writer: OwnedWriteHalf,
    /// A write timed out mid-frame: nothing more may be sent.
    broken: bool,
}

/// Receiving half of the agent channel.
pub struct AgentReceiver {
    reader: OwnedReadHalf,
    decoder: FrameDecoder,
    buf: Vec<u8>,
}

/// Connects to the agent socket of a VM.
pub async fn connect(socket: &Path) -> Result<(AgentSender, AgentReceiver), AgentLinkError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| AgentLinkError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (r, w) = stream.into_split();
    Ok((
        AgentSender {
            writer: w,
            broken: false,
        },
        AgentReceiver {
            reader: r,
            decoder: FrameDecoder::new(),
            buf: vec![0; 64 * 1024],
        },
    ))
}

impl AgentSender {
    /// Closes the channel from this side; the VMM sees the host leave.
    pub async fn close(&mut self) {
        let _ = self.writer.shutdown().await;
    }

    /// Sends one message, within [`GUEST_WRITE_TIMEOUT`].
    pub async fn send(&mut self, msg: &HostMessage) -> Result<(), AgentLinkError> {
        self.send_within(msg, GUEST_WRITE_TIMEOUT).await
    }

    /// Sends one message; a guest that does not take it within `timeout`
    /// is an [`AgentLinkError::WriteTimeout`], and the sender is unusable
    /// after it (every later send fails at once: a half-written frame
    /// lost the stream its framing).
    pub async fn send_within(
        &mut self,
        msg: &HostMessage,
        timeout: std::time::Duration,
    ) -> Result<(), AgentLinkError> {
        if self.broken {
            return Err(AgentLinkError::Closed);
        }
        let frame = encode(msg)?;
        match tokio::time::timeout(timeout, self.writer.write_all(&frame)).await {
            Ok(result) => Ok(result?),
            Err(_) => {
                self.broken = true;
                Err(AgentLinkError::WriteTimeout {
                    len: frame.len(),
                    timeout,
                })
            }
        }
    }
}

impl AgentReceiver {
    /// Skips what does not decode until the first frame that does (see
    /// [`FrameDecoder::resynchronize`]): for a connection that may join the
    /// agent's stream mid-frame.
    pub fn resynchronize(&mut self) {
        self.decoder.resynchronize();
    }

    /// Receives the next message. Cancel-safe: bytes read stay buffered.
    pub async fn recv(&mut self) -> Result<GuestMessage, AgentLinkError> {
        loop {
            if let Some(msg) = self.decoder.next_message::<GuestMessage>()? {
                return Ok(msg);
            }
            let n = self.reader.read(&mut self.buf).await?;
            if n == 0 {
                return Err(AgentLinkError::Closed);
            }
            self.decoder.push(&self.buf[..n]);
        }
    }
}

/// Makes text from the guest safe to print on the user's terminal: control
/// characters (escape sequences) are replaced, and length is bounded.
pub fn sanitize_guest_text(text: &str) -> String {
    const MAX: usize = 4096;
    let mut out: String = text
        .chars()
        .take(MAX)
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '�'
            } else {
                c
            }
        })
        .collect();
    if text.chars().count() > MAX {
        out.push('…');
    }
    out
}

/// Makes a guest's [`AppliedProfile`] safe to keep and show: at most
/// [`MAX_PROFILE_LINES`] settings and reasons, each sanitized and cut to
/// [`MAX_PROFILE_LINE`] bytes.
pub fn sanitize_profile(profile: AppliedProfile) -> AppliedProfile {
    let line = |s: &str| {
        let mut s = sanitize_guest_text(s);
        if s.len() > MAX_PROFILE_LINE {
            let mut end = MAX_PROFILE_LINE;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push('…');
        }
        s
    };
    AppliedProfile {
        runtime: line(&profile.runtime),
        env: profile
            .env
            .iter()
            .take(MAX_PROFILE_LINES)
            .map(|(k, v)| (line(k), line(v)))
            .collect(),
        reasons: profile
            .reasons
            .iter()
            .take(MAX_PROFILE_LINES)
            .map(|r| line(r))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_from_the_guest_are_neutralised() {
        assert_eq!(sanitize_guest_text("ok\x1b[2Jx\n"), "ok�[2Jx\n");
        assert_eq!(sanitize_guest_text(&"a".repeat(5000)).chars().count(), 4097);
    }

    #[test]
    fn a_guest_profile_is_bounded_and_sanitized() {
        let hostile = AppliedProfile {
            runtime: "JVM\x1b[31m".into(),
            env: vec![("JAVA_TOOL_OPTIONS".into(), "é".repeat(2000)); 100],
            reasons: vec!["why".into(); 100],
        };
        let p = sanitize_profile(hostile);
        assert_eq!(p.runtime, "JVM�[31m");
        assert_eq!(p.env.len(), MAX_PROFILE_LINES);
        assert_eq!(p.reasons.len(), MAX_PROFILE_LINES);
        let value = &p.env[0].1;
        assert!(value.len() <= MAX_PROFILE_LINE + '…'.len_utf8() && value.ends_with('…'));
    }

    #[tokio::test]
    async fn a_guest_that_stops_reading_fails_a_send_within_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            // Accepts and never reads.
            let (_s, _) = listener.accept().await.unwrap();
            let _ = done_rx.await;
        });
        let (mut tx, _rx) = connect(&path).await.unwrap();
        let msg = HostMessage::Stdin {
            id: "c".into(),
            data: vec![0; 512 * 1024],
        };
        let timeout = std::time::Duration::from_millis(300);
        let started = std::time::Instant::now();
        let err = loop {
            if let Err(e) = tx.send_within(&msg, timeout).await {
                break e;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(20));
        };
        assert!(matches!(err, AgentLinkError::WriteTimeout { .. }), "{err}");
        // Half a frame may be on the wire: nothing more goes out.
        let after = tx
            .send_within(&HostMessage::ListProcesses, timeout)
            .await
            .unwrap_err();
        assert!(matches!(after, AgentLinkError::Closed), "{after}");
        let _ = done_tx.send(());
    }

    #[tokio::test]
    async fn garbage_from_the_guest_is_a_protocol_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"\x00\x01garbage garbage").await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        });
        let (_tx, mut rx) = connect(&path).await.unwrap();
        let err = rx.recv().await.unwrap_err();
        assert!(
            matches!(err, AgentLinkError::Protocol(ProtoError::BadMagic(_))),
            "{err}"
        );
    }
}
