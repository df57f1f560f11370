//! Logs, exec, hibernation and wake, proxied to the host daemon running
//! the pod (`{address}/pods/{ns}/{name}/log|exec|hibernate|wake`, same
//! query).

use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use podvisor_api::{Host, Pod, Status};
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::AppState;
use crate::error::ApiError;
use crate::keys;
use crate::objects;
use crate::tokens::Caller;

/// Where to reach the host daemon running a pod.
struct Upstream {
    /// The host's name.
    host: String,
    /// The daemon URL for the request.
    url: url::Url,
    /// `Bearer SECRET`: what the daemon's endpoint accepts from the server.
    authorization: String,
}

/// What is asked of the pod's host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Log,
    Exec,
    Hibernate,
    Wake,
    /// Close a volume (it was revoked).
    CloseVolume,
}

impl Action {
    /// The last part of the daemon's path.
    fn path(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Exec => "exec",
            Action::Hibernate => "hibernate",
            Action::Wake => "wake",
            Action::CloseVolume => "volumes",
        }
    }

    /// Why it cannot be done for a pod that has no host yet.
    fn nothing_yet(self) -> &'static str {
        match self {
            Action::Log => "it has no logs yet",
            Action::Exec => "there is nothing to exec into yet",
            Action::Hibernate => "it has no VM to hibernate yet",
            Action::Wake => "it has not started, so there is nothing to wake",
            Action::CloseVolume => "it has no volume open",
        }
    }
}

/// The daemon URL of the host running a pod, for `action`, and the
/// secret its endpoint accepts.
async fn host_url(
    state: &AppState,
    namespace: &str,
    name: &str,
    action: Action,
    query: Option<&str>,
) -> Result<Upstream, ApiError> {
    host_url_at(state, namespace, name, action, action.path(), query).await
}

