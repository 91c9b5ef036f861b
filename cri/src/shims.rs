//! The pods' shims: one connection per pod, reconnected when it dropped; shims are
//! started here.

use std::collections::HashMap;
use std::path::PathBuf;

use berth_runtime::client::{ShimClient, ShimError, spawn_shim};
use berth_runtime::shim::ShimConfig;

use crate::layout::Paths;

/// Every pod's shim connection.
pub struct ShimRegistry {
    binary: PathBuf,
    paths: Paths,
    clients: tokio::sync::Mutex<HashMap<String, ShimClient>>,
}

impl ShimRegistry {
    /// Shims are the `berth-shim` at `binary`; their sockets are under `paths`.
    pub fn new(binary: PathBuf, paths: Paths) -> ShimRegistry {
        ShimRegistry {
            binary,
            paths,
            clients: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The `berth-shim` binary.
    pub fn binary(&self) -> PathBuf {
        self.binary.clone()
    }

    /// The shim client of a pod, reconnecting if needed; `None` if the shim is gone.
    pub async fn get(&self, pod: &str) -> Option<ShimClient> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(pod) {
            if !c.is_closed() {
                return Some(c.clone());
            }
        }
        let c = ShimClient::connect(&self.paths.shim_socket(pod))
            .await
            .ok()?;
        clients.insert(pod.to_string(), c.clone());
        Some(c)
    }

    /// Keeps a connection for a pod.
    pub async fn insert(&self, pod: &str, client: ShimClient) {
        self.clients.lock().await.insert(pod.to_string(), client);
    }

    /// Forgets a pod's connection (its shim is shut down).
    pub async fn remove(&self, pod: &str) {
        self.clients.lock().await.remove(pod);
    }

    /// Every kept connection.
    pub async fn all(&self) -> Vec<(String, ShimClient)> {
        self.clients
            .lock()
            .await
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Starts a pod's shim (it detaches) and connects to it.
    pub async fn spawn(&self, cfg: ShimConfig) -> Result<ShimClient, ShimError> {
        let (binary, socket) = (self.binary.clone(), cfg.socket.clone());
        tokio::task::spawn_blocking(move || spawn_shim(&binary, &cfg))
            .await
            .map_err(|e| ShimError::Start(e.to_string()))??;
        ShimClient::connect(&socket).await
    }
}

/// The shim binary: the configured one, else `berth-shim` beside berthd, else on PATH.
pub fn shim_binary(configured: &std::path::Path) -> PathBuf {
    if !configured.as_os_str().is_empty() {
        return configured.to_path_buf();
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("berth-shim")));
    match beside {
        Some(p) if p.is_file() => p,
        _ => PathBuf::from("berth-shim"),
    }
}
