#!/usr/bin/env bash
# Stand-ins for the public base images that the Dockerfile and docker-compose.yml name,
# built from Debian's own packages with debootstrap + `docker import`, for machines that
# reach Debian's archive but no container registry.
#
#   deploy/standins/build.sh [--force] [IMAGE ...]
#
# For each image (default: every image listed in IMAGES below):
#   1. present in the local engine      -> kept as it is (real image or earlier stand-in);
#   2. `docker pull` works               -> the real image is used;
#   3. otherwise                         -> a stand-in is built and tagged with the
#                                           official name, so the compose file and the
#                                           Dockerfile stay the ones users run.
# --force rebuilds stand-ins even when the tag exists (a real image is never replaced
# unless --force is given).
#
# Root file systems are cached as tarballs under $STANDIN_CACHE (default build/standins,
# git-ignored), keyed by each image's recipe: a rerun after `docker system prune` only
# imports them again. Debian's .deb files are cached there too.
#
# Environment: STANDIN_CACHE, DEBIAN_MIRROR (default http://deb.debian.org/debian),
# DEBIAN_SUITE (default bookworm), PULL_TIMEOUT (seconds, default 60).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${STANDIN_CACHE:-$repo_root/build/standins}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite="${DEBIAN_SUITE:-bookworm}"
pull_timeout="${PULL_TIMEOUT:-60}"
docker_bin="${DOCKER:-docker}"

# the images this project names: the Dockerfile's base and the compose file's services
IMAGES=(python:3.11-slim-bookworm redis:7-bookworm nginx:1.27-bookworm)

log() { printf '[standins %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Debian packages on top of the minbase variant, per image.
packages_for() {
    case "$1" in
        python:3.11-slim-bookworm) echo "python3,python3-venv,ca-certificates,netbase,tzdata" ;;
        redis:7-bookworm) echo "redis-server,netbase,tzdata" ;;
        nginx:1.27-bookworm) echo "nginx,ca-certificates,netbase,tzdata" ;;
        *) return 1 ;;
    esac
}

# Image metadata of the official image, as `docker import --change` instructions.
changes_for() {
    local common=(
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        --change "ENV LANG=C.UTF-8"
        --change "LABEL org.opencontainers.image.description=\"stand-in for $1 built from \
Debian $suite packages by deploy/standins/build.sh\""
        --change "LABEL io.avatar.standin=$1"
    )
    case "$1" in
        python:3.11-slim-bookworm)
            printf '%s\0' "${common[@]}" \
                --change 'CMD ["python3"]'
            ;;
        redis:7-bookworm)
            printf '%s\0' "${common[@]}" \
                --change "USER redis" --change "WORKDIR /data" --change "VOLUME /data" \
                --change "EXPOSE 6379" --change 'CMD ["redis-server"]'
            ;;
        nginx:1.27-bookworm)
            printf '%s\0' "${common[@]}" \
                --change "EXPOSE 80" \
                --change 'CMD ["nginx", "-g", "daemon off;"]'
            ;;
    esac
}

