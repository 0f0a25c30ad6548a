#!/usr/bin/env bash
# Install a segstudio package into a clean place and use it the way a user would, with no
# Python reachable and the network cut; fail on any error.
#   usage: bash packaging/smoke_test.sh dist/segstudio_<version>_amd64.deb        (root: dpkg -i, then dpkg -r)
#          bash packaging/smoke_test.sh dist/segstudio-<version>-linux-x86_64.tar.gz
# Steps: install (.deb: dpkg -i; .tar.gz: unpack into an empty folder, install.sh into an empty HOME);
# `segstudio --version`; `segstudio self-test` (every backend on the sample, accuracy checked);
# `segstudio self-test --gui` under Xvfb (the window, the Segment panel on the sample, a screenshot);
# a batch of the sample images from the command line; uninstall, and check that nothing is left.
# Every segstudio command runs under `env -i` (an empty HOME, PATH=/usr/bin:/bin) inside a
# bubblewrap sandbox in which every Python interpreter on this machine is hidden and the
# network namespace is new (no interface but lo); without bwrap, `unshare -n` cuts the network
# and the interpreters stay visible (the report says which). SMOKE_OUT: where the screenshot
# and smoke-<package>.json (timings: cold start, first segmentation) go (default dist/smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
package="${1:?usage: bash packaging/smoke_test.sh PACKAGE (.deb or .tar.gz)}"
package="$(cd "$(dirname "$package")" && pwd)/$(basename "$package")"
[ -f "$package" ] || { echo "no such package: $package" >&2; exit 2; }
out="${SMOKE_OUT:-$ROOT/dist/smoke}"
mkdir -p "$out"
stem="$(basename "$package")"; stem="${stem%.tar.gz}"; stem="${stem%.deb}"
work="$(mktemp -d /tmp/segstudio-smoke.XXXXXX)"
home="$work/home"
mkdir -p "$home"
xvfb_pid=""
deb_name=""
cleanup() {
  [ -n "$xvfb_pid" ] && kill "$xvfb_pid" 2>/dev/null || true
  if [ -n "$deb_name" ] && dpkg -s "$deb_name" >/dev/null 2>&1; then dpkg -r "$deb_name" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
step() { echo "== $*"; }
fail() { echo "SMOKE TEST FAILED: $*" >&2; exit 1; }

# --- the sandbox every segstudio command runs in
isolation="none"
sandbox=()
if command -v bwrap >/dev/null && bwrap --dev-bind / / --unshare-net -- /bin/true 2>/dev/null; then
  isolation="bwrap: no Python, network namespace cut"
  sandbox=(bwrap --dev-bind / / --unshare-net --die-with-parent)
  # hide every Python interpreter and library folder of this machine
  for exe in $(type -a -P python3 python python3.11 python3.12 python3.13 2>/dev/null | sort -u); do
    sandbox+=(--ro-bind /dev/null "$exe")
    real="$(readlink -f "$exe")"; [ "$real" != "$exe" ] && [ -e "$real" ] && sandbox+=(--ro-bind /dev/null "$real")
  done
  for dir in /usr/lib/python3 /usr/lib/python3.* /usr/local/lib/python3.* "$HOME/.pyenv" "$ROOT/.venv"; do
    [ -d "$dir" ] && sandbox+=(--tmpfs "$dir")
  done
  sandbox+=(--)
elif unshare -n /bin/true 2>/dev/null; then
  isolation="unshare -n: network namespace cut (bwrap missing: Python stays visible)"
  sandbox=(unshare -n)
fi
run() {  # run a command as a user of the package would: clean environment, sandbox
  "${sandbox[@]}" env -i HOME="$home" PATH=/usr/bin:/bin LANG=C.UTF-8 ${DISPLAY:+DISPLAY="$DISPLAY"} \
    XDG_RUNTIME_DIR="$work/xdg" "$@"
}
mkdir -p "$work/xdg"; chmod 700 "$work/xdg"
echo "isolation: $isolation"
if [ "$isolation" != "none" ]; then
  run /bin/sh -c 'python3 -c 1' 2>/dev/null && [ "${isolation#bwrap}" != "$isolation" ] && fail "python3 still runs inside the sandbox"
  run /bin/cat /proc/net/dev | grep -qv -E '^(Inter|  *face|  *lo:)' && fail "the sandbox has a network interface besides lo"
fi

# --- install
t_install=$(date +%s%N)
case "$package" in
  *.deb)
    [ "$(id -u)" = 0 ] || fail "installing a .deb needs root (run as root or with sudo)"
    deb_name="$(dpkg-deb -f "$package" Package)"
    step "dpkg -i $(basename "$package")"
    dpkg -i "$package" >/dev/null || { apt-get install -y -f >/dev/null; dpkg -s "$deb_name" >/dev/null; } \
      || fail "dpkg -i did not install $deb_name"
    exe=/usr/bin/segstudio
    [ -f /usr/share/applications/segstudio.desktop ] || fail "no desktop entry"
    [ -f /usr/share/icons/hicolor/scalable/apps/segstudio.svg ] || fail "no icon"
    sample_dir=/opt/segstudio/_internal/segstudio/sample_data
    ;;
  *.tar.gz)
    step "unpack $(basename "$package") into an empty folder, install.sh into an empty HOME"
    mkdir -p "$work/apps"
    tar -C "$work/apps" -xzf "$package"
    top="$(ls "$work/apps")"
    run /bin/sh "$work/apps/$top/install.sh"
    [ -f "$home/.local/share/applications/segstudio.desktop" ] || fail "install.sh wrote no desktop entry"
    [ -L "$home/.local/bin/segstudio" ] || fail "install.sh put no segstudio on ~/.local/bin"
    exe="$home/.local/bin/segstudio"
    sample_dir="$work/apps/$top/app/_internal/segstudio/sample_data"
    ;;
  *) fail "not a .deb or .tar.gz: $package" ;;
