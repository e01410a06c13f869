#!/bin/bash
# Two hosts on one machine for qmpmig's libvirt tests: two real libvirtd
# (Debian 12's 9.0) instances, each in its own mount, network and UTS
# namespace ("lv-a", "lv-b"), with its own host UUID and its own
# /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and
# /var/cache/libvirt (bind mounts of $LV/<a|b>/...), joined by a veth pair
# 10.77.0.1/24 <-> 10.77.0.2/24.  Each has qmpmig's hook installed, with
# its own qmpmig run directory ($LV/<a|b>/qmpmig): a daemon per "host".
#
#   libvirt-hosts.sh up        start both (refuses if already up)
#   libvirt-hosts.sh status    holders, daemons, domains, addresses
#   libvirt-hosts.sh down      stop everything: domains, qmpmig daemons, libvirt
#                              daemons, namespaces (and with them mounts and veth)
#   libvirt-hosts.sh uri a|b   the qemu+unix URI this host uses for that instance
#   libvirt-hosts.sh sh a|b [cmd...]  run a command inside that instance's namespaces
#   libvirt-hosts.sh link a|b up|down  that host's end of the veth pair up or down (a cut link)
#
# Requires root, libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients
# (scripts/setup.sh installs them) and the test guest (vm-images/build.sh).
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LV=${LV:-/tmp/qmpmig-libvirt}
PYTHON=${PYTHON:-$top/.venv/bin/python}
NAMES=(a b)
declare -A IP=([a]=10.77.0.1 [b]=10.77.0.2)
declare -A VETH=([a]=lva [b]=lvb)
declare -A HOSTUUID=([a]=3f6d1c2e-8a41-4c1e-9b7a-0000000000a1 [b]=3f6d1c2e-8a41-4c1e-9b7a-0000000000b2)
IMAGES=${IMAGES:-$top/vm-images/build}
# Host paths that get a per-instance bind mount inside each namespace.
declare -A BIND=([etc]=/etc/libvirt [run]=/run/libvirt [lib]=/var/lib/libvirt [log]=/var/log/libvirt [cache]=/var/cache/libvirt)

