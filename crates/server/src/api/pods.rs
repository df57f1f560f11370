//! Pod endpoints: list/watch, create, get, apply, delete, status.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use podvisor_api::{Format, Pod, PodList, PodStatus, Status, parse_pod};
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::watch::{PodSelector, serve_watch};
use crate::error::ApiError;
use crate::keys;
use crate::objects::{self, Change};
use crate::tokens::Caller;

/// Query of a list: a watch, selectors.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Stream changes (newline-delimited JSON WatchEvents) instead of listing.
    pub watch: Option<bool>,
    /// With watch: the revision to stream changes after (absent or 0: an
    /// ADDED event per current pod first).
    pub resource_version: Option<String>,
    /// `spec.nodeName=HOST`: only pods assigned to HOST.
    pub field_selector: Option<String>,
    /// `key=value[,key=value...]`: only pods with these labels.
    pub label_selector: Option<String>,
}

/// Lists (or watches) the pods of every namespace.
#[utoipa::path(get, path = "/api/v1/pods", tag = "pods", params(ListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The pods (or, with watch=true, newline-delimited WatchEvents)", body = PodList),
        (status = 400, description = "An unsupported selector", body = Status),
        (status = 401, description = "No valid token", body = Status)))]
pub async fn list_all(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    list(state, &caller, None, params).await
}

/// Lists (or watches) the pods of one namespace.
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}/pods", tag = "pods",
    params(("namespace" = String, Path), ListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The pods (or, with watch=true, newline-delimited WatchEvents)", body = PodList),
        (status = 400, description = "An unsupported selector", body = Status),
        (status = 401, description = "No valid token", body = Status)))]
pub async fn list_namespaced(
    State(state): State<AppState>,
    caller: Caller,
    Path(namespace): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    list(state, &caller, Some(namespace), params).await
}

async fn list(
    state: AppState,
    caller: &Caller,
    namespace: Option<String>,
    params: ListParams,
) -> Result<Response, ApiError> {
    let mut selector = PodSelector::parse(
        namespace,
        params.field_selector.as_deref(),
        params.label_selector.as_deref(),
    )?;
    // A user limited to namespaces lists (and watches) only theirs.
    if let Some(ns) = &selector.namespace {
        caller.require_namespace(ns)?;
    }
    if caller.role == crate::tokens::Role::User {
        selector.visible_namespaces = caller.namespaces.clone();
    }
    if params.watch.unwrap_or(false) {
        let from = match params.resource_version.as_deref() {
            None | Some("") | Some("0") => None,
            Some(rv) => Some(rv.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion {rv:?} is not a revision number"))
            })?),
        };
        if let Some(rev) = from {
            super::watch::reached(&state.pods, rev, super::watch::FUTURE_REVISION_WAIT).await?;
        }
        return Ok(serve_watch(state.pods.clone(), selector, from));
    }
    let prefix = match &selector.namespace {
        Some(ns) => keys::pods_in(ns),
        None => keys::PODS.to_string(),
    };
    let (pods, revision) = objects::list::<Pod>(state.store.as_ref(), &prefix).await?;
    let items = pods.into_iter().filter(|p| selector.matches(p)).collect();
    let list = PodList {
        metadata: podvisor_api::ListMeta {
            resource_version: Some(revision.to_string()),
        },
        items,
        ..Default::default()
    };
    Ok(Json(list).into_response())
}

/// Reads a Pod from a request body (JSON, or YAML with
/// `Content-Type: application/yaml`) for namespace `namespace`, off the
/// async workers.
async fn pod_from_body(headers: &HeaderMap, body: Bytes, namespace: &str) -> Result<Pod, ApiError> {
    let pod = super::limits::parse_object(headers, body, parse_pod).await?;
    if let Some(ns) = &pod.metadata.namespace
        && ns != namespace
    {
        return Err(ApiError::bad_request(format!(
            "metadata.namespace {ns:?} does not match the namespace of the URL ({namespace:?})"
        )));
    }
    Ok(pod)
}

/// A pod as first stored: server-set metadata, empty status.
fn new_pod(mut pod: Pod, namespace: &str) -> Pod {
    pod.metadata.namespace = Some(namespace.to_string());
    pod.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
    pod.metadata.creation_timestamp = Some(chrono::Utc::now());
    pod.metadata.deletion_timestamp = None;
    pod.metadata.resource_version = None;
    pod.status = PodStatus::default();
    pod
}

/// Creates a pod.
#[utoipa::path(post, path = "/api/v1/namespaces/{namespace}/pods", tag = "pods",
    params(("namespace" = String, Path)),
    request_body(content(
        (Pod = "application/json"),
        (Pod = "application/yaml"))),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = Pod),
        (status = 400, description = "Not a readable Pod (names the field at fault)", body = Status),
        (status = 409, description = "A pod of that name exists", body = Status),
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
    let pod = new_pod(pod_from_body(&headers, body, &namespace).await?, &namespace);
    let key = keys::pod(&namespace, &pod.metadata.name);
    match state
        .store
        .create(&key, &objects::encode(&pod), None)
        .await?
    {
        Ok(rev) => Ok(created(pod, rev)),
        Err(_) => Err(ApiError::already_exists(format!(
            "pod {:?} already exists in namespace {namespace:?}",
            pod.metadata.name
        ))),
    }
}

