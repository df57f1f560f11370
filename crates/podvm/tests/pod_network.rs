//! Pod VMs on real CNI networks (the plugins of /usr/lib/cni, podvisor's
//! default bridge conflist), each test on its own emulated host
//! ([`podvisor_testbed::net_host`]): the NIC on the pod's tap, the guest
//! configured before the first container, pod-to-pod traffic, egress
//! through the masquerade, a host port on 127.0.0.1, a VM killed and
//! replaced in the same attachment, and nothing left afterwards.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use podvisor_net::PodNetworks;
use podvisor_net::cni::PodIdentity;
use podvisor_net::host_ports::{PortMapping, Protocol};
use podvisor_net::pod_network::{AttachRequest, PodNetworkError};
use podvisor_podvm::PodVm;
use podvisor_podvm::image_boot::ImageBoot;
use podvisor_podvm::network::{self, PodNic};
use podvisor_proto::{ContainerSpec, GuestMessage, HostMessage, ProcessSpec};
use podvisor_testbed::net_host::{Outside, TestHost, on_test_host};
use podvisor_testbed::oci::{ImageBuilder, host_program_entries};

/// The test host's pod VMs: one busybox image with socat.
type Node = ImageBoot;

struct VmReaper(std::path::PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}

fn node(dir: &Path) -> Node {
    let archive = dir.join("img.tar");
    // busybox has no UDP client or server: the host's socat (and its
    // libraries) is a layer of its own.
    ImageBuilder::new()
        .busybox_layer()
        .layer(
            host_program_entries(Path::new("/usr/bin/socat"))
                .expect("socat (scripts/setup.sh --test)"),
        )
        .write_oci_archive(&archive)
        .unwrap();
    ImageBoot::prepare(dir, &archive).unwrap()
}

fn request(id: &str, ports: Vec<PortMapping>) -> AttachRequest {
    AttachRequest {
        id: id.into(),
        pod: PodIdentity {
            namespace: "default".into(),
            name: id.into(),
            uid: id.into(),
        },
        port_mappings: ports,
    }
}

/// Boots a VM for pod `id` with `nic` (or none) and applies its network.
async fn boot(node: &Node, id: &str, nic: Option<PodNic>) -> PodVm {
    let spec = node.spec(id, 192, nic.iter().map(PodNic::vm_device).collect());
    let mut pod = PodVm::boot(&node.cfg, spec).await.unwrap();
    let config = match &nic {
        Some(nic) => network::guest_config(&nic.guest, id, &network::host_dns()),
        None => network::no_network(id),
    };
    drop(nic);
    pod.configure_network(&config).await.unwrap();
    pod
}

