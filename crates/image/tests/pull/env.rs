//! A cache directory with its default SQLite catalog, and a view of both
//! for "nothing changed" checks.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use podvisor_image::catalog::Catalog;
use podvisor_image::progress::NoProgress;
use podvisor_image::pull::{PullOptions, Pulled, pull};
use podvisor_image::{ImageError, ImageRef, LayerCache, RegistryOptions};
use tempfile::TempDir;

pub struct Env {
    pub dir: TempDir,
    pub cache: LayerCache,
    pub catalog: Catalog,
    pub options: PullOptions,
}

impl Env {
    pub async fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::open(&dir.path().join("cache")).unwrap();
        let catalog = Catalog::open(&Catalog::default_url(cache.root()))
            .await
            .unwrap();
        let options = PullOptions {
            registry: RegistryOptions {
                insecure: vec![],
                // No credentials unless a test writes some.
                docker_config: Some(dir.path().join("docker/config.json")),
            },
            platform: Default::default(),
        };
        Env {
            dir,
            cache,
            catalog,
            options,
        }
    }

    /// Another "process" on the same cache and catalog (its own lease).
    pub async fn other_process(&self) -> Catalog {
        Catalog::open(self.catalog.url()).await.unwrap()
    }

    pub fn docker_config(&self) -> PathBuf {
        self.options.registry.docker_config.clone().unwrap()
    }

    pub async fn pull(&self, reference: &str) -> Result<Pulled, ImageError> {
        let r = ImageRef::parse(reference)?;
        pull(
            &self.cache,
            &self.catalog,
            &r,
            &self.options,
            Arc::new(NoProgress),
        )
        .await
    }

    /// Every path under `layers/` and the catalog's images and layers.
    pub async fn snapshot(&self) -> (Vec<String>, String) {
        let root = self.cache.layers_dir();
        let mut files = Vec::new();
        walk(&root, &root, &mut files);
        files.sort();
        let catalog = format!(
            "{:?}\n{:?}\n{:?}",
            self.catalog.refs().await.unwrap(),
            self.catalog.manifests().await.unwrap(),
            self.catalog.layers().await.unwrap()
        );
        (files, catalog)
    }

    /// Names of complete disks in `layers/`.
    pub fn disk_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.cache.layers_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        out.push(p.strip_prefix(root).unwrap().display().to_string());
        if e.file_type().unwrap().is_dir() {
            walk(root, &p, out);
        }
    }
}

/// `sha256:<hex>` → `<hex>`.
pub fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}
