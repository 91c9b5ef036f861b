//! A Docker token-auth ("bearer") server for tests, so a registry can run in token mode.
//!
//! [`TokenServer`] is a small HTTP/1.1 server on 127.0.0.1 that issues ES256 JWTs which
//! docker-registry (distribution 2.8) accepts with
//!
//! ```yaml
//! auth:
//!   token:
//!     realm: <TokenServer::realm()>
//!     service: <TokenServer::service()>
//!     issuer: <TokenServer::issuer()>
//!     rootcertbundle: <TokenServer::cert_path()>
//! ```
//!
//! (see [`crate::registry::TestRegistry::start_with_token`]). The signing key and its
//! self-signed certificate are made with the `openssl` CLI at start; every JWT carries the
//! certificate in its `x5c` header, which the registry verifies against `rootcertbundle`.
//!
//! Endpoints (all on `/token`, every response has `Connection: close`):
//! - `GET /token?service=S&scope=repository:R:pull,push` — HTTP Basic auth with the one
//!   configured user: 200 `{"token","access_token","expires_in","issued_at"}`; a wrong
//!   user/password is 401; no `Authorization` header yields an anonymous token with an
//!   empty `access` list (the registry then refuses it, as with real token servers).
//!   `offline_token=true` with valid credentials adds `refresh_token`.
//! - `POST /token` with a form body, the OAuth2 flow containerd/docker use for identity
//!   tokens: `grant_type=refresh_token&refresh_token=..` (200 `{"access_token",
//!   "expires_in","issued_at","scope"}` if it equals the configured refresh token, else
//!   401 `{"error":"invalid_grant"}`), or `grant_type=password&username=..&password=..`
//!   (adds `refresh_token` when `access_type=offline`).
//!
//! A `service` parameter that differs from [`TokenServer::service`] is answered with 400.
//! Granted access is the requested scope intersected with the user's allowed actions
//! (default `pull`, `push`, `delete`, `*`; see [`TokenServer::set_user_actions`]).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::{Value, json};

/// Lifetime of every issued token, in seconds.
pub const TOKEN_TTL_SECS: u64 = 300;

/// The `service` (JWT `aud`) the registry must be configured with.
pub const SERVICE: &str = "berth-test-registry";

/// The JWT `iss` the registry must be configured to trust.
pub const ISSUER: &str = "berth-test-token-issuer";

/// Actions the configured user may perform unless [`TokenServer::set_user_actions`] says otherwise.
pub const DEFAULT_USER_ACTIONS: &[&str] = &["pull", "push", "delete", "*"];

/// Largest request head / body the server reads.
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 64 * 1024;

/// Socket timeouts for one connection, so a silent client cannot hold a thread forever.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How a token request authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// GET without an `Authorization` header.
    Anonymous,
    /// GET with HTTP Basic auth.
    Basic,
    /// POST `grant_type=refresh_token`.
    RefreshToken,
    /// POST `grant_type=password`.
    Password,
    /// Anything else (unsupported scheme or grant type, bad request).
    Other(String),
}

/// One request to `/token`, as recorded by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// How the client tried to authenticate.
    pub grant: Grant,
    /// The user a token was issued for; `None` for anonymous or refused requests.
    pub subject: Option<String>,
    /// The requested scopes, e.g. `repository:berth/test:pull,push`.
    pub scopes: Vec<String>,
    /// The `service` parameter, if sent.
    pub service: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
}

/// A running token server; its threads stop on drop.
pub struct TokenServer {
    addr: SocketAddr,
    dir: PathBuf,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// Standard base64 of the DER certificate, for the `x5c` header.
    cert_b64: String,
    user: String,
    password: String,
    refresh_token: String,
    user_actions: Mutex<Vec<String>>,
    log: Mutex<Vec<TokenRequest>>,
    shutdown: AtomicBool,
    /// Connection threads still running.
    active: AtomicUsize,
}

impl fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenServer")
            .field("addr", &self.addr)
            .field("dir", &self.dir)
            .field("user", &self.shared.user)
            .finish_non_exhaustive()
    }
}

