//! The HTTP server's connections: the accept loop (hyper's HTTP/1, with
//! upgrades for exec) and the limits that keep a crowd of silent or slow
//! clients from taking the API away from everyone else.
//!
//! - **Header-read timeout**: a connection gets `header_read_timeout` to
//!   send a request's headers, from its accept or from the first byte of
//!   its next request (slowloris).
//! - **Idle timeout**: a keep-alive connection waiting for its next request
//!   (no byte of it yet) is closed after `idle_timeout`.
//! - **Write timeout**: a response whose client stops reading for
//!   `idle_timeout` has its connection closed.
//! - **Connection limit**: at most `max_connections` at once; beyond, the
//!   server stops accepting (the kernel's backlog holds the newcomers).
//!   Of those, at most `max_unauthenticated` may be connections that have
//!   not yet sent a request with a valid token: a new connection beyond
//!   that closes the oldest of them that is not serving a request (or is
//!   itself closed at once if all are). Authenticated clients' connections
//!   are never closed to make room, and they always have
//!   `max_connections - max_unauthenticated` slots.
//!
//! A connection's requests are timed by the router (`api::limits`); a
//! connection upgraded to a WebSocket (exec) leaves the sweeps here but
//! keeps its slot until it closes.

use std::collections::BTreeMap;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt;

/// The limits of the server's connections.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Connections at once (further ones wait in the listen backlog).
    /// Lowered to what the process's open-file limit allows.
    pub max_connections: usize,
    /// Of those, connections that have not yet sent a request with a valid
    /// token.
    pub max_unauthenticated: usize,
    /// Time to send a request's headers, from the accept or the request's
    /// first byte.
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection may wait for its next request, and a
    /// response may wait for its client to read.
    pub idle_timeout: Duration,
    /// Time an ordinary request (not a watch, a log, an exec, hibernation
    /// or wake) has to be read and answered.
    pub request_timeout: Duration,
}

impl Default for ConnectionLimits {
    /// Go's and Kubernetes' figures: 10 s to send headers, 90 s idle, 60 s
    /// a request; 4096 connections, 1024 of them unauthenticated.
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 4096,
            max_unauthenticated: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// File descriptors kept for everything but client connections (the
/// store, host daemons' connections, logs).
const RESERVED_FDS: usize = 256;

impl ConnectionLimits {
    /// These limits within what `open_files` descriptors allow.
    fn fitted(&self, open_files: usize) -> ConnectionLimits {
        let mut limits = self.clone();
        let room = open_files.saturating_sub(RESERVED_FDS).max(16);
        if limits.max_connections > room {
            tracing::warn!(
                configured = limits.max_connections,
                allowed = room,
                "the open-file limit allows fewer connections than configured"
            );
            limits.max_connections = room;
        }
        limits.max_connections = limits.max_connections.max(2);
        limits.max_unauthenticated = limits
            .max_unauthenticated
            .clamp(1, limits.max_connections - 1);
        limits
    }
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does)
/// and returns it.
fn raise_open_file_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit it is given, which lives
    // for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the rlimit it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// One connection as the limits see it.
pub(crate) struct Connection {
    id: u64,
    authenticated: AtomicBool,
    /// Requests being read or answered (a response counts until its body
    /// is written or dropped).
    in_flight: AtomicUsize,
    /// Whether a request has been answered on it.
    answered: AtomicBool,
    /// Bytes read from the client so far.
    read: AtomicU64,
    /// Since when it waits for a request, and `read` then.
    waiting: Mutex<(Instant, u64)>,
    /// Since when a write has waited for the client to read.
    write_blocked: Mutex<Option<Instant>>,
    close: Notify,
}

impl Connection {
    /// Whether a request with a valid token came on it.
    pub(crate) fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }

    fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    /// Why the sweep should close it at `now`, if it should.
    fn expired(&self, now: Instant, limits: &ConnectionLimits) -> Option<&'static str> {
        if let Some(since) = *self.write_blocked.lock().unwrap()
            && now.duration_since(since) > limits.idle_timeout
        {
            return Some("its client stopped reading a response");
        }
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let (since, read_then) = *self.waiting.lock().unwrap();
        let started = self.read.load(Ordering::Relaxed) > read_then;
        let waited = now.duration_since(since);
        if started || !self.answered.load(Ordering::Relaxed) {
            (waited > limits.header_read_timeout).then_some("request headers not sent in time")
        } else {
            (waited > limits.idle_timeout).then_some("idle")
        }
    }
}

