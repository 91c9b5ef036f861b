//! Port-forward over SPDY (`portforward.k8s.io`): each forwarded connection is a
//! pair of streams (`streamType` data and error, same `requestID`, the `port`
//! header), paired within 30 s; the data stream is spliced to a TCP connection to
//! the pod's port; a failure is written as text on the error stream. A session holds
//! at most `max_port_forward_streams` streams; more are refused (REFUSED_STREAM).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::limits::{STREAM_CREATION_TIMEOUT, StreamLimits};
use crate::runtime::{PortForwardRequest, StreamRuntime};
use crate::spdy::{Connection, Incoming, Stream};

#[derive(Default)]
struct Pair {
    data: Option<Stream>,
    error: Option<Stream>,
    /// The streams' places under the session's cap, freed when the pair is done.
    slots: Vec<OwnedSemaphorePermit>,
}

fn parse_port(s: Option<&str>) -> Result<u16, String> {
    let s = s.ok_or("\"port\" header is required")?;
    let p: u16 = s
        .parse()
        .map_err(|_| format!("unable to parse {s:?} as a port"))?;
    if p == 0 {
        return Err(format!("port {s:?} must be > 0"));
    }
    Ok(p)
}

/// How long the client -> pod direction may go on once the pod closed its side.
const UPSTREAM_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves one port-forward session until the client closes it.
pub async fn serve(
    conn: Connection,
    mut incoming: mpsc::Receiver<Incoming>,
    req: PortForwardRequest,
    runtime: Arc<dyn StreamRuntime>,
    limits: StreamLimits,
) {
    let pairs: Arc<Mutex<HashMap<String, Pair>>> = Arc::default();
    let streams = Arc::new(Semaphore::new(limits.max_port_forward_streams));
    while let Some(inc) = incoming.recv().await {
        let Ok(stream_slot) = streams.clone().try_acquire_owned() else {
            tracing::debug!(
                max = limits.max_port_forward_streams,
                "port-forward: refusing a stream over the session's limit"
            );
            inc.refuse().await;
            continue;
        };
        let port = parse_port(inc.headers.get("port"));
        let kind = inc.headers.get("streamType").unwrap_or("").to_string();
        let (Ok(port), "data" | "error") = (&port, kind.as_str()) else {
            tracing::debug!(?port, kind, "port-forward: refusing a stream");
            inc.reject().await;
            continue;
        };
        let port = *port;
        let request_id = match inc.headers.get("requestID") {
            Some(r) => r.to_string(),
            // Old clients: derive it from the stream id, as kubelet does.
            None if kind == "error" => inc.id.to_string(),
            None => inc.id.saturating_sub(2).to_string(),
        };
        let Ok(stream) = inc.accept().await else {
            break;
        };
        enum Next {
            Duplicate(Option<crate::spdy::StreamWriter>),
            Wait(bool),
            Ready(Pair),
        }
        let next = {
            let mut g = pairs.lock().unwrap_or_else(|p| p.into_inner());
            let fresh = !g.contains_key(&request_id);
            let pair = g.entry(request_id.clone()).or_default();
            let slot = if kind == "data" {
                &mut pair.data
            } else {
                &mut pair.error
            };
            if slot.is_some() {
                Next::Duplicate(pair.error.as_ref().map(|e| e.writer()))
            } else {
                *slot = Some(stream);
                pair.slots.push(stream_slot);
                if pair.data.is_some() && pair.error.is_some() {
                    Next::Ready(g.remove(&request_id).unwrap_or_default())
                } else {
                    Next::Wait(fresh)
                }
            }
        };
        let ready = match next {
            Next::Duplicate(w) => {
                if let Some(w) = w {
                    let msg = format!(
                        "error processing stream for request {request_id}: {kind} stream already assigned"
                    );
                    let _ = w.write(msg.as_bytes()).await;
                }
                continue;
            }
            Next::Wait(fresh) => {
                if fresh {
                    // A pair that never completes is dropped after the creation timeout.
                    let pairs = pairs.clone();
                    let id = request_id.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(STREAM_CREATION_TIMEOUT).await;
                        let stale = pairs.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                        if let Some(Pair { error: Some(e), .. }) = stale {
                            let w = e.writer();
                            let _ = w
                                .write(
                                    format!("request {id}: timed out waiting for streams")
                                        .as_bytes(),
                                )
                                .await;
                            w.reset().await;
                        }
                    });
                }
                None
            }
            Next::Ready(p) => Some(p),
        };
        if let Some(Pair {
            data: Some(d),
            error: Some(e),
            slots,
        }) = ready
        {
            let port = parse_port(d.headers().get("port")).unwrap_or(port);
            let rt = runtime.clone();
            let pod = req.pod_sandbox_id.clone();
            tokio::spawn(async move {
                forward(d, e, rt, pod, port).await;
                drop(slots);
            });
        }
    }
    conn.close().await;
}

async fn forward(data: Stream, error: Stream, rt: Arc<dyn StreamRuntime>, pod: String, port: u16) {
    // berth only writes the error stream: what a client sends there is dropped.
    let ew = error.into_writer();
    let tcp = match rt.port_forward(pod.clone(), port).await {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("error forwarding port {port} to pod {pod}, uid : {e}");
            let _ = ew.write(msg.as_bytes()).await;
            let (_, dw) = data.split();
            dw.reset().await;
            ew.reset().await;
            return;
        }
    };
    let (mut rd, mut wr) = tcp.into_split();
    let (mut rx, dw) = data.split();
    let dw2 = dw.clone();
    let upstream = tokio::spawn(async move {
        // client -> pod; the client's FIN shuts our write side.
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if dw2.write(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = dw.close().await;
    // The pod side is done. client-go waits for the error stream to end before it closes
    // its local connection (so before its data stream's FIN), so waiting for that FIN
    // would hang every connection: give the client a moment, as containerd does, then stop.
    let mut upstream = upstream;
    if tokio::time::timeout(UPSTREAM_GRACE, &mut upstream)
        .await
        .is_err()
    {
        upstream.abort();
    }
    // Success: the error stream ends with no bytes.
    let _ = ew.close().await;
}
