//! Seccomp, as containerd's CRI plugin chooses it and as Docker/moby builds the default:
//! `RuntimeDefault` is moby's default profile (`seccomp_default.json`, from
//! moby/profiles, Apache-2.0, The Moby Authors) filtered for this host's architecture,
//! kernel and the container's bounding capabilities; `Localhost` is an OCI seccomp JSON
//! file on the node; `Unconfined` (or nothing asked) is none; privileged containers get
//! none. A profile that cannot be applied is an error naming the field or file.

use std::path::{Component, Path, PathBuf};

use k8s_cri::v1 as cri;
use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSyscall};
use serde::Deserialize;

use super::{SpecError, err};

/// Moby's default profile, verbatim.
const DEFAULT_PROFILE: &str = include_str!("seccomp_default.json");

/// Largest Localhost profile read.
const MAX_PROFILE: u64 = 1 << 20;

const FIELD: &str = "config.linux.security_context.seccomp";
const PATH_FIELD: &str = "config.linux.security_context.seccomp_profile_path";

/// What the container asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeccompChoice {
    /// No filter.
    Unconfined,
    /// The built-in default profile.
    RuntimeDefault,
    /// An OCI seccomp profile file on the node.
    Localhost(PathBuf),
}

/// The profile a container's security context names: the `seccomp` field, else the
/// deprecated `seccomp_profile_path` string (`runtime/default`, `docker/default`,
/// `unconfined`, `localhost/<absolute path>`; empty = none, as containerd does).
pub fn choose(sc: Option<&cri::LinuxContainerSecurityContext>) -> Result<SeccompChoice, SpecError> {
    let Some(sc) = sc else {
        return Ok(SeccompChoice::Unconfined);
    };
    if let Some(p) = &sc.seccomp {
        let kind = cri::security_profile::ProfileType::try_from(p.profile_type);
        return match kind {
            Ok(cri::security_profile::ProfileType::Localhost) => {
                localhost(p.localhost_ref.trim_start_matches("localhost/"), FIELD)
            }
            _ if !p.localhost_ref.is_empty() => Err(err(
                &format!("{FIELD}.localhost_ref"),
                "must only be set with profile_type Localhost",
            )),
            Ok(cri::security_profile::ProfileType::RuntimeDefault) => {
                Ok(SeccompChoice::RuntimeDefault)
            }
            Ok(cri::security_profile::ProfileType::Unconfined) => Ok(SeccompChoice::Unconfined),
            Err(_) => Err(err(
                &format!("{FIELD}.profile_type"),
                format!("unknown profile type {}", p.profile_type),
            )),
        };
    }
    // The deprecated string form, still sent by kubelets before 1.26 / 1.30.
    #[allow(deprecated)]
    let asked = sc.seccomp_profile_path.as_str();
    match asked {
        "" | "unconfined" => Ok(SeccompChoice::Unconfined),
        "runtime/default" | "docker/default" => Ok(SeccompChoice::RuntimeDefault),
        other => match other.strip_prefix("localhost/") {
            Some(path) => localhost(path, PATH_FIELD),
            None => Err(err(PATH_FIELD, format!("invalid profile {other:?}"))),
        },
    }
}

fn localhost(path: &str, field: &str) -> Result<SeccompChoice, SpecError> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(err(
            field,
            format!("localhost profile {path:?} must be a clean absolute path"),
        ));
    }
    Ok(SeccompChoice::Localhost(p.to_path_buf()))
}

/// What seccomp depends on besides the container: this host.
#[derive(Clone, Debug)]
pub struct SeccompHost {
    /// The kernel can filter syscalls (`prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)`).
    pub supported: bool,
    /// The kernel release, `(major, minor)`.
    pub kernel: (u32, u32),
    /// The architecture as Go (and moby's profile) names it: `amd64`, `arm64`...
    pub arch: String,
}

impl SeccompHost {
    /// This machine.
    pub fn detect() -> SeccompHost {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        SeccompHost {
            supported: kernel_filters_syscalls(),
            kernel: (parts.next().unwrap_or(0), parts.next().unwrap_or(0)),
            arch: go_arch(std::env::consts::ARCH).to_string(),
        }
    }
}

/// containerd's test: filter mode with a NULL program fails with EFAULT where seccomp
/// filtering exists, EINVAL where it does not.
fn kernel_filters_syscalls() -> bool {
    // SAFETY: prctl with a NULL filter pointer only probes; it installs nothing.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            2, /* SECCOMP_MODE_FILTER */
            0,
            0,
            0,
        )
    };
    !(r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL))
}

fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// The seccomp section for a container, or none.
pub fn linux_seccomp(
    choice: &SeccompChoice,
    privileged: bool,
    bounding: &[String],
    host: &SeccompHost,
) -> Result<Option<LinuxSeccomp>, SpecError> {
    if privileged || *choice == SeccompChoice::Unconfined {
        return Ok(None);
    }
    if !host.supported {
        return Err(err(FIELD, "seccomp is not supported by this kernel"));
    }
    match choice {
        SeccompChoice::RuntimeDefault => default_profile(bounding, host).map(Some),
        SeccompChoice::Localhost(path) => read_profile(path).map(Some),
        SeccompChoice::Unconfined => Ok(None),
    }
}

/// An OCI seccomp profile file, read whole (at most 1 MiB) and parsed.
fn read_profile(path: &Path) -> Result<LinuxSeccomp, SpecError> {
    use std::io::Read;
    let failed = |why: String| err(FIELD, format!("seccomp profile {}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| failed(e.to_string()))?;
    if !meta.is_file() {
        return Err(failed("not a regular file".into()));
    }
    let mut text = Vec::new();
    std::fs::File::open(path)
        .map_err(|e| failed(e.to_string()))?
        .take(MAX_PROFILE + 1)
        .read_to_end(&mut text)
        .map_err(|e| failed(e.to_string()))?;
    if text.len() as u64 > MAX_PROFILE {
        return Err(failed(format!("larger than {MAX_PROFILE} bytes")));
    }
    serde_json::from_slice(&text).map_err(|e| failed(format!("not a valid seccomp profile: {e}")))
}

/// Moby's profile format: OCI syscall rules with conditions.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MobyProfile {
    default_action: oci_spec::runtime::LinuxSeccompAction,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    arch_map: Vec<MobyArch>,
    syscalls: Vec<MobyRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MobyArch {
    architecture: String,
    #[serde(default)]
    sub_architectures: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct MobyRule {
    #[serde(flatten)]
    syscall: LinuxSyscall,
    #[serde(default)]
    includes: Condition,
    #[serde(default)]
    excludes: Condition,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Condition {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    min_kernel: Option<String>,
}

fn arch(name: &str) -> Option<Arch> {
    serde_json::from_value(serde_json::Value::String(name.into())).ok()
}

/// The seccomp architecture of a Go architecture name.
fn seccomp_arch(go: &str) -> Option<&'static str> {
    let name = match go {
        "amd64" => "SCMP_ARCH_X86_64",
        "386" => "SCMP_ARCH_X86",
        "arm64" => "SCMP_ARCH_AARCH64",
        "arm" => "SCMP_ARCH_ARM",
        "ppc64le" => "SCMP_ARCH_PPC64LE",
        "s390x" => "SCMP_ARCH_S390X",
        "riscv64" => "SCMP_ARCH_RISCV64",
        "loong64" => "SCMP_ARCH_LOONGARCH64",
        _ => return None,
    };
    Some(name)
}

fn at_least(kernel: (u32, u32), min: &str) -> bool {
    let mut p = min.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    kernel >= (p.next().unwrap_or(0), p.next().unwrap_or(0))
}

/// Whether a rule applies to this container on this host (moby's `setupSeccomp`).
fn applies(rule: &MobyRule, bounding: &[String], host: &SeccompHost) -> bool {
    let has = |c: &String| bounding.contains(c);
    let (inc, exc) = (&rule.includes, &rule.excludes);
    let excluded = exc.arches.contains(&host.arch)
        || exc.caps.iter().any(has)
        || exc
            .min_kernel
            .as_deref()
            .is_some_and(|m| at_least(host.kernel, m));
    let included = (inc.arches.is_empty() || inc.arches.contains(&host.arch))
        && inc.caps.iter().all(has)
        && inc
            .min_kernel
            .as_deref()
            .is_none_or(|m| at_least(host.kernel, m));
    included && !excluded
}

/// The built-in default profile for a container with these bounding capabilities.
pub fn default_profile(bounding: &[String], host: &SeccompHost) -> Result<LinuxSeccomp, SpecError> {
    let profile: MobyProfile = serde_json::from_str(DEFAULT_PROFILE)
        .map_err(|e| err(FIELD, format!("the built-in default profile: {e}")))?;
    let native = seccomp_arch(&host.arch).ok_or_else(|| {
        err(
            FIELD,
            format!("no default seccomp profile for architecture {}", host.arch),
        )
    })?;
    let names: Vec<String> = profile
        .arch_map
        .into_iter()
        .find(|a| a.architecture == native)
        .map(|a| {
            std::iter::once(a.architecture)
                .chain(a.sub_architectures.unwrap_or_default())
                .collect()
        })
        .unwrap_or_else(|| vec![native.to_string()]);
    let architectures = names
        .iter()
        .map(|n| arch(n).ok_or_else(|| err(FIELD, format!("unknown seccomp architecture {n}"))))
        .collect::<Result<Vec<Arch>, _>>()?;
    let syscalls: Vec<LinuxSyscall> = profile
        .syscalls
        .into_iter()
        .filter(|r| applies(r, bounding, host))
        .map(|r| r.syscall)
        .collect();
    let mut s = LinuxSeccomp::default();
    s.set_default_action(profile.default_action)
        .set_default_errno_ret(profile.default_errno_ret)
        .set_architectures(Some(architectures))
        .set_flags(None)
        .set_listener_path(None)
        .set_listener_metadata(None)
        .set_syscalls(Some(syscalls));
    Ok(s)
}

#[cfg(test)]
#[allow(deprecated)] // the string forms are tested too
mod tests {
    use super::*;

    fn host() -> SeccompHost {
        SeccompHost {
            supported: true,
            kernel: (6, 1),
            arch: "amd64".into(),
        }
    }

    fn names(s: &LinuxSeccomp) -> Vec<String> {
        s.syscalls()
            .iter()
            .flatten()
            .flat_map(|c| c.names().clone())
            .collect()
    }

    #[test]
    fn the_default_profile_follows_capabilities_and_arch() {
        let plain = default_profile(&["CAP_CHOWN".into()], &host()).unwrap();
        let all = names(&plain);
        assert!(all.contains(&"read".to_string()) && all.contains(&"arch_prctl".to_string()));
        // Needs CAP_SYS_ADMIN / CAP_SYS_TIME / CAP_SYS_MODULE.
        for gated in ["mount", "settimeofday", "init_module", "unshare"] {
            assert_eq!(
                all.iter().filter(|n| *n == gated).count(),
                0,
                "{gated} allowed"
            );
        }
        let admin = names(
            &default_profile(&["CAP_SYS_ADMIN".into(), "CAP_SYS_TIME".into()], &host()).unwrap(),
        );
        assert!(
            admin.contains(&"mount".to_string()) && admin.contains(&"settimeofday".to_string())
        );
        let arches = serde_json::to_value(plain.architectures()).unwrap();
        assert_eq!(
            arches,
            serde_json::json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
        );
        let errno = serde_json::to_value(&plain).unwrap();
        assert_eq!(errno["defaultAction"], "SCMP_ACT_ERRNO");
    }

    #[test]
    fn profile_choice_as_containerd_reads_it() {
        let sc = |path: &str| cri::LinuxContainerSecurityContext {
            seccomp_profile_path: path.into(),
            ..Default::default()
        };
        assert_eq!(choose(Some(&sc(""))).unwrap(), SeccompChoice::Unconfined);
        assert_eq!(
            choose(Some(&sc("docker/default"))).unwrap(),
            SeccompChoice::RuntimeDefault
        );
        assert_eq!(
            choose(Some(&sc("localhost//etc/p.json"))).unwrap(),
            SeccompChoice::Localhost("/etc/p.json".into())
        );
        assert!(choose(Some(&sc("localhost/rel.json"))).is_err());
        assert!(
            choose(Some(&sc("bogus")))
                .unwrap_err()
                .to_string()
                .contains("seccomp_profile_path")
        );
        let typed = cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                localhost_ref: "x".into(),
            }),
            ..Default::default()
        };
        assert!(
            choose(Some(&typed))
                .unwrap_err()
                .to_string()
                .contains("localhost_ref")
        );
    }

    #[test]
    fn unsupported_or_unreadable_profiles_are_errors() {
        let no = SeccompHost {
            supported: false,
            ..host()
        };
        assert!(linux_seccomp(&SeccompChoice::RuntimeDefault, false, &[], &no).is_err());
        assert!(
            linux_seccomp(&SeccompChoice::Unconfined, false, &[], &no)
                .unwrap()
                .is_none()
        );
        assert!(
            linux_seccomp(&SeccompChoice::RuntimeDefault, true, &[], &host())
                .unwrap()
                .is_none()
        );
        let e = linux_seccomp(
            &SeccompChoice::Localhost("/nonexistent/p.json".into()),
            false,
            &[],
            &host(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/p.json"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{not json").unwrap();
        let e =
            linux_seccomp(&SeccompChoice::Localhost(bad.clone()), false, &[], &host()).unwrap_err();
        assert!(e.to_string().contains("not a valid seccomp profile"), "{e}");
    }
}
