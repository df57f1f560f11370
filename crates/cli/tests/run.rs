//! `podvisor run` end to end: real QEMU VMs (TCG here, KVM where it works),
//! the real guest kernel and agent, images built by the tests.
//!
//! Tests named `vm_*` boot VMs; nextest runs at most two at a time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use podvisor_testbed::cli::{CmdOutput, PodvisorCommand, TestDir};
use podvisor_testbed::oci::{Entry, ImageBuilder, blob_path, truncate_file};

fn podvisor(t: &TestDir) -> PodvisorCommand {
    t.podvisor(env!("CARGO_BIN_EXE_podvisor"))
        .timeout(Duration::from_secs(240))
}

/// The agent the tests boot (see scripts/test.sh), found as podvisor finds it.
fn agent() -> PathBuf {
    podvisor_guest::find_agent().expect("build the static agent first: scripts/test.sh does")
}

/// The misbehaving agent built from the agent crate's `hostile-agent` example.
fn hostile_agent() -> PathBuf {
    let p = agent().parent().unwrap().join("examples/hostile-agent");
    assert!(
        p.exists(),
        "{} missing: build it with scripts/test.sh",
        p.display()
    );
    p
}

/// A busybox image with a config that sets every runtime field.
fn configured_image(dir: &Path) -> PathBuf {
    let path = dir.join("app.tar");
    ImageBuilder::new()
        .busybox_layer()
        .entrypoint(&["sh", "-c"])
        .cmd(&["echo \"$GREETING from $(pwd) as $(id -u):$(id -g)\"; echo to-stderr >&2; exit 3"])
        .env("GREETING=hello")
        .workdir("/srv/app")
        .user("app")
        .write_oci_archive(&path)
        .unwrap();
    path
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

/// After a run, nothing of the pod may remain: no runtime files, no QEMU.
fn assert_pod_cleaned_up(t: &TestDir) {
    let pods = t.run_dir().join("pods");
    let left: Vec<_> = std::fs::read_dir(&pods)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pod files left behind: {left:?}");
    let ps = std::process::Command::new("pgrep")
        .args(["-f", &t.run_dir().to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "QEMU processes left behind: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
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

#[test]
fn vm_image_config_output_and_exit_code() {
    let t = TestDir::new();
    let image = configured_image(t.path());
    let out = podvisor(&t).args(["run"]).arg(&image).output();
    assert_code(&out, 3);
    assert_eq!(out.stdout, "hello from /srv/app as 1000:1000\n");
    assert!(out.stderr.contains("to-stderr\n"), "{}", out.stderr);
    assert_pod_cleaned_up(&t);
}

#[test]
fn vm_cli_overrides_env_workdir_user_and_stdin() {
    let t = TestDir::new();
    let image = configured_image(t.path());
    let out = podvisor(&t)
        .args([
            "run",
            "-i",
            "-e",
            "GREETING=hi",
            "-e",
            "EXTRA=x y",
            "-w",
            "/tmp/new",
            "-u",
            "0:50",
        ])
        .arg(&image)
        .args([
            "--",
            "echo \"$GREETING $EXTRA from $(pwd) as $(id -u):$(id -g)\"; wc -l; exit 0",
        ])
        .stdin("one\ntwo\nthree\n")
        .output();
    assert_code(&out, 0);
    assert_eq!(out.stdout, "hi x y from /tmp/new as 0:50\n3\n");
    assert_pod_cleaned_up(&t);
}

#[test]
fn vm_whiteouts_and_opaque_directories() {
    let t = TestDir::new();
    let image = t.path().join("layered.tar");
    ImageBuilder::new()
        .busybox_layer()
        .layer(vec![
            Entry::file("data/keep", "k", 0o644),
            Entry::file("data/gone", "g", 0o644),
            Entry::file("opq/old", "o", 0o644),
        ])
        .layer(vec![
            Entry::whiteout("data/gone"),
            Entry::opaque("opq"),
            Entry::file("opq/new", "n", 0o644),
        ])
        .write_oci_archive(&image)
        .unwrap();
    let out = podvisor(&t)
        .arg("run")
        .arg(&image)
        .args([
            "--",
            "sh",
            "-c",
            "ls /data; ls /opq; test -e /data/gone || echo gone-is-absent",
        ])
        .output();
    assert_code(&out, 0);
    assert_eq!(out.stdout, "keep\nnew\ngone-is-absent\n");
    assert_eq!(t.layer_disks().len(), 3, "one disk per layer");
    assert_pod_cleaned_up(&t);
}

#[test]
fn vm_signal_death_is_reported() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    let out = podvisor(&t)
        .arg("run")
        .arg(&image)
        .args(["--", "sh", "-c", "echo before; kill -9 $$; echo after"])
        .output();
    assert_code(&out, 128 + 9);
    assert_eq!(out.stdout, "before\n");
    assert_pod_cleaned_up(&t);
}

#[test]
fn vm_missing_command_is_a_clear_error() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    let out = podvisor(&t)
        .arg("run")
        .arg(&image)
        .args(["--", "no-such-command", "arg"])
        .output();
    assert_code(&out, 127);
    assert!(
        out.stderr
            .contains("executable file not found in $PATH: no-such-command"),
        "{}",
        out.stderr
    );
    assert_pod_cleaned_up(&t);
}

#[test]
fn vm_sigterm_to_podvisor_reaches_the_container() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .env("PODVISOR_NETWORK", "none")
        .env("PODVISOR_CACHE_DIR", t.cache_dir())
        .env("PODVISOR_RUN_DIR", t.run_dir())
        .env("PODVISOR_TEMPLATE_RAM_DIR", t.template_ram_dir())
        .arg("run")
        .arg(&image)
        .args([
            "--",
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(rest, "got-term\n");
    assert_eq!(status.code(), Some(7));
    assert_pod_cleaned_up(&t);
}

#[test]
fn vm_garbage_from_the_guest_kills_only_that_vm() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    for mode in ["garbage", "oversized", "bogus"] {
        let out = podvisor(&t)
            .arg("run")
            .arg("--agent")
            .arg(hostile_agent())
            .arg(format!("--kernel-arg=podvisor.hostile={mode}"))
            .arg(&image)
            .args(["--", "true"])
            .output();
        assert_code(&out, 125);
        assert!(
            out.stderr.contains("the guest broke the agent protocol"),
            "{mode}: {}",
            out.stderr
        );
        let expected = match mode {
            "garbage" => "bad frame magic",
            "oversized" => "exceeds the limit",
            _ => "expected Ready",
        };
        assert!(out.stderr.contains(expected), "{mode}: {}", out.stderr);
        // Guest text never reaches the terminal raw.
        assert!(
            !out.stderr.contains('\x1b'),
            "{mode}: escape sequence passed through"
        );
        assert_pod_cleaned_up(&t);
    }
    // The host is fine: the real agent still runs containers.
    let out = podvisor(&t)
        .arg("run")
        .arg(&image)
        .args(["--", "echo", "ok"])
        .output();
    assert_code(&out, 0);
    assert_eq!(out.stdout, "ok\n");
}

#[test]
fn vm_boot_timeout_shows_the_console() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    // busybox as /init boots, but never speaks the agent protocol.
    let out = podvisor(&t)
        .args([
            "run",
            "--agent",
            "/bin/busybox",
            "--boot-timeout",
            "15",
            "--kernel-arg=loglevel=7",
        ])
        .arg(&image)
        .args(["--", "true"])
        .output();
    assert_code(&out, 125);
    assert!(
        out.stderr.contains("did not become ready within 15s"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("console tail:"), "{}", out.stderr);
    assert!(
        out.stderr.contains("Run /init as init process"),
        "console tail should show the kernel starting init: {}",
        out.stderr
    );
    assert_pod_cleaned_up(&t);
}

#[test]
fn bad_images_give_clear_errors_and_leave_the_cache_empty() {
    let t = TestDir::new();
    let base = || ImageBuilder::new().busybox_layer();
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        {
            let p = t.path().join("digest.tar");
            base().wrong_layer_digest(0).write_oci_archive(&p).unwrap();
            ("digest mismatch", p, "digest")
        },
        {
            let p = t.path().join("dotdot.tar");
            base()
                .layer(vec![Entry::raw_file("../../evil", b"x")])
                .write_oci_archive(&p)
                .unwrap();
            ("../ entry", p, "../../evil")
        },
        {
            let p = t.path().join("symlink.tar");
            base()
                .layer(vec![
                    Entry::raw_symlink("etc-link", "/etc"),
                    Entry::raw_file("etc-link/passwd", b"x"),
                ])
                .write_oci_archive(&p)
                .unwrap();
            ("write through absolute symlink", p, "etc-link")
        },
        {
            let dir = t.path().join("truncated");
            let built = base().write_layout(&dir).unwrap();
            let blob = blob_path(&dir, &built.layer_digests[0]);
            let len = std::fs::metadata(&blob).unwrap().len();
            truncate_file(&blob, len / 2).unwrap();
            ("truncated layer", dir, "is truncated")
        },
        {
            let p = t.path().join("cut.tar");
            base().write_oci_archive(&p).unwrap();
            let len = std::fs::metadata(&p).unwrap().len();
            truncate_file(&p, len / 3).unwrap();
            ("truncated archive", p, "cut.tar")
        },
    ];
    for (what, path, needle) in cases {
        let out = podvisor(&t)
            .arg("run")
            .arg(&path)
            .args(["--", "true"])
            .output();
        assert_code(&out, 125);
        assert!(
            out.stderr.contains(needle),
            "{what}: error should name {needle:?}: {}",
            out.stderr
        );
        assert!(
            t.layer_disks().is_empty(),
            "{what}: cache holds {:?}",
            t.layer_disks()
        );
        let hidden: Vec<_> = t
            .layers_dir_entries()
            .into_iter()
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(hidden.is_empty(), "{what}: temp dirs left: {hidden:?}");
    }
}

#[test]
fn missing_image_and_bad_flags_are_named() {
    let t = TestDir::new();
    let out = podvisor(&t).args(["run", "/no/such/image.tar"]).output();
    assert_code(&out, 125);
    assert!(out.stderr.contains("/no/such/image.tar"), "{}", out.stderr);
    let out = podvisor(&t).args(["run", "--memory", "256", "x"]).output();
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("needs a unit"), "{}", out.stderr);
}

