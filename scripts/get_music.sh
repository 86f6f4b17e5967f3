#!/usr/bin/env bash
# Fetch real music for tuning and evaluation: the 16 full-length Ogg tracks of
# Debian's freedroidrpg-data (free game music; licences in the package's
# usr/share/doc/freedroidrpg-data/copyright), copied into DEST.
#
#   scripts/get_music.sh DEST
#
# No root and no system changes: `apt-get download` fetches the .deb into a
# temporary folder (it needs the apt package lists, i.e. one `apt-get update`
# on the machine), `dpkg-deb -x` unpacks it there, and only the music lands in
# DEST. Idempotent: nothing happens when DEST already holds the 16 tracks.
# FDRPG_DEB=path/to/freedroidrpg-data_*.deb uses a .deb you already have.
# The audio is never committed (see .gitignore: /data/).
set -euo pipefail

EXPECTED=16
MUSIC_DIR=usr/share/freedroidrpg/data/sound/music

dest=${1:?usage: scripts/get_music.sh DEST}

count_tracks() {
    find "$1" -maxdepth 1 -type f -name '*.ogg' 2>/dev/null | wc -l
}

if [ "$(count_tracks "$dest")" -ge "$EXPECTED" ]; then
    echo "get_music: $dest already has the $EXPECTED freedroidrpg-data tracks"
    exit 0
fi

for tool in dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "get_music: $tool not found (Debian/Ubuntu only)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# As root, apt warns that it downloads unsandboxed (its _apt user cannot write
# to a private temporary folder): harmless here.

if [ -n "${FDRPG_DEB:-}" ]; then
    deb=$FDRPG_DEB
else
    command -v apt-get >/dev/null || { echo "get_music: apt-get not found; set FDRPG_DEB" >&2; exit 1; }
    if ! (cd "$work" && apt-get download freedroidrpg-data); then
        echo "get_music: apt-get download failed; run 'apt-get update' once, or set FDRPG_DEB" >&2
        exit 1
    fi
    deb=$(find "$work" -maxdepth 1 -name 'freedroidrpg-data_*.deb' | head -n 1)
fi
[ -f "$deb" ] || { echo "get_music: no freedroidrpg-data .deb at '$deb'" >&2; exit 1; }

dpkg-deb -x "$deb" "$work/x"
found=$(count_tracks "$work/x/$MUSIC_DIR")
if [ "$found" -ne "$EXPECTED" ]; then
    echo "get_music: expected $EXPECTED tracks in the package, found $found" >&2
    exit 1
fi

mkdir -p "$dest"
# Each file is copied beside its target and renamed: no half-written track.
for src in "$work/x/$MUSIC_DIR"/*.ogg; do
    name=$(basename "$src")
    cp "$src" "$dest/.$name.tmp"
    mv -f "$dest/.$name.tmp" "$dest/$name"
done
echo "get_music: $EXPECTED tracks in $dest"
