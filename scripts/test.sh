#!/usr/bin/env bash
# Set up everything the tests need and run them all:
#  - Xvfb and the Qt xcb libraries (Debian/Ubuntu packages; napari draws with
#    OpenGL, which offscreen Qt lacks, so GUI tests run on a virtual X screen);
#  - .venv with segstudio[onnx,torch,gui,test];
#  - pytest (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxcb-image0 libxcb-render-util0
  libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxcb-xkb1 libxkbcommon0 libxkbcommon-x11-0 libegl1 libgl1
  libdbus-1-3 libfontconfig1 bubblewrap"  # bubblewrap: the sandbox of model conversions (core/models/confine.py)
missing=""
for p in $apt_packages; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing system packages:$missing"
    $sudo apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "warning: cannot install$missing (no apt-get); GUI tests need Xvfb and the Qt xcb libraries" >&2
  fi
fi

bash scripts/setup.sh onnx,openvino,torch,gui,cluster,test
exec .venv/bin/python -m pytest "$@"
