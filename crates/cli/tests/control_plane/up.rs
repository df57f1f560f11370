//! One machine through `podvisor up`: apply, get, logs, exec, delete, with
//! nothing but the CLI config `up` writes, and pods on the default pod
//! network; with `--ksm`, the host runs KSM, its pods' RAM is mergeable
//! unless they ask for isolation, and the machine's KSM settings are put
//! back when it stops.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use podvisor_api::{Pod, PodPhase};
use podvisor_testbed::cli::PodvisorCommand;
use podvisor_testbed::daemon::{Daemon, free_port, pids_mentioning};
use podvisor_testbed::fabric::HostFabric;

use crate::fixture::*;

/// KSM's files.
const KSM_DIR: &str = "/sys/kernel/mm/ksm";
/// The settings a host daemon with `--ksm` changes.
const KSM_SETTINGS: [&str; 3] = ["run", "pages_to_scan", "sleep_millisecs"];

/// KSM's settings are the machine's: one test at a time holds them (a
/// lock file, so test processes running in parallel wait), and they are
/// put back as they were when this is dropped, whatever the test's daemon
/// did.
struct MachineKsm {
    before: [String; 3],
    _lock: std::fs::File,
}

impl MachineKsm {
    fn hold() -> MachineKsm {
        let lock = std::fs::File::create("/tmp/podvisor-tests-ksm.lock").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&lock);
        let start = Instant::now();
        // SAFETY: flock on a descriptor this test owns.
        while unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "another test held KSM's settings for 10 minutes"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        MachineKsm {
            before: Self::now(),
            _lock: lock,
        }
    }

    fn now() -> [String; 3] {
        KSM_SETTINGS.map(|name| {
            std::fs::read_to_string(Path::new(KSM_DIR).join(name))
                .unwrap()
                .trim()
                .to_string()
        })
    }
}

impl Drop for MachineKsm {
    fn drop(&mut self) {
        // The rate first, then run, as the daemon does.
        for i in [1, 2, 0] {
            let _ = std::fs::write(Path::new(KSM_DIR).join(KSM_SETTINGS[i]), &self.before[i]);
        }
    }
}

