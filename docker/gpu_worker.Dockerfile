# syntax=docker/dockerfile:1.7
#
# InstructEdit edit worker: Celery (queue "edits") + InstructPix2Pix.
#
# Targets:
#   cuda (default, last stage)  CUDA torch + xformers on an nvidia/cuda base.
#   cpu                         CPU torch, no xformers, python slim base; for
#                               machines without a GPU (compose profile "cpu").
#
#   docker build -f docker/gpu_worker.Dockerfile -t instructedit/gpu-worker:dev .
#   docker build -f docker/gpu_worker.Dockerfile --target cpu -t instructedit/gpu-worker:dev-cpu .
#
# Dependencies come from the lock files in requirements/ (`make lock`), installed
# hash-checked and with --no-deps, so that pip resolves nothing outside them:
# torch-cpu.txt + worker.txt (cpu), worker-gpu.txt (cuda: xformers included),
# bake.txt (weights stage). Only the CUDA torch itself comes from TORCH_INDEX_URL.
#
# Build args (the torch / xformers / CUDA pins move together):
#   TORCH_VERSION     torch release, must equal pyproject's torch pin (2.13.0)
#                     and requirements/torch-cpu.txt's
#   TORCH_CUDA        PyTorch wheel variant for the cuda target (cu128). It
#                     must match the CUDA major of the xformers build (the
#                     xformers 0.0.35 wheel is built with CUDA 12.8 and links
#                     libcudart.so.12) and the nvidia/cuda base below (12.8.1).
#   TORCH_INDEX_URL   PyTorch wheel index for that variant.
#   TORCH_CPU_INDEX_URL  where the cpu target gets requirements/torch-cpu.txt
#                     (the PyTorch CPU index, or a mirror of it).
#   XFORMERS_VERSION  the xformers of pyproject's `gpu` extra and of the lock
#                     (checked, not chosen, here: the build fails if they
#                     differ). 0.0.35 declares `torch>=2.10` (stable-ABI build);
#                     the build fails if its C++/CUDA extension does not load
#                     against the torch above.
#   BAKE_MODELS       space separated hub ids (optionally @revision) whose
#                     weights are baked into /models/baked (see
#                     docker/bake_models.py); empty (default) = weights come
#                     from the HF_HOME cache volume at run time.
#   BAKE_ALLOW_PATTERNS / BAKE_IGNORE_PATTERNS  file globs for BAKE_MODELS.
#
# Gated/private models: --secret id=hf_token,env=HF_TOKEN (BuildKit secret,
# never stored in a layer). Nothing secret is baked into the image.

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ARG XFORMERS_VERSION=0.0.35

############################################################################
# weights: optional baked model snapshots (independent of the code, so the
# layer survives code changes)
############################################################################
FROM python:3.11.14-slim-bookworm AS weights
ARG BAKE_MODELS=""
# No defaults here: unset means bake_models.py's defaults, "" means no filter.
ARG BAKE_ALLOW_PATTERNS
ARG BAKE_IGNORE_PATTERNS
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY requirements/bake.txt /tmp/requirements-bake.txt
COPY docker/bake_models.py /usr/local/bin/bake_models.py
RUN --mount=type=secret,id=hf_token,required=false \
    if [ -n "${BAKE_MODELS}" ]; then \
        pip install --require-hashes --no-deps -r /tmp/requirements-bake.txt \
        && python /usr/local/bin/bake_models.py /models/baked "${BAKE_MODELS}"; \
    else \
        mkdir -p /models/baked; \
    fi

############################################################################
# cpu-base / cuda-base: what both builder and runtime of a flavour share
############################################################################
FROM python:3.11.14-slim-bookworm AS cpu-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS cuda-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu 24.04's Python 3.12. The CUDA user-space libraries (cuBLAS, cuDNN,
# NCCL, ...) come from torch's nvidia-* wheels; the base image contributes the
# CUDA driver-compat setup and NVIDIA_* container-toolkit variables.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3.12 \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

############################################################################
# cpu-builder: venv with CPU torch + the worker extra
############################################################################
FROM cpu-base AS cpu-builder
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
# torch, the CPU build, hash-checked from requirements/torch-cpu.txt (its own
# layer: the largest, and the one that changes least).
COPY requirements/torch-cpu.txt requirements/
RUN python -m venv /opt/venv \
    && pip install --require-hashes --no-deps --index-url "${TORCH_CPU_INDEX_URL}" \
        -r requirements/torch-cpu.txt
# Every other dependency from the lock, hash-checked; --no-deps: nothing outside
# the lock is resolved, so nothing can swap torch for another build.
COPY requirements/worker.txt requirements/
RUN pip install --require-hashes --no-deps -r requirements/worker.txt \
    && python -c "import torch; assert torch.version.cuda is None, torch.__version__; print('torch', torch.__version__)"
