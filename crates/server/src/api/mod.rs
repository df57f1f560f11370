//! The HTTP API: the route table (from which both the axum router and the
//! list checked against the OpenAPI document are built), the shared state,
//! and the OpenAPI document.

mod hosts;
mod images;
pub mod limits;
mod pods;
mod proxy;
pub(crate) mod snapshot_keys;
mod volume_keys;
pub(crate) mod volumes;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{Method, StatusCode, Uri};
use axum::routing::MethodRouter;
use podvisor_store::Store;
use utoipa::OpenApi;

pub use images::ImageCatalog;

use crate::error::ApiError;
use crate::pod_cache::PodCache;
use crate::tokens::TokenCheck;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub pods: PodCache,
    pub tokens: TokenCheck,
    /// For proxying logs, exec, hibernation and wake to host daemons.
    pub http: reqwest::Client,
    /// TTL of a host's heartbeat lease.
    pub host_ttl: Duration,
    /// The image catalog, if this server has one.
    pub images: ImageCatalog,
    /// What secrets kept for others are wrapped with.
    pub kek: Arc<crate::kek::KeyEncryptionKey>,
}

impl axum::extract::FromRef<AppState> for TokenCheck {
    fn from_ref(state: &AppState) -> TokenCheck {
        state.tokens.clone()
    }
}

/// One route: method, path (axum syntax, `{param}`), handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    handler: MethodRouter<AppState>,
}

fn route(method: Method, path: &'static str, handler: MethodRouter<AppState>) -> Route {
    Route {
        method,
        path,
        handler,
    }
}

/// Every route the server serves. The router is built from this list, and
/// a test checks it against the OpenAPI document both ways.
pub fn routes() -> Vec<Route> {
    use axum::routing::{delete, get, post, put};
    vec![
        route(Method::GET, "/healthz", get(healthz)),
        route(Method::GET, "/openapi.json", get(openapi_json)),
        route(Method::GET, "/api/v1/pods", get(pods::list_all)),
        route(
            Method::GET,
            "/api/v1/namespaces/{namespace}/pods",
            get(pods::list_namespaced),
        ),
        route(
            Method::POST,
            "/api/v1/namespaces/{namespace}/pods",
            post(pods::create),
        ),
        route(
            Method::GET,
            "/api/v1/namespaces/{namespace}/pods/{name}",
            get(pods::get_one),
        ),
        route(
            Method::PUT,
            "/api/v1/namespaces/{namespace}/pods/{name}",
            put(pods::apply),
        ),
        route(
            Method::DELETE,
            "/api/v1/namespaces/{namespace}/pods/{name}",
            delete(pods::delete),
        ),
        route(
            Method::PUT,
            "/api/v1/namespaces/{namespace}/pods/{name}/status",
            put(pods::update_status),
        ),
        route(
            Method::PUT,
            "/api/v1/namespaces/{namespace}/pods/{name}/snapshotkey",
            put(snapshot_keys::put),
        ),
        route(
            Method::GET,
            "/api/v1/namespaces/{namespace}/pods/{name}/snapshotkey",
            get(snapshot_keys::get),
        ),
        route(
            Method::DELETE,
            "/api/v1/namespaces/{namespace}/pods/{name}/snapshotkey",
            delete(snapshot_keys::delete),
        ),
        route(
            Method::GET,
            "/api/v1/namespaces/{namespace}/pods/{name}/log",
            get(proxy::log),
        ),
        route(
            Method::GET,
            "/api/v1/namespaces/{namespace}/pods/{name}/exec",
            get(proxy::exec),
        ),
        route(
            Method::POST,
            "/api/v1/namespaces/{namespace}/pods/{name}/hibernate",
            post(proxy::hibernate),
        ),
        route(
            Method::POST,
            "/api/v1/namespaces/{namespace}/pods/{name}/wake",
            post(proxy::wake),
        ),
        route(
            Method::POST,
            "/api/v1/namespaces/{namespace}/pods/{name}/instances",
            post(volume_keys::new_instance),
        ),
        route(
            Method::POST,
            "/api/v1/namespaces/{namespace}/pods/{name}/volumekeys",
            post(volume_keys::release),
        ),
        route(
            Method::GET,
            "/api/v1/persistentvolumeclaims",
            get(volumes::list_all),
        ),
        route(
            Method::GET,
            "/api/v1/namespaces/{namespace}/persistentvolumeclaims",
            get(volumes::list_namespaced),
        ),
        route(
            Method::POST,
            "/api/v1/namespaces/{namespace}/persistentvolumeclaims",
            post(volumes::create),
        ),
        route(
            Method::GET,
            "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}",
            get(volumes::get_one),
        ),
        route(
            Method::PUT,
            "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}",
            put(volumes::apply),
        ),
        route(
            Method::DELETE,
            "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}",
            delete(volumes::delete),
        ),
        route(
            Method::POST,
            "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}/revoke",
            post(volumes::revoke),
        ),
        route(
            Method::GET,
            "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}/audit",
            get(volumes::audit_log),
        ),
        route(
            Method::POST,
            "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}/formatted",
            post(volumes::formatted),
        ),
        route(Method::GET, "/api/v1/hosts", get(hosts::list)),
        route(Method::POST, "/api/v1/hosts", post(hosts::register)),
        route(Method::GET, "/api/v1/hosts/{name}", get(hosts::get_one)),
        route(
            Method::PUT,
            "/api/v1/hosts/{name}/heartbeat",
            put(hosts::heartbeat),
        ),
        route(Method::GET, "/api/v1/images", get(images::list)),
    ]
}

