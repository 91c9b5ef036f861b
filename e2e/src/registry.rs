//! A real OCI registry (Debian's `docker-registry`, distribution 2.8) on 127.0.0.1 for tests.
//!
//! The registry writes two lines per request to its log: a logrus line on stderr
//! (`time=... msg="response completed" ... http.request.method=GET ...`) and an Apache
//! "combined" access-log line on stdout, e.g.
//! `127.0.0.1 - - [23/Nov/2026:17:55:56 +0000] "GET /v2/foo/bar/blobs/sha256:2cf2... HTTP/1.1" 200 5 "" "curl/7.88.1"`.
//! Request counting parses only the access-log lines, so nothing is counted twice.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::tokenauth::TokenServer;

/// How long to wait for the registry to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many fresh ports to try when the registry loses the race for its port.
const START_ATTEMPTS: usize = 5;

/// Makes every log-sync marker request unique within this process.
static SYNC_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A running `docker-registry serve` process; killed (SIGKILL) on drop.
///
/// The child is started with `PR_SET_PDEATHSIG = SIGKILL`, which fires when the
/// *thread* that spawned it exits, so call [`TestRegistry::start`] from a long-lived
/// thread (e.g. the test binary's main thread), not from a short-lived worker or a
/// tokio blocking-pool thread.
#[derive(Debug)]
pub struct TestRegistry {
    child: Child,
    addr: String,
    dir: PathBuf,
    credentials: Option<(String, String)>,
    /// The token server's realm when the registry runs in token-auth mode.
    token_realm: Option<String>,
}

/// How the registry authenticates clients.
enum AuthConfig {
    None,
    /// HTTP basic auth against `<dir>/htpasswd`.
    Htpasswd,
    /// Docker token auth: bearer JWTs from a [`TokenServer`].
    Token {
        realm: String,
        service: String,
        issuer: String,
        rootcertbundle: PathBuf,
    },
}

/// One parsed access-log line of the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogEntry {
    /// HTTP method, e.g. `GET` or `HEAD`.
    pub method: String,
    /// Request URI as logged, including any query string.
    pub uri: String,
    /// HTTP response status.
    pub status: u16,
    /// Response body bytes written (0 when the log says `-`).
    pub bytes: u64,
    /// The client's User-Agent.
    pub user_agent: String,
}

impl TestRegistry {
    /// Starts a registry storing its data under `dir`, optionally requiring HTTP basic auth.
    pub fn start(dir: &Path, htpasswd: Option<(&str, &str)>) -> Result<TestRegistry> {
        let dir = prepare_dir(dir)?;
        let auth = match htpasswd {
            Some((user, pass)) => {
                write_htpasswd(&dir.join("htpasswd"), user, pass)?;
                AuthConfig::Htpasswd
            }
            None => AuthConfig::None,
        };
        Self::start_in(dir, auth, htpasswd)
    }

    /// Starts a registry storing its data under `dir` that requires Docker token auth
    /// (bearer JWTs) issued by `token`.
    ///
    /// `GET /v2/` answers 401 with `WWW-Authenticate: Bearer realm="<token.realm()>",...`.
    /// [`TestRegistry::credentials`] returns the token server's user and password, which
    /// clients such as oci-client exchange for a token at the realm.
    pub fn start_with_token(dir: &Path, token: &TokenServer) -> Result<TestRegistry> {
        let dir = prepare_dir(dir)?;
        let auth = AuthConfig::Token {
            realm: token.realm(),
            service: token.service().to_string(),
            issuer: token.issuer().to_string(),
            rootcertbundle: token.cert_path(),
        };
        Self::start_in(dir, auth, Some((token.user(), token.password())))
    }

    fn start_in(
        dir: PathBuf,
        auth: AuthConfig,
        credentials: Option<(&str, &str)>,
    ) -> Result<TestRegistry> {
        let token_realm = match &auth {
            AuthConfig::Token { realm, .. } => Some(realm.clone()),
            _ => None,
        };
        let log_path = dir.join("registry.log");
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;

        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            let addr = format!("127.0.0.1:{port}");
            let config = dir.join("config.yml");
            fs::write(&config, config_yaml(&dir, &addr, &auth))
                .with_context(|| format!("writing {}", config.display()))?;
            // Only this attempt's output decides whether it lost the port race.
            let log_offset = fs::metadata(&log_path)?.len();
            let child = spawn_registry(&config, &log_path)?;
            let mut reg = TestRegistry {
                child,
                addr,
                dir: dir.clone(),
                credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
                token_realm: token_realm.clone(),
            };
            match reg.wait_ready(log_offset) {
                Ok(()) => return Ok(reg),
                Err(StartError::PortTaken) => {
                    // Another process grabbed the port between our probe and the registry's bind.
                    last_err = Some(anyhow::anyhow!("port {port} was taken"));
                }
                Err(StartError::Failed(e)) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context(format!(
                "docker-registry could not bind a port after {START_ATTEMPTS} attempts; log:\n{}",
                log_tail(&log_path)
            )))
    }

