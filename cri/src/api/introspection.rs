//! `Introspection.Info`: what this berthd is and how it is set up.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb;
use crate::config::{CgroupDriver, Config};
use crate::services::Services;

pub(super) struct Introspection {
    pub config: Config,
    pub svc: Arc<Services>,
}

#[tonic::async_trait]
impl pb::introspection_server::Introspection for Introspection {
    async fn check(&self, _: Request<pb::Empty>) -> Result<Response<pb::CheckResponse>, Status> {
        let results = super::check::run(&self.config, &self.svc).await;
        Ok(Response::new(pb::CheckResponse { results }))
    }

    async fn info(&self, _: Request<pb::Empty>) -> Result<Response<pb::InfoResponse>, Status> {
        let cfg = &self.config;
        Ok(Response::new(pb::InfoResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            cri_socket: cfg.listen.display().to_string(),
            api_socket: cfg.api_socket().display().to_string(),
            root: cfg.root.display().to_string(),
            state: cfg.state.display().to_string(),
            cgroup_driver: match cfg.cgroup_driver {
                CgroupDriver::Systemd => "systemd",
                CgroupDriver::Cgroupfs => "cgroupfs",
            }
            .to_string(),
            cgroup_mode: match self.svc.ctx.cgroups.mode() {
                berth_cgroups::Mode::Legacy => "v1",
                berth_cgroups::Mode::Hybrid => "hybrid",
                berth_cgroups::Mode::Unified => "v2",
            }
            .to_string(),
            runtime_handlers: cfg.runtimes.keys().cloned().collect(),
            namespaces: vec![crate::events::NAMESPACE.to_string()],
            streaming_url: self.svc.streaming.base_url().unwrap_or_default(),
            pid: std::process::id(),
            event_subscribers: self.svc.ctx.events.subscribers() as u32,
        }))
    }
}
