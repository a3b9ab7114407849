#!/usr/bin/env bash
# Install meanfield_tf into the current Python environment with every dependency pinned.
#
#   scripts/install_pinned.sh [cpu|cuda] [--editable] [--deps-only | --package-only]
#
# cpu  (default): requirements/pinned-cpu.txt, the environment the test suite runs in.
# cuda          : requirements/pinned-cuda.txt, the same plus JAX's CUDA 12 plugin and the NVIDIA
#                 runtime wheels (needs an NVIDIA driver at run time, not at install time).
# --editable    : install the package itself in editable mode (for development).
# --deps-only   : only the pinned dependencies; --package-only: only the package (no dependency
#                 changes). The Dockerfile uses the two halves so that a code change does not
#                 re-download the dependencies.
#
# The Dockerfile runs this script, so the container recipe and a plain virtual environment
# install exactly the same thing:
#   python3.11 -m venv .venv && . .venv/bin/activate && scripts/install_pinned.sh cpu
set -euo pipefail

variant="cpu"
editable=""
deps=1
package=1
for arg in "$@"; do
  case "$arg" in
    cpu|cuda) variant="$arg" ;;
    --editable|-e) editable="-e" ;;
    --deps-only) package=0 ;;
    --package-only) deps=0 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "install_pinned.sh: unknown argument '$arg' (use cpu, cuda, --editable, --deps-only, --package-only)" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
requirements="$root/requirements/pinned-$variant.txt"

version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$version" in
  3.11|3.12|3.13) ;;
  *) echo "install_pinned.sh: Python $version is not supported (need 3.11 to 3.13)" >&2; exit 2 ;;
esac
if [ "$version" != "3.11" ]; then
  echo "install_pinned.sh: warning: the pins were resolved on Python 3.11, this is $version" >&2
fi

if [ "$deps" = 1 ]; then
  "$python" -m pip install --no-cache-dir -r "$requirements"
fi
if [ "$package" = 0 ]; then
  exit 0
fi
# the package itself, without letting pip change any pinned version
"$python" -m pip install --no-cache-dir --no-deps $editable "$root"
"$python" -m pip check
"$python" -c "import meanfield_tf, jax; print('meanfield_tf', meanfield_tf.__version__, 'jax', jax.__version__, 'devices', jax.devices())"
