//! VM templates and fork, end to end: real QEMU VMs (TCG here), the real
//! guest kernel and agent, templates in a tmpfs directory of the test's own.
//!
//! Tests named `vm_*` boot VMs; nextest runs at most two at a time.

mod lifecycle;
mod warm;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use podvisor_testbed::cli::{CmdOutput, PodvisorCommand, TestDir};
use podvisor_testbed::oci::ImageBuilder;
use sha2::{Digest, Sha256};

fn podvisor(t: &TestDir) -> PodvisorCommand {
    t.podvisor(env!("CARGO_BIN_EXE_podvisor"))
        .timeout(Duration::from_secs(300))
}

fn busybox_image(dir: &Path) -> PathBuf {
    let path = dir.join("busybox.tar");
    ImageBuilder::new()
        .busybox_layer()
        .cmd(&["sh"])
        .write_oci_archive(&path)
        .unwrap();
    path
}

fn assert_code(out: &CmdOutput, code: i32) {
    assert_eq!(
        out.code,
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
}

/// No pod files and no QEMU of this test left.
fn assert_pods_gone(t: &TestDir) {
    let left: Vec<_> = std::fs::read_dir(t.run_dir().join("pods"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pod files left behind: {left:?}");
    let ps = Command::new("pgrep")
        .args(["-f", &t.run_dir().to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "QEMU processes left behind: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

/// The template's metadata, as `template ls` reads it.
fn meta(t: &TestDir, name: &str) -> serde_json::Value {
    let path = t.run_dir().join("templates").join(format!("{name}.json"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// Names of the stored templates of a kind.
fn templates_of_kind(t: &TestDir, kind: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(t.run_dir().join("templates"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(str::to_string)
        })
        .filter(|n| meta(t, n)["kind"] == kind)
        .collect();
    names.sort();
    names
}

/// Every template RAM file under `dir` (one level of subdirectories).
fn ram_files(dir: &Path) -> Vec<PathBuf> {
    let entries = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    entries(dir)
        .into_iter()
        .flat_map(|p| if p.is_dir() { entries(&p) } else { vec![p] })
        .filter(|p| p.extension().is_some_and(|x| x == "ram"))
        .collect()
}

fn sha256_file(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn vm_clone_runs_a_command_and_cold_boot_stays_available() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    let cmd = [
        "--",
        "sh",
        "-c",
        "echo \"out from $(hostname)\"; echo err >&2; exit 3",
    ];

    // First run: base and image templates are made on demand, then forked.
    let first = podvisor(&t)
        .args(["run", "--timings", "--name", "first"])
        .arg(&image)
        .args(cmd)
        .output();
    assert_code(&first, 3);
    assert_eq!(first.stdout, "out from first\n");
    assert!(first.stderr.contains("err\n"), "{}", first.stderr);
    assert!(
        first.stderr.contains("make templates on demand"),
        "{}",
        first.stderr
    );
    let image_template = templates_of_kind(&t, "image");
    assert_eq!(image_template.len(), 1, "one image template");
    assert_eq!(templates_of_kind(&t, "base").len(), 1, "one base template");
    assert!(
        first
            .stderr
            .contains(&format!("fork from template {}", image_template[0])),
        "{}",
        first.stderr
    );
    assert_pods_gone(&t);

    // Second run: a plain fork, nothing made.
    let second = podvisor(&t)
        .args(["run", "--timings", "--name", "second"])
        .arg(&image)
        .args(cmd)
        .output();
    assert_code(&second, 3);
    assert_eq!(second.stdout, "out from second\n");
    assert!(
        !second.stderr.contains("make templates"),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("fork from template image-"),
        "{}",
        second.stderr
    );
    assert_pods_gone(&t);

    // From the base template by name: the layers are hot-plugged.
    let base = templates_of_kind(&t, "base").remove(0);
    let from_base = podvisor(&t)
        .args(["run", "--timings", "--name", "third", "--template", &base])
        .arg(&image)
        .args(cmd)
        .output();
    assert_code(&from_base, 3);
    assert_eq!(from_base.stdout, "out from third\n");
    assert!(
        from_base
            .stderr
            .contains(&format!("fork from template {base}")),
        "{}",
        from_base.stderr
    );

    // --template none and --isolated boot cold.
    for flag in ["--template=none", "--isolated"] {
        let cold = podvisor(&t)
            .args(["run", "--timings", "--name", "cold", flag])
            .arg(&image)
            .args(cmd)
            .output();
        assert_code(&cold, 3);
        assert_eq!(cold.stdout, "out from cold\n");
        assert!(
            cold.stderr.contains("QEMU start -> kernel"),
            "{flag}: {}",
            cold.stderr
        );
        assert!(
            !cold.stderr.contains("fork from"),
            "{flag}: {}",
            cold.stderr
        );
    }
    assert_pods_gone(&t);

    let ls = podvisor(&t).args(["template", "ls"]).success();
    assert!(ls.stdout.contains(&format!("{base} ")), "{}", ls.stdout);
    assert_eq!(ls.stdout.matches(" valid").count(), 2, "{}", ls.stdout);
}

#[test]
fn template_choices_that_cannot_work_are_named() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    let out = podvisor(&t)
        .args(["run", "--template", "nosuch"])
        .arg(&image)
        .args(["--", "true"])
        .output();
    assert_code(&out, 125);
    assert!(
        out.stderr.contains("no template named \"nosuch\""),
        "{}",
        out.stderr
    );
    let out = podvisor(&t)
        .args(["run", "--isolated", "--template", "web"])
        .arg(&image)
        .args(["--", "true"])
        .output();
    assert_code(&out, 125);
    assert!(out.stderr.contains("asks for isolation"), "{}", out.stderr);
    let out = podvisor(&t)
        .args(["run", "--template", "../x"])
        .arg(&image)
        .output();
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("invalid template name"),
        "{}",
        out.stderr
    );
    let out = podvisor(&t).args(["template", "rm", "nosuch"]).output();
    assert_code(&out, 1);
    assert!(
        out.stderr.contains("no template named \"nosuch\""),
        "{}",
        out.stderr
    );
    let out = podvisor(&t).args(["template", "create", "--warm"]).output();
    assert_code(&out, 125);
    assert!(
        out.stderr.contains("--warm needs an image"),
        "{}",
        out.stderr
    );
    assert_pods_gone(&t);
}
