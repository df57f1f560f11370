//! Exec over a WebSocket. Every binary frame starts with its channel, as in
//! Kubernetes' `channel.k8s.io`: 0 stdin, 1 stdout, 2 stderr, 3 status
//! (JSON `{"exitCode": N}`, then close), 4 resize (JSON
//! `{"Width": w, "Height": h}`), 255 close (`[255, 0]`: stdin is at its end).

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use url::Url;

use super::ClientError;
use crate::status::Status;

pub const CHANNEL_STDIN: u8 = 0;
pub const CHANNEL_STDOUT: u8 = 1;
pub const CHANNEL_STDERR: u8 = 2;
pub const CHANNEL_STATUS: u8 = 3;
pub const CHANNEL_RESIZE: u8 = 4;
pub const CHANNEL_CLOSE: u8 = 255;

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    /// The container (needed when the pod has several).
    pub container: Option<String>,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Whether stdin is sent.
    pub stdin: bool,
    /// Whether the command gets a terminal.
    pub tty: bool,
}

/// The exit status sent on channel 3.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecStatus {
    pub exit_code: i32,
    /// Why the command could not run, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A terminal size on channel 4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Output of an exec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The command ended (the last item).
    Exit(ExecStatus),
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A running exec, split into its two directions.
pub struct ExecSession {
    pub sender: ExecSender,
    pub receiver: ExecReceiver,
}

/// Sends stdin and terminal sizes.
pub struct ExecSender {
    url: String,
    sink: SplitSink<Ws, Message>,
}

/// Receives output and the exit status.
pub struct ExecReceiver {
    url: String,
    stream: SplitStream<Ws>,
    done: bool,
}

pub(super) async fn connect(
    mut url: Url,
    token: Option<&str>,
    options: &ExecOptions,
) -> Result<ExecSession, ClientError> {
    let fail = |url: &Url, reason: String| ClientError::WebSocket {
        url: url.to_string(),
        reason,
    };
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme)
        .map_err(|_| fail(&url, "cannot make a WebSocket URL".into()))?;
    {
        let mut q = url.query_pairs_mut();
        if let Some(c) = &options.container {
            q.append_pair("container", c);
        }
        for arg in &options.command {
            q.append_pair("command", arg);
        }
        if options.stdin {
            q.append_pair("stdin", "true");
        }
        if options.tty {
            q.append_pair("tty", "true");
        }
    }
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| fail(&url, e.to_string()))?;
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| fail(&url, "the token is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let (ws, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let code = resp.status().as_u16();
            let body = resp.body().clone().unwrap_or_default();
            let status = serde_json::from_slice::<Status>(&body).unwrap_or_else(|_| {
                Status::new(
                    code,
                    "Error",
                    String::from_utf8_lossy(&body).trim().to_string(),
                )
            });
            return Err(ClientError::Api {
                method: "GET",
                url: url.to_string(),
                status,
            });
        }
        Err(e) => return Err(fail(&url, e.to_string())),
    };
    let (sink, stream) = ws.split();
    Ok(ExecSession {
        sender: ExecSender {
            url: url.to_string(),
            sink,
        },
        receiver: ExecReceiver {
            url: url.to_string(),
            stream,
            done: false,
        },
    })
}

impl ExecSender {
    async fn send(&mut self, channel: u8, data: &[u8]) -> Result<(), ClientError> {
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(channel);
        frame.extend_from_slice(data);
        self.sink
            .send(Message::Binary(frame.into()))
            .await
            .map_err(|e| ClientError::WebSocket {
                url: self.url.clone(),
                reason: e.to_string(),
            })
    }

    /// Sends bytes to the command's stdin.
    pub async fn stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.send(CHANNEL_STDIN, data).await
    }

    /// Tells the command's terminal its new size.
    pub async fn resize(&mut self, width: u16, height: u16) -> Result<(), ClientError> {
        let json = serde_json::to_vec(&TerminalSize { width, height }).expect("size serializes");
        self.send(CHANNEL_RESIZE, &json).await
    }

    /// Closes the command's stdin (it reads end of file).
    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.send(CHANNEL_CLOSE, &[CHANNEL_STDIN]).await
    }
}

impl ExecReceiver {
    /// The next output; `None` after the exit status or when the connection
    /// closed without one.
    pub async fn next(&mut self) -> Option<Result<ExecOutput, ClientError>> {
        while !self.done {
            let msg = match self.stream.next().await? {
                Ok(m) => m,
                Err(e) => {
                    self.done = true;
                    return Some(Err(ClientError::WebSocket {
                        url: self.url.clone(),
                        reason: e.to_string(),
                    }));
                }
            };
            let data: Bytes = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => Bytes::copy_from_slice(t.as_bytes()),
                Message::Close(_) => {
                    self.done = true;
                    return None;
                }
                _ => continue,
            };
            let Some((&channel, payload)) = data.split_first() else {
                continue;
            };
            let payload = data.slice(data.len() - payload.len()..);
            match channel {
                CHANNEL_STDOUT => return Some(Ok(ExecOutput::Stdout(payload))),
                CHANNEL_STDERR => return Some(Ok(ExecOutput::Stderr(payload))),
                CHANNEL_STATUS => {
                    self.done = true;
                    return Some(
                        serde_json::from_slice::<ExecStatus>(&payload)
                            .map(ExecOutput::Exit)
                            .map_err(|e| ClientError::Decode {
                                url: self.url.clone(),
                                reason: format!("exec status: {e}"),
                            }),
                    );
                }
                _ => continue,
            }
        }
        None
    }
}
