//! Clients berth did not write: grpc-go dialling the socket path as kubelet and crictl
//! up to 1.26 do, Python's grpcio, and raw HTTP/2 frames with every `:authority` a real
//! client sends. Also what the newest kubelet reads from `Status`.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;

use berth_e2e::clients::{CallError, ForeignClient};
use prost::Message as _;

use super::*;

const RUNTIME: &str = "/runtime.v1.RuntimeService/";
const IMAGES: &str = "/runtime.v1.ImageService/";

fn rt(method: &str) -> String {
    format!("{RUNTIME}{method}")
}

/// `Status` as the test expects it from any client: ready, with one handler entry per
/// configured handler plus the default under "", user namespaces and the
/// supplemental-groups policy reported unsupported, and rro exactly where runc has it.
fn check_status(st: &cri::StatusResponse) -> Result<()> {
    let conds = &st.status.as_ref().context("status.status")?.conditions;
    for want in ["RuntimeReady", "NetworkReady"] {
        ensure!(
            conds.iter().any(|c| c.r#type == want && c.status),
            "{want} not true: {conds:?}"
        );
    }
    let names: Vec<&str> = st
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    ensure!(names == ["", "runc"], "runtime_handlers {names:?}");
    let runc_has_rro = Command::new("runc")
        .arg("features")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("\"rro\""))
        .unwrap_or(false);
    for h in &st.runtime_handlers {
        let f = h.features.as_ref().context("handler features")?;
        ensure!(
            !f.user_namespaces,
            "user_namespaces reported for {:?}",
            h.name
        );
        ensure!(
            f.recursive_read_only_mounts == runc_has_rro,
            "recursive_read_only_mounts {} for {:?}, runc features says {runc_has_rro}",
            f.recursive_read_only_mounts,
            h.name
        );
    }
    let features = st.features.as_ref().context("status.features")?;
    ensure!(features.supplemental_groups_policy);
    Ok(())
}

/// A pod and a running container through `client`, then what kubelet does with them.
fn pod_lifecycle(client: &mut ForeignClient, b: &Berthd, image: &str, uid: &str) -> Result<()> {
    let logs = b.dir().join("logs");
    let pod_cfg = container_pod("interop", uid, &logs);
    let pod: cri::RunPodSandboxResponse = client.call(
        &rt("RunPodSandbox"),
        &cri::RunPodSandboxRequest {
            config: Some(pod_cfg.clone()),
            runtime_handler: String::new(),
        },
    )?;
    let pod = pod.pod_sandbox_id;
    ensure!(pod.len() == 64, "pod id {pod:?}");
    let cfg = container_config("srv", image, "echo started; exec sleep 300");
    let created: cri::CreateContainerResponse = client.call(
        &rt("CreateContainer"),
        &cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cfg),
            sandbox_config: Some(pod_cfg),
        },
    )?;
    let id = created.container_id;
    let _: cri::StartContainerResponse = client.call(&rt("StartContainer"), &start(&id))?;
    let exec: cri::ExecSyncResponse = client.call(
        &rt("ExecSync"),
        &cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo $GREETING from $0".into(),
            ],
            timeout: 10,
        },
    )?;
    ensure!(
        exec.exit_code == 0 && exec.stdout == b"hi from /bin/sh\n",
        "{} ExecSync: {exec:?}",
        client.name
    );
    let list: cri::ListContainersResponse = client.call(
        &rt("ListContainers"),
        &cri::ListContainersRequest::default(),
    )?;
    ensure!(
        list.containers.iter().any(|c| c.id == id
            && c.pod_sandbox_id == pod
            && c.state == cri::ContainerState::ContainerRunning as i32),
        "ListContainers: {:?}",
        list.containers
    );
    let stats: cri::ContainerStatsResponse = client.call(
        &rt("ContainerStats"),
        &cri::ContainerStatsRequest {
            container_id: id.clone(),
        },
    )?;
    let stats = stats.stats.context("ContainerStats.stats")?;
    ensure!(
        stats.attributes.as_ref().is_some_and(|a| a.id == id)
            && stats
                .memory
                .as_ref()
                .and_then(|m| m.working_set_bytes.as_ref())
                .is_some_and(|w| w.value > 0),
        "ContainerStats: {stats:?}"
    );
    // An error carries its code and message through the foreign client.
    let missing = client.unary::<_, cri::ContainerStatusResponse>(
        &rt("ContainerStatus"),
        &cri::ContainerStatusRequest {
            container_id: "ab".repeat(32),
            verbose: false,
        },
    )?;
    match missing {
        Err(CallError { code: 5, message }) if message.contains("not found") => {}
        other => bail!(
            "{} ContainerStatus of an unknown id: {other:?}",
            client.name
        ),
    }
    let _: cri::StopPodSandboxResponse = client.call(
        &rt("StopPodSandbox"),
        &cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        },
    )?;
    let _: cri::RemovePodSandboxResponse = client.call(
        &rt("RemovePodSandbox"),
        &cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        },
    )?;
    let pods: cri::ListPodSandboxResponse = client.call(
        &rt("ListPodSandbox"),
        &cri::ListPodSandboxRequest::default(),
    )?;
    ensure!(
        !pods.items.iter().any(|p| p.id == pod),
        "pod still listed after removal"
    );
    Ok(())
}