impl TokenServer {
    /// Generates a P-256 key and self-signed certificate under `dir` (with `openssl`) and
    /// starts serving on a free 127.0.0.1 port.
    ///
    /// `user`/`password` are the one account accepted by Basic auth and the password grant;
    /// `refresh_token` is the one accepted by the refresh-token grant.
    pub fn start(
        dir: &Path,
        user: &str,
        password: &str,
        refresh_token: &str,
    ) -> Result<TokenServer> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("canonicalizing {}", dir.display()))?;
        let (pkcs8, cert_der) = generate_key_and_cert(&dir)?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|e| anyhow!("ring rejected the openssl P-256 PKCS#8 key: {e}"))?;
        let shared = Arc::new(Shared {
            key,
            rng,
            cert_b64: STANDARD.encode(&cert_der),
            user: user.to_string(),
            password: password.to_string(),
            refresh_token: refresh_token.to_string(),
            user_actions: Mutex::new(DEFAULT_USER_ACTIONS.iter().map(|a| a.to_string()).collect()),
            log: Mutex::new(Vec::new()),
            shutdown: AtomicBool::new(false),
            active: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let accept = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("token-server".into())
                .spawn(move || accept_loop(listener, shared))
                .context("spawning the token server thread")?
        };
        Ok(TokenServer {
            addr,
            dir,
            shared,
            accept: Some(accept),
        })
    }

    /// `http://127.0.0.1:PORT/token`, the registry's `auth.token.realm`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The PEM certificate whose key signs the tokens (the registry's `rootcertbundle`).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// The audience of issued tokens (the registry's `auth.token.service`).
    pub fn service(&self) -> &str {
        SERVICE
    }

    /// The issuer of issued tokens (the registry's `auth.token.issuer`).
    pub fn issuer(&self) -> &str {
        ISSUER
    }

    /// The user accepted by Basic auth and the password grant.
    pub fn user(&self) -> &str {
        &self.shared.user
    }

    /// That user's password.
    pub fn password(&self) -> &str {
        &self.shared.password
    }

    /// The refresh token accepted by the refresh-token grant (a CRI `identity_token`).
    pub fn refresh_token(&self) -> &str {
        &self.shared.refresh_token
    }

    /// Restricts what the user may do from now on, e.g. `&["pull"]` for a read-only account.
    pub fn set_user_actions(&self, actions: &[&str]) {
        *lock(&self.shared.user_actions) = actions.iter().map(|a| a.to_string()).collect();
    }

    /// A token for the user granting exactly `actions` on repository `repo`, without a
    /// request (e.g. for a CRI `registry_token`). Not counted in [`TokenServer::requests`].
    pub fn issue_token(&self, repo: &str, actions: &[&str]) -> Result<String> {
        let access = vec![Access::repository(repo, actions)];
        self.shared
            .sign(&self.shared.user, &access, now_secs(), TOKEN_TTL_SECS)
    }

    /// Like [`TokenServer::issue_token`], but expired an hour ago (well beyond the
    /// registry's 60 s leeway).
    pub fn issue_expired_token(&self, repo: &str, actions: &[&str]) -> Result<String> {
        let access = vec![Access::repository(repo, actions)];
        self.shared
            .sign(&self.shared.user, &access, now_secs() - 2 * 3600, 3600)
    }

    /// How many requests `/token` has answered, whatever the outcome (tokens issued,
    /// 401s, 400s). Requests for other paths are not counted.
    pub fn requests(&self) -> usize {
        lock(&self.shared.log).len()
    }

    /// How many of those requests got a token (status 200).
    pub fn tokens_issued(&self) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.status == 200)
            .count()
    }

    /// Every `/token` request so far, oldest first.
    pub fn request_log(&self) -> Vec<TokenRequest> {
        lock(&self.shared.log).clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // Unblock accept(); if even that fails, leave the thread rather than hang in join.
        let woke = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(handle) = self.accept.take()
            && woke
        {
            let _ = handle.join();
        }
        // Connection threads end by themselves within IO_TIMEOUT; wait for them briefly.
        let deadline = Instant::now() + IO_TIMEOUT + Duration::from_secs(1);
        while self.shared.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Creates `key.pem` (P-256), `key.pk8.der` (PKCS#8 DER) and a self-signed `cert.pem` /
/// `cert.der` in `dir`; returns the PKCS#8 key and the DER certificate.
fn generate_key_and_cert(dir: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    let key_pem = dir.join("key.pem");
    let key_der = dir.join("key.pk8.der");
    let cert_pem = dir.join("cert.pem");
    let cert_der = dir.join("cert.der");
    let p = |p: &Path| p.to_string_lossy().into_owned();
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-pkeyopt",
        "ec_param_enc:named_curve",
        "-out",
        &p(&key_pem),
    ])?;
    openssl(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        &p(&key_pem),
        "-outform",
        "DER",
        "-out",
        &p(&key_der),
    ])?;
    openssl(&[
        "req",
        "-new",
        "-x509",
        "-sha256",
        "-key",
        &p(&key_pem),
        "-subj",
        "/CN=berth-test-token-issuer",
        "-days",
        "7",
        "-out",
        &p(&cert_pem),
    ])?;
    openssl(&[
        "x509",
        "-in",
        &p(&cert_pem),
        "-outform",
        "DER",
        "-out",
        &p(&cert_der),
    ])?;
    let pkcs8 = fs::read(&key_der).with_context(|| format!("reading {}", key_der.display()))?;
    let cert = fs::read(&cert_der).with_context(|| format!("reading {}", cert_der.display()))?;
    Ok((pkcs8, cert))
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (Debian package openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One entry of the JWT `access` claim.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Access {
    ty: String,
    name: String,
    actions: Vec<String>,
}

impl Access {
    fn repository(name: &str, actions: &[&str]) -> Access {
        Access {
            ty: "repository".into(),
            name: name.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn to_json(&self) -> Value {
        json!({"type": self.ty, "name": self.name, "actions": self.actions})
    }
}

/// Parses scopes (`type:name:action,action`, several per string separated by spaces),
/// merging repeated resources. The name may contain `:` (type is up to the first colon,
/// actions after the last). Unparseable scopes are ignored.
fn parse_scopes<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Vec<Access> {
    let mut merged: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut order = Vec::new();
    for scope in scopes.into_iter().flat_map(|s| s.split(' ')) {
        let Some((ty, rest)) = scope.split_once(':') else {
            continue;
        };
        let Some((name, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        if ty.is_empty() || name.is_empty() {
            continue;
        }
        let key = (ty.to_string(), name.to_string());
        let entry = merged.entry(key.clone()).or_insert_with(|| {
            order.push(key);
            Vec::new()
        });
        for action in actions.split(',').filter(|a| !a.is_empty()) {
            if !entry.iter().any(|a| a == action) {
                entry.push(action.to_string());
            }
        }
    }
    order
        .into_iter()
        .map(|key| {
            let actions = merged.remove(&key).unwrap_or_default();
            Access {
                ty: key.0,
                name: key.1,
                actions,
            }
        })
        .collect()
}

/// Keeps only the requested actions the subject may perform; drops entries left empty.
fn grant(requested: &[Access], allowed: &[String]) -> Vec<Access> {
    requested
        .iter()
        .map(|a| Access {
            ty: a.ty.clone(),
            name: a.name.clone(),
            actions: a
                .actions
                .iter()
                .filter(|x| allowed.contains(x))
                .cloned()
                .collect(),
        })
        .filter(|a| !a.actions.is_empty())
        .collect()
}

impl Shared {
    /// Signs a JWT for `subject` (empty for anonymous) valid from `iat` for `ttl` seconds.
    fn sign(&self, subject: &str, access: &[Access], iat: i64, ttl: u64) -> Result<String> {
        let mut jti = [0u8; 16];
        self.rng
            .fill(&mut jti)
            .map_err(|_| anyhow!("system random generator failed"))?;
        let claims = json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": iat + ttl as i64,
            "nbf": iat,
            "iat": iat,
            "jti": hex::encode(jti),
            "access": access.iter().map(Access::to_json).collect::<Vec<_>>(),
        });
        sign_jwt(&self.key, &self.rng, &self.cert_b64, &claims)
    }

    fn user_actions(&self) -> Vec<String> {
        lock(&self.user_actions).clone()
    }
}

/// `base64url(header).base64url(claims).base64url(r||s)` with an ES256 `x5c` header.
fn sign_jwt(
    key: &EcdsaKeyPair,
    rng: &SystemRandom,
    cert_b64: &str,
    claims: &Value,
) -> Result<String> {
    let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [cert_b64]});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
    );
    let sig = key
        .sign(rng, signing_input.as_bytes())
        .map_err(|_| anyhow!("ES256 signing failed"))?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(sig.as_ref())
    ))
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(_) => {
                // E.g. EMFILE or a connection reset before accept; don't spin.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.active.fetch_add(1, Ordering::SeqCst);
        let conn_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("token-conn".into())
            .spawn(move || {
                let _ = handle_connection(stream, &conn_shared);
                conn_shared.active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            shared.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One parsed HTTP request.
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status, extra headers, JSON body.
struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Value,
}

impl Response {
    fn json(status: u16, body: Value) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body,
        }
    }

    fn error(status: u16, error: &str, description: &str) -> Response {
        Response::json(
            status,
            json!({"error": error, "error_description": description}),
        )
    }
}

