//! Talking to an OCI distribution registry through `oci-client`: resolving
//! a reference (through an image index, by platform) to a verified manifest
//! and config, and streaming layer blobs.
//!
//! Plain HTTP is used only for registries the user marked insecure and, as
//! docker does, for registries on the loopback network; everything else is
//! HTTPS. Credentials come from the docker `config.json`
//! ([`crate::credentials`]); oci-client answers both basic and bearer-token
//! challenges with them.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};

use crate::convert::LayerBlob;
use crate::credentials::{self, Credentials};
use crate::import::RuntimeConfig;
use crate::platform::{self, Platform};
use crate::reference::ImageRef;
use crate::source::MAX_JSON_BYTES;
use crate::{Compression, Digest, ImageError};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ACCEPTED: &[&str] = &[OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];

/// How to reach registries: which may use plain HTTP, where credentials are.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`) reached over plain HTTP. Loopback
    /// registries always are.
    pub insecure: Vec<String>,
    /// The docker `config.json` to read credentials from; `None` means
    /// [`credentials::docker_config_path`].
    pub docker_config: Option<PathBuf>,
}

impl RegistryOptions {
    /// The docker config file in use.
    pub fn docker_config_path(&self) -> PathBuf {
        self.docker_config
            .clone()
            .unwrap_or_else(credentials::docker_config_path)
    }

    /// Whether `registry` is reached over plain HTTP.
    pub fn plain_http(&self, registry: &str) -> bool {
        crate::reference::is_loopback_host(registry) || self.insecure.iter().any(|r| r == registry)
    }
}

/// An image as the registry describes it: manifest and config fetched and
/// verified, layers not yet fetched.
#[derive(Clone, Debug)]
pub struct RemoteImage {
    pub reference: ImageRef,
    /// Digest of the image index the reference named, if it named one.
    pub index_digest: Option<Digest>,
    /// Digest of the platform's image manifest.
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub config: RuntimeConfig,
    /// `os/architecture` the config declares.
    pub platform: String,
    /// Uncompressed layer digests, bottom first.
    pub diff_ids: Vec<Digest>,
    /// Layer blobs, bottom first.
    pub layers: Vec<LayerBlob>,
}

/// A connection to one registry with the credentials podvisor found for it.
#[derive(Clone)]
pub struct Registry {
    client: oci_client::Client,
    auth: RegistryAuth,
    /// The registry as the reference names it, for messages.
    registry: String,
    /// Where the credentials came from, for messages; `None`: anonymous.
    credentials_from: Option<PathBuf>,
}

impl Registry {
    /// Prepares to talk to the registry of `reference`.
    pub fn connect(
        options: &RegistryOptions,
        reference: &ImageRef,
    ) -> Result<Registry, ImageError> {
        let config_path = options.docker_config_path();
        let creds = credentials::lookup(&config_path, reference.registry())?;
        Ok(Registry::with_credentials(
            options,
            reference.registry(),
            creds,
            config_path,
        ))
    }

    fn with_credentials(
        options: &RegistryOptions,
        registry: &str,
        creds: Option<Credentials>,
        config_path: PathBuf,
    ) -> Registry {
        // reqwest's rustls is built without a default crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let protocol = if options.plain_http(registry) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let client = oci_client::Client::new(ClientConfig {
            protocol,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(15)),
            read_timeout: Some(Duration::from_secs(120)),
            user_agent: concat!("podvisor/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        });
        let (auth, credentials_from) = match creds {
            Some(c) => (
                RegistryAuth::Basic(c.username, c.password),
                Some(config_path),
            ),
            None => (RegistryAuth::Anonymous, None),
        };
        Registry {
            client,
            auth,
            registry: registry.to_string(),
            credentials_from,
        }
    }

