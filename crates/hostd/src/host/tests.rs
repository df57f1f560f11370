//! The pod task and the runtime against fake sandboxes: restarts and
//! their back-off, a VM that dies, delete, adoption.

use std::sync::Arc;
use std::time::{Duration, Instant};

use podvisor_proto::{ExitStatus, GuestMessage, ProcessInfo};
use tokio::sync::mpsc;

use super::fake_sandbox::{Ending, FakeLauncher, FakeVm, next_vm};
use super::{
    Backoff, ContainerPlan, ContainerState, HostConfig, PodPhase, PodPlan, PodRuntime, PodState,
    RestartPolicy,
};

pub(super) fn config(dir: &std::path::Path, base: Duration) -> HostConfig {
    let node = podvisor_podvm::NodeConfig::with_defaults(podvisor_vmm::Accel::Tcg);
    let mut cfg = HostConfig::new(node, dir.to_path_buf());
    cfg.backoff = Backoff {
        base,
        max: base * 2,
        reset: Duration::from_secs(600),
    };
    cfg
}

pub(super) fn plan(uid: &str, containers: &[&str], restart_policy: RestartPolicy) -> PodPlan {
    PodPlan {
        uid: uid.into(),
        namespace: "default".into(),
        name: format!("pod-{uid}"),
        containers: containers
            .iter()
            .map(|name| ContainerPlan {
                command: Some(vec!["sleep".into(), "1000".into()]),
                ..ContainerPlan::of_image(name, "busybox")
            })
            .collect(),
        restart_policy,
        cpus: 1,
        memory_mib: 128,
        port_mappings: vec![],
        dns: Default::default(),
        hibernate_after: None,
        isolated: false,
        volumes: vec![],
        size_runtimes: true,
    }
}

/// The state of pod `uid` once `ok` holds for it (within 5 s).
pub(super) async fn state_when(
    rt: &PodRuntime,
    uid: &str,
    ok: impl Fn(&PodState) -> bool,
) -> PodState {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = rt
            .pods()
            .into_iter()
            .find(|(p, _)| p.uid == uid)
            .map(|(_, s)| s);
        match state {
            Some(s) if ok(&s) => return s,
            s if Instant::now() > deadline => panic!("pod {uid} never got there: {s:#?}"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

pub(super) fn running(s: &PodState, i: usize) -> bool {
    matches!(s.containers[i].state, ContainerState::Running { .. })
}

pub(super) fn started(vm: &FakeVm, id: &str) {
    vm.say(GuestMessage::Started {
        id: id.into(),
        pid: 1,
    });
}

fn exited(vm: &FakeVm, id: &str, code: i32) {
    vm.say(GuestMessage::Exited {
        id: id.into(),
        status: ExitStatus::Code(code),
    });
}

/// A runtime on `dir` with fake sandboxes.
fn runtime(
    dir: &std::path::Path,
    launcher: FakeLauncher,
    base: Duration,
) -> (PodRuntime, Arc<FakeLauncher>) {
    let launcher = Arc::new(launcher);
    let (rt, _changes) = PodRuntime::open_with(config(dir, base), launcher.clone()).unwrap();
    (rt, launcher)
}

#[tokio::test]
async fn a_container_that_exits_is_restarted_per_policy_with_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, mut vms) = FakeLauncher::new();
    let base = Duration::from_millis(300);
    let (rt, _launcher) = runtime(dir.path(), fake, base);
    assert!(rt.run(plan("u1", &["app"], RestartPolicy::Always)).unwrap());
    let mut vm = next_vm(&mut vms).await;
    assert_eq!(vm.next_start().await, "app");
    started(&vm, "app");
    let s = state_when(&rt, "u1", |s| running(s, 0)).await;
    assert_eq!(s.phase, PodPhase::Running);

    // Each exit restarts it in the same VM, after the back-off: base,
    // then twice that.
    for (round, delay) in [base, base * 2].into_iter().enumerate() {
        let ended_at = Instant::now();
        exited(&vm, "app", 1);
        let s = state_when(&rt, "u1", |s| !running(s, 0)).await;
        assert!(
            matches!(&s.containers[0].state, ContainerState::Waiting { reason, .. } if reason == "CrashLoopBackOff"),
            "{s:#?}"
        );
        assert_eq!(vm.next_start().await, "app");
        let waited = ended_at.elapsed();
        assert!(
            waited >= delay,
            "restart {round} after {waited:?}, back-off {delay:?}"
        );
        assert!(
            waited < delay + Duration::from_secs(2),
            "restart {round} after {waited:?}"
        );
        started(&vm, "app");
        let s = state_when(&rt, "u1", |s| running(s, 0)).await;
        assert_eq!(s.containers[0].restart_count, round as u32 + 1);
    }
    assert!(vms.try_recv().is_err(), "no second VM");
}

#[tokio::test]
async fn a_pod_whose_containers_all_succeed_under_on_failure_ends_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, mut vms) = FakeLauncher::new();
    let (rt, _launcher) = runtime(dir.path(), fake, Duration::from_millis(50));
    rt.run(plan("u2", &["a", "b"], RestartPolicy::OnFailure))
        .unwrap();
    let mut vm = next_vm(&mut vms).await;
    assert_eq!(vm.next_start().await, "a");
    assert_eq!(vm.next_start().await, "b");
    started(&vm, "a");
    started(&vm, "b");
    exited(&vm, "a", 0);
    // One container done, the other runs: still Running.
    let s = state_when(&rt, "u2", |s| !running(s, 0)).await;
    assert_eq!(s.phase, PodPhase::Running);
    exited(&vm, "b", 0);
    let s = state_when(&rt, "u2", |s| s.phase.is_terminal()).await;
    assert_eq!(s.phase, PodPhase::Succeeded);
    for c in &s.containers {
        assert!(
            matches!(&c.state, ContainerState::Terminated { exit_code: 0, reason, .. } if reason == "Completed"),
            "{c:#?}"
        );
        assert_eq!(c.restart_count, 0);
    }
    assert_eq!(vm.ended().await, Ending::Shutdown(Duration::ZERO));
}

