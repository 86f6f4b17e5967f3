#!/usr/bin/env bash
# Fetch real music for tuning and evaluation from a Debian package of free game
# music, copied into DEST:
#
#   scripts/get_music.sh DEST [SET]
#
# SET freedroidrpg (the default): the 16 full-length Ogg tracks of
# freedroidrpg-data, on which the stand-in model was trained and held apart
# (export/standin/training.json). SET wesnoth: the 41 Ogg tracks of
# wesnoth-1.16-music (orchestral; 150 MB), music the stand-in never heard,
# for larger catalogues. Licences: the package's usr/share/doc/*/copyright.
#
# No root and no system changes: `apt-get download` fetches the .deb into a
# temporary folder (it needs the apt package lists, i.e. one `apt-get update`
# on the machine), `dpkg-deb -x` unpacks it there, and only the music lands in
# DEST. Idempotent: nothing happens when DEST already holds the set's tracks.
# MUSIC_DEB=path/to/package.deb uses a .deb you already have.
# The audio is never committed (see .gitignore: /data/).
set -euo pipefail

dest=${1:?usage: scripts/get_music.sh DEST [freedroidrpg|wesnoth]}
set_name=${2:-freedroidrpg}
case "$set_name" in
    freedroidrpg)
        PACKAGE=freedroidrpg-data
        EXPECTED=16
        MUSIC_DIR=usr/share/freedroidrpg/data/sound/music
        ;;
    wesnoth)
        PACKAGE=wesnoth-1.16-music
        EXPECTED=41
        MUSIC_DIR=usr/share/games/wesnoth/1.16/data/core/music
        ;;
    *)
        echo "get_music: unknown set '$set_name' (freedroidrpg or wesnoth)" >&2
        exit 2
        ;;
esac

count_tracks() {
    find "$1" -maxdepth 1 -type f -name '*.ogg' 2>/dev/null | wc -l
}

if [ "$(count_tracks "$dest")" -ge "$EXPECTED" ]; then
    echo "get_music: $dest already has the $EXPECTED $PACKAGE tracks"
    exit 0
fi

for tool in dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "get_music: $tool not found (Debian/Ubuntu only)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# As root, apt warns that it downloads unsandboxed (its _apt user cannot write
# to a private temporary folder): harmless here.

if [ -n "${MUSIC_DEB:-}" ]; then
    deb=$MUSIC_DEB
else
    command -v apt-get >/dev/null || { echo "get_music: apt-get not found; set MUSIC_DEB" >&2; exit 1; }
    if ! (cd "$work" && apt-get download "$PACKAGE"); then
        echo "get_music: apt-get download failed; run 'apt-get update' once, or set MUSIC_DEB" >&2
        exit 1
    fi
    deb=$(find "$work" -maxdepth 1 -name "${PACKAGE}_*.deb" | head -n 1)
fi
[ -f "$deb" ] || { echo "get_music: no $PACKAGE .deb at '$deb'" >&2; exit 1; }

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
