//! systemd's manager over D-Bus, for the systemd cgroup driver: a pod's infra process
//! goes into a transient scope under the pod's slice (as runc puts each container),
//! and the scope (and a slice berth started) is stopped when the pod goes.
//!
//! The connection is the system bus, as runc's go-systemd makes it. Not systemd's
//! private socket: systemd stamps its messages there with the sender
//! `org.freedesktop.systemd1`, which zbus takes for a broken unique name and panics
//! on (z-galaxy/zbus#965). It is remade once when a call finds it broken (dbus-daemon
//! restarted).

use std::time::Duration;

use futures_util::StreamExt as _;
use serde::Serialize;
use tokio::sync::Mutex;
use zbus::zvariant::{DynamicType, OwnedObjectPath, Value};
use zbus::{Connection, MatchRule, MessageStream};

/// The system bus, where `DBUS_SYSTEM_BUS_ADDRESS` does not say otherwise.
const SYSTEM_BUS: &str = "/run/dbus/system_bus_socket";
const DESTINATION: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
/// A call and the job it queues (runc waits 30 s for a scope too).
const JOB_TIMEOUT: Duration = Duration::from_secs(30);

/// Why systemd did not do what berth asked.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// systemd did not answer on the system bus.
    #[error(
        "cgroup_driver is \"systemd\" but systemd is not reachable on the system bus {bus}: {why}; run berthd under systemd with dbus, or set cgroup_driver = \"cgroupfs\""
    )]
    Unreachable { bus: String, why: String },
    /// A D-Bus call failed.
    #[error("systemd {method}({unit}): {source}")]
    Call {
        method: &'static str,
        unit: String,
        #[source]
        source: zbus::Error,
    },
    /// The job a call queued did not finish with `done`.
    #[error("systemd {method}({unit}): the job ended with {result:?}")]
    Job {
        method: &'static str,
        unit: String,
        result: String,
    },
    /// systemd did not answer in time.
    #[error("systemd {method}({unit}): no answer within {}s", JOB_TIMEOUT.as_secs())]
    Timeout { method: &'static str, unit: String },
}

impl SystemdError {
    fn call(method: &'static str, unit: &str) -> impl FnOnce(zbus::Error) -> SystemdError {
        let unit = unit.to_string();
        move |source| SystemdError::Call {
            method,
            unit,
            source,
        }
    }

    /// systemd does not know the unit (stopped and collected, or never made).
    fn is_no_such_unit(&self) -> bool {
        matches!(self, SystemdError::Call { source: zbus::Error::MethodError(name, ..), .. }
            if name.as_str() == NO_SUCH_UNIT)
    }

    /// The connection broke (rather than systemd refusing or a reply not decoding).
    fn is_transport(&self) -> bool {
        matches!(
            self,
            SystemdError::Call {
                source: zbus::Error::InputOutput(_),
                ..
            }
        )
    }

    /// systemd already has a unit of that name.
    fn is_unit_exists(&self) -> bool {
        matches!(self, SystemdError::Call { source: zbus::Error::MethodError(name, ..), .. }
            if name.as_str() == "org.freedesktop.systemd1.UnitExists")
    }
}

type Result<T, E = SystemdError> = std::result::Result<T, E>;

/// A transient scope for one process.
#[derive(Clone, Debug)]
pub struct Scope<'a> {
    /// `<prefix>-<id>.scope`.
    pub name: &'a str,
    /// The slice it lives in, e.g. `kubepods-besteffort-pod<uid>.slice`.
    pub slice: &'a str,
    /// The process moved into it.
    pub pid: u32,
    /// What `systemctl status` shows.
    pub description: &'a str,
}

/// systemd's manager.
pub struct Systemd {
    conn: Mutex<Option<Connection>>,
}

impl Systemd {
    /// Connects, or says clearly why systemd is not reachable.
    pub async fn connect() -> Result<Systemd> {
        let conn = open().await?;
        Ok(Systemd {
            conn: Mutex::new(Some(conn)),
        })
    }

