//! Tests of `modules.dep` parsing and resolution, on fake files and on the
//! host's real kernel.

use super::*;

/// A fake `modules.dep` shaped like Debian's cloud kernel's.
const FAKE_DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/lib/libcrc32c.ko:
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/md/dm-mod.ko:
kernel/drivers/md/dm-crypt.ko: kernel/drivers/md/dm-mod.ko
kernel/fs/xfs/xfs.ko.xz: kernel/lib/libcrc32c.ko
";

fn fake_index() -> (tempfile::TempDir, ModuleIndex) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("modules.dep"), FAKE_DEP).unwrap();
    let index = ModuleIndex::load(dir.path()).unwrap();
    (dir, index)
}

fn names(resolved: &[ResolvedModule]) -> Vec<&str> {
    resolved.iter().map(|m| m.name.as_str()).collect()
}

#[test]
fn resolves_deps_first_in_modprobe_order() {
    let (dir, index) = fake_index();
    let resolved = index.resolve(&["virtio_pci"]).unwrap();
    assert_eq!(
        names(&resolved),
        [
            "virtio_ring",
            "virtio",
            "virtio_pci_modern_dev",
            "virtio_pci_legacy_dev",
            "virtio_pci"
        ]
    );
    assert_eq!(
        resolved[4].relative_path,
        "kernel/drivers/virtio/virtio_pci.ko"
    );
    assert_eq!(
        resolved[4].path,
        dir.path().join("kernel/drivers/virtio/virtio_pci.ko")
    );
}

#[test]
fn shared_deps_appear_once() {
    let (_dir, index) = fake_index();
    let resolved = index
        .resolve(&[
            "virtio_pci",
            "virtio_blk",
            "virtio_console",
            "erofs",
            "overlay",
            "virtio_blk",
        ])
        .unwrap();
    assert_eq!(
        names(&resolved),
        [
            "virtio_ring",
            "virtio",
            "virtio_pci_modern_dev",
            "virtio_pci_legacy_dev",
            "virtio_pci",
            "virtio_blk",
            "virtio_console",
            "libcrc32c",
            "erofs",
            "overlay"
        ]
    );
}

#[test]
fn dash_and_underscore_are_the_same() {
    let (_dir, index) = fake_index();
    let resolved = index.resolve(&["dm-crypt"]).unwrap();
    assert_eq!(names(&resolved), ["dm_mod", "dm_crypt"]);
    assert_eq!(resolved[1].relative_path, "kernel/drivers/md/dm-crypt.ko");
    assert!(index.contains("dm_crypt") && index.contains("dm-mod"));
    assert!(!index.contains("nd_pmem"));
}

#[test]
fn missing_module_is_named() {
    let (_dir, index) = fake_index();
    let error = index.resolve(&["virtio_blk", "nd_pmem"]).unwrap_err();
    assert!(
        matches!(&error, GuestError::UnknownModule { module, required_by: None, .. } if module == "nd_pmem"),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("nd_pmem") && message.contains("modules.dep"),
        "{message}"
    );
}

#[test]
fn missing_dependency_names_who_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let index = ModuleIndex::parse(dir.path(), "a.ko: gone.ko\n").unwrap();
    let message = index.resolve(&["a"]).unwrap_err().to_string();
    assert!(
        message.contains("gone.ko") && message.contains("required by a"),
        "{message}"
    );
}

#[test]
fn cycle_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let text = "top.ko: a.ko\na.ko: b.ko\nb.ko: c.ko\nc.ko: a.ko\n";
    let index = ModuleIndex::parse(dir.path(), text).unwrap();
    let error = index.resolve(&["top"]).unwrap_err();
    match &error {
        GuestError::ModuleCycle { cycle, .. } => assert_eq!(cycle, &["a", "b", "c", "a"]),
        other => panic!("expected a cycle error, got {other:?}"),
    }
    assert!(error.to_string().contains("a -> b -> c -> a"), "{error}");

    let index = ModuleIndex::parse(dir.path(), "self.ko: self.ko\n").unwrap();
    assert!(matches!(
        index.resolve(&["self"]),
        Err(GuestError::ModuleCycle { .. })
    ));
}

#[test]
fn compressed_module_is_a_clear_error() {
    let (_dir, index) = fake_index();
    let error = index.resolve(&["xfs"]).unwrap_err();
    assert!(
        matches!(&error, GuestError::CompressedModule { module, .. } if module == "xfs"),
        "{error:?}"
    );
    assert!(error.to_string().contains("xfs.ko.xz"), "{error}");
    assert!(error.to_string().contains("uncompressed"), "{error}");
}

#[test]
fn absolute_paths_of_old_depmod_are_made_relative() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display();
    let text = format!("{root}/kernel/b.ko: {root}/kernel/a.ko\n{root}/kernel/a.ko:\n");
    let index = ModuleIndex::parse(dir.path(), &text).unwrap();
    let resolved = index.resolve(&["b"]).unwrap();
    assert_eq!(resolved[0].relative_path, "kernel/a.ko");
    assert_eq!(resolved[1].path, dir.path().join("kernel/b.ko"));
}