/// The router of [`routes`], with JSON answers for unknown paths and
/// methods, the names in paths checked, bodies bounded to
/// [`limits::MAX_BODY_BYTES`] and ordinary requests to `request_timeout`
/// (see [`limits`]).
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let mut router = Router::new();
    for r in routes() {
        // Routes of one path merge into one method router.
        router = router.route(r.path, r.handler);
    }
    let request_limits = limits::RequestLimits {
        max_body_bytes: limits::MAX_BODY_BYTES,
        request_timeout,
        tokens: state.tokens.clone(),
    };
    router
        .route_layer(axum::middleware::from_fn(limits::checked_path_names))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(limits::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            request_limits,
            limits::bounded_request,
        ))
        .with_state(state)
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "no API path {}: see /openapi.json for the paths this server serves",
        uri.path()
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Liveness of the server itself.
#[utoipa::path(get, path = "/healthz", tag = "server",
    responses((status = 200, description = "The server is up", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "server",
    responses((status = 200, description = "The OpenAPI document of this API", content_type = "application/json")))]
async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

/// The OpenAPI document, from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "podvisor", description = "podvisor's management API: pods, volumes, hosts and images, Kubernetes-style."),
    paths(
        healthz,
        openapi_json,
        pods::list_all,
        pods::list_namespaced,
        pods::create,
        pods::get_one,
        pods::apply,
        pods::delete,
        pods::update_status,
        snapshot_keys::put,
        snapshot_keys::get,
        snapshot_keys::delete,
        proxy::log,
        proxy::exec,
        proxy::hibernate,
        proxy::wake,
        volume_keys::new_instance,
        volume_keys::release,
        volumes::list_all,
        volumes::list_namespaced,
        volumes::create,
        volumes::get_one,
        volumes::apply,
        volumes::delete,
        volumes::revoke,
        volumes::audit_log,
        volumes::formatted,
        hosts::list,
        hosts::register,
        hosts::get_one,
        hosts::heartbeat,
        images::list,
    ),
    components(schemas(podvisor_api::Status, podvisor_api::WatchEvent, podvisor_api::EventType, podvisor_api::client::SnapshotKey)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
