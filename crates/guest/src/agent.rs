//! Finding the guest agent binary (`podvisor-agent`), which becomes `/init`
//! of the initramfs, and checking that it can run there: the guest has no
//! dynamic loader and no libc, so the agent must be a statically linked
//! x86-64 ELF executable. A plain `cargo build --release` of the workspace
//! also writes a dynamically linked `target/release/podvisor-agent`; as
//! `/init` the kernel fails to execute it ("Failed to execute /init (error
//! -2)") and panics, so such a file is skipped by the search and refused
//! when named.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::GuestError;

/// File name of the agent binary.
pub const AGENT_FILE_NAME: &str = "podvisor-agent";
/// Environment variable naming the agent binary explicitly.
pub const AGENT_ENV: &str = "PODVISOR_AGENT";
/// Where an installed podvisor keeps the agent.
pub const INSTALLED_AGENT: &str = "/usr/local/lib/podvisor/podvisor-agent";
/// Where `cargo build --release --target x86_64-unknown-linux-gnu` puts the
/// agent, relative to a Cargo target directory.
pub const AGENT_TARGET_PATH: &str = "x86_64-unknown-linux-gnu/release/podvisor-agent";

/// The command that builds the static agent, for error messages.
pub const STATIC_AGENT_BUILD: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" \
     cargo build --release -p podvisor-agent --target x86_64-unknown-linux-gnu";

/// How an ELF executable is linked, read from its program headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linkage {
    /// No `PT_INTERP`: the kernel runs it without a dynamic loader.
    Static,
    /// A `PT_INTERP` names the dynamic loader it needs.
    Dynamic {
        /// The interpreter's path, e.g. `/lib64/ld-linux-x86-64.so.2`.
        interpreter: String,
    },
}

const PT_INTERP: u32 = 3;
const EM_X86_64: u16 = 62;

/// How the x86-64 ELF executable `bytes` is linked; an error says why
/// `bytes` is not one (not ELF, not 64-bit little-endian x86-64, not an
/// executable, program headers out of bounds).
pub fn elf_linkage(bytes: &[u8]) -> Result<Linkage, String> {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(
            bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
        ))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    // EI_CLASS 2 = 64-bit, EI_DATA 1 = little-endian.
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let truncated = || "truncated ELF header".to_string();
    let kind = u16_at(0x10).ok_or_else(truncated)?;
    // ET_EXEC, or ET_DYN for position-independent (static-pie) executables.
    if kind != 2 && kind != 3 {
        return Err(format!("not an ELF executable (type {kind})"));
    }
    let machine = u16_at(0x12).ok_or_else(truncated)?;
    if machine != EM_X86_64 {
        return Err(format!("not an x86-64 executable (machine {machine})"));
    }
    let phoff = u64_at(0x20).ok_or_else(truncated)?;
    let phentsize = u16_at(0x36).ok_or_else(truncated)?;
    let phnum = u16_at(0x38).ok_or_else(truncated)?;
    if phentsize < 56 {
        return Err(format!("bad ELF program header size {phentsize}"));
    }
    let out_of_bounds = || "ELF program headers out of bounds".to_string();
    for i in 0..u64::from(phnum) {
        let at = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|at| usize::try_from(at).ok())
            .ok_or_else(out_of_bounds)?;
        let p_type = u32_at(at).ok_or_else(out_of_bounds)?;
        if p_type != PT_INTERP {
            continue;
        }
        let offset = u64_at(at.saturating_add(8)).ok_or_else(out_of_bounds)?;
        let size = u64_at(at.saturating_add(32)).ok_or_else(out_of_bounds)?;
        let interpreter = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(offset, size)| bytes.get(offset..offset.checked_add(size)?))
            .map(|name| {
                String::from_utf8_lossy(name)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .unwrap_or_else(|| "out of bounds".to_string());
        return Ok(Linkage::Dynamic { interpreter });
    }
    Ok(Linkage::Static)
}

