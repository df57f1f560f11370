//! What a container runs: the image's runtime config merged with the user's
//! overrides, as `docker run` merges them; and its image's layers as the
//! pod VM's disks.

use podvisor_image::{LayerAttachments, RuntimeConfig};
use podvisor_proto::{ProcessSpec, TerminalSize};
use podvisor_vmm::BlockDevice;

/// The user's overrides of the image config (`podvisor run` flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerOverrides {
    /// Replaces the image's `Entrypoint` (`--entrypoint`); `Some(vec![])`
    /// clears it.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's `Cmd` (the arguments after the image).
    pub cmd: Option<Vec<String>>,
    /// `KEY=VALUE` entries added to or replacing the image's `Env`.
    pub env: Vec<String>,
    /// Replaces `WorkingDir`.
    pub workdir: Option<String>,
    /// Replaces `User`.
    pub user: Option<String>,
    /// Allocate a terminal of this size.
    pub terminal: Option<TerminalSize>,
    /// Keep stdin open.
    pub stdin: bool,
}

/// Why a process spec could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContainerSpecError {
    #[error("no command: the image has no Entrypoint or Cmd; give one after the image name")]
    NoCommand,
    #[error("invalid environment entry {0:?}: expected KEY=VALUE with a non-empty KEY")]
    BadEnv(String),
    #[error("working directory {0:?} must be an absolute path")]
    RelativeWorkdir(String),
}

/// Merges image config and overrides into the process to start.
///
/// The command is `Entrypoint + Cmd`; an override of the entrypoint drops
/// the image's `Cmd` unless a command is also given (as docker does).
pub fn process_spec(
    image: &RuntimeConfig,
    o: &ContainerOverrides,
) -> Result<ProcessSpec, ContainerSpecError> {
    let entrypoint = o
        .entrypoint
        .clone()
        .unwrap_or_else(|| image.entrypoint.clone());
    let cmd = match (&o.cmd, &o.entrypoint) {
        (Some(cmd), _) => cmd.clone(),
        (None, Some(_)) => vec![],
        (None, None) => image.cmd.clone(),
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(ContainerSpecError::NoCommand);
    }

    let mut env: Vec<String> = Vec::new();
    for entry in image.env.iter().chain(&o.env) {
        let key = match entry.split_once('=') {
            Some((k, _)) if !k.is_empty() => k,
            _ => return Err(ContainerSpecError::BadEnv(entry.clone())),
        };
        env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(key));
        env.push(entry.clone());
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    if o.terminal.is_some() && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }

    let cwd = o
        .workdir
        .clone()
        .or_else(|| Some(image.working_dir.clone()).filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(ContainerSpecError::RelativeWorkdir(cwd));
    }
    Ok(ProcessSpec {
        args,
        env,
        cwd,
        user: o.user.clone().unwrap_or_else(|| image.user.clone()),
        terminal: o.terminal,
        stdin: o.stdin,
    })
}

/// A VM's layer disks (each under the serial its containers list) as
/// read-only VM disks, in attachment order; the `i`-th has the device id
/// `layer<i>`.
pub fn layer_disks(layers: &LayerAttachments) -> Vec<BlockDevice> {
    layers
        .disks()
        .iter()
        .enumerate()
        .map(|(i, d)| BlockDevice {
            id: format!("layer{i}"),
            path: d.path.clone(),
            read_only: true,
            serial: d.serial.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> RuntimeConfig {
        RuntimeConfig {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/bin".into(), "MODE=prod".into()],
            working_dir: "/srv".into(),
            user: "app".into(),
        }
    }

    #[test]
    fn image_config_is_used_as_is() {
        let p = process_spec(&image(), &ContainerOverrides::default()).unwrap();
        assert_eq!(p.args, ["/bin/app", "--serve"]);
        assert_eq!(p.env, ["PATH=/bin", "MODE=prod"]);
        assert_eq!(p.cwd, "/srv");
        assert_eq!(p.user, "app");
    }

    #[test]
    fn overrides_replace_cmd_env_workdir_user() {
        let o = ContainerOverrides {
            cmd: Some(vec!["--debug".into()]),
            env: vec!["MODE=dev".into(), "X=1".into()],
            workdir: Some("/tmp".into()),
            user: Some("0:0".into()),
            ..Default::default()
        };
        let p = process_spec(&image(), &o).unwrap();
        assert_eq!(p.args, ["/bin/app", "--debug"]);
        assert_eq!(p.env, ["PATH=/bin", "MODE=dev", "X=1"]);
        assert_eq!(p.cwd, "/tmp");
        assert_eq!(p.user, "0:0");
    }

    #[test]
    fn entrypoint_override_drops_image_cmd() {
        let o = ContainerOverrides {
            entrypoint: Some(vec!["sh".into()]),
            ..Default::default()
        };
        assert_eq!(process_spec(&image(), &o).unwrap().args, ["sh"]);
    }

    #[test]
    fn bad_input_is_named() {
        let empty = RuntimeConfig::default();
        assert_eq!(
            process_spec(&empty, &ContainerOverrides::default()),
            Err(ContainerSpecError::NoCommand)
        );
        let o = ContainerOverrides {
            cmd: Some(vec!["x".into()]),
            env: vec!["=oops".into()],
            ..Default::default()
        };
        assert_eq!(
            process_spec(&empty, &o),
            Err(ContainerSpecError::BadEnv("=oops".into()))
        );
        let o = ContainerOverrides {
            cmd: Some(vec!["x".into()]),
            workdir: Some("rel".into()),
            ..Default::default()
        };
        assert!(matches!(
            process_spec(&empty, &o),
            Err(ContainerSpecError::RelativeWorkdir(_))
        ));
    }

    #[test]
    fn default_path_and_term() {
        let o = ContainerOverrides {
            cmd: Some(vec!["sh".into()]),
            terminal: Some(TerminalSize { rows: 1, cols: 1 }),
            ..Default::default()
        };
        let p = process_spec(&RuntimeConfig::default(), &o).unwrap();
        assert!(p.env[0].starts_with("PATH=/usr/local/sbin"));
        assert!(p.env.contains(&"TERM=xterm".to_string()));
        assert_eq!(p.cwd, "/");
    }
}
