//! The etcd backend: each operation maps onto one etcd v3 request (a Txn
//! for create and compare-and-swap), keys live under an optional namespace
//! prefix, leases are etcd leases and watches are etcd watches.

mod watch;

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};

use crate::{
    KeyValue, LeaseId, Revision, Store, StoreError, WatchStream, check_after, check_key, check_ttl,
};

/// How long one request may take before the store counts as unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`EtcdStore::connect`] waits for the first answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted (a `list` of many pods is one response).
const MAX_RESPONSE: usize = 256 << 20;

/// The etcd backend of [`Store`].
pub struct EtcdStore {
    client: Client,
    kv: KvClient,
    url: String,
    namespace: String,
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`),
    /// keeping every key under `namespace` (may be empty), and checks that
    /// it answers.
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<EtcdStore, StoreError> {
        let hosts: Vec<&str> = endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect();
        let mut url = format!("etcd://{}", hosts.join(","));
        if !namespace.is_empty() {
            url.push_str(&format!("?prefix={namespace}"));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client =
            match tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(endpoints, Some(options)))
                .await
            {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => return Err(unavailable(&url, format!("cannot connect: {e}"))),
                Err(_) => return Err(unavailable(&url, "no answer to connect".into())),
            };
        let kv = client.kv_client().max_decoding_message_size(MAX_RESPONSE);
        let store = EtcdStore {
            client,
            kv,
            url,
            namespace: namespace.to_string(),
        };
        // The client connects lazily: ask something to know it answers.
        store.current_revision().await?;
        Ok(store)
    }

    /// `etcd://host:port,...[?prefix=...]`, as named in errors.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.namespace).into_bytes()
    }

    /// Turns an etcd key-value into ours, without the namespace.
    fn key_value(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        Ok(KeyValue {
            key: self.strip_key(kv.key())?,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: (kv.lease() != 0).then_some(kv.lease()),
        })
    }

    fn strip_key(&self, key: &[u8]) -> Result<String, StoreError> {
        key.strip_prefix(self.namespace.as_bytes())
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::to_string)
            .ok_or_else(|| StoreError::Backend {
                url: self.url.clone(),
                reason: format!(
                    "etcd returned key {:?}, which is not UTF-8 under the namespace",
                    String::from_utf8_lossy(key)
                ),
            })
    }

    /// Runs one request with [`REQUEST_TIMEOUT`], mapping its errors.
    async fn call<T>(
        &self,
        what: &str,
        lease: Option<LeaseId>,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_error(&self.url, what, lease, e)),
            Err(_) => Err(unavailable(
                &self.url,
                format!("{what}: no answer within {REQUEST_TIMEOUT:?}"),
            )),
        }
    }

    fn revision_of(
        &self,
        header: Option<&etcd_client::ResponseHeader>,
    ) -> Result<Revision, StoreError> {
        header
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Backend {
                url: self.url.clone(),
                reason: "etcd answered without a response header".into(),
            })
    }

    /// The single key-value a Txn's `or_else` get returned, if any.
    fn txn_get(&self, responses: Vec<TxnOpResponse>) -> Result<Option<KeyValue>, StoreError> {
        for r in responses {
            if let TxnOpResponse::Get(get) = r {
                return get.kvs().first().map(|kv| self.key_value(kv)).transpose();
            }
        }
        Ok(None)
    }
}

fn unavailable(url: &str, reason: String) -> StoreError {
    StoreError::Unavailable {
        url: url.to_string(),
        reason,
    }
}

/// Maps an etcd client error of request `what` to a [`StoreError`].
fn map_error(url: &str, what: &str, lease: Option<LeaseId>, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    let message = describe(&e);
    if let Some(lease) = lease
        && message.contains("lease not found")
    {
        return StoreError::LeaseNotFound(lease);
    }
    let connection_lost = match &e {
        E::GRpcStatus(status) => {
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) || (status.code() == tonic::Code::Unknown
                && (message.contains("h2 protocol error") || message.contains("transport")))
        }
        E::TransportError(_) | E::IoError(_) => true,
        _ => false,
    };
    if connection_lost {
        unavailable(url, format!("{what}: {message}"))
    } else {
        StoreError::Backend {
            url: url.to_string(),
            reason: format!("{what}: {message}"),
        }
    }
}

