# syntax=docker/dockerfile:1
# A fedws worker node: CPU torch, no dev tools, a non-root user, data mounted read-only,
# the token from a secret file. See docs/deployment.md.
#
#   docker build -t fedws-node:0.1.0 .                    # torch from the PyTorch CPU index
#   docker build --build-arg TORCH_WHEEL=torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
#                -t fedws-node:0.1.0 .                    # or a wheel you put in deploy/wheels/
#   docker build --target demo -t fedws-demo:0.1.0 .      # + scikit-learn, matplotlib, examples/
#
# Targets: `node` (the default, last stage) and `demo` (the coordinator of compose.yaml).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
# The pin matches the Makefile's TORCH_PIN; tests/deploy checks they agree.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A file name in deploy/wheels/: install that wheel instead of asking the index.
ARG TORCH_WHEEL=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1
SHELL ["/bin/sh", "-eu", "-c"]

# CPU torch first: fedws's bare `torch>=2.3` would otherwise pull the CUDA wheels.
COPY deploy/wheels/ /tmp/wheels/
RUN if [ -n "${TORCH_WHEEL}" ]; then \
        pip install "/tmp/wheels/${TORCH_WHEEL}"; \
    else \
        pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi; \
    python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')"; \
    rm -rf /tmp/wheels

WORKDIR /srv/fedws
COPY pyproject.toml README.md ./
COPY fedws/ ./fedws/
RUN pip install . && rm -rf build fedws.egg-info

# The node's user owns nothing it runs: only the mount points it writes to.
RUN groupadd --system --gid 10001 fedws; \
    useradd --system --uid 10001 --gid fedws --home-dir /home/fedws --create-home --shell /usr/sbin/nologin fedws; \
    mkdir -p /srv/fedws/workers/data /srv/fedws/run; \
    chown fedws:fedws /srv/fedws/workers/data /srv/fedws/run
COPY workers/*.toml workers/README.md ./workers/
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/fedws-entrypoint
COPY --chmod=0755 deploy/healthcheck.sh /usr/local/bin/fedws-healthcheck

# The port the node listens on inside the container; the health check asks it.
ENV FEDWS_PORT=8777
EXPOSE 8777
# The data a node serves: mount it read-only (compose.yaml, deploy/k8s/).
VOLUME ["/srv/fedws/workers/data", "/srv/fedws/run"]
ENTRYPOINT ["/usr/local/bin/fedws-entrypoint"]


# The coordinator of compose.yaml: prepares the digits shards and runs the demo.
FROM base AS demo
# The versions come from pyproject.toml's demo extra (a pip constraint file pins them further).
# hadolint ignore=DL3013
RUN pip install ".[demo]" && rm -rf build fedws.egg-info
COPY examples/ ./examples/
RUN mkdir -p /srv/fedws/examples/output /home/fedws/.config/matplotlib; \
    chown fedws:fedws /srv/fedws/examples/output /home/fedws/.config/matplotlib
USER 10001:10001
CMD ["python", "examples/federated_demo.py", "--help"]


# The node (default target).
FROM base AS node
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["/usr/local/bin/fedws-healthcheck"]
# A config mounted at /etc/fedws/node.toml (deploy/k8s/ mounts a ConfigMap there).
CMD ["worker", "--config", "/etc/fedws/node.toml", "--host", "0.0.0.0", "--port", "8777"]
