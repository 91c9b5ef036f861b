//! CRI metrics (`ListMetricDescriptors`, `ListPodSandboxMetrics`): cAdvisor's metric
//! names, labelled `id`, `name` (+ `interface`) as containerd labels them, so kubelet
//! can serve `/metrics/cadvisor` from the runtime.

use k8s_cri::v1 as cri;

use super::{ContainerReading, PodReading, StatsService, container_labels, pod_labels};

const COUNTER: i32 = cri::MetricType::Counter as i32;
const GAUGE: i32 = cri::MetricType::Gauge as i32;

/// Every metric berth emits: name, help, whether it has the `interface` label.
const DESCRIPTORS: &[(&str, &str, bool)] = &[
    (
        "container_cpu_usage_seconds_total",
        "Cumulative CPU time consumed in seconds.",
        false,
    ),
    (
        "container_cpu_user_seconds_total",
        "Cumulative user CPU time consumed in seconds.",
        false,
    ),
    (
        "container_cpu_system_seconds_total",
        "Cumulative system CPU time consumed in seconds.",
        false,
    ),
    (
        "container_cpu_cfs_periods_total",
        "Number of elapsed enforcement period intervals.",
        false,
    ),
    (
        "container_cpu_cfs_throttled_periods_total",
        "Number of throttled period intervals.",
        false,
    ),
    (
        "container_cpu_cfs_throttled_seconds_total",
        "Total time duration the container has been throttled.",
        false,
    ),
    (
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed.",
        false,
    ),
    (
        "container_memory_working_set_bytes",
        "Current working set in bytes.",
        false,
    ),
    ("container_memory_rss", "Size of RSS in bytes.", false),
    (
        "container_memory_cache",
        "Number of bytes of page cache memory.",
        false,
    ),
    (
        "container_memory_mapped_file",
        "Size of memory mapped files in bytes.",
        false,
    ),
    (
        "container_memory_swap",
        "Container swap usage in bytes.",
        false,
    ),
    (
        "container_memory_failcnt",
        "Number of memory usage hits limits.",
        false,
    ),
    (
        "container_memory_max_usage_bytes",
        "Maximum memory usage recorded in bytes.",
        false,
    ),
    (
        "container_memory_total_active_file_bytes",
        "Current total active file in bytes.",
        false,
    ),
    (
        "container_memory_total_inactive_file_bytes",
        "Current total inactive file in bytes.",
        false,
    ),
    (
        "container_spec_memory_limit_bytes",
        "Memory limit for the container.",
        false,
    ),
    (
        "container_oom_events_total",
        "Count of out of memory events observed for the container.",
        false,
    ),
    (
        "container_processes",
        "Number of processes running inside the container.",
        false,
    ),
    (
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds.",
        false,
    ),
    (
        "container_last_seen",
        "Last time a container was seen by the exporter.",
        false,
    ),
    (
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received.",
        true,
    ),
    (
        "container_network_receive_packets_total",
        "Cumulative count of packets received.",
        true,
    ),
    (
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving.",
        true,
    ),
    (
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving.",
        true,
    ),
    (
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted.",
        true,
    ),
    (
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted.",
        true,
    ),
    (
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting.",
        true,
    ),
    (
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting.",
        true,
    ),
];

/// The descriptors, with their label keys.
pub fn descriptors() -> Vec<cri::MetricDescriptor> {
    DESCRIPTORS
        .iter()
        .map(|(name, help, iface)| {
            let mut label_keys = vec!["id".to_string(), "name".to_string()];
            if *iface {
                label_keys.push("interface".into());
            }
            cri::MetricDescriptor {
                name: name.to_string(),
                help: help.to_string(),
                label_keys,
            }
        })
        .collect()
}

fn metric(name: &str, kind: i32, labels: &[String], value: u64) -> cri::Metric {
    cri::Metric {
        name: name.to_string(),
        timestamp: 0, // read live
        metric_type: kind,
        label_values: labels.to_vec(),
        value: Some(cri::UInt64Value { value }),
    }
}

