//! The VM side of a pod's network: a tap in the pod's namespace joined to
//! the CNI's eth0 by tc redirects, with the real CNI plugins.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{on_test_host, request};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use podvisor_net::netns;
use podvisor_net::pod_network::PodNetworks;
use podvisor_net::vm_nic::TapMode;

/// Size of the `virtio_net_hdr` before each frame on an IFF_VNET_HDR tap.
const VNET_HDR_LEN: usize = 10;

fn arp_request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// Reads frames from the tap until an ARP reply from `from` to `to` comes, or
/// the deadline passes. Returns the replying MAC.
fn await_arp_reply(tap: &OwnedFd, from: Ipv4Addr, to: Ipv4Addr, mac: [u8; 6]) -> Option<[u8; 6]> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let mut fds = [PollFd::new(tap.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(200u16)).unwrap() == 0 {
            continue;
        }
        let n = nix::unistd::read(tap, &mut buf).unwrap();
        let frame = &buf[VNET_HDR_LEN..n];
        if frame.len() >= 42
            && frame[12..14] == [0x08, 0x06]
            && frame[20..22] == [0, 2]
            && frame[0..6] == mac
            && frame[28..32] == from.octets()
            && frame[38..42] == to.octets()
        {
            return Some(frame[22..28].try_into().unwrap());
        }
    }
    None
}

