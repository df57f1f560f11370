//! Making templates. A base template is a cold boot whose RAM is a shared
//! file, saved once the agent is ready. An image template is a clone of a
//! base whose RAM is a sparse copy of the base's file (its clones must
//! never write to the base's file), with the image's layer disks
//! hot-plugged and mounted; a warm template also has the container's
//! process started and warmed. Each is then saved: the device state to a
//! file next to the metadata, RAM staying in its file.
//!
//! The caller holds the template's lock exclusively (and the base's
//! shared while an image template is made from it).

use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};

use podvisor_guest::GuestArtifacts;
use podvisor_proto::{ContainerSpec, GuestMessage, HostMessage, image_mounts};
use podvisor_vmm::{AfterSave, Device, MemoryBacking, PciLayout};

use super::files::{self, TemplateDirs};
use super::meta::{Inputs, META_FORMAT, Recipe, TemplateDisk, TemplateMeta};
use super::{TemplateError, inputs};
use podvisor_podvm::agent_link::sanitize_guest_text;
use podvisor_podvm::pod_vm::{LoadSpec, PodVm, PodVmSpec};
use podvisor_podvm::{NodeConfig, PodVmError};

/// Id of the container of a warm template (and of the pod's container:
/// clones attach to it).
pub const WARM_CONTAINER_ID: &str = "main";

/// Output of a warm process kept for error messages.
const OUTPUT_TAIL: usize = 2048;

/// What to make.
pub struct Build<'a> {
    pub name: &'a str,
    pub recipe: &'a Recipe,
    pub guest: &'a GuestArtifacts,
    pub inputs: Inputs,
    /// The image's name, for `template ls`.
    pub image: Option<String>,
}

/// Files of a build in progress, removed unless the build is committed.
struct Pending {
    ram: std::path::PathBuf,
    state: std::path::PathBuf,
    committed: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.committed {
            let _ = files::remove_file(&self.ram);
            let _ = files::remove_file(&self.state);
        }
    }
}

fn generation() -> Result<String, TemplateError> {
    Ok(podvisor_store::random_hex(4)?)
}

/// Makes a base template: boots the guest with RAM in a shared file and
/// saves it once the agent is ready.
pub async fn base(
    cfg: &NodeConfig,
    dirs: &TemplateDirs,
    build: Build<'_>,
) -> Result<TemplateMeta, TemplateError> {
    let started = Instant::now();
    let gen_id = generation()?;
    let (ram, state) = dirs.build_files(build.name, &gen_id);
    let mut pending = Pending {
        ram: ram.clone(),
        state: state.clone(),
        committed: false,
    };
    // QEMU would create it world-readable; it holds guest memory.
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&ram)
            .map_err(|e| TemplateError::io("create", &ram, e))?;
    }
    let room = PciLayout {
        bridges: BASE_BRIDGES,
        slots: Default::default(),
    };
    let spec = template_vm(&build, &gen_id, &ram, room);
    // A base that does not boot is the pod's own boot failure.
    let pod = PodVm::boot(cfg, spec).await.map_err(TemplateError::Boot)?;
    let agent = pod.agent.clone();
    let pci = pod.pci_layout();
    save(pod, &state).await?;
    let meta = describe(build, agent, ram, state, vec![], pci, started).await?;
    pending.committed = true;
    Ok(meta)
}

/// PCI bridges of a base template (and so of every template and clone
/// made from it): room for the layer disks hot-plugged into image
/// templates and clones beyond the root bus's 26 free slots.
const BASE_BRIDGES: u8 = 1;

/// The VM a template of `build` is made in: its RAM in the shared file
/// `ram`, its PCI devices as `pci` says, gone with podvisor if it dies
/// mid-build.
fn template_vm(build: &Build<'_>, gen_id: &str, ram: &Path, pci: PciLayout) -> PodVmSpec {
    PodVmSpec {
        id: format!("template-{gen_id}"),
        cpus: build.recipe.cpus,
        memory_mib: build.recipe.memory_mib,
        guest: build.guest.clone(),
        devices: vec![],
        pci,
        memory: MemoryBacking::File {
            path: ram.to_path_buf(),
            shared: true,
        },
        memory_merge: false,
        die_with_parent: true,
        netns: None,
    }
}

