//! berth end-to-end tests: a real berthd, a real docker-registry on 127.0.0.1 and
//! images built from local material (Debian's busybox-static and generated files).
//! A custom harness (libtest-mimic) starts the registries once, runs every test, and
//! tears everything down whether tests pass or not.

use std::collections::BTreeSet;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use berth_e2e::berthd::{Berthd, CriClient};
use berth_e2e::calls::{
    container_stats, create_and_start, pull, pull_auth, remove_pod, run_pod, stop_pod,
};
use berth_e2e::registry::TestRegistry;
use berth_e2e::testimages::{
    Compression, EntryType, ImageBuilder, LayerBuilder, MediaTypes, Platform, PushedImage,
    PushedIndex, large_layers, push_index,
};
use berth_e2e::tokenauth::{Grant, TokenServer};
use k8s_cri::v1 as cri;
use libtest_mimic::{Arguments, Failed, Trial};
use tonic::Code;

mod confinement;
mod ctl;
mod events;
mod fault;
mod fulldisk;
mod interop;
mod limits;
mod prometheus;
mod security;
mod systemd;

/// Everything the tests share: the registries and what was pushed to them.
struct World {
    _dir: tempfile::TempDir,
    reg: TestRegistry,
    auth_reg: TestRegistry,
    token_server: TokenServer,
    /// Held for its Drop, which stops the registry; tests use `token_private`.
    _token_reg: TestRegistry,
    token_private: PushedImage,
    busybox: PushedImage,
    hub_busybox: PushedImage,
    layered: PushedImage,
    zstd: PushedImage,
    multiarch: PushedIndex,
    config: PushedImage,
    named_user: PushedImage,
    large: PushedImage,
    concurrent: PushedImage,
    crash: PushedImage,
    traversal: PushedImage,
    symlink_escape: PushedImage,
    bad_digest: PushedImage,
    private: PushedImage,
    escape_target: PathBuf,
}

/// Taken and dropped by `main` after the tests, which stops the registries and the
/// token server and removes their directories.
static WORLD: Mutex<Option<Arc<World>>> = Mutex::new(None);

fn world() -> Arc<World> {
    WORLD
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .expect("world is built before tests run")
}

const USER: &str = "berth";
const PASS: &str = "s3cret-pass";
const REFRESH_TOKEN: &str = "berth-refresh-token-1";

fn base_layer() -> LayerBuilder {
    LayerBuilder::new()
        .dir("bin", 0o755, 0, 0)
        .add_host_file("bin/busybox", "/bin/busybox", 0o755)
        .symlink("bin/sh", "busybox")
        .symlink("bin/ls", "busybox")
        .dir("etc", 0o755, 0, 0)
        .file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
            0o644,
            0,
            0,
        )
}

fn busybox_image() -> ImageBuilder {
    ImageBuilder::new()
        .layer(base_layer(), Compression::Gzip)
        .cmd(&["/bin/sh"])
}

fn generated_image(seed: u64, layers: usize, bytes_per_layer: u64) -> ImageBuilder {
    (0..layers).fold(ImageBuilder::new(), |img, i| {
        let l = LayerBuilder::new().generated_file(
            &format!("data/{seed}-{i}.bin"),
            bytes_per_layer,
            seed * 100 + i as u64,
            0o644,
        );
        img.layer(l, Compression::Gzip)
    })
}

async fn build_world() -> Result<World> {
    let dir = tempfile::Builder::new()
        .prefix("berth-e2e-world-")
        .tempdir()?;
    std::fs::create_dir_all(dir.path().join("reg"))?;
    std::fs::create_dir_all(dir.path().join("auth"))?;
    std::fs::create_dir_all(dir.path().join("token-server"))?;
    std::fs::create_dir_all(dir.path().join("token-reg"))?;
    let token_server =
        TokenServer::start(&dir.path().join("token-server"), USER, PASS, REFRESH_TOKEN)?;
    let token_reg = TestRegistry::start_with_token(&dir.path().join("token-reg"), &token_server)?;
    let reg = TestRegistry::start(&dir.path().join("reg"), None)?;
    let auth_reg = TestRegistry::start(&dir.path().join("auth"), Some((USER, PASS)))?;
    let r = reg.addr().to_string();
    let escape_target = dir.path().join("escape-target");
    std::fs::create_dir_all(&escape_target)?;

    let busybox = busybox_image().push(&r, "test/busybox", "1", None).await?;
    let hub_busybox = busybox_image()
        .push(&r, "library/busybox", "latest", None)
        .await?;
    let layered = ImageBuilder::new()
        .layer(base_layer(), Compression::Gzip)
        .layer(
            LayerBuilder::new()
                .dir("data", 0o755, 0, 0)
                .file("data/a", "deleted later", 0o644, 0, 0)
                .file("data/b", "kept", 0o644, 0, 0)
                .dir("opq", 0o755, 0, 0)
                .file("opq/x", "hidden by opaque", 0o644, 0, 0)
                .file_with_xattrs(
                    "owned",
                    "owned by 1000",
                    0o640,
                    1000,
                    1001,
                    &[("user.berth", b"1")],
                )
                .hardlink("owned-link", "owned")
                .symlink("abs-link", "/etc/passwd")
                .char_device("dev-null", 1, 3, 0o666)
                .fifo("a-fifo", 0o600)
                .file("setuid", "s", 0o4755, 0, 0),
            Compression::Gzip,
        )
        .layer(
            LayerBuilder::new().whiteout("data/a").opaque("opq").file(
                "opq/y",
                "new in opaque",
                0o644,
                0,
                0,
            ),
            Compression::Zstd,
        )
        .layer(
            LayerBuilder::new().file("top.txt", "uncompressed layer", 0o644, 0, 0),
            Compression::None,
        )
        .push(&r, "test/layered", "1", None)
        .await?;
    let zstd = ImageBuilder::new()
        .layer(base_layer(), Compression::Zstd)
        .push(&r, "test/zstd", "1", None)
        .await?;
    let amd = busybox_image();
    let arm = ImageBuilder::new().layer(
        base_layer().file("arch", "arm64", 0o644, 0, 0),
        Compression::Gzip,
    );
    let multiarch = push_index(
        &r,
        "test/multiarch",
        "1",
        &[
            (&arm, Platform::new("linux", "arm64", Some("v8"))),
            (&amd, Platform::new("linux", "amd64", None)),
        ],
        None,
    )
    .await?;
    let config = busybox_image()
        .media_types(MediaTypes::Docker)
        .user("1234:5678")
        .entrypoint(&["/bin/sh", "-c"])
        .cmd(&["echo hello"])
        .env("GREETING", "hi")
        .working_dir("/work")
        .stop_signal("SIGQUIT")
        .volume("/data")
        .push(&r, "test/config", "1", None)
        .await?;
    let named_user = busybox_image()
        .user("nobody")
        .push(&r, "test/named-user", "1", None)
        .await?;
    let large = large_layers(120 << 20, 4, 7)
        .into_iter()
        .fold(ImageBuilder::new(), |img, l| {
            img.layer(l, Compression::Gzip)
        })
        .push(&r, "test/large", "1", None)
        .await?;
    let concurrent = generated_image(11, 3, 2 << 20)
        .push(&r, "test/concurrent", "1", None)
        .await?;
    let crash = large_layers(96 << 20, 3, 13)
        .into_iter()
        .fold(ImageBuilder::new(), |img, l| {
            img.layer(l, Compression::Gzip)
        })
        .push(&r, "test/crash", "1", None)
        .await?;
    let escape_name = format!(
        "../../../../../../../../..{}/traversal",
        escape_target.display()
    );
    let traversal = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .file("ok", "fine", 0o644, 0, 0)
                .raw_entry(
                    escape_name.as_bytes(),
                    EntryType::Regular,
                    b"",
                    b"pwned".to_vec(),
                    0o644,
                ),
            Compression::Gzip,
        )
        .push(&r, "test/traversal", "1", None)
        .await?;
    let symlink_escape = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .symlink("esc", &escape_target.display().to_string())
                .file("esc/via-symlink", "pwned", 0o644, 0, 0),
            Compression::Gzip,
        )
        .push(&r, "test/symlink-escape", "1", None)
        .await?;
    let bad_digest = generated_image(21, 1, 1 << 20)
        .push(&r, "test/bad-digest", "1", None)
        .await?;
    // Corrupt the stored blob behind the registry's back: same size, other bytes.
    let blob = reg.blob_data_path(&bad_digest.layer_digests[0]);
    let mut data = std::fs::read(&blob)?;
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&blob, data)?;
    let private = busybox_image()
        .push(auth_reg.addr(), "private/busybox", "1", Some((USER, PASS)))
        .await?;
    let token_private = busybox_image()
        .push(token_reg.addr(), "private/tokened", "1", Some((USER, PASS)))
        .await?;
    Ok(World {
        _dir: dir,
        reg,
        auth_reg,
        token_server,
        _token_reg: token_reg,
        token_private,
        busybox,
        hub_busybox,
        layered,
        zstd,
        multiarch,
        config,
        named_user,
        large,
        concurrent,
        crash,
        traversal,
        symlink_escape,
        bad_digest,
        private,
        escape_target,
    })
}

// ---------------------------------------------------------------- helpers ----

fn run<F: Future<Output = Result<()>>>(f: impl FnOnce() -> F) -> Result<(), Failed> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(f()).map_err(|e| Failed::from(format!("{e:#}")))
}

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

async fn status(c: &mut CriClient, image: &str, verbose: bool) -> Result<cri::ImageStatusResponse> {
    Ok(c.image
        .image_status(cri::ImageStatusRequest {
            image: spec(image),
            verbose,
        })
        .await?
        .into_inner())
}

async fn list(c: &mut CriClient) -> Result<Vec<cri::Image>> {
    Ok(c.image
        .list_images(cri::ListImagesRequest { filter: None })
        .await?
        .into_inner()
        .images)
}

async fn remove(c: &mut CriClient, image: &str) -> Result<(), tonic::Status> {
    c.image
        .remove_image(cri::RemoveImageRequest { image: spec(image) })
        .await
        .map(|_| ())
}

async fn fs_used(c: &mut CriClient) -> Result<(u64, u64, String)> {
    let r = c
        .image
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await?
        .into_inner();
    let fs = r.image_filesystems.first().context("no image filesystem")?;
    Ok((
        fs.used_bytes.as_ref().map_or(0, |v| v.value),
        fs.inodes_used.as_ref().map_or(0, |v| v.value),
        fs.fs_id
            .as_ref()
            .map(|f| f.mountpoint.clone())
            .unwrap_or_default(),
    ))
}

/// berthd started with the config `text` exits with an error mentioning `needle`.
fn refused_config(b: &Berthd, text: &str, needle: &str) -> Result<()> {
    let path = b.dir().join("refused.toml");
    std::fs::write(&path, text)?;
    let out = Command::new(berth_e2e::berthd::berthd_binary()?)
        .arg("--config")
        .arg(&path)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains(needle),
        "config {text:?}: {:?} {err}",
        out.status
    );
    Ok(())
}

fn expect_code<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: Code,
    needle: &str,
) -> Result<String> {
    match r {
        Ok(v) => bail!("expected {code:?} containing {needle:?}, got success {v:?}"),
        Err(s) if s.code() == code && s.message().contains(needle) => Ok(s.message().to_string()),
        Err(s) => bail!(
            "expected {code:?} containing {needle:?}, got {:?}: {}",
            s.code(),
            s.message()
        ),
    }
}

fn entries(dir: &Path) -> Result<BTreeSet<String>> {
    if !dir.exists() {
        return Ok(BTreeSet::new());
    }
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

fn blobs_on_disk(b: &Berthd) -> Result<BTreeSet<String>> {
    entries(&b.root.join("content/blobs/sha256"))
}

fn snapshots_on_disk(b: &Berthd) -> Result<BTreeSet<String>> {
    entries(&b.root.join("snapshots"))
}

fn hex(d: &str) -> &str {
    d.strip_prefix("sha256:").unwrap_or(d)
}

fn mirror_config() -> String {
    format!(
        "[registries.\"docker.io\"]\nmirrors = [\"{}\"]\n",
        world().reg.url()
    )
}

/// Mounts an image's layers read-only as overlayfs would for a container; unmounted on drop.
struct OverlayMount {
    dir: tempfile::TempDir,
}

impl OverlayMount {
    fn new(layers_bottom_first: &[PathBuf]) -> Result<OverlayMount> {
        let dir = tempfile::Builder::new()
            .prefix("berth-e2e-mnt-")
            .tempdir()?;
        let lower: Vec<String> = layers_bottom_first
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        let opts = format!("lowerdir={}", lower.join(":"));
        nix::mount::mount(
            Some("overlay"),
            dir.path(),
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(opts.as_str()),
        )
        .with_context(|| format!("mount overlay {opts}"))?;
        Ok(OverlayMount { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn snapshot_paths(info: &cri::ImageStatusResponse) -> Result<Vec<PathBuf>> {
    let v: serde_json::Value =
        serde_json::from_str(info.info.get("info").context("verbose info missing")?)?;
    v["layers"]
        .as_array()
        .context("layers missing")?
        .iter()
        .map(|l| {
            l["snapshot"]
                .as_str()
                .map(PathBuf::from)
                .context("snapshot path missing")
        })
        .collect()
}

// ------------------------------------------------------------------ tests ----

fn runtime_identity_and_status() -> Result<(), Failed> {
    run(|| async {
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let v = c
            .runtime
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await?
            .into_inner();
        ensure!(
            v.runtime_name == "berth" && v.runtime_api_version == "v1",
            "{v:?}"
        );
        ensure!(v.runtime_version == env!("CARGO_PKG_VERSION"), "{v:?}");
        let st = c
            .runtime
            .status(cri::StatusRequest { verbose: true })
            .await?
            .into_inner();
        let conds = st.status.context("no status")?.conditions;
        let cond = |t: &str| conds.iter().find(|c| c.r#type == t).cloned();
        ensure!(cond("RuntimeReady").is_some_and(|c| c.status), "{conds:?}");
        let net = cond("NetworkReady").context("no NetworkReady")?;
        // The fixture's own CNI config (bridge, host-local, portmap, loopback) is ready.
        ensure!(net.status && net.reason.is_empty(), "{net:?}");
        let cfg: serde_json::Value =
            serde_json::from_str(st.info.get("config").context("verbose config")?)?;
        ensure!(cfg["root"] == b.root.display().to_string(), "{cfg}");
        let rc = c
            .runtime
            .runtime_config(cri::RuntimeConfigRequest {})
            .await?
            .into_inner();
        ensure!(rc.linux.context("linux")?.cgroup_driver == cri::CgroupDriver::Cgroupfs as i32);
        let r = c
            .runtime
            .checkpoint_container(cri::CheckpointContainerRequest::default())
            .await;
        expect_code(r, Code::Unimplemented, "checkpoint_container")?;
        Ok(())
    })
}

fn socket_lifecycle_and_config_errors() -> Result<(), Failed> {
    run(|| async {
        let mut b = Berthd::start("")?;
        let mode = std::fs::metadata(&b.socket)?.permissions().mode() & 0o777;
        ensure!(mode == 0o660, "socket mode {mode:o}");
        // A second berthd on the same socket is refused and the first keeps serving.
        let out = b
            .command()?
            .arg("--root")
            .arg(b.dir().join("other-root"))
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("in use"),
            "second berthd: {:?} {err}",
            out.status
        );
        b.client()
            .await?
            .runtime
            .version(cri::VersionRequest::default())
            .await?;
        // kill -9 leaves a stale socket; a restart replaces it.
        b.restart()?;
        b.client()
            .await?
            .runtime
            .version(cri::VersionRequest::default())
            .await?;
        // SIGTERM: clean exit 0, socket gone.
        let st = b.terminate()?;
        ensure!(st.success(), "berthd exit status after SIGTERM: {st}");
        ensure!(!b.socket.exists(), "socket left behind after SIGTERM");
        // Unknown keys and bad values are refused naming the key.
        for (text, needle) in [
            ("bogus_key = 1\n", "bogus_key"),
            (
                "[registries.\"docker.io\"]\nmirrors = [\"ftp://x\"]\n",
                "registries.\"docker.io\".mirrors[0]",
            ),
            (
                "[image]\nmax_concurrent_downloads = 0\n",
                "image.max_concurrent_downloads",
            ),
            ("cgroup_driver = \"nope\"\n", "cgroup_driver"),
        ] {
            refused_config(&b, text, needle)?;
        }
        // The systemd driver where systemd is not running: berthd says so and stops.
        let reachable = ["/run/dbus/system_bus_socket"];
        let bus_set = std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS").is_some();
        if !bus_set && !reachable.iter().any(|p| Path::new(p).exists()) {
            let ours = std::fs::read_to_string(&b.config)?;
            let text = format!("cgroup_driver = \"systemd\"\n{ours}");
            refused_config(&b, &text, "systemd is not reachable")?;
        }
        let out = Command::new(berth_e2e::berthd::berthd_binary()?)
            .arg("--config")
            .arg(b.dir().join("absent.toml"))
            .output()?;
        ensure!(
            !out.status.success(),
            "an explicit missing config file must be an error"
        );
        Ok(())
    })
}

fn pull_status_list_single_layer() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let id = pull(&mut c, &w.busybox.reference).await?;
        ensure!(
            id == w.busybox.config_digest,
            "image_ref {id} != config digest {}",
            w.busybox.config_digest
        );
        let repo = format!("{}/test/busybox", w.reg.addr());
        let digest_ref = format!("{repo}@{}", w.busybox.manifest_digest);
        for name in [
            w.busybox.reference.clone(),
            id.clone(),
            hex(&id).to_string(),
            hex(&id)[..12].to_string(),
            digest_ref.clone(),
        ] {
            let img = status(&mut c, &name, false)
                .await?
                .image
                .with_context(|| format!("ImageStatus({name}) found nothing"))?;
            ensure!(img.id == id, "{name}: {img:?}");
            ensure!(
                img.repo_tags == vec![w.busybox.reference.clone()],
                "{img:?}"
            );
            ensure!(img.repo_digests == vec![digest_ref.clone()], "{img:?}");
            let layer_sum: u64 = w.busybox.layer_sizes.iter().sum();
            let cfg_size = serde_json::to_vec(&w.busybox.config_json)?.len() as u64;
            ensure!(
                img.size >= layer_sum && img.size <= layer_sum + cfg_size + 4096,
                "size {} vs layers {layer_sum}",
                img.size
            );
            ensure!(
                !img.pinned && img.uid.is_none() && img.username.is_empty(),
                "{img:?}"
            );
        }
        let v = status(&mut c, &w.busybox.reference, true).await?;
        let info: serde_json::Value =
            serde_json::from_str(v.info.get("info").context("verbose info")?)?;
        ensure!(
            info["imageSpec"]["config"]["Cmd"] == serde_json::json!(["/bin/sh"]),
            "{info}"
        );
        ensure!(
            info["imageSpec"]["rootfs"]["diff_ids"][0] == w.busybox.diff_ids[0],
            "{info}"
        );
        // Unknown but well-formed: no image, no error.
        let none = status(&mut c, &format!("{repo}:nope"), false).await?;
        ensure!(none.image.is_none());
        let all = list(&mut c).await?;
        ensure!(all.len() == 1 && all[0].id == id, "{all:?}");
        let filtered = c
            .image
            .list_images(cri::ListImagesRequest {
                filter: Some(cri::ImageFilter {
                    image: spec(&w.busybox.reference),
                }),
            })
            .await?
            .into_inner()
            .images;
        ensure!(filtered.len() == 1, "{filtered:?}");
        let other = c
            .image
            .list_images(cri::ListImagesRequest {
                filter: Some(cri::ImageFilter {
                    image: spec("other:tag"),
                }),
            })
            .await?
            .into_inner()
            .images;
        ensure!(other.is_empty(), "{other:?}");
        let (used, inodes, mountpoint) = fs_used(&mut c).await?;
        ensure!(
            mountpoint == b.root.join("snapshots").display().to_string(),
            "{mountpoint}"
        );
        let busybox_size = std::fs::metadata("/bin/busybox")?.len();
        ensure!(
            used > busybox_size && inodes >= 6,
            "ImageFsInfo used={used} inodes={inodes}"
        );
        Ok(())
    })
}

fn docker_hub_names_go_through_mirrors() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start(&mirror_config())?;
        let mut c = b.client().await?;
        let id = pull(&mut c, "busybox").await?;
        ensure!(id == w.hub_busybox.config_digest);
        let img = status(&mut c, "docker.io/library/busybox:latest", false)
            .await?
            .image
            .context("not found")?;
        ensure!(
            img.repo_tags == vec!["docker.io/library/busybox:latest".to_string()],
            "{img:?}"
        );
        ensure!(
            img.repo_digests
                == vec![format!(
                    "docker.io/library/busybox@{}",
                    w.hub_busybox.manifest_digest
                )],
            "{img:?}"
        );
        for alias in [
            "busybox",
            "busybox:latest",
            "library/busybox",
            "index.docker.io/library/busybox:latest",
        ] {
            ensure!(
                status(&mut c, alias, false).await?.image.is_some(),
                "{alias} does not resolve"
            );
        }
        // Without a mirror, docker.io is unreachable here: a clear Unavailable, not a hang.
        let b2 = Berthd::start("[image]\npull_timeout_secs = 60\n")?;
        let mut c2 = b2.client().await?;
        let msg = expect_code(
            pull(&mut c2, "busybox").await,
            Code::Unavailable,
            "registry-1.docker.io",
        )?;
        ensure!(msg.contains("docker.io/library/busybox:latest"), "{msg}");
        Ok(())
    })
}