/// grpc-go 1.33 from Debian, dialling the socket path (so `:authority` is that path),
/// drives a whole pod lifecycle; every answer is decoded and checked.
pub fn grpc_go_client_over_the_socket_path() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut go = ForeignClient::go(&b.socket)?;
        let v: cri::VersionResponse = go.call(
            &rt("Version"),
            &cri::VersionRequest {
                version: "v1".into(),
            },
        )?;
        ensure!(
            v.runtime_name == "berth" && v.runtime_api_version == "v1",
            "Version: {v:?}"
        );
        let st: cri::StatusResponse =
            go.call(&rt("Status"), &cri::StatusRequest { verbose: false })?;
        check_status(&st)?;
        let pulled: cri::PullImageResponse = go.call(
            &format!("{IMAGES}PullImage"),
            &cri::PullImageRequest {
                image: spec(&w.busybox.reference),
                ..Default::default()
            },
        )?;
        ensure!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");
        pod_lifecycle(&mut go, &b, &w.busybox.reference, "go-1")?;
        // A server-streaming call as kubelet's evented PLEG makes it: the pod's
        // CREATED and STARTED events, decoded by grpc-go, with the pod's status.
        let before = super::ctl::subscribers(&b)?;
        let events = std::thread::spawn(move || {
            go.stream::<_, cri::ContainerEventResponse>(
                &rt("GetContainerEvents"),
                &cri::GetEventsRequest {},
                2,
                20000,
            )
        });
        while super::ctl::subscribers(&b)? == before {
            ensure!(
                !events.is_finished(),
                "the grpc-go stream ended before subscribing"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut c = b.client().await?;
        let pod = run_pod(&mut c, pod_config("go-events", "go-ev")).await?;
        let got = events
            .join()
            .map_err(|_| anyhow!("the grpc-go stream thread panicked"))??;
        let seen: Vec<(&str, i32)> = got
            .messages
            .iter()
            .map(|m| (m.container_id.as_str(), m.container_event_type))
            .collect();
        let want = [
            (
                pod.as_str(),
                cri::ContainerEventType::ContainerCreatedEvent as i32,
            ),
            (
                pod.as_str(),
                cri::ContainerEventType::ContainerStartedEvent as i32,
            ),
        ];
        ensure!(
            seen == want,
            "GetContainerEvents via grpc-go: {seen:?} ({:?})",
            got.end
        );
        ensure!(
            got.messages[1]
                .pod_sandbox_status
                .as_ref()
                .is_some_and(|s| s.id == pod),
            "{:?}",
            got.messages[1]
        );
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "interop")?;
        Ok(())
    })
}

