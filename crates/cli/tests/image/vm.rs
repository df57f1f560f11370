//! `podvisor run REF` in real VMs: pulls on demand, runs from the cache
//! after that, and GC leaves a running pod's disks alone.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use podvisor_testbed::cli::TestDir;
use podvisor_testbed::registry::Registry;

use crate::{app_image, assert_code, no_config, podvisor};

#[test]
fn vm_run_pulls_from_the_registry_once() {
    let t = TestDir::new();
    no_config(&t);
    let registry = Registry::start();
    let built = app_image("hello from the registry").build().unwrap();
    registry.push(&built, "app", "v1");
    let reference = registry.reference("app", "v1");
    let out = podvisor(&t).args(["run", &reference]).output();
    assert_code(&out, 0);
    assert_eq!(out.stdout, "hello from the registry\n");
    assert!(out.stderr.contains("fetching"), "{}", out.stderr);
    // From the cache the second time: no new fetch, no pull output.
    let out = podvisor(&t)
        .args([
            "run",
            &reference,
            "--",
            "sh",
            "-c",
            "cat /app/marker; echo again",
        ])
        .output();
    assert_code(&out, 0);
    assert_eq!(out.stdout, "hello from the registry\nagain\n");
    assert!(!out.stderr.contains("fetching"), "{}", out.stderr);
    for digest in &built.layer_digests {
        assert_eq!(registry.blob_gets(digest), 1, "{digest}");
    }
    // A path still means a local archive.
    let archive = t.path().join("local.tar");
    app_image("from a file")
        .write_oci_archive(&archive)
        .unwrap();
    let out = podvisor(&t).arg("run").arg(&archive).output();
    assert_code(&out, 0);
    assert_eq!(out.stdout, "from a file\n");
    let out = podvisor(&t).args(["run", "./missing.tar"]).output();
    assert_code(&out, 125);
    assert!(out.stderr.contains("missing.tar"), "{}", out.stderr);
}

#[test]
fn vm_gc_never_removes_a_disk_a_running_pod_uses() {
    let t = TestDir::new();
    no_config(&t);
    let registry = Registry::start();
    let built = app_image("in use").build().unwrap();
    registry.push(&built, "app", "v1");
    let reference = registry.reference("app", "v1");
    podvisor(&t).args(["image", "pull", &reference]).success();

    let mut pod = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .env("PODVISOR_NETWORK", "none")
        .env("PODVISOR_CACHE_DIR", t.cache_dir())
        .env("PODVISOR_RUN_DIR", t.run_dir())
        .env("PODVISOR_CONFIG", t.path().join("no-config.toml"))
        .env("PODVISOR_TEMPLATE_RAM_DIR", t.template_ram_dir())
        .args(["run", &reference, "--", "sh", "-c"])
        .arg("trap 'exit 0' TERM; echo ready; while true; do sleep 0.2; done")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(pod.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");

    let out = podvisor(&t).args(["image", "rm", &reference]).success();
    assert!(
        out.stdout.contains(&format!("untagged {reference}")),
        "{}",
        out.stdout
    );
    assert_eq!(
        out.stdout.matches("in use by pid").count(),
        2,
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("freed 0 bytes"), "{}", out.stdout);
    let out = podvisor(&t).args(["image", "gc"]).success();
    assert!(out.stdout.contains("freed 0 bytes"), "{}", out.stdout);
    assert_eq!(t.layer_disks().len(), 2, "the running pod's disks are kept");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pod.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(pod.wait().unwrap().success());
    let out = podvisor(&t).args(["image", "gc"]).success();
    assert_eq!(
        out.stdout.matches("deleted layer disk").count(),
        2,
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("freed 0 bytes"), "{}", out.stdout);
    assert!(t.layer_disks().is_empty());
}
