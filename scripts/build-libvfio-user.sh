#!/usr/bin/env bash
# Build libvfio-user's sample server (third_party/) into build/libvfio-user/,
# a real vfio-user peer for qmpmig's tests.  Cached: a build that is there
# already is kept.  Needs meson, ninja-build, libjson-c-dev, libcmocka-dev,
# pkg-config and gcc (scripts/setup.sh installs them).
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tarball=$top/third_party/libvfio-user-efd091b.tar.gz
src=$top/build/libvfio-user
server=$src/build/samples/server

if [ -x "$server" ] && [ "$src/.tarball" -nt "$tarball" ]; then
    exit 0
fi
rm -rf "$src"
mkdir -p "$src"
tar xzf "$tarball" -C "$src" --strip-components=1

# At efd091b the sample server's BAR1 (0x3000) fails the library's
# power-of-two check for BAR sizes when the server starts.
echo "build-libvfio-user: patching samples/server.c: BAR1 0x3000 -> 0x4000 (power of two)"
sed -i 's/const size_t bar1_size = 0x3000;/const size_t bar1_size = 0x4000;/' "$src/samples/server.c"
grep -q 'const size_t bar1_size = 0x4000;' "$src/samples/server.c" ||
    { echo "build-libvfio-user: the BAR1 patch did not apply" >&2; exit 1; }

(cd "$src" && meson setup build --buildtype=debugoptimized -Dwerror=false >build.log 2>&1 &&
    ninja -C build samples/server >>build.log 2>&1) ||
    { tail -20 "$src/build.log" >&2; echo "build-libvfio-user: build failed (log: $src/build.log)" >&2; exit 1; }
touch "$src/.tarball"
echo "build-libvfio-user: $server"