/// Python's grpcio, with its default `:authority` for unix targets and with the socket
/// path as authority.
pub fn grpcio_python_client() -> Result<(), Failed> {
    run(|| async {
        if berth_e2e::clients::python_grpc_path().is_none() {
            ensure!(
                std::env::var_os("CI").is_none(),
                "grpcio is missing under target/python (deploy/test.sh installs it)"
            );
            eprintln!(
                "skipped: grpcio is not installed under target/python (deploy/test.sh installs it)"
            );
            return Ok(());
        }
        let w = world();
        let b = Berthd::start("")?;
        let path = b.socket.display().to_string();
        for authority in [None, Some(path.as_str())] {
            let mut py = ForeignClient::python(&b.socket, authority)?;
            let v: cri::VersionResponse =
                py.call(&rt("Version"), &cri::VersionRequest::default())?;
            ensure!(v.runtime_name == "berth", "{v:?}");
            let st: cri::StatusResponse = py.call(&rt("Status"), &cri::StatusRequest::default())?;
            check_status(&st)?;
            let _: cri::PullImageResponse = py.call(
                &format!("{IMAGES}PullImage"),
                &cri::PullImageRequest {
                    image: spec(&w.busybox.reference),
                    ..Default::default()
                },
            )?;
            let images: cri::ListImagesResponse = py.call(
                &format!("{IMAGES}ListImages"),
                &cri::ListImagesRequest::default(),
            )?;
            ensure!(
                images
                    .images
                    .iter()
                    .any(|i| i.repo_tags.contains(&w.busybox.reference)),
                "ListImages: {:?}",
                images.images
            );
        }
        let mut py = ForeignClient::python(&b.socket, Some(&path))?;
        pod_lifecycle(&mut py, &b, &w.busybox.reference, "py-1")?;
        assert_no_pod_leftovers(&b, "interop")?;
        Ok(())
    })
}

// ------------------------------------------------------------ raw HTTP/2 ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 5.1), first byte's high bits clear.
fn hpack_int(out: &mut Vec<u8>, mut v: usize, n: u32) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(v as u8);
        return;
    }
    out.push(max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of "literal without indexing, new name" fields, no Huffman: the
/// plainest HPACK a client can send.
fn hpack_literal(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0);
        hpack_int(&mut out, name.len(), 7);
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, value.len(), 7);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// What came back for stream 1.
#[derive(Debug, Default)]
struct RawAnswer {
    headers: Vec<(String, String)>,
    trailers: Vec<(String, String)>,
    body: Vec<u8>,
    reset: Option<u32>,
    goaway: bool,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .chain(&self.trailers)
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn read_frame(s: &mut UnixStream) -> Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    s.read_exact(&mut payload)?;
    Ok((head[3], head[4], stream, payload))
}

/// One gRPC call written as raw HTTP/2 frames on a fresh connection to `socket`.
fn raw_call(socket: &Path, headers: &[(&str, &str)], message: &[u8]) -> Result<RawAnswer> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut grpc = vec![0u8];
    grpc.extend_from_slice(&(message.len() as u32).to_be_bytes());
    grpc.extend_from_slice(message);
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    // A header block larger than a frame goes on in CONTINUATION frames.
    let block = hpack_literal(headers);
    let mut chunks = block.chunks(16 << 10).peekable();
    let mut kind = HEADERS;
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        out.extend(frame(kind, if last { END_HEADERS } else { 0 }, 1, chunk));
        kind = CONTINUATION;
    }
    out.extend(frame(DATA, END_STREAM, 1, &grpc));
    s.write_all(&out)?;
    read_answer(&mut s)
}

