//! Hibernation in the pod task against fake sandboxes and an in-memory
//! key custody: hibernate and wake on a request, exec or command; the idle
//! policy; a refused snapshot restarts the pod cold with the reason; a
//! key that cannot be kept leaves the pod running; a restarted runtime
//! keeps the pod asleep; delete removes the snapshot.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use podvisor_proto::{GuestMessage, HostMessage};
use tokio::sync::mpsc;

use super::fake_sandbox::{Ending, FakeLauncher, FakeVm, MemoryCustody, next_vm};
use super::tests::{config, plan, running, started, state_when};
use super::{PodPlan, PodRuntime, PodState, RestartPolicy};

struct Rig {
    rt: PodRuntime,
    launcher: Arc<FakeLauncher>,
    keys: Arc<MemoryCustody>,
    vms: mpsc::UnboundedReceiver<FakeVm>,
}

fn rig_on(dir: &std::path::Path, keys: Arc<MemoryCustody>) -> Rig {
    rig_with(config(dir, Duration::from_millis(100)), keys)
}

fn rig_with(cfg: super::HostConfig, keys: Arc<MemoryCustody>) -> Rig {
    let (fake, vms) = FakeLauncher::new();
    let launcher = Arc::new(fake);
    let (rt, _changes) =
        PodRuntime::open_with_server(cfg, launcher.clone(), Some(keys.clone()), None).unwrap();
    Rig {
        rt,
        launcher,
        keys,
        vms,
    }
}

fn asleep(s: &PodState) -> bool {
    s.hibernation.as_ref().is_some_and(|h| h.asleep)
}

/// Pod `uid` running its one container `app` in a fake VM.
async fn running_pod(rig: &mut Rig, p: PodPlan) -> FakeVm {
    let uid = p.uid.clone();
    assert!(rig.rt.run(p).unwrap());
    let mut vm = next_vm(&mut rig.vms).await;
    assert_eq!(vm.next_start().await, "app");
    started(&vm, "app");
    state_when(&rig.rt, &uid, |s| running(s, 0)).await;
    vm
}

fn snapshots(dir: &std::path::Path, uid: &str) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(dir.join("pods").join(uid).join("snapshots")) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(_) => vec![],
    }
}

#[tokio::test]
async fn a_hibernated_pod_wakes_on_a_request_with_its_containers_still_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig_on(dir.path(), Arc::default());
    let mut vm = running_pod(&mut rig, plan("h1", &["app"], RestartPolicy::Always)).await;

    let said = rig.rt.hibernate("default", "pod-h1").await.unwrap();
    assert!(said.contains("hibernated"), "{said}");
    assert_eq!(vm.ended().await, Ending::Hibernated);
    let s = state_when(&rig.rt, "h1", asleep).await;
    let h = s.hibernation.clone().unwrap();
    assert_eq!(h.reason, "Hibernated");
    assert!(h.message.contains("snapshot"), "{}", h.message);
    // The containers still run, in the snapshot.
    assert!(running(&s, 0));
    assert_eq!(snapshots(dir.path(), "h1").len(), 1);
    assert!(rig.keys.keys.lock().unwrap().contains_key("h1"));
    // Asking again changes nothing.
    let again = rig.rt.hibernate("default", "pod-h1").await.unwrap();
    assert!(again.contains("already"), "{again}");

    assert!(rig.launcher.request("h1"), "the pod's network waits");
    let mut woken = next_vm(&mut rig.vms).await;
    assert!(woken.woken);
    // It asks what runs, as after an adoption.
    assert!(matches!(
        woken.next_sent().await,
        HostMessage::ListProcesses
    ));
    let s = state_when(&rig.rt, "h1", |s| !asleep(s)).await;
    let h = s.hibernation.clone().unwrap();
    assert_eq!(h.reason, "Woken");
    assert!(h.message.contains("woken by a request"), "{}", h.message);
    assert!(running(&s, 0), "nothing was restarted");
    assert_eq!(s.containers[0].restart_count, 0);
    assert!(
        snapshots(dir.path(), "h1").is_empty(),
        "the snapshot is gone"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !rig.keys.keys.lock().unwrap().contains_key("h1"),
        "the key is forgotten"
    );
    // The woken VM serves as before.
    woken.say(GuestMessage::Output {
        id: "app".into(),
        stream: podvisor_proto::Stream::Stdout,
        data: b"after\n".to_vec(),
    });
    let wake = rig.rt.wake("default", "pod-h1").await.unwrap();
    assert!(wake.contains("not hibernated"), "{wake}");
}

