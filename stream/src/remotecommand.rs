//! Exec and attach over SPDY (kubelet's remotecommand server): wait for the
//! client's streams (`streamType` error, stdin, stdout, stderr, resize), pump them
//! to and from the runtime, then write the status on the error stream and finish
//! the outputs before the session closes (so slow readers get all their bytes).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::limits::STREAM_CREATION_TIMEOUT;
use crate::runtime::{Command, SessionIo, StreamRuntime, TermSize};
use crate::spdy::{Connection, Incoming, Stream, StreamWriter};
use crate::status::version_of;

/// How long berth waits for the client to close after the status was sent.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Streams {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

/// Accepts streams until the expected set is there (or 30 s pass).
async fn wait_streams(
    incoming: &mut mpsc::Receiver<Incoming>,
    want: (bool, bool, bool, bool),
    version: u8,
) -> Option<Streams> {
    let (stdin, stdout, stderr, tty) = want;
    let expected =
        1 + stdin as usize + stdout as usize + stderr as usize + (tty && version >= 3) as usize;
    let mut got = Streams::default();
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while count < expected {
        let inc = tokio::time::timeout_at(deadline, incoming.recv())
            .await
            .ok()??;
        let kind = inc.headers.get("streamType").unwrap_or("").to_string();
        let Ok(s) = inc.accept().await else {
            return None;
        };
        let slot = match kind.as_str() {
            "error" => &mut got.error,
            "stdin" => &mut got.stdin,
            "stdout" => &mut got.stdout,
            "stderr" => &mut got.stderr,
            "resize" if version >= 3 => &mut got.resize,
            other => {
                tracing::debug!(stream_type = other, "unexpected stream type");
                continue;
            }
        };
        *slot = Some(s);
        count += 1;
    }
    Some(got)
}

/// Pumps between the streams and the runtime's channels.
struct Wired {
    io: SessionIo,
    outputs: Vec<(StreamWriter, JoinHandle<()>)>,
    inputs: Vec<StreamWriter>,
}

fn wire(conn: &Connection, s: &mut Streams) -> Wired {
    let mut outputs = Vec::new();
    let mut inputs = Vec::new();
    let stdin = s.stdin.take().map(|st| {
        let (mut rx, w) = st.split();
        inputs.push(w);
        let (tx, out) = mpsc::channel::<Bytes>(16);
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if tx.send(b).await.is_err() {
                    break;
                }
            }
        });
        out
    });
    let mut output = |st: Option<Stream>| {
        st.map(|st| {
            let w = st.writer();
            let (tx, mut rx) = mpsc::channel::<Bytes>(16);
            let w2 = w.clone();
            let pump = tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    if w2.write(&b).await.is_err() {
                        break;
                    }
                }
            });
            outputs.push((w, pump));
            tx
        })
    };
    let stdout = output(s.stdout.take());
    let stderr = output(s.stderr.take());
    let resize = s.resize.take().map(|st| {
        let (mut rx, w) = st.split();
        inputs.push(w);
        let (tx, out) = mpsc::channel::<TermSize>(4);
        tokio::spawn(async move {
            // A stream of JSON objects, not one per frame.
            let mut buf: Vec<u8> = Vec::new();
            while let Some(b) = rx.recv().await {
                buf.extend_from_slice(&b);
                let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<TermSize>();
                let mut used = 0;
                while let Some(Ok(size)) = it.next() {
                    used = it.byte_offset();
                    if tx.send(size).await.is_err() {
                        return;
                    }
                }
                buf.drain(..used);
                if buf.len() > 4096 {
                    return; // not a resize stream
                }
            }
        });
        out
    });
    let (gone_tx, gone) = oneshot::channel();
    let c = conn.clone();
    tokio::spawn(async move {
        c.closed().await;
        let _ = gone_tx.send(());
    });
    Wired {
        io: SessionIo {
            stdin,
            stdout,
            stderr,
            resize,
            gone,
        },
        outputs,
        inputs,
    }
}

/// After the runtime: all output written, input stopped, status, FIN, close.
async fn finish(
    conn: Connection,
    error: Option<StreamWriter>,
    wired_out: Vec<(StreamWriter, JoinHandle<()>)>,
    inputs: Vec<StreamWriter>,
    status: Option<Vec<u8>>,
) {
    let mut writers = Vec::new();
    for (w, pump) in wired_out {
        let _ = pump.await;
        writers.push(w);
    }
    for w in inputs {
        w.reset().await;
    }
    if let Some(w) = error {
        if let Some(msg) = status {
            let _ = w.write(&msg).await;
        }
        writers.push(w);
    }
    for w in writers {
        let _ = w.close().await;
    }
    let _ = tokio::time::timeout(FINISH_TIMEOUT, conn.closed()).await;
    conn.close().await;
}

/// Serves one exec or attach session.
pub async fn serve(
    conn: Connection,
    mut incoming: mpsc::Receiver<Incoming>,
    protocol: &str,
    cmd: Command,
    runtime: Arc<dyn StreamRuntime>,
) {
    let version = version_of(protocol);
    let Some(mut s) = wait_streams(&mut incoming, cmd.streams(), version).await else {
        tracing::info!(
            container = cmd.container_id(),
            "timed out waiting for client to create streams"
        );
        conn.close().await;
        return;
    };
    tokio::spawn(refuse_more(incoming));
    // berth only writes the error stream: what a client sends there is dropped.
    let error = s.error.take().map(Stream::into_writer);
    let wired = wire(&conn, &mut s);
    let status = cmd.run(runtime.as_ref(), wired.io, version).await;
    finish(conn, error, wired.outputs, wired.inputs, status).await;
}

/// Streams opened after the session is set up are refused.
async fn refuse_more(mut incoming: mpsc::Receiver<Incoming>) {
    while let Some(i) = incoming.recv().await {
        i.reject().await;
    }
}