/// Reads frames until stream 1 ends (or the connection does).
fn read_answer(s: &mut UnixStream) -> Result<RawAnswer> {
    let mut decoder = loona_hpack::Decoder::new();
    let mut answer = RawAnswer::default();
    loop {
        let (kind, flags, stream, payload) = read_frame(s)?;
        match (kind, stream) {
            (SETTINGS, 0) if flags & 1 == 0 => s.write_all(&frame(SETTINGS, 1, 0, &[]))?,
            (HEADERS, 1) => {
                let fields = decoder
                    .decode(&payload)
                    .map_err(|e| anyhow!("HPACK: {e:?}"))?
                    .into_iter()
                    .map(|(n, v)| {
                        (
                            String::from_utf8_lossy(&n).into_owned(),
                            String::from_utf8_lossy(&v).into_owned(),
                        )
                    });
                if answer.headers.is_empty() {
                    answer.headers.extend(fields);
                } else {
                    answer.trailers.extend(fields);
                }
                if flags & END_STREAM != 0 {
                    return Ok(answer);
                }
            }
            (DATA, 1) => {
                answer.body.extend_from_slice(&payload);
                if flags & END_STREAM != 0 {
                    return Ok(answer);
                }
            }
            (RST_STREAM, 1) => {
                answer.reset = payload
                    .get(..4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                return Ok(answer);
            }
            (GOAWAY, _) => {
                answer.goaway = true;
                return Ok(answer);
            }
            _ => {}
        }
    }
}

/// Version over raw frames with `authority` (None = no `:authority` at all).
fn raw_version(socket: &Path, authority: Option<&str>, scheme: bool) -> Result<RawAnswer> {
    let mut headers = vec![(":method", "POST")];
    if scheme {
        headers.push((":scheme", "http"));
    }
    headers.push((":path", "/runtime.v1.RuntimeService/Version"));
    if let Some(a) = authority {
        headers.push((":authority", a));
    }
    headers.extend([("content-type", "application/grpc"), ("te", "trailers")]);
    let req = cri::VersionRequest {
        version: "v1".into(),
    }
    .encode_to_vec();
    raw_call(socket, &headers, &req)
}

/// Raw HTTP/2 with the `:authority` values real clients send over a unix socket (the
/// socket path, plain or percent-encoded, empty, none, `localhost`, a `unix://` target) gets a real gRPC answer;
/// the rest of the request head is as strict as before (a malformed authority that is no
/// socket form, a missing `:scheme`: the stream is reset).
pub fn raw_http2_authorities() -> Result<(), Failed> {
    run(|| async {
        let b = Berthd::start("")?;
        let path = b.socket.display().to_string();
        let unix_target = format!("unix://{path}");
        // grpc-core (Python's grpcio) sends the path without its leading '/', escaped.
        let escaped = path.trim_start_matches('/').replace('/', "%2F");
        for authority in [
            Some(path.as_str()),
            Some(escaped.as_str()),
            Some(""),
            None,
            Some("localhost"),
            Some(unix_target.as_str()),
        ] {
            let a = raw_version(&b.socket, authority, true)?;
            ensure!(
                a.reset.is_none() && a.header(":status") == Some("200"),
                "authority {authority:?}: {a:?}"
            );
            ensure!(
                a.header("grpc-status") == Some("0"),
                "authority {authority:?}: {a:?}"
            );
            ensure!(
                a.body.len() > 5 && a.body[0] == 0,
                "authority {authority:?}: body {:?}",
                a.body
            );
            let v = cri::VersionResponse::decode(&a.body[5..])?;
            ensure!(v.runtime_name == "berth", "authority {authority:?}: {v:?}");
        }
        const PROTOCOL_ERROR: u32 = 1;
        for (authority, scheme, what) in [
            (Some("bad authority"), true, "a malformed authority"),
            (Some(path.as_str()), false, "a missing :scheme"),
        ] {
            let a = raw_version(&b.socket, authority, scheme)?;
            ensure!(
                a.reset == Some(PROTOCOL_ERROR) && a.body.is_empty(),
                "{what} was not refused: {a:?}"
            );
        }
        Ok(())
    })
}

/// The SETTINGS the server sends first on a new connection.
fn server_settings(socket: &Path) -> Result<Vec<(u16, u32)>> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    s.write_all(&out)?;
    loop {
        let (kind, flags, _, payload) = read_frame(&mut s)?;
        if kind == SETTINGS && flags & 1 == 0 {
            return Ok(payload
                .chunks(6)
                .map(|c| {
                    (
                        u16::from_be_bytes([c[0], c[1]]),
                        u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                    )
                })
                .collect());
        }
    }
}

