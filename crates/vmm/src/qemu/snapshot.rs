//! Saving and restoring a VM's state with QEMU's migration over QMP.
//!
//! The migration stream never touches a path QEMU chooses: podvisor makes a
//! pipe, hands QEMU one end with `getfd`, and migrates to (or from)
//! `fd:NAME`; a thread copies between the other end and the caller's
//! `Write`/`Read`. So the caller sees every byte (to hash, compress or
//! encrypt it) and no shell command line is involved.
//!
//! When some guest memory is a shared file mapping (guest RAM in a file, a
//! virtio-pmem device's file), the `x-ignore-shared` capability leaves it
//! out of the stream; it must be set on the restoring side as well, since
//! it changes the stream's layout. Guest RAM that is not in a file is
//! saved either way. (QEMU 7.2 left a read-only virtio-pmem region out of
//! the stream even without the capability: the state of a pod VM with a
//! 48 MiB layer file read through DAX had the same size either way; with
//! it, the layers stay out whatever the QEMU.)

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::qmp::Qmp;
use crate::VmmError;

/// `getfd` name of the pipe QEMU writes a saved state to.
pub const STATE_OUT_FD: &str = "podvisor-state-out";
/// `getfd` name of the pipe QEMU reads a state to restore from.
pub const STATE_IN_FD: &str = "podvisor-state-in";

/// How often the migration status is polled while saving.
const SAVE_POLL: Duration = Duration::from_millis(5);
/// How often the run state is polled while restoring (a clone's start
/// waits on it, so it is short).
const RESTORE_POLL: Duration = Duration::from_millis(2);

/// Arguments of `migrate-set-capabilities`: `x-ignore-shared` on exactly
/// when some guest memory is a shared file mapping.
pub fn capabilities_args(shared_memory: bool) -> Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": shared_memory }] })
}

/// Arguments of `migrate` / `migrate-incoming` for a `getfd` descriptor.
pub fn fd_uri_args(fd_name: &str) -> Value {
    json!({ "uri": format!("fd:{fd_name}") })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), VmmError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| VmmError::Io {
        what: "create the state pipe".into(),
        source: e.into(),
    })
}

/// Sets the migration capabilities both sides need and gives QEMU `end`,
/// one end of the state pipe, as `fd_name`. Ours is closed: QEMU holds its
/// own copy, and the other side must see end of file when QEMU closes it.
async fn hand_over(
    qmp: &mut Qmp,
    shared_memory: bool,
    fd_name: &str,
    end: OwnedFd,
) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(capabilities_args(shared_memory)),
    )
    .await?;
    qmp.execute_with_fd("getfd", Some(json!({ "fdname": fd_name })), end.as_fd())
        .await?;
    Ok(())
}

/// Pauses the VM if it runs and streams its state into `sink`. Returns the
/// bytes written. The VM stays paused.
pub async fn save(
    qmp: &mut Qmp,
    shared_memory: bool,
    sink: Box<dyn Write + Send>,
    timeout: Duration,
) -> Result<u64, VmmError> {
    let status = qmp.execute("query-status", None).await?;
    if status["running"].as_bool() != Some(false) {
        qmp.execute("stop", None).await?;
    }
    let (read_end, write_end) = pipe()?;
    hand_over(qmp, shared_memory, STATE_OUT_FD, write_end).await?;
    let reader = tokio::task::spawn_blocking(move || drain_into(read_end, sink));

    let migrated = async {
        qmp.execute("migrate", Some(fd_uri_args(STATE_OUT_FD)))
            .await?;
        let started = Instant::now();
        loop {
            let info = qmp.execute("query-migrate", None).await?;
            match info["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(VmmError::Save(
                        info["error-desc"]
                            .as_str()
                            .unwrap_or("QEMU reported the migration as failed")
                            .to_string(),
                    ));
                }
                _ if started.elapsed() > timeout => {
                    let _ = qmp.execute("migrate_cancel", None).await;
                    return Err(VmmError::Timeout(
                        timeout,
                        "the VM state to be saved".into(),
                    ));
                }
                _ => tokio::time::sleep(SAVE_POLL).await,
            }
        }
    }
    .await;
    // QEMU closes its end when the migration ends either way.
    let copied = reader
        .await
        .map_err(|e| VmmError::Save(format!("the state writer panicked: {e}")))?;
    migrated?;
    copied.map_err(|e| VmmError::Save(format!("writing the state: {e}")))
}

