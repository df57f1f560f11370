//! Issue 9, several hosts: a server and two host daemons, each in its own
//! network namespace with its own pod subnet and conflist, routed to each
//! other (testbed's HostFabric). A pod pinned to each host; each reaches a
//! TCP listener in the other by its pod IP (status.podIP). Then host0's
//! daemon is killed with SIGKILL and started again: its pod keeps running
//! with the same IP, its hostPort still answers and is still held, and
//! exec reaches it. Nothing is left afterwards: each host has the
//! namespace pins, links, iptables rules and IPAM files it had before (a
//! census, taken after one CNI attachment came and went), and the
//! caller's namespace its links.

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use podvisor_api::PodPhase;
use podvisor_net::census::HostNetworkCensus;
use podvisor_net::pod_network::PodNetworkConfig;
use podvisor_testbed::cli::PodvisorCommand;
use podvisor_testbed::daemon::Daemon;
use podvisor_testbed::fabric::{EmulatedHost, HostFabric};

use crate::fixture::*;

const SERVER_PORT: u16 = 7443;

/// `podvisor ARGS` in the background inside `host`'s namespace.
fn spawn_in(s: &Scratch, host: &EmulatedHost, args: &[&str]) -> Daemon {
    let mut cmd = host.command(BIN);
    cmd.env("PODVISOR_CACHE_DIR", s.dir.cache_dir())
        .arg("--log")
        .arg("info")
        .args(args)
        .current_dir(s.path())
        .env("PODVISOR_CONFIG", s.config())
        .env_remove("PODVISOR_LOG");
    let log = s.path().join(format!("{}.log", host.name));
    Daemon::spawn(&host.name, cmd, &log)
}

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

/// Files in `dir` (recursively) whose name is an address: host-local's
/// allocations.
fn ipam_allocations(dir: &std::path::Path) -> Vec<String> {
    let is_address = |p: &std::path::Path| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().parse::<std::net::IpAddr>().is_ok())
    };
    files_under(dir, &is_address)
        .iter()
        .map(|p| p.display().to_string())
        .collect()
}

