//! Issue 10 end to end: `podvisor up` on an emulated host (its own network
//! namespace and pod subnet), real pod VMs, the server keeping the
//! snapshots' keys. An HTTP server pod with a hostPort whose page is a
//! counter a shell keeps in its memory: `podvisor hibernate` stops its
//! QEMU, `get pods` says Hibernated, and one request through the hostPort
//! wakes it and is answered at the first try, with the count carried on
//! (not started again). A second pod with `hibernate-after: 3s` sleeps by
//! itself, is woken by an exec, and from it a request to the first pod's
//! IP wakes that one. `podvisor up` is killed (SIGKILL) and started again
//! while the pod sleeps, and the pod still wakes. A snapshot with one
//! flipped byte is refused: the pod starts again from scratch and says
//! why. Deleting a hibernated pod leaves no snapshot behind.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use podvisor_api::Pod;
use podvisor_testbed::cli::PodvisorCommand;
use podvisor_testbed::daemon::{Daemon, pids_mentioning};
use podvisor_testbed::fabric::{EmulatedHost, HostFabric};

use crate::fixture::*;

const LISTEN: &str = "127.0.0.1:7443";
const HOST_PORT: u16 = 18480;

/// `podvisor up` on `host`, its state in `state`.
fn up(s: &Scratch, host: &EmulatedHost, state: &Path, log: &str) -> Daemon {
    let mut cmd = host.command(BIN);
    cmd.env("PODVISOR_CACHE_DIR", s.dir.cache_dir())
        .args(["--log", "info", "up", "--state-dir"])
        .arg(state)
        .args(["--listen", LISTEN, "--name", "node-1", "--cpu", "2"])
        .args(["--memory", "2Gi", "--cni-conf-dir"])
        .arg(host.cni_conf_dir())
        .current_dir(s.path())
        .env("PODVISOR_CONFIG", s.config())
        .env_remove("PODVISOR_POD_NETWORK")
        .env_remove("PODVISOR_LOG");
    Daemon::spawn("up", cmd, &s.path().join(log))
}

/// The body of `GET /` from `addr` on `host`, one connection, or what
/// went wrong.
fn http_get(host: &EmulatedHost, addr: String) -> Result<String, String> {
    host.run(move || {
        let mut s =
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(30))
                .map_err(|e| format!("connect to {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .map_err(|e| format!("read: {e}"))?;
        match out.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
                Ok(body.to_string())
            }
            _ => Err(format!("not a 200 answer: {out:?}")),
        }
    })
}

/// The count in a page `count N`.
fn count(body: &str) -> u64 {
    body.trim()
        .strip_prefix("count ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a count: {body:?}"))
}

fn pod(cli: &dyn Fn() -> PodvisorCommand, name: &str) -> Pod {
    let pods = pods(cli()).unwrap();
    find(&pods, name)
        .unwrap_or_else(|| panic!("no pod {name}: {}", summary(&pods)))
        .clone()
}

/// Pod `name` once `ok` holds for it (the host reports its state to the
/// server a moment after the command that changed it has returned).
fn pod_when(
    cli: &dyn Fn() -> PodvisorCommand,
    name: &str,
    what: &str,
    ok: impl Fn(&Pod) -> bool,
) -> Pod {
    wait_for(what, Duration::from_secs(30), || {
        let p = pod(cli, name);
        if ok(&p) {
            Ok(p)
        } else {
            Err(format!("{:?}", p.status))
        }
    })
}

fn status_column(cli: &dyn Fn() -> PodvisorCommand, name: &str) -> String {
    let table = cli().args(["get", "pods"]).success().stdout;
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no row for {name}: {table}"));
    row.split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string()
}

/// The sealed snapshot files under `dir`.
fn sealed_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir, &|p| p.extension().is_some_and(|x| x == "sealed"))
}

