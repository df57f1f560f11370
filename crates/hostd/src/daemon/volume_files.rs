//! What the host learns from the cluster's volume list, every
//! [`VOLUME_GC_PERIOD`]: the data files in its volume directory
//! (`<ns>/<name>-<uid>.img`) that no volume names any more are deleted, if
//! they are older than the list (a volume made and first attached
//! meanwhile keeps its file; files that do not follow the naming are left
//! alone); and a revoked volume still attached to one of its pods is
//! closed there (the server also says so when it revokes, but a host it
//! could not reach then learns it here). Temporary files a killed daemon
//! left while making a disk (`.NAME.tmp-*`, here and among the format
//! images) go once they are older than [`STALE_TEMP_AGE`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::sync::Arc;

use podvisor_api::Client;

use crate::host::PodRuntime;

/// How often the files of deleted volumes are looked for.
pub const VOLUME_GC_PERIOD: Duration = Duration::from_secs(60);

/// Age after which a disk's temporary file is a leftover: making one
/// (`mkfs.ext4` of a sparse file) takes seconds.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(600);

/// Runs forever: removes the files of volumes that are gone.
pub async fn collect_periodically(
    client: Client,
    dir: PathBuf,
    format_images: PathBuf,
    host: String,
    runtime: Arc<PodRuntime>,
) {
    loop {
        let (d, f) = (dir.clone(), format_images.clone());
        let removed = tokio::task::spawn_blocking(move || {
            let before = SystemTime::now() - STALE_TEMP_AGE;
            let mut removed = remove_temporaries(&f, before);
            if let Ok(namespaces) = std::fs::read_dir(&d) {
                for ns in namespaces.flatten() {
                    removed.extend(remove_temporaries(&ns.path(), before));
                }
            }
            removed
        })
        .await
        .unwrap_or_default();
        for f in removed {
            tracing::info!(file = %f.display(), "removed a disk a daemon did not finish making");
        }
        let listed_at = SystemTime::now();
        match client.list_volumes(None).await {
            Ok(list) => {
                for v in &list.items {
                    let (Some(_), Some(a)) = (&v.status.revoked_at, &v.status.attached_to) else {
                        continue;
                    };
                    if a.host != host {
                        continue;
                    }
                    let ns = v.metadata.namespace();
                    match runtime.close_volume(ns, &a.pod, &v.metadata.name).await {
                        Ok(m) if m.contains(" closed in ") => tracing::info!("{m}"),
                        Ok(_) => {}
                        Err(e) => tracing::debug!(
                            "closing revoked volume {ns}/{}: {e}",
                            v.metadata.name,
                            e = podvisor_errors::ErrorChain(&e)
                        ),
                    }
                }
                let live: HashSet<String> = list
                    .items
                    .iter()
                    .filter_map(|v| {
                        let uid = v.metadata.uid.as_deref()?;
                        Some(format!(
                            "{}/{}-{uid}.img",
                            v.metadata.namespace(),
                            v.metadata.name
                        ))
                    })
                    .collect();
                let dir = dir.clone();
                let removed =
                    tokio::task::spawn_blocking(move || remove_stale(&dir, &live, listed_at))
                        .await
                        .unwrap_or_default();
                for f in removed {
                    tracing::info!(file = %f.display(), "removed the data of a deleted volume");
                }
            }
            Err(e) => tracing::debug!(
                "listing volumes to remove deleted ones' files: {e}",
                e = podvisor_errors::ErrorChain(&e)
            ),
        }
        tokio::time::sleep(VOLUME_GC_PERIOD).await;
    }
}

/// Removes the temporary files of unfinished disks (`.NAME.tmp-*`) in
/// `dir` last changed before `before`.
pub fn remove_temporaries(dir: &Path, before: SystemTime) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(files) = std::fs::read_dir(dir) else {
        return removed;
    };
    for f in files.flatten() {
        let name = f.file_name().to_string_lossy().to_string();
        if !(name.starts_with('.') && name.contains(".tmp-")) {
            continue;
        }
        let old = f
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < before);
        if old && std::fs::remove_file(f.path()).is_ok() {
            removed.push(f.path());
        }
    }
    removed
}

/// Removes the volume files under `dir` that `live` (`ns/name-uid.img`)
/// does not name and that were last changed before `listed_at`.
pub fn remove_stale(dir: &Path, live: &HashSet<String>, listed_at: SystemTime) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(dir) else {
        return removed;
    };
    for ns in namespaces.flatten() {
        let Ok(files) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if !name.ends_with(".img") || name.contains(".tmp-") {
                continue;
            }
            let key = format!("{}/{name}", ns.file_name().to_string_lossy());
            if live.contains(&key) {
                continue;
            }
            let old = f
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < listed_at);
            if old && std::fs::remove_file(f.path()).is_ok() {
                removed.push(f.path());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_of_volumes_that_are_gone_and_older_than_the_list_go() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("default")).unwrap();
        for f in ["default/a-1.img", "default/gone-2.img", "default/notes.txt"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let live: HashSet<String> = ["default/a-1.img".to_string()].into();
        // Listed before the files were made: nothing goes.
        let before = SystemTime::now() - Duration::from_secs(60);
        assert!(remove_stale(dir.path(), &live, before).is_empty());
        let removed = remove_stale(
            dir.path(),
            &live,
            SystemTime::now() + Duration::from_secs(1),
        );
        assert_eq!(removed, vec![dir.path().join("default/gone-2.img")]);
        assert!(dir.path().join("default/a-1.img").exists());
        assert!(dir.path().join("default/notes.txt").exists());
    }

    #[test]
    fn only_old_temporaries_go() {
        let dir = tempfile::tempdir().unwrap();
        for f in [".a-1.img.tmp-42-0", "a-1.img", "b.tmp-1"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let before = SystemTime::now() - Duration::from_secs(60);
        assert!(remove_temporaries(dir.path(), before).is_empty());
        let later = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(
            remove_temporaries(dir.path(), later),
            vec![dir.path().join(".a-1.img.tmp-42-0")]
        );
        assert!(dir.path().join("a-1.img").exists());
        assert!(dir.path().join("b.tmp-1").exists());
    }
}
