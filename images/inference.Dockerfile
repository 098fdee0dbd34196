# syntax=docker/dockerfile:1
# The inference server: the trainer image (same CUDA, torch and diffusers) with `dreambooth serve`
# as its entrypoint. Build the trainer image first, then from the repository root:
#   docker build -f images/inference.Dockerfile \
#     --build-arg TRAINER_IMAGE=<registry>/dreambooth/trainer:0.1.0 \
#     -t <registry>/dreambooth/inference:0.1.0 .
ARG TRAINER_IMAGE=dreambooth/trainer:0.1.0

FROM ${TRAINER_IMAGE}
USER 1000:1000
EXPOSE 8080
ENTRYPOINT ["dreambooth", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
