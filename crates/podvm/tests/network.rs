//! The pod network inside a real pod VM (QEMU, the real guest kernel with
//! the initramfs's virtio-net modules, the real agent): the agent configures the
//! NIC the host describes, every container gets the pod's resolv.conf and
//! hosts, and a server in a container answers from the host. The NIC here
//! is QEMU's user-mode network (`-netdev user,restrict=on` with a hostfwd
//! on 127.0.0.1; no privileges, nothing leaves the VM but the forwarded
//! port), added by a wrapper around QEMU; and a card of the VM's device
//! model on a tap in a network namespace the test makes, as pods get it.
//! A `--network none` pod has only `lo`.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use podvisor_image::LayerCache;
use podvisor_podvm::{NodeConfig, PodVm, PodVmSpec, layer_disks};
use podvisor_proto::{
    ContainerSpec, DnsConfig, GuestMessage, HostMessage, HostsEntry, InterfaceConfig, IpPrefix,
    NetworkConfig, ProcessSpec, RouteConfig,
};
use podvisor_testbed::oci::ImageBuilder;

/// QEMU user-mode networking's fixed addresses.
const GUEST_IP: &str = "10.0.2.15";
const GATEWAY: &str = "10.0.2.2";
const SLIRP_DNS: &str = "10.0.2.3";
const NIC_MAC: &str = "52:54:00:12:34:56";
const SERVER_PORT: u16 = 8080;

