#!/usr/bin/env bash
# Build the Docker image from this repository and check, with networking off inside the
# container, that it reproduces the host's default run and passes a smoke subset of the tests.
#
#   scripts/docker_smoke.sh [--cuda] [--rm-images] [--keep-engine] [--base IMAGE]
#
# Steps:
#   1. a container engine: the running one, else (as root) Debian's docker.io and debootstrap
#      are installed with apt-get when missing and dockerd is started (and stopped at the end);
#      without root and without a running engine the script prints SKIP and exits 0.
#   2. the base image: the Dockerfile's PYTHON_IMAGE if it is present or can be pulled, else a
#      Debian bookworm base with Python 3.11 built from Debian's packages (debootstrap from the
#      mirror in the host's apt sources, cached under $MEANFIELD_TF_DOCKER_CACHE, default
#      /var/tmp/meanfield-tf-docker). That base carries the host's CA bundle and network package
#      index settings (pip), so that the image build installs the same pinned wheels.
#   3. `docker build --build-arg VARIANT=cpu` -> meanfield-tf:cpu (and meanfield-tf:cuda with
#      --cuda: no GPU is needed to build, the pinned CUDA wheels must resolve and install).
#   4. in meanfield-tf:cpu with --network none:
#      a. the default `meanfield-tf train` as the calling user (--user uid:gid) into a host
#         directory mounted at /work/runs: every printed loss line must equal the host's run of
#         the same tree, the logged losses must be equal floats, and the run directory on the
#         host must be owned by the calling user;
#      b. the image's own user (non-root) trains a short run into a named volume, while
#      c. a smoke subset of the tests shipped in the image runs ($SMOKE_TESTS overrides it);
#      d. one quick experiment of the reproduction suite, when the image has `experiment`.
#   5. image sizes; cleanup of the containers, volume and temporary files it made, of the
#      images it built with --rm-images, and of the engine if it started it.
#
# Exit status: 0 pass (or SKIP), 1 a check failed, 2 bad arguments.
set -euo pipefail

# One compound command, read whole before it runs: a checkout or an edit of this file while it
# runs cannot change what runs.
{

cuda=0
rm_images=0
keep_engine=0
base=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=1 ;;
    --rm-images) rm_images=1 ;;
    --keep-engine) keep_engine=1 ;;
    --base) shift; base="${1:?--base needs an image name}" ;;
    -h|--help) sed -n "2,29p" "$0"; exit 0 ;;
    *) echo "docker_smoke.sh: unknown argument '$1' (use --cuda, --rm-images, --keep-engine, --base IMAGE)" >&2; exit 2 ;;
  esac
  shift
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${MEANFIELD_TF_DOCKER_CACHE:-/var/tmp/meanfield-tf-docker}"
tag="${MEANFIELD_TF_IMAGE:-meanfield-tf}"
smoke_tests="${SMOKE_TESTS:-tests/test_bad_input.py tests/test_flow.py::test_euler_one_step_is_finite_transformer tests/test_flow.py::test_permutation_equivariance}"
python="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
# The syntax line of the Dockerfile makes BuildKit fetch its frontend from the registry; the
# classic builder needs no network for it.
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"

t0=$SECONDS
log() { printf '[docker_smoke %4ds] %s\n' "$((SECONDS - t0))" "$*"; }
fail() { printf '[docker_smoke] FAIL: %s\n' "$*" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/meanfield-tf-smoke.XXXXXX")"
run_id="meanfield-tf-smoke-$$"
started_engine=""
host_pid=""
user_pid=""
built_images=()

cleanup() {
  local rc=$?
  set +e
  for p in $host_pid $user_pid; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  if docker info >/dev/null 2>&1; then
    for c in $(docker ps -aq --filter "name=^${run_id}-"); do docker rm -f "$c" >/dev/null; done
    docker volume rm "${run_id}-runs" >/dev/null 2>&1
    if [ "$rm_images" = 1 ] && [ "${#built_images[@]}" -gt 0 ]; then
      log "removing images ${built_images[*]}"
      docker image rm "${built_images[@]}" >/dev/null
    fi
  fi
  if [ -n "$started_engine" ] && [ "$keep_engine" = 0 ]; then
    log "stopping the engine this script started (pid $started_engine)"
    kill "$started_engine" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$started_engine" 2>/dev/null || break; sleep 0.5; done
  fi
  # the bind-mounted run directory belongs to the calling user, so plain rm works
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# 1. the engine
# ---------------------------------------------------------------------------------------------
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >"$work/apt.log" 2>&1 \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$work/apt.log" 2>&1 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >>"$work/apt.log" 2>&1; } \
    || { tail -20 "$work/apt.log" >&2; fail "apt-get install $* failed"; }
}

if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    if command -v docker >/dev/null 2>&1; then
      echo "docker_smoke: SKIP: no docker engine reachable by this user, and starting one needs root"
    else
      echo "docker_smoke: SKIP: no container engine (docker) and no root to install one"
    fi
    exit 0
  fi
  if ! command -v dockerd >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 \
      || { echo "docker_smoke: SKIP: no container engine and no apt-get to install Debian's docker.io"; exit 0; }
    log "installing docker.io with apt-get"
    apt_install docker.io
  fi
  log "starting dockerd (log: $work/dockerd.log)"
  dockerd >"$work/dockerd.log" 2>&1 &
  started_engine=$!
  for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2; fail "dockerd did not come up in 60 s"; }
