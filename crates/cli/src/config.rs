//! Settings: each one from its flag, else its environment variable (clap
//! reads both), else the config file, else the default.
//!
//! The config file is TOML at `$PODVISOR_CONFIG` (which must exist when
//! set, except for `podvisor up`, which writes it) or
//! `/etc/podvisor/config.toml` (optional):
//!
//! ```toml
//! cache_dir = "/srv/shared/podvisor-cache"   # may be a shared filesystem
//! catalog = "etcd://10.0.0.5:2379"            # default: sqlite:<cache_dir>/catalog.db
//!
//! [registry]
//! insecure = ["registry.lab:5000"]            # plain HTTP (loopback always is)
//! docker_config = "/root/.docker/config.json" # default: $DOCKER_CONFIG or ~/.docker
//! ```
//!
//! Unknown keys are errors, so a typo is not silently ignored; every
//! section is a field of [`ConfigFile`] (`[server]` is described in
//! `server_config`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use podvisor_image::RegistryOptions;
use serde::Deserialize;

/// The config file used when `PODVISOR_CONFIG` is not set.
pub const DEFAULT_CONFIG: &str = "/etc/podvisor/config.toml";
/// The cache directory when nothing else names one.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/podvisor/cache";

/// `--cache-dir` and `--catalog`: where layer disks and the image
/// catalog are. Taken by the commands that read or fill the image cache.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Image cache options")]
pub struct CacheArgs {
    /// Image cache directory, may be a shared filesystem (default: the
    /// config file's `cache_dir`, else /var/lib/podvisor/cache).
    #[arg(long, global = true, env = "PODVISOR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Image catalog: sqlite:PATH or etcd://HOST:PORT (default: the config
    /// file's `catalog`, else sqlite:CACHE_DIR/catalog.db).
    #[arg(long, global = true, env = "PODVISOR_CATALOG")]
    pub catalog: Option<String>,
}

/// `--insecure-registry`: taken by the commands that talk to registries.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Registry options")]
pub struct RegistryArgs {
    /// A registry (host:port) reached over plain HTTP; repeatable. Loopback
    /// registries always are.
    #[arg(long = "insecure-registry", global = true, value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
}

/// The contents of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Image cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Image catalog store URL (`sqlite:PATH` or `etcd://HOST:PORT`).
    pub catalog: Option<String>,
    #[serde(default)]
    pub registry: RegistrySection,
    /// `[server]`, for the kubectl-like commands (see `server_config`).
    #[serde(default)]
    pub server: crate::server_config::ServerSection,
}

/// `[registry]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySection {
    /// Registries reached over plain HTTP.
    #[serde(default)]
    pub insecure: Vec<String>,
    /// The docker config file with credentials.
    pub docker_config: Option<PathBuf>,
}

impl ConfigFile {
    /// Reads the config file: `$PODVISOR_CONFIG` if set (it must exist),
    /// else [`DEFAULT_CONFIG`] if it exists, else empty settings.
    pub fn load() -> anyhow::Result<ConfigFile> {
        match std::env::var_os("PODVISOR_CONFIG").filter(|v| !v.is_empty()) {
            Some(path) => ConfigFile::read(Path::new(&path)),
            None if Path::new(DEFAULT_CONFIG).exists() => {
                ConfigFile::read(Path::new(DEFAULT_CONFIG))
            }
            None => Ok(ConfigFile::default()),
        }
    }

    /// As [`ConfigFile::load`], but a `$PODVISOR_CONFIG` that does not exist
    /// yet reads as empty: for `podvisor up`, which creates it.
    pub fn load_to_rewrite() -> anyhow::Result<ConfigFile> {
        match std::env::var_os("PODVISOR_CONFIG").filter(|v| !v.is_empty()) {
            Some(path) if !Path::new(&path).exists() => Ok(ConfigFile::default()),
            _ => ConfigFile::load(),
        }
    }

