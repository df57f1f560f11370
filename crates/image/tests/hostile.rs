//! Bad and hostile inputs: each gives the expected error, naming the
//! problem, and leaves the layer cache exactly as it was (no new disk, no
//! `.tmp-*` entry, nothing in `.staging`).

mod common;

use std::fs;

use common::Env;
use podvisor_image::{ImageError, import};
use podvisor_testbed::oci::{Entry, ImageBuilder, blob_path, flip_byte, gzip_file, truncate_file};

/// A cache that already holds one image, so "unchanged" is not trivially
/// "empty".
fn env_with_an_image() -> Env {
    let env = Env::new();
    ImageBuilder::new()
        .layer(vec![Entry::file("existing", "x", 0o644)])
        .write_layout(&env.path("existing"))
        .unwrap();
    import(&env.cache, &env.path("existing"), None).unwrap();
    assert_eq!(env.disk_dirs().len(), 1);
    env
}

/// Imports `source`, expects an error, and checks the cache did not change.
fn import_fails(env: &Env, source: &str) -> ImageError {
    let before = env.snapshot();
    let err =
        import(&env.cache, &env.path(source), None).expect_err("import of bad input must fail");
    assert_eq!(
        env.snapshot(),
        before,
        "the cache changed after a failed import: {err}"
    );
    err
}

/// An image whose second layer is `entries`, on a fresh base layer that
/// would be committed if the failure did not discard the whole import.
fn hostile_layout(env: &Env, entries: Vec<Entry>) -> &'static str {
    let _ = fs::remove_dir_all(env.path("hostile"));
    ImageBuilder::new()
        .layer(vec![Entry::file("base", "fresh base layer", 0o644)])
        .layer(entries)
        .write_layout(&env.path("hostile"))
        .unwrap();
    "hostile"
}

#[test]
fn layer_digest_mismatch() {
    let env = env_with_an_image();
    let built = ImageBuilder::new()
        .layer(vec![Entry::file("f", "content", 0o644)])
        .wrong_layer_digest(0)
        .write_layout(&env.path("bad"))
        .unwrap();
    let err = import_fails(&env, "bad");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&built.layer_digests[0]) && msg.contains("digest mismatch"),
        "{msg}"
    );
}

#[test]
fn tampered_blob_in_a_layout() {
    let env = env_with_an_image();
    let built = ImageBuilder::new()
        .layer(vec![Entry::file("f", "content", 0o644)])
        .write_layout(&env.path("bad"))
        .unwrap();
    flip_byte(&blob_path(&env.path("bad"), &built.layer_digests[0]), 20).unwrap();
    let err = import_fails(&env, "bad");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&built.layer_digests[0]), "{err}");
}

#[test]
fn layer_size_mismatch() {
    let env = env_with_an_image();
    let real = ImageBuilder::new()
        .layer(vec![Entry::file("f", "content", 0o644)])
        .build()
        .unwrap();
    let declared = real.layers[0].data.len() as u64 - 10;
    ImageBuilder::new()
        .layer(vec![Entry::file("f", "content", 0o644)])
        .wrong_layer_size(0, declared)
        .write_layout(&env.path("bad"))
        .unwrap();
    let err = import_fails(&env, "bad");
    assert!(
        matches!(err, ImageError::SizeMismatch { expected, .. } if expected == declared),
        "{err}"
    );
    assert!(err.to_string().contains(&real.layer_digests[0]), "{err}");
}

