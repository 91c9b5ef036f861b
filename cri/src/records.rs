//! Pod sandbox and container records in redb, mirrored in memory. Every change is one
//! write transaction, committed before the mirror changes. Records hold their CRI
//! configs typed; a record that does not decode stops berthd at start with an error
//! naming it (never an empty default that would still feed the OCI spec).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const SANDBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("sandboxes");
const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");

use k8s_cri::v1 as cri;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("runtime metadata store: {0}")]
    Db(String),
    /// A stored record does not decode.
    #[error("runtime metadata store: the {table} record {id:?} is corrupt: {reason}")]
    Corrupt {
        table: &'static str,
        id: String,
        reason: String,
    },
    /// A record could not be encoded.
    #[error("runtime metadata store: encoding the {table} record {id:?}: {reason}")]
    Encode {
        table: &'static str,
        id: String,
        reason: String,
    },
}

macro_rules! store_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
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
    redb::CommitError
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
    /// The pod's CRI config (kept for status and its containers).
    pub config: cri::PodSandboxConfig,
    /// The pod's IP addresses from CNI, IPv4 first.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The pod's SELinux process label (its containers' default), on SELinux hosts.
    #[serde(default)]
    pub selinux_label: Option<String>,
    /// Under the systemd cgroup driver, the slice of the pod's scopes.
    #[serde(default)]
    pub systemd_slice: Option<String>,
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
    /// The container's CRI config (with resources as last updated).
    pub config: cri::ContainerConfig,
    /// The OCI `linux.cgroupsPath` it was created with ("" in records older than it).
    #[serde(default)]
    pub cgroups_path: String,
    /// The identity its process runs as (None in records older than it).
    #[serde(default)]
    pub user: Option<crate::oci::ProcessIds>,
}

/// One redb table of JSON records keyed by id, mirrored in a map.
struct Table<T> {
    def: TableDefinition<'static, &'static str, &'static [u8]>,
    name: &'static str,
    map: RwLock<BTreeMap<String, T>>,
}

