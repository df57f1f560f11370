//! The save and restore QMP sequences against a scripted fake QEMU that
//! writes and reads the state through the descriptor it was passed.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::qemu::fake_qemu::FakeQemu;

/// A `Write` the test can look into afterwards.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn ok() -> Option<Vec<Value>> {
    Some(vec![json!({ "return": {} })])
}

const STATE: &[u8] = b"QEVM device state bytes";

#[tokio::test]
async fn save_stops_sets_ignore_shared_and_streams_through_the_pipe() {
    let mut polls = 0;
    let fake = FakeQemu::start(Box::new(move |req, fd| {
        match req["execute"].as_str().unwrap() {
            "query-status" => Some(vec![
                json!({ "return": { "status": "running", "running": true } }),
            ]),
            "getfd" => {
                assert_eq!(req["arguments"]["fdname"], STATE_OUT_FD);
                let mut pipe = std::fs::File::from(fd.expect("getfd carries a descriptor"));
                pipe.write_all(STATE).unwrap();
                // Dropped here: QEMU closes it when the migration ends.
                ok()
            }
            "query-migrate" => {
                polls += 1;
                let status = if polls < 3 { "active" } else { "completed" };
                Some(vec![json!({ "return": { "status": status } })])
            }
            _ => ok(),
        }
    }));
    let mut qmp = Qmp::connect(&fake.socket).await.unwrap();
    let sink = SharedBuf::default();
    let n = save(
        &mut qmp,
        true,
        Box::new(sink.clone()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(n, STATE.len() as u64);
    assert_eq!(&sink.0.lock().unwrap()[..], STATE);
    assert_eq!(
        fake.commands(),
        [
            "qmp_capabilities",
            "query-status",
            "stop",
            "migrate-set-capabilities",
            "getfd",
            "migrate",
            "query-migrate",
            "query-migrate",
            "query-migrate"
        ]
    );
    let reqs = fake.requests.lock().unwrap();
    assert_eq!(
        reqs[3]["arguments"],
        json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
    );
    assert_eq!(
        reqs[5]["arguments"],
        json!({ "uri": "fd:podvisor-state-out" })
    );
}

#[tokio::test]
async fn a_failed_save_names_qemus_reason() {
    let fake = FakeQemu::start(Box::new(|req, _fd| {
        match req["execute"].as_str().unwrap() {
            "query-status" => Some(vec![
                json!({ "return": { "status": "paused", "running": false } }),
            ]),
            "query-migrate" => Some(vec![json!({ "return": {
            "status": "failed", "error-desc": "Unable to write to fd: Broken pipe" } })]),
            _ => ok(),
        }
    }));
    let mut qmp = Qmp::connect(&fake.socket).await.unwrap();
    let err = save(
        &mut qmp,
        false,
        Box::new(SharedBuf::default()),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "saving the VM state failed: Unable to write to fd: Broken pipe"
    );
    // Already paused: no stop; RAM not in a file: the capability is off.
    let cmds = fake.commands();
    assert!(!cmds.contains(&"stop".to_string()), "{cmds:?}");
    let reqs = fake.requests.lock().unwrap();
    assert_eq!(reqs[2]["arguments"]["capabilities"][0]["state"], false);
}

#[tokio::test]
async fn restore_feeds_the_state_and_waits_for_qemu_to_load_it() {
    let received = Arc::new(Mutex::new(Vec::new()));
    let got = received.clone();
    let mut reader = None;
    let mut polls = 0;
    let fake = FakeQemu::start(Box::new(move |req, fd| {
        match req["execute"].as_str().unwrap() {
            "getfd" => {
                assert_eq!(req["arguments"]["fdname"], STATE_IN_FD);
                let mut pipe = std::fs::File::from(fd.unwrap());
                let got = got.clone();
                reader = Some(std::thread::spawn(move || {
                    let mut all = Vec::new();
                    pipe.read_to_end(&mut all).unwrap();
                    *got.lock().unwrap() = all;
                }));
                ok()
            }
            "query-status" => {
                polls += 1;
                if polls == 1 {
                    return Some(vec![
                        json!({ "return": { "status": "inmigrate", "running": false } }),
                    ]);
                }
                // Loaded once the whole stream was read.
                reader.take().unwrap().join().unwrap();
                Some(vec![
                    json!({ "return": { "status": "paused", "running": false } }),
                ])
            }
            _ => ok(),
        }
    }));
    let mut qmp = Qmp::connect(&fake.socket).await.unwrap();
    restore(&mut qmp, true, Box::new(STATE), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&received.lock().unwrap()[..], STATE);
    assert_eq!(
        fake.commands(),
        [
            "qmp_capabilities",
            "migrate-set-capabilities",
            "getfd",
            "migrate-incoming",
            "query-status",
            "query-status"
        ]
    );
    let reqs = fake.requests.lock().unwrap();
    assert_eq!(
        reqs[3]["arguments"],
        json!({ "uri": "fd:podvisor-state-in" })
    );
    assert_eq!(reqs[1]["arguments"]["capabilities"][0]["state"], true);
}

/// A reader that fails part-way, like a state file on a failing disk.
struct FailingSource(usize);

impl Read for FailingSource {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0 == 0 {
            return Err(std::io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.0);
        self.0 -= n;
        buf[..n].fill(b'x');
        Ok(n)
    }
}

#[tokio::test]
async fn a_qemu_that_rejects_the_state_or_a_failing_source_is_an_error() {
    // QEMU rejects the stream and exits: the QMP connection drops.
    let fake = FakeQemu::start(Box::new(|req, fd| match req["execute"].as_str().unwrap() {
        "getfd" => {
            drop(fd);
            ok()
        }
        "query-status" => None,
        _ => ok(),
    }));
    let mut qmp = Qmp::connect(&fake.socket).await.unwrap();
    let err = restore(&mut qmp, true, Box::new(STATE), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, VmmError::Control(_)), "{err}");

    // The source fails: that is the reason given.
    let fake = FakeQemu::start(Box::new(|req, fd| match req["execute"].as_str().unwrap() {
        "getfd" => {
            let mut pipe = std::fs::File::from(fd.unwrap());
            std::thread::spawn(move || std::io::copy(&mut pipe, &mut std::io::sink()));
            ok()
        }
        "query-status" => None,
        _ => ok(),
    }));
    let mut qmp = Qmp::connect(&fake.socket).await.unwrap();
    let err = restore(
        &mut qmp,
        true,
        Box::new(FailingSource(100_000)),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "restoring the VM state failed: reading the state: disk on fire"
    );
}
