//! UpdateContainerResources: validation of CRI Linux resources, and applying them to a
//! live container through the OCI runtime (`runc update`, via the pod's shim).

use berth_cgroups::cpuset;
use k8s_cri::v1 as cri;
use tracing::info;

use super::ContainerService;
use crate::error::{CriError, Result};
use crate::records::ContainerState;

/// Kernel bounds (CFS period 1 ms..1 s, quota at least 1 ms, shares 2..262144).
const MIN_CFS_US: i64 = 1_000;
const MAX_CFS_PERIOD_US: i64 = 1_000_000;
const MAX_SHARES: i64 = 262_144;

/// Checks values the kernel or runtime would refuse, naming the field (`prefix.x`).
pub fn validate(
    r: &cri::LinuxContainerResources,
    prefix: &str,
    hier: &berth_cgroups::Hierarchy,
) -> Result<()> {
    let bad = |f: &str, why: String| Err(CriError::invalid(&format!("{prefix}.{f}"), why));
    if r.cpu_period != 0 && !(MIN_CFS_US..=MAX_CFS_PERIOD_US).contains(&r.cpu_period) {
        return bad(
            "cpu_period",
            format!("{} must be 0 or 1000..1000000 (µs)", r.cpu_period),
        );
    }
    if !(r.cpu_quota == 0 || r.cpu_quota == -1 || r.cpu_quota >= MIN_CFS_US) {
        return bad(
            "cpu_quota",
            format!("{} must be 0, -1 or at least 1000 (µs)", r.cpu_quota),
        );
    }
    if r.cpu_shares != 0 && !(2..=MAX_SHARES).contains(&r.cpu_shares) {
        return bad(
            "cpu_shares",
            format!("{} must be 0 or 2..262144", r.cpu_shares),
        );
    }
    if r.memory_limit_in_bytes < 0 {
        return bad(
            "memory_limit_in_bytes",
            format!("{} is negative", r.memory_limit_in_bytes),
        );
    }
    if r.memory_swap_limit_in_bytes < -1 {
        return bad(
            "memory_swap_limit_in_bytes",
            format!("{} must be -1, 0 or a size", r.memory_swap_limit_in_bytes),
        );
    }
    if r.memory_swap_limit_in_bytes > 0
        && r.memory_limit_in_bytes > 0
        && r.memory_swap_limit_in_bytes < r.memory_limit_in_bytes
    {
        return bad(
            "memory_swap_limit_in_bytes",
            format!(
                "{} is below memory_limit_in_bytes {} (it counts memory plus swap)",
                r.memory_swap_limit_in_bytes, r.memory_limit_in_bytes
            ),
        );
    }
    if !(-1000..=1000).contains(&r.oom_score_adj) {
        return bad(
            "oom_score_adj",
            format!("{} must be -1000..1000", r.oom_score_adj),
        );
    }
    if !r.cpuset_cpus.is_empty() {
        let set = cpuset::parse_list(&r.cpuset_cpus)
            .or_else(|why| bad("cpuset_cpus", why).map(|()| Default::default()))?;
        if let Some(online) = cpuset::online_cpus() {
            if let Some(c) = set.iter().find(|c| !online.contains(c)) {
                return bad("cpuset_cpus", format!("CPU {c} is not online on this node"));
            }
        }
    }
    if !r.cpuset_mems.is_empty() {
        cpuset::parse_list(&r.cpuset_mems)
            .or_else(|why| bad("cpuset_mems", why).map(|()| Default::default()))?;
    }
    for (i, h) in r.hugepage_limits.iter().enumerate() {
        let f = format!("hugepage_limits[{i}].page_size");
        let Some(kb) = hugepage_kb(&h.page_size) else {
            return bad(
                &f,
                format!("{:?} is not a size like 2MB or 1GB", h.page_size),
            );
        };
        let dir = format!("/sys/kernel/mm/hugepages/hugepages-{kb}kB");
        if !std::path::Path::new(&dir).is_dir() {
            return bad(
                &f,
                format!("{} huge pages are not supported on this node", h.page_size),
            );
        }
    }
    for (k, v) in &r.unified {
        let f = format!("unified[{k:?}]");
        let Some((controller, file)) = k.split_once('.') else {
            return bad(&f, "keys are cgroup v2 file names like memory.high".into());
        };
        if k.contains('/') || k.contains("..") || file.is_empty() || v.contains('\n') {
            return bad(&f, "not a cgroup v2 file name and value".into());
        }
        let probe = hier.cgroup(std::path::Path::new(""));
        if controller != "cgroup" && !probe.is_v2(controller) {
            return bad(
                &f,
                format!("the {controller} controller is not on cgroup v2 on this node"),
            );
        }
    }
    Ok(())
}

/// `2MB` -> 2048 (kB), as the kernel names its hugepage directories.
fn hugepage_kb(s: &str) -> Option<u64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let mul = match unit {
        "KB" | "kB" => 1,
        "MB" => 1 << 10,
        "GB" => 1 << 20,
        _ => return None,
    };
    (n > 0).then_some(n * mul)
}