struct VmReaper(std::path::PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn prefix(address: &str, prefix_len: u8) -> IpPrefix {
    IpPrefix {
        address: ip(address),
        prefix_len,
    }
}

fn hosts(pod_ip: Option<&str>) -> Vec<HostsEntry> {
    let mut hosts = vec![
        HostsEntry {
            address: ip("127.0.0.1"),
            names: vec!["localhost".into()],
        },
        HostsEntry {
            address: ip("::1"),
            names: vec!["localhost".into(), "ip6-localhost".into()],
        },
    ];
    if let Some(pod_ip) = pod_ip {
        hosts.push(HostsEntry {
            address: ip(pod_ip),
            names: vec!["webpod".into()],
        });
    }
    hosts
}

/// A port on 127.0.0.1 nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Everything one container wrote to stdout until `until` appeared in it
/// (or it exited).
async fn stdout_until(pod: &mut PodVm, id: &str, until: &str) -> String {
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match pod.next_event().await.expect("pod event") {
                GuestMessage::Output { id: i, data, .. } if i == id => {
                    out.push_str(&String::from_utf8_lossy(&data));
                    if out.contains(until) {
                        return;
                    }
                }
                GuestMessage::Exited { id: i, status } if i == id => {
                    panic!("{id} exited ({status:?}) before {until:?}: {out}")
                }
                GuestMessage::StartFailed { id: i, error } if i == id => {
                    panic!("{id} failed to start: {error:?}")
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id} did not print {until:?} in time: {out}"));
    out
}

async fn configure(pod: &mut PodVm, config: NetworkConfig) -> Vec<String> {
    pod.send(&HostMessage::ConfigureNetwork(config))
        .await
        .unwrap();
    loop {
        match pod.next_event().await.expect("pod event") {
            GuestMessage::NetworkConfigured {
                error: None,
                warnings,
            } => return warnings,
            GuestMessage::NetworkConfigured { error: Some(e), .. } => {
                panic!(
                    "network configuration failed: {e}\n{}",
                    pod.console_tail(4096)
                )
            }
            _ => {}
        }
    }
}

/// Boots a pod VM from a busybox image.
async fn boot(dir: &Path, id: &str) -> PodVm {
    boot_with(dir, id, vec![]).await
}

/// Boots a pod VM from a busybox image with `cards` besides its disk.
async fn boot_with(dir: &Path, id: &str, cards: Vec<podvisor_vmm::Device>) -> PodVm {
    let mut cfg = NodeConfig::with_defaults(podvisor_vmm::AccelChoice::resolve(None).accel);
    cfg.cache_dir = dir.join("cache");
    cfg.run_dir = dir.join("run");
    let archive = dir.join("img.tar");
    ImageBuilder::new()
        .busybox_layer()
        .write_oci_archive(&archive)
        .unwrap();
    let cache = LayerCache::open(&cfg.cache_dir).unwrap();
    let image = podvisor_image::import(&cache, &archive, None).unwrap();
    let mut layers = podvisor_image::LayerAttachments::default();
    let serials = layers.add_image(&image);
    assert_eq!(serials, ["pvl0"]);
    let guest =
        podvisor_guest::prepare(&podvisor_guest::GuestOptions::new(&cfg.cache_dir)).unwrap();
    PodVm::boot(
        &cfg,
        PodVmSpec {
            id: id.into(),
            cpus: 1,
            memory_mib: 192,
            guest,
            devices: layer_disks(&layers)
                .into_iter()
                .map(podvisor_vmm::Device::Block)
                .chain(cards)
                .collect(),
            pci: Default::default(),
            netns: None,
            memory: podvisor_vmm::MemoryBacking::Anonymous,
            memory_merge: false,
            die_with_parent: false,
        },
    )
    .await
    .unwrap()
}

fn container(script: &str) -> HostMessage {
    HostMessage::StartContainer(ContainerSpec {
        id: "web".into(),
        hostname: "webpod".into(),
        mounts: podvisor_proto::image_mounts(&["pvl0".into()]),
        process: ProcessSpec {
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            terminal: None,
            stdin: false,
        },
        runtime: None,
    })
}

/// What the container sees of its network, then a marker line.
const SHOW_NETWORK: &str = "ip link show; ip addr show; ip route show; \
     echo '-- resolv.conf'; cat /etc/resolv.conf; echo '-- hosts'; cat /etc/hosts; echo '-- end'";

/// An HTTP GET of `/` on 127.0.0.1:`port`, retried until it answers.
fn http_get(port: u16, deadline: Duration) -> String {
    http_get_from(std::net::SocketAddr::from(([127, 0, 0, 1], port)), deadline)
}

/// An HTTP GET of `/` on `server`, retried until it answers.
fn http_get_from(server: std::net::SocketAddr, deadline: Duration) -> String {
    let start = Instant::now();
    let mut last_error = String::new();
    while start.elapsed() < deadline {
        let answer =
            TcpStream::connect_timeout(&server, Duration::from_secs(5)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.write_all(b"GET / HTTP/1.0\r\nHost: webpod\r\n\r\n")?;
                let mut body = String::new();
                s.read_to_string(&mut body)?;
                Ok(body)
            });
        match answer {
            Ok(body) if !body.is_empty() => return body,
            Ok(_) => last_error = "empty answer".into(),
            Err(e) => last_error = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("no HTTP answer on {server} within {deadline:?}: {last_error}")
}

/// Makes every VM this test process starts get a user-mode NIC with MAC
/// [`NIC_MAC`] whose guest port [`SERVER_PORT`] is forwarded from the
/// returned port on 127.0.0.1 (a wrapper around QEMU in `dir`, named by
/// `$PODVISOR_QEMU`).
fn use_qemu_with_user_net(dir: &Path) -> u16 {
    let port = free_port();
    let wrapper = dir.join("qemu-with-user-net");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec qemu-system-x86_64 \"$@\" \
             -netdev user,id=usernet0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:{SERVER_PORT} \
             -device virtio-net-pci,netdev=usernet0,mac={NIC_MAC},bus=pci.0,addr=0x1e\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // SAFETY: called before any other thread of this test process exists
    // (nextest runs each test in a process of its own; the test builds its
    // runtime afterwards).
    unsafe { std::env::set_var("PODVISOR_QEMU", &wrapper) };
    port
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn nic(mac: &str, current_mac: Option<&str>, up: bool) -> InterfaceConfig {
    InterfaceConfig {
        mac: mac.parse().unwrap(),
        current_mac: current_mac.map(|m| m.parse().unwrap()),
        name: "eth0".into(),
        mtu: 1400,
        addresses: if up {
            vec![prefix(GUEST_IP, 24)]
        } else {
            vec![]
        },
        up,
    }
}

fn default_route() -> Vec<RouteConfig> {
    vec![RouteConfig {
        destination: prefix("0.0.0.0", 0),
        gateway: Some(ip(GATEWAY)),
        interface: "eth0".into(),
    }]
}

#[test]
fn vm_pod_with_a_nic_has_its_address_dns_and_serves_through_a_host_port() {
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    let port = use_qemu_with_user_net(dir.path());
    runtime().block_on(async {
        let mut pod = boot(dir.path(), "netnic").await;
        let warnings = configure(
            &mut pod,
            NetworkConfig {
                interfaces: vec![nic(NIC_MAC, None, true)],
                routes: default_route(),
                dns: DnsConfig {
                    // The host's systemd stub, as a careless host might pass it.
                    nameservers: vec![ip("127.0.0.53"), ip(SLIRP_DNS)],
                    search: vec!["default.svc.cluster.local".into()],
                    options: vec!["ndots:5".into()],
                },
                hosts: hosts(Some(GUEST_IP)),
            },
        )
        .await;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("127.0.0.53"), "{warnings:?}");

        pod.send(&container(&format!(
            "{SHOW_NETWORK}; mkdir -p /www && echo hello-from-the-pod > /www/index.html && \
             exec httpd -f -p {SERVER_PORT} -h /www"
        )))
        .await
        .unwrap();
        let seen = stdout_until(&mut pod, "web", "-- end").await;
        let line_of = |needle: &str| seen.lines().find(|l| l.contains(needle)).unwrap_or("");
        let eth0 = line_of(": eth0:");
        assert!(eth0.contains("UP") && eth0.contains("mtu 1400"), "{seen}");
        assert!(line_of(": lo:").contains("UP"), "{seen}");
        assert!(
            seen.contains(&format!("inet {GUEST_IP}/24")),
            "eth0's address: {seen}"
        );
        assert!(seen.contains("inet 127.0.0.1/8"), "lo's address: {seen}");
        assert!(
            seen.contains(&format!("default via {GATEWAY} dev eth0")),
            "{seen}"
        );
        let resolv = &seen[seen.find("-- resolv.conf").unwrap()..seen.find("-- hosts").unwrap()];
        assert!(
            resolv.contains(&format!("nameserver {SLIRP_DNS}")),
            "{resolv}"
        );
        assert!(!resolv.contains("127.0.0."), "{resolv}");
        assert!(
            resolv.contains("search default.svc.cluster.local"),
            "{resolv}"
        );
        let hosts_file = &seen[seen.find("-- hosts").unwrap()..];
        assert!(
            hosts_file.contains(&format!("{GUEST_IP}\twebpod")),
            "{hosts_file}"
        );

        let answer = tokio::task::spawn_blocking(move || http_get(port, Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1."), "{answer}");
        assert!(answer.contains("hello-from-the-pod"), "{answer}");
        pod.kill().await;
    });
}

#[test]
fn vm_pod_without_a_network_has_only_lo() {
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    runtime().block_on(async {
        let mut pod = boot(dir.path(), "netnone").await;
        let warnings = configure(
            &mut pod,
            NetworkConfig {
                interfaces: vec![],
                routes: vec![],
                dns: DnsConfig::default(),
                hosts: hosts(None),
            },
        )
        .await;
        assert!(warnings.is_empty(), "{warnings:?}");
        pod.send(&container(SHOW_NETWORK)).await.unwrap();
        let seen = stdout_until(&mut pod, "web", "-- end").await;
        // `N: name: <FLAGS>` lines, from both `ip link` and `ip addr`.
        let mut links: Vec<&str> = seen
            .lines()
            .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()) && l.contains(": <"))
            .collect();
        links.sort_unstable();
        links.dedup();
        assert_eq!(links.len(), 1, "{seen}");
        assert!(
            links[0].contains(": lo:") && links[0].contains("UP"),
            "{seen}"
        );
        assert!(seen.contains("inet 127.0.0.1/8"), "{seen}");
        assert!(!seen.contains("nameserver"), "{seen}");
        assert!(seen.contains("127.0.0.1\tlocalhost"), "{seen}");
        pod.kill().await;
    });
}

/// What a clone of a VM template goes through: the template's NIC is down
/// without an address and a warm container already runs; the clone's
/// configuration then gives the NIC the clone's own MAC and address, and
/// the running container sees the new `/etc/hosts` and serves.
#[test]
fn vm_reconfigured_pod_takes_a_new_mac_and_address_under_a_running_container() {
    const CLONE_MAC: &str = "02:42:0a:00:02:0f";
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    let port = use_qemu_with_user_net(dir.path());
    runtime().block_on(async {
        let mut pod = boot(dir.path(), "netclone").await;
        let dns = DnsConfig {
            nameservers: vec![ip(SLIRP_DNS)],
            search: vec![],
            options: vec![],
        };
        let template = NetworkConfig {
            interfaces: vec![nic(NIC_MAC, None, false)],
            routes: vec![],
            dns: dns.clone(),
            hosts: hosts(None),
        };
        assert!(configure(&mut pod, template).await.is_empty());
        pod.send(&container(&format!(
            "ip link show eth0; echo '-- template'; \
             until grep -q webpod /etc/hosts; do sleep 0.1; done; {SHOW_NETWORK}; \
             mkdir -p /www && echo served-by-the-clone > /www/index.html && \
             exec httpd -f -p {SERVER_PORT} -h /www"
        )))
        .await
        .unwrap();
        let before = stdout_until(&mut pod, "web", "-- template").await;
        assert!(
            !before.contains(",UP"),
            "the template's NIC is down: {before}"
        );
        assert!(
            before.contains(&format!("link/ether {NIC_MAC}")),
            "{before}"
        );

        let clone = NetworkConfig {
            interfaces: vec![nic(CLONE_MAC, Some(NIC_MAC), true)],
            routes: default_route(),
            dns,
            hosts: hosts(Some(GUEST_IP)),
        };
        assert!(configure(&mut pod, clone).await.is_empty());
        let seen = stdout_until(&mut pod, "web", "-- end").await;
        let eth0 = seen.lines().find(|l| l.contains(": eth0:")).unwrap_or("");
        assert!(eth0.contains("UP") && eth0.contains("mtu 1400"), "{seen}");
        assert!(seen.contains(&format!("link/ether {CLONE_MAC}")), "{seen}");
        assert!(seen.contains(&format!("inet {GUEST_IP}/24")), "{seen}");
        assert!(seen.contains(&format!("{GUEST_IP}\twebpod")), "{seen}");

        let answer = tokio::task::spawn_blocking(move || http_get(port, Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(answer.contains("served-by-the-clone"), "{answer}");
        pod.kill().await;
    });
}

/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, as the host side opens a pod's tap.
const TAP_FLAGS: libc::c_short =
    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens (creates) tap `name` in the calling thread's network namespace.
fn open_tap(name: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: TAP_FLAGS,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq, which IfReq lays out (name,
    // then the flags union member, padded to the union's 24 bytes).
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    // SAFETY: we own the descriptor `tun` holds; into_raw_fd gives it up.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(tun)) }
}

fn run_ip(args: &str) {
    let status = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .unwrap();
    assert!(status.success(), "ip {args}");
}

/// A pod VM with a virtio-net card on a tap, as the device model attaches
/// one: the tap lives in a network namespace this test makes (its host
/// side is the "gateway" 10.0.2.2), and the test reaches the container's
/// server from inside that namespace.
#[test]
fn vm_pod_with_a_tap_nic_serves_inside_its_namespace() {
    use std::sync::mpsc;
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    // The namespace's own thread: makes the tap, then fetches from the pod
    // when asked.
    let (tap_tx, tap_rx) = mpsc::channel();
    let (get_tx, get_rx) = mpsc::channel::<()>();
    let (answer_tx, answer_rx) = mpsc::channel();
    let netns_thread = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): this test needs root");
        let tap = open_tap("pvtap0");
        run_ip("link set lo up");
        run_ip(&format!("addr add {GATEWAY}/24 dev pvtap0"));
        run_ip("link set pvtap0 up");
        tap_tx.send(tap).unwrap();
        if get_rx.recv().is_ok() {
            let answer = http_get_from(
                std::net::SocketAddr::from((
                    GUEST_IP.parse::<std::net::Ipv4Addr>().unwrap(),
                    SERVER_PORT,
                )),
                Duration::from_secs(60),
            );
            answer_tx.send(answer).unwrap();
        }
    });
    let tap = std::sync::Arc::new(tap_rx.recv().unwrap());
    runtime().block_on(async {
        let card = podvisor_vmm::Device::Network(podvisor_vmm::NetworkDevice {
            id: "eth0".into(),
            tap: podvisor_vmm::Tap::Fd(tap),
            mac: podvisor_vmm::MacAddress(NIC_MAC.parse::<podvisor_proto::MacAddr>().unwrap().0),
            mtu: Some(1400),
        });
        let mut pod = boot_with(dir.path(), "nettap", vec![card]).await;
        let warnings = configure(
            &mut pod,
            NetworkConfig {
                interfaces: vec![nic(NIC_MAC, None, true)],
                routes: default_route(),
                dns: DnsConfig {
                    nameservers: vec![ip("127.0.0.53"), ip(GATEWAY)],
                    search: vec![],
                    options: vec![],
                },
                hosts: hosts(Some(GUEST_IP)),
            },
        )
        .await;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        pod.send(&container(&format!(
            "{SHOW_NETWORK}; mkdir -p /www && echo hello-over-the-tap > /www/index.html && \
             exec httpd -f -p {SERVER_PORT} -h /www"
        )))
        .await
        .unwrap();
        let seen = stdout_until(&mut pod, "web", "-- end").await;
        let eth0 = seen.lines().find(|l| l.contains(": eth0:")).unwrap_or("");
        assert!(eth0.contains("UP") && eth0.contains("mtu 1400"), "{seen}");
        assert!(seen.contains(&format!("inet {GUEST_IP}/24")), "{seen}");
        assert!(seen.contains(&format!("nameserver {GATEWAY}")), "{seen}");
        assert!(!seen.contains("nameserver 127."), "{seen}");
        get_tx.send(()).unwrap();
        let answer = tokio::task::spawn_blocking(move || answer_rx.recv().unwrap())
            .await
            .unwrap();
        assert!(answer.contains("hello-over-the-tap"), "{answer}");
        pod.kill().await;
    });
    drop(get_tx);
    netns_thread.join().unwrap();
}
