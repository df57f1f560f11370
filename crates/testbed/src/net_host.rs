//! An emulated host for pod-network tests: a fresh network namespace and a
//! private mount namespace of the thread running the test (and of the
//! threads, plugins and VMs it starts), with its own CNI configuration,
//! IPAM, attachment records and namespace pins in a temporary directory.
//! The machine's own namespace, rules and /var/lib/cni are never touched,
//! and whatever a failed test leaves goes with its process.
//!
//! [`Outside`] is a second namespace routed from the test host, standing
//! for the world beyond it: a pod's egress reaches a server there through
//! the masquerade.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use podvisor_net::census::HostNetworkCensus;
use podvisor_net::cni::{CniRuntime, DefaultNetwork};
use podvisor_net::pod_network::PodNetworkConfig;

/// One attachment with a host port, made and removed with `config`'s CNI
/// configuration but records and namespace pins of its own under `dir`:
/// afterwards the plugins' shared state (the bridge, the chains firewall
/// and portmap keep) exists, as on a host that has run pods, so a census
/// taken then is the one to compare with after a test's pods are gone.
pub async fn warm_up_cni(config: &PodNetworkConfig, dir: &Path) {
    use podvisor_net::PodNetworks;
    use podvisor_net::cni::PodIdentity;
    use podvisor_net::host_ports::{PortMapping, Protocol};
    use podvisor_net::pod_network::AttachRequest;
    let config = PodNetworkConfig {
        state_dir: dir.join("warm-state"),
        netns_dir: dir.join("warm-netns"),
        ..config.clone()
    };
    {
        let networks = PodNetworks::open(config.clone()).unwrap();
        let request = AttachRequest {
            id: "warm-up".into(),
            pod: PodIdentity {
                namespace: "default".into(),
                name: "warm-up".into(),
                uid: "warm-up".into(),
            },
            port_mappings: vec![PortMapping {
                host_port: 18079,
                container_port: 80,
                protocol: Protocol::Tcp,
                host_ip: None,
            }],
        };
        networks.attach(request).await.unwrap();
        networks.detach("warm-up").await.unwrap();
    }
    let _ = nix::mount::umount2(&config.netns_dir, nix::mount::MntFlags::MNT_DETACH);
}

/// The test's host.
pub struct TestHost {
    pub dir: tempfile::TempDir,
    /// Pod networking on this host (what a host daemon or run is given).
    pub config: PodNetworkConfig,
}

impl Drop for TestHost {
    /// The namespace directory is a mount point (made shared, as `ip
    /// netns` does): unmount it so that the temporary directory can go.
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.config.netns_dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

impl TestHost {
    /// host-local's directory of the default network.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join("ipam")
            .join(&self.config.default_network.name)
    }

    /// What pod networking left on this host. `netns_dirs`: more namespace
    /// pin directories to count (a `podvisor run`'s, say).
    pub async fn census(&self) -> HostNetworkCensus {
        HostNetworkCensus::take(&self.config.netns_dir, &[self.ipam_dir()])
            .await
            .expect("a census of the test host")
    }

    /// The default network's gateway (the bridge's address), `10.87.0.1`.
    pub fn gateway(&self) -> IpAddr {
        "10.87.0.1".parse().expect("an address")
    }
}

/// Whether network tests can run here (they need root).
pub fn can_run() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `test` on a thread in a fresh network + mount namespace, with a
/// tokio runtime whose threads are made there. Skips (with a note) when not
/// root.
pub fn on_test_host<F, Fut>(test: F)
where
    F: FnOnce(TestHost) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if !can_run() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let thread = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).expect("unshare");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("making / private");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = PodNetworkConfig {
            conf_dir: dir.path().join("net.d"),
            default_network: DefaultNetwork {
                ipam_data_dir: Some(dir.path().join("ipam")),
                ..DefaultNetwork::default()
            },
            cni: CniRuntime {
                timeout: Duration::from_secs(20),
                ..CniRuntime::default()
            },
            netns_dir: dir.path().join("netns"),
            state_dir: dir.path().join("net-state"),
            ifname: "eth0".into(),
        };
        let status = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip link set lo up");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async move { test(TestHost { dir, config }).await });
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// A namespace beyond the test host, on a veth pair: the host side has
/// [`Outside::HOST_SIDE`], the outside [`Outside::ADDRESS`], where a
/// server answers each TCP connection on [`Outside::PORT`] with
/// `from <peer address>\n` (so a test sees whether the pod's address was
/// masqueraded). Dropping it ends the namespace, the pair and the server.
pub struct Outside {
    holder: Child,
}

impl Outside {
    pub const HOST_SIDE: &'static str = "192.0.2.1";
    pub const ADDRESS: &'static str = "192.0.2.2";
    pub const PORT: u16 = 7100;

    /// Must be called on the test host (inside [`on_test_host`]).
    pub async fn start() -> Outside {
        let holder = Command::new("unshare")
            .args(["--net", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start unshare");
        let pid = holder.id().to_string();
        // Until unshare has exec'd sleep, its namespace is not the new one.
        // This thread's namespace (the test host's), not the process's:
        // /proc/self is the main thread's, and comparing with it let the
        // veth go into the namespace before unshare had made it.
        let ours = std::fs::read_link("/proc/thread-self/ns/net").expect("our namespace");
        let mut unshared = false;
        for _ in 0..500 {
            if std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|ns| ns != ours) {
                unshared = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(unshared, "unshare made no namespace within 10 s");
        let outside = Outside { holder };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let host_side = format!("{}/24", Self::HOST_SIDE);
        let address = format!("{}/24", Self::ADDRESS);
        ip(&[
            "link", "add", "pv-out", "type", "veth", "peer", "name", "pv-in",
        ]);
        ip(&["link", "set", "pv-in", "netns", &pid]);
        ip(&["addr", "add", &host_side, "dev", "pv-out"]);
        ip(&["link", "set", "pv-out", "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["-t", pid.as_str(), "-n", "ip"];
            all.extend_from_slice(args);
            let out = Command::new("nsenter")
                .args(&all)
                .output()
                .expect("run nsenter");
            assert!(
                out.status.success(),
                "nsenter {all:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        inside(&["addr", "add", &address, "dev", "pv-in"]);
        inside(&["link", "set", "pv-in", "up"]);
        inside(&["link", "set", "lo", "up"]);
        let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let listener = podvisor_net::netns::run_in(&ns, || {
            TcpListener::bind((Self::ADDRESS, Self::PORT)).expect("listen outside")
        })
        .await
        .expect("enter the outside namespace");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let peer = conn.peer_addr().map(|a| a.ip().to_string());
                let _ = writeln!(conn, "from {}", peer.unwrap_or_default());
                let mut sink = [0u8; 64];
                let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = conn.read(&mut sink);
            }
        });
        outside
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Reads a namespace pin directory's entries (for a census of several).
pub fn pins_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}
