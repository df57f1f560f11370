//! `acquire`: an image source to layer disks held for a pod, as `podvisor
//! run` and the host daemon use it, against a real registry and real
//! mkfs.erofs: what is fetched, what is held, and what happens when a
//! layer disk is gone.

use std::fs;
use std::sync::Arc;

use crate::env::{Env, hex};
use podvisor_image::gc::{gc, remove_image};
use podvisor_image::progress::NoProgress;
use podvisor_image::{
    Catalog, HeldImage, HoldFor, ImageError, ImageSource, LayerAttachments, acquire,
};
use podvisor_testbed::oci::{BuiltImage, Entry, ImageBuilder};
use podvisor_testbed::registry::Registry;

fn image(marker: &str) -> BuiltImage {
    ImageBuilder::new()
        .layer(vec![Entry::file("base", "shared base", 0o644)])
        .layer(vec![Entry::file("marker", marker, 0o644)])
        .cmd(&["cat", "/marker"])
        .build()
        .unwrap()
}

impl Env {
    async fn acquire(&self, source: &str, hold_for: HoldFor) -> Result<HeldImage, ImageError> {
        let source = ImageSource::parse(source)?;
        acquire(
            &self.cache,
            &self.catalog,
            &source,
            &self.options,
            &hold_for,
            Arc::new(NoProgress),
        )
        .await
    }

    /// `layers/<hex>` of a ChainID.
    fn entry_dir(&self, chain: &str) -> std::path::PathBuf {
        self.cache.layers_dir().join(hex(chain))
    }
}

