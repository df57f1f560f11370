//! Finding the guest agent binary (`podvisor-agent`), which becomes `/init`
//! of the initramfs.

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

/// The first of `places` that is a regular file. An explicit place that is
/// not one ends the search with an error; so does running out of places. The
/// error lists every place looked at.
pub fn find_agent_among(places: &[AgentPlace]) -> Result<PathBuf, GuestError> {
    let mut looked = Vec::new();
    for place in places {
        let outcome = match std::fs::metadata(&place.path) {
            Ok(metadata) if metadata.is_file() => return Ok(place.path.clone()),
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
        std::fs::write(&second, b"agent").unwrap();
        std::fs::write(&third, b"agent").unwrap();
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
        std::fs::write(&fallback, b"agent").unwrap();
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
