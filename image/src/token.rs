//! The OAuth2 refresh-token exchange for an `identity_token` (as docker and containerd
//! do it): ask the registry for its bearer challenge, then trade the refresh token
//! at the challenge's realm for an access token.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::{ImageError, Result};
use crate::registry::Endpoint;

/// A `WWW-Authenticate: Bearer ...` challenge.
#[derive(Debug, PartialEq, Eq)]
pub struct BearerChallenge {
    /// Token endpoint.
    pub realm: String,
    /// `service` parameter for the token request.
    pub service: Option<String>,
}

/// Parses a `WWW-Authenticate` value; `None` unless it is a Bearer challenge with a realm.
pub fn parse_bearer_challenge(header: &str) -> Option<BearerChallenge> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_string(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.insert(key, value);
        s = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(BearerChallenge {
        realm: params.remove("realm")?,
        service: params.remove("service"),
    })
}

/// Trades `refresh_token` for an access token that may pull `repository` from `ep`.
pub async fn exchange_identity_token(
    ep: &Endpoint,
    repository: &str,
    refresh_token: &str,
    image: &str,
) -> Result<String> {
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(ep.skip_verify)
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| ImageError::Registry(format!("pulling {image}: http client: {e}")))?;
    let scheme = if ep.plain_http { "http" } else { "https" };
    let unreachable = |e: reqwest::Error| {
        ImageError::Registry(format!("pulling {image}: cannot reach {}: {e}", ep.host))
    };
    let probe = http
        .get(format!("{scheme}://{}/v2/", ep.host))
        .send()
        .await
        .map_err(unreachable)?;
    let challenge = probe
        .headers()
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(parse_bearer_challenge)
        .ok_or_else(|| {
            ImageError::Unauthenticated(format!(
                "pulling {image} from {}: an identity token was given but the registry does not use token authentication",
                ep.host
            ))
        })?;
    // The serializer is not Send; finish it before the next await.
    let form = {
        let mut f = url::form_urlencoded::Serializer::new(String::new());
        f.append_pair("grant_type", "refresh_token")
            .append_pair("refresh_token", refresh_token)
            .append_pair("client_id", "berth")
            .append_pair("scope", &format!("repository:{repository}:pull"));
        if let Some(s) = &challenge.service {
            f.append_pair("service", s);
        }
        f.finish()
    };
    let resp = http
        .post(&challenge.realm)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(form)
        .send()
        .await
        .map_err(|e| {
            ImageError::Registry(format!(
                "pulling {image}: token service {}: {e}",
                challenge.realm
            ))
        })?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::BAD_REQUEST {
        return Err(ImageError::Unauthenticated(format!(
            "pulling {image}: the token service {} rejected the identity token ({status})",
            challenge.realm
        )));
    }
    if !status.is_success() {
        return Err(ImageError::Registry(format!(
            "pulling {image}: token service {} answered {status}",
            challenge.realm
        )));
    }
    let failed = |e: String| {
        ImageError::Registry(format!(
            "pulling {image}: token service {}: {e}",
            challenge.realm
        ))
    };
    let bytes = read_capped(resp).await.map_err(failed)?;
    let body: TokenResponse = serde_json::from_slice(&bytes).map_err(|e| failed(e.to_string()))?;
    body.access_token.or(body.token).ok_or_else(|| {
        ImageError::Registry(format!(
            "pulling {image}: token service {} sent no access_token",
            challenge.realm
        ))
    })
}

/// The fields of a token service's answer that berth uses.
#[derive(serde::Deserialize)]
struct TokenResponse {
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

/// The most of a token service's answer read (a token is a few KiB).
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

/// The body, refused past `MAX_TOKEN_RESPONSE` (a hostile service could stream GiBs).
async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_TOKEN_RESPONSE {
            return Err(format!("the answer is over {MAX_TOKEN_RESPONSE} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let c = parse_bearer_challenge(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#)
            .unwrap();
        assert_eq!(c.realm, "https://auth.example/token");
        assert_eq!(c.service.as_deref(), Some("registry.example"));
        assert_eq!(parse_bearer_challenge(r#"Basic realm="x""#), None);
        assert_eq!(parse_bearer_challenge("Bearer service=x"), None);
        let c = parse_bearer_challenge("bearer realm=http://127.0.0.1:1/token").unwrap();
        assert_eq!(c.realm, "http://127.0.0.1:1/token");
    }
}