/// Makes an image template (a warm one if the recipe says so) from `base`,
/// which the caller keeps locked.
pub async fn child(
    cfg: &NodeConfig,
    dirs: &TemplateDirs,
    build: Build<'_>,
    base: &TemplateMeta,
) -> Result<TemplateMeta, TemplateError> {
    let started = Instant::now();
    let gen_id = generation()?;
    let (ram, state) = dirs.build_files(build.name, &gen_id);
    let mut pending = Pending {
        ram: ram.clone(),
        state: state.clone(),
        committed: false,
    };
    let base_state = files::read_checked_state(base)?;
    files::check_ram_file(base)?;
    files::copy_sparse(&base.ram_file, &ram)?;
    let spec = template_vm(&build, &gen_id, &ram, base.pci.clone());
    let load = LoadSpec {
        state: Box::new(Cursor::new(base_state)),
        agent: base.agent.clone(),
    };
    let mut pod = PodVm::load(cfg, spec, load)
        .await
        .map_err(TemplateError::Vm)?;
    pod.set_identity(build.name, cfg.boot_timeout)
        .await
        .map_err(TemplateError::Vm)?;
    let disks = inputs::layer_disk_specs(&build.inputs.layers)?;
    for disk in &disks {
        pod.add_device(Device::Block(disk.clone()))
            .await
            .map_err(TemplateError::Vm)?;
    }
    let serials: Vec<String> = disks.iter().map(|d| d.serial.clone()).collect();
    let mounts = image_mounts(&serials);
    pod.send(&HostMessage::MountShared {
        mounts: mounts
            .iter()
            .filter(|m| m.shared_name().is_some())
            .cloned()
            .collect(),
    })
    .await
    .map_err(TemplateError::Vm)?;
    match expect_event(&mut pod, cfg.boot_timeout).await? {
        GuestMessage::SharedMounted { error: None } => {}
        GuestMessage::SharedMounted { error: Some(e) } => {
            return Err(TemplateError::Guest(sanitize_guest_text(&e)));
        }
        other => {
            return Err(TemplateError::Vm(
                pod.reject(format!("expected SharedMounted, got {other:?}"))
                    .await,
            ));
        }
    }
    if let Some(warm) = &build.recipe.warm {
        let container = ContainerSpec {
            id: WARM_CONTAINER_ID.into(),
            hostname: build.name.to_string(),
            mounts,
            process: warm.process.clone(),
            runtime: None,
        };
        warm_up(
            &mut pod,
            container,
            warm.until.as_deref(),
            Duration::from_millis(warm.settle_ms),
            cfg.boot_timeout,
        )
        .await?;
    }
    let agent = pod.agent.clone();
    let pci = pod.pci_layout();
    save(pod, &state).await?;
    let disks = disks
        .into_iter()
        .map(|d| TemplateDisk {
            id: d.id,
            path: d.path,
            serial: d.serial,
            read_only: d.read_only,
        })
        .collect();
    let meta = describe(build, agent, ram, state, disks, pci, started).await?;
    pending.committed = true;
    Ok(meta)
}

/// The next message from the agent, within `timeout`.
async fn expect_event(pod: &mut PodVm, timeout: Duration) -> Result<GuestMessage, TemplateError> {
    match tokio::time::timeout(timeout, pod.next_event()).await {
        Ok(msg) => msg.map_err(TemplateError::Vm),
        Err(_) => Err(TemplateError::Guest(format!(
            "the agent did not answer within {timeout:?}"
        ))),
    }
}

