//! A cluster on loopback: etcd, two server replicas sharing it, three host
//! daemons (separate state directories, one shared image cache). Six pods
//! spread over the hosts; a host daemon killed with SIGKILL leaves its VMs
//! running and, restarted, adopts them without starting duplicates; a
//! server replica killed loses nothing; bad input gets clear errors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use podvisor_testbed::cli::PodvisorCommand;
use podvisor_testbed::daemon::{Daemon, free_port, pids_mentioning};
use podvisor_testbed::etcd::EtcdServer;
use podvisor_testbed::registry::Registry;

use crate::fixture::*;

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];

struct Cluster {
    s: Scratch,
    etcd: EtcdServer,
    admin: String,
    ports: [u16; 2],
    servers: Vec<Daemon>,
    hosts: BTreeMap<String, Daemon>,
    host_tokens: BTreeMap<String, String>,
}

impl Cluster {
    fn start() -> Cluster {
        let s = Scratch::new();
        let etcd = EtcdServer::start();
        let store = etcd.url();
        let state = |i: usize| s.path().join(format!("server{i}")).display().to_string();
        let admin = s
            .podvisor()
            .args([
                "server",
                "init",
                "--state-dir",
                &state(1),
                "--store",
                &store,
            ])
            .success()
            .stdout
            .trim()
            .to_string();
        let mut host_tokens = BTreeMap::new();
        for h in HOSTS {
            let token = s
                .podvisor()
                .args(["server", "token", "create", "--host", h])
                .args(["--state-dir", &state(1), "--store", &store])
                .success()
                .stdout
                .trim()
                .to_string();
            host_tokens.insert(h.to_string(), token);
        }
        let ports = [free_port(), free_port()];
        let kek = s.path().join("key-encryption.key").display().to_string();
        let servers = (0..2)
            .map(|i| {
                let listen = format!("127.0.0.1:{}", ports[i]);
                // Replicas share the key-encryption key, as they must.
                s.spawn(
                    &format!("server{}", i + 1),
                    &["server", "--listen", &listen, "--state-dir", &state(i + 1)]
                        .into_iter()
                        .chain(["--store", &store, "--host-ttl", "8"])
                        .chain(["--key-encryption-key", &kek])
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let mut c = Cluster {
            s,
            etcd,
            admin,
            ports,
            servers,
            hosts: BTreeMap::new(),
            host_tokens,
        };
        for h in HOSTS {
            c.start_host(h);
        }
        c
    }

    /// Both replicas, for clients that fail over.
    fn server_urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn host_state(&self, h: &str) -> PathBuf {
        self.s.path().join(h)
    }

    /// The run directory of host `h`'s VMs: their QEMU command lines name it.
    fn vm_dir(&self, h: &str) -> String {
        self.host_state(h).join("run/pods").display().to_string()
    }

    fn start_host(&mut self, h: &str) {
        let state = self.host_state(h).display().to_string();
        let (urls, token) = (self.server_urls(), self.host_tokens[h].clone());
        let args = [
            "host",
            "--server",
            &urls,
            "--token",
            &token,
            "--name",
            h,
            "--state-dir",
            &state,
            "--cpu",
            "2500m",
            "--memory",
            "2Gi",
            "--grace",
            "5",
        ];
        let daemon = self.s.spawn(h, &args);
        self.hosts.insert(h.to_string(), daemon);
    }

    /// A CLI command against replica `i` (0 or 1) with the admin token.
    fn cli(&self, i: usize) -> PodvisorCommand {
        self.s
            .podvisor()
            .env(
                "PODVISOR_SERVER",
                format!("http://127.0.0.1:{}", self.ports[i]),
            )
            .env("PODVISOR_TOKEN", &self.admin)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (name, d) in self.hosts.iter() {
            out.push_str(&format!("--- {name}\n{}", tail(&d.log())));
        }
        for (i, d) in self.servers.iter().enumerate() {
            out.push_str(&format!("--- server{}\n{}", i + 1, tail(&d.log())));
        }
        out
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n") + "\n"
}

#[test]
fn vm_cluster_spreads_pods_adopts_vms_and_survives_a_replica() {
    let started = Instant::now();
    let mut c = Cluster::start();
    wait_for("three Ready hosts", Duration::from_secs(60), || {
        let out = c.cli(1).args(["get", "hosts"]).output();
        let ready = out.stdout.lines().filter(|l| l.contains(" Ready ")).count();
        if ready == 3 {
            Ok(())
        } else {
            Err(format!("{}{}\n{}", out.stdout, out.stderr, c.logs()))
        }
    });

    // Bad input: clear errors naming the problem.
    let broken = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: \"unterminated\n";
    let out = c.cli(0).args(["apply", "-f", "-"]).stdin(broken).output();
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("quoted scalar at line 4 column 9"),
        "{}",
        out.stderr
    );
    let unknown = "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  containers:\n  - name: a\n    image: busybox\n    livenessProbe: {exec: {command: [\"true\"]}}\n";
    let out = c.cli(0).args(["apply", "-f", "-"]).stdin(unknown).output();
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("spec.containers[0].livenessProbe"),
        "{}",
        out.stderr
    );
    let out = c
        .cli(0)
        .env("PODVISOR_TOKEN", "pv_not-a-token")
        .args(["get", "pods"])
        .output();
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("401"), "{}", out.stderr);

    // Six pods of 1 CPU on hosts of 2.5 CPUs: two on each host.
    // The image comes from a registry, pulled through the hosts' shared
    // cache.
    let registry = Registry::start();
    let built = busybox_image().build().unwrap();
    registry.push(&built, "busybox", "latest");
    let image = registry.reference("busybox", "latest");
    let names: Vec<String> = (1..=6).map(|i| format!("sleeper-{i}")).collect();
    let yaml: String = names
        .iter()
        .map(|n| sleeper_yaml(n, &image, "1", "128Mi"))
        .collect::<Vec<_>>()
        .join("---\n");
    c.cli(0).args(["apply", "-f", "-"]).stdin(yaml).success();
    // An image that does not exist (a small pod that fits beside them).
    let missing = registry.reference("no-such-image", "latest");
    c.cli(1)
        .args(["apply", "-f", "-"])
        .stdin(sleeper_yaml("ghost", &missing, "100m", "128Mi"))
        .success();

    let booting = Instant::now();
    let all = wait_for("six pods running", POD_TIMEOUT, || {
        let pods = pods(c.cli(0))?;
        if all_running(&pods, &names) {
            Ok(pods)
        } else {
            Err(format!("{}\n{}", summary(&pods), c.logs()))
        }
    });
    eprintln!("six pod VMs running {:?} after apply", booting.elapsed());
    let mut per_host: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in &names {
        let host = find(&all, n).unwrap().spec.node_name.clone().unwrap();
        per_host.entry(host).or_default().push(n.clone());
    }
    for h in HOSTS {
        let on_h = per_host.get(h).cloned().unwrap_or_default();
        assert!(!on_h.is_empty(), "no pod on {h}: {per_host:?}");
        assert_eq!(
            pids_mentioning(&c.vm_dir(h)).len(),
            on_h.len(),
            "one QEMU per pod on {h}"
        );
    }

    let ghost = wait_for(
        "the missing image to be reported",
        Duration::from_secs(60),
        || {
            let pods = pods(c.cli(0))?;
            let g = find(&pods, "ghost").cloned().ok_or("no ghost pod")?;
            match g
                .status
                .container_statuses
                .first()
                .and_then(|s| s.state.waiting.clone())
            {
                Some(w) if w.reason == "ErrImagePull" => Ok(w.message.unwrap_or_default()),
                _ => Err(summary(&pods)),
            }
        },
    );
    assert!(ghost.contains("no-such-image"), "{ghost}");
    // Six pods on three hosts sharing a cache: the layer was fetched once.
    assert_eq!(
        registry.blob_gets(&built.layer_digests[0]),
        1,
        "{:?}",
        registry.all_blob_gets()
    );
    let described = c.cli(1).args(["describe", "pod", "ghost"]).success().stdout;
    assert!(described.contains("ErrImagePull"), "{described}");

    // Logs and exec reach a pod on any host through either replica.
    let victim = per_host["h1"][0].clone();
    let logs = c.cli(1).args(["logs", &victim]).success().stdout;
    assert_eq!(logs, format!("hello from {victim}\n"));

    // kill -9 of a host daemon: its VMs keep running. One of its pods is
    // deleted while it is down. Restarted, it adopts the other pod's VM
    // (the same QEMU process, no second one) and stops the deleted one's.
    assert_eq!(per_host["h1"].len(), 2, "{per_host:?}");
    let doomed = per_host["h1"][1].clone();
    let qemu_before = pids_mentioning(&c.vm_dir("h1"));
    c.hosts.get_mut("h1").unwrap().kill9();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        pids_mentioning(&c.vm_dir("h1")),
        qemu_before,
        "VMs outlive their daemon"
    );
    let out = c.cli(1).args(["delete", "pod", &doomed]).success();
    assert!(out.stdout.contains("terminating"), "{}", out.stdout);
    c.start_host("h1");
    let out = wait_for("exec into an adopted pod", Duration::from_secs(90), || {
        let out = c
            .cli(0)
            .args(["exec", &victim, "--", "cat", "/proc/2/comm"])
            .output();
        if out.code == Some(0) {
            Ok(out.stdout)
        } else {
            Err(format!("{}{}\n{}", out.stdout, out.stderr, c.logs()))
        }
    });
    assert_eq!(out, "sleep\n");
    wait_for(
        "the pod deleted meanwhile to go",
        Duration::from_secs(60),
        || {
            let pods = pods(c.cli(0))?;
            if find(&pods, &doomed).is_none() {
                Ok(())
            } else {
                Err(summary(&pods))
            }
        },
    );
    let qemu_after = pids_mentioning(&c.vm_dir("h1"));
    assert_eq!(
        qemu_after.len(),
        1,
        "only the kept pod's VM runs: {qemu_after:?}"
    );
    assert!(
        qemu_before.contains(&qemu_after[0]),
        "adopted, not started again"
    );
    let names: Vec<String> = names.into_iter().filter(|n| *n != doomed).collect();
    let pods_now = pods(c.cli(0)).unwrap();
    let p = find(&pods_now, &victim).unwrap();
    assert_eq!(p.restart_count(), 0, "{}", summary(&pods_now));
    assert!(p.status.container_statuses[0].state.running.is_some());

