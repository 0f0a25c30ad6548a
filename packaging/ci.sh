#!/usr/bin/env bash
# CI's packaging step: build the standard app and smoke-test the .deb and the .tar.gz, but
# only when what the packages are made from changed since the last build that passed
# (packaging/ but its README, requirements/constraints.txt, pyproject.toml: their hash against
# packaging/passed.sha256). A build and both smoke tests take about 20 minutes on a 2-core
# machine, which every CI run cannot afford (see packaging/README.md).
#   bash packaging/ci.sh            build and test when the inputs changed (what CI runs)
#   bash packaging/ci.sh --force    build and test now
#   bash packaging/ci.sh --record   build and test now, and on success write packaging/passed.sha256
set -euo pipefail
cd "$(dirname "$0")/.."
inputs() { git ls-files -s packaging requirements/constraints.txt pyproject.toml | grep -v -E 'packaging/(passed.sha256|README.md)' | sha256sum | cut -c1-16; }
now="$(inputs)"
mode="${1:-}"
if [ -z "$mode" ] && [ "$now" = "$(cat packaging/passed.sha256 2>/dev/null)" ]; then
  echo "packaging: inputs unchanged since the last build that passed ($now): not rebuilt"
  exit 0
fi
echo "packaging: building (inputs $now)"
bash packaging/build.sh standard
version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
bash packaging/smoke_test.sh "dist/segstudio-$version-linux-x86_64.tar.gz"
bash packaging/smoke_test.sh "dist/segstudio_${version}_amd64.deb"
if [ "$mode" = "--record" ]; then
  echo "$now" > packaging/passed.sha256
  echo "packaging: recorded $now in packaging/passed.sha256 (commit it)"
fi