fn layers_whiteouts_and_file_metadata() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.layered.reference).await?;
        let v = status(&mut c, &w.layered.reference, true).await?;
        let layers = snapshot_paths(&v)?;
        ensure!(layers.len() == 4, "{layers:?}");
        let m = OverlayMount::new(&layers)?;
        let p = |s: &str| m.path().join(s);
        ensure!(!p("data/a").exists(), "whited-out file is visible");
        ensure!(std::fs::read_to_string(p("data/b"))? == "kept");
        ensure!(
            entries(&p("opq"))? == BTreeSet::from(["y".to_string()]),
            "opaque dir shows {:?}",
            entries(&p("opq"))?
        );
        ensure!(std::fs::read_to_string(p("top.txt"))? == "uncompressed layer");
        let owned = std::fs::metadata(p("owned"))?;
        ensure!(
            owned.uid() == 1000 && owned.gid() == 1001 && owned.mode() & 0o7777 == 0o640,
            "{owned:?}"
        );
        let mut xbuf = [0u8; 8];
        let cpath = std::ffi::CString::new(p("owned").display().to_string())?;
        let n = unsafe {
            libc::getxattr(
                cpath.as_ptr(),
                c"user.berth".as_ptr(),
                xbuf.as_mut_ptr().cast(),
                xbuf.len(),
            )
        };
        ensure!(n == 1 && xbuf[0] == b'1', "xattr user.berth missing ({n})");
        ensure!(std::fs::read_to_string(p("owned-link"))? == "owned by 1000");
        let lower_owned = std::fs::metadata(layers[1].join("owned"))?;
        ensure!(
            lower_owned.nlink() == 2,
            "hard link not kept: nlink {}",
            lower_owned.nlink()
        );
        ensure!(std::fs::read_link(p("abs-link"))? == Path::new("/etc/passwd"));
        let dev = std::fs::symlink_metadata(p("dev-null"))?;
        ensure!(
            dev.file_type().is_char_device() && dev.rdev() == nix::sys::stat::makedev(1, 3),
            "{dev:?}"
        );
        ensure!(
            std::fs::symlink_metadata(p("a-fifo"))?
                .file_type()
                .is_fifo()
        );
        ensure!(std::fs::metadata(p("setuid"))?.mode() & 0o7777 == 0o4755);
        // The tree is a usable root filesystem.
        let out = Command::new("chroot")
            .arg(m.path())
            .args(["/bin/sh", "-c", "busybox cat /data/b; echo; ls /opq"])
            .output()?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout) == "kept\ny\n",
            "{out:?}"
        );
        Ok(())
    })
}

fn index_zstd_and_docker_config_images() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        // Index: the host platform's manifest, named by the index digest.
        let id = pull(&mut c, &w.multiarch.reference).await?;
        let amd = w
            .multiarch
            .image_for("linux", "amd64")
            .context("amd64 entry")?;
        ensure!(
            id == amd.config_digest,
            "picked {id}, want amd64 {}",
            amd.config_digest
        );
        let img = status(&mut c, &id, false).await?.image.context("missing")?;
        let idx_ref = format!(
            "{}/test/multiarch@{}",
            w.reg.addr(),
            w.multiarch.index_digest
        );
        ensure!(img.repo_digests == vec![idx_ref.clone()], "{img:?}");
        ensure!(status(&mut c, &idx_ref, false).await?.image.is_some());
        // zstd layer with the same content as the gzip busybox layer: one snapshot, two blobs.
        pull(&mut c, &w.busybox.reference).await?;
        let snaps = snapshots_on_disk(&b)?.len();
        pull(&mut c, &w.zstd.reference).await?;
        ensure!(
            snapshots_on_disk(&b)?.len() == snaps,
            "zstd layer of identical content unpacked twice"
        );
        ensure!(
            blobs_on_disk(&b)?.contains(hex(&w.zstd.layer_digests[0])),
            "zstd blob not stored"
        );
        let zv = status(&mut c, &w.zstd.reference, true).await?;
        let zl = snapshot_paths(&zv)?;
        ensure!(
            zl.len() == 1 && zl[0].join("bin/busybox").is_file(),
            "{zl:?}"
        );
        // Docker media types and config fields.
        pull(&mut c, &w.config.reference).await?;
        let v = status(&mut c, &w.config.reference, true).await?;
        let img = v.image.clone().context("missing")?;
        ensure!(
            img.uid.map(|u| u.value) == Some(1234) && img.username.is_empty(),
            "{img:?}"
        );
        let info: serde_json::Value = serde_json::from_str(&v.info["info"])?;
        let cfg = &info["imageSpec"]["config"];
        ensure!(
            cfg["Entrypoint"] == serde_json::json!(["/bin/sh", "-c"])
                && cfg["Cmd"] == serde_json::json!(["echo hello"]),
            "{cfg}"
        );
        ensure!(
            cfg["WorkingDir"] == "/work" && cfg["StopSignal"] == "SIGQUIT",
            "{cfg}"
        );
        ensure!(
            cfg["Env"]
                .as_array()
                .is_some_and(|e| e.iter().any(|x| x == "GREETING=hi")),
            "{cfg}"
        );
        ensure!(cfg["Volumes"].get("/data").is_some(), "{cfg}");
        pull(&mut c, &w.named_user.reference).await?;
        let img = status(&mut c, &w.named_user.reference, false)
            .await?
            .image
            .context("missing")?;
        ensure!(img.uid.is_none() && img.username == "nobody", "{img:?}");
        Ok(())
    })
}

fn large_image_pull() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let (before, _, _) = fs_used(&mut c).await?;
        pull(&mut c, &w.large.reference).await?;
        let img = status(&mut c, &w.large.reference, false)
            .await?
            .image
            .context("missing")?;
        ensure!(
            img.size >= w.large.compressed_size,
            "{} < {}",
            img.size,
            w.large.compressed_size
        );
        let (after, _, _) = fs_used(&mut c).await?;
        // Content (compressed) plus snapshots (uncompressed) are both counted.
        ensure!(
            after - before >= w.large.compressed_size + w.large.uncompressed_size * 9 / 10,
            "{before} -> {after}"
        );
        Ok(())
    })
}

fn remove_by_any_name_frees_only_unshared_data() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let only_busybox_blobs = blobs_on_disk(&b)?;
        let only_busybox_snaps = snapshots_on_disk(&b)?;
        pull(&mut c, &w.layered.reference).await?;
        ensure!(
            snapshots_on_disk(&b)?.len() == only_busybox_snaps.len() + 3,
            "base layer not shared"
        );
        // Remove by tag: the shared base layer stays for busybox.
        remove(&mut c, &w.layered.reference).await?;
        ensure!(
            status(&mut c, &w.layered.reference, false)
                .await?
                .image
                .is_none()
        );
        ensure!(
            blobs_on_disk(&b)? == only_busybox_blobs,
            "blobs after remove: {:?}",
            blobs_on_disk(&b)?
        );
        ensure!(snapshots_on_disk(&b)? == only_busybox_snaps);
        ensure!(
            status(&mut c, &w.busybox.reference, true)
                .await
                .map(|s| s.image.is_some())?,
            "busybox lost"
        );
        // Removing something absent is fine; so is removing by id and by digest.
        remove(&mut c, &w.layered.reference).await?;
        remove(&mut c, &format!("{}/test/none:1", w.reg.addr())).await?;
        remove(&mut c, &w.busybox.config_digest).await?;
        ensure!(list(&mut c).await?.is_empty());
        pull(&mut c, &w.config.reference).await?;
        remove(
            &mut c,
            &format!("{}/test/config@{}", w.reg.addr(), w.config.manifest_digest),
        )
        .await?;
        ensure!(list(&mut c).await?.is_empty());
        ensure!(
            blobs_on_disk(&b)?.is_empty(),
            "blobs left: {:?}",
            blobs_on_disk(&b)?
        );
        ensure!(
            snapshots_on_disk(&b)?.is_empty(),
            "snapshots left: {:?}",
            snapshots_on_disk(&b)?
        );
        let (used, _, _) = fs_used(&mut c).await?;
        ensure!(used == 0, "ImageFsInfo still reports {used} bytes");
        // A tag moved to another image leaves the old one untagged but listed by digest.
        Ok(())
    })
}

fn bad_input_gets_clear_errors() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        for bad in [
            "UPPER/Case:1",
            "a b",
            "busybox:",
            "x@sha256:1234",
            "-lead/ing",
        ] {
            expect_code(pull(&mut c, bad).await, Code::InvalidArgument, bad)?;
            let s = c
                .image
                .image_status(cri::ImageStatusRequest {
                    image: spec(bad),
                    verbose: false,
                })
                .await;
            expect_code(s, Code::InvalidArgument, bad)?;
            expect_code(remove(&mut c, bad).await, Code::InvalidArgument, bad)?;
        }
        expect_code(pull(&mut c, "").await, Code::InvalidArgument, "image.image")?;
        let none = c.image.pull_image(cri::PullImageRequest::default()).await;
        expect_code(none, Code::InvalidArgument, "image.image")?;
        expect_code(
            remove(&mut c, " ").await,
            Code::InvalidArgument,
            "image.image",
        )?;
        let s = c
            .image
            .image_status(cri::ImageStatusRequest {
                image: None,
                verbose: false,
            })
            .await;
        expect_code(s, Code::InvalidArgument, "image.image")?;
        let unknown_tag = format!("{}/test/busybox:no-such-tag", w.reg.addr());
        expect_code(
            pull(&mut c, &unknown_tag).await,
            Code::NotFound,
            "no-such-tag",
        )?;
        let unknown_repo = format!("{}/test/no-such-repo:1", w.reg.addr());
        expect_code(
            pull(&mut c, &unknown_repo).await,
            Code::NotFound,
            "no-such-repo",
        )?;
        let unknown_digest = format!("{}/test/busybox@sha256:{}", w.reg.addr(), "0".repeat(64));
        expect_code(
            pull(&mut c, &unknown_digest).await,
            Code::NotFound,
            "test/busybox",
        )?;
        expect_code(
            pull(&mut c, "127.0.0.1:1/nothing/here:1").await,
            Code::Unavailable,
            "127.0.0.1:1",
        )?;
        let auth = cri::AuthConfig {
            auth: "not base64!".into(),
            ..Default::default()
        };
        expect_code(
            pull_auth(&mut c, &w.busybox.reference, Some(auth)).await,
            Code::InvalidArgument,
            "auth.auth",
        )?;
        ensure!(
            list(&mut c).await?.is_empty()
                && blobs_on_disk(&b)?.is_empty()
                && snapshots_on_disk(&b)?.is_empty()
        );
        Ok(())
    })
}

fn registry_authentication() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let r = &w.private.reference;
        expect_code(
            pull(&mut c, r).await,
            Code::Unauthenticated,
            "requires authentication",
        )?;
        let wrong = cri::AuthConfig {
            username: USER.into(),
            password: "wrong".into(),
            ..Default::default()
        };
        let msg = expect_code(
            pull_auth(&mut c, r, Some(wrong)).await,
            Code::Unauthenticated,
            "rejected the credentials",
        )?;
        ensure!(
            !msg.contains("wrong"),
            "the password leaked into the error: {msg}"
        );
        ensure!(list(&mut c).await?.is_empty());
        let good = cri::AuthConfig {
            username: USER.into(),
            password: PASS.into(),
            ..Default::default()
        };
        let id = pull_auth(&mut c, r, Some(good)).await?;
        ensure!(id == w.private.config_digest);
        remove(&mut c, r).await?;
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
        let basic = cri::AuthConfig {
            auth: encoded,
            ..Default::default()
        };
        ensure!(pull_auth(&mut c, r, Some(basic)).await? == id);
        ensure!(w.auth_reg.blob_get_count(&w.private.layer_digests[0])? >= 2);
        Ok(())
    })
}

fn credentials_only_go_to_their_server_address() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        // The htpasswd registry mirrors a registry that does not exist here.
        let cfg = format!(
            "[registries.\"registry.invalid\"]\nmirrors = [\"{}\"]\n",
            w.auth_reg.url()
        );
        let b = Berthd::start(&cfg)?;
        let mut c = b.client().await?;
        let image = "registry.invalid/private/busybox:1";
        let for_upstream = cri::AuthConfig {
            username: USER.into(),
            password: PASS.into(),
            server_address: "https://registry.invalid".into(),
            ..Default::default()
        };
        // The mirror gets no credentials meant for registry.invalid, so it refuses.
        let r = pull_auth(&mut c, image, Some(for_upstream)).await;
        ensure!(
            r.is_err(),
            "credentials for registry.invalid were sent to the mirror: {r:?}"
        );
        let for_mirror = cri::AuthConfig {
            username: USER.into(),
            password: PASS.into(),
            server_address: w.auth_reg.addr().into(),
            ..Default::default()
        };
        ensure!(pull_auth(&mut c, image, Some(for_mirror)).await? == w.private.config_digest);
        let img = status(&mut c, image, false)
            .await?
            .image
            .context("not recorded under its own name")?;
        ensure!(img.repo_tags == vec![image.to_string()], "{img:?}");
        Ok(())
    })
}

fn registry_bearer_token_flow() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let r = &w.token_private.reference;
        let ts = &w.token_server;
        expect_code(
            pull(&mut c, r).await,
            Code::Unauthenticated,
            "authentication",
        )?;
        let wrong = cri::AuthConfig {
            username: USER.into(),
            password: "wrong".into(),
            ..Default::default()
        };
        expect_code(
            pull_auth(&mut c, r, Some(wrong)).await,
            Code::Unauthenticated,
            "",
        )?;
        // username/password: the token service issues a bearer token for the pull.
        let issued = ts.tokens_issued();
        let good = cri::AuthConfig {
            username: USER.into(),
            password: PASS.into(),
            ..Default::default()
        };
        ensure!(pull_auth(&mut c, r, Some(good)).await? == w.token_private.config_digest);
        ensure!(
            ts.tokens_issued() > issued,
            "no token was issued for the basic-credential pull"
        );
        remove(&mut c, r).await?;
        // Pulls share berthd's HTTP clients, never their tokens: the token the last
        // pull was issued must not serve a pull without credentials.
        expect_code(
            pull(&mut c, r).await,
            Code::Unauthenticated,
            "authentication",
        )?;
        // identity_token: exchanged at the realm with the OAuth2 refresh-token grant.
        let ident = cri::AuthConfig {
            identity_token: REFRESH_TOKEN.into(),
            ..Default::default()
        };
        ensure!(pull_auth(&mut c, r, Some(ident)).await? == w.token_private.config_digest);
        let refresh_grants = ts
            .request_log()
            .iter()
            .filter(|q| matches!(q.grant, Grant::RefreshToken) && q.status == 200)
            .count();
        ensure!(
            refresh_grants >= 1,
            "the identity token was not exchanged: {:?}",
            ts.request_log()
        );
        remove(&mut c, r).await?;
        let bad_ident = cri::AuthConfig {
            identity_token: "not-the-token".into(),
            ..Default::default()
        };
        expect_code(
            pull_auth(&mut c, r, Some(bad_ident)).await,
            Code::Unauthenticated,
            "identity token",
        )?;
        // registry_token: used as the bearer token directly; an expired one is refused.
        let token = ts.issue_token("private/tokened", &["pull"])?;
        let direct = cri::AuthConfig {
            registry_token: token,
            ..Default::default()
        };
        ensure!(pull_auth(&mut c, r, Some(direct)).await? == w.token_private.config_digest);
        remove(&mut c, r).await?;
        let expired = cri::AuthConfig {
            registry_token: ts.issue_expired_token("private/tokened", &["pull"])?,
            ..Default::default()
        };
        expect_code(
            pull_auth(&mut c, r, Some(expired)).await,
            Code::Unauthenticated,
            "",
        )?;
        ensure!(list(&mut c).await?.is_empty() && blobs_on_disk(&b)?.is_empty());
        Ok(())
    })
}

