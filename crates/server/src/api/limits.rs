//! What the router checks of every request before a handler sees it: the
//! names in its path, its body's size, its time; and where request bodies
//! are parsed (off the async workers).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use podvisor_api::validate::{dns_label_problem, dns_subdomain_problem};
use tokio::sync::Semaphore;

use crate::connections::ConnectionHandle;
use crate::error::ApiError;
use crate::tokens::{Caller, TokenCheck};

/// The largest request body (Kubernetes' `MaxRequestBodyBytes`, 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 << 20;

/// What [`bounded_request`] enforces.
#[derive(Clone)]
pub struct RequestLimits {
    /// The largest request body.
    pub max_body_bytes: usize,
    /// Time an ordinary request has to be read and answered (see
    /// [`long_running`]).
    pub request_timeout: Duration,
    /// To tell a connection's first authenticated request.
    pub tokens: TokenCheck,
}

/// Requests that take as long as their user wants: watches, logs, exec
/// sessions, and hibernation and wake (bounded by the proxy's own 90 s).
fn long_running(request: &Request) -> bool {
    let watch = request.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "watch=true" | "watch=1"))
    });
    // `/api/v1/namespaces/NS/pods/NAME/ACTION`.
    let segments: Vec<&str> = request.uri().path().split('/').collect();
    let action = matches!(
        segments[..],
        [
            "",
            "api",
            "v1",
            "namespaces",
            _,
            "pods",
            _,
            "log" | "exec" | "hibernate" | "wake"
        ]
    );
    watch || action
}

fn too_large(limit: usize, size: Option<u64>) -> ApiError {
    let size = size.map_or_else(|| "over the limit".to_string(), |s| format!("{s} bytes"));
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        format!(
            "the request body is {size}: the limit is {limit} bytes ({} MiB)",
            limit >> 20
        ),
    )
}

fn timed_out(timeout: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "Timeout",
        format!(
            "the request did not complete within {} s (the server's request timeout)",
            timeout.as_secs_f32()
        ),
    )
}

/// Every request: marks its connection authenticated at its first request
/// with a valid token, refuses a body over the limit (413) or from a
/// client without a valid token (401) before reading it, and gives an
/// ordinary request `request_timeout` to be read and answered (504).
pub async fn bounded_request(
    State(limits): State<RequestLimits>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let caller = Caller::from_request_parts(&mut parts, &limits.tokens).await;
    let request = Request::from_parts(parts, body);
    if let Some(handle) = request.extensions().get::<ConnectionHandle>()
        && caller.is_ok()
    {
        handle.registry.authenticate(&handle.conn);
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|size| size > limits.max_body_bytes as u64) {
        return too_large(limits.max_body_bytes, declared).into_response();
    }
    let has_body = declared.is_some_and(|size| size > 0)
        || request.headers().contains_key(header::TRANSFER_ENCODING);
    // Every route that takes a body wants a token: a client without a
    // valid one gets no memory held for its body.
    if has_body && let Err(e) = caller {
        return e.into_response();
    }
    let timeout = limits.request_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let request = if has_body {
        let (parts, body) = request.into_parts();
        let collected = Limited::new(body, limits.max_body_bytes).collect();
        match tokio::time::timeout_at(deadline, collected).await {
            Ok(Ok(collected)) => Request::from_parts(parts, Body::from(collected.to_bytes())),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return too_large(limits.max_body_bytes, None).into_response();
            }
            Ok(Err(e)) => {
                return ApiError::bad_request(format!("the request body could not be read: {e}"))
                    .into_response();
            }
            Err(_) => return timed_out(timeout).into_response(),
        }
    } else {
        request
    };
    if long_running(&request) {
        return next.run(request).await;
    }
    tokio::time::timeout_at(deadline, next.run(request))
        .await
        .unwrap_or_else(|_| timed_out(timeout).into_response())
}

/// Matched routes: every name taken from the path must be a valid name of
/// its kind (a namespace a DNS-1123 label; pod, volume and host names
/// DNS-1123 subdomains, as Kubernetes) before anything uses, stores or
/// forwards it: 400 otherwise.
pub async fn checked_path_names(
    matched: MatchedPath,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    request: Request,
    next: Next,
) -> Response {
    let params = match params {
        Ok(params) => params,
        Err(e) => {
            return ApiError::bad_request(format!("the URL's path is not valid: {e}"))
                .into_response();
        }
    };
    for (key, value) in &params {
        if let Some(problem) = path_name_problem(matched.as_str(), key, value) {
            return ApiError::bad_request(problem).into_response();
        }
    }
    next.run(request).await
}

