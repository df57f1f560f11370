//! Registry credentials in the docker `config.json` the user already has:
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. Reads the
//! `auths` map (`auth` = base64 of `user:password`, or `username` and
//! `password` fields); [`store`] adds an entry as `docker login` would,
//! keeping everything else in the file, and leaves the file mode 0600.
//! Credential helpers are run as docker runs them: the registry's entry in
//! `credHelpers`, else `credsStore`, names a `docker-credential-NAME`
//! program on `PATH`, asked with `get` and the server URL on stdin; when it
//! has nothing for the registry, the `auths` map is read.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

/// The credentials the docker config at `path` gives for `registry`, if
/// any: from its credential helper (looked up on `PATH`), else `auths`.
pub fn lookup(path: &Path, registry: &str) -> Result<Option<Credentials>, ImageError> {
    let search = std::env::var_os("PATH").unwrap_or_default();
    lookup_in(path, registry, &search)
}

/// [`lookup`], with credential helpers looked up in `search` (a `PATH`).
fn lookup_in(
    path: &Path,
    registry: &str,
    search: &OsStr,
) -> Result<Option<Credentials>, ImageError> {
    let Some(config) = read_config(path)? else {
        return Ok(None);
    };
    let want = hostname(registry);
    let helper = config
        .get("credHelpers")
        .and_then(Value::as_object)
        .and_then(|helpers| {
            helpers
                .iter()
                .find(|(key, _)| hostname(key) == want)
                .and_then(|(_, name)| name.as_str())
        })
        .or_else(|| config.get("credsStore").and_then(Value::as_str))
        .filter(|name| !name.is_empty());
    let mut identity_token = false;
    if let Some(helper) = helper {
        match run_helper(path, helper, &want, search)? {
            HelperAnswer::Found(found) => return Ok(Some(found)),
            HelperAnswer::NotFound => {}
            HelperAnswer::IdentityToken => identity_token = true,
        }
    }
    let found = lookup_auths(path, &config, &want)?;
    if found.is_none() && identity_token {
        return Err(bad(
            path,
            format!(
                "the credential helper holds an identity token for {registry}, which podvisor \
                 cannot use yet: `podvisor login {registry}` with a user name and a password \
                 or access token"
            ),
        ));
    }
    Ok(found)
}

