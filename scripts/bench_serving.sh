#!/usr/bin/env bash
# The serving figures of README.md and docs/performance.md, measured in one run:
#
#   1. `avatar bench frame`: the per-frame graph alone (ONNX Runtime CPU, the bundle's
#      weights, batch BATCH, THREADS threads);
#   2. a real server (`avatar serve`, the same runtime, AVATAR_MAX_BATCH=BATCH,
#      AVATAR_RUNTIME_THREADS=THREADS) on a free loopback port, and `avatar bench stream`
#      against it: one stream at 30 poses/s, then STREAMS streams offering more poses than
#      the server can render (saturation);
#   3. the graph alone again (the machine's speed drifts: the two are averaged), and the
#      ratio of delivered frames/s at saturation to the graph's frames/s.
#
# The clients run on the same machine as the server and take some of its CPU.
#
# Usage: scripts/bench_serving.sh [OUT_DIR]   (default build/bench-serving)
# Settings: AVATAR_WEIGHTS_DIR (weights/demo), BATCH (1), THREADS (0: the physical cores),
# STREAMS (8), SATURATION_FPS (40), SECONDS_PER_RUN (20), PYTHON (.venv/bin/python; needs
# the torch extra for the graph benchmark).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
out="${1:-build/bench-serving}"
python_bin="${PYTHON:-$repo_root/.venv/bin/python}"
weights="${AVATAR_WEIGHTS_DIR:-weights/demo}"
batch="${BATCH:-1}"
threads="${THREADS:-0}"
streams="${STREAMS:-8}"
saturation_fps="${SATURATION_FPS:-40}"
seconds="${SECONDS_PER_RUN:-20}"
mkdir -p "$out"

avatar() { "$python_bin" -m server.cli "$@"; }

frame_bench() {
    local thread_flag=()
    [ "$threads" != 0 ] && thread_flag=(--threads "$threads")
    avatar bench frame --bundle "$weights" --runtime onnxruntime --batch "$batch" \
        "${thread_flag[@]}" --iterations 300 --json-out "$1" --json >/dev/null 2>"$1.log"
}

echo "1/3 per-frame graph: onnxruntime, batch $batch, threads $threads, $weights" >&2
frame_bench "$out/frame-before.json"

free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
port="$("$python_bin" -c "$free_port")"
data_dir="$(mktemp -d)"
AVATAR_DATA_DIR="$data_dir" AVATAR_WEIGHTS_DIR="$weights" AVATAR_MAX_BATCH="$batch" \
    AVATAR_RUNTIME_THREADS="$threads" avatar serve --port "$port" >"$out/server.log" 2>&1 &
server_pid=$!
cleanup() {
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    rm -rf "$data_dir"
}
trap cleanup EXIT

for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$out/server.log" >&2; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null \
    || { echo "server not ready after 120 s" >&2; exit 1; }

echo "2/3 one stream at 30 poses/s for $seconds s" >&2
avatar bench stream --server "http://127.0.0.1:$port" --streams 1 --fps 30 \
    --seconds "$seconds" --json >"$out/one-stream.json" 2>"$out/one-stream.log"
echo "2/3 saturation: $streams streams at $saturation_fps poses/s each for $seconds s" >&2
avatar bench stream --server "http://127.0.0.1:$port" --streams "$streams" \
    --fps "$saturation_fps" --seconds "$seconds" --json >"$out/saturation.json" \
    2>"$out/saturation.log"

cleanup
trap - EXIT
echo "3/3 per-frame graph again, summary" >&2
frame_bench "$out/frame-after.json"
"$python_bin" - "$out" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
frame_runs = [json.loads((out / f"frame-{when}.json").read_text()) for when in ("before", "after")]
before, after = (run["results"][0] for run in frame_runs)
graph_fps = (before["fps"] + after["fps"]) / 2
one = json.loads((out / "one-stream.json").read_text())
sat = json.loads((out / "saturation.json").read_text())
summary = {
    "graph": {"runtime": before["runtime"], "batch": before["batch"],
              "threads": frame_runs[0]["threads"],
              "fps_before": before["fps"], "fps_after": after["fps"],
              "fps": round(graph_fps, 1)},
    "one_stream": {"fps_delivered": one["fps_delivered"], "dropped": one["dropped"],
                   "latency_ms": one["latency_ms"]},
    "saturation": {"streams": sat["streams"], "fps_total": sat["fps_total"],
                   "dropped": sat["dropped"], "latency_ms": sat["latency_ms"]},
    "saturation_vs_graph": round(sat["fps_total"] / graph_fps, 3),
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
