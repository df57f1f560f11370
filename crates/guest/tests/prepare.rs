//! `prepare` end to end: caching on a fake kernel tree, and a real build from
//! this machine's Debian cloud kernel.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use podvisor_guest::{
    BASE_MODULES, GuestError, GuestOptions, KernelLocations, PMEM_MODULES, prepare, prepare_with,
};

const RELEASE: &str = "6.1.0-56-cloud-amd64";

/// A fake `/boot` and `/lib/modules` holding one kernel with the base modules.
struct FakeHost {
    dir: tempfile::TempDir,
    locations: KernelLocations,
}

impl FakeHost {
    fn new() -> FakeHost {
        let dir = tempfile::tempdir().unwrap();
        let locations = KernelLocations {
            boot_dir: dir.path().join("boot"),
            modules_root: dir.path().join("lib/modules"),
        };
        std::fs::create_dir_all(&locations.boot_dir).unwrap();
        std::fs::write(
            locations.boot_dir.join(format!("vmlinuz-{RELEASE}")),
            b"fake kernel",
        )
        .unwrap();
        let modules_dir = locations.modules_root.join(RELEASE);
        let dep = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/erofs/erofs.ko:
kernel/fs/overlayfs/overlay.ko:
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/nvdimm/virtio_pmem.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";
        for line in dep.lines() {
            let (module, _) = line.split_once(':').unwrap();
            let path = modules_dir.join(module);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, format!("module {module}")).unwrap();
        }
        std::fs::write(modules_dir.join("modules.dep"), dep).unwrap();
        std::fs::write(dir.path().join("agent"), static_elf(b"agent v1")).unwrap();
        FakeHost { dir, locations }
    }

    fn options(&self) -> GuestOptions {
        GuestOptions {
            kernel: None,
            agent: Some(self.dir.path().join("agent")),
            extra_modules: Vec::new(),
            cache_dir: self.dir.path().join("cache"),
        }
    }

    fn guest_cache_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("cache/guest"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }
}

#[test]
fn second_prepare_reuses_the_cached_initramfs() {
    let host = FakeHost::new();
    let first = prepare_with(&host.options(), &host.locations).unwrap();
    assert_eq!(first.kernel_release, RELEASE);
    assert_eq!(
        first.kernel,
        host.locations.boot_dir.join(format!("vmlinuz-{RELEASE}"))
    );
    assert_eq!(first.inputs_digest.len(), 64);
    let name = format!("initramfs-{}.cpio", &first.inputs_digest[..16]);
    assert_eq!(
        first.initramfs,
        host.dir.path().join("cache/guest").join(name)
    );
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let first_mtime = mtime(&first.initramfs);

    std::thread::sleep(std::time::Duration::from_millis(20));
    let second = prepare_with(&host.options(), &host.locations).unwrap();
    assert_eq!(second, first);
    assert_eq!(
        mtime(&second.initramfs),
        first_mtime,
        "initramfs was rewritten"
    );
    assert_eq!(
        host.guest_cache_files(),
        std::slice::from_ref(&first.initramfs)
    );
}

#[test]
fn changing_the_agent_changes_digest_and_path() {
    let host = FakeHost::new();
    let first = prepare_with(&host.options(), &host.locations).unwrap();
    std::fs::write(host.dir.path().join("agent"), static_elf(b"agent v2")).unwrap();
    let second = prepare_with(&host.options(), &host.locations).unwrap();
    assert_ne!(second.inputs_digest, first.inputs_digest);
    assert_ne!(second.initramfs, first.initramfs);
    assert_eq!(host.guest_cache_files().len(), 2);
    assert!(
        first.initramfs.is_file(),
        "older image is left for others using it"
    );
}

#[test]
fn changing_modules_or_kernel_changes_digest() {
    let host = FakeHost::new();
    let base = prepare_with(&host.options(), &host.locations).unwrap();

    let mut with_pmem = host.options();
    with_pmem.extra_modules.push("virtio-pmem".to_owned());
    let pmem = prepare_with(&with_pmem, &host.locations).unwrap();
    assert_ne!(pmem.inputs_digest, base.inputs_digest);

    let module = host
        .locations
        .modules_root
        .join(RELEASE)
        .join("kernel/fs/erofs/erofs.ko");
    std::fs::write(&module, b"rebuilt erofs").unwrap();
    let rebuilt = prepare_with(&host.options(), &host.locations).unwrap();
    assert_ne!(rebuilt.inputs_digest, base.inputs_digest);

    let image = host.locations.boot_dir.join(format!("vmlinuz-{RELEASE}"));
    std::fs::write(&image, b"patched kernel").unwrap();
    let patched = prepare_with(&host.options(), &host.locations).unwrap();
    assert_ne!(patched.inputs_digest, rebuilt.inputs_digest);
}

