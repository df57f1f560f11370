//! Wake on the first request, with a real pod VM on a real CNI network
//! (an emulated host of its own): an HTTP server pod is hibernated, its
//! QEMU gone, its tap kept with only the pod's frames let in; a client
//! connects (to the pod IP, then through a hostPort on 127.0.0.1), the
//! first frame wakes the pod, and that very connection gets the answer:
//! no refusal, no reset. Prints the time to the first byte.
//!
//! The SYN that waited in the tap is the one answered: the host takes the
//! waiting frames out before QEMU starts and sends them in again once the
//! VM runs (left in the tap, it went unanswered and only TCP's
//! retransmission a second later was served).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use podvisor_net::PodNetworks;
use podvisor_net::cni::PodIdentity;
use podvisor_net::host_ports::{PortMapping, Protocol};
use podvisor_net::pod_network::AttachRequest;
use podvisor_podvm::PodVm;
use podvisor_podvm::image_boot::ImageBoot;
use podvisor_podvm::network::{self, PodNic};
use podvisor_proto::{ContainerSpec, GuestMessage, HostMessage, ProcessSpec};
use podvisor_testbed::net_host::{TestHost, on_test_host};
use podvisor_testbed::oci::ImageBuilder;

const CONTEXT: &[u8] = b"pod default/web uid-web";

struct VmReaper(std::path::PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}

/// The segments the kernel sent again on `s` (`tcpi_total_retrans`):
/// right after connecting, the SYN's retransmissions.
fn retransmissions(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed tcp_info is valid; getsockopt(2) writes at most
    // `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: as above; `s` is an open TCP socket.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_total_retrans
}

/// What a GET of `/` on `addr` returned, how long the answer took, and
/// how many segments (the SYN) had to be sent again to connect.
fn get(addr: SocketAddr) -> (Result<String, String>, Duration, u32) {
    let started = Instant::now();
    let mut resent = 0;
    let result = (|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
            .map_err(|e| format!("connect: {e}"))?;
        resent = retransmissions(&s);
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut body = String::new();
        s.read_to_string(&mut body)
            .map_err(|e| format!("read: {e}"))?;
        Ok(body)
    })();
    (result, started.elapsed(), resent)
}

