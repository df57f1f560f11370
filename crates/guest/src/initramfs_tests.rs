//! Tests of the initramfs layout.

use super::*;
use crate::cpio::tests::{parse, system_cpio};

fn sample() -> InitramfsContents {
    InitramfsContents {
        kernel_release: "6.1.0-56-cloud-amd64".to_owned(),
        agent: b"\x7fELF agent".to_vec(),
        modules: vec![
            ModuleFile {
                relative_path: "kernel/drivers/virtio/virtio_ring.ko".to_owned(),
                data: b"ring".to_vec(),
            },
            ModuleFile {
                relative_path: "kernel/drivers/virtio/virtio.ko".to_owned(),
                data: b"virtio".to_vec(),
            },
            ModuleFile {
                relative_path: "kernel/drivers/block/virtio_blk.ko".to_owned(),
                data: b"blk".to_vec(),
            },
        ],
        lazy: vec![],
    }
}

#[test]
fn modules_load_list_is_in_load_order() {
    assert_eq!(
        sample().modules_load_list(),
        "kernel/drivers/virtio/virtio_ring.ko\n\
         kernel/drivers/virtio/virtio.ko\n\
         kernel/drivers/block/virtio_blk.ko\n"
    );
}

#[test]
fn archive_layout() {
    let contents = sample();
    let archive = contents.write(Vec::new()).unwrap();
    let entries = parse(&archive);
    let find = |name: &str| {
        entries
            .iter()
            .position(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} missing from archive"))
    };
    let mode = |name: &str| entries[find(name)].fields[1];

    assert_eq!(mode("init"), 0o100755);
    assert_eq!(entries[find("init")].data, contents.agent);
    for dir in ["dev", "proc", "sys", "run", "tmp", "etc", "etc/podvisor"] {
        assert_eq!(mode(dir) & 0o170000, 0o040000, "{dir} is a directory");
    }
    assert_eq!(mode("tmp"), 0o041777);
    let console = &entries[find("dev/console")].fields;
    assert_eq!(console[1], 0o020600);
    assert_eq!((console[9], console[10]), (5, 1));

    let release = "lib/modules/6.1.0-56-cloud-amd64";
    for module in &contents.modules {
        let path = format!("{release}/{}", module.relative_path);
        assert_eq!(entries[find(&path)].data, module.data);
        assert_eq!(mode(&path), 0o100644);
    }
    let load_list = &entries[find("etc/podvisor/modules.load")];
    assert_eq!(load_list.data, contents.modules_load_list().as_bytes());

    // Every entry's parent directory comes before it.
    for (i, entry) in entries.iter().enumerate() {
        if let Some((parent, _)) = entry.name.rsplit_once('/') {
            assert!(
                find(parent) < i,
                "{} comes before its directory",
                entry.name
            );
        }
    }
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    for dir in [
        "lib",
        "lib/modules",
        release,
        &format!("{release}/kernel/drivers/virtio"),
        &format!("{release}/kernel/drivers/block"),
    ] {
        assert!(names.contains(&dir), "{dir} missing: {names:?}");
    }
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "duplicate entries: {names:?}");
}

#[test]
fn same_contents_give_same_bytes() {
    let first = sample().write(Vec::new()).unwrap();
    let second = sample().write(Vec::new()).unwrap();
    assert_eq!(first, second);
}

#[test]
fn no_modules_still_has_an_empty_load_list() {
    let contents = InitramfsContents {
        modules: Vec::new(),
        ..sample()
    };
    let entries = parse(&contents.write(Vec::new()).unwrap());
    let load_list = entries
        .iter()
        .find(|e| e.name == "etc/podvisor/modules.load")
        .unwrap();
    assert!(load_list.data.is_empty());
    assert!(
        entries
            .iter()
            .any(|e| e.name == "lib/modules/6.1.0-56-cloud-amd64")
    );
}

#[test]
fn system_cpio_extracts_the_files() {
    let contents = sample();
    let archive = contents.write(Vec::new()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let listing = system_cpio(dir.path(), &["-tv", "--quiet"], &archive);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("crw-------") && l.ends_with("dev/console"))
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" init"))
    );
    // Extract everything but the device node, which needs privileges.
    system_cpio(
        dir.path(),
        &[
            "-id",
            "--quiet",
            "--no-absolute-filenames",
            "init",
            "etc/*",
            "lib/*",
        ],
        &archive,
    );
    let root = dir.path();
    assert_eq!(std::fs::read(root.join("init")).unwrap(), contents.agent);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/podvisor/modules.load")).unwrap(),
        contents.modules_load_list()
    );
    let modules_dir = root.join("lib/modules/6.1.0-56-cloud-amd64");
    for line in contents.modules_load_list().lines() {
        assert!(modules_dir.join(line).is_file(), "{line} not extracted");
    }
}

