//! AppArmor, SELinux and user namespaces: applied where the host has them, and where
//! it does not, asked-for confinement is an error rather than a silent run (closed by
//! default). `RuntimeDefault` AppArmor on a host without AppArmor is a no-op, as
//! containerd has it: there is nothing to confine with and nothing was promised.

use k8s_cri::v1 as cri;

use super::selinux::SelinuxDefaults;
use super::{SpecError, err};

const APPARMOR_FIELD: &str = "config.linux.security_context.apparmor";
const APPARMOR_STR_FIELD: &str = "config.linux.security_context.apparmor_profile";

/// The AppArmor profile berth confines `RuntimeDefault` containers with on AppArmor
/// hosts (`deploy/apparmor/berth-default`, loaded by the installer).
pub const DEFAULT_APPARMOR_PROFILE: &str = "berth-default";

/// The Linux security modules this host runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecurityModules {
    /// AppArmor is enabled: the loaded profiles' names, or None without AppArmor.
    pub apparmor_profiles: Option<Vec<String>>,
    /// SELinux is enabled: the policy's container labels.
    pub selinux: Option<SelinuxDefaults>,
}

/// The AppArmor profiles loaded in the kernel now.
fn loaded_profiles() -> Vec<String> {
    std::fs::read_to_string("/sys/kernel/security/apparmor/profiles")
        .unwrap_or_default()
        .lines()
        // "name (enforce)"
        .filter_map(|l| l.rsplit_once(' ').map(|(name, _)| name.to_string()))
        .collect()
}

impl SecurityModules {
    /// This host, as runc's checks read it.
    pub fn detect() -> SecurityModules {
        let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|s| s.starts_with('Y'));
        let apparmor_profiles = enabled.then(loaded_profiles);
        SecurityModules {
            apparmor_profiles,
            selinux: SelinuxDefaults::detect(),
        }
    }
}

/// What AppArmor confinement was asked for.
#[derive(Debug, PartialEq, Eq)]
enum AppArmorChoice {
    RuntimeDefault,
    Unconfined,
    Localhost(String),
}

/// The `apparmor` field, else the deprecated `apparmor_profile` string; nothing asked
/// is `RuntimeDefault` (Kubernetes' default).
fn apparmor_choice(
    sc: Option<&cri::LinuxContainerSecurityContext>,
) -> Result<AppArmorChoice, SpecError> {
    use cri::security_profile::ProfileType;
    let Some(sc) = sc else {
        return Ok(AppArmorChoice::RuntimeDefault);
    };
    if let Some(p) = &sc.apparmor {
        return match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::Localhost) => localhost_name(&p.localhost_ref, APPARMOR_FIELD),
            _ if !p.localhost_ref.is_empty() => Err(err(
                &format!("{APPARMOR_FIELD}.localhost_ref"),
                "must only be set with profile_type Localhost",
            )),
            Ok(ProfileType::RuntimeDefault) => Ok(AppArmorChoice::RuntimeDefault),
            Ok(ProfileType::Unconfined) => Ok(AppArmorChoice::Unconfined),
            Err(_) => Err(err(
                &format!("{APPARMOR_FIELD}.profile_type"),
                format!("unknown profile type {}", p.profile_type),
            )),
        };
    }
    // The deprecated string form, still sent by kubelets before 1.26 / 1.30.
    #[allow(deprecated)]
    let asked = sc.apparmor_profile.as_str();
    match asked {
        "" | "runtime/default" => Ok(AppArmorChoice::RuntimeDefault),
        "unconfined" => Ok(AppArmorChoice::Unconfined),
        other => match other.strip_prefix("localhost/") {
            Some(name) => localhost_name(name, APPARMOR_STR_FIELD),
            None => Err(err(
                APPARMOR_STR_FIELD,
                format!("invalid apparmor profile {other:?}"),
            )),
        },
    }
}

fn localhost_name(name: &str, field: &str) -> Result<AppArmorChoice, SpecError> {
    let name = name.trim_start_matches("localhost/");
    if name.is_empty() || name.chars().any(|c| c.is_control()) {
        return Err(err(
            field,
            format!("invalid apparmor profile name {name:?}"),
        ));
    }
    Ok(AppArmorChoice::Localhost(name.to_string()))
}

