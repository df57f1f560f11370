//! Runtime profiles in the guest (issue 12): when a container's spec asks
//! for runtime sizing, the agent finds the language runtime its command
//! runs, in the container's mounted root (a JVM and its JDK's version, a Go
//! binary and its Go version, Node.js, CPython), computes the settings for
//! the container's share of the VM with `podvisor-runtime-profile`, puts
//! them into the main process's environment (replacing entries of the same
//! name; a setting the user gave is kept in them), and reports what it
//! chose ([`AppliedProfile`], sent as `ProfileApplied` just before
//! `Started`). Exec processes keep their own environment: only the
//! container's main process is sized.
//!
//! The root is an untrusted image: paths are resolved inside it
//! ([`resolve_in_root`]: an absolute or `..` link never leads out of it),
//! files are opened without following a last link and without blocking
//! (a FIFO planted as `release` is refused, not waited on), only regular
//! files are read, and every read is bounded. Nothing here fails a
//! start: an unreadable file is logged and left out, no runtime found
//! means no profile.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use podvisor_errors::ErrorChain;
use podvisor_proto::runtime::{
    AppliedProfile, MAX_PROFILE_LINE, MAX_PROFILE_LINES, RuntimeSizing, WHOLE_VM_PPM,
};
use podvisor_runtime_profile::{self as rp, JvmFacts, Runtime, Share};

use crate::boot::VmResources;
use crate::path_lookup::{find_executable, path_from_env, resolve_in_root};

/// Why a file of the container could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("opening {path} in the container")]
    Open {
        path: String,
        #[source]
        cause: io::Error,
    },
    #[error("{path} in the container is not a regular file")]
    NotRegular { path: String },
    #[error("reading {path} in the container")]
    Read {
        path: String,
        #[source]
        cause: io::Error,
    },
    #[error("reading the Go build information of {path}")]
    GoBuild {
        path: String,
        #[source]
        cause: rp::GoBuildError,
    },
}

/// The runtime a container's command runs, as found in its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub runtime: Runtime,
    /// Its version, where the agent read one (`17.0.15`, `go1.19.8`,
    /// `3.11`).
    pub version: Option<String>,
    /// The program, as a path inside the container with its links
    /// resolved; `None` if it is not in the root.
    pub program: Option<String>,
}

impl Detected {
    /// `JVM 17.0.15`, `Go go1.19.8`, `Node.js`.
    pub fn name(&self) -> String {
        match &self.version {
            Some(v) => format!("{} {v}", self.runtime.as_str()),
            None => self.runtime.as_str().to_string(),
        }
    }
}

/// Opens `path` (a host path already resolved inside the root) for
/// reading: never through a last link, never blocking on a FIFO or a
/// device, regular files only.
fn open_regular(host: &Path, path: &str) -> Result<File, ReadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(host)
        .map_err(|cause| ReadError::Open {
            path: path.to_string(),
            cause,
        })?;
    let meta = file.metadata().map_err(|cause| ReadError::Read {
        path: path.to_string(),
        cause,
    })?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular {
            path: path.to_string(),
        });
    }
    Ok(file)
}

/// At most `limit` bytes of the container's file `path`; `Ok(None)` if
/// there is no such file.
fn read_bounded(root: &Path, path: &str, limit: u64) -> Result<Option<Vec<u8>>, ReadError> {
    let host = resolve_in_root(root, Path::new(path)).map_err(|cause| ReadError::Open {
        path: path.to_string(),
        cause,
    })?;
    let file = match open_regular(&host, path) {
        Err(ReadError::Open { cause, .. }) if cause.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        other => other?,
    };
    let mut bytes = Vec::new();
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|cause| ReadError::Read {
            path: path.to_string(),
            cause,
        })?;
    Ok(Some(bytes))
}

/// `host` (under `root`) as a path inside the container.
fn in_container(root: &Path, host: &Path) -> Option<String> {
    let rel = host.strip_prefix(root).ok()?;
    Some(format!("/{}", rel.to_str()?))
}

/// The Java version of the JDK `java_program` (a resolved path inside the
/// container, `.../bin/java`) belongs to, from its `release` file, else
/// from `$JAVA_HOME/release`.
fn jdk_version(root: &Path, java_program: Option<&str>, env: &[String]) -> Option<String> {
    let home_of_program = java_program.and_then(|p| {
        let bin = Path::new(p).parent()?;
        let home = bin.parent()?;
        Some(home.to_str()?.to_string())
    });
    let java_home = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("JAVA_HOME="))
        .filter(|h| h.starts_with('/'))
        .map(str::to_string);
    for home in home_of_program.into_iter().chain(java_home) {
        let release = format!("{}/release", home.trim_end_matches('/'));
        match read_bounded(root, &release, rp::MAX_RELEASE_LEN) {
            Ok(Some(bytes)) => {
                if let Some(v) = rp::java_version(&String::from_utf8_lossy(&bytes)) {
                    return Some(v);
                }
            }
            Ok(None) => {}
            Err(e) => crate::log!("runtime profile: {}", ErrorChain(&e)),
        }
    }
    None
}