/// Checks that `bytes`, read from `path`, can be the guest's `/init`: a
/// statically linked x86-64 executable.
pub fn check_static(path: &Path, bytes: &[u8]) -> Result<(), GuestError> {
    match elf_linkage(bytes) {
        Ok(Linkage::Static) => Ok(()),
        Ok(Linkage::Dynamic { interpreter }) => Err(GuestError::AgentNotStatic {
            path: path.to_owned(),
            interpreter,
        }),
        Err(reason) => Err(GuestError::AgentNotExecutable {
            path: path.to_owned(),
            reason,
        }),
    }
}

/// Writes an agent built into the calling program (`podvisor` embeds the
/// one it was built with) to `<cache_dir>/guest/agents/podvisor-agent-<id>`
/// unless a file of that name and length is there, and returns its path.
/// `id` names the content (the build computes it); `bytes` must be a static
/// agent.
pub fn store_embedded(cache_dir: &Path, id: &str, bytes: &[u8]) -> Result<PathBuf, GuestError> {
    let dir = cache_dir
        .join(crate::cache::GUEST_CACHE_SUBDIR)
        .join("agents");
    let path = dir.join(format!("{AGENT_FILE_NAME}-{id}"));
    check_static(&path, bytes)?;
    if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| GuestError::io("create directory", &dir, e))?;
    let mut temp = tempfile::Builder::new()
        .prefix(".agent-")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| GuestError::io("create a temporary file in", &dir, e))?;
    std::io::Write::write_all(&mut temp, bytes)
        .map_err(|e| GuestError::io("write", temp.path(), e))?;
    let file = temp.as_file();
    file.set_permissions(std::fs::Permissions::from_mode(0o755))
        .map_err(|e| GuestError::io("set permissions of", temp.path(), e))?;
    file.sync_all()
        .map_err(|e| GuestError::io("sync", temp.path(), e))?;
    temp.persist(&path)
        .map_err(|e| GuestError::io("rename into place", &path, e.error))?;
    Ok(path)
}

/// One place the agent may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPlace {
    /// The candidate path.
    pub path: PathBuf,
    /// Why this place is looked at, for the error message.
    pub origin: &'static str,
    /// Set by the user: if the agent is not there, the search stops rather
    /// than quietly taking another binary.
    pub explicit: bool,
}

