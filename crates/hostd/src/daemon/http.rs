//! The host daemon's HTTP endpoint, which the server proxies to:
//! `GET /pods/{ns}/{name}/log` (a container's log, streamed, optionally
//! followed) and `GET /pods/{ns}/{name}/exec` (a WebSocket with Kubernetes'
//! `channel.k8s.io` framing: 0 stdin, 1 stdout, 2 stderr, 3 status JSON
//! `{"exitCode": N}` then close, 4 resize JSON `{"Width", "Height"}`,
//! `[255, 0]` closes stdin), `POST /pods/{ns}/{name}/hibernate` and
//! `POST /pods/{ns}/{name}/wake` (answered when done, with a Status whose
//! message says what was saved or how the pod woke), `POST
//! /pods/{ns}/{name}/volumes/{volume}/close` (a revoked encrypted volume:
//! the guest closes it and the containers using it stop). Errors are Status
//! JSON bodies.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use podvisor_api::Status;
use podvisor_proto::{Stream, TerminalSize};

use crate::host::{ExecEvent, ExecInput, ExecRequest, ExecSession, PodRuntime, RuntimeError};

/// The router of the daemon's endpoint. Everything but `/healthz` needs
/// `Authorization: Bearer SECRET`, the secret the daemon gave the server
/// when it registered ([`podvisor_api::ENDPOINT_TOKEN_HEADER`]): only the
/// server, which checks the user's token and role, reaches the pods.
pub fn router(runtime: Arc<PodRuntime>, secret: EndpointSecret) -> Router {
    let pods = Router::new()
        .route("/pods/{ns}/{name}/log", get(log))
        .route("/pods/{ns}/{name}/exec", get(exec))
        .route("/pods/{ns}/{name}/hibernate", post(hibernate))
        .route("/pods/{ns}/{name}/wake", post(wake))
        .route(
            "/pods/{ns}/{name}/volumes/{volume}/close",
            post(close_volume),
        )
        .with_state(runtime)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(secret),
            require_secret,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(pods)
}

/// The secret the daemon's endpoint accepts from the server; new at each
/// start of the daemon.
pub struct EndpointSecret(String);

impl EndpointSecret {
    /// 32 random bytes from the OS, in hex.
    pub fn generate() -> Result<EndpointSecret, podvisor_store::RandomError> {
        Ok(EndpointSecret(podvisor_store::random_hex(32)?))
    }

    /// What the daemon sends the server when it registers.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `authorization` (a header value) is `Bearer SECRET`; takes
    /// the same time wherever the first difference is.
    fn accepts(&self, authorization: &[u8]) -> bool {
        let Some(given) = authorization.strip_prefix(b"Bearer ") else {
            return false;
        };
        given.len() == self.0.len()
            && given
                .iter()
                .zip(self.0.as_bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

async fn require_secret(
    State(secret): State<Arc<EndpointSecret>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let authorization = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match authorization {
        Some(value) if secret.accepts(value) => next.run(request).await,
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "this host's endpoint serves only the podvisor server: the secret does not match",
        ),
        None => error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "this host's endpoint serves only the podvisor server: no Authorization header \
             (use the server's API: podvisor logs / podvisor exec)",
        ),
    }
}

/// An error answer with a Status body.
fn error(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    let status = Status::new(code.as_u16(), reason, message);
    (code, axum::Json(status)).into_response()
}

fn runtime_error(e: RuntimeError) -> Response {
    let (code, reason) = match &e {
        RuntimeError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
        RuntimeError::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
        RuntimeError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
        RuntimeError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "NotImplemented"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
    };
    error(code, reason, podvisor_errors::chain(&e))
}

/// The query's pairs, repeated keys kept (`command=sh&command=-c`).
fn pairs(query: Option<String>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn flag(pairs: &[(String, String)], key: &str) -> bool {
    pairs
        .iter()
        .any(|(k, v)| k == key && matches!(v.as_str(), "true" | "1"))
}

fn value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

async fn log(
    State(rt): State<Arc<PodRuntime>>,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let q = pairs(query);
    let tail = match value(&q, "tailLines").map(str::parse::<usize>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "tailLines must be a non-negative number",
            );
        }
    };
    let reader = match rt.logs(&ns, &name, value(&q, "container"), tail, flag(&q, "follow")) {
        Ok(r) => r,
        Err(e) => return runtime_error(e),
    };
    let stream = futures_util::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match reader.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), Some(reader))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(Body::from_stream(taken_within(stream, LOG_WRITE_TIMEOUT)))
        .expect("a valid response")
}

/// How long a log client may leave a chunk untaken before its stream ends
/// (its reader and follow subscription let go: a follower that stopped
/// reading no longer counts as one, nor holds the log open).
pub const LOG_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `source`'s items, through a queue of a few: a task reads `source` and
/// ends it (dropping it) when the consumer has not taken an item within
/// `timeout`, or has gone. What was queued is still delivered.
fn taken_within<S>(
    source: S,
    timeout: std::time::Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static
where
    S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut source = std::pin::pin!(source);
        loop {
            let item = tokio::select! {
                _ = tx.closed() => return,
                item = source.next() => match item {
                    Some(item) => item,
                    None => return,
                },
            };
            let last = item.is_err();
            match tx.send_timeout(item, timeout).await {
                Ok(()) if !last => {}
                Ok(()) => return,
                Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => {
                    tracing::warn!(
                        "log client did not take its log within {timeout:?}: stream ended"
                    );
                    return;
                }
                Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => return,
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) })
}

/// A 200 Status with `message`.
fn success(message: String) -> Response {
    (StatusCode::OK, axum::Json(Status::success(message))).into_response()
}

async fn hibernate(
    State(rt): State<Arc<PodRuntime>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    match rt.hibernate(&ns, &name).await {
        Ok(message) => success(message),
        Err(e) => runtime_error(e),
    }
}