/// Finds the runtime the command `argv` (with environment `env`, whose
/// `PATH` is searched) runs in the container mounted at `root`; `None`
/// if it is none podvisor sizes.
pub fn detect(root: &Path, argv: &[String], env: &[String]) -> Option<Detected> {
    let word = rp::command_word(argv)?;
    let by_name = rp::detect(argv, env);
    // The program as a path inside the container (`java` through PATH),
    // then with its links resolved inside the root.
    let program = find_executable(root, path_from_env(env), word)
        .ok()
        .filter(|p| p.starts_with('/'))
        .and_then(|p| resolve_in_root(root, Path::new(&p)).ok())
        .filter(|host| host.symlink_metadata().is_ok())
        .and_then(|host| Some((in_container(root, &host)?, host)));
    let resolved = program.as_ref().map(|(p, _)| p.as_str());
    let found = |runtime, version| {
        Some(Detected {
            runtime,
            version,
            program: resolved.map(str::to_string),
        })
    };
    match by_name {
        Some(Runtime::Jvm) => found(Runtime::Jvm, jdk_version(root, resolved, env)),
        Some(Runtime::Python) => {
            let file_name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
            let version = resolved
                .map(file_name)
                .into_iter()
                .chain([file_name(word)])
                .find_map(|name| rp::python_version(&name).map(str::to_string));
            found(Runtime::Python, version)
        }
        Some(runtime) => found(runtime, None),
        None => {
            let (path, host) = program.as_ref()?;
            let mut file = match open_regular(host, path) {
                Ok(file) => file,
                Err(e) => {
                    crate::log!("runtime profile: {}", ErrorChain(&e));
                    return None;
                }
            };
            match rp::go_build_info(&mut file) {
                Ok(Some(build)) => found(Runtime::Go, build.version),
                Ok(None) => None,
                Err(cause) => {
                    let e = ReadError::GoBuild {
                        path: path.clone(),
                        cause,
                    };
                    crate::log!("runtime profile: {}", ErrorChain(&e));
                    None
                }
            }
        }
    }
}

/// The container's share of the VM: `memory_share_ppm` of what the VM
/// left to containers at boot (never more than all of it), and its CPUs,
/// never more than are online.
pub fn share(sizing: &RuntimeSizing, vm: &VmResources) -> Share {
    let ppm = u128::from(sizing.memory_share_ppm.min(WHOLE_VM_PPM));
    let memory = u128::from(vm.mem_available) * ppm / u128::from(WHOLE_VM_PPM);
    let online = vm.cpus_online.max(1);
    Share {
        memory_bytes: memory as u64,
        cpus: sizing.cpus.unwrap_or(online).clamp(1, online),
    }
}

/// `text` cut to [`MAX_PROFILE_LINE`] bytes at a character boundary,
/// marked with `...` when cut.
fn bounded_line(text: &str) -> String {
    if text.len() <= MAX_PROFILE_LINE {
        return text.to_string();
    }
    let mut end = MAX_PROFILE_LINE - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Sizes the runtime of a container about to start: detects it in the
/// mounted `root` from the command `argv` and its environment `env`,
/// computes the settings for its share of `vm` and replaces the same-named
/// entries of `env` with them. Returns what to report, or `None` when no
/// runtime was found (nothing changed). A share too small for the
/// runtime leaves `env` alone and says why.
pub fn apply(
    sizing: &RuntimeSizing,
    vm: &VmResources,
    root: &Path,
    argv: &[String],
    env: &mut Vec<String>,
) -> Option<AppliedProfile> {
    let detected = detect(root, argv, env)?;
    let share = share(sizing, vm);
    let facts = JvmFacts {
        loaded_classes: sizing.loaded_classes,
        peak_threads: sizing.peak_threads,
    };
    let mut reasons = vec![match &detected.program {
        Some(p) => format!("{} found: {p}", detected.name()),
        None => format!("{} found from the command", detected.name()),
    }];
    let mut set = Vec::new();
    match rp::profile(detected.runtime, share, env, facts) {
        Ok(mut profile) => {
            if let Some(archive) = &sizing.jvm_archive {
                let present = archive.starts_with('/')
                    && resolve_in_root(root, Path::new(archive))
                        .and_then(|p| p.symlink_metadata())
                        .is_ok_and(|m| m.is_file());
                rp::use_class_data_archive(&mut profile, env, archive, present);
            }
            for (key, value) in profile.env {
                let prefix = format!("{key}=");
                env.retain(|e| !e.starts_with(&prefix));
                env.push(format!("{prefix}{value}"));
                set.push((key, value));
            }
            reasons.extend(profile.reasons);
        }
        Err(e) => {
            reasons.push(format!(
                "share of the pod VM: {} MiB, {} CPU(s)",
                share.memory_bytes >> 20,
                share.cpus
            ));
            reasons.push(format!("{e}: started without settings"));
        }
    }
    reasons.truncate(MAX_PROFILE_LINES);
    set.truncate(MAX_PROFILE_LINES);
    Some(AppliedProfile {
        runtime: bounded_line(&detected.name()),
        env: set
            .into_iter()
            .map(|(k, v)| (bounded_line(&k), bounded_line(&v)))
            .collect(),
        reasons: reasons.iter().map(|r| bounded_line(r)).collect(),
    })
}

#[cfg(test)]
#[path = "runtime_profiles_tests.rs"]
mod tests;