/// The places [`find_agent`] looks at, in order: `$PODVISOR_AGENT`,
/// `podvisor-agent` next to the running executable,
/// `/usr/local/lib/podvisor/podvisor-agent`, this workspace's
/// `target/x86_64-unknown-linux-gnu/release/podvisor-agent` and, if
/// `$CARGO_TARGET_DIR` is set, the same path under it.
pub fn agent_places() -> Vec<AgentPlace> {
    let mut places = Vec::new();
    if let Some(path) = std::env::var_os(AGENT_ENV).filter(|v| !v.is_empty()) {
        places.push(AgentPlace {
            path: PathBuf::from(path),
            origin: "$PODVISOR_AGENT",
            explicit: true,
        });
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
    {
        places.push(AgentPlace {
            path: dir.join(AGENT_FILE_NAME),
            origin: "next to the running program",
            explicit: false,
        });
    }
    places.push(AgentPlace {
        path: PathBuf::from(INSTALLED_AGENT),
        origin: "installed",
        explicit: false,
    });
    // This crate lives in <workspace>/crates/guest.
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(workspace) = manifest_dir.ancestors().nth(2) {
        places.push(AgentPlace {
            path: workspace.join("target").join(AGENT_TARGET_PATH),
            origin: "workspace build",
            explicit: false,
        });
    }
    if let Some(target_dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        places.push(AgentPlace {
            path: PathBuf::from(target_dir).join(AGENT_TARGET_PATH),
            origin: "$CARGO_TARGET_DIR build",
            explicit: false,
        });
    }
    places
}

/// Finds the agent binary in the places of [`agent_places`].
pub fn find_agent() -> Result<PathBuf, GuestError> {
    find_agent_among(&agent_places())
}

/// The first of `places` that is a regular file holding a statically
/// linked agent; other files are skipped (a plain `cargo build` writes a
/// dynamically linked one). An explicit place that does not hold one ends
/// the search with an error; so does running out of places. The error
/// lists every place looked at and why it was passed over.
pub fn find_agent_among(places: &[AgentPlace]) -> Result<PathBuf, GuestError> {
    let mut looked = Vec::new();
    for place in places {
        let outcome = match std::fs::metadata(&place.path) {
            Ok(metadata) if metadata.is_file() => match std::fs::read(&place.path) {
                Ok(bytes) => match check_static(&place.path, &bytes) {
                    Ok(()) => return Ok(place.path.clone()),
                    Err(error) if place.explicit => return Err(error),
                    Err(GuestError::AgentNotStatic { interpreter, .. }) => {
                        format!("dynamically linked (interpreter {interpreter}), skipped")
                    }
                    Err(GuestError::AgentNotExecutable { reason, .. }) => {
                        format!("{reason}, skipped")
                    }
                    Err(error) => error.to_string(),
                },
                Err(error) => error.to_string(),
            },
            Ok(_) => "not a regular file".to_owned(),
            Err(error) => error.to_string(),
        };
        looked.push(format!(
            "{} ({}: {outcome})",
            place.path.display(),
            place.origin
        ));
        if place.explicit {
            break;
        }
    }
    Err(GuestError::AgentNotFound { looked })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal x86-64 ELF executable: the header and `phdrs`
    /// program headers (type, offset, size), then `tail`.
    fn elf(phdrs: &[(u32, u64, u64)], tail: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // 64-bit
        out[5] = 1; // little-endian
        out[6] = 1; // version
        out[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        out[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for &(p_type, offset, size) in phdrs {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&p_type.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[32..40].copy_from_slice(&size.to_le_bytes());
            out.extend(ph);
        }
        out.extend_from_slice(tail);
        out
    }

    /// A statically linked stand-in agent.
    fn static_agent() -> Vec<u8> {
        elf(&[(1, 0, 0)], b"agent")
    }

    /// A dynamically linked one, as a plain `cargo build` makes.
    fn dynamic_agent() -> Vec<u8> {
        let interp = b"/lib64/ld-linux-x86-64.so.2\0";
        let at = 64 + 2 * 56;
        elf(&[(1, 0, 0), (PT_INTERP, at, interp.len() as u64)], interp)
    }

    #[test]
    fn linkage_comes_from_the_program_headers() {
        assert_eq!(elf_linkage(&static_agent()), Ok(Linkage::Static));
        assert_eq!(
            elf_linkage(&dynamic_agent()),
            Ok(Linkage::Dynamic {
                interpreter: "/lib64/ld-linux-x86-64.so.2".into()
            })
        );
        assert!(
            elf_linkage(b"#!/bin/sh\n")
                .unwrap_err()
                .contains("not an ELF")
        );
        let mut arm = static_agent();
        arm[0x12] = 183; // EM_AARCH64
        assert!(elf_linkage(&arm).unwrap_err().contains("x86-64"));
        // Program headers that point past the end are an error, not a panic.
        let mut short = dynamic_agent();
        short.truncate(100);
        assert!(elf_linkage(&short).unwrap_err().contains("out of bounds"));
        let mut far = static_agent();
        far[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(elf_linkage(&far).is_err());
    }

    #[test]
    fn real_binaries_are_told_apart() {
        // This test binary is dynamically linked (cargo test's default);
        // the host's busybox-static is not.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(matches!(elf_linkage(&me), Ok(Linkage::Dynamic { .. })));
        if let Ok(busybox) = std::fs::read("/bin/busybox") {
            assert_eq!(elf_linkage(&busybox), Ok(Linkage::Static));
        }
    }

    #[test]
    fn a_dynamic_agent_is_skipped_and_refused_when_named() {
        let dir = tempfile::tempdir().unwrap();
        let dynamic = dir.path().join("target-release-agent");
        let static_one = dir.path().join("static-agent");
        std::fs::write(&dynamic, dynamic_agent()).unwrap();
        std::fs::write(&static_one, static_agent()).unwrap();
        let found = find_agent_among(&[
            place(dynamic.clone(), false),
            place(static_one.clone(), false),
        ]);
        assert_eq!(found.unwrap(), static_one);
        // Nothing static: the error names the skipped file, why, and the fix.
        let error = find_agent_among(&[place(dynamic.clone(), false)])
            .unwrap_err()
            .to_string();
        assert!(error.contains("target-release-agent"), "{error}");
        assert!(error.contains("dynamically linked"), "{error}");
        assert!(error.contains("crt-static"), "{error}");
        // Named explicitly: refused at once, not replaced by another one.
        let error = find_agent_among(&[place(dynamic, true), place(static_one, false)])
            .unwrap_err()
            .to_string();
        assert!(error.contains("target-release-agent"), "{error}");
        assert!(error.contains("statically linked"), "{error}");
        assert!(error.contains("crt-static"), "{error}");
    }

    #[test]
    fn an_embedded_agent_is_stored_once_and_only_if_static() {
        let cache = tempfile::tempdir().unwrap();
        let agent = static_agent();
        let path = store_embedded(cache.path(), "5-abc", &agent).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), agent);
        assert!(path.starts_with(cache.path().join("guest/agents")));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(store_embedded(cache.path(), "5-abc", &agent).unwrap(), path);
        // A truncated file (a writer that died) is replaced.
        std::fs::write(&path, b"\x7fELF").unwrap();
        store_embedded(cache.path(), "5-abc", &agent).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), agent);
        let error = store_embedded(cache.path(), "6-def", &dynamic_agent()).unwrap_err();
        assert!(
            matches!(error, GuestError::AgentNotStatic { .. }),
            "{error}"
        );
    }

    fn place(path: PathBuf, explicit: bool) -> AgentPlace {
        AgentPlace {
            path,
            origin: "test",
            explicit,
        }
    }

    #[test]
    fn takes_the_first_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let second = dir.path().join("second");
        let third = dir.path().join("third");
        std::fs::write(&second, static_agent()).unwrap();
        std::fs::write(&third, static_agent()).unwrap();
        let places = [
            place(dir.path().join("absent"), false),
            place(dir.path().to_owned(), false), // a directory
            place(second.clone(), false),
            place(third, false),
        ];
        assert_eq!(find_agent_among(&places).unwrap(), second);
    }

    #[test]
    fn error_lists_every_place() {
        let dir = tempfile::tempdir().unwrap();
        let places = [
            place(dir.path().join("one"), false),
            place(dir.path().to_owned(), false),
            place(dir.path().join("two"), false),
        ];
        let error = find_agent_among(&places).unwrap_err();
        let message = error.to_string();
        for p in &places {
            assert!(message.contains(&p.path.display().to_string()), "{message}");
        }
        assert!(message.contains("not a regular file"), "{message}");
        assert!(message.contains("PODVISOR_AGENT"), "{message}");
    }

    #[test]
    fn explicit_place_does_not_fall_through() {
        let dir = tempfile::tempdir().unwrap();
        let fallback = dir.path().join("fallback");
        std::fs::write(&fallback, static_agent()).unwrap();
        let places = [
            place(dir.path().join("typo"), true),
            place(fallback.clone(), false),
        ];
        let error = find_agent_among(&places).unwrap_err().to_string();
        assert!(
            error.contains("typo") && !error.contains("fallback"),
            "{error}"
        );
    }

    #[test]
    fn default_places_are_in_documented_order() {
        // Reads the environment but does not change it.
        let places = agent_places();
        let installed = places
            .iter()
            .position(|p| p.path == Path::new(INSTALLED_AGENT))
            .unwrap();
        let workspace = places
            .iter()
            .position(|p| p.origin == "workspace build")
            .unwrap();
        assert!(installed < workspace);
        assert!(places[workspace].path.ends_with(AGENT_TARGET_PATH));
        let workspace_dir = places[workspace].path.ancestors().nth(4).unwrap();
        assert!(
            workspace_dir.join("crates/guest/Cargo.toml").is_file(),
            "workspace path {} is wrong",
            places[workspace].path.display()
        );
        let next_to_exe = places
            .iter()
            .position(|p| p.origin == "next to the running program")
            .unwrap();
        assert!(next_to_exe < installed);
        if std::env::var_os(AGENT_ENV).is_some_and(|v| !v.is_empty()) {
            assert!(places[0].explicit);
        } else {
            assert!(places.iter().all(|p| !p.explicit));
        }
    }
}
