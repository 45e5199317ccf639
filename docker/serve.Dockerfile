# syntax=docker/dockerfile:1
# galmorph serving image: `galmorph serve` (FastAPI + onnxruntime-gpu), no torch.
#
# The runtime base must match the onnxruntime-gpu release pinned in requirements-serve.txt.
# onnxruntime-gpu 1.31.1 is built for CUDA 13.0 and cuDNN 9: its wheel records
# cuda_version 13.0, links libcudart.so.13 and libcublas.so.13, and its `cudnn` extra asks for
# nvidia-cudnn-cu13 9.x (ONNX Runtime's CUDA EP table: CUDA 13.x builds pair with cuDNN 9.x).
# CUDA 13 needs an NVIDIA driver >= 580 on the host.
#
# Build from the repository root:  docker build -f docker/serve.Dockerfile -t galmorph-serve .
# CPU-only image (about a tenth of the size, same code, plus OpenVINO for bf16 CPUs):
#   docker build -f docker/serve.Dockerfile --build-arg RUNTIME_IMAGE=ubuntu:24.04 \
#       --build-arg EXTRA_REQUIREMENTS=requirements-cpu.txt -t galmorph-serve:cpu .
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# --- build: a virtualenv with the pinned serving requirements and the galmorph wheel ---------
FROM ubuntu:24.04 AS build
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
# Dependencies first, in their own layer: code changes do not re-download onnxruntime.
# EXTRA_REQUIREMENTS: a second lock beside it, e.g. requirements-cpu.txt (OpenVINO, bf16 on
# CPUs that have it) for the CPU image; empty for the GPU image.
ARG EXTRA_REQUIREMENTS=""
COPY docker/requirements-serve.txt docker/requirements-cpu.txt /tmp/
RUN pip install --no-deps --only-binary=:all: -r /tmp/requirements-serve.txt \
    && if [ -n "$EXTRA_REQUIREMENTS" ]; then \
        pip install --no-deps --only-binary=:all: -r "/tmp/$EXTRA_REQUIREMENTS"; fi
COPY pyproject.toml README.md /src/
COPY galmorph /src/galmorph
COPY service /src/service
COPY model /src/model
COPY training /src/training
COPY scoring /src/scoring
RUN pip install --no-deps /src \
    && pip uninstall -y pip \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# --- runtime: CUDA 13 + cuDNN 9 libraries, Python, the virtualenv, nothing else -------------
FROM ${RUNTIME_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# Same reason as above for not pinning apt versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 galmorph \
    && useradd --system --uid 10001 --gid galmorph --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin galmorph \
    && install -d -o galmorph -g galmorph /models /data
COPY --from=build /opt/venv /opt/venv
# The compose file mounts the models volume read-only at /models; serve waits for the file
# (logging "waiting for model at ...") instead of crash-looping while training produces it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    GALMORPH_MODEL_PATH=/models/model.onnx \
    GALMORPH_WAIT_FOR_MODEL=true
# Numeric, so a host or orchestrator can verify the user is not root without /etc/passwd.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# Ready = model loaded, warmed up, provider verified; /readyz answers 503 until then, which
# urlopen raises as an error. Python's urllib, so the image needs no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["galmorph"]
# 0.0.0.0 of the container's own network: who reaches it is decided where the port is
# published. The compose files publish only the proxy, on 127.0.0.1 unless
# GALMORPH_BIND_ADDRESS says otherwise (then serve needs GALMORPH_API_KEY). /docs stays off
# (GALMORPH_DOCS), so no page of this image loads scripts from a CDN.
CMD ["serve", "--model", "/models/model.onnx", "--host", "0.0.0.0", "--port", "8000"]
