//! kubectl-like commands against a podvisor server: apply, get, describe,
//! delete, logs, exec, and podvisor's hibernate and wake. The server URL and token come from `--server` /
//! `--token`, else `PODVISOR_SERVER` / `PODVISOR_TOKEN`, else the `[server]`
//! section of the config file.

mod exec;
pub(crate) mod show;
pub mod volume;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use podvisor_api::{Client, Format, LogOptions, Object, PodFilter, parse_objects};

pub use exec::ExecArgs;

/// The server to talk to.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerConn {
    /// The server's URL (default: the config file's [server] url, else
    /// http://127.0.0.1:7443).
    #[arg(long = "server", env = "PODVISOR_SERVER", value_name = "URL")]
    pub url: Option<String>,
    /// API token (default: the config file's [server] token or token_file).
    #[arg(long, env = "PODVISOR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The server URL when nothing names one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7443";

impl ServerConn {
    /// A client for the server these options (or the config file) name.
    pub fn client(&self) -> anyhow::Result<Client> {
        // `[server]` of the config file: `$PODVISOR_CONFIG` (which must exist
        // when set) or /etc/podvisor/config.toml (if it exists).
        let file = crate::config::ConfigFile::load()?.server;
        // An empty flag or variable counts as not given.
        let given = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        let url = given(&self.url)
            .or(file.url)
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        let token = match given(&self.token) {
            Some(t) => Some(t),
            None => match (file.token, file.token_file) {
                (Some(t), _) => Some(t),
                (None, Some(path)) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("read the token file {}", path.display()))?
                        .trim()
                        .to_string(),
                ),
                (None, None) => None,
            },
        };
        if token.is_none() {
            bail!(
                "no API token: pass --token, set PODVISOR_TOKEN, or set token_file in the [server] section of the config file (the admin token is in the server's STATE_DIR/admin.token)"
            );
        }
        Ok(Client::new(&url, token.as_deref())?)
    }
}

/// Namespace options.
#[derive(clap::Args, Debug, Clone)]
pub struct NamespaceArgs {
    /// The namespace.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
}

#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    conn: ServerConn,
    /// A YAML or JSON file of Pods and PersistentVolumeClaims (several
    /// YAML documents are fine; volumes are applied first), or - for
    /// stdin. Repeatable.
    #[arg(long = "filename", short = 'f', required = true, value_name = "FILE")]
    files: Vec<String>,
    /// Namespace of objects that name none.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
}

pub async fn apply(args: ApplyArgs) -> anyhow::Result<u8> {
    let client = args.conn.client()?;
    let mut pods = Vec::new();
    let mut volumes = Vec::new();
    for file in &args.files {
        let text = if file == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("read stdin")?;
            s
        } else {
            std::fs::read_to_string(file).with_context(|| format!("read {file}"))?
        };
        let format = if text.trim_start().starts_with('{') {
            Format::Json
        } else {
            Format::Yaml
        };
        let name = if file == "-" { "stdin" } else { file.as_str() };
        let objects = parse_objects(&text, format)
            .with_context(|| format!("{name}: not a valid Pod or PersistentVolumeClaim"))?;
        for object in objects {
            match object {
                Object::Pod(pod) => pods.push(*pod),
                Object::PersistentVolumeClaim(pvc) => volumes.push(*pvc),
            }
        }
    }
    // Volumes first: the pods naming them are scheduled once they exist.
    for mut pvc in volumes {
        if pvc.metadata.namespace.is_none() {
            pvc.metadata.namespace = args.namespace.clone();
        }
        let applied = client
            .apply_volume(&pvc)
            .await
            .with_context(|| format!("apply persistentvolumeclaim {}", pvc.key()))?;
        println!(
            "persistentvolumeclaim/{} {}",
            applied.volume.metadata.name, applied.outcome
        );
    }
    for mut pod in pods {
        if pod.metadata.namespace.is_none() {
            pod.metadata.namespace = args.namespace.clone();
        }
        let applied = client
            .apply(&pod)
            .await
            .with_context(|| format!("apply pod {}", pod.key()))?;
        println!("pod/{} {}", applied.pod.metadata.name, applied.outcome);
    }
    Ok(0)
}