fi
log "engine: docker $(docker version -f '{{.Server.Version}}' 2>/dev/null) (client $(docker version -f '{{.Client.Version}}' 2>/dev/null))"

# The host's default run of this same tree (not of whatever copy is installed), in the background,
# on XLA's CPU attention path: the slim image has no C++ compiler, so the container runs that path
# too (the native CPU kernel is compiled on first use where a compiler exists)
# while the image is made.
mkdir -p "$work/host" "$work/runs"
(cd "$work/host" && PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" MEANFIELD_TF_NATIVE=off \
   "$python" -m meanfield_tf train --out runs/default >"$work/host.out" 2>&1) &
host_pid=$!

# ---------------------------------------------------------------------------------------------
# 2. the base image
# ---------------------------------------------------------------------------------------------
official="$(sed -n 's/^ARG PYTHON_IMAGE=//p' "$root/Dockerfile" | head -1)"
[ -n "$official" ] || fail "the Dockerfile has no 'ARG PYTHON_IMAGE=<default>' line"

# The first Debian mirror serving bookworm in the host's apt sources (deb822 .sources files or
# one-line .list files); printed as a URL.
debian_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
         { uris = ""; suites = ""
           for (i = 1; i <= NF; i++) {
             if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
             if ($i ~ /^Suites:/) { suites = $i }
           }
           if (uris != "" && suites ~ /(^|[ \t])bookworm([ \t]|$)/) { split(uris, u, /[ \t]+/); print u[1]; exit }
         }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { sub(/\[[^]]*\][ \t]*/, ""); if ($3 == "bookworm") { print $2; exit } }' "$f"
  done
}

# pip settings that reach a package index over the network (index-url, extra-index-url,
# trusted-host), as the host's pip resolves them (environment over configuration files);
# local file indexes and find-links directories do not exist inside the image.
pip_index_conf() {
  "$python" -m pip config list 2>/dev/null | "$python" -c '
import re, sys
seen = {}
for line in sys.stdin:
    m = re.match(r"^(:env:|global|install)\.([a-z-]+)=\x27(.*)\x27$", line.strip())
    if m and m.group(2) in ("index-url", "extra-index-url", "trusted-host"):
        key, value = m.group(2), m.group(3)
        if m.group(1) == ":env:" or key not in seen:
            seen[key] = value
print("[global]")
for key, value in seen.items():
    if key != "trusted-host":
        value = " ".join(v for v in value.split() if v.startswith(("http://", "https://")))
    if value:
        print(f"{key} = {value}")
'
}

host_ca_bundle() {
  local c
  for c in "${PIP_CERT:-}" "$("$python" -m pip config get global.cert 2>/dev/null || true)" \
           "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    [ -n "$c" ] && [ -f "$c" ] && { echo "$c"; return; }
  done
}

