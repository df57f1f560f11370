//! The release of encrypted volumes' keys to the pod entitled to them.
//!
//! Each start of a pod's VM gets an instance id from the server (asked
//! for by the pod's host: `POST .../pods/NAME/instances`; a new one
//! replaces the old). The host relays the guest's key request
//! (`POST .../pods/NAME/volumekeys`: the instance, the guest's X25519
//! public key, the volumes); the server releases a volume's key only if
//! the caller is the token of the host the pod is assigned to, the
//! instance is the pod's current one and no key was released for it
//! before (marked with a compare-and-swap before answering), and the
//! volume is a persistentVolumeClaim volume of the pod's spec, exists in
//! its namespace, is encrypted, not revoked and attached to this pod.
//! The keys released are sealed together to the guest's public key under
//! the context `namespace/pod/uid/instance`
//! (`podvisor_proto::volumes::seal`): the host sees only ciphertext.
//! Every release and refusal is in the volume's audit log.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use base64::Engine as _;
use podvisor_api::{
    PersistentVolumeClaim, Pod, PodInstance, RefusedVolume, ReleasedVolume, Status,
    VolumeAuditEntry, VolumeKeyRequest, VolumeKeyResponse,
};
use podvisor_proto::volumes::{self as sealing, ReleasedKey, ReleasedKeys};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::AppState;
use super::pods::not_found;
use super::volumes::{StoredVolumeKey, audit, key_owner, new_stored_key, uid_of};
use crate::error::ApiError;
use crate::keys;
use crate::objects::{self, Change};
use crate::tokens::{Caller, Role};

/// Reason of a refused volume.
pub const KEY_DENIED: &str = "KeyDenied";

/// A pod's current instance as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredInstance {
    pub instance: String,
    pub pod_uid: String,
    pub host: String,
    pub issued: chrono::DateTime<chrono::Utc>,
    /// Keys were released for it: never again.
    pub released: bool,
}

/// Whether the caller is the token of the host `pod` is assigned to (not
/// a user's, not the admin's): the refusal if not.
fn host_problem(caller: &Caller, pod: &Pod, namespace: &str, what: &str) -> Option<String> {
    let name = &pod.metadata.name;
    match &pod.spec.node_name {
        None => Some(format!(
            "{what}: pod {namespace}/{name} is not assigned to a host"
        )),
        Some(host) if caller.role != Role::Host || &caller.name != host => Some(format!(
            "{what}: only the token of host {host:?}, which runs pod {namespace}/{name}, may do this ({})",
            match caller.role {
                Role::Host => format!("the token is host {:?}'s", caller.name),
                Role::User => format!("not user {:?}", caller.name),
                Role::Admin => "not the admin".to_string(),
            }
        )),
        Some(_) => None,
    }
}

/// For the pod's host, at each start of the pod's VM: a fresh instance
/// id, now the pod's current one (the one before it can no longer get
/// keys).
#[utoipa::path(post, path = "/api/v1/namespaces/{namespace}/pods/{name}/instances", tag = "volumes",
    params(("namespace" = String, Path), ("name" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The new instance", body = PodInstance),
        (status = 403, description = "Not the token of the pod's host", body = Status),
        (status = 404, body = Status)))]