impl ContainerService {
    /// UpdateContainerResources: applies the new resources to a created or running
    /// container and records them (ContainerStatus shows them).
    pub async fn update_resources(&self, req: cri::UpdateContainerResourcesRequest) -> Result<()> {
        let rec = self.ctx.container(&req.container_id, "container_id")?;
        let Some(linux) = req.linux else {
            return Err(CriError::invalid("linux", "Linux resources are required"));
        };
        validate(&linux, "linux", &self.ctx.cgroups)?;
        if rec.state == ContainerState::Exited {
            return Err(CriError::FailedPrecondition(format!(
                "container {} has exited; its resources can no longer be updated",
                rec.id
            )));
        }
        let shim = self.shim_of(&rec).await?;
        let body = serde_json::to_vec(&crate::oci::linux_resources(&linux))
            .map_err(|e| CriError::internal("encoding resources", e))?;
        match shim.update(&rec.id, body).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {
                return Err(CriError::FailedPrecondition(format!(
                    "container {} is not running",
                    rec.id
                )));
            }
            Err(e) => {
                return Err(CriError::shim(
                    format!("updating resources of {}", rec.id),
                    e,
                ));
            }
        }
        let _g = self.ctx.record_guard();
        let Some(mut rec) = self.ctx.records.container(&rec.id) else {
            return Err(CriError::NotFound(format!(
                "container {} was removed",
                req.container_id
            )));
        };
        rec.config
            .linux
            .get_or_insert_with(Default::default)
            .resources = Some(linux);
        self.ctx.records.put_container(&rec)?;
        info!(container = %rec.id, "resources updated");
        let update = crate::events::Event::ContainerUpdate {
            id: rec.id.clone(),
            image: rec.image.clone(),
            labels: rec.config.labels.clone().into_iter().collect(),
        };
        self.ctx.events.publish(&rec.sandbox_id, update);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(r: cri::LinuxContainerResources) -> Result<(), String> {
        validate(&r, "linux", &berth_cgroups::Hierarchy::default()).map_err(|e| {
            assert!(matches!(e, CriError::InvalidField { .. }), "{e:?}");
            e.to_string()
        })
    }

    #[test]
    fn bad_values_name_their_field() {
        let base = cri::LinuxContainerResources::default();
        assert!(check(base.clone()).is_ok());
        let cases: Vec<(cri::LinuxContainerResources, &str)> = vec![
            (
                cri::LinuxContainerResources {
                    cpu_period: 10,
                    ..base.clone()
                },
                "linux.cpu_period",
            ),
            (
                cri::LinuxContainerResources {
                    cpu_quota: 5,
                    ..base.clone()
                },
                "linux.cpu_quota",
            ),
            (
                cri::LinuxContainerResources {
                    cpu_shares: 1,
                    ..base.clone()
                },
                "linux.cpu_shares",
            ),
            (
                cri::LinuxContainerResources {
                    memory_limit_in_bytes: -5,
                    ..base.clone()
                },
                "linux.memory_limit_in_bytes",
            ),
            (
                cri::LinuxContainerResources {
                    memory_limit_in_bytes: 100 << 20,
                    memory_swap_limit_in_bytes: 50 << 20,
                    ..base.clone()
                },
                "linux.memory_swap_limit_in_bytes",
            ),
            (
                cri::LinuxContainerResources {
                    oom_score_adj: 2000,
                    ..base.clone()
                },
                "linux.oom_score_adj",
            ),
            (
                cri::LinuxContainerResources {
                    cpuset_cpus: "1-0".into(),
                    ..base.clone()
                },
                "linux.cpuset_cpus",
            ),
            (
                cri::LinuxContainerResources {
                    cpuset_cpus: "4096".into(),
                    ..base.clone()
                },
                "linux.cpuset_cpus",
            ),
            (
                cri::LinuxContainerResources {
                    cpuset_mems: "x".into(),
                    ..base.clone()
                },
                "linux.cpuset_mems",
            ),
            (
                cri::LinuxContainerResources {
                    hugepage_limits: vec![cri::HugepageLimit {
                        page_size: "2XB".into(),
                        limit: 1,
                    }],
                    ..base.clone()
                },
                "linux.hugepage_limits[0].page_size",
            ),
            (
                cri::LinuxContainerResources {
                    unified: [("memory.high".to_string(), "1M".to_string())].into(),
                    ..base.clone()
                },
                "linux.unified",
            ),
            (
                cri::LinuxContainerResources {
                    unified: [("../x".to_string(), "1".to_string())].into(),
                    ..base.clone()
                },
                "linux.unified",
            ),
        ];
        for (r, field) in cases {
            let msg = check(r).expect_err(field);
            assert!(msg.contains(field), "{msg:?} should name {field}");
        }
        assert!(
            check(cri::LinuxContainerResources {
                cpu_quota: -1,
                cpu_period: 100_000,
                cpu_shares: 512,
                memory_limit_in_bytes: 64 << 20,
                cpuset_cpus: "0".into(),
                ..base
            })
            .is_ok()
        );
        assert_eq!(hugepage_kb("2MB"), Some(2048));
        assert_eq!(hugepage_kb("1GB"), Some(1 << 20));
        assert_eq!(hugepage_kb("MB"), None);
    }
}
