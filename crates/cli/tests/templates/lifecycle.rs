//! A template's inputs and files: changed inputs make it stale (rebuilt,
//! never used); a damaged state makes the pod boot cold.

use super::*;

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
            .env("PODVISOR_AGENT", &agent)
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
