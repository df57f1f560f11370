//! Persistent volumes (PersistentVolumeClaims: podvisor has no separate
//! PersistentVolume, the claim is the volume): list, create, get, apply,
//! delete, revoke, the audit log, and the host's report that a plain
//! volume holds a file system.
//!
//! An encrypted volume (annotation `podvisor.io/encrypted: "true"`) gets
//! a random 64-byte data key when it is created, stored wrapped by the
//! server's key-encryption key under `/registry/volume-keys/NS/NAME`
//! (bound to the volume's uid), never served by the API: it leaves the
//! server only sealed to the entitled pod (`volume_keys`).
//!
//! Every action on a volume is appended to its audit log
//! (`/registry/volume-audit/NS/NAME/UID/SEQ`): each entry is created once
//! and never updated; the newest [`MAX_AUDIT_ENTRIES`] per volume are kept
//! (older ones are deleted as new ones arrive). The log stays in the store
//! when the volume is deleted.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use podvisor_api::{
    ListMeta, PersistentVolumeClaim, PersistentVolumeClaimList, PersistentVolumeClaimStatus,
    Quantity, Status, VolumeAuditEntry, VolumeAuditLog, parse_volume,
};
use podvisor_proto::volumes::DATA_KEY_LEN;
use podvisor_store::Store;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::AppState;
use crate::error::ApiError;
use crate::kek::KeyEncryptionKey;
use crate::keys;
use crate::objects::{self, Change};
use crate::tokens::{Caller, Role};

/// Audit entries kept per volume: older ones are deleted.
pub const MAX_AUDIT_ENTRIES: usize = 10_000;

/// A volume's data key as stored: wrapped, with what it is bound to.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredVolumeKey {
    /// The uid of the volume it belongs to.
    pub volume_uid: String,
    /// Id of the key-encryption key that wrapped it.
    pub kek: String,
    /// Nonce, ciphertext and tag, hex.
    pub wrapped: String,
}

/// What a volume's wrapped key is bound to (the associated data).
pub(crate) fn key_owner(namespace: &str, name: &str, uid: &str) -> Vec<u8> {
    format!("podvisor volume key\0{namespace}/{name}\0{uid}").into_bytes()
}

/// A fresh data key for volume `uid`, wrapped, as stored.
pub(crate) fn new_stored_key(
    kek: &KeyEncryptionKey,
    namespace: &str,
    name: &str,
    uid: &str,
) -> Result<Vec<u8>, ApiError> {
    let mut key = [0u8; DATA_KEY_LEN];
    podvisor_store::fill_random(&mut key)
        .map_err(|e| ApiError::internal(format!("making a volume key: {e}")))?;
    let wrapped = kek.wrap(&key, &key_owner(namespace, name, uid));
    key.zeroize();
    let wrapped = wrapped.map_err(|e| ApiError::internal(podvisor_errors::chain(&e)))?;
    let stored = StoredVolumeKey {
        volume_uid: uid.to_string(),
        kek: kek.id().to_string(),
        wrapped: hex::encode(wrapped),
    };
    Ok(serde_json::to_vec(&stored).expect("a stored key serializes"))
}

/// The uid of a volume ("" if it has none).
pub(crate) fn uid_of(pvc: &PersistentVolumeClaim) -> String {
    pvc.metadata.uid.clone().unwrap_or_default()
}

/// Appends `entry` to the audit log of volume `namespace/name` (uid
/// `uid`): a new key, created once; then drops the oldest entries beyond
/// [`MAX_AUDIT_ENTRIES`].
pub(crate) async fn audit(
    store: &dyn Store,
    namespace: &str,
    name: &str,
    uid: &str,
    entry: &VolumeAuditEntry,
) -> Result<(), ApiError> {
    let prefix = keys::volume_audit(namespace, name, uid);
    let value = serde_json::to_vec(entry).expect("an audit entry serializes");
    for _ in 0..64 {
        let (kvs, _) = store.list(&prefix).await?;
        let next = kvs
            .last()
            .and_then(|kv| kv.key.strip_prefix(&prefix)?.parse::<u64>().ok())
            .map_or(0, |n| n + 1);
        if store
            .create(&format!("{prefix}{next:020}"), &value, None)
            .await?
            .is_err()
        {
            continue;
        }
        let excess = (kvs.len() + 1).saturating_sub(MAX_AUDIT_ENTRIES);
        for kv in kvs.iter().take(excess) {
            store.delete(&kv.key).await?;
        }
        return Ok(());
    }
    Err(ApiError::conflict(format!(
        "the audit log of volume {namespace}/{name}: too many concurrent entries, try again"
    )))
}

