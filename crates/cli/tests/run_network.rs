//! `podvisor run` on a real CNI network (the plugins of /usr/lib/cni), on
//! an emulated host of its own ([`podvisor_testbed::net_host`]): `-p`
//! answers on 127.0.0.1; two forks of one VM template get different
//! addresses and MACs and both serve, the first with the `--dns`,
//! `--dns-search`, `--dns-option` and `--add-host` it was given (the
//! second, from the same template, without them); a third run asking for a port one
//! of them publishes is refused; `--network none` has only `lo`; and
//! when the runs end, the host has what it had before.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podvisor_testbed::cli::TestDir;
use podvisor_testbed::net_host::{TestHost, on_test_host};
use podvisor_testbed::oci::{Entry, ImageBuilder};

/// A busybox image whose httpd answers `/cgi-bin/eth0` with the pod's
/// eth0 as the pod sees it now (a clone's, not its template's), and
/// `/cgi-bin/dns` with its resolv.conf and hosts.
fn image(dir: &Path) -> PathBuf {
    let path = dir.join("web.tar");
    ImageBuilder::new()
        .busybox_layer()
        .layer(vec![
            Entry::dir("www"),
            Entry::dir("www/cgi-bin"),
            Entry::file(
                "www/cgi-bin/eth0",
                "#!/bin/sh\necho Content-Type: text/plain\necho\nip addr show eth0\n",
                0o755,
            ),
            Entry::file(
                "www/cgi-bin/dns",
                "#!/bin/sh\necho Content-Type: text/plain\necho\ncat /etc/resolv.conf /etc/hosts\n",
                0o755,
            ),
        ])
        .write_oci_archive(&path)
        .unwrap();
    path
}

fn spawn_run(t: &TestDir, conf_dir: &Path, args: &[&str], image: &Path, cmd: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .env("PODVISOR_CACHE_DIR", t.cache_dir())
        .env("PODVISOR_RUN_DIR", t.run_dir())
        .env("PODVISOR_TEMPLATE_RAM_DIR", t.template_ram_dir())
        .env_remove("PODVISOR_NETWORK")
        .arg("run")
        .arg("--cni-conf-dir")
        .arg(conf_dir)
        .args(args)
        .arg(image)
        .args(["sh", "-c", cmd])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// An HTTP GET of `path` on 127.0.0.1:`port`, retried until it answers.
fn http_get(port: u16, path: &str) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(180) {
        let answer = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        });
        match answer {
            Ok(body) if body.starts_with("HTTP/1.") && body.contains(" 200 ") => return body,
            Ok(body) => last = body,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("no answer on {addr}{path}: {last}")
}

/// `inet A.B.C.D/N` and `link/ether M` of an `ip addr show eth0`.
fn address_and_mac(ip_addr: &str) -> (String, String) {
    let word_after = |key: &str| {
        ip_addr
            .split_whitespace()
            .skip_while(|w| *w != key)
            .nth(1)
            .unwrap_or_else(|| panic!("no {key} in {ip_addr}"))
            .to_string()
    };
    (word_after("inet"), word_after("link/ether"))
}

/// A `podvisor run` that gets SIGTERM (forwarded to the container, whose
/// httpd then exits) when dropped, also when the test fails, and is waited
/// for.
struct RunningPod(Child);