/// The process's AppArmor profile, or none.
pub fn apparmor_profile(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    privileged: bool,
    modules: &SecurityModules,
) -> Result<Option<String>, SpecError> {
    let choice = apparmor_choice(sc)?;
    let Some(loaded) = &modules.apparmor_profiles else {
        return match choice {
            AppArmorChoice::Localhost(name) => Err(err(
                APPARMOR_FIELD,
                format!("apparmor is not supported on this host (profile {name:?} asked for)"),
            )),
            _ => Ok(None),
        };
    };
    let name = match choice {
        AppArmorChoice::Unconfined => return Ok(None),
        AppArmorChoice::RuntimeDefault if privileged => return Ok(None),
        AppArmorChoice::RuntimeDefault => DEFAULT_APPARMOR_PROFILE.to_string(),
        AppArmorChoice::Localhost(name) => name,
    };
    // Profiles loaded since berthd started (a profile operator, a DaemonSet) count:
    // a name not in the list read at start is looked up again.
    if !loaded.contains(&name) && !loaded_profiles().contains(&name) {
        return Err(err(
            APPARMOR_FIELD,
            format!("apparmor profile {name:?} is not loaded on this host"),
        ));
    }
    Ok(Some(name))
}

/// User namespaces are not supported: only the node's (mode NODE, or nothing) is.
pub fn check_userns(ns: Option<&cri::NamespaceOption>, field: &str) -> Result<(), SpecError> {
    let mode = ns
        .and_then(|n| n.userns_options.as_ref())
        .map_or(cri::NamespaceMode::Node as i32, |u| u.mode);
    if mode != cri::NamespaceMode::Node as i32 {
        return Err(err(
            &format!("{field}.userns_options"),
            "user namespaces are not supported by berth on this host (runtime handler \
             features report user_namespaces = false)",
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(deprecated)] // the string forms are tested too
mod tests {
    use super::*;

    fn with_profile(
        p: cri::security_profile::ProfileType,
        r: &str,
    ) -> cri::LinuxContainerSecurityContext {
        cri::LinuxContainerSecurityContext {
            apparmor: Some(cri::SecurityProfile {
                profile_type: p as i32,
                localhost_ref: r.into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn apparmor_without_apparmor() {
        use cri::security_profile::ProfileType;
        let none = SecurityModules::default();
        let def = with_profile(ProfileType::RuntimeDefault, "");
        assert_eq!(apparmor_profile(Some(&def), false, &none).unwrap(), None);
        assert_eq!(apparmor_profile(None, false, &none).unwrap(), None);
        let local = with_profile(ProfileType::Localhost, "localhost/mine");
        let e = apparmor_profile(Some(&local), false, &none).unwrap_err();
        assert!(
            e.to_string().contains("not supported") && e.to_string().contains("mine"),
            "{e}"
        );
        let bogus = cri::LinuxContainerSecurityContext {
            apparmor_profile: "bogus".into(),
            ..Default::default()
        };
        assert!(
            apparmor_profile(Some(&bogus), false, &none)
                .unwrap_err()
                .field
                .ends_with("apparmor_profile")
        );
    }

    #[test]
    fn apparmor_with_apparmor() {
        use cri::security_profile::ProfileType;
        let host = SecurityModules {
            apparmor_profiles: Some(vec![DEFAULT_APPARMOR_PROFILE.into(), "mine".into()]),
            selinux: None,
        };
        assert_eq!(
            apparmor_profile(None, false, &host).unwrap().as_deref(),
            Some(DEFAULT_APPARMOR_PROFILE)
        );
        assert_eq!(apparmor_profile(None, true, &host).unwrap(), None);
        let local = with_profile(ProfileType::Localhost, "mine");
        assert_eq!(
            apparmor_profile(Some(&local), false, &host)
                .unwrap()
                .as_deref(),
            Some("mine")
        );
        let missing = with_profile(ProfileType::Localhost, "other");
        assert!(
            apparmor_profile(Some(&missing), false, &host)
                .unwrap_err()
                .to_string()
                .contains("not loaded")
        );
    }

    #[test]
    fn user_namespaces_are_refused() {
        let pod_userns = cri::NamespaceOption {
            userns_options: Some(cri::UserNamespace {
                mode: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(
            check_userns(Some(&pod_userns), "ns")
                .unwrap_err()
                .field
                .ends_with("userns_options")
        );
        assert!(check_userns(None, "ns").is_ok());
    }

    /// The profile install.sh loads is the one RuntimeDefault names, and
    /// AppArmor's own parser accepts it (CI installs `apparmor`).
    #[test]
    fn deployed_default_profile_parses() {
        let file = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/apparmor/berth-default"
        );
        let text = std::fs::read_to_string(file).unwrap();
        let header = format!("profile {DEFAULT_APPARMOR_PROFILE} flags=");
        assert!(text.lines().any(|l| l.starts_with(&header)), "{file}");
        let parsed = std::process::Command::new("apparmor_parser")
            .args(["--skip-kernel-load", "--skip-cache", "--quiet", file])
            .output();
        match parsed {
            Ok(out) => assert!(
                out.status.success(),
                "apparmor_parser: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipped: apparmor_parser is not installed ({e})")
            }
            Err(e) => panic!("apparmor_parser: {e}"),
        }
    }
}
