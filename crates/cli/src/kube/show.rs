//! How objects are shown: kubectl-like tables, `describe` text, JSON, YAML.

use std::fmt::Write;

use podvisor_api::quantity::format_bytes;
use podvisor_api::{
    HIBERNATED_CONDITION, Host, HostKsm, Image, PersistentVolumeClaim, Pod, PodCondition, Quantity,
    ResourceList, Time, VolumeAuditEntry, labels_text,
};

pub fn json<T: serde::Serialize>(value: &T) -> String {
    let mut s = serde_json::to_string_pretty(value).expect("API objects serialize");
    s.push('\n');
    s
}

pub fn yaml<T: serde::Serialize>(value: &T) -> String {
    yaml_serde::to_string(value).expect("API objects serialize")
}

/// A time as `2025-01-02T03:04:05Z`.
fn stamp(t: Time) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `5s`, `3m`, `2h`, `4d` since `t`, as kubectl shows ages.
pub fn age(t: Option<Time>) -> String {
    let Some(t) = t else {
        return "<unknown>".into();
    };
    let secs = (chrono::Utc::now() - t).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Columns padded to their widest cell, separated by three spaces.
fn table(rows: Vec<Vec<String>>) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}   ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `podvisor server token ls`: id (the first 12 digits of the hash), role,
/// name, age.
pub fn tokens_table(tokens: &[podvisor_server::TokenEntry]) -> String {
    let mut rows = vec![
        ["ID", "ROLE", "NAME", "NAMESPACES", "AGE"]
            .map(String::from)
            .to_vec(),
    ];
    for t in tokens {
        rows.push(vec![
            t.id.chars().take(12).collect(),
            format!("{:?}", t.record.role).to_lowercase(),
            t.record.name.clone(),
            match &t.record.namespaces {
                Some(ns) => ns.join(","),
                None => "*".into(),
            },
            age(Some(t.record.created)),
        ]);
    }
    table(rows)
}

pub fn pods_table(pods: &[Pod], namespaces: bool, wide: bool) -> String {
    let mut header: Vec<String> = Vec::new();
    if namespaces {
        header.push("NAMESPACE".into());
    }
    header.extend(["NAME", "READY", "STATUS", "RESTARTS", "AGE", "NODE"].map(String::from));
    if wide {
        header.extend(["IP", "LABELS"].map(String::from));
    }
    let mut rows = vec![header];
    let mut pods: Vec<&Pod> = pods.iter().collect();
    pods.sort_by_key(|p| p.key());
    for pod in pods {
        let (ready, total) = pod.ready_count();
        let mut row = Vec::new();
        if namespaces {
            row.push(pod.metadata.namespace().to_string());
        }
        row.extend([
            pod.metadata.name.clone(),
            format!("{ready}/{total}"),
            pod.display_status(),
            pod.restart_count().to_string(),
            age(pod.metadata.creation_timestamp),
            pod.spec
                .node_name
                .clone()
                .unwrap_or_else(|| "<none>".into()),
        ]);
        if wide {
            row.push(pod.status.pod_ip.clone().unwrap_or_else(|| "<none>".into()));
            row.push(pod.labels_text());
        }
        rows.push(row);
    }
    table(rows)
}

/// A volume's STATUS: `Revoked`, `In use by POD`, or `Available`.
pub fn volume_status(pvc: &PersistentVolumeClaim) -> String {
    if pvc.status.revoked_at.is_some() {
        "Revoked".into()
    } else if let Some(a) = &pvc.status.attached_to {
        format!("In use by {}", a.pod)
    } else {
        "Available".into()
    }
}

