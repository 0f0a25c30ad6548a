#!/usr/bin/env bash
# Quick start: set up .venv, then open the app on the bundled sample (or,
# with no display, segment the sample from the command line and print a summary).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh onnx,openvino,torch,gui,cluster
exec .venv/bin/segstudio start "$@"
