//! The shipped unit (`deploy/berth.service`) passes `systemd-analyze verify` with no
//! complaint, pointed at the berthd this build made.

use std::process::Command;

#[test]
fn the_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/berth.service"
    ))
    .unwrap();
    for key in [
        "Type=notify",
        "KillMode=process",
        "Delegate=yes",
        "TasksMax=infinity",
        "OOMScoreAdjust=-999",
        "LimitNOFILE=",
        "WatchdogSec=",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(key)),
            "no {key} in the unit"
        );
    }
    let local = unit.replace(
        "ExecStart=/usr/local/bin/berthd",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_berthd")),
    );
    assert_ne!(local, unit, "the unit's ExecStart moved");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.service");
    std::fs::write(&path, local).unwrap();
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
    {
        Ok(out) => out,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: systemd-analyze is not installed ({e})");
            return;
        }
        Err(e) => panic!("systemd-analyze: {e}"),
    };
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}
