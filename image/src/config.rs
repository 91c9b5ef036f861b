//! The image service's part of berth's config file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `[registries."<host>"]`: how to reach one registry host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryHostConfig {
    /// Endpoints tried in order before the host itself, e.g. `http://127.0.0.1:5000`.
    pub mirrors: Vec<String>,
    /// Allow plain http and unverified TLS for this host (loopback hosts always may use http).
    pub insecure: bool,
}

/// `[image]`: pull behaviour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// Layers downloaded and unpacked at once per pull.
    pub max_concurrent_downloads: usize,
    /// A pull that takes longer than this many seconds fails (0 = no limit).
    pub pull_timeout_secs: u64,
    /// Images reported as pinned (kubelet never garbage-collects them).
    pub pinned_images: Vec<String>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            max_concurrent_downloads: 3,
            pull_timeout_secs: 600,
            pinned_images: Vec::new(),
        }
    }
}

/// Everything the image service needs from the config.
#[derive(Clone, Debug, Default)]
pub struct ImageServiceConfig {
    /// Pull behaviour.
    pub image: ImageConfig,
    /// Per-registry settings keyed by host (`docker.io`, `127.0.0.1:5000`).
    pub registries: BTreeMap<String, RegistryHostConfig>,
}

/// Checks a mirror URL: `http(s)://host[:port]` with no path. Returns the message on error.
pub fn validate_mirror(url: &str) -> Result<(), String> {
    parse_endpoint_url(url).map(|_| ())
}

/// Splits `http(s)://host[:port]` into (plain_http, host[:port]).
pub(crate) fn parse_endpoint_url(url: &str) -> Result<(bool, String), String> {
    let (plain, rest) = if let Some(r) = url.strip_prefix("http://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (false, r)
    } else {
        return Err(format!(
            "mirror {url:?} must start with http:// or https://"
        ));
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        return Err(format!(
            "mirror {url:?} must be scheme://host[:port] without a path"
        ));
    }
    Ok((plain, host.to_string()))
}
