//! A small client for QMP, QEMU's JSON control protocol.
//!
//! One request at a time: [`Qmp::execute`] sends a command and reads lines
//! until the matching reply, keeping any asynchronous events it reads on the
//! way for [`Qmp::take_events`] / [`Qmp::next_event`].

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest line accepted from QEMU (state queries are small; this bounds memory).
const MAX_LINE: usize = 4 << 20;

/// Errors of the QMP conversation.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP I/O")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed by QEMU")]
    Closed,
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// An asynchronous QMP event (`STOP`, `RESUME`, `SHUTDOWN`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

/// A connected, capability-negotiated QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<QmpEvent>,
    next_id: u64,
}

impl Qmp {
    /// Connects to a QMP socket, reads the greeting and leaves capability
    /// negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
            next_id: 1,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected QMP greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let (id, line) = self.request(command, arguments)?;
        self.writer.write_all(&line).await?;
        self.reply(id, command).await
    }

    /// Runs one command with a file descriptor attached (`SCM_RIGHTS`), as
    /// `getfd` wants. QEMU keeps its own copy; the caller may close `fd`.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        let (id, line) = self.request(command, arguments)?;
        let socket: &UnixStream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        let sent = loop {
            socket.writable().await?;
            let attempt = socket.try_io(tokio::io::Interest::WRITABLE, || {
                sendmsg::<()>(
                    socket.as_raw_fd(),
                    &[IoSlice::new(&line)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match attempt {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // The descriptor went with the first byte; the rest is plain data.
        self.writer.write_all(&line[sent..]).await?;
        self.reply(id, command).await
    }

    /// A numbered request line.
    fn request(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<(u64, Vec<u8>), QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            req["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&req).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        Ok((id, line))
    }

    /// Reads until the reply to request `id`, keeping events.
    async fn reply(&mut self, id: u64, command: &str) -> Result<Value, QmpError> {
        loop {
            let msg = self.read_message().await?;
            if msg.get("event").is_some() {
                self.events.push_back(parse_event(msg));
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(QmpError::Protocol(format!("unexpected reply {msg}")));
            }
            if let Some(err) = msg.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("?").to_string(),
                    desc: err["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Ok(msg.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Events received so far and not yet taken.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Waits for the next event.
    pub async fn next_event(&mut self) -> Result<QmpEvent, QmpError> {
        if let Some(ev) = self.events.pop_front() {
            return Ok(ev);
        }
        loop {
            let msg = self.read_message().await?;
            if msg.get("event").is_some() {
                return Ok(parse_event(msg));
            }
        }
    }

    /// Reads one JSON line.
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                return Err(QmpError::Closed);
            }
            if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&buf[..nl]);
                self.reader.consume(nl + 1);
                break;
            }
            let n = buf.len();
            line.extend_from_slice(buf);
            self.reader.consume(n);
            if line.len() > MAX_LINE {
                return Err(QmpError::Protocol(format!(
                    "reply line longer than {MAX_LINE} bytes"
                )));
            }
        }
        serde_json::from_slice(&line).map_err(|e| {
            QmpError::Protocol(format!(
                "bad JSON from QEMU ({e}): {}",
                String::from_utf8_lossy(&line[..line.len().min(200)])
            ))
        })
    }
}

fn parse_event(msg: Value) -> QmpEvent {
    QmpEvent {
        name: msg["event"].as_str().unwrap_or_default().to_string(),
        data: msg.get("data").cloned().unwrap_or(Value::Null),
    }
}

/// Test-only: drives a [`Qmp`] against a scripted fake QEMU on a socket pair.
#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    async fn fake_qemu(
        script: Vec<(&'static str, &'static str)>,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .unwrap();
            for (expect, reply) in script {
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                assert!(line.contains(expect), "{line} lacks {expect}");
                w.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        (dir, path)
    }

    #[tokio::test]
    async fn negotiates_runs_commands_and_keeps_events() {
        let (_d, path) = fake_qemu(vec![
            ("qmp_capabilities", "{\"return\": {}, \"id\": 1}\r\n"),
            (
                "query-status",
                "{\"event\": \"STOP\", \"data\": {}, \"timestamp\": {}}\r\n{\"return\": {\"status\": \"paused\"}, \"id\": 2}\r\n",
            ),
            (
                "\"cont\"",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": 3}\r\n",
            ),
        ])
        .await;
        let mut q = Qmp::connect(&path).await.unwrap();
        let st = q.execute("query-status", None).await.unwrap();
        assert_eq!(st["status"], "paused");
        let events = q.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].name, "STOP");
        let err = q.execute("cont", None).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "QMP command cont failed: GenericError: nope"
        );
        assert!(matches!(
            q.execute("x", None).await,
            Err(QmpError::Closed | QmpError::Io(_))
        ));
    }
}