build_local_base() {
  [ "$(id -u)" = 0 ] || fail "cannot pull $official and building a local base needs root (debootstrap); pass --base IMAGE"
  command -v debootstrap >/dev/null 2>&1 || { log "installing debootstrap with apt-get"; apt_install debootstrap; }
  local mirror rootfs ca conf keyring=()
  mirror="$(debian_mirror | sed -n 1p)"
  [ -n "$mirror" ] || fail "no Debian bookworm mirror in /etc/apt/sources.list*; cannot build a local base"
  rootfs="$cache/bookworm-python3.11-minbase"
  mkdir -p "$cache"
  if [ ! -f "$rootfs/.complete" ]; then
    log "debootstrap bookworm (minbase + python3) from $mirror into $rootfs"
    rm -rf "$rootfs"
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] \
      && keyring=(--keyring /usr/share/keyrings/debian-archive-keyring.gpg)
    debootstrap --variant=minbase "${keyring[@]}" \
      --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
      || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    # a virtual environment gives `python` on PATH and sidesteps Debian's EXTERNALLY-MANAGED pip
    chroot "$rootfs" /usr/bin/python3 -m venv /opt/venv
    date -u +%FT%TZ >"$rootfs/.complete"
  else
    log "reusing the cached bookworm root file system $rootfs"
  fi
  # host-specific settings, refreshed on every run: the CA bundle and pip's network indexes
  ca="$(host_ca_bundle)"
  rm -f "$rootfs/etc/ssl/certs/host-ca-bundle.crt"
  [ -z "$ca" ] || cp "$ca" "$rootfs/etc/ssl/certs/host-ca-bundle.crt"
  conf="$(pip_index_conf)"
  [ -z "$ca" ] || conf="$conf"$'\n'"cert = /etc/ssl/certs/host-ca-bundle.crt"
  printf '%s\n' "$conf" >"$rootfs/etc/pip.conf"
  local id
  id="$({ cat "$rootfs/.complete" "$rootfs/etc/pip.conf"; [ -z "$ca" ] || cat "$ca"; } \
        | sha256sum | cut -c1-12)"
  base="meanfield-tf-base:bookworm-$id"
  if ! docker image inspect "$base" >/dev/null 2>&1; then
    log "importing $rootfs as $base"
    tar -C "$rootfs" --exclude=./.complete -c . | docker import \
      --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["python"]' - "$base" >/dev/null
    built_images+=("$base")
  fi
}

if [ -z "$base" ]; then
  if docker image inspect "$official" >/dev/null 2>&1 \
     || timeout 300 docker pull -q "$official" >"$work/pull.log" 2>&1; then
    base="$official"
  else
    log "cannot pull $official ($(tail -1 "$work/pull.log" | cut -c1-120)); building a local bookworm base"
    build_local_base
  fi
fi
docker image inspect "$base" >/dev/null 2>&1 || fail "base image $base does not exist"
log "base image: $base"

# ---------------------------------------------------------------------------------------------
# 3. the images
# ---------------------------------------------------------------------------------------------

build() {  # build VARIANT TAG
  local t=$SECONDS
  log "docker build VARIANT=$1 -> $2"
  docker build --network host --build-arg "PYTHON_IMAGE=$base" --build-arg "VARIANT=$1" \
    -t "$2" "$root" >"$work/build-$1.log" 2>&1 \
    || { tail -30 "$work/build-$1.log" >&2; fail "docker build of the $1 image failed (log above)"; }
  built_images+=("$2")
  log "built $2 in $((SECONDS - t)) s"
}
build cpu "$tag:cpu"

# ---------------------------------------------------------------------------------------------
# 4. inside the image, networking off
# ---------------------------------------------------------------------------------------------
uid="$(id -u)"; gid="$(id -g)"
log "a. default train in the container as $uid:$gid into the mounted $work/runs"
docker run --rm --name "$run_id-train" --network none --user "$uid:$gid" \
  -v "$work/runs:/work/runs" "$tag:cpu" train --out runs/default >"$work/container.out" 2>&1 \
  || { tail -20 "$work/container.out" >&2; fail "the container's default train failed"; }

wait "$host_pid" || { tail -20 "$work/host.out" >&2; host_pid=""; fail "the host's default train failed"; }
host_pid=""

# the printed loss lines, without the wall time (which differs from run to run)
losses() { { grep -E 'loss|W2' "$1" || true; } | sed -E 's/; wall time [0-9.]+ s//'; }
losses "$work/host.out" >"$work/host.loss"
losses "$work/container.out" >"$work/container.loss"
[ -s "$work/host.loss" ] || fail "the host's train printed no loss lines"
if ! diff -u "$work/host.loss" "$work/container.loss"; then
  fail "the container's printed losses differ from the host's (diff above)"
fi
final="$({ grep -E '^step [0-9]+: (training )?loss' "$work/container.out" || true; } | tail -1 | sed -E 's/.* -> ([^ ]+).*/\1/')"
log "printed losses equal ($(wc -l <"$work/host.loss") lines); final: $final"
"$python" - "$work/host/runs/default/metrics.jsonl" "$work/runs/default/metrics.jsonl" <<'EOF' \
  || fail "the logged metrics differ between host and container"
import json, sys
def values(path):
    rows = [json.loads(line) for line in open(path)]
    return [(r.get("kind"), r.get("step"), r.get("loss"), r.get("grad_norm"), r.get("w2"))
            for r in rows]