    /// Starts `scope` with its process and waits until it runs. Delegated, with no
    /// default dependencies, as runc makes a container's scope.
    pub async fn start_scope(&self, scope: &Scope<'_>) -> Result<()> {
        let properties: Vec<(&str, Value)> = vec![
            ("Description", Value::from(scope.description)),
            ("Slice", Value::from(scope.slice)),
            ("PIDs", Value::from(vec![scope.pid])),
            ("Delegate", Value::from(true)),
            ("DefaultDependencies", Value::from(false)),
        ];
        let aux: Vec<(&str, Vec<(&str, Value)>)> = Vec::new();
        let started = self
            .job(
                "StartTransientUnit",
                scope.name,
                &(scope.name, "fail", properties, aux),
            )
            .await;
        match started {
            // A retry after a broken connection whose first call got through.
            Err(e) if e.is_unit_exists() && self.is_active(scope.name).await? => Ok(()),
            r => r,
        }
    }

    /// Whether `unit` is active; a unit systemd does not know is not.
    pub async fn is_active(&self, unit: &str) -> Result<bool> {
        let path: OwnedObjectPath = match self.call("GetUnit", unit, &(unit,)).await {
            Ok(p) => p,
            Err(e) if e.is_no_such_unit() => return Ok(false),
            Err(e) => return Err(e),
        };
        let conn = self.conn().await?;
        let reply = conn
            .call_method(
                Some(DESTINATION),
                path.as_str(),
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &("org.freedesktop.systemd1.Unit", "ActiveState"),
            )
            .await;
        let reply = match reply {
            // Unloaded since GetUnit answered.
            Err(zbus::Error::MethodError(name, ..))
                if name.as_str() == "org.freedesktop.DBus.Error.UnknownObject" =>
            {
                return Ok(false);
            }
            r => r.map_err(SystemdError::call("Get ActiveState", unit))?,
        };
        let state: zbus::zvariant::OwnedValue = reply
            .body()
            .deserialize()
            .map_err(SystemdError::call("Get ActiveState", unit))?;
        Ok(matches!(&*state, Value::Str(s) if s.as_str() == "active"))
    }

    /// Stops `unit` and waits for it; a unit systemd does not know is already gone.
    /// A failed unit is reset, so that its name does not linger.
    pub async fn stop_unit(&self, unit: &str) -> Result<()> {
        match self.job("StopUnit", unit, &(unit, "replace")).await {
            Ok(()) => {}
            Err(e) if e.is_no_such_unit() => return Ok(()),
            Err(e) => return Err(e),
        }
        match self.call::<_, ()>("ResetFailedUnit", unit, &(unit,)).await {
            Err(e) if !e.is_no_such_unit() => Err(e),
            _ => Ok(()),
        }
    }

