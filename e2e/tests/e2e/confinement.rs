//! Confinement e2e tests: seccomp, privileged and capabilities, users and groups, and
//! bind-mount propagation, seen from inside real containers.

use super::*;

const SC_SECCOMP_ERRNO: i32 = 38; // ENOSYS: a filter's answer, unlike EPERM from a missing capability

fn profile(
    t: cri::security_profile::ProfileType,
    localhost_ref: &str,
) -> Option<cri::SecurityProfile> {
    Some(cri::SecurityProfile {
        profile_type: t as i32,
        localhost_ref: localhost_ref.into(),
    })
}

fn with_security(
    mut cfg: cri::ContainerConfig,
    sc: cri::LinuxContainerSecurityContext,
) -> cri::ContainerConfig {
    cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(sc),
        ..Default::default()
    });
    cfg
}

fn cap_add(names: &[&str]) -> Option<cri::Capability> {
    Some(cri::Capability {
        add_capabilities: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

fn sleeper(name: &str, image: &str) -> cri::ContainerConfig {
    container_config(name, image, "while true; do sleep 1; done")
}

/// A field of `/proc/self/status` inside the container.
async fn proc_status(c: &mut CriClient, id: &str, field: &str) -> Result<String> {
    let (code, out, err) = exec_in(
        c,
        id,
        &[
            "busybox",
            "grep",
            &format!("^{field}:"),
            "/proc/self/status",
        ],
    )
    .await?;
    ensure!(code == 0, "no {field} in /proc/self/status: {err}");
    Ok(out
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string())
}

pub fn seccomp_profiles_filter_syscalls() -> Result<(), Failed> {
    use cri::security_profile::ProfileType;
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("seccomp", "sc-1", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let sc = |p, r: &str, caps: &[&str]| cri::LinuxContainerSecurityContext {
            seccomp: profile(p, r),
            capabilities: cap_add(caps),
            ..Default::default()
        };
        let img = &w.busybox.reference;
        // RuntimeDefault: filter mode, and no user namespace (needs no capability).
        let def = create_and_start(
            &mut c,
            &pod,
            &pod_cfg,
            with_security(
                sleeper("def", img),
                sc(ProfileType::RuntimeDefault, "", &[]),
            ),
        )
        .await?;
        ensure!(
            proc_status(&mut c, &def, "Seccomp").await? == "2",
            "RuntimeDefault is not filtering"
        );
        let (code, _, err) = exec_in(&mut c, &def, &["busybox", "unshare", "-U", "true"]).await?;
        ensure!(
            code != 0 && err.contains("Operation not permitted"),
            "unshare -U under RuntimeDefault: {code} {err}"
        );
        // The deprecated string form means the same.
        let mut old = sc(ProfileType::Unconfined, "", &[]);
        old.seccomp = None;
        #[allow(deprecated)]
        {
            old.seccomp_profile_path = "runtime/default".into();
        }
        let old_id = create_and_start(
            &mut c,
            &pod,
            &pod_cfg,
            with_security(sleeper("old", img), old),
        )
        .await?;
        ensure!(proc_status(&mut c, &old_id, "Seccomp").await? == "2");
        // Unconfined: no filter, and the same call works.
        let open = create_and_start(
            &mut c,
            &pod,
            &pod_cfg,
            with_security(
                sleeper("open", img),
                sc(ProfileType::Unconfined, "", &["SYS_ADMIN"]),
            ),
        )
        .await?;
        ensure!(proc_status(&mut c, &open, "Seccomp").await? == "0");
        let (code, _, err) = exec_in(&mut c, &open, &["busybox", "unshare", "-U", "true"]).await?;
        ensure!(code == 0, "unshare -U unconfined: {err}");
        let (code, _, err) =
            exec_in(&mut c, &open, &["busybox", "hostname", "seccomp-test"]).await?;
        ensure!(code == 0, "hostname with CAP_SYS_ADMIN, unconfined: {err}");
        // Localhost: a node file blocking sethostname and chmod with ENOSYS.
        let file = b.dir().join("block.json");
        std::fs::write(
            &file,
            serde_json::json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["sethostname", "chmod", "fchmod", "fchmodat"],
                              "action": "SCMP_ACT_ERRNO", "errnoRet": SC_SECCOMP_ERRNO}],
            })
            .to_string(),
        )?;
        let local = sc(
            ProfileType::Localhost,
            &file.display().to_string(),
            &["SYS_ADMIN"],
        );
        let blocked = create_and_start(
            &mut c,
            &pod,
            &pod_cfg,
            with_security(sleeper("local", img), local),
        )
        .await?;
        let (code, _, err) = exec_in(&mut c, &blocked, &["busybox", "hostname", "x"]).await?;
        ensure!(
            code != 0 && err.contains("Function not implemented"),
            "hostname under the profile: {code} {err}"
        );
        let (code, _, err) = exec_in(
            &mut c,
            &blocked,
            &["/bin/sh", "-c", "busybox touch /f && busybox chmod 600 /f"],
        )
        .await?;
        ensure!(
            code != 0 && err.contains("Function not implemented"),
            "chmod under the profile: {code} {err}"
        );
        // Profiles that cannot be applied are errors naming the file or field.
        for (r, want) in [
            ("/nonexistent/profile.json", "/nonexistent/profile.json"),
            ("relative.json", "clean absolute path"),
        ] {
            let cfg = with_security(sleeper("bad", img), sc(ProfileType::Localhost, r, &[]));
            let e = create_ctr(&mut c, &pod, &pod_cfg, cfg)
                .await
                .expect_err("a bad profile");
            ensure!(
                e.code() == Code::InvalidArgument
                    && e.message().contains(want)
                    && e.message().contains("seccomp"),
                "{e:?}"
            );
        }
        std::fs::write(&file, "{not json")?;
        let cfg = with_security(
            sleeper("bad", img),
            sc(ProfileType::Localhost, &file.display().to_string(), &[]),
        );
        let e = create_ctr(&mut c, &pod, &pod_cfg, cfg)
            .await
            .expect_err("an invalid profile");
        ensure!(e.message().contains("not a valid seccomp profile"), "{e:?}");
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "seccomp")?;
        Ok(())
    })
}