host, box = values(sys.argv[1]), values(sys.argv[2])
if host != box:
    bad = next(i for i, (a, b) in enumerate(zip(host, box)) if a != b) if len(host) == len(box) else "length"
    sys.exit(f"metrics.jsonl: first difference at row {bad}")
print(f"[docker_smoke] metrics.jsonl: {len(host)} rows of loss, grad_norm, w2 are equal floats")
EOF
owner="$(stat -c '%u:%g' "$work/runs/default")"
[ "$owner" = "$uid:$gid" ] || fail "the run directory on the volume is owned by $owner, not the calling user $uid:$gid"
bad_files="$(find "$work/runs" \( ! -uid "$uid" -o ! -gid "$gid" \) -print -quit)"
[ -z "$bad_files" ] || fail "files on the volume not owned by $uid:$gid: $bad_files"
log "the run directory and all its files on the host are owned by the calling user $uid:$gid"

image_user="$(docker image inspect -f '{{.Config.User}}' "$tag:cpu")"
log "b+c. in parallel: a short train as the image's user ($image_user) into the named volume" \
    "$run_id-runs, and the smoke tests in the image: $smoke_tests"
docker volume create "$run_id-runs" >/dev/null
docker run --rm --name "$run_id-user" --network none -v "$run_id-runs:/work/runs" "$tag:cpu" \
  train --quiet --out runs/short train.steps=10 >"$work/user.out" 2>&1 &
user_pid=$!
# shellcheck disable=SC2086  # the test list is a word list
docker run --rm --name "$run_id-tests" --network none -w /opt/meanfield_tf --entrypoint python \
  "$tag:cpu" -m pytest -q -p no:cacheprovider $smoke_tests >"$work/tests.out" 2>&1 \
  || { tail -30 "$work/tests.out" >&2; fail "smoke tests failed in the image"; }
log "smoke tests: $(tail -1 "$work/tests.out")"
wait "$user_pid" || { tail -20 "$work/user.out" >&2; user_pid=""; fail "the image's user could not train into the volume"; }
user_pid=""
if grep -l 'Matplotlib created a temporary' "$work/container.out" "$work/user.out"; then
  fail "matplotlib found no writable config directory in the image (MPLCONFIGDIR)"
fi
vol_owner="$(docker run --rm --name "$run_id-stat" --network none -v "$run_id-runs:/work/runs" \
  --entrypoint stat "$tag:cpu" -c '%u' /work/runs/short/metrics.jsonl)"
[ -n "$vol_owner" ] && [ "$vol_owner" != 0 ] \
  || fail "the image runs as root (the volume's files are owned by uid '$vol_owner')"
log "the image's default user is uid $vol_owner (non-root) and wrote its run through the volume"

if docker run --rm --name "$run_id-exp-help" --network none "$tag:cpu" experiment --help >/dev/null 2>&1; then
  log "d. quick experiment: meanfield-tf experiment run mean-field-limit --quick"
  docker run --rm --name "$run_id-exp" --network none -v "$run_id-runs:/work/runs" "$tag:cpu" \
    experiment run mean-field-limit --quick >"$work/exp.out" 2>&1 \
    || { tail -30 "$work/exp.out" >&2; fail "the quick experiment failed in the image"; }
  log "$(tail -1 "$work/exp.out")"
else
  log "d. SKIP quick experiment: this image has no 'meanfield-tf experiment' command yet"
fi

if [ "$cuda" = 1 ]; then
  df -h /var/lib/docker 2>/dev/null | tail -1 | awk '{print "[docker_smoke] disk free before the CUDA build: " $4}'
  build cuda "$tag:cuda"
  docker run --rm --name "$run_id-cuda" --network none --entrypoint python "$tag:cuda" \
    -c 'import jax, jax_plugins.xla_cuda12 as p; print("jax", jax.__version__, "cuda plugin", p.__name__)' \
    >"$work/cuda.out" 2>&1 || { tail -20 "$work/cuda.out" >&2; fail "the CUDA image cannot import its CUDA plugin"; }
  log "$(tail -1 "$work/cuda.out") (no GPU needed: import only)"
fi

# ---------------------------------------------------------------------------------------------
# 5. sizes
# ---------------------------------------------------------------------------------------------
for image in $(printf '%s\n' "$base" "${built_images[@]}" | awk '!seen[$0]++'); do
  size="$(docker image inspect -f '{{.Size}}' "$image")"
  printf '[docker_smoke] image %-40s %6d MB\n' "$image" "$((size / 1000000))"
done
log "PASS: the image reproduces the host's default run (final loss $final), runs as a non-root user, writes through the volume and passes its smoke tests"
exit 0
}