fn corrupt_blob_is_refused_and_nothing_kept() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let r = expect_code(
            pull(&mut c, &w.bad_digest.reference).await,
            Code::DataLoss,
            "digest",
        )?;
        ensure!(
            r.contains(&w.bad_digest.layer_digests[0]) || r.contains("does not match"),
            "{r}"
        );
        ensure!(list(&mut c).await?.is_empty());
        ensure!(
            !blobs_on_disk(&b)?.contains(hex(&w.bad_digest.layer_digests[0])),
            "corrupt blob stored"
        );
        ensure!(
            snapshots_on_disk(&b)?.is_empty(),
            "snapshot left: {:?}",
            snapshots_on_disk(&b)?
        );
        ensure!(
            entries(&b.root.join("content/ingest"))?.is_empty(),
            "ingest not cleaned"
        );
        Ok(())
    })
}

fn path_traversal_layers_are_refused() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let msg = expect_code(
            pull(&mut c, &w.traversal.reference).await,
            Code::InvalidArgument,
            "..",
        )?;
        ensure!(
            msg.contains("traversal") && msg.contains(&w.traversal.layer_digests[0]),
            "{msg}"
        );
        let msg = expect_code(
            pull(&mut c, &w.symlink_escape.reference).await,
            Code::InvalidArgument,
            "esc/via-symlink",
        )?;
        ensure!(msg.contains("symbolic link"), "{msg}");
        ensure!(
            entries(&w.escape_target)?.is_empty(),
            "something was written outside: {:?}",
            entries(&w.escape_target)?
        );
        ensure!(list(&mut c).await?.is_empty());
        ensure!(
            snapshots_on_disk(&b)?.is_empty(),
            "snapshot left: {:?}",
            snapshots_on_disk(&b)?
        );
        ensure!(
            blobs_on_disk(&b)?.is_empty(),
            "blobs left: {:?}",
            blobs_on_disk(&b)?
        );
        Ok(())
    })
}

fn concurrent_pulls_download_once() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let mut c = b.client().await?;
            let r = w.concurrent.reference.clone();
            tasks.push(tokio::spawn(async move { pull(&mut c, &r).await }));
        }
        for t in tasks {
            let id = t.await??;
            ensure!(id == w.concurrent.config_digest);
        }
        for d in &w.concurrent.layer_digests {
            let n = w.reg.blob_get_count(d)?;
            ensure!(
                n == 1,
                "layer {d} downloaded {n} times by 8 concurrent pulls"
            );
        }
        // Present already: a new pull downloads no blob.
        let mut c = b.client().await?;
        pull(&mut c, &w.concurrent.reference).await?;
        for d in w
            .concurrent
            .layer_digests
            .iter()
            .chain([&w.concurrent.config_digest])
        {
            ensure!(w.reg.blob_get_count(d)? == 1, "{d} downloaded again");
        }
        ensure!(list(&mut c).await?.len() == 1);
        Ok(())
    })
}

fn kill9_restart_keeps_images() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let mut b = Berthd::start(&mirror_config())?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        pull(&mut c, "busybox").await?;
        pull(&mut c, &w.layered.reference).await?;
        let before = list(&mut c).await?;
        let blobs = blobs_on_disk(&b)?;
        let snaps = snapshots_on_disk(&b)?;
        b.restart()?;
        let mut c = b.client().await?;
        let mut after = list(&mut c).await?;
        let mut before = before;
        before.sort_by(|a, b| a.id.cmp(&b.id));
        after.sort_by(|a, b| a.id.cmp(&b.id));
        ensure!(
            before == after,
            "images changed across kill -9:\n{before:?}\n{after:?}"
        );
        ensure!(blobs_on_disk(&b)? == blobs && snapshots_on_disk(&b)? == snaps);
        let v = status(&mut c, &w.layered.reference, true).await?;
        let m = OverlayMount::new(&snapshot_paths(&v)?)?;
        ensure!(m.path().join("data/b").is_file());
        drop(m);
        remove(&mut c, &w.layered.reference).await?;
        // Both busybox names share one config: one image with two tags.
        let left = list(&mut c).await?;
        ensure!(left.len() == 1 && left[0].repo_tags.len() == 2, "{left:?}");
        Ok(())
    })
}

fn crash_mid_pull_leaves_nothing_half_recorded() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let mut b = Berthd::start("")?;
        let mut c = b.client().await?;
        let r = w.crash.reference.clone();
        let puller = tokio::spawn(async move { pull(&mut c, &r).await });
        // Wait until layer data is flowing, then crash.
        let ingest = b.root.join("content/ingest");
        let snapdir = b.root.join("snapshots");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let busy = !entries(&ingest)?.is_empty() && !entries(&snapdir)?.is_empty();
            if busy {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "pull never started writing"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        b.kill9()?;
        ensure!(
            puller.await?.is_err(),
            "pull succeeded although berthd was killed"
        );
        b.restart()?;
        let mut c = b.client().await?;
        ensure!(list(&mut c).await?.is_empty(), "half-pulled image listed");
        ensure!(
            entries(&ingest)?.is_empty(),
            "ingest leftovers: {:?}",
            entries(&ingest)?
        );
        ensure!(
            snapshots_on_disk(&b)?.is_empty(),
            "snapshot leftovers: {:?}",
            snapshots_on_disk(&b)?
        );
        ensure!(
            blobs_on_disk(&b)?.is_empty(),
            "blob leftovers: {:?}",
            blobs_on_disk(&b)?
        );
        let id = pull(&mut c, &w.crash.reference).await?;
        ensure!(id == w.crash.config_digest);
        Ok(())
    })
}

// ------------------------------------------------------------------- pods ----

/// This run's cgroup scope for one test: `/berth-e2e-<pid>/<test>`.
fn cgroup_scope(test: &str) -> String {
    format!("/berth-e2e-{}/{test}", std::process::id())
}

fn pod_config(name: &str, uid: &str) -> cri::PodSandboxConfig {
    pod_config_in(name, uid, "shared")
}

fn pod_config_in(name: &str, uid: &str, test: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "e2e".into(),
            attempt: 0,
        }),
        hostname: format!("{name}-host"),
        labels: [
            ("app".to_string(), name.to_string()),
            ("tier".to_string(), "test".to_string()),
        ]
        .into(),
        annotations: [("note".to_string(), "berth e2e".to_string())].into(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["e2e.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("{}/pod{uid}", cgroup_scope(test)),
            sysctls: [(
                "net.ipv4.ping_group_range".to_string(),
                "0 2147483647".to_string(),
            )]
            .into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn pod_status(
    c: &mut CriClient,
    id: &str,
) -> Result<(cri::PodSandboxStatus, serde_json::Value), tonic::Status> {
    let r = c
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await?
        .into_inner();
    let info = r
        .info
        .get("info")
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or_default();
    Ok((r.status.unwrap_or_default(), info))
}

/// Every pod sandbox berthd lists.
async fn list_pods(c: &mut CriClient) -> Result<Vec<cri::PodSandbox>, tonic::Status> {
    Ok(c.runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items)
}

/// Every container berthd lists.
async fn list_ctrs(c: &mut CriClient) -> Result<Vec<cri::Container>, tonic::Status> {
    Ok(c.runtime
        .list_containers(cri::ListContainersRequest { filter: None })
        .await?
        .into_inner()
        .containers)
}

fn ns_ino(path: &str) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| path.to_string())?
        .ino())
}

fn nsenter(pid: u64, ns: &str, cmd: &[&str]) -> Result<String> {
    let out = Command::new("nsenter")
        .arg(ns)
        .arg("-t")
        .arg(pid.to_string())
        .args(cmd)
        .output()?;
    ensure!(out.status.success(), "nsenter {ns} {cmd:?}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A live process (a zombie waiting for its parent to reap it is not).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .map(|st| st != "Z")
        })
        .unwrap_or(false)
}

/// Whether a live process's command line holds `marker` (zombies have none).
fn process_with(marker: &str) -> bool {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten().any(|p| {
                let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains(marker)
            })
        })
        .unwrap_or(false)
}

/// Polls `cond` every 50 ms for up to 10 s.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..200 {
        if cond() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("timed out waiting until {what}")
}

/// An HTTP/1.1 request's first line, its headers read past (for the tests' hostile
/// registries).
fn request_line(stream: &std::net::TcpStream) -> Option<String> {
    use std::io::{BufRead, BufReader};
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    Some(first)
}

/// Writes an executable script (a stand-in runtime or plugin).
fn write_script(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// RunPodSandbox with a runtime handler.
async fn run_pod_on(
    c: &mut CriClient,
    cfg: &cri::PodSandboxConfig,
    handler: &str,
) -> Result<String, tonic::Status> {
    Ok(c.runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            runtime_handler: handler.into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id)
}

/// Nothing of this berthd's pods is left: no mounts under its dirs, no shim, no pod
/// cgroup in the test's scope.
fn assert_no_pod_leftovers(b: &Berthd, test: &str) -> Result<()> {
    assert_no_pod_leftovers_but(b, test, None)
}

/// `assert_no_pod_leftovers`, with one mount of the test's own (at `own`) allowed.
fn assert_no_pod_leftovers_but(b: &Berthd, test: &str, own: Option<&Path>) -> Result<()> {
    let dir = b.dir().display().to_string();
    let own = own.map(|p| format!(" {} ", p.display()));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&dir) && !own.as_ref().is_some_and(|o| l.contains(o.as_str())))
        .collect();
    ensure!(left.is_empty(), "mounts left: {left:?}");
    for p in std::fs::read_dir("/proc")?.flatten() {
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        ensure!(
            !(cmd.contains("berth-shim") && cmd.contains(&dir)),
            "shim left: {cmd}"
        );
    }
    let cg = cgroup_scope(test);
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let d = h.path().join(cg.trim_start_matches('/'));
        if d.exists() {
            let kids = entries(&d)?
                .into_iter()
                .filter(|e| e.starts_with("pod"))
                .collect::<Vec<_>>();
            ensure!(
                kids.is_empty(),
                "pod cgroups left in {}: {kids:?}",
                d.display()
            );
        }
    }
    ensure!(
        entries(&b.state.join("netns"))?.is_empty(),
        "netns files left"
    );
    ensure!(entries(&b.state.join("s"))?.is_empty(), "shim sockets left");
    ensure!(
        entries(&b.state.join("sandboxes"))?.is_empty(),
        "sandbox state dirs left"
    );
    ensure!(
        entries(&b.root.join("sandboxes"))?.is_empty(),
        "sandbox dirs left"
    );
    Ok(())
}

/// Removes this test run's parent cgroup (berth removes only what it created below it),
/// or with a test name only that test's scope: tests run at once, and removing another
/// test's fresh, still empty pod cgroup would fail its pod start.
struct CgroupParentGuard(Option<&'static str>);
impl Drop for CgroupParentGuard {
    fn drop(&mut self) {
        let cg = match self.0 {
            Some(test) => cgroup_scope(test).trim_start_matches('/').to_string(),
            None => format!("berth-e2e-{}", std::process::id()),
        };
        // Deepest first: pod cgroups a failed test left, then scopes, then the parent.
        berth_e2e::calls::remove_cgroup_tree(&cg);
    }
}

fn pod_sandbox_lifecycle() -> Result<(), Failed> {
    run(|| async {
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let id = run_pod(&mut c, pod_config_in("web", "u-1", "lifecycle")).await?;
        ensure!(
            id.len() == 64 && id.bytes().all(|x| x.is_ascii_hexdigit()),
            "{id}"
        );
        let (st, info) = pod_status(&mut c, &id[..12]).await?;
        ensure!(
            st.id == id && st.state == cri::PodSandboxState::SandboxReady as i32,
            "{st:?}"
        );
        ensure!(
            st.metadata
                .as_ref()
                .is_some_and(|m| m.name == "web" && m.uid == "u-1"),
            "{st:?}"
        );
        ensure!(
            st.labels.get("app").map(String::as_str) == Some("web")
                && st.annotations.contains_key("note"),
            "{st:?}"
        );
        ensure!(st.created_at > 0 && st.runtime_handler == "runc", "{st:?}");
        let pid = info["pid"].as_u64().context("verbose pid")?;
        ensure!(alive(pid), "infra process {pid} not running");
        // The infra holds the pinned netns, its own UTS (with the hostname), IPC and PID namespaces.
        let netns = b.state.join("netns").join(&id);
        ensure!(
            ns_ino(&format!("/proc/{pid}/ns/net"))? == std::fs::metadata(&netns)?.ino(),
            "infra not in the pinned netns"
        );
        for ns in ["uts", "ipc", "pid"] {
            ensure!(
                ns_ino(&format!("/proc/{pid}/ns/{ns}"))? != ns_ino(&format!("/proc/self/ns/{ns}"))?,
                "{ns} shared with host"
            );
        }
        ensure!(nsenter(pid, "--uts", &["hostname"])? == "web-host");
        ensure!(
            nsenter(
                pid,
                "--net",
                &["cat", "/proc/sys/net/ipv4/ping_group_range"]
            )?
            .split_whitespace()
            .collect::<Vec<_>>()
                == ["0", "2147483647"]
        );
        ensure!(nsenter(pid, "--net", &["cat", "/sys/class/net/lo/operstate"]).is_ok());
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        ensure!(
            cgroup.contains(&format!("{}/podu-1", cgroup_scope("lifecycle"))),
            "infra not in the pod cgroup:\n{cgroup}"
        );
        ensure!(
            std::fs::read_to_string(format!("/proc/{pid}/status"))?
                .lines()
                .any(|l| l == "CapEff:\t0000000000000000")
        );
        let resolv =
            std::fs::read_to_string(b.root.join("sandboxes").join(&id).join("resolv.conf"))?;
        ensure!(
            resolv == "search e2e.svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n",
            "{resolv}"
        );
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        ensure!(
            mounts.contains(
                &b.state
                    .join("sandboxes")
                    .join(&id)
                    .join("shm")
                    .display()
                    .to_string()
            ),
            "no /dev/shm mount"
        );
        // Names are unique per pod; a second attempt number is a different pod.
        let dup = run_pod(&mut c, pod_config_in("web", "u-1", "lifecycle")).await;
        expect_code(dup, Code::AlreadyExists, &id)?;
        let other = run_pod(&mut c, pod_config_in("db", "u-2", "lifecycle")).await?;
        // List filters: id prefix, state, labels.
        let lc = c.clone();
        let list = |f: cri::PodSandboxFilter| {
            let mut c = lc.clone();
            async move {
                Ok::<_, anyhow::Error>(
                    c.runtime
                        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(f) })
                        .await?
                        .into_inner()
                        .items,
                )
            }
        };
        ensure!(list(cri::PodSandboxFilter::default()).await?.len() == 2);
        ensure!(
            list(cri::PodSandboxFilter {
                id: id[..8].into(),
                ..Default::default()
            })
            .await?
            .len()
                == 1
        );
        let sel = [("app".to_string(), "db".to_string())].into();
        let by_label = list(cri::PodSandboxFilter {
            label_selector: sel,
            ..Default::default()
        })
        .await?;
        ensure!(by_label.len() == 1 && by_label[0].id == other);
        // Stop: NotReady, infra gone, netns and shm released; idempotent.
        stop_pod(&mut c, &id).await?;
        stop_pod(&mut c, &id).await?;
        let (st, _) = pod_status(&mut c, &id).await?;
        ensure!(st.state == cri::PodSandboxState::SandboxNotready as i32);
        ensure!(!alive(pid), "infra still running after stop");
        ensure!(!netns.exists(), "netns left after stop");
        let ready = cri::PodSandboxStateValue {
            state: cri::PodSandboxState::SandboxReady as i32,
        };
        let only_ready = list(cri::PodSandboxFilter {
            state: Some(ready),
            ..Default::default()
        })
        .await?;
        ensure!(
            only_ready.len() == 1 && only_ready[0].id == other,
            "{only_ready:?}"
        );
        // Remove: gone for good; idempotent.
        remove_pod(&mut c, &id).await?;
        remove_pod(&mut c, &id).await?;
        remove_pod(&mut c, &other).await?; // removes a running pod too
        expect_code(pod_status(&mut c, &id).await, Code::NotFound, "not found")?;
        stop_pod(&mut c, &id).await?;
        assert_no_pod_leftovers(&b, "lifecycle")?;
        Ok(())
    })
}

