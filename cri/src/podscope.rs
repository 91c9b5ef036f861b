//! The systemd cgroup driver's side of a pod: its infra process in
//! `berth-<id>.scope` under the pod's slice, started through systemd (runc puts each
//! container in its own scope beside it, as `<slice>:berth:<id>`).
//!
//! A slice that was not active when berth put a pod in it (crictl with a made-up
//! `cgroup_parent`, or its parents) is marked under `state/slices/` and stopped once no
//! pod needs it, so that such pods leave nothing behind. A kubelet's slices were
//! active already (kubelet makes them first) and stay kubelet's.
//!
//! `place_infra`'s caller holds the create lock, and so must `release`'s: a slice is
//! never stopped while a pod is being put in it.

use std::path::Path;

use berth_runtime::podcgroup;
use tracing::{info, warn};

use crate::config::{CgroupDriver, Config};
use crate::context::Context;
use crate::error::{CriError, Result};
use crate::systemd::{Scope, Systemd, infra_scope};

/// Where the systemd driver puts a pod without a `cgroup_parent` (runc's default).
const DEFAULT_SLICE: &str = "system.slice";

/// The slice of a pod's scopes under the systemd driver: its `cgroup_parent`, or
/// `system.slice` when it has none. `None` under cgroupfs.
pub fn pod_slice(cfg: &Config, cgroup_parent: &str) -> Option<String> {
    (cfg.cgroup_driver == CgroupDriver::Systemd).then(|| match cgroup_parent.trim() {
        "" => DEFAULT_SLICE.to_string(),
        p => p.to_string(),
    })
}

/// A slice and its parents, outermost first: `a-b.slice` -> `a.slice`, `a-b.slice`.
fn slice_chain(slice: &str) -> Vec<String> {
    let stem = slice.strip_suffix(".slice").unwrap_or(slice);
    let mut out = Vec::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        out.push(format!("{prefix}.slice"));
    }
    out
}

fn systemd(ctx: &Context) -> Result<&Systemd> {
    ctx.systemd.as_deref().ok_or_else(|| {
        CriError::Internal("the systemd cgroup driver has no connection to systemd".into())
    })
}

/// Moves the infra process into its scope under `slice`. Slices that are not active
/// yet are marked before the scope starts them.
pub async fn place_infra(ctx: &Context, pod_id: &str, slice: &str, pid: u32) -> Result<()> {
    let systemd = systemd(ctx)?;
    for s in slice_chain(slice) {
        let active = systemd
            .is_active(&s)
            .await
            .map_err(|e| CriError::internal("asking systemd about the pod's slice", e))?;
        if !active {
            let mark = ctx.paths.started_slices().join(&s);
            crate::layout::write_private(&mark, b"")
                .map_err(|e| CriError::internal(&format!("marking {}", mark.display()), e))?;
        }
    }
    let name = infra_scope(pod_id);
    let description = format!("berth pod {pod_id}");
    systemd
        .start_scope(&Scope {
            name: &name,
            slice,
            pid,
            description: &description,
        })
        .await
        .map_err(|e| CriError::internal("putting the infra process in its systemd scope", e))
}

/// Stops a pod's scope (its process is gone by now), then every marked slice no
/// other pod (by record) needs and nothing else lives in, innermost first.
pub async fn release(ctx: &Context, pod_id: &str, slice: &str) -> Result<()> {
    // A pod made under the systemd driver, berthd now on cgroupfs: connect for this.
    let connected;
    let systemd = match ctx.systemd.as_deref() {
        Some(s) => s,
        None => match Systemd::connect().await {
            Ok(s) => {
                connected = s;
                &connected
            }
            Err(e) => {
                warn!(sandbox = pod_id, error = %e, "leaving the pod's systemd scope and slices to systemd");
                return Ok(());
            }
        },
    };
    systemd
        .stop_unit(&infra_scope(pod_id))
        .await
        .map_err(|e| CriError::internal("stopping the pod's systemd scope", e))?;
    for s in slice_chain(slice).iter().rev() {
        stop_marked_slice(ctx, systemd, s, pod_id).await?;
    }
    Ok(())
}

