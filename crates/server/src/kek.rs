//! The server's key-encryption key: secrets the server keeps for others
//! (the keys of hibernated pods' snapshots) are stored wrapped by it
//! (AES-256-GCM, a random nonce per secret, the secret's owner as
//! associated data), never in the clear. The key itself is a file outside
//! the store, readable by the server only (mode 0600; one readable by
//! anyone else is refused): copying the store does not give the secrets.
//! Replicas sharing an etcd must share the file; the store keeps the
//! key's id (a hash of it) and a server started with another key refuses
//! to run instead of failing to unwrap later.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use podvisor_store::Store;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::ServerError;
use crate::keys;

/// The key-encryption key, loaded.
pub struct KeyEncryptionKey {
    key: LessSafeKey,
    /// `sha256:` and the hex SHA-256 of a constant derived with the key:
    /// names the key without revealing it.
    id: String,
    path: PathBuf,
}

impl std::fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEncryptionKey")
            .field("id", &self.id)
            .field("path", &self.path)
            .finish()
    }
}

fn config(message: String) -> ServerError {
    ServerError::Config(message)
}

impl KeyEncryptionKey {
    /// Reads the key file (32 bytes as 64 hex digits), creating it with a
    /// random key (mode 0600) if it does not exist. Replicas started
    /// together on one file all end up with the key the first one wrote.
    pub fn load_or_create(path: &Path) -> Result<KeyEncryptionKey, ServerError> {
        let io = |source| ServerError::Io {
            path: path.to_path_buf(),
            source,
        };
        if !path.exists() {
            let mut bytes = [0u8; 32];
            podvisor_store::fill_random(&mut bytes)
                .map_err(|e| config(format!("making a key-encryption key: {e}")))?;
            crate::write_private_file(path, &hex::encode(bytes), crate::Replace::No)?;
        }
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(config(format!(
                "the key-encryption key {} may be read by others (mode {:o}): chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| {
                config(format!(
                    "the key-encryption key {} is not 64 hex digits",
                    path.display()
                ))
            })?;
        Ok(KeyEncryptionKey::from_bytes(&bytes, path))
    }

    /// The key of `bytes` (32), kept in `path`.
    fn from_bytes(bytes: &[u8], path: &Path) -> KeyEncryptionKey {
        let key =
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("a 32-byte AES key"));
        let mut id_input = Vec::from(&b"podvisor key-encryption key id\0"[..]);
        id_input.extend_from_slice(bytes);
        let id = format!("sha256:{}", hex::encode(Sha256::digest(&id_input)));
        id_input.zeroize();
        KeyEncryptionKey {
            key,
            id,
            path: path.to_path_buf(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records this key's id in the store, or checks it against the one
    /// there: all replicas must wrap with the same key. Then seals what an
    /// older server kept in the clear (host endpoint secrets), so a server
    /// that starts leaves no such secret readable in the store.
    pub async fn check_against(&self, store: &dyn Store) -> Result<(), ServerError> {
        self.check_id(store).await?;
        let sealed = seal_plaintext_endpoint_secrets(store, self).await?;
        if sealed > 0 {
            tracing::info!("sealed {sealed} host endpoint secrets stored in the clear");
        }
        Ok(())
    }

    async fn check_id(&self, store: &dyn Store) -> Result<(), ServerError> {
        let stored = match store.create(keys::KEK_ID, self.id.as_bytes(), None).await? {
            Ok(_) => return Ok(()),
            Err(existing) => existing.value,
        };
        if stored == self.id.as_bytes() {
            return Ok(());
        }
        Err(config(format!(
            "the key-encryption key {} ({}) is not the one this cluster's secrets are wrapped with ({}): give every server replica the same key file",
            self.path.display(),
            self.id,
            String::from_utf8_lossy(&stored)
        )))
    }

    /// `secret` sealed under the key, bound to `owner`: nonce, ciphertext
    /// and tag.
    pub fn wrap(&self, secret: &[u8], owner: &[u8]) -> Result<Vec<u8>, ServerError> {
        let mut nonce = [0u8; NONCE_LEN];
        podvisor_store::fill_random(&mut nonce)
            .map_err(|e| config(format!("making a nonce: {e}")))?;
        let mut sealed = secret.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(owner),
                &mut sealed,
            )
            .map_err(|_| config("AES-GCM sealing failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The secret [`KeyEncryptionKey::wrap`] sealed for `owner`; `None` if
    /// it does not open (changed, another owner's, another key's).
    pub fn unwrap(&self, wrapped: &[u8], owner: &[u8]) -> Option<Vec<u8>> {
        if wrapped.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(owner), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// What [`rotate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub old_id: String,
    pub new_id: String,
    /// Snapshot keys rewrapped.
    pub snapshot_keys: usize,
    /// Volume keys rewrapped.
    pub volume_keys: usize,
    /// Host endpoint secrets rewrapped.
    pub host_endpoint_secrets: usize,
}

/// The file the next key is kept in while a rotation runs.
fn next_file(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{name}.next"))
}

/// Replaces the key-encryption key in `path` with a new random one and
/// rewraps every secret wrapped by it (snapshot keys, volume keys) with
/// a compare-and-swap per record; the disks' data keys do not change.
/// Resumable: the new key is first written to `PATH.next` (mode 0600),
/// records already rewrapped (their `kek` is the new id) are skipped, the
/// store's key id changes once all are done, and only then the new key
/// replaces the file (a rename). Run with the servers stopped: a server
/// still holding the old key cannot unwrap what was rewrapped.
pub async fn rotate(store: &dyn Store, path: &Path) -> Result<Rotated, ServerError> {
    if !path.exists() {
        return Err(config(format!(
            "there is no key-encryption key at {}",
            path.display()
        )));
    }
    let old = KeyEncryptionKey::load_or_create(path)?;
    let next_path = next_file(path);
    if !next_path.exists() {
        let mut bytes = [0u8; 32];
        podvisor_store::fill_random(&mut bytes)
            .map_err(|e| config(format!("making a key-encryption key: {e}")))?;
        crate::write_private_file(&next_path, &hex::encode(bytes), crate::Replace::No)?;
        bytes.zeroize();
    }
    let next = KeyEncryptionKey::load_or_create(&next_path)?;
    let next = KeyEncryptionKey {
        path: path.to_path_buf(),
        ..next
    };
    let stored_id = store.get(keys::KEK_ID).await?.map(|kv| kv.value);
    match stored_id.as_deref() {
        Some(id) if id == next.id.as_bytes() => {} // records done, the file not yet
        Some(id) if id != old.id.as_bytes() => {
            return Err(config(format!(
                "the key-encryption key {} ({}) is not the one this cluster's secrets are wrapped with ({}): nothing rotated",
                path.display(),
                old.id,
                String::from_utf8_lossy(id)
            )));
        }
        _ => {}
    }
    let snapshot_keys = rewrap_all(store, keys::SNAPSHOT_KEYS, &old, &next, |key, v| {
        let rest = key.strip_prefix(keys::SNAPSHOT_KEYS)?;
        let (ns, name) = rest.split_once('/')?;
        let uid = v.get("podUid")?.as_str()?;
        let snapshot = v.get("snapshot")?.as_str()?;
        Some(crate::api::snapshot_keys::owner(ns, name, uid, snapshot))
    })
    .await?;
    // Secrets an older server stored in the clear are sealed first, so
    // the rewrap below finds only sealed records.
    seal_plaintext_endpoint_secrets(store, &old).await?;
    let host_endpoint_secrets =
        rewrap_all(store, keys::HOST_ENDPOINT_TOKENS, &old, &next, |key, _| {
            let host = key.strip_prefix(keys::HOST_ENDPOINT_TOKENS)?;
            Some(endpoint_secret_owner(host))
        })
        .await?;
    let volume_keys = rewrap_all(store, keys::VOLUME_KEYS, &old, &next, |key, v| {
        let rest = key.strip_prefix(keys::VOLUME_KEYS)?;
        let (ns, name) = rest.split_once('/')?;
        let uid = v.get("volumeUid")?.as_str()?;
        Some(crate::api::volumes::key_owner(ns, name, uid))
    })
    .await?;
    store.put(keys::KEK_ID, next.id.as_bytes(), None).await?;
    std::fs::rename(&next_path, path).map_err(|source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Rotated {
        old_id: old.id,
        new_id: next.id,
        snapshot_keys,
        volume_keys,
        host_endpoint_secrets,
    })
}

/// Rewraps every record under `prefix` wrapped by `old` with `next`
/// (`owner` gives a record's associated data): how many were rewrapped.
async fn rewrap_all(
    store: &dyn Store,
    prefix: &str,
    old: &KeyEncryptionKey,
    next: &KeyEncryptionKey,
    owner: impl Fn(&str, &serde_json::Value) -> Option<Vec<u8>>,
) -> Result<usize, ServerError> {
    let corrupt = |key: &str, reason: &str| ServerError::Corrupt {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    let (kvs, _) = store.list(prefix).await?;
    let mut count = 0;
    for first in kvs {
        let mut kv = Some(first);
        while let Some(current) = kv.take() {
            let mut value: serde_json::Value = serde_json::from_slice(&current.value)
                .map_err(|e| corrupt(&current.key, &e.to_string()))?;
            if value.get("kek").and_then(|k| k.as_str()) == Some(next.id()) {
                break;
            }
            let aad = owner(&current.key, &value)
                .ok_or_else(|| corrupt(&current.key, "not a wrapped key record"))?;
            let wrapped = value
                .get("wrapped")
                .and_then(|w| w.as_str())
                .and_then(|w| hex::decode(w).ok())
                .ok_or_else(|| corrupt(&current.key, "no wrapped key"))?;
            let mut secret = old.unwrap(&wrapped, &aad).ok_or_else(|| {
                corrupt(
                    &current.key,
                    &format!("does not unwrap with the key-encryption key {}", old.id()),
                )
            })?;
            let rewrapped = next.wrap(&secret, &aad);
            secret.zeroize();
            value["wrapped"] = serde_json::Value::String(hex::encode(rewrapped?));
            value["kek"] = serde_json::Value::String(next.id().to_string());
            let bytes = serde_json::to_vec(&value).expect("JSON serializes");
            match store
                .update(&current.key, &bytes, current.mod_revision)
                .await?
            {
                Ok(_) => count += 1,
                // Changed meanwhile: rewrap what is there now (or it is gone).
                Err(now) => kv = now,
            }
        }
    }
    Ok(count)
}

/// What binds a host's sealed endpoint secret to that host (associated
/// data of its sealing): a record copied to another host's key does not
/// open.
pub(crate) fn endpoint_secret_owner(host: &str) -> Vec<u8> {
    format!("host-endpoint-secret\0{host}").into_bytes()
}

/// The store record of host `host`'s endpoint secret: `{"kek": ID,
/// "wrapped": HEX}`, the secret sealed by `kek` (AES-256-GCM, a random
/// nonce, [`endpoint_secret_owner`] as associated data).
pub(crate) fn seal_endpoint_secret(
    kek: &KeyEncryptionKey,
    host: &str,
    secret: &str,
) -> Result<Vec<u8>, ServerError> {
    let wrapped = kek.wrap(secret.as_bytes(), &endpoint_secret_owner(host))?;
    Ok(serde_json::to_vec(&serde_json::json!({
        "kek": kek.id(),
        "wrapped": hex::encode(wrapped),
    }))
    .expect("JSON serializes"))
}

/// The endpoint secret in the record `stored` of host `host`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StoredEndpointSecret {
    /// A sealed record that opened.
    Sealed(String),
    /// A record an older server wrote in the clear (sealed at start).
    Plaintext(String),
    /// A record that does not open (another key's, another host's,
    /// changed).
    Unusable,
}

/// Opens the record `stored` of host `host`'s endpoint secret.
pub(crate) fn open_endpoint_secret(
    kek: &KeyEncryptionKey,
    host: &str,
    stored: &[u8],
) -> StoredEndpointSecret {
    if !stored.starts_with(b"{") {
        // Older servers stored the secret itself, which is never JSON.
        return match std::str::from_utf8(stored) {
            Ok(s) if podvisor_api::validate_endpoint_token(s).is_ok() => {
                StoredEndpointSecret::Plaintext(s.to_string())
            }
            _ => StoredEndpointSecret::Unusable,
        };
    }
    let opened = serde_json::from_slice::<serde_json::Value>(stored)
        .ok()
        .and_then(|v| hex::decode(v.get("wrapped")?.as_str()?).ok())
        .and_then(|wrapped| kek.unwrap(&wrapped, &endpoint_secret_owner(host)))
        .and_then(|plain| String::from_utf8(plain).ok());
    match opened {
        Some(secret) => StoredEndpointSecret::Sealed(secret),
        None => StoredEndpointSecret::Unusable,
    }
}

/// Seals every host endpoint secret an older server stored in the clear
/// (compare-and-swap on each; one changed meanwhile was written sealed by
/// a register). Returns how many were sealed.
pub(crate) async fn seal_plaintext_endpoint_secrets(
    store: &dyn Store,
    kek: &KeyEncryptionKey,
) -> Result<usize, ServerError> {
    let (kvs, _) = store.list(keys::HOST_ENDPOINT_TOKENS).await?;
    let mut sealed = 0;
    for kv in kvs {
        let Some(host) = kv.key.strip_prefix(keys::HOST_ENDPOINT_TOKENS) else {
            continue;
        };
        if let StoredEndpointSecret::Plaintext(secret) = open_endpoint_secret(kek, host, &kv.value)
        {
            let record = seal_endpoint_secret(kek, host, &secret)?;
            if store
                .update(&kv.key, &record, kv.mod_revision)
                .await?
                .is_ok()
            {
                sealed += 1;
            }
        }
    }
    Ok(sealed)
}

#[cfg(test)]
mod endpoint_secret_tests {
    use super::*;

    #[test]
    fn a_sealed_endpoint_secret_opens_only_for_its_host_under_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let kek = KeyEncryptionKey::load_or_create(&dir.path().join("kek")).unwrap();
        let secret = "s".repeat(40) + "-endpoint_secret";
        let record = seal_endpoint_secret(&kek, "h1", &secret).unwrap();
        assert!(
            !record.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the record holds the secret in the clear"
        );
        assert_eq!(
            open_endpoint_secret(&kek, "h1", &record),
            StoredEndpointSecret::Sealed(secret.clone())
        );
        assert_eq!(
            open_endpoint_secret(&kek, "h2", &record),
            StoredEndpointSecret::Unusable
        );
        let other = KeyEncryptionKey::load_or_create(&dir.path().join("other")).unwrap();
        assert_eq!(
            open_endpoint_secret(&other, "h1", &record),
            StoredEndpointSecret::Unusable
        );
        assert_eq!(
            open_endpoint_secret(&kek, "h1", secret.as_bytes()),
            StoredEndpointSecret::Plaintext(secret)
        );
        assert_eq!(
            open_endpoint_secret(&kek, "h1", b"short"),
            StoredEndpointSecret::Unusable
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_secrets_open_only_for_their_owner_under_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let kek = KeyEncryptionKey::load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let secret = [7u8; 32];
        let wrapped = kek.wrap(&secret, b"pod a").unwrap();
        assert!(!wrapped.windows(32).any(|w| w == secret));
        assert_eq!(kek.unwrap(&wrapped, b"pod a").unwrap(), secret);
        assert!(kek.unwrap(&wrapped, b"pod b").is_none());
        let mut changed = wrapped.clone();
        changed[20] ^= 1;
        assert!(kek.unwrap(&changed, b"pod a").is_none());
        // The same file loads the same key; another file is another key.
        let again = KeyEncryptionKey::load_or_create(&path).unwrap();
        assert_eq!(again.id(), kek.id());
        assert_eq!(again.unwrap(&wrapped, b"pod a").unwrap(), secret);
        let other = KeyEncryptionKey::load_or_create(&dir.path().join("other")).unwrap();
        assert_ne!(other.id(), kek.id());
        assert!(other.unwrap(&wrapped, b"pod a").is_none());
        // Made by many at once, it is one key.
        let shared = dir.path().join("shared");
        let ids: Vec<String> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        KeyEncryptionKey::load_or_create(&shared)
                            .unwrap()
                            .id()
                            .to_string()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        // A key file others may read is refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = KeyEncryptionKey::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("may be read by others"), "{err}");
        std::fs::write(dir.path().join("short"), "abcd\n").unwrap();
        std::fs::set_permissions(
            dir.path().join("short"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert!(KeyEncryptionKey::load_or_create(&dir.path().join("short")).is_err());
    }
}
