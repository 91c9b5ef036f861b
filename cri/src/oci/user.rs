//! Who the container's process runs as: uid and gid from the request or the image
//! (names resolved in the image's `/etc/passwd` and `/etc/group`), and its
//! supplementary groups as containerd computes them: the primary gid, the groups the
//! image's `/etc/group` lists the user in (policy `Merge`, the default; the class of
//! CVE-2023-25173 is leaving them out), then the request's `supplemental_groups`.
//! Policy `Strict` leaves the image's groups out.

use std::path::Path;

use k8s_cri::v1 as cri;
use oci_spec::image::ImageConfiguration;
use serde::{Deserialize, Serialize};

use super::{SpecError, err};

const SC: &str = "config.linux.security_context";

/// The identity the container's first process gets; `ContainerStatus.user` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIds {
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// Every supplementary gid, the primary one first.
    pub additional_gids: Vec<u32>,
}

/// Reads a small file of the image (`etc/passwd`, `etc/group`) without following
/// symlinks anywhere on the way, and only if it is a regular file under 1 MiB: an image
/// must not make berthd read host files, devices or FIFOs.
fn read_image_file(rootfs: &Path, rel: &str) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut cur = rootfs.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        cur.push(part);
        let meta = std::fs::symlink_metadata(&cur).ok()?;
        let last = i + 1 == parts.len();
        if meta.file_type().is_symlink()
            || (last && (!meta.is_file() || meta.len() > 1 << 20))
            || (!last && !meta.is_dir())
        {
            return None;
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&cur)
        .ok()?;
    let mut text = String::new();
    f.by_ref().take(1 << 20).read_to_string(&mut text).ok()?;
    Some(text)
}

/// The records of a passwd- or group-style file: its colon-separated fields.
fn records(rootfs: &Path, file: &str) -> Vec<Vec<String>> {
    read_image_file(rootfs, file)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
        .filter(|f| f.len() > 3)
        .collect()
}

/// A passwd entry: (name, uid, primary gid).
fn passwd_entry(rootfs: &Path, matches: impl Fn(&str, &str) -> bool) -> Option<(String, u32, u32)> {
    records(rootfs, "etc/passwd").into_iter().find_map(|f| {
        matches(&f[0], &f[2])
            .then(|| Some((f[0].clone(), f[2].parse().ok()?, f[3].parse().unwrap_or(0))))?
    })
}

/// A user name or number: (uid, primary gid). A number not in the image's passwd has
/// gid 0; a name not there is an error.
fn resolve_user(rootfs: &Path, user: &str, field: &str) -> Result<(u32, u32), SpecError> {
    if let Ok(uid) = user.parse::<u32>() {
        let gid = passwd_entry(rootfs, |_, id| id == user).map_or(0, |(_, _, g)| g);
        return Ok((uid, gid));
    }
    passwd_entry(rootfs, |name, _| name == user)
        .map(|(_, uid, gid)| (uid, gid))
        .ok_or_else(|| {
            err(
                field,
                format!("user {user:?} is not in the image's /etc/passwd"),
            )
        })
}

/// A group name or number.
fn resolve_group(rootfs: &Path, group: &str, field: &str) -> Result<u32, SpecError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    records(rootfs, "etc/group")
        .into_iter()
        .find(|f| f[0] == group)
        .and_then(|f| f[2].parse().ok())
        .ok_or_else(|| {
            err(
                field,
                format!("group {group:?} is not in the image's /etc/group"),
            )
        })
}

/// The groups the image's `/etc/group` lists `user` in (a name, or a uid looked up in
/// `/etc/passwd`), leaving out a group named as the user (containerd's
/// `WithAdditionalGIDs`).
fn image_groups(rootfs: &Path, user: &str) -> Vec<u32> {
    let name = match user.parse::<u32>() {
        Ok(_) => match passwd_entry(rootfs, |_, id| id == user) {
            Some((name, _, _)) => name,
            None => return Vec::new(),
        },
        Err(_) => user.to_string(),
    };
    records(rootfs, "etc/group")
        .into_iter()
        .filter(|f| f[0] != name && f[3].split(',').any(|m| m.trim() == name))
        .filter_map(|f| f[2].parse().ok())
        .collect()
}

fn id_of(v: i64, field: &str) -> Result<u32, SpecError> {
    u32::try_from(v).map_err(|_| err(field, format!("{v} is out of range")))
}

/// The user the request names (`run_as_username` wins over `run_as_user`, as in
/// containerd), with `run_as_group`; a group without a user is refused.
fn requested_user(
    sc: &cri::LinuxContainerSecurityContext,
) -> Result<Option<(String, Option<u32>, &'static str)>, SpecError> {
    let group = sc
        .run_as_group
        .as_ref()
        .map(|g| id_of(g.value, &format!("{SC}.run_as_group")))
        .transpose()?;
    let user = if !sc.run_as_username.is_empty() {
        Some((sc.run_as_username.clone(), "run_as_username"))
    } else if let Some(u) = &sc.run_as_user {
        Some((
            id_of(u.value, &format!("{SC}.run_as_user"))?.to_string(),
            "run_as_user",
        ))
    } else {
        None
    };
    match (user, group) {
        (None, Some(g)) => Err(err(
            &format!("{SC}.run_as_group"),
            format!("user group \"{g}\" is specified without user"),
        )),
        (None, None) => Ok(None),
        (Some((u, field)), g) => Ok(Some((u, g, field))),
    }
}

