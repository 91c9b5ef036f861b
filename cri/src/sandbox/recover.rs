//! After a restart: reconnect to every ready pod's shim and learn what happened while
//! berthd was down.

use berth_proto::shim as pb;
use berth_runtime::client::ShimClient;
use tracing::{info, warn};

use super::SandboxService;
use crate::records::{SandboxRecord, SandboxState};

impl SandboxService {
    /// Reconnects to the shims of ready pods; a shim that is gone leaves its pod NotReady
    /// (Stop and Remove still clean it up) and its containers exited. Then the
    /// containers' own exits are read.
    pub async fn recover(&self) {
        for rec in self.ctx.records.sandboxes() {
            if rec.state == SandboxState::Ready {
                self.reconnect(&rec).await;
            }
        }
        self.containers.recover().await;
    }

    async fn reconnect(&self, rec: &SandboxRecord) {
        let client = match ShimClient::connect(&self.ctx.paths.shim_socket(&rec.id)).await {
            Ok(c) => c,
            Err(e) => {
                warn!(sandbox = %rec.id, error = %e, "shim unreachable");
                self.mark_not_ready(&rec.id, "the pod's shim died");
                self.containers.reap_orphans(&rec.id).await;
                return;
            }
        };
        let info = client.connect_info().await.ok();
        let infra = info
            .as_ref()
            .and_then(|i| i.tasks.iter().find(|t| t.id == rec.id).cloned());
        match infra {
            Some(t) if t.status == pb::TaskStatus::Running as i32 => {
                info!(sandbox = %rec.id, "reconnected to shim");
            }
            Some(t) => {
                let why = format!(
                    "the infra process exited with {} while berthd was down",
                    t.exit_status
                );
                // Its containers may still run: keep following their exits.
                self.mark_not_ready(&rec.id, &why);
            }
            None => {
                self.mark_not_ready(&rec.id, "the shim no longer knows the infra process");
                return;
            }
        }
        self.watch(&rec.id, client.clone()).await;
        self.ctx.shims.insert(&rec.id, client).await;
    }
}
