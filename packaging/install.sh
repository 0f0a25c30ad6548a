#!/bin/sh
# Add segstudio to this user's applications menu and PATH, for the folder this
# script is in (the app runs from here: move the folder first if you want it
# elsewhere). Nothing is written outside your home folder; uninstall.sh undoes it.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
data="${XDG_DATA_HOME:-$HOME/.local/share}"
bin="$HOME/.local/bin"
"$here/app/segstudio" --version >/dev/null || { echo "segstudio does not start from $here/app" >&2; exit 1; }
mkdir -p "$data/applications" "$data/icons/hicolor/scalable/apps" "$bin"
cp "$here/segstudio.svg" "$data/icons/hicolor/scalable/apps/segstudio.svg"
cat > "$data/applications/segstudio.desktop" <<DESKTOP
[Desktop Entry]
Type=Application
Name=segstudio
GenericName=Microscopy segmentation
Comment=Segment cells and nuclei in microscopy images, measure them, make the model faster
Exec="$here/app/segstudio" gui %F
Icon=segstudio
Terminal=false
Categories=Science;Biology;Graphics;
MimeType=image/tiff;image/png;image/jpeg;
StartupWMClass=segstudio
DESKTOP
ln -sfn "$here/app/segstudio" "$bin/segstudio"
command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database -q "$data/applications" || true
echo "segstudio is in your applications menu and at $bin/segstudio"
case ":$PATH:" in *":$bin:"*) ;; *) echo "($bin is not on your PATH: add it, or run $here/segstudio)" ;; esac
