//! `podvisor volume`: persistent volumes (PersistentVolumeClaims) of a
//! namespace: create, ls, inspect, rm, revoke, audit.

use anyhow::Context;
use podvisor_api::PersistentVolumeClaim;

use super::{ServerConn, show};

#[derive(clap::Args, Debug)]
pub struct VolumeArgs {
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(clap::Subcommand, Debug)]
enum VolumeCommand {
    /// Create a volume (made on the storage of the host that first runs
    /// a pod using it).
    Create(CreateArgs),
    /// List volumes: size, encryption, who uses it, its host.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Show a volume (YAML).
    Inspect(NameArgs),
    /// Delete a volume (not while a pod uses it).
    #[command(alias = "delete")]
    Rm(NameArgs),
    /// Revoke an encrypted volume: its key is never released again, and
    /// the pod using it has it closed.
    Revoke(NameArgs),
    /// Show a volume's audit log.
    Audit(NameArgs),
}

#[derive(clap::Args, Debug)]
struct CreateArgs {
    #[command(flatten)]
    conn: ServerConn,
    name: String,
    /// The size (1Mi to 16Ti), e.g. 1Gi.
    #[arg(long)]
    size: String,
    /// Encrypt it (dm-crypt in the pod's VM; the key is released only to
    /// the pod using it).
    #[arg(long)]
    encrypted: bool,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
}

#[derive(clap::Args, Debug)]
struct LsArgs {
    #[command(flatten)]
    conn: ServerConn,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Volumes of all namespaces (admin tokens).
    #[arg(long, short = 'A')]
    all_namespaces: bool,
}

#[derive(clap::Args, Debug)]
struct NameArgs {
    #[command(flatten)]
    conn: ServerConn,
    name: String,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
}

pub async fn run(args: VolumeArgs) -> anyhow::Result<u8> {
    match args.command {
        VolumeCommand::Create(a) => {
            let client = a.conn.client()?;
            let pvc = PersistentVolumeClaim::new(&a.namespace, &a.name, &a.size, a.encrypted);
            if let Err(errors) = podvisor_api::validate_volume(&pvc) {
                let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                anyhow::bail!("volume {}: {}", a.name, text.join("; "));
            }
            let made = client
                .create_volume(&pvc)
                .await
                .with_context(|| format!("create volume {}/{}", a.namespace, a.name))?;
            println!("persistentvolumeclaim/{} created", made.metadata.name);
        }
        VolumeCommand::Ls(a) => {
            let client = a.conn.client()?;
            let namespace = (!a.all_namespaces).then_some(a.namespace.as_str());
            let list = client.list_volumes(namespace).await.with_context(|| {
                if a.all_namespaces {
                    "list the volumes of all namespaces (this needs an admin token)".to_string()
                } else {
                    format!("list the volumes of namespace {}", a.namespace)
                }
            })?;
            if list.items.is_empty() {
                eprintln!(
                    "No volumes found{}.",
                    namespace.map_or(String::new(), |ns| format!(" in namespace {ns}"))
                );
            } else {
                print!("{}", show::volumes_table(&list.items, a.all_namespaces));
            }
        }
        VolumeCommand::Inspect(a) => {
            let client = a.conn.client()?;
            let pvc = client.get_volume(&a.namespace, &a.name).await?;
            print!("{}", show::yaml(&pvc));
        }
        VolumeCommand::Rm(a) => {
            let client = a.conn.client()?;
            client
                .delete_volume(&a.namespace, &a.name)
                .await
                .with_context(|| format!("delete volume {}/{}", a.namespace, a.name))?;
            println!("persistentvolumeclaim \"{}\" deleted", a.name);
        }
        VolumeCommand::Revoke(a) => {
            let client = a.conn.client()?;
            let status = client
                .revoke_volume(&a.namespace, &a.name)
                .await
                .with_context(|| format!("revoke volume {}/{}", a.namespace, a.name))?;
            println!("{}", status.message);
        }
        VolumeCommand::Audit(a) => {
            let client = a.conn.client()?;
            let log = client.volume_audit(&a.namespace, &a.name).await?;
            print!("{}", show::audit_table(&log.entries));
        }
    }
    Ok(0)
}