# Make the root file system behave like the official image; runs after debootstrap.
configure_rootfs() {
    local name="$1" root="$2"

    # apt sources as in the official Debian images (security updates included)
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

    case "$name" in
        python:3.11-slim-bookworm)
            # a venv over /usr/local gives python, python3 and pip in /usr/local/bin like
            # the official image, and a pip that may install (no PEP 668 lock there)
            mount -t proc proc "$root/proc"
            chroot "$root" /usr/bin/python3 -m venv /usr/local || { umount "$root/proc"; return 1; }
            umount "$root/proc"
            ;;
        redis:7-bookworm)
            mkdir -p "$root/data"
            chroot "$root" chown redis:redis /data
            ;;
        nginx:1.27-bookworm)
            # the official image: conf.d only, logs to the container's output
            rm -f "$root/etc/nginx/sites-enabled/default"
            ln -sf /dev/stdout "$root/var/log/nginx/access.log"
            ln -sf /dev/stderr "$root/var/log/nginx/error.log"
            ;;
    esac

    # slim: no package lists, no docs, no host files
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/doc/* "$root"/usr/share/man/* \
        "$root"/usr/share/info/* "$root"/var/log/apt/* "$root"/var/log/dpkg.log \
        "$root"/var/log/bootstrap.log "$root"/tmp/* "$root"/root/.cache
    : >"$root/etc/resolv.conf"
    echo "localhost" >"$root/etc/hostname"
}

# Cache key of one stand-in's root file system: its recipe, not the whole script.
recipe_key() {
    { packages_for "$1"; declare -f configure_rootfs; echo "$suite $mirror"; } \
        | sha256sum | cut -c1-12
}

# Build the root file system tarball of one stand-in (cached); prints its path.
build_rootfs() {
    local name="$1" packages key slug tarball root
    packages="$(packages_for "$name")" || die "no stand-in recipe for $name"
    key="$(recipe_key "$name")"
    slug="$(echo "$name" | tr ':/' '__')"
    tarball="$cache/$slug-$suite-$key.tar"
    if [[ -s "$tarball" ]]; then
        log "$name: cached root file system $tarball"
        echo "$tarball"
        return
    fi

    if ! command -v debootstrap >/dev/null; then
        command -v apt-get >/dev/null || die "debootstrap missing and no apt-get to install it"
        log "installing debootstrap"
        apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends debootstrap >/dev/null
    fi
    mkdir -p "$cache/debs"
    root="$(mktemp -d "$cache/rootfs-$slug.XXXXXX")"
    log "$name: debootstrap --variant=minbase $suite (+ $packages)"
    if ! debootstrap --variant=minbase --include="$packages" --cache-dir="$cache/debs" \
        "$suite" "$root" "$mirror" >"$root.log" 2>&1; then
        tail -20 "$root.log" >&2
        rm -rf "$root"
        die "$name: debootstrap failed (log above)"
    fi
    configure_rootfs "$name" "$root"

    tar --numeric-owner --xattrs -C "$root" -cf "$tarball.partial" \
        --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' .
    mv "$tarball.partial" "$tarball"
    rm -rf "$root" "$root.log"
    echo "$tarball"
}

ensure_image() {
    local name="$1" force="$2" tarball
    local -a changes

    if [[ "$force" != 1 ]] && "$docker_bin" image inspect "$name" >/dev/null 2>&1; then
        log "$name: present ($(describe "$name"))"
        return
    fi
    if [[ "$force" != 1 ]] && timeout "$pull_timeout" "$docker_bin" pull -q "$name" \
        >/dev/null 2>&1; then
        log "$name: pulled from its registry"
        return
    fi

    log "$name: no registry reachable; building a stand-in from Debian packages"
    tarball="$(build_rootfs "$name")"
    mapfile -d '' changes < <(changes_for "$name")
    "$docker_bin" import "${changes[@]}" "$tarball" "$name" >/dev/null
    log "$name: imported stand-in ($(describe "$name"))"
}

describe() {
    local standin size
    standin="$("$docker_bin" image inspect -f '{{index .Config.Labels "io.avatar.standin"}}' \
        "$1" 2>/dev/null || true)"
    size="$("$docker_bin" image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1/1e6}')"
    if [[ -n "$standin" && "$standin" != "<no value>" ]]; then
        echo "stand-in, $size"
    else
        echo "real image, $size"
    fi
}

main() {
    local force=0
    local -a names=()
    for arg in "$@"; do
        case "$arg" in
            --force) force=1 ;;
            -h | --help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
            *) names+=("$arg") ;;
        esac
    done
    [[ ${#names[@]} -gt 0 ]] || names=("${IMAGES[@]}")
    [[ "$(id -u)" == 0 ]] || die "debootstrap and chroot need root"

    for name in "${names[@]}"; do
        ensure_image "$name" "$force"
    done
}

main "$@"
