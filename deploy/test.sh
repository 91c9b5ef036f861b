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
# Python's grpcio, for the e2e test with a client berth did not write; kept inside
# target/ so that nothing on the system changes.
GRPCIO_VERSION=1.85.3
if ! PYTHONPATH=target/python python3 -c "import grpc, sys; sys.exit(grpc.__version__ != '$GRPCIO_VERSION')" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
    --target target/python --upgrade "grpcio==$GRPCIO_VERSION" >&2 ||
    echo "berth: grpcio did not install; its e2e test will fail under CI=true" >&2
fi
# The e2e suite runs the berthd binary, so build the binaries first.
cargo build --locked --quiet --workspace --bins
cargo test --locked --quiet --workspace "$@"