/// The CRI socket bounds what one connection may ask for, as it tells every client in
/// its SETTINGS: at most 1024 concurrent streams and a 64 KiB header list. A request
/// whose headers exceed that is refused without reaching a handler; the connection
/// still serves the next call.
pub fn http2_limits_on_the_cri_socket() -> Result<(), Failed> {
    run(|| async {
        let b = Berthd::start("")?;
        const MAX_CONCURRENT_STREAMS: u16 = 0x3;
        const MAX_HEADER_LIST_SIZE: u16 = 0x6;
        let settings = server_settings(&b.socket)?;
        let get = |id| settings.iter().find(|(k, _)| *k == id).map(|(_, v)| *v);
        ensure!(get(MAX_CONCURRENT_STREAMS) == Some(1024), "{settings:?}");
        ensure!(get(MAX_HEADER_LIST_SIZE) == Some(64 << 10), "{settings:?}");
        let path = b.socket.display().to_string();
        let big = "x".repeat(100 << 10);
        let headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/runtime.v1.RuntimeService/Version"),
            (":authority", path.as_str()),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("x-padding", big.as_str()),
        ];
        let req = cri::VersionRequest {
            version: "v1".into(),
        }
        .encode_to_vec();
        let a = raw_call(&b.socket, &headers, &req)?;
        ensure!(
            a.header("grpc-status") != Some("0") && a.body.is_empty(),
            "a 100 KiB header list was served: {a:?}"
        );
        ensure!(
            a.reset.is_some() || a.goaway || a.header(":status") == Some("431"),
            "{a:?}"
        );
        // berthd itself is unharmed.
        let ok = raw_version(&b.socket, Some(&path), true)?;
        ensure!(ok.header("grpc-status") == Some("0"), "{ok:?}");
        Ok(())
    })
}

// ----------------------------------------------------- handler features ----

fn bind(
    host: &Path,
    at: &str,
    readonly: bool,
    rro: bool,
    propagation: cri::MountPropagation,
) -> cri::Mount {
    cri::Mount {
        container_path: at.into(),
        host_path: host.display().to_string(),
        readonly,
        recursive_read_only: rro,
        propagation: propagation as i32,
        ..Default::default()
    }
}

