#!/bin/sh
# Build xc_standin.so (LD_PRELOAD stand-in for libxc's save/restore entry
# points) with the system C compiler.
#
#   usage: build_standin.sh [OUTPUT_DIR]
#   default OUTPUT_DIR: <this directory>/build
#
# Idempotent: re-running rebuilds the .so in place (atomic rename).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/build"}
src="$here/xc_standin.c"
cc=${CC:-cc}

if ! command -v "$cc" >/dev/null 2>&1; then
    echo "build_standin.sh: C compiler '$cc' not found (install gcc, or set CC)" >&2
    exit 2
fi
for h in /usr/include/xenguest.h /usr/include/xenctrl.h /usr/include/xentoollog.h; do
    if [ ! -f "$h" ]; then
        echo "build_standin.sh: $h is missing (install the libxen-dev package)" >&2
        exit 3
    fi
done
if [ ! -f "$src" ]; then
    echo "build_standin.sh: source $src not found" >&2
    exit 4
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
tmp="$out/.xc_standin.so.$$"
trap 'rm -f "$tmp"' EXIT

"$cc" -shared -fPIC -O2 -Wall -Wextra -Werror -o "$tmp" "$src" -lxentoollog
mv -f "$tmp" "$out/xc_standin.so"
trap - EXIT
echo "$out/xc_standin.so"
