//! A real berthd for tests: its own temp root/state/socket, a CRI client over the
//! unix socket, kill -9 and restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

/// The berthd binary: `$BERTHD_BIN`, else next to the running test/bench binary's target dir.
pub fn berthd_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("BERTHD_BIN") {
        return Ok(PathBuf::from(p));
    }
    built_binary("berthd")
}

/// A workspace binary (`berthd`, `berthctl`) in the target dir of the running test.
pub fn built_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let cand = dir.join(name);
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "{name} binary not found near {} (run `cargo build --bins` first)",
        exe.display()
    )
}

/// A CRI client pair over one connection.
#[derive(Clone)]
pub struct CriClient {
    /// RuntimeService.
    pub runtime: RuntimeServiceClient<Channel>,
    /// ImageService.
    pub image: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connects to a CRI unix socket (`unix://` prefix optional).
    pub async fn connect(socket: &str) -> Result<CriClient> {
        let path = PathBuf::from(socket.strip_prefix("unix://").unwrap_or(socket));
        let channel = tonic::transport::Endpoint::try_from("http://[::1]:50051")?
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .with_context(|| format!("connecting to {socket}"))?;
        let max = 16 << 20;
        Ok(CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()).max_decoding_message_size(max),
            image: ImageServiceClient::new(channel).max_decoding_message_size(max),
        })
    }
}

/// A berthd process with private directories, killed and cleaned up on drop.
pub struct Berthd {
    dir: tempfile::TempDir,
    /// Persistent state dir.
    pub root: PathBuf,
    /// Runtime state dir.
    pub state: PathBuf,
    /// CRI socket.
    pub socket: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// berthd's stderr log.
    pub log: PathBuf,
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// CNI config dir (holds this instance's own network, see `Berthd::start`).
    pub cni_dir: PathBuf,
    /// This instance's bridge device.
    pub bridge: String,
    /// Its pod subnet.
    pub subnet: String,
    /// host-local's lease dir.
    pub ipam_dir: PathBuf,
}

/// Distinct networks for berthds running at once in this process.
static NETWORKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A network config like `deploy/cni/10-berth.conflist` (bridge, host-local, portmap,
/// loopback), with its own bridge, subnet and lease dir.
pub fn conflist(name: &str, bridge: &str, subnet: &str, ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]
    })
    .to_string()
}

impl Berthd {
    /// Starts berthd with `extra_config` (TOML) appended to a config naming its dirs.
    pub fn start(extra_config: &str) -> Result<Berthd> {
        let mut b = Berthd::prepare(extra_config, None)?;
        b.spawn()?;
        Ok(b)
    }

    /// Everything `start` sets up (dirs, config, network), in a new dir under `base`
    /// (default: the temp dir), without starting berthd: for a berthd that something
    /// else runs, such as systemd.
    pub fn prepare(extra_config: &str, base: Option<&Path>) -> Result<Berthd> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("berth-e2e-");
        let dir = match base {
            Some(b) => builder.tempdir_in(b)?,
            None => builder.tempdir()?,
        };
        // Passable like /var/lib and /run, so that only berth's own modes keep local users out.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let socket = state.join("berth.sock");
        let config = dir.path().join("config.toml");
        let log = dir.path().join("berthd.log");
        let n = NETWORKS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let bridge = format!("be{}n{n}", std::process::id() % 100_000);
        let subnet = format!("10.{}.{}.0/24", 200 + n / 250, n % 250);
        let cni_dir = dir.path().join("cni");
        let ipam_dir = dir.path().join("ipam");
        std::fs::create_dir_all(&cni_dir)?;
        std::fs::write(
            cni_dir.join("10-e2e.conflist"),
            conflist(&format!("e2e-{n}"), &bridge, &subnet, &ipam_dir),
        )?;
        let text = format!(
            "root = {:?}\nstate = {:?}\nlisten = {:?}\nlog_level = \"info,berth_image=debug\"\n{extra_config}\n[cni]\nconf_dir = {:?}\n",
            root, state, socket, cni_dir
        );
        std::fs::write(&config, text)?;
        Ok(Berthd {
            dir,
            root,
            state,
            socket,
            config,
            log,
            child: None,
            env: Vec::new(),
            cni_dir,
            bridge,
            subnet,
            ipam_dir,
        })
    }

    /// Waits until something serves on the socket.
    pub fn wait_serving(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "nothing served on {} within {timeout:?}",
            self.socket.display()
        )
    }

    /// The temp directory holding everything of this berthd.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id of the running berthd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Runs the berthd binary with this instance's config and extra args, without waiting for readiness.
    pub fn command(&self) -> Result<Command> {
        let mut cmd = Command::new(berthd_binary()?);
        cmd.arg("--config").arg(&self.config);
        Ok(cmd)
    }

    /// Starts a berthd made with `prepare` (after a test edited its config).
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = self.command()?;
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("spawning berthd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "berthd exited with {st} before serving:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "berthd did not serve on {} within 20s:\n{}",
            self.socket.display(),
            self.log_tail()
        )
    }

    /// The last lines of berthd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A CRI client connected to this berthd.
    pub async fn client(&self) -> Result<CriClient> {
        CriClient::connect(&self.socket.display().to_string()).await
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut c = self.child.take().context("berthd is not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("berthd did not exit within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sets (or with `None` clears) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    /// Whether the berthd process has exited (e.g. killed itself at a failpoint).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Starts berthd again on the same directories.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9()?;
        self.spawn()
    }

    /// A field of berthd's `/proc/<pid>/status` (its value, trimmed).
    pub fn status_field(&self, name: &str) -> Option<String> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    }

    /// A memory figure of berthd's status (`VmHWM`, `VmRSS`), in KiB.
    fn status_kib(&self, name: &str) -> Option<u64> {
        self.status_field(name)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Peak resident memory of berthd so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM")
    }

    /// berthd's resident memory now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS")
    }
}

