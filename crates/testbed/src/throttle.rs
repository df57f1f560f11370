//! A TCP proxy on 127.0.0.1 that slows the server → client direction to a
//! fixed rate, so a test can catch a pull in the middle of a layer.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

/// A running proxy; stops accepting when dropped (open connections end when
/// either side closes).
pub struct ThrottledProxy {
    addr: String,
    stop: Arc<AtomicBool>,
}

impl ThrottledProxy {
    /// Forwards connections to `target` (`host:port`), sending at most
    /// `bytes_per_sec` back to clients on each connection.
    pub fn start(target: &str, bytes_per_sec: u64) -> ThrottledProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let target = target.to_string();
        let stopping = stop.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || pipe(client, server, None));
                thread::spawn(move || pipe(s2, c2, Some(bytes_per_sec)));
            }
        });
        ThrottledProxy { addr, stop }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for ThrottledProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, rate: Option<u64>) {
    let chunk = rate.map_or(64 << 10, |r| (r / 20).clamp(512, 64 << 10) as usize);
    let mut buf = vec![0u8; chunk];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        // Pace every chunk: an idle keep-alive connection earns no burst.
        if let Some(rate) = rate {
            thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
