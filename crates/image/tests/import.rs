//! Importing well-formed images: layouts and archives of every kind, the
//! resulting disks' content (checked on a real loop mount of the EROFS
//! image built by the real mkfs.erofs), whiteouts, sharing of base layers.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use common::{Env, Mounted, xattr};
use podvisor_image::{ChainId, Digest, ImageError, LayerBlob, LayerCache, import};
use podvisor_testbed::oci::{Compression, Entry, ImageBuilder, blob_path, gzip_file};

/// A layer exercising every kind of entry and attribute.
fn app_entries() -> Vec<Entry> {
    vec![
        Entry::dir("app")
            .owner(1000, 1000)
            .mode(0o750)
            .mtime(1_600_000_000),
        Entry::file("app/run.sh", "#!/bin/sh\necho hi\n", 0o755).owner(1000, 1000),
        Entry::file("app/secret", "s3cret", 0o640)
            .owner(1000, 50)
            .mtime(1_500_000_000),
        Entry::file("app/suid", "x", 0o4755),
        Entry::hardlink("app/run-link.sh", "app/run.sh"),
        Entry::symlink("app/rel", "run.sh"),
        Entry::symlink("app/abs", "/bin/busybox"),
        Entry::fifo("app/pipe"),
        Entry::char_device("app/null", 1, 3),
        Entry::file("app/tagged", "t", 0o644).xattr("user.colour", b"blue"),
        Entry::file("/abs/name", "leading slash", 0o644),
        Entry::file("./dot/name", "leading dot", 0o644),
    ]
}

fn app_image() -> ImageBuilder {
    ImageBuilder::new()
        .busybox_layer()
        .layer(app_entries())
        .entrypoint(&["/bin/sh", "-c"])
        .cmd(&["echo hello"])
        .env("GREETING=hi")
        .workdir("/app")
        .user("app")
        .tag("app:1")
}

