//! PodSandboxStatus and ListPodSandbox, from the records.

use std::collections::HashMap;

use berth_runtime::timefmt::now_unix_nanos;
use k8s_cri::v1 as cri;

use super::SandboxService;
use crate::error::Result;
use crate::records::{SandboxRecord, SandboxState};

/// A record's CRI state.
pub fn cri_state(rec: &SandboxRecord) -> i32 {
    match rec.state {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady as i32,
        SandboxState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

impl SandboxService {
    /// PodSandboxStatus.
    pub fn status(&self, id: &str, verbose: bool) -> Result<cri::PodSandboxStatusResponse> {
        let rec = self.ctx.sandbox(id, "pod_sandbox_id")?;
        let config = &rec.config;
        let ns = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        let status = cri::PodSandboxStatus {
            id: rec.id.clone(),
            metadata: config.metadata.clone(),
            state: cri_state(&rec),
            created_at: rec.created_at,
            network: Some(cri::PodSandboxNetworkStatus {
                ip: rec.ips.first().cloned().unwrap_or_default(),
                additional_ips: rec
                    .ips
                    .iter()
                    .skip(1)
                    .map(|ip| cri::PodIp { ip: ip.clone() })
                    .collect(),
            }),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace { options: ns }),
            }),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            runtime_handler: rec.runtime_handler.clone(),
        };
        let mut info = HashMap::new();
        if verbose {
            let v = serde_json::json!({
                "pid": rec.infra_pid,
                "netns": rec.netns,
                "reason": rec.reason,
                "runtimeHandler": rec.runtime_handler,
                "config": rec.config,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(cri::PodSandboxStatusResponse {
            status: Some(status),
            info,
            containers_statuses: vec![],
            timestamp: now_unix_nanos(),
        })
    }

    /// ListPodSandbox with its filters (id or id prefix, state, labels).
    pub fn list(&self, filter: Option<cri::PodSandboxFilter>) -> Vec<cri::PodSandbox> {
        let f = filter.unwrap_or_default();
        self.ctx
            .records
            .sandboxes()
            .into_iter()
            .filter(|r| f.id.is_empty() || r.id.starts_with(&f.id))
            .filter(|r| f.state.as_ref().is_none_or(|s| s.state == cri_state(r)))
            .filter(|r| {
                f.label_selector
                    .iter()
                    .all(|(k, v)| r.config.labels.get(k) == Some(v))
            })
            .map(|r| cri::PodSandbox {
                id: r.id.clone(),
                metadata: r.config.metadata.clone(),
                state: cri_state(&r),
                created_at: r.created_at,
                labels: r.config.labels.clone(),
                annotations: r.config.annotations.clone(),
                runtime_handler: r.runtime_handler.clone(),
            })
            .collect()
    }
}
