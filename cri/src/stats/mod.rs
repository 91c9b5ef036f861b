//! Container and pod statistics (CRI `*Stats` and `*Metrics` RPCs) from cgroups, the
//! pod's network namespace and the writable layer. Readers of cgroup and proc files:
//! callers run them on a blocking thread.

pub mod metrics;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use berth_cgroups::{Cgroup, CgroupStats};
use berth_network::netdev::{self, InterfaceCounters};
use berth_runtime::timefmt::now_unix_nanos;
use k8s_cri::v1 as cri;

use crate::container::ContainerService;
use crate::context::Context;
use crate::error::Result;
use crate::records::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};

/// The stats and metrics RPCs.
pub struct StatsService {
    ctx: Arc<Context>,
    containers: ContainerService,
    /// The previous CPU sample per container and pod, for usage_nano_cores.
    cpu_samples: Mutex<HashMap<String, CpuSample>>,
}

/// A cumulative CPU reading kept between calls, to turn usage into a rate.
#[derive(Clone, Copy, Debug)]
struct CpuSample {
    at: i64,
    usage_ns: u64,
    rate: u64,
}

/// Shortest window a rate is computed over; calls closer together repeat the last rate.
const MIN_WINDOW_NS: i64 = 100_000_000;
/// The kept sample is replaced once it is this old, so the window tracks recent use.
const RESAMPLE_NS: i64 = 1_000_000_000;

