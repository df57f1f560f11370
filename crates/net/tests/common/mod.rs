//! Each test's "host" is a fresh network namespace and a private mount
//! namespace of the thread running it (and of the threads and plugin
//! processes it starts), with its own CNI configuration, IPAM, state and
//! namespace directories: the machine's own namespace, rules and
//! /var/lib/cni are never touched, and whatever a failed test leaves goes
//! with its process.

#![allow(dead_code)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use podvisor_net::census::HostNetworkCensus;
use podvisor_net::cni::{CniRuntime, DefaultNetwork, PodIdentity};
use podvisor_net::host_ports::PortMapping;
use podvisor_net::netns;
use podvisor_net::pod_network::{AttachRequest, PodNetworkConfig};

pub struct TestHost {
    pub dir: tempfile::TempDir,
    pub config: PodNetworkConfig,
}

impl Drop for TestHost {
    /// The namespace directory is a mount point (made shared as `ip netns`
    /// does): unmount it so that the temporary directory can go.
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.config.netns_dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

impl TestHost {
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join("ipam")
            .join(&self.config.default_network.name)
    }

    pub async fn census(&self) -> HostNetworkCensus {
        HostNetworkCensus::take(&self.config.netns_dir, &[self.ipam_dir()])
            .await
            .unwrap()
    }

    /// Writes `conflist` as the only configuration.
    pub fn write_conflist(&self, file: &str, conflist: &str) {
        std::fs::create_dir_all(&self.config.conf_dir).unwrap();
        for entry in std::fs::read_dir(&self.config.conf_dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        std::fs::write(self.config.conf_dir.join(file), conflist).unwrap();
    }

    /// The default conflist with a replacement for plugin `i` (or the list
    /// as is), as JSON text.
    pub fn default_conflist_with(&self, replace: Option<(usize, serde_json::Value)>) -> String {
        let mut list = self.config.default_network.conflist_json();
        if let Some((i, plugin)) = replace {
            list["plugins"][i] = plugin;
        }
        list.to_string()
    }
}

pub fn request(id: &str, ports: Vec<PortMapping>) -> AttachRequest {
    AttachRequest {
        id: id.to_string(),
        pod: PodIdentity {
            namespace: "default".into(),
            name: format!("{id}-name"),
            uid: format!("uid-{id}"),
        },
        port_mappings: ports,
    }
}

/// Runs `test` on a thread in a fresh network + mount namespace, with a
/// tokio runtime whose threads are made there.
pub fn on_test_host<F, Fut>(test: F)
where
    F: FnOnce(TestHost) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if !nix::unistd::geteuid().is_root() {
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
        let dir = tempfile::tempdir().unwrap();
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
            state_dir: dir.path().join("state"),
            ifname: "eth0".into(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            set_lo_up().await;
            test(TestHost { dir, config }).await
        });
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

async fn set_lo_up() {
    let (conn, handle, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(conn);
    use futures_util::TryStreamExt;
    let lo = handle
        .link()
        .get()
        .match_name("lo")
        .execute()
        .try_next()
        .await
        .unwrap()
        .unwrap();
    handle
        .link()
        .set(
            rtnetlink::LinkUnspec::new_with_index(lo.header.index)
                .up()
                .build(),
        )
        .execute()
        .await
        .unwrap();
}

/// A TCP listener inside the namespace at `netns`.
pub async fn listen_in(netns_path: &Path, port: u16) -> TcpListener {
    netns::run_in(netns_path, move || {
        TcpListener::bind(("0.0.0.0", port)).unwrap()
    })
    .await
    .unwrap()
}

/// Connects from inside `netns` (or from the test host with `None`) to
/// `addr`, sends `ping`, and returns what came back.
pub async fn ping_pong(from: Option<&Path>, addr: SocketAddr, listener: TcpListener) -> Vec<u8> {
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        s.write_all(b"pong").unwrap();
    });
    let client = move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"ping").unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        buf
    };
    let got = match from {
        Some(ns) => netns::run_in(ns, client).await.unwrap(),
        None => tokio::task::spawn_blocking(client).await.unwrap(),
    };
    server.join().unwrap();
    got
}

pub fn first_ipv4(ips: &[IpAddr]) -> IpAddr {
    *ips.iter().find(|ip| ip.is_ipv4()).expect("an IPv4 address")
}