/// [`audit`], logging instead of failing (for actions already done).
pub(crate) async fn audit_or_warn(
    store: &dyn Store,
    namespace: &str,
    name: &str,
    uid: &str,
    entry: &VolumeAuditEntry,
) {
    if let Err(e) = audit(store, namespace, name, uid, entry).await {
        tracing::warn!(volume = %format!("{namespace}/{name}"), action = %entry.action, error = %e,
            "cannot append to a volume's audit log");
    }
}

/// Who a caller is, for the audit log: the host's name, or "user" (with
/// the user's name).
pub(crate) fn by(caller: &Caller) -> String {
    match caller.role {
        Role::Host => caller.name.clone(),
        Role::Admin => "user admin".to_string(),
        Role::User => format!("user {}", caller.name),
    }
}

pub fn not_found(namespace: &str, name: &str) -> ApiError {
    ApiError::not_found(format!(
        "persistentvolumeclaim {name:?} not found in namespace {namespace:?}"
    ))
}

/// Lists the volumes of every namespace (admins and hosts).
#[utoipa::path(get, path = "/api/v1/persistentvolumeclaims", tag = "volumes",
    security(("bearer" = [])),
    responses(
        (status = 200, body = PersistentVolumeClaimList),
        (status = 401, description = "No valid token", body = Status),
        (status = 403, description = "A user token (list a namespace instead)", body = Status)))]
pub async fn list_all(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<PersistentVolumeClaimList>, ApiError> {
    if caller.role == Role::User {
        return Err(ApiError::forbidden(format!(
            "listing the volumes of every namespace is for admins and hosts, not user {:?}: list one namespace",
            caller.name
        )));
    }
    list(&state, keys::VOLUMES).await
}

/// Lists the volumes of one namespace.
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}/persistentvolumeclaims", tag = "volumes",
    params(("namespace" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, body = PersistentVolumeClaimList),
        (status = 401, description = "No valid token", body = Status)))]
pub async fn list_namespaced(
    State(state): State<AppState>,
    caller: Caller,
    Path(namespace): Path<String>,
) -> Result<Json<PersistentVolumeClaimList>, ApiError> {
    caller.require_namespace(&namespace)?;
    list(&state, &keys::volumes_in(&namespace)).await
}

async fn list(state: &AppState, prefix: &str) -> Result<Json<PersistentVolumeClaimList>, ApiError> {
    let (items, revision) =
        objects::list::<PersistentVolumeClaim>(state.store.as_ref(), prefix).await?;
    Ok(Json(PersistentVolumeClaimList {
        api_version: "v1".into(),
        kind: "PersistentVolumeClaimList".into(),
        metadata: ListMeta {
            resource_version: Some(revision.to_string()),
        },
        items,
    }))
}

/// Reads a PersistentVolumeClaim from a request body (JSON, or YAML with
/// `Content-Type: application/yaml`) for namespace `namespace`, off the
/// async workers.
async fn volume_from_body(
    headers: &HeaderMap,
    body: Bytes,
    namespace: &str,
) -> Result<PersistentVolumeClaim, ApiError> {
    let pvc = super::limits::parse_object(headers, body, parse_volume).await?;
    if let Some(ns) = &pvc.metadata.namespace
        && ns != namespace
    {
        return Err(ApiError::bad_request(format!(
            "metadata.namespace {ns:?} does not match the namespace of the URL ({namespace:?})"
        )));
    }
    Ok(pvc)
}

/// A volume as first stored: server-set metadata and status (what the
/// client sent as status is ignored).
fn new_volume(mut pvc: PersistentVolumeClaim, namespace: &str) -> PersistentVolumeClaim {
    pvc.metadata.namespace = Some(namespace.to_string());
    pvc.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
    pvc.metadata.creation_timestamp = Some(chrono::Utc::now());
    pvc.metadata.deletion_timestamp = None;
    pvc.metadata.resource_version = None;
    let mut capacity = std::collections::BTreeMap::new();
    if let Some(size) = pvc.storage() {
        capacity.insert("storage".to_string(), size.clone());
    }
    pvc.status = PersistentVolumeClaimStatus {
        phase: "Pending".into(),
        capacity,
        encrypted: pvc.wants_encryption(),
        ..Default::default()
    };
    pvc
}