fn created(mut pod: Pod, rev: i64) -> Response {
    pod.metadata.resource_version = Some(rev.to_string());
    applied(StatusCode::CREATED, pod, "created")
}

fn applied(code: StatusCode, pod: Pod, outcome: &'static str) -> Response {
    let mut resp = (code, Json(pod)).into_response();
    resp.headers_mut()
        .insert("x-podvisor-apply", HeaderValue::from_static(outcome));
    resp
}

/// Reads one pod.
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}/pods/{name}", tag = "pods",
    params(("namespace" = String, Path), ("name" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, body = Pod), (status = 404, body = Status)))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<Pod>, ApiError> {
    caller.require_namespace(&namespace)?;
    objects::get::<Pod>(state.store.as_ref(), &keys::pod(&namespace, &name))
        .await?
        .map(Json)
        .ok_or_else(|| not_found(&namespace, &name))
}

pub fn not_found(namespace: &str, name: &str) -> ApiError {
    ApiError::not_found(format!("pod {name:?} not found in namespace {namespace:?}"))
}

/// Creates the pod or updates it: labels and annotations may always
/// change; the spec only until the pod is assigned to a host. The answer's
/// `X-Podvisor-Apply` header says `created`, `configured` or `unchanged`.
#[utoipa::path(put, path = "/api/v1/namespaces/{namespace}/pods/{name}", tag = "pods",
    params(("namespace" = String, Path), ("name" = String, Path)),
    request_body(content(
        (Pod = "application/json"),
        (Pod = "application/yaml"))),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Updated or unchanged", body = Pod),
        (status = 201, description = "Created", body = Pod),
        (status = 400, description = "Not a readable Pod", body = Status),
        (status = 409, description = "Changed meanwhile (resourceVersion) or being deleted", body = Status),
        (status = 422, description = "Invalid, or a spec change of a scheduled pod", body = Status)))]
pub async fn apply(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_user()?;
    caller.require_namespace(&namespace)?;
    let pod = pod_from_body(&headers, body, &namespace).await?;
    if pod.metadata.name != name {
        return Err(ApiError::bad_request(format!(
            "metadata.name {:?} does not match the name in the URL ({name:?})",
            pod.metadata.name
        )));
    }
    let key = keys::pod(&namespace, &name);
    let store = state.store.as_ref();
    for _ in 0..64 {
        let Some(kv) = store.get(&key).await? else {
            let new = new_pod(pod.clone(), &namespace);
            match store.create(&key, &objects::encode(&new), None).await? {
                Ok(rev) => return Ok(created(new, rev)),
                Err(_) => continue,
            }
        };
        let current: Pod = objects::decode(&kv)?;
        if current.metadata.deletion_timestamp.is_some() {
            return Err(ApiError::conflict(format!(
                "pod {name:?} is being deleted; apply again once it is gone"
            )));
        }
        if let Some(rv) = &pod.metadata.resource_version
            && rv != &kv.mod_revision.to_string()
        {
            return Err(ApiError::conflict(format!(
                "pod {name:?} changed since resourceVersion {rv} (it is at {}); read it again",
                kv.mod_revision
            )));
        }
        let mut spec = pod.spec.clone();
        if spec.node_name.is_none() {
            spec.node_name = current.spec.node_name.clone();
        }
        if spec != current.spec && current.spec.node_name.is_some() {
            let changed = changed_paths(&current.spec, &spec);
            return Err(ApiError::invalid(format!(
                "pod spec is immutable once the pod is assigned to a host, delete and re-create (changed: {})",
                changed.join(", ")
            )));
        }
        if spec == current.spec
            && pod.metadata.labels == current.metadata.labels
            && pod.metadata.annotations == current.metadata.annotations
        {
            return Ok(applied(StatusCode::OK, current, "unchanged"));
        }
        let mut next = current.clone();
        next.spec = spec;
        next.metadata.labels = pod.metadata.labels.clone();
        next.metadata.annotations = pod.metadata.annotations.clone();
        if let Some(updated) = objects::update_if(store, &key, &next, kv.mod_revision).await? {
            return Ok(applied(StatusCode::OK, updated, "configured"));
        }
    }
    Err(ApiError::conflict(format!(
        "pod {name:?}: too many concurrent changes, try again"
    )))
}

/// Paths of the fields that differ between two values (`spec.containers[0].image`).
fn changed_paths(a: &podvisor_api::PodSpec, b: &podvisor_api::PodSpec) -> Vec<String> {
    fn walk(a: &serde_json::Value, b: &serde_json::Value, path: String, out: &mut Vec<String>) {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let (va, vb) = (
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                    );
                    walk(va, vb, format!("{path}.{k}"), out);
                }
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                    walk(va, vb, format!("{path}[{i}]"), out);
                }
            }
            _ if a != b => out.push(path),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let to_value = |s: &podvisor_api::PodSpec| serde_json::to_value(s).unwrap_or_default();
    walk(&to_value(a), &to_value(b), "spec".into(), &mut out);
    out
}