async fn wake(
    State(rt): State<Arc<PodRuntime>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    match rt.wake(&ns, &name).await {
        Ok(message) => success(message),
        Err(e) => runtime_error(e),
    }
}

async fn close_volume(
    State(rt): State<Arc<PodRuntime>>,
    Path((ns, name, volume)): Path<(String, String, String)>,
) -> Response {
    match rt.close_volume(&ns, &name, &volume).await {
        Ok(message) => success(message),
        Err(e) => runtime_error(e),
    }
}

async fn exec(
    State(rt): State<Arc<PodRuntime>>,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    let q = pairs(query);
    let command: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    if command.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "exec needs a command (command=...)",
        );
    }
    let request = ExecRequest {
        container: value(&q, "container").map(str::to_string),
        command,
        tty: flag(&q, "tty"),
        stdin: flag(&q, "stdin"),
        size: None,
    };
    // Start it before upgrading, so that a refusal is a plain HTTP error.
    let session = match rt.exec(&ns, &name, request).await {
        Ok(s) => s,
        Err(e) => return runtime_error(e),
    };
    ws.protocols(["v4.channel.k8s.io", "channel.k8s.io"])
        .on_upgrade(move |socket| relay(socket, session))
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    Message::Binary(out.into())
}

/// How long one message to an exec's client may take to be written: a
/// client that stops reading is dropped (its process killed) after it.
pub const EXEC_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Relays an exec session over the WebSocket until the process ends or
/// the client goes away (which kills the process). A client that does not
/// take a message within [`EXEC_WRITE_TIMEOUT`] is gone too; one that falls
/// behind the session's backlog gets its `Failed` status (see
/// [`crate::host::EXEC_OUTPUT_BACKLOG`]).
async fn relay(socket: WebSocket, session: ExecSession) {
    let ExecSession { mut events, input } = session;
    let (mut sink, mut incoming) = socket.split();
    let reader = async {
        while let Some(Ok(msg)) = incoming.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            let Some((&channel, payload)) = data.split_first() else {
                continue;
            };
            let to_process = match channel {
                0 => ExecInput::Stdin(payload.to_vec()),
                4 => match serde_json::from_slice::<ResizeJson>(payload) {
                    Ok(size) => ExecInput::Resize(TerminalSize {
                        rows: size.height,
                        cols: size.width,
                    }),
                    Err(_) => continue,
                },
                255 if payload == [0] => ExecInput::CloseStdin,
                _ => continue,
            };
            if input.send(to_process).await.is_err() {
                break;
            }
        }
        // The client is gone: dropping `input` kills the process.
    };
    let writer = async {
        while let Some(event) = events.recv().await {
            let (msg, last) = match event {
                ExecEvent::Output(Stream::Stdout, d) => (frame(1, &d), false),
                ExecEvent::Output(Stream::Stderr, d) => (frame(2, &d), false),
                ExecEvent::Exited(code) => (frame(3, &status_json(code, None)), true),
                ExecEvent::Failed { exit_code, message } => {
                    (frame(3, &status_json(exit_code, Some(message))), true)
                }
            };
            match tokio::time::timeout(EXEC_WRITE_TIMEOUT, sink.send(msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    tracing::warn!(
                        "exec client did not take its output within {EXEC_WRITE_TIMEOUT:?}: dropped"
                    );
                    return;
                }
            }
            if last {
                break;
            }
        }
        let _ = tokio::time::timeout(EXEC_WRITE_TIMEOUT, sink.send(Message::Close(None))).await;
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}

/// Channel 4: a terminal size.
#[derive(serde::Deserialize)]
struct ResizeJson {
    #[serde(rename = "Width")]
    width: u16,
    #[serde(rename = "Height")]
    height: u16,
}

/// Channel 3: how the process ended.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusJson {
    exit_code: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

fn status_json(exit_code: i32, message: Option<String>) -> Vec<u8> {
    serde_json::to_vec(&StatusJson { exit_code, message }).expect("status serializes")
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_log_client_that_stops_reading_lets_go_of_the_log() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let guard = Dropped(dropped.clone());
        // An endless log, as a followed container that keeps writing.
        let source = futures_util::stream::repeat_with(move || {
            let _ = &guard;
            Ok(super::Bytes::from_static(b"line\n"))
        });
        let timeout = std::time::Duration::from_millis(200);
        let mut client = std::pin::pin!(super::taken_within(source, timeout));
        assert!(client.next().await.is_some());
        // The client stops reading: the source is let go.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the log is still held"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // What was queued arrives, then the end.
        let mut rest = 0;
        while client.next().await.is_some() {
            rest += 1;
        }
        assert!(rest <= 5, "{rest}");
    }

    use super::*;

    #[test]
    fn the_endpoint_accepts_only_its_own_secret() {
        let secret = EndpointSecret::generate().unwrap();
        assert_eq!(secret.as_str().len(), 64);
        podvisor_api::validate_endpoint_token(secret.as_str()).unwrap();
        assert_ne!(
            secret.as_str(),
            EndpointSecret::generate().unwrap().as_str()
        );
        let right = format!("Bearer {}", secret.as_str());
        assert!(secret.accepts(right.as_bytes()));
        assert!(!secret.accepts(secret.as_str().as_bytes()), "no scheme");
        assert!(!secret.accepts(format!("Basic {}", secret.as_str()).as_bytes()));
        assert!(!secret.accepts(&right.as_bytes()[..right.len() - 1]));
        let mut wrong = right.clone().into_bytes();
        *wrong.last_mut().unwrap() ^= 1;
        assert!(!secret.accepts(&wrong));
        assert!(!secret.accepts(b"Bearer "));
    }
}