#[tokio::test]
async fn a_vm_that_dies_counts_as_its_containers_ending() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, mut vms) = FakeLauncher::new();
    let base = Duration::from_millis(100);
    let (rt, launcher) = runtime(dir.path(), fake, base);

    // Never: the pod fails, nothing is started again.
    rt.run(plan("u3", &["app"], RestartPolicy::Never)).unwrap();
    let mut vm = next_vm(&mut vms).await;
    vm.next_start().await;
    started(&vm, "app");
    state_when(&rt, "u3", |s| running(s, 0)).await;
    let FakeVm { events, .. } = vm;
    drop(events);
    let s = state_when(&rt, "u3", |s| s.phase.is_terminal()).await;
    assert_eq!(s.phase, PodPhase::Failed);
    match &s.containers[0].state {
        ContainerState::Terminated {
            exit_code,
            reason,
            message,
            ..
        } => {
            assert_eq!(*exit_code, 255);
            assert!(reason == "Unknown", "{reason}");
            let message = message.as_deref().unwrap_or_default();
            assert!(message.starts_with("the pod VM stopped"), "{message}");
        }
        other => panic!("{other:#?}"),
    }
    assert_eq!(launcher.discarded.lock().unwrap().len(), 1);

    // Always: a new VM after the back-off, the container counts a restart.
    rt.run(plan("u4", &["app"], RestartPolicy::Always)).unwrap();
    let mut vm = next_vm(&mut vms).await;
    vm.next_start().await;
    started(&vm, "app");
    state_when(&rt, "u4", |s| running(s, 0)).await;
    let died_at = Instant::now();
    drop(vm);
    let mut vm = next_vm(&mut vms).await;
    assert!(died_at.elapsed() >= base, "{:?}", died_at.elapsed());
    assert_eq!(vm.next_start().await, "app");
    started(&vm, "app");
    let s = state_when(&rt, "u4", |s| running(s, 0)).await;
    assert_eq!(s.containers[0].restart_count, 1);
    assert_eq!(s.phase, PodPhase::Running);
}