/// Container `id`'s output until `until` appears.
async fn output_until(pod: &mut PodVm, id: &str, until: &str) {
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while !out.contains(until) {
            match pod.next_event().await.expect("pod event") {
                GuestMessage::Output { id: i, data, .. } if i == id => {
                    out.push_str(&String::from_utf8_lossy(&data))
                }
                GuestMessage::Exited { id: i, status } if i == id => {
                    panic!("{id} exited ({status:?}): {out}")
                }
                GuestMessage::StartFailed { id: i, error } => panic!("{i}: {error:?}"),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {until:?} from {id}: {out}"));
}

fn node(dir: &Path) -> ImageBoot {
    let archive = dir.join("img.tar");
    ImageBuilder::new()
        .busybox_layer()
        .write_oci_archive(&archive)
        .unwrap();
    ImageBoot::prepare(dir, &archive).unwrap()
}

#[test]
fn vm_a_hibernated_pod_wakes_on_its_first_request_and_serves_it() {
    on_test_host(|host: TestHost| async move {
        let dir = host.dir.path().to_path_buf();
        let _vms = VmReaper(dir.clone());
        let boot = node(&dir);
        let (cfg, serials) = (&boot.cfg, &boot.serials);
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        let port = PortMapping {
            host_port: 18090,
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: None,
        };
        let attachment = networks
            .attach(AttachRequest {
                id: "web".into(),
                pod: PodIdentity {
                    namespace: "default".into(),
                    name: "web".into(),
                    uid: "uid-web".into(),
                },
                port_mappings: vec![port],
            })
            .await
            .unwrap();
        let pod_ip = attachment
            .pod_ips()
            .into_iter()
            .find(|ip| ip.is_ipv4())
            .unwrap();
        // The NIC is kept here across the pod's VMs: its tap lives on
        // while the pod sleeps.
        let nic: PodNic = network::pod_nic(&networks, "web").await.unwrap();
        let spec = boot.spec("web", 192, vec![nic.vm_device()]);
        let mut pod = PodVm::boot(cfg, spec.clone()).await.unwrap();
        pod.configure_network(&network::guest_config(
            &nic.guest,
            "web",
            &network::host_dns(),
        ))
        .await
        .unwrap();
        pod.send(&HostMessage::StartContainer(ContainerSpec {
            id: "web".into(),
            hostname: "web".into(),
            mounts: podvisor_proto::image_mounts(serials),
            process: ProcessSpec {
                args: vec![
                    "sh".into(),
                    "-c".into(),
                    "mkdir -p /www && echo hello from web > /www/index.html && \
                     echo serving && exec httpd -f -p 80 -h /www"
                        .into(),
                ],
                env: vec![],
                cwd: "/".into(),
                user: String::new(),
                terminal: None,
                stdin: false,
            },
            runtime: None,
        }))
        .await
        .unwrap();
        output_until(&mut pod, "web", "serving").await;
        let by_ip = SocketAddr::new(pod_ip, 80);
        let by_port = SocketAddr::from(([127, 0, 0, 1], port.host_port));
        // httpd listens a moment after the shell said it would.
        let answer = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match get(by_ip).0 {
                    Ok(body) => return body,
                    Err(e) if Instant::now() > deadline => panic!("the pod never served: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .await
        .unwrap();
        assert!(answer.contains("hello from web"), "{answer}");

        for (what, addr) in [("the pod IP", by_ip), ("a hostPort", by_port)] {
            // Hibernate; the tap stays, with only the pod's frames let in.
            let pid = pod.vmm_pid();
            let (snapshot, key) =
                podvisor_hibernate::hibernate(pod, &dir.join("snapshots"), CONTEXT)
                    .await
                    .unwrap();
            assert!(!Path::new(&format!("/proc/{pid}")).exists(), "QEMU is gone");
            nic.sleep().unwrap();
            assert!(
                !nic.first_frame(Some(Duration::from_millis(300)))
                    .await
                    .unwrap(),
                "nothing asked for the pod yet"
            );

            // A client connects while the pod sleeps.
            let client = tokio::task::spawn_blocking(move || get(addr));
            assert!(
                nic.first_frame(Some(Duration::from_secs(10)))
                    .await
                    .unwrap(),
                "the request's first frame did not reach the sleeping pod's tap"
            );
            let woke_at = Instant::now();
            let waiting = nic.wake().unwrap();
            assert!(!waiting.is_empty(), "the request's frames waited");
            let from = podvisor_hibernate::WakeFrom {
                snapshot: &snapshot,
                key: &key,
                context: CONTEXT,
                hostname: "web",
                timeout: Duration::from_secs(30),
            };
            // The frames go in once the VM runs, its identity on the way.
            let replay = async { nic.replay(&waiting).await.unwrap() };
            pod = podvisor_hibernate::wake(cfg, spec.clone(), from, replay)
                .await
                .unwrap();
            podvisor_hibernate::pod::remove(&snapshot).unwrap();
            let woken_in = woke_at.elapsed();
            let (answer, first_byte, resent) = client.await.unwrap();
            let answer = answer.unwrap_or_else(|e| panic!("the request to {what} failed: {e}"));
            assert!(answer.contains("hello from web"), "{what}: {answer}");
            println!(
                "wake on a request to {what}: VM back in {woken_in:?}, the client's answer after {first_byte:?}, SYNs sent again: {resent}"
            );
            // The very first SYN is answered (a VM slower to come back than
            // TCP's first retransmission, 1 s, is answered on that one).
            if woken_in < Duration::from_millis(900) {
                assert_eq!(resent, 0, "the first SYN to {what} went unanswered");
            }
        }
        pod.kill().await;
        drop(nic);
        networks.detach("web").await.unwrap();
    });
}
