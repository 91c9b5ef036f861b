#!/usr/bin/env bash
# The whole test suite: installs what the tests need, builds every binary, then runs
# unit tests and the end-to-end suite (real berthd, real docker-registry on 127.0.0.1,
# images built from Debian's busybox-static and generated data). Needs root.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
# shellcheck source=apt-deps.sh
. "$HERE/apt-deps.sh"
[[ $EUID -eq 0 ]] || { echo "berth: the test suite needs root (mounts, device nodes)" >&2; exit 1; }

# shellcheck disable=SC2086
berth_apt_install $BERTH_BUILD_PACKAGES $BERTH_RUN_PACKAGES $BERTH_TEST_PACKAGES
berth_require_cargo
cd "$REPO"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The e2e suite runs the berthd binary, so build the binaries first.
cargo build --locked --quiet --workspace --bins
cargo test --locked --quiet --workspace "$@"
