//! The host runtime's pod networks with real pod VMs and real CNI plugins,
//! on an emulated host ([`podvisor_testbed::net_host`]): pods get
//! addresses (reported in their state) and reach each other, a hostPort
//! answers on 127.0.0.1 and a second pod wanting it fails with the reason,
//! a pod keeps its network across an adoption by a new runtime and across
//! a VM killed with SIGKILL, and once every pod is deleted the host has
//! what it had before. A broken conflist fails the pod, naming the file.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use podvisor_hostd::host::runtime::processes_mentioning;
use podvisor_hostd::host::{
    Backoff, ContainerPlan, ContainerState, HostConfig, PodPhase, PodPlan, PodRuntime, PodState,
    RestartPolicy,
};
use podvisor_net::host_ports::{PortMapping, Protocol};
use podvisor_net::pod_network::PodNetworkConfig;
use podvisor_podvm::NodeConfig;
use podvisor_testbed::net_host::{TestHost, on_test_host};
use podvisor_testbed::oci::ImageBuilder;

struct VmReaper(std::path::PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}

fn config(dir: &Path, network: &PodNetworkConfig) -> HostConfig {
    let mut node = NodeConfig::with_defaults(podvisor_vmm::AccelChoice::resolve(None).accel);
    node.cache_dir = dir.join("cache");
    let mut cfg = HostConfig::new(node, dir.join("state"));
    cfg.backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(2),
        reset: Duration::from_secs(600),
    };
    cfg.delete_grace = Duration::from_secs(1);
    cfg.network = Some(network.clone());
    cfg
}

fn plan(name: &str, image: &Path, script: &str, ports: Vec<PortMapping>) -> PodPlan {
    PodPlan {
        uid: format!("uid-{name}"),
        namespace: "default".into(),
        name: name.into(),
        containers: vec![ContainerPlan {
            command: Some(vec!["sh".into(), "-c".into(), script.into()]),
            ..ContainerPlan::of_image("main", &image.display().to_string())
        }],
        restart_policy: RestartPolicy::Always,
        cpus: 1,
        memory_mib: 160,
        port_mappings: ports,
        dns: Default::default(),
        hibernate_after: None,
        isolated: false,
        volumes: vec![],
        size_runtimes: true,
    }
}

