//! Golden tests of the CRI -> OCI translation: `build_spec`'s output for representative
//! CRI configs, pinned as canonical JSON (sorted keys, pretty) in `golden/spec/`, so
//! that any change to the generated `config.json` shows up byte for byte.
//!
//! `BERTH_BLESS=1 cargo test -p berth-cri --test spec_golden` rewrites the files; review
//! the diff before committing it.

use std::path::{Path, PathBuf};

use berth_cri::oci::{SandboxFiles, SpecInputs, build_spec};
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
    }
}

fn cases() -> Vec<Case> {
    let mut v = vec![case("plain")];

    let mut c = case("privileged");
    sc(&mut c.container).privileged = true;
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
    let spec = build_spec(&SpecInputs {
        id: "c1",
        config: &c.container,
        pod: &c.pod,
        image: &image,
        rootfs,
        files: &files,
        netns: c.netns.map(Path::new),
        infra_pid: 4242,
        cgroups_path: "/kubepods/poduid-1/c1",
        min_oom_score_adj: c.min_oom,
        volumes_dir: Path::new("/var/lib/berth/containers/c1/volumes"),
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
            cgroups_path: "/x",
            min_oom_score_adj: None,
            volumes_dir: Path::new("/v"),
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
}