pub async fn new_instance(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<PodInstance>, ApiError> {
    let store = state.store.as_ref();
    let pod: Pod = objects::get(store, &keys::pod(&namespace, &name))
        .await?
        .ok_or_else(|| not_found(&namespace, &name))?;
    let what = format!("starting an instance of pod {namespace}/{name}");
    if let Some(problem) = host_problem(&caller, &pod, &namespace, &what) {
        return Err(if pod.spec.node_name.is_none() {
            ApiError::conflict(problem)
        } else {
            ApiError::forbidden(problem)
        });
    }
    let instance = podvisor_store::random_hex(16)
        .map_err(|e| ApiError::internal(format!("making an instance id: {e}")))?;
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
    let stored = StoredInstance {
        instance: instance.clone(),
        pod_uid: pod_uid.clone(),
        host: caller.name.clone(),
        issued: chrono::Utc::now(),
        released: false,
    };
    store
        .put(
            &keys::pod_instance(&namespace, &name),
            &serde_json::to_vec(&stored).expect("an instance serializes"),
            None,
        )
        .await?;
    Ok(Json(PodInstance { instance, pod_uid }))
}

fn refused(volume: &str, message: impl Into<String>) -> RefusedVolume {
    RefusedVolume {
        volume: volume.to_string(),
        reason: KEY_DENIED.into(),
        message: message.into(),
    }
}

/// Marks `instance` of the pod as used, if it is the pod's current one
/// and unused: else why not.
async fn consume_instance(
    state: &AppState,
    namespace: &str,
    name: &str,
    pod_uid: &str,
    instance: &str,
) -> Result<Result<(), String>, ApiError> {
    let store = state.store.as_ref();
    let key = keys::pod_instance(namespace, name);
    for _ in 0..64 {
        let Some(kv) = store.get(&key).await? else {
            return Ok(Err(format!(
                "instance {instance:?} is not the current instance of pod {namespace}/{name} (it has none)"
            )));
        };
        let mut current: StoredInstance = serde_json::from_slice(&kv.value).map_err(|e| {
            ApiError::internal(format!(
                "the store holds an unreadable instance at {key}: {e}"
            ))
        })?;
        if current.instance != instance || current.pod_uid != pod_uid {
            return Ok(Err(format!(
                "instance {instance:?} is not the current instance of pod {namespace}/{name}"
            )));
        }
        if current.released {
            return Ok(Err(format!(
                "keys were already released to instance {instance:?} of pod {namespace}/{name}: a replay is refused"
            )));
        }
        current.released = true;
        let value = serde_json::to_vec(&current).expect("an instance serializes");
        if store.update(&key, &value, kv.mod_revision).await?.is_ok() {
            return Ok(Ok(()));
        }
    }
    Err(ApiError::conflict(format!(
        "instance of pod {namespace}/{name}: too many concurrent changes, try again"
    )))
}

/// The audit entry of a decision about one volume.
fn entry(
    action: &str,
    caller: &Caller,
    pod: &str,
    pod_uid: &str,
    instance: &str,
    message: String,
) -> VolumeAuditEntry {
    let mut e = VolumeAuditEntry::new(action, &super::volumes::by(caller), message);
    e.pod = Some(pod.to_string());
    e.pod_uid = Some(pod_uid.to_string());
    e.instance = Some(instance.to_string());
    e
}

/// For the pod's host, relaying the pod's request: the keys of the pod's
/// encrypted volumes, sealed to the guest's public key, and per volume
/// what was decided.
#[utoipa::path(post, path = "/api/v1/namespaces/{namespace}/pods/{name}/volumekeys", tag = "volumes",
    params(("namespace" = String, Path), ("name" = String, Path)),
    request_body = VolumeKeyRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Released and refused volumes", body = VolumeKeyResponse),
        (status = 400, description = "Not a key request (or a public key that is not 32 bytes)", body = Status),
        (status = 403, description = "Not the token of the pod's host", body = Status),
        (status = 404, body = Status)))]