fn pod_sandbox_bad_input() -> Result<(), Failed> {
    run(|| async {
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let mut no_meta = pod_config("x", "u-x");
        no_meta.metadata = None;
        expect_code(
            run_pod(&mut c, no_meta).await,
            Code::InvalidArgument,
            "config.metadata",
        )?;
        let mut no_name = pod_config("", "u-x");
        no_name.hostname = "h".into();
        expect_code(
            run_pod(&mut c, no_name).await,
            Code::InvalidArgument,
            "config.metadata.name",
        )?;
        let r = c
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config("x", "u-x")),
                runtime_handler: "nope".into(),
            })
            .await;
        expect_code(r, Code::InvalidArgument, "runtime_handler")?;
        let mut bad_sysctl = pod_config("x", "u-x");
        bad_sysctl.linux.as_mut().context("linux")?.sysctls =
            [("kernel.panic".to_string(), "1".to_string())].into();
        expect_code(
            run_pod(&mut c, bad_sysctl).await,
            Code::InvalidArgument,
            "kernel.panic",
        )?;
        let mut bad_host = pod_config("x", "u-x");
        bad_host.hostname = "bad_host!".into();
        expect_code(
            run_pod(&mut c, bad_host).await,
            Code::InvalidArgument,
            "config.hostname",
        )?;
        let mut bad_cg = pod_config("x", "u-x");
        bad_cg.linux.as_mut().context("linux")?.cgroup_parent = "/a/../../etc".into();
        expect_code(
            run_pod(&mut c, bad_cg).await,
            Code::InvalidArgument,
            "cgroup_parent",
        )?;
        expect_code(
            pod_status(&mut c, &"ab".repeat(32)).await,
            Code::NotFound,
            "not found",
        )?;
        expect_code(
            pod_status(&mut c, "../../etc").await,
            Code::InvalidArgument,
            "pod_sandbox_id",
        )?;
        expect_code(
            stop_pod(&mut c, "").await,
            Code::InvalidArgument,
            "pod_sandbox_id",
        )?;
        ensure!(list_pods(&mut c).await?.is_empty());
        assert_no_pod_leftovers(&b, "shared")?;
        Ok(())
    })
}

fn pods_survive_berthd_kill9_and_shim_death() -> Result<(), Failed> {
    run(|| async {
        let mut b = Berthd::start("")?;
        let mut c = b.client().await?;
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(
                run_pod(
                    &mut c,
                    pod_config_in(&format!("p{i}"), &format!("u-r{i}"), "restart"),
                )
                .await?,
            );
        }
        stop_pod(&mut c, &ids[2]).await?;
        let pid0 = pod_status(&mut c, &ids[0]).await?.1["pid"]
            .as_u64()
            .context("pid")?;
        b.restart()?;
        let mut c = b.client().await?;
        let states: Vec<i32> = {
            let mut v = Vec::new();
            for id in &ids {
                v.push(pod_status(&mut c, id).await?.0.state);
            }
            v
        };
        let (r, n) = (
            cri::PodSandboxState::SandboxReady as i32,
            cri::PodSandboxState::SandboxNotready as i32,
        );
        ensure!(states == [r, r, n], "states after kill -9: {states:?}");
        let (_, info) = pod_status(&mut c, &ids[0]).await?;
        ensure!(
            info["pid"].as_u64() == Some(pid0) && alive(pid0),
            "infra restarted or gone"
        );
        // A shim killed with -9: its pod turns NotReady within seconds, naming the cause.
        // The shim is the infra process's parent (it is the pod's subreaper).
        let infra1 = pod_status(&mut c, &ids[1]).await?.1["pid"]
            .as_u64()
            .context("pid")?;
        ensure!(std::fs::read_to_string(format!("/proc/{infra1}/comm"))?.trim() == "berth-pause");
        let shim_pid: i32 = std::fs::read_to_string(format!("/proc/{infra1}/status"))?
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
            .context("PPid")?;
        ensure!(std::fs::read_to_string(format!("/proc/{shim_pid}/comm"))?.trim() == "berth-shim");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim_pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let mut reason = String::new();
        for _ in 0..100 {
            let (st, info) = pod_status(&mut c, &ids[1]).await?;
            if st.state == n {
                reason = info["reason"].as_str().unwrap_or_default().to_string();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(
            reason.contains("shim"),
            "pod of a killed shim: reason {reason:?}"
        );
        // The orphaned infra process is still stopped and cleaned up by Stop/Remove.
        ensure!(alive(infra1), "infra died with its shim");
        for id in &ids {
            stop_pod(&mut c, id).await?;
            remove_pod(&mut c, id).await?;
        }
        ensure!(!alive(pid0) && !alive(infra1), "infra processes left");
        assert_no_pod_leftovers(&b, "restart")?;
        Ok(())
    })
}

fn host_network_pod() -> Result<(), Failed> {
    run(|| async {
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let mut cfg = pod_config_in("hostnet", "u-h", "hostnet");
        let linux = cfg.linux.as_mut().context("linux")?;
        linux.sysctls.clear();
        linux.security_context = Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = run_pod(&mut c, cfg).await?;
        let (st, info) = pod_status(&mut c, &id).await?;
        let pid = info["pid"].as_u64().context("pid")?;
        ensure!(
            ns_ino(&format!("/proc/{pid}/ns/net"))? == ns_ino("/proc/self/ns/net")?,
            "hostNetwork pod has its own netns"
        );
        ensure!(
            ns_ino(&format!("/proc/{pid}/ns/uts"))? == ns_ino("/proc/self/ns/uts")?,
            "hostNetwork pod has its own UTS"
        );
        ensure!(info["netns"].is_null(), "{info}");
        let ns = st
            .linux
            .and_then(|l| l.namespaces)
            .and_then(|n| n.options)
            .context("ns options")?;
        ensure!(ns.network == cri::NamespaceMode::Node as i32);
        remove_pod(&mut c, &id).await?;
        assert_no_pod_leftovers(&b, "hostnet")?;
        Ok(())
    })
}

// ------------------------------------------------------------- containers ----

fn container_config(name: &str, image: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}/0.log"),
        labels: [("c".to_string(), name.to_string())].into(),
        envs: vec![cri::KeyValue {
            key: "GREETING".into(),
            value: "hi".into(),
        }],
        ..Default::default()
    }
}

async fn create_ctr(
    c: &mut CriClient,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    cfg: cri::ContainerConfig,
) -> Result<String, tonic::Status> {
    let req = cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(cfg),
        sandbox_config: Some(pod_cfg.clone()),
    };
    Ok(c.runtime
        .create_container(req)
        .await?
        .into_inner()
        .container_id)
}

async fn ctr_status(
    c: &mut CriClient,
    id: &str,
) -> Result<(cri::ContainerStatus, serde_json::Value), tonic::Status> {
    let r = c
        .runtime
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await?
        .into_inner();
    let info = r
        .info
        .get("info")
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or_default();
    Ok((r.status.unwrap_or_default(), info))
}

async fn wait_exited(c: &mut CriClient, id: &str) -> Result<cri::ContainerStatus> {
    for _ in 0..400 {
        let (st, _) = ctr_status(c, id).await?;
        if st.state == cri::ContainerState::ContainerExited as i32 {
            return Ok(st);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("container {id} did not exit")
}

fn log_lines(path: &Path) -> Result<Vec<(String, String, String)>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(|l| {
            let mut it = l.splitn(4, ' ');
            let _ts = it.next();
            let f = |x: Option<&str>| x.unwrap_or("").to_string();
            (f(it.next()), f(it.next()), f(it.next()))
        })
        .collect())
}

fn container_pod(test: &str, uid: &str, logs: &Path) -> cri::PodSandboxConfig {
    let mut p = pod_config_in(&format!("ctr-{uid}"), uid, test);
    p.log_directory = logs.display().to_string();
    if let Some(l) = p.linux.as_mut() {
        l.sysctls.clear();
    }
    p
}

fn container_lifecycle_and_logs() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("ctr", "c-1", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let script = "echo hello $GREETING; echo oops >&2; cat /etc/hostname; exit 3";
        let id = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            container_config("one", &w.busybox.reference, script),
        )
        .await?;
        let (st, info) = ctr_status(&mut c, &id).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerCreated as i32 && st.created_at > 0,
            "{st:?}"
        );
        ensure!(st.image_id == w.busybox.config_digest, "{st:?}");
        ensure!(
            info["runtimeSpec"]["process"]["args"] == serde_json::json!(["/bin/sh", "-c", script]),
            "{info}"
        );
        c.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        let st = wait_exited(&mut c, &id).await?;
        ensure!(st.exit_code == 3 && st.reason == "Error", "{st:?}");
        ensure!(
            st.started_at >= st.created_at && st.finished_at >= st.started_at,
            "{st:?}"
        );
        ensure!(
            st.log_path == logs.join("one/0.log").display().to_string(),
            "{}",
            st.log_path
        );
        let lines = log_lines(Path::new(&st.log_path))?;
        for want in [
            ("stdout", "F", "hello hi"),
            ("stderr", "F", "oops"),
            ("stdout", "F", "ctr-c-1-host"),
        ] {
            ensure!(
                lines
                    .iter()
                    .any(|l| (l.0.as_str(), l.1.as_str(), l.2.as_str()) == want),
                "{want:?} not in {lines:?}"
            );
        }
        // The image of a container cannot be removed from under it.
        expect_code(
            remove(&mut c, &w.busybox.reference).await,
            Code::FailedPrecondition,
            "in use",
        )?;
        ensure!(
            status(&mut c, &w.busybox.reference, false)
                .await?
                .image
                .is_some()
        );
        // A name is unique per pod.
        let dup = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            container_config("one", &w.busybox.reference, "true"),
        )
        .await;
        expect_code(dup, Code::AlreadyExists, &id)?;
        // A long-running one lives in the pod's namespaces and sees the pod's files.
        // In the pod's shared PID namespace it is not PID 1, so SIGTERM would kill it
        // were it not ignored; it logs once the trap is in place.
        let long_cfg = container_config(
            "long",
            &w.busybox.reference,
            "trap '' TERM; echo trapped; while true; do sleep 1; done",
        );
        let long = create_ctr(&mut c, &pod, &pod_cfg, long_cfg).await?;
        c.runtime
            .start_container(cri::StartContainerRequest {
                container_id: long.clone(),
            })
            .await?;
        let (st, info) = ctr_status(&mut c, &long).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "{st:?}"
        );
        let pid = info["pid"].as_u64().context("pid")?;
        let netns = b.state.join("netns").join(&pod);
        ensure!(
            ns_ino(&format!("/proc/{pid}/ns/net"))? == std::fs::metadata(&netns)?.ino(),
            "not in the pod netns"
        );
        let (_, pinfo) = pod_status(&mut c, &pod).await?;
        let infra = pinfo["pid"].as_u64().context("infra pid")?;
        for ns in ["uts", "ipc"] {
            ensure!(
                ns_ino(&format!("/proc/{pid}/ns/{ns}"))?
                    == ns_ino(&format!("/proc/{infra}/ns/{ns}"))?,
                "{ns} not shared with the pod"
            );
        }
        let resolv = std::fs::read_to_string(format!("/proc/{pid}/root/etc/resolv.conf"))?;
        ensure!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        ensure!(
            cg.contains(&format!("{}/podc-1/{long}", cgroup_scope("ctr"))),
            "not in the pod cgroup: {cg}"
        );
        // Filters.
        let f = |flt: cri::ContainerFilter| {
            let mut cc = c.clone();
            async move {
                Ok::<_, anyhow::Error>(
                    cc.runtime
                        .list_containers(cri::ListContainersRequest { filter: Some(flt) })
                        .await?
                        .into_inner()
                        .containers,
                )
            }
        };
        let running = cri::ContainerStateValue {
            state: cri::ContainerState::ContainerRunning as i32,
        };
        let r = f(cri::ContainerFilter {
            state: Some(running),
            ..Default::default()
        })
        .await?;
        ensure!(r.len() == 1 && r[0].id == long, "{r:?}");
        ensure!(
            f(cri::ContainerFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            })
            .await?
            .len()
                == 2
        );
        let sel = [("c".to_string(), "one".to_string())].into();
        ensure!(
            f(cri::ContainerFilter {
                label_selector: sel,
                ..Default::default()
            })
            .await?
            .len()
                == 1
        );
        let long_log = logs.join("long/0.log");
        for _ in 0..200 {
            if log_lines(&long_log)
                .unwrap_or_default()
                .iter()
                .any(|l| l.2 == "trapped")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Stop: the container ignores SIGTERM, so SIGKILL follows the grace period.
        let t = std::time::Instant::now();
        c.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: long.clone(),
                timeout: 1,
            })
            .await?;
        let st = wait_exited(&mut c, &long).await?;
        ensure!(
            st.exit_code == 137 && t.elapsed() >= Duration::from_millis(900),
            "{st:?} after {:?}",
            t.elapsed()
        );
        c.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: long.clone(),
                timeout: 1,
            })
            .await?;
        // Remove: rootfs unmounted, dirs gone; idempotent.
        c.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: long.clone(),
            })
            .await?;
        c.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: long.clone(),
            })
            .await?;
        expect_code(ctr_status(&mut c, &long).await, Code::NotFound, "not found")?;
        // Stop and remove of an id that is not there succeed (the CRI contract:
        // kubelet retries them); a huge id comes back cut, in a small status.
        c.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: long.clone(),
                timeout: 0,
            })
            .await?;
        let huge = "ab".repeat(100_000);
        let msg = expect_code(
            ctr_status(&mut c, &huge).await,
            Code::NotFound,
            "200000 bytes",
        )?;
        ensure!(msg.len() < 300, "{} bytes of status message", msg.len());
        ensure!(
            !b.state.join("containers").join(&long).exists()
                && !b.root.join("containers").join(&long).exists()
        );
        // Removing the pod removes its remaining container.
        remove_pod(&mut c, &pod).await?;
        expect_code(ctr_status(&mut c, &id).await, Code::NotFound, "not found")?;
        assert_no_pod_leftovers(&b, "ctr")?;
        ensure!(
            entries(&b.state.join("containers"))?.is_empty()
                && entries(&b.root.join("containers"))?.is_empty()
        );
        Ok(())
    })
}

fn container_bad_input_leaves_nothing() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("ctrbad", "c-2", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let missing = format!("{}/test/never-pulled:1", w.reg.addr());
        expect_code(
            create_ctr(
                &mut c,
                &pod,
                &pod_cfg,
                container_config("x", &missing, "true"),
            )
            .await,
            Code::NotFound,
            "never-pulled",
        )?;
        let mut no_meta = container_config("x", &w.busybox.reference, "true");
        no_meta.metadata = None;
        expect_code(
            create_ctr(&mut c, &pod, &pod_cfg, no_meta).await,
            Code::InvalidArgument,
            "config.metadata",
        )?;
        let mut bad_mount = container_config("x", &w.busybox.reference, "true");
        bad_mount.mounts = vec![cri::Mount {
            container_path: "/data".into(),
            host_path: "relative/dir".into(),
            ..Default::default()
        }];
        expect_code(
            create_ctr(&mut c, &pod, &pod_cfg, bad_mount).await,
            Code::InvalidArgument,
            "config.mounts[0].host_path",
        )?;
        let mut bad_log = container_config("x", &w.busybox.reference, "true");
        bad_log.log_path = "../../escape.log".into();
        expect_code(
            create_ctr(&mut c, &pod, &pod_cfg, bad_log).await,
            Code::InvalidArgument,
            "config.log_path",
        )?;
        let mut bad_bin = container_config("x", &w.busybox.reference, "true");
        bad_bin.command = vec!["/no/such/binary".into()];
        let e = create_ctr(&mut c, &pod, &pod_cfg, bad_bin).await;
        expect_code(e, Code::Internal, "/no/such/binary")?;
        // A mount the runtime fails half-way through create: a file over a directory.
        let host_file = b.dir().join("a-file");
        std::fs::write(&host_file, "x")?;
        let mut file_on_dir = container_config("x", &w.busybox.reference, "true");
        file_on_dir.mounts = vec![cri::Mount {
            container_path: "/bin".into(),
            host_path: host_file.display().to_string(),
            ..Default::default()
        }];
        let e = create_ctr(&mut c, &pod, &pod_cfg, file_on_dir).await;
        expect_code(e, Code::Internal, "/bin")?;
        // None of the failed creates left a rootfs mount or runtime state while the pod runs.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        let ctr_dirs = [b.root.join("containers"), b.state.join("containers")];
        let left: Vec<&str> = mounts
            .lines()
            .filter(|l| {
                ctr_dirs
                    .iter()
                    .any(|d| l.contains(&*d.display().to_string()))
            })
            .collect();
        ensure!(left.is_empty(), "container mounts left: {left:?}");
        ensure!(
            entries(&b.state.join("runtimes/runc"))
                .map(|e| e.is_empty())
                .unwrap_or(true),
            "runc state left"
        );
        expect_code(
            create_ctr(
                &mut c,
                &"ab".repeat(32),
                &pod_cfg,
                container_config("x", &w.busybox.reference, "true"),
            )
            .await,
            Code::NotFound,
            "pod sandbox",
        )?;
        stop_pod(&mut c, &pod).await?;
        expect_code(
            create_ctr(
                &mut c,
                &pod,
                &pod_cfg,
                container_config("x", &w.busybox.reference, "true"),
            )
            .await,
            Code::FailedPrecondition,
            "not ready",
        )?;
        ensure!(list_ctrs(&mut c).await?.is_empty());
        ensure!(
            entries(&b.state.join("containers"))?.is_empty()
                && entries(&b.root.join("containers"))?.is_empty(),
            "container dirs left"
        );
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "ctrbad")?;
        Ok(())
    })
}