/// Stores a new volume (and, for an encrypted one, its wrapped key):
/// `Ok(None)` if one of that name exists.
async fn create_volume(
    state: &AppState,
    caller: &Caller,
    pvc: PersistentVolumeClaim,
    namespace: &str,
) -> Result<Option<PersistentVolumeClaim>, ApiError> {
    let mut pvc = new_volume(pvc, namespace);
    let name = pvc.metadata.name.clone();
    let uid = uid_of(&pvc);
    let store = state.store.as_ref();
    // The key is made before the object is stored so that making it
    // cannot fail afterwards; it is stored once the name is ours. (A
    // server dying in between leaves an encrypted volume without a key:
    // never formatted, so its first release makes one.)
    let stored_key = if pvc.status.encrypted {
        Some(new_stored_key(&state.kek, namespace, &name, &uid)?)
    } else {
        None
    };
    let key = keys::volume(namespace, &name);
    let rev = match store.create(&key, &objects::encode(&pvc), None).await? {
        Ok(rev) => rev,
        Err(_) => return Ok(None),
    };
    if let Some(stored) = stored_key {
        store
            .put(&keys::volume_key(namespace, &name), &stored, None)
            .await?;
    }
    pvc.metadata.resource_version = Some(rev.to_string());
    let size = pvc.storage().map_or_else(String::new, Quantity::to_string);
    let kind = if pvc.status.encrypted {
        "encrypted"
    } else {
        "plain"
    };
    audit(
        store,
        namespace,
        &name,
        &uid,
        &VolumeAuditEntry::new("create", &by(caller), format!("{kind} volume of {size}")),
    )
    .await?;
    Ok(Some(pvc))
}

fn answer(code: StatusCode, pvc: PersistentVolumeClaim, outcome: &'static str) -> Response {
    let mut resp = (code, Json(pvc)).into_response();
    resp.headers_mut()
        .insert("x-podvisor-apply", HeaderValue::from_static(outcome));
    resp
}

/// Creates a volume.
#[utoipa::path(post, path = "/api/v1/namespaces/{namespace}/persistentvolumeclaims", tag = "volumes",
    params(("namespace" = String, Path)),
    request_body(content(
        (PersistentVolumeClaim = "application/json"),
        (PersistentVolumeClaim = "application/yaml"))),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = PersistentVolumeClaim),
        (status = 400, description = "Not a readable PersistentVolumeClaim (names the field at fault)", body = Status),
        (status = 409, description = "A volume of that name exists", body = Status),
        (status = 422, description = "Invalid (names the field at fault)", body = Status)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(namespace): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_user()?;
    caller.require_namespace(&namespace)?;
    let pvc = volume_from_body(&headers, body, &namespace).await?;
    let name = pvc.metadata.name.clone();
    match create_volume(&state, &caller, pvc, &namespace).await? {
        Some(pvc) => Ok(answer(StatusCode::CREATED, pvc, "created")),
        None => Err(ApiError::already_exists(format!(
            "persistentvolumeclaim {name:?} already exists in namespace {namespace:?}"
        ))),
    }
}

/// Reads one volume.
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}", tag = "volumes",
    params(("namespace" = String, Path), ("name" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, body = PersistentVolumeClaim), (status = 404, body = Status)))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<PersistentVolumeClaim>, ApiError> {
    caller.require_namespace(&namespace)?;
    objects::get::<PersistentVolumeClaim>(state.store.as_ref(), &keys::volume(&namespace, &name))
        .await?
        .map(Json)
        .ok_or_else(|| not_found(&namespace, &name))
}

/// Creates the volume, or updates its labels and annotations: its spec
/// (size included: resizing is not supported) and whether it is
/// encrypted never change. The answer's `X-Podvisor-Apply` header says
/// `created`, `configured` or `unchanged`.
#[utoipa::path(put, path = "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}", tag = "volumes",
    params(("namespace" = String, Path), ("name" = String, Path)),
    request_body(content(
        (PersistentVolumeClaim = "application/json"),
        (PersistentVolumeClaim = "application/yaml"))),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Updated or unchanged", body = PersistentVolumeClaim),
        (status = 201, description = "Created", body = PersistentVolumeClaim),
        (status = 400, description = "Not a readable PersistentVolumeClaim", body = Status),
        (status = 409, description = "Changed meanwhile", body = Status),
        (status = 422, description = "Invalid, or a change of the spec", body = Status)))]