#[tokio::test]
async fn delete_stops_the_vm_and_removes_the_pod() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, mut vms) = FakeLauncher::new();
    let (rt, launcher) = runtime(dir.path(), fake, Duration::from_millis(50));
    rt.run(plan("u5", &["app"], RestartPolicy::Always)).unwrap();
    let mut vm = next_vm(&mut vms).await;
    vm.next_start().await;
    started(&vm, "app");
    state_when(&rt, "u5", |s| running(s, 0)).await;
    let pod_dir = dir.path().join("pods").join("u5");
    assert!(pod_dir.join("pod.json").exists());

    let grace = Duration::from_secs(7);
    assert!(rt.delete("u5", Some(grace)).await);
    assert_eq!(vm.ended().await, Ending::Shutdown(grace));
    assert!(rt.pods().is_empty());
    assert!(!pod_dir.exists(), "the record and logs are removed");
    assert_eq!(*launcher.released.lock().unwrap(), launcher.holds);
    assert!(!rt.delete("u5", None).await, "gone");
}

#[tokio::test]
async fn adoption_reports_containers_gone_unseen_as_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, mut vms) = FakeLauncher::new();
    let (rt, _launcher) = runtime(dir.path(), fake, Duration::from_millis(50));
    rt.run(plan("u6", &["a", "b"], RestartPolicy::Never))
        .unwrap();
    let mut vm = next_vm(&mut vms).await;
    vm.next_start().await;
    vm.next_start().await;
    started(&vm, "a");
    started(&vm, "b");
    state_when(&rt, "u6", |s| running(s, 0) && running(s, 1)).await;
    // The daemon exits: the VM is left running.
    rt.detach_all().await;
    assert_eq!(vm.ended().await, Ending::Detached);
    drop(rt);

    // A new daemon adopts it; the agent lists only `a`.
    let (fake, mut vms) = FakeLauncher::new();
    let (rt, launcher) = runtime(dir.path(), fake, Duration::from_millis(50));
    assert_eq!(*launcher.recovered.lock().unwrap(), ["u6"]);
    let mut vm = next_vm(&mut vms).await;
    assert!(vm.adopted);
    vm.say(GuestMessage::Processes {
        processes: vec![ProcessInfo {
            id: "a".into(),
            exec_in: None,
        }],
    });
    let s = state_when(&rt, "u6", |s| !running(s, 1)).await;
    assert!(running(&s, 0), "{s:#?}");
    assert!(
        matches!(&s.containers[1].state, ContainerState::Terminated { reason, message: Some(m), .. }
            if reason == "Unknown" && m.contains("while no host daemon was connected")),
        "{s:#?}"
    );
    assert_eq!(s.phase, PodPhase::Running);
    // Nothing is started again in the adopted VM.
    exited(&vm, "a", 0);
    let s = state_when(&rt, "u6", |s| s.phase.is_terminal()).await;
    assert_eq!(s.phase, PodPhase::Failed, "b's end is unknown");
    assert_eq!(vm.ended().await, Ending::Shutdown(Duration::ZERO));
    assert!(vm.sent.try_recv().is_err(), "b is not started again");
}

#[tokio::test]
async fn a_vm_that_cannot_be_adopted_is_discarded_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, mut vms) = FakeLauncher::new();
    let (rt, _launcher) = runtime(dir.path(), fake, Duration::from_millis(50));
    rt.run(plan("u7", &["app"], RestartPolicy::Always)).unwrap();
    let mut vm = next_vm(&mut vms).await;
    vm.next_start().await;
    started(&vm, "app");
    state_when(&rt, "u7", |s| running(s, 0)).await;
    rt.detach_all().await;
    drop(rt);

    let (mut fake, mut vms) = FakeLauncher::new();
    fake.adopt_fails = true;
    let (rt, launcher) = runtime(dir.path(), fake, Duration::from_millis(50));
    let mut vm = next_vm(&mut vms).await;
    assert!(!vm.adopted, "a new VM");
    assert_eq!(vm.next_start().await, "app");
    assert_eq!(launcher.discarded.lock().unwrap().len(), 1);
    let s = state_when(&rt, "u7", |s| s.containers[0].restart_count == 1).await;
    assert!(
        s.containers[0]
            .state
            .is_waiting(super::WaitingReason::ContainerCreating)
    );
}