async fn wait_for(
    rt: &PodRuntime,
    uid: &str,
    what: &str,
    ok: impl Fn(&PodState) -> bool,
) -> PodState {
    let start = Instant::now();
    loop {
        let state = rt
            .pods()
            .into_iter()
            .find(|(p, _)| p.uid == uid)
            .map(|(_, s)| s);
        if let Some(s) = &state
            && ok(s)
        {
            return s.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}; state: {state:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn running(s: &PodState) -> bool {
    matches!(s.containers[0].state, ContainerState::Running { .. })
}

async fn read_log(rt: &PodRuntime, name: &str) -> String {
    let mut r = rt.logs("default", name, None, None, false).unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = r.next_chunk().await.unwrap() {
        out.extend(chunk);
    }
    String::from_utf8(out).unwrap()
}

/// An HTTP GET of `/` on `addr`, retried until it answers `want`.
async fn http_get(addr: SocketAddr, want: &'static str) -> String {
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < Duration::from_secs(60) {
            let answer =
                TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                    let mut body = String::new();
                    s.read_to_string(&mut body)?;
                    Ok(body)
                });
            match answer {
                Ok(body) if body.contains(want) => return body,
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("no answer {want:?} on {addr}: {last}")
    })
    .await
    .unwrap()
}

const SERVE: &str =
    "mkdir -p /www && echo hello from web > /www/index.html && exec httpd -f -p 80 -h /www";

/// The runtime of a new daemon on `cfg`; the previous one's network lock
/// goes with its last pod task, just after `detach_all` returned.
async fn reopen(cfg: &HostConfig) -> PodRuntime {
    for _ in 0..50 {
        match PodRuntime::open(cfg.clone()) {
            Ok((rt, _feed)) => return rt,
            Err(e) if e.to_string().contains("used by another podvisor process") => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the network state stayed locked");
}

#[test]
fn vm_pods_get_addresses_and_host_ports_keep_them_across_adoption_and_vm_kills_and_leave_nothing() {
    on_test_host(|host: TestHost| async move {
        let dir = host.dir.path().to_path_buf();
        let _vms = VmReaper(dir.clone());
        let image = dir.join("busybox.tar");
        ImageBuilder::new()
            .busybox_layer()
            .write_oci_archive(&image)
            .unwrap();
        podvisor_testbed::net_host::warm_up_cni(&host.config, &dir).await;
        let before = host.census().await;
        let cfg = config(&dir, &host.config);
        let (rt, _feed) = PodRuntime::open(cfg.clone()).unwrap();

        let port = PortMapping {
            host_port: 18081,
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: None,
        };
        let web = plan("web", &image, SERVE, vec![port]);
        let started = Instant::now();
        rt.run(web.clone()).unwrap();
        let state = wait_for(&rt, &web.uid, "web running", running).await;
        println!(
            "timing: apply -> Running with a network: {:?}",
            started.elapsed()
        );
        let web_ip = state.pod_ips[0];
        assert!(web_ip.is_ipv4(), "{state:?}");
        let local = SocketAddr::from(([127, 0, 0, 1], port.host_port));
        http_get(local, "hello from web").await;

        // Another pod reaches web by its pod IP.
        let client = plan(
            "client",
            &image,
            &format!("wget -q -O - http://{web_ip}/ && exec sleep 1000"),
            vec![],
        );
        rt.run(client.clone()).unwrap();
        let state = wait_for(&rt, &client.uid, "client running", running).await;
        assert_ne!(state.pod_ips, vec![web_ip]);
        let start = Instant::now();
        while !read_log(&rt, "client").await.contains("hello from web") {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "client never got an answer"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // A pod wanting web's host port fails to start, saying why.
        let mut thief = plan("thief", &image, SERVE, vec![port]);
        thief.restart_policy = RestartPolicy::Never;
        rt.run(thief.clone()).unwrap();
        let state = wait_for(&rt, &thief.uid, "thief failed", |s| {
            s.phase == PodPhase::Failed
        })
        .await;
        let message = state.message.clone().unwrap_or_default();
        assert!(
            message.contains("host port 18081->80/tcp") && message.contains("taken by pod uid-web"),
            "{state:?}"
        );
        assert!(state.pod_ips.is_empty(), "{state:?}");

        // A new runtime (the daemon restarted) adopts web with its network.
        rt.detach_all().await;
        drop(rt);
        let rt = reopen(&cfg).await;
        let state = wait_for(&rt, &web.uid, "web adopted", running).await;
        assert_eq!(state.pod_ips, vec![web_ip]);
        http_get(local, "hello from web").await;

        // web's QEMU killed: its next VM has the same address and port.
        let pids = processes_mentioning(&format!("podvisor-{}", web.vm_id()));
        assert_eq!(pids.len(), 1, "{pids:?}");
        // SAFETY: kill(2) on the QEMU of this test's pod.
        unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
        wait_for(&rt, &web.uid, "web restarted", |s| {
            running(s) && s.containers[0].restart_count >= 1
        })
        .await;
        let state = wait_for(&rt, &web.uid, "web's address", |s| !s.pod_ips.is_empty()).await;
        assert_eq!(state.pod_ips, vec![web_ip]);
        http_get(local, "hello from web").await;

        for uid in [&web.uid, &client.uid, &thief.uid] {
            assert!(rt.delete(uid, Some(Duration::from_secs(1))).await);
        }
        assert_eq!(host.census().await, before);
        let ips: Vec<IpAddr> = rt.pods().into_iter().flat_map(|(_, s)| s.pod_ips).collect();
        assert!(ips.is_empty());
    });
}

#[test]
fn a_broken_conflist_fails_the_pod_naming_the_file_and_leaves_nothing() {
    on_test_host(|host: TestHost| async move {
        let dir = host.dir.path().to_path_buf();
        let _vms = VmReaper(dir.clone());
        let image = dir.join("busybox.tar");
        ImageBuilder::new()
            .busybox_layer()
            .write_oci_archive(&image)
            .unwrap();
        std::fs::create_dir_all(&host.config.conf_dir).unwrap();
        let conf = host.config.conf_dir.join("10-broken.conflist");
        std::fs::write(
            &conf,
            r#"{"cniVersion": "1.0.0", "name": "broken", "plugins": ["#,
        )
        .unwrap();
        let before = host.census().await;
        let (rt, _feed) = PodRuntime::open(config(&dir, &host.config)).unwrap();
        let mut pod = plan("p", &image, SERVE, vec![]);
        pod.restart_policy = RestartPolicy::Never;
        rt.run(pod.clone()).unwrap();
        let state = wait_for(&rt, &pod.uid, "p failed", |s| s.phase == PodPhase::Failed).await;
        let message = state.message.clone().unwrap_or_default();
        assert!(message.contains(&conf.display().to_string()), "{state:?}");
        assert!(
            processes_mentioning(&dir.join("state/run/pods").display().to_string()).is_empty(),
            "no VM was started"
        );
        assert!(rt.delete(&pod.uid, None).await);
        assert_eq!(host.census().await, before);
    });
}
