//! Plugin execution against scripted plugins (a fake at the exec boundary): the
//! environment and stdin a plugin gets, chaining, DEL order and prevResult, the error
//! object, stderr, the timeout, and STATUS/GC for CNI 1.1.0 configs. The real Debian
//! plugins are driven by the e2e suite.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use berth_network::{CniManager, CniSettings, NetError, PodNetwork};

/// A plugin that logs its command, env and stdin to `<dir>/calls`, then acts per `behaviour`.
fn plugin(dir: &Path, name: &str, behaviour: &str) {
    let script = format!(
        "#!/bin/sh\nin=$(cat)\nprintf '%s %s %s %s %s\\n' \"{name}\" \"$CNI_COMMAND\" \"$CNI_CONTAINERID\" \"$CNI_IFNAME\" \"$CNI_ARGS\" >> {calls}\nprintf '%s\\n' \"$in\" >> {calls}.stdin\n{behaviour}\n",
        calls = dir.join("calls").display()
    );
    let p = dir.join("bin").join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn manager(dir: &Path, conflist: &str) -> CniManager {
    std::fs::create_dir_all(dir.join("conf")).unwrap();
    std::fs::write(dir.join("conf/10-test.conflist"), conflist).unwrap();
    CniManager::new(CniSettings {
        conf_dir: dir.join("conf"),
        bin_dirs: vec![dir.join("nowhere"), dir.join("bin")],
        timeout: Duration::from_secs(2),
        allow_ips_annotation: false,
    })
}

fn pod() -> PodNetwork {
    PodNetwork {
        id: "a".repeat(64),
        netns: "/proc/self/ns/net".into(),
        name: "web".into(),
        namespace: "default".into(),
        uid: "u1".into(),
        ..Default::default()
    }
}

const RESULT: &str = r#"echo '{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"10.9.0.7/24","interface":0}]}'"#;

#[tokio::test]
async fn add_chains_results_and_del_runs_in_reverse_with_the_cached_result() {
    let d = tempfile::tempdir().unwrap();
    plugin(d.path(), "first", RESULT);
    // A chained plugin passes its prevResult on; it fails without one.
    plugin(
        d.path(),
        "second",
        &format!("echo \"$in\" | grep -q '\"prevResult\"' || exit 9\n{RESULT}"),
    );
    let m = manager(
        d.path(),
        r#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"first"},{"type":"second","capabilities":{"portMappings":true}}]}"#,
    );
    let cache = d.path().join("cache.json");
    let ips = m.setup(&pod(), &cache).await.unwrap();
    assert_eq!(ips, vec!["10.9.0.7".parse::<std::net::IpAddr>().unwrap()]);
    let cached: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    assert_eq!(cached["result"]["ips"][0]["address"], "10.9.0.7/24");
    let calls = std::fs::read_to_string(d.path().join("calls")).unwrap();
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID=u1",
        "a".repeat(64)
    );
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        [
            format!("first ADD {} eth0 {args}", "a".repeat(64)),
            format!("second ADD {} eth0 {args}", "a".repeat(64)),
        ]
    );
    std::fs::remove_file(d.path().join("calls")).unwrap();
    std::fs::remove_file(d.path().join("calls.stdin")).unwrap();
    // The config may change or break: DEL still uses what ADD used.
    std::fs::write(d.path().join("conf/10-test.conflist"), "{broken").unwrap();
    m.teardown(&cache).await.unwrap();
    let calls = std::fs::read_to_string(d.path().join("calls")).unwrap();
    let order: Vec<&str> = calls
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(order, ["second", "first"]);
    let stdin = std::fs::read_to_string(d.path().join("calls.stdin")).unwrap();
    for line in stdin.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            v["prevResult"]["ips"][0]["address"], "10.9.0.7/24",
            "{line}"
        );
        assert_eq!(v["name"], "t");
    }
    assert!(!cache.exists(), "cache kept after DEL");
    m.teardown(&cache).await.unwrap(); // idempotent
    assert!(matches!(m.status().await, Err(NetError::Conf(_))));
}

#[tokio::test]
async fn failed_add_is_undone_and_errors_carry_the_plugins_words() {
    let d = tempfile::tempdir().unwrap();
    plugin(d.path(), "ok", RESULT);
    plugin(
        d.path(),
        "bad",
        "[ \"$CNI_COMMAND\" = DEL ] && exit 0; echo 'about to fail' >&2; echo '{\"code\":11,\"msg\":\"no addresses left\",\"details\":\"range full\"}'; exit 1",
    );
    let m = manager(
        d.path(),
        r#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"ok"},{"type":"bad"}]}"#,
    );
    let cache = d.path().join("cache.json");
    let e = m.setup(&pod(), &cache).await.unwrap_err().to_string();
    assert!(
        e.contains("bad ADD failed (code 11): no addresses left: range full")
            && e.contains("about to fail"),
        "{e}"
    );
    let calls = std::fs::read_to_string(d.path().join("calls")).unwrap();
    let seq: Vec<String> = calls
        .lines()
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(seq, ["ok ADD", "bad ADD", "bad DEL", "ok DEL"]);
    assert!(!cache.exists());

    // A plugin that hangs is killed at the timeout.
    plugin(d.path(), "slow", "sleep 30");
    let m = manager(
        d.path(),
        r#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"slow"}]}"#,
    );
    let t0 = std::time::Instant::now();
    let e = m.setup(&pod(), &cache).await.unwrap_err().to_string();
    assert!(e.contains("did not finish within 2s"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));

    // A missing plugin is named, with the dirs searched.
    let m = manager(
        d.path(),
        r#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"absent"}]}"#,
    );
    let e = m.status().await.unwrap_err().to_string();
    assert!(e.contains("\"absent\"") && e.contains("nowhere"), "{e}");
}

#[tokio::test]
async fn status_and_gc_for_cni_1_1_configs() {
    let d = tempfile::tempdir().unwrap();
    plugin(
        d.path(),
        "p",
        "[ \"$CNI_COMMAND\" = STATUS ] && [ -e /nonexistent-berth-flag ] && exit 1; exit 0",
    );
    let m = manager(
        d.path(),
        r#"{"cniVersion":"1.1.0","name":"t","plugins":[{"type":"p"}]}"#,
    );
    m.status().await.unwrap();
    m.gc(&[("c1".into(), "eth0".into())]).await.unwrap();
    let calls = std::fs::read_to_string(d.path().join("calls")).unwrap();
    assert!(
        calls.contains("p STATUS") && calls.contains("p GC"),
        "{calls}"
    );
    let stdin = std::fs::read_to_string(d.path().join("calls.stdin")).unwrap();
    let gc: serde_json::Value = serde_json::from_str(stdin.lines().last().unwrap()).unwrap();
    assert_eq!(
        gc["cni.dev/valid-attachments"],
        serde_json::json!([{"containerID": "c1", "ifname": "eth0"}])
    );
    // STATUS failing makes the network not ready, with the plugin's message.
    plugin(
        d.path(),
        "p",
        "[ \"$CNI_COMMAND\" = STATUS ] && { echo '{\"code\":50,\"msg\":\"plugin not available\"}'; exit 1; }; exit 0",
    );
    let e = m.status().await.unwrap_err().to_string();
    assert!(e.contains("plugin not available"), "{e}");
    // 1.0.0 configs have no STATUS or GC.
    let m = manager(
        d.path(),
        r#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"p"}]}"#,
    );
    m.status().await.unwrap();
}
