# syntax=docker/dockerfile:1
# The trainer: CUDA runtime, torch with NCCL (the nvidia-nccl wheel pinned in constraints.txt),
# Lightning, diffusers; entrypoint `dreambooth` (pods run `dreambooth train <config>`).
# Build from the repository root:
#   docker build -f images/trainer.Dockerfile -t <registry>/dreambooth/trainer:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Ubuntu's python3 (3.12 on 24.04) follows the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY images/constraints.txt images/
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
COPY operator/ operator/
COPY cli/ cli/
COPY serving/ serving/
RUN /opt/venv/bin/pip install -c images/constraints.txt . \
    && /opt/venv/bin/python -c "import torch, torch.distributed; assert torch.distributed.is_nccl_available()"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
# Caches go to /tmp, an emptyDir in the pods the operator creates.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    DREAMBOOTH_CACHE=/tmp/dreambooth \
    DREAMBOOTH_LOG_FORMAT=json
# UID 1000 = dreambooth_operator.builders.RUN_AS_USER (the pods' runAsUser).
USER 1000:1000
EXPOSE 29500
ENTRYPOINT ["dreambooth"]
CMD ["--help"]