pub async fn apply(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_user()?;
    caller.require_namespace(&namespace)?;
    let pvc = volume_from_body(&headers, body, &namespace).await?;
    if pvc.metadata.name != name {
        return Err(ApiError::bad_request(format!(
            "metadata.name {:?} does not match the name in the URL ({name:?})",
            pvc.metadata.name
        )));
    }
    let key = keys::volume(&namespace, &name);
    let store = state.store.as_ref();
    for _ in 0..64 {
        let Some(kv) = store.get(&key).await? else {
            match create_volume(&state, &caller, pvc.clone(), &namespace).await? {
                Some(created) => return Ok(answer(StatusCode::CREATED, created, "created")),
                None => continue,
            }
        };
        let current: PersistentVolumeClaim = objects::decode(&kv)?;
        if let Some(problem) = pvc.change_problem(&current) {
            return Err(ApiError::invalid(format!(
                "persistentvolumeclaim {namespace}/{name}: {problem}"
            )));
        }
        if pvc.metadata.labels == current.metadata.labels
            && pvc.metadata.annotations == current.metadata.annotations
        {
            return Ok(answer(StatusCode::OK, current, "unchanged"));
        }
        let mut next = current.clone();
        next.metadata.labels = pvc.metadata.labels.clone();
        next.metadata.annotations = pvc.metadata.annotations.clone();
        if let Some(updated) = objects::update_if(store, &key, &next, kv.mod_revision).await? {
            return Ok(answer(StatusCode::OK, updated, "configured"));
        }
    }
    Err(ApiError::conflict(format!(
        "persistentvolumeclaim {name:?}: too many concurrent changes, try again"
    )))
}

/// Deletes a volume and its key (its data on the host's disk is the
/// host's to remove). Refused while a pod has it attached.
#[utoipa::path(delete, path = "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}", tag = "volumes",
    params(("namespace" = String, Path), ("name" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Deleted", body = Status),
        (status = 404, body = Status),
        (status = 409, description = "Attached to a pod (the message names it)", body = Status)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<Status>, ApiError> {
    caller.require_user()?;
    caller.require_namespace(&namespace)?;
    let key = keys::volume(&namespace, &name);
    let store = state.store.as_ref();
    for _ in 0..64 {
        let kv = store
            .get(&key)
            .await?
            .ok_or_else(|| not_found(&namespace, &name))?;
        let pvc: PersistentVolumeClaim = objects::decode(&kv)?;
        if let Some(a) = &pvc.status.attached_to {
            return Err(ApiError::conflict(format!(
                "persistentvolumeclaim {namespace}/{name} is in use by pod {namespace}/{} on host {:?}: delete the pod first",
                a.pod, a.host
            )));
        }
        if !store.delete_if(&key, kv.mod_revision).await? {
            continue;
        }
        let uid = uid_of(&pvc);
        // Only this incarnation's key (a volume of the same name made
        // since has its own).
        let key_key = keys::volume_key(&namespace, &name);
        if let Some(kv) = store.get(&key_key).await? {
            let ours = serde_json::from_slice::<StoredVolumeKey>(&kv.value)
                .map(|k| k.volume_uid == uid)
                .unwrap_or(true);
            if ours {
                store.delete_if(&key_key, kv.mod_revision).await?;
            }
        }
        audit_or_warn(
            store,
            &namespace,
            &name,
            &uid,
            &VolumeAuditEntry::new("delete", &by(&caller), "volume deleted"),
        )
        .await;
        return Ok(Json(Status::success(format!(
            "persistentvolumeclaim {namespace}/{name} deleted"
        ))));
    }
    Err(ApiError::conflict(format!(
        "persistentvolumeclaim {name:?}: too many concurrent changes, try again"
    )))
}

/// Revokes a volume: no key of it is released again (`status.revokedAt`;
/// again is a no-op), and if it is attached, its pod's host is told to
/// close it (`POST {address}/pods/NS/POD/volumes/NAME/close`). A host
/// that cannot be reached does not fail the revocation: the message says
/// so (the host also sees it in the volume list).
#[utoipa::path(post, path = "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}/revoke", tag = "volumes",
    params(("namespace" = String, Path), ("name" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Revoked (the message says what the pod's host did)", body = Status),
        (status = 403, description = "A host token", body = Status),
        (status = 404, body = Status)))]
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<Status>, ApiError> {
    caller.require_user()?;
    caller.require_namespace(&namespace)?;
    let store = state.store.as_ref();
    let mut already = false;
    let pvc =
        objects::update::<PersistentVolumeClaim>(store, &keys::volume(&namespace, &name), |pvc| {
            already = pvc.status.revoked_at.is_some();
            if already {
                return Ok(Change::Keep);
            }
            pvc.status.revoked_at = Some(chrono::Utc::now());
            Ok(Change::Write)
        })
        .await?
        .ok_or_else(|| not_found(&namespace, &name))?;
    let mut message = if already {
        format!("persistentvolumeclaim {namespace}/{name} was already revoked")
    } else {
        format!("persistentvolumeclaim {namespace}/{name} revoked: no key of it will be released")
    };
    let mut entry = VolumeAuditEntry::new("revoke", &by(&caller), String::new());
    if let Some(a) = &pvc.status.attached_to {
        entry.pod = Some(a.pod.clone());
        entry.pod_uid = Some(a.pod_uid.clone());
        match super::proxy::close_volume(&state, &namespace, &a.pod, &name).await {
            Ok((code, status)) if code.is_success() => message.push_str(&format!(
                "; host {:?} closed it in pod {}: {}",
                a.host, a.pod, status.message
            )),
            Ok((code, status)) => message.push_str(&format!(
                "; host {:?} did not close it in pod {} (HTTP {code}): {}",
                a.host, a.pod, status.message
            )),
            Err(e) => message.push_str(&format!(
                "; host {:?} could not be told to close it in pod {}: {}",
                a.host, a.pod, e.message
            )),
        }
    }
    entry.message = Some(message.clone());
    audit(store, &namespace, &name, &uid_of(&pvc), &entry).await?;
    Ok(Json(Status::success(message)))
}

/// The volume's audit log, oldest first.
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}/audit", tag = "volumes",
    params(("namespace" = String, Path), ("name" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, body = VolumeAuditLog), (status = 404, body = Status)))]