#[test]
fn layout_import_makes_one_disk_per_layer_with_the_files() {
    let env = Env::new();
    let built = app_image().write_layout(&env.path("layout")).unwrap();
    let image = import(&env.cache, &env.path("layout"), None).unwrap();

    assert_eq!(image.name.as_deref(), Some("app:1"));
    assert_eq!(image.manifest_digest.to_string(), built.manifest_digest);
    assert_eq!(image.config_digest.to_string(), built.config_digest);
    assert_eq!(image.config.entrypoint, ["/bin/sh", "-c"]);
    assert_eq!(image.config.cmd, ["echo hello"]);
    assert!(image.config.env.contains(&"GREETING=hi".to_string()));
    assert_eq!(image.config.working_dir, "/app");
    assert_eq!(image.config.user, "app");

    let chain: Vec<String> = image
        .layers
        .iter()
        .map(|l| l.chain_id.to_string())
        .collect();
    assert_eq!(chain, built.chain_ids);
    let diffs: Vec<String> = image.layers.iter().map(|l| l.diff_id.to_string()).collect();
    assert_eq!(diffs, built.diff_ids);
    assert_eq!(image.layers[0].parent, None);
    assert_eq!(
        image.layers[1].parent.as_ref(),
        Some(&image.layers[0].chain_id)
    );
    for layer in &image.layers {
        assert_eq!(
            layer.path,
            env.cache
                .layers_dir()
                .join(layer.chain_id.hex())
                .join("disk.erofs")
        );
        assert_eq!(layer.size, fs::metadata(&layer.path).unwrap().len());
        assert_eq!(env.cache.get(&layer.chain_id).as_ref(), Some(layer));
    }
    assert_eq!(env.cache.list().unwrap().len(), 2);
    // Nothing left behind in staging, no temporary entries.
    assert_eq!(
        env.snapshot()
            .iter()
            .filter(|p| p.starts_with(".staging/") || p.starts_with(".tmp"))
            .count(),
        0
    );

    let base = Mounted::new(&image.layers[0].path);
    let busybox = fs::symlink_metadata(base.path("bin/busybox")).unwrap();
    assert_eq!(busybox.mode() & 0o7777, 0o755);
    assert_eq!(
        fs::read(base.path("bin/busybox")).unwrap(),
        fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(
        fs::read_link(base.path("bin/sh")).unwrap().to_str(),
        Some("/bin/busybox")
    );
    assert_eq!(
        fs::symlink_metadata(base.path("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert!(
        fs::read_to_string(base.path("etc/passwd"))
            .unwrap()
            .contains("app:x:1000:1000")
    );
    assert_eq!(
        fs::symlink_metadata(base.path("home/app")).unwrap().uid(),
        1000
    );

    let app = Mounted::new(&image.layers[1].path);
    let dir = fs::symlink_metadata(app.path("app")).unwrap();
    assert_eq!(
        (dir.mode() & 0o7777, dir.uid(), dir.gid(), dir.mtime()),
        (0o750, 1000, 1000, 1_600_000_000)
    );
    let secret = fs::symlink_metadata(app.path("app/secret")).unwrap();
    assert_eq!(
        (secret.mode() & 0o7777, secret.uid(), secret.gid()),
        (0o640, 1000, 50)
    );
    assert_eq!(secret.mtime(), 1_500_000_000);
    assert_eq!(
        fs::read_to_string(app.path("app/secret")).unwrap(),
        "s3cret"
    );
    assert_eq!(
        fs::symlink_metadata(app.path("app/suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    let run = fs::symlink_metadata(app.path("app/run.sh")).unwrap();
    let link = fs::symlink_metadata(app.path("app/run-link.sh")).unwrap();
    assert_eq!((run.ino(), run.nlink()), (link.ino(), 2));
    assert_eq!(
        fs::read_link(app.path("app/rel")).unwrap().to_str(),
        Some("run.sh")
    );
    assert_eq!(
        fs::read_link(app.path("app/abs")).unwrap().to_str(),
        Some("/bin/busybox")
    );
    assert!(
        fs::symlink_metadata(app.path("app/pipe"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    let null = fs::symlink_metadata(app.path("app/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!((libc::major(null.rdev()), libc::minor(null.rdev())), (1, 3));
    assert_eq!(
        xattr(&app.path("app/tagged"), "user.colour").as_deref(),
        Some(&b"blue"[..])
    );
    assert_eq!(
        fs::read_to_string(app.path("abs/name")).unwrap(),
        "leading slash"
    );
    assert_eq!(
        fs::read_to_string(app.path("dot/name")).unwrap(),
        "leading dot"
    );
    // The second disk holds only its own layer.
    assert!(!app.path("bin").exists());
}

/// The layout `dump.erofs` reports for `path` in the disk `disk`
/// (0: plain blocks, 2: the file's tail inline in its inode).
fn erofs_layout(disk: &std::path::Path, path: &str) -> String {
    let out = std::process::Command::new("dump.erofs")
        .arg(format!("--path={path}"))
        .arg(disk)
        .output()
        .expect("run dump.erofs (erofs-utils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "dump.erofs {path}: {text}");
    text.split("Layout: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no layout for {path}: {text}"))
        .to_string()
}

#[test]
fn disks_are_dax_able_padded_and_carry_the_layers_uuid() {
    let env = Env::new();
    app_image().write_layout(&env.path("layout")).unwrap();
    let image = import(&env.cache, &env.path("layout"), None).unwrap();
    for layer in &image.layers {
        let bytes = fs::read(&layer.path).unwrap();
        assert_eq!(bytes.len() as u64, layer.size);
        assert_eq!(layer.size % podvisor_image::DISK_ALIGN, 0, "padded");
        // The superblock at 1024: magic, and the UUID (at 48) from the ChainID.
        assert_eq!(bytes[1024..1028], 0xE0F5_E1E2u32.to_le_bytes());
        let uuid: String = bytes[1024 + 48..1024 + 64]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            uuid,
            podvisor_image::layer_uuid(&layer.chain_id).replace('-', "")
        );
    }
    // Small files, whose tails mkfs.erofs inlines by default, are plain
    // blocks the kernel can map with DAX.
    assert_eq!(erofs_layout(&image.layers[1].path, "/app/secret"), "0");
    assert_eq!(erofs_layout(&image.layers[1].path, "/app/run.sh"), "0");
    assert_eq!(erofs_layout(&image.layers[0].path, "/etc/passwd"), "0");
    // The padding is no part of the file system: it mounts and reads.
    let app = Mounted::new(&image.layers[1].path);
    assert_eq!(
        fs::read_to_string(app.path("app/secret")).unwrap(),
        "s3cret"
    );
}

#[test]
fn whiteouts_become_char_devices_and_opaque_dirs_get_the_xattr() {
    let env = Env::new();
    ImageBuilder::new()
        .busybox_layer()
        .layer(vec![
            Entry::whiteout("etc/group"),
            Entry::opaque("home"),
            Entry::dir("home/new"),
            Entry::whiteout("bin/.hidden"),
        ])
        .write_layout(&env.path("layout"))
        .unwrap();
    let image = import(&env.cache, &env.path("layout"), None).unwrap();
    let upper = Mounted::new(&image.layers[1].path);

    let group = fs::symlink_metadata(upper.path("etc/group")).unwrap();
    assert!(
        group.file_type().is_char_device(),
        "whiteout must be a char device"
    );
    assert_eq!(group.rdev(), 0, "whiteout must be device 0/0");
    assert!(
        fs::symlink_metadata(upper.path("bin/.hidden"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(
        xattr(&upper.path("home"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(upper.path("home/new").is_dir());
    assert_eq!(xattr(&upper.path("etc"), "trusted.overlay.opaque"), None);
    // The markers themselves are not kept.
    let listing = upper.list();
    assert!(listing.iter().all(|p| !p.contains(".wh.")), "{listing:?}");
}

#[test]
fn oci_archive_with_zstd_layers_imports() {
    let env = Env::new();
    let built = app_image()
        .compression(Compression::Zstd)
        .write_oci_archive(&env.path("image.tar"))
        .unwrap();
    let image = import(&env.cache, &env.path("image.tar"), Some("app:1")).unwrap();
    let chain: Vec<String> = image
        .layers
        .iter()
        .map(|l| l.chain_id.to_string())
        .collect();
    assert_eq!(chain, built.chain_ids);
    let app = Mounted::new(&image.layers[1].path);
    assert_eq!(
        fs::read_to_string(app.path("app/secret")).unwrap(),
        "s3cret"
    );
}

#[test]
fn gzip_zstd_and_uncompressed_layers_of_one_image_all_convert() {
    let env = Env::new();
    let built = ImageBuilder::new()
        .layer_compressed(vec![Entry::file("a", "gzip", 0o644)], Compression::Gzip)
        .layer_compressed(vec![Entry::file("b", "zstd", 0o644)], Compression::Zstd)
        .layer_compressed(vec![Entry::file("c", "none", 0o644)], Compression::None)
        .write_layout(&env.path("layout"))
        .unwrap();
    assert_eq!(
        built
            .layers
            .iter()
            .map(|l| l.media_type.as_str())
            .collect::<Vec<_>>(),
        [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.v1.tar"
        ]
    );
    let image = import(&env.cache, &env.path("layout"), None).unwrap();
    for (layer, (name, text)) in
        image
            .layers
            .iter()
            .zip([("a", "gzip"), ("b", "zstd"), ("c", "none")])
    {
        let m = Mounted::new(&layer.path);
        assert_eq!(fs::read_to_string(m.path(name)).unwrap(), text);
    }
}

#[test]
fn legacy_docker_archive_plain_and_gzipped() {
    let env = Env::new();
    let built = app_image()
        .write_docker_archive(&env.path("docker.tar"))
        .unwrap();
    gzip_file(&env.path("docker.tar"), &env.path("docker.tar.gz")).unwrap();

    let image = import(&env.cache, &env.path("docker.tar.gz"), Some("app:1")).unwrap();
    assert_eq!(image.name.as_deref(), Some("app:1"));
    assert_eq!(image.config_digest.to_string(), built.config_digest);
    assert_eq!(image.config.user, "app");
    let chain: Vec<String> = image
        .layers
        .iter()
        .map(|l| l.chain_id.to_string())
        .collect();
    assert_eq!(chain, built.chain_ids);
    let app = Mounted::new(&image.layers[1].path);
    assert_eq!(
        fs::symlink_metadata(app.path("app/suid")).unwrap().mode() & 0o7777,
        0o4755
    );

    // The plain archive is the same image: same manifest digest, same disks.
    let again = import(&env.cache, &env.path("docker.tar"), None).unwrap();
    assert_eq!(again, image);
    assert_eq!(env.disk_dirs().len(), 2);
}

#[test]
fn docker_archive_embedding_an_oci_layout() {
    let env = Env::new();
    let built = app_image()
        .write_docker_oci_archive(&env.path("docker25.tar"))
        .unwrap();
    // Selected by the docker-style name, as `docker save busybox` would list it.
    let image = import(
        &env.cache,
        &env.path("docker25.tar"),
        Some("docker.io/library/app:1"),
    )
    .unwrap();
    assert_eq!(image.manifest_digest.to_string(), built.manifest_digest);
    let chain: Vec<String> = image
        .layers
        .iter()
        .map(|l| l.chain_id.to_string())
        .collect();
    assert_eq!(chain, built.chain_ids);
    let app = Mounted::new(&image.layers[1].path);
    assert!(app.path("app/run.sh").is_file());
}

#[test]
fn images_sharing_a_base_layer_share_its_disk() {
    let env = Env::new();
    let a = ImageBuilder::new()
        .busybox_layer()
        .layer(vec![Entry::file("a", "a", 0o644)])
        .tag("a:1")
        .write_oci_archive(&env.path("a.tar"))
        .unwrap();
    let b = ImageBuilder::new()
        .busybox_layer()
        .layer(vec![Entry::file("b", "b", 0o644)])
        .tag("b:1")
        .write_layout(&env.path("b"))
        .unwrap();
    assert_eq!(
        a.chain_ids[0], b.chain_ids[0],
        "fixture: same base layer, same ChainID"
    );

    let ia = import(&env.cache, &env.path("a.tar"), None).unwrap();
    let ib = import(&env.cache, &env.path("b"), None).unwrap();
    assert_eq!(ia.layers[0], ib.layers[0]);
    assert_ne!(ia.layers[1].chain_id, ib.layers[1].chain_id);
    assert_eq!(
        env.disk_dirs().len(),
        3,
        "one base disk and one disk per top layer"
    );
    assert_eq!(env.cache.list().unwrap().len(), 3);
}

#[test]
fn cached_layers_are_reused_without_reading_their_blobs() {
    let env = Env::new();
    let built = app_image().write_layout(&env.path("layout")).unwrap();
    let first = import(&env.cache, &env.path("layout"), None).unwrap();
    let before = env.snapshot();
    for digest in &built.layer_digests {
        fs::remove_file(blob_path(&env.path("layout"), digest)).unwrap();
    }
    let second = import(&env.cache, &env.path("layout"), None).unwrap();
    assert_eq!(second, first);
    assert_eq!(env.snapshot(), before);
}

#[test]
fn selecting_among_several_images_of_a_layout() {
    let env = Env::new();
    let layout = env.path("layout");
    let one = ImageBuilder::new()
        .layer(vec![Entry::file("one", "1", 0o644)])
        .tag("one:latest");
    let two = ImageBuilder::new()
        .layer(vec![Entry::file("two", "2", 0o644)])
        .tag("two:1");
    one.write_layout(&layout).unwrap();
    let built_two = two.write_layout(&layout).unwrap();

    let err = import(&env.cache, &layout, None).unwrap_err();
    assert!(matches!(err, ImageError::AmbiguousImage { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("one:latest") && msg.contains("two:1"), "{msg}");

    let err = import(&env.cache, &layout, Some("three")).unwrap_err();
    assert!(matches!(err, ImageError::ImageNotFound { .. }), "{err}");
    assert!(
        err.to_string().contains("three") && err.to_string().contains("two:1"),
        "{err}"
    );

    assert_eq!(
        import(&env.cache, &layout, Some("one"))
            .unwrap()
            .name
            .as_deref(),
        Some("one:latest")
    );
    let two = import(&env.cache, &layout, Some(&built_two.manifest_digest)).unwrap();
    assert_eq!(two.name.as_deref(), Some("two:1"));
}

#[test]
fn cache_reopens_with_its_disks_and_ignores_temporary_entries() {
    let env = Env::new();
    let image = import(
        &env.cache,
        &{
            ImageBuilder::new()
                .busybox_layer()
                .write_layout(&env.path("l"))
                .unwrap();
            env.path("l")
        },
        None,
    )
    .unwrap();
    // Leftovers of a crashed writer are not disks.
    fs::create_dir(env.cache.layers_dir().join(".tmp-crashed")).unwrap();
    fs::create_dir(env.cache.layers_dir().join(".staging/half-unpacked")).unwrap();
    let reopened = LayerCache::open(&env.path("cache")).unwrap();
    assert_eq!(reopened.list().unwrap(), image.layers);
    let chain = ChainId::of(&[image.layers[0].diff_id.clone()]).unwrap();
    assert_eq!(reopened.get(&chain).as_ref(), Some(&image.layers[0]));
    let unknown = ChainId(Digest::sha256_of(b"nothing"));
    assert_eq!(reopened.get(&unknown), None);
    let meta: serde_json::Value = serde_json::from_slice(
        &fs::read(env.cache.layers_dir().join(chain.hex()).join("layer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["chain_id"], chain.to_string());
    assert_eq!(meta["parent"], serde_json::Value::Null);
    assert_eq!(meta["size"], image.layers[0].size);
    assert_eq!(
        meta["source"]["media_type"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
}

#[test]
fn concurrent_imports_of_one_image_make_one_set_of_disks() {
    let env = Env::new();
    let built = app_image()
        .write_oci_archive(&env.path("image.tar"))
        .unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let cache = env.cache.clone();
                let source = env.path("image.tar");
                s.spawn(move || import(&cache, &source, None))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = results[0].as_ref().unwrap();
    for r in &results {
        assert_eq!(
            r.as_ref().unwrap(),
            first,
            "every importer sees the same disks"
        );
    }
    let mut dirs = env.disk_dirs();
    dirs.sort();
    let mut expected: Vec<String> = built
        .chain_ids
        .iter()
        .map(|c| c.trim_start_matches("sha256:").to_string())
        .collect();
    expected.sort();
    assert_eq!(dirs, expected);
    let leftovers: Vec<String> = env
        .snapshot()
        .into_iter()
        .filter(|p| p.starts_with(".tmp") || (p.starts_with(".staging/")))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn the_loser_of_a_commit_race_discards_its_copy_and_uses_the_winner() {
    let env = Env::new();
    let built = ImageBuilder::new()
        .layer(vec![Entry::file("f", "race", 0o644)])
        .build()
        .unwrap();
    let blob = LayerBlob {
        media_type: built.layers[0].media_type.clone(),
        digest: Digest::parse(&built.layer_digests[0]).unwrap(),
        size: built.layers[0].data.len() as u64,
    };
    let diff_id = Digest::parse(&built.diff_ids[0]).unwrap();
    // Both writers convert before either commits, as two racing processes would.
    let first = env
        .cache
        .prepare_layer(&blob, &diff_id, None, &built.layers[0].data[..])
        .unwrap();
    let second = env
        .cache
        .prepare_layer(&blob, &diff_id, None, &built.layers[0].data[..])
        .unwrap();
    assert_eq!(
        env.cache.get(first.chain_id()),
        None,
        "not visible before commit"
    );
    let winner = first.commit().unwrap();
    let loser = second.commit().unwrap();
    assert_eq!(loser, winner);
    assert_eq!(env.disk_dirs(), [winner.chain_id.hex()]);
    assert!(
        env.snapshot()
            .iter()
            .all(|p| !p.starts_with(".tmp") && !p.starts_with(".staging/"))
    );
    // Dropping a prepared layer without committing leaves nothing either.
    drop(
        env.cache
            .prepare_layer(&blob, &diff_id, None, &built.layers[0].data[..])
            .unwrap(),
    );
    assert!(
        env.snapshot()
            .iter()
            .all(|p| !p.starts_with(".tmp") && !p.starts_with(".staging/"))
    );
}
