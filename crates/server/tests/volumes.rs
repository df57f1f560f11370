//! Persistent volumes end to end over HTTP on SQLite: scheduling with
//! volumes (attach, in use, detach), the key release of encrypted volumes
//! to the entitled pod only, revocation, the audit log, and that no data
//! key is ever stored in the clear.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{TestServer, eventually, pod, pod_where};
use podvisor_api::{
    Client, PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, Volume,
    VolumeKeyRequest, VolumeKeyResponse,
};
use podvisor_proto::volumes::{GuestKeyPair, context, open};
use podvisor_server::Role;

const GI: u64 = 1 << 30;

fn with_claims(name: &str, claims: &[&str]) -> Pod {
    let mut p = pod(name, "500m", "128Mi");
    p.spec.volumes = claims
        .iter()
        .map(|c| Volume {
            name: format!("v-{c}"),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: c.to_string(),
                read_only: false,
            }),
            ..Default::default()
        })
        .collect();
    p
}

fn beat(client: &Client, name: &'static str) -> tokio::task::JoinHandle<()> {
    let client = client.clone();
    tokio::spawn(async move {
        loop {
            let _ = client.heartbeat(name).await;
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Asks for keys as the host relaying guest `pair`'s request.
async fn ask(
    host: &Client,
    pod: &str,
    instance: &str,
    pair: &GuestKeyPair,
    volumes: &[&str],
) -> Result<VolumeKeyResponse, podvisor_api::ClientError> {
    host.request_volume_keys(
        "default",
        pod,
        &VolumeKeyRequest {
            instance: instance.into(),
            public_key: b64(&pair.public_key()),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
        },
    )
    .await
}

fn refusal<'a>(resp: &'a VolumeKeyResponse, volume: &str) -> &'a str {
    let r = resp
        .refused
        .iter()
        .find(|r| r.volume == volume)
        .unwrap_or_else(|| panic!("{volume} not refused: {resp:?}"));
    assert_eq!(r.reason, "KeyDenied");
    &r.message
}

/// Every value in the store.
async fn store_values(ts: &TestServer) -> Vec<(String, Vec<u8>)> {
    let url = format!(
        "sqlite:{}",
        ts.dir.path().join("state").join("state.db").display()
    );
    let store = podvisor_store::open(&url).await.unwrap();
    let (kvs, _) = store.list("").await.unwrap();
    kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

fn assert_not_stored(values: &[(String, Vec<u8>)], key: &[u8]) {
    let hex_key = hex_of(key);
    let b64_key = b64(key);
    for (k, v) in values {
        assert!(!v.windows(key.len()).any(|w| w == key), "{k} holds the key");
        let text = String::from_utf8_lossy(v);
        assert!(!text.contains(&hex_key), "{k} holds the key in hex");
        assert!(!text.contains(&b64_key), "{k} holds the key in base64");
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn audit_actions(user: &Client, ns: &str, name: &str) -> Vec<String> {
    let log = user.volume_audit(ns, name).await.unwrap();
    log.entries.iter().map(|e| e.action.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_volume_keys_go_only_to_the_entitled_pod() {
    let ts = TestServer::sqlite().await;
    let user = ts.client(Role::User, "alice").await;
    let h1 = ts.host("h1", 4000, 4 * GI).await;
    let _b1 = beat(&h1, "h1");
    let h2 = ts.host("h2", 4000, 4 * GI).await;
    let _b2 = beat(&h2, "h2");

    let data = user
        .create_volume(&PersistentVolumeClaim::new("default", "data", "1Gi", true))
        .await
        .unwrap();
    assert_eq!(data.status.phase, "Pending");
    assert!(data.status.encrypted);
    assert_eq!(data.status.capacity["storage"].as_str(), "1Gi");
    user.create_volume(&PersistentVolumeClaim::new(
        "default", "plain", "64Mi", false,
    ))
    .await
    .unwrap();
    user.create_volume(&PersistentVolumeClaim::new("other", "theirs", "1Gi", true))
        .await
        .unwrap();
    let err = user
        .create_volume(&PersistentVolumeClaim::new("default", "data", "1Gi", true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(409), "{err}");

    // A pod naming a claim that does not exist stays Pending.
    user.create_pod(&with_claims("lost", &["nope"]))
        .await
        .unwrap();
    let lost = pod_where(&user, "lost", "lost to be unschedulable", |p| {
        p.status.reason.as_deref() == Some("Unschedulable")
    })
    .await;
    assert_eq!(
        lost.status.message.as_deref(),
        Some("persistentvolumeclaim \"nope\" not found")
    );

    // The pod gets a host, and its volumes are attached to it there.
    user.create_pod(&with_claims("web", &["data", "plain"]))
        .await
        .unwrap();
    let web = pod_where(&user, "web", "web to be scheduled", |p| {
        p.spec.node_name.is_some()
    })
    .await;
    let host = web.spec.node_name.clone().unwrap();
    let (host_client, other_host) = if host == "h1" { (&h1, &h2) } else { (&h2, &h1) };
    let web_uid = web.metadata.uid.clone().unwrap();
    let data = user.get_volume("default", "data").await.unwrap();
    let attached = data.status.attached_to.clone().unwrap();
    assert_eq!(
        (
            attached.pod.as_str(),
            attached.pod_uid.as_str(),
            attached.host.as_str()
        ),
        ("web", web_uid.as_str(), host.as_str())
    );
    assert_eq!(data.status.host.as_deref(), Some(host.as_str()));
    assert_eq!(data.status.phase, "Bound");

    // A second pod naming the volume waits, saying why.
    user.create_pod(&with_claims("web2", &["data"]))
        .await
        .unwrap();
    let web2 = pod_where(&user, "web2", "web2 to be unschedulable", |p| {
        p.status.reason.as_deref() == Some("Unschedulable")
    })
    .await;
    assert_eq!(
        web2.status.message.as_deref(),
        Some("volume \"data\" is in use by pod default/web")
    );
    assert!(web2.spec.node_name.is_none());

    // The volume cannot be deleted while attached.
    let err = user.delete_volume("default", "data").await.unwrap_err();
    assert_eq!(err.code(), Some(409), "{err}");
    assert!(
        err.to_string().contains("in use by pod default/web"),
        "{err}"
    );

    // The entitled pod's first instance gets the key, with the order to
    // format; the plain volume and one not in its spec are refused.
    let i1 = host_client
        .new_pod_instance("default", "web")
        .await
        .unwrap();
    assert_eq!(i1.pod_uid, web_uid);
    let pair = GuestKeyPair::derive(&[7; 32]);
    let resp = ask(
        host_client,
        "web",
        &i1.instance,
        &pair,
        &["data", "plain", "theirs"],
    )
    .await
    .unwrap();
    assert_eq!(resp.released.len(), 1, "{resp:?}");
    assert_eq!(resp.released[0].volume, "data");
    assert!(resp.released[0].format);
    assert!(refusal(&resp, "plain").contains("is not encrypted"));
    assert!(refusal(&resp, "theirs").contains("not a persistentVolumeClaim volume of pod"));
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(resp.sealed.as_deref().unwrap())
        .unwrap();
    let ctx = context("default", "web", &web_uid, &i1.instance);
    assert!(
        open(&pair, "default/web/x/y", &sealed).is_err(),
        "another context"
    );
    assert!(open(&GuestKeyPair::derive(&[8; 32]), &ctx, &sealed).is_err());
    let keys = open(&pair, &ctx, &sealed).unwrap();
    assert_eq!(keys.keys.len(), 1);
    let first = keys.keys[0].clone();
    assert_eq!(first.volume, "data");
    assert_eq!(first.key.len(), 64);
    assert_eq!(first.cipher, "aes-xts-plain64");
    assert_eq!(first.sector_size, 4096);
    assert!(first.format);
    assert!(
        user.get_volume("default", "data")
            .await
            .unwrap()
            .status
            .formatted
    );

    // A replay of that instance is refused.
    let resp = ask(host_client, "web", &i1.instance, &pair, &["data"])
        .await
        .unwrap();
    assert!(resp.sealed.is_none() && resp.released.is_empty());
    assert!(
        refusal(&resp, "data").contains("a replay is refused"),
        "{resp:?}"
    );

    // A new instance gets the same key, without formatting; the old one
    // is refused.
    let i2 = host_client
        .new_pod_instance("default", "web")
        .await
        .unwrap();
    let resp = ask(host_client, "web", &i1.instance, &pair, &["data"])
        .await
        .unwrap();
    assert!(refusal(&resp, "data").contains("is not the current instance"));
    let pair2 = GuestKeyPair::derive(&[9; 32]);
    let resp = ask(host_client, "web", &i2.instance, &pair2, &["data"])
        .await
        .unwrap();
    assert_eq!(resp.released.len(), 1, "{resp:?}");
    assert!(!resp.released[0].format);
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(resp.sealed.as_deref().unwrap())
        .unwrap();
    let again = open(
        &pair2,
        &context("default", "web", &web_uid, &i2.instance),
        &sealed,
    )
    .unwrap();
    assert_eq!(again.keys[0].key, first.key, "one data key per volume");
    assert!(!again.keys[0].format);

    // Not the pod's host, a user, the admin: 403, audited.
    let i3 = host_client
        .new_pod_instance("default", "web")
        .await
        .unwrap();
    for (who, client) in [
        ("other host", other_host),
        ("user", &user),
        ("admin", &ts.admin),
    ] {
        let err = ask(client, "web", &i3.instance, &pair, &["data"])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(403), "{who}: {err}");
    }
    let err = other_host
        .new_pod_instance("default", "web")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(403), "{err}");
    // A public key that is not 32 bytes is refused (and does not use up
    // the instance).
    let err = host_client
        .request_volume_keys(
            "default",
            "web",
            &VolumeKeyRequest {
                instance: i3.instance.clone(),
                public_key: b64(&[1; 31]),
                volumes: vec!["data".into()],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(400), "{err}");

    // The data key is nowhere in the store in the clear.
    assert_not_stored(&store_values(&ts).await, &first.key);

    // The plain volume is recorded formatted by its host only.
    let err = other_host
        .mark_volume_formatted("default", "plain")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(403), "{err}");
    let err = host_client
        .mark_volume_formatted("default", "data")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(409), "{err}");
    let plain = host_client
        .mark_volume_formatted("default", "plain")
        .await
        .unwrap();
    assert!(plain.status.formatted);

    // Revoked: no key again. The host (at an address nothing listens
    // on) cannot be told, which the answer says, but it is revoked.
    let status = user.revoke_volume("default", "data").await.unwrap();
    assert!(status.message.contains("revoked"), "{status:?}");
    assert!(status.message.contains("could not be told"), "{status:?}");
    assert!(
        user.get_volume("default", "data")
            .await
            .unwrap()
            .status
            .revoked_at
            .is_some()
    );
    let again = user.revoke_volume("default", "data").await.unwrap();
    assert!(again.message.contains("already revoked"), "{again:?}");
    let resp = ask(host_client, "web", &i3.instance, &pair, &["data"])
        .await
        .unwrap();
    assert!(refusal(&resp, "data").contains("was revoked"), "{resp:?}");

    // Every decision is in the audit log; the other namespace's volume
    // saw no release.
    let actions = audit_actions(&user, "default", "data").await;
    for want in ["create", "attach", "release", "refuse", "revoke", "format"] {
        if want == "format" {
            continue; // an encrypted volume's formatting is its release's
        }
        assert!(actions.iter().any(|a| a == want), "{want}: {actions:?}");
    }
    let log = user.volume_audit("default", "data").await.unwrap();
    let refusals: Vec<&str> = log
        .entries
        .iter()
        .filter(|e| e.action == "refuse")
        .filter_map(|e| e.message.as_deref())
        .collect();
    for want in [
        "replay",
        "not the current instance",
        "only the token of host",
        "not 32 bytes",
        "was revoked",
    ] {
        assert!(
            refusals.iter().any(|m| m.contains(want)),
            "{want}: {refusals:?}"
        );
    }
    let releases: Vec<_> = log
        .entries
        .iter()
        .filter(|e| e.action == "release")
        .collect();
    assert_eq!(releases.len(), 2);
    assert_eq!(releases[0].instance.as_deref(), Some(i1.instance.as_str()));
    assert_eq!(releases[0].pod_uid.as_deref(), Some(web_uid.as_str()));
    assert_eq!(releases[0].by.as_deref(), Some(host.as_str()));
    assert!(
        audit_actions(&user, "default", "plain")
            .await
            .contains(&"format".to_string())
    );
    let theirs = audit_actions(&user, "other", "theirs").await;
    assert_eq!(theirs, vec!["create"]);

    // A pod pinned to another host than its volume's stays Pending.
    let mut pinned = with_claims("pinned", &["plain"]);
    pinned.spec.node_name = Some(if host == "h1" { "h2" } else { "h1" }.into());
    user.create_pod(&pinned).await.unwrap();
    let pinned = pod_where(&user, "pinned", "pinned to say why it waits", |p| {
        p.status.reason.as_deref() == Some("Unschedulable")
    })
    .await;
    let message = pinned.status.message.unwrap();
    assert!(
        message.contains("volume \"plain\" is in use by pod default/web"),
        "{message}"
    );

    // The pod goes: its volumes are detached, and the waiting pod gets
    // the volume (on the volume's host).
    user.delete_pod("default", "web").await.unwrap();
    host_client.finalize_pod("default", "web").await.unwrap();
    let web2 = pod_where(&user, "web2", "web2 to be scheduled", |p| {
        p.spec.node_name.is_some()
    })
    .await;
    assert_eq!(web2.spec.node_name.as_deref(), Some(host.as_str()));
    let data = user.get_volume("default", "data").await.unwrap();
    assert_eq!(data.status.attached_to.unwrap().pod, "web2");
    let pinned = pod_where(&user, "pinned", "pinned to wait for the host", |p| {
        p.status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("not on host"))
    })
    .await;
    assert!(
        pinned
            .status
            .message
            .unwrap()
            .contains(&format!("its volumes are on host {host}")),
    );
    eventually(10, "plain to be detached", || async {
        let actions = audit_actions(&user, "default", "plain").await;
        actions.contains(&"detach".to_string()).then_some(())
    })
    .await;

    // Gone with its pods, a volume may be deleted; its key goes too.
    user.delete_pod("default", "web2").await.unwrap();
    user.delete_pod("default", "pinned").await.unwrap();
    let _ = host_client.finalize_pod("default", "web2").await;
    let _ = other_host.finalize_pod("default", "pinned").await;
    eventually(10, "data to be detached", || async {
        let v = user.get_volume("default", "data").await.ok()?;
        v.status.attached_to.is_none().then_some(())
    })
    .await;
    user.delete_volume("default", "data").await.unwrap();
    let values = store_values(&ts).await;
    assert!(
        !values
            .iter()
            .any(|(k, _)| k == "/registry/volume-keys/default/data"),
        "the key is deleted with its volume"
    );
    let list = user.list_volumes(Some("default")).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let err = user.list_volumes(None).await.unwrap_err();
    assert_eq!(err.code(), Some(403), "{err}");
    assert_eq!(ts.admin.list_volumes(None).await.unwrap().items.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_apply_creates_and_refuses_spec_changes() {
    let ts = TestServer::sqlite().await;
    let user = ts.client(Role::User, "alice").await;
    let pvc = PersistentVolumeClaim::new("default", "v", "1Gi", false);
    assert_eq!(user.apply_volume(&pvc).await.unwrap().outcome, "created");
    assert_eq!(user.apply_volume(&pvc).await.unwrap().outcome, "unchanged");
    let mut labelled = pvc.clone();
    labelled.metadata.labels.insert("app".into(), "db".into());
    // Status sent by a client is ignored.
    labelled.status.formatted = true;
    let applied = user.apply_volume(&labelled).await.unwrap();
    assert_eq!(applied.outcome, "configured");
    assert!(!applied.volume.status.formatted);
    let bigger = PersistentVolumeClaim::new("default", "v", "2Gi", false);
    let err = user.apply_volume(&bigger).await.unwrap_err();
    assert_eq!(err.code(), Some(422), "{err}");
    assert!(
        err.to_string().contains("resizing is not supported"),
        "{err}"
    );
    let encrypted = PersistentVolumeClaim::new("default", "v", "1Gi", true);
    let err = user.apply_volume(&encrypted).await.unwrap_err();
    assert_eq!(err.code(), Some(422), "{err}");
    let mut bad = pvc.clone();
    bad.spec.access_modes = vec!["ReadWriteMany".into()];
    bad.metadata.name = "w".into();
    let err = user.create_volume(&bad).await.unwrap_err();
    assert_eq!(err.code(), Some(422), "{err}");
    assert!(err.to_string().contains("spec.accessModes[0]"), "{err}");
    let host = ts.client(Role::Host, "h1").await;
    let err = host.create_volume(&pvc).await.unwrap_err();
    assert_eq!(err.code(), Some(403), "{err}");
    user.delete_volume("default", "v").await.unwrap();
    let err = user.get_volume("default", "v").await.unwrap_err();
    assert_eq!(err.code(), Some(404), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_rotation_keeps_keys_and_refuses_the_old_key_file() {
    use podvisor_api::client::SnapshotKey;
    use podvisor_server::ServerConfig;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = || {
        let mut c = ServerConfig::new("127.0.0.1:0", &state);
        c.host_ttl = Duration::from_secs(2);
        c.leader_ttl = Duration::from_secs(1);
        c
    };
    let token = |role, name: &'static str| {
        let state = state.clone();
        async move {
            podvisor_server::create_token(&state, None, role, name)
                .await
                .unwrap()
        }
    };
    let server = podvisor_server::start(config()).await.unwrap();
    let (user_token, host_token) = (
        token(Role::User, "alice").await,
        token(Role::Host, "h1").await,
    );
    let user = Client::new(&server.url(), Some(&user_token)).unwrap();
    let h1 = Client::new(&server.url(), Some(&host_token)).unwrap();
    h1.register_host(
        &podvisor_api::Host::new(
            "h1",
            podvisor_api::HostCapacity {
                cpu: 4000,
                memory: 4 * GI,
            },
            "http://127.0.0.1:9",
        ),
        "test-host-endpoint-secret-0123456789",
    )
    .await
    .unwrap();
    let beats = beat(&h1, "h1");
    user.create_volume(&PersistentVolumeClaim::new("default", "data", "1Gi", true))
        .await
        .unwrap();
    user.create_pod(&with_claims("web", &["data"]))
        .await
        .unwrap();
    let web = pod_where(&user, "web", "web to be scheduled", |p| {
        p.spec.node_name.is_some()
    })
    .await;
    let uid = web.metadata.uid.clone().unwrap();
    let snapshot = SnapshotKey {
        snapshot: "s1".into(),
        key: "ab".repeat(32),
    };
    h1.put_snapshot_key("default", "web", &snapshot)
        .await
        .unwrap();
    let release = |client: Client| {
        let uid = uid.clone();
        async move {
            let i = client.new_pod_instance("default", "web").await.unwrap();
            let pair = GuestKeyPair::derive(&[3; 32]);
            let resp = ask(&client, "web", &i.instance, &pair, &["data"])
                .await
                .unwrap();
            let sealed = base64::engine::general_purpose::STANDARD
                .decode(resp.sealed.as_deref().expect("a key is released"))
                .unwrap();
            open(
                &pair,
                &context("default", "web", &uid, &i.instance),
                &sealed,
            )
            .unwrap()
            .keys[0]
                .key
                .clone()
        }
    };
    let before = release(h1.clone()).await;
    beats.abort();
    drop(server);

    let kek_file = state.join("key-encryption.key");
    let old_file = dir.path().join("old.key");
    std::fs::copy(&kek_file, &old_file).unwrap();
    let rotated = podvisor_server::rotate_kek(&state, None, None)
        .await
        .unwrap();
    assert_ne!(rotated.old_id, rotated.new_id);
    assert_eq!((rotated.snapshot_keys, rotated.volume_keys), (1, 1));
    // The host's endpoint secret is sealed by the key-encryption key too.
    assert_eq!(rotated.host_endpoint_secrets, 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kek_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_ne!(
        std::fs::read(&kek_file).unwrap(),
        std::fs::read(&old_file).unwrap()
    );

    // A server with the old key file is refused.
    let mut old = config();
    old.kek_file = Some(old_file.clone());
    let err = podvisor_server::start(old).await.err().expect("refused");
    assert!(err.to_string().contains("is not the one"), "{err}");

    // With the new one, what was wrapped before still opens.
    let server = podvisor_server::start(config()).await.unwrap();
    let h1 = Client::new(&server.url(), Some(&host_token)).unwrap();
    let after = release(h1.clone()).await;
    assert_eq!(after, before, "the volume's data key did not change");
    let kept = h1.get_snapshot_key("default", "web", "s1").await.unwrap();
    assert_eq!(kept.key, snapshot.key);
    // Rotating again works from the new key.
    drop(server);
    let again = podvisor_server::rotate_kek(&state, None, None)
        .await
        .unwrap();
    assert_eq!(again.old_id, rotated.new_id);
}

/// Hosts that name the same shared storage share its volumes: a volume
/// first attached on one of them lives on the storage (not the host), the
/// next pod using it may run on another such host, never on one without
/// that storage.
#[tokio::test]
async fn volumes_on_shared_storage_follow_their_pods_to_any_host_that_has_it() {
    let ts = TestServer::sqlite().await;
    let user = ts.client(Role::User, "alice").await;
    let h1 = ts
        .host_with_storage("h1", 4000, 4 * GI, Some("nfs-a"))
        .await;
    let _b1 = beat(&h1, "h1");
    let h2 = ts
        .host_with_storage("h2", 4000, 4 * GI, Some("nfs-a"))
        .await;
    let _b2 = beat(&h2, "h2");
    let h3 = ts.host("h3", 4000, 4 * GI).await;
    let _b3 = beat(&h3, "h3");
    user.create_volume(&PersistentVolumeClaim::new("default", "data", "1Gi", false))
        .await
        .unwrap();

    let mut first = with_claims("first", &["data"]);
    first.spec.node_name = Some("h1".into());
    user.create_pod(&first).await.unwrap();
    let data = eventually(20, "data to be attached to first", || async {
        let v = user.get_volume("default", "data").await.ok()?;
        v.status.attached_to.is_some().then_some(v)
    })
    .await;
    assert_eq!(data.status.storage.as_deref(), Some("nfs-a"));
    assert_eq!(data.status.host, None);
    assert_eq!(data.status.attached_to.unwrap().host, "h1");

    // Once the first pod is gone, a pod on the other host with that
    // storage gets the volume.
    user.delete_pod("default", "first").await.unwrap();
    h1.finalize_pod("default", "first").await.unwrap();
    let mut second = with_claims("second", &["data"]);
    second.spec.node_name = Some("h2".into());
    user.create_pod(&second).await.unwrap();
    let data = eventually(20, "data to be attached to second on h2", || async {
        let v = user.get_volume("default", "data").await.ok()?;
        v.status
            .attached_to
            .as_ref()
            .is_some_and(|a| a.pod == "second" && a.host == "h2")
            .then_some(v)
    })
    .await;
    assert_eq!(data.status.storage.as_deref(), Some("nfs-a"));

    // A host without that storage cannot have it.
    user.delete_pod("default", "second").await.unwrap();
    h2.finalize_pod("default", "second").await.unwrap();
    let mut third = with_claims("third", &["data"]);
    third.spec.node_name = Some("h3".into());
    user.create_pod(&third).await.unwrap();
    let third = pod_where(&user, "third", "third to be held back", |p| {
        p.status.reason.as_deref() == Some("Unschedulable")
    })
    .await;
    assert_eq!(
        third.status.message.as_deref(),
        Some("its volumes are on storage nfs-a, not on host h3 (its spec.nodeName)")
    );
    // Left to the scheduler, a pod goes to a host with the storage.
    user.delete_pod("default", "third").await.unwrap();
    h3.finalize_pod("default", "third").await.unwrap();
    user.create_pod(&with_claims("fourth", &["data"]))
        .await
        .unwrap();
    let fourth = pod_where(&user, "fourth", "fourth to be bound", |p| {
        p.spec.node_name.is_some()
    })
    .await;
    let host = fourth.spec.node_name.unwrap();
    assert!(host == "h1" || host == "h2", "{host}");
}
