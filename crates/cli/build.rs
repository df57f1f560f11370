//! Builds the statically linked guest agent and embeds it in `podvisor`, so
//! that a plain `cargo build --release` (or `cargo install --path
//! crates/cli`) gives a podvisor that runs pods. The workspace build itself
//! links `target/release/podvisor-agent` dynamically, which the guest cannot
//! execute; this script runs a nested
//! `cargo build --release -p podvisor-agent --target x86_64-unknown-linux-gnu`
//! with `-C target-feature=+crt-static` into a target directory of its own
//! (`<target>/podvisor-static-agent`, so it never waits for the lock of the
//! build that runs it), offline and with the workspace's `Cargo.lock`.
//!
//! Skipped (podvisor then searches for an agent, see `podvisor_guest::agent`)
//! under `cargo clippy` (only lints are wanted), with
//! `PODVISOR_EMBED_AGENT=0`, and when the nested build fails (a warning says
//! why). It reruns only when the agent's or the protocol's sources change.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The agent's target: the guest is x86-64 Linux.
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .ancestors()
        .nth(2)
        .expect("crates/cli is two levels below the workspace")
        .to_path_buf();
    for input in ["crates/agent", "crates/proto", "Cargo.lock", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
    println!("cargo:rerun-if-env-changed=PODVISOR_EMBED_AGENT");
    // check/clippy and build share this script's run: rerun when switching.
    println!("cargo:rerun-if-env-changed=RUSTC_WORKSPACE_WRAPPER");

    let embedded = out_dir.join("podvisor-agent");
    let agent = match skip_reason(&workspace) {
        Some(reason) => {
            if reason != "cargo clippy" {
                println!(
                    "cargo:warning=no guest agent embedded in podvisor ({reason}); it will look \
                     for a static one (PODVISOR_AGENT, next to podvisor, /usr/local/lib/podvisor)"
                );
            }
            Vec::new()
        }
        None => match build_static_agent(&workspace, &out_dir) {
            Ok(agent) => agent,
            Err(reason) => {
                for line in reason.lines() {
                    println!("cargo:warning={line}");
                }
                println!(
                    "cargo:warning=no guest agent embedded in podvisor; it will look for a \
                     static one (PODVISOR_AGENT, next to podvisor, /usr/local/lib/podvisor)"
                );
                Vec::new()
            }
        },
    };
    // An identity for the file podvisor writes the agent to: its length and
    // FNV-1a hash (the content is checked again when it is used).
    let fnv = agent.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    println!(
        "cargo:rustc-env=PODVISOR_EMBEDDED_AGENT_ID={}-{fnv:016x}",
        agent.len()
    );
    std::fs::write(&embedded, &agent)
        .unwrap_or_else(|e| panic!("write {}: {e}", embedded.display()));
}

/// Why the agent is not built here, if it is not.
fn skip_reason(workspace: &Path) -> Option<String> {
    if std::env::var_os("PODVISOR_EMBED_AGENT").is_some_and(|v| v == "0") {
        return Some("PODVISOR_EMBED_AGENT=0".into());
    }
    let wrapper = std::env::var("RUSTC_WORKSPACE_WRAPPER").unwrap_or_default();
    if wrapper.contains("clippy-driver") {
        return Some("cargo clippy".into());
    }
    if !workspace.join("crates/agent/Cargo.toml").is_file() {
        return Some("the agent's sources are not next to this crate".into());
    }
    let host = std::env::var("HOST").unwrap_or_default();
    if !host.starts_with("x86_64-") || !host.contains("-linux-") {
        return Some(format!("the host {host} cannot build for {AGENT_TARGET}"));
    }
    None
}

/// Runs the nested cargo build and returns the agent's bytes.
fn build_static_agent(workspace: &Path, out_dir: &Path) -> Result<Vec<u8>, String> {
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out: share
    // one agent build between the profiles of one target directory.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|dir| dir.join("podvisor-static-agent"))
        .unwrap_or_else(|| out_dir.join("podvisor-static-agent"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--release", "--locked", "--offline"])
        .args(["-p", "podvisor-agent", "--target", AGENT_TARGET])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // What cargo set for this script describes the outer build, not this
    // one: keep only where cargo lives, how it reaches the network and the
    // jobserver (so the nested build shares the outer -j).
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let keep = ["CARGO_HOME", "CARGO_MAKEFLAGS"].contains(&key.as_ref())
            || key.starts_with("CARGO_NET_")
            || key.starts_with("CARGO_HTTP_");
        if key.starts_with("CARGO_") && !keep {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTDOCFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run cargo to build the static guest agent: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "building the static guest agent failed ({}):\n{}",
            output.status,
            tail.join("\n")
        ));
    }
    let built = target_dir
        .join(AGENT_TARGET)
        .join("release")
        .join("podvisor-agent");
    std::fs::read(&built).map_err(|e| format!("read {}: {e}", built.display()))
}