/// Seconds are reported as whole numbers by the CRI's integer values; CPU seconds
/// are therefore nanoseconds / 1e9 rounded down, as the field type allows.
fn secs(ns: u64) -> u64 {
    ns / 1_000_000_000
}

fn container_metrics(r: &ContainerReading) -> cri::ContainerMetrics {
    let l = container_labels(r);
    let mut m = vec![
        metric(
            "container_start_time_seconds",
            GAUGE,
            &l,
            (r.rec.started_at.max(0) as u64) / 1_000_000_000,
        ),
        metric(
            "container_last_seen",
            GAUGE,
            &l,
            (r.at.max(0) as u64) / 1_000_000_000,
        ),
    ];
    if let Some(st) = &r.cgroup {
        if let Some(c) = st.cpu {
            m.push(metric(
                "container_cpu_usage_seconds_total",
                COUNTER,
                &l,
                secs(c.usage_ns),
            ));
            m.push(metric(
                "container_cpu_user_seconds_total",
                COUNTER,
                &l,
                secs(c.user_ns),
            ));
            m.push(metric(
                "container_cpu_system_seconds_total",
                COUNTER,
                &l,
                secs(c.system_ns),
            ));
            m.push(metric(
                "container_cpu_cfs_periods_total",
                COUNTER,
                &l,
                c.periods,
            ));
            m.push(metric(
                "container_cpu_cfs_throttled_periods_total",
                COUNTER,
                &l,
                c.throttled_periods,
            ));
            m.push(metric(
                "container_cpu_cfs_throttled_seconds_total",
                COUNTER,
                &l,
                secs(c.throttled_ns),
            ));
        }
        if let Some(mem) = st.memory {
            for (name, v) in [
                ("container_memory_usage_bytes", mem.usage),
                ("container_memory_working_set_bytes", mem.working_set()),
                ("container_memory_rss", mem.rss),
                ("container_memory_cache", mem.cache),
                ("container_memory_mapped_file", mem.mapped_file),
                ("container_memory_swap", mem.swap_usage.unwrap_or(0)),
                ("container_memory_max_usage_bytes", mem.max_usage),
                ("container_memory_total_active_file_bytes", mem.active_file),
                (
                    "container_memory_total_inactive_file_bytes",
                    mem.inactive_file,
                ),
                ("container_spec_memory_limit_bytes", mem.limit.unwrap_or(0)),
            ] {
                m.push(metric(name, GAUGE, &l, v));
            }
            m.push(metric("container_memory_failcnt", COUNTER, &l, mem.failcnt));
        }
        if let Some(n) = st.oom_kills {
            m.push(metric("container_oom_events_total", COUNTER, &l, n));
        }
        if let Some(n) = st.pids {
            m.push(metric("container_processes", GAUGE, &l, n));
        }
    }
    cri::ContainerMetrics {
        container_id: r.rec.id.clone(),
        metrics: m,
    }
}

fn pod_metrics(p: &PodReading) -> cri::PodSandboxMetrics {
    let base = pod_labels(p);
    let mut m = Vec::new();
    for i in p.interfaces.iter().flatten().filter(|i| i.name != "lo") {
        let mut l = base.clone();
        l.push(i.name.clone());
        for (name, v) in [
            ("container_network_receive_bytes_total", i.rx_bytes),
            ("container_network_receive_packets_total", i.rx_packets),
            (
                "container_network_receive_packets_dropped_total",
                i.rx_dropped,
            ),
            ("container_network_receive_errors_total", i.rx_errors),
            ("container_network_transmit_bytes_total", i.tx_bytes),
            ("container_network_transmit_packets_total", i.tx_packets),
            (
                "container_network_transmit_packets_dropped_total",
                i.tx_dropped,
            ),
            ("container_network_transmit_errors_total", i.tx_errors),
        ] {
            m.push(metric(name, COUNTER, &l, v));
        }
    }
    if let Some(u) = p.cpu_ns {
        m.push(metric(
            "container_cpu_usage_seconds_total",
            COUNTER,
            &base,
            secs(u),
        ));
    }
    if let Some(mem) = p.memory {
        m.push(metric(
            "container_memory_usage_bytes",
            GAUGE,
            &base,
            mem.usage,
        ));
        m.push(metric(
            "container_memory_working_set_bytes",
            GAUGE,
            &base,
            mem.working_set(),
        ));
        m.push(metric("container_memory_rss", GAUGE, &base, mem.rss));
    }
    if let Some(n) = p.pids {
        m.push(metric("container_processes", GAUGE, &base, n));
    }
    cri::PodSandboxMetrics {
        pod_sandbox_id: p.rec.id.clone(),
        metrics: m,
        container_metrics: p.containers.iter().map(container_metrics).collect(),
    }
}