    // A host that stops heartbeating (frozen) is marked NotReady and its
    // pods Unknown; when it goes on, it reports them Running again.
    let frozen = c.hosts["h2"].pid();
    c.hosts["h2"].signal(libc::SIGSTOP);
    let on_h2 = per_host["h2"].clone();
    wait_for("h2's pods to be Unknown", Duration::from_secs(60), || {
        let pods = pods(c.cli(0))?;
        let lost = on_h2.iter().all(|n| {
            find(&pods, n).is_some_and(|p| {
                p.status.phase == podvisor_api::PodPhase::Unknown
                    && p.status.reason.as_deref() == Some("NodeLost")
            })
        });
        if lost { Ok(()) } else { Err(summary(&pods)) }
    });
    let hosts = c.cli(0).args(["get", "hosts"]).success().stdout;
    assert!(
        hosts
            .lines()
            .any(|l| l.starts_with("h2 ") && l.contains("NotReady")),
        "{hosts}"
    );
    c.hosts["h2"].signal(libc::SIGCONT);
    wait_for(
        "h2's pods to be Running again",
        Duration::from_secs(60),
        || {
            let pods = pods(c.cli(0))?;
            if all_running(&pods, &on_h2) {
                Ok(())
            } else {
                Err(summary(&pods))
            }
        },
    );
    assert_eq!(c.hosts["h2"].pid(), frozen);