/// [`host_url`] for the daemon path `{address}/pods/NS/NAME/{what}`.
async fn host_url_at(
    state: &AppState,
    namespace: &str,
    name: &str,
    action: Action,
    what: &str,
    query: Option<&str>,
) -> Result<Upstream, ApiError> {
    let store = state.store.as_ref();
    let pod = objects::get::<Pod>(store, &keys::pod(namespace, name))
        .await?
        .ok_or_else(|| super::pods::not_found(namespace, name))?;
    if matches!(action, Action::Hibernate | Action::Wake)
        && pod.metadata.deletion_timestamp.is_some()
    {
        return Err(ApiError::conflict(format!(
            "pod {namespace}/{name} is being deleted: it cannot {} now",
            action.path()
        )));
    }
    let host_name = pod.spec.node_name.ok_or_else(|| {
        ApiError::bad_request(format!(
            "pod {namespace}/{name} is not assigned to a host yet ({}): {}",
            pod.status.reason.as_deref().unwrap_or("Pending"),
            action.nothing_yet()
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
    let secret = store
        .get(&keys::host_endpoint_token(&host_name))
        .await?
        .ok_or_else(|| {
            ApiError::unavailable(format!(
                "pod {namespace}/{name} is on host {host_name:?}, which registered no endpoint \
                 secret: restart its daemon"
            ))
        })?;
    Ok(Upstream {
        host: host_name,
        url,
        authorization: format!("Bearer {}", String::from_utf8_lossy(&secret.value)),
    })
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
    caller.require_namespace(&namespace)?;
    let Upstream {
        host,
        url,
        authorization,
    } = host_url(&state, &namespace, &name, Action::Log, query.as_deref()).await?;
    let resp = state
        .http
        .get(url.clone())
        .header(reqwest::header::AUTHORIZATION, authorization)
        .send()
        .await
        .map_err(|e| ApiError::bad_gateway(format!("cannot reach host {host:?} at {url}: {e}")))?;
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
    caller.require_namespace(&namespace)?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::bad_request(format!(
            "exec needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket): {e}"
        ))
    })?;
    let Upstream {
        host,
        mut url,
        authorization,
    } = host_url(&state, &namespace, &name, Action::Exec, query.as_deref()).await?;
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    let _ = url.set_scheme(scheme);
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ApiError::internal(format!("host {host:?}: bad exec URL {url}: {e}")))?;
    request.headers_mut().insert(
        axum::http::header::AUTHORIZATION,
        authorization
            .parse()
            .map_err(|_| ApiError::internal(format!("host {host:?}: unusable endpoint secret")))?,
    );
    // Connect to the host first, so that its refusal reaches the client as
    // an HTTP error.
    let upstream = match tokio_tungstenite::connect_async(request).await {
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

/// How long the host may take to hibernate or wake a pod: a VM under TCG
/// saves or loads in 1-3 s; a wake that falls back to a cold restart
/// takes longer.
const HOST_ACTION_TIMEOUT: Duration = Duration::from_secs(90);
/// The most the server reads of the host's answer (a Status).
const MAX_HOST_ANSWER: usize = 64 << 10;

/// Hibernates a pod: its host saves the VM's state, sealed, to its disk
/// and stops the VM's QEMU. The pod wakes on the first network request
/// for it, on exec or `logs -f`, or on `.../wake`; while it sleeps its
/// status has the condition `Hibernated` (`True`). The host's answer is
/// relayed: a Status (`pod default/web hibernated: ...`) once it is
/// done, or the host's refusal.
#[utoipa::path(post, path = "/api/v1/namespaces/{namespace}/pods/{name}/hibernate", tag = "pods",
    params(("namespace" = String, Path), ("name" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Hibernated", body = Status),
        (status = 400, description = "The pod is not on a host", body = Status),
        (status = 403, description = "Not a user's or the admin's token", body = Status),
        (status = 404, body = Status),
        (status = 409, description = "The pod is being deleted", body = Status),
        (status = 501, description = "The host daemon has no such endpoint", body = Status),
        (status = 502, description = "The host daemon cannot be reached, or its answer is unusable", body = Status),
        (status = 503, description = "The pod's host is NotReady", body = Status),
        (status = 504, description = "The host daemon did not answer within 90 s", body = Status),
        (status = "default", description = "The host daemon's refusal, relayed", body = Status)))]
pub async fn hibernate(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    host_action(&state, &caller, &namespace, &name, Action::Hibernate).await
}

/// Wakes a hibernated pod: its host loads the VM's state again (or, if
/// that fails, restarts the pod). The host's answer is relayed: a Status
/// (`pod default/web woken: ...`) once the pod runs, or the host's
/// refusal.
#[utoipa::path(post, path = "/api/v1/namespaces/{namespace}/pods/{name}/wake", tag = "pods",
    params(("namespace" = String, Path), ("name" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Awake", body = Status),
        (status = 400, description = "The pod is not on a host", body = Status),
        (status = 403, description = "Not a user's or the admin's token", body = Status),
        (status = 404, body = Status),
        (status = 409, description = "The pod is being deleted", body = Status),
        (status = 501, description = "The host daemon has no such endpoint", body = Status),
        (status = 502, description = "The host daemon cannot be reached, or its answer is unusable", body = Status),
        (status = 503, description = "The pod's host is NotReady", body = Status),
        (status = 504, description = "The host daemon did not answer within 90 s", body = Status),
        (status = "default", description = "The host daemon's refusal, relayed", body = Status)))]
pub async fn wake(
    State(state): State<AppState>,
    caller: Caller,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    host_action(&state, &caller, &namespace, &name, Action::Wake).await
}

/// Has the pod's host do `action` (hibernate, wake) for a user or the
/// admin, and relays its answer.
async fn host_action(
    state: &AppState,
    caller: &Caller,
    namespace: &str,
    name: &str,
    action: Action,
) -> Result<Response, ApiError> {
    caller.require_user()?;
    caller.require_namespace(namespace)?;
    let upstream = host_url(state, namespace, name, action, None).await?;
    let (code, status) = post_to_host(&state.http, &upstream, HOST_ACTION_TIMEOUT).await?;
    Ok((code, axum::Json(status)).into_response())
}

/// Tells the host running pod `namespace/pod` to close its volume
/// `volume` (`POST {address}/pods/NS/POD/volumes/VOLUME/close`): the
/// daemon's code and Status.
pub(super) async fn close_volume(
    state: &AppState,
    namespace: &str,
    pod: &str,
    volume: &str,
) -> Result<(StatusCode, Status), ApiError> {
    let what = format!("volumes/{volume}/close");
    let upstream = host_url_at(state, namespace, pod, Action::CloseVolume, &what, None).await?;
    post_to_host(&state.http, &upstream, CLOSE_VOLUME_TIMEOUT).await
}

/// How long a host has to close a revoked volume before the revocation
/// answers without it.
const CLOSE_VOLUME_TIMEOUT: Duration = Duration::from_secs(10);

/// POSTs to the host daemon (no body) and reads its answer, a Status of
/// at most [`MAX_HOST_ANSWER`] bytes, within `timeout`. An answer that is
/// not a Status becomes one (its text the message); the host refusing the
/// server's secret is the server's problem (502), not the caller's (401).
async fn post_to_host(
    http: &reqwest::Client,
    upstream: &Upstream,
    timeout: Duration,
) -> Result<(StatusCode, Status), ApiError> {
    let Upstream {
        host,
        url,
        authorization,
    } = upstream;
    let failed = |e: reqwest::Error| {
        if e.is_timeout() {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                format!(
                    "host {host:?} did not answer POST {url} within {} s",
                    timeout.as_secs_f32()
                ),
            )
        } else {
            ApiError::bad_gateway(format!(
                "cannot reach host {host:?} at {url}: {}",
                podvisor_errors::ErrorChain(&e)
            ))
        }
    };
    let mut resp = http
        .post(url.clone())
        .header(reqwest::header::AUTHORIZATION, authorization)
        .header(reqwest::header::CONTENT_LENGTH, "0")
        .timeout(timeout)
        .send()
        .await
        .map_err(failed)?;
    let code = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_HOST_ANSWER {
            return Err(ApiError::bad_gateway(format!(
                "host {host:?} answered POST {url} with more than {} KiB",
                MAX_HOST_ANSWER >> 10
            )));
        }
        body.extend_from_slice(&chunk);
    }
    if code == StatusCode::UNAUTHORIZED {
        return Err(ApiError::bad_gateway(format!(
            "host {host:?} refused the server's endpoint secret (its daemon may have restarted \
             without registering again)"
        )));
    }
    let status = serde_json::from_slice::<Status>(&body);
    if status.is_err() && matches!(code.as_u16(), 404 | 405) {
        // The daemon's router, not its handler: no such endpoint.
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            format!(
                "host {host:?} does not serve POST {} (HTTP {code}): its daemon may be older \
                 than this server",
                url.path()
            ),
        ));
    }
    let status = status.unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(&body);
        let text: String = text.trim().chars().take(500).collect();
        let text = if text.is_empty() {
            format!("HTTP {code}")
        } else {
            text
        };
        if code.is_success() {
            Status::new(code.as_u16(), "Success", text)
        } else {
            Status::new(code.as_u16(), "HostError", format!("host {host:?}: {text}"))
        }
    });
    Ok((code, status))
}

type HostSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Copies frames both ways until either side closes.
async fn pump(client: WebSocket, upstream: HostSocket) {
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

#[cfg(test)]
mod tests {
    //! The proxy against a stand-in host daemon endpoint (the real one is
    //! exercised end to end by the CLI's control-plane tests).

    use axum::Router;
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use axum::routing::{get, post};
    use futures_util::StreamExt;
    use podvisor_api::client::{ExecOptions, ExecOutput};
    use podvisor_api::{Client, Container, Host, HostCapacity, LogOptions, Pod};

    use crate::{Role, ServerConfig};

    /// The secret the stand-in host registers and checks.
    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    /// Refuses a request without the registered secret, as the real
    /// daemon does.
    async fn require_secret(
        request: axum::extract::Request,
        next: axum::middleware::Next,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let expected = format!("Bearer {SECRET}");
        match request.headers().get("authorization") {
            Some(v) if v.as_bytes() == expected.as_bytes() => next.run(request).await,
            _ => axum::http::StatusCode::UNAUTHORIZED.into_response(),
        }
    }

    async fn fake_host() -> String {
        let app = Router::new()
            .route(
                "/pods/default/web/log",
                get(
                    |axum::extract::RawQuery(q): axum::extract::RawQuery| async move {
                        format!("query={}\nline 1\nline 2\n", q.unwrap_or_default())
                    },
                ),
            )
            .route(
                "/pods/default/web/exec",
                get(|ws: WebSocketUpgrade| async move {
                    ws.on_upgrade(|mut socket| async move {
                        // Echo stdin to stdout; on close of stdin, exit 7.
                        while let Some(Ok(Message::Binary(frame))) = socket.next().await {
                            match frame.first() {
                                Some(0) => {
                                    let mut out = frame.to_vec();
                                    out[0] = 1;
                                    let _ = socket.send(Message::Binary(out.into())).await;
                                }
                                Some(255) => {
                                    let mut status = vec![3u8];
                                    status.extend_from_slice(br#"{"exitCode":7}"#);
                                    let _ = socket.send(Message::Binary(status.into())).await;
                                    let _ = socket.send(Message::Close(None)).await;
                                    return;
                                }
                                _ => {}
                            }
                        }
                    })
                }),
            )
            .route(
                "/pods/default/gone/exec",
                get(|| async {
                    (
                        axum::http::StatusCode::NOT_FOUND,
                        axum::Json(podvisor_api::Status::new(
                            404,
                            "NotFound",
                            "no container \"x\" in pod default/gone",
                        )),
                    )
                }),
            )
            .route(
                "/pods/default/web/hibernate",
                post(|body: axum::body::Bytes| async move {
                    if !body.is_empty() {
                        return Err(axum::http::StatusCode::BAD_REQUEST);
                    }
                    Ok(axum::Json(podvisor_api::Status::success(
                        "pod default/web hibernated: snapshot 15.1 MiB of 192 MiB guest memory",
                    )))
                }),
            )
            .route(
                "/pods/default/web/wake",
                post(|| async {
                    axum::Json(podvisor_api::Status::success(
                        "pod default/web woken in 1.2 s",
                    ))
                }),
            )
            .route(
                "/pods/default/gone/hibernate",
                post(|| async {
                    (
                        axum::http::StatusCode::CONFLICT,
                        axum::Json(podvisor_api::Status::new(
                            409,
                            "Conflict",
                            "pod default/gone is not running (Succeeded): nothing to hibernate",
                        )),
                    )
                }),
            )
            .route(
                "/pods/default/gone/wake",
                post(|| async { (axum::http::StatusCode::NOT_IMPLEMENTED, "no VMs here\n") }),
            )
            .layer(axum::middleware::from_fn(require_secret));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    /// The stand-in host as it registers.
    fn h1(address: &str) -> Host {
        let capacity = HostCapacity {
            cpu: 1000,
            memory: 1 << 30,
        };
        Host::new("h1", capacity, address)
    }

    fn pinned(name: &str) -> Pod {
        let mut pod = Pod::new(
            name,
            vec![Container {
                name: "main".into(),
                image: "busybox".into(),
                ..Default::default()
            }],
        );
        pod.spec.node_name = Some("h1".into());
        pod
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logs_and_exec_reach_the_pods_host() {
        let address = fake_host().await;
        let dir = tempfile::tempdir().unwrap();
        let server = crate::start(ServerConfig::new("127.0.0.1:0", dir.path()))
            .await
            .unwrap();
        let host_token = crate::create_token(dir.path(), None, Role::Host, "h1")
            .await
            .unwrap();
        let user_token = crate::create_token(dir.path(), None, Role::User, "u")
            .await
            .unwrap();
        let host = Client::new(&server.url(), Some(&host_token)).unwrap();
        host.register_host(&h1(&address), SECRET).await.unwrap();
        // A registration without a usable endpoint secret is refused.
        let err = host
            .register_host(&h1(&address), "short")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(422), "{err}");
        assert!(
            err.to_string().contains("x-podvisor-endpoint-token"),
            "{err}"
        );
        let user = Client::new(&server.url(), Some(&user_token)).unwrap();
        user.create_pod(&pinned("web")).await.unwrap();
        user.create_pod(&pinned("gone")).await.unwrap();

        // Logs: the query is passed on, the body streamed back.
        let options = LogOptions {
            container: Some("main".into()),
            follow: true,
            tail_lines: Some(5),
        };
        let mut log = Vec::new();
        let mut stream = user.logs("default", "web", &options).await.unwrap();
        while let Some(chunk) = stream.next().await {
            log.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(
            String::from_utf8(log).unwrap(),
            "query=container=main&follow=true&tailLines=5\nline 1\nline 2\n"
        );

        // Exec: frames both ways, end of stdin, exit status.
        let options = ExecOptions {
            command: vec!["cat".into()],
            stdin: true,
            ..Default::default()
        };
        let mut session = user.exec("default", "web", &options).await.unwrap();
        session.sender.stdin(b"hello").await.unwrap();
        assert_eq!(
            session.receiver.next().await.unwrap().unwrap(),
            ExecOutput::Stdout(bytes::Bytes::from_static(b"hello"))
        );
        session.sender.close_stdin().await.unwrap();
        match session.receiver.next().await.unwrap().unwrap() {
            ExecOutput::Exit(status) => assert_eq!(status.exit_code, 7),
            other => panic!("expected the exit status, got {other:?}"),
        }

        // The host's refusal reaches the client as it was given.
        let err = match user.exec("default", "gone", &options).await {
            Err(e) => e,
            Ok(_) => panic!("exec in a pod the host refuses succeeded"),
        };
        assert_eq!(err.code(), Some(404), "{err}");
        assert!(
            err.to_string()
                .contains("no container \"x\" in pod default/gone"),
            "{err}"
        );

        // Host tokens may not exec or read logs.
        let err = match host.exec("default", "web", &options).await {
            Err(e) => e,
            Ok(_) => panic!("a host token could exec"),
        };
        assert_eq!(err.code(), Some(403), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hibernate_and_wake_reach_the_pods_host() {
        let address = fake_host().await;
        let dir = tempfile::tempdir().unwrap();
        let server = crate::start(ServerConfig::new("127.0.0.1:0", dir.path()))
            .await
            .unwrap();
        let host_token = crate::create_token(dir.path(), None, Role::Host, "h1")
            .await
            .unwrap();
        let user_token = crate::create_token(dir.path(), None, Role::User, "u")
            .await
            .unwrap();
        let host = Client::new(&server.url(), Some(&host_token)).unwrap();
        host.register_host(&h1(&address), SECRET).await.unwrap();
        let user = Client::new(&server.url(), Some(&user_token)).unwrap();
        user.create_pod(&pinned("web")).await.unwrap();
        user.create_pod(&pinned("gone")).await.unwrap();

        // The host's Status comes back as it was given.
        let done = user.hibernate_pod("default", "web").await.unwrap();
        assert_eq!(
            done,
            podvisor_api::Status::success(
                "pod default/web hibernated: snapshot 15.1 MiB of 192 MiB guest memory"
            )
        );
        let done = user.wake_pod("default", "web").await.unwrap();
        assert_eq!(done.message, "pod default/web woken in 1.2 s");

        // Its refusal too, with its code.
        let err = user.hibernate_pod("default", "gone").await.unwrap_err();
        assert_eq!(err.code(), Some(409), "{err}");
        assert!(
            err.to_string()
                .contains("409 Conflict: pod default/gone is not running (Succeeded)"),
            "{err}"
        );
        // An answer that is not a Status becomes one.
        let err = user.wake_pod("default", "gone").await.unwrap_err();
        assert_eq!(err.code(), Some(501), "{err}");
        assert!(
            err.to_string()
                .contains("501 HostError: host \"h1\": no VMs here"),
            "{err}"
        );

        // Host tokens may not hibernate or wake pods.
        for result in [
            host.hibernate_pod("default", "web").await,
            host.wake_pod("default", "web").await,
        ] {
            let err = result.unwrap_err();
            assert_eq!(err.code(), Some(403), "{err}");
        }

        // A pod without a host (h1 is full), a pod being deleted, no pod.
        let mut pending = pinned("pending");
        pending.spec.node_name = None;
        user.create_pod(&pending).await.unwrap();
        let err = user.hibernate_pod("default", "pending").await.unwrap_err();
        assert_eq!(err.code(), Some(400), "{err}");
        assert!(
            err.to_string()
                .contains("pod default/pending is not assigned to a host yet (")
                && err
                    .to_string()
                    .ends_with("): it has no VM to hibernate yet"),
            "{err}"
        );
        let err = user.wake_pod("default", "pending").await.unwrap_err();
        assert!(
            err.to_string()
                .contains("it has not started, so there is nothing to wake"),
            "{err}"
        );
        assert!(user.delete_pod("default", "web").await.unwrap().is_some());
        let err = user.wake_pod("default", "web").await.unwrap_err();
        assert_eq!(err.code(), Some(409), "{err}");
        assert!(
            err.to_string()
                .contains("pod default/web is being deleted: it cannot wake now"),
            "{err}"
        );
        let err = user.hibernate_pod("default", "nope").await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }

    /// A stand-in host at `app`'s address.
    async fn serve(app: Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    fn upstream(addr: std::net::SocketAddr, what: &str) -> super::Upstream {
        super::Upstream {
            host: "h1".into(),
            url: format!("http://{addr}/pods/default/web/{what}")
                .parse()
                .unwrap(),
            authorization: format!("Bearer {SECRET}"),
        }
    }

    #[tokio::test]
    async fn a_host_that_is_slow_silent_or_verbose_is_a_clear_error() {
        use std::time::Duration;
        let app = Router::new()
            .route(
                "/pods/default/web/slow",
                post(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
            .route(
                "/pods/default/web/verbose",
                post(|| async { "x".repeat(100 << 10) }),
            )
            .route(
                "/pods/default/web/stale",
                post(|| async { axum::http::StatusCode::UNAUTHORIZED }),
            )
            .route("/pods/default/web/empty", post(|| async {}))
            .layer(axum::middleware::from_fn(require_secret));
        let addr = serve(app).await;
        crate::rustls_provider();
        let http = reqwest::Client::new();
        let short = Duration::from_millis(300);

        let err = super::post_to_host(&http, &upstream(addr, "slow"), short)
            .await
            .unwrap_err();
        assert_eq!(err.code.as_u16(), 504, "{err}");
        assert!(
            err.message
                .contains("host \"h1\" did not answer POST http://"),
            "{err}"
        );
        let err = super::post_to_host(&http, &upstream(addr, "verbose"), short)
            .await
            .unwrap_err();
        assert_eq!(err.code.as_u16(), 502, "{err}");
        assert!(err.message.contains("with more than 64 KiB"), "{err}");
        let err = super::post_to_host(&http, &upstream(addr, "stale"), short)
            .await
            .unwrap_err();
        assert_eq!(err.code.as_u16(), 502, "{err}");
        assert!(
            err.message.contains("refused the server's endpoint secret"),
            "{err}"
        );
        let (code, status) = super::post_to_host(&http, &upstream(addr, "empty"), short)
            .await
            .unwrap();
        assert_eq!(code.as_u16(), 200);
        assert_eq!(status, podvisor_api::Status::success("HTTP 200 OK"));
        // A daemon without the endpoint (no Status: its router's 404).
        let err = super::post_to_host(&http, &upstream(addr, "hibernate"), short)
            .await
            .unwrap_err();
        assert_eq!(err.code.as_u16(), 501, "{err}");
        assert!(
            err.message.contains(
                "host \"h1\" does not serve POST /pods/default/web/hibernate (HTTP 404 Not Found)"
            ),
            "{err}"
        );

        // Nothing listens there any more.
        let gone = {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let err = super::post_to_host(&http, &upstream(gone, "hibernate"), short)
            .await
            .unwrap_err();
        assert_eq!(err.code.as_u16(), 502, "{err}");
        assert!(
            err.message
                .contains(&format!("cannot reach host \"h1\" at http://{gone}/")),
            "{err}"
        );
        assert!(err.message.contains("onnection refused"), "{err}");
    }
}
