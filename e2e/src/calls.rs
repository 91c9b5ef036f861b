//! The CRI calls the e2e suite and `berth-bench` both make, answering with the gRPC
//! status so that tests can check codes; and removing a test's cgroup tree.

use std::path::PathBuf;

use k8s_cri::v1 as cri;

use crate::berthd::CriClient;

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

/// PullImage; the image ref.
pub async fn pull(c: &mut CriClient, image: &str) -> Result<String, tonic::Status> {
    pull_auth(c, image, None).await
}

/// PullImage with credentials.
pub async fn pull_auth(
    c: &mut CriClient,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> Result<String, tonic::Status> {
    let req = cri::PullImageRequest {
        image: spec(image),
        auth,
        sandbox_config: None,
    };
    Ok(c.image.pull_image(req).await?.into_inner().image_ref)
}

/// RemoveImage.
pub async fn remove_image(c: &mut CriClient, image: &str) -> Result<(), tonic::Status> {
    let req = cri::RemoveImageRequest { image: spec(image) };
    c.image.remove_image(req).await.map(|_| ())
}

/// RunPodSandbox with the default handler; the pod id.
pub async fn run_pod(
    c: &mut CriClient,
    config: cri::PodSandboxConfig,
) -> Result<String, tonic::Status> {
    let r = c
        .runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await?;
    Ok(r.into_inner().pod_sandbox_id)
}

/// StopPodSandbox.
pub async fn stop_pod(c: &mut CriClient, id: &str) -> Result<(), tonic::Status> {
    c.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        })
        .await
        .map(|_| ())
}

/// RemovePodSandbox.
pub async fn remove_pod(c: &mut CriClient, id: &str) -> Result<(), tonic::Status> {
    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        })
        .await
        .map(|_| ())
}

/// CreateContainer then StartContainer; the container id.
pub async fn create_and_start(
    c: &mut CriClient,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    cfg: cri::ContainerConfig,
) -> Result<String, tonic::Status> {
    let id = c
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(cfg),
            sandbox_config: Some(pod_cfg.clone()),
        })
        .await?
        .into_inner()
        .container_id;
    c.runtime
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await?;
    Ok(id)
}

/// Removes `rel` (a cgroup path under each hierarchy's root) and every empty cgroup
/// below it, deepest first, in every mounted hierarchy (v1 or v2); returns how many of
/// the removed ones were pod cgroups (named `pod*`).
pub fn remove_cgroup_tree(rel: &str) -> usize {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let hierarchies = mounts.lines().filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
    });
    let mut pods = 0;
    for h in hierarchies {
        let mut dirs = vec![h.join(rel.trim_start_matches('/'))];
        let mut i = 0;
        while i < dirs.len() {
            let kids: Vec<PathBuf> = std::fs::read_dir(&dirs[i])
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            dirs.extend(kids);
            i += 1;
        }
        for d in dirs.iter().rev() {
            let is_pod = d
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pod"));
            if std::fs::remove_dir(d).is_ok() && is_pod {
                pods += 1;
            }
        }
    }
    pods
}

/// A container's stats.
pub async fn container_stats(c: &mut CriClient, id: &str) -> anyhow::Result<cri::ContainerStats> {
    use anyhow::Context as _;
    c.runtime
        .container_stats(cri::ContainerStatsRequest {
            container_id: id.into(),
        })
        .await?
        .into_inner()
        .stats
        .context("no stats in the answer")
}