fn privileged_pod(mut p: cri::PodSandboxConfig) -> cri::PodSandboxConfig {
    if let Some(l) = p.linux.as_mut() {
        l.security_context
            .get_or_insert_with(Default::default)
            .privileged = true;
    }
    p
}

pub fn privileged_and_all_capabilities() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let img = &w.busybox.reference;
        pull(&mut c, img).await?;
        let logs = b.dir().join("logs");
        let plain_cfg = container_pod("privileged", "pr-1", &logs);
        let plain_pod = run_pod(&mut c, plain_cfg.clone()).await?;
        let privileged = || cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        };
        let e = create_ctr(
            &mut c,
            &plain_pod,
            &plain_cfg,
            with_security(sleeper("p", img), privileged()),
        )
        .await
        .expect_err("a privileged container in a plain pod");
        ensure!(
            e.code() == Code::InvalidArgument
                && e.message()
                    .contains("no privileged container allowed in sandbox"),
            "{e:?}"
        );
        // This host's bounding set lacks CAP_SYS_RESOURCE: asking for it by name is an
        // error; ALL is what berthd has.
        let e = create_ctr(
            &mut c,
            &plain_pod,
            &plain_cfg,
            with_security(
                sleeper("r", img),
                cri::LinuxContainerSecurityContext {
                    capabilities: cap_add(&["SYS_RESOURCE"]),
                    ..Default::default()
                },
            ),
        )
        .await;
        let have_resource = b
            .status_field("CapEff")
            .context("berthd's CapEff")?
            .chars()
            .rev()
            .nth(6)
            .and_then(|d| d.to_digit(16))
            .is_some_and(|d| d & 1 != 0);
        if have_resource {
            e?;
        } else {
            let e = e.expect_err("CAP_SYS_RESOURCE is not berthd's");
            ensure!(
                e.message().contains("CAP_SYS_RESOURCE")
                    && e.message().contains("add_capabilities"),
                "{e:?}"
            );
        }
        let all = create_and_start(
            &mut c,
            &plain_pod,
            &plain_cfg,
            with_security(
                sleeper("all", img),
                cri::LinuxContainerSecurityContext {
                    capabilities: cap_add(&["ALL"]),
                    ..Default::default()
                },
            ),
        )
        .await?;
        let want = b.status_field("CapEff").context("berthd's CapEff")?;
        ensure!(
            proc_status(&mut c, &all, "CapEff").await? == want,
            "ALL is not berthd's set {want}"
        );
        ensure!(
            proc_status(&mut c, &all, "Seccomp").await? == "0",
            "no profile was asked for"
        );
        remove_pod(&mut c, &plain_pod).await?;
        // Privileged: berthd's capabilities, the host's devices, rw /sys, no masks.
        let pod_cfg = privileged_pod(container_pod("privileged", "pr-2", &logs));
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let mut sc = privileged();
        sc.seccomp = profile(cri::security_profile::ProfileType::RuntimeDefault, "");
        let p =
            create_and_start(&mut c, &pod, &pod_cfg, with_security(sleeper("p", img), sc)).await?;
        ensure!(proc_status(&mut c, &p, "CapEff").await? == want);
        ensure!(
            proc_status(&mut c, &p, "Seccomp").await? == "0",
            "privileged containers get no seccomp"
        );
        let host_devs: Vec<String> = std::fs::read_dir("/dev")?
            .flatten()
            .filter(|e| {
                e.file_type()
                    .is_ok_and(|t| t.is_block_device() || t.is_char_device())
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "console")
            .collect();
        let (_, listing, _) = exec_in(&mut c, &p, &["busybox", "ls", "/dev"]).await?;
        let seen: Vec<&str> = listing.split_whitespace().collect();
        let missing: Vec<&String> = host_devs
            .iter()
            .filter(|d| !seen.contains(&d.as_str()))
            .collect();
        ensure!(
            missing.is_empty(),
            "host devices missing in a privileged container: {missing:?}"
        );
        ensure!(
            seen.iter().any(|d| d.starts_with("loop") || *d == "kmsg"),
            "{seen:?}"
        );
        let (code, _, err) = exec_in(&mut c, &p, &["/bin/sh", "-c", "busybox grep -q ' /sys sysfs rw' /proc/mounts && busybox cat /proc/keys >/dev/null"]).await?;
        ensure!(
            code == 0,
            "rw /sys and an unmasked /proc/keys in a privileged container: {err}"
        );
        let confined = |mounts: &str| {
            [
                "/proc/keys",
                "/proc/timer_list",
                "/sys/firmware",
                "/proc/sys",
            ]
            .into_iter()
            .filter(|m| {
                mounts
                    .lines()
                    .any(|l| l.split_whitespace().nth(4) == Some(m))
            })
            .count()
        };
        let (_, mounts, _) =
            exec_in(&mut c, &p, &["busybox", "cat", "/proc/self/mountinfo"]).await?;
        ensure!(
            confined(&mounts) == 0,
            "masked or read-only paths in a privileged container:\n{mounts}"
        );
        // An unprivileged container in the same pod has its masks and no host devices.
        let u = create_and_start(&mut c, &pod, &pod_cfg, sleeper("u", img)).await?;
        let (_, mounts, _) =
            exec_in(&mut c, &u, &["busybox", "cat", "/proc/self/mountinfo"]).await?;
        ensure!(
            confined(&mounts) == 4,
            "an unprivileged container lacks its masks:\n{mounts}"
        );
        let (_, listing, _) = exec_in(&mut c, &u, &["busybox", "ls", "/dev"]).await?;
        ensure!(
            !listing
                .split_whitespace()
                .any(|d| d.starts_with("loop") || d == "kmsg"),
            "{listing}"
        );
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "privileged")?;
        Ok(())
    })
}