    /// Fetches the manifest `reference` names (choosing `platform` from an
    /// index) and its config, verifying both against their digests.
    pub async fn resolve(
        &self,
        reference: &ImageRef,
        platform: &Platform,
    ) -> Result<RemoteImage, ImageError> {
        let (bytes, digest) = self.manifest(reference).await?;
        if let Some(pinned) = reference.digest()
            && pinned != digest
        {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest of {reference}"),
                expected: pinned.to_string(),
                actual: digest.to_string(),
            });
        }
        let media_type = media_type_of(&bytes);
        let (index_digest, manifest_digest, bytes) =
            if media_type == OCI_INDEX || media_type == DOCKER_LIST {
                let index: ImageIndex = serde_json::from_slice(&bytes)
                    .map_err(|e| self.bad(reference, format!("image index {digest}: {e}")))?;
                let chosen = platform.choose(index.manifests()).ok_or_else(|| {
                    ImageError::PlatformNotFound {
                        reference: reference.to_string(),
                        platform: platform.to_string(),
                        available: index.manifests().iter().map(platform::describe).collect(),
                    }
                })?;
                let want = Digest::parse(chosen.digest().as_ref())?;
                let (bytes, got) = self.manifest(&reference.with_digest(&want)).await?;
                if got != want {
                    return Err(ImageError::DigestMismatch {
                        what: format!("manifest of {reference} for {platform}"),
                        expected: want.to_string(),
                        actual: got.to_string(),
                    });
                }
                let inner = media_type_of(&bytes);
                if inner != OCI_MANIFEST && inner != DOCKER_MANIFEST {
                    return Err(self.bad(
                        reference,
                        format!("index entry {want} is a `{inner}`, not an image manifest"),
                    ));
                }
                (Some(digest), got, bytes)
            } else if media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST {
                (None, digest, bytes)
            } else {
                return Err(self.bad(
                    reference,
                    format!("unsupported manifest media type `{media_type}`"),
                ));
            };
        let manifest: ImageManifest = serde_json::from_slice(&bytes)
            .map_err(|e| self.bad(reference, format!("manifest {manifest_digest}: {e}")))?;
        let mut layers = Vec::new();
        for layer in manifest.layers() {
            let blob = LayerBlob {
                media_type: layer.media_type().to_string(),
                digest: Digest::parse(layer.digest().as_ref())?,
                size: layer.size(),
            };
            if Compression::for_media_type(&blob.media_type).is_none() {
                return Err(ImageError::UnknownMediaType {
                    layer: blob.digest.to_string(),
                    media_type: blob.media_type,
                });
            }
            layers.push(blob);
        }
        let config_descriptor = manifest.config();
        let config_digest = Digest::parse(config_descriptor.digest().as_ref())?;
        let config_bytes = self
            .small_blob(reference, &config_digest, config_descriptor.size())
            .await?;
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(|e| self.bad(reference, format!("image config {config_digest}: {e}")))?;
        let diff_ids = crate::import::diff_ids_of(&config).map_err(|reason| {
            self.bad(reference, format!("image config {config_digest}: {reason}"))
        })?;
        if diff_ids.len() != layers.len() {
            return Err(self.bad(
                reference,
                format!(
                    "manifest {manifest_digest} has {} layers, its config has {} DiffIDs",
                    layers.len(),
                    diff_ids.len()
                ),
            ));
        }
        Ok(RemoteImage {
            reference: reference.clone(),
            index_digest,
            manifest_digest,
            config_digest,
            config: RuntimeConfig::from_config(&config),
            platform: format!("{}/{}", config.os(), config.architecture()),
            diff_ids,
            layers,
        })
    }

    /// Streams the blob of a layer. The stream is not verified here: the
    /// layer cache checks size, digest and DiffID while it unpacks.
    pub async fn blob_stream(
        &self,
        reference: &ImageRef,
        blob: &LayerBlob,
    ) -> Result<BoxStream<'static, io::Result<Bytes>>, ImageError> {
        let stream = self
            .client
            .pull_blob_stream(reference.oci(), blob.digest.as_str())
            .await
            .map_err(|e| self.error(reference, e))?;
        // oci-client checks the digest too and fails the stream's last read on
        // a mismatch; the layer cache's own check gives the clearer error, so
        // that error just ends the stream here.
        Ok(stream
            .stream
            .take_while(|item| {
                std::future::ready(!matches!(item, Err(e) if is_digest_verification(e)))
            })
            .boxed())
    }

    /// Checks that the registry accepts `credentials` (`podvisor login`).
    pub async fn check_login(
        options: &RegistryOptions,
        registry: &str,
        credentials: Credentials,
    ) -> Result<(), ImageError> {
        let probe = ImageRef::parse(&format!("{registry}/podvisor/login-check:latest"))?;
        let this = Registry::with_credentials(
            options,
            registry,
            Some(credentials),
            options.docker_config_path(),
        );
        match this
            .client
            .auth(probe.oci(), &this.auth, oci_client::RegistryOperation::Pull)
            .await
        {
            // A token service answered: the credentials are good.
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(e) => {
                return Err(match this.error(&probe, e) {
                    ImageError::Unauthorized { registry, .. } => ImageError::Unauthorized {
                        registry,
                        reason: "the token service rejected the user name or password".into(),
                    },
                    other => other,
                });
            }
        }
        // Basic auth (or none): ask the registry itself.
        let scheme = if options.plain_http(registry) {
            "http"
        } else {
            "https"
        };
        let RegistryAuth::Basic(user, pass) = &this.auth else {
            unreachable!()
        };
        let response = reqwest::Client::new()
            .get(format!("{scheme}://{}/v2/", probe.registry_host()))
            .basic_auth(user, Some(pass))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| ImageError::Registry {
                registry: registry.to_string(),
                reason: error_chain(&e),
            })?;
        match response.status().as_u16() {
            200 => Ok(()),
            401 | 403 => Err(ImageError::Unauthorized {
                registry: registry.to_string(),
                reason: "the registry rejected the user name or password".into(),
            }),
            code => Err(ImageError::Registry {
                registry: registry.to_string(),
                reason: format!("GET /v2/ answered HTTP {code}"),
            }),
        }
    }

    async fn manifest(&self, reference: &ImageRef) -> Result<(Bytes, Digest), ImageError> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(reference.oci(), &self.auth, ACCEPTED)
            .await
            .map_err(|e| self.error(reference, e))?;
        if bytes.len() as u64 > MAX_JSON_BYTES {
            return Err(self.bad(
                reference,
                format!("manifest is {} bytes, more than allowed", bytes.len()),
            ));
        }
        Ok((bytes.clone(), Digest::sha256_of(&bytes)))
    }

    async fn small_blob(
        &self,
        reference: &ImageRef,
        digest: &Digest,
        size: u64,
    ) -> Result<Vec<u8>, ImageError> {
        let what = format!("image config {digest}");
        if size > MAX_JSON_BYTES {
            return Err(self.bad(
                reference,
                format!("{what} claims {size} bytes, more than allowed"),
            ));
        }
        let mut stream = self
            .client
            .pull_blob_stream(reference.oci(), digest.as_str())
            .await
            .map_err(|e| self.error(reference, e))?;
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(e) if is_digest_verification(&e) => break,
                Err(e) => {
                    return Err(ImageError::io(
                        format!("read {what} from {}", self.registry),
                        e,
                    ));
                }
            }
            if data.len() as u64 > size {
                return Err(ImageError::SizeMismatch {
                    what,
                    expected: size,
                    actual: data.len() as u64,
                });
            }
        }
        if (data.len() as u64) < size {
            return Err(ImageError::Truncated {
                what,
                expected: size,
                actual: data.len() as u64,
            });
        }
        let actual = Digest::sha256_of(&data);
        if &actual != digest {
            return Err(ImageError::DigestMismatch {
                what,
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(data)
    }

    fn bad(&self, reference: &ImageRef, reason: String) -> ImageError {
        ImageError::BadRemoteImage {
            reference: reference.to_string(),
            reason,
        }
    }

    /// Turns an oci-client error into one that says what to do about it.
    fn error(&self, reference: &ImageRef, e: OciDistributionError) -> ImageError {
        let registry = self.registry.clone();
        match e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => ImageError::Unauthorized {
                registry: registry.clone(),
                reason: match &self.credentials_from {
                    Some(path) => format!(
                        "access to {} denied with the credentials from {}",
                        reference.repository(),
                        path.display()
                    ),
                    None => format!(
                        "{} needs credentials: run `podvisor login {registry}`",
                        reference.repository()
                    ),
                },
            },
            OciDistributionError::ImageManifestNotFoundError(_) => ImageError::NotFound {
                reference: reference.to_string(),
            },
            OciDistributionError::RegistryError { ref envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        oci_client::errors::OciErrorCode::ManifestUnknown
                            | oci_client::errors::OciErrorCode::NameUnknown
                            | oci_client::errors::OciErrorCode::BlobUnknown
                    )
                }) =>
            {
                ImageError::NotFound {
                    reference: reference.to_string(),
                }
            }
            OciDistributionError::ServerError { code: 404, .. } => ImageError::NotFound {
                reference: reference.to_string(),
            },
            other => ImageError::Registry {
                registry,
                reason: error_chain(&other),
            },
        }
    }
}

/// Whether a stream error is oci-client's own digest check failing.
fn is_digest_verification(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<oci_client::errors::DigestError>())
        .is_some_and(|d| matches!(d, oci_client::errors::DigestError::VerificationError { .. }))
}

/// The media type a manifest document declares, or the kind its fields show.
fn media_type_of(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(m),
            ..
        }) => m,
        Ok(Probe {
            schema_version: Some(1),
            ..
        }) => "application/vnd.docker.distribution.manifest.v1+json".into(),
        Ok(Probe {
            manifests: Some(_), ..
        }) => OCI_INDEX.into(),
        Ok(Probe {
            layers: Some(_), ..
        }) => OCI_MANIFEST.into(),
        _ => "unknown".into(),
    }
}

/// An error with all its causes, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}
