//! The network config list: the lexicographically first `.conflist`, `.conf` or
//! `.json` file of the config dir, as libcni picks it. A single-plugin `.conf` becomes
//! a list of one.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// CNI spec versions berth can drive.
pub const SUPPORTED_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "0.2.0"];

/// Why there is no usable network config.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    /// The directory holds no config file.
    #[error("no CNI network config (*.conflist, *.conf, *.json) in {dir}")]
    NoConfig { dir: PathBuf },
    /// A file could not be read.
    #[error("reading CNI config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a valid network config.
    #[error("CNI config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// A plugin the config names is in none of the plugin dirs.
    #[error("CNI plugin {plugin:?} (network {network:?}) not found in {dirs}")]
    MissingPlugin {
        network: String,
        plugin: String,
        dirs: String,
    },
}

/// A loaded network config list.
#[derive(Clone, Debug, PartialEq)]
pub struct CniConfList {
    /// Network name.
    pub name: String,
    /// The list's `cniVersion`, which every plugin is run with.
    pub cni_version: String,
    /// `disableCheck`: CHECK is skipped.
    pub disable_check: bool,
    /// `disableGC`: GC is skipped.
    pub disable_gc: bool,
    /// The plugin configs, in order.
    pub plugins: Vec<Value>,
    /// The file it came from.
    pub source: PathBuf,
}

/// `major.minor.patch` as numbers, for comparisons; unknown parts are 0.
pub fn version_tuple(v: &str) -> (u32, u32, u32) {
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

/// A name the CNI spec allows for networks (and that is safe in a file name).
fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A plugin `type`: a bare executable name, never a path.
fn valid_plugin_type(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

impl CniConfList {
    /// Loads the first config file of `dir` (sorted by name).
    pub fn load_dir(dir: &Path) -> Result<CniConfList, ConfError> {
        let rd = std::fs::read_dir(dir).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ConfError::NoConfig {
                dir: dir.to_path_buf(),
            },
            _ => ConfError::Read {
                path: dir.to_path_buf(),
                source,
            },
        })?;
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                ) && p.is_file()
            })
            .collect();
        files.sort();
        let first = files.first().ok_or_else(|| ConfError::NoConfig {
            dir: dir.to_path_buf(),
        })?;
        Self::load_file(first)
    }

    /// Loads one file; `.conflist` is a list, anything else a single plugin config.
    pub fn load_file(path: &Path) -> Result<CniConfList, ConfError> {
        let bytes = std::fs::read(path).map_err(|source| ConfError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let is_list = path.extension().is_some_and(|e| e == "conflist");
        Self::parse(&bytes, is_list, path)
    }

    /// Parses config bytes; `path` only names the source in errors.
    pub fn parse(bytes: &[u8], is_list: bool, path: &Path) -> Result<CniConfList, ConfError> {
        let invalid = |message: String| ConfError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let v: Value = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if !v.is_object() {
            return Err(invalid("not a JSON object".into()));
        }
        let name = v["name"].as_str().unwrap_or_default().to_string();
        if !valid_name(&name) {
            return Err(invalid(format!(
                "`name` {name:?}: must be 1-128 of [A-Za-z0-9_.-], starting alphanumeric"
            )));
        }
        let cni_version = v["cniVersion"].as_str().unwrap_or_default().to_string();
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(invalid(format!(
                "`cniVersion` {cni_version:?} is not one of {}",
                SUPPORTED_VERSIONS.join(", ")
            )));
        }
        let plugins: Vec<Value> = if is_list {
            match v.get("plugins") {
                Some(Value::Array(p)) => p.clone(),
                _ => return Err(invalid("`plugins`: must be an array".into())),
            }
        } else {
            vec![v.clone()]
        };
        if plugins.is_empty() {
            return Err(invalid("`plugins` is empty".into()));
        }
        for (i, p) in plugins.iter().enumerate() {
            let field = if is_list {
                format!("plugins[{i}].type")
            } else {
                "type".to_string()
            };
            let t = p["type"].as_str().unwrap_or_default();
            if !p.is_object() || !valid_plugin_type(t) {
                return Err(invalid(format!(
                    "`{field}` {t:?}: must name a plugin binary"
                )));
            }
            if let Some(ipam) = p.get("ipam").filter(|i| !i.is_null()) {
                let t = ipam["type"].as_str().unwrap_or_default();
                if !valid_plugin_type(t) {
                    return Err(invalid(format!(
                        "`{}ipam.type` {t:?}: must name a plugin binary",
                        if is_list {
                            format!("plugins[{i}].")
                        } else {
                            String::new()
                        }
                    )));
                }
            }
        }
        Ok(CniConfList {
            name,
            cni_version,
            disable_check: v["disableCheck"].as_bool().unwrap_or(false),
            disable_gc: v["disableGC"].as_bool().unwrap_or(false),
            plugins,
            source: path.to_path_buf(),
        })
    }

    /// Every binary the list needs (plugins and their IPAM plugins), in order.
    pub fn binaries(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.plugins {
            for t in [p["type"].as_str(), p["ipam"]["type"].as_str()]
                .into_iter()
                .flatten()
            {
                if !out.iter().any(|o| o == t) {
                    out.push(t.to_string());
                }
            }
        }
        out
    }

    /// Checks that every binary is present in `bin_dirs`.
    pub fn check_binaries(&self, bin_dirs: &[PathBuf]) -> Result<(), ConfError> {
        for b in self.binaries() {
            if find_plugin(&b, bin_dirs).is_none() {
                return Err(ConfError::MissingPlugin {
                    network: self.name.clone(),
                    plugin: b,
                    dirs: bin_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":"),
                });
            }
        }
        Ok(())
    }

    /// The list as JSON (what the cache keeps for a later DEL).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "disableGC": self.disable_gc,
            "plugins": self.plugins,
        })
    }
}

/// The first executable file named `name` in `dirs`.
pub fn find_plugin(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if !valid_plugin_type(name) {
        return None;
    }
    dirs.iter().map(|d| d.join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_file_by_name_wins_and_conf_becomes_a_list() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("20-b.conflist"),
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("10-a.conf"),
            r#"{"cniVersion":"0.4.0","name":"a","type":"ptp","ipam":{"type":"host-local"}}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("00-ignored.txt"), "x").unwrap();
        let c = CniConfList::load_dir(d.path()).unwrap();
        assert_eq!((c.name.as_str(), c.cni_version.as_str()), ("a", "0.4.0"));
        assert_eq!(c.binaries(), ["ptp", "host-local"]);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let p = Path::new("x.conflist");
        let cases = [
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "plugins",
            ),
            (
                r#"{"cniVersion":"9.9.9","name":"n","plugins":[{"type":"a"}]}"#,
                "cniVersion",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"../n","plugins":[{"type":"a"}]}"#,
                "name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../../bin/sh"}]}"#,
                "plugins[0].type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a","ipam":{}}]}"#,
                "plugins[0].ipam.type",
            ),
            (r#"{"cniVersion":"1.0.0","name":"n""#, "EOF"),
        ];
        for (text, want) in cases {
            let e = CniConfList::parse(text.as_bytes(), true, p)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            CniConfList::load_dir(d.path()),
            Err(ConfError::NoConfig { .. })
        ));
    }

    #[test]
    fn missing_plugins_are_named() {
        let c = CniConfList::parse(
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"no-such-plugin-xyz"}]}"#,
            true,
            Path::new("x"),
        )
        .unwrap();
        let e = c
            .check_binaries(&[PathBuf::from("/usr/lib/cni")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no-such-plugin-xyz") && e.contains("/usr/lib/cni"),
            "{e}"
        );
    }
}
