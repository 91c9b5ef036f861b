//! Image references, normalized as Docker does (`busybox` -> `docker.io/library/busybox:latest`).

use oci_client::Reference;

use crate::digest::Digest;
use crate::error::{ImageError, Result};

/// A parsed, normalized image reference.
#[derive(Clone, Debug)]
pub struct ImageRef {
    inner: Reference,
    digest: Option<Digest>,
}

impl ImageRef {
    /// Parses a reference; a malformed one is an `InvalidReference` naming it.
    pub fn parse(s: &str) -> Result<ImageRef> {
        let invalid = |reason: String| ImageError::InvalidReference {
            reference: shown(s),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("empty image reference".into()));
        }
        if s.len() > 4096 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(
                "contains whitespace or control characters, or is too long".into(),
            ));
        }
        let inner: Reference = s.parse().map_err(|e| invalid(format!("{e}")))?;
        if let Some(bad) = inner
            .repository()
            .split('/')
            .find(|c| !valid_path_component(c))
        {
            return Err(invalid(format!(
                "repository component {bad:?} must be lowercase letters and digits, separated by '.', '_', '__' or '-'"
            )));
        }
        let digest = inner
            .digest()
            .map(Digest::parse)
            .transpose()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(ImageRef { inner, digest })
    }

    /// The registry host (with port), e.g. `docker.io` or `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The repository path, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry(), self.repository())
    }

    /// The tag, if the reference has one and no digest (a digest pins the content).
    pub fn tag(&self) -> Option<&str> {
        if self.digest.is_some() {
            None
        } else {
            self.inner.tag()
        }
    }

    /// The digest, if the reference names one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `name:tag` when pulled by tag.
    pub fn tagged_name(&self) -> Option<String> {
        self.tag().map(|t| format!("{}:{t}", self.name()))
    }

    /// `name@digest` for a given manifest digest.
    pub fn digested_name(&self, digest: &Digest) -> String {
        format!("{}@{digest}", self.name())
    }

    /// The canonical string: `name:tag` or `name@digest`.
    pub fn canonical(&self) -> String {
        match &self.digest {
            Some(d) => self.digested_name(d),
            None => self
                .tagged_name()
                .unwrap_or_else(|| format!("{}:latest", self.name())),
        }
    }

    /// The underlying oci-client reference.
    pub fn oci(&self) -> &Reference {
        &self.inner
    }

    /// Whether the registry host is a loopback address, where plain http is allowed by default.
    pub fn is_loopback_registry(&self) -> bool {
        is_loopback_host(self.registry())
    }
}

/// Docker's path-component grammar: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// Whether `host[:port]` names the loopback interface.
pub fn is_loopback_host(host_port: &str) -> bool {
    let host = match host_port.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host_port.rsplit_once(':').map_or(host_port, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// A reference as errors echo it: at most 128 characters, then its length.
fn shown(s: &str) -> String {
    match s.char_indices().nth(128) {
        None => s.to_string(),
        Some((at, _)) => format!("{}... ({} bytes)", &s[..at], s.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_docker() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(r.canonical(), "docker.io/library/busybox:latest");
        let r = ImageRef::parse("127.0.0.1:5000/a/b:1").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.canonical(), "127.0.0.1:5000/a/b:1");
        assert!(r.is_loopback_registry());
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("quay.io/x/y:tag@{d}")).unwrap();
        assert_eq!(r.canonical(), format!("quay.io/x/y@{d}"));
        assert_eq!(r.tag(), None);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "UPPER/case",
            "a b",
            "busybox:",
            "x@sha256:12",
            "://x",
            "a/b:tag:tag",
        ] {
            let e = ImageRef::parse(bad).unwrap_err();
            assert!(
                matches!(e, ImageError::InvalidReference { .. }),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_host("localhost:5000"));
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("docker.io"));
        assert!(!is_loopback_host("10.0.0.1:5000"));
    }
}