/// Held while a request is served; its drop starts the wait for the next.
struct RequestGuard(Arc<Connection>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let conn = &self.0;
        *conn.waiting.lock().unwrap() = (Instant::now(), conn.read.load(Ordering::Relaxed));
        conn.answered.store(true, Ordering::Relaxed);
        conn.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The open connections.
pub(crate) struct Registry {
    limits: ConnectionLimits,
    open: Mutex<Open>,
    next_id: AtomicU64,
    slots: Arc<Semaphore>,
}

/// The connections the sweeps watch, oldest first, and how many of them
/// are unauthenticated.
#[derive(Default)]
struct Open {
    connections: BTreeMap<u64, Arc<Connection>>,
    unauthenticated: usize,
}

impl Open {
    fn forget(&mut self, conn: &Connection) {
        if self.connections.remove(&conn.id).is_some() && !conn.is_authenticated() {
            self.unauthenticated -= 1;
        }
    }
}

impl Registry {
    fn new(limits: ConnectionLimits) -> Registry {
        Registry {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            open: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }

    /// Marks `conn` authenticated: it no longer counts as unauthenticated
    /// and is never closed to make room.
    pub(crate) fn authenticate(&self, conn: &Connection) {
        let mut open = self.open.lock().unwrap();
        if !conn.authenticated.swap(true, Ordering::Relaxed)
            && open.connections.contains_key(&conn.id)
        {
            open.unauthenticated -= 1;
        }
    }

    /// Registers a new (unauthenticated) connection, closing the oldest
    /// unauthenticated idle one if there is no room; `None` if all of them
    /// are serving requests.
    fn admit(&self) -> Option<Arc<Connection>> {
        let mut open = self.open.lock().unwrap();
        if open.unauthenticated >= self.limits.max_unauthenticated {
            let victim = open
                .connections
                .values()
                .find(|c| !c.is_authenticated() && c.in_flight.load(Ordering::Relaxed) == 0)
                .cloned();
            let victim = victim?;
            tracing::debug!(
                connection = victim.id,
                "closing the oldest unauthenticated idle connection to make room"
            );
            open.forget(&victim);
            victim.close.notify_one();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Connection {
            id,
            authenticated: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            answered: AtomicBool::new(false),
            read: AtomicU64::new(0),
            waiting: Mutex::new((Instant::now(), 0)),
            write_blocked: Mutex::new(None),
            close: Notify::new(),
        });
        open.unauthenticated += 1;
        open.connections.insert(id, conn.clone());
        Some(conn)
    }

    fn remove(&self, conn: &Connection) {
        self.open.lock().unwrap().forget(conn);
    }

    /// Closes the connections past their timeouts.
    fn sweep(&self) {
        let now = Instant::now();
        let mut open = self.open.lock().unwrap();
        let expired: Vec<(Arc<Connection>, &'static str)> = open
            .connections
            .values()
            .filter_map(|c| c.expired(now, &self.limits).map(|why| (c.clone(), why)))
            .collect();
        for (conn, why) in expired {
            tracing::debug!(connection = conn.id, why, "closing a connection");
            open.forget(&conn);
            conn.close.notify_one();
        }
    }
}

/// A client's socket, counting what is read and noticing writes that wait;
/// it holds the connection's slot until it is dropped.
struct TrackedStream {
    stream: TcpStream,
    conn: Arc<Connection>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.conn.read.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl TrackedStream {
    fn note_write<T>(&self, polled: &Poll<T>) {
        let mut blocked = self.conn.write_blocked.lock().unwrap();
        match polled {
            Poll::Pending => {
                blocked.get_or_insert_with(Instant::now);
            }
            Poll::Ready(_) => *blocked = None,
        }
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A connection's handle in each of its requests' extensions, for the
/// router to mark it authenticated.
#[derive(Clone)]
pub(crate) struct ConnectionHandle {
    pub(crate) conn: Arc<Connection>,
    pub(crate) registry: Arc<Registry>,
}

/// A response body that ends its request's [`RequestGuard`] when it is
/// written out or dropped.
struct GuardedBody {
    body: Body,
    _guard: RequestGuard,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The most a connection buffers of a request's head (hyper's default is
/// about 400 KiB): with 1024 unauthenticated connections, 64 MiB at most.
const MAX_HEADER_BUFFER: usize = 64 << 10;

/// How long connections get to finish their requests once the server
/// stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` within `limits` until `stop` changes or is
/// dropped; then stops accepting, lets each connection finish the request
/// it is serving (at most [`SHUTDOWN_GRACE`]) and closes it.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<()>,
) {
    let limits = limits.fitted(raise_open_file_limit());
    let registry = Arc::new(Registry::new(limits.clone()));
    let sweep_every = (limits.header_read_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(20), Duration::from_secs(1));
    let sweeper = {
        let registry = registry.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => registry.sweep(),
                    _ = stop.changed() => break,
                }
            }
        })
    };
    loop {
        let slot = tokio::select! {
            slot = registry.slots.clone().acquire_owned() => slot,
            _ = stop.changed() => break,
        };
        let Ok(slot) = slot else { break };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Some(conn) = registry.admit() else {
            tracing::debug!(
                "refusing a connection: every unauthenticated one is serving a request"
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = TrackedStream {
            stream,
            conn: conn.clone(),
            _slot: slot,
        };
        tokio::spawn(serve_connection(
            io,
            app.clone(),
            ConnectionHandle {
                conn,
                registry: registry.clone(),
            },
            stop.clone(),
        ));
    }
    sweeper.abort();
}

async fn serve_connection(
    io: TrackedStream,
    app: Router,
    handle: ConnectionHandle,
    mut stop: watch::Receiver<()>,
) {
    let conn = handle.conn.clone();
    let registry = handle.registry.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let guard = handle.conn.begin_request();
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(handle.clone());
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await?;
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(GuardedBody {
                    body,
                    _guard: guard,
                })
            }))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_HEADER_BUFFER)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut connection = pin!(connection);
    let closed = conn.close.notified();
    let mut closed = pin!(closed);
    let served = tokio::select! {
        served = connection.as_mut() => Some(served),
        _ = closed.as_mut() => None,
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(SHUTDOWN_GRACE, connection.as_mut()).await.ok()
        }
    };
    if let Some(Err(e)) = served {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    registry.remove(&conn);
}
