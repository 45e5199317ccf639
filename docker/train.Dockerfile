# syntax=docker/dockerfile:1
# galmorph training image: PyTorch on CUDA 13 plus everything `galmorph train`, `evaluate`
# and `export` need (export's parity check runs onnxruntime-gpu, pinned like the serving
# image). Its entrypoint runs download -> train -> evaluate -> export into /models.
#
# The torch wheel comes from PyTorch's CUDA 13.0 index and brings its own CUDA, cuDNN and
# NCCL libraries as wheels, so the runtime base is the small CUDA "base" image (driver
# plumbing only) rather than cudnn-runtime: no second copy of cuDNN and cuBLAS.
# CUDA 13 needs an NVIDIA driver >= 580 on the host.
#
# Build from the repository root:  docker build -f docker/train.Dockerfile -t galmorph-train .
# CPU-only:  --build-arg RUNTIME_IMAGE=ubuntu:24.04 \
#            --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# --- build: torch from the CUDA wheel index, then galmorph[train,serve] ----------------------
FROM ubuntu:24.04 AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Ubuntu's archive drops superseded package versions, so exact apt pins would break rebuilds;
# the ubuntu:24.04 tag pins the release and with it Python 3.12.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
# The largest layer (torch and its CUDA wheels, several GB) first and alone, so it is cached
# across every code or dependency change.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
# The extras' requirements read from pyproject.toml, constrained to the serving image's pins
# (same numpy, same onnxruntime-gpu); torch is already satisfied.
COPY pyproject.toml README.md /src/
COPY docker/requirements-serve.txt /tmp/requirements-serve.txt
RUN python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['train'] + p['optional-dependencies']['serve']))" \
        > /tmp/requirements-train.txt \
    && pip install --constraint /tmp/requirements-serve.txt -r /tmp/requirements-train.txt
COPY galmorph /src/galmorph
COPY service /src/service
COPY model /src/model
COPY training /src/training
COPY scoring /src/scoring
RUN pip install --no-deps /src \
    && pip uninstall -y pip \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# --- runtime ------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# Same reason as above for not pinning apt versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 galmorph \
    && useradd --system --uid 10001 --gid galmorph --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin galmorph \
    && install -d -o galmorph -g galmorph /data /runs /models
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 docker/entrypoint-train.sh /usr/local/bin/galmorph-train
# Named volumes mounted on /data, /runs and /models start out owned by uid 10001 (the
# directories above), the same uid as the serving image, so serve can read what train wrote.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
# Numeric, so a host or orchestrator can verify the user is not root without /etc/passwd.
USER 10001:10001
WORKDIR /runs
ENTRYPOINT ["/usr/local/bin/galmorph-train"]