#[test]
fn the_tap_and_eth0_forward_frames_to_each_other() {
    on_test_host(|host| async move {
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        let pod = networks.attach(request("pod-a", vec![])).await.unwrap();
        let started = Instant::now();
        let (nic, guest) = networks
            .attach_vm_nic("pod-a", "tap0", TapMode::Fd)
            .await
            .unwrap();
        println!("timing: tap + tc redirect {:?}", started.elapsed());

        // The guest takes over eth0's identity.
        let eth0 = pod
            .result
            .interfaces
            .iter()
            .find(|i| i.name == "eth0" && !i.sandbox.is_empty())
            .unwrap();
        assert_eq!(nic.mac_string(), eth0.mac);
        assert_eq!(nic.mtu, 1500);
        assert_eq!(guest.mtu, 1500);
        assert_eq!(guest.mac, nic.mac);
        assert_eq!(guest.addresses, vec![pod.result.pod_ips("eth0")[0].address]);
        assert_eq!(guest.gateways, vec![IpAddr::from([10, 87, 0, 1])]);
        let IpAddr::V4(pod_ip) = guest.addresses[0].addr else {
            panic!()
        };
        let gateway = Ipv4Addr::new(10, 87, 0, 1);

        // A frame the "guest" writes into the tap leaves through eth0 to the
        // bridge; the bridge's reply comes in on eth0 and out of the tap.
        let tap = nic.tap_fd.as_ref().unwrap();
        let written = nix::unistd::write(tap, &arp_request(nic.mac, pod_ip, gateway)).unwrap();
        assert_eq!(written, VNET_HDR_LEN + 42);
        let replier =
            tokio::task::block_in_place(|| await_arp_reply(tap, gateway, pod_ip, nic.mac));
        let bridge_mac = pod
            .result
            .interfaces
            .iter()
            .find(|i| i.name == "podvisor0")
            .unwrap()
            .mac
            .clone();
        let replier = replier.expect("no ARP reply from the gateway came out of the tap");
        assert_eq!(podvisor_net::vm_nic::format_mac(&replier), bridge_mac);

        // The namespace's own stack no longer gets eth0's frames: a second
        // tap redirect is refused while the first stands.
        assert!(
            networks
                .attach_vm_nic("pod-a", "tap1", TapMode::Fd)
                .await
                .is_err()
        );

        let census_with_pod = host.census().await;
        podvisor_net::vm_nic::detach(&pod.netns, "eth0", "tap0")
            .await
            .unwrap();
        drop(nic);
        // Detached, it can be attached again (a restored VM gets a new tap).
        let (again, _) = networks
            .attach_vm_nic("pod-a", "tap0", TapMode::Persistent)
            .await
            .unwrap();
        assert!(again.tap_fd.is_none());
        let tap_mtu = netns::run_netlink_in(&pod.netns, |handle| async move {
            use futures_util::TryStreamExt;
            let link = handle
                .link()
                .get()
                .match_name("tap0")
                .execute()
                .try_next()
                .await
                .unwrap()
                .unwrap();
            link.attributes.iter().find_map(|a| match a {
                rtnetlink::packet_route::link::LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
        })
        .await
        .unwrap();
        assert_eq!(
            tap_mtu,
            Some(1500),
            "the persistent tap is in the pod's namespace with eth0's MTU"
        );
        assert_eq!(host.census().await, census_with_pod);
        networks.detach("pod-a").await.unwrap();
    });
}

/// Reads every frame queued on the tap now (without waiting).
fn drain(tap: &OwnedFd) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = [0u8; 2048];
    while podvisor_net::wake_tap::has_frame(tap.as_fd()).unwrap() {
        let n = nix::unistd::read(tap, &mut buf).unwrap();
        frames.push(buf[VNET_HDR_LEN..n].to_vec());
    }
    frames
}

/// A datagram from the host to `to`: the host ARPs for it on the bridge
/// first, a broadcast every pod's port gets.
fn send_from_host(to: Ipv4Addr) {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.send_to(b"wake up", (to, 9)).unwrap();
}

#[test]
fn a_sleeping_pods_tap_queues_only_the_frames_meant_for_it() {
    use podvisor_net::wake_tap::{self, WakeFilter};
    on_test_host(|host| async move {
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        networks.attach(request("pod-a", vec![])).await.unwrap();
        let (nic, guest) = networks
            .attach_vm_nic("pod-a", "tap0", TapMode::Fd)
            .await
            .unwrap();
        let IpAddr::V4(pod_ip) = guest.addresses[0].addr else {
            panic!()
        };
        let tap = nic.tap_fd.as_ref().unwrap();
        drain(tap);
        let filter = WakeFilter {
            mac: nic.mac,
            ipv4: vec![pod_ip],
        };
        wake_tap::attach(tap.as_fd(), &filter).unwrap();
        drain(tap);

        // Another address on the pod network: its ARP broadcast reaches the
        // pod's port but not the queue.
        send_from_host(Ipv4Addr::new(10, 87, 0, 250));
        assert!(
            !wake_tap::wait_for_frame(tap.as_fd(), Some(Duration::from_millis(1500)))
                .await
                .unwrap(),
            "another address's ARP reached the sleeping pod's queue: {:?}",
            drain(tap)
        );

        // The pod's address: the ARP request waits in the queue, unread.
        send_from_host(pod_ip);
        assert!(
            wake_tap::wait_for_frame(tap.as_fd(), Some(Duration::from_secs(5)))
                .await
                .unwrap(),
            "nothing for the pod reached its queue"
        );
        assert!(wake_tap::has_frame(tap.as_fd()).unwrap(), "still queued");
        let frames = drain(tap);
        assert!(!frames.is_empty());
        for f in &frames {
            let arp_for_pod = f[12..14] == [0x08, 0x06] && f[38..42] == pod_ip.octets();
            assert!(
                arp_for_pod || f[..6] == nic.mac,
                "a frame not meant for the pod: {f:02x?}"
            );
        }

        // Without the filter the pod's port gets everything again.
        wake_tap::detach(tap.as_fd()).unwrap();
        send_from_host(Ipv4Addr::new(10, 87, 0, 251));
        assert!(
            wake_tap::wait_for_frame(tap.as_fd(), Some(Duration::from_secs(5)))
                .await
                .unwrap(),
            "the broadcast did not arrive once the filter was gone"
        );

        podvisor_net::vm_nic::detach(&networks.attachment("pod-a").unwrap().netns, "eth0", "tap0")
            .await
            .unwrap();
        drop(nic);
        networks.detach("pod-a").await.unwrap();
    });
}
