//! Checks of objects beyond their shape: names, quantities, ports, and the
//! rules podvisor adds. Every error names the field at fault.

use std::collections::HashSet;
use std::fmt;

use crate::host::Host;
use crate::pod::Pod;

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The path of the field (`spec.containers[1].name`).
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// An object's name (a DNS-1123 subdomain, required), namespace (a
    /// label) and labels.
    fn metadata(&mut self, meta: &crate::meta::ObjectMeta) {
        if meta.name.is_empty() {
            self.add("metadata.name", "is required");
        } else if let Some(p) = dns_subdomain_problem(&meta.name) {
            self.add("metadata.name", p);
        }
        if let Some(ns) = &meta.namespace
            && let Some(p) = dns_label_problem(ns)
        {
            self.add("metadata.namespace", p);
        }
        let annotations: usize = meta
            .annotations
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if annotations > MAX_ANNOTATIONS_BYTES {
            self.add(
                "metadata.annotations",
                format!(
                    "{annotations} bytes of keys and values: the limit is {MAX_ANNOTATIONS_BYTES} bytes (256 KiB), as in Kubernetes"
                ),
            );
        }
        for (k, v) in &meta.labels {
            if let Some(p) = label_key_problem(k) {
                self.add(format!("metadata.labels.{k}"), p);
            }
            if let Some(p) = label_value_problem(v) {
                self.add(format!("metadata.labels.{k}"), p);
            }
        }
    }
}

/// The most bytes of annotation keys and values an object may have
/// (Kubernetes' `TotalAnnotationSizeLimitB`).
pub const MAX_ANNOTATIONS_BYTES: usize = 256 << 10;

/// The largest a Pod may be, serialized as JSON (etcd's default request
/// limit, which bounds every Kubernetes object).
pub const MAX_POD_BYTES: usize = 3 << 19;

/// The most containers a Pod may have. Kubernetes sets no number; the
/// object size limit bounds it there, and 64 is far beyond any real pod.
pub const MAX_CONTAINERS: usize = 64;

/// The most environment variables one container may set. Kubernetes sets
/// no number either (the kernel's argument space bounds it in the end).
pub const MAX_ENV_VARS: usize = 1024;

/// A DNS-1123 label: at most 63 lowercase letters, digits and '-', starting
/// and ending with a letter or digit.
pub fn dns_label_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > 63 {
        return Some(format!("{name:?} is longer than 63 characters"));
    }
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !name.starts_with('-') && !name.ends_with('-');
    (!ok_chars || !ok_ends).then(|| {
        format!(
            "{name:?} is not a valid name: use lowercase letters, digits and '-', starting and ending with a letter or digit"
        )
    })
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub fn dns_subdomain_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > 253 {
        return Some(format!("{name:?} is longer than 253 characters"));
    }
    name.split('.').find_map(dns_label_problem).map(|_| {
        format!(
            "{name:?} is not a valid name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        )
    })
}

fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && dns_subdomain_problem(p).is_some()
    {
        return Some(format!("label key {key:?} has an invalid prefix {p:?}"));
    }
    label_value_problem(name)
        .or_else(|| name.is_empty().then(|| "must not be empty".to_string()))
        .map(|_| format!("label key {key:?} is not valid: at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"))
}

fn label_value_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    let ok = value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value.as_bytes()[0].is_ascii_alphanumeric()
        && value.as_bytes()[value.len() - 1].is_ascii_alphanumeric();
    (!ok).then(|| format!("label value {value:?} is not valid: at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"))
}