/// The `auths` entry of `config` (read from `path`) for the host `want`.
fn lookup_auths(
    path: &Path,
    config: &Map<String, Value>,
    want: &str,
) -> Result<Option<Credentials>, ImageError> {
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

/// What a credential helper said.
enum HelperAnswer {
    Found(Credentials),
    /// It has nothing for the registry.
    NotFound,
    /// It holds an OAuth identity (refresh) token, which podvisor does not
    /// exchange.
    IdentityToken,
}

/// Asks the credential helper `docker-credential-NAME` for the registry
/// `host`, as docker does (`get`, the server URL on stdin, JSON
/// `{"Username", "Secret"}` on stdout).
fn run_helper(
    config: &Path,
    name: &str,
    host: &str,
    search: &OsStr,
) -> Result<HelperAnswer, ImageError> {
    let program = format!("docker-credential-{name}");
    let helper_error =
        |reason: String| bad(config, format!("credential helper {program}: {reason}"));
    if name.contains('/') {
        return Err(helper_error("a helper name may not contain '/'".into()));
    }
    let executable = std::env::split_paths(search)
        .map(|dir| dir.join(&program))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            helper_error(
                "not found on PATH (install it, or remove it from credsStore/credHelpers)".into(),
            )
        })?;
    let server_url = if host == "docker.io" {
        DOCKER_HUB_KEY
    } else {
        host
    };
    let mut child = Command::new(&executable)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| helper_error(format!("cannot run {}: {e}", executable.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading gets EPIPE: its answer counts.
        let _ = stdin.write_all(server_url.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| helper_error(format!("waiting for it: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // docker-credential-helpers' own words for "nothing stored".
        if stdout.contains("credentials not found") {
            return Ok(HelperAnswer::NotFound);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(helper_error(format!(
            "`get` for {server_url} failed ({}): {}",
            out.status,
            format!("{} {}", stdout.trim(), stderr.trim()).trim()
        )));
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Answer {
        username: String,
        secret: String,
    }
    let answer: Answer = serde_json::from_slice(&out.stdout).map_err(|e| {
        helper_error(format!(
            "its answer for {server_url} is not {{\"Username\", \"Secret\"}} JSON: {e}"
        ))
    })?;
    if answer.username == "<token>" {
        return Ok(HelperAnswer::IdentityToken);
    }
    Ok(HelperAnswer::Found(Credentials {
        username: answer.username,
        password: answer.secret,
    }))
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

    /// A helper script in a directory of its own, answering for
    /// `registry.example` and saying "not found" for anything else.
    fn helper_dir(name: &str, body: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join(format!("docker-credential-{name}"));
        fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    const ANSWERS: &str = r#"[ "$1" = get ] || exit 2
read -r url
case "$url" in
  registry.example) echo '{"ServerURL":"registry.example","Username":"helper-user","Secret":"helper-pw"}' ;;
  https://index.docker.io/v1/) echo '{"ServerURL":"x","Username":"hub-user","Secret":"hub-pw"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac"#;

    #[test]
    fn credential_helpers_answer_first_then_auths() {
        let helpers = helper_dir("fake", ANSWERS);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        fs::write(
            &path,
            serde_json::json!({
                "auths": {
                    "registry.example": {},
                    "other.example": {"auth": BASE64.encode("file-user:file-pw")},
                },
                "credsStore": "fake",
            })
            .to_string(),
        )
        .unwrap();
        let search = helpers.path().as_os_str();
        assert_eq!(
            lookup_in(&path, "registry.example", search).unwrap(),
            Some(creds("helper-user", "helper-pw"))
        );
        // Docker Hub is asked for under docker's own key.
        assert_eq!(
            lookup_in(&path, "docker.io", search).unwrap(),
            Some(creds("hub-user", "hub-pw"))
        );
        // Nothing in the helper: the file's entry.
        assert_eq!(
            lookup_in(&path, "other.example", search).unwrap(),
            Some(creds("file-user", "file-pw"))
        );
        assert_eq!(lookup_in(&path, "none.example", search).unwrap(), None);
    }

    #[test]
    fn cred_helpers_pick_a_helper_per_registry() {
        let fake = helper_dir("fake", ANSWERS);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        fs::write(
            &path,
            serde_json::json!({
                "credHelpers": {"registry.example": "fake"},
                "credsStore": "not-installed",
            })
            .to_string(),
        )
        .unwrap();
        let search = fake.path().as_os_str();
        assert_eq!(
            lookup_in(&path, "registry.example", search).unwrap(),
            Some(creds("helper-user", "helper-pw"))
        );
        // Other registries go to credsStore, which is not installed: an
        // error naming it, not an anonymous pull.
        let err = lookup_in(&path, "quay.io", search).unwrap_err().to_string();
        assert!(
            err.contains("docker-credential-not-installed") && err.contains("not found on PATH"),
            "{err}"
        );
    }

    #[test]
    fn a_failing_or_garbled_helper_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        fs::write(&path, r#"{"credsStore": "broken"}"#).unwrap();
        let cases = [
            ("echo 'keyring locked' >&2; exit 3", "keyring locked"),
            ("echo 'not json'", "not {\"Username\", \"Secret\"} JSON"),
        ];
        for (body, expected) in cases {
            let helpers = helper_dir("broken", body);
            let err = lookup_in(&path, "registry.example", helpers.path().as_os_str())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("docker-credential-broken") && err.contains(expected),
                "{body}: {err}"
            );
        }
    }

    #[test]
    fn an_identity_token_gives_way_to_a_login_or_is_an_error() {
        let helpers = helper_dir("hub", r#"echo '{"Username":"<token>","Secret":"refresh"}'"#);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        fs::write(&path, r#"{"credsStore": "hub"}"#).unwrap();
        let search = helpers.path().as_os_str();
        let err = lookup_in(&path, "registry.example", search)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("identity token") && err.contains("podvisor login registry.example"),
            "{err}"
        );
        // What `podvisor login` writes is used then.
        store(&path, "registry.example", &creds("me", "pw")).unwrap();
        assert_eq!(
            lookup_in(&path, "registry.example", search).unwrap(),
            Some(creds("me", "pw"))
        );
    }
}
