# syntax=docker/dockerfile:1
# meanfield_tf with a pinned JAX, for reproducing runs on NVIDIA GPUs (default) or CPU.
#
#   docker build -t meanfield-tf:cuda .                              # CUDA 12 (jax[cuda12])
#   docker build --build-arg VARIANT=cpu -t meanfield-tf:cpu .       # CPU only, smaller
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" \
#       -v "$PWD/runs:/work/runs" -v "$PWD/configs:/work/configs:ro" \
#       meanfield-tf:cuda train --config configs/train.yaml
#
# The CUDA runtime, cuDNN and NCCL come from NVIDIA's pip wheels (requirements/pinned-cuda.txt);
# the host needs only the NVIDIA driver and the NVIDIA Container Toolkit (`--gpus all`).
# The install step is scripts/install_pinned.sh, the same script used without Docker.
# The slim base has no C++ compiler: on the CPU the image runs XLA's attention path, not the
# native kernel that meanfield_tf compiles on first use where g++ exists (see docs/performance.md;
# each run's manifest.json records which path ran).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cuda

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/opt/matplotlib

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /opt/meanfield_tf

# 1. the pinned dependencies (a layer that survives code changes)
COPY requirements/ requirements/
COPY scripts/install_pinned.sh scripts/install_pinned.sh
RUN scripts/install_pinned.sh "${VARIANT}" --deps-only

# 2. the package itself, without touching any pinned version
COPY pyproject.toml README.md ./
COPY meanfield_tf/ meanfield_tf/
COPY tests/ tests/
# Any user may run the image (`--user "$(id -u):$(id -g)"` so that files on a mounted volume
# belong to the caller): matplotlib's font cache is built here, in a directory every uid may use.
RUN scripts/install_pinned.sh "${VARIANT}" --package-only \
    && mkdir -m 1777 /opt/matplotlib \
    && python -c "import matplotlib.font_manager" \
    && useradd --create-home --uid 1000 meanfield \
    && mkdir -p /work/runs \
    && chown -R meanfield:meanfield /work

USER 1000:1000
WORKDIR /work
VOLUME ["/work/runs"]

ENTRYPOINT ["meanfield-tf"]
CMD ["--help"]
