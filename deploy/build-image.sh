#!/usr/bin/env bash
# Builds the service image with podman: no Docker daemon, no Docker Hub.
#
#   bash deploy/build-image.sh [TAG]        (default: branchbuild:dev; `make image` runs this)
#
# The Dockerfile's base is python:3.11-slim-bookworm from Docker Hub. Unless BASE_IMAGE names
# another base (BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm where Docker Hub is
# reachable), this script makes an equivalent one from Debian's own packages with mmdebstrap:
# bookworm's Python 3.11, from this machine's apt sources. It is made once and reused for as
# long as its inputs (this script's package list and options, the apt sources) do not change:
# its tag is their hash. `podman rmi` it to take the archive's newer packages.
#
# The podman flags this machine needs (docs/image.md): runc, and ulimits below the
# machine's hard limits (podman's defaults for root are above them, and runc then fails with
# "error setting rlimits"); --format docker keeps the HEALTHCHECK; the build's RUN steps use
# the host's network (pip reaches PyPI, apt the Debian archive), never a bridge.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"

tag="${1:-branchbuild:dev}"
readonly PODMAN=(podman --runtime runc)
readonly ULIMITS=(--ulimit nofile=16384:16384 --ulimit nproc=8192:8192)

for tool in podman runc mmdebstrap; do
  if ! command -v "${tool}" >/dev/null 2>&1; then
    echo "${tool} is missing: run 'make image-deps' (Debian's podman, buildah, runc, mmdebstrap)" >&2
    exit 1
  fi
done

# What python:3.11-slim-bookworm holds that the build and the service use: Python with venv
# and pip (ensurepip), CA certificates; no documentation, manual pages or locales, and apt set
# up as in Debian's own container images (no package caches left in layers).
readonly MMDEBSTRAP_ARGS=(
  --variant=minbase
  --include=usr-is-merged,ca-certificates,python3,python3-venv
  --hook-dir=/usr/share/mmdebstrap/hooks/eatmydata
  --aptopt='Dir::Cache::pkgcache ""'
  --aptopt='Dir::Cache::srcpkgcache ""'
  --aptopt='Acquire::Languages "none"'
  --aptopt='Acquire::GzipIndexes "true"'
  --aptopt='APT::AutoRemove::SuggestsImportant "false"'
  --aptopt='DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; }'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-include=/usr/share/locale/locale.alias'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
)
# This machine's Debian sources (a mirror or a snapshot it is set up with); without a deb822
# file, mmdebstrap's default: deb.debian.org with bookworm-updates and bookworm-security.
sources=()
if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
  sources=(/etc/apt/sources.list.d/debian.sources)
fi

base="${BASE_IMAGE:-}"
if [[ -z "${base}" ]]; then
  inputs="$(printf '%s\n' "${MMDEBSTRAP_ARGS[@]}"; cat "${sources[@]}" /dev/null)"
  base="localhost/branchbuild-base:bookworm-$(sha256sum <<<"${inputs}" | cut -c1-12)"
  if ! "${PODMAN[@]}" image exists "${base}"; then
    echo "==> making ${base} from Debian's packages (mmdebstrap)"
    started=${SECONDS}
    # Through a file, so that a failed mmdebstrap never leaves a truncated base behind.
    tarball="$(mktemp --tmpdir branchbuild-base.XXXXXX.tar)"
    trap 'rm -f "${tarball}" "${tarball}.log"' EXIT
    if ! mmdebstrap "${MMDEBSTRAP_ARGS[@]}" bookworm "${tarball}" "${sources[@]}" \
        >"${tarball}.log" 2>&1; then
      cat "${tarball}.log" >&2
      exit 1
    fi
    "${PODMAN[@]}" import --quiet --change 'CMD ["python3"]' "${tarball}" "${base}" >/dev/null
    rm -f "${tarball}" "${tarball}.log"
    echo "==> ${base} made in $((SECONDS - started)) s"
  fi
fi

# The machine's CA bundle is mounted into the RUN steps (never into the image), so that pip
# and apt trust whatever this machine trusts (a TLS-inspecting proxy's CA, for one).
volumes=()
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  volumes=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi

echo "==> building ${tag} on ${base}"
started=${SECONDS}
"${PODMAN[@]}" build --format docker --network=host "${ULIMITS[@]}" "${volumes[@]}" \
  --build-arg "BASE_IMAGE=${base}" --tag "${tag}" --file Dockerfile .
echo "==> ${tag} built in $((SECONDS - started)) s: $("${PODMAN[@]}" image inspect --format '{{.Size}}' "${tag}") bytes"