#[test]
fn load_reads_files_and_names_missing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent");
    std::fs::write(&agent, b"agent bytes").unwrap();
    let module_path = dir.path().join("m.ko");
    std::fs::write(&module_path, b"module bytes").unwrap();
    let module = ResolvedModule {
        name: "m".to_owned(),
        relative_path: "kernel/m.ko".to_owned(),
        path: module_path,
    };
    let contents =
        InitramfsContents::load("1.0-test", &agent, std::slice::from_ref(&module)).unwrap();
    assert_eq!(contents.agent, b"agent bytes");
    assert_eq!(
        contents.modules,
        [ModuleFile {
            relative_path: "kernel/m.ko".to_owned(),
            data: b"module bytes".to_vec()
        }]
    );

    let missing = ResolvedModule {
        path: dir.path().join("gone.ko"),
        ..module
    };
    let error = InitramfsContents::load("1.0-test", &agent, &[missing]).unwrap_err();
    assert!(error.to_string().contains("gone.ko"), "{error}");
    let error = InitramfsContents::load("1.0-test", &dir.path().join("no-agent"), &[]).unwrap_err();
    assert!(error.to_string().contains("no-agent"), "{error}");
}

/// `module` as `sign-file` would append a PKCS#7 signature of `sig_len` bytes.
fn signed(module: &[u8], sig_len: u32) -> Vec<u8> {
    let mut out = module.to_vec();
    out.extend(std::iter::repeat_n(0xAB, sig_len as usize));
    out.extend([0, 0, 2, 0, 0, 0, 0, 0]); // PKCS#7: no signer, no key id
    out.extend(sig_len.to_be_bytes());
    out.extend(b"~Module signature appended~\n");
    out
}

#[test]
fn module_signatures_are_stripped() {
    let module = b"\x7fELF module body".to_vec();
    assert_eq!(strip_module_signature(signed(&module, 700)), module);
    // An unsigned module is kept as it is.
    assert_eq!(strip_module_signature(module.clone()), module);
}

#[test]
fn a_module_whose_signature_trailer_does_not_add_up_is_kept() {
    // Claims a signature longer than the file.
    let bogus = signed(b"short", 10);
    let mut claims_more = bogus.clone();
    let at = claims_more.len() - 28 - 4;
    claims_more[at..at + 4].copy_from_slice(&1000u32.to_be_bytes());
    assert_eq!(strip_module_signature(claims_more.clone()), claims_more);
    // Only the marker, nothing before it.
    let marker_only = b"~Module signature appended~\n".to_vec();
    assert_eq!(strip_module_signature(marker_only.clone()), marker_only);
}

#[test]
fn a_real_signed_module_becomes_its_elf_image() {
    // Debian's modules are signed; skip where there are none to read.
    let path = std::fs::read_dir("/lib/modules")
        .into_iter()
        .flatten()
        .flatten()
        .map(|release| release.path().join("kernel/fs/overlayfs/overlay.ko"))
        .find(|path| path.exists());
    let Some(path) = path else {
        eprintln!("skipped: no overlay.ko under /lib/modules");
        return;
    };
    let data = std::fs::read(&path).unwrap();
    let stripped = strip_module_signature(data.clone());
    assert!(stripped.starts_with(b"\x7fELF"));
    if data.ends_with(b"~Module signature appended~\n") {
        assert!(stripped.len() < data.len());
        assert!(!stripped.ends_with(b"~Module signature appended~\n"));
        // The cut is exactly where the ELF image ends: a module's section
        // header table is the last thing in it (e_shoff + e_shnum * e_shentsize).
        let u64_at = |at: usize| u64::from_le_bytes(stripped[at..at + 8].try_into().unwrap());
        let u16_at = |at: usize| u16::from_le_bytes([stripped[at], stripped[at + 1]]);
        let elf_end = u64_at(0x28) + u64::from(u16_at(0x3C)) * u64::from(u16_at(0x3A));
        assert_eq!(elf_end, stripped.len() as u64);
    }
}

#[test]
fn lazy_lists_are_written_and_shared_modules_archived_once() {
    let contents = InitramfsContents {
        lazy: vec![LazyModules {
            list: "/etc/podvisor/modules.volumes".into(),
            modules: vec![
                ModuleFile {
                    relative_path: "kernel/drivers/virtio/virtio.ko".to_owned(),
                    data: b"virtio".to_vec(),
                },
                ModuleFile {
                    relative_path: "kernel/drivers/md/dm-mod.ko".to_owned(),
                    data: b"dm".to_vec(),
                },
            ],
        }],
        ..sample()
    };
    let entries = parse(&contents.write(Vec::new()).unwrap());
    let named = |name: &str| entries.iter().filter(|e| e.name == name).count();
    let list = entries
        .iter()
        .find(|e| e.name == "etc/podvisor/modules.volumes")
        .unwrap();
    assert_eq!(
        list.data,
        b"kernel/drivers/virtio/virtio.ko\nkernel/drivers/md/dm-mod.ko\n"
    );
    assert_eq!(
        named("lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/virtio/virtio.ko"),
        1
    );
    assert_eq!(
        named("lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/md/dm-mod.ko"),
        1
    );
    assert_eq!(
        named("lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/md"),
        1
    );
}
