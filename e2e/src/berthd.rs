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
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let cand = dir.join("berthd");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "berthd binary not found near {} (run `cargo build --bins` first or set BERTHD_BIN)",
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
}

impl Berthd {
    /// Starts berthd with `extra_config` (TOML) appended to a config naming its dirs.
    pub fn start(extra_config: &str) -> Result<Berthd> {
        let dir = tempfile::Builder::new().prefix("berth-e2e-").tempdir()?;
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let socket = state.join("berth.sock");
        let config = dir.path().join("config.toml");
        let log = dir.path().join("berthd.log");
        let text = format!(
            "root = {:?}\nstate = {:?}\nlisten = {:?}\nlog_level = \"info,berth_image=debug\"\n{extra_config}\n",
            root, state, socket
        );
        std::fs::write(&config, text)?;
        let mut b = Berthd {
            dir,
            root,
            state,
            socket,
            config,
            log,
            child: None,
            env: Vec::new(),
        };
        b.spawn()?;
        Ok(b)
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

    fn spawn(&mut self) -> Result<()> {
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

    /// Peak resident memory of berthd so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

impl Drop for Berthd {
    fn drop(&mut self) {
        let _ = self.kill9();
        // A test that failed may have left pods: their shims and infra processes name
        // this directory on their command line, and their mounts live below it.
        sweep_leftovers(self.dir.path());
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
