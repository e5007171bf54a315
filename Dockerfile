# branchbuild: the always-on service that turns CodeCommit pushes into CodeBuild builds.
# Build:  docker build -t branchbuild:$(git rev-parse --short HEAD) .
#    or:  make image   (podman, no Docker daemon; see docs/image.md)
# Every stage uses the same base, so the venv's interpreter symlinks stay valid. For
# reproducible production builds, pin the base by digest as well
# (--build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:...) and let a bot bump it.
# `make image` passes an equivalent base made from Debian's own packages (Python 3.11 from
# bookworm) where Docker Hub is out of reach.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# Only the runtime dependencies, read from pyproject.toml: the install layer below is
# rebuilt when they change, not when the code (or the dev dependencies) do.
FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
      > requirements.txt

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# A venv is self-contained, so the final stage copies it whole and gets no pip caches,
# no source tree and no build tools.
RUN python3 -m venv /opt/venv
COPY --from=requirements /src/requirements.txt ./
RUN /opt/venv/bin/pip install --no-cache-dir --requirement requirements.txt
COPY pyproject.toml README.md ./
COPY service ./service
# A regular (non-editable) install, then pip and setuptools leave the venv: nothing installs
# at run time. Byte-code is compiled here because the runtime root filesystem is read-only.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="branchbuild" \
      org.opencontainers.image.description="Builds every push to every CodeCommit branch with CodeBuild" \
      org.opencontainers.image.licenses="Apache-2.0"

# git and ssh fetch commits over CodeCommit SSH; tini is PID 1 so SIGTERM reaches the
# service and git/ssh children are reaped.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 branchbuild \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
            --shell /usr/sbin/nologin branchbuild \
 && mkdir -p /data/cache \
 && chown -R 10001:10001 /data \
 && chmod 0750 /data

COPY --from=builder /opt/venv /opt/venv
# The git host's pinned keys come at run time (BRANCHBUILD_KNOWN_HOSTS, from the same secret
# as the SSH key; see deploy/README.md), so one image serves every region and account.

# HOME=/data: ssh and git write their state under $HOME and the root filesystem is
# read-only in ECS.
ENV PATH="/opt/venv/bin:${PATH}" \
    HOME=/data \
    BRANCHBUILD_CACHE_DIR=/data/cache \
    BRANCHBUILD_HTTP_PORT=8080 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Fargate bind mounts at these paths take the ownership and mode from the image
# (10001:10001 for /data, 1777 for /tmp) only when the image declares them as volumes.
VOLUME ["/data", "/tmp"]

USER 10001:10001
WORKDIR /data
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["branchbuild", "healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["branchbuild", "run"]
