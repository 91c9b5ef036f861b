//! Crash points for the restart tests: with `BERTH_FAILPOINT=<name>` (or `<name>@<n>`,
//! the n-th time it is reached) in its environment, berthd kills itself with SIGKILL (a
//! crash, without a core file) at the point of that name. Unset, a failpoint is one
//! environment lookup.

use std::sync::atomic::{AtomicU64, Ordering};

/// How often the armed failpoint was reached.
static REACHED: AtomicU64 = AtomicU64::new(0);

/// Kills the process here if `BERTH_FAILPOINT` names this point (and its count is up).
pub fn failpoint(name: &str) {
    let Some(armed) = std::env::var_os("BERTH_FAILPOINT") else {
        return;
    };
    let armed = armed.to_string_lossy();
    let (point, nth) = match armed.split_once('@') {
        Some((p, n)) => (p, n.parse::<u64>().unwrap_or(1)),
        None => (armed.as_ref(), 1),
    };
    if point != name || REACHED.fetch_add(1, Ordering::SeqCst) + 1 < nth {
        return;
    }
    tracing::error!(failpoint = name, "failpoint reached: killing berthd");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    std::process::abort(); // not reached
}
