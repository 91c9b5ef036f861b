//! A real systemd for the tests: booted as PID 1 of a new PID + mount namespace on
//! this machine, which does not run systemd itself.
//!
//! It must never touch the host. It gets its own PID, mount and UTS namespaces (the
//! network stays the host's, for CNI); inside, before systemd starts, private tmpfs
//! cover `/tmp`, `/run` and `/var/tmp` (Debian's tmpfiles.d would empty the host's
//! `/tmp`), `/dev` (with the host's basic nodes and its own devpts) and
//! `/sys/fs/cgroup` (binds of the host's hierarchies, placeholders for unmounted
//! controllers, so no new hierarchy is mounted); `/proc/sys/fs` and
//! `/proc/sys/net/unix` are read-only (systemd raises those at startup); every unit
//! that would act on the shared kernel, disk, clock, network or users is masked in
//! `/run/systemd/system.control` (the highest-priority unit dir): tmpfiles, udev,
//! sysctl, modules, binfmt, timesyncd, sysusers, repart, swap, remounts, networking,
//! timers (apt, fstrim, ...). It boots `basic.target`, never `multi-user.target`
//! (which would start the machine's installed services), with `container=other` and a
//! volatile journal. Killing its PID 1 ends everything inside (and unshare takes it
//! down if the test process dies); the cgroups it made on the host's hierarchies are
//! then removed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// Units masked before boot (see the module comment).
const MASKED: &[&str] = &[
    "apparmor.service",
    "cryptsetup.target",
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "integritysetup.target",
    "kmod-static-nodes.service",
    "ldconfig.service",
    "local-fs.target",
    "proc-sys-fs-binfmt_misc.automount",
    "swap.target",
    "sys-fs-fuse-connections.mount",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "systemd-ask-password-console.path",
    "systemd-binfmt.service",
    "systemd-boot-system-token.service",
    "systemd-firstboot.service",
    "systemd-hwdb-update.service",
    "systemd-journal-catalog-update.service",
    "systemd-journal-flush.service",
    "systemd-journald-audit.socket",
    "systemd-machine-id-commit.service",
    "systemd-modules-load.service",
    "systemd-pcrphase-sysinit.service",
    "systemd-pcrphase.service",
    "systemd-pstore.service",
    "systemd-random-seed.service",
    "systemd-remount-fs.service",
    "systemd-repart.service",
    "systemd-sysctl.service",
    "systemd-sysusers.service",
    "systemd-timesyncd.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-setup.service",
    "systemd-udev-settle.service",
    "systemd-udev-trigger.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udevd.service",
    "systemd-update-done.service",
    "systemd-update-utmp.service",
    "timers.target",
    "tmp.mount",
    "veritysetup.target",
    "systemd-initctl.socket",
    "systemd-journald-dev-log.socket",
    "network-online.target",
    "networking.service",
    "ifupdown-wait-online.service",
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
    "NetworkManager.service",
    "NetworkManager-wait-online.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
    "man-db.timer",
];

/// The cgroup hierarchies' mount points (v1 controllers, named `systemd`, cgroup2).
fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect()
}

/// Every cgroup dir below the hierarchies' roots.
fn cgroup_dirs() -> HashSet<PathBuf> {
    fn walk(dir: &Path, out: &mut HashSet<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.insert(e.path());
                walk(&e.path(), out);
            }
        }
    }
    let mut out = HashSet::new();
    for h in hierarchies() {
        walk(&h, &mut out);
    }
    out
}

/// Each controller's hierarchy id (`/proc/cgroups`): a new one would be a hierarchy
/// systemd mounted, which outlives the namespace.
fn kernel_hierarchies() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/cgroups")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

/// A systemd running as PID 1 of its own namespaces.
pub struct SystemdNode {
    child: Child,
    /// Its PID 1, as the host sees it, once found.
    pub pid: Option<u32>,
    cgroups_before: HashSet<PathBuf>,
}

