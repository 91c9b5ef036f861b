#!/usr/bin/env bash
# The quick start: installs what berth needs, builds it, writes the default config,
# CNI conflist and crictl config (only where none exists), and starts berthd on
# unix:///run/berth/berth.sock — as a systemd service when systemd runs, otherwise
# as a background process (pid in /run/berth/berthd.pid, log /var/log/berthd.log).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
# shellcheck source=apt-deps.sh
. "$HERE/apt-deps.sh"
[[ $EUID -eq 0 ]] || { echo "berth: run as root" >&2; exit 1; }

# shellcheck disable=SC2086
berth_apt_install $BERTH_BUILD_PACKAGES $BERTH_RUN_PACKAGES
berth_require_cargo
echo "berth: building (release)" >&2
(cd "$REPO" && cargo build --release --locked --quiet --bin berthd --bin berth-shim --bin berthctl)
install -m 0755 "$REPO/target/release/berthd" /usr/local/bin/berthd
install -m 0755 "$REPO/target/release/berth-shim" /usr/local/bin/berth-shim
install -m 0755 "$REPO/target/release/berthctl" /usr/local/bin/berthctl

install -d -m 0755 /etc/berth /etc/cni/net.d
fresh_config=0
if [[ ! -e /etc/berth/config.toml ]]; then
  install -m 0644 "$HERE/config.toml" /etc/berth/config.toml
  fresh_config=1
fi
if ! ls /etc/cni/net.d/*.conf /etc/cni/net.d/*.conflist >/dev/null 2>&1; then
  install -m 0644 "$HERE/cni/10-berth.conflist" /etc/cni/net.d/10-berth.conflist
fi
[[ -e /etc/crictl.yaml ]] || install -m 0644 "$HERE/crictl.yaml" /etc/crictl.yaml

# The profile behind AppArmor `RuntimeDefault`, where the host runs AppArmor (berthd
# refuses RuntimeDefault there until it is loaded).
if [[ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" == Y ]]; then
  command -v apparmor_parser >/dev/null || berth_apt_install apparmor
  install -D -m 0644 "$HERE/apparmor/berth-default" /etc/apparmor.d/berth-default
  apparmor_parser -r -W /etc/apparmor.d/berth-default
fi

if [[ -d /run/systemd/system ]]; then
  # Under systemd, a new config takes the systemd cgroup driver (kubeadm's kubelet
  # default): pods in slices and scopes made through systemd over the system bus.
  if [[ $fresh_config -eq 1 ]]; then
    sed -i 's/^cgroup_driver = "cgroupfs"/cgroup_driver = "systemd"/' /etc/berth/config.toml
  fi
  if grep -q '^cgroup_driver = "systemd"' /etc/berth/config.toml; then
    berth_apt_install dbus
    systemctl start dbus.socket
  fi
  install -m 0644 "$HERE/berth.service" /etc/systemd/system/berth.service
  systemctl daemon-reload
  systemctl enable --now berth.service
  systemctl restart berth.service
else
  install -d -m 0711 /run/berth
  pidfile=/run/berth/berthd.pid
  if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null &&
     [[ "$(cat /proc/"$(cat "$pidfile")"/comm 2>/dev/null)" == berthd ]]; then
    echo "berth: stopping the running berthd (pid $(cat "$pidfile"))" >&2
    kill -TERM "$(cat "$pidfile")"
    for _ in $(seq 1 100); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
  fi
  setsid /usr/local/bin/berthd >>/var/log/berthd.log 2>&1 </dev/null &
  echo $! >"$pidfile"
fi
for _ in $(seq 1 100); do [[ -S /run/berth/berth.sock ]] && break; sleep 0.1; done
[[ -S /run/berth/berth.sock ]] || { echo "berth: berthd did not start; see /var/log/berthd.log or journalctl -u berth" >&2; exit 1; }
echo "berth: berthd is serving CRI on unix:///run/berth/berth.sock"
