//! Network configuration lists: finding the one to use in a directory the way
//! libcni does, validating it, and writing podvisor's default when the
//! directory has none.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use super::CniError;
use crate::atomic_file::write_atomically;

/// CNI spec versions whose result format podvisor reads (0.3.0 introduced
/// today's `ips` / `interfaces`; 0.2.0's `ip4` / `ip6` results are not read).
pub const SUPPORTED_CNI_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// File extensions libcni considers configuration files.
const CONF_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

/// A network configuration list (`*.conflist`, or a single-plugin `*.conf`
/// turned into a list of one as libcni's `ConfListFromConf` does).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfList {
    /// The network's name (`name`), also host-local's default IPAM directory.
    pub name: String,
    /// `cniVersion` of the list; every plugin is invoked with it.
    pub cni_version: String,
    /// `disableCheck`: CHECK is skipped for this network.
    pub disable_check: bool,
    /// The plugin configurations in chain order, each with a valid `type`.
    pub plugins: Vec<Map<String, Value>>,
}

impl NetworkConfList {
    /// Parses and validates a configuration; `origin` names it in errors.
    pub fn parse(bytes: &[u8], origin: &Path) -> Result<Self, CniError> {
        let bad = |reason: String| CniError::BadConfList {
            path: origin.to_path_buf(),
            reason,
        };
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Value::Object(mut top) = value else {
            return Err(bad("not a JSON object".into()));
        };
        let name = match top.get("name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(bad("no network \"name\"".into())),
        };
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad(format!(
                "network name {name:?} has characters other than letters, digits, '-', '_', '.'"
            )));
        }
        let cni_version = match top.get("cniVersion") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(bad("no \"cniVersion\"".into())),
        };
        if !SUPPORTED_CNI_VERSIONS.contains(&cni_version.as_str()) {
            return Err(bad(format!(
                "cniVersion {cni_version:?} is not one of {SUPPORTED_CNI_VERSIONS:?}"
            )));
        }
        let disable_check = matches!(top.get("disableCheck"), Some(Value::Bool(true)));
        let plugins: Vec<Map<String, Value>> = match top.remove("plugins") {
            Some(Value::Array(list)) => list
                .into_iter()
                .enumerate()
                .map(|(i, p)| match p {
                    Value::Object(m) => Ok(m),
                    _ => Err(bad(format!("plugin {i} is not a JSON object"))),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("\"plugins\" is not a list".into())),
            // A single-plugin .conf: the whole object is the plugin.
            None => vec![top],
        };
        if plugins.is_empty() {
            return Err(bad("\"plugins\" is empty".into()));
        }
        for (i, plugin) in plugins.iter().enumerate() {
            match plugin.get("type") {
                Some(Value::String(t)) if is_plain_file_name(t) => {}
                Some(Value::String(t)) => {
                    return Err(bad(format!(
                        "plugin {i} has type {t:?}, which is not a plain program name"
                    )));
                }
                _ => return Err(bad(format!("plugin {i} has no \"type\""))),
            }
        }
        Ok(Self {
            name,
            cni_version,
            disable_check,
            plugins,
        })
    }

    /// The list as JSON, as stored in an attachment's record (so DEL runs the
    /// chain ADD ran, whatever the directory holds by then).
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "cniVersion": self.cni_version,
            "disableCheck": self.disable_check,
            "plugins": self.plugins,
        })
    }

    /// The `type` of plugin `i`.
    pub fn plugin_type(&self, i: usize) -> &str {
        self.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

pub(crate) fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

/// The configuration files of `dir`, sorted by name as libcni's `ConfFiles`
/// returns them. A missing directory has none.
pub fn conf_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CONF_EXTENSIONS.contains(&e));
        if wanted && entry.file_type()?.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// podvisor's default network, written when the configuration directory has
/// no configuration at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultNetwork {
    /// Network name (and file name `10-<name>.conflist`).
    pub name: String,
    /// The host bridge the pods' veths join.
    pub bridge: String,
    /// IPv4 pod subnet in CIDR form.
    pub subnet: String,
    /// host-local's `dataDir`; `None` keeps the plugin's default
    /// (`/var/lib/cni/networks`).
    pub ipam_data_dir: Option<PathBuf>,
}

impl Default for DefaultNetwork {
    /// `10.87.0.0/24`: not docker's 172.17.0.0/16 (nor its 172.18-31 and
    /// 192.168 pools), not podman's 10.88.0.0/16 nor the 10.89.0.0/16 pool
    /// `podman network create` takes /24s from, not the Kubernetes service
    /// range 10.96.0.0/12 nor flannel's 10.244.0.0/16.
    fn default() -> Self {
        Self {
            name: "podvisor".into(),
            bridge: "podvisor0".into(),
            subnet: "10.87.0.0/24".into(),
            ipam_data_dir: None,
        }
    }
}