/// `f` on a current-thread runtime inside `host`'s namespace.
fn block_on_host<T: Send + 'static, F: std::future::Future<Output = T>>(
    host: &EmulatedHost,
    f: impl FnOnce() -> F + Send + 'static,
) -> T {
    host.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

/// What pod networking has left in `host`: the daemon's namespace pins,
/// the namespace's links and iptables rules, host-local's allocations.
fn census(host: &EmulatedHost) -> HostNetworkCensus {
    let pins = host.state_dir().join("netns");
    let ipam: Vec<PathBuf> = std::fs::read_dir(host.ipam_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    block_on_host(host, move || async move {
        HostNetworkCensus::take(&pins, &ipam).await.unwrap()
    })
}

/// One attachment with a host port, made and removed with the host's
/// conflist, so that the plugins' shared state (the bridge, the chains
/// firewall and portmap keep) exists before the census, as on a host that
/// has run pods.
fn warm_up(host: &EmulatedHost) {
    let dir = host.dir.join("warm-up");
    let config = PodNetworkConfig {
        conf_dir: host.cni_conf_dir(),
        ..Default::default()
    };
    block_on_host(host, move || async move {
        podvisor_testbed::net_host::warm_up_cni(&config, &dir).await;
    });
}

/// What a TCP connection to `port` on the host's own 127.0.0.1 reads.
fn read_host_port(host: &EmulatedHost, port: u16) -> String {
    host.run(move || {
        let mut s = match TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_secs(5),
        ) {
            Ok(s) => s,
            Err(e) => return format!("connect: {e}"),
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        match s.read_to_string(&mut out) {
            Ok(_) => out,
            Err(e) => format!("{out} read: {e}"),
        }
    })
}

fn in_subnet(ip: &str, (net, len): (Ipv4Addr, u8)) -> bool {
    let Ok(ip) = ip.parse::<Ipv4Addr>() else {
        return false;
    };
    let mask = u32::MAX << (32 - len);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// A pod on `node` answering `from-NAME` on TCP 7000, published on the
/// host as `host_port`. The test image links only some busybox applets
/// in /bin (no `nc`), so commands go through busybox's sh, which runs any
/// applet.
fn listener_yaml(name: &str, node: &str, image: &str, host_port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  nodeName: {node}
  containers:
  - name: main
    image: {image}
    command: [sh, -c, 'exec nc -ll -p 7000 -e echo from-{name}']
    ports:
    - containerPort: 7000
      hostPort: {host_port}
    resources:
      limits:
        cpu: 500m
        memory: 160Mi
"
    )
}

#[test]
fn vm_pods_on_two_hosts_reach_each_other_by_pod_ip() {
    let links_before = root_links();
    let fabric = HostFabric::new(2);
    let s = Scratch::new();
    let image = s.busybox();
    let server_dir = s.path().join("server").display().to_string();
    let admin = s
        .podvisor()
        .args(["server", "init", "--state-dir", &server_dir])
        .success()
        .stdout
        .trim()
        .to_string();
    let before: Vec<HostNetworkCensus> = fabric
        .hosts()
        .iter()
        .map(|h| {
            warm_up(h);
            census(h)
        })
        .collect();
    let url = format!("http://{}:{SERVER_PORT}", fabric.server().address);
    let listen = format!("{}:{SERVER_PORT}", fabric.server().address);
    let _server = spawn_in(
        &s,
        fabric.server(),
        &["server", "--listen", &listen, "--state-dir", &server_dir],
    );
    let mut host_args = Vec::new();
    for h in fabric.hosts() {
        let token = s
            .podvisor()
            .args(["server", "token", "create", "--host", &h.name])
            .args(["--state-dir", &server_dir])
            .success()
            .stdout
            .trim()
            .to_string();
        let (state, run, conf) = (
            h.state_dir().display().to_string(),
            h.run_dir().display().to_string(),
            h.cni_conf_dir().display().to_string(),
        );
        // The server reaches the daemon's logs/exec endpoint across the
        // fabric, not on the host namespace's loopback.
        let listen = format!("{}:0", h.address);
        host_args.push(
            [
                "host",
                "--server",
                &url,
                "--token",
                &token,
                "--name",
                &h.name,
                "--state-dir",
                &state,
                "--run-dir",
                &run,
                "--cni-conf-dir",
                &conf,
                "--cpu",
                "2",
                "--memory",
                "2Gi",
                "--grace",
                "5",
                "--listen",
                &listen,
            ]
            .map(String::from),
        );
    }
    let start_daemon = |i: usize| {
        let args: Vec<&str> = host_args[i].iter().map(String::as_str).collect();
        spawn_in(&s, fabric.host(i), &args)
    };
    let mut daemons: Vec<Daemon> = (0..fabric.hosts().len()).map(start_daemon).collect();
    // The CLI talks to the server from the server's namespace.
    let cli = || {
        PodvisorCommand::bare("ip")
            .args(["netns", "exec", &fabric.server().netns, BIN])
            .env("PODVISOR_CONFIG", s.config())
            .env("PODVISOR_SERVER", &url)
            .env("PODVISOR_TOKEN", &admin)
            .timeout(Duration::from_secs(120))
    };
    let logs = |daemons: &[Daemon]| {
        daemons
            .iter()
            .map(|d| d.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    wait_for("two Ready hosts", Duration::from_secs(60), || {
        let out = cli().args(["get", "hosts"]).output();
        match out.stdout.lines().filter(|l| l.contains(" Ready ")).count() {
            2 => Ok(()),
            _ => Err(format!("{}{}\n{}", out.stdout, out.stderr, logs(&daemons))),
        }
    });

    let image = image.display().to_string();
    let yaml = [
        listener_yaml("a", &fabric.host(0).name, &image, 17000),
        listener_yaml("b", &fabric.host(1).name, &image, 17000),
    ];
    cli()
        .args(["apply", "-f", "-"])
        .stdin(yaml.join("---\n"))
        .success();
    let pods = wait_for("both pods Running with a pod IP", POD_TIMEOUT, || {
        let pods = pods(cli())?;
        let ready = ["a", "b"].iter().all(|n| {
            find(&pods, n)
                .is_some_and(|p| p.status.phase == PodPhase::Running && p.status.pod_ip.is_some())
        });
        if ready {
            Ok(pods)
        } else {
            Err(format!("{}\n{}", summary(&pods), logs(&daemons)))
        }
    });
    let ip = |n: &str| find(&pods, n).unwrap().status.pod_ip.clone().unwrap();
    let (ip_a, ip_b) = (ip("a"), ip("b"));
    assert!(
        in_subnet(&ip_a, fabric.host(0).pod_subnet.unwrap()),
        "a's IP {ip_a} is from host0's subnet"
    );
    assert!(
        in_subnet(&ip_b, fabric.host(1).pod_subnet.unwrap()),
        "b's IP {ip_b} is from host1's subnet"
    );

    let reach = |daemons: &[Daemon], from: &str, to: &str, to_ip: &str| {
        let out = wait_for(
            &format!("{from} reaching {to} at {to_ip}"),
            Duration::from_secs(30),
            || {
                let out = cli()
                    .args(["exec", from, "--", "sh", "-c"])
                    .arg(format!("nc -w 5 {to_ip} 7000"))
                    .output();
                if out.stdout.contains(&format!("from-{to}")) {
                    Ok(out)
                } else {
                    let describe = cli().args(["describe", "pod", from]).output();
                    let log = cli().args(["logs", from]).output();
                    Err(format!(
                        "{out:?}\n{}\nlogs: {log:?}\n{}",
                        describe.stdout,
                        logs(daemons)
                    ))
                }
            },
        );
        assert_code(&out, 0);
    };
    reach(&daemons, "a", "b", &ip_b);
    reach(&daemons, "b", "a", &ip_a);
    let hosts_port = |i: usize| {
        let host = fabric.host(i);
        wait_for(
            &format!("{}'s host port 17000", host.name),
            Duration::from_secs(30),
            || match read_host_port(host, 17000) {
                answer if answer.contains(&format!("from-{}", ["a", "b"][i])) => Ok(()),
                answer => Err(answer),
            },
        );
    };
    hosts_port(0);
    hosts_port(1);

    // kill -9 of host0's daemon: its pod VM runs on; a new daemon adopts
    // it with the same address, serves its exec, and holds its host port
    // again (nothing else on the host can bind it).
    daemons[0].kill9();
    daemons[0] = start_daemon(0);
    let adopted = wait_for("a adopted by host0's new daemon", POD_TIMEOUT, || {
        let out = cli().args(["get", "hosts"]).output();
        let pods = crate::fixture::pods(cli())?;
        match find(&pods, "a") {
            Some(p)
                if out.stdout.lines().filter(|l| l.contains(" Ready ")).count() == 2
                    && p.status.phase == PodPhase::Running =>
            {
                Ok(p.clone())
            }
            _ => Err(format!(
                "{}{}
{}",
                out.stdout,
                summary(&pods),
                logs(&daemons)
            )),
        }
    });
    assert_eq!(adopted.status.pod_ip.as_deref(), Some(ip_a.as_str()));
    assert_eq!(
        adopted.status.container_statuses[0].restart_count, 0,
        "the container ran on through the daemon's death"
    );
    reach(&daemons, "b", "a", &ip_a);
    reach(&daemons, "a", "b", &ip_b);
    hosts_port(0);
    let taken = fabric
        .host(0)
        .run(|| TcpListener::bind("0.0.0.0:17000").map(|_| ()));
    assert!(taken.is_err(), "host port 17000 is held by host0's daemon");

    for n in ["a", "b"] {
        cli()
            .args(["delete", "pod", n, "--wait", "--timeout", "120"])
            .success();
    }
    for (i, h) in fabric.hosts().iter().enumerate() {
        wait_for(
            &format!("{}'s pod networks released", h.name),
            Duration::from_secs(30),
            || {
                let pins = std::fs::read_dir(h.state_dir().join("netns"))
                    .map(|d| d.count())
                    .unwrap_or(0);
                let allocations = ipam_allocations(&h.ipam_dir());
                if pins == 0 && allocations.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{pins} netns pins, IPAM {allocations:?}"))
                }
            },
        );
        assert_eq!(census(h), before[i], "what {} has left", h.name);
    }
    for d in &mut daemons {
        d.terminate(Duration::from_secs(20));
    }
    drop(daemons);
    drop(fabric);
    assert_eq!(
        root_links(),
        links_before,
        "links in the caller's namespace"
    );
}