/// Checks a pod as a user submits it. All problems are returned.
pub fn validate_pod(pod: &Pod) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors(Vec::new());
    if pod.api_version != "v1" {
        errors.add(
            "apiVersion",
            format!(
                "{:?} is not supported: podvisor serves Pods of apiVersion v1",
                pod.api_version
            ),
        );
    }
    if pod.kind != "Pod" {
        errors.add(
            "kind",
            format!("{:?} is not supported by podvisor: only Pod", pod.kind),
        );
    }
    let meta = &pod.metadata;
    errors.metadata(meta);
    if let Err(p) = crate::hibernate_after(meta) {
        errors.add(
            format!(
                "metadata.annotations[{}]",
                crate::HIBERNATE_AFTER_ANNOTATION
            ),
            p,
        );
    }
    if let Err(p) = crate::isolated(meta) {
        errors.add(
            format!("metadata.annotations[{}]", crate::ISOLATED_ANNOTATION),
            p,
        );
    }
    if let Err(p) = crate::runtime_profile(meta) {
        errors.add(
            format!(
                "metadata.annotations[{}]",
                crate::RUNTIME_PROFILE_ANNOTATION
            ),
            p,
        );
    }
    if let Some(node) = &pod.spec.node_name
        && let Some(p) = dns_subdomain_problem(node)
    {
        errors.add("spec.nodeName", p);
    }
    if pod.spec.containers.is_empty() {
        errors.add("spec.containers", "a pod needs at least one container");
    }
    if pod.spec.containers.len() > MAX_CONTAINERS {
        errors.add(
            "spec.containers",
            format!(
                "{} containers: the limit is {MAX_CONTAINERS} a pod",
                pod.spec.containers.len()
            ),
        );
    }
    let size = serde_json::to_vec(pod).map_or(0, |json| json.len());
    if size > MAX_POD_BYTES {
        errors.add(
            "pod",
            format!(
                "{size} bytes as JSON: the limit is {MAX_POD_BYTES} bytes (1.5 MiB), as in Kubernetes"
            ),
        );
    }
    validate_dns(&pod.spec, &mut errors);
    let volume_names = validate_volumes(&pod.spec.volumes, &mut errors);
    let mut names = HashSet::new();
    let mut host_ports = Vec::new();
    for (i, c) in pod.spec.containers.iter().enumerate() {
        let at = |f: &str| format!("spec.containers[{i}].{f}");
        if let Some(p) = dns_label_problem(&c.name) {
            errors.add(at("name"), p);
        } else if !names.insert(c.name.as_str()) {
            errors.add(
                at("name"),
                format!("{:?} is used by another container of this pod", c.name),
            );
        }
        if c.image.trim().is_empty() {
            errors.add(at("image"), "must not be empty");
        } else if c.image.chars().any(char::is_whitespace) {
            errors.add(at("image"), format!("{:?} contains whitespace", c.image));
        }
        if c.command.as_ref().is_some_and(|cmd| cmd.is_empty()) {
            errors.add(
                at("command"),
                "must not be an empty list (leave it out to use the image's entrypoint)",
            );
        }
        validate_mounts(i, &c.volume_mounts, &volume_names, &mut errors);
        if c.env.len() > MAX_ENV_VARS {
            errors.add(
                at("env"),
                format!(
                    "{} variables: the limit is {MAX_ENV_VARS} a container",
                    c.env.len()
                ),
            );
        }
        let mut env_names = HashSet::new();
        for (j, e) in c.env.iter().enumerate() {
            if e.name.is_empty() || e.name.contains('=') || e.name.contains('\0') {
                errors.add(
                    format!("spec.containers[{i}].env[{j}].name"),
                    format!("{:?} is not a valid variable name", e.name),
                );
            } else if !env_names.insert(e.name.as_str()) {
                errors.add(
                    format!("spec.containers[{i}].env[{j}].name"),
                    format!("{:?} is set twice", e.name),
                );
            }
        }
        for (j, p) in c.ports.iter().enumerate() {
            let at = |f: &str| format!("spec.containers[{i}].ports[{j}].{f}");
            if p.container_port == 0 {
                errors.add(at("containerPort"), "must be between 1 and 65535");
            }
            let host_ip = match p.host_ip.as_deref().map(str::parse::<std::net::IpAddr>) {
                Some(Err(_)) => {
                    errors.add(
                        at("hostIP"),
                        format!(
                            "{:?} is not an IP address",
                            p.host_ip.as_deref().unwrap_or("")
                        ),
                    );
                    None
                }
                Some(Ok(ip)) => Some(ip),
                None => None,
            };
            if p.host_ip.is_some() && p.host_port.is_none() {
                errors.add(at("hostIP"), "is only meaningful with hostPort");
            }
            if let Some(hp) = p.host_port {
                let this = crate::HostPort {
                    protocol: p.protocol.unwrap_or_default(),
                    ip: host_ip,
                    port: hp,
                };
                if hp == 0 {
                    errors.add(at("hostPort"), "must be between 1 and 65535");
                } else if host_ports
                    .iter()
                    .any(|o: &crate::HostPort| o.conflicts_with(&this))
                {
                    errors.add(
                        at("hostPort"),
                        format!("{this} is published twice in this pod"),
                    );
                } else {
                    host_ports.push(this);
                }
            }
            if let Some(name) = &p.name
                && (name.len() > 15 || dns_label_problem(name).is_some())
            {
                errors.add(at("name"), format!("{name:?} is not a valid port name (at most 15 lowercase letters, digits and '-')"));
            }
        }
        let mut cpu = [None, None];
        let mut mem = [None, None];
        for (k, list) in [
            ("requests", &c.resources.requests),
            ("limits", &c.resources.limits),
        ]
        .into_iter()
        .enumerate()
        .map(|(k, (name, l))| ((k, name), l))
        {
            let Some(list) = list else { continue };
            if let Some(q) = &list.cpu {
                match q.millicores() {
                    Ok(v) => cpu[k.0] = Some(v),
                    Err(e) => errors.add(at(&format!("resources.{}.cpu", k.1)), e.to_string()),
                }
            }
            if let Some(q) = &list.memory {
                match q.bytes() {
                    Ok(v) => mem[k.0] = Some(v),
                    Err(e) => errors.add(at(&format!("resources.{}.memory", k.1)), e.to_string()),
                }
            }
        }
        if let [Some(req), Some(lim)] = cpu
            && req > lim
        {
            errors.add(
                at("resources.requests.cpu"),
                "must not be more than the cpu limit",
            );
        }
        if let [Some(req), Some(lim)] = mem
            && req > lim
        {
            errors.add(
                at("resources.requests.memory"),
                "must not be more than the memory limit",
            );
        }
        if let Some(lim) = mem[1]
            && lim < 16 << 20
        {
            errors.add(
                at("resources.limits.memory"),
                "a pod VM needs at least 16Mi",
            );
        }
    }
    if errors.0.is_empty() {
        Ok(())
    } else {
        Err(errors.0)
    }
}

