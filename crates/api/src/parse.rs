//! Reading objects from YAML or JSON. A field podvisor does not support is
//! an error naming its path (`spec.volumes[0].hostPath: not supported by
//! podvisor`), never silently dropped.

use serde::de::DeserializeOwned;

use crate::pod::Pod;
use crate::validate::{FieldError, validate_pod, validate_volume};
use crate::volume::PersistentVolumeClaim;

/// The text format of a request body or file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    /// The format a `Content-Type` names: YAML for `application/yaml`,
    /// `application/x-yaml` and `text/yaml`; JSON otherwise.
    pub fn from_content_type(content_type: Option<&str>) -> Format {
        match content_type.map(|c| c.split(';').next().unwrap_or("").trim()) {
            Some("application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml") => {
                Format::Yaml
            }
            _ => Format::Json,
        }
    }
}

/// Why a document could not be read as an object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not valid YAML/JSON, or a value of the wrong type or an unknown
    /// field at `field`.
    #[error("{}", syntax_message(.field, .message, .location))]
    Syntax {
        /// The path of the field at fault (`spec.containers[0].image`), if known.
        field: Option<String>,
        message: String,
        /// Line and column in the document, if known.
        location: Option<(usize, usize)>,
    },
    /// Well-formed but invalid: every problem found.
    #[error("{}", join_errors(.0))]
    Invalid(Vec<FieldError>),
}

fn syntax_message(
    field: &Option<String>,
    message: &str,
    location: &Option<(usize, usize)>,
) -> String {
    let mut out = match field {
        Some(f) if !f.is_empty() => format!("{f}: {message}"),
        _ => message.to_string(),
    };
    if let Some((line, column)) = location {
        out.push_str(&format!(" (line {line}, column {column})"));
    }
    out
}

fn join_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads and validates one Pod.
pub fn parse_pod(text: &str, format: Format) -> Result<Pod, ParseError> {
    let pod: Pod = parse_object(text, format)?;
    validate_pod(&pod).map_err(ParseError::Invalid)?;
    Ok(pod)
}

/// Reads and validates every Pod in a YAML stream (documents separated by
/// `---`; empty documents are skipped). JSON is one document.
pub fn parse_pods(text: &str, format: Format) -> Result<Vec<Pod>, ParseError> {
    if format == Format::Json {
        return Ok(vec![parse_pod(text, format)?]);
    }
    let mut pods = Vec::new();
    for (first_line, doc) in yaml_documents(text) {
        let pod = parse_pod(&doc, Format::Yaml).map_err(|e| shift(e, first_line))?;
        pods.push(pod);
    }
    if pods.is_empty() {
        return Err(ParseError::Syntax {
            field: None,
            message: "the document is empty: expected a Pod".into(),
            location: None,
        });
    }
    Ok(pods)
}

/// Reads and validates one PersistentVolumeClaim (its `status`, the
/// server's, is read but not checked).
pub fn parse_volume(text: &str, format: Format) -> Result<PersistentVolumeClaim, ParseError> {
    let pvc: PersistentVolumeClaim = parse_object(text, format)?;
    validate_volume(&pvc).map_err(ParseError::Invalid)?;
    Ok(pvc)
}

/// An object of a file `podvisor apply` reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Pod(Box<Pod>),
    PersistentVolumeClaim(Box<PersistentVolumeClaim>),
}

/// The `kind` of a document, read before the rest.
#[derive(serde::Deserialize)]
struct KindOnly {
    #[serde(default)]
    kind: Option<String>,
}

/// Reads and validates one object, Pod or PersistentVolumeClaim by its
/// `kind` (a document without one is a Pod).
pub fn parse_any(text: &str, format: Format) -> Result<Object, ParseError> {
    let kind = parse_object::<KindOnly>(text, format)?.kind;
    match kind.as_deref() {
        None | Some("Pod") => Ok(Object::Pod(Box::new(parse_pod(text, format)?))),
        Some("PersistentVolumeClaim") => Ok(Object::PersistentVolumeClaim(Box::new(parse_volume(
            text, format,
        )?))),
        Some(other) => Err(ParseError::Invalid(vec![FieldError {
            field: "kind".into(),
            message: format!(
                "{other:?} is not supported by podvisor: only Pod and PersistentVolumeClaim"
            ),
        }])),
    }
}

