# syntax=docker/dockerfile:1
# The HOPE memory server. One file, two variants, chosen by build argument:
#
#   docker build -t hope-memory-server:cpu .                                  # VARIANT=cpu
#   docker build -t hope-memory-server:cuda --build-arg VARIANT=cuda .        # CUDA wheels
#   docker build --build-arg VARIANT=cuda --build-arg CUDA_WHEELS=cu126 .     # another CUDA
#
# Configuration only through the environment (HOPE_*, see docs/server.md); the command takes
# no flags. The bundled checkpoint (hope_core/assets/checkpoint/, package data) is inside the
# image: the build fails if it has not been trained yet (`hope train --config configs/bundled.toml`).
# See docs/deploy.md.

ARG PYTHON_VERSION=3.11
ARG VARIANT=cpu

# ---- torch, per variant: a virtual environment that later stages extend ----------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS torch-base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

FROM torch-base AS torch-cpu
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

FROM torch-base AS torch-cuda
ARG TORCH_VERSION=2.13.0
# the CUDA build of the wheels (cu126, cu128, cu130, ...: whichever download.pytorch.org lists
# for TORCH_VERSION and the hosts' driver supports); the CUDA libraries come as pip packages,
# the driver from the host (NVIDIA Container Toolkit)
ARG CUDA_WHEELS=cu128
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${CUDA_WHEELS}"

# ---- the package, installed (not editable) into the venv -------------------------------------
FROM torch-${VARIANT} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hope ./hope
COPY hope_core ./hope_core
COPY server ./server
RUN test -f hope_core/assets/checkpoint/model.safetensors \
    || { echo "hope_core/assets/checkpoint/ is empty: train the bundled checkpoint first" >&2; exit 1; }
# Data files the packages read at run time (the checkpoint, the tokenizer, the playground's
# static files) must be installed with the code: whatever pyproject's package-data leaves out
# is copied over, then the installed bundled checkpoint is loaded once.
RUN pip install . \
    && site="$(cd / && python -c 'import os, server; print(os.path.dirname(os.path.dirname(server.__file__)))')" \
    && for pkg in hope hope_core server; do \
         (cd "$pkg" && find . -type f ! -name '*.py' ! -name '*.pyc' ! -path '*/__pycache__/*' \
            -exec cp --parents --no-clobber {} "$site/$pkg/" \;); \
       done \
    && cd / && python -c "from hope_core.checkpoint import DEFAULT_CHECKPOINT as d, load_checkpoint; load_checkpoint(d); print('bundled checkpoint', d)"

# ---- runtime: the venv only, a non-root user -------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="HOPE memory server" \
      org.opencontainers.image.description="OpenAI-compatible server for HOPE, a language model that keeps learning per session" \
      io.hope.variant="${VARIANT}"
RUN groupadd --system --gid 10001 hope \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/hope --create-home --shell /usr/sbin/nologin hope \
    && mkdir -p /data && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
# HOPE_HOST: listen on every interface of the container. XDG_DATA_HOME: where the default
# SQLite store lives when HOPE_STORE is not set (one container alone; replicas use Redis).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/hope \
    XDG_DATA_HOME=/data \
    XDG_CACHE_HOME=/tmp/.cache \
    HOPE_HOST=0.0.0.0 \
    HOPE_PORT=8000 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/hope
EXPOSE 8000
# alive = /healthz answers (readiness, /readyz, also needs the store: the orchestrator's job)
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HOPE_PORT', '8000'), timeout=2)"]
# SIGTERM: stop accepting, finish in-flight requests for up to 5 s, abort the rest uncommitted
STOPSIGNAL SIGTERM
CMD ["hope", "serve"]
