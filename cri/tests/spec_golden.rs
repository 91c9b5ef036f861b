//! Golden tests of the CRI -> OCI translation: `build_spec`'s output for representative
//! CRI configs, pinned as canonical JSON (sorted keys, pretty) in `golden/spec/`, so
//! that any change to the generated `config.json` shows up byte for byte.
//!
//! `BERTH_BLESS=1 cargo test -p berth-cri --test spec_golden` rewrites the files; review
//! the diff before committing it.

// The deprecated string forms (seccomp_profile_path) are cases too.
#![allow(deprecated)]

use std::path::{Path, PathBuf};

use berth_cri::oci::{
    HostFacts, KERNEL_CAPABILITIES, SandboxFiles, SeccompHost, SecurityModules, SelinuxDefaults,
    SpecInputs, build_spec, parse_mountinfo,
};
use k8s_cri::v1 as cri;
use oci_spec::image::ImageConfiguration;
use serde_json::{Value, json};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/spec")
}

/// A rootfs with the passwd and group files user resolution reads.
fn rootfs() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("etc")).unwrap();
    std::fs::write(
        d.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1001::/home/web:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(
        d.path().join("etc/group"),
        "root:x:0:\nweb:x:1001:\nstaff:x:50:web\nextra:x:50000:web\n",
    )
    .unwrap();
    d
}

/// A host of this machine's shape, given by hand: every capability but
/// CAP_SYS_RESOURCE, seccomp on Linux 6.1 amd64, no AppArmor or SELinux, two devices,
/// and mounts where `/mnt/host` is a slave, `/mnt/shared` shared and `/` private.
fn host_facts() -> HostFacts {
    let device = |path: &str, typ: &str, major: i64, minor: i64| {
        serde_json::from_value(json!({
            "path": path, "type": typ, "major": major, "minor": minor,
            "fileMode": 0o666, "uid": 0, "gid": 0,
        }))
        .unwrap()
    };
    HostFacts {
        capabilities: KERNEL_CAPABILITIES
            .iter()
            .filter(|c| **c != "CAP_SYS_RESOURCE")
            .map(|c| c.to_string())
            .collect(),
        seccomp: SeccompHost {
            supported: true,
            kernel: (6, 1),
            arch: "amd64".into(),
        },
        modules: SecurityModules::default(),
        devices: vec![
            device("/dev/null", "c", 1, 3),
            device("/dev/sda", "b", 8, 0),
        ],
        mounts: parse_mountinfo(
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
             2 1 0:40 / /mnt/host rw master:4 - tmpfs t rw\n\
             3 1 0:41 / /mnt/shared rw shared:5 - tmpfs t rw\n",
        ),
    }
}

fn kv(k: &str, v: &str) -> cri::KeyValue {
    cri::KeyValue {
        key: k.into(),
        value: v.into(),
    }
}

fn base_container(name: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: "registry.test/app:1".into(),
            ..Default::default()
        }),
        envs: vec![kv("GREETING", "hi")],
        annotations: [("a.example/x".to_string(), "1".to_string())].into(),
        ..Default::default()
    }
}

fn base_pod() -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "pod".into(),
            uid: "uid-1".into(),
            namespace: "ns".into(),
            attempt: 0,
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods/poduid-1".into(),
            sysctls: [(
                "net.ipv4.ip_unprivileged_port_start".to_string(),
                "0".to_string(),
            )]
            .into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn image() -> Value {
    json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
        "config": {
        "Entrypoint": ["/bin/app"],
        "Cmd": ["--serve"],
        "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
        "WorkingDir": "/srv",
        "User": "",
    }})
}

/// The image config as berth reads it: typed.
fn typed(image: &Value) -> ImageConfiguration {
    serde_json::from_value(image.clone()).expect("a valid image config")
}

fn privileged_pod(pod: &mut cri::PodSandboxConfig) {
    if let Some(l) = pod.linux.as_mut() {
        l.security_context
            .get_or_insert_with(Default::default)
            .privileged = true;
    }
}

