//! `podvisor image ...`, `podvisor login` and `podvisor run REF` against a
//! real registry (Debian's docker-registry on 127.0.0.1), real etcd for the
//! multi-host case, and real QEMU VMs for the `vm_*` tests. What was fetched
//! is counted in the registry's access log.

mod concurrency;
mod errors;
mod vm;

use std::path::Path;
use std::time::Duration;

use podvisor_testbed::cli::{CmdOutput, PodvisorCommand, TestDir};
use podvisor_testbed::oci::{BuiltImage, Entry, ImageBuilder};
use podvisor_testbed::registry::Registry;

/// `podvisor` with this test's cache, run dir and an empty docker config.
pub fn podvisor(t: &TestDir) -> PodvisorCommand {
    t.podvisor(env!("CARGO_BIN_EXE_podvisor"))
        .env("DOCKER_CONFIG", t.path().join("docker"))
        .env("PODVISOR_CONFIG", t.path().join("no-config.toml"))
        .timeout(Duration::from_secs(240))
}

/// `podvisor` like [`podvisor`] but with the cache directory `cache`.
pub fn podvisor_at(t: &TestDir, cache: &Path) -> PodvisorCommand {
    PodvisorCommand::bare(env!("CARGO_BIN_EXE_podvisor"))
        .env("PODVISOR_CACHE_DIR", cache)
        .env("PODVISOR_RUN_DIR", t.run_dir())
        .env("DOCKER_CONFIG", t.path().join("docker"))
        .env("PODVISOR_CONFIG", t.path().join("no-config.toml"))
        .env("PODVISOR_TEMPLATE_RAM_DIR", t.template_ram_dir())
        .timeout(Duration::from_secs(240))
}

/// Runs with an empty `PODVISOR_CONFIG` file (so none is read).
pub fn no_config(t: &TestDir) {
    std::fs::write(t.path().join("no-config.toml"), "").unwrap();
}

