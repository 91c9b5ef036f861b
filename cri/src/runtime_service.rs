//! CRI RuntimeService: the gRPC surface, a thin dispatch to the services. Each call runs
//! in a tracing span with its pod or container id.

use std::collections::HashMap;
use std::pin::Pin;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use std::sync::Arc;

use crate::config::{CgroupDriver, Config};
use crate::error::CriError;
use crate::services::Services;

/// The CRI API version berth serves.
pub const RUNTIME_API_VERSION: &str = "v1";

/// The CRI runtime service.
pub struct CriRuntimeService {
    config: Config,
    svc: Arc<Services>,
}

impl CriRuntimeService {
    /// Runs a reader of cgroup and proc files off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Services) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let svc = self.svc.clone();
        tokio::task::spawn_blocking(move || f(&svc))
            .await
            .map_err(|e| CriError::from(e).into())
    }

    /// Serves runtime calls with the effective `config`.
    pub fn new(config: Config, svc: Arc<Services>) -> Self {
        CriRuntimeService { config, svc }
    }
}

fn not_yet(rpc: &str, capability: &str) -> Status {
    CriError::Unimplemented(format!("{rpc}: berth does not implement {capability} yet")).into()
}

fn condition(kind: &str, ok: bool, reason: &str, message: &str) -> cri::RuntimeCondition {
    cri::RuntimeCondition {
        r#type: kind.into(),
        status: ok,
        reason: reason.into(),
        message: message.into(),
    }
}

#[tonic::async_trait]
impl RuntimeService for CriRuntimeService {
    type GetContainerEventsStream = Pin<
        Box<
            dyn tokio_stream::Stream<Item = Result<cri::ContainerEventResponse, Status>>
                + Send
                + 'static,
        >,
    >;

    #[instrument(skip_all)]
    async fn version(
        &self,
        _req: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "berth".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: RUNTIME_API_VERSION.into(),
        }))
    }

    #[instrument(skip_all)]
    async fn status(
        &self,
        req: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let network = match self.svc.ctx.net.status().await {
            Ok(()) => condition("NetworkReady", true, "", ""),
            Err(e) => condition(
                "NetworkReady",
                false,
                "NetworkPluginNotReady",
                &format!("berth: the CNI network is not ready: {e}"),
            ),
        };
        let conditions = vec![condition("RuntimeReady", true, "", ""), network];
        let mut info = HashMap::new();
        if req.into_inner().verbose {
            let cfg = serde_json::to_string(&self.config)
                .map_err(|e| CriError::internal("encoding the config", e))?;
            info.insert("config".to_string(), cfg);
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers: self.svc.ctx.handlers.to_cri(),
            // Merge/Strict are applied and ContainerStatus.user reports the result.
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: true,
            }),
        }))
    }

    #[instrument(skip_all)]
    async fn runtime_config(
        &self,
        _req: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        let driver = match self.config.cgroup_driver {
            CgroupDriver::Systemd => cri::CgroupDriver::Systemd,
            CgroupDriver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
        };
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: driver as i32,
            }),
        }))
    }

    #[instrument(skip_all)]
    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let id = self.svc.sandboxes.run(req.into_inner()).await?;
        tracing::info!(sandbox = %id, "RunPodSandbox");
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }
    #[instrument(skip_all, fields(sandbox = %req.get_ref().pod_sandbox_id))]
    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        self.svc
            .sandboxes
            .stop(&req.into_inner().pod_sandbox_id)
            .await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }
    #[instrument(skip_all, fields(sandbox = %req.get_ref().pod_sandbox_id))]
    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        self.svc
            .sandboxes
            .remove(&req.into_inner().pod_sandbox_id)
            .await?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }
    #[instrument(skip_all, fields(sandbox = %req.get_ref().pod_sandbox_id))]
    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.svc.sandboxes.status(&r.pod_sandbox_id, r.verbose)?,
        ))
    }
    #[instrument(skip_all)]
    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        Ok(Response::new(cri::ListPodSandboxResponse {
            items: self.svc.sandboxes.list(req.into_inner().filter),
        }))
    }
    #[instrument(skip_all, fields(sandbox = %req.get_ref().pod_sandbox_id))]
    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let id = self.svc.containers.create(req.into_inner()).await?;
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }
    #[instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        self.svc
            .containers
            .start(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }
    #[instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let r = req.into_inner();
        self.svc.containers.stop(&r.container_id, r.timeout).await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }
    #[instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        self.svc
            .containers
            .remove(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }
    #[instrument(skip_all)]
    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        Ok(Response::new(cri::ListContainersResponse {
            containers: self.svc.containers.list(req.into_inner().filter),
        }))
    }
    #[instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.svc.containers.status(&r.container_id, r.verbose)?,
        ))
    }
    #[instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        self.svc
            .containers
            .update_resources(req.into_inner())
            .await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }
    #[instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        self.svc
            .containers
            .reopen_log(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }
    #[instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        Ok(Response::new(
            self.svc.containers.exec_sync(req.into_inner()).await?,
        ))
    }
    #[instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn exec(
        &self,
        req: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let url = self.svc.streaming.exec_url(req.into_inner())?;
        Ok(Response::new(cri::ExecResponse { url }))
    }
    #[instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn attach(
        &self,
        req: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let url = self.svc.streaming.attach_url(req.into_inner())?;
        Ok(Response::new(cri::AttachResponse { url }))
    }
    #[instrument(skip_all, fields(sandbox = %req.get_ref().pod_sandbox_id))]
    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let url = self.svc.streaming.port_forward_url(req.into_inner())?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }
    #[instrument(skip_all, fields(container = %req.get_ref().container_id))]
    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let id = req.into_inner().container_id;
        let stats = self
            .blocking(move |p| p.stats.container_stats(&id))
            .await??;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats),
        }))
    }
    #[instrument(skip_all)]
    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let filter = req.into_inner().filter;
        let stats = self
            .blocking(move |p| p.stats.list_container_stats(filter))
            .await?;
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }
    #[instrument(skip_all, fields(sandbox = %req.get_ref().pod_sandbox_id))]
    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let id = req.into_inner().pod_sandbox_id;
        let stats = self
            .blocking(move |p| p.stats.pod_sandbox_stats(&id))
            .await??;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }
    #[instrument(skip_all)]
    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let filter = req.into_inner().filter;
        let stats = self
            .blocking(move |p| p.stats.list_pod_sandbox_stats(filter))
            .await?;
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }
    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let cidr = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        self.svc
            .ctx
            .net
            .set_pod_cidr(&cidr)
            .map_err(CriError::from)?;
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }
    async fn checkpoint_container(
        &self,
        _req: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(not_yet(
            "checkpoint_container",
            "container checkpointing (CRIU)",
        ))
    }
    async fn get_container_events(
        &self,
        _req: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        let events = crate::container_events::stream(self.svc.clone());
        Ok(Response::new(Box::pin(events)))
    }
    async fn list_metric_descriptors(
        &self,
        _req: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(cri::ListMetricDescriptorsResponse {
            descriptors: crate::stats::metrics::descriptors(),
        }))
    }
    #[instrument(skip_all)]
    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        let pod_metrics = self
            .blocking(|p| p.stats.list_pod_sandbox_metrics())
            .await?;
        Ok(Response::new(cri::ListPodSandboxMetricsResponse {
            pod_metrics,
        }))
    }
}