/// Where `seccomp_localhost`'s profile is written (the spec holds its contents).
const LOCALHOST_PROFILE: &str = "/tmp/berth-golden-seccomp.json";

fn write_localhost_profile() {
    let profile = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["sethostname", "chmod"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    });
    std::fs::write(LOCALHOST_PROFILE, profile.to_string()).unwrap();
}

fn sc(c: &mut cri::ContainerConfig) -> &mut cri::LinuxContainerSecurityContext {
    c.linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

fn mount(host: &str, ctr: &str, ro: bool, p: cri::MountPropagation) -> cri::Mount {
    cri::Mount {
        container_path: ctr.into(),
        host_path: host.into(),
        readonly: ro,
        propagation: p as i32,
        ..Default::default()
    }
}

/// One case: its name and what differs from the base.
struct Case {
    name: &'static str,
    container: cri::ContainerConfig,
    pod: cri::PodSandboxConfig,
    image: Value,
    netns: Option<&'static str>,
    shm: bool,
    min_oom: Option<i32>,
    /// On an SELinux host, with this pod label.
    selinux_pod: Option<&'static str>,
}

fn case(name: &'static str) -> Case {
    Case {
        name,
        container: base_container(name),
        pod: base_pod(),
        image: image(),
        netns: Some("/run/berth/netns/p1"),
        shm: true,
        min_oom: None,
        selinux_pod: None,
    }
}

fn cases() -> Vec<Case> {
    let mut v = vec![case("plain")];

    let mut c = case("privileged");
    sc(&mut c.container).privileged = true;
    privileged_pod(&mut c.pod);
    c.container.devices = vec![cri::Device {
        container_path: "/dev/null".into(),
        host_path: "/dev/null".into(),
        permissions: "rw".into(),
    }];
    v.push(c);

    let mut c = case("all_capabilities");
    sc(&mut c.container).capabilities = Some(cri::Capability {
        add_capabilities: vec!["ALL".into()],
        drop_capabilities: vec!["NET_RAW".into()],
        ..Default::default()
    });
    v.push(c);

    let mut c = case("seccomp_runtime_default");
    sc(&mut c.container).seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    v.push(c);

    let mut c = case("seccomp_runtime_default_sys_admin");
    let s = sc(&mut c.container);
    s.seccomp_profile_path = "runtime/default".into();
    s.capabilities = Some(cri::Capability {
        add_capabilities: vec!["SYS_ADMIN".into()],
        ..Default::default()
    });
    v.push(c);

    let mut c = case("seccomp_localhost");
    sc(&mut c.container).seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::Localhost as i32,
        localhost_ref: LOCALHOST_PROFILE.into(),
    });
    v.push(c);

    // An SELinux host: the first container inherits its pod's label, the second
    // takes its own type and level.
    let mut c = case("selinux_inherits_the_pod_label");
    c.selinux_pod = Some("system_u:system_r:container_t:s0:c4,c7");
    v.push(c);
    let mut c = case("selinux_options");
    c.selinux_pod = Some("system_u:system_r:container_t:s0:c4,c7");
    sc(&mut c.container).selinux_options = Some(cri::SeLinuxOption {
        r#type: "spc_t".into(),
        level: "s0:c1,c2".into(),
        ..Default::default()
    });
    v.push(c);

    let mut c = case("image_groups");
    c.image["config"]["User"] = json!("web");
    let s = sc(&mut c.container);
    s.supplemental_groups = vec![1234, 50];
    v.push(c);

    let mut c = case("host_namespaces");
    let node = cri::NamespaceMode::Node as i32;
    let ns = cri::NamespaceOption {
        network: node,
        pid: node,
        ipc: node,
        ..Default::default()
    };
    if let Some(l) = c.pod.linux.as_mut() {
        l.security_context = Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(ns.clone()),
            ..Default::default()
        });
    }
    sc(&mut c.container).namespace_options = Some(ns);
    c.netns = None;
    c.shm = false;
    v.push(c);

    let mut c = case("pod_pid_namespace");
    sc(&mut c.container).namespace_options = Some(cri::NamespaceOption {
        pid: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    });
    v.push(c);

    let mut c = case("tty_stdin");
    c.container.tty = true;
    c.container.stdin = true;
    c.container.stdin_once = true;
    c.container.command = vec!["/bin/sh".into()];
    v.push(c);

    let mut c = case("resources");
    c.container
        .linux
        .get_or_insert_with(Default::default)
        .resources = Some(cri::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpu_shares: 512,
        memory_limit_in_bytes: 64 << 20,
        memory_swap_limit_in_bytes: 128 << 20,
        oom_score_adj: 900,
        cpuset_cpus: "0".into(),
        cpuset_mems: "0".into(),
        hugepage_limits: vec![cri::HugepageLimit {
            page_size: "2MB".into(),
            limit: 4 << 20,
        }],
        unified: [("memory.high".to_string(), "50000000".to_string())].into(),
        ..Default::default()
    });
    c.min_oom = Some(-500);
    v.push(c);

    let mut c = case("devices");
    c.container.devices = vec![
        cri::Device {
            container_path: "/dev/mynull".into(),
            host_path: "/dev/null".into(),
            permissions: "rw".into(),
        },
        cri::Device {
            container_path: "/dev/zero".into(),
            host_path: "/dev/zero".into(),
            permissions: String::new(),
        },
    ];
    v.push(c);

    let mut c = case("mounts_propagation");
    c.container.mounts = vec![
        mount(
            "/var/lib/data",
            "/data",
            false,
            cri::MountPropagation::PropagationPrivate,
        ),
        mount(
            "/mnt/host",
            "/host",
            true,
            cri::MountPropagation::PropagationHostToContainer,
        ),
        mount(
            "/mnt/shared",
            "/shared",
            false,
            cri::MountPropagation::PropagationBidirectional,
        ),
        cri::Mount {
            recursive_read_only: true,
            ..mount(
                "/etc/ssl",
                "/etc/ssl",
                true,
                cri::MountPropagation::PropagationPrivate,
            )
        },
        mount(
            "/tmp/hosts",
            "/etc/hosts",
            true,
            cri::MountPropagation::PropagationPrivate,
        ),
    ];
    v.push(c);

    let mut c = case("run_as_user_group");
    let s = sc(&mut c.container);
    s.run_as_user = Some(cri::Int64Value { value: 1000 });
    s.run_as_group = Some(cri::Int64Value { value: 3000 });
    s.supplemental_groups = vec![4000, 5000];
    s.no_new_privs = true;
    v.push(c);

    let mut c = case("image_user_name");
    c.image["config"]["User"] = json!("web:staff");
    v.push(c);

    let mut c = case("run_as_username");
    sc(&mut c.container).run_as_username = "web".into();
    v.push(c);

    let mut c = case("readonly_rootfs");
    let s = sc(&mut c.container);
    s.readonly_rootfs = true;
    s.masked_paths = vec!["/proc/custom".into()];
    s.readonly_paths = vec!["/proc/ro".into()];
    v.push(c);

    let mut c = case("capabilities");
    sc(&mut c.container).capabilities = Some(cri::Capability {
        add_capabilities: vec!["NET_ADMIN".into(), "CAP_SYS_TIME".into()],
        drop_capabilities: vec!["KILL".into(), "cap_mknod".into()],
        ..Default::default()
    });
    v.push(c);

    // The restricted-profile pattern: drop everything, add one back.
    let mut c = case("capabilities_drop_all_add_one");
    sc(&mut c.container).capabilities = Some(cri::Capability {
        add_capabilities: vec!["NET_BIND_SERVICE".into()],
        drop_capabilities: vec!["ALL".into()],
        ..Default::default()
    });
    v.push(c);

    // Privileged: add/drop do not apply.
    let mut c = case("privileged_ignores_drops");
    sc(&mut c.container).privileged = true;
    privileged_pod(&mut c.pod);
    sc(&mut c.container).capabilities = Some(cri::Capability {
        drop_capabilities: vec!["ALL".into()],
        ..Default::default()
    });
    v.push(c);

    let mut c = case("command_args_env_workdir_volumes");
    c.container.args = vec!["--debug".into()];
    c.container.working_dir = "/work".into();
    c.container.envs = vec![kv("LANG", "en_US.UTF-8"), kv("EXTRA", "x=y")];
    c.image["config"]["Volumes"] = json!({"/var/cache": {}, "/data": {}});
    c.container.mounts = vec![mount(
        "/srv/data",
        "/data",
        false,
        cri::MountPropagation::PropagationPrivate,
    )];
    v.push(c);

    v
}