pub async fn audit_log(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<VolumeAuditLog>, ApiError> {
    caller.require_namespace(&namespace)?;
    let store = state.store.as_ref();
    let pvc: PersistentVolumeClaim = objects::get(store, &keys::volume(&namespace, &name))
        .await?
        .ok_or_else(|| not_found(&namespace, &name))?;
    let (kvs, _) = store
        .list(&keys::volume_audit(&namespace, &name, &uid_of(&pvc)))
        .await?;
    let entries = kvs
        .iter()
        .map(|kv| {
            serde_json::from_slice(&kv.value).map_err(|e| {
                ApiError::internal(format!(
                    "the store holds an unreadable audit entry at {}: {e}",
                    kv.key
                ))
            })
        })
        .collect::<Result<Vec<VolumeAuditEntry>, _>>()?;
    Ok(Json(VolumeAuditLog {
        volume: name,
        namespace,
        entries,
    }))
}

/// For the host the volume is attached on: a plain volume now holds a
/// file system (it is never formatted again). An encrypted volume is
/// recorded as formatted when its key is released with the order to
/// format, so this is refused for one.
#[utoipa::path(post, path = "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}/formatted", tag = "volumes",
    params(("namespace" = String, Path), ("name" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Recorded (or it was already)", body = PersistentVolumeClaim),
        (status = 403, description = "Not the token of the host it is attached on", body = Status),
        (status = 404, body = Status),
        (status = 409, description = "Not attached, or encrypted", body = Status)))]
pub async fn formatted(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<PersistentVolumeClaim>, ApiError> {
    let store = state.store.as_ref();
    let mut newly = false;
    let mut attachment = None;
    let pvc = objects::update::<PersistentVolumeClaim>(
        store,
        &keys::volume(&namespace, &name),
        |pvc| {
            let Some(a) = &pvc.status.attached_to else {
                return Err(ApiError::conflict(format!(
                    "persistentvolumeclaim {namespace}/{name} is not attached to a pod"
                )));
            };
            if caller.role != Role::Host || caller.name != a.host {
                return Err(ApiError::forbidden(format!(
                    "recording persistentvolumeclaim {namespace}/{name} as formatted: only the token of host {:?}, where it is attached, may do this",
                    a.host
                )));
            }
            if pvc.status.encrypted {
                return Err(ApiError::conflict(format!(
                    "persistentvolumeclaim {namespace}/{name} is encrypted: it is recorded as formatted when its key is released"
                )));
            }
            attachment = Some(a.clone());
            if pvc.status.formatted {
                return Ok(Change::Keep);
            }
            newly = true;
            pvc.status.formatted = true;
            Ok(Change::Write)
        },
    )
    .await?
    .ok_or_else(|| not_found(&namespace, &name))?;
    if newly {
        let mut entry = VolumeAuditEntry::new("format", &by(&caller), "host made its file system");
        if let Some(a) = attachment {
            entry.pod = Some(a.pod);
            entry.pod_uid = Some(a.pod_uid);
        }
        audit(store, &namespace, &name, &uid_of(&pvc), &entry).await?;
    }
    Ok(Json(pvc))
}