impl SystemdNode {
    /// Boots it with `units` (name, text) installed in `/run/systemd/system`; `dir`
    /// (outside `/tmp`, `/run`, `/var/tmp`) holds the staged files.
    pub fn boot(dir: &Path, units: &[(&str, String)]) -> Result<SystemdNode> {
        ensure!(
            Path::new("/lib/systemd/systemd").exists(),
            "no /lib/systemd/systemd"
        );
        for bad in ["/tmp", "/run", "/var/tmp"] {
            ensure!(
                !dir.starts_with(bad),
                "{} is hidden inside the namespace",
                dir.display()
            );
        }
        let stage = dir.join("systemd-units");
        std::fs::create_dir_all(&stage)?;
        for (name, text) in units {
            std::fs::write(stage.join(name), text)?;
        }
        let script = format!(
            r#"set -eu
mount -t tmpfs -o mode=1777 e2e-tmp /tmp
mount -t tmpfs -o mode=0755 e2e-run /run
mount -t tmpfs -o mode=1777 e2e-vartmp /var/tmp
# A private /sys/fs/cgroup holding binds of the host's hierarchies: systemd's
# mkdirs and symlinks there stay private, and every controller the host does not
# mount gets a read-only placeholder, so that systemd mounts no new hierarchy.
mkdir -p /run/e2e-cgroup
mount --rbind /sys/fs/cgroup /run/e2e-cgroup
mount -t tmpfs -o mode=0755 e2e-cgroup /sys/fs/cgroup
for d in /run/e2e-cgroup/*; do
  n=${{d##*/}}
  mkdir "/sys/fs/cgroup/$n"
  mount --bind "$d" "/sys/fs/cgroup/$n"
done
for n in $(awk 'NR > 1 && $4 == 1 {{print $1}}' /proc/cgroups) cpu,cpuacct net_cls,net_prio; do
  if [ ! -e "/sys/fs/cgroup/$n" ]; then
    mkdir "/sys/fs/cgroup/$n"
    mount -t tmpfs -o ro,size=4k e2e-none "/sys/fs/cgroup/$n"
  fi
done
umount -l /run/e2e-cgroup
# A private /dev (the sockets systemd links there, its console output) with the
# host's basic nodes and a devpts of its own.
mkdir -p /run/e2e-dev
mount -t tmpfs -o mode=0755,nosuid e2e-dev /run/e2e-dev
for n in null zero full random urandom tty; do
  touch "/run/e2e-dev/$n"
  mount --bind "/dev/$n" "/run/e2e-dev/$n"
done
mkdir /run/e2e-dev/pts /run/e2e-dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 e2e-devpts /run/e2e-dev/pts
ln -s pts/ptmx /run/e2e-dev/ptmx
mount -t tmpfs -o mode=1777 e2e-shm /run/e2e-dev/shm
mount --move /run/e2e-dev /dev
# Global and host-network sysctls systemd raises at startup stay as they are.
for d in /proc/sys/fs /proc/sys/net/unix; do
  mount --bind "$d" "$d"
  mount -o remount,bind,ro "$d"
done
mkdir -p /run/systemd/system.control /run/systemd/system /run/systemd/journald.conf.d
for u in {masked}; do ln -s /dev/null /run/systemd/system.control/$u; done
printf '[Journal]\nStorage=volatile\n' > /run/systemd/journald.conf.d/e2e.conf
cp {stage}/* /run/systemd/system/
exec env -i container=other PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  /lib/systemd/systemd --unit=basic.target --log-target=null --show-status=no
"#,
            masked = MASKED.join(" "),
            stage = stage.display(),
        );
        let cgroups_before = cgroup_dirs();
        let hierarchies_before = kernel_hierarchies();
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--mount-proc",
        ])
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        // If the test process dies, unshare dies, and with --kill-child so does the
        // namespace.
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning unshare")?;
        let mut node = SystemdNode {
            pid: None,
            child,
            cgroups_before,
        };
        node.pid = Some(node.find_pid1()?);
        node.wait_booted(Duration::from_secs(60))?;
        ensure!(
            kernel_hierarchies() == hierarchies_before,
            "systemd changed the kernel's cgroup hierarchies: {:?} -> {:?}",
            hierarchies_before,
            kernel_hierarchies()
        );
        Ok(node)
    }

    /// The namespace's PID 1: unshare's child, once it has exec'd systemd.
    fn find_pid1(&mut self) -> Result<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("the namespace ended before systemd ran ({st}): {err}");
            }
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.child.id()))
                    .unwrap_or_default();
            for pid in children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
                if exe.ends_with("systemd") {
                    return Ok(pid);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("systemd did not start in the namespace")
    }

    /// Waits until startup finishes (`running`, or `degraded`: a masked unit that
    /// something wants can leave it so; the tests then check what they need).
    fn wait_booted(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let out = self.run(&["systemctl", "is-system-running"])?;
            last = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match last.as_str() {
                "running" | "degraded" => return Ok(()),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let failed = self.run(&["systemctl", "--failed", "--no-legend"])?;
        bail!(
            "systemd is {last:?} after {timeout:?}; failed: {}",
            String::from_utf8_lossy(&failed.stdout)
        )
    }

    /// Runs a command inside (all of its namespaces).
    pub fn run(&self, cmd: &[&str]) -> Result<Output> {
        let pid = self.pid.context("systemd has not started")?.to_string();
        Command::new("nsenter")
            .args(["-t", &pid, "-a", "--"])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("nsenter {cmd:?}"))
    }

    /// `systemctl <args>` inside; its stdout, or an error with its stderr.
    pub fn systemctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = vec!["systemctl"];
        cmd.extend_from_slice(args);
        let out = self.run(&cmd)?;
        ensure!(
            out.status.success(),
            "systemctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One property of a unit (`systemctl show -p NAME --value`).
    pub fn property(&self, unit: &str, name: &str) -> Result<String> {
        Ok(self
            .systemctl(&["show", unit, "-p", name, "--value"])?
            .trim()
            .to_string())
    }
}

impl Drop for SystemdNode {
    fn drop(&mut self) {
        // SIGKILL of the namespace's PID 1 kills everything in it (only while
        // unshare, its parent, still runs: the pid cannot have been reused).
        if let (Some(pid), Ok(None)) = (self.pid, self.child.try_wait()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The cgroups it (and what ran inside) made, deepest first, once empty: only
        // systemd's own (top-level `*.slice` and `*.scope`), never another test's.
        let roots = hierarchies();
        let systemds = |p: &Path| {
            roots.iter().any(|h| {
                p.strip_prefix(h)
                    .ok()
                    .and_then(|r| r.components().next())
                    .and_then(|c| c.as_os_str().to_str())
                    .is_some_and(|n| n.ends_with(".slice") || n.ends_with(".scope"))
            })
        };
        let mut made: Vec<PathBuf> = cgroup_dirs()
            .difference(&self.cgroups_before)
            .filter(|p| systemds(p))
            .cloned()
            .collect();
        made.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        let deadline = Instant::now() + Duration::from_secs(10);
        for dir in made {
            while std::fs::remove_dir(&dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
