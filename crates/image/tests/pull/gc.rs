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
