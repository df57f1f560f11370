//! `podvisor run`: a command in a new pod VM, with docker's feel.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use podvisor_image::{ImageSource, Platform};
use podvisor_net::host_ports::{PortMapping, Protocol};
use podvisor_podvm::ContainerOverrides;
use podvisor_podvm::network::{
    DnsMerge, DnsOption, DnsPolicy, HostAlias, PodDns, PodDnsConfig, resolv_word,
};
use podvisor_run::{NetworkChoice, Outcome, PodIo, PodRequest};
use podvisor_template::TemplateChoice;
use tokio::sync::mpsc;

use crate::host_options::PodVmArgs;
use crate::terminal;

/// Where `podvisor run` keeps named volumes (`-v NAME:/path`).
pub const DEFAULT_VOLUME_DIR: &str = "/var/lib/podvisor/volumes";

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Number of virtual CPUs of the pod VM.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory of the pod VM, with a unit: 256M, 1G.
    #[arg(long, short = 'm', default_value = "256M", value_parser = parse_memory_mib)]
    memory: u64,
    /// Set an environment variable (KEY=VALUE, or KEY to pass the host's value).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Keep stdin open and forward it to the container.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Give the container a terminal.
    #[arg(long, short = 't')]
    tty: bool,
    /// Working directory inside the container.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// User inside the container: name, uid, name:group or uid:gid.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Override the image's entrypoint ("" clears it).
    #[arg(long)]
    entrypoint: Option<String>,
    /// Pod name, also the container's hostname.
    #[arg(long)]
    name: Option<String>,
    /// Print the time of each stage to stderr when done.
    #[arg(long)]
    timings: bool,
    /// Platform to pull from a multi-platform image (os/arch[/variant]).
    #[arg(long, default_value = "linux/amd64")]
    platform: Platform,
    /// VM template to fork from: auto (the deepest that fits, made on
    /// demand), none (boot cold), or a template's name.
    #[arg(long, default_value = "auto", value_parser = parse_template)]
    template: TemplateChoice,
    /// Share no memory with other pods (no VM template, image layers on
    /// virtio-blk rather than mapped from the host's page cache with
    /// DAX): shared pages are a cross-VM side channel.
    #[arg(long)]
    isolated: bool,
    /// Size the container's language runtime (JVM heap and processors,
    /// GOMAXPROCS/GOMEMLIMIT, Node's heap, Python's CPU count) to the VM:
    /// auto (the default; a setting you give wins) or none.
    #[arg(long, value_enum, default_value = "auto")]
    runtime_profile: RuntimeProfileArg,
    /// Publish a container's port on the host, as docker does:
    /// [IP:]HOSTPORT:CONTAINERPORT[/tcp|/udp] (repeatable).
    #[arg(long = "publish", short = 'p', value_name = "[IP:]HOSTPORT:CONTAINERPORT[/PROTO]", value_parser = parse_publish)]
    publish: Vec<PortMapping>,
    /// The pod's network: `default` (the host's CNI network: the first
    /// configuration in --cni-conf-dir, or podvisor's bridge on
    /// 10.87.0.0/24 written there) or `none` (only loopback).
    #[arg(long, value_enum, default_value = "default", env = "PODVISOR_NETWORK")]
    network: NetworkArg,
    /// The CNI configuration directory.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// A nameserver for the container's resolv.conf, replacing the
    /// network's (repeatable; the resolver uses the first three).
    #[arg(long = "dns", value_name = "IP", value_parser = parse_dns_server)]
    dns: Vec<std::net::IpAddr>,
    /// A search domain, replacing the network's (repeatable; `.` for none).
    #[arg(long = "dns-search", value_name = "DOMAIN", value_parser = parse_dns_search)]
    dns_search: Vec<String>,
    /// A resolver option such as ndots:2, replacing the network's
    /// (repeatable).
    #[arg(long = "dns-option", value_name = "OPT", value_parser = parse_dns_option)]
    dns_option: Vec<String>,
    /// An /etc/hosts line: NAME:IP or NAME=IP (an IPv6 address may be in
    /// brackets), as docker takes it (repeatable).
    #[arg(long = "add-host", value_name = "NAME:IP", value_parser = parse_add_host)]
    add_host: Vec<HostAlias>,
    /// A named volume at a path in the container: NAME:/path[:ro]
    /// (repeatable). Made as an empty ext4 disk on first use and kept
    /// after the run, as docker's local volumes are; one run uses a
    /// volume at a time. Host directories cannot be shared into the VM.
    #[arg(long = "volume", short = 'v', value_name = "NAME:/PATH[:ro]", value_parser = podvisor_run::parse_volume_arg)]
    volume: Vec<podvisor_run::NamedVolume>,
    /// Where named volumes' disks are kept.
    #[arg(long, value_name = "DIR", env = "PODVISOR_VOLUME_DIR", default_value = DEFAULT_VOLUME_DIR)]
    volume_dir: PathBuf,
    /// The image: a registry reference (pulled unless cached), or an OCI
    /// layout directory or image archive (docker save, oci-archive) that
    /// exists, optionally followed by `:REF` to pick one of several.
    image: String,
    /// Command and arguments, replacing the image's Cmd. As with `docker
    /// run`, everything after the image is the command (its options
    /// included); a `--` before it is accepted.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    command: Vec<String>,
    #[command(flatten)]
    host: PodVmArgs,
}