/// Starts the container and lets it warm up: until `until` appears in its
/// output (if given), then for `settle`. A process that ends or fails to
/// start is an error showing its last output.
async fn warm_up(
    pod: &mut PodVm,
    container: ContainerSpec,
    until: Option<&str>,
    settle: Duration,
    timeout: Duration,
) -> Result<(), TemplateError> {
    pod.send(&HostMessage::StartContainer(container))
        .await
        .map_err(TemplateError::Vm)?;
    let mut output: Vec<u8> = Vec::new();
    let mut seen = until.is_none();
    let deadline = Instant::now() + timeout;
    let mut settle_until: Option<Instant> = None;
    loop {
        if seen && settle_until.is_none() {
            settle_until = Some(Instant::now() + settle);
        }
        let wake = settle_until.unwrap_or(deadline).min(deadline);
        let msg = tokio::select! {
            msg = pod.next_event() => msg.map_err(TemplateError::Vm)?,
            _ = tokio::time::sleep_until(wake.into()) => {
                if settle_until.is_some() {
                    return Ok(());
                }
                return Err(TemplateError::WarmUp(format!(
                    "{:?} did not appear in the output within {timeout:?}; output:\n{}",
                    until.unwrap_or_default(),
                    String::from_utf8_lossy(&output)
                )));
            }
        };
        match msg {
            GuestMessage::Started { .. } => {}
            GuestMessage::Output { data, .. } => {
                output.extend_from_slice(&data);
                if let Some(text) = until
                    && !seen
                    && String::from_utf8_lossy(&output).contains(text)
                {
                    seen = true;
                }
                let excess = output
                    .len()
                    .saturating_sub(OUTPUT_TAIL.max(until.map_or(0, str::len) * 2));
                output.drain(..excess);
            }
            GuestMessage::Exited { status, .. } => {
                return Err(TemplateError::WarmUp(format!(
                    "the process exited (code {}) before the template was saved; output:\n{}",
                    status.shell_code(),
                    sanitize_guest_text(&String::from_utf8_lossy(&output))
                )));
            }
            GuestMessage::StartFailed { error, .. } => {
                return Err(TemplateError::WarmUp(format!(
                    "the process could not start: {}",
                    sanitize_guest_text(&error.message)
                )));
            }
            GuestMessage::Error { message } => {
                tracing::warn!("agent: {}", sanitize_guest_text(&message));
            }
            other => {
                return Err(TemplateError::Vm(
                    pod.reject(format!("unexpected message {other:?}")).await,
                ));
            }
        }
    }
}

/// Saves the VM's state into a new file `state` and kills the VM (its
/// RAM file must stay as the state refers to it).
async fn save(mut pod: PodVm, state: &std::path::Path) -> Result<(), TemplateError> {
    let file = files::create_state_file(state)?;
    let saved = pod.save_state(Box::new(file), AfterSave::Paused).await;
    pod.kill().await;
    saved.map_err(TemplateError::Vm)?;
    std::fs::File::open(state)
        .and_then(|f| f.sync_all())
        .map_err(|e| TemplateError::io("sync", state, e))
}

/// The metadata of a finished build.
async fn describe(
    build: Build<'_>,
    agent: podvisor_proto::AgentInfo,
    ram: std::path::PathBuf,
    state: std::path::PathBuf,
    disks: Vec<TemplateDisk>,
    pci: PciLayout,
    started: Instant,
) -> Result<TemplateMeta, TemplateError> {
    let (state_sha256, state_bytes) = files::hash_file(&state)?;
    Ok(TemplateMeta {
        format: META_FORMAT,
        name: build.name.to_string(),
        kind: build.recipe.kind(),
        recipe: build.recipe.clone(),
        inputs: build.inputs,
        image: build.image,
        agent,
        ram_file: ram,
        state_file: state,
        state_sha256,
        state_bytes,
        disks,
        pci,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        build_ms: started.elapsed().as_millis() as u64,
        retired: vec![],
    })
}

/// Stores a new build of a template, replacing `old`: its state file goes,
/// its RAM file too unless clones still map it (then it is kept for
/// `prune`), and so do older retired RAM files no longer mapped.
pub fn commit(
    dirs: &TemplateDirs,
    mut meta: TemplateMeta,
    old: Option<TemplateMeta>,
) -> Result<TemplateMeta, TemplateError> {
    if let Some(old) = old {
        let mut retired = old.retired.clone();
        retired.push(old.ram_file.clone());
        for ram in retired {
            if ram != meta.ram_file && files::mapped_by(&ram).is_empty() {
                files::remove_file(&ram)?;
            } else if ram != meta.ram_file {
                meta.retired.push(ram);
            }
        }
        if old.state_file != meta.state_file {
            files::remove_file(&old.state_file)?;
        }
    }
    meta.write(&dirs.meta_file(&meta.name))?;
    Ok(meta)
}

/// Whether a failed template build is the guest failing to boot, which a
/// cold boot would hit the same way.
pub fn is_boot_failure(e: &TemplateError) -> bool {
    matches!(
        e,
        TemplateError::Boot(
            PodVmError::BootTimeout { .. }
                | PodVmError::VmDied { .. }
                | PodVmError::HostileGuest(_)
                | PodVmError::Link(_)
        )
    )
}
