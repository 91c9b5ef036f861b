//! Running one CNI plugin: the `CNI_*` environment, the config on stdin, the result
//! (or the spec's error object) on stdout, stderr kept for the error, and a timeout
//! after which the plugin is killed.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// One plugin invocation.
pub struct Invocation<'a> {
    /// `ADD`, `DEL`, `CHECK`, `STATUS`, `GC`, `VERSION`.
    pub command: &'a str,
    /// `CNI_CONTAINERID`.
    pub container_id: &'a str,
    /// `CNI_NETNS`.
    pub netns: &'a str,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
    /// `CNI_ARGS` (`K=V;K=V`).
    pub args: &'a str,
    /// `CNI_PATH`: the plugin dirs joined with `:`.
    pub path: &'a str,
    /// The plugin's config, written to its stdin.
    pub config: &'a Value,
}

/// A failed plugin run.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The binary could not be started.
    #[error("running CNI plugin {plugin}: {source}")]
    Spawn {
        plugin: String,
        source: std::io::Error,
    },
    /// It did not finish in time and was killed.
    #[error("CNI plugin {plugin} {command} did not finish within {secs}s")]
    Timeout {
        plugin: String,
        command: String,
        secs: u64,
    },
    /// It failed; `message` is its error object's `msg` and `details`, or its stderr.
    #[error("CNI plugin {plugin} {command} failed{}: {message}", code.map(|c| format!(" (code {c})")).unwrap_or_default())]
    Failed {
        plugin: String,
        command: String,
        code: Option<u64>,
        message: String,
    },
    /// It succeeded but printed something that is not JSON.
    #[error("CNI plugin {plugin} {command}: output is not JSON: {detail}")]
    Output {
        plugin: String,
        command: String,
        detail: String,
    },
}

/// Runs `binary` for `inv`; returns its parsed stdout (`Value::Null` when empty).
pub async fn run_plugin(
    binary: &Path,
    inv: &Invocation<'_>,
    timeout: Duration,
) -> Result<Value, PluginError> {
    let plugin = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut cmd = tokio::process::Command::new(binary);
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CNI_COMMAND", inv.command)
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_NETNS", inv.netns)
        .env("CNI_IFNAME", inv.ifname)
        .env("CNI_ARGS", inv.args)
        .env("CNI_PATH", inv.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| PluginError::Spawn {
        plugin: plugin.clone(),
        source,
    })?;
    let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let input = serde_json::to_vec(inv.config).unwrap_or_default();
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let run = async {
        if let Some(mut stdin) = stdin {
            // A plugin may exit without reading its stdin; that is its business.
            let _ = stdin.write_all(&input).await;
        }
        let (status, stdout, stderr) =
            tokio::join!(child.wait(), read_to_end(stdout), read_to_end(stderr));
        Ok::<_, std::io::Error>(std::process::Output {
            status: status?,
            stdout,
            stderr,
        })
    };
    let out = match tokio::time::timeout(timeout, run).await {
        Ok(r) => r.map_err(|source| PluginError::Spawn {
            plugin: plugin.clone(),
            source,
        })?,
        // Its process group goes (a plugin may have started helpers), while the
        // plugin is not yet reaped: its pid, the group's id, cannot have been reused.
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.wait().await;
            return Err(PluginError::Timeout {
                plugin,
                command: inv.command.to_string(),
                secs: timeout.as_secs(),
            });
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        // The spec's error object: {"cniVersion", "code", "msg", "details"}.
        let err: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
        let mut message = err["msg"].as_str().unwrap_or_default().to_string();
        if let Some(d) = err["details"].as_str().filter(|d| !d.is_empty()) {
            message = format!("{message}: {d}");
        }
        if !stderr.is_empty() {
            message = if message.is_empty() {
                stderr
            } else {
                format!("{message} (stderr: {stderr})")
            };
        }
        if message.is_empty() {
            message = format!("exited with {}", out.status);
        }
        return Err(PluginError::Failed {
            plugin,
            command: inv.command.to_string(),
            code: err["code"].as_u64(),
            message,
        });
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(stdout.trim()).map_err(|e| PluginError::Output {
        plugin,
        command: inv.command.to_string(),
        detail: e.to_string(),
    })
}

/// All of a plugin's output stream (empty if it has none).
async fn read_to_end<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut r) = r {
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut buf).await;
    }
    buf
}
