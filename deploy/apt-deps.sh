#!/usr/bin/env bash
# Installs the Debian packages berth needs. Sourced by install.sh and test.sh.
#   berth_apt_install PKG...   installs the packages that are missing, without
#                              letting them start system services (Debian's
#                              docker-registry would otherwise take :5000).
berth_apt_install() {
  local p missing=()
  for p in "$@"; do
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" == installed ]] || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  echo "berth: installing ${missing[*]}" >&2
  apt-get update -qq >&2
  local policy=/usr/sbin/policy-rc.d own_policy=0 rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; own_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  [[ $own_policy -eq 1 ]] && rm -f "$policy"
  return $rc
}

# Packages to build berth (protoc for the k8s-cri crate) and to run it.
BERTH_BUILD_PACKAGES="protobuf-compiler gcc libc6-dev pkg-config ca-certificates"
BERTH_RUN_PACKAGES="runc containernetworking-plugins iptables iproute2"
# Extra packages the test suite needs: a real registry, htpasswd for its auth,
# busybox-static to build images from local material, crun for the handler test,
# curl to scrape the Prometheus endpoint,
# Go, grpc-go, gorilla/websocket and docker/spdystream to build clients berth did not
# write (GOPATH mode, offline); test.sh installs grpcio with pip into target/python.
BERTH_TEST_PACKAGES="docker-registry apparmor apache2-utils busybox-static coreutils curl openssl crun golang-go golang-google-grpc-dev golang-github-gorilla-websocket-dev golang-github-docker-spdystream-dev"

berth_require_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    [[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "berth: a Rust toolchain (1.85 or newer) is needed and Debian's rustc is too old." >&2
    echo "berth: install one with rustup (https://rustup.rs), then run this command again." >&2
    exit 1
  fi
}