/// Stops `slice` if berth started it and nothing needs it any more.
async fn stop_marked_slice(
    ctx: &Context,
    systemd: &Systemd,
    slice: &str,
    except: &str,
) -> Result<()> {
    let mark = ctx.paths.started_slices().join(slice);
    if !mark.exists() || needed_by_a_pod(ctx, slice, except) || has_child_cgroups(slice) {
        return Ok(());
    }
    systemd
        .stop_unit(slice)
        .await
        .map_err(|e| CriError::internal("stopping a slice berth started", e))?;
    remove_unmanaged_dirs(slice);
    let _ = std::fs::remove_file(&mark);
    info!(slice, "stopped a systemd slice berth started");
    Ok(())
}

/// The slice's dirs systemd leaves on cgroup v1: the hierarchies it does not manage
/// (cpuset, freezer, ...), where runc made them for the containers (empty ones only).
fn remove_unmanaged_dirs(slice: &str) {
    let (Ok(rel), Ok(hierarchies)) = (
        podcgroup::relative_path(slice, true),
        podcgroup::hierarchies(),
    ) else {
        return;
    };
    let dirs: Vec<_> = hierarchies.iter().map(|h| h.join(&rel)).collect();
    podcgroup::remove(&dirs);
}

/// Whether a recorded pod other than `except` lives in `slice` or below it.
fn needed_by_a_pod(ctx: &Context, slice: &str, except: &str) -> bool {
    let below = format!("{}-", slice.trim_end_matches(".slice"));
    ctx.records.sandboxes().iter().any(|p| {
        p.id != except
            && p.systemd_slice
                .as_deref()
                .is_some_and(|s| s == slice || s.starts_with(&below))
    })
}

/// Whether the slice's cgroup holds a child cgroup in any hierarchy (a unit berth did
/// not make, which stopping the slice would kill).
fn has_child_cgroups(slice: &str) -> bool {
    let Ok(rel) = podcgroup::relative_path(slice, true) else {
        return true;
    };
    let Ok(hierarchies) = podcgroup::hierarchies() else {
        return true;
    };
    hierarchies.iter().any(|h| child_dirs(&h.join(&rel)))
}

fn child_dirs(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
    })
}

/// At start: stops `berth-<id>.scope` units of pods and containers berth has no record
/// of (a crash between starting the scope and writing the record), then the marked
/// slices no recorded pod needs.
pub async fn sweep(ctx: &Context) {
    let Ok(systemd) = systemd(ctx) else {
        return;
    };
    let known: std::collections::HashSet<String> = ctx
        .records
        .sandboxes()
        .into_iter()
        .map(|p| p.id)
        .chain(ctx.records.containers().into_iter().map(|c| c.id))
        .collect();
    match systemd.units_matching("berth-*.scope").await {
        Ok(units) => {
            for unit in units {
                let id = unit
                    .strip_prefix("berth-")
                    .and_then(|u| u.strip_suffix(".scope"));
                if id.is_none_or(|id| known.contains(id)) {
                    continue;
                }
                info!(
                    unit,
                    "sweep: stopping a scope of no recorded pod or container"
                );
                if let Err(e) = systemd.stop_unit(&unit).await {
                    warn!(unit, error = %e, "sweep: stopping a stray scope");
                }
            }
        }
        Err(e) => warn!(error = %e, "sweep: listing berth's systemd scopes"),
    }
    let mut marked: Vec<String> = std::fs::read_dir(ctx.paths.started_slices())
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".slice"))
                .collect()
        })
        .unwrap_or_default();
    // Innermost first: a child's name is longer than its parent's.
    marked.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for slice in marked {
        if let Err(e) = stop_marked_slice(ctx, systemd, &slice, "").await {
            warn!(slice, error = %e, "sweep: stopping a slice berth started");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_comes_with_its_parents_outermost_first() {
        assert_eq!(
            slice_chain("kubepods-burstable-pod1.slice"),
            [
                "kubepods.slice",
                "kubepods-burstable.slice",
                "kubepods-burstable-pod1.slice"
            ]
        );
        assert_eq!(slice_chain("system.slice"), ["system.slice"]);
    }

    #[test]
    fn the_slice_follows_the_driver() {
        let mut cfg = Config::default();
        assert_eq!(pod_slice(&cfg, "x.slice"), None);
        cfg.cgroup_driver = CgroupDriver::Systemd;
        assert_eq!(pod_slice(&cfg, "").as_deref(), Some("system.slice"));
        assert_eq!(pod_slice(&cfg, "a-b.slice").as_deref(), Some("a-b.slice"));
    }
}
