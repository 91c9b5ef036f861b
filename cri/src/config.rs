//! berthd's configuration: one typed struct with every default in one place,
//! read from TOML; unknown keys and bad values are rejected naming the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use berth_image::{ImageConfig, RegistryHostConfig};
use serde::{Deserialize, Serialize};

/// A log filter (`EnvFilter` syntax) with field values matched as plain strings: as
/// regexes, a value such as `{x=a.....E}` compiles to a DFA of gigabytes (found by
/// fuzzing the config file).
pub fn log_filter(
    directives: &str,
) -> Result<tracing_subscriber::EnvFilter, tracing_subscriber::filter::ParseError> {
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(directives)
}

/// Default config file path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/config.toml";

/// The whole config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Persistent state: metadata, content, snapshots.
    pub root: PathBuf,
    /// Runtime state, lost on reboot: sockets, shim dirs.
    pub state: PathBuf,
    /// The CRI unix socket.
    pub listen: PathBuf,
    /// berth's native API socket (berthctl), mode 0600; empty = `api.sock` beside
    /// `listen`.
    pub api_listen: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax), overridden by `RUST_LOG` and `--log-level`.
    pub log_level: String,
    /// `text` (human-readable, colour only on a terminal) or `json` (one object per line).
    pub log_format: LogFormat,
    /// `cgroupfs` or `systemd`; must match kubelet's `--cgroup-driver`.
    pub cgroup_driver: CgroupDriver,
    /// Pull behaviour.
    pub image: ImageConfig,
    /// Per-registry settings keyed by host, e.g. `[registries."docker.io"]`.
    pub registries: BTreeMap<String, RegistryHostConfig>,
    /// The handler used when a pod names none.
    pub default_runtime: String,
    /// OCI runtime handlers by CRI `runtime_handler` name.
    pub runtimes: BTreeMap<String, RuntimeHandler>,
    /// The shim binary; empty = `berth-shim` next to berthd, else on PATH.
    pub shim: PathBuf,
    /// Pod networking.
    pub cni: CniConfig,
    /// The exec/attach/port-forward streaming server.
    pub stream: StreamConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
}

/// `[metrics]`: the Prometheus endpoint, as containerd's `[metrics]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to serve `GET /metrics` on; empty = off.
    pub address: String,
}

impl MetricsConfig {
    /// Where to serve, if anywhere.
    pub fn socket_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        if self.address.is_empty() {
            return Ok(None);
        }
        self.address.parse().map(Some).map_err(|_| {
            format!(
                "{:?} is not an address:port such as 127.0.0.1:1338",
                self.address
            )
        })
    }
}

