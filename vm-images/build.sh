#!/usr/bin/env bash
# Build the qmpmig x86_64 test guest (kernel + initramfs) from Debian packages only.
#
#   vm-images/build.sh [--force]
#
# Outputs (relative to this script's directory):
#   build/vmlinuz             kernel from linux-image-<abi>-<flavour> (Debian)
#   build/initramfs.cpio.gz   static busybox + guest/init (cpio newc, gzip)
#   build/manifest.json       package names/versions used + sha256 of outputs
#
# Nothing is installed on the host: the .deb files are fetched with
# `apt-get download` and unpacked with `dpkg-deb -x` into a scratch dir.
#
# Environment:
#   QMPMIG_KERNEL_FLAVOUR   kernel flavour meta-package suffix (default: cloud-amd64;
#                           "amd64" selects the generic kernel)
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
GUEST_INIT="$SCRIPT_DIR/guest/init"
OUT_DIR="$SCRIPT_DIR/build"
SCRATCH="$SCRIPT_DIR/.scratch"
DEB_CACHE="$SCRATCH/debs"
STAGE="$SCRATCH/stage"
STAMP_FILE="$OUT_DIR/.stamp"

FLAVOUR=${QMPMIG_KERNEL_FLAVOUR:-cloud-amd64}
KERNEL_META="linux-image-$FLAVOUR"
BUSYBOX_PKG="busybox-static"
CMDLINE="console=ttyS0 quiet panic=-1"
# Fixed mtime for everything in the initramfs (reproducible archives).
EPOCH=0

FORCE=0

log() { printf '[vm-images] %s\n' "$*"; }
die() { printf '[vm-images] error: %s\n' "$*" >&2; exit 1; }

usage() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --force|-f) FORCE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

[[ ${EUID:-$(id -u)} -eq 0 ]] || die "must run as root"

# Serialise concurrent invocations (e.g. parallel test runs): the second one
# waits, then normally finds the outputs cached.
mkdir -p "$SCRATCH"
exec 9>"$SCRATCH/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi
[[ -f $GUEST_INIT ]] || die "missing $GUEST_INIT"
for tool in apt-cache apt-get dpkg dpkg-deb tar gzip sha256sum find sort; do
    command -v "$tool" >/dev/null 2>&1 || die "required host tool not found: $tool"
done
host_arch=$(dpkg --print-architecture)
[[ $host_arch == amd64 ]] || die "host architecture is $host_arch; this builder expects amd64"

# ---------------------------------------------------------------- resolution
# Docker-style images set Dir::Cache::pkgcache "" so every apt-cache call
# re-parses all package lists (~0.5 s each).  Use a private binary cache in the
# scratch dir instead; apt revalidates it against the lists automatically.
APT_OPTS=(-o "Dir::Cache::pkgcache=$SCRATCH/apt-pkgcache.bin")

# Print "<pkg> <candidate-version>" for each package apt knows.
candidate_versions() {
    apt-cache "${APT_OPTS[@]}" policy -- "$@" 2>/dev/null \
        | awk '/^[^ ]/ { sub(/:$/, ""); pkg = $0 } /^  Candidate:/ { print pkg, $2 }'
}
version_of() {  # version_of <pkg> <candidate_versions output>
    awk -v p="$1" '$1 == p && $2 != "(none)" { print $2; exit }' <<<"$2"
}

# The meta-package depends on the concrete ABI-versioned image package, e.g.
# linux-image-cloud-amd64 -> linux-image-6.1.0-NN-cloud-amd64.
kernel_pkg=$(apt-cache "${APT_OPTS[@]}" depends --no-recommends --no-suggests \
                 --no-conflicts --no-breaks --no-replaces --no-enhances -- "$KERNEL_META" 2>/dev/null \
             | sed -n 's/^ *|\{0,1\}Depends: *\(linux-image-[0-9][^ <>]*\) *$/\1/p' \
             | head -n1) || true
[[ -n $kernel_pkg ]] \
    || die "could not resolve the versioned kernel package from $KERNEL_META (run 'apt-get update' first?)"
versions=$(candidate_versions "$KERNEL_META" "$kernel_pkg" "$BUSYBOX_PKG")
meta_version=$(version_of "$KERNEL_META" "$versions")
kernel_version=$(version_of "$kernel_pkg" "$versions")
busybox_version=$(version_of "$BUSYBOX_PKG" "$versions")
[[ -n $meta_version ]] || die "no candidate version for $KERNEL_META"
[[ -n $kernel_version ]] || die "no candidate version for $kernel_pkg"
[[ -n $busybox_version ]] || die "no candidate version for $BUSYBOX_PKG (run 'apt-get update' first?)"

