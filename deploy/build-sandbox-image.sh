#!/usr/bin/env bash
# Builds the sandbox agent's image (`make sandbox-image`): deploy/sandbox.Dockerfile on
# python:3.11-slim, or on a Debian bookworm base built here with debootstrap when that image
# cannot be pulled (no registry). The build itself needs no network: the wheels are
# downloaded on the host (PyPI) and installed in the image with --no-index. They are the
# agent's pinned runtime, the `agent` extra of pyproject.toml (the Modal image installs the
# same: rlm_orchestrator/sandbox/launch.py).
#
# `build-sandbox-image.sh --print-requirements` prints them and exits (no Docker needed).
#
# Cached, so that a rerun with nothing changed takes seconds:
#   - the image carries the label rlm.content-hash: a sha256 over the Dockerfile, the files of
#     sandbox_agent/ and of rlm_wire/ it copies, and the requirement list; an image with the
#     same hash is not rebuilt;
#   - wheels in .cache/wheels/<key of the requirement list>/;
#   - the self-built base image is built once (remove it to rebuild: docker rmi BASE).
#
# Environment:
#   SANDBOX_IMAGE       image to build (default rlm-sandbox:latest)
#   SANDBOX_BASE_IMAGE  force a base image (default: python:3.11-slim, else the self-built one)
#   DEBIAN_MIRROR       apt mirror for debootstrap (default http://deb.debian.org/debian)
#   DEBIAN_SECURITY_MIRROR  (default http://deb.debian.org/debian-security)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKERFILE=$REPO/deploy/sandbox.Dockerfile
IMAGE=${SANDBOX_IMAGE:-rlm-sandbox:latest}
SLIM_BASE=python:3.11-slim
OWN_BASE=rlm-sandbox-base:bookworm
BASE_OVERRIDE=${SANDBOX_BASE_IMAGE:-}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
CACHE_DIR=$REPO/.cache
PULL_TIMEOUT=20
HASH_LABEL=rlm.content-hash
# Wheels for the image's interpreter: CPython 3.11 on x86_64 glibc (both bases).
PIP_TARGET=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux_2_28_x86_64)

