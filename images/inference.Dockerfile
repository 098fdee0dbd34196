# syntax=docker/dockerfile:1
# The inference server: the trainer image (same torch, CUDA libraries and diffusers) with
# `dreambooth serve` as its entrypoint. Build the trainer image first, then from the repository root:
#   docker build -f images/inference.Dockerfile \
#     --build-arg TRAINER_IMAGE=<registry>/dreambooth/trainer:0.1.0 \
#     -t <registry>/dreambooth/inference:0.1.0 .
ARG TRAINER_IMAGE=dreambooth/trainer:0.1.0

FROM ${TRAINER_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="dreambooth-inference" \
      org.opencontainers.image.description="The DreamBooth inference server (dreambooth serve)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
USER 1000:1000
EXPOSE 8080
ENTRYPOINT ["dreambooth", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
