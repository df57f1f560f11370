//! A token service for a registry with bearer-token auth, as Docker Hub and
//! most hosted registries have: `GET /token?scope=...&service=...` with the
//! user's basic credentials answers a JWT (RS256, signed with `openssl`,
//! the self-signed certificate in its `x5c` header) that the registry
//! (configured with `auth: token:` and that certificate as its root bundle)
//! accepts.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;

/// The `service` the registry names in its challenge.
pub const SERVICE: &str = "podvisor-test-registry";
const ISSUER: &str = "podvisor-test-issuer";

/// A running token service; stops accepting when dropped.
pub struct TokenIssuer {
    inner: Arc<Signer>,
    addr: String,
    stop: Arc<AtomicBool>,
    /// Tokens issued so far.
    issued: Arc<AtomicUsize>,
}

struct Signer {
    dir: PathBuf,
    key: PathBuf,
    cert: PathBuf,
    /// base64 (standard) of the certificate's DER, for `x5c`.
    x5c: String,
    user: String,
    password: String,
}

impl TokenIssuer {
    /// Makes a key and certificate in `dir` and serves tokens to
    /// `user`/`password` on 127.0.0.1.
    pub fn start(dir: &Path, user: &str, password: &str) -> TokenIssuer {
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", &format!("/CN={ISSUER}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let der = Command::new("openssl")
            .args(["x509", "-outform", "der", "-in"])
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(der.status.success());
        let inner = Arc::new(Signer {
            dir: dir.to_path_buf(),
            key,
            cert,
            x5c: STANDARD.encode(der.stdout),
            user: user.to_string(),
            password: password.to_string(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the token service");
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicUsize::new(0));
        let (signer, stopping, count) = (inner.clone(), stop.clone(), issued.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let (signer, count) = (signer.clone(), count.clone());
                    std::thread::spawn(move || serve(conn, &signer, &count));
                }
            }
        });
        TokenIssuer {
            inner,
            addr,
            stop,
            issued,
        }
    }

    /// The `auth:` section of the registry's config.
    pub fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.addr,
            self.inner.cert.display()
        )
    }

    /// A token granting `actions` (e.g. `pull,push`) on `repo`.
    pub fn mint(&self, repo: &str, actions: &str) -> String {
        self.inner
            .mint(&self.inner.user, &format!("repository:{repo}:{actions}"))
    }

    /// How many tokens the service handed out to clients.
    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

impl Signer {
    fn mint(&self, subject: &str, scope: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let access: Vec<_> = scope
            .split(' ')
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (typ, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(json!({"type": typ, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
            })
            .collect();
        let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]});
        let claims = json!({
            "iss": ISSUER, "sub": subject, "aud": SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": format!("{now}-{}", std::process::id()),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let tmp = tempfile::NamedTempFile::new_in(&self.dir).unwrap();
        fs::write(tmp.path(), &input).unwrap();
        let sig = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .arg(tmp.path())
            .output()
            .expect("run openssl");
        assert!(
            sig.status.success(),
            "openssl dgst: {}",
            String::from_utf8_lossy(&sig.stderr)
        );
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.stdout))
    }
}

/// Answers one HTTP request on `conn`.
fn serve(mut conn: TcpStream, signer: &Signer, issued: &AtomicUsize) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(value.trim().to_string());
        }
    }
    let target = request_line.split(' ').nth(1).unwrap_or("");
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let scope = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("scope="))
        .map(|s| {
            s.replace("%3A", ":")
                .replace("%2F", "/")
                .replace("%2C", ",")
                .replace('+', " ")
        })
        .unwrap_or_default();
    let expected = format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", signer.user, signer.password))
    );
    let (status, body) = if authorization.as_deref() == Some(expected.as_str()) {
        issued.fetch_add(1, Ordering::SeqCst);
        let token = signer.mint(&signer.user, &scope);
        (
            "200 OK",
            json!({"token": token, "access_token": token, "expires_in": 300}).to_string(),
        )
    } else {
        (
            "401 Unauthorized",
            json!({"details": "bad or missing credentials"}).to_string(),
        )
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
