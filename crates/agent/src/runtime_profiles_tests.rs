//! Runtime detection and profiles in fake container roots (temp dirs).

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use super::*;

const JDK: &str = "usr/lib/jvm/java-17-openjdk-amd64";

fn v(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The container's environment as the agent builds it (PATH filled in).
fn container_env(extra: &[&str]) -> Vec<String> {
    let mut env = v(extra);
    env.push(format!("PATH={}", crate::path_lookup::DEFAULT_PATH));
    env
}

fn write(root: &Path, path: &str, bytes: &[u8], mode: u32) {
    let host = root.join(path);
    fs::create_dir_all(host.parent().unwrap()).unwrap();
    fs::write(&host, bytes).unwrap();
    fs::set_permissions(&host, fs::Permissions::from_mode(mode)).unwrap();
}

fn link(root: &Path, path: &str, target: &str) {
    let host = root.join(path);
    fs::create_dir_all(host.parent().unwrap()).unwrap();
    symlink(target, host).unwrap();
}

/// A Debian-like JDK: `/usr/bin/java -> /etc/alternatives/java ->
/// /usr/lib/jvm/.../bin/java`, and the JDK's `release` file.
fn debian_jdk() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write(r, &format!("{JDK}/bin/java"), b"\x7fELF not really", 0o755);
    write(
        r,
        &format!("{JDK}/release"),
        b"IMPLEMENTOR=\"Debian\"\nJAVA_VERSION=\"17.0.15\"\n",
        0o644,
    );
    link(r, "etc/alternatives/java", &format!("/{JDK}/bin/java"));
    link(r, "usr/bin/java", "/etc/alternatives/java");
    root
}