pub async fn release(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<VolumeKeyResponse>, ApiError> {
    let store = state.store.as_ref();
    let request: VolumeKeyRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("not a volume key request: {e}")))?;
    let mut volumes: Vec<String> = Vec::new();
    for v in &request.volumes {
        if !volumes.contains(v) {
            volumes.push(v.clone());
        }
    }
    if volumes.len() > sealing::MAX_VOLUMES {
        return Err(ApiError::bad_request(format!(
            "{} volumes asked for: at most {} at once",
            volumes.len(),
            sealing::MAX_VOLUMES
        )));
    }
    let pod: Pod = objects::get(store, &keys::pod(&namespace, &name))
        .await?
        .ok_or_else(|| not_found(&namespace, &name))?;
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
    let instance = request.instance.clone();
    // Refuses every named volume that exists, in its audit log.
    let refuse_all = |message: String| {
        let (volumes, caller, namespace, name, pod_uid, instance) = (
            volumes.clone(),
            caller.clone(),
            namespace.clone(),
            name.clone(),
            pod_uid.clone(),
            instance.clone(),
        );
        async move {
            for v in &volumes {
                if let Some(pvc) =
                    objects::get::<PersistentVolumeClaim>(store, &keys::volume(&namespace, v))
                        .await?
                {
                    let e = entry(
                        "refuse",
                        &caller,
                        &name,
                        &pod_uid,
                        &instance,
                        message.clone(),
                    );
                    audit(store, &namespace, v, &uid_of(&pvc), &e).await?;
                }
            }
            Ok::<_, ApiError>(volumes.iter().map(|v| refused(v, &message)).collect())
        }
    };
    let what = format!("releasing volume keys to pod {namespace}/{name}");
    if let Some(problem) = host_problem(&caller, &pod, &namespace, &what) {
        let _: Vec<RefusedVolume> = refuse_all(problem.clone()).await?;
        return Err(ApiError::forbidden(problem));
    }
    let public_key = base64::engine::general_purpose::STANDARD
        .decode(request.public_key.trim())
        .ok()
        .filter(|k| k.len() == sealing::PUBLIC_KEY_LEN);
    let Some(public_key) = public_key else {
        let problem = format!(
            "the public key is not {} bytes of standard base64",
            sealing::PUBLIC_KEY_LEN
        );
        let _: Vec<RefusedVolume> = refuse_all(problem.clone()).await?;
        return Err(ApiError::bad_request(problem));
    };
    if let Err(problem) = consume_instance(&state, &namespace, &name, &pod_uid, &instance).await? {
        return Ok(Json(VolumeKeyResponse {
            sealed: None,
            released: Vec::new(),
            refused: refuse_all(problem).await?,
        }));
    }

    let claims = pod.spec.claims();
    let mut keys_out = ReleasedKeys { keys: Vec::new() };
    let mut response = VolumeKeyResponse {
        sealed: None,
        released: Vec::new(),
        refused: Vec::new(),
    };
    for volume in &volumes {
        match release_one(&state, &namespace, &name, &pod_uid, &claims, volume).await? {
            Decision::Release(key) => {
                let e = entry(
                    "release",
                    &caller,
                    &name,
                    &pod_uid,
                    &instance,
                    if key.format {
                        "key released with the order to format".into()
                    } else {
                        "key released".into()
                    },
                );
                audit(store, &namespace, volume, &key.1, &e).await?;
                response.released.push(ReleasedVolume {
                    volume: volume.clone(),
                    format: key.format,
                });
                keys_out.keys.push(key.0);
            }
            Decision::Refuse(message, uid) => {
                if let Some(uid) = uid {
                    let e = entry(
                        "refuse",
                        &caller,
                        &name,
                        &pod_uid,
                        &instance,
                        message.clone(),
                    );
                    audit(store, &namespace, volume, &uid, &e).await?;
                }
                response.refused.push(refused(volume, message));
            }
        }
    }
    if !keys_out.keys.is_empty() {
        let mut ikm = [0u8; 32];
        podvisor_store::fill_random(&mut ikm)
            .map_err(|e| ApiError::internal(format!("making sealing randomness: {e}")))?;
        let context = sealing::context(&namespace, &name, &pod_uid, &instance);
        let sealed = sealing::seal(&public_key, &context, &keys_out, &ikm);
        ikm.zeroize();
        let sealed = sealed.map_err(|e| ApiError::internal(format!("sealing the keys: {e}")))?;
        response.sealed = Some(base64::engine::general_purpose::STANDARD.encode(sealed));
    }
    // `keys_out` zeroizes its keys when dropped.
    drop(keys_out);
    Ok(Json(response))
}

/// A released key and the volume's uid.
struct Released(ReleasedKey, String);

impl std::ops::Deref for Released {
    type Target = ReleasedKey;
    fn deref(&self) -> &ReleasedKey {
        &self.0
    }
}

enum Decision {
    Release(Released),
    /// Why, and the volume's uid if it exists (for its audit log).
    Refuse(String, Option<String>),
}

