//! `Sandboxes`, `Containers` and `Images`: the records as an operator lists them,
//! selected with containerd's filters over each object's fields.

use std::collections::HashMap;
use std::sync::Arc;

use berth_proto::shim as shimpb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{filters, pb};
use crate::events::Fields;
use crate::records::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};
use crate::services::Services;

#[derive(Clone)]
pub(super) struct Objects {
    pub svc: Arc<Services>,
}

/// A map field (`labels.<key>`) or a plain one, for the adaptors below.
fn keyed(map: &HashMap<String, String>, path: &[String]) -> Option<String> {
    match path {
        [key] => map.get(key).cloned(),
        _ => None,
    }
}

impl Fields for pb::Sandbox {
    fn field(&self, path: &[String]) -> Option<String> {
        let (first, rest) = path.split_first()?;
        let one = |v: &str| rest.is_empty().then(|| v.to_string());
        match first.as_str() {
            "id" => one(&self.id),
            "name" => one(&self.name),
            "namespace" => one(&self.namespace),
            "uid" => one(&self.uid),
            "state" => one(&self.state),
            "runtime_handler" => one(&self.runtime_handler),
            "ip" => self.ips.first().and_then(|ip| one(ip)),
            "labels" => keyed(&self.labels, rest),
            "annotations" => keyed(&self.annotations, rest),
            _ => None,
        }
    }
}

impl Fields for pb::Container {
    fn field(&self, path: &[String]) -> Option<String> {
        let (first, rest) = path.split_first()?;
        let one = |v: &str| rest.is_empty().then(|| v.to_string());
        match first.as_str() {
            "id" => one(&self.id),
            "name" => one(&self.name),
            "sandbox_id" => one(&self.sandbox_id),
            "image" => one(&self.image),
            "state" => one(&self.state),
            "labels" => keyed(&self.labels, rest),
            "annotations" => keyed(&self.annotations, rest),
            _ => None,
        }
    }
}

/// An image seen under one of its names.
struct NamedImage<'a>(&'a pb::Image, Option<&'a str>);

impl Fields for NamedImage<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "id" => Some(self.0.id.clone()),
            [f] if f == "name" => self.1.map(str::to_string),
            [f] if f == "size" => Some(self.0.size.to_string()),
            _ => None,
        }
    }
}

pub(super) fn sandbox(rec: &SandboxRecord) -> pb::Sandbox {
    let meta = rec.config.metadata.clone().unwrap_or_default();
    pb::Sandbox {
        id: rec.id.clone(),
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        state: match rec.state {
            SandboxState::Ready => "ready",
            SandboxState::NotReady => "notready",
        }
        .to_string(),
        created_at: rec.created_at,
        ips: rec.ips.clone(),
        labels: rec.config.labels.clone().into_iter().collect(),
        annotations: rec.config.annotations.clone().into_iter().collect(),
        runtime_handler: rec.runtime_handler.clone(),
        infra_pid: rec.infra_pid,
    }
}

/// Every task's state as its pod's shim reports it, by task id.
pub(super) async fn shim_states(svc: &Services) -> HashMap<String, shimpb::StateResponse> {
    let mut out = HashMap::new();
    for (_, shim) in svc.ctx.shims.all().await {
        if let Ok(info) = shim.connect_info().await {
            out.extend(info.tasks.into_iter().map(|t| (t.id.clone(), t)));
        }
    }
    out
}

pub(super) fn container(
    rec: &ContainerRecord,
    shim: Option<&shimpb::StateResponse>,
) -> pb::Container {
    let meta = rec.config.metadata.clone().unwrap_or_default();
    let paused = shim.is_some_and(|s| s.status == shimpb::TaskStatus::Paused as i32);
    pb::Container {
        id: rec.id.clone(),
        name: meta.name,
        attempt: meta.attempt,
        sandbox_id: rec.sandbox_id.clone(),
        image: rec.image.clone(),
        image_id: rec.image_id.clone(),
        state: match rec.state {
            ContainerState::Created => "created",
            ContainerState::Running if paused => "paused",
            ContainerState::Running => "running",
            ContainerState::Exited => "exited",
        }
        .to_string(),
        created_at: rec.created_at,
        started_at: rec.started_at,
        finished_at: rec.finished_at,
        exit_code: rec.exit_code,
        reason: rec.reason.clone(),
        pid: rec.pid,
        log_path: rec.log_path.clone(),
        labels: rec.config.labels.clone().into_iter().collect(),
        annotations: rec.config.annotations.clone().into_iter().collect(),
    }
}

#[tonic::async_trait]
impl pb::sandboxes_server::Sandboxes for Objects {
    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let filter = filters("filters", &req.into_inner().filters)?;
        let mut sandboxes: Vec<pb::Sandbox> = self
            .svc
            .ctx
            .records
            .sandboxes()
            .iter()
            .map(sandbox)
            .filter(|s| filter.matches(s))
            .collect();
        sandboxes.sort_by_key(|s| s.created_at);
        Ok(Response::new(pb::ListSandboxesResponse { sandboxes }))
    }
}