stamp=$(
    {
        printf 'build.sh\n'; cat -- "${BASH_SOURCE[0]}"
        printf 'guest/init\n'; cat -- "$GUEST_INIT"
        printf 'packages\n%s=%s\n%s=%s\n%s=%s\n' \
            "$KERNEL_META" "$meta_version" "$kernel_pkg" "$kernel_version" \
            "$BUSYBOX_PKG" "$busybox_version"
    } | sha256sum | cut -d' ' -f1
)

print_outputs() {
    printf '  %s\n' "$OUT_DIR/vmlinuz" "$OUT_DIR/initramfs.cpio.gz" "$OUT_DIR/manifest.json"
}

# -------------------------------------------------------------------- cache
if [[ $FORCE -eq 0 && -f $STAMP_FILE && -f $OUT_DIR/vmlinuz \
      && -f $OUT_DIR/initramfs.cpio.gz && -f $OUT_DIR/manifest.json ]]; then
    if [[ $(head -n1 "$STAMP_FILE") == "$stamp" ]]; then
        log "cached: outputs are up to date ($kernel_pkg $kernel_version, $BUSYBOX_PKG $busybox_version); use --force to rebuild"
        print_outputs
        exit 0
    fi
fi

# ---------------------------------------------------------------- downloads
mkdir -p "$DEB_CACHE"

# The cached .deb of package $1 whose SHA256 is $2, if any; stale ones go.
cached_deb() {
    local f
    for f in "$DEB_CACHE/${1}_"*.deb; do
        [[ -f $f ]] || continue
        if [[ $(sha256sum -- "$f" | cut -d' ' -f1) == "$2" ]]; then
            printf '%s
' "$f"
            return 0
        fi
        rm -f -- "$f"   # stale version or corrupt
    done
    return 1
}

# Path of a verified .deb for pkg=version in $DEB_CACHE, downloading if needed.
fetch_deb() {
    local pkg=$1 ver=$2 want
    want=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions -- "$pkg=$ver" 2>/dev/null \
           | awk '/^SHA256:/ { print $2; exit }')
    [[ -n $want ]] || die "apt-cache has no SHA256 for $pkg=$ver"
    cached_deb "$pkg" "$want" && return 0
    log "downloading $pkg=$ver" >&2
    # APT::Sandbox::User=root: the scratch dir is not writable by _apt.
    (cd "$DEB_CACHE" && apt-get "${APT_OPTS[@]}" download -q -o APT::Sandbox::User=root -- "$pkg=$ver" >&2) \
        || die "apt-get download $pkg=$ver failed (stale apt lists? run 'apt-get update')"
    cached_deb "$pkg" "$want" || die "downloaded $pkg=$ver does not match the SHA256 from the apt index"
}

kernel_deb=$(fetch_deb "$kernel_pkg" "$kernel_version")
busybox_deb=$(fetch_deb "$BUSYBOX_PKG" "$busybox_version")

# ------------------------------------------------------------------ extract
rm -rf -- "$STAGE"
mkdir -p "$STAGE/kernel" "$STAGE/busybox" "$STAGE/root"
# Only ./boot is needed (the guest uses no modules): skip writing the ~100 MB
# of /lib/modules that a full `dpkg-deb -x` would unpack.
dpkg-deb --fsys-tarfile "$kernel_deb" | tar -x -C "$STAGE/kernel" --wildcards './boot/*'
dpkg-deb -x "$busybox_deb" "$STAGE/busybox"

