//! The agent's network configuration against the real kernel, through its
//! real netlink socket, in a network namespace this test makes (a veth
//! pair standing in for the VM's NIC), checked with iproute2. Needs root,
//! as the agent in the guest has.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use podvisor_agent::netlink::RouteSocket;
use podvisor_agent::network::configure;
use podvisor_proto::{
    DnsConfig, HostsEntry, InterfaceConfig, IpPrefix, NetworkConfig, RouteConfig,
};

fn prefix(s: &str) -> IpPrefix {
    let (a, l) = s.split_once('/').unwrap();
    IpPrefix {
        address: a.parse().unwrap(),
        prefix_len: l.parse().unwrap(),
    }
}

fn ip(args: &str) -> String {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("iproute2");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn config(address: &str, mac: &str, current_mac: Option<&str>) -> NetworkConfig {
    let gw: IpAddr = "10.88.0.1".parse().unwrap();
    NetworkConfig {
        interfaces: vec![InterfaceConfig {
            mac: mac.parse().unwrap(),
            current_mac: current_mac.map(|m| m.parse().unwrap()),
            name: "eth0".into(),
            mtu: 1400,
            addresses: vec![prefix(address), prefix("fd00::5/64")],
            up: true,
        }],
        routes: vec![
            RouteConfig {
                destination: prefix("0.0.0.0/0"),
                gateway: Some(gw),
                interface: "eth0".into(),
            },
            RouteConfig {
                destination: prefix("192.168.77.0/24"),
                gateway: None,
                interface: "eth0".into(),
            },
        ],
        dns: DnsConfig {
            nameservers: vec![gw],
            search: vec![],
            options: vec![],
        },
        hosts: vec![HostsEntry {
            address: prefix(address).address,
            names: vec!["web-0".into()],
        }],
    }
}

/// Runs `f` on a thread of its own in a new network namespace (namespaces
/// belong to threads; the test's own stays where it was).
fn in_new_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): this test needs root");
        f()
    })
    .join()
    .unwrap();
}

#[test]
fn configures_lo_the_nic_and_routes_then_a_clones_new_identity() {
    in_new_netns(|| {
        ip("link add nic0 address 02:00:00:00:00:01 type veth peer name peer0");
        ip("link set peer0 up");
        let files = tempfile::tempdir().unwrap();
        let mut socket = RouteSocket::open().unwrap();

        // A clone's first configuration: the NIC still has the template's
        // MAC and name.
        let first = config(
            "10.88.0.5/16",
            "02:42:0a:58:00:05",
            Some("02:00:00:00:00:01"),
        );
        let outcome = configure(&mut socket, &first, files.path(), Duration::from_secs(1));
        assert!(outcome.error.is_none(), "{:?}", outcome.error);

        let lo = ip("-o link show lo");
        assert!(lo.contains(",UP,") || lo.contains("<LOOPBACK,UP"), "{lo}");
        assert!(ip("-o addr show lo").contains("inet 127.0.0.1/8"));
        let link = ip("-o link show eth0");
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(link.contains("link/ether 02:42:0a:58:00:05"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        let addrs = ip("-o addr show eth0");
        assert!(
            addrs.contains("inet 10.88.0.5/16 brd 10.88.255.255"),
            "{addrs}"
        );
        let v6 = addrs.lines().find(|l| l.contains("inet6 fd00::5/64"));
        assert!(v6.is_some_and(|l| !l.contains("tentative")), "{addrs}");
        let routes = ip("route show");
        assert!(
            routes.contains("default via 10.88.0.1 dev eth0"),
            "{routes}"
        );
        assert!(routes.contains("192.168.77.0/24 dev eth0"), "{routes}");

        // Configured again with another address: the old one is gone, the
        // routes are back.
        let second = config(
            "10.88.0.7/16",
            "02:42:0a:58:00:05",
            Some("02:00:00:00:00:01"),
        );
        let outcome = configure(&mut socket, &second, files.path(), Duration::from_secs(1));
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        let addrs = ip("-o addr show eth0");
        assert!(addrs.contains("inet 10.88.0.7/16"), "{addrs}");
        assert!(!addrs.contains("10.88.0.5"), "{addrs}");
        let routes = ip("route show");
        assert!(
            routes.contains("default via 10.88.0.1 dev eth0"),
            "{routes}"
        );
        let hosts = std::fs::read_to_string(files.path().join("hosts")).unwrap();
        assert!(hosts.contains("10.88.0.7\tweb-0"), "{hosts}");

        // A NIC the namespace does not have.
        let missing = config("10.88.0.9/16", "02:42:0a:58:00:09", None);
        let outcome = configure(
            &mut socket,
            &missing,
            files.path(),
            Duration::from_millis(100),
        );
        let error = outcome.error.unwrap().to_string();
        assert!(
            error.starts_with("no network interface with MAC 02:42:0a:58:00:09"),
            "{error}"
        );
    });
}
