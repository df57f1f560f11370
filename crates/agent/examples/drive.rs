//! A minimal host side for trying the agent in a real VM by hand.
//!
//! Boot a VM whose agent port is a QEMU socket chardev (see
//! `docs/ARCHITECTURE.md`), then:
//!
//! ```text
//! cargo run -p podvisor-agent --example drive -- /tmp/ag.sock [options] -- CMD ARGS...
//!   --layers pvl0,pvl1   layer serials, bottom first (default pvl0)
//!   --user U  --cwd D  --hostname H  -e K=V (repeatable)
//!   -i                   pass this process's stdin to the container
//!   -t ROWSxCOLS         give it a terminal of that size
//!   --stop-after MS      send Stop (grace 1000 ms) after MS milliseconds
//!   --signal-after MS:SIG  send Signal SIG after MS milliseconds
//!   --resize-after MS:ROWSxCOLS  send Resize after MS milliseconds
//!   --repeat N           run the command N times, one after the other
//!   --garbage            write junk on the port first (the agent must survive)
//!   --shutdown           send Shutdown at the end and wait for the power-off
//! ```
//!
//! Output goes to stdout/stderr; the protocol events to stderr prefixed
//! `drive:`; the exit code is the last container's (`ExitStatus::shell_code`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use podvisor_proto::{
    ContainerSpec, FrameDecoder, GuestMessage, HostMessage, ProcessSpec, Stream, TerminalSize,
};

#[derive(Default)]
struct Opts {
    socket: String,
    layers: Vec<String>,
    user: String,
    cwd: String,
    hostname: String,
    env: Vec<String>,
    stdin: bool,
    terminal: Option<TerminalSize>,
    stop_after: Option<u64>,
    signal_after: Option<(u64, i32)>,
    resize_after: Option<(u64, TerminalSize)>,
    repeat: usize,
    garbage: bool,
    shutdown: bool,
    args: Vec<String>,
}

fn parse() -> Opts {
    let mut o = Opts {
        layers: vec!["pvl0".into()],
        hostname: "pod".into(),
        repeat: 1,
        ..Opts::default()
    };
    let mut it = std::env::args().skip(1);
    o.socket = it.next().expect("usage: drive SOCKET [options] -- CMD...");
    while let Some(a) = it.next() {
        let mut val = || it.next().expect("option needs a value");
        match a.as_str() {
            "--layers" => o.layers = val().split(',').map(String::from).collect(),
            "--user" => o.user = val(),
            "--cwd" => o.cwd = val(),
            "--hostname" => o.hostname = val(),
            "-e" => o.env.push(val()),
            "-i" => o.stdin = true,
            "-t" => o.terminal = Some(size(&val())),
            "--resize-after" => {
                let v = val();
                let (ms, s) = v.split_once(':').expect("--resize-after MS:ROWSxCOLS");
                o.resize_after = Some((ms.parse().unwrap(), size(s)));
            }
            "--stop-after" => o.stop_after = Some(val().parse().unwrap()),
            "--signal-after" => {
                let v = val();
                let (ms, sig) = v.split_once(':').expect("--signal-after MS:SIG");
                o.signal_after = Some((ms.parse().unwrap(), sig.parse().unwrap()));
            }
            "--repeat" => o.repeat = val().parse().unwrap(),
            "--garbage" => o.garbage = true,
            "--shutdown" => o.shutdown = true,
            "--" => {
                o.args = it.by_ref().collect();
                break;
            }
            other => panic!("unknown option {other}"),
        }
    }
    o
}

fn size(v: &str) -> TerminalSize {
    let (r, c) = v.split_once('x').expect("size as ROWSxCOLS");
    TerminalSize {
        rows: r.parse().unwrap(),
        cols: c.parse().unwrap(),
    }
}

fn send(sock: &mut UnixStream, msg: &HostMessage) {
    sock.write_all(&podvisor_proto::encode(msg).unwrap())
        .unwrap();
}

struct Receiver {
    sock: UnixStream,
    dec: FrameDecoder,
}

