//! [`Client`]: the REST client of the podvisor API, used by the CLI and by
//! host daemons. Plain HTTP or HTTPS (rustls), bearer token.

mod error;
pub mod exec;
mod feed;
mod options;
mod snapshot_key;
mod volume;
mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use error::error_from_response;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use url::Url;

pub use error::ClientError;
pub use exec::{ExecOptions, ExecOutput, ExecReceiver, ExecSender, ExecSession, ExecStatus};
pub use feed::PodFeedEvent;
pub use options::{Applied, LogOptions, LogStream, PodFilter};
pub use snapshot_key::SnapshotKey;
pub use volume::AppliedVolume;
pub use watch::{PodEvent, PodWatch};

use crate::host::{Host, HostList, HostReport};
use crate::image::ImageList;
use crate::pod::{Pod, PodList, PodStatus};
use crate::status::Status;

/// How long a plain (non-streaming) request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a hibernation or a wake may take: the server gives the pod's
/// host 90 s (a VM under TCG saves or loads in 1-3 s, a wake that falls
/// back to a cold restart takes longer), and its answer must still
/// arrive.
const HIBERNATE_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of a podvisor server, or of several replicas of one: requests
/// go to the first that answers, and stay with it until it cannot be
/// reached.
#[derive(Clone, Debug)]
pub struct Client {
    bases: Arc<Vec<Url>>,
    /// Index of the replica in use.
    current: Arc<AtomicUsize>,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of the server at `server` (`http://127.0.0.1:7443`, or
    /// several replicas separated by commas), sending `token` as
    /// `Authorization: Bearer`.
    pub fn new(server: &str, token: Option<&str>) -> Result<Client, ClientError> {
        let mut bases = Vec::new();
        for one in server.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let invalid = |reason: &str| ClientError::InvalidUrl {
                url: one.to_string(),
                reason: reason.to_string(),
            };
            let mut base = Url::parse(one).map_err(|e| invalid(&e.to_string()))?;
            if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
                return Err(invalid("expected http://HOST:PORT or https://HOST:PORT"));
            }
            if !base.path().ends_with('/') {
                let path = format!("{}/", base.path());
                base.set_path(&path);
            }
            bases.push(base);
        }
        if bases.is_empty() {
            return Err(ClientError::InvalidUrl {
                url: server.to_string(),
                reason: "no server URL".into(),
            });
        }
        // reqwest's rustls is built without a default crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ClientError::InvalidUrl {
                url: server.to_string(),
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Client {
            bases: Arc::new(bases),
            current: Arc::new(AtomicUsize::new(0)),
            token: token.map(str::to_string),
            http,
        })
    }

    /// The base URL of the replica in use.
    pub fn server(&self) -> &Url {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    fn request(&self, method: reqwest::Method, url: &Url) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, url.clone());
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        req
    }

    /// Sends a request for `path` (built by `build`) to the replica in use,
    /// moving on to the next replicas if it cannot be reached. Returns the
    /// URL used and the response if it is a success, else the server's
    /// Status as an error.
    async fn execute(
        &self,
        method: reqwest::Method,
        path: &str,
        build: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<(Url, reqwest::Response), ClientError> {
        let name = method_name(&method);
        let count = self.bases.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..count {
            let index = (start + i) % count;
            let url = self.bases[index]
                .join(path)
                .expect("API paths are relative URLs");
            let req = build(self.request(method.clone(), &url));
            match req.send().await {
                Ok(resp) => {
                    self.current.store(index, Ordering::Relaxed);
                    if resp.status().is_success() {
                        return Ok((url, resp));
                    }
                    return Err(error_from_response(name, &url, resp).await);
                }
                Err(source) => {
                    // A connection that was never made is safe to try
                    // elsewhere (the request did not reach the server); a
                    // broken one (the replica died mid-request) only for
                    // requests that may be repeated.
                    let idempotent = method != reqwest::Method::POST;
                    let retry = source.is_connect()
                        || (idempotent
                            && (source.is_request() || source.is_body())
                            && !source.is_timeout());
                    let err = ClientError::Http {
                        method: name,
                        url: url.to_string(),
                        source,
                    };
                    if !retry {
                        return Err(err);
                    }
                    last = Some(err);
                }
            }
        }
        Err(last.expect("at least one server"))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&(dyn erased::Body + Sync)>,
    ) -> Result<T, ClientError> {
        self.call_within(method, path, query, body, REQUEST_TIMEOUT)
            .await
    }

    /// [`Client::call`] with its own timeout.
    async fn call_within<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&(dyn erased::Body + Sync)>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let name = method_name(&method);
        let body = body.map(|b| b.to_json());
        let (url, resp) = self
            .execute(method, path, |mut req| {
                req = req.timeout(timeout);
                if !query.is_empty() {
                    req = req.query(query);
                }
                if let Some(body) = &body {
                    req = req
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body.clone());
                }
                req
            })
            .await?;
        decode(name, &url, resp).await
    }

    /// `GET /healthz`.
    pub async fn healthz(&self) -> Result<(), ClientError> {
        self.execute(reqwest::Method::GET, "healthz", |r| {
            r.timeout(REQUEST_TIMEOUT)
        })
        .await
        .map(|_| ())
    }

    /// Lists pods.
    pub async fn list_pods(&self, filter: &PodFilter) -> Result<PodList, ClientError> {
        self.call(reqwest::Method::GET, &filter.path(), &filter.query(), None)
            .await
    }

    /// One pod.
    pub async fn get_pod(&self, namespace: &str, name: &str) -> Result<Pod, ClientError> {
        self.call(reqwest::Method::GET, &pod_path(namespace, name), &[], None)
            .await
    }

    /// Creates a pod (409 if it exists). Its namespace is the pod's.
    pub async fn create_pod(&self, pod: &Pod) -> Result<Pod, ClientError> {
        let path = format!("api/v1/namespaces/{}/pods", pod.metadata.namespace());
        self.call(reqwest::Method::POST, &path, &[], Some(pod))
            .await
    }

    /// Creates the pod, or updates it if it exists (only labels may change
    /// once it is scheduled).
    pub async fn apply_pod(&self, pod: &Pod) -> Result<Pod, ClientError> {
        Ok(self.apply(pod).await?.pod)
    }

    /// [`Client::apply_pod`], also saying what happened.
    pub async fn apply(&self, pod: &Pod) -> Result<Applied, ClientError> {
        let path = pod_path(pod.metadata.namespace(), &pod.metadata.name);
        let (pod, outcome) = self.put_applied(&path, pod).await?;
        Ok(Applied { pod, outcome })
    }

    /// PUTs `object` to `path` (an apply): the object as stored, and what
    /// happened (the `X-Podvisor-Apply` header: `created`, `configured` or
    /// `unchanged`).
    async fn put_applied<T: serde::Serialize + DeserializeOwned>(
        &self,
        path: &str,
        object: &T,
    ) -> Result<(T, String), ClientError> {
        let body = serde_json::to_vec(object).expect("API objects serialize");
        let (url, resp) = self
            .execute(reqwest::Method::PUT, path, |r| {
                r.timeout(REQUEST_TIMEOUT)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
            })
            .await?;
        let outcome = resp
            .headers()
            .get("x-podvisor-apply")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("configured")
            .to_string();
        Ok((decode("PUT", &url, resp).await?, outcome))
    }

    /// Asks for a pod's deletion. Returns the pod as it is now: with a
    /// `deletionTimestamp` while its host stops it, or `None` if it was
    /// removed at once.
    pub async fn delete_pod(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Pod>, ClientError> {
        let deleted: DeleteResult = self
            .call(
                reqwest::Method::DELETE,
                &pod_path(namespace, name),
                &[],
                None,
            )
            .await?;
        Ok(deleted.into_pod())
    }

    /// For the host running the pod: the pod is stopped, remove it.
    pub async fn finalize_pod(&self, namespace: &str, name: &str) -> Result<(), ClientError> {
        let _: DeleteResult = self
            .call(
                reqwest::Method::DELETE,
                &pod_path(namespace, name),
                &[("finalize", "true".into())],
                None,
            )
            .await?;
        Ok(())
    }

    /// For the host running the pod: replaces the pod's status.
    pub async fn update_pod_status(
        &self,
        namespace: &str,
        name: &str,
        status: &PodStatus,
    ) -> Result<Pod, ClientError> {
        let body = StatusBody { status };
        let path = format!("{}/status", pod_path(namespace, name));
        self.call(reqwest::Method::PUT, &path, &[], Some(&body))
            .await
    }

    /// Registers (or re-registers) a host; the token must be that host's.
    /// `endpoint_token` is the secret the host's daemon endpoint will accept
    /// from the server (see [`crate::ENDPOINT_TOKEN_HEADER`]).
    pub async fn register_host(
        &self,
        host: &Host,
        endpoint_token: &str,
    ) -> Result<Host, ClientError> {
        let body = serde_json::to_vec(host).expect("a Host serializes");
        let (url, resp) = self
            .execute(reqwest::Method::POST, "api/v1/hosts", |req| {
                req.timeout(REQUEST_TIMEOUT)
                    .header(crate::ENDPOINT_TOKEN_HEADER, endpoint_token)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
            })
            .await?;
        decode("POST", &url, resp).await
    }

    /// Keeps the host's lease alive (and marks it ready again if it was not).
    pub async fn heartbeat(&self, name: &str) -> Result<Host, ClientError> {
        let path = format!("api/v1/hosts/{name}/heartbeat");
        self.call(reqwest::Method::PUT, &path, &[], None).await
    }

    /// [`Client::heartbeat`] carrying what the host reports about itself,
    /// which the server keeps in its status.
    pub async fn heartbeat_with_report(
        &self,
        name: &str,
        report: &HostReport,
    ) -> Result<Host, ClientError> {
        let path = format!("api/v1/hosts/{name}/heartbeat");
        self.call(reqwest::Method::PUT, &path, &[], Some(report))
            .await
    }

    pub async fn list_hosts(&self) -> Result<HostList, ClientError> {
        self.call(reqwest::Method::GET, "api/v1/hosts", &[], None)
            .await
    }

    pub async fn get_host(&self, name: &str) -> Result<Host, ClientError> {
        let path = format!("api/v1/hosts/{name}");
        self.call(reqwest::Method::GET, &path, &[], None).await
    }

    /// The image catalog.
    pub async fn list_images(&self) -> Result<ImageList, ClientError> {
        self.call(reqwest::Method::GET, "api/v1/images", &[], None)
            .await
    }

    /// A container's output, streamed (until the container ends with
    /// `follow`).
    pub async fn logs(
        &self,
        namespace: &str,
        name: &str,
        options: &LogOptions,
    ) -> Result<LogStream, ClientError> {
        let path = format!("{}/log", pod_path(namespace, name));
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(c) = &options.container {
            query.push(("container", c.clone()));
        }
        if options.follow {
            query.push(("follow", "true".into()));
        }
        if let Some(n) = options.tail_lines {
            query.push(("tailLines", n.to_string()));
        }
        let (url, resp) = self
            .execute(reqwest::Method::GET, &path, |r| r.query(&query))
            .await?;
        let url_text = url.to_string();
        Ok(Box::pin(resp.bytes_stream().map(move |chunk| {
            chunk.map_err(|source| ClientError::Http {
                method: "GET",
                url: url_text.clone(),
                source,
            })
        })))
    }

    /// Hibernates a pod: its host saves the VM's state (sealed, on its
    /// disk) and stops its QEMU; the pod wakes on the first network
    /// request, on exec or `logs -f`, or on [`Client::wake_pod`]. Returns
    /// the server's Status once it is done (`pod default/web hibernated:
    /// ...`); may take up to two minutes.
    pub async fn hibernate_pod(&self, namespace: &str, name: &str) -> Result<Status, ClientError> {
        let path = format!("{}/hibernate", pod_path(namespace, name));
        self.call_within(reqwest::Method::POST, &path, &[], None, HIBERNATE_TIMEOUT)
            .await
    }

    /// Wakes a hibernated pod: its host loads the VM's state again.
    /// Returns the server's Status once the pod runs again; may take up to
    /// two minutes.
    pub async fn wake_pod(&self, namespace: &str, name: &str) -> Result<Status, ClientError> {
        let path = format!("{}/wake", pod_path(namespace, name));
        self.call_within(reqwest::Method::POST, &path, &[], None, HIBERNATE_TIMEOUT)
            .await
    }

    /// Watches pods from after `resource_version` (or, with `None`, from
    /// now, starting with an ADDED event per existing pod).
    pub async fn watch_pods(
        &self,
        filter: &PodFilter,
        resource_version: Option<i64>,
    ) -> Result<PodWatch, ClientError> {
        let mut query = filter.query();
        query.push(("watch", "true".into()));
        if let Some(rv) = resource_version {
            query.push(("resourceVersion", rv.to_string()));
        }
        let (url, resp) = self
            .execute(reqwest::Method::GET, &filter.path(), |r| r.query(&query))
            .await?;
        Ok(PodWatch::new(
            url.to_string(),
            resp,
            resource_version.unwrap_or(0),
        ))
    }

    /// A feed of the pods matching `filter` that survives disconnects and
    /// server restarts: first (or after history was lost) the full set,
    /// then changes, resuming after the last revision seen; see
    /// [`PodFeedEvent`]. With `from`, starts by resuming after that
    /// revision instead of listing. Ends when the receiver is dropped.
    pub fn pod_feed(
        &self,
        filter: PodFilter,
        from: Option<i64>,
    ) -> tokio::sync::mpsc::Receiver<PodFeedEvent> {
        feed::start(self.clone(), filter, from)
    }

    /// Runs a command in a pod's container over a WebSocket.
    pub async fn exec(
        &self,
        namespace: &str,
        name: &str,
        options: &ExecOptions,
    ) -> Result<ExecSession, ClientError> {
        let path = format!("{}/exec", pod_path(namespace, name));
        let count = self.bases.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..count {
            let index = (start + i) % count;
            let url = self.bases[index]
                .join(&path)
                .expect("API paths are relative URLs");
            match exec::connect(url, self.token.as_deref(), options).await {
                Err(e @ ClientError::WebSocket { .. }) if i + 1 < count => last = Some(e),
                other => {
                    self.current.store(index, Ordering::Relaxed);
                    return other;
                }
            }
        }
        Err(last.expect("at least one server"))
    }
}

