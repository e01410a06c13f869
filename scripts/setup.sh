#!/usr/bin/env bash
# Set up qmpmig on a fresh Debian 12 machine (root, package registries only):
# Debian's QEMU, a Python virtual environment with qmpmig and its test
# dependencies in .venv/, the test guest image in vm-images/build/, and
# libvfio-user's sample server in build/libvfio-user/ (a real peer for tests),
# and libvirt's daemon and client (scripts/libvirt-e2e runs two of them) with
# libvirt-python built against this host's libvirt (qmpmig migrate --libvirt).
# Idempotent: what is already there is kept.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

apt_packages=()
command -v qemu-system-x86_64 >/dev/null || apt_packages+=(qemu-system-x86)
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_packages+=(python3-venv)
for pkg in meson ninja-build libjson-c-dev libcmocka-dev pkg-config gcc \
           libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev python3-dev iproute2; do
    dpkg -s "$pkg" >/dev/null 2>&1 || apt_packages+=("$pkg")
done
if ((${#apt_packages[@]})); then
    echo "setup: installing ${apt_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "setup: qmpmig needs Python 3.11 or newer" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# libvirt-python's version must be the host libvirt's: it is built against it.
libvirt_version=$(pkg-config --modversion libvirt)
.venv/bin/python -c "import libvirt, sys; sys.exit(libvirt.getVersion() < 0)" 2>/dev/null ||
    .venv/bin/python -m pip install -q --disable-pip-version-check "libvirt-python==$libvirt_version"

vm-images/build.sh
scripts/build-libvfio-user.sh
echo "setup: ready ($(qemu-system-x86_64 --version | head -1))"