/// Copies the pipe into `sink` until end of file. After a write error it
/// keeps draining (so QEMU never blocks on a full pipe) and reports the
/// first error.
fn drain_into(read_end: OwnedFd, mut sink: Box<dyn Write + Send>) -> std::io::Result<u64> {
    let mut pipe = std::fs::File::from(read_end);
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    let mut failed: Option<std::io::Error> = None;
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if failed.is_none() {
            match sink.write_all(&buf[..n]) {
                Ok(()) => total += n as u64,
                Err(e) => failed = Some(e),
            }
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    sink.flush()?;
    Ok(total)
}

/// Why feeding the state to QEMU stopped early.
#[derive(Debug)]
enum FeedError {
    /// Reading the caller's source failed.
    Source(std::io::Error),
    /// QEMU stopped reading (it rejected the state and exited).
    Pipe(std::io::Error),
}

/// Feeds `state` to a VM started with `-incoming defer` and waits until
/// QEMU has loaded it. The VM is then paused (it was started with `-S`).
pub async fn restore(
    qmp: &mut Qmp,
    shared_memory: bool,
    state: Box<dyn Read + Send>,
    timeout: Duration,
) -> Result<(), VmmError> {
    let (read_end, write_end) = pipe()?;
    hand_over(qmp, shared_memory, STATE_IN_FD, read_end).await?;
    let writer = tokio::task::spawn_blocking(move || feed(state, write_end));

    let loaded = async {
        qmp.execute("migrate-incoming", Some(fd_uri_args(STATE_IN_FD)))
            .await?;
        let started = Instant::now();
        loop {
            let status = qmp.execute("query-status", None).await?;
            match status["status"].as_str() {
                Some("inmigrate") if started.elapsed() > timeout => {
                    return Err(VmmError::Timeout(timeout, "the VM state to load".into()));
                }
                Some("inmigrate") => tokio::time::sleep(RESTORE_POLL).await,
                Some("paused") | Some("running") | Some("prelaunch") => return Ok(()),
                other => {
                    return Err(VmmError::Restore(format!(
                        "the VM is in state {} after loading",
                        other.unwrap_or("?")
                    )));
                }
            }
        }
    }
    .await;
    let fed = writer
        .await
        .map_err(|e| VmmError::Restore(format!("the state reader panicked: {e}")))?;
    match (loaded, fed) {
        (Ok(()), Ok(())) => Ok(()),
        // A source that failed explains a rejected stream best.
        (_, Err(FeedError::Source(e))) => Err(VmmError::Restore(format!("reading the state: {e}"))),
        (Err(e), _) => Err(e),
        (Ok(()), Err(FeedError::Pipe(e))) => Err(VmmError::Restore(format!(
            "QEMU stopped reading the state early: {e}"
        ))),
    }
}

/// Blocks of the state read ahead of QEMU: at most this many wait, each
/// [`FEED_BLOCK`] bytes.
const FEED_DEPTH: usize = 4;
const FEED_BLOCK: usize = 256 << 10;

/// Copies `state` into the pipe and closes it. A thread of its own reads
/// (decrypts, decompresses) the next blocks while QEMU takes in the last
/// one: both take about as long, and one after the other they took twice
/// as long (a 256 MiB pod's wake under TCG: ~100 ms each).
fn feed(state: Box<dyn Read + Send>, write_end: OwnedFd) -> Result<(), FeedError> {
    let mut pipe = std::fs::File::from(write_end);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(FEED_DEPTH);
    let reader = std::thread::Builder::new()
        .name("state-reader".into())
        .spawn(move || read_ahead(state, tx))
        .map_err(FeedError::Source)?;
    let mut written = Ok(());
    for block in rx.iter() {
        if let Err(e) = pipe.write_all(&block) {
            written = Err(FeedError::Pipe(e));
            break;
        }
    }
    // The reader's next send fails, and it stops.
    drop(rx);
    let read = reader.join().unwrap_or_else(|_| {
        Err(FeedError::Source(std::io::Error::other(
            "the state reader panicked",
        )))
    });
    // What the source said first: a state that cannot be read explains
    // why QEMU stopped.
    read.and(written)
}

/// Reads `state` in blocks into `tx` until its end (or until nobody
/// takes the blocks any more).
fn read_ahead(
    mut state: Box<dyn Read + Send>,
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> Result<(), FeedError> {
    loop {
        let mut block = vec![0u8; FEED_BLOCK];
        let mut filled = 0;
        while filled < block.len() {
            match state.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FeedError::Source(e)),
            }
        }
        if filled == 0 {
            return Ok(());
        }
        block.truncate(filled);
        let last = filled < FEED_BLOCK;
        if tx.send(block).is_err() || last {
            return Ok(());
        }
    }
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
