//! The host runtime with real pod VMs: containers of one pod in one VM,
//! restart policies with back-off, logs, exec, adoption by a new runtime
//! (as after a daemon restart) without a second VM, delete; and a pod whose
//! image does not exist.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podvisor_hostd::host::runtime::processes_mentioning;
use podvisor_hostd::host::{
    Backoff, ContainerPlan, ContainerState, ExecEvent, ExecInput, ExecRequest, HostConfig,
    PodPhase, PodPlan, PodRuntime, PodState, RestartPolicy,
};
use podvisor_podvm::NodeConfig;
use podvisor_testbed::oci::ImageBuilder;

fn config(dir: &Path) -> HostConfig {
    let mut node = NodeConfig::with_defaults(podvisor_vmm::AccelChoice::resolve(None).accel);
    node.cache_dir = dir.join("cache");
    let mut cfg = HostConfig::new(node, dir.join("state"));
    // Short back-off so that restarts show within the test.
    cfg.backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(2),
        reset: Duration::from_secs(600),
    };
    cfg.delete_grace = Duration::from_secs(2);
    cfg
}

fn container(name: &str, image: &Path, script: &str) -> ContainerPlan {
    ContainerPlan {
        command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        env: vec![("GREETING".into(), "hi".into())],
        ..ContainerPlan::of_image(name, &image.display().to_string())
    }
}

fn plan(uid: &str, name: &str, policy: RestartPolicy, containers: Vec<ContainerPlan>) -> PodPlan {
    PodPlan {
        uid: uid.into(),
        namespace: "default".into(),
        name: name.into(),
        containers,
        restart_policy: policy,
        cpus: 1,
        memory_mib: 160,
        port_mappings: vec![],
        dns: Default::default(),
        hibernate_after: None,
        isolated: false,
        volumes: vec![],
        size_runtimes: true,
    }
}

/// Waits until the state of `uid` satisfies `ok`.
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

async fn read_log(rt: &PodRuntime, name: &str, container: &str, tail: Option<usize>) -> String {
    let mut r = rt
        .logs("default", name, Some(container), tail, false)
        .unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = r.next_chunk().await.unwrap() {
        out.extend(chunk);
    }
    String::from_utf8(out).unwrap()
}

fn vm_processes(state_dir: &Path) -> Vec<u32> {
    processes_mentioning(&state_dir.join("run/pods").display().to_string())
}