#[test]
fn an_image_that_is_neither_path_nor_reference_says_why() {
    let t = TestDir::new();
    let out = podvisor(&t).args(["run", "Not A/Ref"]).output();
    assert_code(&out, 125);
    assert!(
        out.stderr.contains(
            "image \"Not A/Ref\" is neither an existing path nor a valid image reference: invalid image reference `Not A/Ref`"
        ),
        "{}",
        out.stderr
    );
    // A relative layout path with a :REF it does not hold.
    ImageBuilder::new()
        .busybox_layer()
        .tag("app:v1")
        .write_layout(&t.path().join("img"))
        .unwrap();
    let out = podvisor(&t).args(["run", "img:app:v2"]).output();
    assert_code(&out, 125);
    assert!(
        out.stderr.contains("no image `app:v2` in img"),
        "{}",
        out.stderr
    );
    assert!(t.layer_disks().is_empty(), "{:?}", t.layer_disks());
}

#[test]
fn vm_arguments_after_the_image_are_the_command() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    // As with `docker run`: no `--`, and options after the image (podvisor's
    // own `--cpus` included) belong to the command.
    let out = podvisor(&t)
        .args(["run", "--template", "none"])
        .arg(&image)
        .args(["echo", "-n", "hi", "--cpus", "2"])
        .output();
    assert_code(&out, 0);
    assert_eq!(out.stdout, "hi --cpus 2");
    // `--` is still accepted, and is not part of the command.
    let out = podvisor(&t)
        .args(["run", "--template", "none"])
        .arg(&image)
        .args(["--", "echo", "hi"])
        .output();
    assert_code(&out, 0);
    assert_eq!(out.stdout, "hi\n");
    assert_pod_cleaned_up(&t);
}

