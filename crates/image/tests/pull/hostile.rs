//! Bad images from a registry: each pull fails with an error naming the
//! problem and leaves the cache directory and the catalog exactly as they
//! were, although the image's fresh base layer was fine.

use std::fs;

use crate::env::Env;
use podvisor_image::ImageError;
use podvisor_testbed::oci::{BuiltImage, Entry, ImageBuilder, flip_byte, truncate_file};
use podvisor_testbed::registry::Registry;

/// A registry, and an env whose cache already holds one image.
async fn setup() -> (Registry, Env) {
    let registry = Registry::start();
    let existing = ImageBuilder::new()
        .layer(vec![Entry::file("existing", "x", 0o644)])
        .build()
        .unwrap();
    registry.push(&existing, "existing", "v1");
    let env = Env::new().await;
    env.pull(&registry.reference("existing", "v1"))
        .await
        .unwrap();
    (registry, env)
}

/// An image with a fresh good base layer and `second` on top.
fn hostile(second: Vec<Entry>) -> ImageBuilder {
    ImageBuilder::new()
        .layer(vec![Entry::file("base", "a fresh base layer", 0o644)])
        .layer(second)
}

async fn push_and_fail(registry: &Registry, env: &Env, built: &BuiltImage) -> ImageError {
    registry.push(built, "bad", "v1");
    fail(registry, env).await
}

async fn fail(registry: &Registry, env: &Env) -> ImageError {
    let before = env.snapshot().await;
    let err = env
        .pull(&registry.reference("bad", "v1"))
        .await
        .expect_err("pull of a bad image must fail");
    assert_eq!(
        env.snapshot().await,
        before,
        "cache or catalog changed after: {err}"
    );
    err
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_tampered_in_the_registry_is_a_digest_mismatch() {
    let (registry, env) = setup().await;
    let built = hostile(vec![Entry::file("f", "content".repeat(100), 0o644)])
        .build()
        .unwrap();
    registry.push(&built, "bad", "v1");
    flip_byte(&registry.blob_data_path(&built.layer_digests[1]), 40).unwrap();
    let err = fail(&registry, &env).await;
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&built.layer_digests[1]), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_blob() {
    let (registry, env) = setup().await;
    let built = hostile(vec![Entry::file(
        "f",
        podvisor_testbed::oci::incompressible(64 << 10, "t"),
        0o644,
    )])
    .build()
    .unwrap();
    registry.push(&built, "bad", "v1");
    let data = registry.blob_data_path(&built.layer_digests[1]);
    let len = fs::metadata(&data).unwrap().len();
    truncate_file(&data, len / 2).unwrap();
    let err = fail(&registry, &env).await;
    let msg = err.to_string();
    assert!(matches!(err, ImageError::Truncated { .. }), "{msg}");
    assert!(
        msg.contains(&built.layer_digests[1]) && msg.contains("truncated"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tar_path_traversal() {
    let (registry, env) = setup().await;
    let built = hostile(vec![Entry::raw_file("../../etc/evil", b"x")])
        .build()
        .unwrap();
    let err = push_and_fail(&registry, &env, &built).await;
    assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
    assert!(err.to_string().contains("../../etc/evil"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn decompression_bomb_hits_the_size_limit() {
    let (registry, mut env) = setup().await;
    env.cache = env.cache.clone().with_uncompressed_limit(8 << 20);
    // 64 MiB of zeros: about 64 KiB gzipped.
    let built = hostile(vec![Entry::file("bomb", vec![0u8; 64 << 20], 0o644)])
        .build()
        .unwrap();
    assert!(built.layers[1].data.len() < 1 << 20);
    let err = push_and_fail(&registry, &env, &built).await;
    assert!(
        matches!(err, ImageError::DecompressionLimit { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&(8u64 << 20).to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_media_type_fetches_nothing() {
    let (registry, env) = setup().await;
    let built = hostile(vec![Entry::file("f", "x", 0o644)])
        .layer_media_type(1, "application/vnd.oci.image.layer.v1.tar+bzip2")
        .build()
        .unwrap();
    let err = push_and_fail(&registry, &env, &built).await;
    assert!(matches!(err, ImageError::UnknownMediaType { .. }), "{err}");
    assert!(err.to_string().contains("tar+bzip2"), "{err}");
    for digest in &built.layer_digests {
        assert_eq!(registry.blob_gets(digest), 0, "{digest}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_diff_id() {
    let (registry, env) = setup().await;
    let built = hostile(vec![Entry::file("f", "x", 0o644)])
        .wrong_diff_id(1)
        .build()
        .unwrap();
    let err = push_and_fail(&registry, &env, &built).await;
    assert!(matches!(err, ImageError::DiffIdMismatch { .. }), "{err}");
}