/// What `get` lists.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    #[value(alias = "pod", alias = "po")]
    Pods,
    #[value(alias = "host", alias = "node", alias = "nodes")]
    Hosts,
    #[value(alias = "image")]
    Images,
    /// Persistent volumes.
    #[value(
        name = "persistentvolumeclaims",
        alias = "persistentvolumeclaim",
        alias = "pvc",
        alias = "pvcs",
        alias = "volumes",
        alias = "volume"
    )]
    Volumes,
}

/// Output format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Json,
    Yaml,
    Wide,
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    conn: ServerConn,
    /// pods, hosts, images or pvc (persistentvolumeclaims).
    kind: Kind,
    /// One object by name.
    name: Option<String>,
    #[command(flatten)]
    ns: NamespaceArgs,
    /// Pods of all namespaces.
    #[arg(long, short = 'A')]
    all_namespaces: bool,
    /// json, yaml, or wide (a table with more columns).
    #[arg(long, short = 'o')]
    output: Option<Output>,
}

pub async fn get(args: GetArgs) -> anyhow::Result<u8> {
    let client = args.conn.client()?;
    let out = args.output;
    let text = match (args.kind, &args.name) {
        (Kind::Pods, Some(name)) => {
            let pod = client.get_pod(&args.ns.namespace, name).await?;
            match out {
                Some(Output::Json) => show::json(&pod),
                Some(Output::Yaml) => show::yaml(&pod),
                _ => show::pods_table(&[pod], false, out == Some(Output::Wide)),
            }
        }
        (Kind::Pods, None) => {
            let filter = if args.all_namespaces {
                PodFilter::all()
            } else {
                PodFilter::in_namespace(&args.ns.namespace)
            };
            let list = client.list_pods(&filter).await?;
            match out {
                Some(Output::Json) => show::json(&list),
                Some(Output::Yaml) => show::yaml(&list),
                _ if list.items.is_empty() => {
                    eprintln!(
                        "No pods found{}.",
                        if args.all_namespaces {
                            String::new()
                        } else {
                            format!(" in namespace {}", args.ns.namespace)
                        }
                    );
                    String::new()
                }
                _ => show::pods_table(&list.items, args.all_namespaces, out == Some(Output::Wide)),
            }
        }
        (Kind::Hosts, Some(n)) => {
            let host = client.get_host(n).await?;
            match out {
                Some(Output::Json) => show::json(&host),
                Some(Output::Yaml) => show::yaml(&host),
                _ => show::hosts_table(std::slice::from_ref(&host)),
            }
        }
        (Kind::Hosts, None) => {
            // A list, as kubectl prints one (`items`).
            let hosts = client.list_hosts().await?;
            match out {
                Some(Output::Json) => show::json(&hosts),
                Some(Output::Yaml) => show::yaml(&hosts),
                _ => show::hosts_table(&hosts.items),
            }
        }
        (Kind::Volumes, Some(name)) => {
            let pvc = client.get_volume(&args.ns.namespace, name).await?;
            match out {
                Some(Output::Json) => show::json(&pvc),
                Some(Output::Yaml) => show::yaml(&pvc),
                _ => show::volumes_table(std::slice::from_ref(&pvc), false),
            }
        }
        (Kind::Volumes, None) => {
            let namespace = (!args.all_namespaces).then_some(args.ns.namespace.as_str());
            let list = client.list_volumes(namespace).await?;
            match out {
                Some(Output::Json) => show::json(&list),
                Some(Output::Yaml) => show::yaml(&list),
                _ if list.items.is_empty() => {
                    eprintln!(
                        "No volumes found{}.",
                        namespace.map_or(String::new(), |ns| format!(" in namespace {ns}"))
                    );
                    String::new()
                }
                _ => show::volumes_table(&list.items, args.all_namespaces),
            }
        }
        (Kind::Images, _) => {
            let images = client.list_images().await?;
            match out {
                Some(Output::Json) => show::json(&images),
                Some(Output::Yaml) => show::yaml(&images),
                _ => show::images_table(&images.items),
            }
        }
    };
    print!("{text}");
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct DescribeArgs {
    #[command(flatten)]
    conn: ServerConn,
    /// pod (or host).
    kind: Kind,
    name: String,
    #[command(flatten)]
    ns: NamespaceArgs,
}

pub async fn describe(args: DescribeArgs) -> anyhow::Result<u8> {
    let client = args.conn.client()?;
    let text = match args.kind {
        Kind::Pods => show::describe_pod(&client.get_pod(&args.ns.namespace, &args.name).await?),
        Kind::Hosts => {
            let host = client.get_host(&args.name).await?;
            let pods = client.list_pods(&PodFilter::on_host(&args.name)).await?;
            show::describe_host(&host, &pods.items)
        }
        Kind::Images => bail!("describe images is not supported: use `podvisor get images`"),
        Kind::Volumes => show::yaml(&client.get_volume(&args.ns.namespace, &args.name).await?),
    };
    print!("{text}");
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    conn: ServerConn,
    /// pod.
    kind: Kind,
    name: String,
    #[command(flatten)]
    ns: NamespaceArgs,
    /// Wait until the pod is gone (its host stopped it).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    timeout: u64,
}

pub async fn delete(args: DeleteArgs) -> anyhow::Result<u8> {
    if args.kind == Kind::Volumes {
        let client = args.conn.client()?;
        client.delete_volume(&args.ns.namespace, &args.name).await?;
        println!("persistentvolumeclaim \"{}\" deleted", args.name);
        return Ok(0);
    }
    if args.kind != Kind::Pods {
        bail!("only pods and volumes can be deleted (hosts leave by stopping their daemon)");
    }
    let client = args.conn.client()?;
    let (ns, name) = (&args.ns.namespace, &args.name);
    match client.delete_pod(ns, name).await? {
        None => println!("pod \"{name}\" deleted"),
        Some(_) if !args.wait => println!("pod \"{name}\" is terminating"),
        Some(_) => {
            let deadline = Instant::now() + Duration::from_secs(args.timeout);
            loop {
                match client.get_pod(ns, name).await {
                    Err(e) if e.is_not_found() => break,
                    Err(e) => return Err(e.into()),
                    Ok(_) if Instant::now() > deadline => {
                        bail!(
                            "pod {ns}/{name} is still terminating after {} s",
                            args.timeout
                        )
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            println!("pod \"{name}\" deleted");
        }
    }
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    conn: ServerConn,
    /// The pod.
    pod: String,
    #[command(flatten)]
    ns: NamespaceArgs,
    /// The container (needed when the pod has several).
    #[arg(long, short = 'c')]
    container: Option<String>,
    /// Keep streaming new output.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only the last N lines.
    #[arg(long = "tail", value_name = "N")]
    tail: Option<u64>,
}

pub async fn logs(args: LogsArgs) -> anyhow::Result<u8> {
    let client = args.conn.client()?;
    let options = LogOptions {
        container: args.container,
        follow: args.follow,
        tail_lines: args.tail,
    };
    let mut stream = client.logs(&args.ns.namespace, &args.pod, &options).await?;
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        stdout.write_all(&chunk?).context("write to stdout")?;
        stdout.flush().context("write to stdout")?;
    }
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct PodArgs {
    #[command(flatten)]
    conn: ServerConn,
    /// The pod.
    pod: String,
    #[command(flatten)]
    ns: NamespaceArgs,
}

/// `podvisor hibernate POD`: the pod's host saves its VM and stops it.
pub async fn hibernate(args: PodArgs) -> anyhow::Result<u8> {
    let client = args.conn.client()?;
    let (ns, name) = (&args.ns.namespace, &args.pod);
    let done = client
        .hibernate_pod(ns, name)
        .await
        .with_context(|| format!("hibernate pod {ns}/{name}"))?;
    println!("{}", said(&done, name, "hibernated"));
    Ok(0)
}

/// `podvisor wake POD`: the pod's host loads its VM again.
pub async fn wake(args: PodArgs) -> anyhow::Result<u8> {
    let client = args.conn.client()?;
    let (ns, name) = (&args.ns.namespace, &args.pod);
    let done = client
        .wake_pod(ns, name)
        .await
        .with_context(|| format!("wake pod {ns}/{name}"))?;
    println!("{}", said(&done, name, "woken"));
    Ok(0)
}

/// The server's message, or `pod/NAME DONE` if it gave none.
fn said(status: &podvisor_api::Status, name: &str, done: &str) -> String {
    match status.message.trim() {
        "" => format!("pod/{name} {done}"),
        message => message.to_string(),
    }
}

pub async fn exec(args: ExecArgs) -> anyhow::Result<u8> {
    exec::run(args).await
}