fn spec_of(c: &Case, rootfs: &Path) -> Value {
    let files = SandboxFiles {
        hostname: "/var/lib/berth/sandboxes/p1/hostname".into(),
        hosts: "/var/lib/berth/sandboxes/p1/hosts".into(),
        resolv_conf: "/var/lib/berth/sandboxes/p1/resolv.conf".into(),
        shm: c.shm.then(|| "/run/berth/sandboxes/p1/shm".into()),
    };
    let image = typed(&c.image);
    let mut host = host_facts();
    if c.selinux_pod.is_some() {
        host.modules.selinux = Some(SelinuxDefaults {
            process: "system_u:system_r:container_t:s0".into(),
            file: "system_u:object_r:container_file_t:s0".into(),
        });
    }
    let spec = build_spec(&SpecInputs {
        id: "c1",
        config: &c.container,
        pod: &c.pod,
        image: &image,
        rootfs,
        files: &files,
        netns: c.netns.map(Path::new),
        infra_pid: 4242,
        pid_target: None,
        cgroups_path: "/kubepods/poduid-1/c1",
        min_oom_score_adj: c.min_oom,
        volumes_dir: Path::new("/var/lib/berth/containers/c1/volumes"),
        host: &host,
        pod_selinux_label: c.selinux_pod,
    })
    .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    // Canonical: whatever the builder's types, compare the JSON it writes.
    let mut v: Value = serde_json::from_slice(&serde_json::to_vec(&spec).unwrap()).unwrap();
    canonical_capabilities(&mut v);
    v
}

