//! Promises the workspace manifest makes: its `rust-version` holds for
//! every locked dependency, and every crate takes the workspace lints.
//! (The code itself is held to `rust-version` by clippy's
//! `incompatible_msrv`, which `cargo clippy` runs in CI.)

use std::process::Command;

use serde_json::Value;

/// `cargo metadata` of this workspace, offline and with its Cargo.lock.
fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// "1.89" or "1.89.0" as (1, 89, 0).
fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|p| p.parse::<u64>().unwrap());
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

#[test]
fn rust_version_holds_for_every_crate_and_locked_dependency() {
    let meta = metadata();
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let resolved: Vec<&str> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    let packages = meta["packages"].as_array().unwrap();
    let ours = packages
        .iter()
        .find(|p| p["name"] == "podvisor-cli")
        .and_then(|p| p["rust_version"].as_str())
        .expect("podvisor-cli has a rust-version");
    let mut problems = Vec::new();
    for p in packages {
        let id = p["id"].as_str().unwrap();
        let name = p["name"].as_str().unwrap();
        let theirs = p["rust_version"].as_str();
        if members.contains(&id) {
            if theirs != Some(ours) {
                problems.push(format!(
                    "{name} has rust-version {theirs:?}, not the workspace's {ours}"
                ));
            }
            let manifest = std::fs::read_to_string(p["manifest_path"].as_str().unwrap()).unwrap();
            if !manifest.contains("[lints]\nworkspace = true") {
                problems.push(format!("{name} does not take the workspace lints"));
            }
        } else if resolved.contains(&id)
            && let Some(theirs) = theirs
            && version(theirs) > version(ours)
        {
            problems.push(format!(
                "{name} {} needs Rust {theirs}, newer than rust-version {ours}",
                p["version"].as_str().unwrap()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