/// Most nameservers of a pod (glibc's resolver uses three).
pub const MAX_DNS_NAMESERVERS: usize = 3;
/// Most search domains of a pod.
pub const MAX_DNS_SEARCH_PATHS: usize = 32;
/// Longest search list of a pod, spaces included.
pub const MAX_DNS_SEARCH_LIST_CHARS: usize = 2048;
/// Most `/etc/hosts` lines host aliases may take (the agent writes 256,
/// three of them the pod's own); an alias line holds up to 32 names.
pub const MAX_HOST_ALIAS_LINES: usize = 250;

/// `dnsPolicy`, `dnsConfig` and `hostAliases` as Kubernetes validates them
/// (`validatePodDNSConfig`, `ValidateHostAliases`), and what podvisor's
/// agent can write: resolver options are `resolv.conf` words.
fn validate_dns(spec: &crate::pod::PodSpec, errors: &mut Errors) {
    use crate::pod::DnsPolicy;
    if spec.dns_policy == DnsPolicy::None {
        match &spec.dns_config {
            None => errors.add(
                "spec.dnsConfig",
                "must provide `dnsConfig` when `dnsPolicy` is None",
            ),
            Some(c) if c.nameservers.is_empty() => errors.add(
                "spec.dnsConfig.nameservers",
                "must provide at least one DNS nameserver when `dnsPolicy` is None",
            ),
            Some(_) => {}
        }
    }
    if let Some(c) = &spec.dns_config {
        if c.nameservers.len() > MAX_DNS_NAMESERVERS {
            errors.add(
                "spec.dnsConfig.nameservers",
                format!("must not have more than {MAX_DNS_NAMESERVERS} nameservers"),
            );
        }
        for (i, ns) in c.nameservers.iter().enumerate() {
            if ns.parse::<std::net::IpAddr>().is_err() {
                errors.add(
                    format!("spec.dnsConfig.nameservers[{i}]"),
                    format!("{ns:?} must be a valid IP address"),
                );
            }
        }
        if c.searches.len() > MAX_DNS_SEARCH_PATHS {
            errors.add(
                "spec.dnsConfig.searches",
                format!("must not have more than {MAX_DNS_SEARCH_PATHS} search paths"),
            );
        }
        if c.searches.join(" ").len() > MAX_DNS_SEARCH_LIST_CHARS {
            errors.add(
                "spec.dnsConfig.searches",
                format!(
                    "must not have more than {MAX_DNS_SEARCH_LIST_CHARS} characters (including spaces) in the search list"
                ),
            );
        }
        for (i, search) in c.searches.iter().enumerate() {
            // A trailing dot is fine.
            let name = search.strip_suffix('.').unwrap_or(search);
            if let Some(p) = dns_subdomain_problem(name) {
                errors.add(format!("spec.dnsConfig.searches[{i}]"), p);
            }
        }
        for (i, o) in c.options.iter().enumerate() {
            let at = format!("spec.dnsConfig.options[{i}]");
            let word = match &o.value {
                Some(v) if !v.is_empty() => format!("{}:{v}", o.name),
                _ => o.name.clone(),
            };
            if o.name.is_empty() {
                errors.add(format!("{at}.name"), "must not be empty");
            } else if word.len() > 64 || !word.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
                errors.add(
                    at,
                    format!(
                        "{word:?} cannot be a resolv.conf option: at most 64 printable characters without spaces or '#'"
                    ),
                );
            }
        }
    }
    let mut lines = 0;
    for (i, alias) in spec.host_aliases.iter().enumerate() {
        if alias.ip.parse::<std::net::IpAddr>().is_err() {
            errors.add(
                format!("spec.hostAliases[{i}].ip"),
                format!("{:?} must be a valid IP address", alias.ip),
            );
        }
        for (j, name) in alias.hostnames.iter().enumerate() {
            if let Some(p) = dns_subdomain_problem(name) {
                errors.add(format!("spec.hostAliases[{i}].hostnames[{j}]"), p);
            }
        }
        lines += alias.hostnames.len().div_ceil(32);
    }
    if lines > MAX_HOST_ALIAS_LINES {
        errors.add(
            "spec.hostAliases",
            format!(
                "takes {lines} /etc/hosts lines (32 names a line): podvisor writes at most {MAX_HOST_ALIAS_LINES}"
            ),
        );
    }
}