pub fn assert_code(out: &CmdOutput, code: i32) {
    assert_eq!(
        out.code,
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
}

/// busybox plus a layer with `/app/marker`, running `cat /app/marker`.
pub fn app_image(marker: &str) -> ImageBuilder {
    ImageBuilder::new()
        .busybox_layer()
        .layer(vec![Entry::file(
            "app/marker",
            format!("{marker}\n"),
            0o644,
        )])
        .cmd(&["cat", "/app/marker"])
}

/// Everything under the cache's `layers-v2/` that is not a complete disk.
pub fn leftovers(t: &TestDir) -> Vec<String> {
    let mut out: Vec<String> = t
        .layers_dir_entries()
        .into_iter()
        .filter(|n| n.starts_with('.') && n != ".staging")
        .collect();
    out.extend(
        std::fs::read_dir(t.cache_dir().join("layers-v2/.staging"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| format!(".staging/{}", e.file_name().to_string_lossy()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    out
}

fn chain_hex(built: &BuiltImage, i: usize) -> String {
    built.chain_ids[i]
        .strip_prefix("sha256:")
        .unwrap()
        .to_string()
}

#[test]
fn pull_ls_inspect_rm_gc() {
    let t = TestDir::new();
    no_config(&t);
    let registry = Registry::start();
    let built = app_image("v1").build().unwrap();
    registry.push(&built, "team/app", "v1");
    let reference = registry.reference("team/app", "v1");

    let out = podvisor(&t).args(["image", "pull", &reference]).success();
    assert!(
        out.stdout.contains(&built.manifest_digest),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("2 layers"), "{}", out.stdout);
    // Not a terminal: plain progress lines naming each layer.
    for digest in &built.layer_digests {
        let short = &digest[..19];
        assert!(
            out.stderr.contains(&format!("{short}: fetching")),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains(&format!("{short}: done")),
            "{}",
            out.stderr
        );
    }
    let mut disks = t.layer_disks();
    disks.sort();
    let mut want = vec![chain_hex(&built, 0), chain_hex(&built, 1)];
    want.sort();
    assert_eq!(disks, want);
    assert!(leftovers(&t).is_empty(), "{:?}", leftovers(&t));

    // Again: nothing fetched, both layers reported cached.
    let out = podvisor(&t).args(["image", "pull", &reference]).success();
    assert_eq!(
        out.stderr.matches("already cached").count(),
        2,
        "{}",
        out.stderr
    );
    for digest in &built.layer_digests {
        assert_eq!(registry.blob_gets(digest), 1);
    }

    let out = podvisor(&t).args(["image", "ls"]).success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("REFERENCE"), "{}", out.stdout);
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert!(lines[1].starts_with(&reference), "{}", out.stdout);
    assert!(
        lines[1].contains(&built.manifest_digest[..19]) && lines[1].contains("linux/amd64"),
        "{}",
        out.stdout
    );

    let out = podvisor(&t)
        .args(["image", "inspect", &reference])
        .success();
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["manifest_digest"], built.manifest_digest);
    assert_eq!(
        doc["config"]["cmd"],
        serde_json::json!(["cat", "/app/marker"])
    );
    assert_eq!(doc["layers"][1]["chain_id"], built.chain_ids[1]);
    assert_eq!(doc["layers"][1]["parent"], built.chain_ids[0]);
    assert_eq!(doc["layers"][1]["references"], 1);
    assert!(Path::new(doc["layers"][0]["disk"].as_str().unwrap()).is_file());
    // By digest too.
    podvisor(&t)
        .args(["image", "inspect", &built.manifest_digest])
        .success();

    let out = podvisor(&t).args(["image", "gc"]).success();
    assert!(out.stdout.contains("freed 0 bytes"), "{}", out.stdout);
    let out = podvisor(&t).args(["image", "rm", &reference]).success();
    assert!(
        out.stdout.contains(&format!("untagged {reference}")),
        "{}",
        out.stdout
    );
    assert_eq!(
        out.stdout.matches("deleted layer disk").count(),
        2,
        "{}",
        out.stdout
    );
    let freed: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("freed "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("freed N bytes");
    assert!(freed > 0, "{}", out.stdout);
    assert!(t.layer_disks().is_empty());
    let out = podvisor(&t).args(["image", "ls"]).success();
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    let out = podvisor(&t).args(["image", "rm", &reference]).output();
    assert_code(&out, 125);
    assert!(
        out.stderr.contains("no image") && out.stderr.contains("team/app:v1"),
        "{}",
        out.stderr
    );
}

#[test]
fn import_archive_into_the_catalog() {
    let t = TestDir::new();
    no_config(&t);
    let archive = t.path().join("app.tar");
    let built = app_image("imported")
        .tag("myapp:1.0")
        .write_oci_archive(&archive)
        .unwrap();
    let out = podvisor(&t)
        .arg("image")
        .arg("import")
        .arg(&archive)
        .success();
    assert!(
        out.stdout.contains("docker.io/library/myapp:1.0"),
        "{}",
        out.stdout
    );
    let out = podvisor(&t).args(["image", "ls"]).success();
    assert!(
        out.stdout.contains("docker.io/library/myapp:1.0"),
        "{}",
        out.stdout
    );
    let out = podvisor(&t)
        .args(["image", "inspect", "myapp:1.0"])
        .success();
    assert!(out.stdout.contains(&built.manifest_digest));
}

#[test]
fn login_with_basic_and_bearer_token_auth() {
    let t = TestDir::new();
    no_config(&t);
    let registry = Registry::start_with_auth("alice", "wonderland");
    let built = app_image("private").build().unwrap();
    registry.push(&built, "private/app", "v1");
    let reference = registry.reference("private/app", "v1");

    let out = podvisor(&t).args(["image", "pull", &reference]).output();
    assert_code(&out, 125);
    assert!(out.stderr.contains("unauthorized"), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("podvisor login {}", registry.addr())),
        "{}",
        out.stderr
    );

    let out = podvisor(&t)
        .args(["login", registry.addr(), "-u", "alice", "--password-stdin"])
        .stdin("wrong\n")
        .output();
    assert_code(&out, 125);
    assert!(out.stderr.contains("rejected"), "{}", out.stderr);
    let config = t.path().join("docker/config.json");
    assert!(!config.exists(), "a failed login saves nothing");

    let out = podvisor(&t)
        .args(["login", registry.addr(), "-u", "alice", "--password-stdin"])
        .stdin("wonderland\n")
        .success();
    assert!(out.stdout.contains("Login succeeded"), "{}", out.stdout);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    assert!(
        saved["auths"][registry.addr()]["auth"].is_string(),
        "{saved}"
    );

    let out = podvisor(&t).args(["image", "pull", &reference]).success();
    assert!(
        out.stdout.contains(&built.manifest_digest),
        "{}",
        out.stdout
    );

    // A registry with bearer tokens from a token service.
    let registry = Registry::start_with_token_auth("bob", "builder");
    registry.push(&built, "private/app", "v1");
    let reference = registry.reference("private/app", "v1");
    let out = podvisor(&t).args(["image", "pull", &reference]).output();
    assert_code(&out, 125);
    assert!(out.stderr.contains("unauthorized"), "{}", out.stderr);
    let login = |password: &str| {
        podvisor(&t)
            .args(["login", registry.addr(), "-u", "bob", "--password-stdin"])
            .stdin(format!("{password}\n"))
            .output()
    };
    let out = login("wrong");
    assert_code(&out, 125);
    assert!(
        out.stderr.contains("rejected the user name or password"),
        "{}",
        out.stderr
    );
    assert_code(&login("builder"), 0);
    let out = podvisor(&t).args(["image", "pull", &reference]).success();
    assert!(
        out.stdout.contains(&built.manifest_digest),
        "{}",
        out.stdout
    );
}

#[test]
fn index_platforms_from_the_command_line() {
    let t = TestDir::new();
    no_config(&t);
    let registry = Registry::start();
    let amd64 = app_image("amd64").build().unwrap();
    let arm64 = ImageBuilder::new()
        .layer(vec![Entry::file("app/marker", "arm64\n", 0o644)])
        .architecture("arm64")
        .build()
        .unwrap();
    registry.push_index(
        &[(&arm64, "linux/arm64/v8"), (&amd64, "linux/amd64")],
        "multi",
        "1",
    );
    let reference = registry.reference("multi", "1");
    let out = podvisor(&t).args(["image", "pull", &reference]).success();
    assert!(
        out.stdout.contains(&amd64.manifest_digest),
        "{}",
        out.stdout
    );
    let out = podvisor(&t)
        .args(["image", "pull", "--platform", "linux/arm64", &reference])
        .success();
    assert!(
        out.stdout.contains(&arm64.manifest_digest),
        "{}",
        out.stdout
    );
    let out = podvisor(&t)
        .args(["image", "pull", "--platform", "linux/riscv64", &reference])
        .output();
    assert_code(&out, 125);
    assert!(
        out.stderr.contains("no image for linux/riscv64"),
        "{}",
        out.stderr
    );
    let out = podvisor(&t)
        .args(["image", "pull", "--platform", "linux", &reference])
        .output();
    assert_code(&out, 2);
    assert!(out.stderr.contains("invalid platform"), "{}", out.stderr);
}

#[test]
fn config_file_settings_and_precedence() {
    let t = TestDir::new();
    let registry = Registry::start();
    let built = app_image("cfg").build().unwrap();
    registry.push(&built, "app", "v1");
    let from_file = t.path().join("cache-from-file");
    let config = t.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "cache_dir = \"{}\"\ncatalog = \"sqlite:{}\"\n[registry]\ninsecure = [\"{}\"]\n",
            from_file.display(),
            t.path().join("file-catalog.db").display(),
            registry.addr()
        ),
    )
    .unwrap();
    // TestDir passes --cache-dir; a bare command reads the file instead.
    let bare = || {
        PodvisorCommand::bare(env!("CARGO_BIN_EXE_podvisor"))
            .env("PODVISOR_CONFIG", &config)
            .env("DOCKER_CONFIG", t.path().join("docker"))
    };
    bare()
        .args(["image", "pull", &registry.reference("app", "v1")])
        .success();
    assert!(
        from_file
            .join("layers-v2")
            .join(chain_hex(&built, 1))
            .is_dir()
    );
    assert!(t.path().join("file-catalog.db").exists());
    // The flag wins over the file.
    podvisor(&t)
        .env("PODVISOR_CONFIG", &config)
        .args(["image", "pull", &registry.reference("app", "v1")])
        .success();
    assert_eq!(t.layer_disks().len(), 2);
    // A typo in the file is an error naming it.
    std::fs::write(&config, "cache_dri = \"/x\"\n").unwrap();
    let out = bare().args(["image", "ls"]).output();
    assert_code(&out, 125);
    assert!(
        out.stderr.contains("cache_dri") && out.stderr.contains("config.toml"),
        "{}",
        out.stderr
    );
}
