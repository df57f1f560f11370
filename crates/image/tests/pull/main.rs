//! Registry pulls through the catalog against a real registry (Debian's
//! docker-registry on 127.0.0.1): what is fetched (counted in the
//! registry's access log), what the cache and catalog hold afterwards,
//! platforms, auth, bad images and GC.

mod acquire;
mod derived;
mod env;
mod gc;
mod hostile;

use env::{Env, hex};
use podvisor_image::{ImageError, Platform};
use podvisor_testbed::oci::{Compression, Entry, ImageBuilder};
use podvisor_testbed::registry::Registry;

fn two_layer_image(marker: &str) -> ImageBuilder {
    ImageBuilder::new()
        .busybox_layer()
        .layer(vec![Entry::file("app/marker", marker, 0o644)])
        .cmd(&["cat", "/app/marker"])
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_records_the_image_and_fetches_each_blob_once() {
    let registry = Registry::start();
    let built = two_layer_image("one").build().unwrap();
    registry.push(&built, "team/app", "v1");
    let env = Env::new().await;

    let reference = format!("{}/team/app:v1", registry.addr());
    let pulled = env.pull(&reference).await.unwrap();
    let image = &pulled.image;
    assert_eq!(image.manifest_digest.to_string(), built.manifest_digest);
    assert_eq!(image.config.cmd, vec!["cat", "/app/marker"]);
    let chains: Vec<String> = image
        .layers
        .iter()
        .map(|l| l.chain_id.to_string())
        .collect();
    assert_eq!(chains, built.chain_ids);
    for disk in &image.layers {
        assert!(disk.path.is_file(), "{}", disk.path.display());
    }
    assert_eq!(env.disk_dirs().len(), 2);

    // The catalog maps the reference to the manifest and the manifest to its disks.
    let r = env
        .catalog
        .reference(&reference)
        .await
        .unwrap()
        .expect("reference recorded");
    assert_eq!(r.manifest.to_string(), built.manifest_digest);
    let m = env.catalog.manifest(&r.manifest).await.unwrap().unwrap();
    assert_eq!(
        m.layers.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        built.chain_ids
    );
    assert_eq!(m.size, image.layers.iter().map(|l| l.size).sum::<u64>());
    for layer in env.catalog.layers().await.unwrap() {
        assert_eq!(layer.used_by, vec![r.manifest.clone()], "reference count 1");
        assert!(layer.size > 0 && layer.last_used > 0);
    }
    for digest in &built.layer_digests {
        assert_eq!(registry.blob_gets(digest), 1, "{digest}");
    }

    // Pulling again fetches no layer.
    drop(pulled);
    env.pull(&reference).await.unwrap();
    for digest in &built.layer_digests {
        assert_eq!(registry.blob_gets(digest), 1, "{digest} fetched again");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_compression_and_docker_media_types() {
    let registry = Registry::start();
    let built = ImageBuilder::new()
        .layer_compressed(vec![Entry::file("a", "gzip", 0o644)], Compression::Gzip)
        .layer_compressed(vec![Entry::file("b", "zstd", 0o644)], Compression::Zstd)
        .layer_compressed(vec![Entry::file("c", "none", 0o644)], Compression::None)
        .layer(vec![Entry::file("d", "docker gzip", 0o644)])
        .layer_media_type(3, "application/vnd.docker.image.rootfs.diff.tar.gzip")
        .build()
        .unwrap();
    registry.push(&built, "mixed", "latest");
    let env = Env::new().await;
    let pulled = env
        .pull(&format!("{}/mixed", registry.addr()))
        .await
        .unwrap();
    assert_eq!(pulled.image.layers.len(), 4);
    let r = env
        .catalog
        .reference(&format!("{}/mixed:latest", registry.addr()))
        .await
        .unwrap();
    assert!(r.is_some(), "`mixed` is recorded as `mixed:latest`");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_image_fetches_only_its_new_layers() {
    let registry = Registry::start();
    let first = two_layer_image("shared").build().unwrap();
    let second = two_layer_image("shared")
        .layer(vec![Entry::file("extra/one", "1", 0o644)])
        .layer(vec![Entry::file("extra/two", "2", 0o644)])
        .build()
        .unwrap();
    assert_eq!(first.layer_digests[..], second.layer_digests[..2]);
    registry.push(&first, "app", "first");
    registry.push(&second, "app", "second");
    let env = Env::new().await;
    env.pull(&registry.reference("app", "first")).await.unwrap();
    env.pull(&registry.reference("app", "second"))
        .await
        .unwrap();
    for (i, digest) in second.layer_digests.iter().enumerate() {
        assert_eq!(registry.blob_gets(digest), 1, "layer {i} ({digest})");
    }
    assert_eq!(
        registry.all_blob_gets().len(),
        2 + 2 + 2,
        "two configs and four layers"
    );
    assert_eq!(env.disk_dirs().len(), 4, "shared disks are stored once");
    let layers = env.catalog.layers().await.unwrap();
    let shared = layers
        .iter()
        .find(|l| l.chain_id.to_string() == first.chain_ids[0])
        .unwrap();
    assert_eq!(
        shared.used_by.len(),
        2,
        "the base layer is referenced by both manifests"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_picks_linux_amd64_unless_told_otherwise() {
    let registry = Registry::start();
    let amd64 = two_layer_image("amd64").build().unwrap();
    let arm64 = ImageBuilder::new()
        .layer(vec![Entry::file("app/marker", "arm64", 0o644)])
        .architecture("arm64")
        .build()
        .unwrap();
    let index = registry.push_index(
        &[(&arm64, "linux/arm64/v8"), (&amd64, "linux/amd64")],
        "multi",
        "1.0",
    );
    let mut env = Env::new().await;
    let reference = registry.reference("multi", "1.0");
    let pulled = env.pull(&reference).await.unwrap();
    assert_eq!(
        pulled.image.manifest_digest.to_string(),
        amd64.manifest_digest
    );
    assert_eq!(
        pulled.index_digest.as_ref().map(|d| d.to_string()),
        Some(index.clone())
    );
    assert_eq!(registry.blob_gets(&arm64.layer_digests[0]), 0);

    env.options.platform = Platform::parse("linux/arm64").unwrap();
    let pulled = env.pull(&reference).await.unwrap();
    assert_eq!(
        pulled.image.manifest_digest.to_string(),
        arm64.manifest_digest
    );
    let m = env
        .catalog
        .manifest(&pulled.image.manifest_digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.platform, "linux/arm64");

    env.options.platform = Platform::parse("linux/s390x").unwrap();
    let before = env.snapshot().await;
    let err = env.pull(&reference).await.unwrap_err();
    assert!(matches!(err, ImageError::PlatformNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("linux/s390x")
            && msg.contains("linux/arm64/v8")
            && msg.contains("linux/amd64"),
        "{msg}"
    );
    assert_eq!(env.snapshot().await, before);

    // By digest: the index digest picks per platform, a manifest digest is itself.
    env.options.platform = Platform::default();
    let by_digest = format!("{}/multi@{index}", registry.addr());
    let pulled = env.pull(&by_digest).await.unwrap();
    assert_eq!(
        pulled.image.manifest_digest.to_string(),
        amd64.manifest_digest
    );
    assert!(env.catalog.reference(&by_digest).await.unwrap().is_some());
    let _ = hex(&index);
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_with_and_without_credentials() {
    let registry = Registry::start_with_auth("alice", "wonderland");
    let built = two_layer_image("secret").build().unwrap();
    registry.push(&built, "private/app", "v1");
    let env = Env::new().await;
    let reference = registry.reference("private/app", "v1");

    let before = env.snapshot().await;
    let err = env.pull(&reference).await.unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("podvisor login {}", registry.addr())),
        "{err}"
    );
    assert_eq!(env.snapshot().await, before);

    let bad = podvisor_image::credentials::Credentials {
        username: "alice".into(),
        password: "wrong".into(),
    };
    podvisor_image::credentials::store(&env.docker_config(), registry.addr(), &bad).unwrap();
    let err = env.pull(&reference).await.unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    let good = podvisor_image::credentials::Credentials {
        username: "alice".into(),
        password: "wonderland".into(),
    };
    podvisor_image::credentials::store(&env.docker_config(), registry.addr(), &good).unwrap();
    let pulled = env.pull(&reference).await.unwrap();
    assert_eq!(
        pulled.image.manifest_digest.to_string(),
        built.manifest_digest
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_is_named() {
    let registry = Registry::start();
    let env = Env::new().await;
    let err = env
        .pull(&registry.reference("nope", "v1"))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("nope:v1"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pullers_fetch_each_blob_once() {
    let registry = Registry::start();
    let built = two_layer_image("together")
        .layer(vec![Entry::file(
            "big",
            podvisor_testbed::oci::incompressible(4 << 20, "big"),
            0o644,
        )])
        .build()
        .unwrap();
    registry.push(&built, "app", "v1");
    let env = Env::new().await;
    let reference = registry.reference("app", "v1");
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let catalog = env.other_process().await;
        let (cache, options, reference) =
            (env.cache.clone(), env.options.clone(), reference.clone());
        tasks.push(tokio::spawn(async move {
            let r = podvisor_image::ImageRef::parse(&reference).unwrap();
            let pulled = podvisor_image::pull::pull(
                &cache,
                &catalog,
                &r,
                &options,
                std::sync::Arc::new(podvisor_image::progress::NoProgress),
            )
            .await
            .unwrap();
            pulled.image.manifest_digest
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().to_string(), built.manifest_digest);
    }
    for digest in &built.layer_digests {
        assert_eq!(registry.blob_gets(digest), 1, "{digest}");
    }
    assert_eq!(env.disk_dirs().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_auth_with_and_without_credentials() {
    let registry = Registry::start_with_token_auth("bob", "builder");
    let built = two_layer_image("token").build().unwrap();
    registry.push(&built, "private/app", "v1");
    let issued_by_push = registry.token_issuer().unwrap().issued();
    let env = Env::new().await;
    let reference = registry.reference("private/app", "v1");

    let before = env.snapshot().await;
    let err = env.pull(&reference).await.unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("podvisor login"), "{err}");
    assert_eq!(env.snapshot().await, before);

    let creds = podvisor_image::credentials::Credentials {
        username: "bob".into(),
        password: "builder".into(),
    };
    podvisor_image::credentials::store(&env.docker_config(), registry.addr(), &creds).unwrap();
    let pulled = env.pull(&reference).await.unwrap();
    assert_eq!(
        pulled.image.manifest_digest.to_string(),
        built.manifest_digest
    );
    assert!(
        registry.token_issuer().unwrap().issued() > issued_by_push,
        "the pull got its token from the token service"
    );
    // The registry checked the token: its blob GETs succeeded.
    for digest in &built.layer_digests {
        assert_eq!(registry.blob_gets(digest), 1, "{digest}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_committed_without_its_entry_is_adopted_not_fetched() {
    let registry = Registry::start();
    let built = two_layer_image("orphan").build().unwrap();
    registry.push(&built, "app", "v1");
    let env = Env::new().await;
    // What a puller killed between renaming the disk into place and writing
    // its catalog entry leaves behind.
    let blob = podvisor_image::LayerBlob {
        media_type: built.layers[0].media_type.clone(),
        digest: podvisor_image::Digest::parse(&built.layer_digests[0]).unwrap(),
        size: built.layers[0].data.len() as u64,
    };
    let diff_id = podvisor_image::Digest::parse(&built.diff_ids[0]).unwrap();
    env.cache
        .add_layer(&blob, &diff_id, None, &built.layers[0].data[..])
        .unwrap();
    assert!(env.catalog.layers().await.unwrap().is_empty());

    env.pull(&registry.reference("app", "v1")).await.unwrap();
    assert_eq!(
        registry.blob_gets(&built.layer_digests[0]),
        0,
        "the orphan disk is adopted"
    );
    assert_eq!(registry.blob_gets(&built.layer_digests[1]), 1);
    let chains: Vec<String> = env
        .catalog
        .layers()
        .await
        .unwrap()
        .iter()
        .map(|l| l.chain_id.to_string())
        .collect();
    assert!(chains.contains(&built.chain_ids[0]), "{chains:?}");
}
