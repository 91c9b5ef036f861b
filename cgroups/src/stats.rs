//! CPU, memory and process statistics of one cgroup, from v1 or v2 files.

use std::collections::HashMap;
use std::io;
use std::path::Path;

use crate::{Cgroup, CgroupError};

/// CPU time used, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Total CPU time of all tasks.
    pub usage_ns: u64,
    /// User-mode time.
    pub user_ns: u64,
    /// Kernel-mode time.
    pub system_ns: u64,
    /// CFS enforcement periods elapsed.
    pub periods: u64,
    /// Periods in which the cgroup was throttled.
    pub throttled_periods: u64,
    /// Total time throttled.
    pub throttled_ns: u64,
}

/// Memory use in bytes (counters are cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// All memory charged, page cache included.
    pub usage: u64,
    /// The limit; `None` when unlimited.
    pub limit: Option<u64>,
    /// Highest usage seen (v1 `max_usage_in_bytes`, v2 `memory.peak`).
    pub max_usage: u64,
    /// Anonymous memory and swap cache (v1 `total_rss`, v2 `anon`).
    pub rss: u64,
    /// Page cache (v1 `total_cache`, v2 `file`).
    pub cache: u64,
    /// Memory-mapped files.
    pub mapped_file: u64,
    /// Page cache on the active list.
    pub active_file: u64,
    /// Page cache on the inactive list (reclaimable first).
    pub inactive_file: u64,
    /// Minor page faults.
    pub pgfault: u64,
    /// Major page faults.
    pub pgmajfault: u64,
    /// Times usage hit the limit (v1 `failcnt`, v2 `memory.events` `max`).
    pub failcnt: u64,
    /// Swap in use, where the kernel accounts it.
    pub swap_usage: Option<u64>,
    /// Swap limit; `None` when unlimited or unaccounted.
    pub swap_limit: Option<u64>,
}

impl MemoryStats {
    /// Usage minus inactive page cache, as kubelet and cAdvisor define the working set.
    pub fn working_set(&self) -> u64 {
        self.usage.saturating_sub(self.inactive_file)
    }
}

/// What one read of a cgroup found; a controller that is not mounted is `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// CPU time.
    pub cpu: Option<CpuStats>,
    /// Memory.
    pub memory: Option<MemoryStats>,
    /// Tasks in the cgroup (`pids.current`, else the `cgroup.procs` count).
    pub pids: Option<u64>,
    /// OOM kills inside the cgroup.
    pub oom_kills: Option<u64>,
}

/// Limits at or above this are "unlimited" (v1 reports PAGE_COUNTER_MAX * page size).
const UNLIMITED: u64 = 1 << 62;
/// USER_HZ: v1 `cpuacct.stat` counts in these ticks (fixed at 100 on Linux).
const NS_PER_TICK: u64 = 10_000_000;

fn read(dir: &Path, file: &str) -> Result<Option<String>, CgroupError> {
    let p = dir.join(file);
    match std::fs::read_to_string(&p) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        // A cgroup removed between reads: treat like a missing file.
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENODEV as i32) => Ok(None),
        Err(e) => Err(CgroupError::io(p, e)),
    }
}

fn read_u64(dir: &Path, file: &str) -> Result<Option<u64>, CgroupError> {
    Ok(read(dir, file)?.and_then(|s| s.trim().parse().ok()))
}

/// A v2 single value: a number or `max`.
fn read_max(dir: &Path, file: &str) -> Result<Option<Option<u64>>, CgroupError> {
    Ok(read(dir, file)?.map(|s| match s.trim() {
        "max" => None,
        v => v.parse().ok().filter(|&n| n < UNLIMITED),
    }))
}

/// A flat-keyed file (`key value` per line).
fn read_keyed(dir: &Path, file: &str) -> Result<Option<HashMap<String, u64>>, CgroupError> {
    Ok(read(dir, file)?.map(|s| parse_keyed(&s)))
}

