//! Exec sessions as the host runtime's users see them: what to start, its
//! events, its input.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use podvisor_proto::{Stream, TerminalSize};
use tokio::sync::mpsc;

/// Most exec output (bytes) that may wait for its client: a client that
/// falls further behind is dropped with an error and its process killed,
/// so a client that stops reading never holds up its pod's task (the
/// pod's other output, its logs, its deletion) or the host's memory.
pub const EXEC_OUTPUT_BACKLOG: usize = 4 << 20;
/// Most events that may wait for an exec's client (output chunks are
/// small; this bounds the count as [`EXEC_OUTPUT_BACKLOG`] the bytes).
pub const EXEC_EVENT_BACKLOG: usize = 256;

/// A process to start in a running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// The container; `None`: the pod's first container.
    pub container: Option<String>,
    pub command: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    /// Initial terminal size (with `tty`).
    pub size: Option<TerminalSize>,
}

/// What an exec session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Output (with a terminal all of it comes as stdout).
    Output(Stream, Vec<u8>),
    /// The process ended with this exit code (128 + signal if killed).
    Exited(i32),
    /// It could not be started (the exit code a shell would report, 127
    /// for a command not found), or its VM went away.
    Failed { exit_code: i32, message: String },
}

/// Input to an exec session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecInput {
    Stdin(Vec<u8>),
    CloseStdin,
    Resize(TerminalSize),
    /// The client went away: the process is killed.
    Hangup,
}

/// A running exec: events until `Exited`/`Failed`; dropping `input` kills
/// the process.
pub struct ExecSession {
    pub events: ExecEvents,
    pub input: mpsc::Sender<ExecInput>,
}

/// What the client's end of an exec's events and the pod task's end share.
#[derive(Default)]
struct Backlog {
    /// Output bytes sent and not yet received.
    bytes: AtomicUsize,
    /// The client fell behind and the session was dropped.
    dropped: AtomicBool,
}

/// The events of an exec session, as its client receives them.
pub struct ExecEvents {
    rx: mpsc::Receiver<ExecEvent>,
    backlog: Arc<Backlog>,
    told: bool,
}

impl ExecEvents {
    /// The next event; after the last one `None`. A session dropped
    /// because its client fell behind ends with a `Failed` event saying
    /// so, after the output that was queued.
    pub async fn recv(&mut self) -> Option<ExecEvent> {
        match self.rx.recv().await {
            Some(event) => {
                if let ExecEvent::Output(_, data) = &event {
                    self.backlog.bytes.fetch_sub(data.len(), Ordering::Relaxed);
                }
                Some(event)
            }
            None if self.backlog.dropped.load(Ordering::Relaxed) && !self.told => {
                self.told = true;
                Some(ExecEvent::Failed {
                    exit_code: 255,
                    message: format!(
                        "exec session dropped: its client did not read its output \
                         (more than {} MiB or {EXEC_EVENT_BACKLOG} chunks waited); \
                         the process was killed",
                        EXEC_OUTPUT_BACKLOG >> 20
                    ),
                })
            }
            None => None,
        }
    }
}

/// Why an event did not reach an exec's client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Undelivered {
    /// The client is gone.
    Gone,
    /// The client fell behind its bound; the session is dropped.
    Behind,
}

/// The pod task's end of an exec's events: never waits.
pub(crate) struct ExecOutlet {
    tx: mpsc::Sender<ExecEvent>,
    backlog: Arc<Backlog>,
}

impl ExecOutlet {
    /// Passes `event` on if the client is within its bounds. Once this
    /// says [`Undelivered::Behind`] the session is over: the caller drops
    /// the outlet (and kills the process), and the client gets a `Failed`
    /// after what was queued.
    pub(crate) fn offer(&self, event: ExecEvent) -> Result<(), Undelivered> {
        let len = match &event {
            ExecEvent::Output(_, data) => data.len(),
            _ => 0,
        };
        if self.backlog.bytes.load(Ordering::Relaxed) + len > EXEC_OUTPUT_BACKLOG {
            self.backlog.dropped.store(true, Ordering::Relaxed);
            return Err(Undelivered::Behind);
        }
        self.backlog.bytes.fetch_add(len, Ordering::Relaxed);
        match self.tx.try_send(event) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.backlog.bytes.fetch_sub(len, Ordering::Relaxed);
                self.backlog.dropped.store(true, Ordering::Relaxed);
                Err(Undelivered::Behind)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Undelivered::Gone),
        }
    }
}

/// A new exec's two ends of its events.
pub(crate) fn exec_events() -> (ExecOutlet, ExecEvents) {
    let (tx, rx) = mpsc::channel(EXEC_EVENT_BACKLOG);
    let backlog = Arc::new(Backlog::default());
    (
        ExecOutlet {
            tx,
            backlog: backlog.clone(),
        },
        ExecEvents {
            rx,
            backlog,
            told: false,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_that_does_not_read_is_dropped_with_an_error_after_its_output() {
        let (outlet, mut events) = exec_events();
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        let refused = loop {
            match outlet.offer(ExecEvent::Output(Stream::Stdout, chunk.clone())) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent <= EXEC_EVENT_BACKLOG, "never refused");
        };
        assert_eq!(refused, Undelivered::Behind);
        assert_eq!(sent * chunk.len(), EXEC_OUTPUT_BACKLOG);
        drop(outlet);
        for _ in 0..sent {
            assert!(matches!(events.recv().await, Some(ExecEvent::Output(..))));
        }
        match events.recv().await {
            Some(ExecEvent::Failed { exit_code, message }) => {
                assert_eq!(exit_code, 255);
                assert!(message.contains("did not read its output"), "{message}");
            }
            other => panic!("expected the error, got {other:?}"),
        }
        assert_eq!(events.recv().await, None);
    }

    #[tokio::test]
    async fn a_reading_client_gets_everything() {
        let (outlet, mut events) = exec_events();
        for _ in 0..10 * EXEC_EVENT_BACKLOG {
            outlet
                .offer(ExecEvent::Output(Stream::Stdout, vec![b'y'; 100_000]))
                .unwrap();
            assert!(matches!(events.recv().await, Some(ExecEvent::Output(..))));
        }
        outlet.offer(ExecEvent::Exited(0)).unwrap();
        drop(outlet);
        assert_eq!(events.recv().await, Some(ExecEvent::Exited(0)));
        assert_eq!(events.recv().await, None);
    }

    #[tokio::test]
    async fn many_small_chunks_are_bounded_by_count() {
        let (outlet, _events) = exec_events();
        for _ in 0..EXEC_EVENT_BACKLOG {
            outlet
                .offer(ExecEvent::Output(Stream::Stderr, vec![1]))
                .unwrap();
        }
        assert_eq!(
            outlet.offer(ExecEvent::Output(Stream::Stderr, vec![1])),
            Err(Undelivered::Behind)
        );
    }
}