impl Drop for Berthd {
    fn drop(&mut self) {
        let _ = self.kill9();
        // A test that failed may have left pods: their shims and infra processes name
        // this directory on their command line, and their mounts live below it.
        sweep_leftovers(self.dir.path());
        // The bridge the CNI bridge plugin made for this instance's network.
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

/// Kills every process whose command line names `dir` (by pid), then lazily unmounts
/// every mount below `dir`, deepest first.
pub fn sweep_leftovers(dir: &Path) {
    let needle = dir.display().to_string();
    let me = std::process::id();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for p in rd.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid as u32 == me {
                continue;
            }
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut below: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&needle))
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in below {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Removes, on drop, the iptables rules and chains (nat and filter tables) that
/// appeared since it was made: the CNI plugins' shared chains (portmap's
/// `CNI-HOSTPORT-*`) outlive the pods that needed them.
pub struct IptablesGuard {
    before: Vec<(&'static str, Vec<String>)>,
}

fn iptables_rules(table: &str) -> Vec<String> {
    Command::new("iptables")
        .args(["-w", "-t", table, "-S"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Splits an `iptables -S` line into arguments, keeping quoted comments whole.
fn iptables_args(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => cur.extend(chars.next()),
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl IptablesGuard {
    /// Records the current rules.
    pub fn new() -> IptablesGuard {
        IptablesGuard {
            before: ["nat", "filter"]
                .into_iter()
                .map(|t| (t, iptables_rules(t)))
                .collect(),
        }
    }
}

impl Default for IptablesGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for IptablesGuard {
    fn drop(&mut self) {
        for (table, before) in &self.before {
            let now = iptables_rules(table);
            let new: Vec<&String> = now.iter().filter(|l| !before.contains(l)).collect();
            for rule in new.iter().rev().filter(|l| l.starts_with("-A ")) {
                let mut args = iptables_args(rule);
                args[0] = "-D".into();
                let _ = Command::new("iptables")
                    .args(["-w", "-t", table])
                    .args(&args)
                    .stderr(Stdio::null())
                    .status();
            }
            // Flush every new chain before deleting any: they may jump to each other.
            for op in ["-F", "-X"] {
                for chain in new.iter().filter_map(|l| l.strip_prefix("-N ")) {
                    let _ = Command::new("iptables")
                        .args(["-w", "-t", table, op, chain])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_lines_split_like_a_shell() {
        let line = r#"-A POSTROUTING -s 10.200.0.2/32 -m comment --comment "name: \"e2e-0\" id: \"76\"" -j CNI-41a"#;
        assert_eq!(
            iptables_args(line),
            [
                "-A",
                "POSTROUTING",
                "-s",
                "10.200.0.2/32",
                "-m",
                "comment",
                "--comment",
                r#"name: "e2e-0" id: "76""#,
                "-j",
                "CNI-41a"
            ]
        );
    }
}