esac
t_install=$(( ($(date +%s%N) - t_install) / 1000000 ))
ls "$sample_dir"/*_img.tif >/dev/null || fail "no sample images in the package"

step "segstudio --version"
run "$exe" --version
step "segstudio self-test (every backend on the sample)"
run "$exe" self-test

# --- the window, under Xvfb
command -v Xvfb >/dev/null || fail "Xvfb is needed for the GUI check (apt-get install xvfb)"
display=":$((90 + RANDOM % 400))"
Xvfb "$display" -screen 0 1920x1200x24 -nolisten tcp >/dev/null 2>&1 &
xvfb_pid=$!
for _ in $(seq 50); do [ -e "/tmp/.X11-unix/X${display#:}" ] && break; sleep 0.1; done
export DISPLAY="$display"
step "segstudio self-test --gui (cold: page cache dropped when allowed)"
sync; (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null && cold=true || cold=false
t0=$(date +%s%N)
run "$exe" self-test --gui --screenshot "$out/smoke-$stem.png" --json "$work/gui.json"
gui_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
step "segstudio self-test --gui (warm)"
run "$exe" self-test --gui --json "$work/gui-warm.json"
unset DISPLAY

# --- a small batch from the command line
step "segstudio batch (the sample images)"
mkdir -p "$work/in"
cp "$sample_dir"/*_img.tif "$work/in/"
run "$exe" batch "$work/in" --out "$work/batch" -q
n_in=$(ls "$work/in" | wc -l)
n_done=$(tail -n +2 "$work/batch/batch_summary.csv" | grep -c ",done," || true)
[ "$n_done" = "$n_in" ] || fail "batch: $n_done of $n_in images done (batch_summary.csv)"
ls "$work/batch"/*labels*.tif >/dev/null || fail "batch wrote no labels"

# --- uninstall
case "$package" in
  *.deb)
    step "dpkg -r $deb_name"
    dpkg -r "$deb_name" >/dev/null
    for f in /opt/segstudio /usr/bin/segstudio /usr/share/applications/segstudio.desktop \
             /usr/share/icons/hicolor/scalable/apps/segstudio.svg; do
      [ -e "$f" ] || [ -L "$f" ] && fail "left after dpkg -r: $f"
    done
    deb_name=""
    ;;
  *.tar.gz)
    step "uninstall.sh"
    run /bin/sh "$work/apps/$top/uninstall.sh"
    left="$(find "$home/.local" -name 'segstudio*' 2>/dev/null)"
    [ -z "$left" ] || fail "left after uninstall.sh: $left"
    ;;
esac

size_mb=$(du -sm "$package" | cut -f1)
cat > "$out/smoke-$stem.json" <<JSON
{"package": "$(basename "$package")", "date": "$(date +%F)", "cpus": $(nproc), "isolation": "$isolation",
 "package_mb": $size_mb, "install_ms": $t_install, "gui_self_test_cold_page_cache": $cold,
 "gui_command_ms": $gui_ms, "gui_cold": $(cat "$work/gui.json"), "gui_warm": $(cat "$work/gui-warm.json")}
JSON
echo "SMOKE TEST PASSED: $(basename "$package") ($isolation); screenshot $out/smoke-$stem.png; $out/smoke-$stem.json"
