//! VM templates and fork, end to end: real QEMU VMs (TCG here), the real
//! guest kernel and agent, templates in a tmpfs directory of the test's own.
//!
//! Tests named `vm_*` boot VMs; nextest runs at most two at a time.

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

/// The warm process: a token drawn at start (before the template is
/// saved), then one command read from stdin and run.
const WARM_CMD: &str = "tok=$(head -c8 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
    echo warming; read cmd; echo \"token $tok\"; eval \"$cmd\"";

/// Runs one command in a clone of the warm template, returning its stdout.
fn run_in_clone(t: &TestDir, image: &Path, template: &str, name: &str, cmd: &str) -> String {
    let out = podvisor(t)
        .args([
            "run",
            "-i",
            "--timings",
            "--name",
            name,
            "--template",
            template,
        ])
        .arg(image)
        .args(["--", "sh", "-c", WARM_CMD])
        .stdin(format!("{cmd}\n"))
        .output();
    assert_code(&out, 0);
    assert!(out.stderr.contains("fork from template"), "{}", out.stderr);
    assert!(
        !out.stdout.contains("warming"),
        "the process started anew:\n{}",
        out.stdout
    );
    out.stdout
}

/// `key value` lines of a clone's output.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in:\n{out}"))
        .trim()
}

#[test]
fn vm_warm_template_clones_share_the_process_but_not_identity_or_memory() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    let created = podvisor(&t)
        .args([
            "template",
            "create",
            "--name",
            "warm",
            "--warm",
            "-i",
            "--warm-until",
            "warming",
        ])
        .arg(&image)
        .args(["--", "sh", "-c", WARM_CMD])
        .success();
    assert!(
        created.stdout.contains("warm (warm template"),
        "{}",
        created.stdout
    );
    let ram_file = PathBuf::from(meta(&t, "warm")["ram_file"].as_str().unwrap());
    assert!(ram_file.starts_with(t.template_ram_dir()));
    let ram_before = sha256_file(&ram_file);
    // Let the template's clock fall behind, so a clone that kept it shows.
    std::thread::sleep(Duration::from_secs(2));

    // Two clones: the process was already running (same token), but each
    // has its own hostname, random bytes and the host's time. `auto` finds
    // the warm template for exactly this command.
    let identity = "hostname; head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; adjtimex | grep time.tv_";
    let mut clones = Vec::new();
    for (name, template) in [("clone-a", "warm"), ("clone-b", "auto")] {
        let before = now_secs();
        let out = run_in_clone(&t, &image, template, name, identity);
        let after = now_secs();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[1], name, "hostname:\n{out}");
        let guest_time = field(&out, "time.tv_sec:").parse::<f64>().unwrap()
            + field(&out, "time.tv_usec:").parse::<f64>().unwrap() / 1e6;
        assert!(
            guest_time > before - 1.0 && guest_time < after + 1.0,
            "guest clock {guest_time} vs host {before}..{after}"
        );
        clones.push((field(&out, "token").to_string(), lines[2].to_string()));
    }
    assert_eq!(
        clones[0].0, clones[1].0,
        "both clones continue the template's process"
    );
    assert_eq!(clones[0].1.len(), 32, "{clones:?}");
    assert_ne!(
        clones[0].1, clones[1].1,
        "clones drew the same random bytes"
    );

    // A clone's writes stay its own: clone A writes and waits; while it
    // runs, the template cannot be removed, its RAM file is unchanged, and
    // a sibling does not see the write.
    let mut a = spawn_clone(&t, &image, "writer");
    writeln!(
        a.stdin.as_mut().unwrap(),
        "echo written-by-a > /mark; echo written; read x; echo bye"
    )
    .unwrap();
    let mut a_out = BufReader::new(a.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("written") {
        line.clear();
        assert_ne!(
            a_out.read_line(&mut line).unwrap(),
            0,
            "clone A ended early"
        );
    }
    let rm = podvisor(&t).args(["template", "rm", "warm"]).output();
    assert_code(&rm, 1);
    assert!(
        rm.stderr.contains("template \"warm\" is in use"),
        "{}",
        rm.stderr
    );
    let pid: u32 = rm
        .stderr
        .split("QEMU pids ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", rm.stderr));
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        cmdline.contains("qemu-system"),
        "pid {pid} is not a QEMU: {cmdline}"
    );
    assert!(ram_file.exists());
    let prune = podvisor(&t).args(["template", "prune", "--all"]).success();
    assert!(
        prune.stdout.contains("kept warm: in use"),
        "{}",
        prune.stdout
    );
    assert_eq!(
        sha256_file(&ram_file),
        ram_before,
        "a clone wrote to the template's RAM"
    );
    let sibling = run_in_clone(
        &t,
        &image,
        "warm",
        "sibling",
        "cat /mark 2>/dev/null || echo no-mark",
    );
    assert!(sibling.ends_with("no-mark\n"), "{sibling}");

    drop(a.stdin.take());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut a_out, &mut rest).unwrap();
    assert_eq!(rest, "bye\n");
    assert!(a.wait().unwrap().success());

    podvisor(&t).args(["template", "rm", "warm"]).success();
    assert!(!ram_file.exists(), "RAM file left behind");
    let ls = podvisor(&t).args(["template", "ls"]).success();
    assert!(!ls.stdout.contains("warm "), "{}", ls.stdout);
    assert_pods_gone(&t);
}