    /// `127.0.0.1:PORT`, usable as the registry part of an image reference.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The user and password clients should use: the htpasswd account, or in token-auth
    /// mode the token server's account.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The token server's realm, when the registry was started with
    /// [`TestRegistry::start_with_token`].
    pub fn token_realm(&self) -> Option<&str> {
        self.token_realm.as_deref()
    }

    /// Process id of the registry.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The registry's combined stdout/stderr log (logrus lines plus access log).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// Root of the registry's filesystem storage.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.join("storage")
    }

    /// The registry's on-disk file holding the blob `digest` (`sha256:<hex>`).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.storage_dir(), digest)
    }

    /// All access-log entries so far, after making sure earlier requests have been logged.
    pub fn access_log(&self) -> Result<Vec<AccessLogEntry>> {
        self.sync_log()?;
        let log = fs::read(self.log_path())
            .with_context(|| format!("reading {}", self.log_path().display()))?;
        Ok(String::from_utf8_lossy(&log)
            .lines()
            .filter_map(parse_access_line)
            .collect())
    }

    /// Access-log entries for `/v2/<any repo>/blobs/<digest>` (any method and status).
    pub fn blob_requests(&self, digest: &str) -> Result<Vec<AccessLogEntry>> {
        let suffix = format!("/blobs/{digest}");
        Ok(self
            .access_log()?
            .into_iter()
            .filter(|e| {
                let path = e.uri.split('?').next().unwrap_or("");
                path.strip_prefix("/v2/")
                    .and_then(|p| p.strip_suffix(suffix.as_str()))
                    .is_some_and(|repo| !repo.is_empty())
            })
            .collect())
    }

    /// How many GETs of blob `digest` (any repo) the registry served with a 2xx status.
    ///
    /// HEAD requests and rejected GETs (e.g. a 401 auth challenge or 404) are not
    /// counted; a ranged GET answered with 206 is.
    pub fn blob_get_count(&self, digest: &str) -> Result<usize> {
        Ok(self
            .blob_requests(digest)?
            .iter()
            .filter(|e| e.method == "GET" && (200..300).contains(&e.status))
            .count())
    }

    /// Waits until a fresh marker request shows up in the access log.
    ///
    /// The registry logs a request after its response is sent, so a client may
    /// finish before its line is written; a later request being logged makes it
    /// very likely that everything before it has been logged too.
    fn sync_log(&self) -> Result<()> {
        let marker = format!(
            "/v2/?berth-log-sync={}-{}",
            std::process::id(),
            SYNC_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        http_get(&self.addr, &marker).context("log sync request")?;
        let needle = format!("\"GET {marker} ");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = fs::read(self.log_path())
                .with_context(|| format!("reading {}", self.log_path().display()))?;
            if String::from_utf8_lossy(&log).contains(&needle) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("registry did not log the sync request {marker}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_ready(&mut self, log_offset: u64) -> std::result::Result<(), StartError> {
        let want = if self.credentials.is_some() { 401 } else { 200 };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    let tail = log_tail(&self.log_path());
                    let this_attempt = fs::read(self.log_path())
                        .map(|log| log.get(log_offset as usize..).unwrap_or_default().to_vec())
                        .unwrap_or_default();
                    if String::from_utf8_lossy(&this_attempt).contains("address already in use") {
                        return Err(StartError::PortTaken);
                    }
                    return Err(StartError::Failed(anyhow::anyhow!(
                        "docker-registry exited with {status}; log:\n{tail}"
                    )));
                }
                Ok(None) => {}
                Err(e) => return Err(StartError::Failed(e.into())),
            }
            if http_get(&self.addr, "/v2/").is_ok_and(|resp| self.is_ready_answer(&resp, want)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StartError::Failed(anyhow::anyhow!(
                    "docker-registry on {} did not answer GET /v2/ with {want}{} within {:?}; log:\n{}",
                    self.addr,
                    if self.token_realm.is_some() {
                        " and a Bearer challenge"
                    } else {
                        ""
                    },
                    READY_TIMEOUT,
                    log_tail(&self.log_path())
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl TestRegistry {
    /// Whether `GET /v2/` answered as a ready registry in this auth mode does.
    fn is_ready_answer(&self, resp: &HttpHead, want: u16) -> bool {
        if resp.status != want {
            return false;
        }
        match &self.token_realm {
            // Proves the registry really runs in token mode with our realm.
            Some(realm) => resp
                .header("www-authenticate")
                .is_some_and(|h| h.starts_with(&format!("Bearer realm=\"{realm}\""))),
            None => true,
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this pid only; wait reaps it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why one start attempt failed.
enum StartError {
    PortTaken,
    Failed(anyhow::Error),
}

fn write_htpasswd(path: &Path, user: &str, pass: &str) -> Result<()> {
    let out = Command::new("htpasswd")
        .args(["-Bbn", user, pass])
        .stdin(Stdio::null())
        .output()
        .context("running htpasswd (apache2-utils)")?;
    if !out.status.success() {
        bail!(
            "htpasswd failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::write(path, &out.stdout).with_context(|| format!("writing {}", path.display()))
}

/// Creates `dir` and returns its absolute path (the config file is read by another process).
fn prepare_dir(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    dir.canonicalize()
        .with_context(|| format!("canonicalizing {}", dir.display()))
}

fn config_yaml(dir: &Path, addr: &str, auth: &AuthConfig) -> String {
    // A fixed secret avoids a startup warning; it only signs upload-session state.
    let mut cfg = format!(
        "version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {addr}
  secret: berth-test-secret
",
        storage = dir.join("storage").display(),
    );
    match auth {
        AuthConfig::None => {}
        AuthConfig::Htpasswd => cfg.push_str(&format!(
            "auth:
  htpasswd:
    realm: berth-test
    path: {}
",
            dir.join("htpasswd").display()
        )),
        AuthConfig::Token {
            realm,
            service,
            issuer,
            rootcertbundle,
        } => cfg.push_str(&format!(
            "auth:
  token:
    realm: {realm}
    service: {service}
    issuer: {issuer}
    rootcertbundle: {}
",
            rootcertbundle.display()
        )),
    }
    cfg
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn spawn_registry(config: &Path, log_path: &Path) -> Result<Child> {
    let log = OpenOptions::new()
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log_err = log.try_clone()?;
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: the closure only makes async-signal-safe syscalls and does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl; then nobody would ever kill us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn()
        .context("spawning docker-registry (Debian package docker-registry)")
}

/// Where distribution's filesystem driver keeps a blob: `blobs/<algo>/<2 hex>/<hex>/data`.
fn blob_path(storage: &Path, digest: &str) -> PathBuf {
    let (algo, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
    let prefix = hex.get(..2).unwrap_or(hex);
    storage
        .join("docker/registry/v2/blobs")
        .join(algo)
        .join(prefix)
        .join(hex)
        .join("data")
}

/// Status and headers of an HTTP response.
struct HttpHead {
    status: u16,
    headers: Vec<(String, String)>,
}

impl HttpHead {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `GET path` over a fresh connection and returns the response status and headers.
fn http_get(addr: &str, path: &str) -> Result<HttpHead> {
    let sock: SocketAddr = addr.parse().with_context(|| format!("parsing {addr}"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: berth-e2e\r\nConnection: close\r\n\r\n"
    )?;
    // Read to EOF so the server sees a complete exchange before we return.
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code
            .parse()
            .with_context(|| format!("bad status line {status_line:?}"))?,
        _ => bail!("bad status line {status_line:?}"),
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpHead { status, headers })
}

/// Parses an Apache combined-log line: `host - user [date] "METHOD URI PROTO" status bytes "referer" "ua"`.
fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    let rest = &line[line.find("] \"")? + 3..];
    let (request, rest) = rest.split_once('"')?;
    let mut req = request.split(' ');
    let (method, uri, proto) = (req.next()?, req.next()?, req.next()?);
    if !proto.starts_with("HTTP/") || !uri.starts_with('/') {
        return None;
    }
    let mut fields = rest.split_whitespace();
    let status = fields.next()?.parse().ok()?;
    let bytes = fields.next()?.parse().unwrap_or(0);
    let user_agent = rest
        .rsplit_once('"')
        .and_then(|(before, _)| before.rsplit_once('"'))
        .map(|(_, ua)| ua.to_string())
        .unwrap_or_default();
    Some(AccessLogEntry {
        method: method.to_string(),
        uri: uri.to_string(),
        status,
        bytes,
        user_agent,
    })
}

/// The last ~40 lines of the log, for error messages.
fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_access_lines_and_ignores_logrus_lines() {
        let access = r#"127.0.0.1 - - [23/Nov/2026:17:55:56 +0000] "GET /v2/foo/bar/blobs/sha256:2cf2 HTTP/1.1" 206 2 "" "curl/7.88.1""#;
        let e = parse_access_line(access).expect("access line");
        assert_eq!(e.method, "GET");
        assert_eq!(e.uri, "/v2/foo/bar/blobs/sha256:2cf2");
        assert_eq!(e.status, 206);
        assert_eq!(e.bytes, 2);
        assert_eq!(e.user_agent, "curl/7.88.1");
        let logrus = r#"time="2026-11-23T17:55:56.549337933Z" level=info msg="response completed" http.request.method=GET http.request.uri="/v2/foo/bar/blobs/sha256:2cf2" http.response.status=200"#;
        assert_eq!(parse_access_line(logrus), None);
    }

    #[test]
    fn blob_path_layout() {
        assert_eq!(
            blob_path(Path::new("/r/storage"), "sha256:abcdef"),
            PathBuf::from("/r/storage/docker/registry/v2/blobs/sha256/ab/abcdef/data")
        );
    }
}
