//! Sandbox (and later container) records in redb, mirrored in memory. Every change is
//! one write transaction, committed before the mirror changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const SANDBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("sandboxes");
const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[error("runtime metadata store: {0}")]
pub struct StoreError(String);

macro_rules! store_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError(e.to_string())
            }
        }
    )*};
}
store_error_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

/// Whether a sandbox's namespaces are held by a live infra process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    /// Infra process running.
    Ready,
    /// Stopped (or its shim died).
    NotReady,
}

/// One pod sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// 64 hex characters.
    pub id: String,
    /// `name_namespace_uid_attempt`, unique among sandboxes.
    pub key: String,
    /// Current state.
    pub state: SandboxState,
    /// Why it is not ready, when it stopped on its own (e.g. the shim died).
    pub reason: String,
    /// Creation time (Unix nanoseconds).
    pub created_at: i64,
    /// Runtime handler name.
    pub runtime_handler: String,
    /// Pinned netns, unless the pod uses the host network.
    pub netns: Option<PathBuf>,
    /// The infra process's pid while ready.
    pub infra_pid: u32,
    /// Pod cgroup directories berth created (one per hierarchy).
    pub cgroup_dirs: Vec<String>,
    /// The CRI config as JSON (kept for status and later containers).
    pub config: serde_json::Value,
}

/// A container's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    /// Created, not started.
    Created,
    /// Its process runs.
    Running,
    /// Its process exited (or was found gone).
    Exited,
}

/// One container (metadata; the live process is the shim's task of the same id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// 64 hex characters.
    pub id: String,
    /// Its pod.
    pub sandbox_id: String,
    /// `name_attempt`, unique within the pod.
    pub key: String,
    /// Current state.
    pub state: ContainerState,
    /// Creation, start and finish times (Unix nanoseconds; 0 = not yet).
    pub created_at: i64,
    /// When it started.
    pub started_at: i64,
    /// When it exited.
    pub finished_at: i64,
    /// Exit code once exited.
    pub exit_code: i32,
    /// `Completed`, `Error`, `OOMKilled` or why berth marked it exited.
    pub reason: String,
    /// Detail for the reason.
    pub message: String,
    /// The image as requested.
    pub image: String,
    /// The image id (config digest).
    pub image_id: String,
    /// The image's repo digest, if any.
    pub image_ref: String,
    /// The CRI log file.
    pub log_path: String,
    /// Init pid while running.
    pub pid: u32,
    /// The signal StopContainer sends first.
    pub stop_signal: u32,
    /// The CRI config as JSON.
    pub config: serde_json::Value,
}

/// The runtime's records.
pub struct RuntimeStore {
    db: Arc<Database>,
    sandboxes: RwLock<BTreeMap<String, SandboxRecord>>,
    containers: RwLock<BTreeMap<String, ContainerRecord>>,
}

impl RuntimeStore {
    /// Loads every record (creating the tables).
    pub fn open(db: Arc<Database>) -> Result<RuntimeStore, StoreError> {
        let tx = db.begin_write()?;
        tx.open_table(SANDBOXES)?;
        tx.open_table(CONTAINERS)?;
        tx.commit()?;
        let mut sandboxes = BTreeMap::new();
        let mut containers = BTreeMap::new();
        let rx = db.begin_read()?;
        for row in rx.open_table(SANDBOXES)?.iter()? {
            let (_, v) = row?;
            let rec: SandboxRecord = serde_json::from_slice(v.value())?;
            sandboxes.insert(rec.id.clone(), rec);
        }
        for row in rx.open_table(CONTAINERS)?.iter()? {
            let (_, v) = row?;
            let rec: ContainerRecord = serde_json::from_slice(v.value())?;
            containers.insert(rec.id.clone(), rec);
        }
        Ok(RuntimeStore {
            db,
            sandboxes: RwLock::new(sandboxes),
            containers: RwLock::new(containers),
        })
    }

