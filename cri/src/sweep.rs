//! The startup sweep: berthd can be killed in the middle of RunPodSandbox or
//! CreateContainer, after it made a netns, mount, cgroup, shim or runtime container but
//! before the record that would let Stop/Remove find them. Records are written last,
//! so anything on disk or in a shim without a record is such a leftover; the sweep
//! frees it before berthd serves.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_runtime::client::ShimClient;
use berth_runtime::{netns, podcgroup};
use tracing::{info, warn};

use crate::container::ContainerService;
use crate::context::Context;

/// How long the sweep waits on a leftover shim before giving up on it.
const SHIM_WAIT: Duration = Duration::from_secs(5);

/// A pod or container id as berth makes them: 64 lowercase hex digits.
fn is_berth_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Names in `dir` (none when it does not exist).
fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Kills, waits for and deletes every task of `client` that `keep` rejects.
async fn kill_tasks(client: &ShimClient, keep: impl Fn(&str) -> bool) {
    let Ok(Ok(info)) = tokio::time::timeout(SHIM_WAIT, client.connect_info()).await else {
        return;
    };
    for t in info.tasks.iter().filter(|t| !keep(&t.id)) {
        warn!(task = %t.id, "sweep: killing a task berth has no record of");
        let _ = client.kill_and_reap(&t.id, SHIM_WAIT).await;
    }
}

/// Frees everything a crash left without a record (see the module doc).
pub async fn sweep(ctx: &Context, containers: &ContainerService) {
    let pods: HashSet<String> = ctx.records.sandboxes().into_iter().map(|r| r.id).collect();
    let ctrs: HashSet<String> = ctx.records.containers().into_iter().map(|r| r.id).collect();
    sweep_containers(ctx, containers, &ctrs).await;
    sweep_shims(ctx, &pods).await;
    sweep_pods(ctx, &pods).await;
    sweep_runtime_containers(ctx, &ctrs).await;
}

/// Containers a live shim runs but no record names (CreateContainer cut short), and
/// their rootfs mounts and dirs.
async fn sweep_containers(ctx: &Context, containers: &ContainerService, ctrs: &HashSet<String>) {
    for (pod, client) in ctx.shims.all().await {
        kill_tasks(&client, |t| t == pod || ctrs.contains(t)).await;
    }
    let ctr_dirs: HashSet<String> = names(&ctx.paths.containers_root())
        .into_iter()
        .chain(names(&ctx.paths.bundles_root()))
        .filter(|n| is_berth_id(n) && !ctrs.contains(n))
        .collect();
    for id in ctr_dirs {
        info!(container = %id, "sweep: removing the files of an unrecorded container");
        containers.release_fs(&id).await;
    }
}

