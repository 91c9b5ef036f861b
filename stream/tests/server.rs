//! The streaming server end to end over real TCP, with a scripted runtime at the
//! `StreamRuntime` boundary: exec and port-forward through berth's client, the
//! HTTP refusals, and raw SPDY bytes built by hand (not by berth's encoder).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use berth_stream::client::{self, ClientError, CommandIo};
use berth_stream::limits::StreamLimits;
use berth_stream::runtime::BoxFuture;
use berth_stream::*;
use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes stdin upper-cased to stdout, writes "warn\n" to stderr, exits with the
/// number in argv[1]; port-forward connects to 127.0.0.1:<port>.
struct Scripted;

impl StreamRuntime for Scripted {
    fn exec(&self, req: ExecRequest, mut io: SessionIo) -> BoxFuture<ExecOutcome> {
        Box::pin(async move {
            if let Some(err) = &io.stderr {
                let _ = err.send(Bytes::from_static(b"warn\n")).await;
            }
            if let (Some(mut input), Some(out)) = (io.stdin.take(), io.stdout.clone()) {
                while let Some(b) = input.recv().await {
                    let _ = out.send(Bytes::from(b.to_ascii_uppercase())).await;
                }
            } else if let Some(out) = &io.stdout {
                let _ = out
                    .send(Bytes::from(format!("ran {}\n", req.cmd.join(" "))))
                    .await;
            }
            match req.cmd.get(1).and_then(|c| c.parse().ok()) {
                Some(code) => ExecOutcome::Exited(code),
                None => ExecOutcome::Failed("no such command".into()),
            }
        })
    }
    fn attach(&self, _req: AttachRequest, _io: SessionIo) -> BoxFuture<Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn port_forward(
        &self,
        _pod: String,
        port: u16,
    ) -> BoxFuture<Result<tokio::net::TcpStream, String>> {
        Box::pin(async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| e.to_string())
        })
    }
}

async fn server() -> Arc<StreamServer> {
    server_with(StreamLimits::default()).await
}

async fn server_with(limits: StreamLimits) -> Arc<StreamServer> {
    StreamServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(Scripted),
        None,
        limits,
    )
    .await
    .unwrap()
}

fn exec_req(cmd: &[&str], stdin: bool) -> StreamRequest {
    StreamRequest::Exec(ExecRequest {
        container_id: "c1".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty: false,
        stdin,
        stdout: true,
        stderr: true,
    })
}