/// `api/v1/namespaces/NS/pods/NAME`.
fn pod_path(namespace: &str, name: &str) -> String {
    format!("api/v1/namespaces/{namespace}/pods/{name}")
}

/// The JSON body of a successful response to `method` at `url`.
async fn decode<T: DeserializeOwned>(
    method: &'static str,
    url: &Url,
    resp: reqwest::Response,
) -> Result<T, ClientError> {
    let bytes = resp.bytes().await.map_err(|source| ClientError::Http {
        method,
        url: url.to_string(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
        url: url.to_string(),
        reason: e.to_string(),
    })
}

fn method_name(method: &reqwest::Method) -> &'static str {
    match *method {
        reqwest::Method::GET => "GET",
        reqwest::Method::POST => "POST",
        reqwest::Method::PUT => "PUT",
        reqwest::Method::DELETE => "DELETE",
        _ => "request",
    }
}

/// What DELETE answers: the pod (still there, terminating) or a Status
/// (removed).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum DeleteResult {
    Pod(Box<Pod>),
    Status(#[allow(dead_code)] Status),
}

impl DeleteResult {
    fn into_pod(self) -> Option<Pod> {
        match self {
            DeleteResult::Pod(p) => Some(*p),
            DeleteResult::Status(_) => None,
        }
    }
}

/// The body of a status update: `{"status": {...}}`.
#[derive(Serialize)]
struct StatusBody<'a> {
    status: &'a PodStatus,
}

/// Request bodies without generics in [`Client::call`]'s signature.
mod erased {
    pub trait Body {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Body for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("API objects serialize to JSON")
        }
    }
}
