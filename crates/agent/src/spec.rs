//! Checks and defaults applied to a [`ContainerSpec`] before anything is
//! mounted: names that become paths, the environment (`PATH`, `HOME`,
//! `TERM` filled in as docker does) and the working directory.

use std::path::{Component, Path, PathBuf};

use podvisor_proto::{ContainerSpec, StartError, StartErrorKind};

use crate::mount_spec::{self, ContainerMounts};
use crate::path_lookup::{DEFAULT_PATH, is_safe_name};

fn invalid(message: String) -> StartError {
    StartError {
        kind: StartErrorKind::InvalidSpec,
        message,
    }
}

/// Rejects specs the agent cannot act on: an unsafe id (it becomes a
/// path), mounts [`mount_spec::check_container`] refuses, no command.
/// Returns the checked mounts.
pub fn validate(spec: &ContainerSpec) -> Result<ContainerMounts<'_>, StartError> {
    if !is_safe_name(&spec.id) {
        return Err(invalid(format!("invalid container id {:?}", spec.id)));
    }
    let mounts = mount_spec::check_container(&spec.mounts)?;
    if spec.process.args.first().is_none_or(|a| a.is_empty()) {
        return Err(invalid("no command given (empty args)".into()));
    }
    if spec.hostname.len() > 64 {
        return Err(invalid(format!(
            "hostname {:?} is longer than 64 bytes",
            spec.hostname
        )));
    }
    Ok(mounts)
}

/// The process environment: the spec's, plus `PATH` (docker's default),
/// `HOME` (from passwd) and, with a terminal, `TERM=xterm` when missing.
pub fn container_env(env: &[String], home: &str, terminal: bool) -> Vec<String> {
    let has = |key: &str| {
        env.iter()
            .any(|kv| kv.split_once('=').is_some_and(|(k, _)| k == key))
    };
    let mut out = env.to_vec();
    if !has("PATH") {
        out.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has("HOME") {
        out.push(format!("HOME={home}"));
    }
    if terminal && !has("TERM") {
        out.push("TERM=xterm".into());
    }
    out
}

/// The working directory: `/` when empty; must be absolute; `..` and `.`
/// are resolved lexically.
pub fn cwd(cwd: &str) -> Result<PathBuf, StartError> {
    if cwd.is_empty() {
        return Ok(PathBuf::from("/"));
    }
    if !cwd.starts_with('/') {
        return Err(invalid(format!(
            "working directory {cwd:?} is not absolute"
        )));
    }
    let mut out = PathBuf::from("/");
    for c in Path::new(cwd).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The directories from the top down to `dir` (without `/`), to create.
pub fn ancestors(dir: &Path) -> Vec<PathBuf> {
    let mut list: Vec<PathBuf> = dir
        .ancestors()
        .filter(|a| *a != Path::new("/") && !a.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .collect();
    list.reverse();
    list
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_proto::ProcessSpec;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            id: "c1".into(),
            hostname: "h".into(),
            mounts: podvisor_proto::image_mounts(&["pvl0".into()]),
            process: ProcessSpec {
                args: vec!["sh".into()],
                env: vec![],
                cwd: "/".into(),
                user: String::new(),
                terminal: None,
                stdin: false,
            },
            runtime: None,
        }
    }

    #[test]
    fn validation() {
        assert!(validate(&spec()).is_ok());
        let mut s = spec();
        s.mounts.clear();
        assert_eq!(validate(&s).unwrap_err().kind, StartErrorKind::InvalidSpec);
        let mut s = spec();
        s.id = "../x".into();
        assert!(validate(&s).is_err());
        let mut s = spec();
        s.mounts
            .insert(0, podvisor_proto::Mount::layer("pvl1,upperdir=/"));
        assert!(validate(&s).is_err());
        let mut s = spec();
        s.process.args.clear();
        assert!(validate(&s).unwrap_err().message.contains("no command"));
    }

    #[test]
    fn env_defaults_fill_only_what_is_missing() {
        let env = container_env(&["A=1".into(), "HOME=/x".into()], "/root", true);
        assert_eq!(
            env,
            [
                "A=1",
                "HOME=/x",
                &format!("PATH={DEFAULT_PATH}"),
                "TERM=xterm"
            ]
        );
        let env = container_env(&["PATH=/bin".into()], "/home/app", false);
        assert_eq!(env, ["PATH=/bin", "HOME=/home/app"]);
    }

    #[test]
    fn working_directory() {
        assert_eq!(cwd("").unwrap(), Path::new("/"));
        assert_eq!(cwd("/srv/./app/../web/").unwrap(), Path::new("/srv/web"));
        assert_eq!(cwd("/../..").unwrap(), Path::new("/"));
        assert!(cwd("srv").is_err());
        assert_eq!(
            ancestors(Path::new("/srv/web")),
            [Path::new("/srv"), Path::new("/srv/web")]
        );
        assert!(ancestors(Path::new("/")).is_empty());
    }
}
