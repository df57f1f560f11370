//! Exec sessions as the host runtime's users see them: what to start, its
//! events, its input.

use podvisor_proto::{Stream, TerminalSize};
use tokio::sync::mpsc;

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
    pub events: mpsc::Receiver<ExecEvent>,
    pub input: mpsc::Sender<ExecInput>,
}