/// Most volumes of a pod.
pub const MAX_POD_VOLUMES: usize = 64;
/// Most persistentVolumeClaim volumes of a pod (the agent opens at most
/// this many encrypted volumes at once).
pub const MAX_POD_CLAIMS: usize = 16;
/// Smallest persistent volume: 1Mi.
pub const MIN_VOLUME_BYTES: u64 = 1 << 20;
/// Largest persistent volume: 16Ti.
pub const MAX_VOLUME_BYTES: u64 = 16 << 40;

/// `spec.volumes` as Kubernetes checks them (names, one source each) and
/// what podvisor supports (emptyDir, persistentVolumeClaim; other sources
/// are refused when the pod is parsed). Returns the declared names.
fn validate_volumes<'a>(
    volumes: &'a [crate::volume::Volume],
    errors: &mut Errors,
) -> HashSet<&'a str> {
    let mut names = HashSet::new();
    let mut claims: Vec<(&str, usize)> = Vec::new();
    if volumes.len() > MAX_POD_VOLUMES {
        errors.add(
            "spec.volumes",
            format!(
                "has {} volumes: podvisor allows at most {MAX_POD_VOLUMES} per pod",
                volumes.len()
            ),
        );
    }
    for (i, v) in volumes.iter().enumerate() {
        let at = |f: &str| format!("spec.volumes[{i}].{f}");
        if let Some(p) = dns_label_problem(&v.name) {
            errors.add(at("name"), p);
        } else if !names.insert(v.name.as_str()) {
            errors.add(
                at("name"),
                format!("{:?} is the name of another volume of this pod", v.name),
            );
        }
        match (&v.empty_dir, &v.persistent_volume_claim) {
            (None, None) => errors.add(
                format!("spec.volumes[{i}]"),
                "must have exactly one source: emptyDir or persistentVolumeClaim (none given)",
            ),
            (Some(_), Some(_)) => errors.add(
                format!("spec.volumes[{i}]"),
                "must have exactly one source: emptyDir or persistentVolumeClaim (both given)",
            ),
            _ => {}
        }
        if let Some(e) = &v.empty_dir {
            if !matches!(e.medium.as_str(), "" | "Memory") {
                errors.add(
                    at("emptyDir.medium"),
                    format!(
                        "{:?} is not supported: use \"\" (the host's disk) or \"Memory\"",
                        e.medium
                    ),
                );
            }
            if let Some(q) = &e.size_limit {
                match q.bytes() {
                    Ok(0) => errors.add(at("emptyDir.sizeLimit"), "must be more than 0"),
                    Ok(_) => {}
                    Err(err) => errors.add(at("emptyDir.sizeLimit"), err.to_string()),
                }
            }
        }
        if let Some(c) = &v.persistent_volume_claim {
            if let Some(p) = dns_subdomain_problem(&c.claim_name) {
                errors.add(at("persistentVolumeClaim.claimName"), p);
            } else if let Some((_, j)) = claims.iter().find(|(n, _)| *n == c.claim_name) {
                errors.add(
                    at("persistentVolumeClaim.claimName"),
                    format!(
                        "{:?} is already volume spec.volumes[{j}]: a claim is attached once",
                        c.claim_name
                    ),
                );
            }
            claims.push((c.claim_name.as_str(), i));
        }
    }
    if claims.len() > MAX_POD_CLAIMS {
        errors.add(
            "spec.volumes",
            format!(
                "has {} persistentVolumeClaim volumes: podvisor allows at most {MAX_POD_CLAIMS} per pod",
                claims.len()
            ),
        );
    }
    names
}

