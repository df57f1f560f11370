//! Issue 11 end to end: `podvisor up` on an emulated host, real pod VMs.
//! An encrypted persistent volume is formatted in the guest at its first
//! use and written by a pod (with an `emptyDir` on disk that survives a
//! container restart, a memory `emptyDir`, a `subPath` and a read-only
//! mount of the same volume); a second pod asking for the volume waits
//! Pending while the first holds it, and a pod of another namespace cannot
//! name it; the writer is hibernated (the guest wipes the key) and woken
//! (it asks again) and reads its data; once the writer is gone the second
//! pod reads what it wrote; the canary is in no file on the host (volume,
//! state, logs, store); revoking the volume stops the container that
//! mounts it, which then waits with `KeyDenied`, and the audit log shows
//! every release and refusal.

use std::path::Path;
use std::time::Duration;

use podvisor_api::Pod;
use podvisor_testbed::cli::PodvisorCommand;
use podvisor_testbed::daemon::Daemon;
use podvisor_testbed::fabric::{EmulatedHost, HostFabric};

use crate::fixture::*;

const LISTEN: &str = "127.0.0.1:7444";
/// What the writer writes; its spec (stored by the server and the host)
/// holds only the shell arithmetic that makes it.
const CANARY: &str = "pv-canary-123456789";
const CANARY_IN_SPEC: &str = "pv-canary-$((123456*1000+789))";

fn up(s: &Scratch, host: &EmulatedHost, state: &Path) -> Daemon {
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
    Daemon::spawn("up", cmd, &s.path().join("up.log"))
}

/// The writer: counts its runs in the `emptyDir`; its first run writes the
/// canary to the encrypted volume and a file through the `subPath`, then
/// fails so that it is restarted; the second run stays up.
const WRITER: &str = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: secret
  annotations:
    podvisor.io/encrypted: "true"
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 64Mi
---
apiVersion: v1
kind: Pod
metadata:
  name: writer
spec:
  volumes:
  - name: secret
    persistentVolumeClaim:
      claimName: secret
  - name: scratch
    emptyDir: {}
  - name: mem
    emptyDir:
      medium: Memory
      sizeLimit: 8Mi
  containers:
  - name: main
    image: busybox
    resources:
      limits: {cpu: 500m, memory: 192Mi}
    volumeMounts:
    - {name: secret, mountPath: /data}
    - {name: secret, mountPath: /sub, subPath: inner/dir}
    - {name: secret, mountPath: /ro, readOnly: true}
    - {name: scratch, mountPath: /scratch}
    - {name: mem, mountPath: /mem}
    command:
    - sh
    - -c
    - |
      n=$(cat /scratch/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /scratch/n
      echo run $n
      if [ $n -lt 2 ]; then
        echo CANARY > /data/canary; echo from-sub > /sub/f; sync; exit 1
      fi
      exec sleep 3600
"#;

fn reader(name: &str, namespace: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
spec:
  volumes:
  - name: secret
    persistentVolumeClaim:
      claimName: secret
  containers:
  - name: main
    image: busybox
    resources:
      limits: {{cpu: 500m, memory: 160Mi}}
    volumeMounts:
    - {{name: secret, mountPath: /data}}
    command: [sleep, "3600"]
"#
    )
}

fn pod_in(cli: &dyn Fn() -> PodvisorCommand, ns: &str, name: &str) -> Option<Pod> {
    pods(cli())
        .unwrap()
        .into_iter()
        .find(|p| p.metadata.name == name && p.metadata.namespace() == ns)
}

fn pod_when(
    cli: &dyn Fn() -> PodvisorCommand,
    ns: &str,
    name: &str,
    what: &str,
    ok: impl Fn(&Pod) -> bool,
) -> Pod {
    wait_for(what, POD_TIMEOUT, || match pod_in(cli, ns, name) {
        Some(p) if ok(&p) => Ok(p),
        Some(p) => Err(format!("{:?}", p.status)),
        None => Err(format!("no pod {ns}/{name}")),
    })
}

fn running(p: &Pod) -> bool {
    p.status
        .container_statuses
        .first()
        .is_some_and(|c| c.state.running.is_some())
}

fn exec(cli: &dyn Fn() -> PodvisorCommand, pod: &str, script: &str) -> (i32, String) {
    let out = cli().args(["exec", pod, "--", "sh", "-c", script]).output();
    (
        out.code.unwrap_or(-1),
        format!("{}{}", out.stdout, out.stderr),
    )
}