shopt -s nullglob
vmlinuz_candidates=("$STAGE"/kernel/boot/vmlinuz-*)
config_candidates=("$STAGE"/kernel/boot/config-*)
shopt -u nullglob
[[ ${#vmlinuz_candidates[@]} -eq 1 ]] || die "expected exactly one /boot/vmlinuz-* in $kernel_pkg"
vmlinuz_src=${vmlinuz_candidates[0]}
kernel_release=${vmlinuz_src##*/vmlinuz-}

# The guest boots without any modules: make sure everything it needs is =y.
if [[ ${#config_candidates[@]} -eq 1 ]]; then
    missing=()
    for opt in BLK_DEV_INITRD RD_GZIP BINFMT_ELF BINFMT_SCRIPT PROC_FS SYSFS \
               DEVTMPFS TMPFS SHMEM SERIAL_8250 SERIAL_8250_CONSOLE TTY PRINTK; do
        grep -qx "CONFIG_$opt=y" "${config_candidates[0]}" || missing+=("CONFIG_$opt")
    done
    [[ ${#missing[@]} -eq 0 ]] \
        || die "$kernel_pkg lacks built-in ${missing[*]}; try QMPMIG_KERNEL_FLAVOUR=amd64"
else
    log "warning: no /boot/config-* in $kernel_pkg; cannot check built-in drivers" >&2
fi

busybox_bin="$STAGE/busybox/bin/busybox"
[[ -x $busybox_bin ]] || die "$BUSYBOX_PKG has no /bin/busybox"

# --------------------------------------------------------------- initramfs
root="$STAGE/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc,root}
chmod 1777 "$root/tmp"
install -m 0755 "$busybox_bin" "$root/bin/busybox"
install -m 0755 "$GUEST_INIT" "$root/init"
# Applet symlinks, from the (static, amd64) busybox itself.
while IFS= read -r applet; do
    case "$applet" in
        ''|linuxrc|*/init|bin/busybox) continue ;;
    esac
    [[ -e $root/$applet || -L $root/$applet ]] && continue
    ln -s /bin/busybox "$root/$applet"
done < <("$busybox_bin" --list-full)
# Initial console for the kernel to hand to /init (before devtmpfs is mounted).
mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null \
    || log "warning: could not mknod dev/console; /init will reopen it from devtmpfs" >&2
mknod -m 0666 "$root/dev/null" c 1 3 2>/dev/null || true
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
find "$root" -exec touch -h -d "@$EPOCH" {} +

mkdir -p "$OUT_DIR"
tmp_initrd="$OUT_DIR/.initramfs.cpio.gz.tmp"
tmp_kernel="$OUT_DIR/.vmlinuz.tmp"
trap 'rm -f -- "$tmp_initrd" "$tmp_kernel"' EXIT

# GNU cpio --reproducible gives byte-identical archives across rebuilds (it
# renumbers inodes); install the tiny host package if it is missing.  If that
# is impossible, fall back to the newc writer of the busybox we just unpacked
# (boots the same, but the archive then embeds host inode numbers).
if ! command -v cpio >/dev/null 2>&1; then
    log "host tool cpio missing; installing Debian package cpio" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=300 cpio >&2 \
        || log "warning: could not install cpio; using busybox cpio (not reproducible)" >&2
fi
if command -v cpio >/dev/null 2>&1 && cpio --help 2>&1 | grep -q -- --reproducible; then
    cpio_tool="GNU cpio $(cpio --version | head -n1 | awk '{ print $NF }')"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n > "$tmp_initrd"
else
    cpio_tool="busybox cpio"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
        | "$busybox_bin" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9 -n > "$tmp_initrd"
fi
install -m 0644 "$vmlinuz_src" "$tmp_kernel"

mv -f -- "$tmp_kernel" "$OUT_DIR/vmlinuz"
mv -f -- "$tmp_initrd" "$OUT_DIR/initramfs.cpio.gz"
trap - EXIT

# ----------------------------------------------------------------- manifest
kernel_sha=$(sha256sum -- "$OUT_DIR/vmlinuz" | cut -d' ' -f1)
initrd_sha=$(sha256sum -- "$OUT_DIR/initramfs.cpio.gz" | cut -d' ' -f1)
kernel_size=$(stat -c %s -- "$OUT_DIR/vmlinuz")
initrd_size=$(stat -c %s -- "$OUT_DIR/initramfs.cpio.gz")
kernel_deb_sha=$(sha256sum -- "$kernel_deb" | cut -d' ' -f1)
busybox_deb_sha=$(sha256sum -- "$busybox_deb" | cut -d' ' -f1)
init_sha=$(sha256sum -- "$GUEST_INIT" | cut -d' ' -f1)

# All values are plain package names, versions, hex digests and integers, so
# no JSON escaping is needed beyond what printf gives us.
cat > "$OUT_DIR/manifest.json.tmp" <<EOF
{
  "schema": 1,
  "arch": "amd64",
  "kernel_release": "$kernel_release",
  "kernel_cmdline": "$CMDLINE",
  "packages": [
    {"name": "$KERNEL_META", "version": "$meta_version", "role": "meta-package (resolution only, not downloaded)"},
    {"name": "$kernel_pkg", "version": "$kernel_version", "role": "kernel", "deb_sha256": "$kernel_deb_sha"},
    {"name": "$BUSYBOX_PKG", "version": "$busybox_version", "role": "userland", "deb_sha256": "$busybox_deb_sha"}
  ],
  "guest_init_sha256": "$init_sha",
  "cpio_tool": "$cpio_tool",
  "outputs": {
    "vmlinuz": {"path": "build/vmlinuz", "sha256": "$kernel_sha", "size": $kernel_size},
    "initramfs": {"path": "build/initramfs.cpio.gz", "sha256": "$initrd_sha", "size": $initrd_size}
  },
  "stamp": "$stamp"
}
EOF
mv -f -- "$OUT_DIR/manifest.json.tmp" "$OUT_DIR/manifest.json"
printf '%s\n' "$stamp" > "$STAMP_FILE"
rm -rf -- "$STAGE"

log "built $kernel_pkg $kernel_version + $BUSYBOX_PKG $busybox_version (kernel $kernel_size B, initramfs $initrd_size B, via $cpio_tool)"
log "boot with: -kernel $OUT_DIR/vmlinuz -initrd $OUT_DIR/initramfs.cpio.gz -append \"$CMDLINE\""
print_outputs
