//! The CRI services over one shared context, opened together at start.

use std::sync::Arc;

use crate::config::Config;
use crate::container::ContainerService;
use crate::context::Context;
use crate::records::RecordStore;
use crate::sandbox::SandboxService;
use crate::stats::StatsService;
use crate::streaming::StreamingService;
use crate::systemd::Systemd;

/// Every service of berthd's CRI RuntimeService.
pub struct Services {
    /// What they share.
    pub ctx: Arc<Context>,
    /// Pod sandboxes.
    pub sandboxes: SandboxService,
    /// Containers.
    pub containers: ContainerService,
    /// Stats and metrics.
    pub stats: StatsService,
    /// Exec, Attach and PortForward URLs.
    pub streaming: StreamingService,
}

impl Services {
    /// Opens the services: reconnects to the shims of ready pods, learns what exited
    /// while berthd was down, then frees what a crash left without a record.
    pub async fn open(
        cfg: Config,
        records: Arc<RecordStore>,
        images: Arc<berth_image::ImageService>,
        systemd: Option<Arc<Systemd>>,
    ) -> Arc<Services> {
        let ctx = Arc::new(Context::new(cfg, records, images, systemd).await);
        let containers = ContainerService::new(ctx.clone());
        let sandboxes = SandboxService::new(ctx.clone(), containers.clone());
        sandboxes.recover().await;
        crate::sweep::sweep(&ctx, &containers).await;
        crate::podscope::sweep(&ctx).await;
        Arc::new(Services {
            stats: StatsService::new(ctx.clone(), containers.clone()),
            streaming: StreamingService::new(containers.clone()),
            sandboxes,
            containers,
            ctx,
        })
    }
}