log() { printf 'sandbox-image: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
command -v python3 >/dev/null 2>&1 || die "python3 (3.11+) is needed on the host"

# Temp dirs, removed on exit. A failed chroot step may leave mounts inside a rootfs:
# unmount them first, and never let rm cross into another file system.
TMP_DIRS=()
cleanup() {
    local dir mount
    for dir in ${TMP_DIRS[@]+"${TMP_DIRS[@]}"}; do
        [[ -e $dir ]] || continue
        while read -r mount; do
            umount -l "$mount" 2>/dev/null || true
        done < <(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r)
        rm -rf --one-file-system "$dir"
    done
}
trap cleanup EXIT

# Runs a command with its output in a log, shown (the end of it) only when it fails.
quietly() {
    local out
    out=$(mktemp)
    TMP_DIRS+=("$out")
    if ! "$@" >"$out" 2>&1; then
        tail -n 40 "$out" >&2
        die "failed: $*"
    fi
    rm -f "$out"
}

# The agent's pinned runtime dependencies: the `agent` extra of pyproject.toml, one a line.
REQUIREMENTS=$(python3 - "$REPO/pyproject.toml" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
wheels = project.get("optional-dependencies", {}).get("agent")
if not wheels:
    sys.exit("pyproject.toml has no [project.optional-dependencies] agent = [...]")
unpinned = [w for w in wheels if "==" not in w]
if unpinned:
    sys.exit(f"the agent's wheels must be pinned (==): {', '.join(unpinned)}")
print("\n".join(w.replace(" ", "") for w in wheels))
EOF
)
if [[ ${1:-} == --print-requirements ]]; then
    printf '%s\n' "$REQUIREMENTS"
    exit 0
fi

command -v docker >/dev/null 2>&1 ||
    die "docker is not installed (the sandbox image needs the Docker CLI and engine)"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
    die "the Docker engine is not reachable (try: docker info)"

# --- What the image is made of, and its hash ---------------------------------------------

# The files copied into the image, in a stable order: sandbox_agent/ without bytecode, and of
# the wire (rlm_wire/) only what the agent imports (rlm_wire.AGENT_FILES: its own service's
# generated code and the shared auth, not the orchestrator's or the router's).
wire_files=$(cd "$REPO" && python3 -B -c \
    'import rlm_wire; print("\n".join(f"rlm_wire/{f}" for f in rlm_wire.AGENT_FILES))') ||
    die "cannot read rlm_wire.AGENT_FILES"
mapfile -t AGENT_FILES < <(cd "$REPO" && {
    find sandbox_agent -type f ! -path '*/__pycache__/*' ! -name '*.py[co]'
    printf '%s\n' "$wire_files"
} | LC_ALL=C sort)
[[ ${#AGENT_FILES[@]} -gt 0 ]] || die "no files in $REPO/sandbox_agent"
for file in "${AGENT_FILES[@]}"; do
    [[ -f $REPO/$file ]] || die "$file (rlm_wire.AGENT_FILES) does not exist"
done

content_hash() {
    local file
    printf 'dockerfile\n'
    cat "$DOCKERFILE"
    printf 'requirements\n%s\n%s\n' "$REQUIREMENTS" "${PIP_TARGET[*]}"
    printf 'base\n%s\n' "${BASE_OVERRIDE:-auto}"
    for file in "${AGENT_FILES[@]}"; do
        printf 'file %s %s\n' "$file" "$(sha256sum <"$REPO/$file" | cut -d' ' -f1)"
    done
}
HASH=$(content_hash | sha256sum | cut -d' ' -f1)

current=$(docker image inspect --format "{{ index .Config.Labels \"$HASH_LABEL\" }}" \
    "$IMAGE" 2>/dev/null || true)
if [[ $current == "$HASH" ]]; then
    log "$IMAGE is up to date (content hash ${HASH:0:12})"
    exit 0
fi
# The same content built before under another name: tag it.
previous=$(docker images --quiet --filter "label=$HASH_LABEL=$HASH" | head -n 1)
if [[ -n $previous ]]; then
    docker tag "$previous" "$IMAGE"
    log "$IMAGE is up to date (content hash ${HASH:0:12}, tagged image $previous)"
    exit 0
fi
log "building $IMAGE (content hash ${HASH:0:12})"
started=$SECONDS

# --- Wheels ---------------------------------------------------------------------------------

wheel_key=$(printf '%s\n' "$REQUIREMENTS" "${PIP_TARGET[@]}" | sha256sum | cut -c1-16)
WHEELS=$CACHE_DIR/wheels/$wheel_key
if [[ -f $WHEELS/.complete ]]; then
    log "wheels: cached in ${WHEELS#"$REPO"/}"
else
    # The project's venv is made by uv and may have no pip; the host's python3 has one.
    if [[ -x $REPO/.venv/bin/python ]] && "$REPO/.venv/bin/python" -m pip --version >/dev/null 2>&1; then
        pip=("$REPO/.venv/bin/python" -m pip)
    elif python3 -m pip --version >/dev/null 2>&1; then
        pip=(python3 -m pip)
    else
        die "pip is needed to download the wheels (python3 -m pip)"
    fi
    log "wheels: downloading $(echo "$REQUIREMENTS" | paste -sd ' ') for cp311 manylinux x86_64"
    mkdir -p "$CACHE_DIR/wheels"
    download=$(mktemp -d "$CACHE_DIR/wheels/.download.XXXXXX")
    TMP_DIRS+=("$download")
    mapfile -t requirement_args <<<"$REQUIREMENTS"
    quietly "${pip[@]}" download --disable-pip-version-check --no-cache-dir \
        "${PIP_TARGET[@]}" -d "$download" "${requirement_args[@]}"
    printf '%s\n' "$REQUIREMENTS" >"$download/requirements.txt"
    touch "$download/.complete"
    rm -rf "$WHEELS"
    mv "$download" "$WHEELS"
fi
log "wheels: $(cd "$WHEELS" && ls -- *.whl | paste -sd ' ')"

# --- Base image -----------------------------------------------------------------------------

# Debian bookworm (minbase) with python3, made with debootstrap and imported: needs root and
# the apt mirror, no registry. Built once; the rootfs is removed after the import.
build_own_base() {
    if ! command -v debootstrap >/dev/null 2>&1; then
        [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1 ||
            die "debootstrap is needed to build $OWN_BASE (apt-get install debootstrap)"
        log "base: installing debootstrap"
        quietly apt-get update -qq
        quietly env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends debootstrap
    fi
    [[ $EUID -eq 0 ]] || die "building $OWN_BASE with debootstrap needs root" \
        "(or make $SLIM_BASE available: docker pull / docker load)"
    local rootfs
    rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/rlm-sandbox-rootfs.XXXXXX")
    TMP_DIRS+=("$rootfs")
    local chroot_run=(chroot "$rootfs" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive)
    log "base: debootstrap bookworm minbase from $DEBIAN_MIRROR (about a minute)"
    quietly debootstrap --variant=minbase --include=python3-minimal bookworm "$rootfs" \
        "$DEBIAN_MIRROR"
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb $DEBIAN_SECURITY_MIRROR bookworm-security main
EOF
    # python3-minimal lacks asyncio and more of the standard library: python3 has it all.
    log "base: apt-get install python3 (with bookworm's updates)"
    quietly "${chroot_run[@]}" apt-get update -qq
    quietly "${chroot_run[@]}" apt-get upgrade -y -qq
    quietly "${chroot_run[@]}" apt-get install -y -qq --no-install-recommends python3
    quietly "${chroot_run[@]}" apt-get clean
    # Trimmed as Debian's own images are: no package lists, logs, docs (but their copyright).
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/* \
        "$rootfs"/var/cache/debconf/*-old "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/tmp/* "$rootfs"/root/.cache
    find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
    find "$rootfs/usr/share/doc" -depth -mindepth 1 -type d -empty -delete
    : >"$rootfs/etc/resolv.conf" # Docker provides its own at run time.
    log "base: docker import $OWN_BASE ($(du -sh --one-file-system "$rootfs" | cut -f1))"
    tar --numeric-owner -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --change 'LABEL org.opencontainers.image.description="Debian bookworm minbase + python3 (debootstrap)"' \
        --message "debootstrap bookworm minbase + python3" - "$OWN_BASE" >/dev/null
    rm -rf --one-file-system "$rootfs"
}

if [[ -n $BASE_OVERRIDE ]]; then
    BASE=$BASE_OVERRIDE
    docker image inspect "$BASE" >/dev/null 2>&1 || quietly docker pull "$BASE"
elif docker image inspect "$SLIM_BASE" >/dev/null 2>&1; then
    BASE=$SLIM_BASE
elif timeout "$PULL_TIMEOUT" docker pull --quiet "$SLIM_BASE" >/dev/null 2>&1; then
    BASE=$SLIM_BASE
else
    BASE=$OWN_BASE
    if docker image inspect "$OWN_BASE" >/dev/null 2>&1; then
        log "base: $SLIM_BASE cannot be pulled; using $OWN_BASE"
    else
        log "base: $SLIM_BASE cannot be pulled; building $OWN_BASE"
        build_own_base
    fi
fi
log "base: $BASE"

# --- The image ------------------------------------------------------------------------------

context=$(mktemp -d)
TMP_DIRS+=("$context")
cp "$DOCKERFILE" "$context/Dockerfile"
mkdir "$context/wheels"
cp "$WHEELS"/*.whl "$context/wheels/"
(cd "$REPO" && printf '%s\0' "${AGENT_FILES[@]}" | tar --null -T - -cf -) | tar -C "$context" -xf -

# Without the buildx plugin, the CLI falls back on the classic builder (enough here).
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
old_id=$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
log "docker build $IMAGE FROM $BASE"
quietly docker build --pull=false --build-arg "BASE_IMAGE=$BASE" \
    --build-arg "CONTENT_HASH=$HASH" --label "$HASH_LABEL=$HASH" -t "$IMAGE" "$context"
# The image this one replaces, now untagged: remove it (ignored if a container still uses it).
new_id=$(docker image inspect --format '{{.Id}}' "$IMAGE")
if [[ -n $old_id && $old_id != "$new_id" ]] &&
    [[ -z $(docker image inspect --format '{{join .RepoTags ""}}' "$old_id" 2>/dev/null) ]]; then
    docker image rm "$old_id" >/dev/null 2>&1 || true
fi
size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
log "built $IMAGE (${new_id:7:12}, $((size / 1000000)) MB) in $((SECONDS - started)) s"
