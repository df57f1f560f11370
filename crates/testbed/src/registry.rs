//! A real OCI registry for tests: Debian's `docker-registry` (CNCF
//! distribution 2.8) serving on 127.0.0.1 with a free port, storage in a temp
//! dir, optional htpasswd basic auth, and its access log kept so tests can
//! count what was fetched. [`Registry::push`] uploads a [`BuiltImage`] as
//! docker does (monolithic blob uploads, then the manifest).

use std::fs;
use std::io::{self, BufRead};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;

use crate::oci::{Blob, BuiltImage};

/// The registry program (package docker-registry).
pub const REGISTRY_BIN: &str = "docker-registry";

/// A running registry, stopped when dropped.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    addr: String,
    auth: Option<(String, String)>,
    tokens: Option<crate::token_issuer::TokenIssuer>,
    agent: ureq::Agent,
}

/// One line of the access log: a request and how it was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Bytes of the response body.
    pub bytes: u64,
}

impl Registry {
    /// Starts an open registry.
    pub fn start() -> Registry {
        Registry::launch(None, false)
    }

    /// Starts a registry that wants `user`/`password` (htpasswd, bcrypt).
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Registry::launch(Some((user.to_string(), password.to_string())), false)
    }

    /// Starts a registry with bearer-token auth: clients get a token from a
    /// token service ([`crate::token_issuer`]) with `user`/`password`.
    pub fn start_with_token_auth(user: &str, password: &str) -> Registry {
        Registry::launch(Some((user.to_string(), password.to_string())), true)
    }

    /// The token service of a registry with bearer-token auth.
    pub fn token_issuer(&self) -> Option<&crate::token_issuer::TokenIssuer> {
        self.tokens.as_ref()
    }

    fn launch(auth: Option<(String, String)>, token_auth: bool) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("podvisor-registry-")
            .tempdir()
            .expect("temp dir for the registry");
        let tokens = match (&auth, token_auth) {
            (Some((user, password)), true) => Some(crate::token_issuer::TokenIssuer::start(
                dir.path(),
                user,
                password,
            )),
            _ => None,
        };
        let auth_config = match (&auth, &tokens) {
            (_, Some(tokens)) => tokens.registry_config(),
            (None, None) => String::new(),
            (Some((user, password)), None) => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("run htpasswd (package apache2-utils)");
                assert!(out.status.success(), "htpasswd failed");
                let path = dir.path().join("htpasswd");
                fs::write(&path, out.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: podvisor-test\n    path: {}\n",
                    path.display()
                )
            }
        };
        // A port that was free a moment ago; retried if someone took it.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("find a free port")
                .port();
            let addr = format!("127.0.0.1:{port}");
            let config = format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n  secret: podvisor-test-secret\n{auth_config}",
                data = dir.path().join("data").display(),
            );
            let config_path = dir.path().join("config.yml");
            fs::write(&config_path, config).unwrap();
            let mut child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(fs::File::create(dir.path().join("access.log")).unwrap())
                .stderr(fs::File::create(dir.path().join("registry.log")).unwrap())
                .spawn()
                .unwrap_or_else(|e| panic!("start {REGISTRY_BIN} (package docker-registry): {e}"));
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .build()
                .into();
            if wait_ready(&mut child, &agent, &addr) {
                return Registry {
                    child,
                    dir,
                    addr,
                    auth,
                    tokens,
                    agent,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("the registry did not start");
    }

    /// `127.0.0.1:PORT`, the registry part of image references.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `ADDR/repo:tag`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr)
    }

    /// The registry's stderr (its own diagnostics), for failure messages.
    pub fn diagnostics(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    fn authorized(
        &self,
        repo: &str,
        req: ureq::RequestBuilder<ureq::typestate::WithBody>,
    ) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        match (&self.tokens, &self.auth) {
            (Some(tokens), _) => req.header(
                "Authorization",
                format!("Bearer {}", tokens.mint(repo, "pull,push")),
            ),
            (None, None) => req,
            (None, Some((u, p))) => req.header("Authorization", basic(u, p)),
        }
    }

    /// Uploads one blob (monolithic: POST, then PUT with the data), unless
    /// the registry already has it in `repo`.
    pub fn push_blob(&self, repo: &str, blob: &Blob) {
        self.push_raw_blob(repo, &blob.digest, &blob.data);
    }

    fn push_raw_blob(&self, repo: &str, digest: &str, data: &[u8]) {
        let base = format!("http://{}", self.addr);
        let post = self
            .authorized(
                repo,
                self.agent.post(format!("{base}/v2/{repo}/blobs/uploads/")),
            )
            .send_empty()
            .expect("POST blob upload");
        assert_eq!(
            post.status().as_u16(),
            202,
            "start upload of {digest}: {}",
            post.status()
        );
        let location = post
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("upload Location")
            .to_string();
        let url = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let put = self
            .authorized(repo, self.agent.put(format!("{url}{sep}digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .send(data)
            .expect("PUT blob");
        assert_eq!(
            put.status().as_u16(),
            201,
            "upload of {digest}: {}",
            put.status()
        );
    }

    /// Pushes every blob of `image` and its manifest as `repo:tag`.
    pub fn push(&self, image: &BuiltImage, repo: &str, tag: &str) {
        for blob in std::iter::once(&image.config).chain(&image.layers) {
            self.push_blob(repo, blob);
        }
        self.put_manifest(repo, tag, &image.manifest.media_type, &image.manifest.data);
        // Also addressable by digest, as registries do.
    }

    /// Pushes several images and an OCI image index naming each with its
    /// platform (`os/arch[/variant]`), as `repo:tag`. Returns the index digest.
    pub fn push_index(&self, images: &[(&BuiltImage, &str)], repo: &str, tag: &str) -> String {
        let mut manifests = Vec::new();
        for (image, platform) in images {
            for blob in std::iter::once(&image.config).chain(&image.layers) {
                self.push_blob(repo, blob);
            }
            self.put_manifest(
                repo,
                &image.manifest.digest,
                &image.manifest.media_type,
                &image.manifest.data,
            );
            let parts: Vec<&str> = platform.split('/').collect();
            let mut p = json!({"os": parts[0], "architecture": parts[1]});
            if let Some(v) = parts.get(2) {
                p["variant"] = json!(v);
            }
            manifests.push(json!({
                "mediaType": image.manifest.media_type,
                "digest": image.manifest.digest,
                "size": image.manifest.data.len(),
                "platform": p,
            }));
        }
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .unwrap();
        self.put_manifest(repo, tag, "application/vnd.oci.image.index.v1+json", &index);
        crate::oci::sha256_digest(&index)
    }

    /// PUTs a manifest document as `repo:reference` (a tag or digest).
    pub fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, data: &[u8]) {
        let resp = self
            .authorized(
                repo,
                self.agent.put(format!(
                    "http://{}/v2/{repo}/manifests/{reference}",
                    self.addr
                )),
            )
            .header("Content-Type", media_type)
            .send(data)
            .expect("PUT manifest");
        let status = resp.status().as_u16();
        let body = resp.into_body().read_to_string().unwrap_or_default();
        assert_eq!(status, 201, "push manifest {repo}:{reference}: {body}");
    }

    /// Every request logged so far, in order.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        let file = match fs::File::open(self.dir.path().join("access.log")) {
            Ok(f) => f,
            Err(_) => return Vec::new(),
        };
        io::BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| parse_access_line(&line))
            .collect()
    }

    /// Completed GETs of `digest`'s blob (any repository).
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|e| {
                e.method == "GET"
                    && e.status == 200
                    && e.path.ends_with(&format!("/blobs/{digest}"))
            })
            .count()
    }

    /// Every blob GET (any status) of the log.
    pub fn all_blob_gets(&self) -> Vec<AccessLogEntry> {
        self.access_log()
            .into_iter()
            .filter(|e| e.method == "GET" && e.path.contains("/blobs/sha256:"))
            .collect()
    }

    /// Bytes of blob content the registry sent (GETs only).
    pub fn blob_bytes_served(&self) -> u64 {
        self.all_blob_gets().iter().map(|e| e.bytes).sum()
    }

    /// Where the registry stores `digest`'s content, for tests that tamper
    /// with it behind the registry's back.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The registry's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the registry answers `/v2/` (or has died).
fn wait_ready(child: &mut Child, agent: &ureq::Agent, addr: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(resp) = agent.get(format!("http://{addr}/v2/")).call()
            && matches!(resp.status().as_u16(), 200 | 401)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Parses one combined-log-format line as distribution writes it:
/// `127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 1234 "" "agent"`.
fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once('"')?;
    let mut req = request.split(' ');
    let method = req.next()?.to_string();
    let path = req.next()?.to_string();
    let mut nums = rest.split_whitespace();
    let status = nums.next()?.parse().ok()?;
    let bytes = nums.next().and_then(|b| b.parse().ok()).unwrap_or(0);
    Some(AccessLogEntry {
        method,
        path,
        status,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_parse() {
        let line = r#"127.0.0.1 - - [26/Nov/2026:12:28:34 +0000] "GET /v2/x/blobs/sha256:ab HTTP/1.1" 200 157 "" "curl/7.88.1""#;
        assert_eq!(
            parse_access_line(line),
            Some(AccessLogEntry {
                method: "GET".into(),
                path: "/v2/x/blobs/sha256:ab".into(),
                status: 200,
                bytes: 157
            })
        );
        assert_eq!(parse_access_line("garbage"), None);
    }
}