/// Parses `key value` lines; lines that are not that shape are skipped.
pub fn parse_keyed(s: &str) -> HashMap<String, u64> {
    s.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

impl Cgroup {
    /// Reads every statistic available; `NotFound` when the cgroup exists nowhere.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        // No separate existence probe: a missing cgroup reads as nothing at all.
        let st = CgroupStats {
            cpu: self.cpu_stats()?,
            memory: self.memory_stats()?,
            pids: self.pids()?,
            oom_kills: crate::oom_kill_count(self),
        };
        if st == CgroupStats::default() {
            return Err(CgroupError::NotFound(self.relative().display().to_string()));
        }
        Ok(st)
    }

    /// CPU time: v1 `cpuacct` + `cpu`, else v2 `cpu.stat` (present in every cgroup2
    /// directory even without the cpu controller).
    pub fn cpu_stats(&self) -> Result<Option<CpuStats>, CgroupError> {
        if let Some(acct) = self.dir("cpuacct").filter(|_| !self.is_v2("cpuacct")) {
            let Some(usage_ns) = read_u64(acct, "cpuacct.usage")? else {
                return Ok(None);
            };
            let ticks = read_keyed(acct, "cpuacct.stat")?.unwrap_or_default();
            let throttle = match self.dir("cpu") {
                Some(d) => read_keyed(d, "cpu.stat")?.unwrap_or_default(),
                None => HashMap::new(),
            };
            let k = |m: &HashMap<String, u64>, key: &str| m.get(key).copied().unwrap_or(0);
            return Ok(Some(CpuStats {
                usage_ns,
                user_ns: k(&ticks, "user") * NS_PER_TICK,
                system_ns: k(&ticks, "system") * NS_PER_TICK,
                periods: k(&throttle, "nr_periods"),
                throttled_periods: k(&throttle, "nr_throttled"),
                throttled_ns: k(&throttle, "throttled_time"),
            }));
        }
        let Some(dir) = self.v2_dir() else {
            return Ok(None);
        };
        let Some(m) = read_keyed(dir, "cpu.stat")? else {
            return Ok(None);
        };
        let us = |key: &str| m.get(key).copied().unwrap_or(0) * 1000;
        Ok(Some(CpuStats {
            usage_ns: us("usage_usec"),
            user_ns: us("user_usec"),
            system_ns: us("system_usec"),
            periods: m.get("nr_periods").copied().unwrap_or(0),
            throttled_periods: m.get("nr_throttled").copied().unwrap_or(0),
            throttled_ns: us("throttled_usec"),
        }))
    }

    /// Memory from v1 `memory.*` (hierarchical `total_*` counters) or v2.
    pub fn memory_stats(&self) -> Result<Option<MemoryStats>, CgroupError> {
        let Some(dir) = self.dir("memory") else {
            return Ok(None);
        };
        if self.is_v2("memory") {
            return memory_v2(dir);
        }
        let Some(usage) = read_u64(dir, "memory.usage_in_bytes")? else {
            return Ok(None);
        };
        let st = read_keyed(dir, "memory.stat")?.unwrap_or_default();
        let k = |key: &str| st.get(key).copied().unwrap_or(0);
        let memsw = read_u64(dir, "memory.memsw.usage_in_bytes")?;
        let limit = read_u64(dir, "memory.limit_in_bytes")?;
        Ok(Some(MemoryStats {
            usage,
            limit: limit.filter(|&l| l < UNLIMITED),
            max_usage: read_u64(dir, "memory.max_usage_in_bytes")?.unwrap_or(0),
            rss: k("total_rss"),
            cache: k("total_cache"),
            mapped_file: k("total_mapped_file"),
            active_file: k("total_active_file"),
            inactive_file: k("total_inactive_file"),
            pgfault: k("total_pgfault"),
            pgmajfault: k("total_pgmajfault"),
            failcnt: read_u64(dir, "memory.failcnt")?.unwrap_or(0),
            swap_usage: memsw.map(|m| m.saturating_sub(usage)),
            swap_limit: read_u64(dir, "memory.memsw.limit_in_bytes")?
                .filter(|&l| l < UNLIMITED)
                .zip(limit)
                .map(|(sw, mem)| sw.saturating_sub(mem)),
        }))
    }

    /// Tasks in the cgroup.
    pub fn pids(&self) -> Result<Option<u64>, CgroupError> {
        if let Some(d) = self.dir("pids") {
            if let Some(n) = read_u64(d, "pids.current")? {
                return Ok(Some(n));
            }
        }
        let dir = self
            .v2_dir()
            .or_else(|| self.dir("memory"))
            .or_else(|| self.dir("cpuacct"));
        let Some(dir) = dir else {
            return Ok(None);
        };
        Ok(read(dir, "cgroup.procs")?.map(|s| s.lines().count() as u64))
    }
}

fn memory_v2(dir: &Path) -> Result<Option<MemoryStats>, CgroupError> {
    let Some(usage) = read_u64(dir, "memory.current")? else {
        return Ok(None);
    };
    let st = read_keyed(dir, "memory.stat")?.unwrap_or_default();
    let k = |key: &str| st.get(key).copied().unwrap_or(0);
    let events = read_keyed(dir, "memory.events")?.unwrap_or_default();
    Ok(Some(MemoryStats {
        usage,
        limit: read_max(dir, "memory.max")?.flatten(),
        max_usage: read_u64(dir, "memory.peak")?.unwrap_or(0),
        rss: k("anon"),
        cache: k("file"),
        mapped_file: k("file_mapped"),
        active_file: k("active_file"),
        inactive_file: k("inactive_file"),
        pgfault: k("pgfault"),
        pgmajfault: k("pgmajfault"),
        failcnt: events.get("max").copied().unwrap_or(0),
        swap_usage: read_u64(dir, "memory.swap.current")?,
        swap_limit: read_max(dir, "memory.swap.max")?.flatten(),
    }))
}
