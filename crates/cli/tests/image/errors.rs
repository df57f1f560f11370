//! Bad images and a full disk through the CLI: a clear error, exit code
//! 125, and the cache and catalog as they were.

use std::process::Command;

use podvisor_testbed::cli::TestDir;
use podvisor_testbed::oci::{Entry, ImageBuilder, flip_byte, incompressible};
use podvisor_testbed::registry::Registry;

use crate::{app_image, assert_code, leftovers, no_config, podvisor, podvisor_at};

/// The disks, and `image ls` without its LAST USED column (a relative time).
fn state(t: &TestDir) -> (Vec<String>, String) {
    let ls = podvisor(t).args(["image", "ls"]).success().stdout;
    let cut = ls.find("LAST USED").expect("LAST USED column");
    let ls: String = ls
        .lines()
        .map(|l| format!("{}\n", &l[..cut.min(l.len())]))
        .collect();
    let mut disks = t.layer_disks();
    disks.sort();
    (disks, ls)
}

#[test]
fn bad_images_leave_cache_and_catalog_as_they_were() {
    let t = TestDir::new();
    no_config(&t);
    let registry = Registry::start();
    registry.push(&app_image("good").build().unwrap(), "good", "v1");
    podvisor(&t)
        .args(["image", "pull", &registry.reference("good", "v1")])
        .success();
    let fresh = || ImageBuilder::new().layer(vec![Entry::file("base", "fresh", 0o644)]);

    let tampered = fresh()
        .layer(vec![Entry::file("f", "x".repeat(500), 0o644)])
        .build()
        .unwrap();
    registry.push(&tampered, "tampered", "v1");
    flip_byte(&registry.blob_data_path(&tampered.layer_digests[1]), 30).unwrap();
    let traversal = fresh()
        .layer(vec![Entry::raw_file("../escape", b"x")])
        .build()
        .unwrap();
    registry.push(&traversal, "traversal", "v1");
    let media = fresh()
        .layer(vec![Entry::file("f", "x", 0o644)])
        .layer_media_type(1, "application/x-unknown-layer")
        .build()
        .unwrap();
    registry.push(&media, "media", "v1");

    let before = state(&t);
    for (repo, needle) in [
        (
            "tampered",
            format!("digest mismatch: expected {}", tampered.layer_digests[1]),
        ),
        ("traversal", "unsafe entry `../escape`".to_string()),
        (
            "media",
            "unknown layer media type `application/x-unknown-layer`".to_string(),
        ),
    ] {
        let out = podvisor(&t)
            .args(["image", "pull", &registry.reference(repo, "v1")])
            .output();
        assert_code(&out, 125);
        assert!(out.stderr.contains(&needle), "{repo}: {}", out.stderr);
        assert_eq!(state(&t), before, "{repo} changed the cache or catalog");
        assert!(leftovers(&t).is_empty(), "{repo}: {:?}", leftovers(&t));
    }
}

/// A small tmpfs mounted for a test, unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &std::path::Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_nothing_behind() {
    let t = TestDir::new();
    no_config(&t);
    let registry = Registry::start();
    let small = t.path().join("small");
    let _fs = SmallFs::mount(&small, "8m");
    let cache = small.join("cache");
    let built = ImageBuilder::new()
        .layer(vec![Entry::file("ok", "fits", 0o644)])
        .layer(vec![Entry::file(
            "huge",
            incompressible(12 << 20, "full"),
            0o644,
        )])
        .build()
        .unwrap();
    registry.push(&built, "huge", "v1");
    let out = podvisor_at(&t, &cache)
        .args(["image", "pull", &registry.reference("huge", "v1")])
        .output();
    assert_code(&out, 125);
    assert!(out.stderr.contains("no space left"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&cache.display().to_string()),
        "{}",
        out.stderr
    );
    let entries: Vec<String> = std::fs::read_dir(cache.join("layers-v2"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".staging")
        .collect();
    assert!(entries.is_empty(), "left in the cache: {entries:?}");
    assert_eq!(
        std::fs::read_dir(cache.join("layers-v2/.staging"))
            .unwrap()
            .count(),
        0
    );
    let out = podvisor_at(&t, &cache).args(["image", "ls"]).success();
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
}