/// Reads and validates every object of a YAML stream (or one JSON
/// document): Pods and PersistentVolumeClaims, in the stream's order.
pub fn parse_objects(text: &str, format: Format) -> Result<Vec<Object>, ParseError> {
    if format == Format::Json {
        return Ok(vec![parse_any(text, format)?]);
    }
    let mut objects = Vec::new();
    for (first_line, doc) in yaml_documents(text) {
        objects.push(parse_any(&doc, Format::Yaml).map_err(|e| shift(e, first_line))?);
    }
    if objects.is_empty() {
        return Err(ParseError::Syntax {
            field: None,
            message: "the document is empty: expected a Pod or a PersistentVolumeClaim".into(),
            location: None,
        });
    }
    Ok(objects)
}

/// `e` with its line counted from the stream's start, for a document
/// starting on line `first_line`.
fn shift(e: ParseError, first_line: usize) -> ParseError {
    match e {
        ParseError::Syntax {
            field,
            message,
            location,
        } => ParseError::Syntax {
            field,
            message,
            location: location.map(|(line, column)| (line + first_line - 1, column)),
        },
        other => other,
    }
}

/// The non-empty documents of a YAML stream with the line each starts on.
fn yaml_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (index, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") || line == "..." {
            docs.push((start, std::mem::take(&mut current)));
            start = index + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs.retain(|(_, doc)| {
        doc.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

/// Reads an object of type `T` (without validation), naming the path of a
/// field at fault.
pub fn parse_object<T: DeserializeOwned>(text: &str, format: Format) -> Result<T, ParseError> {
    if text.trim().is_empty() {
        return Err(ParseError::Syntax {
            field: None,
            message: "the document is empty".into(),
            location: None,
        });
    }
    if let Some(line) = crate::nesting::too_deep(text, format, crate::nesting::MAX_NESTING) {
        return Err(ParseError::Syntax {
            field: None,
            message: format!(
                "the document nests deeper than {} levels: refused before parsing",
                crate::nesting::MAX_NESTING
            ),
            location: Some((line, 1)),
        });
    }
    match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let location = (inner.line() > 0).then(|| (inner.line(), inner.column()));
                let message = strip_location(&inner.to_string(), location);
                field_error(path, message, location)
            })?;
            de.end().map_err(|e| ParseError::Syntax {
                field: None,
                message: "trailing characters after the object".into(),
                location: Some((e.line(), e.column())),
            })?;
            Ok(value)
        }
        Format::Yaml => {
            let de = yaml_serde::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                yaml_error(e.into_inner(), Some(path))
            })
        }
    }
}

fn yaml_error(e: yaml_serde::Error, path: Option<String>) -> ParseError {
    let location = e.location().map(|l| (l.line(), l.column()));
    let mut message = strip_location(&e.to_string(), location);
    // yaml_serde prefixes some messages with (part of) the path itself.
    if let Some((prefix, rest)) = message.split_once(": ") {
        let known = path.as_deref().unwrap_or("");
        if !prefix.contains(' ') && known.starts_with(prefix) {
            message = rest.to_string();
        }
    }
    match path {
        Some(path) => field_error(path, message, location),
        None => ParseError::Syntax {
            field: None,
            message: format!("invalid YAML: {message}"),
            location,
        },
    }
}

/// Removes the " at line L column C" that serde_json and yaml_serde append.
fn strip_location(message: &str, location: Option<(usize, usize)>) -> String {
    if let Some((line, column)) = location {
        let suffix = format!(" at line {line} column {column}");
        if let Some(stripped) = message.strip_suffix(&suffix) {
            return stripped.to_string();
        }
    }
    message.to_string()
}