/// Whether `path` has a `..` component.
fn has_dot_dot(path: &str) -> bool {
    path.split('/').any(|c| c == "..")
}

/// A container's `volumeMounts`: each names a declared volume; mount
/// paths absolute, without `..`, not `/`, unique; subPaths relative
/// without `..`.
fn validate_mounts(
    container: usize,
    mounts: &[crate::volume::VolumeMount],
    volumes: &HashSet<&str>,
    errors: &mut Errors,
) {
    let mut paths: Vec<String> = Vec::new();
    for (j, m) in mounts.iter().enumerate() {
        let at = |f: &str| format!("spec.containers[{container}].volumeMounts[{j}].{f}");
        if m.name.is_empty() {
            errors.add(at("name"), "must not be empty");
        } else if !volumes.contains(m.name.as_str()) {
            errors.add(
                at("name"),
                format!("{:?} is not a volume of this pod (spec.volumes)", m.name),
            );
        }
        let path = m.mount_path.as_str();
        if path.is_empty() {
            errors.add(at("mountPath"), "must not be empty");
        } else if !path.starts_with('/') {
            errors.add(
                at("mountPath"),
                format!("{path:?} must be an absolute path"),
            );
        } else if has_dot_dot(path) {
            errors.add(at("mountPath"), format!("{path:?} must not contain '..'"));
        } else if path.contains('\0') {
            errors.add(at("mountPath"), "must not contain NUL");
        } else if path.trim_end_matches('/').is_empty() {
            errors.add(at("mountPath"), "must not be \"/\" (the container's root)");
        } else {
            let clean = path.trim_end_matches('/').to_string();
            if paths.contains(&clean) {
                errors.add(
                    at("mountPath"),
                    format!("{path:?} is mounted twice in this container"),
                );
            } else {
                paths.push(clean);
            }
        }
        let sub = m.sub_path.as_str();
        if sub.starts_with('/') {
            errors.add(at("subPath"), format!("{sub:?} must be a relative path"));
        } else if has_dot_dot(sub) {
            errors.add(at("subPath"), format!("{sub:?} must not contain '..'"));
        } else if sub.contains('\0') {
            errors.add(at("subPath"), "must not contain NUL");
        }
    }
}