/// Query of a delete.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteParams {
    /// For the host running the pod: it is stopped, remove the object.
    pub finalize: Option<bool>,
}

/// Deletes a pod: at once if no host runs it (unassigned, or its host is
/// NotReady), else marks it (deletionTimestamp) for its host to stop and
/// finalize.
#[utoipa::path(delete, path = "/api/v1/namespaces/{namespace}/pods/{name}", tag = "pods",
    params(("namespace" = String, Path), ("name" = String, Path), DeleteParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Removed", body = Status),
        (status = 202, description = "Marked for deletion; its host stops it", body = Pod),
        (status = 403, description = "finalize by anyone but the pod's host", body = Status),
        (status = 404, body = Status)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    Query(params): Query<DeleteParams>,
) -> Result<Response, ApiError> {
    let key = keys::pod(&namespace, &name);
    let store = state.store.as_ref();
    let finalize = params.finalize.unwrap_or(false);
    if !finalize {
        caller.require_user()?;
        caller.require_namespace(&namespace)?;
    }
    for _ in 0..64 {
        let kv = store
            .get(&key)
            .await?
            .ok_or_else(|| not_found(&namespace, &name))?;
        let pod: Pod = objects::decode(&kv)?;
        let remove_now = if finalize {
            if let Some(host) = &pod.spec.node_name {
                caller.require_host(host, &format!("finalizing pod {namespace}/{name}"))?;
            } else if caller.role != crate::tokens::Role::Admin {
                return Err(ApiError::conflict(format!(
                    "pod {namespace}/{name} is not assigned to a host: delete it without finalize"
                )));
            }
            true
        } else {
            match &pod.spec.node_name {
                None => true,
                Some(host) => !host_ready(&state, host).await?,
            }
        };
        if remove_now {
            if store.delete_if(&key, kv.mod_revision).await? {
                // Its snapshot's key goes with it (a server dying right
                // here leaves a wrapped key bound to a uid nothing has).
                store.delete(&keys::snapshot_key(&namespace, &name)).await?;
                store.delete(&keys::pod_instance(&namespace, &name)).await?;
                let status = Status::new(200, "Success", format!("pod {namespace}/{name} deleted"));
                return Ok((StatusCode::OK, Json(status)).into_response());
            }
            continue;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Ok((StatusCode::ACCEPTED, Json(pod)).into_response());
        }
        let mut marked = pod.clone();
        marked.metadata.deletion_timestamp = Some(chrono::Utc::now());
        if let Some(updated) = objects::update_if(store, &key, &marked, kv.mod_revision).await? {
            return Ok((StatusCode::ACCEPTED, Json(updated)).into_response());
        }
    }
    Err(ApiError::conflict(format!(
        "pod {name:?}: too many concurrent changes, try again"
    )))
}

/// Whether `host` is registered and ready.
pub async fn host_ready(state: &AppState, host: &str) -> Result<bool, ApiError> {
    let host = objects::get::<podvisor_api::Host>(state.store.as_ref(), &keys::host(host)).await?;
    Ok(host.is_some_and(|h| h.status.ready))
}

/// For the host running the pod: replaces its status. The body is
/// `{"status": {...}}` (a whole Pod is accepted; only its status is used).
#[utoipa::path(put, path = "/api/v1/namespaces/{namespace}/pods/{name}/status", tag = "pods",
    params(("namespace" = String, Path), ("name" = String, Path)),
    request_body(content = Object, description = "`{\"status\": PodStatus}`"),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Pod),
        (status = 400, description = "Not a readable status", body = Status),
        (status = 403, description = "Not the token of the pod's host", body = Status),
        (status = 404, body = Status)))]
pub async fn update_status(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Pod>, ApiError> {
    super::limits::check_nesting(&body, Format::Json)?;
    let status: PodStatus = super::limits::off_workers(move || {
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
        let status_value = value
            .get("status")
            .cloned()
            .ok_or_else(|| ApiError::bad_request("the body has no \"status\" field"))?;
        podvisor_api::parse_object(&status_value.to_string(), Format::Json)
            .map_err(|e| ApiError::bad_request(format!("status: {e}")))
    })
    .await??;
    let key = keys::pod(&namespace, &name);
    let what = format!("updating the status of pod {namespace}/{name}");
    let mut denied = None;
    let updated = objects::update::<Pod>(state.store.as_ref(), &key, |pod| {
        match &pod.spec.node_name {
            Some(host) => {
                if let Err(e) = caller.require_host(host, &what) {
                    denied = Some(e);
                    return Ok(Change::Keep);
                }
            }
            None => {
                return Err(ApiError::conflict(format!(
                    "pod {namespace}/{name} is not assigned to a host"
                )));
            }
        }
        if pod.status == status {
            return Ok(Change::Keep);
        }
        pod.status = status.clone();
        Ok(Change::Write)
    })
    .await?;
    if let Some(e) = denied {
        return Err(e);
    }
    updated
        .map(Json)
        .ok_or_else(|| not_found(&namespace, &name))
}
