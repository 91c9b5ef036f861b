//! What each configured runtime handler supports, asked once at start with
//! `<runtime> features` (runc 1.1 and later), as containerd's runtime introspection does.
//! kubelet reads it from `Status` to decide which pods may use which features.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_cri::v1 as cri;
use tracing::{info, warn};

use crate::config::Config;

/// How long `<runtime> features` may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The features of one handler that berth itself implements end to end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandlerFeatures {
    /// `rro` bind mounts: the runtime knows the mount option and the kernel has
    /// `mount_setattr` (5.12).
    pub recursive_read_only_mounts: bool,
}

/// Every configured handler's features, by name.
#[derive(Clone, Debug, Default)]
pub struct RuntimeHandlers {
    by_name: BTreeMap<String, HandlerFeatures>,
    default: String,
}

impl RuntimeHandlers {
    /// Asks every configured handler; one that cannot answer supports nothing optional.
    pub async fn probe(cfg: &Config) -> RuntimeHandlers {
        let kernel_rro = kernel_at_least(5, 12);
        let mut by_name = BTreeMap::new();
        for (name, handler) in &cfg.runtimes {
            let options = mount_options(&handler.path).await;
            let features = HandlerFeatures {
                recursive_read_only_mounts: kernel_rro && options.iter().any(|o| o == "rro"),
            };
            info!(handler = %name, ?features, "runtime handler features");
            by_name.insert(name.clone(), features);
        }
        RuntimeHandlers {
            by_name,
            default: cfg.default_runtime.clone(),
        }
    }

    /// From known values (tests).
    pub fn new(by_name: BTreeMap<String, HandlerFeatures>, default: &str) -> RuntimeHandlers {
        RuntimeHandlers {
            by_name,
            default: default.to_string(),
        }
    }

    /// The features of handler `name` (empty = the default handler).
    pub fn get(&self, name: &str) -> HandlerFeatures {
        let name = if name.is_empty() { &self.default } else { name };
        self.by_name.get(name).copied().unwrap_or_default()
    }

    /// `StatusResponse.runtime_handlers`: the default handler under the empty name first
    /// (as containerd reports it), then every handler by name. User namespaces stay false:
    /// berth does not implement `userns_options` yet.
    pub fn to_cri(&self) -> Vec<cri::RuntimeHandler> {
        let entry = |name: &str| cri::RuntimeHandler {
            name: name.to_string(),
            features: Some(cri::RuntimeHandlerFeatures {
                recursive_read_only_mounts: self.get(name).recursive_read_only_mounts,
                user_namespaces: false,
            }),
        };
        std::iter::once(entry(""))
            .chain(self.by_name.keys().map(|n| entry(n)))
            .collect()
    }
}

/// `mountOptions` from `<runtime> features`; empty when the runtime has no such command.
async fn mount_options(runtime: &std::path::Path) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Features {
        #[serde(rename = "mountOptions", default)]
        mount_options: Vec<String>,
    }
    let run = tokio::process::Command::new(runtime)
        .arg("features")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(PROBE_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => {
            match serde_json::from_slice::<Features>(&out.stdout) {
                Ok(f) => f.mount_options,
                Err(e) => {
                    warn!(runtime = %runtime.display(), error = %e, "unreadable `features` output");
                    Vec::new()
                }
            }
        }
        Ok(Ok(_)) => Vec::new(),
        Ok(Err(e)) => {
            warn!(runtime = %runtime.display(), error = %e, "cannot run the runtime");
            Vec::new()
        }
        Err(_) => {
            warn!(runtime = %runtime.display(), "`features` timed out");
            Vec::new()
        }
    }
}

/// Whether the running kernel's release is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    release_at_least(&release, major, minor)
}

fn release_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_comparison() {
        assert!(release_at_least("6.18.44-fc-v657\n", 5, 12));
        assert!(release_at_least("5.12.0", 5, 12));
        assert!(!release_at_least("5.11.22-generic", 5, 12));
        assert!(!release_at_least("4.19.0", 5, 12));
        assert!(!release_at_least("", 5, 12));
    }

    #[test]
    fn default_handler_is_listed_under_the_empty_name_first() {
        let rro = HandlerFeatures {
            recursive_read_only_mounts: true,
        };
        let h = RuntimeHandlers::new(
            [
                ("runc".to_string(), rro),
                ("crun".to_string(), HandlerFeatures::default()),
            ]
            .into(),
            "runc",
        );
        let names: Vec<_> = h.to_cri().iter().map(|r| r.name.clone()).collect();
        assert_eq!(names, ["", "crun", "runc"]);
        let rro_of = |n: &str| {
            h.to_cri()
                .into_iter()
                .find(|r| r.name == n)
                .and_then(|r| r.features)
                .map(|f| (f.recursive_read_only_mounts, f.user_namespaces))
        };
        assert_eq!(rro_of(""), Some((true, false)));
        assert_eq!(rro_of("crun"), Some((false, false)));
        assert_eq!(h.get("unknown"), HandlerFeatures::default());
    }
}