    /// Reads and parses the TOML file at `path`.
    pub fn read(path: &Path) -> anyhow::Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
    }
}

/// The settings in force, after flags, environment, config file and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cache_dir: PathBuf,
    /// The catalog store URL.
    pub catalog: String,
    pub registry: RegistryOptions,
}

impl Settings {
    /// Resolves every setting from the flags (or env) and `file`.
    pub fn resolve(cache: &CacheArgs, registry: &RegistryArgs, file: ConfigFile) -> Settings {
        let cache_dir = cache
            .cache_dir
            .clone()
            .or(file.cache_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));
        let catalog = cache
            .catalog
            .clone()
            .or(file.catalog)
            .unwrap_or_else(|| podvisor_image::Catalog::default_url(&cache_dir));
        let mut insecure = file.registry.insecure;
        insecure.extend(registry.insecure_registries.iter().cloned());
        Settings {
            cache_dir,
            catalog,
            registry: RegistryOptions {
                insecure,
                docker_config: file.registry.docker_config,
            },
        }
    }

    /// Loads the config file and resolves.
    pub fn load(cache: &CacheArgs, registry: &RegistryArgs) -> anyhow::Result<Settings> {
        Ok(Settings::resolve(cache, registry, ConfigFile::load()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        registry: RegistryArgs,
    }

    fn resolve(args: &[&str], file: ConfigFile) -> Settings {
        let mut argv = vec!["podvisor"];
        argv.extend_from_slice(args);
        let cli = Cli::parse_from(argv);
        Settings::resolve(&cli.cache, &cli.registry, file)
    }

    fn file(text: &str) -> ConfigFile {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let f = || {
            file(
                "cache_dir = \"/from/file\"\ncatalog = \"etcd://10.0.0.1:2379\"\n[registry]\ninsecure = [\"lab:5000\"]\n",
            )
        };
        let s = resolve(&[], ConfigFile::default());
        assert_eq!(s.cache_dir, PathBuf::from(DEFAULT_CACHE_DIR));
        assert_eq!(s.catalog, format!("sqlite:{DEFAULT_CACHE_DIR}/catalog.db"));
        let s = resolve(&[], f());
        assert_eq!(s.cache_dir, PathBuf::from("/from/file"));
        assert_eq!(s.catalog, "etcd://10.0.0.1:2379");
        assert_eq!(s.registry.insecure, vec!["lab:5000"]);
        let s = resolve(
            &[
                "--cache-dir",
                "/flag",
                "--catalog",
                "sqlite:/x.db",
                "--insecure-registry",
                "r:1",
            ],
            f(),
        );
        assert_eq!(s.cache_dir, PathBuf::from("/flag"));
        assert_eq!(s.catalog, "sqlite:/x.db");
        assert_eq!(s.registry.insecure, vec!["lab:5000", "r:1"]);
        // The default catalog follows the cache directory in force.
        let s = resolve(&["--cache-dir", "/flag"], ConfigFile::default());
        assert_eq!(s.catalog, "sqlite:/flag/catalog.db");
    }

    #[test]
    fn the_server_section_is_part_of_the_file() {
        let f = file("cache_dir = \"/c\"\n[server]\nurl = \"http://127.0.0.1:7443\"\n");
        assert_eq!(f.server.url.as_deref(), Some("http://127.0.0.1:7443"));
        assert_eq!(f.cache_dir, Some(PathBuf::from("/c")));
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "cache_dri = \"/typo\"\n").unwrap();
        let err = format!("{:#}", ConfigFile::read(&path).unwrap_err());
        assert!(
            err.contains("cache_dri") && err.contains("config.toml"),
            "{err}"
        );
        std::fs::write(&path, "cache_dir = \n").unwrap();
        assert!(ConfigFile::read(&path).is_err());
        let err = format!(
            "{:#}",
            ConfigFile::read(&dir.path().join("missing.toml")).unwrap_err()
        );
        assert!(err.contains("missing.toml"), "{err}");
    }
}