fn containers_survive_berthd_kill9() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let mut b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        // Ten pods, each with a container that keeps logging and one that exits (with
        // its own code) while berthd is down; the first three also have one that exited
        // before the kill, and the last pod is stopped before it.
        struct PodCase {
            pod: String,
            runner: String,
            quitter: String,
            done: Option<String>,
        }
        let trigger = b.dir().join("trigger");
        std::fs::create_dir_all(&trigger)?;
        let mut cases = Vec::new();
        for i in 0..10 {
            let pod_cfg = container_pod(
                "ctrrestart",
                &format!("c-3-{i}"),
                &logs.join(format!("p{i}")),
            );
            let pod = run_pod(&mut c, pod_cfg.clone()).await?;
            let runner = create_ctr(
                &mut c,
                &pod,
                &pod_cfg,
                container_config(
                    "runner",
                    &w.busybox.reference,
                    "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done",
                ),
            )
            .await?;
            // It exits once the test, with berthd killed, creates the trigger file.
            let mut quitter_cfg = container_config(
                "quitter",
                &w.busybox.reference,
                &format!(
                    "until [ -e /trigger/go ]; do sleep 0.05; done; exit {}",
                    10 + i
                ),
            );
            quitter_cfg.mounts = vec![cri::Mount {
                container_path: "/trigger".into(),
                host_path: trigger.display().to_string(),
                readonly: true,
                ..Default::default()
            }];
            let quitter = create_ctr(&mut c, &pod, &pod_cfg, quitter_cfg).await?;
            let done = if i < 3 {
                Some(
                    create_ctr(
                        &mut c,
                        &pod,
                        &pod_cfg,
                        container_config("done", &w.busybox.reference, "echo finished"),
                    )
                    .await?,
                )
            } else {
                None
            };
            for id in [&runner, &quitter].into_iter().chain(done.as_ref()) {
                c.runtime
                    .start_container(cri::StartContainerRequest {
                        container_id: id.clone(),
                    })
                    .await?;
            }
            cases.push(PodCase {
                pod,
                runner,
                quitter,
                done,
            });
        }
        for case in &cases {
            if let Some(d) = &case.done {
                ensure!(wait_exited(&mut c, d).await?.exit_code == 0);
            }
        }
        let stopped = &cases[9];
        stop_pod(&mut c, &stopped.pod).await?;
        let mut runner_pids = Vec::new();
        for case in &cases[..9] {
            let (st, info) = ctr_status(&mut c, &case.runner).await?;
            ensure!(st.state == cri::ContainerState::ContainerRunning as i32);
            runner_pids.push(info["pid"].as_u64().context("pid")?);
        }
        let killed_at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as i64;
        b.kill9()?;
        std::fs::write(trigger.join("go"), "")?;
        tokio::time::sleep(Duration::from_millis(1000)).await; // quitters exit while berthd is down
        let log_len =
            |i: usize| log_lines(&logs.join(format!("p{i}/runner/0.log"))).map(|l| l.len());
        let before: Vec<usize> = (0..9).map(log_len).collect::<Result<_>>()?;
        b.restart()?;
        let mut c = b.client().await?;

        let pods = list_pods(&mut c).await?;
        ensure!(pods.len() == 10, "{} pods listed after restart", pods.len());
        for p in &pods {
            let want = if p.id == stopped.pod {
                cri::PodSandboxState::SandboxNotready
            } else {
                cri::PodSandboxState::SandboxReady
            };
            ensure!(p.state == want as i32, "pod {} in state {}", p.id, p.state);
        }
        let listed = list_ctrs(&mut c).await?;
        ensure!(
            listed.len() == 23,
            "{} containers listed after restart",
            listed.len()
        );
        for (i, case) in cases.iter().enumerate() {
            let (st, _) = ctr_status(&mut c, &case.quitter).await?;
            // The stopped pod's containers were killed by StopPodSandbox.
            let want = if i < 9 { 10 + i as i32 } else { 137 };
            ensure!(
                st.state == cri::ContainerState::ContainerExited as i32
                    && st.exit_code == want
                    && st.reason == "Error",
                "quitter of pod {i}: {st:?}"
            );
            if i < 9 {
                // It exited while berthd was down: its real finish time, not the restart's.
                ensure!(
                    st.finished_at > killed_at && st.finished_at > st.started_at,
                    "quitter of pod {i} finished_at {} (killed at {killed_at})",
                    st.finished_at
                );
            }
            if let Some(d) = &case.done {
                let (st, _) = ctr_status(&mut c, d).await?;
                ensure!(
                    st.state == cri::ContainerState::ContainerExited as i32
                        && st.exit_code == 0
                        && st.reason == "Completed"
                        && st.finished_at < killed_at,
                    "done container of pod {i}: {st:?}"
                );
            }
            let (st, info) = ctr_status(&mut c, &case.runner).await?;
            if i < 9 {
                ensure!(
                    st.state == cri::ContainerState::ContainerRunning as i32
                        && info["pid"].as_u64() == Some(runner_pids[i]),
                    "runner of pod {i} restarted or gone: {st:?}"
                );
            } else {
                ensure!(
                    st.state == cri::ContainerState::ContainerExited as i32,
                    "runner of the stopped pod: {st:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        for (i, n) in before.iter().enumerate() {
            ensure!(
                log_len(i)? > *n,
                "pod {i}: logs stopped while berthd was down"
            );
        }
        // The exit of a running container is still seen after the restart.
        c.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: cases[0].runner.clone(),
                timeout: 0,
            })
            .await?;
        ensure!(wait_exited(&mut c, &cases[0].runner).await?.exit_code == 137);
        for case in &cases {
            remove_pod(&mut c, &case.pod).await?;
        }
        for pid in runner_pids {
            ensure!(!alive(pid), "container process {pid} left");
        }
        assert_no_pod_leftovers(&b, "ctrrestart")?;
        Ok(())
    })
}

fn tty_and_stdin_containers() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("ttystdin", "c-6", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let start = |c: &mut CriClient, id: String| {
            let mut rt = c.runtime.clone();
            async move {
                rt.start_container(cri::StartContainerRequest { container_id: id })
                    .await
                    .map(|_| ())
            }
        };
        // tty: the process's stdio is a pty, whose output is logged as stdout.
        let mut tty = container_config("tty", &w.busybox.reference, "tty; echo out-on-tty >&2");
        tty.tty = true;
        let tty = create_ctr(&mut c, &pod, &pod_cfg, tty).await?;
        start(&mut c, tty.clone()).await?;
        ensure!(wait_exited(&mut c, &tty).await?.exit_code == 0);
        let lines = log_lines(&logs.join("tty/0.log"))?;
        ensure!(
            lines
                .iter()
                .any(|l| l.0 == "stdout" && l.2.starts_with("/dev/pts/"))
                && lines
                    .iter()
                    .any(|l| l.0 == "stdout" && l.2.trim_end() == "out-on-tty"),
            "tty container log: {lines:?}"
        );
        // stdin: kept open for attach, so `cat` waits instead of reading EOF.
        let mut with_stdin = container_config("stdin", &w.busybox.reference, "cat; echo eof");
        with_stdin.stdin = true;
        with_stdin.stdin_once = true;
        let with_stdin = create_ctr(&mut c, &pod, &pod_cfg, with_stdin).await?;
        let without = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            container_config("nostdin", &w.busybox.reference, "cat; echo eof"),
        )
        .await?;
        start(&mut c, with_stdin.clone()).await?;
        start(&mut c, without.clone()).await?;
        let st = wait_exited(&mut c, &without).await?;
        ensure!(st.exit_code == 0, "{st:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (st, _) = ctr_status(&mut c, &with_stdin).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "a container with stdin saw EOF: {st:?}"
        );
        // tty and stdin together: an interactive shell waits for input.
        let mut interactive = container_config("sh", &w.busybox.reference, "exec sh");
        interactive.tty = true;
        interactive.stdin = true;
        let interactive = create_ctr(&mut c, &pod, &pod_cfg, interactive).await?;
        start(&mut c, interactive.clone()).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (st, _) = ctr_status(&mut c, &interactive).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "interactive shell exited: {st:?}"
        );
        stop_pod(&mut c, &pod).await?;
        ensure!(wait_exited(&mut c, &with_stdin).await?.exit_code == 137);
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "ttystdin")?;
        Ok(())
    })
}

/// Whether crun can run containers here: crun 1.8 refuses a cgroup v1 host whose
/// cgroup2 `unified` mount has controllers (hybrid mode).
fn cgroup_hybrid_with_v2_controllers() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .is_ok_and(|s| !s.trim().is_empty())
}

fn crun_runtime_handler() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("[runtimes.crun]\npath = \"crun\"\n")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("crun", "c-7", &logs);
        let run_with = |c: &mut CriClient, handler: &str| {
            let mut rt = c.runtime.clone();
            let req = cri::RunPodSandboxRequest {
                config: Some(pod_cfg.clone()),
                runtime_handler: handler.into(),
            };
            async move {
                rt.run_pod_sandbox(req)
                    .await
                    .map(|r| r.into_inner().pod_sandbox_id)
            }
        };
        expect_code(
            run_with(&mut c, "kata").await,
            Code::InvalidArgument,
            "runtime_handler",
        )?;
        let pod = run_with(&mut c, "crun").await?;
        let (st, info) = pod_status(&mut c, &pod).await?;
        ensure!(
            st.runtime_handler == "crun" && info["runtimeHandler"] == "crun",
            "{st:?} {info}"
        );
        let crun_root = b.state.join("runtimes/crun");
        let created = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            container_config("hello", &w.busybox.reference, "echo hello from crun"),
        )
        .await;
        if cgroup_hybrid_with_v2_controllers() {
            // This host: crun's own refusal comes back, and nothing is left of the container.
            expect_code(created, Code::Internal, "crun")?;
            let e = create_ctr(
                &mut c,
                &pod,
                &pod_cfg,
                container_config("hello", &w.busybox.reference, "true"),
            )
            .await;
            expect_code(e, Code::Internal, "hybrid")?;
            ensure!(
                list_ctrs(&mut c).await?.is_empty(),
                "a failed container is listed"
            );
            ensure!(
                entries(&b.root.join("containers"))?.is_empty()
                    && entries(&b.state.join("containers"))?.is_empty(),
                "container dirs left"
            );
        } else {
            let id = created?;
            c.runtime
                .start_container(cri::StartContainerRequest {
                    container_id: id.clone(),
                })
                .await?;
            ensure!(wait_exited(&mut c, &id).await?.exit_code == 0);
            ensure!(
                entries(&crun_root)?.contains(&id),
                "crun's state root does not hold the container"
            );
            let lines = log_lines(&logs.join("hello/0.log"))?;
            ensure!(lines.iter().any(|l| l.2 == "hello from crun"), "{lines:?}");
        }
        stop_pod(&mut c, &pod).await?;
        remove_pod(&mut c, &pod).await?;
        ensure!(
            entries(&crun_root).map(|e| e.is_empty()).unwrap_or(true),
            "crun state left"
        );
        assert_no_pod_leftovers(&b, "crun")?;
        Ok(())
    })
}

/// Mounts whose mountinfo line names `dir`.
fn mounts_under(dir: &Path) -> Result<Vec<String>> {
    let d = dir.display().to_string();
    Ok(std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|l| l.contains(&d))
        .map(String::from)
        .collect())
}

/// Waits up to 2 s for berthd to kill itself at its failpoint.
async fn died_at_failpoint(b: &mut Berthd) -> bool {
    for _ in 0..100 {
        if b.exited() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn crash_mid_create_is_swept_at_restart() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let mut b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");

        // Killed after the pod's netns, /dev/shm, cgroup, shim and infra exist, before its record.
        b.set_env("BERTH_FAILPOINT", Some("sandbox-before-record"));
        b.restart()?;
        let mut c = b.client().await?;
        let pod_cfg = container_pod("crashsweep", "c-8", &logs);
        ensure!(
            run_pod(&mut c, pod_cfg.clone()).await.is_err(),
            "RunPodSandbox survived its failpoint"
        );
        ensure!(
            died_at_failpoint(&mut b).await,
            "berthd did not die at the failpoint"
        );
        ensure!(
            !entries(&b.state.join("netns"))?.is_empty()
                && !entries(&b.state.join("s"))?.is_empty(),
            "the crash left nothing to sweep: the test would prove nothing"
        );
        b.set_env("BERTH_FAILPOINT", None);
        b.restart()?;
        let mut c = b.client().await?;
        let pods = list_pods(&mut c).await?;
        ensure!(pods.is_empty(), "a half-made pod is listed: {pods:?}");
        assert_no_pod_leftovers(&b, "crashsweep")?;
        ensure!(
            mounts_under(b.dir())?.is_empty(),
            "mounts left: {:?}",
            mounts_under(b.dir())?
        );

        // Killed after the runtime created the container, before its record.
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        b.set_env("BERTH_FAILPOINT", Some("container-before-record"));
        b.restart()?;
        let mut c = b.client().await?;
        let cfg = container_config("half", &w.busybox.reference, "sleep 1000");
        ensure!(
            create_ctr(&mut c, &pod, &pod_cfg, cfg.clone())
                .await
                .is_err()
        );
        ensure!(
            died_at_failpoint(&mut b).await,
            "berthd did not die at the failpoint"
        );
        ensure!(
            !entries(&b.state.join("containers"))?.is_empty()
                && !entries(&b.state.join("runtimes/runc"))?.is_empty()
                && !mounts_under(&b.state.join("containers"))?.is_empty(),
            "the crash left no container to sweep"
        );
        b.set_env("BERTH_FAILPOINT", None);
        b.restart()?;
        let mut c = b.client().await?;
        ensure!(
            list_ctrs(&mut c).await?.is_empty(),
            "a half-made container is listed"
        );
        ensure!(
            entries(&b.state.join("containers"))?.is_empty()
                && entries(&b.root.join("containers"))?.is_empty()
                && entries(&b.state.join("runtimes/runc"))?.is_empty()
                && mounts_under(&b.state.join("containers"))?.is_empty(),
            "container leftovers after the sweep"
        );
        // The pod is untouched and the name is free again.
        ensure!(
            pod_status(&mut c, &pod).await?.0.state == cri::PodSandboxState::SandboxReady as i32
        );
        let id = create_ctr(&mut c, &pod, &pod_cfg, cfg).await?;
        ensure!(
            ctr_status(&mut c, &id).await?.0.state == cri::ContainerState::ContainerCreated as i32
        );
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "crashsweep")?;
        Ok(())
    })
}

/// Runs `argv` in a container with ExecSync; returns (exit code, stdout, stderr).
async fn exec_in(c: &mut CriClient, id: &str, argv: &[&str]) -> Result<(i32, String, String)> {
    let r = c
        .runtime
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: argv.iter().map(|s| s.to_string()).collect(),
            timeout: 20,
        })
        .await?
        .into_inner();
    Ok((
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    ))
}

/// Veth devices attached to `bridge` on the host.
fn bridge_ports(bridge: &str) -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "master", bridge])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect())
}

/// host-local lease files (one per allocated IP) in its data dir.
fn leases(ipam_dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for net in std::fs::read_dir(ipam_dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(net.path())?.flatten() {
            let n = f.file_name().to_string_lossy().into_owned();
            if n.parse::<std::net::IpAddr>().is_ok() {
                out.push(n);
            }
        }
    }
    Ok(out)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// An HTTP GET over a plain TCP connection; returns the body.
fn http_get(addr: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

fn pod_networking_with_cni() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let mut b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let st = c
            .runtime
            .status(cri::StatusRequest { verbose: false })
            .await?
            .into_inner();
        let net = st
            .status
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find(|c| c.r#type == "NetworkReady")
            .context("NetworkReady")?;
        ensure!(net.status, "network not ready: {net:?}");
        let logs = b.dir().join("logs");
        let host_port = free_port()?;

        // A pod may not choose its IPs unless the operator allows it.
        let mut chooser = container_pod("net", "n-ips", &logs);
        chooser
            .annotations
            .insert("berth.dev/ips".into(), "10.88.7.7".into());
        let e = c
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(chooser),
                runtime_handler: String::new(),
            })
            .await
            .expect_err("a pod choosing its IP");
        ensure!(
            e.code() == Code::InvalidArgument
                && e.message().contains("berth.dev/ips")
                && e.message().contains("cni.allow_ips_annotation"),
            "{e:?}"
        );

        // Pod A serves HTTP on 8080, mapped to a host port; pod B is a client.
        let mut cfg_a = container_pod("net", "n-a", &logs);
        cfg_a.port_mappings = vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 8080,
            host_port: i32::from(host_port),
            host_ip: String::new(),
        }];
        let pod_a = run_pod(&mut c, cfg_a.clone()).await?;
        let cfg_b = container_pod("net", "n-b", &logs);
        let pod_b = run_pod(&mut c, cfg_b.clone()).await?;
        let server = create_ctr(
            &mut c,
            &pod_a,
            &cfg_a,
            container_config(
                "web",
                &w.busybox.reference,
                "mkdir -p /tmp/www && echo hello-from-a > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
            ),
        )
        .await?;
        let client = create_ctr(
            &mut c,
            &pod_b,
            &cfg_b,
            container_config("client", &w.busybox.reference, "exec sleep 1000"),
        )
        .await?;
        for id in [&server, &client] {
            c.runtime
                .start_container(cri::StartContainerRequest {
                    container_id: id.clone(),
                })
                .await?;
        }
        let ip_a = pod_status(&mut c, &pod_a)
            .await?
            .0
            .network
            .unwrap_or_default()
            .ip;
        let ip_b = pod_status(&mut c, &pod_b)
            .await?
            .0
            .network
            .unwrap_or_default()
            .ip;
        let prefix = b.subnet.trim_end_matches("0/24");
        ensure!(
            ip_a.starts_with(prefix) && ip_b.starts_with(prefix) && ip_a != ip_b,
            "pod IPs {ip_a} and {ip_b} not distinct in {}",
            b.subnet
        );
        // Pod to pod over TCP, by pod IP (the server may take a moment to listen).
        let url = format!("http://{ip_a}:8080/");
        let mut got = (1, String::new(), String::new());
        for _ in 0..50 {
            got = exec_in(&mut c, &client, &["busybox", "wget", "-q", "-O", "-", &url]).await?;
            if got.0 == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            got.0 == 0 && got.1.trim() == "hello-from-a",
            "pod to pod: {got:?}"
        );
        // The pod sees its own address on eth0, and its DNS config.
        let (_, addrs, _) = exec_in(
            &mut c,
            &client,
            &["busybox", "ip", "-o", "-4", "addr", "show", "eth0"],
        )
        .await?;
        ensure!(
            addrs.contains(&format!("{ip_b}/")),
            "eth0 in pod B: {addrs}"
        );
        let (_, resolv, _) =
            exec_in(&mut c, &client, &["busybox", "cat", "/etc/resolv.conf"]).await?;
        ensure!(
            resolv.contains("nameserver 10.96.0.10")
                && resolv.contains("search e2e.svc.cluster.local"),
            "{resolv}"
        );
        // hostPort: from the host, through the node's own address on the pod bridge.
        let gateway = format!("{prefix}1");
        let body = http_get(&format!("{gateway}:{host_port}"))?;
        ensure!(body.trim() == "hello-from-a", "hostPort answer: {body:?}");
        let body = http_get(&format!("127.0.0.1:{host_port}"))?;
        ensure!(
            body.trim() == "hello-from-a",
            "hostPort via loopback: {body:?}"
        );

        // A berthd restart keeps the IPs, and teardown still frees everything.
        b.restart()?;
        let mut c = b.client().await?;
        ensure!(
            pod_status(&mut c, &pod_a)
                .await?
                .0
                .network
                .unwrap_or_default()
                .ip
                == ip_a
        );
        let got = exec_in(&mut c, &client, &["busybox", "wget", "-q", "-O", "-", &url]).await?;
        ensure!(got.1.trim() == "hello-from-a", "after restart: {got:?}");
        ensure!(
            leases(&b.ipam_dir)?.len() == 2,
            "leases: {:?}",
            leases(&b.ipam_dir)?
        );
        for p in [&pod_a, &pod_b] {
            stop_pod(&mut c, p).await?;
            stop_pod(&mut c, p).await?; // idempotent
            remove_pod(&mut c, p).await?;
        }
        ensure!(
            leases(&b.ipam_dir)?.is_empty(),
            "leases left: {:?}",
            leases(&b.ipam_dir)?
        );
        ensure!(
            bridge_ports(&b.bridge)?.is_empty(),
            "veths left: {:?}",
            bridge_ports(&b.bridge)?
        );
        ensure!(
            http_get(&format!("{gateway}:{host_port}")).is_err(),
            "hostPort still mapped"
        );

        // 30 pods come up with distinct IPs and leave nothing behind.
        let mut ids = Vec::new();
        let mut ips = BTreeSet::new();
        for i in 0..30 {
            let id = run_pod(&mut c, container_pod("net", &format!("n-many-{i}"), &logs)).await?;
            ips.insert(
                pod_status(&mut c, &id)
                    .await?
                    .0
                    .network
                    .unwrap_or_default()
                    .ip,
            );
            ids.push(id);
        }
        ensure!(ips.len() == 30, "{} distinct IPs for 30 pods", ips.len());
        ensure!(bridge_ports(&b.bridge)?.len() == 30);
        for id in &ids {
            remove_pod(&mut c, id).await?;
        }
        ensure!(
            leases(&b.ipam_dir)?.is_empty(),
            "leases left: {:?}",
            leases(&b.ipam_dir)?
        );
        ensure!(
            bridge_ports(&b.bridge)?.is_empty(),
            "veths left: {:?}",
            bridge_ports(&b.bridge)?
        );
        assert_no_pod_leftovers(&b, "net")?;
        Ok(())
    })
}