#[test]
fn truncated_layer_blob() {
    let env = env_with_an_image();
    let built = ImageBuilder::new()
        .busybox_layer()
        .write_layout(&env.path("bad"))
        .unwrap();
    let blob = blob_path(&env.path("bad"), &built.layer_digests[0]);
    let len = fs::metadata(&blob).unwrap().len();
    truncate_file(&blob, len / 2).unwrap();
    let err = import_fails(&env, "bad");
    assert!(
        matches!(err, ImageError::Truncated { expected, actual, .. } if expected == len && actual == len / 2),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn truncated_archives() {
    let env = env_with_an_image();
    ImageBuilder::new()
        .busybox_layer()
        .write_oci_archive(&env.path("oci.tar"))
        .unwrap();
    let len = fs::metadata(env.path("oci.tar")).unwrap().len();
    truncate_file(&env.path("oci.tar"), len / 2).unwrap();
    let err = import_fails(&env, "oci.tar");
    assert!(matches!(err, ImageError::TruncatedArchive { .. }), "{err}");
    assert!(
        err.to_string().contains("oci.tar") && err.to_string().contains("truncated"),
        "{err}"
    );

    // Cut exactly after the last entry: only the end-of-archive marker is missing.
    ImageBuilder::new()
        .busybox_layer()
        .write_docker_archive(&env.path("docker.tar"))
        .unwrap();
    let len = fs::metadata(env.path("docker.tar")).unwrap().len();
    truncate_file(&env.path("docker.tar"), len - 1024).unwrap();
    let err = import_fails(&env, "docker.tar");
    assert!(matches!(err, ImageError::TruncatedArchive { .. }), "{err}");

    ImageBuilder::new()
        .busybox_layer()
        .write_docker_archive(&env.path("docker2.tar"))
        .unwrap();
    gzip_file(&env.path("docker2.tar"), &env.path("docker.tar.gz")).unwrap();
    let len = fs::metadata(env.path("docker.tar.gz")).unwrap().len();
    truncate_file(&env.path("docker.tar.gz"), len * 2 / 3).unwrap();
    let err = import_fails(&env, "docker.tar.gz");
    assert!(matches!(err, ImageError::TruncatedArchive { .. }), "{err}");
}

#[test]
fn diff_id_mismatch() {
    let env = env_with_an_image();
    let built = ImageBuilder::new()
        .layer(vec![Entry::file("f", "content", 0o644)])
        .wrong_diff_id(0)
        .write_layout(&env.path("bad"))
        .unwrap();
    let err = import_fails(&env, "bad");
    assert!(matches!(err, ImageError::DiffIdMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&built.diff_ids[0]), "{err}");
}

#[test]
fn unknown_media_type() {
    let env = env_with_an_image();
    ImageBuilder::new()
        .layer(vec![Entry::file("f", "content", 0o644)])
        .layer_media_type(0, "application/vnd.oci.image.layer.v1.tar+bzip2")
        .write_layout(&env.path("bad"))
        .unwrap();
    let err = import_fails(&env, "bad");
    assert!(matches!(err, ImageError::UnknownMediaType { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("application/vnd.oci.image.layer.v1.tar+bzip2"),
        "{err}"
    );
}

#[test]
fn decompression_bomb_hits_the_limit() {
    let mut env = env_with_an_image();
    env.cache = env.cache.clone().with_uncompressed_limit(256 * 1024);
    let built = ImageBuilder::new()
        .layer(vec![Entry::file("zeros", vec![0u8; 8 << 20], 0o644)])
        .write_layout(&env.path("bomb"))
        .unwrap();
    assert!(
        built.layers[0].data.len() < 64 * 1024,
        "fixture: a small blob that inflates a lot"
    );
    let err = import_fails(&env, "bomb");
    assert!(
        matches!(err, ImageError::DecompressionLimit { limit: 262144, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("decompression limit exceeded"),
        "{err}"
    );
}

#[test]
fn parent_dir_entry_is_refused() {
    let env = env_with_an_image();
    let src = hostile_layout(&env, vec![Entry::raw_file("../evil", b"pwned")]);
    let err = import_fails(&env, src);
    assert!(
        matches!(&err, ImageError::UnsafeEntry { entry, .. } if entry == "../evil"),
        "{err}"
    );
    assert!(err.to_string().contains(".."), "{err}");
    assert!(!env.cache.layers_dir().join(".staging/evil").exists());

    let src = hostile_layout(&env, vec![Entry::raw_file("a/../../../evil", b"pwned")]);
    let err = import_fails(&env, src);
    assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
}

#[test]
fn writing_through_a_symlink_is_refused() {
    let env = env_with_an_image();
    let victim = env.path("victim");
    fs::create_dir(&victim).unwrap();
    for (link, target) in [
        ("lnk", "/etc"),
        ("lnk", "../../.."),
        ("lnk", victim.to_str().unwrap()),
    ] {
        let src = hostile_layout(
            &env,
            vec![
                Entry::symlink(link, target),
                Entry::file(&format!("{link}/x"), "pwned", 0o644),
            ],
        );
        let err = import_fails(&env, src);
        assert!(
            matches!(&err, ImageError::UnsafeEntry { entry, reason, .. } if entry == "lnk/x" && reason.contains("symlink `lnk`")),
            "{target}: {err}"
        );
    }
    assert_eq!(fs::read_dir(&victim).unwrap().count(), 0);
    // Through a symlinked directory deeper down, and a directory entry too.
    let src = hostile_layout(
        &env,
        vec![
            Entry::dir("a"),
            Entry::symlink("a/b", victim.to_str().unwrap()),
            Entry::dir("a/b/c"),
        ],
    );
    let err = import_fails(&env, src);
    assert!(
        matches!(&err, ImageError::UnsafeEntry { entry, .. } if entry == "a/b/c"),
        "{err}"
    );
    assert_eq!(fs::read_dir(&victim).unwrap().count(), 0);
}

#[test]
fn hardlinks_out_of_the_layer_are_refused() {
    let env = env_with_an_image();
    for target in ["../../../etc/passwd", "/etc/passwd", "not-yet"] {
        let src = hostile_layout(
            &env,
            vec![
                Entry::raw_hardlink("link", target),
                Entry::file("not-yet", "later", 0o644),
            ],
        );
        let err = import_fails(&env, src);
        assert!(
            matches!(&err, ImageError::UnsafeEntry { entry, reason, .. } if entry == "link" && reason.contains("hardlink")),
            "{target}: {err}"
        );
    }
    // A hardlink whose target sits behind a symlink.
    let src = hostile_layout(
        &env,
        vec![
            Entry::symlink("etc", "/etc"),
            Entry::raw_hardlink("link", "etc/passwd"),
        ],
    );
    let err = import_fails(&env, src);
    assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
}

#[test]
fn absolute_symlink_targets_are_kept_not_refused() {
    // The legitimate counterpart of the cases above.
    let env = Env::new();
    ImageBuilder::new()
        .layer(vec![
            Entry::symlink("sh", "/bin/busybox"),
            Entry::symlink("up", "../../.."),
        ])
        .write_layout(&env.path("ok"))
        .unwrap();
    let image = import(&env.cache, &env.path("ok"), None).unwrap();
    let m = common::Mounted::new(&image.layers[0].path);
    assert_eq!(
        fs::read_link(m.path("sh")).unwrap().to_str(),
        Some("/bin/busybox")
    );
    assert_eq!(
        fs::read_link(m.path("up")).unwrap().to_str(),
        Some("../../..")
    );
}

#[test]
fn a_layer_posing_as_an_nvdimm_info_block_is_refused() {
    let env = env_with_an_image();
    // mkfs.erofs puts a lone file's data in the block at 4 KiB, where a
    // guest's pmem driver looks for a PFN (BTT, device-DAX) info block.
    let name = hostile_layout(
        &env,
        vec![Entry::file(
            "f",
            "NVDIMM_PFN_INFO\0a forged info block",
            0o644,
        )],
    );
    let err = import_fails(&env, name);
    assert!(
        matches!(
            &err,
            ImageError::NvdimmInfoBlock { signature, .. } if *signature == "NVDIMM_PFN_INFO"
        ),
        "{err}"
    );
    // The same bytes further into the file are only data.
    let name = hostile_layout(
        &env,
        vec![Entry::file(
            "f",
            "plain data first, NVDIMM_PFN_INFO\0 later",
            0o644,
        )],
    );
    import(&env.cache, &env.path(name), None).unwrap();
}