fn handle_connection(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    if shared.shutdown.load(Ordering::SeqCst) {
        return Ok(());
    }
    let resp = match read_request(&mut stream) {
        Ok(req) => route(&req, shared),
        Err(ReadError::Io(e)) => return Err(e),
        Err(ReadError::Bad(status, msg)) => Response::error(status, "invalid_request", &msg),
    };
    write_response(&mut stream, &resp)?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

enum ReadError {
    Io(io::Error),
    Bad(u16, String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn read_request(stream: &mut TcpStream) -> std::result::Result<Request, ReadError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::Bad(431, "request head too large".into()));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad(
            400,
            format!("bad request line {request_line:?}"),
        ));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad(
            505,
            format!("unsupported version {version:?}"),
        ));
    }
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut req = Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body: buf[head_end + 4..].to_vec(),
    };
    if req
        .header("transfer-encoding")
        .is_some_and(|te| !te.eq_ignore_ascii_case("identity"))
    {
        return Err(ReadError::Bad(
            411,
            "chunked bodies are not supported".into(),
        ));
    }
    let len: usize = match req.header("content-length") {
        Some(v) => v
            .parse()
            .map_err(|_| ReadError::Bad(400, format!("bad Content-Length {v:?}")))?,
        None => 0,
    };
    if len > MAX_BODY {
        return Err(ReadError::Bad(413, "request body too large".into()));
    }
    if req.body.len() < len
        && req
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    while req.body.len() < len {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        req.body.extend_from_slice(&chunk[..n]);
    }
    req.body.truncate(len);
    Ok(req)
}