/// What `Status` reports per handler is what CreateContainer does: with runc (which
/// lists "rro" here) a recursive read-only mount makes a submount read-only too, where a
/// plain read-only bind leaves it writable; crun (no `features`) is reported without it
/// and such a mount is refused naming the field; bad combinations are refused.
pub fn recursive_read_only_mounts_as_reported() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("[runtimes.crun]\npath = \"crun\"\n")?;
        let mut c = b.client().await?;
        let st = c
            .runtime
            .status(cri::StatusRequest::default())
            .await?
            .into_inner();
        let rro_of = |name: &str| {
            st.runtime_handlers
                .iter()
                .find(|h| h.name == name)
                .and_then(|h| h.features.as_ref())
                .map(|f| f.recursive_read_only_mounts)
        };
        let names: Vec<&str> = st
            .runtime_handlers
            .iter()
            .map(|h| h.name.as_str())
            .collect();
        ensure!(names == ["", "crun", "runc"], "runtime_handlers {names:?}");
        ensure!(rro_of("crun") == Some(false), "crun reported with rro");
        ensure!(
            rro_of("") == rro_of("runc"),
            "the default entry differs from runc"
        );
        let runc_rro = rro_of("runc") == Some(true);

        pull(&mut c, &w.busybox.reference).await?;
        let src = b.dir().join("rro-src");
        std::fs::create_dir_all(src.join("sub"))?;
        nix::mount::mount(
            Some("tmpfs"),
            &src.join("sub"),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("rro", "rro-1", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let private = cri::MountPropagation::PropagationPrivate;
        let with_mount = |name: &str, m: cri::Mount| {
            let mut cfg = container_config(name, &w.busybox.reference, "exec sleep 300");
            cfg.mounts = vec![m];
            cfg
        };
        let created = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            with_mount("rro", bind(&src, "/data", true, true, private)),
        )
        .await;
        if runc_rro {
            let id = created?;
            c.runtime.start_container(start(&id)).await?;
            let (code, _, err) =
                exec_in(&mut c, &id, &["/bin/sh", "-c", "echo x > /data/sub/f"]).await?;
            ensure!(
                code != 0 && err.contains("Read-only"),
                "rro submount writable: {code} {err}"
            );
        } else {
            expect_code(
                created,
                Code::InvalidArgument,
                "config.mounts[0].recursive_read_only",
            )?;
        }
        let id = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            with_mount("ro", bind(&src, "/data", true, false, private)),
        )
        .await?;
        c.runtime.start_container(start(&id)).await?;
        let (code, _, err) =
            exec_in(&mut c, &id, &["/bin/sh", "-c", "echo x > /data/sub/f"]).await?;
        ensure!(
            code == 0,
            "a plain ro bind made its submount read-only: {err}"
        );
        let (code, _, _) = exec_in(&mut c, &id, &["/bin/sh", "-c", "echo x > /data/f"]).await?;
        ensure!(code != 0, "a ro bind is writable");
        for (m, needle) in [
            (bind(&src, "/data", false, true, private), "needs readonly"),
            (
                bind(
                    &src,
                    "/data",
                    true,
                    true,
                    cri::MountPropagation::PropagationHostToContainer,
                ),
                "needs private propagation",
            ),
        ] {
            let e = create_ctr(&mut c, &pod, &pod_cfg, with_mount("bad", m)).await;
            expect_code(e, Code::InvalidArgument, needle)?;
        }
        remove_pod(&mut c, &pod).await?;
        // The same mount on a crun pod is refused before anything is made.
        let crun_cfg = container_pod("rro", "rro-2", &logs);
        let crun_pod = c
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(crun_cfg.clone()),
                runtime_handler: "crun".into(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        let e = create_ctr(
            &mut c,
            &crun_pod,
            &crun_cfg,
            with_mount("rro", bind(&src, "/data", true, true, private)),
        )
        .await;
        expect_code(
            e,
            Code::InvalidArgument,
            "does not support recursive read-only",
        )?;
        remove_pod(&mut c, &crun_pod).await?;
        nix::mount::umount2(&src.join("sub"), nix::mount::MntFlags::MNT_DETACH)?;
        assert_no_pod_leftovers(&b, "rro")?;
        Ok(())
    })
}

/// berthd's log on a file has no ANSI escapes; `log_format = "json"` writes one JSON
/// object per line.
pub fn berthd_log_formats() -> Result<(), Failed> {
    run(|| async {
        let b = Berthd::start("")?;
        b.client()
            .await?
            .runtime
            .version(cri::VersionRequest::default())
            .await?;
        let text = std::fs::read_to_string(&b.log)?;
        ensure!(text.contains("berthd serving CRI v1"), "{text}");
        ensure!(!text.contains('\x1b'), "escape codes in the log: {text:?}");
        drop(b);
        let b = Berthd::start("log_format = \"json\"\n")?;
        let mut c = b.client().await?;
        c.runtime.status(cri::StatusRequest::default()).await?;
        let mut b = b;
        b.terminate()?;
        let text = std::fs::read_to_string(&b.log)?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("a log line is not JSON: {text}"))?;
        ensure!(
            lines
                .iter()
                .any(|l| l["fields"]["message"] == "berthd serving CRI v1"
                    && l["level"] == "INFO"
                    && l["timestamp"].is_string()),
            "{text}"
        );
        ensure!(
            lines
                .iter()
                .all(|l| l["level"].is_string() && l["target"].is_string()),
            "{text}"
        );
        Ok(())
    })
}

