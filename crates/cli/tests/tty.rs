//! `podvisor run -it`: an interactive shell in a pod VM on a real
//! pseudo-terminal, with resize and Ctrl-C working as in docker.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::pty::{Winsize, openpty};
use podvisor_testbed::cli::TestDir;
use podvisor_testbed::oci::ImageBuilder;

/// The terminal side of the test: everything the pod printed so far.
struct Screen {
    master: std::fs::File,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Screen {
    fn new(master: OwnedFd) -> Self {
        let master = std::fs::File::from(master);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self { master, seen }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// Waits until `needle` has been printed `count` times in all.
    fn wait_for(&self, needle: &str, count: usize) {
        let start = Instant::now();
        while self.text().matches(needle).count() < count {
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "waited for {count}x {needle:?}; screen:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_keys(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer we pass.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(rc, 0);
    }
}

#[test]
fn vm_interactive_shell_with_resize_and_ctrl_c() {
    let t = TestDir::new();
    let image = t.path().join("busybox.tar");
    ImageBuilder::new()
        .busybox_layer()
        .cmd(&["sh"])
        .write_oci_archive(&image)
        .unwrap();
    let pty = openpty(
        Some(&Winsize {
            ws_row: 30,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }),
        None,
    )
    .unwrap();
    let slave = pty.slave;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_podvisor"));
    cmd.env("PODVISOR_NETWORK", "none")
        .env("PODVISOR_CACHE_DIR", t.cache_dir())
        .env("PODVISOR_RUN_DIR", t.run_dir())
        .env("PODVISOR_TEMPLATE_RAM_DIR", t.template_ram_dir())
        .args(["run", "-it"])
        .arg(&image)
        .args(["--", "sh"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are async-signal-safe. The pty becomes the
    // controlling terminal, so a resize sends SIGWINCH as a real one does.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut screen = Screen::new(pty.master);

    screen.wait_for("/ # ", 1);
    screen.type_keys("stty size; tty\r");
    screen.wait_for("30 100", 1);
    screen.wait_for("/dev/pts/0", 1);

    // The resize travels host -> agent -> the container's terminal; ask
    // again until it has arrived (a loaded machine may take a while).
    screen.resize(40, 120);
    let start = Instant::now();
    while !screen.text().contains("40 120") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the resize never arrived; screen:\n{}",
            screen.text()
        );
        std::thread::sleep(Duration::from_millis(500));
        screen.type_keys("stty size\r");
    }

    screen.type_keys("sleep 1000\r");
    std::thread::sleep(Duration::from_millis(500));
    screen.type_keys("\x03");
    screen.type_keys("echo after-$((40+2))\r");
    screen.wait_for("after-42", 1);

    screen.type_keys("exit 5\r");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "podvisor did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(5), "screen:\n{}", screen.text());
}