/// A clone of the warm template whose stdin stays open for the test.
fn spawn_clone(t: &TestDir, image: &Path, name: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .arg("--cache-dir")
        .arg(t.cache_dir())
        .arg("--run-dir")
        .arg(t.run_dir())
        .env("PODVISOR_TEMPLATE_RAM_DIR", t.template_ram_dir())
        .args(["run", "-i", "--name", name, "--template", "warm"])
        .arg(image)
        .args(["--", "sh", "-c", WARM_CMD])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn vm_changed_inputs_make_templates_stale_and_they_are_rebuilt() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    // An agent and a QEMU of the test's own, to change them.
    let agent = t.path().join("agent");
    std::fs::copy(podvisor_guest::find_agent().unwrap(), &agent).unwrap();
    let qemu = t.path().join("qemu");
    let write_qemu = |version: &str| {
        std::fs::write(
            &qemu,
            format!(
                "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'QEMU emulator version {version}'; exit 0; fi\n\
                 exec qemu-system-x86_64 \"$@\"\n"
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write_qemu("7.2.22 (test)");
    let pv = || {
        podvisor(&t)
            .arg("--agent")
            .arg(&agent)
            .env("PODVISOR_QEMU", &qemu)
    };

    let run = |name: &str| {
        pv().args(["run", "--timings", "--name", name])
            .arg(&image)
            .args(["--", "hostname"])
            .output()
    };
    let out = run("one");
    assert_code(&out, 0);
    assert_eq!(out.stdout, "one\n");
    let image_name = templates_of_kind(&t, "image").remove(0);
    let first_state = meta(&t, &image_name)["state_file"].clone();
    let ls = pv().args(["template", "ls"]).success();
    assert_eq!(ls.stdout.matches(" valid").count(), 2, "{}", ls.stdout);

    // A changed agent (same path, other bytes): both levels are stale.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&agent)
        .unwrap();
    f.write_all(b"\0changed").unwrap();
    drop(f);
    let ls = pv().args(["template", "ls"]).success();
    assert_eq!(
        ls.stdout
            .matches("stale: the guest kernel, agent or modules changed")
            .count(),
        2,
        "{}",
        ls.stdout
    );
    // The next pod rebuilds them and forks from the new ones.
    let out = run("two");
    assert_code(&out, 0);
    assert_eq!(out.stdout, "two\n");
    assert!(
        out.stderr
            .contains("is stale (the guest kernel, agent or modules changed); rebuilding it"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("make templates on demand"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains(&format!("fork from template {image_name}")),
        "{}",
        out.stderr
    );
    assert_ne!(
        meta(&t, &image_name)["state_file"],
        first_state,
        "not rebuilt"
    );

    // Another QEMU version: stale again, and `prune` removes what is stale.
    write_qemu("99.0 (test)");
    let ls = pv().args(["template", "ls"]).success();
    assert_eq!(
        ls.stdout.matches("stale: the VMM changed").count(),
        2,
        "{}",
        ls.stdout
    );
    assert!(
        ls.stdout.contains("QEMU emulator version 99.0"),
        "{}",
        ls.stdout
    );
    let prune = pv().args(["template", "prune"]).success();
    assert_eq!(
        prune.stdout.matches("removed ").count(),
        2,
        "{}",
        prune.stdout
    );
    assert!(templates_of_kind(&t, "image").is_empty());
    let leftover = ram_files(t.template_ram_dir());
    assert!(leftover.is_empty(), "RAM files left: {leftover:?}");
    assert_pods_gone(&t);
}

/// Something done to a state file.
type Damage = fn(&Path);

#[test]
fn vm_corrupt_or_truncated_state_boots_cold_with_a_warning() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    let run = || {
        podvisor(&t)
            .args(["run", "--timings"])
            .arg(&image)
            .args(["--", "sh", "-c", "echo ok; exit 4"])
            .output()
    };
    assert_code(&run(), 4);
    let name = templates_of_kind(&t, "image").remove(0);
    let damages: [(&str, Damage); 2] = [
        ("corrupted", |p| {
            let mut bytes = std::fs::read(p).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x5a;
            std::fs::write(p, bytes).unwrap();
        }),
        ("truncated", |p| {
            let len = std::fs::metadata(p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(len / 3)
                .unwrap();
        }),
    ];
    for (what, damage) in damages {
        let state = PathBuf::from(meta(&t, &name)["state_file"].as_str().unwrap());
        damage(&state);
        let out = run();
        assert_code(&out, 4);
        assert_eq!(out.stdout, "ok\n", "{what}");
        assert!(
            out.stderr
                .contains(&format!("template \"{name}\" is corrupt")),
            "{what}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(&state.display().to_string()),
            "{what}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("booting the pod cold"),
            "{what}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("QEMU start -> kernel"),
            "{what}: {}",
            out.stderr
        );
        // The corrupt template is gone; the next pod makes it afresh.
        assert!(templates_of_kind(&t, "image").is_empty(), "{what}");
        let again = run();
        assert_code(&again, 4);
        assert!(
            again.stderr.contains("fork from template"),
            "{what}: {}",
            again.stderr
        );
    }
    assert_pods_gone(&t);
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