fn write_response(stream: &mut TcpStream, resp: &Response) -> io::Result<()> {
    let body = serde_json::to_vec(&resp.body).map_err(io::Error::other)?;
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        resp.status,
        reason(resp.status),
        body.len()
    );
    for (k, v) in &resp.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    stream.write_all(&bytes)?;
    stream.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

fn route(req: &Request, shared: &Shared) -> Response {
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    if path != "/token" {
        return Response::error(404, "not_found", "only /token is served");
    }
    let (mut record, resp) = match req.method.as_str() {
        "GET" => token_get(req, query, shared),
        "POST" => token_post(req, shared),
        _ => {
            let mut resp = Response::error(405, "invalid_request", "use GET or POST");
            resp.headers.push(("Allow", "GET, POST".into()));
            let record = TokenRequest {
                method: req.method.clone(),
                grant: Grant::Other(String::new()),
                subject: None,
                scopes: Vec::new(),
                service: None,
                status: 405,
            };
            (record, resp)
        }
    };
    record.status = resp.status;
    lock(&shared.log).push(record);
    resp
}

/// What a handler decided before signing.
struct Decision {
    grant: Grant,
    /// `Some(user)` (possibly empty for anonymous) when a token is to be issued.
    subject: Option<String>,
    scopes: Vec<String>,
    service: Option<String>,
}