impl DefaultNetwork {
    /// The conflist: bridge (gateway, masquerade, hairpin, host-local IPAM)
    /// -> firewall -> portmap (port mappings) -> tuning.
    pub fn conflist_json(&self) -> Value {
        let mut ipam = json!({
            "type": "host-local",
            "ranges": [[{ "subnet": self.subnet }]],
            "routes": [{ "dst": "0.0.0.0/0" }],
        });
        if let Some(dir) = &self.ipam_data_dir {
            ipam["dataDir"] = json!(dir);
        }
        json!({
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": true,
                    "hairpinMode": true,
                    "ipam": ipam,
                },
                { "type": "firewall", "backend": "iptables" },
                { "type": "portmap", "capabilities": { "portMappings": true } },
                { "type": "tuning" },
            ],
        })
    }

    /// The file it is written to in `dir`.
    pub fn file_in(&self, dir: &Path) -> PathBuf {
        dir.join(format!("10-{}.conflist", self.name))
    }
}

/// The first configuration in `dir` (by name), after writing `default` there
/// (atomically) when the directory has none. Returns the list and its file.
pub fn load_or_write_default(
    dir: &Path,
    default: &DefaultNetwork,
) -> Result<(NetworkConfList, PathBuf), CniError> {
    let io_err = |source| CniError::ConfDir {
        dir: dir.to_path_buf(),
        source,
    };
    let files = conf_files(dir).map_err(io_err)?;
    let path = match files.into_iter().next() {
        Some(path) => path,
        None => {
            fs::create_dir_all(dir).map_err(io_err)?;
            let path = default.file_in(dir);
            let mut bytes = serde_json::to_vec_pretty(&default.conflist_json())
                .expect("a JSON value serializes");
            bytes.push(b'\n');
            write_atomically(&path, &bytes, 0o644).map_err(io_err)?;
            tracing::info!(path = %path.display(), "wrote the default CNI network");
            path
        }
    };
    let bytes = fs::read(&path).map_err(|source| CniError::ConfFile {
        path: path.clone(),
        source,
    })?;
    Ok((NetworkConfList::parse(&bytes, &path)?, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_first_file_by_name_among_cni_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let list = |name: &str| {
            format!(r#"{{"cniVersion":"1.0.0","name":"{name}","plugins":[{{"type":"bridge"}}]}}"#)
        };
        fs::write(dir.path().join("20-b.conflist"), list("b")).unwrap();
        fs::write(dir.path().join("10-a.conflist"), list("a")).unwrap();
        fs::write(dir.path().join("00-readme.txt"), "not a config").unwrap();
        let (conf, path) = load_or_write_default(dir.path(), &DefaultNetwork::default()).unwrap();
        assert_eq!(conf.name, "a");
        assert_eq!(path, dir.path().join("10-a.conflist"));
        assert_eq!(conf.plugin_type(0), "bridge");
    }

    #[test]
    fn writes_the_default_when_the_directory_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let conf_dir = dir.path().join("net.d");
        let default = DefaultNetwork::default();
        let (conf, path) = load_or_write_default(&conf_dir, &default).unwrap();
        assert_eq!(path, conf_dir.join("10-podvisor.conflist"));
        let types: Vec<_> = (0..conf.plugins.len())
            .map(|i| conf.plugin_type(i))
            .collect();
        assert_eq!(types, ["bridge", "firewall", "portmap", "tuning"]);
        assert_eq!(
            conf.plugins[0]["ipam"]["ranges"][0][0]["subnet"],
            "10.87.0.0/24"
        );
        assert_eq!(conf.plugins[2]["capabilities"]["portMappings"], true);
        // A second load reads the file written by the first.
        let (again, _) = load_or_write_default(&conf_dir, &default).unwrap();
        assert_eq!(again, conf);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list_of_one() {
        let conf = NetworkConfList::parse(
            br#"{"cniVersion":"0.4.0","name":"one","type":"ptp","ipam":{}}"#,
            Path::new("x.conf"),
        )
        .unwrap();
        assert_eq!(conf.plugins.len(), 1);
        assert_eq!(conf.plugin_type(0), "ptp");
    }

    #[test]
    fn bad_configs_are_refused_naming_the_file_and_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("{", "not valid JSON"),
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#,
                "no network \"name\"",
            ),
            (
                r#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"bridge"}]}"#,
                "cniVersion \"0.2.0\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "\"plugins\" is empty",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"x"}]}"#,
                "plugin 0 has no \"type\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../../bin/sh"}]}"#,
                "not a plain program name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"../n","plugins":[{"type":"bridge"}]}"#,
                "network name",
            ),
        ];
        for (text, expected) in cases {
            let err =
                NetworkConfList::parse(text.as_bytes(), Path::new("/etc/cni/net.d/bad.conflist"))
                    .unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("/etc/cni/net.d/bad.conflist"), "{msg}");
            assert!(msg.contains(expected), "{text}: {msg}");
        }
    }
}
