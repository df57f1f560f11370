//! API tokens: made at init (admin) or by `server token create` (users,
//! hosts), stored as SHA-256 hashes in the store, and checked on every
//! request ([`Caller`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ServerError};
use crate::keys;
use podvisor_store::{RandomError, Store, StoreError};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Pods, hosts and images: read, create, delete, logs, exec.
    User,
    /// One host's daemon: register and heartbeat that host, read pods,
    /// report status of and finalize the pods assigned to it.
    Host,
}

/// A token as stored (under the hash of the token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub role: Role,
    /// The user's or host's name (`admin` for the admin token).
    pub name: String,
    pub created: chrono::DateTime<chrono::Utc>,
    /// The namespaces a user token may see and change; absent: all of
    /// them (admin and host tokens, user tokens made with
    /// `--all-namespaces`, and user tokens made before tokens had scopes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
}

/// Who is calling, from their token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    pub name: String,
    /// [`TokenRecord::namespaces`].
    pub namespaces: Option<Vec<String>>,
}

impl Caller {
    /// Whether the caller may see and change things of `namespace`: admins
    /// and hosts everywhere, users in their token's namespaces.
    pub fn may_use(&self, namespace: &str) -> bool {
        match (&self.role, &self.namespaces) {
            (Role::User, Some(allowed)) => allowed.iter().any(|n| n == namespace),
            _ => true,
        }
    }

    /// Fails unless the caller may use `namespace` ([`Caller::may_use`]).
    pub fn require_namespace(&self, namespace: &str) -> Result<(), ApiError> {
        if self.may_use(namespace) {
            return Ok(());
        }
        let allowed = self.namespaces.as_deref().unwrap_or_default().join(", ");
        Err(ApiError::forbidden(format!(
            "user {:?} may not use namespace {namespace:?}: its token is for namespace(s) {allowed}",
            self.name
        )))
    }

    /// Fails unless the caller is an admin or a user.
    pub fn require_user(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Admin | Role::User => Ok(()),
            Role::Host => Err(ApiError::forbidden(format!(
                "the token of host {:?} may only register and heartbeat that host, read pods, and report status of or finalize its own pods",
                self.name
            ))),
        }
    }

    /// Fails unless the caller is the host `host` (or an admin).
    pub fn require_host(&self, host: &str, what: &str) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Host if self.name == host => Ok(()),
            Role::Host => Err(ApiError::forbidden(format!(
                "{what}: only host {host:?} may do this, the token is host {:?}'s",
                self.name
            ))),
            Role::User => Err(ApiError::forbidden(format!(
                "{what}: only host {host:?} may do this (with its host token), not user {:?}",
                self.name
            ))),
        }
    }
}

/// A new random token: `pv_` and 64 hex digits.
pub fn generate() -> Result<String, RandomError> {
    Ok(format!("pv_{}", podvisor_store::random_hex(32)?))
}

/// The hex SHA-256 of a token, its key in the store.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Stores a new token for `role`/`name` (a user's limited to
/// `namespaces` when given) and returns it (the only time it is seen in
/// clear).
pub async fn create(
    store: &dyn Store,
    role: Role,
    name: &str,
    namespaces: Option<Vec<String>>,
) -> Result<String, ServerError> {
    let token = generate()?;
    let record = TokenRecord {
        role,
        name: name.to_string(),
        created: chrono::Utc::now(),
        namespaces,
    };
    let value = serde_json::to_vec(&record).expect("token records serialize");
    store.put(&keys::token(&hash(&token)), &value, None).await?;
    Ok(token)
}

/// A stored token as `podvisor server token ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenEntry {
    /// The hex SHA-256 of the token: its key, and what identifies it (the
    /// token itself is never stored).
    pub id: String,
    pub record: TokenRecord,
}

/// Which tokens to revoke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revoke {
    /// The one token whose id starts with this (at least 8 hex digits).
    Id(String),
    /// Every token of this user or host.
    Holder(Role, String),
}

/// Every stored token, oldest first.
pub async fn list(store: &dyn Store) -> Result<Vec<TokenEntry>, StoreError> {
    let (kvs, _) = store.list(keys::TOKENS).await?;
    let mut entries: Vec<TokenEntry> = kvs
        .iter()
        .filter_map(|kv| {
            let id = kv.key.strip_prefix(keys::TOKENS)?.to_string();
            let record = serde_json::from_slice(&kv.value).ok()?;
            Some(TokenEntry { id, record })
        })
        .collect();
    entries.sort_by_key(|e| e.record.created);
    Ok(entries)
}

