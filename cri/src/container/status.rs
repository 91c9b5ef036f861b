//! ContainerStatus and ListContainers, from the records.

use std::collections::HashMap;

use k8s_cri::v1 as cri;

use super::ContainerService;
use crate::error::Result;
use crate::records::{ContainerRecord, ContainerState};

/// A record's CRI state.
pub fn cri_state(rec: &ContainerRecord) -> i32 {
    match rec.state {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
    }
}

fn image_spec(rec: &ContainerRecord) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: rec.image.clone(),
        ..Default::default()
    })
}

impl ContainerService {
    /// ContainerStatus.
    pub fn status(&self, id: &str, verbose: bool) -> Result<cri::ContainerStatusResponse> {
        let rec = self.ctx.container(id, "container_id")?;
        let config = &rec.config;
        let status = cri::ContainerStatus {
            id: rec.id.clone(),
            metadata: config.metadata.clone(),
            state: cri_state(&rec),
            created_at: rec.created_at,
            started_at: rec.started_at,
            finished_at: rec.finished_at,
            exit_code: rec.exit_code,
            image: image_spec(&rec),
            image_ref: rec.image_ref.clone(),
            image_id: rec.image_id.clone(),
            reason: rec.reason.clone(),
            message: rec.message.clone(),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            mounts: config.mounts.clone(),
            log_path: rec.log_path.clone(),
            resources: config
                .linux
                .as_ref()
                .and_then(|l| l.resources.clone())
                .map(|r| cri::ContainerResources {
                    linux: Some(r),
                    ..Default::default()
                }),
            user: rec.user.as_ref().map(|u| cri::ContainerUser {
                linux: Some(cri::LinuxContainerUser {
                    uid: u.uid.into(),
                    gid: u.gid.into(),
                    supplemental_groups: u.additional_gids.iter().map(|g| i64::from(*g)).collect(),
                }),
            }),
            ..Default::default()
        };
        let mut info = HashMap::new();
        if verbose {
            info.insert("info".to_string(), self.verbose_info(&rec));
        }
        Ok(cri::ContainerStatusResponse {
            status: Some(status),
            info,
        })
    }

    /// The verbose `info` JSON: pid, pod, the runtime spec as written, the CRI config.
    fn verbose_info(&self, rec: &ContainerRecord) -> String {
        // The bundle as the runtime reads it, whatever it holds (free-form here).
        let spec: serde_json::Value =
            std::fs::read(self.ctx.paths.bundle_dir(&rec.id).join("config.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "pid": rec.pid,
            "sandboxID": rec.sandbox_id,
            "runtimeSpec": spec,
            "config": rec.config,
        })
        .to_string()
    }

    /// ListContainers with its filters.
    pub fn list(&self, filter: Option<cri::ContainerFilter>) -> Vec<cri::Container> {
        let f = filter.unwrap_or_default();
        self.ctx
            .records
            .containers()
            .into_iter()
            .filter(|r| f.id.is_empty() || r.id.starts_with(&f.id))
            .filter(|r| f.pod_sandbox_id.is_empty() || r.sandbox_id.starts_with(&f.pod_sandbox_id))
            .filter(|r| f.state.as_ref().is_none_or(|s| s.state == cri_state(r)))
            .filter(|r| {
                f.label_selector
                    .iter()
                    .all(|(k, v)| r.config.labels.get(k) == Some(v))
            })
            .map(|r| cri::Container {
                id: r.id.clone(),
                pod_sandbox_id: r.sandbox_id.clone(),
                metadata: r.config.metadata.clone(),
                image: image_spec(&r),
                image_ref: r.image_ref.clone(),
                image_id: r.image_id.clone(),
                state: cri_state(&r),
                created_at: r.created_at,
                labels: r.config.labels.clone(),
                annotations: r.config.annotations.clone(),
            })
            .collect()
    }
}