fn u64v(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

/// One reading of a container, shared by the stats and metrics RPCs.
pub(crate) struct ContainerReading {
    pub rec: ContainerRecord,
    pub config: cri::ContainerConfig,
    pub at: i64,
    pub cgroup: Option<CgroupStats>,
    pub nano_cores: Option<u64>,
}

/// One reading of a pod.
pub(crate) struct PodReading {
    pub rec: SandboxRecord,
    pub config: cri::PodSandboxConfig,
    pub at: i64,
    pub cpu_ns: Option<u64>,
    pub nano_cores: Option<u64>,
    pub memory: Option<berth_cgroups::MemoryStats>,
    pub pids: Option<u64>,
    pub interfaces: Option<Vec<InterfaceCounters>>,
    pub containers: Vec<ContainerReading>,
}

impl StatsService {
    /// Works over `ctx`.
    pub fn new(ctx: Arc<Context>, containers: ContainerService) -> StatsService {
        StatsService {
            ctx,
            containers,
            cpu_samples: Mutex::new(HashMap::new()),
        }
    }

    /// The cgroup of a container, from its recorded `cgroupsPath`.
    fn container_cgroup(&self, rec: &ContainerRecord) -> Option<Cgroup> {
        let path = if rec.cgroups_path.is_empty() {
            // Records from before the field: the path berth always gave.
            let pod = self.ctx.records.sandbox(&rec.sandbox_id)?;
            self.containers.cgroups_path(&pod, &rec.id)
        } else {
            rec.cgroups_path.clone()
        };
        berth_cgroups::relative_path_of(&path)
            .ok()
            .map(|rel| self.ctx.cgroups.cgroup(&rel))
    }

    /// The pod's own cgroup (its `cgroup_parent`), if it has one.
    fn pod_cgroup(&self, config: &cri::PodSandboxConfig) -> Option<Cgroup> {
        let parent = config.linux.as_ref().map(|l| l.cgroup_parent.as_str())?;
        if parent.is_empty() {
            return None;
        }
        let systemd = self.ctx.cfg.cgroup_driver == crate::config::CgroupDriver::Systemd;
        berth_cgroups::pod::relative_path(parent, systemd)
            .ok()
            .map(|rel| self.ctx.cgroups.cgroup(&rel))
    }

    /// CPU rate in nanocores between this reading and the kept one; the first reading
    /// of an object averages over its lifetime since `since`.
    fn nano_cores(&self, key: &str, at: i64, usage_ns: u64, since: i64) -> u64 {
        let mut samples = self.cpu_samples.lock().unwrap_or_else(|p| p.into_inner());
        let rate = |from_at: i64, from_usage: u64| -> u64 {
            let dt = (at - from_at).max(1) as u128;
            (usage_ns.saturating_sub(from_usage) as u128 * 1_000_000_000 / dt) as u64
        };
        match samples.get_mut(key) {
            Some(s) if at - s.at < MIN_WINDOW_NS => s.rate,
            Some(s) => {
                let r = rate(s.at, s.usage_ns);
                s.rate = r;
                if at - s.at >= RESAMPLE_NS {
                    (s.at, s.usage_ns) = (at, usage_ns);
                }
                r
            }
            None => {
                let r = if since > 0 && since < at {
                    rate(since, 0)
                } else {
                    0
                };
                samples.insert(
                    key.to_string(),
                    CpuSample {
                        at,
                        usage_ns,
                        rate: r,
                    },
                );
                r
            }
        }
    }

    /// After a full listing of one kind (pods or containers), forgets the samples of
    /// that kind it did not list; the other kind's samples stay.
    fn prune_samples(&self, pods: bool, listed: HashSet<String>) {
        self.cpu_samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| k.starts_with("pod/") != pods || listed.contains(k));
    }

    fn read_container(&self, rec: ContainerRecord) -> ContainerReading {
        let config = rec.config.clone();
        let at = now_unix_nanos();
        let cgroup = (rec.state == ContainerState::Running)
            .then(|| self.container_cgroup(&rec))
            .flatten()
            .and_then(|cg| cg.stats().ok());
        let nano_cores = cgroup
            .as_ref()
            .and_then(|s| s.cpu)
            .map(|c| self.nano_cores(&rec.id, at, c.usage_ns, rec.started_at));
        ContainerReading {
            rec,
            config,
            at,
            cgroup,
            nano_cores,
        }
    }

    fn container_stats_of(&self, r: &ContainerReading) -> cri::ContainerStats {
        let at = r.at;
        let cpu = r.cgroup.as_ref().and_then(|s| s.cpu);
        let mem = r.cgroup.as_ref().and_then(|s| s.memory);
        cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: r.rec.id.clone(),
                metadata: r.config.metadata.clone(),
                labels: r.config.labels.clone(),
                annotations: r.config.annotations.clone(),
            }),
            cpu: cpu.map(|c| cri::CpuUsage {
                timestamp: at,
                usage_core_nano_seconds: u64v(c.usage_ns),
                usage_nano_cores: r.nano_cores.and_then(u64v),
            }),
            memory: mem.as_ref().map(|m| memory_usage(at, m)),
            swap: mem.and_then(|m| {
                m.swap_usage.map(|u| cri::SwapUsage {
                    timestamp: at,
                    swap_available_bytes: u64v(m.swap_limit.map_or(0, |l| l.saturating_sub(u))),
                    swap_usage_bytes: u64v(u),
                })
            }),
            writable_layer: Some(self.writable_layer(&r.rec.id, at)),
        }
    }

    /// Bytes (allocated blocks, as `du` counts) and inodes of the container's upper dir.
    fn writable_layer(&self, id: &str, at: i64) -> cri::FilesystemUsage {
        let (bytes, inodes) = disk_usage(&self.ctx.paths.container_dir(id).join("upper"));
        cri::FilesystemUsage {
            timestamp: at,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.ctx.paths.containers_root().display().to_string(),
            }),
            used_bytes: u64v(bytes),
            inodes_used: u64v(inodes),
        }
    }

    /// ContainerStats: a container that is not running has only its writable layer.
    pub fn container_stats(&self, id: &str) -> Result<cri::ContainerStats> {
        let rec = self.ctx.container(id, "container_id")?;
        Ok(self.container_stats_of(&self.read_container(rec)))
    }

    /// Running containers matching the filter (as containerd lists them).
    fn filtered_containers(&self, f: &cri::ContainerStatsFilter) -> Vec<ContainerReading> {
        self.ctx
            .records
            .containers()
            .into_iter()
            .filter(|r| r.state == ContainerState::Running)
            .filter(|r| f.id.is_empty() || r.id.starts_with(&f.id))
            .filter(|r| f.pod_sandbox_id.is_empty() || r.sandbox_id.starts_with(&f.pod_sandbox_id))
            .map(|r| self.read_container(r))
            .filter(|r| {
                f.label_selector
                    .iter()
                    .all(|(k, v)| r.config.labels.get(k) == Some(v))
            })
            .collect()
    }

    /// ListContainerStats.
    pub fn list_container_stats(
        &self,
        filter: Option<cri::ContainerStatsFilter>,
    ) -> Vec<cri::ContainerStats> {
        let f = filter.unwrap_or_default();
        let unfiltered = f == cri::ContainerStatsFilter::default();
        let readings = self.filtered_containers(&f);
        if unfiltered {
            self.prune_samples(false, readings.iter().map(|r| r.rec.id.clone()).collect());
        }
        readings
            .iter()
            .map(|r| self.container_stats_of(r))
            .collect()
    }

    /// Reads a pod and its running containers (`ctrs`: the store's, grouped by pod).
    fn read_pod(
        &self,
        rec: SandboxRecord,
        ctrs: &mut HashMap<String, Vec<ContainerRecord>>,
    ) -> PodReading {
        let config = rec.config.clone();
        let containers: Vec<ContainerReading> = ctrs
            .remove(&rec.id)
            .unwrap_or_default()
            .into_iter()
            .map(|c| self.read_container(c))
            .collect();
        let at = now_unix_nanos();
        let ready = rec.state == SandboxState::Ready;
        let own = ready
            .then(|| self.pod_cgroup(&config))
            .flatten()
            .and_then(|cg| cg.stats().ok());
        // Without a pod cgroup, the pod is the sum of its containers.
        let (cpu_ns, memory, pids) = match &own {
            Some(s) => (s.cpu.map(|c| c.usage_ns), s.memory, s.pids),
            None if ready => sum_containers(&containers),
            None => (None, None, None),
        };
        let nano_cores = cpu_ns.map(|u| self.nano_cores(&pod_key(&rec.id), at, u, rec.created_at));
        let interfaces = (ready && rec.netns.is_some() && rec.infra_pid > 0)
            .then(|| netdev::read(rec.infra_pid).ok())
            .flatten();
        PodReading {
            rec,
            config,
            at,
            cpu_ns,
            nano_cores,
            memory,
            pids,
            interfaces,
            containers,
        }
    }

    fn pod_stats_of(&self, p: &PodReading) -> cri::PodSandboxStats {
        let at = p.at;
        let network = p.interfaces.as_ref().map(|ifs| {
            let usage = |i: &InterfaceCounters| cri::NetworkInterfaceUsage {
                name: i.name.clone(),
                rx_bytes: u64v(i.rx_bytes),
                rx_errors: u64v(i.rx_errors),
                tx_bytes: u64v(i.tx_bytes),
                tx_errors: u64v(i.tx_errors),
            };
            cri::NetworkUsage {
                timestamp: at,
                default_interface: ifs.iter().find(|i| i.name == "eth0").map(usage),
                interfaces: ifs
                    .iter()
                    .filter(|i| i.name != "eth0" && i.name != "lo")
                    .map(usage)
                    .collect(),
            }
        });
        cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: p.rec.id.clone(),
                metadata: p.config.metadata.clone(),
                labels: p.config.labels.clone(),
                annotations: p.config.annotations.clone(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: p.cpu_ns.map(|u| cri::CpuUsage {
                    timestamp: at,
                    usage_core_nano_seconds: u64v(u),
                    usage_nano_cores: p.nano_cores.and_then(u64v),
                }),
                memory: p.memory.as_ref().map(|m| memory_usage(at, m)),
                network,
                process: p.pids.map(|n| cri::ProcessUsage {
                    timestamp: at,
                    process_count: u64v(n),
                }),
                containers: p
                    .containers
                    .iter()
                    .map(|c| self.container_stats_of(c))
                    .collect(),
            }),
            windows: None,
        }
    }

    /// PodSandboxStats.
    pub fn pod_sandbox_stats(&self, id: &str) -> Result<cri::PodSandboxStats> {
        let rec = self.ctx.sandbox(id, "pod_sandbox_id")?;
        Ok(self.pod_stats_of(&self.read_pod(rec, &mut self.running_by_pod())))
    }

    /// Running containers grouped by pod.
    fn running_by_pod(&self) -> HashMap<String, Vec<ContainerRecord>> {
        let mut m: HashMap<String, Vec<ContainerRecord>> = HashMap::new();
        for c in self.ctx.records.containers() {
            if c.state == ContainerState::Running {
                m.entry(c.sandbox_id.clone()).or_default().push(c);
            }
        }
        m
    }

    /// Pods matching a filter, read.
    pub(crate) fn filtered_pods(&self, f: &cri::PodSandboxStatsFilter) -> Vec<PodReading> {
        let mut ctrs = self.running_by_pod();
        self.ctx
            .records
            .sandboxes()
            .into_iter()
            .filter(|r| r.state == SandboxState::Ready)
            .filter(|r| f.id.is_empty() || r.id.starts_with(&f.id))
            .filter(|r| {
                f.label_selector
                    .iter()
                    .all(|(k, v)| r.config.labels.get(k) == Some(v))
            })
            .map(|r| self.read_pod(r, &mut ctrs))
            .collect()
    }

    /// ListPodSandboxStats (ready pods, as containerd lists them).
    pub fn list_pod_sandbox_stats(
        &self,
        filter: Option<cri::PodSandboxStatsFilter>,
    ) -> Vec<cri::PodSandboxStats> {
        let f = filter.unwrap_or_default();
        let pods = self.filtered_pods(&f);
        if f == cri::PodSandboxStatsFilter::default() {
            self.prune_samples(true, pods.iter().map(|p| pod_key(&p.rec.id)).collect());
        }
        pods.iter().map(|p| self.pod_stats_of(p)).collect()
    }
}

