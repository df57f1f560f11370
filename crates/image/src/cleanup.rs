//! Removing what dead processes left in the cache directory: temporary
//! entries (`layers-v2/.tmp-o<token>-*`), half-deleted disks
//! (`layers-v2/.trash-o<token>-*`) and staging directories and scratch files
//! (`layers-v2/.staging/o<token>-*`), and the same in format 1's `layers/`. Each name carries the token of the
//! catalog owner that made it; only names whose owner is no longer
//! registered in the catalog (its lease expired or was revoked) are
//! removed, so another live process's work is never touched, whichever host
//! it runs on. Names without a token (made without a catalog) are left
//! alone.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use crate::ImageError;
use crate::cache::LayerCache;
use crate::catalog::Catalog;

/// What [`remove_stale`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    pub entries: usize,
    pub bytes: u64,
}

/// Removes the leftovers of dead owners.
pub async fn remove_stale(cache: &LayerCache, catalog: &Catalog) -> Result<Cleaned, ImageError> {
    let mut found = Vec::new();
    for (dir, prefixes) in [
        (cache.layers_dir(), &[".tmp-o", ".trash-o"][..]),
        (cache.layers_dir().join(".staging"), &["o"][..]),
        // Format 1's directory, where older podvisors wrote.
        (cache.legacy_layers_dir(), &[".tmp-o", ".trash-o"][..]),
        (cache.legacy_layers_dir().join(".staging"), &["o"][..]),
    ] {
        let Ok(read) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in read.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(token) = prefixes.iter().find_map(|p| token_of(&name, p)) {
                found.push((entry.path(), token));
            }
        }
    }
    let mut alive: HashMap<String, bool> = HashMap::new();
    let mut cleaned = Cleaned::default();
    for (path, token) in found {
        let live = match alive.get(&token) {
            Some(&live) => live,
            None => {
                let live = catalog.owner_alive(&token).await?;
                alive.insert(token.clone(), live);
                live
            }
        };
        if live {
            continue;
        }
        let bytes = disk_usage(&path);
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a dead process's temporary files");
                cleaned.entries += 1;
                cleaned.bytes += bytes;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io(format!("remove {}", path.display()), e)),
        }
    }
    Ok(cleaned)
}

/// The owner token in `name` after `prefix` (hex digits up to the next `-`).
fn token_of(name: &str, prefix: &str) -> Option<String> {
    let rest = name.strip_prefix(prefix)?;
    let (token, _) = rest.split_once('-')?;
    (!token.is_empty() && token.bytes().all(|b| b.is_ascii_hexdigit())).then(|| token.to_string())
}

/// Bytes of the files under `path` (not following symlinks).
pub(crate) fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| disk_usage(&e.path())).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_from_names() {
        assert_eq!(
            token_of(".tmp-o0123abcd-XyZ", ".tmp-o").as_deref(),
            Some("0123abcd")
        );
        assert_eq!(
            token_of("o99ff-0123456789ab-Q1", "o").as_deref(),
            Some("99ff")
        );
        assert_eq!(token_of(".tmp-abc", ".tmp-o"), None);
        assert_eq!(token_of("0123456789ab-Q1", "o"), None);
        assert_eq!(token_of("ozz-x", "o"), None);
    }
}