/// A minimal ELF64 executable whose writable segment holds Go's build
/// information (inline format) for `version`.
fn go_elf(version: &str) -> Vec<u8> {
    let mut blob = b"\xff Go buildinf:\x08\x02".to_vec();
    blob.resize(32, 0);
    blob.push(version.len() as u8);
    blob.extend_from_slice(version.as_bytes());
    blob.push(0);
    let mut f = vec![0u8; 0x100];
    f[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    f[0x10] = 2;
    f[0x12] = 0x3e;
    f[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[0x38..0x3A].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    f[0x40..0x44].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[0x44..0x48].copy_from_slice(&6u32.to_le_bytes()); // R|W
    f[0x48..0x50].copy_from_slice(&0x100u64.to_le_bytes());
    f[0x60..0x68].copy_from_slice(&(blob.len() as u64).to_le_bytes());
    f.extend(blob);
    f
}

fn vm(mem_mib: u64, cpus: u32) -> VmResources {
    VmResources {
        mem_total: (mem_mib + 50) << 20,
        mem_available: mem_mib << 20,
        cpus_online: cpus,
    }
}

fn sizing() -> RuntimeSizing {
    RuntimeSizing {
        memory_share_ppm: WHOLE_VM_PPM,
        cpus: None,
        loaded_classes: None,
        peak_threads: None,
        jvm_archive: None,
    }
}

#[test]
fn a_debian_jdk_is_found_through_its_links_inside_the_root() {
    let root = debian_jdk();
    let found = detect(
        root.path(),
        &v(&["java", "-jar", "app.jar"]),
        &container_env(&[]),
    )
    .unwrap();
    assert_eq!(found.runtime, Runtime::Jvm);
    assert_eq!(found.name(), "JVM 17.0.15");
    assert_eq!(
        found.program.as_deref(),
        Some(format!("/{JDK}/bin/java").as_str())
    );
    // The same through `sh -c "exec java ..."`.
    let found = detect(
        root.path(),
        &v(&["sh", "-c", "exec java -cp /app Main"]),
        &container_env(&[]),
    )
    .unwrap();
    assert_eq!(found.name(), "JVM 17.0.15");
    // A launcher in $JAVA_HOME/bin: the version from $JAVA_HOME/release.
    write(root.path(), "opt/tools/bin/launch", b"#!/bin/sh\n", 0o755);
    let found = detect(
        root.path(),
        &v(&[&format!("/{JDK}/bin/jshell")]),
        &container_env(&[&format!("JAVA_HOME=/{JDK}")]),
    )
    .unwrap();
    assert_eq!(found.name(), "JVM 17.0.15");
}

#[test]
fn links_pointing_out_of_the_root_are_not_followed() {
    let outside = tempfile::tempdir().unwrap();
    let o = outside.path();
    write(o, "jdk/bin/java", b"\x7fELF", 0o755);
    write(o, "jdk/release", b"JAVA_VERSION=\"99.0.1\"\n", 0o644);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // An absolute link to the host's JDK, and a relative one climbing
    // above the root: both stay inside it, where there is no JDK.
    link(r, "usr/bin/java", &format!("{}/jdk/bin/java", o.display()));
    let climb = "../".repeat(30);
    link(
        r,
        "usr/local/bin/java",
        &format!("{climb}{}/jdk/bin/java", o.display()),
    );
    // A JDK whose release file is a link out of the root.
    write(r, "opt/jdk/bin/java", b"\x7fELF", 0o755);
    link(
        r,
        "opt/jdk/release",
        &format!("{}/jdk/release", o.display()),
    );
    for (argv, program) in [
        (v(&["/usr/bin/java"]), None),
        (v(&["/usr/local/bin/java"]), None),
        (v(&["/opt/jdk/bin/java"]), Some("/opt/jdk/bin/java")),
    ] {
        let found = detect(r, &argv, &container_env(&["JAVA_HOME=/opt/jdk"])).unwrap();
        assert_eq!(found.runtime, Runtime::Jvm);
        assert_eq!(found.version, None, "{argv:?}: read outside the root");
        assert_eq!(found.program.as_deref(), program, "{argv:?}");
    }
}

#[test]
fn a_fifo_or_a_directory_is_never_read() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write(r, "opt/jdk/bin/java", b"\x7fELF", 0o755);
    nix::unistd::mkfifo(
        &r.join("opt/jdk/release"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    // Opening a FIFO for reading would block without O_NONBLOCK.
    let found = detect(r, &v(&["/opt/jdk/bin/java"]), &container_env(&[])).unwrap();
    assert_eq!(found.name(), "JVM");
    fs::create_dir_all(r.join("app/server")).unwrap();
    assert_eq!(detect(r, &v(&["/app/server"]), &container_env(&[])), None);
}

#[test]
fn a_go_binary_is_known_by_its_build_information() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write(r, "app/server", &go_elf("go1.19.8"), 0o755);
    link(r, "usr/local/bin/server", "/app/server");
    write(r, "bin/tool", b"\x7fELF\x02\x01\x01 but no Go in it", 0o755);
    write(
        r,
        "bin/script",
        b"#!/bin/sh\n\xff Go buildinf:\x08\x02",
        0o755,
    );
    let go = detect(r, &v(&["server", "--port", "80"]), &container_env(&[])).unwrap();
    assert_eq!(go.name(), "Go go1.19.8");
    assert_eq!(go.program.as_deref(), Some("/app/server"));
    let go = detect(
        r,
        &v(&["/bin/sh", "-c", "exec /app/server"]),
        &container_env(&[]),
    )
    .unwrap();
    assert_eq!(go.runtime, Runtime::Go);
    for other in ["tool", "script", "missing"] {
        assert_eq!(
            detect(r, &v(&[other]), &container_env(&[])),
            None,
            "{other}"
        );
    }
}

#[test]
fn node_and_python_are_known_by_name_python_with_its_version() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write(r, "usr/bin/python3.11", b"\x7fELF", 0o755);
    link(r, "usr/bin/python3", "python3.11");
    write(r, "usr/bin/node", b"\x7fELF", 0o755);
    let py = detect(
        r,
        &v(&["python3", "-m", "http.server"]),
        &container_env(&[]),
    )
    .unwrap();
    assert_eq!(py.name(), "CPython 3.11");
    let node = detect(r, &v(&["node", "server.js"]), &container_env(&[])).unwrap();
    assert_eq!(node.name(), "Node.js");
    assert_eq!(node.program.as_deref(), Some("/usr/bin/node"));
}

#[test]
fn the_share_is_a_part_of_what_the_vm_left_and_never_more_cpus_than_online() {
    let mut s = sizing();
    s.memory_share_ppm = 250_000;
    s.cpus = Some(8);
    assert_eq!(
        share(&s, &vm(1000, 2)),
        Share {
            memory_bytes: 250 << 20,
            cpus: 2
        }
    );
    s.memory_share_ppm = 3 * WHOLE_VM_PPM;
    s.cpus = Some(0);
    assert_eq!(
        share(&s, &vm(1000, 2)),
        Share {
            memory_bytes: 1000 << 20,
            cpus: 1
        }
    );
    assert_eq!(share(&sizing(), &vm(1000, 3)).cpus, 3);
}

fn value<'a>(env: &'a [String], key: &str) -> Vec<&'a str> {
    env.iter()
        .filter_map(|e| e.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn a_jvm_gets_its_flags_in_the_environment_with_the_users_own_last() {
    let root = debian_jdk();
    let mut env = container_env(&["JAVA_TOOL_OPTIONS=-Xmx64m", "A=1"]);
    let applied = apply(
        &sizing(),
        &vm(1024, 2),
        root.path(),
        &v(&["java"]),
        &mut env,
    )
    .unwrap();
    assert_eq!(applied.runtime, "JVM 17.0.15");
    let options = value(&env, "JAVA_TOOL_OPTIONS");
    assert_eq!(options.len(), 1, "{env:?}");
    assert!(options[0].ends_with(" -Xmx64m"), "{options:?}");
    assert_eq!(options[0].matches("-Xmx").count(), 1, "{options:?}");
    assert!(
        options[0].contains("-XX:ActiveProcessorCount=2"),
        "{options:?}"
    );
    assert_eq!(
        applied.env,
        vec![("JAVA_TOOL_OPTIONS".to_string(), options[0].to_string())]
    );
    assert!(applied.reasons[0].starts_with("JVM 17.0.15 found: /usr/lib/jvm/"));
    assert!(
        applied
            .reasons
            .iter()
            .any(|r| r.contains("the container's own -Xmx")),
        "{applied:?}"
    );
    assert_eq!(value(&env, "A"), ["1"]);
}

#[test]
fn a_class_data_archive_is_used_only_if_the_root_has_it() {
    let root = debian_jdk();
    write(root.path(), "opt/app/app.jsa", b"archive", 0o644);
    let mut s = sizing();
    s.jvm_archive = Some("/opt/app/app.jsa".into());
    let mut env = container_env(&[]);
    let applied = apply(&s, &vm(1024, 1), root.path(), &v(&["java"]), &mut env).unwrap();
    let options = value(&env, "JAVA_TOOL_OPTIONS")[0];
    assert!(
        options.starts_with("-XX:SharedArchiveFile=/opt/app/app.jsa -Xshare:auto"),
        "{options}"
    );
    assert!(options.contains("-XX:ArchiveRelocationMode=0"), "{options}");
    s.jvm_archive = Some("/opt/app/gone.jsa".into());
    let mut env = container_env(&[]);
    let applied_missing = apply(&s, &vm(1024, 1), root.path(), &v(&["java"]), &mut env).unwrap();
    assert!(!value(&env, "JAVA_TOOL_OPTIONS")[0].contains("SharedArchiveFile"));
    assert!(
        applied_missing
            .reasons
            .iter()
            .any(|r| r.contains("/opt/app/gone.jsa is not in the container's root")),
        "{applied_missing:?}"
    );
    assert!(
        applied
            .reasons
            .iter()
            .any(|r| r.contains("class-data archive /opt/app/app.jsa"))
    );
}

#[test]
fn a_share_too_small_starts_without_settings_and_says_why() {
    let root = debian_jdk();
    let mut env = container_env(&["JAVA_TOOL_OPTIONS=-verbose:gc"]);
    let before = env.clone();
    let applied = apply(&sizing(), &vm(64, 1), root.path(), &v(&["java"]), &mut env).unwrap();
    assert_eq!(env, before);
    assert!(applied.env.is_empty());
    assert!(
        applied
            .reasons
            .iter()
            .any(|r| r.contains("has 64 MiB") && r.ends_with("started without settings")),
        "{applied:?}"
    );
}

#[test]
fn no_runtime_no_profile_and_reports_are_bounded() {
    let root = debian_jdk();
    write(root.path(), "bin/busybox", b"\x7fELF\x02\x01\x01", 0o755);
    link(root.path(), "bin/sh", "busybox");
    let mut env = container_env(&[]);
    let before = env.clone();
    assert_eq!(
        apply(
            &sizing(),
            &vm(1024, 1),
            root.path(),
            &v(&["sh", "-c", "echo hi"]),
            &mut env
        ),
        None
    );
    assert_eq!(env, before);
    // A long user setting is set whole but reported cut.
    let long = format!("JAVA_TOOL_OPTIONS=-Dx={}", "y".repeat(3000));
    let mut env = vec![long];
    let applied = apply(
        &sizing(),
        &vm(1024, 1),
        root.path(),
        &v(&["/usr/bin/java"]),
        &mut env,
    )
    .unwrap();
    assert!(value(&env, "JAVA_TOOL_OPTIONS")[0].len() > 3000);
    let reported = &applied.env[0].1;
    assert!(
        reported.len() <= MAX_PROFILE_LINE && reported.ends_with("..."),
        "{}",
        reported.len()
    );
    assert!(applied.reasons.len() <= MAX_PROFILE_LINES);
}
