//! Registry credentials in the docker `config.json` the user already has:
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. Reads the
//! `auths` map (`auth` = base64 of `user:password`, or `username` and
//! `password` fields); [`store`] adds an entry as `docker login` would,
//! keeping everything else in the file, and leaves the file mode 0600.
//! Credential helpers (`credsStore`, `credHelpers`) are not run.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};

use crate::ImageError;

/// The key docker uses for Docker Hub in `auths`.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// Where docker (and podvisor) keep registry credentials.
pub fn docker_config_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("config.json");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".docker/config.json")
}

/// The hostname an `auths` key or registry name stands for: scheme and path
/// dropped, Docker Hub's aliases folded into `docker.io`.
fn hostname(key: &str) -> String {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = rest.split('/').next().unwrap_or(rest).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        _ => host,
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::BadCredentials {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_config(path: &Path) -> Result<Option<Map<String, Value>>, ImageError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ImageError::io(format!("read {}", path.display()), e)),
    };
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(bad(path, "not a JSON object")),
        Err(e) => Err(bad(path, format!("not valid JSON: {e}"))),
    }
}

/// The credentials `path` holds for `registry`, if any.
pub fn lookup(path: &Path, registry: &str) -> Result<Option<Credentials>, ImageError> {
    let Some(config) = read_config(path)? else {
        return Ok(None);
    };
    let want = hostname(registry);
    let Some(auths) = config.get("auths").and_then(Value::as_object) else {
        return Ok(None);
    };
    for (key, entry) in auths {
        if hostname(key) != want {
            continue;
        }
        if let Some(auth) = entry
            .get("auth")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
        {
            let decoded = BASE64
                .decode(auth.trim())
                .map_err(|e| bad(path, format!("auths.\"{key}\".auth is not base64: {e}")))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| bad(path, format!("auths.\"{key}\".auth is not UTF-8")))?;
            let (user, pass) = decoded
                .split_once(':')
                .ok_or_else(|| bad(path, format!("auths.\"{key}\".auth is not `user:password`")))?;
            return Ok(Some(Credentials {
                username: user.to_string(),
                password: pass.to_string(),
            }));
        }
        let field = |name: &str| entry.get(name).and_then(Value::as_str).map(str::to_string);
        if let (Some(username), Some(password)) = (field("username"), field("password")) {
            return Ok(Some(Credentials { username, password }));
        }
    }
    Ok(None)
}

/// Records `credentials` for `registry` in the config at `path` (created
/// with its directory if missing), keeping the rest of the file. The file is
/// replaced atomically and left readable by its owner only.
pub fn store(path: &Path, registry: &str, credentials: &Credentials) -> Result<(), ImageError> {
    let mut config = read_config(path)?.unwrap_or_default();
    let host = hostname(registry);
    let key = if host == "docker.io" {
        DOCKER_HUB_KEY.to_string()
    } else {
        host.clone()
    };
    let auths = config
        .entry("auths")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(auths) = auths else {
        return Err(bad(path, "`auths` is not an object"));
    };
    // One entry per registry: drop other spellings of the same host.
    auths.retain(|k, _| hostname(k) != host);
    let token = BASE64.encode(format!("{}:{}", credentials.username, credentials.password));
    auths.insert(key, serde_json::json!({ "auth": token }));

    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| ImageError::io(format!("create {}", dir.display()), e))?;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let tmp = dir.join(format!(".config.json.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(&serde_json::to_vec_pretty(&Value::Object(config))?)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        ImageError::io(format!("write {}", path.display()), e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(u: &str, p: &str) -> Credentials {
        Credentials {
            username: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn reads_docker_auths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let alice = BASE64.encode("alice:s3cr:et");
        fs::write(
            &path,
            serde_json::json!({
                "auths": {
                    "https://index.docker.io/v1/": {"auth": alice},
                    "127.0.0.1:5000": {"username": "bob", "password": "pw"},
                    "http://example.com/v2/": {"auth": BASE64.encode("carol:x")},
                },
                "credsStore": "desktop",
            })
            .to_string(),
        )
        .unwrap();
        assert_eq!(
            lookup(&path, "docker.io").unwrap(),
            Some(creds("alice", "s3cr:et"))
        );
        assert_eq!(
            lookup(&path, "127.0.0.1:5000").unwrap(),
            Some(creds("bob", "pw"))
        );
        assert_eq!(
            lookup(&path, "example.com").unwrap(),
            Some(creds("carol", "x"))
        );
        assert_eq!(lookup(&path, "quay.io").unwrap(), None);
        assert_eq!(
            lookup(&dir.path().join("missing.json"), "quay.io").unwrap(),
            None
        );
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        fs::write(&path, r#"{"auths": {"r": {"auth": "!!"}}}"#).unwrap();
        let err = lookup(&path, "r").unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("base64"),
            "{err}"
        );
        fs::write(&path, "{").unwrap();
        assert!(
            lookup(&path, "r")
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
    }

    #[test]
    fn store_keeps_other_entries_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.json");
        store(&path, "127.0.0.1:5000", &creds("a", "1")).unwrap();
        store(&path, "docker.io", &creds("b", "2")).unwrap();
        store(&path, "127.0.0.1:5000", &creds("c", "3")).unwrap();
        assert_eq!(
            lookup(&path, "127.0.0.1:5000").unwrap(),
            Some(creds("c", "3"))
        );
        assert_eq!(
            lookup(&path, "index.docker.io").unwrap(),
            Some(creds("b", "2"))
        );
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let json: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert!(json["auths"][DOCKER_HUB_KEY].is_object(), "{json}");
    }
}