impl StatsService {
    /// ListPodSandboxMetrics: every ready pod and its running containers.
    pub fn list_pod_sandbox_metrics(&self) -> Vec<cri::PodSandboxMetrics> {
        self.filtered_pods(&cri::PodSandboxStatsFilter::default())
            .iter()
            .map(pod_metrics)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_unique_and_named_as_cadvisor() {
        let d = descriptors();
        let mut names: Vec<_> = d.iter().map(|d| d.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), d.len());
        for want in [
            "container_cpu_usage_seconds_total",
            "container_memory_working_set_bytes",
            "container_memory_rss",
            "container_network_receive_bytes_total",
        ] {
            assert!(names.contains(&want), "{want}");
        }
        let net = d
            .iter()
            .find(|d| d.name == "container_network_receive_bytes_total")
            .unwrap();
        assert_eq!(net.label_keys, ["id", "name", "interface"]);
    }

    #[test]
    fn every_emitted_metric_has_a_descriptor() {
        use crate::records::{ContainerRecord, ContainerState};
        use berth_cgroups::{CgroupStats, CpuStats, MemoryStats};
        let rec = ContainerRecord {
            id: "c1".into(),
            sandbox_id: "p1".into(),
            key: "k".into(),
            state: ContainerState::Running,
            created_at: 1,
            started_at: 2_000_000_000,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            image: "i".into(),
            image_id: String::new(),
            image_ref: String::new(),
            log_path: String::new(),
            pid: 1,
            stop_signal: 15,
            config: cri::ContainerConfig::default(),
            cgroups_path: String::new(),
            user: None,
        };
        assert_eq!(rec.state, ContainerState::Running);
        let r = ContainerReading {
            rec,
            config: cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "web".into(),
                    attempt: 0,
                }),
                ..Default::default()
            },
            at: 5_000_000_000,
            cgroup: Some(CgroupStats {
                cpu: Some(CpuStats {
                    usage_ns: 3_500_000_000,
                    ..Default::default()
                }),
                memory: Some(MemoryStats {
                    usage: 100,
                    inactive_file: 40,
                    limit: Some(1000),
                    ..Default::default()
                }),
                pids: Some(2),
                oom_kills: Some(1),
            }),
            nano_cores: Some(5),
        };
        let cm = container_metrics(&r);
        let names: Vec<_> = descriptors().into_iter().map(|d| d.name).collect();
        for m in &cm.metrics {
            assert!(names.contains(&m.name), "{} has no descriptor", m.name);
            assert_eq!(m.label_values, ["c1", "web"]);
        }
        let get = |n: &str| {
            cm.metrics
                .iter()
                .find(|m| m.name == n)
                .unwrap()
                .value
                .unwrap()
                .value
        };
        assert_eq!(get("container_cpu_usage_seconds_total"), 3);
        assert_eq!(get("container_memory_working_set_bytes"), 60);
        assert_eq!(get("container_oom_events_total"), 1);
        assert_eq!(get("container_start_time_seconds"), 2);
    }
}