/// The kept-sample key of a pod (container ids and pod ids never collide, but the
/// prefix keeps the two kinds apart when pruning).
fn pod_key(id: &str) -> String {
    format!("pod/{id}")
}

fn memory_usage(at: i64, m: &berth_cgroups::MemoryStats) -> cri::MemoryUsage {
    let ws = m.working_set();
    cri::MemoryUsage {
        timestamp: at,
        working_set_bytes: u64v(ws),
        available_bytes: u64v(m.limit.map_or(0, |l| l.saturating_sub(ws))),
        usage_bytes: u64v(m.usage),
        rss_bytes: u64v(m.rss),
        page_faults: u64v(m.pgfault),
        major_page_faults: u64v(m.pgmajfault),
    }
}

/// Sums containers' CPU, memory and tasks (for a pod without its own cgroup).
fn sum_containers(
    cs: &[ContainerReading],
) -> (Option<u64>, Option<berth_cgroups::MemoryStats>, Option<u64>) {
    let mut cpu = 0u64;
    let mut mem = berth_cgroups::MemoryStats::default();
    // The infra process is one more task.
    let mut pids = 1u64;
    for c in cs.iter().filter_map(|c| c.cgroup.as_ref()) {
        cpu += c.cpu.map_or(0, |x| x.usage_ns);
        if let Some(m) = c.memory {
            mem.usage += m.usage;
            mem.rss += m.rss;
            mem.cache += m.cache;
            mem.mapped_file += m.mapped_file;
            mem.active_file += m.active_file;
            mem.inactive_file += m.inactive_file;
            mem.pgfault += m.pgfault;
            mem.pgmajfault += m.pgmajfault;
            mem.failcnt += m.failcnt;
        }
        pids += c.pids.unwrap_or(0);
    }
    (Some(cpu), Some(mem), Some(pids))
}

/// Allocated bytes and inodes under `root` (hard links counted once); 0 if absent.
pub(crate) fn disk_usage(root: &Path) -> (u64, u64) {
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    let (mut bytes, mut inodes) = (0u64, 0u64);
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        bytes += md.blocks() * 512;
        inodes += 1;
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    (bytes, inodes)
}

/// Label-value helpers for metrics: container `[id, name]`.
pub(crate) fn container_labels(r: &ContainerReading) -> Vec<String> {
    vec![
        r.rec.id.clone(),
        r.config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
    ]
}

/// Pod `[id, name]`.
pub(crate) fn pod_labels(p: &PodReading) -> Vec<String> {
    vec![
        p.rec.id.clone(),
        p.config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_usage_counts_blocks_and_inodes_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), vec![1u8; 10_000]).unwrap();
        std::fs::hard_link(d.path().join("sub/f"), d.path().join("g")).unwrap();
        let (bytes, inodes) = disk_usage(d.path());
        assert_eq!(inodes, 3); // root, sub, f (g is the same inode)
        assert!(bytes >= 10_000, "{bytes}");
        assert_eq!(disk_usage(&d.path().join("missing")), (0, 0));
    }
}