#[test]
fn malformed_lines_are_rejected_with_line_number() {
    let dir = tempfile::tempdir().unwrap();
    for (text, line, reason) in [
        ("a.ko:\nno colon here\n", 2, "expected"),
        ("../../etc/evil.ko:\n", 1, "not inside"),
        ("/elsewhere/x.ko:\n", 1, "not inside"),
        ("a.ko: ../b.ko\n", 1, "not inside"),
        ("README:\n", 1, "not a kernel module"),
        ("a.ko:\nsub/a.ko:\n", 2, "listed twice"),
    ] {
        let error = ModuleIndex::parse(dir.path(), text).unwrap_err();
        match &error {
            GuestError::ModulesDep { line: got, .. } => assert_eq!(*got, line, "{text:?}"),
            other => panic!("{text:?}: expected a modules.dep error, got {other:?}"),
        }
        assert!(error.to_string().contains(reason), "{text:?}: {error}");
    }
}

#[test]
fn module_names_from_paths() {
    assert_eq!(
        module_name("kernel/drivers/md/dm-crypt.ko").as_deref(),
        Some("dm_crypt")
    );
    assert_eq!(
        module_name("kernel/fs/xfs/xfs.ko.zst").as_deref(),
        Some("xfs")
    );
    assert_eq!(module_name("kernel/fs/xfs/xfs.o"), None);
    assert_eq!(module_name(".ko"), None);
}

#[test]
fn loading_a_missing_modules_dep_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let error = ModuleIndex::load(dir.path()).unwrap_err().to_string();
    assert!(error.contains("modules.dep"), "{error}");
}

/// Resolution against this machine's Debian cloud kernel, which the project's
/// machines have installed (`linux-image-cloud-amd64`).
#[test]
fn resolves_base_modules_on_the_real_kernel() {
    let kernel = crate::kernel::Kernel::discover().unwrap_or_else(|error| {
        panic!("this test needs the host's guest kernel and modules: {error}")
    });
    let index = ModuleIndex::load(&kernel.modules_dir).unwrap();
    let mut wanted: Vec<&str> = crate::BASE_MODULES.to_vec();
    wanted.push("virtio_net");
    let resolved = index.resolve(&wanted).unwrap();
    let order = names(&resolved);
    let position = |name: &str| {
        order
            .iter()
            .position(|m| *m == name)
            .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
    };
    for (before, after) in [
        ("virtio_ring", "virtio_blk"),
        ("virtio", "virtio_blk"),
        ("virtio_ring", "virtio_pci"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("virtio_pci_legacy_dev", "virtio_pci"),
        ("virtio", "virtio_console"),
        ("libcrc32c", "erofs"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
        ("virtio_ring", "virtio_net"),
    ] {
        assert!(
            position(before) < position(after),
            "{before} after {after}: {order:?}"
        );
    }
    position("overlay");
    let mut unique = order.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), order.len(), "duplicates in {order:?}");
    for module in &resolved {
        assert!(
            module.path.is_file(),
            "{} is not a file",
            module.path.display()
        );
        assert!(
            module.relative_path.ends_with(".ko"),
            "{}",
            module.relative_path
        );
    }
}

#[test]
fn volume_modules_resolve_without_built_ins_or_boot_modules() {
    let (_dir, index) = fake_index();
    let boot = index.resolve(&["virtio_blk"]).unwrap();
    // xts, ecb: not listed here, taken as built in.
    let lazy = crate::resolve_lazy(&index, crate::VOLUME_MODULES, &boot).unwrap();
    assert_eq!(names(&lazy), ["dm_mod", "dm_crypt"]);
    let boot = index.resolve(&["dm_mod"]).unwrap();
    let lazy = crate::resolve_lazy(&index, crate::VOLUME_MODULES, &boot).unwrap();
    assert_eq!(names(&lazy), ["dm_crypt"]);
}

#[test]
fn the_hosts_kernel_has_the_volume_modules() {
    let Some(dir) = std::fs::read_dir("/lib/modules").ok().and_then(|d| {
        d.filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.join("modules.dep").is_file())
    }) else {
        eprintln!("skipped: no modules.dep under /lib/modules");
        return;
    };
    let index = ModuleIndex::load(&dir).unwrap();
    let lazy = crate::resolve_lazy(&index, crate::VOLUME_MODULES, &[]).unwrap();
    let got = names(&lazy);
    for m in ["dm_mod", "dm_crypt"] {
        assert!(got.contains(&m), "{got:?}");
    }
    let aesni = crate::resolve_lazy(&index, crate::VOLUME_AESNI_MODULES, &[]).unwrap();
    assert_eq!(names(&aesni).last(), Some(&"aesni_intel"));
}