/// An image whose user `app` (uid 1000, gid 1000) is listed in group `extra` (50000).
fn grouped_image() -> ImageBuilder {
    let layer = base_layer()
        .file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n",
            0o644,
            0,
            0,
        )
        .file(
            "etc/group",
            "root:x:0:\napp:x:1000:app\nextra:x:50000:app\nunrelated:x:60000:root\n",
            0o644,
            0,
            0,
        );
    ImageBuilder::new()
        .layer(layer, Compression::Gzip)
        .cmd(&["/bin/sh"])
}

pub fn image_groups_reach_the_process() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let image = grouped_image()
            .push(w.reg.addr(), "test/grouped", "1", None)
            .await?;
        pull(&mut c, &image.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("groups", "gr-1", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let sc = |policy: cri::SupplementalGroupsPolicy| cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            supplemental_groups: vec![1234],
            supplemental_groups_policy: policy as i32,
            ..Default::default()
        };
        let merge = create_and_start(
            &mut c,
            &pod,
            &pod_cfg,
            with_security(
                sleeper("merge", &image.reference),
                sc(cri::SupplementalGroupsPolicy::Merge),
            ),
        )
        .await?;
        let (_, out, _) = exec_in(&mut c, &merge, &["busybox", "id", "-G"]).await?;
        ensure!(out.trim() == "1000 1234 50000", "id -G (Merge): {out:?}");
        let (st, _) = ctr_status(&mut c, &merge).await?;
        let user = st
            .user
            .and_then(|u| u.linux)
            .context("ContainerStatus.user")?;
        ensure!(
            user.uid == 1000 && user.gid == 1000 && user.supplemental_groups == [1000, 50000, 1234],
            "{user:?}"
        );
        let strict = create_and_start(
            &mut c,
            &pod,
            &pod_cfg,
            with_security(
                sleeper("strict", &image.reference),
                sc(cri::SupplementalGroupsPolicy::Strict),
            ),
        )
        .await?;
        let (_, out, _) = exec_in(&mut c, &strict, &["busybox", "id", "-G"]).await?;
        ensure!(out.trim() == "1000 1234", "id -G (Strict): {out:?}");
        // A user by name, the image's default user, and a group without a user.
        let named = create_and_start(
            &mut c,
            &pod,
            &pod_cfg,
            with_security(
                sleeper("named", &image.reference),
                cri::LinuxContainerSecurityContext {
                    run_as_username: "app".into(),
                    ..Default::default()
                },
            ),
        )
        .await?;
        let (_, out, _) = exec_in(&mut c, &named, &["busybox", "id"]).await?;
        ensure!(
            out.trim() == "uid=1000(app) gid=1000(app) groups=1000(app),50000(extra)",
            "id: {out:?}"
        );
        let e = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            with_security(
                sleeper("g", &image.reference),
                cri::LinuxContainerSecurityContext {
                    run_as_group: Some(cri::Int64Value { value: 7 }),
                    ..Default::default()
                },
            ),
        )
        .await
        .expect_err("a group without a user");
        ensure!(
            e.code() == Code::InvalidArgument
                && e.message().contains("run_as_group")
                && e.message().contains("specified without user"),
            "{e:?}"
        );
        let status = c
            .runtime
            .status(cri::StatusRequest::default())
            .await?
            .into_inner();
        ensure!(
            status
                .features
                .is_some_and(|f| f.supplemental_groups_policy),
            "Status does not report SupplementalGroupsPolicy"
        );
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "groups")?;
        Ok(())
    })
}