fn token_get(req: &Request, query: &str, shared: &Shared) -> (TokenRequest, Response) {
    let params = parse_form(query);
    let scopes = all(&params, "scope");
    let service = first(&params, "service");
    let mut d = Decision {
        grant: Grant::Anonymous,
        subject: None,
        scopes,
        service,
    };
    let refuse = match req.header("authorization") {
        None => {
            d.subject = Some(String::new());
            None
        }
        Some(authz) => {
            d.grant = Grant::Basic;
            match parse_basic(authz) {
                Some((u, p)) if u == shared.user && p == shared.password => {
                    d.subject = Some(u);
                    None
                }
                Some(_) => Some(Response::error(
                    401,
                    "unauthorized",
                    "wrong username or password",
                )),
                None => {
                    d.grant = Grant::Other(
                        authz
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string(),
                    );
                    Some(Response::error(
                        401,
                        "unauthorized",
                        "only Basic authentication is supported",
                    ))
                }
            }
        }
    };
    let offline = first(&params, "offline_token").as_deref() == Some("true");
    let resp = match refuse {
        Some(mut r) => {
            r.headers.push((
                "WWW-Authenticate",
                "Basic realm=\"berth-token-server\"".into(),
            ));
            r
        }
        None => issue(&d, shared, true, offline),
    };
    (record(req, d, &resp), resp)
}

fn token_post(req: &Request, shared: &Shared) -> (TokenRequest, Response) {
    let params = parse_form(&String::from_utf8_lossy(&req.body));
    let scopes = all(&params, "scope");
    let service = first(&params, "service");
    let grant_type = first(&params, "grant_type").unwrap_or_default();
    let mut d = Decision {
        grant: Grant::Other(grant_type.clone()),
        subject: None,
        scopes,
        service,
    };
    let mut offline = false;
    let refuse = match grant_type.as_str() {
        "refresh_token" => {
            d.grant = Grant::RefreshToken;
            if first(&params, "refresh_token").as_deref() == Some(shared.refresh_token.as_str()) {
                d.subject = Some(shared.user.clone());
                None
            } else {
                Some(Response::error(
                    401,
                    "invalid_grant",
                    "unknown refresh token",
                ))
            }
        }
        "password" => {
            d.grant = Grant::Password;
            offline = first(&params, "access_type").as_deref() == Some("offline");
            let user = first(&params, "username").unwrap_or_default();
            let pass = first(&params, "password").unwrap_or_default();
            if user == shared.user && pass == shared.password {
                d.subject = Some(user);
                None
            } else {
                Some(Response::error(
                    401,
                    "invalid_grant",
                    "wrong username or password",
                ))
            }
        }
        _ => Some(Response::error(
            400,
            "unsupported_grant_type",
            "use refresh_token or password",
        )),
    };
    let resp = match refuse {
        Some(r) => r,
        None => issue(&d, shared, false, offline),
    };
    (record(req, d, &resp), resp)
}

/// Signs a token for an accepted request; `get` selects the GET response shape.
fn issue(d: &Decision, shared: &Shared, get: bool, offline: bool) -> Response {
    if let Some(service) = &d.service
        && service != SERVICE
    {
        return Response::error(
            400,
            "invalid_request",
            &format!("unknown service {service:?}, this server issues tokens for {SERVICE:?}"),
        );
    }
    let subject = d.subject.clone().unwrap_or_default();
    let requested = parse_scopes(d.scopes.iter().map(String::as_str));
    let access = if subject.is_empty() {
        Vec::new()
    } else {
        grant(&requested, &shared.user_actions())
    };
    let now = now_secs();
    let token = match shared.sign(&subject, &access, now, TOKEN_TTL_SECS) {
        Ok(t) => t,
        Err(e) => return Response::error(500, "server_error", &format!("{e:#}")),
    };
    let mut body = json!({
        "access_token": token,
        "expires_in": TOKEN_TTL_SECS,
        "issued_at": rfc3339(now),
    });
    if get {
        body["token"] = json!(token);
    } else {
        body["scope"] = json!(d.scopes.join(" "));
    }
    if offline && !subject.is_empty() {
        body["refresh_token"] = json!(shared.refresh_token);
    }
    Response::json(200, body)
}

