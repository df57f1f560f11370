//! Test-only: a scripted stand-in for QEMU's QMP socket that also receives
//! descriptors passed with `getfd`, so QMP sequences are unit-tested
//! without running QEMU.

use std::io::{IoSliceMut, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use serde_json::Value;

/// What the fake does with one request: the reply lines to send (each a
/// JSON object; `"id"` is filled in for replies), or `None` to hang up as
/// a crashing QEMU would.
pub type Script = Box<dyn FnMut(&Value, Option<OwnedFd>) -> Option<Vec<Value>> + Send>;

/// A fake QEMU listening on a QMP socket in a temporary directory.
pub struct FakeQemu {
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// Every request received, in order (`execute` name and arguments).
    pub requests: Arc<Mutex<Vec<Value>>>,
}

impl FakeQemu {
    /// Starts serving one connection with `script`. `qmp_capabilities`
    /// is answered by the fake itself.
    pub fn start(mut script: Script) -> FakeQemu {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut pending = Vec::new();
            let mut fds: Vec<OwnedFd> = Vec::new();
            loop {
                let Some((line, fd)) = next_line(&mut s, &mut pending, &mut fds) else {
                    return;
                };
                let req: Value = serde_json::from_slice(&line).unwrap();
                log.lock().unwrap().push(req.clone());
                let replies = if req["execute"] == "qmp_capabilities" {
                    Some(vec![serde_json::json!({ "return": {} })])
                } else {
                    script(&req, fd)
                };
                let Some(replies) = replies else {
                    return; // hang up
                };
                for mut r in replies {
                    if r.get("event").is_none() {
                        r["id"] = req["id"].clone();
                    }
                    let mut out = serde_json::to_vec(&r).unwrap();
                    out.extend_from_slice(b"\r\n");
                    if s.write_all(&out).is_err() {
                        return;
                    }
                }
            }
        });
        FakeQemu {
            _dir: dir,
            socket,
            requests,
        }
    }

    /// The `execute` names received so far.
    pub fn commands(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r["execute"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

/// Reads one request line with `recvmsg`, collecting passed descriptors;
/// a descriptor is handed out with the line it arrived with.
fn next_line(
    s: &mut UnixStream,
    pending: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> Option<(Vec<u8>, Option<OwnedFd>)> {
    use std::os::fd::AsRawFd;
    loop {
        if let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            return Some((line, fds.pop()));
        }
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg =
            recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).ok()?;
        let n = msg.bytes;
        for c in msg.cmsgs().ok()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just gave us these descriptors.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&buf[..n]);
    }
}