/// A tmpfs on a fresh dir with the given propagation; unmounted (with all that
/// propagated into it) on drop.
struct HostMountPoint(PathBuf);

impl HostMountPoint {
    fn new(dir: PathBuf, propagation: &str) -> Result<HostMountPoint> {
        std::fs::create_dir_all(&dir)?;
        let m = HostMountPoint(dir);
        sh(&format!(
            "mount -t tmpfs e2e {0} && mount --make-{propagation} {0}",
            m.0.display()
        ))?;
        Ok(m)
    }
}

impl Drop for HostMountPoint {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn sh(script: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(script).output()?;
    ensure!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn host_mounted(path: &Path) -> Result<bool> {
    let want = format!(" {} ", path.display());
    Ok(std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .any(|l| l.contains(&want)))
}

pub fn mount_propagation_both_ways() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let img = &w.busybox.reference;
        pull(&mut c, img).await?;
        let shared = HostMountPoint::new(b.dir().join("shared"), "shared")?;
        let private = HostMountPoint::new(b.dir().join("private"), "private")?;
        let logs = b.dir().join("logs");
        let pod_cfg = privileged_pod(container_pod("propagation", "mp-1", &logs));
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let bind = |host: &Path, ctr: &str, p: cri::MountPropagation| cri::Mount {
            container_path: ctr.into(),
            host_path: host.display().to_string(),
            propagation: p as i32,
            ..Default::default()
        };
        let privileged = cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        };
        let mut cfg = with_security(sleeper("both", img), privileged.clone());
        cfg.mounts = vec![bind(
            &shared.0,
            "/both",
            cri::MountPropagation::PropagationBidirectional,
        )];
        let both = create_and_start(&mut c, &pod, &pod_cfg, cfg).await?;
        let mut cfg = with_security(sleeper("slave", img), privileged.clone());
        cfg.mounts = vec![bind(
            &shared.0,
            "/slave",
            cri::MountPropagation::PropagationHostToContainer,
        )];
        let slave = create_and_start(&mut c, &pod, &pod_cfg, cfg).await?;
        // Host to container: both see a mount made on the host.
        sh(&format!(
            "mkdir {0}/from-host && mount -t tmpfs h {0}/from-host",
            shared.0.display()
        ))?;
        for (id, at) in [(&both, "/both"), (&slave, "/slave")] {
            let (_, mounts, _) =
                exec_in(&mut c, id, &["busybox", "cat", "/proc/self/mountinfo"]).await?;
            ensure!(
                mounts.contains(&format!(" {at}/from-host ")),
                "{at}: the host's mount did not propagate in:\n{mounts}"
            );
        }
        // Container to host: only the rshared one's mount reaches the host.
        let (code, _, err) = exec_in(
            &mut c,
            &both,
            &[
                "/bin/sh",
                "-c",
                "busybox mkdir /both/from-ctr && busybox mount -t tmpfs c /both/from-ctr",
            ],
        )
        .await?;
        ensure!(code == 0, "{err}");
        ensure!(
            host_mounted(&shared.0.join("from-ctr"))?,
            "an rshared container mount did not reach the host"
        );
        let (code, _, err) = exec_in(
            &mut c,
            &slave,
            &[
                "/bin/sh",
                "-c",
                "busybox mkdir /slave/from-slave && busybox mount -t tmpfs s /slave/from-slave",
            ],
        )
        .await?;
        ensure!(code == 0, "{err}");
        ensure!(
            !host_mounted(&shared.0.join("from-slave"))?,
            "an rslave container mount reached the host"
        );
        // A host mount that cannot carry the propagation is refused, naming it.
        for (p, what) in [
            (
                cri::MountPropagation::PropagationBidirectional,
                "not a shared mount",
            ),
            (
                cri::MountPropagation::PropagationHostToContainer,
                "not a shared or slave mount",
            ),
        ] {
            let mut cfg = with_security(sleeper("refused", img), privileged.clone());
            cfg.mounts = vec![bind(&private.0, "/p", p)];
            let e = create_ctr(&mut c, &pod, &pod_cfg, cfg)
                .await
                .expect_err("a private host mount");
            ensure!(
                e.code() == Code::InvalidArgument
                    && e.message().contains("config.mounts[0].propagation")
                    && e.message().contains(what),
                "{e:?}"
            );
        }
        remove_pod(&mut c, &pod).await?;
        drop((shared, private));
        assert_no_pod_leftovers(&b, "propagation")?;
        Ok(())
    })
}