fn running(s: &PodState, i: usize) -> bool {
    matches!(s.containers[i].state, ContainerState::Running { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_pods_run_restart_log_exec_survive_the_runtime_and_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    // VMs outlive their handles here: never leave one behind a failed test.
    let _vms = VmReaper(dir.path().to_path_buf());
    let image: PathBuf = dir.path().join("busybox.tar");
    ImageBuilder::new()
        .busybox_layer()
        .write_oci_archive(&image)
        .unwrap();
    let cfg = config(dir.path());
    let state_dir = cfg.state_dir.clone();
    let (rt, _feed) = PodRuntime::open(cfg.clone()).unwrap();

    // Two containers in one VM: one serves, one fails and is restarted.
    let web = plan(
        "uid-web",
        "web",
        RestartPolicy::OnFailure,
        vec![
            container(
                "server",
                &image,
                "echo \"$GREETING from $(hostname)\"; exec sleep 1000",
            ),
            container("job", &image, "echo run; exit 3"),
        ],
    );
    // One that completes and is not restarted.
    let once = plan(
        "uid-once",
        "once",
        RestartPolicy::Never,
        vec![container("main", &image, "echo done")],
    );
    assert!(rt.run(web.clone()).unwrap());
    assert!(
        !rt.run(web.clone()).unwrap(),
        "a known pod is not started twice"
    );
    rt.run(once).unwrap();

    let s = wait_for(&rt, "uid-web", "server running, job restarted twice", |s| {
        running(s, 0) && s.containers[1].restart_count >= 2
    })
    .await;
    assert_eq!(s.phase, PodPhase::Running);
    assert_eq!(s.containers[0].restart_count, 0);
    let done = wait_for(&rt, "uid-once", "once succeeded", |s| {
        s.phase == PodPhase::Succeeded
    })
    .await;
    assert!(matches!(
        done.containers[0].state,
        ContainerState::Terminated { exit_code: 0, ref reason, .. } if reason == "Completed"
    ));
    assert_eq!(read_log(&rt, "once", "main", None).await, "done\n");
    assert_eq!(read_log(&rt, "web", "server", None).await, "hi from web\n");
    let job_log = read_log(&rt, "web", "job", None).await;
    assert!(job_log.starts_with("run\nrun\n"), "{job_log:?}");
    assert_eq!(read_log(&rt, "web", "job", Some(1)).await, "run\n");
    assert!(
        rt.logs("default", "web", None, None, false).is_err(),
        "two containers: the container must be named"
    );
    // The completed pod's VM is off: only the web pod's QEMU runs.
    let qemus = vm_processes(&state_dir);
    assert_eq!(qemus.len(), 1, "{qemus:?}");

    // Exec into the server container.
    let mut session = rt
        .exec(
            "default",
            "web",
            ExecRequest {
                container: Some("server".into()),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "cat /proc/2/comm; read x; echo got $x; exit 4".into(),
                ],
                tty: false,
                stdin: true,
                size: None,
            },
        )
        .await
        .unwrap();
    session
        .input
        .send(ExecInput::Stdin(b"abc\n".to_vec()))
        .await
        .unwrap();
    let mut output = Vec::new();
    let code = loop {
        match session.events.recv().await.unwrap() {
            ExecEvent::Output(_, d) => output.extend(d),
            ExecEvent::Exited(code) => break code,
            ExecEvent::Failed { message, .. } => panic!("exec failed: {message}"),
        }
    };
    assert_eq!(String::from_utf8_lossy(&output), "sleep\ngot abc\n");
    assert_eq!(code, 4);
    let refused = rt
        .exec(
            "default",
            "once",
            ExecRequest {
                container: None,
                command: vec!["true".into()],
                tty: false,
                stdin: false,
                size: None,
            },
        )
        .await;
    assert!(refused.is_err());

    // A new runtime on the same state directory adopts the running VM: no
    // second QEMU, the server container still runs, counts are kept.
    let restarts_before =
        wait_for(&rt, "uid-web", "state", |_| true).await.containers[1].restart_count;
    rt.detach_all().await;
    drop(rt);
    assert_eq!(
        vm_processes(&state_dir),
        qemus,
        "the VM outlives the runtime"
    );
    let (rt, _feed) = PodRuntime::open(cfg.clone()).unwrap();
    let s = wait_for(&rt, "uid-web", "adopted, job restarted again", |s| {
        running(s, 0) && s.containers[1].restart_count > restarts_before
    })
    .await;
    assert_eq!(s.containers[0].restart_count, 0);
    assert_eq!(
        vm_processes(&state_dir),
        qemus,
        "adopted, not started again"
    );
    assert_eq!(read_log(&rt, "web", "server", None).await, "hi from web\n");

    // The pods hold their layers in the catalog (across the runtime's
    // restart): with the image itself removed, GC keeps the layer for them.
    let cache = podvisor_image::LayerCache::open(&cfg.node.cache_dir).unwrap();
    let catalog = podvisor_image::Catalog::open(&cfg.node.catalog_url())
        .await
        .unwrap();
    let manifest = catalog.manifests().await.unwrap().remove(0).digest;
    let removed = podvisor_image::gc::remove_image(&cache, &catalog, &manifest.to_string())
        .await
        .unwrap();
    assert!(removed.removed.is_empty(), "{removed:?}");
    let holders = format!("{:?}", removed.in_use);
    assert!(holders.contains("pod default/web (uid-web)"), "{holders}");
    assert_eq!(cache.list().unwrap().len(), 1);

    // Delete: the VM stops and every file of the pod goes.
    assert!(rt.delete("uid-web", None).await);
    assert!(vm_processes(&state_dir).is_empty());
    assert!(!state_dir.join("pods/uid-web").exists());
    assert!(rt.delete("uid-once", None).await);
    assert!(
        std::fs::read_dir(state_dir.join("pods"))
            .unwrap()
            .next()
            .is_none()
    );
    // Deleted, the pods let go of their layers: GC removes them now.
    let gc = podvisor_image::gc::gc(&cache, &catalog).await.unwrap();
    assert_eq!(gc.removed.len(), 1, "{gc:?}");
    assert!(cache.list().unwrap().is_empty());
    catalog.close().await;
    assert!(
        std::fs::read_dir(state_dir.join("run/pods"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[tokio::test]
async fn a_missing_image_is_reported_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    // VMs outlive their handles here: never leave one behind a failed test.
    let _vms = VmReaper(dir.path().to_path_buf());
    let (rt, _feed) = PodRuntime::open(config(dir.path())).unwrap();
    let missing = dir.path().join("no-such-image.tar");
    rt.run(plan(
        "uid-bad",
        "bad",
        RestartPolicy::Always,
        vec![container("main", &missing, "true")],
    ))
    .unwrap();
    let s = wait_for(&rt, "uid-bad", "ErrImagePull", |s| {
        matches!(&s.containers[0].state, ContainerState::Waiting { reason, .. } if reason == "ErrImagePull")
    })
    .await;
    assert_eq!(s.phase, PodPhase::Pending);
    let ContainerState::Waiting {
        message: Some(m), ..
    } = &s.containers[0].state
    else {
        unreachable!()
    };
    assert!(m.contains("no-such-image.tar"), "{m}");
    assert!(rt.delete("uid-bad", None).await);
}

/// Kills, when dropped, every process whose command line names the test's
/// directory (the test's VMs, which outlive their handles by design).
struct VmReaper(std::path::PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}

fn mode_and_owner(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.mode() & 0o777, meta.uid())
}

/// A pod's files are the daemon's only; an exec whose client reads
/// nothing while its process writes without end does not hold up the
/// pod's log or its deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_pod_files_are_private_and_a_silent_exec_client_does_not_hold_up_delete() {
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    let image: PathBuf = dir.path().join("busybox.tar");
    ImageBuilder::new()
        .busybox_layer()
        .write_oci_archive(&image)
        .unwrap();
    let cfg = config(dir.path());
    let state_dir = cfg.state_dir.clone();
    let (rt, _feed) = PodRuntime::open(cfg.clone()).unwrap();
    rt.run(plan(
        "uid-quiet",
        "quiet",
        RestartPolicy::Always,
        vec![container(
            "app",
            &image,
            "echo started; while true; do echo tick; sleep 1; done",
        )],
    ))
    .unwrap();
    wait_for(&rt, "uid-quiet", "running", |s| running(s, 0)).await;

    // SAFETY: geteuid has no preconditions and touches no memory.
    let me = unsafe { libc::geteuid() };
    let pod = state_dir.join("pods/uid-quiet");
    for d in [state_dir.join("pods"), pod.clone(), pod.join("logs")] {
        assert_eq!(mode_and_owner(&d), (0o700, me), "{}", d.display());
    }
    for f in [pod.join("pod.json"), pod.join("logs/app.log")] {
        assert_eq!(mode_and_owner(&f), (0o600, me), "{}", f.display());
    }
    let vm_dirs: Vec<PathBuf> = std::fs::read_dir(state_dir.join("run/pods"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(vm_dirs.len(), 1, "{vm_dirs:?}");
    assert_eq!(mode_and_owner(&vm_dirs[0]).0, 0o700);

    // `cat /dev/zero` writes without end; its client never reads.
    let session = rt
        .exec(
            "default",
            "quiet",
            ExecRequest {
                container: None,
                command: vec!["cat".into(), "/dev/zero".into()],
                tty: false,
                stdin: false,
                size: None,
            },
        )
        .await
        .unwrap();
    // Once far more than the backlog was written, the log still moves.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = read_log(&rt, "quiet", "app", None)
        .await
        .matches("tick")
        .count();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = read_log(&rt, "quiet", "app", None)
            .await
            .matches("tick")
            .count();
        if now > before + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the container's log stopped at {now} ticks"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Delete (grace 2 s) finishes while the client still reads nothing.
    let started = Instant::now();
    let deleted = tokio::time::timeout(Duration::from_secs(60), rt.delete("uid-quiet", None))
        .await
        .expect("delete finishes while the exec client reads nothing");
    assert!(deleted);
    eprintln!("delete took {:?}", started.elapsed());
    assert!(vm_processes(&state_dir).is_empty());
    assert!(!pod.exists());
    // Reading at last, the client gets what was queued, then why its
    // session was dropped.
    let mut session = session;
    let mut queued = 0;
    let last = loop {
        match tokio::time::timeout(Duration::from_secs(10), session.events.recv())
            .await
            .expect("the session ended")
        {
            Some(ExecEvent::Output(_, d)) => queued += d.len(),
            other => break other,
        }
    };
    eprintln!("{queued} bytes were queued for the silent client");
    match last {
        Some(ExecEvent::Failed { message, .. }) => {
            assert!(message.contains("did not read its output"), "{message}")
        }
        other => panic!("expected the session to be dropped, got {other:?}"),
    }
}
