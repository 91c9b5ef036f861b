//! Exit records: the shim writes each task's exit to disk (atomically) before it
//! reports it, so an exit that happens while berthd is down is never lost.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How and when a task's process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The process id that exited.
    pub pid: u32,
    /// Exit code, or 128 + signal number when killed by a signal.
    pub exit_status: u32,
    /// When the shim reaped it.
    pub exited_at_unix_nanos: i64,
    /// The kernel OOM-killed a process of the container's cgroup before it ended.
    #[serde(default)]
    pub oom_killed: bool,
    /// The runtime's init ended without running the container's process (its exec
    /// failed after the start): what it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_error: Option<String>,
}

/// The exit records of one shim (`<state dir>/exits/<task key>.json`).
#[derive(Clone, Debug)]
pub struct ExitStore {
    dir: PathBuf,
}

impl ExitStore {
    /// Opens (creating) the directory.
    pub fn open(dir: &Path) -> io::Result<ExitStore> {
        fs::create_dir_all(dir)?;
        Ok(ExitStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// Records an exit: written to a temp file, synced, renamed into place.
    pub fn record(&self, key: &str, rec: &ExitRecord) -> io::Result<()> {
        let tmp = self.dir.join(format!(".{key}.tmp"));
        let data = serde_json::to_vec(rec).map_err(io::Error::other)?;
        {
            let mut f = fs::File::create(&tmp)?;
            io::Write::write_all(&mut f, &data)?;
            f.sync_data()?;
        }
        fs::rename(&tmp, self.path(key))
    }

    /// The recorded exit of a task, if any.
    pub fn get(&self, key: &str) -> io::Result<Option<ExitRecord>> {
        match fs::read(self.path(key)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Forgets a task's exit (when the task is deleted).
    pub fn remove(&self, key: &str) -> io::Result<()> {
        match fs::remove_file(self.path(key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The exit status a wait status stands for: the code, or 128 + signal.
pub fn exit_status_of(status: nix::sys::wait::WaitStatus) -> Option<(u32, u32)> {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw() as u32, code as u32)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw() as u32, 128 + sig as u32)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = ExitStore::open(dir.path()).unwrap();
        assert_eq!(s.get("c1").unwrap(), None);
        let r = ExitRecord {
            pid: 42,
            exit_status: 137,
            exited_at_unix_nanos: 5,
            oom_killed: true,
            exec_error: Some("exec /app: no such file or directory".into()),
        };
        s.record("c1", &r).unwrap();
        // Records written before the field existed still load.
        std::fs::write(
            dir.path().join("old.json"),
            r#"{"pid":1,"exit_status":0,"exited_at_unix_nanos":2}"#,
        )
        .unwrap();
        let old = s.get("old").unwrap().unwrap();
        assert!(!old.oom_killed && old.exec_error.is_none());
        assert_eq!(
            ExitStore::open(dir.path()).unwrap().get("c1").unwrap(),
            Some(r)
        );
        s.remove("c1").unwrap();
        s.remove("c1").unwrap();
        assert_eq!(s.get("c1").unwrap(), None);
    }
}
