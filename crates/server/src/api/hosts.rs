//! Host endpoints: register, heartbeat (the host's store lease), list, get;
//! and the image catalog.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use podvisor_api::{
    ENDPOINT_TOKEN_HEADER, Format, Host, HostList, HostReport, HostStatus, Status,
    validate_endpoint_token, validate_host,
};
use podvisor_store::{Store, StoreError};

use super::AppState;
use crate::error::ApiError;
use crate::kek::seal_endpoint_secret;
use crate::keys;
use crate::objects::{self, Change};
use crate::tokens::Caller;

/// Lists the hosts.
#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts",
    security(("bearer" = [])),
    responses((status = 200, body = HostList), (status = 401, body = Status)))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<HostList>, ApiError> {
    let (items, revision) = objects::list::<Host>(state.store.as_ref(), keys::HOSTS).await?;
    Ok(Json(HostList {
        metadata: podvisor_api::ListMeta {
            resource_version: Some(revision.to_string()),
        },
        items,
        ..Default::default()
    }))
}

/// Reads one host.
#[utoipa::path(get, path = "/api/v1/hosts/{name}", tag = "hosts",
    params(("name" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, body = Host), (status = 404, body = Status)))]
pub async fn get_one(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Host>, ApiError> {
    objects::get::<Host>(state.store.as_ref(), &keys::host(&name))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("host {name:?} is not registered")))
}

/// Registers a host (or updates its spec when its daemon starts again) and
/// starts its heartbeat lease. Only the host's own token may.
#[utoipa::path(post, path = "/api/v1/hosts", tag = "hosts",
    request_body = Host,
    params(("x-podvisor-endpoint-token" = String, Header,
        description = "The secret the host daemon's endpoint accepts from the server when it proxies logs and exec (32-256 characters of A-Z a-z 0-9 - _); kept by the server, never served")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Registered again", body = Host),
        (status = 201, description = "Registered", body = Host),
        (status = 403, description = "Not this host's token", body = Status),
        (status = 422, description = "Invalid", body = Status)))]
pub async fn register(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("the request body is not UTF-8 text"))?;
    let host: Host = podvisor_api::parse_object(text, Format::Json)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    validate_host(&host).map_err(|errors| {
        ApiError::invalid(
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let name = host.metadata.name.clone();
    caller.require_host(&name, &format!("registering host {name:?}"))?;
    let endpoint_token = headers
        .get(ENDPOINT_TOKEN_HEADER)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "registering host {name:?}: the {ENDPOINT_TOKEN_HEADER} header is missing \
                 (the secret its daemon's endpoint accepts from the server)"
            ))
        })?
        .to_str()
        .map_err(|_| {
            ApiError::invalid(format!("the {ENDPOINT_TOKEN_HEADER} header is not text"))
        })?;
    validate_endpoint_token(endpoint_token).map_err(ApiError::invalid)?;
    let store = state.store.as_ref();
    // The secret first: once the host is ready, the proxy may need it.
    // Stored sealed by the key-encryption key, never in the clear.
    let sealed = seal_endpoint_secret(&state.kek, &name, endpoint_token)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    store
        .put(&keys::host_endpoint_token(&name), &sealed, None)
        .await?;
    ensure_lease(store, &name, state.host_ttl).await?;
    let key = keys::host(&name);
    let ready = |s: &mut HostStatus| {
        s.ready = true;
        s.reason = None;
        s.last_heartbeat_time = Some(chrono::Utc::now());
        s.lease_duration_seconds = Some(state.host_ttl.as_secs().max(1));
    };
    let updated = objects::update::<Host>(store, &key, |existing| {
        existing.spec = host.spec.clone();
        existing.metadata.labels = host.metadata.labels.clone();
        existing.metadata.annotations = host.metadata.annotations.clone();
        ready(&mut existing.status);
        Ok(Change::Write)
    })
    .await?;
    if let Some(updated) = updated {
        return Ok((StatusCode::OK, Json(updated)).into_response());
    }
    let mut new = host.clone();
    new.metadata.namespace = None;
    new.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
    new.metadata.creation_timestamp = Some(chrono::Utc::now());
    new.metadata.deletion_timestamp = None;
    new.status = HostStatus::default();
    ready(&mut new.status);
    match store.create(&key, &objects::encode(&new), None).await? {
        Ok(rev) => {
            new.metadata.resource_version = Some(rev.to_string());
            Ok((StatusCode::CREATED, Json(new)).into_response())
        }
        Err(_) => Err(ApiError::conflict(format!(
            "host {name:?} was registered concurrently; try again"
        ))),
    }
}

/// Keeps the host's lease alive, or starts a new one if it had expired.
async fn ensure_lease(
    store: &dyn Store,
    name: &str,
    ttl: std::time::Duration,
) -> Result<(), ApiError> {
    let key = keys::host_lease(name);
    if let Some(kv) = store.get(&key).await?
        && let Some(lease) = kv.lease
    {
        match store.keep_alive(lease).await {
            Ok(()) => return Ok(()),
            Err(StoreError::LeaseNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let lease = store.grant_lease(ttl).await?;
    match store
        .put(&key, lease.to_string().as_bytes(), Some(lease))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Keeps the host's lease alive and marks it ready. Only the host's own
/// token may. A body (optional) is what the host reports about itself
/// (KSM), kept in its status; without one the status keeps what the
/// last report said.
#[utoipa::path(put, path = "/api/v1/hosts/{name}/heartbeat", tag = "hosts",
    params(("name" = String, Path)),
    request_body(content = Option<HostReport>, description = "What the host reports (optional)"),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Host),
        (status = 400, description = "Not a readable report", body = Status),
        (status = 403, description = "Not this host's token", body = Status),
        (status = 404, description = "Not registered", body = Status)))]
pub async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Host>, ApiError> {
    caller.require_host(&name, &format!("heartbeat of host {name:?}"))?;
    let report: Option<HostReport> = if body.is_empty() {
        None
    } else {
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError::bad_request("the request body is not UTF-8 text"))?;
        Some(
            podvisor_api::parse_object(text, Format::Json)
                .map_err(|e| ApiError::bad_request(format!("host report: {e}")))?,
        )
    };
    let store = state.store.as_ref();
    let key = keys::host(&name);
    if store.get(&key).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "host {name:?} is not registered: POST /api/v1/hosts first"
        )));
    }
    ensure_lease(store, &name, state.host_ttl).await?;
    let ttl = state.host_ttl.as_secs().max(1);
    objects::update::<Host>(store, &key, |host| {
        host.status.ready = true;
        host.status.reason = None;
        host.status.last_heartbeat_time = Some(chrono::Utc::now());
        host.status.lease_duration_seconds = Some(ttl);
        if let Some(report) = &report {
            host.status.ksm = report.ksm.clone();
        }
        Ok(Change::Write)
    })
    .await?
    .map(Json)
    .ok_or_else(|| ApiError::not_found(format!("host {name:?} is not registered")))
}
