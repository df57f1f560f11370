//! Parsing of store URLs: which backend, and where.

use std::path::PathBuf;

use crate::StoreError;

/// A parsed store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite:/path/to/file.db`, `sqlite:///path/to/file.db`, or a bare path.
    Sqlite { path: PathBuf },
    /// `etcd://host:port[,host:port...][?prefix=/ns/]`: the endpoints as
    /// `http://host:port`, and the prefix every key is stored under
    /// (empty: none).
    Etcd {
        endpoints: Vec<String>,
        namespace: String,
    },
}

impl StoreUrl {
    /// Parses `url`; a string with no `scheme:` is a SQLite path.
    pub fn parse(url: &str) -> Result<StoreUrl, StoreError> {
        let invalid = |reason: String| StoreError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        if url.trim().is_empty() {
            return Err(invalid("it is empty".into()));
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = match rest.strip_prefix("//") {
                // sqlite:///abs/path — an empty authority, then the path.
                Some(abs) if abs.starts_with('/') => abs,
                Some(_) => {
                    return Err(invalid(
                        "a SQLite URL names a file, not a host: use sqlite:/path/to/file.db".into(),
                    ));
                }
                None => rest,
            };
            if path.is_empty() {
                return Err(invalid(
                    "no file path after \"sqlite:\" (e.g. sqlite:/var/lib/podvisor/state.db)"
                        .into(),
                ));
            }
            return Ok(StoreUrl::Sqlite {
                path: PathBuf::from(path),
            });
        }
        if let Some(rest) = url.strip_prefix("etcd://") {
            return parse_etcd(rest).map_err(invalid);
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(invalid(format!(
                "unsupported scheme {scheme:?}: use sqlite:/path/to/file.db or etcd://host:port"
            )));
        }
        Ok(StoreUrl::Sqlite {
            path: PathBuf::from(url),
        })
    }
}

fn parse_etcd(rest: &str) -> Result<StoreUrl, String> {
    let (hosts, query) = match rest.split_once('?') {
        Some((hosts, query)) => (hosts, Some(query)),
        None => (rest, None),
    };
    if let Some((_, path)) = hosts.split_once('/') {
        return Err(format!(
            "unexpected path \"/{path}\" after the endpoints: to keep keys under a prefix use ?prefix=/{path}"
        ));
    }
    let mut endpoints = Vec::new();
    for host_port in hosts.split(',') {
        endpoints.push(parse_endpoint(host_port)?);
    }
    let mut namespace = String::new();
    if let Some(query) = query {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("prefix", value)) => namespace = value.to_string(),
                _ => {
                    return Err(format!(
                        "unknown parameter {pair:?}: the only parameter is prefix=/some/prefix/"
                    ));
                }
            }
        }
    }
    Ok(StoreUrl::Etcd {
        endpoints,
        namespace,
    })
}

/// `host:port` → `http://host:port`; IPv6 hosts in brackets.
fn parse_endpoint(host_port: &str) -> Result<String, String> {
    if host_port.is_empty() {
        return Err("an endpoint is empty: expected host:port[,host:port...]".into());
    }
    let Some((host, port)) = host_port.rsplit_once(':') else {
        return Err(format!(
            "endpoint {host_port:?} has no port: expected host:port (etcd's is usually 2379)"
        ));
    };
    if host.is_empty() || host.contains(['@', ' ']) {
        return Err(format!("endpoint {host_port:?} has no valid host"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "endpoint {host_port:?}: write IPv6 addresses in brackets, e.g. [::1]:2379"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("http://{host}:{p}")),
        _ => Err(format!(
            "endpoint {host_port:?} has an invalid port {port:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        StoreUrl::parse(url).unwrap_err().to_string()
    }

    #[test]
    fn sqlite_urls_and_bare_paths() {
        let sqlite = |p: &str| StoreUrl::Sqlite { path: p.into() };
        assert_eq!(
            StoreUrl::parse("sqlite:/var/x.db").unwrap(),
            sqlite("/var/x.db")
        );
        assert_eq!(
            StoreUrl::parse("sqlite:///var/x.db").unwrap(),
            sqlite("/var/x.db")
        );
        assert_eq!(
            StoreUrl::parse("sqlite:state.db").unwrap(),
            sqlite("state.db")
        );
        assert_eq!(
            StoreUrl::parse("/tmp/a b/s.db").unwrap(),
            sqlite("/tmp/a b/s.db")
        );
        assert_eq!(StoreUrl::parse("rel/s.db").unwrap(), sqlite("rel/s.db"));
    }

    #[test]
    fn etcd_urls() {
        assert_eq!(
            StoreUrl::parse("etcd://127.0.0.1:2379").unwrap(),
            StoreUrl::Etcd {
                endpoints: vec!["http://127.0.0.1:2379".into()],
                namespace: String::new()
            }
        );
        assert_eq!(
            StoreUrl::parse("etcd://a:1,b.example:2,[::1]:3?prefix=/podvisor/").unwrap(),
            StoreUrl::Etcd {
                endpoints: vec![
                    "http://a:1".into(),
                    "http://b.example:2".into(),
                    "http://[::1]:3".into()
                ],
                namespace: "/podvisor/".into()
            }
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        assert!(err("").contains("empty"));
        assert!(err("sqlite:").contains("no file path"));
        assert!(err("sqlite://host/x.db").contains("not a host"));
        assert!(err("redis://x:1").contains("unsupported scheme \"redis\""));
        assert!(err("etcd://").contains("endpoint is empty"));
        assert!(err("etcd://a:1,").contains("endpoint is empty"));
        assert!(err("etcd://127.0.0.1").contains("has no port"));
        assert!(err("etcd://127.0.0.1:99999").contains("invalid port \"99999\""));
        assert!(err("etcd://127.0.0.1:0").contains("invalid port"));
        assert!(err("etcd://:2379").contains("no valid host"));
        assert!(err("etcd://::1:2379").contains("brackets"));
        assert!(err("etcd://h:1/podvisor").contains("?prefix=/podvisor"));
        assert!(err("etcd://h:1?namespace=x").contains("unknown parameter \"namespace=x\""));
        // Every message names the URL it is about.
        assert!(err("etcd://h:1?namespace=x").contains("etcd://h:1?namespace=x"));
    }
}