/// `--network`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkArg {
    Default,
    None,
}

/// Parses `[IP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]` (an IPv6 address in
/// brackets), as `docker run -p`.
pub fn parse_publish(s: &str) -> Result<PortMapping, String> {
    let bad = |why: &str| format!("{s:?}: {why} (expected [IP:]HOSTPORT:CONTAINERPORT[/tcp|/udp])");
    let (rest, protocol) = match s.rsplit_once('/') {
        Some((rest, "tcp")) => (rest, Protocol::Tcp),
        Some((rest, "udp")) => (rest, Protocol::Udp),
        Some(_) => return Err(bad("the protocol must be tcp or udp")),
        None => (s, Protocol::Tcp),
    };
    let (host, container) = rest.rsplit_once(':').ok_or_else(|| bad("no host port"))?;
    let (ip, host_port) = match host.rsplit_once(':') {
        Some((ip, port)) => {
            let ip = ip
                .strip_prefix('[')
                .and_then(|i| i.strip_suffix(']'))
                .unwrap_or(ip);
            let ip: std::net::IpAddr = ip.parse().map_err(|_| bad("not an IP address"))?;
            (Some(ip), port)
        }
        None => (None, host),
    };
    let port = |p: &str| match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(bad("ports are 1-65535")),
    };
    Ok(PortMapping {
        host_port: port(host_port)?,
        container_port: port(container)?,
        protocol,
        host_ip: ip,
    })
}

/// Parses `--dns`: an IP address, as docker takes it.
pub fn parse_dns_server(s: &str) -> Result<std::net::IpAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address"))
}

/// Parses `--dns-search`: a domain name (a trailing dot allowed), or `.`
/// for no search domains, as docker takes it.
pub fn parse_dns_search(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s == "." {
        return Ok(s.into());
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253
        || !name.split('.').all(label_ok)
        || !name.bytes().any(|b| b.is_ascii_alphabetic())
    {
        return Err(format!(
            "{s:?} is not a valid domain (letters, digits and '-' in dot-separated labels; `.` for none)"
        ));
    }
    Ok(s.into())
}

/// Parses `--dns-option`: one resolver option (`ndots:2`, `edns0`).
pub fn parse_dns_option(s: &str) -> Result<String, String> {
    if !resolv_word(s, 64) || s.starts_with(':') {
        return Err(format!(
            "{s:?} is not a resolver option (NAME or NAME:VALUE: at most 64 printable characters, no spaces or '#')"
        ));
    }
    Ok(s.into())
}

/// Parses `--add-host NAME:IP` or `NAME=IP` (the address may be in
/// brackets: `NAME=[::1]`), as docker does: split at the first `=`, else
/// at the first `:`. docker's `host-gateway` has no meaning for a pod VM.
pub fn parse_add_host(s: &str) -> Result<HostAlias, String> {
    let (name, ip) = s
        .split_once('=')
        .or_else(|| s.split_once(':'))
        .ok_or_else(|| format!("bad format for add-host: {s:?} (expected NAME:IP or NAME=IP)"))?;
    if !resolv_word(name, 253) || name.contains(':') {
        return Err(format!(
            "bad format for add-host: {s:?}: {name:?} is not a host name"
        ));
    }
    if ip == "host-gateway" {
        return Err(format!(
            "add-host {s:?}: host-gateway is not supported by podvisor run; give the address"
        ));
    }
    let bare = ip
        .strip_prefix('[')
        .and_then(|i| i.strip_suffix(']'))
        .unwrap_or(ip);
    let ip = bare
        .parse()
        .map_err(|_| format!("invalid IP address in add-host: {ip:?}"))?;
    Ok(HostAlias {
        ip,
        hostnames: vec![name.to_string()],
    })
}

/// docker's DNS flags as the pod's DNS settings: each flag given replaces
/// that part of the network's resolver settings.
pub fn docker_dns(
    servers: Vec<std::net::IpAddr>,
    search: Vec<String>,
    options: Vec<String>,
    hosts: Vec<HostAlias>,
) -> PodDns {
    let given = !(servers.is_empty() && search.is_empty() && options.is_empty());
    PodDns {
        policy: DnsPolicy::Default,
        merge: DnsMerge::Replace,
        config: given.then(|| PodDnsConfig {
            nameservers: servers,
            searches: search,
            options: options.iter().map(|o| DnsOption::parse(o)).collect(),
        }),
        host_aliases: hosts,
    }
}

/// Parses a memory size with a unit (K, M, G; optional trailing B/iB) into MiB.
pub fn parse_memory_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, unit) = stripped.split_at(stripped.len().saturating_sub(1));
    let mib = match unit {
        "k" => num.parse::<u64>().map(|n| n / 1024),
        "m" => num.parse::<u64>(),
        "g" => num.parse::<u64>().map(|n| n * 1024),
        _ => return Err(format!("memory {t:?} needs a unit, e.g. 256M or 1G")),
    }
    .map_err(|_| format!("invalid memory size {t:?}"))?;
    if mib < 64 {
        return Err(format!("memory {t:?} is below the minimum of 64M"));
    }
    Ok(mib)
}

