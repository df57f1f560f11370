//! What a container runs: the image's runtime config merged with the user's
//! overrides, as `docker run` merges them; and its image's layers as the
//! pod VM's devices (virtio-blk disks, or virtio-pmem devices mounted with
//! DAX, [`LayerBus`]) and the container's mounts of them.

use podvisor_image::{LayerAttachments, RuntimeConfig};
use podvisor_proto::{Mount, ProcessSpec, TerminalSize};
use podvisor_vmm::{BlockDevice, Device, PmemDevice};
use serde::{Deserialize, Serialize};

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

/// How a pod VM attaches its image layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerBus {
    /// virtio-pmem devices mapping the shared, read-only host files,
    /// mounted with EROFS `dax=always`: the guest reads a layer's files
    /// straight from the host's page cache, which every pod VM using the
    /// layer shares, instead of caching a copy in its own memory.
    Pmem,
    /// virtio-blk disks: each VM caches what it reads in its own memory.
    /// Shares no page with other pods (shared pages are a side channel),
    /// so it is what a pod that asks for isolation gets.
    Block,
}

impl LayerBus {
    /// The bus of a pod: virtio-blk when it asks for isolation or the
    /// host turned DAX off, else virtio-pmem.
    pub fn for_pod(host_dax: bool, isolated: bool) -> LayerBus {
        if host_dax && !isolated {
            LayerBus::Pmem
        } else {
            LayerBus::Block
        }
    }
}

/// A VM's layers as devices on `bus`, in attachment order: [`layer_disks`]
/// or [`layer_pmems`].
pub fn layer_devices(layers: &LayerAttachments, bus: LayerBus) -> Vec<Device> {
    match bus {
        LayerBus::Block => layer_disks(layers).into_iter().map(Device::Block).collect(),
        LayerBus::Pmem => layer_pmems(layers).into_iter().map(Device::Pmem).collect(),
    }
}

/// The mounts of a container whose image's layers are `serials` (bottom
/// first, as [`LayerAttachments::add`] named them) when the VM has them
/// on `bus`: the layers, then the overlay root over them.
pub fn layer_mounts(layers: &LayerAttachments, serials: &[String], bus: LayerBus) -> Vec<Mount> {
    match bus {
        LayerBus::Block => podvisor_proto::image_mounts(serials),
        LayerBus::Pmem => {
            let named: Vec<(String, String)> = serials
                .iter()
                .map(|s| {
                    // A serial these attachments did not give has no UUID:
                    // the agent refuses the empty one by name.
                    let uuid = layers.by_serial(s).map(|d| d.uuid.clone());
                    (s.clone(), uuid.unwrap_or_default())
                })
                .collect();
            podvisor_proto::pmem_image_mounts(&named)
        }
    }
}

/// A VM's layer disks as read-only virtio-pmem devices mapping the shared
/// host files, in attachment order; the `i`-th has the device id
/// `layer<i>`. A layer disk's size is a whole number of 2 MiB units.
pub fn layer_pmems(layers: &LayerAttachments) -> Vec<PmemDevice> {
    layers
        .disks()
        .iter()
        .enumerate()
        .map(|(i, d)| PmemDevice {
            id: format!("layer{i}"),
            path: d.path.clone(),
            size_bytes: d.size,
            read_only: true,
        })
        .collect()
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

    /// Attachments of two layers, 2 and 4 MiB.
    fn two_layers() -> (
        LayerAttachments,
        Vec<String>,
        Vec<podvisor_image::LayerDisk>,
    ) {
        use podvisor_image::{ChainId, Digest, LayerDisk};
        let disks: Vec<LayerDisk> = [1u8, 2]
            .iter()
            .map(|&n| {
                let diff_id = Digest::sha256_of(&[n]);
                let chain_id = ChainId::extend(None, &diff_id);
                LayerDisk {
                    path: format!("/cache/{}/disk.erofs", chain_id.hex()).into(),
                    size: u64::from(n) << 21,
                    chain_id,
                    diff_id,
                    parent: None,
                }
            })
            .collect();
        let mut layers = LayerAttachments::default();
        let serials = layers.add(&disks);
        (layers, serials, disks)
    }

    #[test]
    fn layers_on_pmem_are_shared_read_only_mappings_found_by_uuid() {
        let (layers, serials, disks) = two_layers();
        let devices = layer_devices(&layers, LayerBus::Pmem);
        assert_eq!(
            devices[1],
            Device::Pmem(PmemDevice {
                id: "layer1".into(),
                path: disks[1].path.clone(),
                size_bytes: 4 << 20,
                read_only: true,
            })
        );
        let mounts = layer_mounts(&layers, &serials, LayerBus::Pmem);
        let uuid = podvisor_image::layer_uuid(&disks[1].chain_id);
        assert_eq!(mounts[1], Mount::layer_pmem("pvl1", uuid));
        assert_eq!(
            mounts[2],
            Mount::overlay_root(vec!["pvl0".into(), "pvl1".into()])
        );
        // On virtio-blk: the disks by serial, as before.
        assert!(matches!(
            &layer_devices(&layers, LayerBus::Block)[0],
            Device::Block(b) if b.serial == "pvl0" && b.read_only
        ));
        assert_eq!(
            layer_mounts(&layers, &serials, LayerBus::Block),
            podvisor_proto::image_mounts(&serials)
        );
    }

    #[test]
    fn isolation_or_a_host_without_dax_means_virtio_blk() {
        assert_eq!(LayerBus::for_pod(true, false), LayerBus::Pmem);
        assert_eq!(LayerBus::for_pod(true, true), LayerBus::Block);
        assert_eq!(LayerBus::for_pod(false, false), LayerBus::Block);
        assert_eq!(LayerBus::for_pod(false, true), LayerBus::Block);
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
