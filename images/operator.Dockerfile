# syntax=docker/dockerfile:1
# The DreamboothJob operator: kopf + the Kubernetes client + the spec models. No torch.
# Build from the repository root:
#   docker build -f images/operator.Dockerfile -t <registry>/dreambooth/operator:0.1.0 .
# Layers: operator-requirements.txt first, the project's own wheel (installed --no-deps) last.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# uv and setuptools, used by the stages below and never shipped.
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

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --no-log-init --uid 1000 --user-group --home-dir /tmp --no-create-home --shell /usr/sbin/nologin dreambooth
COPY images/operator-requirements.txt images/constraints.txt images/build-requirements.txt /opt/dreambooth/
ARG PIP_INDEX_URL
ARG PIP_CERT
ARG SSL_CERT_FILE
ARG UV_DEFAULT_INDEX
ARG UV_CACHE_DIR
# uv lives in /tmp/tools for this step only.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=cache,target=/root/.cache/uv,sharing=locked \
    python3 -m venv /tmp/tools \
    && /tmp/tools/bin/pip install --disable-pip-version-check -r /opt/dreambooth/build-requirements.txt \
    && export UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never \
    && /tmp/tools/bin/uv venv --python python3 /opt/venv \
    && /tmp/tools/bin/uv pip install --python /opt/venv/bin/python --compile-bytecode \
        -r /opt/dreambooth/operator-requirements.txt -c /opt/dreambooth/constraints.txt \
    && rm -rf /tmp/tools

FROM runtime
# The project was installed --no-deps: the operator needs only operator-requirements.txt, and its
# handlers must import with nothing more (checked here).
COPY --from=product /opt/venv/ /opt/venv/
RUN PYTHONDONTWRITEBYTECODE=1 /opt/venv/bin/python -c "import dreambooth_operator.handlers"
# The chart runs the pod with runAsUser 1000, a read-only root filesystem and /tmp as emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /tmp
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="dreambooth-operator" \
      org.opencontainers.image.description="The DreamboothJob operator (kopf)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
USER 1000:1000
EXPOSE 8080 9464
ENTRYPOINT ["kopf", "run"]
CMD ["--module=dreambooth_operator.handlers", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