/// `[stream]`: where the streaming server listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// IP address to listen on (kubelet or clients connect to the URLs it returns).
    pub address: String,
    /// TCP port; 0 = any free port.
    pub port: u16,
    /// PEM certificate chain: serve TLS (`https://` URLs). Empty = plain HTTP.
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert`.
    pub tls_key: PathBuf,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Bytes one session buffers from its client, all streams together.
    pub session_buffer_bytes: usize,
    /// Bytes one stream buffers; also the largest SPDY frame or WebSocket message.
    pub stream_buffer_bytes: usize,
    /// Port-forward streams open at once in one session.
    pub max_port_forward_streams: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        let limits = berth_stream::limits::StreamLimits::default();
        StreamConfig {
            address: "127.0.0.1".into(),
            port: 0,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            max_connections: limits.max_connections,
            session_buffer_bytes: limits.session_buffer_bytes,
            stream_buffer_bytes: limits.stream_buffer_bytes,
            max_port_forward_streams: limits.max_port_forward_streams,
        }
    }
}

impl StreamConfig {
    /// The streaming server's limits.
    pub fn limits(&self) -> berth_stream::limits::StreamLimits {
        berth_stream::limits::StreamLimits {
            max_connections: self.max_connections,
            session_buffer_bytes: self.session_buffer_bytes,
            stream_buffer_bytes: self.stream_buffer_bytes,
            max_port_forward_streams: self.max_port_forward_streams,
            ..Default::default()
        }
    }

    /// The first bad value, as (key, why).
    fn check(&self) -> Option<(&'static str, String)> {
        const CHUNK: usize = berth_stream::limits::CHUNK;
        if self.address.parse::<std::net::IpAddr>().is_err() {
            return Some((
                "stream.address",
                format!("{:?} is not an IP address", self.address),
            ));
        }
        let (no_cert, no_key) = (
            self.tls_cert.as_os_str().is_empty(),
            self.tls_key.as_os_str().is_empty(),
        );
        if no_cert != no_key {
            let key = if no_cert {
                "stream.tls_cert"
            } else {
                "stream.tls_key"
            };
            return Some((
                key,
                "tls_cert and tls_key go together: set both or neither".into(),
            ));
        }
        const MAX_FRAME: usize = berth_stream::spdy::frame::MAX_DATA;
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Some(("stream.max_connections", "must be 1 to 1000000".into()));
        }
        if !(CHUNK..=MAX_FRAME).contains(&self.stream_buffer_bytes) {
            return Some((
                "stream.stream_buffer_bytes",
                format!("must be {CHUNK} to {MAX_FRAME}"),
            ));
        }
        if self.session_buffer_bytes < self.stream_buffer_bytes
            || self.session_buffer_bytes > 1 << 30
        {
            return Some((
                "stream.session_buffer_bytes",
                "must be at least stream.stream_buffer_bytes and at most 1 GiB".into(),
            ));
        }
        if !(2..=65_536).contains(&self.max_port_forward_streams) {
            return Some((
                "stream.max_port_forward_streams",
                "must be 2 to 65536".into(),
            ));
        }
        None
    }
}

/// `[cni]`: where the network config and plugins are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CniConfig {
    /// Config dir; its first `.conflist`/`.conf`/`.json` by name is used.
    pub conf_dir: PathBuf,
    /// Plugin dirs, searched in order.
    pub bin_dirs: Vec<PathBuf>,
    /// Longest a plugin call may take.
    pub plugin_timeout_secs: u64,
    /// Let pods ask for their IPs with the `berth.dev/ips` annotation.
    pub allow_ips_annotation: bool,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            plugin_timeout_secs: 60,
            allow_ips_annotation: false,
        }
    }
}

/// `[runtimes.<name>]`: one OCI runtime CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeHandler {
    /// Binary name (searched on PATH) or absolute path.
    pub path: PathBuf,
    /// Its state root; empty = `<state>/runtimes/<name>`.
    pub root: PathBuf,
    /// Extra global arguments.
    pub args: Vec<String>,
    /// How long one runtime command (create, start, exec, kill, delete...) may take
    /// before the shim kills it and fails the call (1 to 110: under the shim call's 120 s).
    pub timeout_secs: u64,
}

impl Default for RuntimeHandler {
    fn default() -> Self {
        RuntimeHandler {
            path: PathBuf::from("runc"),
            root: PathBuf::new(),
            args: Vec::new(),
            timeout_secs: berth_runtime::runc::DEFAULT_TIMEOUT.as_secs(),
        }
    }
}

/// How berthd writes its log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event (timestamp, level, target, fields, spans).
    Json,
    /// Straight to the systemd journal (what `text` does when stderr is the journal).
    Journal,
}

/// How cgroup paths are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// Plain cgroupfs paths.
    Cgroupfs,
    /// systemd slice/scope names.
    Systemd,
}

impl Config {
    /// Where the native API listens.
    pub fn api_socket(&self) -> PathBuf {
        if !self.api_listen.as_os_str().is_empty() {
            return self.api_listen.clone();
        }
        match self.listen.parent() {
            Some(dir) => dir.join("api.sock"),
            None => PathBuf::from("api.sock"),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/var/lib/berth"),
            state: PathBuf::from("/run/berth"),
            listen: PathBuf::from("/run/berth/berth.sock"),
            api_listen: PathBuf::new(),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            cgroup_driver: CgroupDriver::Cgroupfs,
            image: ImageConfig::default(),
            registries: BTreeMap::new(),
            default_runtime: "runc".into(),
            runtimes: BTreeMap::from([("runc".to_string(), RuntimeHandler::default())]),
            shim: PathBuf::new(),
            cni: CniConfig::default(),
            stream: StreamConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

/// A config that could not be loaded; the message names the file and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, unknown key or wrong type.
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value of the right type that is not acceptable.
    #[error("config {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl Config {
    /// Loads `path`; a missing file gives the defaults when `missing_ok`.
    pub fn load(path: &Path, missing_ok: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && missing_ok => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // Handlers add to the built-in `runc` (as containerd's config merges over its
        // defaults); a `[runtimes.runc]` table replaces it.
        cfg.runtimes
            .entry("runc".to_string())
            .or_insert_with(RuntimeHandler::default);
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks values that types alone cannot.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        for (key, p) in [
            ("root", &self.root),
            ("state", &self.state),
            ("listen", &self.listen),
        ] {
            if !p.is_absolute() {
                return Err(invalid(
                    key.into(),
                    format!("{} must be an absolute path", p.display()),
                ));
            }
        }
        if self.image.max_concurrent_downloads == 0 || self.image.max_concurrent_downloads > 64 {
            return Err(invalid(
                "image.max_concurrent_downloads".into(),
                "must be between 1 and 64".into(),
            ));
        }
        if let Err(e) = log_filter(&self.log_level) {
            return Err(invalid("log_level".into(), e.to_string()));
        }
        for (i, p) in self.image.pinned_images.iter().enumerate() {
            if let Err(e) = berth_image::ImageRef::parse(p) {
                return Err(invalid(format!("image.pinned_images[{i}]"), e.to_string()));
            }
        }
        if !self.cni.conf_dir.is_absolute() {
            return Err(invalid(
                "cni.conf_dir".into(),
                "must be an absolute path".into(),
            ));
        }
        if let Some(i) = self.cni.bin_dirs.iter().position(|d| !d.is_absolute()) {
            return Err(invalid(
                format!("cni.bin_dirs[{i}]"),
                "must be an absolute path".into(),
            ));
        }
        if let Some((key, why)) = self.stream.check() {
            return Err(invalid(key.into(), why));
        }
        if let Err(why) = self.metrics.socket_addr() {
            return Err(invalid("metrics.address".into(), why));
        }
        for (name, h) in &self.runtimes {
            if !(1..=110).contains(&h.timeout_secs) {
                return Err(invalid(
                    format!("runtimes.{name}.timeout_secs"),
                    "must be 1 to 110 (a shim call waits 120 s)".into(),
                ));
            }
        }
        if self.cni.plugin_timeout_secs == 0 {
            return Err(invalid(
                "cni.plugin_timeout_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if !self.runtimes.contains_key(&self.default_runtime) {
            return Err(invalid(
                "default_runtime".into(),
                format!(
                    "{:?} is not a [runtimes.<name>] table",
                    self.default_runtime
                ),
            ));
        }
        for (name, h) in &self.runtimes {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !ok {
                return Err(invalid(
                    format!("runtimes.{name:?}"),
                    "names are [A-Za-z0-9._-]+".into(),
                ));
            }
            if h.path.as_os_str().is_empty() {
                return Err(invalid(
                    format!("runtimes.{name}.path"),
                    "must name a binary".into(),
                ));
            }
            if !h.root.as_os_str().is_empty() && !h.root.is_absolute() {
                return Err(invalid(
                    format!("runtimes.{name}.root"),
                    "must be an absolute path".into(),
                ));
            }
        }
        for (host, reg) in &self.registries {
            if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
                return Err(invalid(
                    format!("registries.{host:?}"),
                    "must be a registry host[:port]".into(),
                ));
            }
            for (i, m) in reg.mirrors.iter().enumerate() {
                if let Err(msg) = berth_image::config::validate_mirror(m) {
                    return Err(invalid(format!("registries.{host:?}.mirrors[{i}]"), msg));
                }
            }
        }
        Ok(())
    }

    /// A runtime handler's state root: its own `root`, else `<state>/runtimes/<name>`.
    pub fn runtime_root(&self, name: &str) -> PathBuf {
        match self.runtimes.get(name) {
            Some(h) if !h.root.as_os_str().is_empty() => h.root.clone(),
            _ => self.state.join("runtimes").join(name),
        }
    }

    /// The CNI manager's part.
    pub fn cni_settings(&self) -> berth_network::CniSettings {
        berth_network::CniSettings {
            conf_dir: self.cni.conf_dir.clone(),
            bin_dirs: self.cni.bin_dirs.clone(),
            timeout: std::time::Duration::from_secs(self.cni.plugin_timeout_secs),
            allow_ips_annotation: self.cni.allow_ips_annotation,
        }
    }

    /// The image service's part of the config.
    pub fn image_service(&self) -> berth_image::ImageServiceConfig {
        berth_image::ImageServiceConfig {
            image: self.image.clone(),
            registries: self.registries.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(
            Config::parse("", Path::new("x")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn shipped_config_is_the_defaults() {
        let shipped = include_str!("../../deploy/config.toml");
        assert_eq!(
            Config::parse(shipped, Path::new("deploy/config.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn reads_the_documented_keys() {
        let c = Config::parse(
            r#"
            root = "/tmp/r"
            [registries."docker.io"]
            mirrors = ["http://127.0.0.1:5000"]
            insecure = false
            [image]
            max_concurrent_downloads = 4
            "#,
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.root, PathBuf::from("/tmp/r"));
        assert_eq!(
            c.registries["docker.io"].mirrors,
            vec!["http://127.0.0.1:5000".to_string()]
        );
        assert_eq!(c.image.max_concurrent_downloads, 4);
    }

    #[test]
    fn runtime_handlers_add_to_runc() {
        let c = Config::parse("[runtimes.crun]\npath = \"crun\"", Path::new("x")).unwrap();
        assert_eq!(
            c.runtimes.keys().collect::<Vec<_>>(),
            ["crun", "runc"],
            "handlers"
        );
        assert_eq!(c.runtimes["runc"], RuntimeHandler::default());
        let c = Config::parse(
            "[runtimes.runc]\npath = \"/opt/runc\"\nargs = [\"--debug\"]",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.runtimes["runc"].path, PathBuf::from("/opt/runc"));
        let e = Config::parse("default_runtime = \"kata\"", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("default_runtime"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("bogus = 1", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::parse("[registries.\"docker.io\"]\nmirors = []", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mirors"), "{e}");
        let e = Config::parse(
            "[registries.\"docker.io\"]\nmirrors = [\"ftp://x\"]",
            Path::new("x"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("registries.\"docker.io\".mirrors[0]"), "{e}");
        let e = Config::parse("cgroup_driver = \"cgroupv3\"", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cgroup_driver") || e.contains("cgroupv3"), "{e}");
        let e = Config::parse("root = \"relative\"", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`root`"), "{e}");
        let e = Config::parse("[stream]\ntls_cert = \"/a.pem\"", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stream.tls_key"), "{e}");
        let e = Config::parse("[stream]\naddress = \"localhost\"", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stream.address"), "{e}");
        for (toml, key) in [
            ("max_connections = 0", "stream.max_connections"),
            ("stream_buffer_bytes = 1000", "stream.stream_buffer_bytes"),
            (
                "session_buffer_bytes = 40000",
                "stream.session_buffer_bytes",
            ),
            (
                "max_port_forward_streams = 1",
                "stream.max_port_forward_streams",
            ),
        ] {
            let e = Config::parse(&format!("[stream]\n{toml}"), Path::new("x"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }
}
