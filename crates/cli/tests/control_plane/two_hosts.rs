//! Issue 9, several hosts: a server and two host daemons, each in its own
//! network namespace with its own pod subnet and conflist, routed to each
//! other (testbed's HostFabric). A pod pinned to each host; each reaches a
//! TCP listener in the other by its pod IP (status.podIP). Nothing is left
//! afterwards: no pod namespace pin, no IPAM allocation, nothing in the
//! caller's namespace.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use podvisor_api::PodPhase;
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
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            found.extend(ipam_allocations(&path));
        } else if e
            .file_name()
            .to_string_lossy()
            .parse::<std::net::IpAddr>()
            .is_ok()
        {
            found.push(path.display().to_string());
        }
    }
    found
}

fn in_subnet(ip: &str, (net, len): (Ipv4Addr, u8)) -> bool {
    let Ok(ip) = ip.parse::<Ipv4Addr>() else {
        return false;
    };
    let mask = u32::MAX << (32 - len);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// A pod on `node` answering `from-NAME` on TCP 7000. The test image
/// links only some busybox applets in /bin (no `nc`), so commands go
/// through busybox's sh, which runs any applet.
fn listener_yaml(name: &str, node: &str, image: &str) -> String {
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
    let url = format!("http://{}:{SERVER_PORT}", fabric.server().address);
    let listen = format!("{}:{SERVER_PORT}", fabric.server().address);
    let _server = spawn_in(
        &s,
        fabric.server(),
        &["server", "--listen", &listen, "--state-dir", &server_dir],
    );
    let mut daemons = Vec::new();
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
        daemons.push(spawn_in(
            &s,
            h,
            &[
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
            ],
        ));
    }
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
        listener_yaml("a", &fabric.host(0).name, &image),
        listener_yaml("b", &fabric.host(1).name, &image),
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

    for (from, to, to_ip) in [("a", "b", &ip_b), ("b", "a", &ip_a)] {
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
                        logs(&daemons)
                    ))
                }
            },
        );
        assert_code(&out, 0);
    }

    for n in ["a", "b"] {
        cli()
            .args(["delete", "pod", n, "--wait", "--timeout", "120"])
            .success();
    }
    for h in fabric.hosts() {
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