#[tokio::test]
async fn an_exec_or_podvisor_wake_wakes_the_pod() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig_on(dir.path(), Arc::default());
    let _vm = running_pod(&mut rig, plan("h2", &["app"], RestartPolicy::Always)).await;
    rig.rt.hibernate("default", "pod-h2").await.unwrap();

    let request = super::ExecRequest {
        container: None,
        command: vec!["true".into()],
        tty: false,
        stdin: false,
        size: None,
    };
    let rt = &rig.rt;
    let exec = rt.exec("default", "pod-h2", request);
    let serve = async {
        let mut woken = next_vm(&mut rig.vms).await;
        assert!(woken.woken);
        assert!(matches!(
            woken.next_sent().await,
            HostMessage::ListProcesses
        ));
        match woken.next_sent().await {
            HostMessage::Exec(spec) => assert_eq!(spec.process.args, ["true"]),
            other => panic!("expected the exec, got {other:?}"),
        }
        woken
    };
    let (session, _woken) = tokio::join!(exec, serve);
    session.expect("the exec runs in the woken pod");

    let s = state_when(&rig.rt, "h2", |s| !asleep(s)).await;
    assert!(s.hibernation.unwrap().message.contains("an exec"));
}

#[tokio::test]
async fn podvisor_wake_wakes_and_says_how() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig_on(dir.path(), Arc::default());
    let _vm = running_pod(&mut rig, plan("h3", &["app"], RestartPolicy::Always)).await;
    rig.rt.hibernate("default", "pod-h3").await.unwrap();
    let said = rig.rt.wake("default", "pod-h3").await.unwrap();
    assert!(said.contains("woken by podvisor wake"), "{said}");
    assert!(next_vm(&mut rig.vms).await.woken);
}

#[tokio::test]
async fn a_refused_snapshot_restarts_the_pod_cold_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig_on(dir.path(), Arc::default());
    let _vm = running_pod(&mut rig, plan("h4", &["app"], RestartPolicy::Always)).await;
    rig.rt.hibernate("default", "pod-h4").await.unwrap();
    rig.launcher.wake_refused.store(true, Ordering::SeqCst);

    let err = rig.rt.wake("default", "pod-h4").await.unwrap_err();
    let err = podvisor_errors::chain(&err);
    assert!(err.contains("starts again from scratch"), "{err}");
    assert!(err.contains("not a podvisor snapshot"), "{err}");
    // A fresh VM, the container started again.
    let mut cold = next_vm(&mut rig.vms).await;
    assert!(!cold.woken && !cold.adopted);
    assert_eq!(cold.next_start().await, "app");
    let s = state_when(&rig.rt, "h4", |s| s.containers[0].restart_count == 1).await;
    let h = s.hibernation.clone().unwrap();
    assert_eq!(h.reason, "WakeFailed");
    assert!(
        h.message.contains("not a podvisor snapshot"),
        "{}",
        h.message
    );
    assert!(snapshots(dir.path(), "h4").is_empty());
}

#[tokio::test]
async fn a_key_the_server_does_not_take_leaves_the_pod_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig_on(dir.path(), Arc::default());
    let mut vm = running_pod(&mut rig, plan("h5", &["app"], RestartPolicy::Always)).await;
    rig.keys.fail.store(true, Ordering::SeqCst);
    let err = rig.rt.hibernate("default", "pod-h5").await.unwrap_err();
    let err = podvisor_errors::chain(&err);
    assert!(err.contains("custody"), "{err}");
    // The same VM serves on; no snapshot is left.
    vm.say(GuestMessage::Exited {
        id: "app".into(),
        status: podvisor_proto::ExitStatus::Code(0),
    });
    let s = state_when(&rig.rt, "h5", |s| !running(s, 0)).await;
    assert!(s.hibernation.is_none());
    assert!(snapshots(dir.path(), "h5").is_empty());
    assert!(vm.ending.try_recv().is_err(), "the VM was not stopped");
}

#[tokio::test]
async fn an_idle_pod_hibernates_by_itself_and_traffic_keeps_it_awake() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig_on(dir.path(), Arc::default());
    let mut p = plan("h6", &["app"], RestartPolicy::Always);
    p.hibernate_after = Some(Duration::from_millis(1500));
    rig.launcher.frames.lock().unwrap().insert("h6".into(), 0);
    let mut vm = running_pod(&mut rig, p).await;
    // Traffic every 300 ms for 2.5 s: it stays up.
    for n in 1..=8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        rig.launcher.frames.lock().unwrap().insert("h6".into(), n);
    }
    assert!(vm.ending.try_recv().is_err(), "traffic kept the pod awake");
    // Then nothing: it sleeps within the idle time and a check period.
    let ended = tokio::time::timeout(Duration::from_secs(5), vm.ending.recv()).await;
    assert_eq!(ended.unwrap(), Some(Ending::Hibernated));
    let s = state_when(&rig.rt, "h6", asleep).await;
    assert_eq!(s.hibernation.unwrap().reason, "Idle");
}