/// Decides one volume: every check again inside the compare-and-swap
/// that records it as formatted, so a revocation or detachment racing
/// with the release wins.
async fn release_one(
    state: &AppState,
    namespace: &str,
    pod: &str,
    pod_uid: &str,
    claims: &[&str],
    volume: &str,
) -> Result<Decision, ApiError> {
    let store = state.store.as_ref();
    if !claims.contains(&volume) {
        let uid = objects::get::<PersistentVolumeClaim>(store, &keys::volume(namespace, volume))
            .await?
            .map(|p| uid_of(&p));
        return Ok(Decision::Refuse(
            format!(
                "volume {volume:?} is not a persistentVolumeClaim volume of pod {namespace}/{pod}"
            ),
            uid,
        ));
    }
    let key = keys::volume(namespace, volume);
    let Some(pvc) = objects::get::<PersistentVolumeClaim>(store, &key).await? else {
        return Ok(Decision::Refuse(
            format!("persistentvolumeclaim {volume:?} not found in namespace {namespace:?}"),
            None,
        ));
    };
    let uid = uid_of(&pvc);
    if let Some(problem) = check(&pvc, namespace, pod, pod_uid, volume) {
        return Ok(Decision::Refuse(problem, Some(uid)));
    }
    // The key first, so that a volume is never recorded formatted
    // without its key going out.
    let mut data = match data_key(state, namespace, volume, &uid, !pvc.status.formatted).await? {
        Ok(data) => data,
        Err(problem) => return Ok(Decision::Refuse(problem, Some(uid))),
    };
    let mut problem = None;
    let mut format = false;
    let updated = objects::update::<PersistentVolumeClaim>(store, &key, |now| {
        format = false;
        problem = if uid_of(now) != uid {
            Some(format!(
                "volume {namespace}/{volume} was deleted and made again meanwhile"
            ))
        } else {
            check(now, namespace, pod, pod_uid, volume)
        };
        if problem.is_some() || now.status.formatted {
            return Ok(Change::Keep);
        }
        format = true;
        now.status.formatted = true;
        Ok(Change::Write)
    })
    .await;
    let refusal = match updated {
        Err(e) => {
            data.zeroize();
            return Err(e);
        }
        Ok(None) => Some(format!(
            "persistentvolumeclaim {volume:?} not found in namespace {namespace:?}"
        )),
        Ok(Some(_)) => problem,
    };
    if let Some(problem) = refusal {
        data.zeroize();
        return Ok(Decision::Refuse(problem, Some(uid)));
    }
    Ok(Decision::Release(Released(
        ReleasedKey {
            volume: volume.to_string(),
            key: data,
            cipher: sealing::CIPHER.into(),
            sector_size: sealing::SECTOR_SIZE,
            format,
        },
        uid,
    )))
}

/// Why `pvc` may not be released to the pod, if it may not.
fn check(
    pvc: &PersistentVolumeClaim,
    namespace: &str,
    pod: &str,
    pod_uid: &str,
    volume: &str,
) -> Option<String> {
    if !pvc.status.encrypted {
        return Some(format!(
            "volume {namespace}/{volume} is not encrypted: it has no key"
        ));
    }
    if let Some(t) = pvc.status.revoked_at {
        return Some(format!(
            "volume {namespace}/{volume} was revoked at {}",
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ));
    }
    match &pvc.status.attached_to {
        Some(a) if a.pod_uid == pod_uid => None,
        Some(a) => Some(format!(
            "volume {namespace}/{volume} is attached to pod {namespace}/{} (uid {}), not to this pod {namespace}/{pod}",
            a.pod, a.pod_uid
        )),
        None => Some(format!(
            "volume {namespace}/{volume} is not attached to pod {namespace}/{pod}"
        )),
    }
}

/// The volume's data key, unwrapped. A volume never formatted before
/// (`formatting`) that has no key of its own (its creation was cut short)
/// gets a fresh one: no data was ever written with another.
async fn data_key(
    state: &AppState,
    namespace: &str,
    volume: &str,
    uid: &str,
    formatting: bool,
) -> Result<Result<Vec<u8>, String>, ApiError> {
    let store = state.store.as_ref();
    let key_key = keys::volume_key(namespace, volume);
    let owner = key_owner(namespace, volume, uid);
    for _ in 0..2 {
        let stored = match store.get(&key_key).await? {
            Some(kv) => Some(
                serde_json::from_slice::<StoredVolumeKey>(&kv.value).map_err(|e| {
                    ApiError::internal(format!(
                        "the store holds an unreadable volume key at {key_key}: {e}"
                    ))
                })?,
            ),
            None => None,
        };
        match stored {
            Some(stored) if stored.volume_uid == uid => {
                let key = hex::decode(&stored.wrapped)
                    .ok()
                    .and_then(|w| state.kek.unwrap(&w, &owner));
                return Ok(key.ok_or_else(|| {
                    format!(
                        "the key of volume {namespace}/{volume} does not unwrap (wrapped by {}, this server has {})",
                        stored.kek,
                        state.kek.id()
                    )
                }));
            }
            _ if formatting => {
                let fresh = new_stored_key(&state.kek, namespace, volume, uid)?;
                store.put(&key_key, &fresh, None).await?;
            }
            _ => {
                return Ok(Err(format!(
                    "volume {namespace}/{volume} has no key (it holds data: it cannot get a new one)"
                )));
            }
        }
    }
    Ok(Err(format!(
        "volume {namespace}/{volume}: its key could not be stored"
    )))
}