#[tokio::test]
async fn exec_streams_and_exit_codes() {
    let s = server().await;
    let url = s.url_for(exec_req(&["sh", "3"], true)).unwrap();
    assert!(url.starts_with("http://127.0.0.1:") && url.contains("/exec/"));
    let (mut out_r, out_w) = tokio::io::duplex(1 << 20);
    let (mut err_r, err_w) = tokio::io::duplex(1 << 20);
    let input = &b"hello\nworld\n"[..];
    let code = client::run_command(
        &url,
        CommandIo {
            stdin: Some(input),
            stdout: Some(out_w),
            stderr: Some(err_w),
            tty: false,
            resize: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(code, 3);
    let mut out = String::new();
    out_r.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "HELLO\nWORLD\n");
    let mut err = String::new();
    err_r.read_to_string(&mut err).await.unwrap();
    assert_eq!(err, "warn\n");

    // Success, and a runtime failure reported as the server's message.
    let url = s.url_for(exec_req(&["true", "0"], false)).unwrap();
    let none: Option<&[u8]> = None;
    let code = client::run_command(
        &url,
        CommandIo {
            stdin: none,
            stdout: Some(tokio::io::sink()),
            stderr: Some(tokio::io::sink()),
            tty: false,
            resize: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(code, 0);
    let url = s.url_for(exec_req(&["x"], false)).unwrap();
    let r = client::run_command(
        &url,
        CommandIo {
            stdin: none,
            stdout: Some(tokio::io::sink()),
            stderr: Some(tokio::io::sink()),
            tty: false,
            resize: None,
        },
    )
    .await;
    match r {
        Err(ClientError::Remote(m)) => assert_eq!(
            m,
            "Internal error occurred: error executing command in container: no such command"
        ),
        other => panic!("{other:?}"),
    }
    // The token was used up.
    let again = client::run_command(
        &url,
        CommandIo {
            stdin: none,
            stdout: Some(tokio::io::sink()),
            stderr: Some(tokio::io::sink()),
            tty: false,
            resize: None,
        },
    )
    .await;
    assert!(
        matches!(again, Err(ClientError::Upgrade { status: 404, .. })),
        "{again:?}"
    );
}

/// Sends raw HTTP and returns the response head and the socket.
fn raw_upgrade(url: &str, protocols: &[&str]) -> (String, std::net::TcpStream) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut tcp = std::net::TcpStream::connect(host).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    );
    for p in protocols {
        req.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    tcp.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut b).unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    (String::from_utf8_lossy(&head).into_owned(), tcp)
}

fn read_exact(tcp: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    tcp.read_exact(&mut v).unwrap();
    v
}

/// Reads one frame: (8-byte header, payload).
fn read_frame(tcp: &mut std::net::TcpStream) -> (Vec<u8>, Vec<u8>) {
    let h = read_exact(tcp, 8);
    let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
    (h, read_exact(tcp, len))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_spdy_bytes_match_the_spec() {
    let s = server().await;
    let url = s.url_for(exec_req(&["sh", "0"], false)).unwrap();
    tokio::task::spawn_blocking(move || {
        let (head, mut tcp) = raw_upgrade(&url, &["v4.channel.k8s.io", "v3.channel.k8s.io"]);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(
            lower.contains("upgrade: spdy/3.1") && lower.contains("connection: upgrade"),
            "{head}"
        );
        assert!(
            lower.contains("x-stream-protocol-version: v4.channel.k8s.io"),
            "{head}"
        );

        // error (1), stdout (3), stderr (5): client-go's order, header blocks on one
        // zlib stream with the SPDY/3 dictionary.
        let streams = [(1u32, "error"), (3, "stdout"), (5, "stderr")];
        tcp.write_all(&syn_streams(&streams)).unwrap();
        for (id, _) in streams {
            let (h, p) = read_frame(&mut tcp);
            assert_eq!(
                &h[..5],
                &[0x80, 0x03, 0x00, 0x02, 0x00],
                "SYN_REPLY, no flags"
            );
            assert_eq!(&p[..4], &id.to_be_bytes());
            if id == 1 {
                assert_eq!(
                    &p[4..10],
                    &[0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2],
                    "zlib header with FDICT"
                );
            }
            assert_eq!(&p[p.len() - 4..], &[0, 0, 0xff, 0xff], "sync flush");
        }
        // Our PING (odd id) is echoed verbatim.
        tcp.write_all(&[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 7])
            .unwrap();
        let mut frames = Vec::new();
        // Until the error stream's FIN; then the client hangs up and the server says GOAWAY.
        loop {
            let (h, p) = read_frame(&mut tcp);
            let fin_on_error = h[..4] == [0, 0, 0, 1] && h[4] & 1 == 1;
            frames.push((h, p));
            if fin_on_error {
                break;
            }
        }
        tcp.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest);
        let mut at = 0;
        while at + 8 <= rest.len() {
            let len = u32::from_be_bytes([0, rest[at + 5], rest[at + 6], rest[at + 7]]) as usize;
            frames.push((
                rest[at..at + 8].to_vec(),
                rest[at + 8..at + 8 + len].to_vec(),
            ));
            at += 8 + len;
        }
        assert_eq!(at, rest.len(), "whole frames only");
        let data_of = |id: u32| -> (Vec<u8>, bool) {
            let mut v = Vec::new();
            let mut fin = false;
            for (h, p) in &frames {
                if h[0] & 0x80 == 0 && u32::from_be_bytes([h[0], h[1], h[2], h[3]]) == id {
                    v.extend(p);
                    fin |= h[4] & 1 == 1;
                }
            }
            (v, fin)
        };
        assert!(
            frames
                .iter()
                .any(|(h, p)| h[..8] == [0x80, 0x03, 0x00, 0x06, 0, 0, 0, 4]
                    && p[..] == [0, 0, 0, 7]),
            "ping echoed"
        );
        assert_eq!(data_of(3), (b"ran sh 0\n".to_vec(), true));
        assert_eq!(data_of(5), (b"warn\n".to_vec(), true));
        assert_eq!(
            data_of(1),
            (br#"{"metadata":{},"status":"Success"}"#.to_vec(), true)
        );
        let (gh, gp) = frames.last().unwrap();
        assert_eq!(&gh[..8], &[0x80, 0x03, 0x00, 0x07, 0, 0, 0, 8]);
        assert_eq!(
            gp,
            &[0, 0, 0, 5, 0, 0, 0, 0],
            "GOAWAY names the last client stream, status OK"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_kubelets() {
    let s = server().await;
    let base = s.base_url().to_string();
    let (head, _) = tokio::task::spawn_blocking(move || {
        raw_upgrade(&format!("{base}/exec/AAAAAAAA"), &["v4.channel.k8s.io"])
    })
    .await
    .unwrap();
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let url = s.url_for(exec_req(&["a", "0"], false)).unwrap();
    let wrong = url.replace("/exec/", "/attach/");
    let (head, _) =
        tokio::task::spawn_blocking(move || raw_upgrade(&wrong, &["v4.channel.k8s.io"]))
            .await
            .unwrap();
    assert!(head.starts_with("HTTP/1.1 404"), "wrong kind: {head}");
    let url2 = url.clone();
    let (head, _) = tokio::task::spawn_blocking(move || raw_upgrade(&url2, &["v4.channel.k8s.io"]))
        .await
        .unwrap();
    assert!(
        head.starts_with("HTTP/1.1 404"),
        "consumed by the wrong-kind attempt: {head}"
    );
    let url = s.url_for(exec_req(&["a", "0"], false)).unwrap();
    let (head, _) = tokio::task::spawn_blocking(move || raw_upgrade(&url, &[]))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let url = s.url_for(exec_req(&["a", "0"], false)).unwrap();
    let (head, mut tcp) =
        tokio::task::spawn_blocking(move || raw_upgrade(&url, &["v9.channel.k8s.io"]))
            .await
            .unwrap();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-accepted-stream-protocol-versions: v4.channel.k8s.io"),
        "{head}"
    );
    let body = tokio::task::spawn_blocking(move || {
        let mut b = vec![0u8; 200];
        let n = tcp.read(&mut b).unwrap_or(0);
        String::from_utf8_lossy(&b[..n]).into_owned()
    })
    .await
    .unwrap();
    assert!(
        body.starts_with(
            "unable to upgrade: unable to negotiate protocol: client supports [v9.channel.k8s.io]"
        ),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_pairs_ten_parallel_connections() {
    // A TCP echo server standing in for the pod's port.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = echo.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let s = server().await;
    let url = s
        .url_for(StreamRequest::PortForward(PortForwardRequest {
            pod_sandbox_id: "p1".into(),
            ports: vec![port],
        }))
        .unwrap();
    let conn = client::connect_port_forward(&url).await.unwrap();
    let local = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let laddr = local.local_addr().unwrap();
    let c2 = conn.clone();
    tokio::spawn(async move {
        let mut id = 0;
        loop {
            let Ok((sock, _)) = local.accept().await else {
                return;
            };
            let c = c2.clone();
            tokio::spawn(async move { client::forward_one(&c, id, port, sock).await });
            id += 1;
        }
    });
    let mut tasks = Vec::new();
    for i in 0..10 {
        tasks.push(tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(laddr).await.unwrap();
            let msg = format!("request {i} ").repeat(1000);
            c.write_all(msg.as_bytes()).await.unwrap();
            c.shutdown().await.unwrap();
            let mut back = String::new();
            c.read_to_string(&mut back).await.unwrap();
            assert_eq!(back, msg);
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .unwrap()
            .unwrap();
    }
    // A closed port: the error stream says so.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (client_side, server_side) = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ad = l.local_addr().unwrap();
        let c = tokio::net::TcpStream::connect(ad).await.unwrap();
        (c, l.accept().await.unwrap().0)
    };
    drop(client_side);
    let r = client::forward_one(&conn, 100, dead, server_side).await;
    match r {
        Err(ClientError::Remote(m)) => assert!(
            m.starts_with(&format!("error forwarding port {dead} to pod p1, uid : ")),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_exec_v5_and_raw_channel_frames() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let s = server().await;
    // v5 through berth's client: stdin, its close signal, the exit code.
    let url = s.url_for(exec_req(&["sh", "7"], true)).unwrap();
    let (mut out_r, out_w) = tokio::io::duplex(1 << 16);
    let (mut err_r, err_w) = tokio::io::duplex(1 << 16);
    let code = client::run_command_ws(
        &url,
        CommandIo {
            stdin: Some(&b"quiet\n"[..]),
            stdout: Some(out_w),
            stderr: Some(err_w),
            tty: false,
            resize: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(code, 7);
    let mut out = String::new();
    out_r.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "QUIET\n");
    let mut err = String::new();
    err_r.read_to_string(&mut err).await.unwrap();
    assert_eq!(err, "warn\n");

    // Raw messages, binary framing (v4).
    let url = s.url_for(exec_req(&["sh", "0"], false)).unwrap();
    let (ws, proto) = client::ws_connect(&url, &["v4.channel.k8s.io"])
        .await
        .unwrap();
    assert_eq!(proto, "v4.channel.k8s.io");
    let msgs: Vec<Message> = ws.filter_map(|m| async move { m.ok() }).collect().await;
    assert_eq!(
        msgs[0],
        Message::Binary(vec![0x01].into()),
        "the empty message on stdout opens the session"
    );
    let data: Vec<Vec<u8>> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::Binary(b) => Some(b.to_vec()),
            _ => None,
        })
        .collect();
    assert!(data.contains(&b"\x01ran sh 0\n".to_vec()), "{data:?}");
    assert!(data.contains(&b"\x02warn\n".to_vec()), "{data:?}");
    assert_eq!(
        data.last().unwrap(),
        &b"\x03{\"metadata\":{},\"status\":\"Success\"}".to_vec()
    );
    match msgs.last().unwrap() {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("{other:?}"),
    }

    // base64 framing: an ASCII channel digit and base64 text.
    let url = s.url_for(exec_req(&["sh", "0"], false)).unwrap();
    let (ws, _) = client::ws_connect(&url, &["v4.base64.channel.k8s.io"])
        .await
        .unwrap();
    let msgs: Vec<Message> = ws.filter_map(|m| async move { m.ok() }).collect().await;
    assert_eq!(msgs[0], Message::Text("1".into()));
    assert!(
        msgs.contains(&Message::Text("1cmFuIHNoIDAK".into())),
        "{msgs:?}"
    ); // "ran sh 0\n"

    // An unknown subprotocol is refused with 403.
    let url = s.url_for(exec_req(&["sh", "0"], false)).unwrap();
    match client::ws_connect(&url, &["v9.channel.k8s.io"]).await {
        Err(ClientError::Upgrade { status: 403, .. }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("upgraded"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_port_forward_announces_ports_and_relays() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    // A pod-side server that answers one line and closes (WebSocket port-forward
    // cannot half-close, as in kubelet).
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 1024];
                while !buf.ends_with(b"\n") {
                    match c.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                let _ = c.write_all(&buf.to_ascii_uppercase()).await;
            });
        }
    });
    let s = server().await;
    let pf = |p: u16| {
        StreamRequest::PortForward(PortForwardRequest {
            pod_sandbox_id: "p1".into(),
            ports: vec![p],
        })
    };
    // Raw: the port number, little-endian, opens both channels.
    let url = s.url_for(pf(port)).unwrap();
    let (mut ws, _) = client::ws_connect(&url, &["v4.channel.k8s.io"])
        .await
        .unwrap();
    let le = port.to_le_bytes();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Binary(vec![0, le[0], le[1]].into())
    );
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Binary(vec![1, le[0], le[1]].into())
    );
    drop(ws);
    let mut tasks = Vec::new();
    for i in 0..10 {
        let url = s.url_for(pf(port)).unwrap();
        tasks.push(tokio::spawn(async move {
            let (a, b) = {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let ad = l.local_addr().unwrap();
                let c = tokio::net::TcpStream::connect(ad).await.unwrap();
                (c, l.accept().await.unwrap().0)
            };
            let fwd = tokio::spawn(async move { client::forward_one_ws(&url, b).await });
            let mut a = a;
            a.write_all(format!("hello {i}\n").as_bytes())
                .await
                .unwrap();
            let mut back = String::new();
            a.read_to_string(&mut back).await.unwrap();
            assert_eq!(back, format!("HELLO {i}\n"));
            fwd.await.unwrap().unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .unwrap()
            .unwrap();
    }
}

/// Makes a CA and a server certificate for 127.0.0.1 with openssl; returns
/// (ca.crt, server.crt, server.key).
fn test_pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=berth test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    (dir.join("ca.crt"), dir.join("srv.crt"), dir.join("srv.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_https_urls_over_spdy_and_websocket() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (ca, crt, key) = test_pki(&dir);
    let cfg = berth_stream::tls::server_config(&crt, &key).unwrap();
    let s = StreamServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(Scripted),
        Some(cfg),
        StreamLimits::default(),
    )
    .await
    .unwrap();
    assert!(s.base_url().starts_with("https://127.0.0.1:"));
    let url = s.url_for(exec_req(&["sh", "5"], false)).unwrap();
    // Without trusting the CA the client refuses.
    let none: Option<&[u8]> = None;
    let r = client::run_command(
        &url,
        CommandIo {
            stdin: none,
            stdout: Some(tokio::io::sink()),
            stderr: Some(tokio::io::sink()),
            tty: false,
            resize: None,
        },
    )
    .await;
    assert!(r.is_err());
    berth_stream::tls::trust_ca(&ca).unwrap();
    let url = s.url_for(exec_req(&["sh", "5"], false)).unwrap();
    let (mut out_r, out_w) = tokio::io::duplex(1 << 16);
    let code = client::run_command(
        &url,
        CommandIo {
            stdin: none,
            stdout: Some(out_w),
            stderr: Some(tokio::io::sink()),
            tty: false,
            resize: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(code, 5);
    let mut out = String::new();
    out_r.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "ran sh 5\n");
    let url = s.url_for(exec_req(&["sh", "6"], false)).unwrap();
    let code = client::run_command_ws(
        &url,
        CommandIo {
            stdin: none,
            stdout: Some(tokio::io::sink()),
            stderr: Some(tokio::io::sink()),
            tty: false,
            resize: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(code, 6);
    // A wrong key for the certificate is refused at start, naming the file.
    let bad = berth_stream::tls::server_config(&crt, &dir.join("ca.key"));
    assert!(bad.is_err());
    let missing = berth_stream::tls::server_config(&dir.join("nope.crt"), &key).unwrap_err();
    assert!(missing.to_string().contains("nope.crt"), "{missing}");
}

/// SYN_STREAM frames for `(id, streamType)`s, their header blocks on one zlib stream
/// with the SPDY/3 dictionary (as a client's session compresses them).
fn syn_streams(streams: &[(u32, &str)]) -> Vec<u8> {
    let dict = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/spdy/dictionary.bin"
    ))
    .unwrap();
    let mut z = Compress::new(Compression::default(), true);
    z.set_dictionary(&dict).unwrap();
    let mut out = Vec::new();
    for (id, t) in streams {
        let mut raw = vec![0, 0, 0, 1];
        raw.extend(10u32.to_be_bytes());
        raw.extend(b"streamtype");
        raw.extend((t.len() as u32).to_be_bytes());
        raw.extend(t.as_bytes());
        let mut hb = Vec::with_capacity(512);
        z.compress_vec(&raw, &mut hb, FlushCompress::Sync).unwrap();
        out.extend([0x80, 0x03, 0x00, 0x01, 0x00]);
        out.extend(&((10 + hb.len()) as u32).to_be_bytes()[1..]);
        out.extend(id.to_be_bytes());
        out.extend([0, 0, 0, 0, 0, 0]);
        out.extend(hb);
    }
    out
}

/// A DATA frame over `stream_buffer_bytes` resets its stream (FRAME_TOO_LARGE) and
/// ends the session, never buffered: the command sees its client go, not a clean end
/// of its input (no Success status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_reset_their_stream() {
    let s = server_with(StreamLimits {
        stream_buffer_bytes: 64 * 1024,
        ..Default::default()
    })
    .await;
    let url = s.url_for(exec_req(&["sh", "0"], true)).unwrap();
    tokio::task::spawn_blocking(move || {
        let (head, mut tcp) = raw_upgrade(&url, &["v4.channel.k8s.io"]);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let streams = [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")];
        tcp.write_all(&syn_streams(&streams)).unwrap();
        for _ in 0..4 {
            let (h, _) = read_frame(&mut tcp);
            assert_eq!(&h[..4], &[0x80, 0x03, 0x00, 0x02], "SYN_REPLY");
        }
        // 200 KiB in one DATA frame on stdin, then a small one the stream no longer takes.
        let big = 200 * 1024u32;
        let mut f = 3u32.to_be_bytes().to_vec();
        f.extend(big.to_be_bytes());
        f.extend(vec![b'x'; big as usize]);
        tcp.write_all(&f).unwrap();
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest);
        let (mut reset, mut error_stream, mut at) = (None, Vec::new(), 0);
        while at + 8 <= rest.len() {
            let (h, len) = (
                &rest[at..at + 8],
                u32::from_be_bytes([0, rest[at + 5], rest[at + 6], rest[at + 7]]) as usize,
            );
            let p = rest[at + 8..(at + 8 + len).min(rest.len())].to_vec();
            if h[..4] == [0x80, 0x03, 0x00, 0x03] {
                reset = Some(p);
            } else if h[..4] == [0, 0, 0, 1] {
                error_stream.extend(p);
            }
            at += 8 + len;
        }
        assert_eq!(
            reset.as_deref(),
            Some(&[0, 0, 0, 3, 0, 0, 0, 11][..]),
            "RST_STREAM stream 3, FRAME_TOO_LARGE"
        );
        assert!(
            !String::from_utf8_lossy(&error_stream).contains("Success"),
            "the command was told it succeeded: {}",
            String::from_utf8_lossy(&error_stream)
        );
    })
    .await
    .unwrap();
}

/// At most `max_connections` are served. A new connection takes the place of the
/// oldest one that has not sent a request; idle ones are dropped after
/// `header_timeout`; when every place is a live session, a new one is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_and_idle_ones_make_room() {
    let s = server_with(StreamLimits {
        max_connections: 4,
        header_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let addr = s.base_url().strip_prefix("http://").unwrap().to_string();
    let a2 = addr.clone();
    tokio::task::spawn_blocking(move || {
        let addr = a2;
        let mut idle: Vec<std::net::TcpStream> = (0..4)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let mut fifth = std::net::TcpStream::connect(&addr).unwrap();
        // The oldest idle connection made room for it.
        idle[0]
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!(idle[0].read(&mut b), Ok(0)),
            "the oldest idle connection was not closed"
        );
        fifth
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        fifth
            .write_all(b"GET /exec/nope HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let _ = fifth.read_to_end(&mut answer);
        assert!(
            answer.starts_with(b"HTTP/1.1 404"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        // The others that never send a request are dropped by the header timeout.
        let t0 = std::time::Instant::now();
        for mut c in idle.drain(1..) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        }
        let waited = t0.elapsed();
        assert!(
            waited < Duration::from_secs(4),
            "idle connections lived {waited:?}"
        );
    })
    .await
    .unwrap();
    // Four live sessions take every place: a fifth connection is closed at once.
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let url = s
            .url_for(StreamRequest::PortForward(PortForwardRequest {
                pod_sandbox_id: "p1".into(),
                ports: vec![1],
            }))
            .unwrap();
        sessions.push(client::connect_port_forward(&url).await.unwrap());
    }
    let a3 = addr.clone();
    tokio::task::spawn_blocking(move || {
        let mut over = std::net::TcpStream::connect(&a3).unwrap();
        over.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(over.read(&mut b), Ok(0)), "served over the cap");
    })
    .await
    .unwrap();
    // A session that ends frees its place.
    sessions.pop().unwrap().close().await;
    let url = s.url_for(exec_req(&["sh", "0"], false)).unwrap();
    let mut ran = None;
    for _ in 0..20 {
        let (mut out_r, out_w) = tokio::io::duplex(1 << 16);
        let r = client::run_command(
            &url.clone(),
            CommandIo {
                stdin: None::<&[u8]>,
                stdout: Some(out_w),
                stderr: Some(tokio::io::sink()),
                tty: false,
                resize: None,
            },
        )
        .await;
        if let Ok(code) = r {
            let mut out = String::new();
            out_r.read_to_string(&mut out).await.unwrap();
            ran = Some((code, out));
            break;
        }
        // The URL is single use only once served; the place may take a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ran, Some((0, "ran sh 0\n".to_string())));
}

/// A port-forward session holds at most `max_port_forward_streams`; one more is
/// refused (REFUSED_STREAM), and a finished pair frees its places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_streams_are_capped() {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let s = server_with(StreamLimits {
        max_port_forward_streams: 2,
        ..Default::default()
    })
    .await;
    let url = s
        .url_for(StreamRequest::PortForward(PortForwardRequest {
            pod_sandbox_id: "p1".into(),
            ports: vec![port],
        }))
        .unwrap();
    let conn = client::connect_port_forward(&url).await.unwrap();
    let headers = |t: &str, id: u32| {
        berth_stream::spdy::Headers::default()
            .with("streamType", t)
            .with("port", &port.to_string())
            .with("requestID", &id.to_string())
    };
    let error = conn.open(headers("error", 0)).await.unwrap();
    let data = conn.open(headers("data", 0)).await.unwrap();
    let third = conn.open(headers("error", 1)).await;
    assert!(
        matches!(third, Err(berth_stream::spdy::SpdyError::Refused)),
        "a third stream was accepted"
    );
    data.writer().reset().await;
    error.writer().reset().await;
    // Once the pair is done, its places serve the next connection.
    let mut served = false;
    for i in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (mine, theirs) = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = l.local_addr().unwrap();
            let c = tokio::net::TcpStream::connect(a).await.unwrap();
            (c, l.accept().await.unwrap().0)
        };
        let conn2 = conn.clone();
        let fwd =
            tokio::spawn(async move { client::forward_one(&conn2, 10 + i, port, theirs).await });
        let mut mine = mine;
        mine.write_all(b"ping").await.unwrap();
        mine.shutdown().await.unwrap();
        let mut back = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), mine.read_to_end(&mut back)).await;
        let done = fwd.await.unwrap();
        if done.is_ok() && back == b"ping" {
            served = true;
            break;
        }
    }
    assert!(served, "the freed places were never reused");
    conn.close().await;
}

/// A WebSocket message over `stream_buffer_bytes` ends the session (1009, message too
/// big) instead of being assembled in memory; one under it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_are_capped() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let s = server_with(StreamLimits {
        stream_buffer_bytes: 64 * 1024,
        ..Default::default()
    })
    .await;
    let send = async |size: usize| -> Vec<Message> {
        let url = s.url_for(exec_req(&["sh", "0"], true)).unwrap();
        let (mut ws, _) = client::ws_connect(&url, &["v5.channel.k8s.io"])
            .await
            .unwrap();
        let mut msg = vec![0u8]; // stdin
        msg.extend(std::iter::repeat_n(b'q', size));
        let _ = ws.send(Message::Binary(msg.into())).await;
        let _ = ws.send(Message::Binary(vec![255, 0].into())).await; // stdin done
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            ws.filter_map(|m| async move { m.ok() }).collect::<Vec<_>>(),
        );
        got.await.expect("the session ends")
    };
    let small = send(60 * 1024).await;
    let stdout: usize = small
        .iter()
        .filter_map(|m| match m {
            Message::Binary(b) if b.first() == Some(&1) => Some(b.len() - 1),
            _ => None,
        })
        .sum();
    assert_eq!(
        stdout,
        60 * 1024,
        "a message under the cap is relayed whole"
    );
    let big = send(200 * 1024).await;
    assert!(
        !big.iter()
            .any(|m| matches!(m, Message::Binary(b) if b.first() == Some(&1) && b.len() > 1)),
        "a message over the cap reached the process"
    );
}
