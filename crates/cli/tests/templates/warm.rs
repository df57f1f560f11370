//! Warm templates: clones share the template's running process but have
//! their own identity and memory; a template in use cannot be removed.

use super::*;

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
        .env("PODVISOR_NETWORK", "none")
        .env("PODVISOR_CACHE_DIR", t.cache_dir())
        .env("PODVISOR_RUN_DIR", t.run_dir())
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