impl Drop for RunningPod {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the podvisor process this test spawned.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn vm_run_publishes_ports_forks_get_their_own_address_and_none_has_only_lo() {
    on_test_host(|host: TestHost| async move {
        let t = TestDir::new();
        let image = image(t.path());
        let conf_dir = host.config.conf_dir.clone();
        std::fs::create_dir_all(&conf_dir).unwrap();
        std::fs::write(
            conf_dir.join("10-podvisor.conflist"),
            host.config.default_network.conflist_json().to_string(),
        )
        .unwrap();
        podvisor_testbed::net_host::warm_up_cni(&host.config, host.dir.path()).await;
        let before = host.census().await;
        let serve = "exec httpd -f -p 80 -h /www";

        // Two pods forked from one warm template (made by the first).
        let a = RunningPod(spawn_run(
            &t,
            &conf_dir,
            &[
                "-p",
                "127.0.0.1:18091:80",
                "--dns",
                "192.0.2.53",
                "--dns-search",
                "corp.example",
                "--dns-option",
                "ndots:2",
                "--add-host",
                "db.test:192.0.2.7",
                "--add-host",
                "v6.test=[2001:db8::7]",
            ],
            &image,
            serve,
        ));
        let info_a = tokio::task::spawn_blocking(|| http_get(18091, "/cgi-bin/eth0"))
            .await
            .unwrap();
        let b = RunningPod(spawn_run(
            &t,
            &conf_dir,
            &["-p", "127.0.0.1:18092:80/tcp"],
            &image,
            serve,
        ));
        let info_b = tokio::task::spawn_blocking(|| http_get(18092, "/cgi-bin/eth0"))
            .await
            .unwrap();
        let (ip_a, mac_a) = address_and_mac(&info_a);
        let (ip_b, mac_b) = address_and_mac(&info_b);
        assert!(ip_a.starts_with("10.87.0."), "{info_a}");
        assert_ne!(ip_a, ip_b, "{info_a}\n{info_b}");
        assert_ne!(mac_a, mac_b, "{info_a}\n{info_b}");
        let templates = std::fs::read_dir(t.run_dir().join("templates"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(templates > 0, "the runs forked from templates");
        // a's DNS flags replaced the network's resolver settings and added
        // hosts lines after the pod's own; b, a fork of the same template,
        // has none of them.
        let dns_a = tokio::task::spawn_blocking(|| http_get(18091, "/cgi-bin/dns"))
            .await
            .unwrap();
        let lines: Vec<&str> = dns_a.lines().map(str::trim).collect();
        let nameservers: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("nameserver"))
            .collect();
        assert_eq!(nameservers, [&"nameserver 192.0.2.53"], "{dns_a}");
        assert!(lines.contains(&"search corp.example"), "{dns_a}");
        assert!(lines.contains(&"options ndots:2"), "{dns_a}");
        let own = lines
            .iter()
            .position(|l| l.starts_with(ip_a.split('/').next().unwrap()))
            .unwrap_or_else(|| panic!("no line for the pod's own address: {dns_a}"));
        assert_eq!(lines[own + 1], "192.0.2.7\tdb.test", "{dns_a}");
        assert_eq!(lines[own + 2], "2001:db8::7\tv6.test", "{dns_a}");
        let dns_b = tokio::task::spawn_blocking(|| http_get(18092, "/cgi-bin/dns"))
            .await
            .unwrap();
        assert!(
            !dns_b.contains("192.0.2.53") && !dns_b.contains("db.test"),
            "{dns_b}"
        );
        // Both still serve.
        let again = tokio::task::spawn_blocking(|| http_get(18091, "/cgi-bin/eth0"))
            .await
            .unwrap();
        assert_eq!(address_and_mac(&again), (ip_a, mac_a));
        // A third run asking for a's port is refused before it sets
        // anything up: a's podvisor holds the port.
        let thief = spawn_run(&t, &conf_dir, &["-p", "18091:80"], &image, serve);
        let out = thief.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains("host port 18091->80/tcp") && stderr.contains("in use on this host"),
            "{stderr}"
        );
        drop(a);
        drop(b);

        // --network none: only lo, and no resolver.
        let none = spawn_run(
            &t,
            &conf_dir,
            &["--network", "none", "--template", "none"],
            &image,
            "cat /proc/net/dev; echo '-- resolv'; cat /etc/resolv.conf",
        );
        let out = none.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let links: Vec<&str> = stdout
            .lines()
            .take_while(|l| !l.starts_with("-- resolv"))
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim()))
            .filter(|n| !n.contains('|'))
            .collect();
        assert_eq!(links, ["lo"], "{stdout}");
        assert!(!stdout.contains("nameserver"), "{stdout}");

        assert_eq!(host.census().await, before);
        let left = std::fs::read_dir(t.run_dir().join("run-net"))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        assert!(left.is_empty(), "{left:?}");
    });
}
