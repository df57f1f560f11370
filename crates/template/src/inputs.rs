//! The current inputs of a recipe, to compare with what a template was
//! made from: guest artifacts, VMM version, layer disks.

use std::path::Path;

use podvisor_guest::{GuestArtifacts, GuestOptions};
use podvisor_image::{ChainId, LayerAttachments, LayerCache};
use podvisor_vmm::BlockDevice;
use serde::{Deserialize, Serialize};

use super::TemplateError;
use super::meta::{Inputs, LayerInput, Recipe};
use podvisor_podvm::NodeConfig;

/// The guest artifacts a recipe boots (its kernel and agent choices).
pub fn guest_for(cfg: &NodeConfig, recipe: &Recipe) -> Result<GuestArtifacts, TemplateError> {
    Ok(podvisor_guest::prepare(&GuestOptions {
        kernel: recipe.kernel.clone(),
        agent: recipe.agent.clone(),
        extra_modules: vec![],
        cache_dir: cfg.cache_dir.clone(),
    })?)
}

/// The VMM version, cached in `<dir>/<backend>.version` under the binary's
/// fingerprint (running `qemu --version` takes tens of milliseconds, a
/// noticeable part of a fork).
pub fn vmm_version(cfg: &NodeConfig, dir: &Path) -> Result<String, TemplateError> {
    #[derive(Serialize, Deserialize)]
    struct Cached {
        fingerprint: String,
        version: String,
    }
    let hypervisor = &cfg.hypervisor;
    let fingerprint = hypervisor.version_fingerprint()?;
    let path = dir.join(format!("{}.version", hypervisor.name()));
    if let Some(c) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Cached>(&b).ok())
        .filter(|c| c.fingerprint == fingerprint)
    {
        return Ok(c.version);
    }
    let version = hypervisor.version()?;
    let cached = Cached {
        fingerprint,
        version: version.clone(),
    };
    // Best effort: a cache that cannot be written only costs time.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, serde_json::to_vec(&cached).unwrap_or_default()).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
    Ok(version)
}

/// The layer disks of a recipe, bottom first, with their identities.
pub fn layer_inputs(
    cache: &LayerCache,
    layers: &[String],
) -> Result<Vec<LayerInput>, TemplateError> {
    use std::os::unix::fs::MetadataExt;
    layers
        .iter()
        .map(|chain| {
            let missing = |reason: String| TemplateError::LayerMissing {
                chain_id: chain.clone(),
                reason,
            };
            let id = ChainId::parse(chain).map_err(|e| missing(e.to_string()))?;
            let disk = cache
                .get(&id)
                .ok_or_else(|| missing("not in the layer cache".into()))?;
            let md = std::fs::metadata(&disk.path).map_err(|e| {
                missing(format!(
                    "{}: {e}",
                    disk.path.display(),
                    e = podvisor_errors::ErrorChain(&e)
                ))
            })?;
            Ok(LayerInput {
                chain_id: chain.clone(),
                path: disk.path,
                size: md.len(),
                mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                inode: md.ino(),
            })
        })
        .collect()
}

/// The layer disks as VM disks with the serials the agent looks for.
/// Templates keep their layers on virtio-blk: a clone has its template's
/// devices, and a base template has no memory hot-plug room for pmem.
pub fn layer_disk_specs(layers: &[LayerInput]) -> Result<Vec<BlockDevice>, TemplateError> {
    let mut attached = LayerAttachments::default();
    for l in layers {
        let chain = ChainId::parse(&l.chain_id).map_err(|e| TemplateError::LayerMissing {
            chain_id: l.chain_id.clone(),
            reason: e.to_string(),
        })?;
        attached.add_layer(&chain, &l.path, l.size);
    }
    Ok(podvisor_podvm::layer_disks(&attached))
}

/// The inputs a template of `recipe` would be made from now.
pub fn current(
    cfg: &NodeConfig,
    dir: &Path,
    recipe: &Recipe,
    guest: &GuestArtifacts,
) -> Result<Inputs, TemplateError> {
    let cache = LayerCache::open(&cfg.cache_dir)?;
    Ok(Inputs {
        guest: guest.inputs_digest.clone(),
        vmm: vmm_version(cfg, dir)?,
        layers: layer_inputs(&cache, &recipe.layers)?,
    })
}

/// Why a template made from `recorded` must not be used now; empty if it
/// may.
pub fn stale_reasons(recorded: &Inputs, now: &Inputs) -> Vec<String> {
    let mut reasons = Vec::new();
    if recorded.guest != now.guest {
        reasons.push("the guest kernel, agent or modules changed".to_string());
    }
    if recorded.vmm != now.vmm {
        reasons.push(format!("the VMM changed ({} -> {})", recorded.vmm, now.vmm));
    }
    if recorded.layers.len() != now.layers.len() {
        reasons.push("its layers differ".to_string());
    } else {
        for (r, n) in recorded.layers.iter().zip(&now.layers) {
            if r != n {
                reasons.push(format!(
                    "layer disk {} changed ({})",
                    r.chain_id,
                    n.path.display()
                ));
            }
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            guest: "g1".into(),
            vmm: "QEMU 7.2".into(),
            layers: vec![LayerInput {
                chain_id: "sha256:ab".into(),
                path: "/c/ab/disk.erofs".into(),
                size: 10,
                mtime_ns: 5,
                inode: 9,
            }],
        }
    }

    #[test]
    fn every_changed_input_is_a_reason() {
        assert!(stale_reasons(&inputs(), &inputs()).is_empty());
        let mut now = inputs();
        now.guest = "g2".into();
        now.vmm = "QEMU 8.0".into();
        now.layers[0].inode = 10;
        assert_eq!(
            stale_reasons(&inputs(), &now),
            [
                "the guest kernel, agent or modules changed",
                "the VMM changed (QEMU 7.2 -> QEMU 8.0)",
                "layer disk sha256:ab changed (/c/ab/disk.erofs)",
            ]
        );
        now.layers.clear();
        assert!(stale_reasons(&inputs(), &now).contains(&"its layers differ".to_string()));
    }
}