impl<T: Serialize + serde::de::DeserializeOwned + Clone> Table<T> {
    fn load(
        db: &Database,
        def: TableDefinition<'static, &'static str, &'static [u8]>,
        name: &'static str,
    ) -> Result<Table<T>, StoreError> {
        let tx = db.begin_write()?;
        tx.open_table(def)?;
        tx.commit()?;
        let mut map = BTreeMap::new();
        let rx = db.begin_read()?;
        for row in rx.open_table(def)?.iter()? {
            let (k, v) = row?;
            let id = k.value().to_string();
            let rec = serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                table: name,
                id: id.clone(),
                reason: e.to_string(),
            })?;
            map.insert(id, rec);
        }
        Ok(Table {
            def,
            name,
            map: RwLock::new(map),
        })
    }

    fn all(&self) -> Vec<T> {
        self.map
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    fn get(&self, id: &str) -> Option<T> {
        self.map.read().ok().and_then(|m| m.get(id).cloned())
    }

    /// A full id or a unique prefix; `Err` names the ambiguity.
    fn resolve(&self, prefix: &str, what: &str) -> Result<Option<T>, String> {
        let m = self
            .map
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
            (Some(_), Some(_)) => Err(format!("id prefix {prefix:?} matches more than one {what}")),
        }
    }

    fn put(&self, db: &Database, id: &str, rec: &T) -> Result<(), StoreError> {
        let mut m = self
            .map
            .write()
            .map_err(|_| StoreError::Db("lock poisoned".into()))?;
        let bytes = serde_json::to_vec(rec).map_err(|e| StoreError::Encode {
            table: self.name,
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        let tx = db.begin_write()?;
        tx.open_table(self.def)?.insert(id, bytes.as_slice())?;
        tx.commit()?;
        m.insert(id.to_string(), rec.clone());
        Ok(())
    }

    fn delete(&self, db: &Database, id: &str) -> Result<(), StoreError> {
        let mut m = self
            .map
            .write()
            .map_err(|_| StoreError::Db("lock poisoned".into()))?;
        let tx = db.begin_write()?;
        tx.open_table(self.def)?.remove(id)?;
        tx.commit()?;
        m.remove(id);
        Ok(())
    }
}

/// The pod and container records.
pub struct RecordStore {
    db: Arc<Database>,
    sandboxes: Table<SandboxRecord>,
    containers: Table<ContainerRecord>,
}

impl RecordStore {
    /// Loads every record (creating the tables).
    pub fn open(db: Arc<Database>) -> Result<RecordStore, StoreError> {
        let sandboxes = Table::load(&db, SANDBOXES, "sandbox")?;
        let containers = Table::load(&db, CONTAINERS, "container")?;
        Ok(RecordStore {
            db,
            sandboxes,
            containers,
        })
    }

    /// All sandboxes.
    pub fn sandboxes(&self) -> Vec<SandboxRecord> {
        self.sandboxes.all()
    }

    /// One sandbox by full id.
    pub fn sandbox(&self, id: &str) -> Option<SandboxRecord> {
        self.sandboxes.get(id)
    }

    /// Resolves a full id or a unique prefix; `Err` names the ambiguity.
    pub fn resolve_sandbox(&self, prefix: &str) -> Result<Option<SandboxRecord>, String> {
        self.sandboxes.resolve(prefix, "sandbox")
    }

    /// The sandbox holding a key (`name_namespace_uid_attempt`).
    pub fn sandbox_by_key(&self, key: &str) -> Option<SandboxRecord> {
        self.sandboxes.all().into_iter().find(|s| s.key == key)
    }

    /// Writes (inserts or replaces) a sandbox record.
    pub fn put_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        self.sandboxes.put(&self.db, &rec.id, rec)
    }

    /// Deletes a sandbox record; absent is fine.
    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.sandboxes.delete(&self.db, id)
    }

    /// All containers.
    pub fn containers(&self) -> Vec<ContainerRecord> {
        self.containers.all()
    }

    /// One container by full id.
    pub fn container(&self, id: &str) -> Option<ContainerRecord> {
        self.containers.get(id)
    }

    /// Resolves a full id or a unique prefix; `Err` names the ambiguity.
    pub fn resolve_container(&self, prefix: &str) -> Result<Option<ContainerRecord>, String> {
        self.containers.resolve(prefix, "container")
    }

    /// Writes (inserts or replaces) a container record.
    pub fn put_container(&self, rec: &ContainerRecord) -> Result<(), StoreError> {
        self.containers.put(&self.db, &rec.id, rec)
    }

    /// Deletes a container record; absent is fine.
    pub fn delete_container(&self, id: &str) -> Result<(), StoreError> {
        self.containers.delete(&self.db, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_resolve_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("m.redb")).unwrap());
        let s = RecordStore::open(db.clone()).unwrap();
        let rec = |id: &str| SandboxRecord {
            id: id.into(),
            key: format!("k{id}"),
            state: SandboxState::Ready,
            reason: String::new(),
            created_at: 1,
            runtime_handler: "runc".into(),
            netns: None,
            infra_pid: 2,
            cgroup_dirs: vec![],
            config: cri::PodSandboxConfig::default(),
            ips: vec![],
            selinux_label: None,
            systemd_slice: None,
        };
        s.put_sandbox(&rec("abc1")).unwrap();
        s.put_sandbox(&rec("abc2")).unwrap();
        s.put_sandbox(&rec("def")).unwrap();
        assert!(s.resolve_sandbox("abc").is_err());
        assert_eq!(s.resolve_sandbox("abc2").unwrap().unwrap().id, "abc2");
        assert_eq!(s.resolve_sandbox("d").unwrap().unwrap().id, "def");
        assert!(s.resolve_sandbox("x").unwrap().is_none());
        s.delete_sandbox("def").unwrap();
        drop(s);
        let s = RecordStore::open(db).unwrap();
        assert_eq!(s.sandboxes().len(), 2);
        assert_eq!(s.sandbox_by_key("kabc1").unwrap().id, "abc1");
    }

    #[test]
    fn a_record_that_does_not_decode_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("m.redb")).unwrap());
        drop(RecordStore::open(db.clone()).unwrap());
        let tx = db.begin_write().unwrap();
        tx.open_table(CONTAINERS)
            .unwrap()
            .insert("c0ffee", br#"{"id": "c0ffee", "config": 7}"#.as_slice())
            .unwrap();
        tx.commit().unwrap();
        let e = RecordStore::open(db)
            .err()
            .expect("a corrupt record must not load");
        let msg = e.to_string();
        assert!(msg.contains("container record \"c0ffee\""), "{msg}");
    }
}
