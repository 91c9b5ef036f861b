//! berth-shim: the per-pod shim. berthd runs it; it detaches (new session, parent
//! exits once the socket is bound) so that it outlives berthd, becomes the child
//! subreaper of the pod's containers, and serves the shim protocol.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use berth_runtime::shim::{Shim, ShimConfig};

fn usage() -> ExitCode {
    eprintln!(
        "usage: berth-shim --socket PATH --state-dir DIR --runtime BIN --runtime-root DIR [--runtime-arg ARG]... [--runtime-timeout SECS] [--foreground]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut socket, mut state, mut runtime, mut root) = (None, None, None, None);
    let mut runtime_args = Vec::new();
    let mut runtime_timeout = berth_runtime::runc::DEFAULT_TIMEOUT;
    let mut foreground = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = args.next().map(PathBuf::from),
            "--state-dir" => state = args.next().map(PathBuf::from),
            "--runtime" => runtime = args.next().map(PathBuf::from),
            "--runtime-root" => root = args.next().map(PathBuf::from),
            "--runtime-arg" => runtime_args.extend(args.next()),
            "--runtime-timeout" => match args
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|s| *s > 0)
            {
                Some(secs) => runtime_timeout = std::time::Duration::from_secs(secs),
                None => return usage(),
            },
            "--foreground" => foreground = true,
            _ => return usage(),
        }
    }
    let (Some(socket), Some(state_dir), Some(runtime), Some(runtime_root)) =
        (socket, state, runtime, root)
    else {
        return usage();
    };
    let cfg = ShimConfig {
        socket,
        state_dir,
        runtime,
        runtime_root,
        runtime_args,
        runtime_timeout,
    };
    if foreground {
        return serve(&cfg, None);
    }
    // Detach: the parent waits for the child to report readiness, then exits, which
    // reparents the shim away from whoever started it.
    let (rd, wr) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("berth-shim: pipe: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: single-threaded at this point; the child only continues this program.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            eprintln!("berth-shim: fork: {e}");
            ExitCode::FAILURE
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(wr);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            if msg == "ok" {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "berth-shim: {}",
                    if msg.is_empty() {
                        "exited before it was ready"
                    } else {
                        &msg
                    }
                );
                ExitCode::FAILURE
            }
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(rd);
            let _ = nix::unistd::setsid();
            serve(&cfg, Some(std::fs::File::from(wr)))
        }
    }
}

fn serve(cfg: &ShimConfig, mut ready: Option<std::fs::File>) -> ExitCode {
    // Every container this shim creates is reparented to it when the runtime exits.
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let shim = match Shim::bind(cfg) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("binding {}: {e}", cfg.socket.display());
            match ready.as_mut() {
                Some(w) => {
                    let _ = w.write_all(msg.as_bytes());
                }
                None => eprintln!("berth-shim: {msg}"),
            }
            return ExitCode::FAILURE;
        }
    };
    if let Some(mut w) = ready.take() {
        // Detach stdio from the starter; keep stderr only if it is a file (the shim log).
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            let _ = nix::unistd::dup2_stdin(&null);
            let _ = nix::unistd::dup2_stdout(&null);
        }
        let _ = w.write_all(b"ok");
    }
    match shim.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-shim: {e}");
            ExitCode::FAILURE
        }
    }
}