fn record(req: &Request, d: Decision, resp: &Response) -> TokenRequest {
    TokenRequest {
        method: req.method.clone(),
        grant: d.grant,
        subject: if resp.status == 200 {
            d.subject.filter(|s| !s.is_empty())
        } else {
            None
        },
        scopes: d.scopes,
        service: d.service,
        status: resp.status,
    }
}

/// `Basic base64(user:pass)` -> `(user, pass)`.
fn parse_basic(authz: &str) -> Option<(String, String)> {
    let (scheme, cred) = authz.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(cred.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// Decodes `application/x-www-form-urlencoded` (also used for query strings).
fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn first(params: &[(String, String)], key: &str) -> Option<String> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

fn all(params: &[(String, String)], key: &str) -> Vec<String> {
    params
        .iter()
        .filter(|(k, v)| k == key && !v.is_empty())
        .map(|(_, v)| v.clone())
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time.
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, KeyPair, UnparsedPublicKey};

    #[test]
    fn scopes_are_parsed_merged_and_granted() {
        let got = parse_scopes([
            "repository:berth/test:pull,push",
            "repository:other:pull repository:berth/test:delete,pull",
            "registry:catalog:*",
            "repository:host:5000/x:pull",
            "garbage",
        ]);
        assert_eq!(
            got,
            vec![
                Access::repository("berth/test", &["pull", "push", "delete"]),
                Access::repository("other", &["pull"]),
                Access {
                    ty: "registry".into(),
                    name: "catalog".into(),
                    actions: vec!["*".into()],
                },
                Access::repository("host:5000/x", &["pull"]),
            ]
        );
        let allowed = vec!["pull".to_string()];
        assert_eq!(
            grant(&got[..2], &allowed),
            vec![
                Access::repository("berth/test", &["pull"]),
                Access::repository("other", &["pull"]),
            ]
        );
        assert_eq!(grant(&got[2..3], &allowed), vec![]);
    }

    #[test]
    fn form_and_basic_decoding() {
        assert_eq!(
            parse_form(
                "grant_type=refresh_token&scope=repository%3Aa%2Fb%3Apull+repository:c:push&x&bad=%zz%4"
            ),
            vec![
                ("grant_type".to_string(), "refresh_token".to_string()),
                (
                    "scope".to_string(),
                    "repository:a/b:pull repository:c:push".to_string()
                ),
                ("x".to_string(), String::new()),
                ("bad".to_string(), "%zz%4".to_string()),
            ]
        );
        assert_eq!(
            parse_basic("Basic dXNlcjpwYTpzcw=="),
            Some(("user".to_string(), "pa:ss".to_string()))
        );
        assert_eq!(parse_basic("Bearer abc"), None);
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn jwt_is_es256_with_x5c_and_verifies() {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("key");
        let claims = json!({"iss": ISSUER, "access": []});
        let jwt = sign_jwt(&key, &rng, "Q0VSVA==", &claims).expect("sign");
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert!(!jwt.contains('=') && !jwt.contains('+') && !jwt.contains('/'));
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("json");
        assert_eq!(
            header,
            json!({"typ": "JWT", "alg": "ES256", "x5c": ["Q0VSVA=="]})
        );
        let body: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(body, claims);
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64");
        assert_eq!(sig.len(), 64, "r||s, not DER");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_key().as_ref())
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .expect("signature verifies");
    }

    /// Status, lower-cased headers and body of a response.
    type Answer = (u16, Vec<(String, String)>, String);

    /// Minimal HTTP/1.1 client.
    fn request(
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Answer> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() {
            req.push_str(&format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes())?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        let text = String::from_utf8_lossy(&resp).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").context("no head end")?;
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .context("status")?
            .parse()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
            .collect();
        Ok((status, headers, body.to_string()))
    }

    fn token_field(body: &str, field: &str) -> Result<String> {
        let v: Value = serde_json::from_str(body)?;
        v[field]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no {field} in {body}"))
    }

    fn claims(jwt: &str) -> Value {
        let part = jwt.split('.').nth(1).expect("claims part");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("b64")).expect("json")
    }

    /// Needs `docker-registry` and `openssl`; run with `cargo test -p berth-e2e --lib -- --ignored`.
    #[test]
    #[ignore]
    fn token_auth_registry_end_to_end() -> Result<()> {
        use crate::registry::TestRegistry;
        use crate::testimages::{Compression, ImageBuilder, LayerBuilder};

        let dir = tempfile::tempdir()?;
        let token = TokenServer::start(&dir.path().join("token"), "alice", "s3cret", "refresh-me")?;
        let reg = TestRegistry::start_with_token(&dir.path().join("reg"), &token)?;
        assert_eq!(reg.credentials(), Some(("alice", "s3cret")));
        assert_eq!(reg.token_realm(), Some(token.realm().as_str()));
        let addr = reg.addr().to_string();
        let tok_addr = token.addr().to_string();

        let (status, headers, _) = request(&addr, "GET", "/v2/", &[], "")?;
        assert_eq!(status, 401);
        let challenge = headers
            .iter()
            .find(|(k, _)| k == "www-authenticate")
            .map(|(_, v)| v.clone())
            .context("challenge")?;
        assert_eq!(
            challenge,
            format!("Bearer realm=\"{}\",service=\"{SERVICE}\"", token.realm())
        );

        // oci-client follows the bearer flow with the basic credentials.
        let image = ImageBuilder::new()
            .layer(
                LayerBuilder::new().file("hello", "world", 0o644, 0, 0),
                Compression::Gzip,
            )
            .cmd(&["/hello"]);
        let before = token.tokens_issued();
        let pushed = image.push_blocking(&addr, "berth/tok", "v1", reg.credentials())?;
        assert!(token.tokens_issued() > before, "push must fetch a token");
        let log = token.request_log();
        assert!(
            log.iter().any(|r| r.grant == Grant::Basic
                && r.status == 200
                && r.subject.as_deref() == Some("alice")
                && r.scopes == ["repository:berth/tok:pull,push"]
                && r.service.as_deref() == Some(SERVICE)),
            "{log:#?}"
        );

        let manifest = format!("/v2/berth/tok/manifests/{}", pushed.manifest_digest);
        let accept = (
            "Accept",
            "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json",
        );
        // Anonymous: 401 with a challenge naming the scope.
        let (status, headers, _) = request(&addr, "GET", &manifest, &[accept], "")?;
        assert_eq!(status, 401);
        assert!(
            headers.iter().any(|(k, v)| k == "www-authenticate"
                && v.contains("scope=\"repository:berth/tok:pull\"")),
            "{headers:?}"
        );

        // Anonymous token: issued, but with no access, so the registry refuses it.
        let scope_q = format!("/token?service={SERVICE}&scope=repository:berth/tok:pull");
        let (status, _, body) = request(&tok_addr, "GET", &scope_q, &[], "")?;
        assert_eq!(status, 200, "{body}");
        let anon = token_field(&body, "token")?;
        assert_eq!(claims(&anon)["access"], json!([]));
        let bearer = format!("Bearer {anon}");
        let (status, _, _) = request(
            &addr,
            "GET",
            &manifest,
            &[accept, ("Authorization", &bearer)],
            "",
        )?;
        assert_eq!(status, 401);

        // Wrong password: 401 from the token server.
        let bad = format!("Basic {}", STANDARD.encode("alice:wrong"));
        let (status, _, _) = request(&tok_addr, "GET", &scope_q, &[("Authorization", &bad)], "")?;
        assert_eq!(status, 401);

        // Basic auth -> token -> manifest 200.
        let good = format!("Basic {}", STANDARD.encode("alice:s3cret"));
        let (status, _, body) =
            request(&tok_addr, "GET", &scope_q, &[("Authorization", &good)], "")?;
        assert_eq!(status, 200, "{body}");
        let jwt = token_field(&body, "token")?;
        assert_eq!(token_field(&body, "access_token")?, jwt);
        let c = claims(&jwt);
        assert_eq!(c["iss"], ISSUER);
        assert_eq!(c["aud"], SERVICE);
        assert_eq!(c["sub"], "alice");
        assert_eq!(
            c["access"],
            json!([{"type": "repository", "name": "berth/tok", "actions": ["pull"]}])
        );
        let bearer = format!("Bearer {jwt}");
        let (status, _, body) = request(
            &addr,
            "GET",
            &manifest,
            &[accept, ("Authorization", &bearer)],
            "",
        )?;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&pushed.layer_digests[0]));
        // The pull-only token does not allow a push (blob upload start).
        let upload = "/v2/berth/tok/blobs/uploads/";
        let (status, _, _) = request(&addr, "POST", upload, &[("Authorization", &bearer)], "")?;
        assert_eq!(status, 401);

        // Refresh-token grant.
        let form = format!(
            "grant_type=refresh_token&refresh_token=refresh-me&service={SERVICE}&scope=repository%3Aberth%2Ftok%3Apull&client_id=berth"
        );
        let (status, _, body) = request(&tok_addr, "POST", "/token", &[], &form)?;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body)?;
        assert_eq!(v["scope"], "repository:berth/tok:pull");
        assert_eq!(v["expires_in"], TOKEN_TTL_SECS);
        let access = token_field(&body, "access_token")?;
        let bearer = format!("Bearer {access}");
        let (status, _, _) = request(
            &addr,
            "GET",
            &manifest,
            &[accept, ("Authorization", &bearer)],
            "",
        )?;
        assert_eq!(status, 200);
        let bad_form = form.replace("refresh-me", "nope");
        let (status, _, body) = request(&tok_addr, "POST", "/token", &[], &bad_form)?;
        assert_eq!(status, 401);
        assert_eq!(token_field(&body, "error")?, "invalid_grant");

        // Password grant, with a refresh token on request.
        let form = format!(
            "grant_type=password&username=alice&password=s3cret&access_type=offline&service={SERVICE}&scope=repository:berth/tok:pull&client_id=berth"
        );
        let (status, _, body) = request(&tok_addr, "POST", "/token", &[], &form)?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(token_field(&body, "refresh_token")?, "refresh-me");
        let bad_form = form.replace("s3cret", "wrong");
        assert_eq!(request(&tok_addr, "POST", "/token", &[], &bad_form)?.0, 401);

        // A wrong service is refused; other paths are 404 and not counted.
        let n = token.requests();
        let wrong = "/token?service=elsewhere&scope=repository:berth/tok:pull";
        assert_eq!(
            request(&tok_addr, "GET", wrong, &[("Authorization", &good)], "")?.0,
            400
        );
        assert_eq!(request(&tok_addr, "GET", "/nope", &[], "")?.0, 404);
        assert_eq!(token.requests(), n + 1);

        // Ready-made tokens: valid, and expired ones refused.
        let ready = token.issue_token("berth/tok", &["pull"])?;
        let bearer = format!("Bearer {ready}");
        let (status, _, _) = request(
            &addr,
            "GET",
            &manifest,
            &[accept, ("Authorization", &bearer)],
            "",
        )?;
        assert_eq!(status, 200);
        let expired = token.issue_expired_token("berth/tok", &["pull"])?;
        let bearer = format!("Bearer {expired}");
        let (status, _, _) = request(
            &addr,
            "GET",
            &manifest,
            &[accept, ("Authorization", &bearer)],
            "",
        )?;
        assert_eq!(status, 401);

        // A read-only account cannot push; wrong credentials fail at the token server.
        token.set_user_actions(&["pull"]);
        let other = ImageBuilder::new().layer(
            LayerBuilder::new().file("other", "x", 0o644, 0, 0),
            Compression::Gzip,
        );
        assert!(
            other
                .push_blocking(&addr, "berth/tok", "ro", reg.credentials())
                .is_err()
        );
        token.set_user_actions(DEFAULT_USER_ACTIONS);
        assert!(
            other
                .push_blocking(&addr, "berth/tok", "bad", Some(("alice", "wrong")))
                .is_err()
        );
        other.push_blocking(&addr, "berth/tok", "ok", reg.credentials())?;

        drop(reg);
        drop(token);
        Ok(())
    }
}