/// Checks a PersistentVolumeClaim as a user submits it (its status is the
/// server's and is not checked). All problems are returned.
pub fn validate_volume(pvc: &crate::volume::PersistentVolumeClaim) -> Result<(), Vec<FieldError>> {
    use crate::volume::ENCRYPTED_ANNOTATION;
    let mut errors = Errors(Vec::new());
    if pvc.api_version != "v1" {
        errors.add(
            "apiVersion",
            format!(
                "{:?} is not supported: podvisor serves PersistentVolumeClaims of apiVersion v1",
                pvc.api_version
            ),
        );
    }
    if pvc.kind != "PersistentVolumeClaim" {
        errors.add(
            "kind",
            format!(
                "{:?} is not supported here: expected PersistentVolumeClaim",
                pvc.kind
            ),
        );
    }
    let meta = &pvc.metadata;
    errors.metadata(meta);
    if let Some(v) = meta.annotations.get(ENCRYPTED_ANNOTATION)
        && !matches!(v.as_str(), "true" | "false")
    {
        errors.add(
            format!("metadata.annotations[{ENCRYPTED_ANNOTATION}]"),
            format!("{v:?} must be \"true\" or \"false\""),
        );
    }
    let spec = &pvc.spec;
    for (i, mode) in spec.access_modes.iter().enumerate() {
        if !matches!(mode.as_str(), "ReadWriteOnce" | "ReadWriteOncePod") {
            errors.add(
                format!("spec.accessModes[{i}]"),
                format!(
                    "{mode:?} is not supported: a podvisor volume is attached to one pod at a time (ReadWriteOnce or ReadWriteOncePod)"
                ),
            );
        }
    }
    if let Some(mode) = &spec.volume_mode
        && mode != "Filesystem"
    {
        errors.add(
            "spec.volumeMode",
            format!("{mode:?} is not supported: podvisor volumes are Filesystem volumes"),
        );
    }
    if let Some(class) = &spec.storage_class_name
        && !matches!(class.as_str(), "" | "podvisor")
    {
        errors.add(
            "spec.storageClassName",
            format!(
                "{class:?} is not a storage class of podvisor: leave it out or use \"podvisor\""
            ),
        );
    }
    for key in spec.resources.requests.keys() {
        if key != "storage" {
            errors.add(
                format!("spec.resources.requests.{key}"),
                "not supported by podvisor (supported here: storage)",
            );
        }
    }
    match spec.resources.requests.get("storage") {
        None => errors.add(
            "spec.resources.requests.storage",
            "is required: the volume's size (e.g. 1Gi)",
        ),
        Some(q) => match q.bytes() {
            Err(e) => errors.add("spec.resources.requests.storage", e.to_string()),
            Ok(b) if b < MIN_VOLUME_BYTES => errors.add(
                "spec.resources.requests.storage",
                format!("{q} is less than the smallest volume, 1Mi"),
            ),
            Ok(b) if b > MAX_VOLUME_BYTES => errors.add(
                "spec.resources.requests.storage",
                format!("{q} is more than the largest volume, 16Ti"),
            ),
            Ok(_) => {}
        },
    }
    if errors.0.is_empty() {
        Ok(())
    } else {
        Err(errors.0)
    }
}

