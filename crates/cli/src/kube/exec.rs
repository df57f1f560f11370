//! `podvisor exec`: a command in a pod's container over the server's
//! WebSocket, with the raw terminal of `podvisor run -it`.

use std::os::fd::AsFd;

use anyhow::{Context, bail};
use podvisor_api::client::{ExecOptions, ExecOutput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};

use super::{NamespaceArgs, ServerConn};
use crate::terminal;

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    conn: ServerConn,
    /// Send stdin to the command.
    #[arg(long, short = 'i')]
    stdin: bool,
    /// Give the command a terminal (when stdin is one).
    #[arg(long, short = 't')]
    tty: bool,
    /// The pod.
    pod: String,
    #[command(flatten)]
    ns: NamespaceArgs,
    /// The container (needed when the pod has several).
    #[arg(long, short = 'c')]
    container: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub async fn run(args: ExecArgs) -> anyhow::Result<u8> {
    let client = args.conn.client()?;
    let stdin_tty = terminal::is_terminal(std::io::stdin().as_fd());
    let tty = args.tty && stdin_tty;
    if args.tty && !stdin_tty {
        eprintln!("podvisor: stdin is not a terminal; running without one");
    }
    let options = ExecOptions {
        container: args.container.clone(),
        command: args.command.clone(),
        stdin: args.stdin,
        tty,
    };
    let session = client
        .exec(&args.ns.namespace, &args.pod, &options)
        .await
        .with_context(|| format!("exec in pod {}/{}", args.ns.namespace, args.pod))?;
    let (mut sender, mut receiver) = (session.sender, session.receiver);

    // Input side: terminal size, resizes, stdin. One task owns the sender.
    let (input_tx, mut input_rx) = tokio::sync::mpsc::channel::<Input>(16);
    if tty {
        if let Some(size) = terminal::size() {
            let _ = input_tx.send(Input::Resize(size.cols, size.rows)).await;
        }
        let mut winch =
            signal(SignalKind::window_change()).context("install a SIGWINCH handler")?;
        let tx = input_tx.clone();
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some(size) = terminal::size()
                    && tx.send(Input::Resize(size.cols, size.rows)).await.is_err()
                {
                    return;
                }
            }
        });
    }
    if args.stdin {
        let tx = input_tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Input::Eof).await;
                        return;
                    }
                    Ok(n) => {
                        if tx.send(Input::Data(buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    drop(input_tx);
    let writer = tokio::spawn(async move {
        while let Some(input) = input_rx.recv().await {
            let sent = match input {
                Input::Data(d) => sender.stdin(&d).await,
                Input::Resize(w, h) => sender.resize(w, h).await,
                Input::Eof => sender.close_stdin().await,
            };
            if sent.is_err() {
                return;
            }
        }
    });

    let raw = if tty {
        Some(terminal::RawMode::enable().context("put the terminal in raw mode")?)
    } else {
        None
    };
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut exit = None;
    while let Some(output) = receiver.next().await {
        match output {
            Ok(ExecOutput::Stdout(b)) => {
                stdout.write_all(&b).await.context("write to stdout")?;
                stdout.flush().await.context("write to stdout")?;
            }
            Ok(ExecOutput::Stderr(b)) => {
                stderr.write_all(&b).await.context("write to stderr")?;
                stderr.flush().await.context("write to stderr")?;
            }
            Ok(ExecOutput::Exit(status)) => {
                exit = Some(status);
                break;
            }
            Err(e) => {
                drop(raw);
                return Err(e.into());
            }
        }
    }
    drop(raw);
    writer.abort();
    let Some(status) = exit else {
        bail!("the connection closed before the command's exit status arrived");
    };
    if let Some(message) = &status.message {
        eprintln!("podvisor: {message}");
    }
    Ok(status.exit_code.clamp(0, 255) as u8)
}

enum Input {
    Data(Vec<u8>),
    Resize(u16, u16),
    Eof,
}
