# syntax=docker/dockerfile:1
# The DreamboothJob operator: kopf + the Kubernetes client + the spec models. No torch.
# Build from the repository root:
#   docker build -f images/operator.Dockerfile -t <registry>/dreambooth/operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY images/operator-requirements.txt images/constraints.txt images/
RUN /opt/venv/bin/pip install -r images/operator-requirements.txt -c images/constraints.txt
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
COPY operator/ operator/
COPY cli/ cli/
COPY serving/ serving/
# --no-deps: the project's own dependency list is the trainer's (torch & co); the operator needs
# only operator-requirements.txt.
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/python -c "import dreambooth_operator.handlers"

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The chart runs the pod with runAsUser 1000, a read-only root filesystem and /tmp as emptyDir.
USER 1000:1000
EXPOSE 8080 9464
ENTRYPOINT ["kopf", "run"]
CMD ["--module=dreambooth_operator.handlers", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