/// Why tokens could not be revoked.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("a token id prefix needs at least 8 hex digits, not {0:?}")]
    ShortId(String),
    #[error("no token matches {0}")]
    NoMatch(String),
    #[error("{count} tokens have ids starting with {prefix:?}: give more digits")]
    Ambiguous { prefix: String, count: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Deletes the tokens `which` selects and returns them. Servers trust a
/// token they have seen for up to [`CACHE_TTL`] (10 s) more.
pub async fn revoke(store: &dyn Store, which: &Revoke) -> Result<Vec<TokenEntry>, RevokeError> {
    let all = list(store).await?;
    let chosen: Vec<TokenEntry> = match which {
        Revoke::Id(prefix) => {
            let prefix = prefix.to_ascii_lowercase();
            if prefix.len() < 8 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(RevokeError::ShortId(prefix));
            }
            let matching: Vec<TokenEntry> = all
                .into_iter()
                .filter(|e| e.id.starts_with(&prefix))
                .collect();
            if matching.len() > 1 {
                return Err(RevokeError::Ambiguous {
                    prefix,
                    count: matching.len(),
                });
            }
            matching
        }
        Revoke::Holder(role, name) => all
            .into_iter()
            .filter(|e| e.record.role == *role && e.record.name == *name)
            .collect(),
    };
    if chosen.is_empty() {
        return Err(RevokeError::NoMatch(match which {
            Revoke::Id(prefix) => format!("id {prefix}"),
            Revoke::Holder(role, name) => format!("{role:?} {name:?}").to_lowercase(),
        }));
    }
    for entry in &chosen {
        store.delete(&keys::token(&entry.id)).await?;
    }
    Ok(chosen)
}

/// How long a token found in the store is trusted without looking again.
const CACHE_TTL: Duration = Duration::from_secs(10);

/// Token lookups in a store, with a short-lived cache of tokens found.
#[derive(Clone)]
pub struct TokenCheck {
    store: Arc<dyn Store>,
    found: Arc<Mutex<HashMap<String, (Caller, Instant)>>>,
}

impl TokenCheck {
    /// Looks tokens up in `store`.
    pub fn new(store: Arc<dyn Store>) -> TokenCheck {
        TokenCheck {
            store,
            found: Arc::default(),
        }
    }

    /// The caller a bearer token belongs to.
    pub async fn caller(&self, token: &str) -> Result<Caller, ApiError> {
        let hash = hash(token);
        if let Some((caller, at)) = self.found.lock().unwrap().get(&hash)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(caller.clone());
        }
        let kv = self.store.get(&keys::token(&hash)).await?.ok_or_else(|| {
            ApiError::unauthorized(
                "the bearer token is not valid on this server (unknown token); make one with `podvisor server token create` or use the admin token from `podvisor server init`",
            )
        })?;
        let record: TokenRecord = serde_json::from_slice(&kv.value).map_err(|e| {
            ApiError::internal(format!(
                "the stored record of this token is unreadable: {e}"
            ))
        })?;
        let caller = Caller {
            role: record.role,
            name: record.name,
            namespaces: record.namespaces,
        };
        self.found
            .lock()
            .unwrap()
            .insert(hash, (caller.clone(), Instant::now()));
        Ok(caller)
    }
}

/// A handler's `Caller` argument: the bearer token's owner, for any router
/// state that gives a [`TokenCheck`].
impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    TokenCheck: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Caller, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "no Authorization header: send `Authorization: Bearer TOKEN` (podvisor: --token or PODVISOR_TOKEN)",
                )
            })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header is not `Bearer TOKEN`")
            })?;
        TokenCheck::from_ref(state).caller(token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("pv_") && a.len() == 67);
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
        assert!(!hash(&a).contains(&a[3..]));
    }

    #[test]
    fn user_tokens_reach_only_their_namespaces() {
        let caller = |role, namespaces: Option<&[&str]>| Caller {
            role,
            name: "alice".into(),
            namespaces: namespaces.map(|n| n.iter().map(|s| s.to_string()).collect()),
        };
        let alice = caller(Role::User, Some(&["team-a", "shared"]));
        assert!(alice.may_use("team-a") && alice.may_use("shared"));
        assert!(!alice.may_use("team-b") && !alice.may_use("default"));
        let err = alice.require_namespace("team-b").unwrap_err();
        assert!(format!("{err:?}").contains("team-a, shared"), "{err:?}");
        // Admins, hosts and unscoped (older) user tokens: everywhere.
        assert!(caller(Role::Admin, None).may_use("team-b"));
        assert!(caller(Role::Host, None).may_use("team-b"));
        assert!(caller(Role::User, None).may_use("team-b"));
        // A record from before scopes reads as unscoped.
        let old: TokenRecord = serde_json::from_str(
            r#"{"role":"user","name":"bob","created":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(old.namespaces, None);
    }
}