log() { printf '[%s] %s\n' "$(date +%T.%3N)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
d() { echo "$LV/$1"; }
holder_pid() { cat "$LV/$1/holder.pid" 2>/dev/null || true; }
alive() {  # holder alive and really in another mount namespace
    local p; p=$(holder_pid "$1")
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null &&
        [ "$(readlink "/proc/$p/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ]
}
inns() { local n=$1; shift; nsenter -t "$(holder_pid "$n")" -m -n -u -- "$@"; }
uri() { echo "qemu+unix:///system?socket=$LV/$1/run/libvirt-sock"; }
vsh() { local n=$1; shift; virsh -q -c "$(uri "$n")" "$@"; }

write_configs() {
    local n=$1 D; D=$(d "$n")
    mkdir -p "$D"/{etc,run,lib,log,cache} "$D/etc/hooks/qemu.d" "$D/etc/qemu"
    # start from the package's files, if any (Debian's libvirt-daemon-system would ship them)
    [ -d /etc/libvirt ] && cp -an /etc/libvirt/. "$D/etc/" 2>/dev/null || true
    cat >"$D/etc/libvirtd.conf" <<EOF
# instance $n (written by two-libvirtd.sh)
listen_tls = 0
listen_tcp = 1
listen_addr = "0.0.0.0"
auth_tcp = "none"
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_group = "root"
host_uuid = "${HOSTUUID[$n]}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
    cat >"$D/etc/qemu.conf" <<EOF
# instance $n (written by two-libvirtd.sh)
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
namespaces = [ ]
migration_host = "${IP[$n]}"
migration_address = "0.0.0.0"
memory_backing_dir = "/var/lib/libvirt/qemu/ram"
EOF
    cat >"$D/etc/virtlogd.conf" <<EOF
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
EOF
    # qmpmig's hook, with this "host's" own run directory
    mkdir -p "$D/qmpmig" && chmod 700 "$D/qmpmig"
    "$PYTHON" -m qmpmig libvirt install-hook --hooks-dir "$D/etc/hooks/qemu.d" --run-dir "$D/qmpmig" >/dev/null
}

start_holder() {
    local n=$1 D; D=$(d "$n")
    rm -f "$D/holder.pid"
    # the holder keeps the namespaces alive; sh writes its own pid then execs sleep (same pid)
    setsid unshare --mount --net --uts --propagation private -- \
        sh -c "echo \$\$ > '$D/holder.pid'; exec sleep infinity" </dev/null >/dev/null 2>&1 &
    local i
    for i in $(seq 50); do [ -s "$D/holder.pid" ] && alive "$n" && return 0; sleep 0.1; done
    die "holder for $n did not start"
}

cmd_up() {
    for n in "${NAMES[@]}"; do alive "$n" && die "instance $n is already up (run down first)"; done
    command -v libvirtd >/dev/null || die "libvirtd not installed"
    # Debian's QEMU driver resolves its built-in default user/group libvirt-qemu:libvirt-qemu at init,
    # even with user = "root" in qemu.conf; libvirt-daemon-system would create them, we don't install it.
    getent group kvm >/dev/null || groupadd --system kvm
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
    getent passwd libvirt-qemu >/dev/null ||
        useradd --system -g kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
    local t0; t0=$(date +%s.%N)
    trap 'log "up failed: tearing down"; cmd_down' EXIT   # never leave half an environment behind
    mkdir -p "$LV/images"
    cp -u "$IMAGES/vmlinuz" "$IMAGES/initramfs.cpio.gz" "$LV/images/"
    for p in "${BIND[@]}"; do mkdir -p "$p"; done       # mount points on the host (empty dirs)
    for n in "${NAMES[@]}"; do
        local D; D=$(d "$n")
        rm -rf "$D/run" "$D/lib"                         # no stale status XML / sockets
        write_configs "$n"
        start_holder "$n"
        inns "$n" sh -euc "
            hostname lv-$n
            mount --bind '$D/etc'   /etc/libvirt
            mount --bind '$D/run'   /run/libvirt
            mount --bind '$D/lib'   /var/lib/libvirt
            mount --bind '$D/log'   /var/log/libvirt
            mount --bind '$D/cache' /var/cache/libvirt
            ip link set lo up"
        log "namespace $n: holder pid $(holder_pid "$n")"
    done
    # veth pair, created inside A with its peer placed straight into B
    inns a ip link add "${VETH[a]}" type veth peer name "${VETH[b]}" netns "$(holder_pid b)"
    for n in "${NAMES[@]}"; do
        inns "$n" ip addr add "${IP[$n]}/24" dev "${VETH[$n]}"
        inns "$n" ip link set "${VETH[$n]}" up
    done
    # (no ping on this box; reachability is proved by the qemu+tcp check below)
    log "veth up: ${IP[a]} <-> ${IP[b]}"
    for n in "${NAMES[@]}"; do
        inns "$n" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin virtlogd -d -p /run/libvirt/virtlogd.pid
        inns "$n" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin libvirtd -d --listen -p /run/libvirt/libvirtd.pid
    done
    for n in "${NAMES[@]}"; do
        local i ok=
        for i in $(seq 120); do
            if vsh "$n" version >/dev/null 2>&1; then ok=1; break; fi
            local lp; lp=$(cat "$(d "$n")/run/libvirtd.pid" 2>/dev/null || true)
            if [ "$i" -gt 6 ] && { [ -z "$lp" ] || ! kill -0 "$lp" 2>/dev/null; }; then
                tail -3 "$(d "$n")/log/libvirtd.log" >&2; break
            fi
            sleep 0.5
        done
        [ -n "$ok" ] || die "libvirtd $n did not answer on $(uri "$n"); see $(d "$n")/log/libvirtd.log"
        log "libvirtd $n up: $(vsh "$n" hostname) uuid=$(vsh "$n" capabilities | sed -n "s|.*<uuid>\(.*\)</uuid>.*|\1|p" | head -1) socket=$(d "$n")/run/libvirt-sock"
    done
    # TCP reachability of B's libvirtd from A's namespace (what --p2p uses)
    inns a virsh -q -c "qemu+tcp://${IP[b]}/system" hostname >/dev/null || die "A cannot reach B over qemu+tcp"
    trap - EXIT
    log "up in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s"
}

ns_pids() {  # all pids in the holder's mount namespace, except the holder
    local n=$1 hp ns p; hp=$(holder_pid "$n"); ns=$(readlink "/proc/$hp/ns/mnt")
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = "$hp" ] && continue
        [ "$(readlink "/proc/$p/ns/mnt" 2>/dev/null)" = "$ns" ] && echo "$p"
    done
    return 0
}

