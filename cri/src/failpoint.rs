//! Crash points for the restart tests: with `BERTH_FAILPOINT=<name>` in its
//! environment, berthd kills itself with SIGKILL (a crash, without a core file) when
//! it reaches the point of that name. Unset, a failpoint is one environment lookup.

/// Kills the process here if `BERTH_FAILPOINT` names this point.
pub fn failpoint(name: &str) {
    if std::env::var_os("BERTH_FAILPOINT").is_some_and(|v| v == name) {
        tracing::error!(failpoint = name, "failpoint reached: killing berthd");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        std::process::abort(); // not reached
    }
}
