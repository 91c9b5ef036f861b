//! CRI ImageService: validates requests and answers them from `berth_image`.

use crate::events::Event;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use berth_image::{Credentials, ImageRecord};
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    AuthConfig, FilesystemIdentifier, FilesystemUsage, Image, ImageFsInfoRequest,
    ImageFsInfoResponse, ImageSpec, ImageStatusRequest, ImageStatusResponse, Int64Value,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse, UInt64Value,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::error::CriError;
use crate::status::{from_image_error, invalid_field};

/// The CRI image service.
pub struct CriImageService {
    images: Arc<berth_image::ImageService>,
    containers: Option<crate::container::ContainerService>,
}

/// A pull as berth does it for CRI and for its own API: `/images/create` (or `update`
/// when the name moved to another image) on `events`, the heap trimmed after.
pub async fn pull_and_publish(
    images: &Arc<berth_image::ImageService>,
    ctx: Option<&crate::context::Context>,
    name: &str,
    creds: Credentials,
    server: Option<&str>,
    progress: Option<berth_image::ProgressSink>,
) -> Result<berth_image::ImageRecord, berth_image::ImageError> {
    let before = images.resolve(name).ok().flatten().map(|r| r.id);
    let started = std::time::Instant::now();
    let result = images
        .pull_with_progress(name, creds, server, progress)
        .await;
    if let Some(ctx) = ctx {
        let bytes = result
            .as_ref()
            .map(|r| r.layers.iter().map(|l| l.size).sum());
        ctx.metrics.pulled(started.elapsed(), bytes.map_err(|_| ()));
    }
    // A pull frees tens of MiB of buffers that glibc would otherwise keep; give them
    // back so an idle berthd stays small.
    match ctx {
        Some(ctx) => ctx.heap.after_burst(),
        None => drop(tokio::task::spawn_blocking(crate::heap::trim_now)),
    }
    let rec = result?;
    // The name as stored (`docker.io/library/busybox:1`), not as typed.
    let name =
        berth_image::ImageRef::parse(name).map_or_else(|_| name.to_string(), |r| r.canonical());
    let labels = Default::default();
    let event = match before {
        None => Some(Event::ImageCreate { name, labels }),
        Some(id) if id != rec.id => Some(Event::ImageUpdate { name, labels }),
        Some(_) => None,
    };
    if let (Some(ctx), Some(event)) = (ctx, event) {
        ctx.events.publish("", event);
    }
    Ok(rec)
}

impl CriImageService {
    /// An image event, where berthd's services are there to carry it.
    fn publish(&self, event: Event) {
        if let Some(c) = &self.containers {
            c.context().events.publish("", event);
        }
    }

    /// Serves CRI image calls from `images`.
    pub fn new(
        images: Arc<berth_image::ImageService>,
        containers: Option<crate::container::ContainerService>,
    ) -> Self {
        CriImageService { images, containers }
    }

    fn to_cri(&self, rec: &ImageRecord) -> Image {
        let (uid, username) = user_of(&rec.user);
        Image {
            id: rec.id.to_string(),
            repo_tags: rec.repo_tags.clone(),
            repo_digests: rec.repo_digests.clone(),
            size: rec.size(),
            uid: uid.map(|value| Int64Value { value }),
            username,
            spec: Some(ImageSpec {
                image: rec.id.to_string(),
                ..Default::default()
            }),
            pinned: self.images.is_pinned(rec),
        }
    }
}

/// The image spec's reference, required and non-empty.
fn required_image<'a>(spec: &'a Option<ImageSpec>, field: &str) -> Result<&'a str, Status> {
    // Only blank is "missing"; anything else goes to the reference rules as it is.
    match spec.as_ref().map(|s| s.image.as_str()) {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(invalid_field(field, "an image reference is required")),
    }
}

/// Splits an image config's `User` into a numeric uid or a user name, as CRI reports them.
fn user_of(user: &str) -> (Option<i64>, String) {
    let name = user.split(':').next().unwrap_or("");
    if name.is_empty() {
        return (None, String::new());
    }
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, name.to_string()),
    }
}

