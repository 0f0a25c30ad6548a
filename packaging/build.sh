#!/usr/bin/env bash
# Build the standalone Linux x86_64 app: a PyInstaller one-folder bundle from the
# pinned environment (requirements/constraints.txt), packed as a .deb and a .tar.gz.
#   usage: bash packaging/build.sh [standard|full]     (default: standard)
#     standard  inference (ONNX Runtime, OpenVINO), INT8 / FP16 optimization, batch
#               (Dask included), benchmark, the GUI; no PyTorch (see packaging/README.md)
#     full      the same with the PyTorch CPU wheel: prune, recover, distill, fine-tune
# Output: dist/segstudio-<version>-linux-x86_64[-full].tar.gz and
#         dist/segstudio[-full]_<version>_amd64.deb, and dist/build-<flavour>.json (sizes, times).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
flavour="${1:-standard}"
case "$flavour" in
  standard) extras="onnx,openvino,gui,cluster,bench"; suffix=""; package="segstudio" ;;
  full) extras="onnx,openvino,torch,gui,cluster,bench"; suffix="-full"; package="segstudio-full" ;;
  *) echo "unknown flavour '$flavour' (standard or full)" >&2; exit 2 ;;
esac
[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || { echo "this script builds the Linux x86_64 app; see packaging/README.md for Windows and macOS" >&2; exit 2; }
for tool in dpkg-deb tar gzip flock; do
  command -v "$tool" >/dev/null || { echo "packaging/build.sh needs $tool (apt-get install dpkg tar gzip)" >&2; exit 2; }
done

py="${PYTHON:-}"
if [ -z "$py" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      py="$candidate"; break
    fi
  done
fi
[ -n "$py" ] || { echo "the bundle is built with Python 3.11 (the constraints' version); set PYTHON=/path/to/python3.11" >&2; exit 2; }
"$py" -c 'import sysconfig, sys; sys.exit(not sysconfig.get_config_var("Py_ENABLE_SHARED"))' || {
  echo "$py has no shared libpython, which PyInstaller needs (a Python built with --enable-shared)" >&2; exit 2; }

version="$("$py" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
build="$ROOT/build/packaging/$flavour"
venv="$build/venv"
mkdir -p "$build" dist
exec 9>"$build/.lock"
flock -n 9 || { echo "another build of the $flavour bundle is running (lock: $build/.lock)" >&2; exit 1; }
t0=$(date +%s)

# 1. the build environment: segstudio (not editable) and PyInstaller, every version pinned
hash="$(cat pyproject.toml requirements/constraints.txt packaging/requirements.txt | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$venv/.stamp" ] || [ "$(cat "$venv/.stamp")" != "$hash" ]; then
  echo "== build environment ($flavour: segstudio[$extras] + PyInstaller)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -c requirements/constraints.txt -r packaging/requirements.txt ".[$extras]"
  echo "$hash" > "$venv/.stamp"
fi
# the package itself on every build (the source may have changed; its dependencies are in place)
"$venv/bin/python" -m pip install --quiet --no-deps --force-reinstall -c requirements/constraints.txt ".[$extras]"
t1=$(date +%s)

# 2. the one-folder bundle
echo "== PyInstaller"
rm -rf "$build/dist" "$build/work"
SEGSTUDIO_FLAVOUR="$flavour" "$venv/bin/pyinstaller" --noconfirm --log-level WARN \
  --distpath "$build/dist" --workpath "$build/work" packaging/segstudio.spec
app="$build/dist/segstudio"
"$app/segstudio" --version
t2=$(date +%s)

# 3. the packages
echo "== packages"
name="segstudio-$version-linux-x86_64$suffix"
stage="$build/stage"
rm -rf "$stage"
# .tar.gz: the bundle in one folder that runs from anywhere, install.sh for the desktop entry
mkdir -p "$stage/tar/$name"
cp -a "$app" "$stage/tar/$name/app"
cp packaging/install.sh packaging/uninstall.sh "$stage/tar/$name/"
cp resources/segstudio.svg "$stage/tar/$name/segstudio.svg"
ln -s app/segstudio "$stage/tar/$name/segstudio"
sed "s/@VERSION@/$version/; s/@FLAVOUR@/$flavour/" packaging/README-bundle.txt > "$stage/tar/$name/README.txt"
tar -C "$stage/tar" -czf "dist/$name.tar.gz" "$name"
# .deb: /opt/segstudio, /usr/bin/segstudio, the desktop entry and the icon
deb="$stage/deb"
mkdir -p "$deb/DEBIAN" "$deb/opt" "$deb/usr/bin" "$deb/usr/share/applications" "$deb/usr/share/icons/hicolor/scalable/apps"
cp -a "$app" "$deb/opt/segstudio"
ln -s /opt/segstudio/segstudio "$deb/usr/bin/segstudio"
sed "s|@EXEC@|/opt/segstudio/segstudio|; s|@ICON@|segstudio|" packaging/segstudio.desktop > "$deb/usr/share/applications/segstudio.desktop"
cp resources/segstudio.svg "$deb/usr/share/icons/hicolor/scalable/apps/segstudio.svg"
installed_kb=$(du -sk --apparent-size "$deb" | cut -f1)
conflicts=$([ "$flavour" = full ] && echo segstudio || echo segstudio-full)
sed "s/@PACKAGE@/$package/; s/@VERSION@/$version/; s/@SIZE@/$installed_kb/; s/@CONFLICTS@/$conflicts/" \
  packaging/debian/control > "$deb/DEBIAN/control"
for script in postinst postrm; do install -m 0755 "packaging/debian/$script" "$deb/DEBIAN/$script"; done
dpkg-deb --root-owner-group -Zgzip -z6 --build "$deb" "dist/${package}_${version}_amd64.deb" >/dev/null
t3=$(date +%s)

bundle_mb=$(du -sm "$app" | cut -f1)
"$venv/bin/python" - "$flavour" "$bundle_mb" "dist/$name.tar.gz" "dist/${package}_${version}_amd64.deb" \
  "$((t1 - t0))" "$((t2 - t1))" "$((t3 - t2))" <<'PY'
import json, os, platform, sys, time
flavour, mb, tgz, deb, env_s, pyi_s, pack_s = sys.argv[1:]
out = {"flavour": flavour, "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
       "cpus": os.cpu_count(), "bundle_mb_on_disk": int(mb),
       "tar_gz": os.path.basename(tgz), "tar_gz_mb": round(os.path.getsize(tgz) / 2**20, 1),
       "deb": os.path.basename(deb), "deb_mb": round(os.path.getsize(deb) / 2**20, 1),
       "seconds": {"environment": int(env_s), "pyinstaller": int(pyi_s), "packages": int(pack_s)}}
json.dump(out, open(f"dist/build-{flavour}.json", "w"), indent=1)
print(json.dumps(out, indent=1))
PY
