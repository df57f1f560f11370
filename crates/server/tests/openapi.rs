//! The OpenAPI document served at /openapi.json against the router: every
//! route the router serves is in the document and every path of the
//! document is served, and every schema the document refers to is in it.

mod common;

use std::collections::BTreeSet;

use common::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_router() {
    let ts = TestServer::sqlite().await;
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("{}/openapi.json", ts.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "served without a token");
    let doc: serde_json::Value = resp.json().await.unwrap();

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "delete", "patch", "head", "options"] {
            if item.get(method).is_some() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let routed: BTreeSet<(String, String)> = podvisor_server::api::routes()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from /openapi.json: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "documented paths the router lacks: {unrouted:?}"
    );
    assert!(documented.len() >= 16, "{documented:?}");

    // The router really serves each of them: a request reaches a handler
    // (whatever it answers), never the fallback for unknown paths/methods.
    for (method, path) in &documented {
        let url = format!(
            "{}{}",
            ts.url(),
            path.replace("{namespace}", "default")
                .replace("{name}", "probe")
        );
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = http
            .request(method.clone(), &url)
            .bearer_auth(&ts.admin_token)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let code = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        assert_ne!(code, 405, "{method} {path}: {body}");
        assert!(
            !body.contains("no API path"),
            "{method} {path} is not routed: {body}"
        );
    }
    let resp = http
        .get(format!("{}/api/v1/nodes", ts.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("no API path /api/v1/nodes")
    );

    // Every schema referred to is defined.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let mut refs = BTreeSet::new();
    collect_refs(&doc, &mut refs);
    for r in &refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(
            schemas.contains_key(name),
            "schema {name} is referred to but not defined"
        );
    }
    for needed in [
        "Pod",
        "PodList",
        "Host",
        "HostList",
        "Status",
        "ImageList",
        "WatchEvent",
        "PodDnsConfig",
        "HostAlias",
        "DnsPolicy",
    ] {
        assert!(schemas.contains_key(needed), "schema {needed} is missing");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

fn collect_refs(value: &serde_json::Value, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    if let Some(s) = v.as_str() {
                        out.insert(s.to_string());
                    }
                } else {
                    collect_refs(v, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}