#[test]
fn options_of_vms_are_offered_only_where_vms_start() {
    let t = TestDir::new();
    let help = |args: &[&str]| podvisor(&t).args(args).arg("--help").success().stdout;
    let vm_flags = [
        "--kernel",
        "--agent",
        "--accel",
        "--boot-timeout",
        "--kernel-arg",
    ];
    for command in [&["get"][..], &["apply"], &["login"], &["template", "ls"]] {
        let text = help(command);
        for flag in vm_flags {
            assert!(!text.contains(flag), "{command:?} offers {flag}:\n{text}");
        }
    }
    // The kubectl-like commands touch no local cache or runtime files.
    let text = help(&["get"]);
    for flag in ["--cache-dir", "--run-dir", "--insecure-registry"] {
        assert!(!text.contains(flag), "get offers {flag}:\n{text}");
    }
    for command in [&["run"][..], &["host"], &["up"], &["template", "create"]] {
        let text = help(command);
        for flag in vm_flags.iter().chain(&["--cache-dir", "--run-dir"]) {
            assert!(text.contains(flag), "{command:?} lacks {flag}:\n{text}");
        }
    }
    // A flag given to a command that does not use it is an error, not
    // silently ignored.
    let out = podvisor(&t)
        .args(["get", "pods", "--kernel", "/k"])
        .output();
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--kernel"), "{}", out.stderr);
}

#[test]
fn template_ls_boots_nothing_and_says_nothing_about_the_accelerator() {
    let t = TestDir::new();
    // Even on a machine without KVM (as CI is), nothing is said about
    // falling back to TCG: nothing boots.
    let out = podvisor(&t)
        .env_remove("PODVISOR_ACCEL")
        .args(["template", "ls"])
        .success();
    assert_eq!(out.stderr, "");
    assert!(out.stdout.starts_with("NAME "), "{}", out.stdout);
    let out = podvisor(&t)
        .env_remove("PODVISOR_ACCEL")
        .args(["template", "rm", "no-such-template"])
        .output();
    assert!(!out.stderr.contains("TCG"), "{}", out.stderr);
    assert!(out.stderr.contains("no-such-template"), "{}", out.stderr);
}

