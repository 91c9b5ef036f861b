#!/bin/bash
# Runs every berth-bench scenario against berth and against the peer containerd 1.6
# (../shared/peer) in one session, one runtime after the other, and prints the
# comparisons. Results (JSON and logs) go to $OUT (default /tmp/berth-bench-out).
#
#   e2e/bench/side-by-side.sh [scenario...]   # run, pods, stats, exec, node (default: all)
#
# Needs root, release builds (cargo build --release --bins) and the peer's registry and
# containerd up (../shared/peer/registry-up.sh, containerd-up.sh). It starts its own
# berthd with e2e/bench/berthd.toml under /tmp/bb and removes it afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEER=${PEER:-../shared/peer}
OUT=${OUT:-/tmp/berth-bench-out}
B=target/release/berth-bench
CTRD_SOCK=unix:///run/harness/containerd/containerd.sock
CTRD_PID=$(cat /run/harness/containerd.pid)
FLOOR=$PEER/../tools/pullfloor.py
SCENARIOS=${*:-run pods stats exec node}
mkdir -p "$OUT"

"$B" push --registry 127.0.0.1:5000 > "$OUT/push.log"

BERTHD_PID=
start_berthd() { # $1: the scenario, for the log's name
    rm -rf /tmp/bb && mkdir -p /tmp/bb/cni && cp e2e/bench/cni/*.conflist /tmp/bb/cni/
    target/release/berthd --config e2e/bench/berthd.toml > "$OUT/berthd-$1.log" 2>&1 &
    BERTHD_PID=$!
    for _ in $(seq 100); do [ -S /tmp/bb/berth.sock ] && return 0; sleep 0.1; done
    echo "berthd did not start: see $OUT/berthd-$1.log" >&2
    exit 1
}
# Also after a failed scenario: its pods go first (shims, mounts, netns, leases), then
# berthd and its dirs, then the bridge.
stop_berthd() {
    [ -n "$BERTHD_PID" ] || return 0
    "$B" clean --endpoint unix:///tmp/bb/berth.sock > /dev/null 2>&1 || true
    kill -TERM "$BERTHD_PID" 2> /dev/null && wait "$BERTHD_PID" || true
    BERTHD_PID=
    rm -rf /tmp/bb || true
    ip link del berthbench0 2> /dev/null || true
}
# A failed containerd run's pods are removed from the peer too.
on_exit() {
    stop_berthd
    "$B" clean --endpoint "$CTRD_SOCK" > /dev/null 2>&1 || true
}
trap on_exit EXIT

# Arguments a scenario takes besides the runtime's.
extra() {
    case $1 in
        run) [ -f "$FLOOR" ] && echo "--pull-floor $FLOOR --pull-runs 5" ;;
        pods) echo "--runc-floor" ;;
        *) ;;
    esac
}
takes_pid() { case $1 in run | pods | node) return 0 ;; *) return 1 ;; esac; }

for s in $SCENARIOS; do
    start_berthd "$s"
    bpid=(); cpid=()
    if takes_pid "$s"; then bpid=(--daemon-pid "$BERTHD_PID"); cpid=(--daemon-pid "$CTRD_PID"); fi
    # shellcheck disable=SC2046
    "$B" "$s" --endpoint unix:///tmp/bb/berth.sock --label berth "${bpid[@]}" \
        --json "$OUT/$s-berth.json" $(extra "$s") > "$OUT/$s-berth.log" 2>&1
    stop_berthd
    # shellcheck disable=SC2046
    "$B" "$s" --endpoint "$CTRD_SOCK" --label containerd "${cpid[@]}" \
        --json "$OUT/$s-containerd.json" $(extra "$s") > "$OUT/$s-containerd.log" 2>&1
    compare=compare-$s; [ "$s" = run ] && compare=compare
    echo "== $s"
    "$B" "$compare" "$OUT/$s-berth.json" "$OUT/$s-containerd.json" | tee "$OUT/$s-compare.txt"
done
