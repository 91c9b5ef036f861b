//! `Introspection.Check`: a self-test of the node as berthd sees it, one pass/fail line
//! per part (what `berthctl check` prints).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use super::pb;
use crate::config::{CgroupDriver, Config};
use crate::services::Services;

/// Less free space under `root` than this (or 5% of the filesystem) fails the check.
const MIN_FREE_BYTES: u64 = 1 << 30;
/// Less free space under `state` than this fails the check.
const MIN_STATE_FREE_BYTES: u64 = 16 << 20;

fn result(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> pb::CheckResult {
    pb::CheckResult {
        name: name.into(),
        ok,
        detail: detail.into(),
    }
}

/// Every check, in the order they are shown.
pub(super) async fn run(cfg: &Config, svc: &Services) -> Vec<pb::CheckResult> {
    let mut out = Vec::new();
    for (name, handler) in &cfg.runtimes {
        out.push(runtime(name, &handler.path).await);
    }
    out.push(shim(&svc.ctx.shims.binary()));
    out.extend(cgroups(svc));
    out.push(cni(svc));
    out.push(socket(&cfg.listen));
    out.push(free_space("root", &cfg.root, MIN_FREE_BYTES, true));
    // A tmpfs sized by RAM on most nodes; it holds sockets, bundles and FIFOs.
    out.push(free_space("state", &cfg.state, MIN_STATE_FREE_BYTES, false));
    out.push(result(
        "seccomp",
        svc.ctx.host.seccomp.supported,
        match svc.ctx.host.seccomp.supported {
            true => "the kernel filters syscalls (RuntimeDefault works)",
            false => "the kernel has no seccomp filter: RuntimeDefault and Localhost profiles are refused",
        },
    ));
    if cfg.cgroup_driver == CgroupDriver::Systemd {
        out.push(systemd(svc).await);
    }
    out
}

/// The runtime answers `--version` within 5 s.
async fn runtime(name: &str, path: &Path) -> pb::CheckResult {
    let label = format!("runtime {name}");
    let run = tokio::process::Command::new(path)
        .arg("--version")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Ok(o)) if o.status.success() => {
            let first = String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            result(label, true, format!("{}: {first}", path.display()))
        }
        Ok(Ok(o)) => result(
            label,
            false,
            format!("{} --version: {}", path.display(), o.status),
        ),
        Ok(Err(e)) => result(label, false, format!("{}: {e}", path.display())),
        Err(_) => result(
            label,
            false,
            format!("{} --version: no answer in 5 s", path.display()),
        ),
    }
}

fn shim(path: &Path) -> pb::CheckResult {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
            result("shim", true, path.display().to_string())
        }
        Ok(_) => result(
            "shim",
            false,
            format!("{} is not an executable file", path.display()),
        ),
        Err(e) => result("shim", false, format!("{}: {e}", path.display())),
    }
}

/// The hierarchies, and the controllers limits and pause need.
fn cgroups(svc: &Services) -> Vec<pb::CheckResult> {
    let h = &svc.ctx.cgroups;
    let mode = match h.mode() {
        berth_cgroups::Mode::Legacy => "cgroup v1",
        berth_cgroups::Mode::Hybrid => "cgroup v1 with a cgroup2 mount (hybrid)",
        berth_cgroups::Mode::Unified => "cgroup v2",
    };
    let mut out = vec![result("cgroups", true, mode)];
    let root = h.cgroup(Path::new(""));
    for controller in ["memory", "cpu", "pids", "freezer"] {
        // cgroup2's freezer is core (`cgroup.freeze`, kernel 5.2+, in every cgroup
        // but the root), not a listed controller.
        let v2_freezer = controller == "freezer"
            && h.mode() == berth_cgroups::Mode::Unified
            && own_cgroup_v2(h).is_some_and(|d| d.join("cgroup.freeze").exists());
        let ok = root.dir(controller).is_some() || v2_freezer;
        let why = match (ok, controller) {
            (true, _) => "available".to_string(),
            (false, "freezer") => "missing: pause and resume fail".to_string(),
            (false, c) => format!("missing: {c} limits and stats fail"),
        };
        out.push(result(format!("cgroup {controller}"), ok, why));
    }
    out
}

/// berthd's own cgroup2 directory (from `/proc/self/cgroup`'s `0::` line).
fn own_cgroup_v2(h: &berth_cgroups::Hierarchy) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mount = h.cgroup(Path::new("")).v2_dir()?.to_path_buf();
    Some(mount.join(rel.trim_start_matches('/')))
}

/// The CNI config berthd would use, with every plugin it names.
fn cni(svc: &Services) -> pb::CheckResult {
    match svc.ctx.net.load() {
        Ok(list) => {
            let plugins: Vec<&str> = list
                .plugins
                .iter()
                .filter_map(|p| p["type"].as_str())
                .collect();
            result(
                "cni",
                true,
                format!(
                    "network {:?} ({}), plugins {}",
                    list.name,
                    list.cni_version,
                    plugins.join(", ")
                ),
            )
        }
        Err(e) => result("cni", false, e.to_string()),
    }
}

/// The CRI socket is a socket with mode 0660.
fn socket(path: &Path) -> pb::CheckResult {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_socket() && m.permissions().mode() & 0o777 == 0o660 => {
            result("cri socket", true, format!("{} (0660)", path.display()))
        }
        Ok(m) => result(
            "cri socket",
            false,
            format!(
                "{}: not a 0660 socket (mode {:o})",
                path.display(),
                m.permissions().mode() & 0o7777
            ),
        ),
        Err(e) => result("cri socket", false, format!("{}: {e}", path.display())),
    }
}

fn free_space(name: &str, dir: &Path, min: u64, share: bool) -> pb::CheckResult {
    let label = format!("free space {name}");
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => {
            let block = s.fragment_size() as u64;
            let free = s.blocks_available() as u64 * block;
            let total = (s.blocks() as u64 * block).max(1);
            let ok = free >= min && (!share || free * 20 >= total);
            let detail = format!(
                "{}: {:.1} GiB free of {:.1} GiB",
                dir.display(),
                free as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            );
            result(label, ok, detail)
        }
        Err(e) => result(label, false, format!("{}: {e}", dir.display())),
    }
}

async fn systemd(svc: &Services) -> pb::CheckResult {
    let Some(s) = &svc.ctx.systemd else {
        return result("systemd", false, "no connection to systemd");
    };
    match s.is_active("system.slice").await {
        Ok(true) => result("systemd", true, "reachable on the system bus"),
        Ok(false) => result("systemd", false, "system.slice is not active"),
        Err(e) => result("systemd", false, e.to_string()),
    }
}
