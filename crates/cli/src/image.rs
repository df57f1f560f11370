//! `podvisor image pull|ls|inspect|rm|gc|import` and `podvisor login`: the
//! global image cache from the command line.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use podvisor_image::catalog::{LayerEntry, ManifestEntry, RefEntry};
use podvisor_image::credentials::{self, Credentials};
use podvisor_image::gc::GcReport;
use podvisor_image::pull::{self, PullOptions};
use podvisor_image::{Catalog, Digest, ImageRef, LayerCache, Platform, Registry};
use serde_json::json;

use crate::config::{CacheArgs, RegistryArgs, Settings};
use crate::pull_view::{PullView, human_bytes, short};

#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(clap::Subcommand, Debug)]
enum ImageCommand {
    /// Pull an image from its registry into the cache.
    Pull {
        /// Image reference: `busybox`, `registry:5000/app:v1`, `app@sha256:...`.
        reference: String,
        /// Platform to pick from a multi-platform image (os/arch[/variant]).
        #[arg(long, default_value = "linux/amd64")]
        platform: Platform,
    },
    /// List the images in the catalog.
    Ls,
    /// Show an image's manifest, config and layer disks as JSON.
    Inspect {
        /// A reference or a manifest digest (`sha256:...`).
        image: String,
    },
    /// Remove image references, and the layer disks nothing else needs.
    Rm {
        /// References or manifest digests.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove every layer disk no image references and no pod uses.
    Gc,
    /// Import an OCI layout or image archive (docker save, oci-archive).
    Import {
        path: PathBuf,
        /// Which image of a source holding several (tag, name or digest).
        #[arg(long)]
        select: Option<String>,
    },
}

/// `podvisor login`.
#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    /// Registry host[:port] (docker.io for Docker Hub).
    registry: String,
    /// User name.
    #[arg(long, short = 'u')]
    username: String,
    /// Read the password from stdin.
    #[arg(long)]
    password_stdin: bool,
    #[command(flatten)]
    registries: RegistryArgs,
}

struct Opened {
    settings: Settings,
    cache: LayerCache,
    catalog: Catalog,
}

async fn open(args: &ImageArgs) -> anyhow::Result<Opened> {
    let settings = Settings::load(&args.cache, &args.registry)?;
    let cache = LayerCache::open(&settings.cache_dir)?;
    let catalog = Catalog::open(&settings.catalog).await?;
    Ok(Opened {
        settings,
        cache,
        catalog,
    })
}

pub async fn run(args: ImageArgs) -> anyhow::Result<u8> {
    let o = open(&args).await?;
    let result = match args.command {
        ImageCommand::Pull {
            reference,
            platform,
        } => pull_image(&o, &reference, platform).await,
        ImageCommand::Ls => list(&o).await,
        ImageCommand::Inspect { image } => inspect(&o, &image).await,
        ImageCommand::Rm { images } => remove(&o, &images).await,
        ImageCommand::Gc => {
            let report = podvisor_image::gc::gc(&o.cache, &o.catalog).await?;
            print_report(&report);
            Ok(())
        }
        ImageCommand::Import { path, select } => import(&o, &path, select.as_deref()).await,
    };
    o.catalog.close().await;
    result.map(|()| 0)
}

async fn pull_image(o: &Opened, reference: &str, platform: Platform) -> anyhow::Result<()> {
    let reference = ImageRef::parse(reference)?;
    let options = PullOptions {
        registry: o.settings.registry.clone(),
        platform,
    };
    let pulled = pull::pull(
        &o.cache,
        &o.catalog,
        &reference,
        &options,
        Arc::new(PullView::new()),
    )
    .await
    .with_context(|| format!("pull {reference}"))?;
    let size: u64 = pulled.image.layers.iter().map(|l| l.size).sum();
    println!(
        "{reference}: {} ({} layers, {})",
        pulled.image.manifest_digest,
        pulled.image.layers.len(),
        human_bytes(size)
    );
    pulled.hold.release().await;
    Ok(())
}

async fn import(o: &Opened, path: &std::path::Path, select: Option<&str>) -> anyhow::Result<()> {
    let pulled = pull::import_into(
        &o.cache,
        &o.catalog,
        path,
        select,
        Arc::new(PullView::new()),
    )
    .await
    .with_context(|| format!("import {}", path.display()))?;
    let name = pulled.image.name.clone().unwrap_or_else(|| "<none>".into());
    println!(
        "{name}: {} ({} layers)",
        pulled.image.manifest_digest,
        pulled.image.layers.len()
    );
    pulled.hold.release().await;
    Ok(())
}

async fn list(o: &Opened) -> anyhow::Result<()> {
    let refs = o.catalog.refs().await?;
    let manifests = o.catalog.manifests().await?;
    let mut rows = vec![[
        "REFERENCE".to_string(),
        "DIGEST".into(),
        "PLATFORM".into(),
        "LAYERS".into(),
        "SIZE".into(),
        "LAST USED".into(),
    ]];
    let row = |name: &str, m: &ManifestEntry| {
        [
            name.to_string(),
            short(m.digest.as_str()).to_string(),
            m.platform.clone(),
            m.layers.len().to_string(),
            human_bytes(m.size),
            ago(m.last_used),
        ]
    };
    for m in &manifests {
        let names: Vec<&RefEntry> = refs.iter().filter(|r| r.manifest == m.digest).collect();
        if names.is_empty() {
            rows.push(row("<none>", m));
        }
        for r in names {
            rows.push(row(&r.reference, m));
        }
    }
    rows[1..].sort();
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(())
}