/// `podvisor volume ls` and `get pvc`.
pub fn volumes_table(volumes: &[PersistentVolumeClaim], namespaces: bool) -> String {
    let mut header: Vec<String> = Vec::new();
    if namespaces {
        header.push("NAMESPACE".into());
    }
    header.extend(["NAME", "SIZE", "ENCRYPTED", "STATUS", "HOST", "AGE"].map(String::from));
    let mut rows = vec![header];
    let mut volumes: Vec<&PersistentVolumeClaim> = volumes.iter().collect();
    volumes.sort_by_key(|v| v.key());
    for v in volumes {
        let mut row = Vec::new();
        if namespaces {
            row.push(v.metadata.namespace().to_string());
        }
        row.extend([
            v.metadata.name.clone(),
            v.storage()
                .map_or_else(|| "<none>".into(), |q| q.to_string()),
            if v.status.encrypted || v.wants_encryption() {
                "yes".into()
            } else {
                "no".into()
            },
            volume_status(v),
            v.status.host.clone().unwrap_or_else(|| "<none>".into()),
            age(v.metadata.creation_timestamp),
        ]);
        rows.push(row);
    }
    table(rows)
}

/// `podvisor volume audit`: TIME ACTION POD INSTANCE BY MESSAGE.
pub fn audit_table(entries: &[VolumeAuditEntry]) -> String {
    let mut rows = vec![
        ["TIME", "ACTION", "POD", "INSTANCE", "BY", "MESSAGE"]
            .map(String::from)
            .to_vec(),
    ];
    let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    for e in entries {
        rows.push(vec![
            stamp(e.time),
            e.action.clone(),
            or_none(&e.pod),
            e.instance
                .as_deref()
                .map_or_else(|| "-".into(), |i| i.chars().take(12).collect()),
            or_none(&e.by),
            or_none(&e.message),
        ]);
    }
    table(rows)
}

pub fn hosts_table(hosts: &[Host]) -> String {
    let mut rows = vec![
        ["NAME", "STATUS", "CPU", "MEMORY", "AGE", "ADDRESS"]
            .map(String::from)
            .to_vec(),
    ];
    for h in hosts {
        rows.push(vec![
            h.metadata.name.clone(),
            if h.status.ready {
                "Ready".into()
            } else {
                "NotReady".into()
            },
            Quantity::from_millicores(h.spec.capacity.cpu).to_string(),
            format_bytes(h.spec.capacity.memory),
            age(h.metadata.creation_timestamp),
            h.spec.address.clone(),
        ]);
    }
    table(rows)
}

pub fn images_table(images: &[Image]) -> String {
    let mut rows = vec![
        ["NAME", "DIGEST", "LAYERS", "SIZE"]
            .map(String::from)
            .to_vec(),
    ];
    for i in images {
        let digest: String = i.digest.chars().take(19).collect();
        rows.push(vec![
            i.name.clone(),
            digest,
            i.layers.to_string(),
            format_bytes(i.size),
        ]);
    }
    table(rows)
}

