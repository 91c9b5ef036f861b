//! Clients berth did not write, driven from the tests: grpc-go (built here from
//! Debian's `golang-google-grpc-dev`, GOPATH mode, offline) and Python's grpcio for CRI,
//! and a port-forward client framed as client-go's tunneling dialer
//! (`clients/portforward_tunnel.go`: gorilla/websocket and docker/spdystream).
//!
//! The CRI clients speak one line protocol (see `clients/cri_raw_client.go`): the test encodes each
//! request with prost and decodes each answer, the client only carries bytes, so neither
//! needs generated stubs.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message;

/// This crate's `clients/` dir.
fn sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// The target dir the running test binary was built into.
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
        .context("the test binary is not under a target/ dir")
}

/// Builds the Go program `clients/<name>.go` (once; again when its source is newer) in
/// GOPATH mode from Debian's packages, offline, and returns the binary.
pub fn go_program(name: &str) -> Result<PathBuf> {
    let src = sources().join(format!("{name}.go"));
    let dir = target_dir()?.join("e2e-clients");
    let bin = dir.join(name);
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&bin).is_some() && modified(&bin) >= modified(&src) {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir)?;
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .output()
        .context("running go (deploy/test.sh installs golang-go and the Go packages)")?;
    if !out.status.success() {
        bail!(
            "building {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(bin)
}

/// Where deploy/test.sh installs grpcio (`pip install --target`), if it did.
pub fn python_grpc_path() -> Option<PathBuf> {
    let dir = target_dir().ok()?.join("python");
    dir.join("grpc").is_dir().then_some(dir)
}

/// Base64 of the line protocol: "-" stands for no bytes, so every line has all its fields.
fn b64(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        "-".into()
    } else {
        B64.encode(bytes)
    }
}

fn unb64(text: &str) -> Result<Vec<u8>> {
    if text == "-" {
        Ok(Vec::new())
    } else {
        Ok(B64.decode(text)?)
    }
}

/// A gRPC status as a foreign client reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// The numeric gRPC code.
    pub code: i32,
    /// The status message.
    pub message: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gRPC code {}: {}", self.code, self.message)
    }
}

/// The end of a server stream: the messages that came, then its status.
#[derive(Debug)]
pub struct StreamEnd<T> {
    /// Messages in order.
    pub messages: Vec<T>,
    /// 0 = the server ended the stream, 1 = the client stopped after enough, else the error.
    pub end: CallError,
}

/// One running foreign client process, connected to one socket.
pub struct ForeignClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// What it is, for messages.
    pub name: String,
}

impl ForeignClient {
    /// grpc-go, dialling the socket path as kubelet up to 1.26 did.
    pub fn go(socket: &Path) -> Result<ForeignClient> {
        let mut cmd = Command::new(go_program("cri_raw_client")?);
        cmd.arg(socket);
        Self::spawn(cmd, "grpc-go")
    }

    /// Python grpcio on `unix://socket`, with an explicit `:authority` if given.
    pub fn python(socket: &Path, authority: Option<&str>) -> Result<ForeignClient> {
        let path = python_grpc_path().context("grpcio is not installed under target/python")?;
        let mut cmd = Command::new("python3");
        cmd.arg(sources().join("cri_raw_client.py"))
            .arg(socket)
            .args(authority)
            .env("PYTHONPATH", path);
        Self::spawn(cmd, &format!("grpcio (authority {authority:?})"))
    }

    fn spawn(mut cmd: Command, name: &str) -> Result<ForeignClient> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(ForeignClient {
            child,
            stdin,
            stdout,
            name: name.to_string(),
        })
    }

    fn line(&mut self) -> Result<Vec<String>> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("{} exited: {:?}", self.name, self.child.try_wait()?);
        }
        Ok(line.split_whitespace().map(String::from).collect())
    }

    fn status(code: &str, message: &str) -> Result<CallError> {
        Ok(CallError {
            code: code.parse()?,
            message: String::from_utf8_lossy(&unb64(message)?).into_owned(),
        })
    }

    /// A unary call of `method` (`/runtime.v1.RuntimeService/Version`).
    pub fn unary<Req: Message, Resp: Message + Default>(
        &mut self,
        method: &str,
        req: &Req,
    ) -> Result<Result<Resp, CallError>> {
        let body = b64(&req.encode_to_vec());
        writeln!(self.stdin, "unary {method} {body}")?;
        match self.line()?.as_slice() {
            [ok, b] if ok == "ok" => Ok(Ok(Resp::decode(unb64(b)?.as_slice())
                .with_context(|| format!("decoding the answer to {method}"))?)),
            [err, code, msg] if err == "err" => Ok(Err(Self::status(code, msg)?)),
            other => bail!("{}: unexpected answer {other:?}", self.name),
        }
    }

    /// A unary call that must succeed.
    pub fn call<Req: Message, Resp: Message + Default>(
        &mut self,
        method: &str,
        req: &Req,
    ) -> Result<Resp> {
        let name = self.name.clone();
        self.unary(method, req)?
            .map_err(|e| anyhow::anyhow!("{name} {method}: {e}"))
    }

    /// A server-streaming call: at most `max` messages, for at most `millis`.
    pub fn stream<Req: Message, Resp: Message + Default>(
        &mut self,
        method: &str,
        req: &Req,
        max: usize,
        millis: u64,
    ) -> Result<StreamEnd<Resp>> {
        let body = b64(&req.encode_to_vec());
        writeln!(self.stdin, "stream {method} {body} {max} {millis}")?;
        let mut messages = Vec::new();
        loop {
            match self.line()?.as_slice() {
                [m, b] if m == "msg" => messages.push(Resp::decode(unb64(b)?.as_slice())?),
                [e, code, msg] if e == "end" => {
                    let end = Self::status(code, msg)?;
                    return Ok(StreamEnd { messages, end });
                }
                other => bail!("{}: unexpected stream line {other:?}", self.name),
            }
        }
    }
}

impl Drop for ForeignClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
