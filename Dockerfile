# specdecpp server image.
#   GPU (default): docker build -t specdecpp:cuda .
#   CPU:           docker build --build-arg VARIANT=cpu -t specdecpp:cpu .
# Run: docker run --gpus all -p 8000:8000 -v specdecpp-cache:/data specdecpp:cuda [serve flags]
# The model cache ($SPECDECPP_HOME=/data) is a volume: the default pair is pulled and
# converted on first start (minutes), then reused.

ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG CPU_IMAGE=debian:bookworm-slim

# The CUDA base brings the NVIDIA container runtime settings (driver capabilities, visible
# devices); the torch CUDA wheel brings its own CUDA libraries.
# (ENV, not ARG: a stage's ARGs do not reach the stage built on it.)
FROM ${CUDA_IMAGE} AS base-cuda
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM ${CPU_IMAGE} AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM base-${VARIANT}
ARG TORCH_VERSION=2.13.0
# Another wheel index, e.g. https://download.pytorch.org/whl/cu126 for drivers older than CUDA 12.8's.
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SPECDECPP_HOME=/data \
    HF_HOME=/data/huggingface

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV

# torch first, from the variant's index: its own layer, cached across code changes.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL:-$TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY specdecpp specdecpp
COPY engine engine
COPY server server
COPY heads heads
RUN pip install . && pip check

# Non-root; the cache volume belongs to this user (uid 1000: match it on bind mounts).
RUN (userdel -r ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin specdecpp \
    && mkdir -p /data && chown specdecpp:specdecpp /data
# Numeric, so orchestrators (Kubernetes runAsNonRoot) can verify it is not root.
USER 1000:1000
VOLUME ["/data"]
EXPOSE 8000

# /health is 503 until the engine has loaded the models: allow a long start (first pull).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["specdecpp", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
