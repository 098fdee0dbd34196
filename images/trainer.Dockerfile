# syntax=docker/dockerfile:1
# The trainer: a slim Python base and torch from PyPI, whose wheels bring CUDA, cuDNN and NCCL
# (no CUDA base image: it would ship those libraries twice). Entrypoint `dreambooth`; pods run
# `dreambooth train <config>`. Build from the repository root:
#   docker build -f images/trainer.Dockerfile -t <registry>/dreambooth/trainer:0.1.0 .
# Layers: the dependencies (keyed by pyproject's dependency list and constraints.txt) come first
# and the project's own packages last, so a code change rebuilds a small layer, not gigabytes.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# uv and setuptools for the stages below; never shipped.
FROM ${PYTHON_IMAGE} AS tools
ARG PIP_INDEX_URL
ARG PIP_CERT
COPY images/build-requirements.txt /tmp/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/tools \
    && /opt/tools/bin/pip install --disable-pip-version-check -r /tmp/build-requirements.txt

# The project alone, in a venv laid out like the runtime's: every package pyproject.toml maps
# (the context is filtered by .dockerignore), byte-compiled.
FROM tools AS product
WORKDIR /src
COPY . .
RUN /opt/tools/bin/pip wheel --no-deps --no-build-isolation --disable-pip-version-check --wheel-dir /wheels . \
    && /opt/tools/bin/uv venv --python python3 /opt/venv \
    && /opt/tools/bin/uv pip install --python /opt/venv/bin/python --no-deps --offline --no-cache \
        --compile-bytecode /wheels/*.whl

# The runtime dependencies pyproject.toml declares, as a file that changes only when they do.
FROM tools AS requirements
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
    > /requirements.txt

FROM ${PYTHON_IMAGE} AS runtime
# The pods' user (dreambooth_operator.builders.RUN_AS_USER): a passwd entry for libraries that ask.
RUN useradd --no-log-init --uid 1000 --user-group --home-dir /tmp --no-create-home --shell /usr/sbin/nologin dreambooth \
    && mkdir -p /var/cache/dreambooth \
    && chown 1000:1000 /var/cache/dreambooth
COPY --from=requirements /requirements.txt /opt/dreambooth/requirements.txt
COPY images/constraints.txt images/build-requirements.txt /opt/dreambooth/
ARG PIP_INDEX_URL
ARG PIP_CERT
ARG SSL_CERT_FILE
ARG UV_DEFAULT_INDEX
ARG UV_CACHE_DIR
# uv lives in /tmp/tools and binutils (strip) is installed for this step only. What nothing runs
# is left out, as NVIDIA's own libraries already do: static archives (link time only), debug
# info (libtriton's alone is a quarter of a gigabyte) and the static symbol tables of torch's own
# libraries; dynamic symbols stay. (Not every library: strip breaks those patchelf rewrote, such
# as numpy's OpenBLAS.) torch must import with NCCL, and triton with its NVIDIA backend.
# hadolint ignore=DL3008
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=cache,target=/root/.cache/uv,sharing=locked \
    python3 -m venv /tmp/tools \
    && /tmp/tools/bin/pip install --disable-pip-version-check -r /opt/dreambooth/build-requirements.txt \
    && export UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never DEBIAN_FRONTEND=noninteractive \
    && /tmp/tools/bin/uv venv --python python3 /opt/venv \
    && /tmp/tools/bin/uv pip install --python /opt/venv/bin/python --compile-bytecode \
        -r /opt/dreambooth/requirements.txt -c /opt/dreambooth/constraints.txt \
    && rm -rf /tmp/tools \
    && find /opt/venv -name '*.a' -type f -delete \
    && apt-get update -qq && apt-get install -y -qq --no-install-recommends binutils \
    && find /opt/venv -name '*.so*' -type f -exec sh -c 'readelf -S "$1" 2>/dev/null | grep -q "[.]debug_info" && strip --strip-debug "$1" || true' _ {} \; \
    && find /opt/venv/lib/python3*/site-packages/torch/lib -name 'lib*.so' -type f -exec strip --strip-unneeded {} + \
    && apt-get purge -y -qq --auto-remove binutils && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log \
    && /opt/venv/bin/python -c "import torch, torch.distributed; assert torch.distributed.is_nccl_available(), 'torch has no NCCL'; print('NCCL', torch.cuda.nccl.version())" \
    && /opt/venv/bin/python -c "from triton.backends import backends; assert 'nvidia' in backends, backends"

FROM runtime
COPY --from=product /opt/venv/ /opt/venv/
# The pods mount emptyDirs at /tmp and /var/cache/dreambooth: the root filesystem stays read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/var/cache/dreambooth \
    HF_HOME=/var/cache/dreambooth/huggingface \
    DREAMBOOTH_CACHE=/var/cache/dreambooth/models \
    DREAMBOOTH_LOG_FORMAT=json
WORKDIR /tmp
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="dreambooth-trainer" \
      org.opencontainers.image.description="DreamBooth fine-tuning with PyTorch Lightning (dreambooth train)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
USER 1000:1000
EXPOSE 29500
ENTRYPOINT ["dreambooth"]
CMD ["--help"]