#[tokio::test]
async fn a_vm_that_does_not_boot_fails_a_pod_that_never_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _vms) = FakeLauncher::new();
    *fake.boot_failure.lock().unwrap() = Some("boot the fake VM".into());
    let (rt, _launcher) = runtime(dir.path(), fake, Duration::from_millis(50));
    rt.run(plan("u8", &["app"], RestartPolicy::Never)).unwrap();
    let s = state_when(&rt, "u8", |s| s.phase.is_terminal()).await;
    assert_eq!(s.phase, PodPhase::Failed);
    assert!(s.reason.is_some_and(|r| r == *"VMFailed"), "{s:#?}");
    let message = s.message.unwrap_or_default();
    assert!(
        message.starts_with("the pod VM did not start: boot the fake VM"),
        "{message}"
    );
}

/// What the reconciler's tests share.
pub(crate) fn fake_runtime(
    dir: &std::path::Path,
) -> (
    Arc<PodRuntime>,
    mpsc::UnboundedReceiver<FakeVm>,
    super::ChangeFeed,
) {
    let (fake, vms) = FakeLauncher::new();
    let (rt, changes) =
        PodRuntime::open_with(config(dir, Duration::from_millis(50)), Arc::new(fake)).unwrap();
    (Arc::new(rt), vms, changes)
}

#[tokio::test]
async fn ack_without_vm_reports_pods_running_at_once_and_has_no_logs_or_exec() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Duration::from_millis(50));
    let (rt, mut changes) = PodRuntime::open_with(cfg, Arc::new(super::AckLauncher)).unwrap();
    rt.run(plan("u9", &["a", "b"], RestartPolicy::Always))
        .unwrap();
    // The first state reported is already Running with every container
    // running, as the daemon reported such pods before the host runtime
    // ran them.
    let (uid, state) = tokio::time::timeout(Duration::from_secs(5), changes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(uid, "u9");
    assert_eq!(state.phase, PodPhase::Running);
    assert!(running(&state, 0) && running(&state, 1), "{state:#?}");
    assert!(state.started_at.is_some());

    let no = rt.logs("default", "pod-u9", Some("a"), None, false).err();
    assert!(
        matches!(&no, Some(super::RuntimeError::NotImplemented(m)) if m.contains("ack-without-vm")),
        "{no:?}"
    );
    let request = super::ExecRequest {
        container: None,
        command: vec!["true".into()],
        tty: false,
        stdin: false,
        size: None,
    };
    let no = rt.exec("default", "pod-u9", request).await.err();
    assert!(
        matches!(&no, Some(super::RuntimeError::NotImplemented(_))),
        "{no:?}"
    );

    // A new daemon keeps them running; delete removes them.
    rt.detach_all().await;
    drop(rt);
    let cfg = config(dir.path(), Duration::from_millis(50));
    let (rt, _changes) = PodRuntime::open_with(cfg, Arc::new(super::AckLauncher)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = state_when(&rt, "u9", |s| s.phase == PodPhase::Running).await;
    assert!(running(&s, 0) && running(&s, 1), "{s:#?}");
    assert_eq!(s.containers[0].restart_count, 0);
    assert!(rt.delete("u9", None).await);
    assert!(!dir.path().join("pods").join("u9").exists());
}

#[tokio::test]
async fn a_pod_whose_deletion_began_before_a_crash_gets_no_new_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, mut vms) = FakeLauncher::new();
    let (rt, _launcher) = runtime(dir.path(), fake, Duration::from_millis(50));
    rt.run(plan("u9", &["app"], RestartPolicy::Always)).unwrap();
    let mut vm = next_vm(&mut vms).await;
    vm.next_start().await;
    started(&vm, "app");
    state_when(&rt, "u9", |s| running(s, 0)).await;
    rt.detach_all().await;
    drop(rt);
    // The daemon died while it stopped the pod's VM for a deletion: the
    // record says so, and the VM cannot be adopted any more.
    let path = dir.path().join("pods/u9/pod.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    record["deleting"] = true.into();
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();

    let (mut fake, mut vms) = FakeLauncher::new();
    fake.adopt_fails = true;
    let (rt, launcher) = runtime(dir.path(), fake, Duration::from_millis(50));
    let s = state_when(&rt, "u9", |s| s.phase.is_terminal()).await;
    assert_eq!(launcher.discarded.lock().unwrap().len(), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), next_vm(&mut vms))
            .await
            .is_err(),
        "no new VM for a pod being deleted: {s:#?}"
    );
    // The deletion the server repeats finishes it.
    assert!(rt.delete("u9", None).await);
    assert!(!dir.path().join("pods/u9").exists());
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o777
}

