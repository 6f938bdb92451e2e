# The sandbox agent's image: `python3 -m sandbox_agent` with grpcio, grpcio-health-checking,
# grpcio-reflection and protobuf; nothing of the orchestrator (no litellm).
#
# Built by `make sandbox-image` (deploy/build-sandbox-image.sh), which assembles the build
# context: this file, `wheels/` (cp311 manylinux wheels downloaded on the host), `sandbox_agent/`
# and the agent's part of `rlm_wire/`. The build needs no network: wheels are installed with
# --no-index.
#
# BASE_IMAGE is the official python:3.11-slim where a registry is reachable, otherwise a
# Debian bookworm image built with debootstrap (rlm-sandbox-base:bookworm). Both have Python
# 3.11 as `python3`; only the slim image has pip (Debian's python3 package does not).
#
# Where the dependencies go: /opt/rlm/lib, put on sys.path with PYTHONPATH. The path is the
# same whatever the base (site-packages vs Debian's dist-packages), and the wheels are
# installed without pip where there is none:
#   - with pip (slim): `pip install --no-index --find-links /tmp/wheels --target`, which also
#     checks that the wheel set satisfies every dependency;
#   - without pip (debootstrap base): each wheel is unzipped (`python3 -m zipfile -e`). A wheel
#     is a zip laid out for site-packages; ours have no `.data/` dirs or scripts, so unpacking
#     is a complete install. This keeps python3-pip (and its ~20 MB of dependencies) out of
#     the base. The import check below fails the build if a wheel were missing.
# A multi-stage build keeps the wheel files themselves out of the final image.
#
# Runtime contract (the Docker provider): read-only root FS, a tmpfs at /work, a bind mount
# at /sock, user 65534:65534. The image creates nothing writable but /work (the tmpfs's mount
# point, see below): everything else it adds is owned by root and read-only for the agent.
# Bytecode is compiled at build time (unchecked-hash: the files never change in the image),
# as nothing can be written at run time.
#
#   docker run --read-only --tmpfs /work:rw,mode=1777 -v DIR:/sock --user 65534:65534 IMAGE \
#       --listen unix:/sock/agent.sock --workdir /work/code --state-dir /work/.state

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS install
COPY wheels/ /tmp/wheels/
RUN set -eu; \
    mkdir -p /opt/rlm/lib; \
    if python3 -m pip --version >/dev/null 2>&1; then \
        python3 -m pip install --quiet --no-index --find-links /tmp/wheels --no-compile \
            --disable-pip-version-check --target /opt/rlm/lib /tmp/wheels/*.whl; \
    else \
        for wheel in /tmp/wheels/*.whl; do python3 -m zipfile -e "$wheel" /opt/rlm/lib/; done; \
    fi; \
    rm -rf /opt/rlm/lib/bin; \
    chmod -R u=rwX,go=rX /opt/rlm; \
    python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/rlm/lib; \
    PYTHONPATH=/opt/rlm/lib python3 -c 'import grpc, grpc_health.v1.health, grpc_reflection.v1alpha.reflection, google.protobuf'

FROM ${BASE_IMAGE}
COPY --from=install /opt/rlm/ /opt/rlm/
# /work is the mount point of the run-time tmpfs. Docker gives a tmpfs the mode and owner of
# the image's directory under it ("tmpcopyup"), whatever its mode= option says: the directory
# must be 1777 here, or nobody could write in the tmpfs (WORKDIR alone makes it 0755 root).
RUN mkdir -p -m 1777 /work && chmod 1777 /work
WORKDIR /work
ENV PYTHONPATH=/opt/rlm/lib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["python3", "-m", "sandbox_agent"]
CMD ["--help"]
# The agent's own code comes last: changing it leaves every layer above cached. With it, the
# part of the wire it imports (rlm_wire.AGENT_FILES; the context holds no other file of it).
COPY rlm_wire/ /opt/rlm/lib/rlm_wire/
COPY sandbox_agent/ /opt/rlm/lib/sandbox_agent/
RUN set -eu; \
    chmod -R u=rwX,go=rX /opt/rlm/lib/rlm_wire /opt/rlm/lib/sandbox_agent; \
    python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        /opt/rlm/lib/rlm_wire /opt/rlm/lib/sandbox_agent; \
    python3 -c 'import sandbox_agent.__main__, sandbox_agent.server, sandbox_agent.worker'
USER 65534:65534

# Set by build-sandbox-image.sh: a hash of this file, the files copied and the requirement list.
ARG CONTENT_HASH=unknown
LABEL org.opencontainers.image.title="rlm-sandbox" \
      org.opencontainers.image.description="RLM sandbox agent (python3 -m sandbox_agent)" \
      rlm.content-hash="${CONTENT_HASH}"