fn chains(held: &HeldImage) -> Vec<String> {
    held.chains().iter().map(|c| c.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reference_is_pulled_once_then_taken_from_the_catalog() {
    let registry = Registry::start();
    let built = image("one");
    registry.push(&built, "app", "v1");
    let env = Env::new().await;
    let reference = registry.reference("app", "v1");

    let held = env
        .acquire(&reference, HoldFor::process("pod a"))
        .await
        .unwrap();
    assert_eq!(chains(&held), built.chain_ids);
    assert_eq!(held.image.config.cmd, ["cat", "/marker"]);
    assert_eq!(held.image.name.as_deref(), Some(reference.as_str()));
    for layer in &held.image.layers {
        assert!(layer.path.is_file(), "{}", layer.path.display());
    }
    let requests = registry.access_log().len();

    // A second pod's acquisition asks the registry nothing.
    let again = env
        .acquire(&reference, HoldFor::process("pod b"))
        .await
        .unwrap();
    assert_eq!(chains(&again), built.chain_ids);
    assert_eq!(
        registry.access_log().len(),
        requests,
        "the registry was asked again"
    );

    // Both pods hold the layers: removing the image keeps them.
    let report = remove_image(&env.cache, &env.catalog, &reference)
        .await
        .unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    let holders: Vec<String> = report
        .in_use
        .iter()
        .flat_map(|(_, h)| h.iter().map(|h| h.what.clone()))
        .collect();
    assert!(holders.contains(&"pod a".to_string()), "{holders:?}");
    assert!(holders.contains(&"pod b".to_string()), "{holders:?}");
    held.hold.release().await;
    again.hold.release().await;
    let report = gc(&env.cache, &env.catalog).await.unwrap();
    assert_eq!(report.removed.len(), 2, "{report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_layer_disk_is_found_and_fetched_again() {
    let registry = Registry::start();
    let built = image("two");
    registry.push(&built, "app", "v1");
    let env = Env::new().await;
    let reference = registry.reference("app", "v1");
    let held = env
        .acquire(&reference, HoldFor::process("pod a"))
        .await
        .unwrap();
    held.hold.release().await;

    // The top layer's whole entry is deleted behind the catalog's back.
    fs::remove_dir_all(env.entry_dir(&built.chain_ids[1])).unwrap();
    let held = env
        .acquire(&reference, HoldFor::process("pod b"))
        .await
        .unwrap();
    assert!(held.image.layers[1].path.is_file());
    assert_eq!(registry.blob_gets(&built.layer_digests[0]), 1);
    assert_eq!(registry.blob_gets(&built.layer_digests[1]), 2);
    held.hold.release().await;

    // Only its disk is deleted: the entry is damaged, and replaced.
    let disk = env.entry_dir(&built.chain_ids[0]).join("disk.erofs");
    fs::remove_file(&disk).unwrap();
    let held = env
        .acquire(&reference, HoldFor::process("pod c"))
        .await
        .unwrap();
    assert_eq!(held.image.layers[0].path, disk);
    assert!(disk.is_file());
    assert_eq!(registry.blob_gets(&built.layer_digests[0]), 2);
    assert_eq!(registry.blob_gets(&built.layer_digests[1]), 2);
    assert_eq!(env.disk_dirs().len(), 2, "{:?}", env.disk_dirs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_layer_disk_that_cannot_be_fetched_is_reported() {
    let registry = Registry::start();
    let built = image("three");
    registry.push(&built, "app", "v1");
    let env = Env::new().await;
    let reference = registry.reference("app", "v1");
    env.acquire(&reference, HoldFor::process("pod a"))
        .await
        .unwrap()
        .hold
        .release()
        .await;
    fs::remove_dir_all(env.entry_dir(&built.chain_ids[1])).unwrap();
    let addr = registry.addr().to_string();
    drop(registry);

    let err = env
        .acquire(&reference, HoldFor::process("pod b"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::Registry { registry, .. } if *registry == addr),
        "{err}"
    );
    // Nothing half made is left behind.
    assert_eq!(env.disk_dirs(), [hex(&built.chain_ids[0])]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_layout_path_with_a_ref_is_imported_and_its_lost_disks_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let built = ImageBuilder::new()
        .layer(vec![Entry::file("base", "layout base", 0o644)])
        .tag("app:v2")
        .write_layout(&layout)
        .unwrap();
    let env = Env::new().await;
    let source = format!("{}:app:v2", layout.display());

    let held = env
        .acquire(&source, HoldFor::process("pod a"))
        .await
        .unwrap();
    assert_eq!(chains(&held), built.chain_ids);
    held.hold.release().await;

    fs::remove_dir_all(env.entry_dir(&built.chain_ids[0])).unwrap();
    let held = env
        .acquire(&source, HoldFor::process("pod b"))
        .await
        .unwrap();
    assert!(held.image.layers[0].path.is_file());

    let err = env
        .acquire(
            &format!("{}:app:nope", layout.display()),
            HoldFor::process("pod c"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::ImageNotFound { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_sources_are_clear_errors() {
    let registry = Registry::start();
    let env = Env::new().await;

    let err = env
        .acquire("./no/such/layout", HoldFor::process("pod a"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "image \"./no/such/layout\" not found: no such OCI layout directory or image archive"
    );
    let err = env
        .acquire("Bad Name", HoldFor::process("pod a"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "image \"Bad Name\" is neither an existing path nor a valid image reference"
    );
    let missing = registry.reference("app", "missing");
    let err = env
        .acquire(&missing, HoldFor::process("pod a"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("image {missing} not found in its registry")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_durable_hold_outlives_the_process_until_released() {
    let registry = Registry::start();
    let built = image("four");
    registry.push(&built, "app", "v1");
    let env = Env::new().await;
    let reference = registry.reference("app", "v1");

    // A host daemon's pod: the hold is kept, and the daemon goes away.
    let daemon = env.other_process().await;
    let source = ImageSource::parse(&reference).unwrap();
    let held = acquire(
        &env.cache,
        &daemon,
        &source,
        &env.options,
        &HoldFor::durable("pod ns/web (uid-1)"),
        Arc::new(NoProgress),
    )
    .await
    .unwrap();
    let chains = held.chains();
    let id = held.hold.keep();
    daemon.close().await;

    remove_image(&env.cache, &env.catalog, &reference)
        .await
        .unwrap();
    let report = gc(&env.cache, &env.catalog).await.unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(env.disk_dirs().len(), 2);

    // The next daemon releases it when the pod is deleted.
    let next = Catalog::open(env.catalog.url()).await.unwrap();
    next.release_hold(&chains, &id).await.unwrap();
    let report = gc(&env.cache, &env.catalog).await.unwrap();
    assert_eq!(report.removed.len(), 2, "{report:?}");
    assert!(env.disk_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_sharing_layers_attach_each_disk_once() {
    let registry = Registry::start();
    let (a, b) = (image("a"), image("b"));
    registry.push(&a, "app", "a");
    registry.push(&b, "app", "b");
    let env = Env::new().await;
    let mut disks = LayerAttachments::default();
    let mut serials = Vec::new();
    for tag in ["a", "b"] {
        let held = env
            .acquire(&registry.reference("app", tag), HoldFor::process("pod"))
            .await
            .unwrap();
        serials.push(disks.add_image(&held.image));
    }
    assert_eq!(serials, [["pvl0", "pvl1"], ["pvl0", "pvl2"]]);
    let paths: Vec<_> = disks.disks().iter().map(|d| d.path.clone()).collect();
    assert_eq!(
        paths,
        [&a.chain_ids[0], &a.chain_ids[1], &b.chain_ids[1]]
            .map(|c| env.entry_dir(c).join("disk.erofs"))
    );
}