    // Killing a server replica loses nothing: the other serves every pod,
    // and hosts fail over to it.
    c.servers[0].kill9();
    let pods_after = pods(c.cli(1)).unwrap();
    assert!(all_running(&pods_after, &names), "{}", summary(&pods_after));
    assert!(find(&pods_after, "ghost").is_some());
    let out = c
        .cli(1)
        .args(["exec", &per_host["h3"][0], "--", "hostname"])
        .success();
    assert_eq!(out.stdout.trim(), per_host["h3"][0]);
    c.cli(1)
        .args(["delete", "pod", &victim, "--wait"])
        .success();
    assert!(pids_mentioning(&c.vm_dir("h1")).is_empty());

    // Delete everything: no VM is left on any host.
    for n in names
        .iter()
        .filter(|n| **n != victim)
        .chain(["ghost".to_string()].iter())
    {
        c.cli(1)
            .args(["delete", "pod", n, "--wait", "--timeout", "120"])
            .success();
    }
    for h in HOSTS {
        assert!(pids_mentioning(&c.vm_dir(h)).is_empty(), "VMs left on {h}");
    }
    for d in c.hosts.values_mut() {
        assert_eq!(d.terminate(Duration::from_secs(30)), Some(0), "{}", d.log());
    }
    let _ = &c.etcd;
    eprintln!("cluster test took {:?}", started.elapsed());
}
