//! Logs and exec, proxied to the host daemon running the pod
//! (`{address}/pods/{ns}/{name}/log|exec`, same query).

use axum::body::Body;
use axum::extract::ws::{Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use podvisor_api::{Host, Pod, Status};
use tokio_tungstenite::tungstenite::Message as TMessage;

use super::AppState;
use crate::error::ApiError;
use crate::keys;
use crate::objects;
use crate::tokens::Caller;

/// The daemon URL of the host running a pod, for `what` (`log`, `exec`).
async fn host_url(
    state: &AppState,
    namespace: &str,
    name: &str,
    what: &str,
    query: Option<&str>,
) -> Result<(String, url::Url), ApiError> {
    let store = state.store.as_ref();
    let pod = objects::get::<Pod>(store, &keys::pod(namespace, name))
        .await?
        .ok_or_else(|| super::pods::not_found(namespace, name))?;
    let host_name = pod.spec.node_name.ok_or_else(|| {
        let nothing = if what == "log" {
            "it has no logs yet"
        } else {
            "there is nothing to exec into yet"
        };
        ApiError::bad_request(format!(
            "pod {namespace}/{name} is not assigned to a host yet ({}): {nothing}",
            pod.status.reason.as_deref().unwrap_or("Pending")
        ))
    })?;
    let host = objects::get::<Host>(store, &keys::host(&host_name))
        .await?
        .ok_or_else(|| {
            ApiError::unavailable(format!(
                "pod {namespace}/{name} is on host {host_name:?}, which is not registered"
            ))
        })?;
    if !host.status.ready {
        return Err(ApiError::unavailable(format!(
            "pod {namespace}/{name} is on host {host_name:?}, which is NotReady ({})",
            host.status.reason.as_deref().unwrap_or("no heartbeat")
        )));
    }
    let base = host.spec.address.trim_end_matches('/');
    let mut url =
        url::Url::parse(&format!("{base}/pods/{namespace}/{name}/{what}")).map_err(|e| {
            ApiError::internal(format!(
                "host {host_name:?} has an unusable address {base:?}: {e}"
            ))
        })?;
    url.set_query(query.filter(|q| !q.is_empty()));
    Ok((host_name, url))
}

/// A container's output, streamed from its host (`follow=true` keeps
/// streaming).
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}/pods/{name}/log", tag = "pods",
    params(("namespace" = String, Path), ("name" = String, Path),
        ("container" = Option<String>, Query, description = "The container (needed when the pod has several)"),
        ("follow" = Option<bool>, Query, description = "Keep streaming until the container ends"),
        ("tailLines" = Option<u64>, Query, description = "Only the last N lines")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The log, streamed", content_type = "text/plain", body = String),
        (status = 400, description = "The pod is not on a host", body = Status),
        (status = 404, body = Status),
        (status = 502, description = "The host daemon cannot be reached", body = Status),
        (status = 503, description = "The pod's host is NotReady", body = Status)))]
pub async fn log(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    caller.require_user()?;
    let (host, url) = host_url(&state, &namespace, &name, "log", query.as_deref()).await?;
    let resp =
        state.http.get(url.clone()).send().await.map_err(|e| {
            ApiError::bad_gateway(format!("cannot reach host {host:?} at {url}: {e}"))
        })?;
    let code = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain; charset=utf-8")
        .to_string();
    let body = Body::from_stream(resp.bytes_stream());
    Ok((
        code,
        [(axum::http::header::CONTENT_TYPE, content_type)],
        body,
    )
        .into_response())
}

/// Runs a command in a container: a WebSocket proxied to the pod's host.
/// Binary frames start with the channel: 0 stdin, 1 stdout, 2 stderr,
/// 3 status (`{"exitCode": N}`), 4 resize (`{"Width": w, "Height": h}`),
/// 255 close (`[255, 0]`: end of stdin).
#[utoipa::path(get, path = "/api/v1/namespaces/{namespace}/pods/{name}/exec", tag = "pods",
    params(("namespace" = String, Path), ("name" = String, Path),
        ("container" = Option<String>, Query, description = "The container (needed when the pod has several)"),
        ("command" = Vec<String>, Query, description = "The command and its arguments, one parameter each"),
        ("stdin" = Option<bool>, Query, description = "Send stdin"),
        ("tty" = Option<bool>, Query, description = "Give the command a terminal")),
    security(("bearer" = [])),
    responses(
        (status = 101, description = "Switching to the WebSocket"),
        (status = 400, description = "Not a WebSocket request, or the pod is not on a host", body = Status),
        (status = 404, body = Status),
        (status = 502, description = "The host daemon cannot be reached", body = Status),
        (status = 503, description = "The pod's host is NotReady", body = Status)))]
pub async fn exec(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    caller.require_user()?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::bad_request(format!(
            "exec needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket): {e}"
        ))
    })?;
    let (host, mut url) = host_url(&state, &namespace, &name, "exec", query.as_deref()).await?;
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    let _ = url.set_scheme(scheme);
    // Connect to the host first, so that its refusal reaches the client as
    // an HTTP error.
    let upstream = match tokio_tungstenite::connect_async(url.as_str()).await {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let code =
                StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = resp.body().clone().unwrap_or_default();
            let status = serde_json::from_slice::<Status>(&body).unwrap_or_else(|_| {
                Status::new(
                    code.as_u16(),
                    "HostError",
                    format!("host {host:?}: {}", String::from_utf8_lossy(&body).trim()),
                )
            });
            return Ok((code, axum::Json(status)).into_response());
        }
        Err(e) => {
            return Err(ApiError::bad_gateway(format!(
                "cannot reach host {host:?} at {url}: {e}"
            )));
        }
    };
    Ok(upgrade.on_upgrade(move |client| pump(client, upstream)))
}

type Upstream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Copies frames both ways until either side closes.
async fn pump(client: WebSocket, upstream: Upstream) {
    let (mut client_tx, mut client_rx) = client.split();
    let (mut up_tx, mut up_rx) = upstream.split();
    let to_host = async {
        while let Some(Ok(msg)) = client_rx.next().await {
            let msg = match msg {
                AxMessage::Binary(b) => TMessage::Binary(b),
                AxMessage::Text(t) => TMessage::Text(t.as_str().into()),
                AxMessage::Ping(p) => TMessage::Ping(p),
                AxMessage::Pong(p) => TMessage::Pong(p),
                AxMessage::Close(_) => break,
            };
            if up_tx.send(msg).await.is_err() {
                break;
            }
        }
        let _ = up_tx.close().await;
    };
    let to_client = async {
        while let Some(Ok(msg)) = up_rx.next().await {
            let msg = match msg {
                TMessage::Binary(b) => AxMessage::Binary(b),
                TMessage::Text(t) => AxMessage::Text(t.as_str().into()),
                TMessage::Ping(p) => AxMessage::Ping(p),
                TMessage::Pong(p) => AxMessage::Pong(p),
                TMessage::Close(_) => break,
                TMessage::Frame(_) => continue,
            };
            if client_tx.send(msg).await.is_err() {
                break;
            }
        }
        let _ = client_tx.close().await;
    };
    // The exec ends when the host is done (status sent, then close); the
    // client going away ends it too.
    tokio::select! {
        _ = to_client => {}
        _ = to_host => {}
    }
}
