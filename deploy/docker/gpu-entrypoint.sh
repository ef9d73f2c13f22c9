#!/bin/sh
# Entry point of the GPU image. Before `serve`, make sure the TensorRT engine of the
# bundle's per-frame graph exists for the GPU this container sees:
#   - a cached engine on the /engines volume is reused while its metadata (TensorRT
#     version, GPU model, source ONNX hash, precision, batch profile) matches;
#   - a missing or stale engine is (re)built, which takes minutes;
#   - replicas sharing the volume take a lock, so one builds and the others wait.
# Any other command (`bench`, `build-engine`, ...) is passed to `avatar` unchanged.
set -eu

# the engine the server will ask for: the same folder, precision and batch profile as
# `avatar serve` computes from these settings (server/app.py, server/runtime/select.py)
engine_dir="${AVATAR_ENGINE_DIR:-/engines}"
bundle="${AVATAR_WEIGHTS_DIR:-/weights}"
precision=fp16
[ "${AVATAR_PRECISION:-fp16}" = fp32 ] && precision=fp32
# the largest batch: AVATAR_MAX_BATCH, or the batch search limit when that is 0
max_batch="${AVATAR_MAX_BATCH:-0}"
[ "$max_batch" -gt 0 ] || max_batch="${AVATAR_BATCH_SEARCH_LIMIT:-16}"
engine="$engine_dir/frame-$precision.engine"

log() { echo "avatar-gpu-entrypoint: $*" >&2; }

[ "$#" -gt 0 ] || set -- serve

if [ "$1" = serve ] && [ "${AVATAR_RUNTIME:-tensorrt}" = tensorrt ]; then
    precision_flag=""
    [ "$precision" = fp32 ] && precision_flag="--fp32"
    mkdir -p "$engine_dir"

    # exit 0: up to date or built; 1: an engine exists but is stale; 2: no TensorRT/GPU
    status=0
    flock "$engine_dir/.build.lock" avatar build-engine --bundle "$bundle" --out "$engine" \
        --max-batch "$max_batch" $precision_flag || status=$?
    if [ "$status" -eq 1 ]; then
        log "cached engine $engine does not match this GPU or bundle: rebuilding"
        flock "$engine_dir/.build.lock" avatar build-engine --bundle "$bundle" \
            --out "$engine" --max-batch "$max_batch" $precision_flag --rebuild
    elif [ "$status" -ne 0 ]; then
        log "no TensorRT engine could be built (exit $status); is the NVIDIA runtime on?"
        exit "$status"
    fi
fi

exec avatar "$@"