    /// All sandboxes.
    pub fn sandboxes(&self) -> Vec<SandboxRecord> {
        self.sandboxes
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// One sandbox by full id.
    pub fn sandbox(&self, id: &str) -> Option<SandboxRecord> {
        self.sandboxes.read().ok().and_then(|m| m.get(id).cloned())
    }

    /// Resolves a full id or a unique prefix; `Err` names the ambiguity.
    pub fn resolve_sandbox(&self, prefix: &str) -> Result<Option<SandboxRecord>, String> {
        let m = self
            .sandboxes
            .read()
            .map_err(|_| "store lock poisoned".to_string())?;
        if let Some(r) = m.get(prefix) {
            return Ok(Some(r.clone()));
        }
        let mut it = m
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix));
        match (it.next(), it.next()) {
            (Some((_, r)), None) => Ok(Some(r.clone())),
            (None, _) => Ok(None),
            (Some(_), Some(_)) => Err(format!(
                "id prefix {prefix:?} matches more than one sandbox"
            )),
        }
    }

    /// The sandbox holding a key (`name_namespace_uid_attempt`).
    pub fn sandbox_by_key(&self, key: &str) -> Option<SandboxRecord> {
        self.sandboxes
            .read()
            .ok()
            .and_then(|m| m.values().find(|s| s.key == key).cloned())
    }

    /// Writes (inserts or replaces) a sandbox record.
    pub fn put_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let mut m = self
            .sandboxes
            .write()
            .map_err(|_| StoreError("lock poisoned".into()))?;
        let tx = self.db.begin_write()?;
        tx.open_table(SANDBOXES)?
            .insert(rec.id.as_str(), serde_json::to_vec(rec)?.as_slice())?;
        tx.commit()?;
        m.insert(rec.id.clone(), rec.clone());
        Ok(())
    }

    /// Deletes a sandbox record; absent is fine.
    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        let mut m = self
            .sandboxes
            .write()
            .map_err(|_| StoreError("lock poisoned".into()))?;
        let tx = self.db.begin_write()?;
        tx.open_table(SANDBOXES)?.remove(id)?;
        tx.commit()?;
        m.remove(id);
        Ok(())
    }

    /// All containers.
    pub fn containers(&self) -> Vec<ContainerRecord> {
        self.containers
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// One container by full id.
    pub fn container(&self, id: &str) -> Option<ContainerRecord> {
        self.containers.read().ok().and_then(|m| m.get(id).cloned())
    }

    /// Resolves a full id or a unique prefix; `Err` names the ambiguity.
    pub fn resolve_container(&self, prefix: &str) -> Result<Option<ContainerRecord>, String> {
        let m = self
            .containers
            .read()
            .map_err(|_| "store lock poisoned".to_string())?;
        if let Some(r) = m.get(prefix) {
            return Ok(Some(r.clone()));
        }
        let mut it = m
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix));
        match (it.next(), it.next()) {
            (Some((_, r)), None) => Ok(Some(r.clone())),
            (None, _) => Ok(None),
            (Some(_), Some(_)) => Err(format!(
                "id prefix {prefix:?} matches more than one container"
            )),
        }
    }

    /// Writes (inserts or replaces) a container record.
    pub fn put_container(&self, rec: &ContainerRecord) -> Result<(), StoreError> {
        let mut m = self
            .containers
            .write()
            .map_err(|_| StoreError("lock poisoned".into()))?;
        let tx = self.db.begin_write()?;
        tx.open_table(CONTAINERS)?
            .insert(rec.id.as_str(), serde_json::to_vec(rec)?.as_slice())?;
        tx.commit()?;
        m.insert(rec.id.clone(), rec.clone());
        Ok(())
    }

    /// Deletes a container record; absent is fine.
    pub fn delete_container(&self, id: &str) -> Result<(), StoreError> {
        let mut m = self
            .containers
            .write()
            .map_err(|_| StoreError("lock poisoned".into()))?;
        let tx = self.db.begin_write()?;
        tx.open_table(CONTAINERS)?.remove(id)?;
        tx.commit()?;
        m.remove(id);
        Ok(())
    }
}