/// Files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    files_under(dir, &|_| true)
        .into_iter()
        .filter(|p| {
            std::fs::read(p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .map(|p| p.display().to_string())
        .collect()
}

#[test]
fn vm_an_encrypted_volume_opens_only_for_the_pod_entitled_to_it() {
    let fabric = HostFabric::new(1);
    let host = fabric.host(0);
    let s = Scratch::new();
    let image = s.busybox();
    let state = s.path().join("state");
    let daemon = up(&s, host, &state);
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
    let writer = WRITER.replace("CANARY", CANARY_IN_SPEC);
    let out = cli().args(["apply", "-f", "-"]).stdin(writer).output();
    assert_code(&out, 0);
    // A second pod asking for the volume waits while the writer holds it.
    let out = cli()
        .args(["apply", "-f", "-"])
        .stdin(reader("second", "default"))
        .output();
    assert_code(&out, 0);
    // A pod of another namespace cannot name it.
    cli()
        .args([
            "volume", "create", "-n", "other", "theirs", "--size", "16Mi",
        ])
        .success();
    let out = cli()
        .args(["apply", "-f", "-"])
        .stdin(reader("intruder", "other"))
        .output();
    assert_code(&out, 0);

    // The writer's second run (after the restart its first run asked for)
    // sees the emptyDir's count.
    pod_when(&cli, "default", "writer", "the writer's second run", |p| {
        running(p) && p.status.container_statuses[0].restart_count >= 1
    });
    let logs = cli().args(["logs", "writer"]).success().stdout;
    assert!(logs.contains("run 1") && logs.contains("run 2"), "{logs}");
    let (code, out) = exec(&cli, "writer", "cat /data/canary; cat /data/inner/dir/f");
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{CANARY}\nfrom-sub\n").as_str())
    );
    let (code, out) = exec(&cli, "writer", "touch /ro/x");
    assert_ne!(code, 0, "a read-only mount took a write: {out}");
    let (code, out) = exec(
        &cli,
        "writer",
        "grep ' /mem ' /proc/mounts; grep ' /data ' /proc/mounts",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("tmpfs"), "{out}");
    assert!(out.contains("/dev/mapper/") || out.contains("dm-"), "{out}");

    let second = pod_in(&cli, "default", "second").unwrap();
    assert_eq!(second.status.phase, podvisor_api::PodPhase::Pending);
    let why = second.status.message.clone().unwrap_or_default();
    assert!(
        why.contains("in use by pod default/writer"),
        "{:?}",
        second.status
    );
    let intruder = pod_in(&cli, "other", "intruder").unwrap();
    let why = intruder.status.message.clone().unwrap_or_default();
    assert!(
        why.contains("\"secret\" not found"),
        "{:?}",
        intruder.status
    );

    // Hibernation: the key leaves the guest before the save and is asked
    // for again on the wake.
    let out = cli().args(["hibernate", "writer"]).output();
    assert_code(&out, 0);
    let out = cli().args(["wake", "writer"]).output();
    assert_code(&out, 0);
    // A write that reaches the disk (sync) proves the mapping was given
    // its key back and resumed: a suspended one would hold it forever.
    let (code, out) = exec(
        &cli,
        "writer",
        "echo after-wake > /data/w && sync && cat /data/canary /data/w",
    );
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{CANARY}\nafter-wake\n").as_str())
    );

    // Once the writer is gone, the second pod gets the volume and reads
    // what the writer wrote (opened, not formatted again).
    cli().args(["delete", "pod", "writer"]).success();
    pod_when(&cli, "default", "second", "the second pod to run", running);
    let (code, out) = exec(&cli, "second", "cat /data/canary");
    assert_eq!((code, out.trim()), (0, CANARY), "{}", daemon.log());

    // Nothing on the host holds the plaintext: not the volume's file, the
    // host's state and snapshots, the logs or the server's store (all
    // under the test's directory).
    let found = files_containing(s.path(), CANARY.as_bytes());
    assert!(found.is_empty(), "the canary is in {found:?}");
    assert!(
        !files_under(&state, &|p| p.extension().is_some_and(|x| x == "img")).is_empty(),
        "no volume file under {}",
        state.display()
    );

    // Revoked: the container using it stops and waits with KeyDenied.
    let out = cli().args(["volume", "revoke", "secret"]).output();
    assert_code(&out, 0);
    pod_when(
        &cli,
        "default",
        "second",
        "KeyDenied after the revoke",
        |p| {
            p.status
                .container_statuses
                .first()
                .and_then(|c| c.state.waiting.as_ref())
                .is_some_and(|w| w.reason == "KeyDenied")
        },
    );
    let audit = cli().args(["volume", "audit", "secret"]).success().stdout;
    for action in ["release", "revoke"] {
        assert!(
            audit.contains(action),
            "no {action} in the audit log:\n{audit}"
        );
    }
    let ls = cli().args(["volume", "ls"]).success().stdout;
    assert!(ls.contains("secret") && ls.contains("Revoked"), "{ls}");
}

