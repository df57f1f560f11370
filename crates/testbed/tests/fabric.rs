//! The two-host fabric on its own: namespaces routed to each other by pod
//! subnet, TCP between them, and nothing left after it is dropped.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use podvisor_testbed::fabric::{EmulatedHost, HostFabric};

fn root_links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let mut links: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
        .collect();
    links.sort();
    links
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stands in for a pod on `host`: an address in its pod subnet on a
/// bridge (as the CNI bridge's gateway address would be).
fn pod_address(host: &EmulatedHost) -> Ipv4Addr {
    let (net, len) = host.pod_subnet.unwrap();
    let addr = Ipv4Addr::from(u32::from(net) + 1);
    for args in [
        vec!["link", "add", "pods", "type", "bridge"],
        vec!["addr", "add", &format!("{addr}/{len}"), "dev", "pods"],
        vec!["link", "set", "pods", "up"],
    ] {
        let st = Command::new("ip")
            .args(["-n", &host.netns])
            .args(&args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?} in {}", host.netns);
    }
    addr
}

/// A listener on `addr` in `host` that answers one line per connection
/// with the peer address it saw.
fn echo_peer(
    host: &EmulatedHost,
    addr: Ipv4Addr,
    conns: usize,
) -> (u16, std::thread::JoinHandle<()>) {
    let listener = host.run(move || TcpListener::bind((addr, 0)).expect("bind in host ns"));
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        for _ in 0..conns {
            let (mut s, peer) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"hello");
            s.write_all(format!("{}\n", peer.ip()).as_bytes()).unwrap();
        }
    });
    (port, handle)
}

fn connect(from: &EmulatedHost, source: Option<Ipv4Addr>, to: SocketAddr) -> String {
    from.run(move || {
        let s = match source {
            Some(src) => connect_from(src, &to),
            None => TcpStream::connect_timeout(&to, Duration::from_secs(5)),
        };
        let mut s = s.unwrap_or_else(|e| panic!("connect to {to}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"hello").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer.trim().to_string()
    })
}

/// A TCP connection from the source address `src` (std cannot bind
/// before connecting).
fn connect_from(src: Ipv4Addr, to: &SocketAddr) -> std::io::Result<TcpStream> {
    {
        use std::os::fd::FromRawFd;
        let SocketAddr::V4(to) = to else {
            unreachable!()
        };
        let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: plain socket/bind/connect calls on a fd we own; the
        // sockaddr_in values live across the calls. The fd is handed to
        // TcpStream, which closes it.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let stream = TcpStream::from_raw_fd(fd);
            let src = sockaddr(src, 0);
            if libc::bind(fd, &src as *const _ as *const libc::sockaddr, len) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let dst = sockaddr(*to.ip(), to.port());
            if libc::connect(fd, &dst as *const _ as *const libc::sockaddr, len) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(stream)
        }
    }
}

#[test]
fn hosts_reach_each_others_pod_subnets_and_nothing_is_left() {
    let links_before = root_links();
    let (names, dir, mut sleeper) = {
        let fabric = HostFabric::new(2);
        let (a, b) = (fabric.host(0), fabric.host(1));
        assert_ne!(
            a.pod_cidr(),
            b.pod_cidr(),
            "each host has its own pod subnet"
        );
        assert!(a.cni_conf_dir().join("10-podvisor.conflist").exists());
        let conflist =
            std::fs::read_to_string(b.cni_conf_dir().join("10-podvisor.conflist")).unwrap();
        assert!(conflist.contains(&b.pod_cidr().unwrap()), "{conflist}");

        let pod_a = pod_address(a);
        let pod_b = pod_address(b);

        // A "pod" on host A reaches one on host B by its pod-subnet address,
        // and B sees A's pod address: the route back works too.
        let (port, listener) = echo_peer(b, pod_b, 2);
        let seen = connect(a, Some(pod_a), SocketAddr::from((pod_b, port)));
        assert_eq!(seen, pod_a.to_string(), "host B saw the pod-subnet source");
        // The server reaches a host's pod subnet as well.
        let seen = connect(fabric.server(), None, SocketAddr::from((pod_b, port)));
        assert_eq!(seen, fabric.server().address.to_string());
        listener.join().unwrap();

        // And back, B to A.
        let (port, listener) = echo_peer(a, pod_a, 1);
        let seen = connect(b, Some(pod_b), SocketAddr::from((pod_a, port)));
        assert_eq!(seen, pod_b.to_string());
        listener.join().unwrap();

        // Tools run inside a host's namespace see its links only.
        let out = a
            .ip_command("ip")
            .args(["-o", "addr", "show", "eth0"])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(out.contains(&a.address.to_string()), "{out}");

        // A process left running in a namespace is ended with the fabric.
        let sleeper = a.command("sleep").arg("600").spawn().unwrap();
        assert!(netns_list().contains(&a.netns));
        (fabric.netns_names(), fabric.dir().to_path_buf(), sleeper)
    };
    let left = netns_list();
    for ns in &names {
        assert!(!left.contains(ns.as_str()), "namespace {ns} left: {left}");
    }
    assert!(!dir.exists(), "{} left", dir.display());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let ended = loop {
        match sleeper.try_wait().unwrap() {
            Some(status) => break Some(status),
            None if std::time::Instant::now() > deadline => break None,
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    if ended.is_none() {
        sleeper.kill().ok();
        sleeper.wait().ok();
        panic!("the process in the host namespace still ran after the fabric was dropped");
    }
    assert_eq!(root_links(), links_before, "links in the root namespace");
}