// ------------------------------------------- port-forward tunneled in WebSocket ----

/// Runs the client-go-framed tunneling client; its lines per connection.
fn tunneled_forward(url: &str, port: u16, n: usize) -> Result<Vec<(String, String)>> {
    let bin = berth_e2e::clients::go_program("portforward_tunnel")?;
    let out = Command::new(bin)
        .args([
            url,
            &port.to_string(),
            &n.to_string(),
            "GET / HTTP/1.0\r\n\r\n",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "portforward_tunnel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = |b: &str| -> Result<String> {
        use base64::Engine as _;
        if b == "-" {
            return Ok(String::new());
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(b)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let fields: Vec<Vec<&str>> = stdout.lines().map(|l| l.split(' ').collect()).collect();
    let mut conns = vec![(String::new(), String::new()); n];
    for f in &fields {
        let (Some(kind), Some(i), Some(b)) = (f.first(), f.get(1), f.get(2)) else {
            bail!("portforward_tunnel line {f:?}");
        };
        let i: usize = i.parse()?;
        match *kind {
            "data" => conns[i].0 = text(b)?,
            "error" => conns[i].1 = text(b)?,
            _ => bail!("portforward_tunnel line {f:?}"),
        }
    }
    Ok(conns)
}

/// Port-forward as current client-go (kubectl port-forward, Kubernetes 1.30+) does it:
/// SPDY/3.1 tunneled in WebSocket binary messages under the subprotocol
/// `SPDY/3.1+portforward.k8s.io`, from a client built on gorilla/websocket and
/// docker/spdystream that frames exactly as client-go's tunneling dialer (one message
/// per write, so SPDY frames arrive split over several messages). Ten connections at
/// once each get the page; a port nothing listens on gets kubelet's error text.
pub fn port_forward_tunneled_in_websocket() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let pod_cfg = container_pod("tunnel", "tun-1", &b.dir().join("logs"));
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let script = "mkdir -p /www && echo hello through the tunnel > /www/index.html && exec busybox httpd -f -p 127.0.0.1:8080 -h /www";
        let id = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            container_config("web", &w.busybox.reference, script),
        )
        .await?;
        c.runtime.start_container(start(&id)).await?;
        let probe = ["busybox", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/"];
        for _ in 0..100 {
            if exec_in(&mut c, &id, &probe).await?.0 == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let url_for = |c: &CriClient, port: i32| {
            let mut rt = c.runtime.clone();
            let req = cri::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![port],
            };
            async move { Ok::<_, anyhow::Error>(rt.port_forward(req).await?.into_inner().url) }
        };
        let url = url_for(&c, 8080).await?;
        let conns = tokio::task::spawn_blocking(move || tunneled_forward(&url, 8080, 10)).await??;
        for (i, (data, err)) in conns.iter().enumerate() {
            ensure!(
                data.starts_with("HTTP/1.") && data.ends_with("hello through the tunnel\n"),
                "connection {i}: {data:?}"
            );
            ensure!(err.is_empty(), "connection {i} error stream: {err:?}");
        }
        let url = url_for(&c, 8081).await?;
        let conns = tokio::task::spawn_blocking(move || tunneled_forward(&url, 8081, 1)).await??;
        ensure!(
            conns[0].0.is_empty() && conns[0].1.contains("error forwarding port 8081"),
            "closed port: {:?}",
            conns[0]
        );
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "tunnel")?;
        Ok(())
    })
}
