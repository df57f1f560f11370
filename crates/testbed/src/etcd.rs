//! A real etcd server for tests: Debian's `etcd` (package etcd-server) on
//! 127.0.0.1 with free ports and a temporary data directory.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh single-member etcd may take to elect itself and answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One etcd server (a single-member cluster), killed when dropped.
pub struct EtcdServer {
    child: Option<Child>,
    binary: std::ffi::OsString,
    client_port: u16,
    peer_port: u16,
    /// Which start attempt's data directory and log are in use.
    attempt: usize,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts `etcd` (found on `PATH`, or `PODVISOR_TEST_ETCD`) and waits
    /// until `/health` says it is healthy. Panics with the server's log if
    /// it does not start.
    pub fn start() -> EtcdServer {
        let binary = std::env::var_os("PODVISOR_TEST_ETCD").unwrap_or_else(|| "etcd".into());
        let dir = tempfile::Builder::new()
            .prefix("podvisor-etcd-")
            .tempdir()
            .expect("create etcd temp dir");
        let mut last_log = String::new();
        // Free ports are found by binding port 0 and releasing it; another
        // process may take one meanwhile, so a failed start is retried.
        for attempt in 0..5 {
            let (client_port, peer_port) = (free_port(), free_port());
            let (child, log_path) = spawn(&binary, dir.path(), attempt, client_port, peer_port);
            let mut child = Some(child);
            match wait_healthy(&mut child, client_port) {
                Ok(()) => {
                    return EtcdServer {
                        child,
                        binary,
                        client_port,
                        peer_port,
                        attempt,
                        dir,
                    };
                }
                Err(reason) => {
                    kill(&mut child);
                    last_log = format!(
                        "{reason}\n--- {} ---\n{}",
                        log_path.display(),
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
            }
        }
        panic!("etcd did not start: {last_log}");
    }

    /// `etcd://127.0.0.1:PORT`, the store URL of this server.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// `http://127.0.0.1:PORT`, for etcd clients.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// The temporary directory holding the data and the server's log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server with SIGKILL (for failure tests) and reaps it.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the server again (after [`EtcdServer::kill`]) on the same
    /// ports with the same data, and waits until it is healthy.
    pub fn restart(&mut self) {
        kill(&mut self.child);
        let (child, log_path) = spawn(
            &self.binary,
            self.dir.path(),
            self.attempt,
            self.client_port,
            self.peer_port,
        );
        self.child = Some(child);
        if let Err(reason) = wait_healthy(&mut self.child, self.client_port) {
            panic!(
                "etcd did not restart: {reason}\n--- {} ---\n{}",
                log_path.display(),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs etcd with the data directory and log of start `attempt` in `dir`
/// (the log is appended to, so a restart keeps the earlier output).
fn spawn(
    binary: &std::ffi::OsStr,
    dir: &Path,
    attempt: usize,
    client_port: u16,
    peer_port: u16,
) -> (Child, std::path::PathBuf) {
    let data_dir = dir.join(format!("data-{attempt}"));
    let log_path = dir.join(format!("etcd-{attempt}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("create etcd log");
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let child = Command::new(binary)
        .arg("--name=podvisor-test")
        .arg(format!("--data-dir={}", data_dir.display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=podvisor-test={peer_url}"))
        .arg("--initial-cluster-state=new")
        .arg("--logger=zap")
        .arg("--log-level=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {binary:?}: {e} (install Debian's etcd-server: scripts/setup.sh --test)"
            )
        });
    (child, log_path)
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Waits until the server answers healthy, or fails if it exits or the
/// time runs out.
fn wait_healthy(child: &mut Option<Child>, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(child) = child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(format!("etcd exited with {status} while starting"));
        }
        if health(port) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("etcd was not healthy after {START_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port on 127.0.0.1")
}

/// Whether etcd's `/health` endpoint answers `"health":"true"`.
fn health(port: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if conn.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = conn.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}