    /// The names of loaded units matching a glob, e.g. `berth-*.scope`.
    pub async fn units_matching(&self, pattern: &str) -> Result<Vec<String>> {
        type UnitRow = (
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        );
        let no_states: Vec<&str> = Vec::new();
        let rows: Vec<UnitRow> = self
            .call("ListUnitsByPatterns", pattern, &(no_states, vec![pattern]))
            .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// The live connection, remade if a call found it broken.
    async fn conn(&self) -> Result<Connection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = open().await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn forget(&self) {
        *self.conn.lock().await = None;
    }

    /// A manager method's reply, with one retry on a fresh connection.
    async fn call<B, R>(&self, method: &'static str, unit: &str, body: &B) -> Result<R>
    where
        B: Serialize + DynamicType,
        R: serde::de::DeserializeOwned + zbus::zvariant::Type,
    {
        let mut retried = false;
        loop {
            let conn = self.conn().await?;
            let reply = tokio::time::timeout(
                JOB_TIMEOUT,
                conn.call_method(Some(DESTINATION), MANAGER_PATH, Some(MANAGER), method, body),
            )
            .await
            .map_err(|_| SystemdError::Timeout {
                method,
                unit: unit.to_string(),
            })?
            .and_then(|m| m.body().deserialize::<R>())
            .map_err(SystemdError::call(method, unit));
            match reply {
                Err(e) if e.is_transport() && !retried => {
                    retried = true;
                    self.forget().await;
                }
                r => return r,
            }
        }
    }

    /// A manager method that queues a job, then the job's end (`JobRemoved`).
    async fn job<B>(&self, method: &'static str, unit: &str, body: &B) -> Result<()>
    where
        B: Serialize + DynamicType,
    {
        let mut retried = false;
        loop {
            let conn = self.conn().await?;
            let run = job_on(&conn, method, unit, body);
            let outcome = tokio::time::timeout(JOB_TIMEOUT, run)
                .await
                .map_err(|_| SystemdError::Timeout {
                    method,
                    unit: unit.to_string(),
                })
                .and_then(|r| r);
            match outcome {
                Err(e) if e.is_transport() && !retried => {
                    retried = true;
                    self.forget().await;
                }
                r => return r,
            }
        }
    }
}

/// Queues the job and waits for its `JobRemoved`, from systemd (the sender of the
/// reply) only. Signals are read while the call is pending, so that a burst of other
/// jobs' signals cannot fill the queue and stall the connection; the match is added
/// before the call, so a job that ends at once is not missed.
async fn job_on<B>(conn: &Connection, method: &'static str, unit: &str, body: &B) -> Result<()>
where
    B: Serialize + DynamicType,
{
    let err = || SystemdError::call(method, unit);
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(DESTINATION)
        .and_then(|b| b.interface(MANAGER))
        .and_then(|b| b.member("JobRemoved"))
        .and_then(|b| b.path(MANAGER_PATH))
        .map_err(err())?
        .build();
    let mut removed = MessageStream::for_match_rule(rule, conn, Some(256))
        .await
        .map_err(err())?;
    let call = conn.call_method(Some(DESTINATION), MANAGER_PATH, Some(MANAGER), method, body);
    tokio::pin!(call);
    let mut early = Vec::new();
    let reply = loop {
        tokio::select! {
            reply = &mut call => break reply.map_err(err())?,
            Some(Ok(msg)) = removed.next() => early.push(msg),
        }
    };
    let job: OwnedObjectPath = reply.body().deserialize().map_err(err())?;
    let systemd = reply.header().sender().map(|s| s.to_owned());
    let ended = |msg: &zbus::Message| -> Option<String> {
        if msg.header().sender().map(|s| s.to_owned()) != systemd {
            return None;
        }
        let (_, path, _, result) = msg
            .body()
            .deserialize::<(u32, OwnedObjectPath, String, String)>()
            .ok()?;
        (path == job).then_some(result)
    };
    let mut result = early.iter().find_map(ended);
    while result.is_none() {
        match removed.next().await {
            Some(Ok(msg)) => result = ended(&msg),
            Some(Err(_)) => {}
            None => {
                return Err(err()(zbus::Error::InputOutput(std::sync::Arc::new(
                    std::io::Error::other("the connection closed before the job finished"),
                ))));
            }
        }
    }
    match result.as_deref() {
        Some("done") => Ok(()),
        _ => Err(SystemdError::Job {
            method,
            unit: unit.to_string(),
            result: result.unwrap_or_default(),
        }),
    }
}

/// The system bus, subscribed so that systemd sends its job signals; all within
/// `JOB_TIMEOUT`, so that a wedged bus cannot hold berthd's start.
async fn open() -> Result<Connection> {
    let unreachable = |why: String| SystemdError::Unreachable {
        bus: std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
            .unwrap_or_else(|_| format!("unix:path={SYSTEM_BUS}")),
        why,
    };
    let connect = async {
        let conn = zbus::connection::Builder::system()?
            .method_timeout(JOB_TIMEOUT)
            .build()
            .await?;
        conn.call_method(
            Some(DESTINATION),
            MANAGER_PATH,
            Some(MANAGER),
            "Subscribe",
            &(),
        )
        .await?;
        Ok::<_, zbus::Error>(conn)
    };
    match tokio::time::timeout(JOB_TIMEOUT, connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable(format!(
            "no answer within {}s",
            JOB_TIMEOUT.as_secs()
        ))),
    }
}

/// The scope of a pod's infra process (`berth-<id>.scope`, the name runc gives a
/// container of the pod under `<slice>:berth:<id>`).
pub fn infra_scope(pod_id: &str) -> String {
    format!("berth-{pod_id}.scope")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_is_a_transport_error() {
        let e = SystemdError::Call {
            method: "StopUnit",
            unit: "x.scope".into(),
            source: zbus::Error::InputOutput(std::sync::Arc::new(std::io::Error::other("gone"))),
        };
        assert!(e.is_transport() && !e.is_no_such_unit());
        assert!(infra_scope("ab").ends_with("-ab.scope"));
    }

    #[tokio::test]
    async fn unreachable_systemd_names_the_bus_and_the_fix() {
        if std::path::Path::new(SYSTEM_BUS).exists()
            || std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS").is_some()
        {
            eprintln!("skipped: a system bus may be reachable on this host");
            return;
        }
        let e = Systemd::connect().await.err().expect("no systemd here");
        let text = e.to_string();
        assert!(
            text.contains(SYSTEM_BUS) && text.contains("system bus"),
            "{text}"
        );
        assert!(text.contains("cgroupfs"), "{text}");
    }
}