#[tokio::test]
async fn a_restarted_runtime_keeps_the_pod_asleep_and_delete_removes_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Arc<MemoryCustody> = Arc::default();
    let mut rig = rig_on(dir.path(), keys.clone());
    let _vm = running_pod(&mut rig, plan("h7", &["app"], RestartPolicy::Always)).await;
    rig.rt.hibernate("default", "pod-h7").await.unwrap();
    rig.rt.detach_all().await;
    drop(rig);

    let mut rig = rig_on(dir.path(), keys);
    let s = state_when(&rig.rt, "h7", asleep).await;
    assert!(running(&s, 0));
    // Its network waits for a request again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !rig.launcher.request("h7") {
        assert!(
            std::time::Instant::now() < deadline,
            "the pod never slept again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let woken = next_vm(&mut rig.vms).await;
    assert!(woken.woken);
    state_when(&rig.rt, "h7", |s| !asleep(s)).await;

    // Hibernated again, then deleted: nothing of it is left.
    rig.rt.hibernate("default", "pod-h7").await.unwrap();
    assert_eq!(snapshots(dir.path(), "h7").len(), 1);
    assert!(rig.rt.delete("h7", None).await);
    assert!(!dir.path().join("pods/h7").exists());
    assert!(rig.vms.try_recv().is_err(), "delete woke nothing");
}

#[tokio::test]
async fn a_server_out_of_reach_for_a_while_does_not_cost_the_pod_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig_on(dir.path(), Arc::default());
    let _vm = running_pod(&mut rig, plan("h8", &["app"], RestartPolicy::Always)).await;
    rig.rt.hibernate("default", "pod-h8").await.unwrap();
    rig.keys.fail.store(true, Ordering::SeqCst);
    assert!(rig.launcher.request("h8"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        rig.vms.try_recv().is_err(),
        "no VM while the key is out of reach"
    );
    rig.keys.fail.store(false, Ordering::SeqCst);
    let woken = next_vm(&mut rig.vms).await;
    assert!(woken.woken, "woken from the snapshot, not started cold");
    let s = state_when(&rig.rt, "h8", |s| !asleep(s)).await;
    assert_eq!(s.hibernation.unwrap().reason, "Woken");
}

#[tokio::test]
async fn a_wake_past_its_deadline_restarts_the_pod_cold() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Duration::from_millis(100));
    cfg.wake_timeout = Duration::from_millis(300);
    let mut rig = rig_with(cfg, Arc::default());
    let _vm = running_pod(&mut rig, plan("h9", &["app"], RestartPolicy::Always)).await;
    rig.rt.hibernate("default", "pod-h9").await.unwrap();
    rig.launcher.wake_hangs.store(true, Ordering::SeqCst);
    let err = rig.rt.wake("default", "pod-h9").await.unwrap_err();
    let err = podvisor_errors::chain(&err);
    assert!(err.contains("deadline"), "{err}");
    let cold = next_vm(&mut rig.vms).await;
    assert!(!cold.woken);
    let s = state_when(&rig.rt, "h9", |s| {
        s.hibernation
            .as_ref()
            .is_some_and(|h| h.reason == "WakeFailed")
    })
    .await;
    assert!(s.hibernation.unwrap().message.contains("deadline"));
    assert!(snapshots(dir.path(), "h9").is_empty());
}

#[tokio::test]
async fn a_log_follower_wakes_the_pod() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig_on(dir.path(), Arc::default());
    let _vm = running_pod(&mut rig, plan("h10", &["app"], RestartPolicy::Always)).await;
    rig.rt.hibernate("default", "pod-h10").await.unwrap();
    state_when(&rig.rt, "h10", asleep).await;
    // Reading the log wakes nothing; following it does.
    let _past = rig
        .rt
        .logs("default", "pod-h10", None, None, false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rig.vms.try_recv().is_err());
    let _follower = rig.rt.logs("default", "pod-h10", None, None, true).unwrap();
    let woken = next_vm(&mut rig.vms).await;
    assert!(woken.woken);
    let s = state_when(&rig.rt, "h10", |s| !asleep(s)).await;
    assert!(s.hibernation.unwrap().message.contains("log follower"));
}

#[tokio::test]
async fn a_vm_whose_record_has_no_disks_is_not_hibernated() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = rig_on(dir.path(), Arc::default());
    let mut vm = running_pod(&mut rig, plan("h11", &["app"], RestartPolicy::Always)).await;
    rig.rt.detach_all().await;
    assert_eq!(vm.ended().await, Ending::Detached);
    drop(rig);
    // The record as an older podvisor wrote it: no disks.
    let path = dir.path().join("pods/h11/pod.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(record["vm"]["disks"].is_array(), "{record}");
    record["vm"].as_object_mut().unwrap().remove("disks");
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();

    let mut rig = rig_on(dir.path(), Arc::default());
    let adopted = next_vm(&mut rig.vms).await;
    assert!(adopted.adopted);
    adopted.say(GuestMessage::Processes {
        processes: vec![podvisor_proto::ProcessInfo {
            id: "app".into(),
            exec_in: None,
        }],
    });
    let err = rig.rt.hibernate("default", "pod-h11").await.unwrap_err();
    let err = podvisor_errors::chain(&err);
    assert!(err.contains("older podvisor"), "{err}");
    assert!(snapshots(dir.path(), "h11").is_empty());
}