fn resources_text(list: &Option<ResourceList>) -> Option<String> {
    let list = list.as_ref()?;
    let mut parts = Vec::new();
    if let Some(cpu) = &list.cpu {
        parts.push(format!("cpu {cpu}"));
    }
    if let Some(mem) = &list.memory {
        parts.push(format!("memory {mem}"));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

pub fn describe_pod(pod: &Pod) -> String {
    let mut s = String::new();
    let m = &pod.metadata;
    let line = |s: &mut String, k: &str, v: &str| {
        let _ = writeln!(s, "{:<16}{v}", format!("{k}:"));
    };
    line(&mut s, "Name", &m.name);
    line(&mut s, "Namespace", m.namespace());
    line(
        &mut s,
        "Node",
        pod.spec.node_name.as_deref().unwrap_or("<none>"),
    );
    line(&mut s, "Labels", &pod.labels_text());
    if let Some(t) = m.creation_timestamp {
        line(
            &mut s,
            "Created",
            &format!("{} ({} ago)", stamp(t), age(Some(t))),
        );
    }
    if let Some(t) = m.deletion_timestamp {
        line(&mut s, "Deleting since", &stamp(t));
    }
    line(&mut s, "Status", &pod.display_status());
    line(&mut s, "Phase", pod.status.phase.as_str());
    if let Some(r) = &pod.status.reason {
        line(&mut s, "Reason", r);
    }
    if let Some(msg) = &pod.status.message {
        line(&mut s, "Message", msg);
    }
    if pod.status.is_hibernated()
        && let Some(c) = pod.status.condition(HIBERNATED_CONDITION)
    {
        let mut text = match c.last_transition_time {
            Some(t) => format!("since {} ({} ago)", stamp(t), age(Some(t))),
            None => "since an unknown time".into(),
        };
        if let Some(msg) = &c.message {
            let _ = write!(text, "; {msg}");
        }
        line(&mut s, "Hibernated", &text);
    }
    if let Some(ip) = &pod.status.host_ip {
        line(&mut s, "Host IP", ip);
    }
    line(
        &mut s,
        "IP",
        pod.status.pod_ip.as_deref().unwrap_or("<none>"),
    );
    if pod.status.pod_ips.len() > 1 {
        let ips: Vec<&str> = pod.status.pod_ips.iter().map(|i| i.ip.as_str()).collect();
        line(&mut s, "IPs", &ips.join(", "));
    }
    if let Some(t) = pod.status.start_time {
        line(&mut s, "Started", &stamp(t));
    }
    line(
        &mut s,
        "Restart Policy",
        &format!("{:?}", pod.spec.restart_policy),
    );
    let policy = pod.spec.dns_policy;
    line(
        &mut s,
        "DNS Policy",
        &match policy {
            podvisor_api::DnsPolicy::ClusterFirst
            | podvisor_api::DnsPolicy::ClusterFirstWithHostNet => format!(
                "{} (no cluster DNS: the node's resolvers, as Default)",
                policy.as_str()
            ),
            _ => policy.as_str().to_string(),
        },
    );
    if let Ok(size) = pod.spec.vm_size() {
        line(
            &mut s,
            "VM size",
            &format!(
                "cpu {}, memory {}",
                Quantity::from_millicores(size.cpu),
                format_bytes(size.memory)
            ),
        );
    }
    if let Some(uid) = &m.uid {
        line(&mut s, "UID", uid);
    }
    s.push_str("Containers:\n");
    for c in &pod.spec.containers {
        let _ = writeln!(s, "  {}:", c.name);
        let field = |s: &mut String, k: &str, v: &str| {
            let _ = writeln!(s, "    {:<14}{v}", format!("{k}:"));
        };
        field(&mut s, "Image", &c.image);
        if let Some(cmd) = &c.command {
            field(&mut s, "Command", &cmd.join(" "));
        }
        if let Some(args) = &c.args {
            field(&mut s, "Args", &args.join(" "));
        }
        let status = pod
            .status
            .container_statuses
            .iter()
            .find(|cs| cs.name == c.name);
        if let Some(cs) = status {
            let state = if let Some(r) = &cs.state.running {
                format!("Running (since {})", stamp(r.started_at))
            } else if let Some(t) = &cs.state.terminated {
                let mut text = format!("Terminated: {} (exit code {}", t.reason, t.exit_code);
                if let Some(sig) = t.signal {
                    let _ = write!(text, ", signal {sig}");
                }
                text.push(')');
                if let Some(msg) = &t.message {
                    let _ = write!(text, ": {msg}");
                }
                text
            } else if let Some(w) = &cs.state.waiting {
                match &w.message {
                    Some(msg) => format!("Waiting: {}: {msg}", w.reason),
                    None => format!("Waiting: {}", w.reason),
                }
            } else {
                "<unknown>".into()
            };
            field(&mut s, "State", &state);
            field(&mut s, "Ready", &cs.ready.to_string());
            field(&mut s, "Restarts", &cs.restart_count.to_string());
            if let Some(p) = &cs.runtime_profile {
                field(&mut s, "Runtime", &p.runtime);
                for setting in &p.settings {
                    field(&mut s, "  Set", setting);
                }
                for reason in &p.reasons {
                    field(&mut s, "  Why", reason);
                }
            }
        }
        if let Some(r) = resources_text(&c.resources.limits) {
            field(&mut s, "Limits", &r);
        }
        if let Some(r) = resources_text(&c.resources.requests) {
            field(&mut s, "Requests", &r);
        }
        for p in &c.ports {
            let proto = match p.protocol.unwrap_or_default() {
                podvisor_api::Protocol::Tcp => "TCP",
                podvisor_api::Protocol::Udp => "UDP",
            };
            let text = match p.host_port {
                Some(hp) => format!("{}/{proto} (host port {hp})", p.container_port),
                None => format!("{}/{proto}", p.container_port),
            };
            field(&mut s, "Port", &text);
        }
        for e in &c.env {
            field(&mut s, "Env", &format!("{}={}", e.name, e.value));
        }
        if let Some(wd) = &c.working_dir {
            field(&mut s, "Working dir", wd);
        }
        if c.tty || c.stdin {
            field(
                &mut s,
                "Terminal",
                &format!("tty={} stdin={}", c.tty, c.stdin),
            );
        }
        for m in &c.volume_mounts {
            let mut text = format!("{} from {}", m.mount_path, m.name);
            if !m.sub_path.is_empty() {
                let _ = write!(text, " (subPath {})", m.sub_path);
            }
            if m.read_only {
                text.push_str(" (ro)");
            }
            field(&mut s, "Mount", &text);
        }
    }
    if !pod.spec.volumes.is_empty() {
        s.push_str("Volumes:\n");
        for v in &pod.spec.volumes {
            let text = if let Some(c) = &v.persistent_volume_claim {
                format!(
                    "PersistentVolumeClaim {}{}",
                    c.claim_name,
                    if c.read_only { " (read-only)" } else { "" }
                )
            } else if let Some(e) = &v.empty_dir {
                let medium = if e.medium == "Memory" {
                    "EmptyDir in memory"
                } else {
                    "EmptyDir on the host's disk"
                };
                match &e.size_limit {
                    Some(limit) => format!("{medium}, at most {limit}"),
                    None => medium.to_string(),
                }
            } else {
                "<no source>".into()
            };
            let _ = writeln!(s, "  {}: {text}", v.name);
        }
    }
    if !pod.status.conditions.is_empty() {
        s.push_str("Conditions:\n");
        s.push_str(&conditions_table(&pod.status.conditions));
    }
    s
}

/// The conditions of a pod as `describe` shows them: type, status, since
/// when, why (`-` where the host said nothing), indented.
fn conditions_table(conditions: &[PodCondition]) -> String {
    let mut rows = vec![
        ["Type", "Status", "Since", "Reason", "Message"]
            .map(String::from)
            .to_vec(),
    ];
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    for c in conditions {
        rows.push(vec![
            c.type_.clone(),
            c.status.clone(),
            c.last_transition_time
                .map(|t| format!("{} ({} ago)", stamp(t), age(Some(t))))
                .unwrap_or_else(|| "-".into()),
            or_dash(&c.reason),
            or_dash(&c.message),
        ]);
    }
    table(rows).lines().map(|l| format!("  {l}\n")).collect()
}

pub fn describe_host(host: &Host, pods: &[Pod]) -> String {
    let mut s = String::new();
    let line = |s: &mut String, k: &str, v: &str| {
        let _ = writeln!(s, "{:<16}{v}", format!("{k}:"));
    };
    line(&mut s, "Name", &host.metadata.name);
    line(&mut s, "Labels", &labels_text(&host.metadata.labels));
    line(&mut s, "Address", &host.spec.address);
    line(&mut s, "Ready", &host.status.ready.to_string());
    if let Some(r) = &host.status.reason {
        line(&mut s, "Reason", r);
    }
    if let Some(t) = host.status.last_heartbeat_time {
        line(
            &mut s,
            "Last heartbeat",
            &format!("{} ({} ago)", stamp(t), age(Some(t))),
        );
    }
    let cap = host.spec.capacity;
    let (mut cpu, mut mem) = (0, 0);
    for p in pods.iter().filter(|p| !p.status.phase.is_terminal()) {
        if let Ok(size) = p.spec.vm_size() {
            cpu += size.cpu;
            mem += size.memory;
        }
    }
    line(
        &mut s,
        "Capacity",
        &format!(
            "cpu {}, memory {}",
            Quantity::from_millicores(cap.cpu),
            format_bytes(cap.memory)
        ),
    );
    line(
        &mut s,
        "Allocated",
        &format!(
            "cpu {}, memory {}",
            Quantity::from_millicores(cpu),
            format_bytes(mem)
        ),
    );
    ksm_lines(&mut s, host.status.ksm.as_ref());
    let _ = writeln!(s, "Pods ({}):", pods.len());
    let mut pods: Vec<&Pod> = pods.iter().collect();
    pods.sort_by_key(|p| p.key());
    for p in pods {
        let _ = writeln!(s, "  {}   {}", p.key(), p.display_status());
    }
    s
}

/// What a host says about KSM, as `describe host` shows it.
fn ksm_lines(s: &mut String, ksm: Option<&HostKsm>) {
    let line = |s: &mut String, k: &str, v: &str| {
        let _ = writeln!(s, "{:<16}{v}", format!("{k}:"));
    };
    let Some(k) = ksm else {
        line(s, "KSM", "off (pods' memory is not merged)");
        return;
    };
    let state = if k.enabled { "on" } else { "stopped" };
    line(
        s,
        "KSM",
        &format!(
            "{state}, {} pages every {} ms",
            k.pages_to_scan, k.sleep_millisecs
        ),
    );
    let zero = match k.zero_pages {
        Some(z) if z > 0 => format!(", {z} into the zero page"),
        _ => String::new(),
    };
    line(
        s,
        "KSM saves",
        &format!(
            "{} ({} pages merged into {}{zero}, {} unique; {} full scans)",
            mib(k.saved_bytes as f64),
            k.pages_sharing,
            k.pages_shared,
            k.pages_unshared,
            k.full_scans
        ),
    );
    if let Some(profit) = k.profit_bytes {
        line(
            s,
            "KSM profit",
            &format!("{} (saved less KSM's own metadata)", mib(profit as f64)),
        );
    }
    if let Some(cpu) = k.ksmd_cpu_seconds {
        line(s, "ksmd CPU", &format!("{cpu:.1} s since boot"));
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_api::{Container, PodIp};

    fn pod_with_ip() -> Pod {
        let mut p = Pod::new(
            "web",
            vec![Container {
                name: "main".into(),
                image: "busybox".into(),
                ..Default::default()
            }],
        );
        p.spec.node_name = Some("h1".into());
        p.status.host_ip = Some("192.0.2.7".into());
        p.status.pod_ip = Some("10.89.0.5".into());
        p.status.pod_ips = vec![
            PodIp {
                ip: "10.89.0.5".into(),
            },
            PodIp {
                ip: "fd00::5".into(),
            },
        ];
        p
    }

    #[test]
    fn volumes_show_size_encryption_user_and_host() {
        use podvisor_api::VolumeAttachment;
        let free = PersistentVolumeClaim::new("default", "data", "1Gi", true);
        let mut used = PersistentVolumeClaim::new("default", "cache", "64Mi", false);
        used.status.attached_to = Some(VolumeAttachment {
            pod: "web".into(),
            pod_uid: "u".into(),
            host: "h1".into(),
        });
        used.status.host = Some("h1".into());
        let mut revoked = PersistentVolumeClaim::new("team", "old", "2Gi", true);
        revoked.status.revoked_at = Some(chrono::Utc::now());
        let text = volumes_table(&[free, used, revoked], true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NAMESPACE   NAME    SIZE   ENCRYPTED   STATUS          HOST     AGE"
        );
        assert!(
            lines[1].starts_with("default     cache   64Mi   no          In use by web   h1 "),
            "{text}"
        );
        assert!(
            lines[2].starts_with("default     data    1Gi    yes         Available       <none>"),
            "{text}"
        );
        assert!(lines[3].contains("Revoked"), "{text}");
    }

    #[test]
    fn the_audit_log_is_a_table() {
        let time = chrono::DateTime::parse_from_rfc3339("2025-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let mut release = VolumeAuditEntry::new("release", "h1", "key released");
        release.time = time;
        release.pod = Some("web".into());
        release.instance = Some("0123456789abcdef0123".into());
        let mut create = VolumeAuditEntry::new("create", "user alice", "encrypted volume of 1Gi");
        create.time = time;
        let text = audit_table(&[create, release]);
        assert_eq!(
            text,
            "TIME                   ACTION    POD   INSTANCE       BY           MESSAGE\n\
             2025-01-02T03:04:05Z   create    -     -              user alice   encrypted volume of 1Gi\n\
             2025-01-02T03:04:05Z   release   web   0123456789ab   h1           key released\n"
        );
    }

    #[test]
    fn describe_lists_the_pods_volumes() {
        use podvisor_api::{
            EmptyDirVolumeSource, PersistentVolumeClaimVolumeSource, Volume, VolumeMount,
        };
        let mut pod = pod_with_ip();
        pod.spec.volumes = vec![
            Volume {
                name: "data".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: "db-data".into(),
                    read_only: false,
                }),
                ..Default::default()
            },
            Volume {
                name: "scratch".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: "Memory".into(),
                    size_limit: Some(Quantity::new("64Mi")),
                }),
                ..Default::default()
            },
        ];
        pod.spec.containers[0].volume_mounts = vec![VolumeMount {
            name: "data".into(),
            mount_path: "/var/lib/db".into(),
            read_only: true,
            sub_path: "pg".into(),
        }];
        let text = describe_pod(&pod);
        assert!(
            text.contains("Mount:        /var/lib/db from data (subPath pg) (ro)"),
            "{text}"
        );
        assert!(text.contains("Volumes:\n  data: PersistentVolumeClaim db-data\n  scratch: EmptyDir in memory, at most 64Mi\n"), "{text}");
    }

    #[test]
    fn describe_shows_what_was_set_for_a_runtime_and_why() {
        let mut pod = pod_with_ip();
        pod.status.container_statuses = vec![podvisor_api::ContainerStatus {
            name: pod.spec.containers[0].name.clone(),
            runtime_profile: Some(podvisor_api::RuntimeProfile {
                runtime: "JVM 17.0.15".into(),
                settings: vec!["JAVA_TOOL_OPTIONS=-Xmx600m".into()],
                reasons: vec!["heap 600 MiB: 944 MiB less metaspace 60 MiB, ...".into()],
            }),
            ..Default::default()
        }];
        let text = describe_pod(&pod);
        assert!(
            text.contains(
                "    Runtime:      JVM 17.0.15\n      Set:        JAVA_TOOL_OPTIONS=-Xmx600m\n      Why:        heap 600 MiB"
            ),
            "{text}"
        );
    }

    #[test]
    fn wide_pods_show_the_pod_ip() {
        let table = pods_table(&[pod_with_ip()], false, true);
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let ip = header
            .iter()
            .position(|h| *h == "IP")
            .expect("an IP column");
        assert_eq!(row[ip], "10.89.0.5", "{table}");
        let plain = pods_table(&[pod_with_ip()], false, false);
        assert!(!plain.contains("10.89.0.5"), "{plain}");
    }

    #[test]
    fn describe_shows_pod_and_host_addresses() {
        let text = describe_pod(&pod_with_ip());
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}:")))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {key} line in:\n{text}"))
        };
        assert_eq!(value("IP"), "10.89.0.5");
        assert_eq!(value("IPs"), "10.89.0.5, fd00::5");
        assert_eq!(value("Host IP"), "192.0.2.7");
        assert_eq!(
            value("DNS Policy"),
            "ClusterFirst (no cluster DNS: the node's resolvers, as Default)"
        );
        let mut p = pod_with_ip();
        p.status.pod_ip = None;
        p.status.pod_ips.clear();
        let text = describe_pod(&p);
        assert!(
            text.lines()
                .any(|l| l.starts_with("IP:") && l.ends_with("<none>")),
            "{text}"
        );
    }

    #[test]
    fn describe_host_shows_what_ksm_saves_and_costs() {
        let mut host = Host::new(
            "h1",
            podvisor_api::HostCapacity {
                cpu: 2000,
                memory: 1 << 30,
            },
            "http://127.0.0.1:9",
        );
        let value = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {key} line in:\n{text}"))
        };
        let text = describe_host(&host, &[]);
        assert_eq!(value(&text, "KSM"), "off (pods' memory is not merged)");
        assert!(!text.contains("ksmd CPU"), "{text}");
        host.status.ksm = Some(HostKsm {
            enabled: true,
            pages_shared: 1200,
            pages_sharing: 30000,
            pages_unshared: 5000,
            full_scans: 7,
            zero_pages: Some(0),
            saved_bytes: 30000 * 4096,
            profit_bytes: Some(-(1 << 20)),
            ksmd_cpu_seconds: Some(12.34),
            pages_to_scan: 1000,
            sleep_millisecs: 20,
        });
        let text = describe_host(&host, &[]);
        assert_eq!(value(&text, "KSM"), "on, 1000 pages every 20 ms");
        assert_eq!(
            value(&text, "KSM saves"),
            "117.2 MiB (30000 pages merged into 1200, 5000 unique; 7 full scans)"
        );
        assert_eq!(
            value(&text, "KSM profit"),
            "-1.0 MiB (saved less KSM's own metadata)"
        );
        assert_eq!(value(&text, "ksmd CPU"), "12.3 s since boot");
        let ksm = host.status.ksm.as_mut().unwrap();
        ksm.zero_pages = Some(2000);
        ksm.saved_bytes = 32000 * 4096;
        ksm.enabled = false;
        let text = describe_host(&host, &[]);
        assert_eq!(value(&text, "KSM"), "stopped, 1000 pages every 20 ms");
        assert_eq!(
            value(&text, "KSM saves"),
            "125.0 MiB (30000 pages merged into 1200, 2000 into the zero page, 5000 unique; 7 full scans)"
        );
    }

    fn hibernated(since: Time) -> Pod {
        let mut p = pod_with_ip();
        p.status.phase = podvisor_api::PodPhase::Running;
        p.status.conditions = vec![PodCondition {
            type_: HIBERNATED_CONDITION.into(),
            status: "True".into(),
            reason: Some("Idle".into()),
            message: Some("snapshot 15.1 MiB of 192 MiB guest memory".into()),
            last_transition_time: Some(since),
        }];
        p
    }

    #[test]
    fn a_hibernated_pod_shows_as_such() {
        let since = chrono::Utc::now() - chrono::Duration::minutes(5);
        let table = pods_table(&[hibernated(since)], false, false);
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row[..3], ["web", "0/1", "Hibernated"], "{table}");

        let text = describe_pod(&hibernated(since));
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}:")))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {key} line in:\n{text}"))
        };
        assert_eq!(value("Status"), "Hibernated");
        assert_eq!(
            value("Hibernated"),
            format!(
                "since {} (5m ago); snapshot 15.1 MiB of 192 MiB guest memory",
                stamp(since)
            )
        );
        let conditions: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "Conditions:")
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .collect();
        assert_eq!(conditions.len(), 2, "{text}");
        let header: Vec<&str> = conditions[0].split_whitespace().collect();
        assert_eq!(header, ["Type", "Status", "Since", "Reason", "Message"]);
        assert!(
            conditions[1].starts_with(&format!(
                "  Hibernated   True     {} (5m ago)   Idle     snapshot 15.1 MiB",
                stamp(since)
            )),
            "{text}"
        );

        // Awake again: no Hibernated line, the condition still listed.
        let mut awake = hibernated(since);
        awake.status.conditions[0].status = "False".into();
        awake.status.conditions[0].reason = None;
        awake.status.conditions[0].message = None;
        awake.status.conditions[0].last_transition_time = None;
        let text = describe_pod(&awake);
        assert!(!text.contains("Hibernated:"), "{text}");
        assert!(text.contains("Status:         Running"), "{text}");
        assert!(
            text.contains("  Hibernated   False    -       -        -\n"),
            "{text}"
        );
        // No conditions, no block.
        assert!(!describe_pod(&pod_with_ip()).contains("Conditions:"));
    }
}