/// Turns serde's "unknown field `x`, expected ..." into
/// "PATH.x: not supported by podvisor (supported here: ...)".
fn field_error(path: String, message: String, location: Option<(usize, usize)>) -> ParseError {
    let path = if path == "." || path == "?" {
        String::new()
    } else {
        path
    };
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((name, expected)) = rest.split_once('`')
    {
        let field = if path.is_empty() || path == name {
            name.to_string()
        } else if path.ends_with(&format!(".{name}")) {
            path.clone()
        } else {
            format!("{path}.{name}")
        };
        let supported = expected
            .trim_start_matches(',')
            .trim()
            .trim_start_matches("expected one of ")
            .trim_start_matches("expected ")
            .replace('`', "");
        let message = if supported.is_empty() || supported == "there are no fields" {
            "not supported by podvisor".to_string()
        } else {
            format!("not supported by podvisor (supported here: {supported})")
        };
        return ParseError::Syntax {
            field: Some(field),
            message,
            location,
        };
    }
    ParseError::Syntax {
        field: (!path.is_empty()).then_some(path),
        message,
        location,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels:
    app: web
spec:
  containers:
  - name: main
    image: registry.local/busybox:1
    command: [sh, -c]
    args: ['echo hi']
    env:
    - name: A
      value: b
    ports:
    - containerPort: 80
      hostPort: 8080
    resources:
      requests: {cpu: 250m, memory: 64Mi}
      limits: {cpu: 1, memory: 128Mi}
  restartPolicy: OnFailure
";

    #[test]
    fn a_kubernetes_pod_yaml_is_read() {
        let pod = parse_pod(GOOD, Format::Yaml).unwrap();
        assert_eq!(pod.metadata.name, "web");
        assert_eq!(pod.metadata.namespace(), "default");
        assert_eq!(pod.spec.restart_policy, crate::RestartPolicy::OnFailure);
        let c = &pod.spec.containers[0];
        assert_eq!(
            c.command.as_deref(),
            Some(&["sh".to_string(), "-c".into()][..])
        );
        assert_eq!(c.ports[0].host_port, Some(8080));
        let size = pod.spec.vm_size().unwrap();
        assert_eq!(size.cpu, 1000);
        assert_eq!(size.memory, 128 << 20);
        // JSON round trip reads back the same pod.
        let json = serde_json::to_string(&pod).unwrap();
        assert_eq!(parse_pod(&json, Format::Json).unwrap(), pod);
    }

    #[test]
    fn an_unknown_field_names_its_path() {
        let yaml = GOOD.replace(
            "    command: [sh, -c]\n",
            "    command: [sh, -c]\n    livenessProbe: {}\n",
        );
        let err = parse_pod(&yaml, Format::Yaml).unwrap_err().to_string();
        assert!(
            err.starts_with("spec.containers[0].livenessProbe: not supported by podvisor"),
            "{err}"
        );
        assert!(err.contains("line 13, column 5"), "{err}");

        let json = r#"{"metadata":{"name":"a"},"spec":{"containers":[{"name":"a","image":"b"}],"hostNetwork":true}}"#;
        let err = parse_pod(json, Format::Json).unwrap_err().to_string();
        assert!(
            err.starts_with("spec.hostNetwork: not supported by podvisor"),
            "{err}"
        );

        let err = parse_pod("kind: Pod\nfoo: 1\nspec: {containers: []}\n", Format::Yaml)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("foo: not supported by podvisor"), "{err}");
    }

    #[test]
    fn invalid_yaml_and_wrong_types_are_clear() {
        let err = parse_pod("spec: [\n", Format::Yaml)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line"), "{err}");
        let err = parse_pod(
            "metadata: {name: a}\nspec:\n  containers:\n  - name: a\n    image: b\n    ports:\n    - containerPort: http\n",
            Format::Yaml,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("spec.containers[0].ports[0].containerPort:"),
            "{err}"
        );
        let err = parse_pod("", Format::Yaml).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let err = parse_pod("{\"spec\": 1} x", Format::Json)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("spec:"), "{err}");
    }

    #[test]
    fn dns_settings_are_read_and_written_in_kubernetes_shapes() {
        // As kubectl writes it.
        let yaml = format!(
            "{GOOD}  dnsPolicy: ClusterFirst\n  dnsConfig:\n    nameservers: [192.0.2.53]\n    searches: [corp.example]\n    options:\n    - name: ndots\n      value: '2'\n    - name: edns0\n  hostAliases:\n  - ip: 192.0.2.7\n    hostnames: [db.test, db]\n"
        );
        let pod = parse_pod(&yaml, Format::Yaml).unwrap();
        assert_eq!(pod.spec.dns_policy, crate::DnsPolicy::ClusterFirst);
        let json = serde_json::to_value(&pod).unwrap();
        assert_eq!(json["spec"]["dnsPolicy"], "ClusterFirst");
        assert_eq!(
            json["spec"]["dnsConfig"],
            serde_json::json!({
                "nameservers": ["192.0.2.53"],
                "searches": ["corp.example"],
                "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}],
            })
        );
        assert_eq!(
            json["spec"]["hostAliases"],
            serde_json::json!([{"ip": "192.0.2.7", "hostnames": ["db.test", "db"]}])
        );
        assert_eq!(parse_pod(&json.to_string(), Format::Json).unwrap(), pod);
        // Left out or empty, it is Kubernetes' default.
        let pod = parse_pod(GOOD, Format::Yaml).unwrap();
        assert_eq!(pod.spec.dns_policy, crate::DnsPolicy::ClusterFirst);
        let empty = format!("{GOOD}  dnsPolicy: ''\n");
        assert_eq!(
            parse_pod(&empty, Format::Yaml).unwrap().spec.dns_policy,
            crate::DnsPolicy::ClusterFirst
        );
        let err = parse_pod(&format!("{GOOD}  dnsPolicy: Cluster\n"), Format::Yaml)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("spec.dnsPolicy: unknown variant"), "{err}");
        let err = parse_pod(
            &format!("{GOOD}  dnsConfig: {{nameservers: [1.1.1.1], domain: x}}\n"),
            Format::Yaml,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("spec.dnsConfig.domain: not supported by podvisor"),
            "{err}"
        );
        let err = parse_pod(
            &format!("{GOOD}  dnsPolicy: None\n  dnsConfig: {{searches: [a.b]}}\n"),
            Format::Yaml,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("spec.dnsConfig.nameservers: must provide at least one DNS nameserver"),
            "{err}"
        );
    }

    #[test]
    fn several_documents() {
        let text = format!("{GOOD}\n---\n{}", GOOD.replace("name: web", "name: web2"));
        let pods = parse_pods(&text, Format::Yaml).unwrap();
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[1].metadata.name, "web2");
        let bad = format!("{GOOD}\n---\n{}", GOOD.replace("name: main", "name: MAIN"));
        let err = parse_pods(&bad, Format::Yaml).unwrap_err().to_string();
        assert!(err.contains("spec.containers[0].name"), "{err}");
    }

    #[test]
    fn deep_documents_are_refused_before_parsing() {
        let deep = format!("metadata: {{name: a}}\nspec: {}", "[".repeat(100_000));
        let started = std::time::Instant::now();
        let err = parse_pod(&deep, Format::Yaml).unwrap_err().to_string();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(
            err.starts_with("the document nests deeper than 64 levels"),
            "{err}"
        );
        assert!(err.contains("line 2"), "{err}");
        let deep_json = format!("{{\"spec\": {}", "{\"a\": ".repeat(65));
        let err = parse_pod(&deep_json, Format::Json).unwrap_err().to_string();
        assert!(err.contains("deeper than 64 levels"), "{err}");
    }

    #[test]
    fn pods_over_the_size_limits_name_the_limit() {
        let mut pod = parse_pod(GOOD, Format::Yaml).unwrap();
        pod.metadata
            .annotations
            .insert("a".into(), "x".repeat(256 << 10));
        let err = crate::validate_pod(&pod).unwrap_err();
        assert_eq!(err[0].field, "metadata.annotations");
        assert!(err[0].message.contains("limit is 262144 bytes"), "{err:?}");
        pod.metadata.annotations.clear();
        let c = pod.spec.containers[0].clone();
        pod.spec.containers[0].env = (0..1025)
            .map(|i| crate::EnvVar {
                name: format!("V{i}"),
                value: "x".repeat(1600),
            })
            .collect();
        let err = crate::validate_pod(&pod).unwrap_err();
        let fields: Vec<&str> = err.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["pod", "spec.containers[0].env"], "{err:?}");
        assert!(err[0].message.contains("limit is 1572864 bytes"), "{err:?}");
        assert!(err[1].message.contains("limit is 1024"), "{err:?}");
        pod.spec.containers = (0..65)
            .map(|i| crate::Container {
                name: format!("c{i}"),
                ..c.clone()
            })
            .collect();
        let err = crate::validate_pod(&pod).unwrap_err();
        assert_eq!(err[0].field, "spec.containers");
        assert!(err[0].message.contains("limit is 64"), "{err:?}");
    }
}