/// Registry credentials from the request's `auth`.
fn credentials(auth: Option<AuthConfig>) -> Result<Credentials, Status> {
    let Some(a) = auth else {
        return Ok(Credentials::Anonymous);
    };
    if !a.registry_token.is_empty() {
        return Ok(Credentials::Bearer(a.registry_token));
    }
    if !a.identity_token.is_empty() {
        return Ok(Credentials::IdentityToken(a.identity_token));
    }
    if !a.username.is_empty() {
        return Ok(Credentials::Basic {
            username: a.username,
            password: a.password,
        });
    }
    if !a.auth.is_empty() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .map_err(|e| invalid_field("auth.auth", &format!("not valid base64: {e}")))?;
        let text =
            String::from_utf8(raw).map_err(|_| invalid_field("auth.auth", "not valid UTF-8"))?;
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| invalid_field("auth.auth", "must be base64 of \"username:password\""))?;
        return Ok(Credentials::Basic {
            username: u.to_string(),
            password: p.to_string(),
        });
    }
    Ok(Credentials::Anonymous)
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl ImageService for CriImageService {
    #[instrument(skip_all)]
    async fn list_images(
        &self,
        req: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let filter = req
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .filter(|s| !s.image.trim().is_empty());
        let images = match filter {
            Some(spec) => self
                .images
                .resolve(&spec.image)
                .map_err(from_image_error)?
                .iter()
                .map(|r| self.to_cri(r))
                .collect(),
            None => self.images.list().iter().map(|r| self.to_cri(r)).collect(),
        };
        Ok(Response::new(ListImagesResponse { images }))
    }

    #[instrument(skip_all, fields(image))]
    async fn image_status(
        &self,
        req: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let name = required_image(&req.image, "image.image")?;
        tracing::Span::current().record("image", name);
        let Some(rec) = self.images.resolve(name).map_err(from_image_error)? else {
            return Ok(Response::new(ImageStatusResponse::default()));
        };
        let mut info = HashMap::new();
        if req.verbose {
            let config = self.images.image_config(&rec).map_err(from_image_error)?;
            let layers: Vec<_> = rec
                .layers
                .iter()
                .zip(self.images.layer_paths(&rec).map_err(from_image_error)?)
                .map(|(l, p)| serde_json::json!({"digest": l.digest, "diffID": l.diff_id, "chainID": l.chain_id, "snapshot": p}))
                .collect();
            let v = serde_json::json!({
                "imageSpec": config,
                "manifestDigest": rec.manifest_digest,
                "indexDigest": rec.index_digest,
                "chainID": rec.layers.last().map(|l| l.chain_id.to_string()),
                "layers": layers,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(Response::new(ImageStatusResponse {
            image: Some(self.to_cri(&rec)),
            info,
        }))
    }

    #[instrument(skip_all, fields(image))]
    async fn pull_image(
        &self,
        req: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let req = req.into_inner();
        let name = required_image(&req.image, "image.image")?.to_string();
        tracing::Span::current().record("image", name.as_str());
        let server = req.auth.as_ref().map(|a| a.server_address.clone());
        let creds = credentials(req.auth)?;
        let ctx = self.containers.as_ref().map(|c| c.context().as_ref());
        let rec = pull_and_publish(&self.images, ctx, &name, creds, server.as_deref(), None)
            .await
            .map_err(from_image_error)?;
        Ok(Response::new(PullImageResponse {
            image_ref: rec.id.to_string(),
        }))
    }

    #[instrument(skip_all, fields(image))]
    async fn remove_image(
        &self,
        req: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let req = req.into_inner();
        let name = required_image(&req.image, "image.image")?.to_string();
        tracing::Span::current().record("image", name.as_str());
        // Its snapshots are the lower layers of any container made from it.
        if let (Some(containers), Some(rec)) = (
            &self.containers,
            self.images.resolve(&name).map_err(from_image_error)?,
        ) {
            if let Some(user) = containers.using_image(rec.id.as_str()) {
                return Err(CriError::FailedPrecondition(format!(
                    "image {name} is in use by container {user}; remove the container first"
                ))
                .into());
            }
        }
        // Every name the image had goes with it: one `/images/delete` each.
        let names = match self.images.resolve(&name).map_err(from_image_error)? {
            Some(rec) => rec
                .repo_tags
                .iter()
                .chain(&rec.repo_digests)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let images = self.images.clone();
        let removed = tokio::task::spawn_blocking(move || images.remove(&name))
            .await
            .map_err(CriError::from)?
            .map_err(from_image_error)?;
        if removed {
            for name in names {
                self.publish(Event::ImageDelete { name });
            }
        }
        Ok(Response::new(RemoveImageResponse {}))
    }

    #[instrument(skip_all)]
    async fn image_fs_info(
        &self,
        _req: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let u = self.images.fs_usage();
        let fs = FilesystemUsage {
            timestamp: now_nanos(),
            fs_id: Some(FilesystemIdentifier {
                mountpoint: self.images.snapshots_dir().display().to_string(),
            }),
            used_bytes: Some(UInt64Value {
                value: u.used_bytes,
            }),
            inodes_used: Some(UInt64Value {
                value: u.inodes_used,
            }),
        };
        Ok(Response::new(ImageFsInfoResponse {
            image_filesystems: vec![fs],
            container_filesystems: vec![],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_field_splits_uid_and_name() {
        assert_eq!(user_of(""), (None, String::new()));
        assert_eq!(user_of("1234"), (Some(1234), String::new()));
        assert_eq!(user_of("1234:5678"), (Some(1234), String::new()));
        assert_eq!(user_of("nobody:nogroup"), (None, "nobody".to_string()));
    }

    #[test]
    fn credentials_from_auth() {
        let a = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("u:p:x"),
            ..Default::default()
        };
        match credentials(Some(a)).unwrap() {
            Credentials::Basic { username, password } => {
                assert_eq!((username.as_str(), password.as_str()), ("u", "p:x"))
            }
            other => panic!("{other:?}"),
        }
        let bad = AuthConfig {
            auth: "%%%".into(),
            ..Default::default()
        };
        assert!(
            credentials(Some(bad))
                .unwrap_err()
                .message()
                .contains("auth.auth")
        );
    }
}