fn broken_cni_config() -> Result<(), Failed> {
    run(|| async {
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let network = |c: &mut CriClient| {
            let mut rt = c.runtime.clone();
            async move {
                let st = rt
                    .status(cri::StatusRequest { verbose: false })
                    .await?
                    .into_inner();
                st.status
                    .unwrap_or_default()
                    .conditions
                    .into_iter()
                    .find(|c| c.r#type == "NetworkReady")
                    .context("NetworkReady")
            }
        };
        ensure!(network(&mut c).await?.status);
        // A broken file sorts first: it is the config, so the network is not ready.
        let broken = b.cni_dir.join("00-broken.conflist");
        std::fs::write(
            &broken,
            "{\"cniVersion\": \"1.0.0\", \"name\": \"x\", \"plugins\": [",
        )?;
        let n = network(&mut c).await?;
        ensure!(
            !n.status
                && n.reason == "NetworkPluginNotReady"
                && n.message.contains("00-broken.conflist"),
            "{n:?}"
        );
        let pod_cfg = pod_config_in("broken", "b-1", "brokencni");
        let e = run_pod(&mut c, pod_cfg.clone()).await;
        expect_code(e, Code::FailedPrecondition, "00-broken.conflist")?;
        // A plugin that is not installed is named.
        std::fs::write(
            &broken,
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"no-such-cni-plugin"}]}"#,
        )?;
        let n = network(&mut c).await?;
        ensure!(
            !n.status && n.message.contains("no-such-cni-plugin"),
            "{n:?}"
        );
        let e = run_pod(&mut c, pod_cfg.clone()).await;
        expect_code(e, Code::FailedPrecondition, "no-such-cni-plugin")?;
        // A plugin that fails: its message comes back, and nothing is left.
        std::fs::write(
            &broken,
            serde_json::json!({"cniVersion": "1.0.0", "name": "x", "plugins": [{
                "type": "ptp",
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "not-a-subnet"}]]}
            }]})
            .to_string(),
        )?;
        let e = run_pod(&mut c, pod_cfg.clone()).await;
        expect_code(e, Code::Internal, "not-a-subnet")?;
        ensure!(list_pods(&mut c).await?.is_empty());
        assert_no_pod_leftovers(&b, "brokencni")?;
        // Fixed without a restart.
        std::fs::remove_file(&broken)?;
        ensure!(network(&mut c).await?.status);
        let id = run_pod(&mut c, pod_cfg).await?;
        remove_pod(&mut c, &id).await?;
        assert_no_pod_leftovers(&b, "brokencni")?;
        Ok(())
    })
}

fn exec_sync_in_a_running_container() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("execs", "c-4", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let mut cfg = container_config("svc", &w.busybox.reference, "while true; do sleep 1; done");
        cfg.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1234 }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = create_ctr(&mut c, &pod, &pod_cfg, cfg).await?;
        c.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        let ec = c.clone();
        let exec = |cmd: &[&str], timeout: i64| {
            let mut cc = ec.clone();
            let req = cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout,
            };
            async move { cc.runtime.exec_sync(req).await.map(|r| r.into_inner()) }
        };
        let r = exec(
            &[
                "/bin/sh",
                "-c",
                "echo out $GREETING; echo err >&2; busybox id -u; exit 3",
            ],
            10,
        )
        .await?;
        ensure!(r.exit_code == 3, "{r:?}");
        ensure!(
            String::from_utf8_lossy(&r.stdout) == "out hi\n1234\n"
                && String::from_utf8_lossy(&r.stderr) == "err\n",
            "{r:?}"
        );
        let r = exec(&["/bin/sh", "-c", "exit 0"], 0).await?;
        ensure!(r.exit_code == 0 && r.stdout.is_empty());
        // An exec's exit is not the container's.
        let (st, _) = ctr_status(&mut c, &id).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "the container took an exec's exit: {st:?}"
        );
        // Timeout: the command is killed, not left running.
        let t = std::time::Instant::now();
        expect_code(
            exec(&["/bin/sh", "-c", "echo marker-sleep; sleep 30"], 1).await,
            Code::DeadlineExceeded,
            "timed out",
        )?;
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "timeout not honoured: {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let leftover = std::fs::read_dir("/proc")?.flatten().any(|p| {
            String::from_utf8_lossy(&std::fs::read(p.path().join("cmdline")).unwrap_or_default())
                .contains("marker-sleep")
        });
        ensure!(!leftover, "the timed-out exec is still running");
        // Output past the cap is an error, not a silent cut.
        expect_code(
            exec(&["busybox", "head", "-c", "5000000", "/dev/zero"], 10).await,
            Code::ResourceExhausted,
            "MiB",
        )?;
        expect_code(exec(&[], 1).await, Code::InvalidArgument, "cmd")?;
        c.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            })
            .await?;
        expect_code(
            exec(&["true"], 1).await,
            Code::FailedPrecondition,
            "not running",
        )?;
        let mut cc = c.clone();
        let unknown = cc
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: "ab".repeat(32),
                cmd: vec!["true".into()],
                timeout: 1,
            })
            .await;
        expect_code(unknown, Code::NotFound, "not found")?;
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "execs")?;
        Ok(())
    })
}

fn shim_kill9_kills_and_reports_its_containers() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("shimdeath", "c-5", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let id = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            container_config(
                "victim",
                &w.busybox.reference,
                "while true; do sleep 1; done",
            ),
        )
        .await?;
        c.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        let ctr_pid = ctr_status(&mut c, &id).await?.1["pid"]
            .as_u64()
            .context("pid")?;
        let infra = pod_status(&mut c, &pod).await?.1["pid"]
            .as_u64()
            .context("infra pid")?;
        let shim: i32 = std::fs::read_to_string(format!("/proc/{infra}/status"))?
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
            .context("PPid")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let mut st = None;
        for _ in 0..200 {
            let (s, _) = ctr_status(&mut c, &id).await?;
            if s.state == cri::ContainerState::ContainerExited as i32 {
                st = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let st = st.context("container not reported exited within 5s of its shim's death")?;
        ensure!(
            st.exit_code == 137 && st.reason == "ShimDied" && st.message.contains("shim"),
            "{st:?}"
        );
        ensure!(!alive(ctr_pid), "the container's process outlived its shim");
        remove_pod(&mut c, &pod).await?;
        ensure!(!alive(infra), "infra left running");
        assert_no_pod_leftovers(&b, "shimdeath")?;
        ensure!(
            entries(&b.state.join("containers"))?.is_empty(),
            "container state left"
        );
        Ok(())
    })
}

// ------------------------------------------------------------ stats, OOM ----

fn start(id: &str) -> cri::StartContainerRequest {
    cri::StartContainerRequest {
        container_id: id.into(),
    }
}

async fn list_ctr_stats(
    c: &mut CriClient,
    filter: cri::ContainerStatsFilter,
) -> Result<Vec<cri::ContainerStats>, tonic::Status> {
    Ok(c.runtime
        .list_container_stats(cri::ListContainerStatsRequest {
            filter: Some(filter),
        })
        .await?
        .into_inner()
        .stats)
}

fn stats_of<'a>(all: &'a [cri::ContainerStats], id: &str) -> Result<&'a cri::ContainerStats> {
    all.iter()
        .find(|s| s.attributes.as_ref().is_some_and(|a| a.id == id))
        .with_context(|| format!("no stats for {id}"))
}

fn val(v: &Option<cri::UInt64Value>) -> u64 {
    v.as_ref().map_or(0, |v| v.value)
}

fn nano_cores(s: &cri::ContainerStats) -> u64 {
    s.cpu.as_ref().map_or(0, |c| val(&c.usage_nano_cores))
}

fn working_set(s: &cri::ContainerStats) -> u64 {
    s.memory.as_ref().map_or(0, |m| val(&m.working_set_bytes))
}

/// Allocates `mib` MiB of anonymous memory (busybox tail buffers a line-less stream)
/// once `/trigger/<name>` exists; with `hold` it keeps it, else the script ends when
/// the allocation does (so an OOM kill ends the container).
fn alloc_script(name: &str, mib: u32, hold: bool) -> String {
    let keep = if hold { "; exec sleep 100000" } else { "" };
    format!(
        "until [ -e /trigger/{name} ]; do sleep 0.05; done; \
         (busybox head -c {mib}m /dev/zero{keep}) | busybox tail >/dev/null"
    )
}

fn with_trigger(mut cfg: cri::ContainerConfig, dir: &Path) -> cri::ContainerConfig {
    cfg.mounts = vec![cri::Mount {
        container_path: "/trigger".into(),
        host_path: dir.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    cfg
}

fn with_memory_limit(mut cfg: cri::ContainerConfig, bytes: i64) -> cri::ContainerConfig {
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: bytes,
            ..Default::default()
        }),
        ..Default::default()
    });
    cfg
}

