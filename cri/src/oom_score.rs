//! What this host allows of oom_score_adj: without CAP_SYS_RESOURCE (as on hosts whose
//! bounding set lacks it) a process may not lower it below berthd's own.

/// Whether berthd may lower oom_score_adj (CAP_SYS_RESOURCE in its effective set).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// Clamps a wanted oom_score_adj to what this host allows, as containerd's
/// `restrict_oom_score_adj` does: without CAP_SYS_RESOURCE, never below berthd's own.
pub fn clamp_oom_score_adj(wanted: i32) -> i32 {
    if has_cap_sys_resource() {
        return wanted;
    }
    let own = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .unwrap_or(0);
    wanted.max(own)
}