COPY pyproject.toml README.md* ./
COPY services ./services
RUN test -f README.md || : > README.md; \
    pip install --no-deps --no-build-isolation /src \
    && pip check \
    && python -c "import torch, services.gpu_worker; assert torch.__version__ == '${TORCH_VERSION}+cpu', torch.__version__"

############################################################################
# cuda-builder: venv with CUDA torch + xformers + the worker extra
############################################################################
FROM cuda-base AS cuda-builder
ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_VERSION
ARG TORCH_CUDA
ARG XFORMERS_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
# The CUDA build of torch first (its own layer: the largest, and the one that
# changes least), with the CUDA libraries (nvidia-*) and triton that it pins
# exactly. This is the one install not hash-checked (see docs/DEPLOYMENT.md).
RUN python3.12 -m venv /opt/venv \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}+${TORCH_CUDA}"
# Then every other dependency, xformers included, from the lock, hash-checked;
# --no-deps: nothing outside the lock is resolved, so nothing can swap the CUDA
# torch. The import check fails the build on a torch/xformers mismatch.
WORKDIR /src
COPY requirements/worker-gpu.txt requirements/
RUN pip install --require-hashes --no-deps -r requirements/worker-gpu.txt \
    && python -c "import torch, xformers; \
assert torch.version.cuda, 'torch is a CPU build: ' + torch.__version__; \
assert xformers.__version__ == '${XFORMERS_VERSION}', 'xformers ' + xformers.__version__ + ' is not the pinned ${XFORMERS_VERSION}'; \
assert xformers._has_cpp_library, 'xformers C++/CUDA extension does not load against torch ' + torch.__version__; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'xformers', xformers.__version__)"
COPY pyproject.toml README.md* ./
COPY services ./services
RUN test -f README.md || : > README.md; \
    pip install --no-deps --no-build-isolation /src \
    && pip check \
    && python -c "import torch, xformers, services.gpu_worker; assert torch.__version__ == '${TORCH_VERSION}+${TORCH_CUDA}', torch.__version__"

############################################################################
# cpu: runtime for machines without a GPU
############################################################################
FROM cpu-base AS cpu
LABEL org.opencontainers.image.title="instructedit-gpu-worker" \
      org.opencontainers.image.description="InstructEdit edit worker (CPU torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
# The shared lock dir and HF cache exist in the image with the app user as
# owner, so that fresh named volumes mounted there inherit that ownership.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
       --shell /usr/sbin/nologin app \
    && mkdir -p /cache/huggingface /var/lib/instructedit/gpu-locks /models/local \
    && chown app:app /cache/huggingface /var/lib/instructedit/gpu-locks
ENV HOME=/home/app \
    HF_HOME=/cache/huggingface \
    INSTRUCTEDIT_BAKED_MODELS_DIR=/models/baked \
    INSTRUCTEDIT_DEVICE=cpu
COPY --from=cpu-builder /opt/venv /opt/venv
COPY --from=weights /models/baked /models/baked
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/instructedit-entrypoint
WORKDIR /home/app
USER 10001:10001
HEALTHCHECK --interval=60s --timeout=30s --start-period=15m --retries=5 \
    CMD ["/bin/sh", "-c", "celery --app services.common.celery_probe inspect ping --destination \"celery@${HOSTNAME}\" --timeout 10"]
ENTRYPOINT ["/usr/local/bin/instructedit-entrypoint"]
CMD ["celery", "--app", "services.gpu_worker.celery_worker", "worker", "--queues", "edits", "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO"]

############################################################################
# cuda (default): runtime with one GPU per worker process
############################################################################
FROM cuda-base AS cuda
LABEL org.opencontainers.image.title="instructedit-gpu-worker" \
      org.opencontainers.image.description="InstructEdit edit worker (CUDA torch + xformers)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
       --shell /usr/sbin/nologin app \
    && mkdir -p /cache/huggingface /var/lib/instructedit/gpu-locks /models/local \
    && chown app:app /cache/huggingface /var/lib/instructedit/gpu-locks
ENV HOME=/home/app \
    HF_HOME=/cache/huggingface \
    INSTRUCTEDIT_BAKED_MODELS_DIR=/models/baked \
    INSTRUCTEDIT_DEVICE=cuda
COPY --from=cuda-builder /opt/venv /opt/venv
COPY --from=weights /models/baked /models/baked
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/instructedit-entrypoint
WORKDIR /home/app
USER 10001:10001
HEALTHCHECK --interval=60s --timeout=30s --start-period=15m --retries=5 \
    CMD ["/bin/sh", "-c", "celery --app services.common.celery_probe inspect ping --destination \"celery@${HOSTNAME}\" --timeout 10"]
ENTRYPOINT ["/usr/local/bin/instructedit-entrypoint"]
CMD ["celery", "--app", "services.gpu_worker.celery_worker", "worker", "--queues", "edits", "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO"]
