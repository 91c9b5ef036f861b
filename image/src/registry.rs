//! Reaching registries: endpoint order (mirrors, then the host), shared HTTP clients
//! with per-pull credentials, and mapping registry errors to `ImageError` kinds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;

use crate::config::{ImageServiceConfig, parse_endpoint_url};
use crate::error::ImageError;
use crate::reference::{ImageRef, is_loopback_host};

/// Credentials for one pull, from the CRI request.
#[derive(Clone, Default)]
pub enum Credentials {
    /// No credentials.
    #[default]
    Anonymous,
    /// HTTP basic (also used for the token flow's basic step).
    Basic { username: String, password: String },
    /// A registry bearer token used as is.
    Bearer(String),
    /// An OAuth2 refresh token, exchanged at the registry's token service.
    IdentityToken(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credentials::Bearer(_) => f.write_str("Bearer(***)"),
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(***)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_only_to_their_server() {
        let creds = Credentials::Basic {
            username: "u".into(),
            password: "p".into(),
        };
        let r = ImageRef::parse("busybox").unwrap();
        let mut cfg = ImageServiceConfig::default();
        cfg.registries.insert(
            "docker.io".into(),
            crate::config::RegistryHostConfig {
                mirrors: vec!["http://cache:5000".into()],
                insecure: false,
            },
        );
        let eps = endpoints(&cfg, &r);
        let (mirror, hub) = (&eps[0], &eps[1]);
        let is_basic = |c: &Credentials| matches!(c, Credentials::Basic { .. });
        let server = Some("https://index.docker.io/v1/");
        assert!(!is_basic(&credentials_for(&creds, server, mirror, &r)));
        assert!(is_basic(&credentials_for(&creds, server, hub, &r)));
        assert!(is_basic(&credentials_for(
            &creds,
            Some("cache:5000"),
            mirror,
            &r
        )));
        assert!(is_basic(&credentials_for(&creds, None, mirror, &r)));
        assert!(!is_basic(&credentials_for(
            &creds,
            Some("quay.io"),
            hub,
            &r
        )));
    }
}

impl Credentials {
    pub(crate) fn to_oci(&self) -> RegistryAuth {
        match self {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Credentials::Bearer(t) => RegistryAuth::Bearer(t.clone()),
            // Exchanged for a bearer token before any registry call (see `token`).
            Credentials::IdentityToken(_) => RegistryAuth::Anonymous,
        }
    }
}

/// The credentials to send to `ep`: a request's credentials belong to the host its
/// `server_address` names (any host when it is empty, as containerd does), so a
/// mirror never sees another registry's password.
pub fn credentials_for(
    creds: &Credentials,
    server_address: Option<&str>,
    ep: &Endpoint,
    r: &ImageRef,
) -> Credentials {
    let Some(server) = server_address.map(str::trim).filter(|s| !s.is_empty()) else {
        return creds.clone();
    };
    let host = server
        .split("://")
        .last()
        .unwrap_or(server)
        .split('/')
        .next()
        .unwrap_or("");
    let canon = |h: &str| -> String {
        match h {
            "docker.io" | "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
            other => other.to_ascii_lowercase(),
        }
    };
    let target = canon(host);
    if target == canon(&ep.host) || (!ep.mirror && target == canon(r.registry())) {
        creds.clone()
    } else {
        Credentials::Anonymous
    }
}

/// One place to fetch an image from.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `host[:port]`.
    pub host: String,
    /// Speak plain http.
    pub plain_http: bool,
    /// Accept any TLS certificate.
    pub skip_verify: bool,
    /// This endpoint is a mirror of the reference's registry.
    pub mirror: bool,
}

/// The endpoints to try for `r`, in order: configured mirrors, then the registry itself.
pub fn endpoints(cfg: &ImageServiceConfig, r: &ImageRef) -> Vec<Endpoint> {
    let host_cfg = cfg
        .registries
        .get(r.registry())
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in &host_cfg.mirrors {
        // Mirrors were validated when the config was loaded.
        if let Ok((plain, host)) = parse_endpoint_url(m) {
            let insecure = cfg.registries.get(&host).is_some_and(|c| c.insecure);
            out.push(Endpoint {
                host,
                plain_http: plain,
                skip_verify: insecure,
                mirror: true,
            });
        }
    }
    let upstream = match r.registry() {
        "docker.io" => "registry-1.docker.io".to_string(),
        h => h.to_string(),
    };
    let plain = host_cfg.insecure || is_loopback_host(&upstream);
    out.push(Endpoint {
        host: upstream,
        plain_http: plain,
        skip_verify: host_cfg.insecure,
        mirror: false,
    });
    out
}

