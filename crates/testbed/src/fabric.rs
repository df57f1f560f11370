//! Emulated hosts for multi-host network tests: one network namespace per
//! emulated host and one for the management server, each joined by a veth
//! pair to a bridge in a "fabric" namespace, all made by the test.
//!
//! ```text
//!   server ns  eth0 10.250.0.2 ──┐
//!   host 0 ns  eth0 10.250.0.10 ─┼── br0 in the fabric ns
//!   host 1 ns  eth0 10.250.0.11 ─┘
//! ```
//!
//! Host `i` has its own pod subnet `10.251.(i+1).0/24`, its own CNI
//! configuration directory (a bridge network on that subnet whose
//! host-local IPAM keeps its files in the host's directory) and scratch
//! directories for a host daemon's state. Every host and the server route
//! each other host's pod subnet via that host's fabric address, and hosts
//! forward, so pods on different hosts reach each other by pod IP. Nothing
//! is made in the calling process's namespace: every link and address
//! lives inside the fabric's namespaces.
//!
//! Dropping the fabric (also while a failing test unwinds) SIGKILLs every
//! process still inside its namespaces, detaches any mount left under its
//! directory (pod namespace pins of a daemon that was killed) and deletes
//! the namespaces, which takes their links with them.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static FABRICS: AtomicUsize = AtomicUsize::new(0);

/// Where `ip netns` pins named namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";

/// The fabric's subnet (only inside the fabric's namespaces).
pub const FABRIC_PREFIX_LEN: u8 = 24;

/// One emulated machine: a named network namespace with an address on the
/// fabric and, for a host, a pod subnet and a daemon's directories.
#[derive(Debug)]
pub struct EmulatedHost {
    /// Short name (`server`, `host0`, `host1`, ...).
    pub name: String,
    /// The `ip netns` name of its namespace.
    pub netns: String,
    /// Its address on the fabric (on its `eth0`).
    pub address: Ipv4Addr,
    /// `Some((network, prefix))` for a host that runs pods.
    pub pod_subnet: Option<(Ipv4Addr, u8)>,
    /// Its scratch directory (conflist dir, IPAM, daemon state).
    pub dir: PathBuf,
}

impl EmulatedHost {
    /// The namespace's pin (`/run/netns/<name>`).
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.netns)
    }

    /// The pod subnet in CIDR form, e.g. `10.251.1.0/24`.
    pub fn pod_cidr(&self) -> Option<String> {
        self.pod_subnet.map(|(net, len)| format!("{net}/{len}"))
    }

    /// The CNI configuration directory with this host's conflist.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni")
    }

    /// host-local's `dataDir` in this host's conflist; allocations are
    /// files in `<ipam_dir>/<network name>`.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }

    /// A host daemon's state directory (created, empty).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// A host daemon's run directory (created, empty).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// `program` to be run inside this namespace: the child enters it
    /// (setns) between fork and exec. Only the network namespace changes;
    /// `/sys` is the caller's (use [`EmulatedHost::ip_command`] when a
    /// tool reads `/sys/class/net`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let ns = File::open(self.netns_path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.netns_path().display()));
        let mut cmd = Command::new(program);
        // SAFETY: setns(2) is async-signal-safe; `ns` is an open fd owned
        // by the closure, which lives until the Command is dropped, so the
        // fd is valid in the forked child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// `ip netns exec <ns> program`: the namespace and a `/sys` that
    /// shows its links.
    pub fn ip_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// Runs `f` on a new thread that has entered this namespace: sockets it
    /// makes belong to this host (and keep doing so after `f` returns).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.netns_path();
        std::thread::spawn(move || {
            enter_netns(&path);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Like [`EmulatedHost::run`] without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.netns_path();
        std::thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    }
}