#[test]
fn errors_name_what_is_missing() {
    let host = FakeHost::new();

    let mut unknown = host.options();
    unknown.extra_modules.push("nd_pmem".to_owned());
    let error = prepare_with(&unknown, &host.locations).unwrap_err();
    assert!(matches!(error, GuestError::UnknownModule { .. }), "{error}");
    assert!(error.to_string().contains("nd_pmem"), "{error}");

    let mut no_agent = host.options();
    no_agent.agent = Some(host.dir.path().join("missing-agent"));
    let error = prepare_with(&no_agent, &host.locations).unwrap_err();
    assert!(error.to_string().contains("missing-agent"), "{error}");

    let mut explicit = host.options();
    explicit.kernel = Some(host.dir.path().join("vmlinuz-9.9.9-cloud-amd64"));
    let error = prepare_with(&explicit, &host.locations).unwrap_err();
    assert!(error.to_string().contains("vmlinuz-9.9.9"), "{error}");

    let empty_boot = KernelLocations {
        boot_dir: host.dir.path().join("empty"),
        ..host.locations.clone()
    };
    let error = prepare_with(&host.options(), &empty_boot).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("install linux-image-cloud-amd64 or pass --kernel"),
        "{error}"
    );
}

/// A plain `cargo build` of the workspace writes a dynamically linked
/// agent; named as the agent, it is refused before any initramfs is built,
/// with the command that builds the static one.
#[test]
fn a_dynamically_linked_agent_never_goes_into_an_initramfs() {
    let host = FakeHost::new();
    let mut opts = host.options();
    // This test binary is dynamically linked, as target/release/podvisor-agent is.
    opts.agent = Some(std::env::current_exe().unwrap());
    let error = prepare_with(&opts, &host.locations).unwrap_err();
    assert!(
        matches!(error, GuestError::AgentNotStatic { .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&opts.agent.unwrap().display().to_string()),
        "{message}"
    );
    assert!(message.contains("+crt-static"), "{message}");
    assert!(!host.dir.path().join("cache/guest").exists() || host.guest_cache_files().is_empty());

    opts = host.options();
    let script = host.dir.path().join("agent.sh");
    std::fs::write(&script, b"#!/bin/sh\n").unwrap();
    opts.agent = Some(script);
    let error = prepare_with(&opts, &host.locations).unwrap_err();
    assert!(error.to_string().contains("not an ELF file"), "{error}");
}

/// `payload` behind a minimal statically linked x86-64 ELF header (one
/// PT_LOAD, no PT_INTERP): a stand-in agent podvisor accepts.
fn static_elf(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 64 + 56];
    out[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    out[0x10] = 2; // ET_EXEC
    out[0x12] = 62; // EM_X86_64
    out[0x20] = 64; // e_phoff
    out[0x36] = 56; // e_phentsize
    out[0x38] = 1; // e_phnum
    out[64] = 1; // PT_LOAD
    out.extend_from_slice(payload);
    out
}

/// Lists a cpio archive with the system `cpio -t`.
fn list_archive(archive: &Path) -> Vec<String> {
    let mut child = Command::new("cpio")
        .args(["-t", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the system `cpio` must be installed for this test (apt-get install cpio)");
    let bytes = std::fs::read(archive).unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "cpio -t failed on {}",
        archive.display()
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A build from this machine's real kernel and modules
/// (`linux-image-cloud-amd64` must be installed), with a stand-in agent.
#[test]
fn prepares_from_the_real_cloud_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("podvisor-agent");
    std::fs::write(&agent, static_elf(&vec![0x5a; 3 << 20])).unwrap();
    let opts = GuestOptions {
        agent: Some(agent),
        extra_modules: vec!["virtio_net".to_owned()],
        ..GuestOptions::new(dir.path().join("cache"))
    };
    let started = std::time::Instant::now();
    let artifacts = prepare(&opts).unwrap_or_else(|error| {
        panic!("needs linux-image-cloud-amd64 installed on this machine: {error}")
    });
    let first_run = started.elapsed();
    assert!(artifacts.kernel_release.ends_with("-cloud-amd64"));
    assert!(artifacts.kernel.starts_with("/boot"));

    let started = std::time::Instant::now();
    let again = prepare(&opts).unwrap();
    let cached_run = started.elapsed();
    assert_eq!(again, artifacts);
    eprintln!("prepare on the real kernel: first {first_run:?}, cached {cached_run:?}");

    let entries = list_archive(&artifacts.initramfs);
    let release_dir = format!("lib/modules/{}", artifacts.kernel_release);
    for expected in [
        "init",
        "dev/console",
        "etc/podvisor/modules.load",
        "etc/podvisor/modules.pmem",
        release_dir.as_str(),
    ] {
        assert!(
            entries.iter().any(|e| e == expected),
            "{expected} missing: {entries:?}"
        );
    }
    let modules: Vec<&String> = entries.iter().filter(|e| e.ends_with(".ko")).collect();
    for name in BASE_MODULES
        .iter()
        .chain(&["virtio_ring", "virtio_net", "libcrc32c"])
        // Loaded when a layer on virtio-pmem is mounted.
        .chain(PMEM_MODULES)
        .chain(&["libnvdimm", "nd_virtio", "nd_btt"])
    {
        let file = format!("/{name}.ko");
        assert!(
            modules.iter().any(|m| m.ends_with(&file)),
            "{name} missing from {modules:?}"
        );
    }
}
