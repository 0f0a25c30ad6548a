#!/bin/sh
# Undo install.sh: remove the menu entry, the icon and the link on PATH (the
# folder itself is yours to delete; your settings and caches in ~/.segstudio stay).
set -eu
data="${XDG_DATA_HOME:-$HOME/.local/share}"
rm -f "$data/applications/segstudio.desktop" "$data/icons/hicolor/scalable/apps/segstudio.svg"
link="$HOME/.local/bin/segstudio"
[ -L "$link" ] && rm -f "$link"
command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database -q "$data/applications" || true
echo "segstudio removed from your applications menu and PATH"