/// Two host daemons whose volume directory is one shared directory
/// (`--volume-storage shared1`): an encrypted volume written by a pod on
/// h1 is read by a pod on h2 once the first is gone (its key released to
/// the new host's pod, the data opened there, not formatted again).
#[test]
fn vm_a_volume_on_shared_storage_follows_its_pod_to_another_host() {
    let s = Scratch::new();
    let image = s.busybox();
    let state = s.path().join("server").display().to_string();
    let admin = s
        .podvisor()
        .args(["server", "init", "--state-dir", &state])
        .success()
        .stdout
        .trim()
        .to_string();
    let port = podvisor_testbed::daemon::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let _server = s.spawn(
        "server",
        &["server", "--listen", &listen, "--state-dir", &state],
    );
    let shared = s.path().join("shared").display().to_string();
    let mut hosts = Vec::new();
    for h in ["h1", "h2"] {
        let token = s
            .podvisor()
            .args([
                "server",
                "token",
                "create",
                "--host",
                h,
                "--state-dir",
                &state,
            ])
            .success()
            .stdout
            .trim()
            .to_string();
        let dir = s.path().join(h).display().to_string();
        hosts.push(s.spawn(
            h,
            &[
                "host",
                "--server",
                &url,
                "--token",
                &token,
                "--name",
                h,
                "--state-dir",
                &dir,
                "--cpu",
                "2",
                "--memory",
                "2Gi",
                "--grace",
                "5",
                "--volume-dir",
                &shared,
                "--volume-storage",
                "shared1",
            ],
        ));
    }
    let cli = || {
        s.podvisor()
            .env("PODVISOR_SERVER", &url)
            .env("PODVISOR_TOKEN", &admin)
            .timeout(Duration::from_secs(180))
    };
    wait_for("both hosts Ready", Duration::from_secs(60), || {
        let out = cli().args(["get", "hosts"]).output();
        match out.stdout.matches(" Ready ").count() {
            2 => Ok(()),
            _ => Err(format!("{}{}", out.stdout, out.stderr)),
        }
    });
    cli().args(["image", "import"]).arg(&image).success();
    cli()
        .args(["volume", "create", "data", "--size", "32Mi", "--encrypted"])
        .success();
    let pod = |name: &str, host: &str, script: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {host}
  restartPolicy: Never
  volumes:
  - name: data
    persistentVolumeClaim: {{claimName: data}}
  containers:
  - name: main
    image: busybox
    resources: {{limits: {{cpu: 500m, memory: 160Mi}}}}
    volumeMounts:
    - {{name: data, mountPath: /data}}
    command: [sh, -c, "{script}"]
"#
        )
    };
    let succeeded = |name: &str| {
        let name = name.to_string();
        let cli = &cli;
        move || {
            let pods = pods(cli())?;
            let p = find(&pods, &name).ok_or_else(|| format!("no pod {name}"))?;
            match p.status.phase {
                podvisor_api::PodPhase::Succeeded => Ok(()),
                _ => Err(format!("{:?}", p.status)),
            }
        }
    };
    let out = cli()
        .args(["apply", "-f", "-"])
        .stdin(pod("w", "h1", "echo moved-$((6*7)) > /data/f && sync"))
        .output();
    assert_code(&out, 0);
    wait_for("the writer on h1 to finish", POD_TIMEOUT, succeeded("w"));
    let ls = cli().args(["volume", "ls"]).success().stdout;
    assert!(ls.contains("data"), "{ls}");
    cli().args(["delete", "pod", "w"]).success();
    let out = cli()
        .args(["apply", "-f", "-"])
        .stdin(pod("r", "h2", "cat /data/f"))
        .output();
    assert_code(&out, 0);
    wait_for("the reader on h2 to finish", POD_TIMEOUT, succeeded("r"));
    let logs = cli().args(["logs", "r"]).success().stdout;
    assert_eq!(logs, "moved-42\n");
    let audit = cli().args(["volume", "audit", "data"]).success().stdout;
    let released_to: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("release"))
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert_eq!(released_to, vec!["h1", "h2"], "{audit}");
    // One file on the shared storage, ciphertext only.
    let files = files_under(&s.path().join("shared"), &|p| {
        p.extension().is_some_and(|x| x == "img")
    });
    assert_eq!(files.len(), 1, "{files:?}");
    let bytes = std::fs::read(&files[0]).unwrap();
    assert!(!bytes.windows(8).any(|w| w == b"moved-42"));
}