fn container_and_pod_stats_and_metrics() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("stats"));
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let trigger = b.dir().join("trigger");
        std::fs::create_dir_all(&trigger)?;
        let pod_cfg = container_pod("stats", "st-1", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let img = &w.busybox.reference;
        let burn = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            container_config("burn", img, "while :; do :; done"),
        )
        .await?;
        let idle = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            container_config("idle", img, "exec sleep 100000"),
        )
        .await?;
        let mem = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            with_trigger(
                container_config("mem", img, &alloc_script("mem", 48, true)),
                &trigger,
            ),
        )
        .await?;
        let created = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            container_config("never", img, "true"),
        )
        .await?;
        for id in [&burn, &idle, &mem] {
            c.runtime.start_container(start(id)).await?;
        }

        // Only running containers are listed; each carries its attributes.
        let first = list_ctr_stats(&mut c, Default::default()).await?;
        ensure!(
            stats_of(&first, &created).is_err(),
            "a created container has no live stats"
        );
        let s = stats_of(&first, &burn)?;
        let a = s.attributes.as_ref().context("attributes")?;
        ensure!(
            a.metadata.as_ref().is_some_and(|m| m.name == "burn"),
            "{a:?}"
        );
        ensure!(a.labels.get("c").map(String::as_str) == Some("burn"));
        let burn_cpu0 = val(&s.cpu.as_ref().context("cpu")?.usage_core_nano_seconds);
        tokio::time::sleep(Duration::from_millis(2000)).await;
        let second = list_ctr_stats(&mut c, Default::default()).await?;
        let (b2, i2) = (stats_of(&second, &burn)?, stats_of(&second, &idle)?);
        let burn_cpu1 = val(&b2.cpu.as_ref().context("cpu")?.usage_core_nano_seconds);
        ensure!(
            burn_cpu1 >= burn_cpu0 + 800_000_000,
            "a busy loop used {} ns of CPU in 2 s",
            burn_cpu1 - burn_cpu0
        );
        ensure!(
            (500_000_000..=1_300_000_000).contains(&nano_cores(b2)),
            "busy loop: usage_nano_cores {} should be near one core",
            nano_cores(b2)
        );
        ensure!(
            nano_cores(i2) < 50_000_000,
            "idle: usage_nano_cores {}",
            nano_cores(i2)
        );
        ensure!(b2.cpu.as_ref().is_some_and(|c| c.timestamp > 0));

        // Memory follows an allocation of 48 MiB.
        let ws0 = working_set(stats_of(&second, &mem)?);
        ensure!(ws0 < 16 << 20, "before allocating: working set {ws0}");
        std::fs::write(trigger.join("mem"), "")?;
        // The working set and the RSS each reach the allocation, not necessarily in the
        // same sample (the working set also counts the pipe's and the page cache's pages).
        let (mut after, mut last) = (None, None);
        for _ in 0..200 {
            let s = c
                .runtime
                .container_stats(cri::ContainerStatsRequest {
                    container_id: mem.clone(),
                })
                .await?
                .into_inner()
                .stats
                .context("stats")?;
            let rss = s.memory.as_ref().map_or(0, |m| val(&m.rss_bytes));
            if working_set(&s) >= ws0 + (44 << 20) && rss >= 44 << 20 {
                after = Some(s);
                break;
            }
            last = s.memory;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let after = after.with_context(|| {
            format!("working set never grew by 44 MiB with an RSS of 44 MiB: last {last:?}")
        })?;
        let m = after.memory.as_ref().context("memory")?;
        ensure!(val(&m.usage_bytes) >= val(&m.working_set_bytes), "{m:?}");
        ensure!(
            val(&m.page_faults) > 10_000 / 4,
            "page faults {}",
            val(&m.page_faults)
        );
        ensure!(
            val(&m.available_bytes) == 0,
            "no limit, so nothing is 'available': {m:?}"
        );

        // The writable layer counts what the container writes.
        let (code, _, err) = exec_in(
            &mut c,
            &idle,
            &[
                "busybox",
                "dd",
                "if=/dev/zero",
                "of=/blob",
                "bs=1M",
                "count=6",
            ],
        )
        .await?;
        ensure!(code == 0, "dd: {err}");
        let s = c
            .runtime
            .container_stats(cri::ContainerStatsRequest {
                container_id: idle.clone(),
            })
            .await?
            .into_inner()
            .stats
            .context("stats")?;
        let wl = s.writable_layer.as_ref().context("writable layer")?;
        ensure!(val(&wl.used_bytes) >= 6 << 20, "{wl:?}");
        ensure!(val(&wl.inodes_used) >= 2, "{wl:?}");

        // Filters: id prefix, pod, labels; bad ids.
        let by_id = list_ctr_stats(
            &mut c,
            cri::ContainerStatsFilter {
                id: burn[..12].into(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(by_id.len() == 1 && stats_of(&by_id, &burn).is_ok());
        let by_pod = list_ctr_stats(
            &mut c,
            cri::ContainerStatsFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(by_pod.len() == 3, "{} in the pod", by_pod.len());
        let by_label = list_ctr_stats(
            &mut c,
            cri::ContainerStatsFilter {
                label_selector: [("c".to_string(), "idle".to_string())].into(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(by_label.len() == 1 && stats_of(&by_label, &idle).is_ok());
        expect_code(
            c.runtime
                .container_stats(cri::ContainerStatsRequest {
                    container_id: "0".repeat(64),
                })
                .await,
            Code::NotFound,
            "",
        )?;
        expect_code(
            c.runtime
                .container_stats(cri::ContainerStatsRequest {
                    container_id: "../x".into(),
                })
                .await,
            Code::InvalidArgument,
            "container_id",
        )?;

        // Pod stats: its cgroup holds every container, plus the infra process.
        let (ps, _) = pod_status(&mut c, &pod).await?;
        let ip = ps
            .network
            .as_ref()
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        ensure!(!ip.is_empty(), "pod has an IP");
        // Traffic to the pod: a refused TCP connection is a packet each way.
        let _ = std::net::TcpStream::connect_timeout(
            &format!("{ip}:1").parse()?,
            Duration::from_secs(2),
        );
        let cs = list_ctr_stats(
            &mut c,
            cri::ContainerStatsFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            },
        )
        .await?;
        let p = c
            .runtime
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await?
            .into_inner()
            .stats
            .context("pod stats")?;
        ensure!(
            p.attributes
                .as_ref()
                .is_some_and(|a| a.id == pod && a.labels.get("app").is_some())
        );
        let l = p.linux.as_ref().context("linux")?;
        ensure!(
            l.containers.len() == 3,
            "{} container stats in the pod",
            l.containers.len()
        );
        let sum = |f: &dyn Fn(&cri::ContainerStats) -> u64| cs.iter().map(f).sum::<u64>();
        let pod_cpu = val(&l.cpu.as_ref().context("pod cpu")?.usage_core_nano_seconds);
        let ctr_cpu = sum(&|s| val(&s.cpu.as_ref().map(|c| c.usage_core_nano_seconds).flatten()));
        ensure!(
            pod_cpu >= ctr_cpu,
            "pod cpu {pod_cpu} < containers' {ctr_cpu}"
        );
        ensure!(
            pod_cpu < ctr_cpu + 2_000_000_000,
            "pod cpu {pod_cpu} far above containers' {ctr_cpu}"
        );
        let pod_mem = val(&l.memory.as_ref().context("pod memory")?.usage_bytes);
        let ctr_mem = sum(&|s| val(&s.memory.as_ref().map(|m| m.usage_bytes).flatten()));
        ensure!(
            pod_mem >= ctr_mem && pod_mem < ctr_mem + (16 << 20),
            "pod memory {pod_mem} vs containers' {ctr_mem}"
        );
        let procs = val(&l.process.as_ref().context("process")?.process_count);
        ensure!(
            procs >= 6,
            "{procs} processes (infra, burn, idle, mem's sh+head/sleep+tail)"
        );
        let net = l.network.as_ref().context("network")?;
        let eth0 = net.default_interface.as_ref().context("eth0")?;
        ensure!(
            eth0.name == "eth0" && val(&eth0.rx_bytes) > 0 && val(&eth0.tx_bytes) > 0,
            "{eth0:?}"
        );
        let listed = c
            .runtime
            .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
                filter: Some(cri::PodSandboxStatsFilter {
                    label_selector: [("app".to_string(), "ctr-st-1".to_string())].into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .stats;
        ensure!(
            listed.len() == 1 && listed[0].attributes.as_ref().is_some_and(|a| a.id == pod),
            "{}",
            listed.len()
        );
        expect_code(
            c.runtime
                .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                    pod_sandbox_id: "f".repeat(64),
                })
                .await,
            Code::NotFound,
            "",
        )?;

        // Metrics: cAdvisor names, [id, name] labels, values matching the stats.
        let descs = c
            .runtime
            .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
            .await?
            .into_inner()
            .descriptors;
        for want in [
            "container_cpu_usage_seconds_total",
            "container_memory_working_set_bytes",
            "container_memory_rss",
            "container_network_receive_bytes_total",
        ] {
            ensure!(descs.iter().any(|d| d.name == want), "no descriptor {want}");
        }
        // The burner's CPU seconds reach 2 (soon, unless the machine is loaded).
        let mut pm = Vec::new();
        for _ in 0..300 {
            pm = c
                .runtime
                .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
                .await?
                .into_inner()
                .pod_metrics;
            let burn_seconds = pm
                .iter()
                .flat_map(|p| p.container_metrics.iter())
                .filter(|m| m.container_id == burn)
                .flat_map(|m| m.metrics.iter())
                .find(|m| m.name == "container_cpu_usage_seconds_total")
                .map_or(0, |m| val(&m.value));
            if burn_seconds >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ours = pm
            .iter()
            .find(|p| p.pod_sandbox_id == pod)
            .context("our pod's metrics")?;
        let rx = ours
            .metrics
            .iter()
            .find(|m| {
                m.name == "container_network_receive_bytes_total"
                    && m.label_values.last().map(String::as_str) == Some("eth0")
            })
            .context("eth0 receive metric")?;
        ensure!(val(&rx.value) > 0 && rx.label_values[0] == pod);
        let bm = ours
            .container_metrics
            .iter()
            .find(|m| m.container_id == burn)
            .context("burn metrics")?;
        let cpu = bm
            .metrics
            .iter()
            .find(|m| m.name == "container_cpu_usage_seconds_total")
            .context("cpu metric")?;
        ensure!(
            cpu.label_values == [burn.clone(), "burn".to_string()],
            "{:?}",
            cpu.label_values
        );
        ensure!(
            val(&cpu.value) >= 2 && cpu.metric_type == cri::MetricType::Counter as i32,
            "{cpu:?}"
        );
        let names: BTreeSet<&str> = descs.iter().map(|d| d.name.as_str()).collect();
        for m in ours
            .metrics
            .iter()
            .chain(ours.container_metrics.iter().flat_map(|c| c.metrics.iter()))
        {
            ensure!(
                names.contains(m.name.as_str()),
                "{} has no descriptor",
                m.name
            );
        }

        stop_pod(&mut c, &pod).await?;
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "stats")?;
        Ok(())
    })
}

fn oom_kills_and_resource_updates() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("oom"));
        let mut b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let trigger = b.dir().join("trigger");
        std::fs::create_dir_all(&trigger)?;
        let pod_cfg = container_pod("oom", "oom-1", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let img = &w.busybox.reference;
        let limit = 32 << 20;
        let ctr = |name: &str, mib: u32, hold: bool| {
            with_memory_limit(
                with_trigger(
                    container_config(name, img, &alloc_script(name, mib, hold)),
                    &trigger,
                ),
                limit,
            )
        };

        // Over its 32 MiB limit: OOMKilled, 137.
        let hog = create_ctr(&mut c, &pod, &pod_cfg, ctr("hog", 64, false)).await?;
        c.runtime.start_container(start(&hog)).await?;
        std::fs::write(trigger.join("hog"), "")?;
        let st = wait_exited(&mut c, &hog).await?;
        ensure!(
            st.exit_code == 137 && st.reason == "OOMKilled",
            "{} {:?}: {}",
            st.exit_code,
            st.reason,
            st.message
        );

        // Raising a running container's limit lets it allocate what it could not.
        let grow = create_ctr(&mut c, &pod, &pod_cfg, ctr("grow", 48, true)).await?;
        c.runtime.start_container(start(&grow)).await?;
        let new = cri::LinuxContainerResources {
            memory_limit_in_bytes: 128 << 20,
            cpu_shares: 512,
            ..Default::default()
        };
        c.runtime
            .update_container_resources(cri::UpdateContainerResourcesRequest {
                container_id: grow.clone(),
                linux: Some(new.clone()),
                ..Default::default()
            })
            .await?;
        let (st, info) = ctr_status(&mut c, &grow).await?;
        let r = st
            .resources
            .as_ref()
            .and_then(|r| r.linux.as_ref())
            .context("status resources")?;
        ensure!(
            r.memory_limit_in_bytes == 128 << 20 && r.cpu_shares == 512,
            "{r:?}"
        );
        let _ = info;
        let s = c
            .runtime
            .container_stats(cri::ContainerStatsRequest {
                container_id: grow.clone(),
            })
            .await?
            .into_inner()
            .stats
            .context("stats")?;
        let m = s.memory.as_ref().context("memory")?;
        let avail = val(&m.available_bytes);
        ensure!(
            avail > 100 << 20 && avail <= 128 << 20,
            "available {avail} under the new 128 MiB limit"
        );
        std::fs::write(trigger.join("grow"), "")?;
        let mut grown = false;
        for _ in 0..200 {
            let s = c
                .runtime
                .container_stats(cri::ContainerStatsRequest {
                    container_id: grow.clone(),
                })
                .await?
                .into_inner()
                .stats
                .context("stats")?;
            if working_set(&s) >= 44 << 20 {
                grown = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (st, _) = ctr_status(&mut c, &grow).await?;
        ensure!(
            grown && st.state == cri::ContainerState::ContainerRunning as i32,
            "grew {grown}, {:?} {}",
            st.reason,
            st.exit_code
        );

        // Bad values, gone and exited containers.
        let upd =
            |id: &str, r: cri::LinuxContainerResources| cri::UpdateContainerResourcesRequest {
                container_id: id.into(),
                linux: Some(r),
                ..Default::default()
            };
        expect_code(
            c.runtime
                .update_container_resources(upd(
                    &grow,
                    cri::LinuxContainerResources {
                        cpu_period: 10,
                        ..Default::default()
                    },
                ))
                .await,
            Code::InvalidArgument,
            "linux.cpu_period",
        )?;
        expect_code(
            c.runtime
                .update_container_resources(upd(
                    &grow,
                    cri::LinuxContainerResources {
                        cpuset_cpus: "0-".into(),
                        ..Default::default()
                    },
                ))
                .await,
            Code::InvalidArgument,
            "linux.cpuset_cpus",
        )?;
        expect_code(
            c.runtime
                .update_container_resources(upd(&hog, new.clone()))
                .await,
            Code::FailedPrecondition,
            "exited",
        )?;
        expect_code(
            c.runtime
                .update_container_resources(upd(&"a".repeat(64), new.clone()))
                .await,
            Code::NotFound,
            "",
        )?;
        let (st, _) = ctr_status(&mut c, &grow).await?;
        ensure!(
            st.resources
                .and_then(|r| r.linux)
                .is_some_and(|r| r.memory_limit_in_bytes == 128 << 20),
            "a refused update changed nothing"
        );

        // OOM while berthd is down, and after it restarted: both reported.
        let down = create_ctr(&mut c, &pod, &pod_cfg, ctr("down", 64, false)).await?;
        let later = create_ctr(&mut c, &pod, &pod_cfg, ctr("later", 64, false)).await?;
        c.runtime.start_container(start(&down)).await?;
        c.runtime.start_container(start(&later)).await?;
        drop(c);
        b.kill9()?;
        std::fs::write(trigger.join("down"), "")?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        b.restart()?;
        let mut c = b.client().await?;
        let st = wait_exited(&mut c, &down).await?;
        ensure!(
            st.exit_code == 137 && st.reason == "OOMKilled",
            "OOM while down: {} {:?}",
            st.exit_code,
            st.reason
        );
        let (st, _) = ctr_status(&mut c, &later).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "later still runs"
        );
        std::fs::write(trigger.join("later"), "")?;
        let st = wait_exited(&mut c, &later).await?;
        ensure!(
            st.exit_code == 137 && st.reason == "OOMKilled",
            "OOM after restart: {} {:?}",
            st.exit_code,
            st.reason
        );

        stop_pod(&mut c, &pod).await?;
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "oom")?;
        Ok(())
    })
}

// -------------------------------------------------------------- streaming ----

/// Runs berthctl against `b`; returns (exit code, stdout, stderr).
fn berthctl(b: &Berthd, args: &[&str], stdin: &[u8]) -> Result<(i32, String, String)> {
    use std::io::Write;
    let mut child = Command::new(berth_e2e::berthd::built_binary("berthctl")?)
        .arg("--socket")
        .arg(&b.socket)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin)?;
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Kills a child by pid and reaps it.
struct ChildGuard(std::process::Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `berthctl port-forward` and returns it with the local address it printed.
async fn berthctl_port_forward(
    b: &Berthd,
    pod: &str,
    transport: &str,
    ports: &str,
) -> Result<(ChildGuard, String)> {
    let mut pf = ChildGuard(
        Command::new(berth_e2e::berthd::built_binary("berthctl")?)
            .arg("--socket")
            .arg(&b.socket)
            .args(["port-forward", "--transport", transport, pod, ports])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let out = pf.0.stdout.take().context("stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(out).lines().next()
    })
    .await?
    .context("no output")??;
    let local = line
        .strip_prefix("Forwarding from ")
        .and_then(|r| r.split(" -> ").next())
        .context("forwarding line")?
        .to_string();
    Ok((pf, local))
}

fn exec_sync_out(
    c: &mut CriClient,
    id: &str,
    script: &str,
) -> impl Future<Output = Result<String>> {
    let mut c = c.clone();
    let (id, script) = (id.to_string(), script.to_string());
    async move {
        let (code, out, err) = exec_in(&mut c, &id, &["/bin/sh", "-c", &script]).await?;
        ensure!(code == 0, "{script}: {code} {err}");
        Ok(out)
    }
}

fn streaming_exec_attach_port_forward() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("stream"));
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("stream", "str-1", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let img = &w.busybox.reference;
        let web = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            container_config(
                "web",
                img,
                "mkdir -p /www && echo hello from the pod > /www/index.html && exec busybox httpd -f -p 127.0.0.1:8080 -h /www",
            ),
        )
        .await?;
        let counter = create_ctr(
            &mut c,
            &pod,
            &pod_cfg,
            container_config(
                "counter",
                img,
                "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done",
            ),
        )
        .await?;
        for id in [&web, &counter] {
            c.runtime.start_container(start(id)).await?;
        }
        let bb = b.socket.clone();
        let _ = bb;

        // exec through berthctl: output, exit codes, stdin.
        let (code, out, err) = berthctl(
            &b,
            &["exec", &web[..12], "--", "busybox", "echo", "hi there"],
            b"",
        )?;
        ensure!(code == 0 && out == "hi there\n", "{code} {out:?} {err:?}");
        let (code, _, err) = berthctl(
            &b,
            &["exec", &web, "--", "sh", "-c", "echo oops >&2; exit 3"],
            b"",
        )?;
        ensure!(code == 3 && err == "oops\n", "{code} {err:?}");
        let (code, out, _) = berthctl(
            &b,
            &["exec", "-i", &web, "--", "busybox", "tr", "a-z", "A-Z"],
            b"shout\nlouder\n",
        )?;
        ensure!(
            code == 0 && out == "SHOUT\nLOUDER\n",
            "stdin reached the process and its EOF ended it: {code} {out:?}"
        );

        // The same over WebSocket (v5: stdin EOF is the close message).
        let ws = |args: &[&str]| -> Vec<String> {
            let mut v = vec!["exec".to_string(), "--transport".into(), "websocket".into()];
            v.extend(args.iter().map(|a| a.to_string()));
            v
        };
        let run_ws = |args: Vec<String>, input: &[u8]| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            berthctl(&b, &refs, input)
        };
        let (code, out, err) = run_ws(ws(&[&web, "--", "busybox", "echo", "over ws"]), b"")?;
        ensure!(code == 0 && out == "over ws\n", "{code} {out:?} {err:?}");
        let (code, _, err) = run_ws(ws(&[&web, "--", "sh", "-c", "echo oops >&2; exit 4"]), b"")?;
        ensure!(code == 4 && err == "oops\n", "{code} {err:?}");
        let (code, out, _) = run_ws(
            ws(&["-i", &web, "--", "busybox", "tr", "a-z", "A-Z"]),
            b"web socket\n",
        )?;
        ensure!(code == 0 && out == "WEB SOCKET\n", "{code} {out:?}");

        // A terminal that follows a resize (driven through the client library).
        let url = c
            .runtime
            .exec(cri::ExecRequest {
                container_id: web.clone(),
                cmd: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "sleep 0.5; busybox stty size".into(),
                ],
                tty: true,
                stdin: false,
                stdout: true,
                stderr: false,
            })
            .await?
            .into_inner()
            .url;
        let (sizes_tx, sizes_rx) = tokio::sync::mpsc::channel(2);
        sizes_tx
            .send(berth_stream::TermSize {
                width: 123,
                height: 45,
            })
            .await?;
        let (mut out_r, out_w) = tokio::io::duplex(1 << 16);
        let none: Option<&[u8]> = None;
        let code = berth_stream::client::run_command(
            &url,
            berth_stream::client::CommandIo {
                stdin: none,
                stdout: Some(out_w),
                stderr: None::<tokio::io::Sink>,
                tty: true,
                resize: Some(sizes_rx),
            },
        )
        .await?;
        let mut tty_out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut out_r, &mut tty_out).await?;
        ensure!(
            code == 0 && tty_out.trim() == "45 123",
            "stty size saw {tty_out:?} ({code})"
        );

        // CRI validation.
        let bad = |tty, stdin, stdout, stderr| cri::ExecRequest {
            container_id: web.clone(),
            cmd: vec!["busybox".into(), "true".into()],
            tty,
            stdin,
            stdout,
            stderr,
        };
        expect_code(
            c.runtime.exec(bad(true, false, true, true)).await,
            Code::InvalidArgument,
            "tty and stderr cannot both be true",
        )?;
        expect_code(
            c.runtime.exec(bad(false, false, false, false)).await,
            Code::InvalidArgument,
            "one of stdin, stdout, or stderr must be set",
        )?;
        expect_code(
            c.runtime
                .exec(cri::ExecRequest {
                    container_id: "0".repeat(64),
                    cmd: vec!["true".into()],
                    stdout: true,
                    ..Default::default()
                })
                .await,
            Code::NotFound,
            "",
        )?;

        // Tokens: unknown, reused.
        let url = c
            .runtime
            .exec(bad(false, false, true, false))
            .await?
            .into_inner()
            .url;
        let first = berth_stream::client::run_command(
            &url,
            berth_stream::client::CommandIo {
                stdin: none,
                stdout: Some(tokio::io::sink()),
                stderr: None::<tokio::io::Sink>,
                tty: false,
                resize: None,
            },
        )
        .await;
        ensure!(matches!(first, Ok(0)), "{first:?}");
        let again = berth_stream::client::run_command(
            &url,
            berth_stream::client::CommandIo {
                stdin: none,
                stdout: Some(tokio::io::sink()),
                stderr: None::<tokio::io::Sink>,
                tty: false,
                resize: None,
            },
        )
        .await;
        ensure!(
            matches!(
                again,
                Err(berth_stream::client::ClientError::Upgrade { status: 404, .. })
            ),
            "reused token: {again:?}"
        );
        let base = url.rsplitn(3, '/').nth(2).context("url base")?.to_string();
        let unknown = berth_stream::client::run_command(
            &format!("{base}/exec/AAAAAAAA"),
            berth_stream::client::CommandIo {
                stdin: none,
                stdout: Some(tokio::io::sink()),
                stderr: None::<tokio::io::Sink>,
                tty: false,
                resize: None,
            },
        )
        .await;
        ensure!(
            matches!(
                unknown,
                Err(berth_stream::client::ClientError::Upgrade { status: 404, .. })
            ),
            "{unknown:?}"
        );
        ensure!(
            base.starts_with("http://127.0.0.1:"),
            "loopback by default: {base}"
        );

        // Two attachers see the counter.
        let attach = |b: &Berthd| -> Result<ChildGuard> {
            Ok(ChildGuard(
                Command::new(berth_e2e::berthd::built_binary("berthctl")?)
                    .arg("--socket")
                    .arg(&b.socket)
                    .args(["attach", &counter])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null())
                    .spawn()?,
            ))
        };
        let (mut a1, mut a2) = (attach(&b)?, attach(&b)?);
        let read_ticks = |g: &mut ChildGuard| -> Result<Vec<u64>> {
            use std::io::BufRead;
            let out = g.0.stdout.take().context("stdout")?;
            let mut lines = std::io::BufReader::new(out).lines();
            let mut v = Vec::new();
            while v.len() < 4 {
                let l = lines.next().context("attach output ended")??;
                v.push(l.strip_prefix("tick ").context("tick line")?.parse()?);
            }
            Ok(v)
        };
        let (t1, t2) = tokio::task::spawn_blocking(move || -> Result<_> {
            Ok((read_ticks(&mut a1)?, read_ticks(&mut a2)?))
        })
        .await??;
        for t in [&t1, &t2] {
            ensure!(
                t.windows(2).all(|w| w[1] == w[0] + 1),
                "consecutive ticks: {t:?}"
            );
        }

        // stdin_once: the first attacher's EOF closes the container's stdin.
        let mut once_cfg = container_config("once", img, "busybox cat; echo done");
        once_cfg.stdin = true;
        once_cfg.stdin_once = true;
        let once = create_ctr(&mut c, &pod, &pod_cfg, once_cfg).await?;
        c.runtime.start_container(start(&once)).await?;
        let (code, out, err) = berthctl(&b, &["attach", "-i", &once], b"to cat\n")?;
        ensure!(
            code == 0 && out == "to cat\ndone\n",
            "attach: {code} {out:?} {err:?}"
        );
        let st = wait_exited(&mut c, &once).await?;
        ensure!(
            st.exit_code == 0,
            "cat saw EOF and the container ended: {st:?}"
        );

        // Port-forward to the pod's loopback: 10 requests at once, over both transports.
        for transport in ["spdy", "websocket"] {
            let (_pf, local) = berthctl_port_forward(&b, &pod, transport, "0:8080").await?;
            let gets: Vec<_> = (0..10)
                .map(|_| {
                    let a = local.clone();
                    tokio::task::spawn_blocking(move || http_get(&a))
                })
                .collect();
            for g in gets {
                let body = g.await??;
                ensure!(body == "hello from the pod\n", "{transport}: {body:?}");
            }
        }

        // A client that disconnects mid-exec leaves no process behind.
        let mut gone = ChildGuard(
            Command::new(berth_e2e::berthd::built_binary("berthctl")?)
                .arg("--socket")
                .arg(&b.socket)
                .args(["exec", &web, "--", "busybox", "sleep", "4242"])
                .stdout(std::process::Stdio::null())
                .spawn()?,
        );
        let mut seen = false;
        for _ in 0..50 {
            if exec_sync_out(&mut c, &web, "busybox ps")
                .await?
                .contains("sleep 4242")
            {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(seen, "the exec'd sleep started");
        let _ = gone.0.kill();
        let _ = gone.0.wait();
        let mut left = true;
        for _ in 0..100 {
            if !exec_sync_out(&mut c, &web, "busybox ps")
                .await?
                .contains("sleep 4242")
            {
                left = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(!left, "the exec'd process outlived its client");

        stop_pod(&mut c, &pod).await?;
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "stream")?;
        Ok(())
    })
}

