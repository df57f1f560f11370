//! The keys of hibernated pods' snapshots: stored for, and released only
//! to, the host the pod is on (its host token), for that pod (same uid)
//! and that snapshot; wrapped by the server's key-encryption key in the
//! store. Not even an admin token reads them.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use podvisor_api::client::SnapshotKey;
use podvisor_api::{Pod, Status};
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use super::AppState;
use super::pods::not_found;
use crate::error::ApiError;
use crate::keys;
use crate::objects;
use crate::tokens::{Caller, Role};

/// A key as stored: wrapped, with what it is bound to.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredKey {
    pub pod_uid: String,
    pub host: String,
    pub snapshot: String,
    /// Id of the key-encryption key that wrapped it.
    pub kek: String,
    /// Nonce, ciphertext and tag, hex.
    pub wrapped: String,
}

/// What a wrapped key is bound to (the associated data).
pub(crate) fn owner(namespace: &str, name: &str, uid: &str, snapshot: &str) -> Vec<u8> {
    format!("podvisor snapshot key\0{namespace}/{name}\0{uid}\0{snapshot}").into_bytes()
}

/// The pod, if the caller is the host it is assigned to.
async fn pod_of_caller(
    state: &AppState,
    caller: &Caller,
    namespace: &str,
    name: &str,
    what: &str,
) -> Result<Pod, ApiError> {
    let pod: Pod = objects::get(state.store.as_ref(), &keys::pod(namespace, name))
        .await?
        .ok_or_else(|| not_found(namespace, name))?;
    let host = pod.spec.node_name.clone().ok_or_else(|| {
        ApiError::conflict(format!("pod {namespace}/{name} is not assigned to a host"))
    })?;
    if caller.role != Role::Host || caller.name != host {
        return Err(ApiError::forbidden(format!(
            "{what}: only the token of host {host:?}, which runs pod {namespace}/{name}, may do this"
        )));
    }
    Ok(pod)
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

/// For the pod's host: keeps the key of the pod's snapshot (replacing
/// the one kept before).
#[utoipa::path(put, path = "/api/v1/namespaces/{namespace}/pods/{name}/snapshotkey", tag = "pods",
    params(("namespace" = String, Path), ("name" = String, Path)),
    request_body = SnapshotKey,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Kept", body = Status),
        (status = 400, description = "Not a snapshot key", body = Status),
        (status = 403, description = "Not the token of the pod's host", body = Status),
        (status = 404, body = Status)))]
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Status>, ApiError> {
    let what = format!("storing the snapshot key of pod {namespace}/{name}");
    let pod = pod_of_caller(&state, &caller, &namespace, &name, &what).await?;
    let key: SnapshotKey = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("not a snapshot key: {e}")))?;
    if let Some(problem) = key.problem() {
        return Err(ApiError::bad_request(problem));
    }
    let secret = hex::decode(&key.key).expect("checked: 64 hex digits");
    let uid = uid_of(&pod);
    let wrapped = state
        .kek
        .wrap(&secret, &owner(&namespace, &name, &uid, &key.snapshot))
        .map_err(|e| ApiError::internal(podvisor_errors::chain(&e)))?;
    let stored = StoredKey {
        pod_uid: uid,
        host: caller.name.clone(),
        snapshot: key.snapshot.clone(),
        kek: state.kek.id().to_string(),
        wrapped: hex::encode(wrapped),
    };
    let value = serde_json::to_vec(&stored).expect("a stored key serializes");
    state
        .store
        .put(&keys::snapshot_key(&namespace, &name), &value, None)
        .await?;
    Ok(Json(Status::new(
        200,
        "Success",
        format!(
            "key of snapshot {} of pod {namespace}/{name} kept",
            key.snapshot
        ),
    )))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetParams {
    /// The snapshot whose key is wanted.
    pub snapshot: String,
}

/// For the pod's host: the key of the pod's snapshot `snapshot`.
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}/pods/{name}/snapshotkey", tag = "pods",
    params(("namespace" = String, Path), ("name" = String, Path), GetParams),
    security(("bearer" = [])),
    responses(
        (status = 200, body = SnapshotKey),
        (status = 403, description = "Not the token of the pod's host", body = Status),
        (status = 404, description = "No such pod, or no key for that snapshot of it", body = Status)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    Query(params): Query<GetParams>,
) -> Result<Json<SnapshotKey>, ApiError> {
    let what = format!("reading the snapshot key of pod {namespace}/{name}");
    let pod = pod_of_caller(&state, &caller, &namespace, &name, &what).await?;
    let missing = || {
        ApiError::not_found(format!(
            "no key of snapshot {:?} of pod {namespace}/{name}",
            params.snapshot
        ))
    };
    let kv = state
        .store
        .get(&keys::snapshot_key(&namespace, &name))
        .await?
        .ok_or_else(missing)?;
    let stored: StoredKey = serde_json::from_slice(&kv.value).map_err(|e| {
        ApiError::internal(format!("the store holds an unreadable snapshot key: {e}"))
    })?;
    let uid = uid_of(&pod);
    if stored.pod_uid != uid || stored.snapshot != params.snapshot {
        return Err(missing());
    }
    let secret = hex::decode(&stored.wrapped)
        .ok()
        .and_then(|w| {
            state
                .kek
                .unwrap(&w, &owner(&namespace, &name, &uid, &stored.snapshot))
        })
        .ok_or_else(|| {
            ApiError::internal(format!(
                "the key of snapshot {:?} of pod {namespace}/{name} does not unwrap (wrapped by {}, this server has {})",
                stored.snapshot,
                stored.kek,
                state.kek.id()
            ))
        })?;
    Ok(Json(SnapshotKey {
        snapshot: stored.snapshot,
        key: hex::encode(secret),
    }))
}

/// For the pod's host: forgets the key (its snapshot is gone).
#[utoipa::path(delete, path = "/api/v1/namespaces/{namespace}/pods/{name}/snapshotkey", tag = "pods",
    params(("namespace" = String, Path), ("name" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Forgotten (or there was none)", body = Status),
        (status = 403, description = "Not the token of the pod's host", body = Status),
        (status = 404, body = Status)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<Status>, ApiError> {
    let what = format!("deleting the snapshot key of pod {namespace}/{name}");
    pod_of_caller(&state, &caller, &namespace, &name, &what).await?;
    state
        .store
        .delete(&keys::snapshot_key(&namespace, &name))
        .await?;
    Ok(Json(Status::new(
        200,
        "Success",
        format!("snapshot key of pod {namespace}/{name} deleted"),
    )))
}
