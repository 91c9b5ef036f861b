//! OOM watching: each container's memory cgroup, found from its bundle's spec, is
//! watched in the poll loop; the kernel's OOM-kill counter decides.

use std::path::Path;

use berth_cgroups::{Cgroup, oom_kill_count};
use berth_proto::shim as pb;
use serde::Deserialize;

use super::Shim;

/// The two things the shim reads from a bundle's `config.json` (a local struct: the
/// whole OCI spec type would cost the per-pod shim memory for nothing).
#[derive(Debug, Default, Deserialize)]
pub(super) struct BundleSpec {
    #[serde(default)]
    linux: Option<BundleLinux>,
}

#[derive(Debug, Default, Deserialize)]
struct BundleLinux {
    #[serde(default, rename = "cgroupsPath")]
    cgroups_path: Option<String>,
    #[serde(default)]
    namespaces: Vec<BundleNamespace>,
}

#[derive(Debug, Deserialize)]
struct BundleNamespace {
    #[serde(rename = "type")]
    typ: String,
    #[serde(default)]
    path: Option<String>,
}

impl BundleSpec {
    /// The bundle's spec; `None` when it cannot be read (then nothing is watched).
    pub fn read(bundle: &Path) -> Option<BundleSpec> {
        let bytes = std::fs::read(bundle.join("config.json")).ok()?;
        serde_json::from_slice(&bytes)
            .map_err(|e| eprintln!("berth-shim: {}: {e}", bundle.display()))
            .ok()
    }

    /// The container's `linux.cgroupsPath`.
    pub fn cgroups_path(&self) -> Option<&str> {
        self.linux.as_ref()?.cgroups_path.as_deref()
    }

    /// Whether the container has no PID namespace of its own (the host's, or a pod's
    /// shared one): then its init's exit does not end its other processes.
    pub fn shares_pid_namespace(&self) -> bool {
        let own = self.linux.as_ref().is_some_and(|l| {
            l.namespaces
                .iter()
                .any(|ns| ns.typ == "pid" && ns.path.as_deref().is_none_or(str::is_empty))
        });
        !own
    }
}

impl Shim {
    /// The cgroup a spec names.
    pub(super) fn container_cgroup(&self, spec: &BundleSpec) -> Option<Cgroup> {
        let h = self.cgroups.as_ref()?;
        let path = spec.cgroups_path()?;
        berth_cgroups::relative_path_of(path)
            .map(|rel| h.cgroup(&rel))
            .map_err(|e| eprintln!("berth-shim: {e}"))
            .ok()
    }

    /// Counts new OOM kills of a container's cgroup; the first one is published.
    /// `killed_init`: its init just died of SIGKILL, so an undecided watch may wait
    /// briefly for the signal that decides it.
    pub(super) fn check_oom(&mut self, id: &str, killed_init: bool) {
        let Some(t) = self.tasks.0.get_mut(id) else {
            return;
        };
        if t.init.exit.is_some() {
            return;
        }
        let Some(c) = t.container_mut() else { return };
        // The watch's count also covers a kill its cgroup's removal hides from the counter.
        let mut seen = 0;
        if let Some(w) = c.oom.as_mut() {
            seen = w.check(); // drains the fd, or poll would spin
            if seen == 0 && killed_init && !c.oom_killed {
                seen = w.settle();
            }
            if w.is_gone() {
                c.oom = None;
            }
        }
        if c.oom_killed {
            return;
        }
        let total = c.cgroup.as_ref().and_then(oom_kill_count).unwrap_or(0);
        if total <= c.oom_baseline && seen == 0 {
            return;
        }
        c.oom_killed = true;
        eprintln!("berth-shim: the kernel OOM-killed a process of {id}");
        self.publish(pb::Event {
            event: Some(pb::event::Event::Oom(pb::TaskOom { id: id.to_string() })),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> BundleSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn pid_namespace_sharing_from_the_spec() {
        let own = spec(r#"{"linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}]}}"#);
        assert!(!own.shares_pid_namespace());
        let pod = spec(r#"{"linux": {"namespaces": [{"type": "pid", "path": "/proc/7/ns/pid"}]}}"#);
        assert!(pod.shares_pid_namespace());
        let host = spec(r#"{"linux": {"namespaces": [{"type": "network"}]}}"#);
        assert!(host.shares_pid_namespace());
        let full = spec(
            r#"{"ociVersion": "1.0.2", "linux": {"cgroupsPath": "/berth/x", "namespaces": []}}"#,
        );
        assert_eq!(full.cgroups_path(), Some("/berth/x"));
    }
}