/// A client, a pod and a running container that sleeps, on `b`.
async fn sleeping_pod(
    b: &Berthd,
    w: &World,
    test: &str,
    uid: &str,
) -> Result<(CriClient, String, String)> {
    let mut c = b.client().await?;
    pull(&mut c, &w.busybox.reference).await?;
    let pod_cfg = container_pod(test, uid, &b.dir().join("logs"));
    let pod = run_pod(&mut c, pod_cfg.clone()).await?;
    let cfg = container_config("svc", &w.busybox.reference, "exec sleep 100000");
    let id = create_ctr(&mut c, &pod, &pod_cfg, cfg).await?;
    c.runtime.start_container(start(&id)).await?;
    Ok((c, pod, id))
}

fn streaming_over_tls() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("tls"));
        let pki = tempfile::tempdir()?;
        let sh = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(pki.path())
                .output()?;
            ensure!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        std::fs::write(pki.path().join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n")?;
        sh(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=berth e2e CA",
        ])?;
        sh(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=127.0.0.1",
        ])?;
        sh(&[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.crt",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ])?;
        let p = pki.path().display().to_string();
        let b = Berthd::start(&format!(
            "[stream]\ntls_cert = \"{p}/srv.crt\"\ntls_key = \"{p}/srv.key\"\n"
        ))?;
        let (mut c, pod, id) = sleeping_pod(&b, &w, "tls", "tls-1").await?;
        let url = c
            .runtime
            .exec(cri::ExecRequest {
                container_id: id.clone(),
                cmd: vec!["true".into()],
                stdout: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .url;
        ensure!(url.starts_with("https://127.0.0.1:"), "{url}");
        let ca = format!("{p}/ca.crt");
        let (code, out, err) = berthctl(
            &b,
            &[
                "--stream-ca",
                &ca,
                "exec",
                &id,
                "--",
                "busybox",
                "echo",
                "over tls",
            ],
            b"",
        )?;
        ensure!(code == 0 && out == "over tls\n", "{code} {out:?} {err:?}");
        let (code, out, err) = berthctl(
            &b,
            &[
                "--stream-ca",
                &ca,
                "exec",
                "--transport",
                "websocket",
                &id,
                "--",
                "busybox",
                "echo",
                "wss",
            ],
            b"",
        )?;
        ensure!(code == 0 && out == "wss\n", "{code} {out:?} {err:?}");
        let (code, _, err) = berthctl(&b, &["exec", &id, "--", "busybox", "true"], b"")?;
        ensure!(
            code != 0 && err.contains("--stream-ca"),
            "without the CA: {code} {err:?}"
        );
        stop_pod(&mut c, &pod).await?;
        remove_pod(&mut c, &pod).await?;
        Ok(())
    })
}

/// Raw SPDY against berthd's real streaming server: the upgrade, hand-built
/// SYN_STREAM frames (header block compressed with flate2 and the SPDY/3
/// dictionary, not berth's encoder), and the reply bytes as the spec lays them out.
fn streaming_raw_spdy_frames() -> Result<(), Failed> {
    run(|| async {
        use std::io::{Read, Write};
        let w = world();
        let _cg = CgroupParentGuard(Some("raw"));
        let b = Berthd::start("")?;
        let (mut c, pod, id) = sleeping_pod(&b, &w, "raw", "raw-1").await?;
        let url = c
            .runtime
            .exec(cri::ExecRequest {
                container_id: id.clone(),
                cmd: vec!["/bin/sh".into(), "-c".into(), "echo hi; exit 3".into()],
                stdout: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .url;
        let frames = tokio::task::spawn_blocking(move || -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            let rest = url.strip_prefix("http://").context("http url")?;
            let (host, path) = rest.split_at(rest.find('/').context("path")?);
            let mut tcp = std::net::TcpStream::connect(host)?;
            tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
            write!(tcp, "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n")?;
            let mut head = Vec::new();
            let mut one = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                ensure!(tcp.read(&mut one)? == 1, "connection closed in the response head");
                head.push(one[0]);
            }
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            ensure!(head.starts_with("http/1.1 101") && head.contains("x-stream-protocol-version: v4.channel.k8s.io"), "{head}");
            let dict = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../stream/src/spdy/dictionary.bin"))?;
            let mut z = flate2::Compress::new(flate2::Compression::default(), true);
            z.set_dictionary(&dict)?;
            let mut frames = Vec::new();
            for (sid, kind) in [(1u32, "error"), (3, "stdout")] {
                let mut raw = vec![0, 0, 0, 1, 0, 0, 0, 10];
                raw.extend(b"streamtype");
                raw.extend((kind.len() as u32).to_be_bytes());
                raw.extend(kind.as_bytes());
                let mut block = Vec::with_capacity(256);
                z.compress_vec(&raw, &mut block, flate2::FlushCompress::Sync)?;
                let mut f = vec![0x80, 0x03, 0x00, 0x01, 0x00];
                f.extend(&((10 + block.len()) as u32).to_be_bytes()[1..]);
                f.extend(sid.to_be_bytes());
                f.extend([0, 0, 0, 0, 0, 0]);
                f.extend(block);
                tcp.write_all(&f)?;
            }
            // Frames until the error stream's FIN, then hang up and read the rest.
            let read_frame = |tcp: &mut std::net::TcpStream| -> Result<(Vec<u8>, Vec<u8>)> {
                let mut h = vec![0u8; 8];
                tcp.read_exact(&mut h)?;
                let mut p = vec![0u8; u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize];
                tcp.read_exact(&mut p)?;
                Ok((h, p))
            };
            loop {
                let f = read_frame(&mut tcp)?;
                let done = f.0[..4] == [0, 0, 0, 1] && f.0[4] & 1 == 1;
                frames.push(f);
                if done {
                    break;
                }
            }
            tcp.shutdown(std::net::Shutdown::Write)?;
            while let Ok(f) = read_frame(&mut tcp) {
                frames.push(f);
            }
            Ok(frames)
        })
        .await??;
        // SYN_REPLY for 1 then 3: control bit, version 3, type 2, no flags; the first
        // header block opens the zlib stream with the dictionary id.
        let replies: Vec<_> = frames
            .iter()
            .filter(|(h, _)| h[..4] == [0x80, 0x03, 0x00, 0x02])
            .collect();
        ensure!(replies.len() == 2, "two SYN_REPLYs: {frames:?}");
        ensure!(
            replies[0].0[4] == 0 && replies[0].1[..4] == [0, 0, 0, 1],
            "{:?}",
            replies[0]
        );
        ensure!(
            replies[0].1[4..10] == [0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2],
            "{:?}",
            replies[0]
        );
        ensure!(replies[1].1[..4] == [0, 0, 0, 3], "{:?}", replies[1]);
        let data = |sid: u32| -> (Vec<u8>, bool) {
            let mut v = Vec::new();
            let mut fin = false;
            for (h, p) in &frames {
                if h[0] & 0x80 == 0 && h[..4] == sid.to_be_bytes() {
                    v.extend(p);
                    fin |= h[4] == 1;
                }
            }
            (v, fin)
        };
        ensure!(data(3) == (b"hi\n".to_vec(), true), "stdout: {:?}", data(3));
        let (status, fin) = data(1);
        let want = br#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [/bin/sh -c echo hi; exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        ensure!(
            fin && status == want.to_vec(),
            "status: {}",
            String::from_utf8_lossy(&status)
        );
        let (gh, gp) = frames.last().context("frames")?;
        ensure!(
            gh[..8] == [0x80, 0x03, 0x00, 0x07, 0, 0, 0, 8] && gp[..] == [0, 0, 0, 3, 0, 0, 0, 0],
            "GOAWAY(last=3, OK): {gh:?} {gp:?}"
        );
        stop_pod(&mut c, &pod).await?;
        remove_pod(&mut c, &pod).await?;
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let args = Arguments::from_args();
    let tests = vec![
        Trial::test("runtime_identity_and_status", runtime_identity_and_status),
        Trial::test(
            "socket_lifecycle_and_config_errors",
            socket_lifecycle_and_config_errors,
        ),
        Trial::test(
            "pull_status_list_single_layer",
            pull_status_list_single_layer,
        ),
        Trial::test(
            "docker_hub_names_go_through_mirrors",
            docker_hub_names_go_through_mirrors,
        ),
        Trial::test(
            "layers_whiteouts_and_file_metadata",
            layers_whiteouts_and_file_metadata,
        ),
        Trial::test(
            "index_zstd_and_docker_config_images",
            index_zstd_and_docker_config_images,
        ),
        Trial::test("large_image_pull", large_image_pull),
        Trial::test(
            "remove_by_any_name_frees_only_unshared_data",
            remove_by_any_name_frees_only_unshared_data,
        ),
        Trial::test("bad_input_gets_clear_errors", bad_input_gets_clear_errors),
        Trial::test("registry_authentication", registry_authentication),
        Trial::test("registry_bearer_token_flow", registry_bearer_token_flow),
        Trial::test(
            "credentials_only_go_to_their_server_address",
            credentials_only_go_to_their_server_address,
        ),
        Trial::test(
            "corrupt_blob_is_refused_and_nothing_kept",
            corrupt_blob_is_refused_and_nothing_kept,
        ),
        Trial::test(
            "path_traversal_layers_are_refused",
            path_traversal_layers_are_refused,
        ),
        Trial::test(
            "concurrent_pulls_download_once",
            concurrent_pulls_download_once,
        ),
        Trial::test("kill9_restart_keeps_images", kill9_restart_keeps_images),
        Trial::test("pod_sandbox_lifecycle", pod_sandbox_lifecycle),
        Trial::test("pod_sandbox_bad_input", pod_sandbox_bad_input),
        Trial::test(
            "pods_survive_berthd_kill9_and_shim_death",
            pods_survive_berthd_kill9_and_shim_death,
        ),
        Trial::test("host_network_pod", host_network_pod),
        Trial::test(
            "shim_kill9_kills_and_reports_its_containers",
            shim_kill9_kills_and_reports_its_containers,
        ),
        Trial::test(
            "exec_sync_in_a_running_container",
            exec_sync_in_a_running_container,
        ),
        Trial::test("container_lifecycle_and_logs", container_lifecycle_and_logs),
        Trial::test(
            "container_bad_input_leaves_nothing",
            container_bad_input_leaves_nothing,
        ),
        Trial::test(
            "containers_survive_berthd_kill9",
            containers_survive_berthd_kill9,
        ),
        Trial::test("tty_and_stdin_containers", tty_and_stdin_containers),
        Trial::test("crun_runtime_handler", crun_runtime_handler),
        Trial::test("pod_networking_with_cni", pod_networking_with_cni),
        Trial::test("broken_cni_config", broken_cni_config),
        Trial::test(
            "container_and_pod_stats_and_metrics",
            container_and_pod_stats_and_metrics,
        ),
        Trial::test(
            "oom_kills_and_resource_updates",
            oom_kills_and_resource_updates,
        ),
        Trial::test(
            "streaming_exec_attach_port_forward",
            streaming_exec_attach_port_forward,
        ),
        Trial::test("streaming_over_tls", streaming_over_tls),
        Trial::test("streaming_raw_spdy_frames", streaming_raw_spdy_frames),
        Trial::test(
            "grpc_go_client_over_the_socket_path",
            interop::grpc_go_client_over_the_socket_path,
        ),
        Trial::test("grpcio_python_client", interop::grpcio_python_client),
        Trial::test("raw_http2_authorities", interop::raw_http2_authorities),
        Trial::test(
            "exec_sync_ends_with_its_caller",
            limits::exec_sync_ends_with_its_caller,
        ),
        Trial::test(
            "requests_are_bounded_and_checked",
            limits::requests_are_bounded_and_checked,
        ),
        Trial::test(
            "failed_start_is_explained",
            limits::failed_start_is_explained,
        ),
        Trial::test(
            "kill9_at_failpoints_during_churn",
            fault::kill9_at_failpoints_during_churn,
        ),
        Trial::test(
            "soak_cycles_leave_nothing",
            fault::soak_cycles_leave_nothing,
        ),
        Trial::test(
            "prometheus_endpoint_serves_metrics",
            prometheus::prometheus_endpoint_serves_metrics,
        ),
        Trial::test(
            "pods_start_while_empty_cgroups_are_trimmed",
            fault::pods_start_while_empty_cgroups_are_trimmed,
        ),
        Trial::test(
            "hung_cni_plugin_and_runtime_time_out",
            fault::hung_cni_plugin_and_runtime_time_out,
        ),
        Trial::test(
            "shim_death_mid_exec_attach_and_reopen",
            fault::shim_death_mid_exec_attach_and_reopen,
        ),
        Trial::test(
            "hostile_registry_pulls_leave_nothing",
            fault::hostile_registry_pulls_leave_nothing,
        ),
        Trial::test("full_disk_during_a_pull", fulldisk::full_disk_during_a_pull),
        Trial::test(
            "full_disk_during_log_writes",
            fulldisk::full_disk_during_log_writes,
        ),
        Trial::test(
            "http2_limits_on_the_cri_socket",
            interop::http2_limits_on_the_cri_socket,
        ),
        Trial::test("berthd_log_formats", interop::berthd_log_formats),
        Trial::test(
            "port_forward_tunneled_in_websocket",
            interop::port_forward_tunneled_in_websocket,
        ),
        Trial::test(
            "recursive_read_only_mounts_as_reported",
            interop::recursive_read_only_mounts_as_reported,
        ),
        Trial::test(
            "hostile_layers_and_manifests_are_refused",
            security::hostile_layers_and_manifests_are_refused,
        ),
        Trial::test(
            "state_is_private_to_root",
            security::state_is_private_to_root,
        ),
        Trial::test(
            "crash_mid_create_is_swept_at_restart",
            crash_mid_create_is_swept_at_restart,
        ),
        Trial::test(
            "crash_mid_pull_leaves_nothing_half_recorded",
            crash_mid_pull_leaves_nothing_half_recorded,
        ),
        Trial::test(
            "berth_runs_as_a_systemd_service",
            systemd::berth_runs_as_a_systemd_service,
        ),
        Trial::test(
            "streaming_floods_leave_berthd_small",
            security::streaming_floods_leave_berthd_small,
        ),
        Trial::test(
            "seccomp_profiles_filter_syscalls",
            confinement::seccomp_profiles_filter_syscalls,
        ),
        Trial::test(
            "privileged_and_all_capabilities",
            confinement::privileged_and_all_capabilities,
        ),
        Trial::test(
            "image_groups_reach_the_process",
            confinement::image_groups_reach_the_process,
        ),
        Trial::test(
            "mount_propagation_both_ways",
            confinement::mount_propagation_both_ways,
        ),
        Trial::test(
            "container_events_follow_a_pod_lifecycle",
            events::container_events_follow_a_pod_lifecycle,
        ),
        Trial::test(
            "berthctl_events_filters_and_pause",
            ctl::berthctl_events_filters_and_pause,
        ),
        Trial::test(
            "berthctl_check_pull_logs_and_stats",
            ctl::berthctl_check_pull_logs_and_stats,
        ),
    ];
    if !nix::unistd::geteuid().is_root() {
        // `cargo test` as a user runs every test that can run so; this suite cannot.
        eprintln!("skipped: the e2e suite needs root (mounts, device nodes, ownership)");
        return Ok(());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The registries are started from this (main) thread, which lives until the end.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let world = rt
        .block_on(build_world())
        .context("building the test registries and images")?;
    drop(rt);
    *WORLD.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(world));
    let cgroups = CgroupParentGuard(None);
    let iptables = berth_e2e::berthd::IptablesGuard::new();
    let conclusion = libtest_mimic::run(&args, tests);
    drop(WORLD.lock().unwrap_or_else(|p| p.into_inner()).take());
    // `exit` below skips destructors.
    drop(cgroups);
    drop(iptables);
    conclusion.exit()
}
