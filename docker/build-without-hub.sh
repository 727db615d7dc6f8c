#!/usr/bin/env bash
# Build the nnxai image where Docker Hub cannot be reached: a Debian bookworm base made with debootstrap
# from the mirror apt already uses, PyTorch on it, then the top-level Dockerfile with
# BASE_IMAGE set to that. The default build (`docker build -t nnxai .`) stays the CUDA one.
#
# Usage: docker/build-without-hub.sh [TAG]   (default tag: nnxai:debian)
#   TORCH_PIP_ARGS="..."   what pip installs for PyTorch (default: "torch torchvision" from the package index;
#                          a CPU build where its index is reachable: "--index-url URL torch torchvision")
# Root starts a Docker engine (installing Debian's docker.io) when none answers.
# Exit code 3: no Docker engine can be had here (the tests skip on it, with the reason printed).
set -euo pipefail
TAG=${1:-nnxai:debian}
BASE=nnxai-base:bookworm
TORCH_BASE=nnxai-torch:bookworm
REPO=$(cd "$(dirname "$0")/.." && pwd)

no_engine() {
    echo "no Docker engine: $*" >&2
    exit 3
}

# Remove pid file $1 unless the process it names is a $2.
stale_pid_file() {
    [ -f "$1" ] || return 0
    [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ] || rm -f "$1"
}

ensure_engine() {
    docker info >/dev/null 2>&1 && return
    [ "$(id -u)" = 0 ] || no_engine "none answers, and only root can start one"
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap; } \
            >/dev/null || no_engine "apt-get could not install docker.io and debootstrap"
    fi
    command -v docker >/dev/null || no_engine "no docker command"
    local log=/var/log/nnxai-dockerd.log
    # an engine that was killed leaves pid files for itself and its containerd (their numbers may since belong
    # to other processes or threads): dockerd refuses to start beside the first and waits for the second
    stale_pid_file /var/run/docker.pid dockerd
    stale_pid_file /var/run/docker/containerd/containerd.pid containerd
    nohup dockerd >"$log" 2>&1 &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        sleep 1
    done
    no_engine "dockerd did not start ($(tail -n 1 "$log"))"
}

# Debian bookworm (python3 3.11, pip, the machine's CA bundle so that pip in a container trusts the
# package index the machine trusts), imported as one layer.
make_base() {
    docker image inspect "$BASE" >/dev/null 2>&1 && return
    command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
    local mirror rootfs
    mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | awk '/^URIs:/ || /^deb / {print $2; exit}') || true  # (one of the two files may be missing)
    [ -n "$mirror" ] || { echo "no Debian mirror in apt's sources" >&2; exit 1; }
    rootfs=$(mktemp -d /tmp/nnxai-rootfs.XXXXXX)
    debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates bookworm "$rootfs" "$mirror" \
        >"$rootfs.log" || { echo "debootstrap failed (see $rootfs.log)" >&2; exit 1; }
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
}

# The base plus PyTorch and torchvision, as the CUDA base brings them (nnU-Net's networks need timm, timm
# needs torchvision). From the package index by default, i.e. the standard Linux wheels with their CUDA
# libraries: no CPU build of torchvision is on PyPI, and a CUDA torchvision does not load on a CPU torch.
make_torch_base() {
    docker image inspect "$TORCH_BASE" >/dev/null 2>&1 && return
    local name=nnxai-torch-install-$$ requirements
    read -ra requirements <<<"${TORCH_PIP_ARGS:-torch torchvision}"
    if ! docker run --name "$name" "$BASE" \
        python3 -m pip install --quiet --no-cache-dir --break-system-packages "${requirements[@]}"; then
        docker rm "$name" >/dev/null
        echo "installing ${requirements[*]} in $BASE failed" >&2
        exit 1
    fi
    docker commit "$name" "$TORCH_BASE" >/dev/null
    docker rm "$name" >/dev/null
}

timed() {
    local start=$SECONDS
    "$@"
    echo "$1: $((SECONDS - start)) s"
}

ensure_engine
timed make_base
timed make_torch_base
start=$SECONDS
docker build --build-arg BASE_IMAGE="$TORCH_BASE" -t "$TAG" "$REPO"
echo "docker build: $((SECONDS - start)) s"
echo "built $TAG: $(docker image inspect --format '{{.Size}}' "$TAG") bytes"
