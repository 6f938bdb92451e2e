# The orchestrator server's image: `rlm-orchestrator serve` with the whole project installed
# (litellm, the gRPC services, OpenTelemetry, and the sandbox agent for `local` sandboxes).
#
# Built from the repository root (deploy/compose.yaml does this; the root's .dockerignore
# keeps .venv/, .git/ and caches out of the context):
#
#   docker build -f deploy/orchestrator.Dockerfile -t rlm-orchestrator:latest .
#
# NEEDS A REGISTRY AND THE PACKAGE INDEX: unlike deploy/sandbox.Dockerfile (built offline by
# deploy/build-sandbox-image.sh), this image pulls its base (python:3.11-slim) and runs
# `pip install .` against PyPI, which fetches hatchling and every dependency. It is meant for
# machines with a registry; another base with Python 3.11+ and pip can be given with
# --build-arg BASE_IMAGE=... (the debootstrap base rlm-sandbox-base:bookworm has no pip).
#
# Sandboxes (`environment` in the server's config):
#   - "local": each session's sandbox agent is a process inside this container (started
#     with this image's Python, which has sandbox_agent installed). Process isolation only:
#     sandboxed code shares the container with the orchestrator. Run the container with an
#     init (compose: `init: true`) so that the agents' exited children are reaped.
#   - "docker": the orchestrator starts one sandbox container per session on the HOST's
#     engine. It then needs the host's Docker socket (-v /var/run/docker.sock:...; whoever
#     holds it is root on the host) with this user in the socket's group (--group-add GID),
#     and a socket directory shared with the host AT THE SAME PATH: the provider makes each
#     sandbox's socket dir with mkdtemp under TMPDIR and asks the engine to bind-mount that
#     path, which the engine resolves on the host. deploy/compose.yaml has these mounts as
#     commented-out lines. The sandbox image (make sandbox-image) must exist on the host.
#     Without root here, the provider cannot hand a bound socket dir back to root (it stays
#     0777 for the life of the sandbox).

ARG BASE_IMAGE=python:3.11-slim

# --- Build: a virtualenv with the project (needs PyPI) -----------------------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/rlm
WORKDIR /tmp/src
COPY pyproject.toml README.md ./
COPY rlm_orchestrator/ rlm_orchestrator/
COPY rlm_wire/ rlm_wire/
COPY sandbox_agent/ sandbox_agent/
RUN /opt/rlm/bin/pip install '.[prometheus]' \
    && /opt/rlm/bin/rlm-orchestrator --help >/dev/null

# --- Runtime: the virtualenv only (no sources, no build tools), as a non-root user ---------
FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 rlm \
    && useradd --system --uid 10001 --gid rlm --home-dir /home/rlm --create-home \
        --shell /usr/sbin/nologin rlm
COPY --from=build /opt/rlm/ /opt/rlm/
# LITELLM_LOCAL_MODEL_COST_MAP: litellm reads its bundled price list instead of fetching
# one from GitHub at import (as `make` does on the host).
ENV PATH=/opt/rlm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True
USER rlm
WORKDIR /home/rlm
# The config is mounted here (compose: ./orchestrator.example.toml, read-only); it must
# listen on 0.0.0.0 (or [::]) to be reachable from outside the container.
EXPOSE 50051
ENTRYPOINT ["rlm-orchestrator"]
CMD ["serve", "--config", "/etc/rlm/rlm.toml"]
