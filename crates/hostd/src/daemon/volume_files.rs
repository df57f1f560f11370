//! What the host learns from the cluster's volume list, every
//! [`VOLUME_GC_PERIOD`]: the data files in its volume directory
//! (`<ns>/<name>-<uid>.img`) that no volume names any more are deleted, if
//! they are older than the list (a volume made and first attached
//! meanwhile keeps its file; files that do not follow the naming are left
//! alone); and a revoked volume still attached to one of its pods is
//! closed there (the server also says so when it revokes, but a host it
//! could not reach then learns it here).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::sync::Arc;

use podvisor_api::Client;

use crate::host::PodRuntime;

/// How often the files of deleted volumes are looked for.
pub const VOLUME_GC_PERIOD: Duration = Duration::from_secs(60);

/// Runs forever: removes the files of volumes that are gone.
pub async fn collect_periodically(
    client: Client,
    dir: PathBuf,
    host: String,
    runtime: Arc<PodRuntime>,
) {
    loop {
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
}