/// `-e` entries as `KEY=VALUE`; a bare `KEY` takes the host's value.
pub fn env_entries(args: &[String]) -> Vec<String> {
    args.iter()
        .map(|e| match e.split_once('=') {
            Some(_) => e.clone(),
            None => format!("{e}={}", std::env::var(e).unwrap_or_default()),
        })
        .collect()
}

/// Parses `--template`.
pub fn parse_template(s: &str) -> Result<TemplateChoice, String> {
    s.parse()
        .map_err(|e: podvisor_template::TemplateError| e.to_string())
}

pub async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let image = ImageSource::parse(&args.image)?;
    let stdin_is_tty = terminal::is_terminal(std::io::stdin().as_fd());
    if args.tty && !stdin_is_tty {
        bail!("the input device is not a TTY: drop -t, or run from a terminal");
    }
    let env = env_entries(&args.env);
    let terminal_size = if args.tty {
        Some(terminal::size().unwrap_or(podvisor_proto::TerminalSize { rows: 24, cols: 80 }))
    } else {
        None
    };
    let overrides = ContainerOverrides {
        entrypoint: args
            .entrypoint
            .map(|e| if e.is_empty() { vec![] } else { vec![e] }),
        cmd: (!args.command.is_empty()).then_some(args.command),
        env,
        workdir: args.workdir,
        user: args.user,
        terminal: terminal_size,
        stdin: args.interactive,
    };
    let request = PodRequest {
        name: args.name,
        cpus: args.cpus,
        memory_mib: args.memory,
        image,
        overrides,
        template: args.template,
        isolated: args.isolated,
        runtime_profile: args.runtime_profile == RuntimeProfileArg::Auto,
        network: match args.network {
            NetworkArg::None if !args.publish.is_empty() => {
                bail!(
                    "-p publishes a port of the pod's network: it needs --network default, not none"
                )
            }
            NetworkArg::None => NetworkChoice::None,
            NetworkArg::Default => NetworkChoice::Cni {
                conf_dir: args.cni_conf_dir,
                ports: args.publish,
            },
        },
        dns: docker_dns(args.dns, args.dns_search, args.dns_option, args.add_host),
        volumes: args.volume,
        volume_dir: args.volume_dir,
    };
    let mut cfg = args.host.node_config()?;
    cfg.platform = args.platform;

    let (control_tx, control_rx) = mpsc::channel(16);
    terminal::forward_events(args.tty, control_tx).context("install signal handlers")?;
    let io = PodIo {
        stdout: Box::new(tokio::io::stdout()),
        stderr: Box::new(tokio::io::stderr()),
        stdin: args
            .interactive
            .then(|| Box::new(tokio::io::stdin()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        control: control_rx,
        pull_progress: Arc::new(crate::pull_view::PullView::new()),
    };
    let raw = if args.tty {
        Some(terminal::RawMode::enable().context("put the terminal in raw mode")?)
    } else {
        None
    };
    let report = podvisor_run::run(&cfg, request, io).await;
    drop(raw);
    let report = report?;
    if let Outcome::StartFailed(err) = &report.outcome {
        eprintln!("podvisor: cannot start the container: {err}");
    }
    if args.timings {
        eprint!("{}", report.timings.render());
    }
    Ok(report.exit_code().clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `podvisor ARGS` parsed as a `run`: (image, command).
    fn parse_run(args: &[&str]) -> (String, Vec<String>) {
        let argv = ["podvisor", "run"].iter().chain(args);
        match crate::Cli::try_parse_from(argv).unwrap().command {
            crate::Command::Run(run) => (run.image, run.command),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn arguments_after_the_image_are_the_command() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // As with `docker run`: no `--` needed, and options after the image
        // belong to the command, podvisor's own included.
        assert_eq!(
            parse_run(&["-e", "A=1", "busybox", "echo", "hi"]),
            ("busybox".to_string(), strings(&["echo", "hi"]))
        );
        assert_eq!(
            parse_run(&["busybox", "ls", "-l", "--cpus", "2", "-e", "x"]).1,
            strings(&["ls", "-l", "--cpus", "2", "-e", "x"])
        );
        // `--` stays accepted and is not part of the command; a later one is.
        assert_eq!(
            parse_run(&["busybox", "--", "echo", "-n", "hi"]).1,
            strings(&["echo", "-n", "hi"])
        );
        assert_eq!(
            parse_run(&["busybox", "sh", "--", "-c"]).1,
            strings(&["sh", "--", "-c"])
        );
        assert!(parse_run(&["busybox"]).1.is_empty());
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("256M"), Ok(256));
        assert_eq!(parse_memory_mib("1g"), Ok(1024));
        assert_eq!(parse_memory_mib("2GiB"), Ok(2048));
        assert_eq!(parse_memory_mib("131072k"), Ok(128));
        assert!(
            parse_memory_mib("256")
                .unwrap_err()
                .contains("needs a unit")
        );
        assert!(parse_memory_mib("32M").unwrap_err().contains("minimum"));
        assert!(parse_memory_mib("xM").unwrap_err().contains("invalid"));
    }

    #[test]
    fn dns_flags_are_parsed_as_docker_does() {
        let host = |s: &str| parse_add_host(s).map(|h| format!("{} {}", h.ip, h.hostnames[0]));
        assert_eq!(host("db.test:192.0.2.7").unwrap(), "192.0.2.7 db.test");
        assert_eq!(host("db=192.0.2.7").unwrap(), "192.0.2.7 db");
        assert_eq!(host("v6:2001:db8::7").unwrap(), "2001:db8::7 v6");
        assert_eq!(host("v6=[2001:db8::7]").unwrap(), "2001:db8::7 v6");
        assert_eq!(host("v6:[::1]").unwrap(), "::1 v6");
        for (bad, why) in [
            ("db", "bad format for add-host"),
            (":192.0.2.7", "bad format for add-host"),
            ("db:nope", "invalid IP address in add-host"),
            ("db=", "invalid IP address in add-host"),
            ("db:host-gateway", "host-gateway is not supported"),
            ("a#b:192.0.2.7", "is not a host name"),
        ] {
            let e = parse_add_host(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(parse_dns_server(" 1.1.1.1").unwrap().to_string(), "1.1.1.1");
        assert!(
            parse_dns_server("dns.google")
                .unwrap_err()
                .contains("not an IP address")
        );
        assert_eq!(parse_dns_search("corp.example.").unwrap(), "corp.example.");
        assert_eq!(parse_dns_search(".").unwrap(), ".");
        for bad in ["-a.b", "a..b", "1.2.3", "a b", ""] {
            assert!(
                parse_dns_search(bad)
                    .unwrap_err()
                    .contains("not a valid domain"),
                "{bad}"
            );
        }
        assert_eq!(parse_dns_option("ndots:2").unwrap(), "ndots:2");
        assert!(parse_dns_option("ndots 2").is_err());
        assert!(parse_dns_option("").is_err());

        let dns = docker_dns(
            vec!["192.0.2.53".parse().unwrap()],
            vec![],
            vec!["ndots:2".into()],
            vec![],
        );
        assert_eq!(dns.merge, DnsMerge::Replace);
        let config = dns.config.unwrap();
        assert_eq!(config.options[0].to_string(), "ndots:2");
        assert_eq!(docker_dns(vec![], vec![], vec![], vec![]).config, None);
    }

    #[test]
    fn publish_is_parsed_as_docker_does() {
        let shown = |s: &str| parse_publish(s).map(|m| m.to_string());
        assert_eq!(shown("8080:80").unwrap(), "8080->80/tcp");
        assert_eq!(
            shown("127.0.0.1:8080:80/udp").unwrap(),
            "127.0.0.1:8080->80/udp"
        );
        assert_eq!(shown("[::1]:8080:80").unwrap(), "[::1]:8080->80/tcp");
        for bad in ["80", "0:80", "8080:80/sctp", "host:8080:80", "8080:99999"] {
            let e = parse_publish(bad).unwrap_err();
            assert!(e.contains("expected [IP:]HOSTPORT:CONTAINERPORT"), "{e}");
        }
    }
}

/// `--runtime-profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RuntimeProfileArg {
    Auto,
    None,
}
