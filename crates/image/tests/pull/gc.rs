//! `image rm` and GC: only disks no image references and nothing uses go,
//! with the bytes they held reported; leftovers of dead processes go too.

use std::fs;

use crate::env::Env;
use podvisor_image::gc::{gc, remove_image};
use podvisor_image::{ChainId, ImageError};
use podvisor_testbed::oci::{Entry, ImageBuilder};
use podvisor_testbed::registry::Registry;

fn image(marker: &str) -> podvisor_testbed::oci::BuiltImage {
    ImageBuilder::new()
        .layer(vec![Entry::file("base", "shared base", 0o644)])
        .layer(vec![Entry::file("marker", marker, 0o644)])
        .build()
        .unwrap()
}

/// Bytes of a layer's entry directory (disk and metadata).
fn disk_size(env: &Env, chain: &str) -> u64 {
    let dir = env
        .cache
        .layers_dir()
        .join(chain.strip_prefix("sha256:").unwrap());
    ["disk.erofs", "layer.json"]
        .iter()
        .map(|f| fs::metadata(dir.join(f)).unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn rm_frees_only_layers_no_other_image_uses() {
    let registry = Registry::start();
    let (a, b) = (image("a"), image("b"));
    registry.push(&a, "app", "a");
    registry.push(&b, "app", "b");
    let env = Env::new().await;
    env.pull(&registry.reference("app", "a")).await.unwrap();
    env.pull(&registry.reference("app", "b")).await.unwrap();
    assert_eq!(env.disk_dirs().len(), 3);

    let report = gc(&env.cache, &env.catalog).await.unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(report.bytes_freed(), 0);

    let a_only = disk_size(&env, &a.chain_ids[1]);
    let report = remove_image(&env.cache, &env.catalog, &registry.reference("app", "a"))
        .await
        .unwrap();
    assert_eq!(report.untagged, vec![registry.reference("app", "a")]);
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert_eq!(report.removed[0].0.to_string(), a.chain_ids[1]);
    assert_eq!(report.bytes_freed(), a_only);
    assert_eq!(env.disk_dirs().len(), 2);
    assert!(
        env.catalog
            .reference(&registry.reference("app", "a"))
            .await
            .unwrap()
            .is_none()
    );

    let base = disk_size(&env, &b.chain_ids[0]) + disk_size(&env, &b.chain_ids[1]);
    let report = remove_image(&env.cache, &env.catalog, &registry.reference("app", "b"))
        .await
        .unwrap();
    assert_eq!(report.removed.len(), 2);
    assert_eq!(report.bytes_freed(), base);
    assert!(env.disk_dirs().is_empty());
    assert!(env.catalog.layers().await.unwrap().is_empty());
    assert!(env.catalog.manifests().await.unwrap().is_empty());

    let err = remove_image(&env.cache, &env.catalog, "nothing:here")
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotInCatalog { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_layer_survives_rm_and_gc_until_released() {
    let registry = Registry::start();
    let a = image("held");
    registry.push(&a, "app", "held");
    let env = Env::new().await;
    let pulled = env.pull(&registry.reference("app", "held")).await.unwrap();
    pulled.hold.release().await;
    let chains: Vec<ChainId> = pulled
        .image
        .layers
        .iter()
        .map(|l| l.chain_id.clone())
        .collect();

    // A pod in another process uses the image.
    let pod = env.other_process().await;
    let hold = pod.hold_layers(&chains, "pod test", true).await.unwrap();
    assert!(pod.touch_layers(&chains).await.unwrap().is_empty());

    let report = remove_image(&env.cache, &env.catalog, &registry.reference("app", "held"))
        .await
        .unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(report.in_use.len(), 2);
    assert!(
        report.in_use[0].1[0].what.contains("pod test"),
        "{report:?}"
    );
    assert_eq!(env.disk_dirs().len(), 2);
    let report = gc(&env.cache, &env.catalog).await.unwrap();
    assert!(report.removed.is_empty());

    hold.release().await;
    let report = gc(&env.cache, &env.catalog).await.unwrap();
    assert_eq!(report.removed.len(), 2);
    assert!(env.disk_dirs().is_empty());

    // When the process holding the layers dies, its lease ends the hold too.
    let pulled = env.pull(&registry.reference("app", "held")).await.unwrap();
    pulled.hold.release().await;
    let hold = pod.hold_layers(&chains, "pod test", true).await.unwrap();
    std::mem::forget(hold);
    pod.close().await;
    remove_image(&env.cache, &env.catalog, &registry.reference("app", "held"))
        .await
        .unwrap();
    assert!(env.disk_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn leftovers_of_dead_processes_go_live_ones_stay() {
    let env = Env::new().await;
    let other = env.other_process().await;
    let layers = env.cache.layers_dir();
    let dead = "deadbeefdeadbeef";
    let paths = [
        layers.join(format!(".tmp-o{dead}-Ab12")),
        layers.join(format!(".trash-o{dead}-0123")),
        layers.join(format!(".staging/o{dead}-0123456789ab-Xy")),
        layers.join(format!(".tmp-o{}-Cd34", other.token())),
        layers.join(format!(".staging/o{}-0123456789ab-Zz", other.token())),
        layers.join(".tmp-legacy"),
    ];
    for p in &paths {
        fs::create_dir_all(p).unwrap();
        fs::write(p.join("data"), vec![1u8; 1000]).unwrap();
    }
    let report = gc(&env.cache, &env.catalog).await.unwrap();
    assert_eq!(report.stale.entries, 3);
    assert_eq!(report.stale.bytes, 3000);
    assert_eq!(report.bytes_freed(), 3000);
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(p.exists(), i >= 3, "{}", p.display());
    }
    other.close().await;
    let report = gc(&env.cache, &env.catalog).await.unwrap();
    assert_eq!(
        report.stale.entries, 2,
        "the closed owner's leftovers go now"
    );
}

/// Makes the cache look as a podvisor of format 1 (inline file tails,
/// unpadded disks, in `layers/`) left it: every disk moved there, its
/// `layer.json` saying format 1.
fn as_format_1(env: &Env) {
    let legacy = env.cache.legacy_layers_dir();
    fs::create_dir_all(&legacy).unwrap();
    for name in env.disk_dirs() {
        let dir = legacy.join(&name);
        fs::rename(env.cache.layers_dir().join(&name), &dir).unwrap();
        let meta = dir.join("layer.json");
        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(&meta).unwrap()).unwrap();
        json["format"] = 1.into();
        fs::write(&meta, serde_json::to_vec(&json).unwrap()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn format_1_disks_are_never_used_and_go_with_their_layer() {
    let registry = Registry::start();
    let a = image("old");
    registry.push(&a, "app", "old");
    let env = Env::new().await;
    let reference = registry.reference("app", "old");
    env.pull(&reference).await.unwrap().hold.release().await;
    as_format_1(&env);
    assert!(env.disk_dirs().is_empty());
    let legacy: Vec<_> = a.chain_ids.iter().map(|c| hex_dir(&env, c, true)).collect();
    let legacy_bytes: u64 = legacy.iter().map(|d| dir_bytes(d)).sum();

    // The catalog still has the image: its disks are made again, in this
    // format and directory; the old ones are left to whoever uses them.
    let pulled = env.pull(&reference).await.unwrap();
    pulled.hold.release().await;
    assert_eq!(env.disk_dirs().len(), 2);
    for (layer, chain) in pulled.image.layers.iter().zip(&a.chain_ids) {
        assert_eq!(layer.path, hex_dir(&env, chain, false).join("disk.erofs"));
        assert_eq!(layer.size % podvisor_image::DISK_ALIGN, 0);
        assert!(legacy.iter().all(|d| d.join("disk.erofs").exists()));
    }

    // A format 1 entry in the format 2 directory is not a disk either.
    let meta = hex_dir(&env, &a.chain_ids[0], false).join("layer.json");
    let good = fs::read(&meta).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&good).unwrap();
    json["format"] = 1.into();
    fs::write(&meta, serde_json::to_vec(&json).unwrap()).unwrap();
    let chain = ChainId::parse(&a.chain_ids[0]).unwrap();
    assert!(env.cache.get(&chain).is_none());
    fs::write(&meta, good).unwrap();
    assert!(env.cache.get(&chain).is_some());

    // Removing the image removes both disks of each layer.
    let new_bytes: u64 = a.chain_ids.iter().map(|c| disk_size(&env, c)).sum();
    let report = remove_image(&env.cache, &env.catalog, &reference)
        .await
        .unwrap();
    assert_eq!(report.removed.len(), 2, "{report:?}");
    assert_eq!(report.bytes_freed(), new_bytes + legacy_bytes);
    assert!(env.disk_dirs().is_empty());
    assert!(legacy.iter().all(|d| !d.exists()));

    // A format 1 disk the catalog does not name goes at the next GC.
    let orphan = hex_dir(&env, &a.chain_ids[0], true);
    fs::create_dir_all(&orphan).unwrap();
    fs::write(orphan.join("disk.erofs"), b"old").unwrap();
    let report = gc(&env.cache, &env.catalog).await.unwrap();
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert!(!orphan.exists());
}

/// The entry directory of `chain` in format 2's directory or format 1's.
fn hex_dir(env: &Env, chain: &str, legacy: bool) -> std::path::PathBuf {
    let root = if legacy {
        env.cache.legacy_layers_dir()
    } else {
        env.cache.layers_dir()
    };
    root.join(chain.strip_prefix("sha256:").unwrap())
}

/// Bytes of the files in `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}