#[test]
fn an_error_prints_each_of_its_causes_once() {
    let t = TestDir::new();
    let file = t.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    // The cache directory cannot be made under a regular file: podvisor's
    // context, then the system's reason, each once.
    let out = podvisor(&t)
        .args(["image", "ls", "--cache-dir"])
        .arg(file.join("cache"))
        .output();
    assert_code(&out, 125);
    let stderr = &out.stderr;
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert_eq!(stderr.matches("Not a directory").count(), 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// `-v NAME:/path`: a named volume outlives the run that wrote it, cold or
/// forked from a template (its disk hot-plugged into the clone); `:ro`
/// refuses writes; a host directory is refused with the reason; a volume
/// in use by another run is refused.
#[test]
fn vm_named_volumes_keep_data_between_runs() {
    let t = TestDir::new();
    let image = busybox_image(t.path());
    let volumes = t.path().join("volumes");
    let run = || {
        podvisor(&t)
            .env("PODVISOR_VOLUME_DIR", &volumes)
            .args(["run"])
    };
    let out = run()
        .args(["--template", "none", "-v", "data:/data"])
        .arg(&image)
        .args([
            "sh",
            "-c",
            "echo kept > /data/f && grep ' /data ' /proc/mounts",
        ])
        .output();
    assert_code(&out, 0);
    assert!(out.stdout.contains("ext4"), "{}", out.stdout);
    assert!(volumes.join("data.img").exists());
    // Forked from a template this time (made on demand): the volume's disk
    // is the clone's own.
    let out = run()
        .args(["--timings", "-v", "data:/data:ro"])
        .arg(&image)
        .args(["sh", "-c", "cat /data/f; echo x > /data/g && echo wrote"])
        .output();
    assert_eq!(out.stdout, "kept\n", "{}", out.stderr);
    assert!(out.stderr.contains("fork from template"), "{}", out.stderr);
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
    let out = run().args(["-v", "/etc:/host-etc"]).arg(&image).output();
    assert_code(&out, 2);
    assert!(
        out.stderr.contains("a host directory cannot be shared"),
        "{}",
        out.stderr
    );
    // Held by a run: another is refused at once.
    let file = std::fs::File::open(volumes.join("data.img")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: flock on a descriptor this test owns.
    let locked = unsafe { libc::flock(fd, libc::LOCK_EX) };
    assert_eq!(locked, 0);
    let out = run()
        .args(["-v", "data:/data"])
        .arg(&image)
        .args(["true"])
        .output();
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("in use by another podvisor run"),
        "{}",
        out.stderr
    );
    drop(file);
    assert_pod_cleaned_up(&t);
}

/// How much the guest's page cache grew (KiB) while a cold-booted pod of
/// `image` read its 16 MiB file, with `flags` given to `run`.
fn page_cache_growth(t: &TestDir, image: &Path, flags: &[&str]) -> u64 {
    let script =
        "grep ^Cached: /proc/meminfo; cat /app/big >/dev/null; grep ^Cached: /proc/meminfo";
    let out = podvisor(t)
        .args(["run"])
        .args(flags)
        .arg(image)
        .args(["sh", "-c", script])
        .output();
    assert_code(&out, 0);
    let cached: Vec<u64> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(cached.len(), 2, "{}", out.stdout);
    cached[1].saturating_sub(cached[0])
}

#[test]
fn vm_cold_pods_read_layers_through_dax_unless_isolated_or_dax_is_off() {
    let t = TestDir::new();
    let image = t.path().join("big.tar");
    ImageBuilder::new()
        .busybox_layer()
        .layer(vec![
            Entry::dir("app"),
            Entry::file(
                "app/big",
                podvisor_testbed::oci::incompressible(16 << 20, "run dax"),
                0o644,
            ),
        ])
        .write_oci_archive(&image)
        .unwrap();
    // Booted cold, the layers are on virtio-pmem: the file's pages are the
    // host's, not the guest's.
    let dax = page_cache_growth(&t, &image, &["--template", "none"]);
    assert!(dax < 4 << 10, "the page cache grew by {dax} KiB");
    // Isolated, or on a host with DAX off: virtio-blk, read into the
    // guest's own cache.
    for flags in [&["--isolated"][..], &["--template", "none", "--no-dax"]] {
        let blk = page_cache_growth(&t, &image, flags);
        assert!(
            blk >= 15 << 10,
            "{flags:?}: the page cache grew by {blk} KiB"
        );
    }
    assert_pod_cleaned_up(&t);
}
