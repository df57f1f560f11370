//! `GET /api/v1/images`: the image catalog of the global cache (issue 3's
//! catalog, read through `podvisor-image`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use podvisor_api::{Image, ImageList, Status};
use podvisor_image::Catalog;
use tokio::sync::OnceCell;

use super::AppState;
use crate::error::ApiError;
use crate::tokens::Caller;

/// The catalog, opened on first use (the cache directory may appear after
/// the server starts).
#[derive(Clone)]
pub struct ImageCatalog {
    url: Option<String>,
    catalog: Arc<OnceCell<Catalog>>,
}

impl ImageCatalog {
    pub fn new(url: Option<String>) -> ImageCatalog {
        ImageCatalog {
            url,
            catalog: Arc::new(OnceCell::new()),
        }
    }

    async fn get(&self) -> Result<&Catalog, ApiError> {
        let Some(url) = &self.url else {
            return Err(ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "NotImplemented",
                "this server was started without an image catalog (podvisor server --catalog URL, or catalog/cache_dir in the config file)",
            ));
        };
        self.catalog
            .get_or_try_init(|| async {
                Catalog::open(url).await.map_err(|e| {
                    ApiError::unavailable(format!(
                        "cannot open the image catalog {url}: {e}",
                        e = podvisor_errors::ErrorChain(&e)
                    ))
                })
            })
            .await
    }
}

/// The images of the global cache: each reference pulled or imported, with
/// its manifest's layers and size.
#[utoipa::path(get, path = "/api/v1/images", tag = "images",
    security(("bearer" = [])),
    responses(
        (status = 200, body = ImageList),
        (status = 501, description = "This server has no image catalog", body = Status),
        (status = 503, description = "The catalog cannot be read", body = Status)))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<ImageList>, ApiError> {
    let catalog = state.images.get().await?;
    let unavailable = |e: podvisor_image::ImageError| {
        ApiError::unavailable(format!(
            "image catalog: {e}",
            e = podvisor_errors::ErrorChain(&e)
        ))
    };
    let mut items = Vec::new();
    for r in catalog.refs().await.map_err(unavailable)? {
        let Some(manifest) = catalog.manifest(&r.manifest).await.map_err(unavailable)? else {
            continue;
        };
        items.push(Image {
            name: r.reference,
            digest: manifest.digest.to_string(),
            layers: manifest.layers.len(),
            size: manifest.size,
        });
    }
    items.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(ImageList { items }))
}