/// The uid, gid and supplementary gids the process runs as.
pub fn process_ids(
    config: &cri::ContainerConfig,
    image: &ImageConfiguration,
    rootfs: &Path,
) -> Result<ProcessIds, SpecError> {
    let default_sc = cri::LinuxContainerSecurityContext::default();
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .unwrap_or(&default_sc);
    let image_user = image
        .config()
        .as_ref()
        .and_then(|c| c.user().clone())
        .unwrap_or_default();
    let (user, uid, gid) = match requested_user(sc)? {
        Some((user, group, field)) => {
            let (uid, gid) = resolve_user(rootfs, &user, &format!("{SC}.{field}"))?;
            (user, uid, group.unwrap_or(gid))
        }
        None if !image_user.is_empty() => {
            let (user, group) = image_user.split_once(':').unwrap_or((&image_user, ""));
            let (uid, mut gid) = resolve_user(rootfs, user, "image config User")?;
            if !group.is_empty() {
                gid = resolve_group(rootfs, group, "image config User")?;
            }
            (user.to_string(), uid, gid)
        }
        None => ("0".to_string(), 0, 0),
    };
    let strict = sc.supplemental_groups_policy == cri::SupplementalGroupsPolicy::Strict as i32;
    let from_image = if strict {
        Vec::new()
    } else {
        image_groups(rootfs, &user)
    };
    let requested = sc
        .supplemental_groups
        .iter()
        .map(|g| id_of(*g, &format!("{SC}.supplemental_groups")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut additional_gids = vec![gid];
    for g in from_image.into_iter().chain(requested) {
        if !additional_gids.contains(&g) {
            additional_gids.push(g);
        }
    }
    Ok(ProcessIds {
        uid,
        gid,
        additional_gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(user: &str) -> ImageConfiguration {
        serde_json::from_value(serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": {"User": user},
        }))
        .unwrap()
    }

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nweb:x:1000:1000::/:/bin/sh\nops:x:1001:1001::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nweb:x:1000:web\nstaff:x:50:\nextra:x:50000:ops,web\nother:x:60000:ops\n",
        )
        .unwrap();
        dir
    }

    fn with_sc(sc: cri::LinuxContainerSecurityContext) -> cri::ContainerConfig {
        cri::ContainerConfig {
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(sc),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ids(uid: u32, gid: u32, more: &[u32]) -> ProcessIds {
        ProcessIds {
            uid,
            gid,
            additional_gids: more.to_vec(),
        }
    }

    #[test]
    fn image_users_and_their_groups() {
        let r = rootfs();
        let plain = cri::ContainerConfig::default();
        let user = |u: &str| process_ids(&plain, &image(u), r.path());
        assert_eq!(user("web").unwrap(), ids(1000, 1000, &[1000, 50000]));
        assert_eq!(user("web:staff").unwrap(), ids(1000, 50, &[50, 50000]));
        assert_eq!(user("42:43").unwrap(), ids(42, 43, &[43]));
        assert_eq!(
            user("1001").unwrap(),
            ids(1001, 1001, &[1001, 50000, 60000])
        );
        assert_eq!(user("").unwrap(), ids(0, 0, &[0]));
        assert!(user("nobody").unwrap_err().to_string().contains("nobody"));
    }

    #[test]
    fn requested_users_groups_and_policies() {
        let r = rootfs();
        let web = image("web");
        // The "Done when" case: uid 1000 in group 50000 in the image, 1234 asked for.
        let merge = with_sc(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            supplemental_groups: vec![1234],
            ..Default::default()
        });
        assert_eq!(
            process_ids(&merge, &web, r.path()).unwrap(),
            ids(1000, 1000, &[1000, 50000, 1234])
        );
        let strict = with_sc(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            supplemental_groups: vec![1234],
            supplemental_groups_policy: cri::SupplementalGroupsPolicy::Strict as i32,
            ..Default::default()
        });
        assert_eq!(
            process_ids(&strict, &web, r.path()).unwrap(),
            ids(1000, 1000, &[1000, 1234])
        );
        let named = with_sc(cri::LinuxContainerSecurityContext {
            run_as_username: "ops".into(),
            run_as_group: Some(cri::Int64Value { value: 7 }),
            ..Default::default()
        });
        assert_eq!(
            process_ids(&named, &web, r.path()).unwrap(),
            ids(1001, 7, &[7, 50000, 60000])
        );
        let group_only = with_sc(cri::LinuxContainerSecurityContext {
            run_as_group: Some(cri::Int64Value { value: 7 }),
            ..Default::default()
        });
        let e = process_ids(&group_only, &web, r.path()).unwrap_err();
        assert_eq!(e.field, "config.linux.security_context.run_as_group");
        assert!(
            e.message
                .contains("user group \"7\" is specified without user"),
            "{e}"
        );
        let bad = with_sc(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: -1 }),
            ..Default::default()
        });
        assert!(
            process_ids(&bad, &web, r.path())
                .unwrap_err()
                .field
                .ends_with("run_as_user")
        );
    }
}
