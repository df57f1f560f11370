//! `podvisor template create|ls|rm|prune`: VM templates, the paused VMs
//! pods fork from.

use std::time::Duration;

use anyhow::bail;
use podvisor_podvm::ContainerOverrides;
use podvisor_template::{CreateRequest, TemplateError, TemplateStatus, WarmRequest, manage};

use crate::config::{CacheArgs, Settings};
use crate::host_options::{RuntimeDirArgs, VmArgs};
use crate::run::{env_entries, parse_memory_mib};

#[derive(clap::Args, Debug)]
pub struct TemplateArgs {
    #[command(subcommand)]
    command: TemplateCommand,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    dirs: RuntimeDirArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum TemplateCommand {
    /// Make a template: a base one, or one for an image (with --warm, with
    /// the container's process started and warmed). A valid template of
    /// the same recipe is kept; a stale one is rebuilt.
    Create(Box<CreateArgs>),
    /// List templates, whether they are valid and which pods use them.
    Ls,
    /// Remove templates; refused while running pods map their memory.
    Rm {
        /// Template names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove stale and corrupt templates (all unused ones with --all).
    Prune {
        /// Also remove valid templates no running pod uses.
        #[arg(long)]
        all: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Template name (default: the name `run --template auto` looks for).
    #[arg(long)]
    name: Option<String>,
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory, with a unit: 256M, 1G.
    #[arg(long, short = 'm', default_value = "256M", value_parser = parse_memory_mib)]
    memory: u64,
    /// Start the container's process in the template and let it warm up.
    /// Its command, environment and files end up in every clone: never
    /// give it per-pod secrets.
    #[arg(long)]
    warm: bool,
    /// With --warm: wait until this text appears in the process's output.
    #[arg(long, value_name = "TEXT", requires = "warm")]
    warm_until: Option<String>,
    /// With --warm: then let it run this many seconds before saving.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0, requires = "warm")]
    warm_for: f64,
    /// Environment variable for the warm process (KEY=VALUE or KEY).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", requires = "warm")]
    env: Vec<String>,
    /// Keep the warm process's stdin open (clones forward theirs to it).
    #[arg(long, short = 'i', requires = "warm")]
    interactive: bool,
    /// Working directory of the warm process.
    #[arg(long, short = 'w', requires = "warm")]
    workdir: Option<String>,
    /// User of the warm process.
    #[arg(long, short = 'u', requires = "warm")]
    user: Option<String>,
    /// Override the image's entrypoint ("" clears it).
    #[arg(long, requires = "warm")]
    entrypoint: Option<String>,
    /// The image: a registry reference (pulled unless cached), or an OCI
    /// layout directory or archive (`:REF` to pick one); without it, a
    /// base template.
    image: Option<String>,
    /// Command of the warm process, replacing the image's Cmd.
    #[arg(last = true)]
    command: Vec<String>,
    #[command(flatten)]
    registry: crate::config::RegistryArgs,
    #[command(flatten)]
    vm: VmArgs,
}

pub async fn run(args: TemplateArgs) -> anyhow::Result<u8> {
    let TemplateArgs {
        command,
        cache,
        dirs,
    } = args;
    // Only `create` boots a VM (and may say it falls back to TCG).
    let cfg = match &command {
        TemplateCommand::Create(create_args) => {
            let settings = Settings::load(&cache, &create_args.registry)?;
            create_args.vm.node_config(settings, &dirs)?
        }
        _ => dirs.quiet_node_config(&cache)?,
    };
    match command {
        TemplateCommand::Create(args) => create(&cfg, *args).await,
        TemplateCommand::Ls => {
            print!("{}", render_list(&manage::list(&cfg)));
            Ok(0)
        }
        TemplateCommand::Rm { names } => {
            let mut failed = false;
            for name in names {
                match manage::remove(&cfg, &name).await {
                    Ok(()) => println!("{name}"),
                    Err(e) => {
                        eprintln!("podvisor: {e}", e = podvisor_errors::ErrorChain(&e));
                        failed = true;
                    }
                }
            }
            Ok(if failed { 1 } else { 0 })
        }
        TemplateCommand::Prune { all } => {
            let report = manage::prune(&cfg, all).await?;
            for name in &report.removed {
                println!("removed {name}");
            }
            for (name, pids) in &report.in_use {
                println!("kept {name}: in use by {}", pid_list(pids));
            }
            for file in &report.orphan_files {
                println!("removed {} (no template uses it)", file.display());
            }
            Ok(0)
        }
    }
}

async fn create(cfg: &podvisor_podvm::NodeConfig, args: CreateArgs) -> anyhow::Result<u8> {
    if args.warm && args.image.is_none() {
        bail!("--warm needs an image: the process runs in its container");
    }
    if !args.command.is_empty() && !args.warm {
        bail!("a command only makes sense with --warm (the process started in the template)");
    }
    if !(args.warm_for.is_finite() && args.warm_for >= 0.0) {
        bail!(
            "--warm-for must be a number of seconds, got {}",
            args.warm_for
        );
    }
    let image = args
        .image
        .as_deref()
        .map(podvisor_image::ImageSource::parse)
        .transpose()?;
    let warm = args.warm.then(|| WarmRequest {
        overrides: ContainerOverrides {
            entrypoint: args
                .entrypoint
                .map(|e| if e.is_empty() { vec![] } else { vec![e] }),
            cmd: (!args.command.is_empty()).then_some(args.command),
            env: env_entries(&args.env),
            workdir: args.workdir,
            user: args.user,
            terminal: None,
            stdin: args.interactive,
        },
        until: args.warm_until,
        settle: Duration::from_secs_f64(args.warm_for),
    });
    let req = CreateRequest {
        name: args.name,
        cpus: args.cpus,
        memory_mib: args.memory,
        image,
        warm,
    };
    let (meta, built) = manage::create(cfg, req).await?;
    if built.is_zero() {
        println!("{} (already up to date)", meta.name);
    } else {
        println!(
            "{} ({} template, made in {:.2} s)",
            meta.name,
            meta.kind,
            built.as_secs_f64()
        );
    }
    Ok(0)
}

fn pid_list(pids: &[u32]) -> String {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    format!("QEMU pids {}", pids.join(", "))
}

/// The `template ls` table.
fn render_list(entries: &[(String, Result<TemplateStatus, TemplateError>)]) -> String {
    let mut out = format!(
        "{:<20} {:<6} {:>4} {:>7} {:>8}  {:<24} STATUS\n",
        "NAME", "KIND", "CPUS", "MEMORY", "RAM USED", "IMAGE"
    );
    for (name, status) in entries {
        match status {
            Ok(s) => {
                let m = &s.meta;
                let status = if !s.users.is_empty() {
                    format!(
                        "in use by {} pod(s) ({})",
                        s.users.len(),
                        pid_list(&s.users)
                    )
                } else if s.stale.is_empty() {
                    "valid".to_string()
                } else {
                    format!("stale: {}", s.stale.join("; "))
                };
                let status = if !s.users.is_empty() && !s.stale.is_empty() {
                    format!("{status}; stale: {}", s.stale.join("; "))
                } else {
                    status
                };
                out.push_str(&format!(
                    "{:<20} {:<6} {:>4} {:>6}M {:>7}M  {:<24} {}\n",
                    name,
                    m.kind.to_string(),
                    m.recipe.cpus,
                    m.recipe.memory_mib,
                    s.ram_bytes >> 20,
                    m.image.as_deref().unwrap_or("-"),
                    status
                ));
            }
            Err(e) => out.push_str(&format!(
                "{name:<20} unreadable: {e}\n",
                e = podvisor_errors::ErrorChain(&e)
            )),
        }
    }
    out
}