/// Shims of pods with no record: their tasks, then the shim itself.
async fn sweep_shims(ctx: &Context, pods: &HashSet<String>) {
    for name in names(&ctx.paths.shim_sockets()) {
        // A shim's console socket lives in `<socket>.c/` (before: `<socket>.console`).
        let (prefix, console) = match name
            .strip_suffix(".c")
            .or_else(|| name.strip_suffix(".console"))
        {
            Some(p) => (p, true),
            None => (name.as_str(), false),
        };
        let ours = prefix.len() == 16 && prefix.bytes().all(|b| b.is_ascii_hexdigit());
        if !ours || pods.iter().any(|p| p.starts_with(prefix)) {
            continue;
        }
        let path = ctx.paths.shim_sockets().join(&name);
        if !console {
            if let Ok(Ok(client)) =
                tokio::time::timeout(SHIM_WAIT, ShimClient::connect(&path)).await
            {
                warn!(shim = %name, "sweep: stopping the shim of an unrecorded pod");
                kill_tasks(&client, |_| false).await;
                let _ = client.shutdown().await;
            }
        }
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

/// The pods' infra processes whose shim died too, mounts, netns, cgroups and dirs.
async fn sweep_pods(ctx: &Context, pods: &HashSet<String>) {
    let pod_dirs: HashSet<String> = ctx
        .paths
        .sandbox_roots()
        .iter()
        .flat_map(|d| names(d))
        .filter(|n| is_berth_id(n) && !pods.contains(n))
        .collect();
    // CNI plugins the crash orphaned would otherwise race the DEL below (an ADD that
    // writes its lease after it).
    let orphans = pod_dirs.clone();
    let _ = tokio::task::spawn_blocking(move || kill_cni_plugins_of(&orphans)).await;
    for id in pod_dirs {
        info!(sandbox = %id, "sweep: removing what an unrecorded pod left");
        if let Err(e) = ctx.net.teardown(&ctx.paths.cni_cache(&id)).await {
            warn!(sandbox = %id, error = %e, "sweep: CNI DEL of an unrecorded pod");
        }
        let paths = &ctx.paths;
        let (root_dir, state_dir) = (paths.sandbox_root(&id), paths.sandbox_state(&id));
        let (shm, ns, infra_root) = (
            paths.shm(&id),
            paths.netns(&id),
            paths.shim_dir(&id).join("infra-root"),
        );
        let created_list = paths.created_cgroups(&id);
        let _ = tokio::task::spawn_blocking(move || {
            kill_processes_rooted_at(&infra_root);
            let _ = nix::mount::umount2(&shm, nix::mount::MntFlags::MNT_DETACH);
            let _ = netns::remove_pinned(&ns);
            let created: Vec<PathBuf> = std::fs::read(&created_list)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            // Only cgroup dirs, never anything else a damaged file might name.
            let created: Vec<PathBuf> = created
                .into_iter()
                .filter(|p| {
                    p.starts_with("/sys/fs/cgroup")
                        && !p.components().any(|c| c == std::path::Component::ParentDir)
                })
                .collect();
            podcgroup::remove(&created);
            let _ = std::fs::remove_dir_all(&state_dir);
            let _ = std::fs::remove_dir_all(&root_dir);
        })
        .await;
    }
}

/// Runtime containers no shim tracks any more (their shim died with berthd).
async fn sweep_runtime_containers(ctx: &Context, ctrs: &HashSet<String>) {
    for (name, handler) in &ctx.cfg.runtimes {
        let root = ctx.cfg.runtime_root(name);
        for id in names(&root) {
            if !is_berth_id(&id) || ctrs.contains(&id) {
                continue;
            }
            warn!(container = %id, runtime = %name, "sweep: deleting an unrecorded runtime container");
            // Beside the root, which exists since it holds this container.
            let log = root.with_extension("sweep.log");
            let runc =
                berth_runtime::runc::Runc::new(&handler.path, &root, &log, handler.args.clone())
                    .with_timeout(Duration::from_secs(handler.timeout_secs));
            let _ = tokio::task::spawn_blocking(move || {
                let _ = runc.delete(&id, true);
                let _ = std::fs::remove_file(&log);
            })
            .await;
        }
    }
}

/// SIGKILLs every process running for one of `pods` as a CNI plugin (or a helper it
/// started): berth gives each plugin `CNI_CONTAINERID=<pod id>`.
fn kill_cni_plugins_of(pods: &HashSet<String>) {
    if pods.is_empty() {
        return;
    }
    let mut killed = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let ours = env
            .split(|b| *b == 0)
            .filter_map(|kv| kv.strip_prefix(b"CNI_CONTAINERID="))
            .any(|id| std::str::from_utf8(id).is_ok_and(|id| pods.contains(id)));
        if ours {
            warn!(pid, "sweep: killing a CNI plugin of an unrecorded pod");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed.push(pid);
        }
    }
    // Gone (or zombies) before the DEL runs: a dying plugin's last write cannot follow it.
    for _ in 0..200 {
        let dying = killed.iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| !r.trim_start().starts_with('Z'))
            })
        });
        if !dying {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs every process whose root is `root` (an infra process whose shim is gone).
fn kill_processes_rooted_at(root: &Path) {
    if !root.exists() {
        return;
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_link(e.path().join("root")).is_ok_and(|r| r == root) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