running() {  # pid exists and is not a zombie (our daemons are reparented to PID 1, which may reap late)
    local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

kill_wait() {  # kill_wait SIG pid... ; waits up to 10 s
    local sig=$1; shift; [ $# -gt 0 ] || return 0
    kill "-$sig" "$@" 2>/dev/null || true
    local i p left
    for i in $(seq 100); do
        left=; for p in "$@"; do running "$p" && left=1; done
        [ -z "$left" ] && return 0; sleep 0.1
    done
    return 1
}

cmd_down() {
    local n up=() daemons=() p
    for n in "${NAMES[@]}"; do alive "$n" && up+=("$n"); done
    for n in "${up[@]}"; do            # 1. guests (virsh destroy = SIGTERM, then SIGKILL, to QEMU)
        for dom in $(vsh "$n" list --name 2>/dev/null); do vsh "$n" destroy "$dom" >/dev/null 2>&1 || true; done
    done
    for n in "${up[@]}"; do            # 2. qmpmig's daemons (they own the domains' devices)
        "$PYTHON" -m qmpmig daemon --stop --run-dir "$(d "$n")/qmpmig" >/dev/null 2>&1 || true
    done
    for n in "${up[@]}"; do            # 3. both instances' libvirt daemons at once (each takes ~1.5-2 s to exit)
        for f in libvirtd virtlogd; do
            p=$(cat "$(d "$n")/run/$f.pid" 2>/dev/null || true)
            [ -n "$p" ] && kill -0 "$p" 2>/dev/null && daemons+=("$p")
        done
    done
    kill_wait TERM "${daemons[@]}" || kill_wait KILL "${daemons[@]}" || true
    for n in "${up[@]}"; do            # 4. anything else still in the namespace, then the holder
        local rest; rest=$(ns_pids "$n" | tr '\n' ' ')
        if [ -n "${rest// }" ]; then
            log "instance $n: leftover pids $rest"
            # shellcheck disable=SC2086
            kill_wait TERM $rest || kill_wait KILL $rest || true
        fi
        kill_wait TERM "$(holder_pid "$n")" || kill_wait KILL "$(holder_pid "$n")" || true
        rm -f "$(d "$n")/holder.pid"
        log "instance $n down (namespaces, binds and veth end gone with it)"
    done
}

cmd_status() {
    for n in "${NAMES[@]}"; do
        if ! alive "$n"; then echo "== $n: down"; continue; fi
        local D hp; D=$(d "$n"); hp=$(holder_pid "$n")
        echo "== $n: holder $hp  mntns $(readlink /proc/$hp/ns/mnt) netns $(readlink /proc/$hp/ns/net)"
        echo "   libvirtd pid $(cat "$D/run/libvirtd.pid" 2>/dev/null || echo -)  virtlogd pid $(cat "$D/run/virtlogd.pid" 2>/dev/null || echo -)"
        echo "   pids in ns: $(ns_pids "$n" | tr '\n' ' ')"
        inns "$n" ip -brief addr | sed 's/^/   /'
        vsh "$n" list --all 2>&1 | sed 's/^/   /' || true
    done
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    uri) uri "$2" ;;
    link) [ "${3:-}" = up ] || [ "${3:-}" = down ] || die "link a|b up|down"
          inns "$2" ip link set "${VETH[$2]}" "$3" ;;
    sh) n=$2; shift 2; if [ $# -eq 0 ]; then set -- bash; fi; inns "$n" "$@" ;;
    *) echo "usage: $0 up|down|status|uri a|b|link a|b up|down|sh a|b [cmd]" >&2; exit 2 ;;
esac