/// The useful part of an etcd client error: a gRPC status's message
/// rather than its debug dump.
fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(&self.url, key)?;
        let mut kv = self.kv.clone();
        let resp = self
            .call(
                &format!("get {key:?}"),
                None,
                kv.get(self.full_key(key), None),
            )
            .await?;
        resp.kvs().first().map(|kv| self.key_value(kv)).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let mut kv = self.kv.clone();
        let resp = self
            .call(
                &format!("list {prefix:?}"),
                None,
                kv.get(self.full_key(prefix), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| self.key_value(kv))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((kvs, self.revision_of(resp.header())?))
    }

    async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        check_key(&self.url, key)?;
        let mut kv = self.kv.clone();
        let options = PutOptions::new().with_lease(lease.unwrap_or(0));
        let resp = self
            .call(
                &format!("put {key:?}"),
                lease,
                kv.put(self.full_key(key), value, Some(options)),
            )
            .await?;
        self.revision_of(resp.header())
    }

    async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Result<Revision, KeyValue>, StoreError> {
        check_key(&self.url, key)?;
        let full = self.full_key(key);
        let txn = Txn::new()
            .when([Compare::create_revision(full.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                full.clone(),
                value,
                Some(PutOptions::new().with_lease(lease.unwrap_or(0))),
            )])
            .or_else([TxnOp::get(full, None)]);
        let mut kv = self.kv.clone();
        let resp = self
            .call(&format!("create {key:?}"), lease, kv.txn(txn))
            .await?;
        if resp.succeeded() {
            return Ok(Ok(self.revision_of(resp.header())?));
        }
        match self.txn_get(resp.op_responses())? {
            Some(existing) => Ok(Err(existing)),
            None => Err(StoreError::Backend {
                url: self.url.clone(),
                reason: format!("create {key:?}: etcd said the key exists but returned none"),
            }),
        }
    }

    async fn update(
        &self,
        key: &str,
        value: &[u8],
        expected: Revision,
    ) -> Result<Result<Revision, Option<KeyValue>>, StoreError> {
        check_key(&self.url, key)?;
        let full = self.full_key(key);
        // An absent key has mod_revision 0: require that it exists too.
        let txn = Txn::new()
            .when([
                Compare::create_revision(full.clone(), CompareOp::Greater, 0),
                Compare::mod_revision(full.clone(), CompareOp::Equal, expected),
            ])
            .and_then([TxnOp::put(
                full.clone(),
                value,
                Some(PutOptions::new().with_ignore_lease()),
            )])
            .or_else([TxnOp::get(full, None)]);
        let mut kv = self.kv.clone();
        let resp = self
            .call(&format!("update {key:?}"), None, kv.txn(txn))
            .await?;
        if resp.succeeded() {
            return Ok(Ok(self.revision_of(resp.header())?));
        }
        Ok(Err(self.txn_get(resp.op_responses())?))
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        check_key(&self.url, key)?;
        let mut kv = self.kv.clone();
        let resp = self
            .call(
                &format!("delete {key:?}"),
                None,
                kv.delete(self.full_key(key), None),
            )
            .await?;
        if resp.deleted() == 0 {
            return Ok(None);
        }
        Ok(Some(self.revision_of(resp.header())?))
    }

    async fn delete_if(&self, key: &str, expected: Revision) -> Result<bool, StoreError> {
        check_key(&self.url, key)?;
        let full = self.full_key(key);
        let txn = Txn::new()
            .when([
                Compare::create_revision(full.clone(), CompareOp::Greater, 0),
                Compare::mod_revision(full.clone(), CompareOp::Equal, expected),
            ])
            .and_then([TxnOp::delete(full, None)]);
        let mut kv = self.kv.clone();
        let resp = self
            .call(&format!("delete_if {key:?}"), None, kv.txn(txn))
            .await?;
        Ok(resp.succeeded())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        check_ttl(&self.url, ttl)?;
        // etcd counts whole seconds: round up, never below 1.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
        let mut client = self.client.clone();
        let resp = self
            .call("grant lease", None, client.lease_grant(secs, None))
            .await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Backend {
                url: self.url.clone(),
                reason: format!("grant lease: {}", resp.error()),
            });
        }
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        // The client waits for the first answer and fails with "lease not
        // found" if etcd reports a TTL of 0.
        self.call(
            &format!("keep lease {lease} alive"),
            Some(lease),
            client.lease_keep_alive(lease),
        )
        .await?;
        Ok(())
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        self.call(
            &format!("revoke lease {lease}"),
            Some(lease),
            client.lease_revoke(lease),
        )
        .await?;
        Ok(())
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        check_after(&self.url, prefix, after)?;
        watch::start(self, prefix, after).await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let mut kv = self.kv.clone();
        // Any range request carries the store revision in its header.
        let resp = self
            .call(
                "read the current revision",
                None,
                kv.get(vec![0u8], Some(GetOptions::new().with_count_only())),
            )
            .await?;
        self.revision_of(resp.header())
    }
}
