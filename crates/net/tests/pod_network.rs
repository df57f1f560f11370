//! Pod attachments with the real CNI plugins of /usr/lib/cni, each test on
//! its own emulated host (see `common`).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{first_ipv4, listen_in, on_test_host, ping_pong, request};
use podvisor_net::host_ports::{PortMapping, Protocol};
use podvisor_net::netns;
use podvisor_net::pod_network::{AttachmentPhase, PodNetworkConfig, PodNetworkError, PodNetworks};
use serde_json::json;

/// One pod that comes and goes, so that the shared state the plugins keep
/// (bridge, CNI-FORWARD and CNI-HOSTPORT-* chains) exists before a census.
async fn warm_up(networks: &PodNetworks) {
    networks.attach(request("warm-up", vec![])).await.unwrap();
    networks.detach("warm-up").await.unwrap();
}

#[test]
fn two_pods_get_different_addresses_and_reach_each_other() {
    on_test_host(|host| async move {
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        warm_up(&networks).await;
        let before = host.census().await;

        let started = Instant::now();
        let a = networks.attach(request("pod-a", vec![])).await.unwrap();
        let add_a = started.elapsed();
        let started = Instant::now();
        let b = networks.attach(request("pod-b", vec![])).await.unwrap();
        let add_b = started.elapsed();
        let (ip_a, ip_b) = (first_ipv4(&a.pod_ips()), first_ipv4(&b.pod_ips()));
        assert_ne!(ip_a, ip_b);
        for att in [&a, &b] {
            let ip = att.result.pod_ips("eth0")[0];
            assert_eq!(ip.address.prefix_len, 24);
            assert_eq!(ip.gateway, Some("10.87.0.1".parse().unwrap()));
            assert!(
                att.result
                    .routes
                    .iter()
                    .any(|r| r.dst.to_string() == "0.0.0.0/0")
            );
        }
        networks.check("pod-a").await.unwrap();

        // TCP from b's namespace to a listener in a's, over the bridge.
        let listener = listen_in(&a.netns, 7000).await;
        let got = ping_pong(Some(&b.netns), SocketAddr::new(ip_a, 7000), listener).await;
        assert_eq!(got, b"pong");

        let started = Instant::now();
        networks.detach("pod-a").await.unwrap();
        let del_a = started.elapsed();
        let started = Instant::now();
        networks.detach("pod-b").await.unwrap();
        let del_b = started.elapsed();
        println!("timing: ADD {add_a:?} {add_b:?}, DEL {del_a:?} {del_b:?}");
        assert!(!a.netns.exists() && !b.netns.exists());
        assert_eq!(host.census().await, before);
        assert!(networks.attached_ids().is_empty());
        assert!(matches!(
            networks.detach("pod-a").await,
            Err(PodNetworkError::NotAttached(_))
        ));
    });
}

#[test]
fn a_broken_conflist_or_a_missing_plugin_is_named_and_leaves_nothing() {
    on_test_host(|host| async move {
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        let before = host.census().await;
        let conf = host.config.conf_dir.join("10-broken.conflist");

        host.write_conflist(
            "10-broken.conflist",
            r#"{"cniVersion": "1.0.0", "name": "broken", "plugins": ["#,
        );
        let err = networks.attach(request("pod-a", vec![])).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&conf.display().to_string()) && msg.contains("not valid JSON"),
            "{msg}"
        );

        host.write_conflist(
            "10-broken.conflist",
            &host.default_conflist_with(Some((1, json!({"type": "no-such-plugin"})))),
        );
        let err = networks.attach(request("pod-a", vec![])).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "CNI plugin \"no-such-plugin\" not found in /usr/lib/cni:/opt/cni/bin"
        );
        assert_eq!(host.census().await, before);
        assert!(networks.attached_ids().is_empty());
        assert_eq!(
            std::fs::read_dir(&host.config.state_dir).unwrap().count(),
            1,
            "only the lock file"
        );
    });
}

#[test]
fn an_add_failing_in_the_middle_of_the_chain_is_undone() {
    on_test_host(|host| async move {
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        host.write_conflist("10-podvisor.conflist", &host.default_conflist_with(None));
        warm_up(&networks).await;
        let before = host.census().await;

        // tuning (after bridge and firewall succeeded) fails on a sysctl
        // that does not exist.
        host.write_conflist(
            "10-podvisor.conflist",
            &host.default_conflist_with(Some((
                2,
                json!({"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.no_such_knob": "1"}}),
            ))),
        );
        let err = networks.attach(request("pod-a", vec![])).await.unwrap_err();
        let PodNetworkError::AddFailed {
            left_for_reconcile,
            source,
            ..
        } = &err
        else {
            panic!("unexpected error {err}");
        };
        assert!(!left_for_reconcile, "{err}");
        let cause = source.to_string();
        assert!(
            cause.contains("CNI plugin \"tuning\" ADD failed"),
            "{cause}"
        );
        assert!(cause.contains("no_such_knob"), "{cause}");
        assert!(networks.attached_ids().is_empty());
        assert_eq!(host.census().await, before);
    });
}