#[tokio::test]
async fn an_exec_client_that_never_reads_holds_up_neither_logs_nor_delete() {
    use podvisor_proto::{HostMessage, Stream};

    use super::{ExecEvent, ExecRequest};

    let dir = tempfile::tempdir().unwrap();
    let (fake, mut vms) = FakeLauncher::new();
    let (rt, _launcher) = runtime(dir.path(), fake, Duration::from_millis(50));
    rt.run(plan("u10", &["app"], RestartPolicy::Always))
        .unwrap();
    let mut vm = next_vm(&mut vms).await;
    vm.next_start().await;
    started(&vm, "app");
    state_when(&rt, "u10", |s| running(s, 0)).await;

    // The pod's files are the daemon's only.
    let pod_dir = dir.path().join("pods").join("u10");
    assert_eq!(mode(&dir.path().join("pods")), 0o700);
    assert_eq!(mode(&pod_dir), 0o700);
    assert_eq!(mode(&pod_dir.join("pod.json")), 0o600);
    assert_eq!(mode(&pod_dir.join("logs")), 0o700);
    assert_eq!(mode(&pod_dir.join("logs/app.log")), 0o600);

    let request = ExecRequest {
        container: None,
        command: vec!["yes".into()],
        tty: false,
        stdin: false,
        size: None,
    };
    let mut session = rt.exec("default", "pod-u10", request).await.unwrap();
    let exec_id = match vm.next_sent().await {
        HostMessage::Exec(spec) => spec.id,
        other => panic!("expected the exec, got {other:?}"),
    };
    started(&vm, &exec_id);
    // The client reads nothing while the process writes 16 MiB.
    for _ in 0..256 {
        vm.say(GuestMessage::Output {
            id: exec_id.clone(),
            stream: Stream::Stdout,
            data: vec![b'y'; 64 * 1024],
        });
    }
    match vm.next_sent().await {
        HostMessage::Signal { id, signal } => {
            assert_eq!((id.as_str(), signal), (exec_id.as_str(), libc::SIGKILL))
        }
        other => panic!("expected the exec to be killed, got {other:?}"),
    }
    // The container's output still reaches its log.
    vm.say(GuestMessage::Output {
        id: "app".into(),
        stream: Stream::Stdout,
        data: b"still logging\n".to_vec(),
    });
    let log = pod_dir.join("logs/app.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read(&log).unwrap().ends_with(b"still logging\n") {
        assert!(Instant::now() < deadline, "the container's log stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Deleting the pod does not wait for the client.
    let grace = Duration::from_secs(3);
    let deleted = tokio::time::timeout(Duration::from_secs(5), rt.delete("u10", Some(grace)))
        .await
        .expect("delete returns while the exec client reads nothing");
    assert!(deleted);
    assert_eq!(vm.ended().await, Ending::Shutdown(grace));
    // The client, reading at last, gets the output that was queued and
    // then the error.
    let mut bytes = 0;
    let last = loop {
        match session.events.recv().await {
            Some(ExecEvent::Output(_, data)) => bytes += data.len(),
            other => break other,
        }
    };
    assert_eq!(bytes, super::EXEC_OUTPUT_BACKLOG);
    match last {
        Some(ExecEvent::Failed { message, .. }) => {
            assert!(message.contains("did not read its output"), "{message}")
        }
        other => panic!("expected the error, got {other:?}"),
    }
}