/// What is wrong with the value of path parameter `key` of route `route`.
pub fn path_name_problem(route: &str, key: &str, value: &str) -> Option<String> {
    let (what, problem) = match key {
        "namespace" => ("namespace", dns_label_problem(value)),
        "name" => {
            let what = if route.starts_with("/api/v1/namespaces/{namespace}/pods/") {
                "pod name"
            } else if route.starts_with("/api/v1/namespaces/{namespace}/persistentvolumeclaims/") {
                "volume name"
            } else if route.starts_with("/api/v1/hosts/") {
                "host name"
            } else {
                "name"
            };
            (what, dns_subdomain_problem(value))
        }
        other => {
            return Some(format!(
                "the URL has a parameter {other:?} this server does not check"
            ));
        }
    };
    problem.map(|p| format!("the {what} in the URL: {p}"))
}

/// Parsers running at once off the async workers; more wait their turn.
static PARSERS: Semaphore = Semaphore::const_new(4);

/// Runs `parse` (reading a request body) on the blocking pool, at most
/// [`PARSERS`] at once, so a large or hostile body never holds up an async
/// worker (and with it `/healthz` and every other request).
pub async fn off_workers<T: Send + 'static>(
    parse: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = PARSERS
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable("the server is stopping"))?;
    tokio::task::spawn_blocking(parse)
        .await
        .map_err(|e| ApiError::internal(format!("parsing the request body failed: {e}")))
}

/// Refuses a document nested deeper than [`podvisor_api::nesting::MAX_NESTING`]
/// (400). One linear pass, cheap enough for an async worker, so a hostile
/// body never waits for (or takes) one of the [`PARSERS`].
pub fn check_nesting(body: &Bytes, format: podvisor_api::Format) -> Result<(), ApiError> {
    use podvisor_api::nesting::{MAX_NESTING, too_deep};
    match too_deep(body_text(body)?, format, MAX_NESTING) {
        Some(line) => Err(ApiError::bad_request(format!(
            "the document nests deeper than {MAX_NESTING} levels: refused before parsing (line {line})"
        ))),
        None => Ok(()),
    }
}

/// An object from a request body in the format its `Content-Type` says
/// (JSON, or YAML with `application/yaml`), read by `parse` off the async
/// workers after the nesting check: a syntax error is a 400, an invalid
/// object a 422.
pub async fn parse_object<T: Send + 'static>(
    headers: &axum::http::HeaderMap,
    body: Bytes,
    parse: fn(&str, podvisor_api::Format) -> Result<T, podvisor_api::ParseError>,
) -> Result<T, ApiError> {
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let format = podvisor_api::Format::from_content_type(content_type);
    check_nesting(&body, format)?;
    off_workers(move || {
        parse(body_text(&body)?, format).map_err(|e| match e {
            podvisor_api::ParseError::Syntax { .. } => ApiError::bad_request(e.to_string()),
            podvisor_api::ParseError::Invalid(_) => ApiError::invalid(e.to_string()),
        })
    })
    .await?
}

/// A request body as UTF-8 text.
pub fn body_text(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the request body is not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_parameter_is_checked() {
        for route in super::super::routes() {
            for segment in route.path.split('/') {
                if let Some(key) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    assert!(
                        path_name_problem(route.path, key, "fine").is_none(),
                        "{} {key}",
                        route.path
                    );
                    let problem = path_name_problem(route.path, key, "../etc").unwrap();
                    assert!(
                        problem.contains("\"../etc\" is not a valid name"),
                        "{problem}"
                    );
                }
            }
        }
        let problem =
            path_name_problem("/api/v1/namespaces/{namespace}/pods/{name}", "name", "A_b");
        assert_eq!(
            problem.as_deref(),
            Some(
                "the pod name in the URL: \"A_b\" is not a valid name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
            )
        );
    }

    #[test]
    fn only_streams_and_host_actions_go_untimed() {
        let request = |uri: &str| Request::builder().uri(uri).body(Body::empty()).unwrap();
        assert!(long_running(&request(
            "/api/v1/namespaces/a/pods/b/log?follow=true"
        )));
        assert!(long_running(&request(
            "/api/v1/namespaces/a/pods/b/exec?command=sh"
        )));
        assert!(long_running(&request("/api/v1/namespaces/a/pods/b/wake")));
        assert!(long_running(&request(
            "/api/v1/pods?labelSelector=a%3Db&watch=true"
        )));
        // A pod named `log` is an ordinary pod.
        assert!(!long_running(&request("/api/v1/namespaces/a/pods/log")));
        assert!(!long_running(&request(
            "/api/v1/namespaces/a/pods?watch=false"
        )));
    }
}