#[tonic::async_trait]
impl pb::containers_server::Containers for Objects {
    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let filter = filters("filters", &req.into_inner().filters)?;
        let states = shim_states(&self.svc).await;
        let mut containers: Vec<pb::Container> = self
            .svc
            .ctx
            .records
            .containers()
            .iter()
            .map(|r| container(r, states.get(&r.id)))
            .filter(|c| filter.matches(c))
            .collect();
        containers.sort_by_key(|c| c.created_at);
        Ok(Response::new(pb::ListContainersResponse { containers }))
    }

    async fn get(&self, req: Request<pb::IdRequest>) -> Result<Response<pb::Container>, Status> {
        let rec = self.svc.ctx.container(&req.into_inner().id, "id")?;
        let states = shim_states(&self.svc).await;
        Ok(Response::new(container(&rec, states.get(&rec.id))))
    }
}

/// A progress report as the API sends it.
fn progress(p: berth_image::PullProgress) -> pb::PullProgress {
    use berth_image::PullProgress as P;
    match p {
        P::Resolved { layers } => pb::PullProgress {
            layers: layers
                .into_iter()
                .map(|(digest, size)| pb::Layer { digest, size })
                .collect(),
            ..Default::default()
        },
        P::Downloading {
            digest,
            done,
            total,
        } => pb::PullProgress {
            digest,
            status: "downloading".into(),
            done,
            total,
            ..Default::default()
        },
        P::LayerDone { digest, present } => pb::PullProgress {
            digest,
            status: if present { "present" } else { "done" }.into(),
            ..Default::default()
        },
    }
}

#[tonic::async_trait]
impl pb::images_server::Images for Objects {
    type PullStream = ReceiverStream<Result<pb::PullProgress, Status>>;

    async fn pull(
        &self,
        req: Request<pb::PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let req = req.into_inner();
        if req.name.trim().is_empty() {
            return Err(crate::error::CriError::invalid("name", "must name an image").into());
        }
        let creds = match (req.username.is_empty(), req.password.is_empty()) {
            (true, true) => berth_image::Credentials::Anonymous,
            _ => berth_image::Credentials::Basic {
                username: req.username,
                password: req.password,
            },
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        // Drained at once by the forwarder below, so the pull's reports never find it
        // full.
        let (ptx, mut prx) = tokio::sync::mpsc::channel(1024);
        let mut stopping = self.svc.ctx.shutdown.subscribe();
        let svc = self.svc.clone();
        // The pull runs to its end whatever the caller does; progress is forwarded
        // while someone reads.
        let pulling = tokio::spawn(async move {
            let images = &svc.ctx.images;
            crate::image_service::pull_and_publish(
                images,
                Some(&svc.ctx),
                &req.name,
                creds,
                None,
                Some(ptx),
            )
            .await
        });
        // Forwards without ever waiting for the reader: when its queue is full, byte
        // counts are dropped and layer milestones wait in `held` (a few per layer).
        tokio::spawn(async move {
            let mut held = std::collections::VecDeque::new();
            loop {
                let next = tokio::select! {
                    p = prx.recv() => p,
                    _ = stopping.wait_for(|s| *s) => return,
                };
                let Some(p) = next else { break };
                let milestone = !matches!(p, berth_image::PullProgress::Downloading { .. });
                if milestone {
                    held.push_back(progress(p));
                } else if held.is_empty() {
                    let _ = tx.try_send(Ok(progress(p)));
                }
                while let Some(m) = held.pop_front() {
                    if let Err(e) = tx.try_send(Ok(m)) {
                        if let tokio::sync::mpsc::error::TrySendError::Full(Ok(m)) = e {
                            held.push_front(m);
                        }
                        break;
                    }
                }
            }
            let last = match pulling.await {
                Ok(Ok(rec)) => Ok(pb::PullProgress {
                    image_id: rec.id.to_string(),
                    ..Default::default()
                }),
                Ok(Err(e)) => Err(crate::status::from_image_error(e)),
                Err(e) => Err(Status::internal(format!("the pull task failed: {e}"))),
            };
            // The reader gets what is held, then the end, or goes away; the pull is
            // finished either way.
            let finish = async {
                for m in held {
                    tx.send(Ok(m)).await.ok()?;
                }
                tx.send(last).await.ok()
            };
            tokio::select! {
                _ = finish => {}
                _ = stopping.wait_for(|s| *s) => {}
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let filter = filters("filters", &req.into_inner().filters)?;
        let images = self
            .svc
            .ctx
            .images
            .list()
            .iter()
            .map(|r| pb::Image {
                id: r.id.to_string(),
                names: r.repo_tags.clone(),
                digests: r.repo_digests.clone(),
                size: r.size(),
            })
            .filter(|img| {
                let names = img
                    .names
                    .iter()
                    .chain(&img.digests)
                    .map(|n| Some(n.as_str()));
                let mut views = names.chain(std::iter::once(None));
                views.any(|n| filter.matches(&NamedImage(img, n)))
            })
            .collect();
        Ok(Response::new(pb::ListImagesResponse { images }))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveImageRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let name = req.into_inner().name;
        let cri = crate::image_service::CriImageService::new(
            self.svc.ctx.images.clone(),
            Some(self.svc.containers.clone()),
        );
        use k8s_cri::v1::image_service_server::ImageService as _;
        let spec = k8s_cri::v1::ImageSpec {
            image: name,
            ..Default::default()
        };
        cri.remove_image(Request::new(k8s_cri::v1::RemoveImageRequest {
            image: Some(spec),
        }))
        .await?;
        Ok(Response::new(pb::Empty {}))
    }
}