#[test]
fn vm_a_hibernated_pod_wakes_on_its_first_request() {
    let fabric = HostFabric::new(1);
    let host = fabric.host(0);
    let s = Scratch::new();
    let image = s.busybox();
    let state = s.path().join("state");
    let mut daemon = up(&s, host, &state, "up.log");
    let cli = || {
        PodvisorCommand::bare("ip")
            .args(["netns", "exec", &host.netns, BIN])
            .env("PODVISOR_CONFIG", s.config())
            .env("PODVISOR_CACHE_DIR", s.dir.cache_dir())
            .timeout(Duration::from_secs(180))
    };
    wait_for("the host to be Ready", Duration::from_secs(60), || {
        let out = cli().args(["get", "hosts"]).output();
        if out.code == Some(0) && out.stdout.contains(" Ready ") {
            Ok(())
        } else {
            Err(format!("{}{}\n{}", out.stdout, out.stderr, daemon.log()))
        }
    });
    cli().args(["image", "import"]).arg(&image).success();
    // `web`: httpd serving a count that a shell keeps in its memory and
    // writes out each second. `client`: hibernates after 3 s idle.
    let pods_yaml = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  containers:
  - name: main
    image: busybox
    command: [sh, -c, 'mkdir -p /www; httpd -f -p 80 -h /www & n=0; while true; do n=$((n+1)); echo \"count $n\" > /www/.c; mv /www/.c /www/index.html; sleep 1; done']
    ports: [{{containerPort: 80, hostPort: {HOST_PORT}}}]
    resources: {{limits: {{cpu: 500m, memory: 192Mi}}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  annotations: {{podvisor.io/hibernate-after: 3s}}
spec:
  containers:
  - name: main
    image: busybox
    command: [sh, -c, 'echo ready; exec sleep 3600']
    resources: {{limits: {{cpu: 500m, memory: 128Mi}}}}
"
    );
    let out = cli().args(["apply", "-f", "-"]).stdin(pods_yaml).output();
    assert_code(&out, 0);
    let names = vec!["web".to_string(), "client".to_string()];
    wait_for("the pods to run", POD_TIMEOUT, || {
        let pods = pods(cli())?;
        if all_running(&pods, &names) {
            Ok(())
        } else {
            Err(summary(&pods))
        }
    });
    let vms = state.join("host/run/pods").display().to_string();
    let by_port = format!("127.0.0.1:{HOST_PORT}");
    let before = wait_for(
        "web to count to 5",
        Duration::from_secs(60),
        || match http_get(host, by_port.clone()) {
            Ok(body) if count(&body) >= 5 => Ok(count(&body)),
            other => Err(format!("{other:?}")),
        },
    );

    // The client sleeps by itself (nothing uses it), its QEMU gone.
    wait_for(
        "client to hibernate by itself",
        Duration::from_secs(60),
        || {
            let status = status_column(&cli, "client");
            if status == "Hibernated" {
                Ok(())
            } else {
                Err(status)
            }
        },
    );
    let client = pod(&cli, "client");
    let condition = client
        .status
        .condition("Hibernated")
        .expect("a Hibernated condition");
    assert_eq!(condition.status, "True");
    assert_eq!(condition.reason.as_deref(), Some("Idle"));

    // Hibernate web: its QEMU exits, the pod says so.
    let out = cli().args(["hibernate", "web"]).output();
    assert_code(&out, 0);
    assert!(out.stdout.contains("hibernated"), "{}", out.stdout);
    assert!(
        pids_mentioning(&vms).is_empty(),
        "no QEMU runs: both pods sleep"
    );
    let web = pod_when(&cli, "web", "web to be reported hibernated", |p| {
        p.status.is_hibernated()
    });
    assert_eq!(status_column(&cli, "web"), "Hibernated");
    let described = cli().args(["describe", "pod", "web"]).success().stdout;
    assert!(described.contains("Hibernated"), "{described}");
    assert!(described.contains("snapshot"), "{described}");
    let web_ip = web.status.pod_ip.clone().expect("web keeps its IP");
    // The snapshot is the host's alone.
    let sealed = sealed_files(&state.join("host/pods"));
    assert_eq!(sealed.len(), 2, "{sealed:?}");
    for f in &sealed {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
        let dir_mode = std::fs::metadata(f.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    // One request through the hostPort wakes web and is answered, with
    // the count its shell kept in memory carried on.
    let body = http_get(host, by_port.clone()).expect("the first request is answered");
    let after = count(&body);
    assert!(
        after >= before,
        "count {after} after waking, {before} before: the state was lost"
    );
    let web = pod_when(&cli, "web", "web to be reported awake", |p| {
        !p.status.is_hibernated()
    });
    assert_eq!(web.restart_count(), 0, "nothing started again");
    assert_eq!(
        web.status
            .condition("Hibernated")
            .and_then(|c| c.reason.clone())
            .as_deref(),
        Some("Woken")
    );
    assert_eq!(
        web.status.pod_ip.as_deref(),
        Some(web_ip.as_str()),
        "same IP"
    );

    // An exec wakes the client; from it, a request to web's pod IP wakes
    // web again.
    cli().args(["hibernate", "web"]).success();
    let out = cli()
        .args(["exec", "client", "--", "sh", "-c"])
        .arg(format!("wget -q -O - http://{web_ip}/"))
        .output();
    assert_code(&out, 0);
    assert!(count(&out.stdout) >= after, "{}", out.stdout);

    // The daemon (here: `podvisor up`, server and host in one) is killed
    // and started again while web sleeps; web still wakes. First the
    // client goes back to sleep: the end of its connection to web (a FIN
    // sent again, say) is traffic for web and would wake it.
    wait_for("client to hibernate again", Duration::from_secs(60), || {
        let status = status_column(&cli, "client");
        if status == "Hibernated" {
            Ok(())
        } else {
            Err(status)
        }
    });
    cli().args(["hibernate", "web"]).success();
    pod_when(&cli, "web", "web to be reported hibernated", |p| {
        p.status.is_hibernated()
    });
    daemon.kill9();
    let mut daemon = up(&s, host, &state, "up-again.log");
    wait_for(
        "the host to be Ready again",
        Duration::from_secs(60),
        || {
            let out = cli().args(["get", "hosts"]).output();
            if out.code == Some(0) && out.stdout.contains(" Ready ") {
                Ok(())
            } else {
                Err(format!("{}{}\n{}", out.stdout, out.stderr, daemon.log()))
            }
        },
    );
    let web = pod(&cli, "web");
    assert!(
        web.status.is_hibernated(),
        "web still sleeps after the restart: {:?}\n{}",
        web.status.conditions,
        daemon.log()
    );
    let body = wait_for(
        "web to answer after the restart",
        Duration::from_secs(60),
        || http_get(host, by_port.clone()),
    );
    assert!(count(&body) >= after, "{body}");

    // One flipped byte: the snapshot is refused, web starts again from
    // scratch and says why.
    cli().args(["hibernate", "web"]).success();
    let sealed = sealed_files(&state.join("host/pods"));
    let web_uid = pod(&cli, "web").metadata.uid.unwrap();
    let file = sealed
        .iter()
        .find(|f| f.display().to_string().contains(&web_uid))
        .expect("web's snapshot");
    let mut bytes = std::fs::read(file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(file, &bytes).unwrap();
    let out = cli().args(["wake", "web"]).output();
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("from scratch"), "{}", out.stderr);
    let web = wait_for("web to start again", POD_TIMEOUT, || {
        let web = pod(&cli, "web");
        if web.restart_count() == 1 && all_running(std::slice::from_ref(&web), &["web".into()]) {
            Ok(web)
        } else {
            Err(summary(std::slice::from_ref(&web)))
        }
    });
    let condition = web.status.condition("Hibernated").unwrap();
    assert_eq!(condition.reason.as_deref(), Some("WakeFailed"));
    let message = condition.message.clone().unwrap_or_default();
    assert!(message.contains("refused"), "{message}");
    let described = cli().args(["describe", "pod", "web"]).success().stdout;
    assert!(described.contains("WakeFailed"), "{described}");
    let body = wait_for("web to serve again", Duration::from_secs(60), || {
        http_get(host, by_port.clone())
    });
    assert!(count(&body) < before + 60, "{body}");

    // Deleting hibernated pods leaves no snapshot, no VM, no record.
    cli().args(["hibernate", "web"]).success();
    cli().args(["delete", "pod", "web", "--wait"]).success();
    cli().args(["delete", "pod", "client", "--wait"]).success();
    assert!(sealed_files(&state.join("host")).is_empty());
    assert!(pids_mentioning(&vms).is_empty());
    assert!(
        std::fs::read_dir(state.join("host/pods"))
            .unwrap()
            .next()
            .is_none(),
        "the pods' records are gone"
    );
    assert_eq!(
        daemon.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        daemon.log()
    );
}