/// Capability sets are sets: sorted, so that their order (a hash set's) does not count.
fn canonical_capabilities(spec: &mut Value) {
    if let Some(caps) = spec["process"]["capabilities"].as_object_mut() {
        for set in caps.values_mut() {
            if let Some(a) = set.as_array_mut() {
                a.sort_by(|x, y| x.as_str().cmp(&y.as_str()));
            }
        }
    }
}

#[test]
fn build_spec_matches_the_golden_files() {
    let root = rootfs();
    write_localhost_profile();
    let bless = std::env::var_os("BERTH_BLESS").is_some();
    let mut failed = Vec::new();
    for c in cases() {
        let got = serde_json::to_string_pretty(&spec_of(&c, root.path())).unwrap() + "\n";
        let path = golden_dir().join(format!("{}.json", c.name));
        if bless {
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if got != want {
            failed.push(format!("{}:\n{got}", path.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "differs from golden:\n{}",
        failed.join("\n")
    );
}

#[test]
fn invalid_configs_name_the_field() {
    let root = rootfs();
    let mut c = case("bad");
    c.container.mounts = vec![mount(
        "relative",
        "/x",
        false,
        cri::MountPropagation::PropagationPrivate,
    )];
    let files = SandboxFiles {
        hostname: "/h".into(),
        hosts: "/h".into(),
        resolv_conf: "/h".into(),
        shm: None,
    };
    let inputs = |c: &Case| {
        let image = typed(&c.image);
        build_spec(&SpecInputs {
            id: "c1",
            config: &c.container,
            pod: &c.pod,
            image: &image,
            rootfs: root.path(),
            files: &files,
            netns: None,
            infra_pid: 1,
            pid_target: None,
            cgroups_path: "/x",
            min_oom_score_adj: None,
            volumes_dir: Path::new("/v"),
            host: &host_facts(),
            pod_selinux_label: None,
        })
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    assert!(inputs(&c).contains("config.mounts[0].host_path"));
    let mut c = case("bad");
    c.container.working_dir = "rel".into();
    assert!(inputs(&c).contains("config.working_dir"));
    let mut c = case("bad");
    c.image["config"]["User"] = json!("ghost");
    assert!(inputs(&c).contains("image config User"));
    let mut c = case("bad");
    c.container.devices = vec![cri::Device {
        container_path: "/dev/x".into(),
        host_path: "/etc/passwd".into(),
        permissions: String::new(),
    }];
    assert!(inputs(&c).contains("config.devices[0].host_path"));
    // Security asks that cannot be met: each names its field (or file).
    let sc_field = "config.linux.security_context";
    let mut c = case("bad");
    sc(&mut c.container).privileged = true;
    let e = inputs(&c);
    assert!(
        e.contains(&format!("{sc_field}.privileged"))
            && e.contains("no privileged container allowed in sandbox"),
        "{e}"
    );
    let mut c = case("bad");
    sc(&mut c.container).run_as_group = Some(cri::Int64Value { value: 5 });
    let e = inputs(&c);
    assert!(
        e.contains(&format!("{sc_field}.run_as_group")) && e.contains("specified without user"),
        "{e}"
    );
    let mut c = case("bad");
    sc(&mut c.container).seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::Localhost as i32,
        localhost_ref: "/nonexistent/profile.json".into(),
    });
    let e = inputs(&c);
    assert!(
        e.contains(&format!("{sc_field}.seccomp")) && e.contains("/nonexistent/profile.json"),
        "{e}"
    );
    let mut c = case("bad");
    sc(&mut c.container).seccomp_profile_path = "custom".into();
    assert!(inputs(&c).contains(&format!("{sc_field}.seccomp_profile_path")));
    let mut c = case("bad");
    sc(&mut c.container).apparmor = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::Localhost as i32,
        localhost_ref: "my-profile".into(),
    });
    let e = inputs(&c);
    assert!(
        e.contains(&format!("{sc_field}.apparmor")) && e.contains("apparmor is not supported"),
        "{e}"
    );
    let mut c = case("bad");
    sc(&mut c.container).selinux_options = Some(cri::SeLinuxOption {
        r#type: "spc_t".into(),
        ..Default::default()
    });
    assert!(inputs(&c).contains(&format!("{sc_field}.selinux_options")));
    let mut c = case("bad");
    sc(&mut c.container).namespace_options = Some(cri::NamespaceOption {
        userns_options: Some(cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    assert!(inputs(&c).contains(&format!("{sc_field}.namespace_options.userns_options")));
    let mut c = case("bad");
    sc(&mut c.container).capabilities = Some(cri::Capability {
        add_capabilities: vec!["SYS_RESOURCE".into()],
        ..Default::default()
    });
    let e = inputs(&c);
    assert!(
        e.contains("add_capabilities") && e.contains("CAP_SYS_RESOURCE"),
        "{e}"
    );
    // Propagation the host mount cannot carry.
    for (host, prop, what) in [
        (
            "/var/lib/x",
            cri::MountPropagation::PropagationBidirectional,
            "not a shared mount",
        ),
        (
            "/mnt/host/d",
            cri::MountPropagation::PropagationBidirectional,
            "not a shared mount",
        ),
        (
            "/var/lib/x",
            cri::MountPropagation::PropagationHostToContainer,
            "not a shared or slave mount",
        ),
    ] {
        let mut c = case("bad");
        c.container.mounts = vec![mount(host, "/m", false, prop)];
        let e = inputs(&c);
        assert!(
            e.contains("config.mounts[0].propagation") && e.contains(what),
            "{host}: {e}"
        );
    }
}