/// The calling thread enters the namespace pinned at `path`.
fn enter_netns(path: &Path) {
    let ns = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns(2) on a namespace fd we hold open; it changes only the
    // calling thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// The emulated machines and the fabric joining them; torn down on drop.
pub struct HostFabric {
    fabric_netns: String,
    server: EmulatedHost,
    hosts: Vec<EmulatedHost>,
    made: Vec<String>,
    dir: tempfile::TempDir,
}

impl HostFabric {
    /// A server and `hosts` emulated hosts (at most 200), routed to each
    /// other. Panics (after tearing down what it made) if a step fails.
    pub fn new(hosts: usize) -> HostFabric {
        assert!((1..=200).contains(&hosts), "1..=200 hosts");
        let n = FABRICS.fetch_add(1, Ordering::SeqCst);
        // Unique on the machine: pid + counter; short, as names go in
        // `ip netns` and veth names have 15 bytes at most.
        let prefix = format!("pvf{}x{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("podvisor-fabric-")
            .tempdir()
            .expect("fabric temp dir");
        let mk = |name: &str, address: Ipv4Addr, pod_subnet| {
            let host_dir = dir.path().join(name);
            EmulatedHost {
                name: name.to_string(),
                netns: format!("{prefix}-{name}"),
                address,
                pod_subnet,
                dir: host_dir,
            }
        };
        let server = mk("server", Ipv4Addr::new(10, 250, 0, 2), None);
        let hosts: Vec<EmulatedHost> = (0..hosts)
            .map(|i| {
                mk(
                    &format!("host{i}"),
                    Ipv4Addr::new(10, 250, 0, 10 + i as u8),
                    Some((Ipv4Addr::new(10, 251, i as u8 + 1, 0), 24)),
                )
            })
            .collect();
        let mut fabric = HostFabric {
            fabric_netns: format!("{prefix}-fabric"),
            server,
            hosts,
            made: Vec::new(),
            dir,
        };
        fabric.build();
        fabric
    }

    pub fn server(&self) -> &EmulatedHost {
        &self.server
    }

    pub fn host(&self, i: usize) -> &EmulatedHost {
        &self.hosts[i]
    }

    pub fn hosts(&self) -> &[EmulatedHost] {
        &self.hosts
    }

    /// The `ip netns` name of the namespace holding the bridge.
    pub fn fabric_netns(&self) -> &str {
        &self.fabric_netns
    }

    /// Every namespace name this fabric made (for leak checks).
    pub fn netns_names(&self) -> Vec<String> {
        self.made.clone()
    }

    /// The fabric's scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn add_netns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.made.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    fn build(&mut self) {
        let fabric = self.fabric_netns.clone();
        self.add_netns(&fabric);
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &fabric, "link", "set", "br0", "up"]);
        let machines: Vec<(String, String, Ipv4Addr, PathBuf)> = std::iter::once(&self.server)
            .chain(self.hosts.iter())
            .map(|m| (m.name.clone(), m.netns.clone(), m.address, m.dir.clone()))
            .collect();
        for (name, netns, address, dir) in &machines {
            std::fs::create_dir_all(dir).expect("host dir");
            self.add_netns(netns);
            // The fabric end is named after the machine; the machine's end
            // is made in the fabric namespace and moved straight into its
            // own, so nothing passes through the caller's namespace.
            ip(&[
                "-n", &fabric, "link", "add", name, "type", "veth", "peer", "name", "eth0",
                "netns", netns,
            ]);
            ip(&["-n", &fabric, "link", "set", name, "master", "br0", "up"]);
            let cidr = format!("{address}/{FABRIC_PREFIX_LEN}");
            ip(&["-n", netns, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", netns, "link", "set", "eth0", "up"]);
        }
        let routes: Vec<(String, Ipv4Addr)> = self
            .hosts
            .iter()
            .map(|h| (h.pod_cidr().expect("host pod subnet"), h.address))
            .collect();
        for m in std::iter::once(&self.server).chain(self.hosts.iter()) {
            for (cidr, via) in &routes {
                if *via != m.address {
                    ip(&[
                        "-n",
                        &m.netns,
                        "route",
                        "add",
                        cidr,
                        "via",
                        &via.to_string(),
                    ]);
                }
            }
        }
        for h in &self.hosts {
            let forwarding = h
                .command("sh")
                .args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
                .status();
            assert!(
                matches!(forwarding, Ok(s) if s.success()),
                "ip_forward in {}: {forwarding:?}",
                h.netns
            );
            for d in [h.cni_conf_dir(), h.ipam_dir(), h.state_dir(), h.run_dir()] {
                std::fs::create_dir_all(&d).expect("host daemon dir");
            }
            let conflist = serde_json::json!({
                "cniVersion": "1.0.0",
                "name": format!("podvisor-{}", h.name),
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "podvisor0",
                        "isGateway": true,
                        "ipMasq": true,
                        "hairpinMode": true,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{ "subnet": h.pod_cidr() }]],
                            "routes": [{ "dst": "0.0.0.0/0" }],
                            "dataDir": h.ipam_dir(),
                        },
                    },
                    { "type": "firewall", "backend": "iptables" },
                    { "type": "portmap", "capabilities": { "portMappings": true } },
                    { "type": "tuning" },
                ],
            });
            std::fs::write(
                h.cni_conf_dir().join("10-podvisor.conflist"),
                serde_json::to_vec_pretty(&conflist).expect("conflist json"),
            )
            .expect("write conflist");
        }
    }
}

impl Drop for HostFabric {
    fn drop(&mut self) {
        for ns in &self.made {
            kill_processes_in(ns);
        }
        unmount_under(self.dir.path());
        for ns in self.made.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// SIGKILLs every process whose network namespace is `ns` (`ip netns pids`).
fn kill_processes_in(ns: &str) {
    for _ in 0..20 {
        let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
            return;
        };
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p != std::process::id() as i32)
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid `ip netns pids` found in a
            // namespace this fabric made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Lazily detaches every mount at or below `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: umount2(2) with a valid C string; MNT_DETACH never
        // blocks on a busy mount.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}