/// The registry clients of one image service: one HTTP client per kind of endpoint
/// (plain or TLS, verifying or not), built once because building one reads and parses
/// every system root certificate, and shared for its connection pool. At most four.
pub struct ClientPool {
    max_concurrent: usize,
    clients: Mutex<HashMap<(bool, bool), oci_client::Client>>,
}

impl ClientPool {
    pub fn new(max_concurrent: usize) -> Self {
        ClientPool {
            max_concurrent: max_concurrent.max(1),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// A client for one pull from `ep`: shared connections, but its own credentials
    /// and tokens, so that one pull's authorization never serves another's.
    pub fn client_for(&self, ep: &Endpoint) -> Result<oci_client::Client, ImageError> {
        let key = (ep.plain_http, ep.skip_verify);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.with_fresh_auth());
        }
        // A failure is not cached: the next pull tries again.
        let c =
            oci_client::Client::try_from(client_config(ep, self.max_concurrent)).map_err(|e| {
                ImageError::Registry(format!("setting up a client for {}: {e}", ep.host))
            })?;
        Ok(clients.entry(key).or_insert(c).with_fresh_auth())
    }
}

fn client_config(ep: &Endpoint, max_concurrent: usize) -> ClientConfig {
    ClientConfig {
        protocol: if ep.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        accept_invalid_certificates: ep.skip_verify,
        platform_resolver: None,
        max_concurrent_download: max_concurrent,
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(120)),
        user_agent: concat!("berth/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    }
}

/// The reference to use against `ep` (the mirror host replaces the registry).
pub fn reference_for(ep: &Endpoint, r: &ImageRef) -> oci_client::Reference {
    let mut o = r.oci().clone();
    if ep.mirror || ep.host != r.registry() {
        o.set_mirror_registry(ep.host.clone());
    }
    o
}

/// Maps an oci-client error to an `ImageError`, naming the image and endpoint.
pub fn map_error(
    e: OciDistributionError,
    image: &str,
    ep: &Endpoint,
    creds: &Credentials,
) -> ImageError {
    let at = &ep.host;
    let unauth = || match creds {
        Credentials::Anonymous => ImageError::Unauthenticated(format!(
            "pulling {image} from {at}: the registry requires authentication"
        )),
        _ => ImageError::Unauthenticated(format!(
            "pulling {image} from {at}: the registry rejected the credentials (unauthorized)"
        )),
    };
    match e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => unauth(),
        OciDistributionError::ImageManifestNotFoundError(m) => {
            ImageError::NotFound(format!("pulling {image} from {at}: not found: {m}"))
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let msgs: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect();
            let text = format!("pulling {image} from {at}: {}", msgs.join("; "));
            match envelope.errors.first().map(|e| &e.code) {
                Some(
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NotFound,
                ) => ImageError::NotFound(text),
                Some(OciErrorCode::Unauthorized) => unauth(),
                Some(OciErrorCode::Denied) => ImageError::PermissionDenied(text),
                _ => ImageError::Registry(text),
            }
        }
        OciDistributionError::ServerError { code, message, .. } => {
            let text = format!("pulling {image} from {at}: HTTP {code}: {}", message.trim());
            match code {
                401 => unauth(),
                403 => ImageError::PermissionDenied(text),
                404 => ImageError::NotFound(text),
                _ => ImageError::Registry(text),
            }
        }
        OciDistributionError::DigestError(d) => ImageError::DigestMismatch(format!(
            "pulling {image} from {at}: content does not match its digest: {d}"
        )),
        OciDistributionError::RequestError(re) => {
            let mut msg = re.to_string();
            let mut src = std::error::Error::source(&re);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            ImageError::Registry(format!("pulling {image}: cannot reach {at}: {msg}"))
        }
        other => ImageError::Registry(format!("pulling {image} from {at}: {other}")),
    }
}
