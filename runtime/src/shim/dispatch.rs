//! Requests to operations: decode, check the target exists, answer (or defer a Wait).

use berth_proto::frame::Frame;
use berth_proto::shim as pb;
use prost::Message;

use super::task::shown;
use super::{Code, Reply, Shim, failure};

/// The calls that name a task (and maybe an exec) with a `TaskRef`.
fn takes_task_ref(method: pb::Method) -> bool {
    matches!(
        method,
        pb::Method::Start
            | pb::Method::Delete
            | pb::Method::State
            | pb::Method::Wait
            | pb::Method::Pids
            | pb::Method::CloseIo
            | pb::Method::Pause
            | pb::Method::Resume
            | pb::Method::ReopenLog
    )
}

/// The `TaskRef` calls that also apply to an exec process.
fn applies_to_execs(method: pb::Method) -> bool {
    matches!(
        method,
        pb::Method::Wait | pb::Method::Delete | pb::Method::State | pb::Method::CloseIo
    )
}

/// Decodes a request, or answers that it does not decode.
fn decode<M: Message + Default>(f: &Frame) -> Result<M, (Code, String)> {
    M::decode(&f.payload[..])
        .map_err(|e| failure(Code::InvalidArgument, format!("decoding request: {e}")))
}

impl Shim {
    /// Handles one request; `None` defers the answer (Wait on a running process).
    pub(super) fn handle(&mut self, conn: u64, f: &Frame) -> Option<Reply> {
        let method = pb::Method::try_from(i32::from(f.method)).unwrap_or(pb::Method::Unspecified);
        if takes_task_ref(method) {
            return self.task_request(conn, f, method);
        }
        Some(match method {
            pb::Method::Connect => Ok(self.connect().encode_to_vec()),
            pb::Method::Subscribe => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.subscribed = true;
                }
                Ok(pb::Empty {}.encode_to_vec())
            }
            pb::Method::Create => decode(f).and_then(|r| self.create(r)),
            pb::Method::Attach => decode(f).and_then(|r| self.attach(r)),
            pb::Method::Exec => decode(f).and_then(|r| self.exec(conn, r)),
            pb::Method::StartInfra => decode(f).and_then(|r| self.start_infra(r)),
            pb::Method::Kill => decode(f).and_then(|r| self.kill(r)),
            pb::Method::ResizePty => decode(f).and_then(|r| self.resize_pty(r)),
            pb::Method::Update => decode(f).and_then(|r| self.update(r)),
            pb::Method::Shutdown => self.shut_down(),
            other => Err(failure(
                Code::Unimplemented,
                format!("{other:?} is not implemented by this shim yet"),
            )),
        })
    }

    /// A call naming a task (and maybe an exec) that must exist.
    fn task_request(&mut self, conn: u64, f: &Frame, method: pb::Method) -> Option<Reply> {
        let r: pb::TaskRef = match decode(f) {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        if !r.exec_id.is_empty() && !applies_to_execs(method) {
            return Some(Err(failure(
                Code::Unimplemented,
                format!("{method:?} of an exec process is not supported"),
            )));
        }
        let name = shown(&r.id, &r.exec_id);
        let Some(p) = self.tasks.process_mut(&r.id, &r.exec_id) else {
            return Some(Err(failure(
                Code::NotFound,
                format!("task {name:?} not found"),
            )));
        };
        if method == pb::Method::Wait {
            return match &p.exit {
                Some(e) => Some(Ok(p.exit_payload(e))),
                None => {
                    p.waiters.push((conn, f.id));
                    None
                }
            };
        }
        Some(self.task_call(method, &r.id, &r.exec_id))
    }

    /// Every task (not their execs) with its state, for a reconnecting client.
    fn connect(&self) -> pb::ConnectResponse {
        let tasks = self
            .tasks
            .0
            .keys()
            .map(|id| self.state_of(id, ""))
            .collect();
        pb::ConnectResponse {
            shim_pid: std::process::id(),
            tasks,
        }
    }

    /// Shutdown: only once no process runs.
    fn shut_down(&mut self) -> Reply {
        if self.tasks.0.values().any(|t| t.any_running()) {
            return Err(failure(Code::FailedPrecondition, "tasks are still running"));
        }
        self.shutdown = true;
        Ok(pb::Empty {}.encode_to_vec())
    }
}
