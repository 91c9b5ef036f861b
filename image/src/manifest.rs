//! The manifest, index and config JSON that a pull reads (OCI and Docker v2 schema 2).

use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{ImageError, Result};

/// Media types accepted when resolving a reference.
pub const ACCEPTED_MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// A content descriptor.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Platform (index entries only).
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// An index entry's platform.
#[derive(Clone, Debug, Deserialize)]
pub struct Platform {
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `v8`.
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// A parsed manifest document.
pub enum Document {
    /// An index / manifest list.
    Index(Vec<Descriptor>),
    /// An image manifest.
    Manifest {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Parses a manifest or index; `what` names it in errors.
pub fn parse_document(bytes: &[u8], what: &str) -> Result<Document> {
    let p: Probe = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::Unsupported(format!("{what}: manifest is not valid JSON: {e}")))?;
    if p.schema_version == Some(1) {
        return Err(ImageError::Unsupported(format!(
            "{what}: Docker schema 1 manifests are not supported"
        )));
    }
    if let Some(m) = p.manifests {
        return Ok(Document::Index(m));
    }
    match (p.config, p.layers) {
        (Some(config), Some(layers)) => {
            if !matches!(
                config.media_type.as_str(),
                "application/vnd.oci.image.config.v1+json"
                    | "application/vnd.docker.container.image.v1+json"
            ) {
                return Err(ImageError::Unsupported(format!(
                    "{what}: config media type {:?} is not a container image (artifact?)",
                    config.media_type
                )));
            }
            for l in &layers {
                let t = l.media_type.as_str();
                let ok = t.starts_with("application/vnd.oci.image.layer.")
                    || t.starts_with("application/vnd.docker.image.rootfs.");
                if !ok || t.contains("encrypted") {
                    return Err(ImageError::Unsupported(format!(
                        "{what}: layer {} has unsupported media type {t:?}",
                        l.digest
                    )));
                }
            }
            Ok(Document::Manifest { config, layers })
        }
        _ => Err(ImageError::Unsupported(format!(
            "{what}: not an image manifest or index (media type {:?})",
            p.media_type.unwrap_or_default()
        ))),
    }
}

/// The OCI architecture name of this host.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "arm" => "arm",
        other => other,
    }
}

/// Picks the index entry for this host (linux, host architecture; for arm64 the
/// `v8` variant or none).
pub fn pick_platform<'a>(entries: &'a [Descriptor], what: &str) -> Result<&'a Descriptor> {
    let arch = host_arch();
    let matches = |d: &&Descriptor| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == "linux"
                && p.architecture == arch
                && (arch != "arm64" || matches!(p.variant.as_deref(), None | Some("") | Some("v8")))
        })
    };
    entries.iter().find(matches).ok_or_else(|| {
        let have: Vec<String> = entries
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .map(|p| {
                format!(
                    "{}/{}{}",
                    p.os,
                    p.architecture,
                    p.variant
                        .as_ref()
                        .map(|v| format!("/{v}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        ImageError::NotFound(format!(
            "{what}: no manifest for linux/{arch} in the index (has: {})",
            have.join(", ")
        ))
    })
}

/// What a pull needs from the image config.
pub struct ImageConfigSummary {
    /// Uncompressed layer digests, bottom first.
    pub diff_ids: Vec<Digest>,
    /// The `User` field.
    pub user: String,
}

/// Parses an image config (typed, as CreateContainer will read it) and returns what a
/// pull needs of it.
pub fn parse_config(bytes: &[u8], what: &str) -> Result<ImageConfigSummary> {
    let invalid =
        |e: String| ImageError::Unsupported(format!("{what}: image config is not valid: {e}"));
    let c: oci_spec::image::ImageConfiguration =
        serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    let diff_ids = c
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| Digest::parse(d).map_err(|e| invalid(format!("rootfs.diff_ids: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(ImageConfigSummary {
        diff_ids,
        user: c
            .config()
            .as_ref()
            .and_then(|c| c.user().clone())
            .unwrap_or_default(),
    })
}
