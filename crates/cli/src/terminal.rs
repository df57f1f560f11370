//! The user's terminal: raw mode for `-t`, its size, and the signals that
//! `podvisor run` forwards to the container.

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::termios::{self, SetArg, Termios};
use podvisor_proto::TerminalSize;
use podvisor_run::Control;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// Puts stdin's terminal in raw mode and restores it when dropped, so that
/// keys (Ctrl-C included) go to the container's terminal unchanged.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enable() -> nix::Result<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// True if the file descriptor is a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    nix::unistd::isatty(fd).unwrap_or(false)
}

/// The size of the terminal on stdout (or stdin), if there is one.
pub fn size() -> Option<TerminalSize> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some(TerminalSize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            });
        }
    }
    None
}

/// Forwards terminal resizes (with a terminal) and signals (without one: with
/// a terminal, Ctrl-C reaches the container as a key) to the container.
pub fn forward_events(tty: bool, tx: mpsc::Sender<Control>) -> std::io::Result<()> {
    if tty {
        let mut winch = signal(SignalKind::window_change())?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some(sz) = size()
                    && tx.send(Control::Resize(sz)).await.is_err()
                {
                    return;
                }
            }
        });
    }
    let forwarded = [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
        (SignalKind::quit(), libc::SIGQUIT),
        (SignalKind::user_defined1(), libc::SIGUSR1),
        (SignalKind::user_defined2(), libc::SIGUSR2),
    ];
    for (kind, number) in forwarded {
        let mut s = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(Control::Signal(number)).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}