fn container(node: &Node, id: &str, script: &str) -> HostMessage {
    HostMessage::StartContainer(ContainerSpec {
        id: id.into(),
        hostname: id.into(),
        mounts: podvisor_proto::image_mounts(&node.serials),
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

/// What container `id` wrote to stdout until `until` appeared.
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
                GuestMessage::StartFailed { id: i, error } => {
                    panic!("{i} failed to start: {error:?}")
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id} did not print {until:?} in time: {out}"));
    out
}

/// An HTTP GET of `/` on `addr`, retried until it answers.
fn http_get(addr: std::net::SocketAddr, deadline: Duration) -> String {
    let start = Instant::now();
    let mut last_error = String::new();
    while start.elapsed() < deadline {
        let answer = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
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
    panic!("no HTTP answer on {addr} within {deadline:?}: {last_error}")
}

fn first_ipv4(ips: &[IpAddr]) -> IpAddr {
    *ips.iter().find(|ip| ip.is_ipv4()).expect("an IPv4 address")
}

/// A server pod: prints its network, then answers each UDP datagram on
/// port 7001 with `udp from NAME` and serves `hello from NAME` over HTTP
/// on port 80.
fn server_script(name: &str) -> String {
    format!(
        "cat /proc/net/dev; ip addr show eth0; echo '-- resolv.conf'; cat /etc/resolv.conf; \
         /usr/bin/socat UDP-RECVFROM:7001,fork SYSTEM:'echo udp from {name}' & \
         echo '-- end'; mkdir -p /www && echo hello from {name} > /www/index.html && \
         exec httpd -f -p 80 -h /www"
    )
}

#[test]
fn vm_pods_on_a_cni_network_reach_each_other_the_outside_and_a_host_port_and_leave_nothing() {
    on_test_host(|host: TestHost| async move {
        let _vms = VmReaper(host.dir.path().to_path_buf());
        let node = node(host.dir.path());
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        // The bridge and the plugins' shared chains (portmap's too) exist
        // from here on, as on a host that has run pods before.
        let warm_port = PortMapping {
            host_port: 18079,
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: None,
        };
        networks
            .attach(request("warm-up", vec![warm_port]))
            .await
            .unwrap();
        networks.detach("warm-up").await.unwrap();
        let _outside = Outside::start().await;
        let before = host.census().await;

        let web = PortMapping {
            host_port: 18080,
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: None,
        };
        let a = networks.attach(request("pod-a", vec![web])).await.unwrap();
        let b = networks.attach(request("pod-b", vec![])).await.unwrap();
        let (ip_a, ip_b) = (first_ipv4(&a.pod_ips()), first_ipv4(&b.pod_ips()));
        assert_ne!(ip_a, ip_b);

        // A second pod wanting pod-a's host port is refused before anything
        // is made, naming the holder.
        let err = networks
            .attach(request("pod-c", vec![web]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, PodNetworkError::HostPortTaken { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("pod-a"), "{err}");

        let nic_a = network::pod_nic(&networks, "pod-a").await.unwrap();
        let mac_a = nic_a.device.mac;
        let (mut vm_a, mut vm_b) = tokio::join!(
            boot(&node, "pod-a", Some(nic_a)),
            boot(
                &node,
                "pod-b",
                Some(network::pod_nic(&networks, "pod-b").await.unwrap())
            ),
        );
        vm_a.send(&container(&node, "web", &server_script("pod-a")))
            .await
            .unwrap();
        let seen = stdout_until(&mut vm_a, "web", "-- end").await;
        assert!(seen.contains(&format!("inet {ip_a}/24")), "{seen}");
        assert!(
            seen.contains(&mac_a.to_string()),
            "eth0 has the CNI MAC: {seen}"
        );
        let resolv = &seen[seen.find("-- resolv.conf").unwrap()..];
        assert!(resolv.contains("nameserver"), "{resolv}");
        assert!(!resolv.contains("nameserver 127."), "{resolv}");

        // pod-b: pod-a by pod IP (TCP, then UDP: a datagram and its
        // answer), then the outside through the masquerade: the outside
        // sees the host's address, not pod-b's.
        vm_b.send(&container(
            &node,
            "client",
            &format!(
                "wget -q -O - http://{ip_a}/; echo ping | /usr/bin/socat -t 5 - UDP:{ip_a}:7001; \
                 nc {} {} </dev/null; echo '-- end'",
                Outside::ADDRESS,
                Outside::PORT
            ),
        ))
        .await
        .unwrap();
        let seen = stdout_until(&mut vm_b, "client", "-- end").await;
        assert!(seen.contains("hello from pod-a"), "pod to pod: {seen}");
        assert!(seen.contains("udp from pod-a"), "pod to pod, UDP: {seen}");
        assert!(
            seen.contains(&format!("from {}", Outside::HOST_SIDE)),
            "egress, masqueraded: {seen}"
        );

        // The host port answers on 127.0.0.1.
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], web.host_port));
        let answer = tokio::task::spawn_blocking(move || http_get(addr, Duration::from_secs(30)))
            .await
            .unwrap();
        assert!(answer.contains("hello from pod-a"), "{answer}");

        // kill -9 of pod-a's QEMU: the next VM of pod-a gets a new tap in
        // the same attachment, the same address, and serves again.
        let pid = vm_a.vmm_pid();
        // SAFETY: kill(2) on the pid of the QEMU this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        assert!(vm_a.next_event().await.is_err(), "the VM is gone");
        drop(vm_a);
        let nic = network::pod_nic(&networks, "pod-a").await.unwrap();
        let mut vm_a = boot(&node, "pod-a", Some(nic)).await;
        vm_a.send(&container(&node, "web", &server_script("pod-a again")))
            .await
            .unwrap();
        stdout_until(&mut vm_a, "web", "-- end").await;
        let answer = tokio::task::spawn_blocking(move || http_get(addr, Duration::from_secs(30)))
            .await
            .unwrap();
        assert!(answer.contains("hello from pod-a again"), "{answer}");

        vm_a.kill().await;
        vm_b.kill().await;
        networks.detach("pod-a").await.unwrap();
        networks.detach("pod-b").await.unwrap();
        assert_eq!(host.census().await, before);
    });
}

#[test]
fn vm_pod_without_a_network_has_only_lo() {
    on_test_host(|host: TestHost| async move {
        let _vms = VmReaper(host.dir.path().to_path_buf());
        let node = node(host.dir.path());
        let mut vm = boot(&node, "alone", None).await;
        vm.send(&container(&node, "c", "cat /proc/net/dev; echo '-- end'"))
            .await
            .unwrap();
        let seen = stdout_until(&mut vm, "c", "-- end").await;
        let links: Vec<&str> = seen
            .lines()
            .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()))
            .filter(|name| !name.contains('|') && !name.is_empty())
            .collect();
        assert_eq!(links, ["lo"], "{seen}");
        vm.kill().await;
    });
}