/// `3 minutes ago` style.
fn ago(t: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let d = now.saturating_sub(t);
    match d {
        0..60 => format!("{d} s ago"),
        60..3600 => format!("{} min ago", d / 60),
        3600..86400 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86400),
    }
}

async fn find(o: &Opened, name: &str) -> anyhow::Result<(Vec<RefEntry>, ManifestEntry)> {
    let refs = o.catalog.refs().await?;
    let digest = match Digest::parse(name) {
        Ok(d) => d,
        Err(_) => {
            let normalized = ImageRef::parse(name)?.to_string();
            refs.iter()
                .find(|r| r.reference == normalized)
                .map(|r| r.manifest.clone())
                .with_context(|| format!("no image `{name}` in the catalog"))?
        }
    };
    let manifest = o
        .catalog
        .manifest(&digest)
        .await?
        .with_context(|| format!("no image `{name}` in the catalog"))?;
    Ok((
        refs.into_iter().filter(|r| r.manifest == digest).collect(),
        manifest,
    ))
}

async fn inspect(o: &Opened, name: &str) -> anyhow::Result<()> {
    let (refs, m) = find(o, name).await?;
    let mut layers = Vec::new();
    for chain in &m.layers {
        let entry: Option<LayerEntry> = o.catalog.layer(chain).await?.map(|(e, _)| e);
        let disk = o.cache.get(chain);
        layers.push(json!({
            "chain_id": chain,
            "diff_id": entry.as_ref().map(|e| &e.diff_id),
            "parent": entry.as_ref().and_then(|e| e.parent.as_ref()),
            "blob": entry.as_ref().map(|e| &e.blob),
            "size": entry.as_ref().map(|e| e.size),
            "references": entry.as_ref().map(|e| e.used_by.len()),
            "last_used": entry.as_ref().map(|e| e.last_used),
            "disk": disk.map(|d| d.path),
        }));
    }
    let doc = json!({
        "references": refs.iter().map(|r| &r.reference).collect::<Vec<_>>(),
        "index_digest": refs.iter().find_map(|r| r.index.as_ref()),
        "manifest_digest": m.digest,
        "config_digest": m.config_digest,
        "platform": m.platform,
        "config": m.config,
        "size": m.size,
        "created": m.created,
        "last_used": m.last_used,
        "layers": layers,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

async fn remove(o: &Opened, names: &[String]) -> anyhow::Result<()> {
    let mut total = GcReport::default();
    for name in names {
        let report = podvisor_image::gc::remove_image(&o.cache, &o.catalog, name).await?;
        total.untagged.extend(report.untagged);
        total.manifests_removed.extend(report.manifests_removed);
        total.removed.extend(report.removed);
        total.in_use.extend(report.in_use);
        total.busy.extend(report.busy);
    }
    print_report(&total);
    Ok(())
}

fn print_report(report: &GcReport) {
    for r in &report.untagged {
        println!("untagged {r}");
    }
    for m in &report.manifests_removed {
        println!("deleted manifest {m}");
    }
    for (chain, size) in &report.removed {
        println!(
            "deleted layer disk {} ({})",
            short(chain.digest().as_str()),
            human_bytes(*size)
        );
    }
    for (chain, holders) in &report.in_use {
        let by: Vec<String> = holders.iter().map(|h| h.to_string()).collect();
        println!(
            "kept layer disk {}: in use by {}",
            short(chain.digest().as_str()),
            by.join(", ")
        );
    }
    for chain in &report.busy {
        println!(
            "kept layer disk {}: another process holds its lock",
            short(chain.digest().as_str())
        );
    }
    if report.stale.entries > 0 {
        println!(
            "removed {} leftovers of dead processes ({})",
            report.stale.entries,
            human_bytes(report.stale.bytes)
        );
    }
    println!(
        "freed {} bytes ({})",
        report.bytes_freed(),
        human_bytes(report.bytes_freed())
    );
}

pub async fn login(args: LoginArgs) -> anyhow::Result<u8> {
    if !args.password_stdin {
        bail!(
            "give the password on stdin with --password-stdin (it is never taken from the command line)"
        );
    }
    let mut password = String::new();
    std::io::stdin()
        .read_to_string(&mut password)
        .context("read the password from stdin")?;
    let password = password.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        bail!("the password read from stdin is empty");
    }
    let settings = Settings::load(&CacheArgs::default(), &args.registries)?;
    let creds = Credentials {
        username: args.username,
        password,
    };
    Registry::check_login(&settings.registry, &args.registry, creds.clone())
        .await
        .with_context(|| format!("login to {}", args.registry))?;
    let path = settings.registry.docker_config_path();
    credentials::store(&path, &args.registry, &creds)?;
    println!(
        "Login succeeded: credentials for {} saved in {}",
        args.registry,
        path.display()
    );
    Ok(0)
}
