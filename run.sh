#!/usr/bin/env bash
# The main job. Provisions libtorch, builds, then runs the system end to end on this machine:
# a coordinator with two CPU workers on the CPU demo config, its status, and a clean stop.
#
# Usage: ./run.sh [OUTPUT_DIR]   (default: ./out)
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-out}
scripts/build.sh
bin=target/release
state="$out/state"
rm -rf "$state"
mkdir -p "$out"
echo "==> starting: coordinator --config configs/cpu-demo.json --num_workers 2 --device cpu"
"$bin/coordinator" --config configs/cpu-demo.json --num_workers 2 --device cpu \
    --listen 127.0.0.1:0 --state-dir "$state" --exit-when-done 2> "$out/coordinator.log" &
coordinator_pid=$!
trap 'kill $coordinator_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    [ -f "$state/coordinator.addr" ] && break
    sleep 0.1
done
addr=$(cat "$state/coordinator.addr")
for _ in $(seq 1 300); do
    "$bin/coordinator" status --addr "$addr" --json 2>/dev/null | grep -q '"state":"RUNNING"' && break
    sleep 0.1
done
echo "==> coordinator status --addr $addr"
"$bin/coordinator" status --addr "$addr"
echo "==> coordinator kill --job job-1"
"$bin/coordinator" kill --job job-1 --addr "$addr" > /dev/null
wait "$coordinator_pid" || true
trap - EXIT
echo "==> coordinator list (after the job ended)"
"$bin/coordinator" --state-dir "$state" --listen 127.0.0.1:0 > /dev/null 2>&1 &
viewer=$!
for _ in $(seq 1 100); do
    [ -f "$state/coordinator.addr" ] && "$bin/coordinator" list --addr "$(cat "$state/coordinator.addr")" > "$out/jobs.txt" 2>/dev/null && break
    sleep 0.1
done
kill "$viewer" 2>/dev/null || true
wait "$viewer" 2>/dev/null || true
cat "$out/jobs.txt"
echo "==> logs: $out/coordinator.log, $state/logs/"