/// The QEMU command line of `pod`'s VM, launched by the `podvisor up`
/// whose state is in `state`.
fn vm_command_line(state: &Path, pod: &Pod) -> String {
    // The VM's directory is named by the first 16 letters and digits of
    // the pod's uid.
    let id = pod
        .metadata
        .uid
        .as_deref()
        .unwrap()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect::<String>()
        .to_ascii_lowercase();
    let dir = format!("{}/", state.join("host/run/pods").join(id).display());
    let pids = pids_mentioning(&dir);
    assert_eq!(pids.len(), 1, "one QEMU in {dir}");
    let raw = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

/// `podvisor up` as a user starts it, pod network included, on an
/// emulated host (its own network namespace, pod subnet and conflist, so
/// the machine's namespace is untouched), with KSM on for its pods.
#[test]
fn vm_up_runs_a_pod_applied_from_yaml() {
    let ksm = MachineKsm::hold();
    // A rate unlike the machine's, so that putting it back shows.
    let pages_to_scan = ksm.before[1].parse::<u64>().unwrap() + 7;
    let fabric = HostFabric::new(1);
    let host = fabric.host(0);
    let s = Scratch::new();
    let image = s.busybox();
    let config = s.config();
    let state = s.path().join("state");
    let listen = "127.0.0.1:7443";
    let mut cmd = host.command(BIN);
    cmd.env("PODVISOR_CACHE_DIR", s.dir.cache_dir())
        .args(["--log", "info", "up", "--state-dir"])
        .arg(&state)
        .args(["--listen", listen, "--name", "node-1", "--cpu", "2"])
        .args(["--memory", "1Gi", "--ksm", "--ksm-pages-to-scan"])
        .arg(pages_to_scan.to_string())
        .arg("--cni-conf-dir")
        .arg(host.cni_conf_dir())
        .current_dir(s.path())
        .env("PODVISOR_CONFIG", &config)
        .env_remove("PODVISOR_POD_NETWORK")
        .env_remove("PODVISOR_LOG");
    let mut up = Daemon::spawn("up", cmd, &s.path().join("up.log"));
    // Only the config file `up` wrote tells the CLI where the server is;
    // the CLI runs on the same (emulated) host.
    let cli = || {
        PodvisorCommand::bare("ip")
            .args(["netns", "exec", &host.netns, BIN])
            .env("PODVISOR_CONFIG", &config)
            .env("PODVISOR_CACHE_DIR", s.dir.cache_dir())
            .timeout(Duration::from_secs(120))
    };
    wait_for("the host to be Ready", Duration::from_secs(60), || {
        let out = cli().args(["get", "hosts"]).output();
        if out.code == Some(0) && out.stdout.contains("node-1") && out.stdout.contains(" Ready ") {
            Ok(())
        } else {
            Err(format!(
                "{}{}\nup log:\n{}",
                out.stdout,
                out.stderr,
                up.log()
            ))
        }
    });
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(
        written.contains(&format!("url = \"http://{listen}\"")),
        "{written}"
    );
    assert!(written.contains("admin.token"), "{written}");

    // KSM runs at the daemon's rate, and the host says so.
    assert_eq!(
        MachineKsm::now(),
        ["1".to_string(), pages_to_scan.to_string(), "20".into()]
    );
    let reported = wait_for("the host to report KSM", Duration::from_secs(30), || {
        let out = cli().args(["get", "hosts", "-o", "json"]).output();
        let hosts: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {out:?}"))?;
        let ksm = hosts["items"][0]["status"]["ksm"].clone();
        if ksm["enabled"] == true {
            Ok(ksm)
        } else {
            Err(hosts.to_string())
        }
    });
    assert_eq!(reported["pagesToScan"], pages_to_scan, "{reported}");
    assert!(reported["ksmdCpuSeconds"].is_f64(), "{reported}");
    let described = cli().args(["describe", "host", "node-1"]).success().stdout;
    let described_line = |key: &str| {
        described
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key} in:\n{described}"))
            .to_string()
    };
    assert_eq!(
        described_line("KSM"),
        format!("on, {pages_to_scan} pages every 20 ms")
    );
    assert!(described_line("KSM saves").contains("MiB ("), "{described}");
    assert!(
        described_line("ksmd CPU").ends_with("s since boot"),
        "{described}"
    );

    // The image goes into the cache's catalog under its name; pods name it
    // as users do.
    let out = cli().args(["image", "import"]).arg(&image).output();
    assert_code(&out, 0);
    let yaml = sleeper_yaml("web", "busybox", "500m", "160Mi");
    let out = cli().args(["apply", "-f", "-"]).stdin(yaml).output();
    assert_code(&out, 0);
    assert!(out.stdout.contains("pod/web created"), "{}", out.stdout);
    let names = vec!["web".to_string()];
    wait_for("the pod to run", POD_TIMEOUT, || {
        let pods = pods(cli())?;
        if all_running(&pods, &names) {
            Ok(())
        } else {
            Err(summary(&pods))
        }
    });
    let table = cli().args(["get", "pods"]).success().stdout;
    let row = table.lines().find(|l| l.starts_with("web ")).unwrap();
    for col in ["1/1", "Running", "node-1"] {
        assert!(row.contains(col), "{table}");
    }
    let pod = pods(cli()).unwrap().remove(0);
    assert_eq!(pod.status.phase, PodPhase::Running);
    assert_eq!(pod.status.host_ip.as_deref(), Some("127.0.0.1"));
    assert!(pod.status.container_statuses[0].state.running.is_some());
    // A pod that does not ask for isolation is mergeable on this host.
    let web_vm = vm_command_line(&state, &pod);
    assert!(web_vm.contains(",mem-merge=on"), "{web_vm}");

    // The pod is on the host's pod network: an address from the host's
    // conflist, shown by `get -o wide`, and it reaches a server on the
    // host (egress through the bridge's masquerade).
    let pod_ip = pod.status.pod_ip.clone().expect("a pod IP");
    let (net, len) = host.pod_subnet.unwrap();
    let ip: std::net::Ipv4Addr = pod_ip.parse().unwrap();
    assert_eq!(
        u32::from(ip) >> (32 - len),
        u32::from(net) >> (32 - len),
        "{pod_ip} is in the host's pod subnet"
    );
    let wide = cli().args(["get", "pods", "-o", "wide"]).success().stdout;
    assert!(
        wide.lines()
            .any(|l| l.starts_with("web ") && l.contains(&pod_ip)),
        "{wide}"
    );
    let address = host.address;
    let server = host.spawn(move || {
        let listener = TcpListener::bind((address, 7080)).unwrap();
        let (mut conn, peer) = listener.accept().unwrap();
        conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello from the host\n")
            .unwrap();
        peer
    });
    let out = wait_for("the pod to reach the host", Duration::from_secs(30), || {
        let out = cli()
            // The test image links only some applets; sh runs any.
            .args(["exec", "web", "--", "sh", "-c"])
            .arg(format!("wget -q -O - http://{address}:7080/"))
            .output();
        if out.stdout.contains("hello from the host") {
            Ok(out)
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    });
    assert_code(&out, 0);
    server.join().unwrap();

    // The output it wrote, from the host's log file through the server.
    let logs = wait_for("the greeting in the log", Duration::from_secs(30), || {
        let out = cli().args(["logs", "web"]).output();
        if out.stdout.contains("hello") {
            Ok(out.stdout)
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    });
    assert_eq!(logs, "hello from web\n");

    // The host daemon's own endpoint serves only the server: asked
    // directly, without the secret the daemon gave the server, it refuses.
    let hosts = cli().args(["get", "hosts", "-o", "json"]).success().stdout;
    let hosts: serde_json::Value = serde_json::from_str(&hosts).unwrap();
    assert_eq!(hosts["kind"], "HostList", "{hosts}");
    let endpoint = hosts["items"][0]["spec"]["address"].as_str().unwrap();
    let endpoint = endpoint.strip_prefix("http://").unwrap().to_string();
    let get = |path: &'static str, authorization: Option<&'static str>| {
        let endpoint = endpoint.clone();
        host.run(move || raw_get(&endpoint, path, authorization))
    };
    for authorization in [None, Some("Bearer not-the-secret")] {
        let answer = get("/pods/default/web/log", authorization);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(!answer.contains("hello from web"), "{answer}");
    }
    assert!(get("/healthz", None).starts_with("HTTP/1.1 200"));

    // Exec: in the container's PID namespace, with its exit code; and with
    // stdin. (The greeting is written just before the shell execs sleep.)
    wait_for(
        "the container to exec sleep",
        Duration::from_secs(30),
        || {
            let out = cli()
                .args(["exec", "web", "--", "cat", "/proc/2/comm"])
                .output();
            if out.stdout == "sleep\n" {
                Ok(())
            } else {
                Err(format!("{}{}", out.stdout, out.stderr))
            }
        },
    );
    let out = cli()
        .args([
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "cat /proc/2/comm; echo $GREETING; exit 3",
        ])
        .output();
    assert_code(&out, 3);
    assert_eq!(out.stdout, "sleep\nhello\n");
    let out = cli()
        .args([
            "exec",
            "-i",
            "web",
            "--",
            "sh",
            "-c",
            "read x; echo \"got $x\"; cat",
        ])
        .stdin("over stdin\nand more\n")
        .output();
    assert_code(&out, 0);
    assert_eq!(out.stdout, "got over stdin\nand more\n");
    // A command the image does not have: exit code 127, as a shell says.
    let out = cli()
        .args(["exec", "web", "--", "no-such-command"])
        .output();
    assert_code(&out, 127);
    assert!(out.stderr.contains("no-such-command"), "{}", out.stderr);

    // Restart policies, exit codes and restart counts: a pod that completes
    // is not restarted and its VM stops; a failing one is restarted after
    // the back-off (10 s, as Kubernetes). The failing one asks for
    // isolation.
    let jobs = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: once}}
spec:
  restartPolicy: Never
  containers:
  - {{name: main, image: busybox, command: [sh, -c, 'echo done; exit 0'],
      resources: {{limits: {{memory: 128Mi, cpu: 500m}}}}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: crasher
  annotations: {{podvisor.io/isolated: 'true'}}
spec:
  restartPolicy: OnFailure
  containers:
  - {{name: main, image: {image}, command: [sh, -c, 'echo failing; exit 2'],
      resources: {{limits: {{memory: 128Mi, cpu: 500m}}}}}}
",
        image = image.display()
    );
    cli().args(["apply", "-f", "-"]).stdin(jobs).success();
    let done = wait_for(
        "once to complete, crasher to restart",
        Duration::from_secs(120),
        || {
            let pods = pods(cli())?;
            let once = find(&pods, "once").filter(|p| p.status.phase == PodPhase::Succeeded);
            let crasher = find(&pods, "crasher").filter(|p| {
                let status = p.status.container_statuses.first();
                let waiting = status.and_then(|s| s.state.waiting.as_ref());
                p.restart_count() >= 1 && waiting.is_some_and(|w| w.reason == "CrashLoopBackOff")
            });
            match (once, crasher) {
                (Some(o), Some(c)) => Ok((o.clone(), c.clone())),
                _ => Err(summary(&pods)),
            }
        },
    );
    let exit = done.0.status.container_statuses[0]
        .state
        .terminated
        .clone()
        .unwrap();
    assert_eq!((exit.exit_code, exit.reason.as_str()), (0, "Completed"));
    let waiting = done.1.status.container_statuses[0]
        .state
        .waiting
        .clone()
        .unwrap();
    let message = waiting.message.unwrap_or_default();
    assert!(message.contains("exited with code 2"), "{message}");
    assert_eq!(done.1.status.phase, PodPhase::Running);
    // Its VM (kept across the restarts) is never merged.
    let crasher_vm = vm_command_line(&state, &done.1);
    assert!(crasher_vm.contains(",mem-merge=off"), "{crasher_vm}");
    let table = cli().args(["get", "pods"]).success().stdout;
    let row = table.lines().find(|l| l.starts_with("once ")).unwrap();
    assert!(row.contains("Completed"), "{table}");
    let row = table.lines().find(|l| l.starts_with("crasher ")).unwrap();
    assert!(row.contains("CrashLoopBackOff"), "{table}");
    assert_eq!(cli().args(["logs", "once"]).success().stdout, "done\n");
    assert!(
        cli()
            .args(["logs", "crasher"])
            .success()
            .stdout
            .starts_with("failing\nfailing\n")
    );
    cli().args(["delete", "pod", "once", "--wait"]).success();
    cli().args(["delete", "pod", "crasher", "--wait"]).success();

    // Delete: the VM stops, the pod and its files go.
    let vms = state.join("host/run/pods").display().to_string();
    assert_eq!(pids_mentioning(&vms).len(), 1, "one QEMU for the pod");
    cli().args(["delete", "pod", "web", "--wait"]).success();
    let out = cli().args(["get", "pods"]).success();
    assert!(
        out.stdout.contains("No pods") || out.stderr.contains("No pods"),
        "{out:?}"
    );
    assert!(pids_mentioning(&vms).is_empty(), "the VM is gone");
    assert_eq!(
        std::fs::read_dir(state.join("host/netns")).unwrap().count(),
        0,
        "the pod's network namespace is gone"
    );
    assert!(
        std::fs::read_dir(state.join("host/pods"))
            .unwrap()
            .next()
            .is_none(),
        "the pod's records and logs are gone"
    );
    assert_eq!(
        up.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        up.log()
    );
    // Stopped, the daemon has put KSM's settings back.
    assert_eq!(MachineKsm::now(), ksm.before, "{}", up.log());
    assert!(!state.join("host/ksm-before.json").exists());
}

/// A plain HTTP/1.1 GET of `path` from `address` (`IP:PORT`); the whole
/// answer, status line first.
fn raw_get(address: &str, path: &str, authorization: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// `PODVISOR_CONFIG` naming a file (in a directory) that does not exist
/// yet: `up` creates both, and the CLI then finds the server through it.
#[test]
fn up_creates_the_config_file_it_is_told_to_write() {
    let s = Scratch::new();
    let config = s.path().join("new-dir/config.toml");
    let state = s.path().join("state");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = s.daemon_command(&[
        "up",
        "--state-dir",
        &state.display().to_string(),
        "--listen",
        &listen,
        "--name",
        "node-1",
    ]);
    cmd.env("PODVISOR_CONFIG", &config);
    let mut up = Daemon::spawn("up", cmd, &s.path().join("up.log"));
    wait_for("the host to be Ready", Duration::from_secs(60), || {
        assert!(up.is_running(), "up exited; its log:\n{}", up.log());
        let out = s
            .podvisor()
            .env("PODVISOR_CONFIG", &config)
            .args(["get", "hosts"])
            .output();
        if out.code == Some(0) && out.stdout.contains("node-1") && out.stdout.contains(" Ready ") {
            Ok(())
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    });
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(
        written.contains(&format!("url = \"http://{listen}\"")),
        "{written}"
    );
    assert_eq!(
        up.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        up.log()
    );
}
