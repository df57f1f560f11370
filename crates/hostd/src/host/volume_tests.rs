//! Encrypted volumes in the pod task, against fake sandboxes and an
//! in-memory authority: containers that mount one start only once the
//! guest opened it (others start at once); the host relays the guest's
//! public key and the server's sealed answer unchanged; a refusal or a
//! server that does not answer leaves them waiting with `KeyDenied` or
//! `KeyTimeout` and no key is sent; a revoked volume is closed and its
//! container waits with `KeyDenied` from then on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podvisor_api::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimStatus, PodInstance,
    Quantity, RefusedVolume, ReleasedVolume, VolumeAttachment, VolumeKeyRequest, VolumeKeyResponse,
};
use podvisor_proto::{GuestMessage, HostMessage, MountSource, VolumeOpened};

use super::fake_sandbox::{FakeLauncher, FakeVm, next_vm};
use super::tests::{config, plan, started, state_when};
use super::volumes::{AuthorityError, MountPlan, VolumeAuthority, VolumePlan, VolumeSource};
use super::{ContainerState, PodPlan, PodRuntime, RestartPolicy};

/// What the fake server does with a key request.
#[derive(Clone)]
enum Answer {
    Release,
    Refuse(&'static str),
    Hang,
}

struct FakeAuthority {
    answer: Mutex<Answer>,
    requests: Mutex<Vec<VolumeKeyRequest>>,
    instances: Mutex<u32>,
}

const SEALED: &[u8] = b"sealed-to-the-guest";

impl FakeAuthority {
    fn new(answer: Answer) -> Arc<FakeAuthority> {
        Arc::new(FakeAuthority {
            answer: Mutex::new(answer),
            requests: Mutex::new(vec![]),
            instances: Mutex::new(0),
        })
    }
}

#[async_trait::async_trait]
impl VolumeAuthority for FakeAuthority {
    async fn claim(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PersistentVolumeClaim, AuthorityError> {
        let mut meta = podvisor_api::ObjectMeta {
            name: name.into(),
            namespace: Some(namespace.into()),
            uid: Some("vol-uid-1".into()),
            ..Default::default()
        };
        meta.annotations
            .insert(podvisor_api::ENCRYPTED_ANNOTATION.into(), "true".into());
        Ok(PersistentVolumeClaim {
            api_version: "v1".into(),
            kind: "PersistentVolumeClaim".into(),
            metadata: meta,
            spec: PersistentVolumeClaimSpec::default(),
            status: PersistentVolumeClaimStatus {
                phase: "Bound".into(),
                capacity: BTreeMap::from([("storage".into(), Quantity::new("16Mi"))]),
                encrypted: true,
                formatted: false,
                attached_to: Some(VolumeAttachment {
                    pod: "pod-u1".into(),
                    pod_uid: "u1".into(),
                    host: "h".into(),
                }),
                ..Default::default()
            },
        })
    }

    async fn formatted(&self, _: &str, _: &str) -> Result<(), AuthorityError> {
        Ok(())
    }

    async fn new_instance(&self, plan: &PodPlan) -> Result<PodInstance, AuthorityError> {
        let mut n = self.instances.lock().unwrap();
        *n += 1;
        Ok(PodInstance {
            instance: format!("i{n}"),
            pod_uid: plan.uid.clone(),
        })
    }

    async fn request_keys(
        &self,
        _plan: &PodPlan,
        request: &VolumeKeyRequest,
    ) -> Result<VolumeKeyResponse, AuthorityError> {
        self.requests.lock().unwrap().push(request.clone());
        let answer = self.answer.lock().unwrap().clone();
        match answer {
            Answer::Release => Ok(VolumeKeyResponse {
                sealed: Some(base64_of(SEALED)),
                released: vec![ReleasedVolume {
                    volume: "secret".into(),
                    format: true,
                }],
                refused: vec![],
            }),
            Answer::Refuse(why) => Ok(VolumeKeyResponse {
                sealed: None,
                released: vec![],
                refused: vec![RefusedVolume {
                    volume: "secret".into(),
                    reason: "KeyDenied".into(),
                    message: why.into(),
                }],
            }),
            Answer::Hang => std::future::pending().await,
        }
    }
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Pod u1: `app` mounts the encrypted volume `secret`, `side` does not.
fn volume_plan() -> PodPlan {
    let mut p = plan("u1", &["app", "side"], RestartPolicy::Always);
    p.volumes = vec![VolumePlan {
        name: "secret".into(),
        source: VolumeSource::Claim {
            claim: "secret".into(),
            read_only: false,
        },
    }];
    p.containers[0].volume_mounts = vec![MountPlan {
        volume: "secret".into(),
        path: "/data".into(),
        read_only: false,
        sub_path: None,
    }];
    p
}

fn runtime(
    dir: &std::path::Path,
    authority: Arc<FakeAuthority>,
    key_timeout: Duration,
) -> (PodRuntime, tokio::sync::mpsc::UnboundedReceiver<FakeVm>) {
    let (fake, vms) = FakeLauncher::new();
    let mut cfg = config(dir, Duration::from_millis(200));
    cfg.key_timeout = key_timeout;
    let (rt, _changes) =
        PodRuntime::open_with_server(cfg, Arc::new(fake), None, Some(authority)).unwrap();
    (rt, vms)
}

/// Starts `side` (not gated); returns the key request the host sent.
async fn ungated_start(vm: &mut FakeVm) -> (String, Vec<podvisor_proto::volumes::EncryptedVolume>) {
    // Only `side` starts before the key.
    match vm.next_sent().await {
        HostMessage::StartContainer(spec) => assert_eq!(spec.id, "side"),
        other => panic!("expected side's start, got {other:?}"),
    }
    started(vm, "side");
    match vm.next_sent().await {
        HostMessage::RequestVolumeKeys { context, volumes } => (context, volumes),
        other => panic!("expected a key request, got {other:?}"),
    }
}

fn waiting_reason(s: &super::PodState, i: usize) -> Option<String> {
    match &s.containers[i].state {
        ContainerState::Waiting { reason, .. } => Some(reason.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn a_container_on_an_encrypted_volume_starts_once_the_guest_opened_it() {
    if which("mkfs.ext4").is_none() {
        panic!("mkfs.ext4 (e2fsprogs) is needed");
    }
    let dir = tempfile::tempdir().unwrap();
    let authority = FakeAuthority::new(Answer::Release);
    let (rt, mut vms) = runtime(dir.path(), authority.clone(), Duration::from_secs(30));
    assert!(rt.run(volume_plan()).unwrap());
    let mut vm = next_vm(&mut vms).await;
    let (context, volumes) = ungated_start(&mut vm).await;
    assert_eq!(context, "default/pod-u1/u1/i1");
    assert_eq!(volumes.len(), 1);
    assert_eq!(volumes[0].name, "secret");
    // Never formatted: a format image comes with it.
    let image = volumes[0].format_image.as_ref().expect("a format image");
    assert!(!image.extents.is_empty());
    let s = state_when(&rt, "u1", |s| waiting_reason(s, 0).is_some()).await;
    assert!(
        format!("{:?}", s.containers[0].state).contains("waiting for the key"),
        "{s:?}"
    );

    vm.say(GuestMessage::VolumeKeyRequest {
        public_key: vec![9; 32],
        error: None,
    });
    // The server's sealed bytes go to the guest as they came.
    match vm.next_sent().await {
        HostMessage::VolumeKeys { sealed } => assert_eq!(sealed, SEALED),
        other => panic!("expected the sealed keys, got {other:?}"),
    }
    let request = authority.requests.lock().unwrap()[0].clone();
    assert_eq!(request.instance, "i1");
    assert_eq!(request.public_key, base64_of(&[9; 32]));
    assert_eq!(request.volumes, vec!["secret".to_string()]);
    vm.say(GuestMessage::VolumesOpened {
        results: vec![VolumeOpened {
            name: "secret".into(),
            error: None,
        }],
    });
    match vm.next_sent().await {
        HostMessage::StartContainer(spec) => {
            assert_eq!(spec.id, "app");
            assert!(
                spec.mounts.iter().any(|m| m.source
                    == MountSource::Encrypted {
                        volume: "secret".into()
                    }),
                "{:?}",
                spec.mounts
            );
        }
        other => panic!("expected app's start, got {other:?}"),
    }
    started(&vm, "app");
    state_when(&rt, "u1", |s| super::tests::running(s, 0)).await;

    // Revoked: the guest closes it; the container, once it exits, waits
    // with KeyDenied instead of restarting.
    let close = tokio::spawn({
        let rt = Arc::new(rt);
        let rt2 = rt.clone();
        async move { (rt2.close_volume("default", "pod-u1", "secret").await, rt) }
    });
    match vm.next_sent().await {
        HostMessage::CloseVolume { name, .. } => assert_eq!(name, "secret"),
        other => panic!("expected the close, got {other:?}"),
    }
    vm.say(GuestMessage::Exited {
        id: "app".into(),
        status: podvisor_proto::ExitStatus::Signaled {
            signal: 15,
            core_dumped: false,
        },
    });
    vm.say(GuestMessage::VolumeClosed {
        name: "secret".into(),
        error: None,
    });
    let (answer, rt) = close.await.unwrap();
    assert!(answer.unwrap().contains("closed"));
    let s = state_when(&rt, "u1", |s| {
        waiting_reason(s, 0).as_deref() == Some("KeyDenied")
    })
    .await;
    assert!(
        format!("{:?}", s.containers[0].state).contains("revoked"),
        "{s:?}"
    );
    // No restart is sent for it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(vm.sent.try_recv().is_err());
}

#[tokio::test]
async fn a_refused_key_leaves_the_container_waiting_with_key_denied() {
    let dir = tempfile::tempdir().unwrap();
    let authority = FakeAuthority::new(Answer::Refuse("volume secret is revoked"));
    let (rt, mut vms) = runtime(dir.path(), authority, Duration::from_secs(30));
    assert!(rt.run(volume_plan()).unwrap());
    let mut vm = next_vm(&mut vms).await;
    ungated_start(&mut vm).await;
    vm.say(GuestMessage::VolumeKeyRequest {
        public_key: vec![9; 32],
        error: None,
    });
    let s = state_when(&rt, "u1", |s| {
        waiting_reason(s, 0).as_deref() == Some("KeyDenied")
    })
    .await;
    assert!(
        format!("{:?}", s.containers[0].state).contains("revoked"),
        "{s:?}"
    );
    assert!(super::tests::running(&s, 1) || waiting_reason(&s, 1).is_none());
    // Nothing is sent to the guest: no keys, no start on an empty directory.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(vm.sent.try_recv().is_err());
}

#[tokio::test]
async fn a_server_that_does_not_answer_leaves_key_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let authority = FakeAuthority::new(Answer::Hang);
    let (rt, mut vms) = runtime(dir.path(), authority, Duration::from_millis(500));
    assert!(rt.run(volume_plan()).unwrap());
    let mut vm = next_vm(&mut vms).await;
    ungated_start(&mut vm).await;
    vm.say(GuestMessage::VolumeKeyRequest {
        public_key: vec![9; 32],
        error: None,
    });
    state_when(&rt, "u1", |s| {
        waiting_reason(s, 0).as_deref() == Some("KeyTimeout")
    })
    .await;
    assert!(vm.sent.try_recv().is_err());
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(tool))
        .find(|p| p.exists())
}