impl Receiver {
    /// The next message, or `None` when the VM closed the connection.
    fn next(&mut self) -> Option<GuestMessage> {
        let mut buf = [0u8; 65536];
        loop {
            if let Some(m) = self.dec.next_message().expect("bad frame from the agent") {
                return Some(m);
            }
            match self.sock.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.dec.push(&buf[..n]),
            }
        }
    }
}

fn main() {
    let o = parse();
    let start = Instant::now();
    let mut sock = loop {
        match UnixStream::connect(&o.socket) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("connect {}: {e}", o.socket),
        }
    };
    let mut rx = Receiver {
        sock: sock.try_clone().unwrap(),
        dec: FrameDecoder::new(),
    };
    if o.garbage {
        sock.write_all(b"this is not a frame\0\0\0\0").unwrap();
    }
    match rx.next() {
        Some(GuestMessage::Ready(info)) => {
            eprintln!("drive: ready after {:?} ({info:?})", start.elapsed())
        }
        other => panic!("expected Ready, got {other:?}"),
    }
    let mut code = 0;
    for n in 1..=o.repeat {
        let id = format!("c{n}");
        let spec = ContainerSpec {
            id: id.clone(),
            hostname: o.hostname.clone(),
            mounts: podvisor_proto::image_mounts(&o.layers),
            process: ProcessSpec {
                args: o.args.clone(),
                env: o.env.clone(),
                cwd: o.cwd.clone(),
                user: o.user.clone(),
                terminal: o.terminal,
                stdin: o.stdin,
            },
            runtime: None,
        };
        let t0 = Instant::now();
        send(&mut sock, &HostMessage::StartContainer(spec));
        spawn_helpers(&o, &sock, &id);
        while let Some(msg) = rx.next() {
            match msg {
                GuestMessage::Output {
                    stream: Stream::Stdout,
                    data,
                    ..
                } => {
                    std::io::stdout().write_all(&data).unwrap();
                    std::io::stdout().flush().unwrap();
                }
                GuestMessage::Output {
                    stream: Stream::Stderr,
                    data,
                    ..
                } => std::io::stderr().write_all(&data).unwrap(),
                GuestMessage::Started { pid, .. } => {
                    eprintln!("drive: started pid {pid} in {:?}", t0.elapsed())
                }
                GuestMessage::StartFailed { error, .. } => {
                    eprintln!("drive: start failed: {:?}: {}", error.kind, error.message);
                    code = error.kind.exit_code();
                    break;
                }
                GuestMessage::Exited { status, .. } => {
                    eprintln!("drive: exited {status:?} after {:?}", t0.elapsed());
                    code = status.shell_code();
                    break;
                }
                other => eprintln!("drive: {other:?}"),
            }
        }
    }
    if o.shutdown {
        send(&mut sock, &HostMessage::Shutdown { grace_ms: 1000 });
        while let Some(msg) = rx.next() {
            eprintln!("drive: {msg:?}");
        }
        eprintln!("drive: connection closed (VM powered off?)");
    }
    std::process::exit(code);
}

/// Threads that feed stdin and send the timed Stop/Signal.
fn spawn_helpers(o: &Opts, sock: &UnixStream, id: &str) {
    if o.stdin {
        let mut s = sock.try_clone().unwrap();
        let id = id.to_string();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match std::io::stdin().read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => send(
                        &mut s,
                        &HostMessage::Stdin {
                            id: id.clone(),
                            data: buf[..n].to_vec(),
                        },
                    ),
                }
            }
            send(&mut s, &HostMessage::CloseStdin { id });
        });
    }
    if let Some(ms) = o.stop_after {
        let mut s = sock.try_clone().unwrap();
        let id = id.to_string();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            send(&mut s, &HostMessage::Stop { id, grace_ms: 1000 });
        });
    }
    if let Some((ms, size)) = o.resize_after {
        let mut s = sock.try_clone().unwrap();
        let id = id.to_string();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            send(&mut s, &HostMessage::Resize { id, size });
        });
    }
    if let Some((ms, signal)) = o.signal_after {
        let mut s = sock.try_clone().unwrap();
        let id = id.to_string();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            send(&mut s, &HostMessage::Signal { id, signal });
        });
    }
}