#[test]
fn reconcile_after_a_crash_leaves_the_host_as_before() {
    on_test_host(|host| async move {
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        warm_up(&networks).await;
        let before = host.census().await;

        // "Kill" attaches at several points between their steps (dropping
        // the future kills the running plugin), and one after ADD finished.
        let delays_ms = [0u64, 2, 10, 30, 60, 100];
        for (i, delay) in delays_ms.iter().enumerate() {
            let id = format!("crashed-{i}");
            let _ = tokio::time::timeout(
                Duration::from_millis(*delay),
                networks.attach(request(&id, vec![])),
            )
            .await;
        }
        networks.attach(request("finished", vec![])).await.unwrap();
        networks.attach(request("live", vec![])).await.unwrap();
        // Let namespace-creating threads whose waiters were dropped finish.
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(networks);

        // A restarted host process: the records tell what to undo.
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        let ids = networks.attached_ids();
        assert!(
            ids.contains(&"finished".to_string()) && ids.contains(&"live".to_string()),
            "{ids:?}"
        );
        let phases: Vec<_> = ids
            .iter()
            .map(|id| (id.clone(), networks.record(id).unwrap().phase))
            .collect();
        println!("records after the crash: {phases:?}");
        assert!(
            phases.iter().any(|(_, p)| *p == AttachmentPhase::Intended),
            "no attach was cut short: {phases:?}"
        );
        let live: HashSet<String> = ["live".to_string()].into();
        let started = Instant::now();
        let report = networks.reconcile(&live).await;
        println!(
            "timing: reconcile of {} records {:?}",
            report.removed.len(),
            started.elapsed()
        );
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(networks.attached_ids(), ["live"]);
        let live_netns = networks.attachment("live").unwrap().netns;
        assert!(netns::is_pinned(&live_netns));

        networks.detach("live").await.unwrap();
        assert_eq!(host.census().await, before);
    });
}

#[test]
fn a_taken_host_port_is_refused_before_anything_is_set_up() {
    on_test_host(|host| async move {
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        warm_up(&networks).await;
        let web = |ip: Option<&str>| PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: ip.map(|s| s.parse().unwrap()),
        };
        let a = networks
            .attach(request("pod-a", vec![web(None)]))
            .await
            .unwrap();

        // The mapping works: 127.0.0.1:8080 on the host reaches the pod's :80.
        let listener = listen_in(&a.netns, 80).await;
        let got = ping_pong(None, "127.0.0.1:8080".parse().unwrap(), listener).await;
        assert_eq!(got, b"pong");

        let during = host.census().await;
        let err = networks
            .attach(request("pod-b", vec![web(Some("127.0.0.1"))]))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "host port 127.0.0.1:8080->80/tcp of pod pod-b is taken by pod pod-a (8080->80/tcp)"
        );
        assert_eq!(
            host.census().await,
            during,
            "the refused pod set something up"
        );

        // Another process's pods (another `podvisor run`, another state
        // directory) cannot take the port either: pod-a's is held by a
        // bound socket. Nor can a pod take a port a plain program listens on.
        let other = PodNetworks::open(PodNetworkConfig {
            state_dir: host.dir.path().join("other-state"),
            netns_dir: host.dir.path().join("other-netns"),
            ..host.config.clone()
        })
        .unwrap();
        let err = other
            .attach(request("pod-x", vec![web(None)]))
            .await
            .unwrap_err();
        assert_eq!(
            podvisor_errors::chain(&err),
            "host port 8080->80/tcp of pod pod-x is in use on this host: Address already in use (os error 98)"
        );
        let program = std::net::TcpListener::bind("0.0.0.0:9090").unwrap();
        let err = other
            .attach(request(
                "pod-y",
                vec![PortMapping {
                    host_port: 9090,
                    ..web(None)
                }],
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(err, PodNetworkError::HostPortInUse { .. }),
            "{err:?}"
        );
        assert_eq!(
            host.census().await,
            during,
            "a pod refused its port set something up"
        );
        drop((other, program));
        let _ = nix::mount::umount2(
            &host.dir.path().join("other-netns"),
            nix::mount::MntFlags::MNT_DETACH,
        );

        // The reservation survives a restart of the host process.
        drop(networks);
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        assert!(matches!(
            networks.attach(request("pod-b", vec![web(None)])).await,
            Err(PodNetworkError::HostPortTaken { .. })
        ));
        // UDP on the same port is another port.
        let udp = PortMapping {
            protocol: Protocol::Udp,
            ..web(None)
        };
        networks.attach(request("pod-c", vec![udp])).await.unwrap();
        networks.detach("pod-a").await.unwrap();
        networks
            .attach(request("pod-b", vec![web(None)]))
            .await
            .unwrap();
        for id in ["pod-b", "pod-c"] {
            networks.detach(id).await.unwrap();
        }
    });
}

#[test]
fn del_after_the_namespace_vanished_still_removes_the_pods_rules() {
    on_test_host(|host| async move {
        let networks = PodNetworks::open(host.config.clone()).unwrap();
        warm_up(&networks).await;
        let before = host.census().await;
        let a = networks.attach(request("pod-a", vec![])).await.unwrap();
        // Someone removed the pin (the veth goes with the namespace).
        netns::remove_pinned(&a.netns).unwrap();
        networks.detach("pod-a").await.unwrap();
        assert_eq!(host.census().await, before);
    });
}