/// Checks a host as its daemon registers it.
pub fn validate_host(host: &Host) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors(Vec::new());
    if let Some(p) = dns_subdomain_problem(&host.metadata.name) {
        errors.add("metadata.name", p);
    }
    if host.spec.capacity.cpu == 0 {
        errors.add("spec.capacity.cpu", "must be more than 0 millicores");
    }
    if host.spec.capacity.memory == 0 {
        errors.add("spec.capacity.memory", "must be more than 0 bytes");
    }
    if let Some(s) = &host.spec.volume_storage
        && let Some(p) = dns_subdomain_problem(s)
    {
        errors.add("spec.volumeStorage", p);
    }
    match url::Url::parse(&host.spec.address) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
        _ => errors.add(
            "spec.address",
            format!("{:?} is not an http:// or https:// URL", host.spec.address),
        ),
    }
    if errors.0.is_empty() {
        Ok(())
    } else {
        Err(errors.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::{Container, ResourceList};
    use crate::quantity::Quantity;

    fn pod() -> Pod {
        Pod::new(
            "p",
            vec![Container {
                name: "c".into(),
                image: "busybox".into(),
                ..Default::default()
            }],
        )
    }

    fn problems(p: &Pod) -> String {
        validate_pod(p)
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn names_and_containers() {
        assert!(validate_pod(&pod()).is_ok());
        let mut p = pod();
        p.metadata.name = "Bad_Name".into();
        p.spec.containers.push(p.spec.containers[0].clone());
        p.spec.containers[1].image = " ".into();
        let e = problems(&p);
        assert!(
            e.contains("metadata.name: \"Bad_Name\" is not a valid name"),
            "{e}"
        );
        assert!(
            e.contains("spec.containers[1].name: \"c\" is used by another container"),
            "{e}"
        );
        assert!(
            e.contains("spec.containers[1].image: must not be empty"),
            "{e}"
        );
        let mut p = pod();
        p.kind = "Deployment".into();
        p.spec.containers.clear();
        let e = problems(&p);
        assert!(
            e.contains("kind: \"Deployment\" is not supported by podvisor"),
            "{e}"
        );
        assert!(
            e.contains("spec.containers: a pod needs at least one container"),
            "{e}"
        );
    }

    #[test]
    fn resources() {
        let mut p = pod();
        p.spec.containers[0].resources.requests = Some(ResourceList {
            cpu: Some(Quantity::new("2")),
            memory: Some(Quantity::new("12Zi")),
        });
        p.spec.containers[0].resources.limits = Some(ResourceList {
            cpu: Some(Quantity::new("1")),
            memory: Some(Quantity::new("1Mi")),
        });
        let e = problems(&p);
        assert!(
            e.contains("spec.containers[0].resources.requests.memory: memory quantity \"12Zi\""),
            "{e}"
        );
        assert!(
            e.contains(
                "spec.containers[0].resources.requests.cpu: must not be more than the cpu limit"
            ),
            "{e}"
        );
        assert!(
            e.contains("resources.limits.memory: a pod VM needs at least 16Mi"),
            "{e}"
        );
    }

    #[test]
    fn host_ports() {
        use crate::pod::{ContainerPort, Protocol};
        let port = |host_port, host_ip: Option<&str>, protocol| ContainerPort {
            container_port: 80,
            protocol,
            host_port,
            host_ip: host_ip.map(str::to_string),
            name: None,
        };
        let mut p = pod();
        p.spec.containers[0].ports = vec![
            port(Some(8080), None, None),
            port(Some(8080), None, Some(Protocol::Udp)),
            port(Some(8081), Some("127.0.0.1"), None),
            port(Some(8081), Some("127.0.0.2"), None),
        ];
        assert!(validate_pod(&p).is_ok(), "{}", problems(&p));
        assert_eq!(p.spec.host_ports().len(), 4);
        p.spec.containers[0].ports = vec![
            port(Some(8080), Some("127.0.0.1"), None),
            port(Some(8080), None, None),
            port(Some(9), Some("localhost"), None),
            port(None, Some("127.0.0.1"), None),
        ];
        let e = problems(&p);
        assert!(
            e.contains("ports[1].hostPort: 8080/TCP is published twice in this pod"),
            "{e}"
        );
        assert!(
            e.contains("ports[2].hostIP: \"localhost\" is not an IP address"),
            "{e}"
        );
        assert!(
            e.contains("ports[3].hostIP: is only meaningful with hostPort"),
            "{e}"
        );
    }

    #[test]
    fn dns_settings_are_checked_as_kubernetes_checks_them() {
        use crate::pod::{DnsPolicy, HostAlias, PodDnsConfig, PodDnsConfigOption};
        let mut p = pod();
        p.spec.dns_policy = DnsPolicy::None;
        assert!(
            problems(&p)
                .contains("spec.dnsConfig: must provide `dnsConfig` when `dnsPolicy` is None"),
            "{}",
            problems(&p)
        );
        p.spec.dns_config = Some(PodDnsConfig::default());
        assert!(problems(&p).contains(
            "spec.dnsConfig.nameservers: must provide at least one DNS nameserver when `dnsPolicy` is None"
        ));
        p.spec.dns_config = Some(PodDnsConfig {
            nameservers: vec!["1.1.1.1".into(), "2001:db8::1".into()],
            searches: vec!["svc.cluster.local".into(), "example.com.".into()],
            options: vec![
                PodDnsConfigOption {
                    name: "ndots".into(),
                    value: Some("2".into()),
                },
                PodDnsConfigOption {
                    name: "edns0".into(),
                    value: None,
                },
            ],
        });
        p.spec.host_aliases = vec![HostAlias {
            ip: "10.1.2.3".into(),
            hostnames: vec!["foo.local".into(), "bar".into()],
        }];
        assert!(validate_pod(&p).is_ok(), "{}", problems(&p));

        p.spec.dns_config = Some(PodDnsConfig {
            nameservers: vec![
                "1.1.1.1".into(),
                "a.b".into(),
                "3.3.3.3".into(),
                "4.4.4.4".into(),
            ],
            searches: vec!["Bad_Domain".into()],
            options: vec![
                PodDnsConfigOption::default(),
                PodDnsConfigOption {
                    name: "ndots 5".into(),
                    value: None,
                },
            ],
        });
        p.spec.host_aliases = vec![HostAlias {
            ip: "nope".into(),
            hostnames: vec!["ok".into(), "-bad".into()],
        }];
        let e = problems(&p);
        for want in [
            "spec.dnsConfig.nameservers: must not have more than 3 nameservers",
            "spec.dnsConfig.nameservers[1]: \"a.b\" must be a valid IP address",
            "spec.dnsConfig.searches[0]: \"Bad_Domain\" is not a valid name",
            "spec.dnsConfig.options[0].name: must not be empty",
            "spec.dnsConfig.options[1]: \"ndots 5\" cannot be a resolv.conf option",
            "spec.hostAliases[0].ip: \"nope\" must be a valid IP address",
            "spec.hostAliases[0].hostnames[1]: \"-bad\" is not a valid name",
        ] {
            assert!(e.contains(want), "{want}\n{e}");
        }

        let mut p = pod();
        p.spec.dns_config = Some(PodDnsConfig {
            searches: (0..33).map(|i| format!("d{i}.example")).collect(),
            ..Default::default()
        });
        assert!(problems(&p).contains("must not have more than 32 search paths"));
        p.spec.dns_config = Some(PodDnsConfig {
            searches: (0..9).map(|i| format!("{i}{}", "a".repeat(250))).collect(),
            ..Default::default()
        });
        assert!(problems(&p).contains("must not have more than 2048 characters"));
    }

    #[test]
    fn hibernate_after_annotation() {
        let mut p = pod();
        let at = "metadata.annotations[podvisor.io/hibernate-after]";
        for good in ["30s", "5m", "1h30m", "1.5h", "500ms", "90s"] {
            p.metadata
                .annotations
                .insert(crate::HIBERNATE_AFTER_ANNOTATION.into(), good.into());
            assert!(validate_pod(&p).is_ok(), "{good}: {}", problems(&p));
        }
        for (bad, why) in [
            ("5", "a number needs a unit"),
            ("5 min", "unknown unit \" min\""),
            ("1d", "unknown unit \"d\""),
            ("-5s", "a duration has no sign"),
            ("", "the duration is empty"),
            ("1e9h", "unknown unit \"e\""),
            ("9999999h", "longer than Go can hold"),
            ("0s", "is zero"),
        ] {
            p.metadata
                .annotations
                .insert(crate::HIBERNATE_AFTER_ANNOTATION.into(), bad.into());
            let errors = validate_pod(&p).unwrap_err();
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
            assert_eq!(errors[0].field, at);
            let e = &errors[0].message;
            assert!(e.contains(why), "{bad}: {e}");
            assert!(
                e.contains("such as 30s, 5m, 1h30m, 1.5h or 500ms"),
                "says what is accepted: {e}"
            );
        }
        // Other annotations stay free-form.
        let mut p = pod();
        p.metadata
            .annotations
            .insert("example.com/after".into(), "5x".into());
        assert!(validate_pod(&p).is_ok());
    }

    #[test]
    fn host_port_conflicts() {
        use crate::pod::{HostPort, Protocol};
        let hp = |ip: Option<&str>, protocol, port| HostPort {
            protocol,
            ip: ip.map(|ip| ip.parse().unwrap()),
            port,
        };
        let any = hp(None, Protocol::Tcp, 80);
        assert!(any.conflicts_with(&hp(Some("127.0.0.1"), Protocol::Tcp, 80)));
        assert!(hp(Some("0.0.0.0"), Protocol::Tcp, 80).conflicts_with(&hp(
            Some("10.0.0.1"),
            Protocol::Tcp,
            80
        )));
        assert!(!any.conflicts_with(&hp(None, Protocol::Udp, 80)));
        assert!(!any.conflicts_with(&hp(None, Protocol::Tcp, 81)));
        assert!(
            !hp(Some("127.0.0.1"), Protocol::Tcp, 80).conflicts_with(&hp(
                Some("127.0.0.2"),
                Protocol::Tcp,
                80
            ))
        );
        assert_eq!(
            hp(Some("::1"), Protocol::Udp, 53).to_string(),
            "[::1]:53/UDP"
        );
    }
}
