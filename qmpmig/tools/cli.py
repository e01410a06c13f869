"""The ``qmpmig`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
from pathlib import Path

from ..controller import DEBUG, Options
from ..errors import InvalidTransition, LifecycleRefused, QmpmigError
from ..migration import lifecycle
from ..migration.fsm import plan
from ..migration.states import MigFlags, MigState
from ..qemu.qmp import Qemu
from ..rig.launch import LaunchOptions, launch
from ..daemon import client
from ..daemon.control import default_run_dir
from ..daemon import peer
from ..daemon.owner import Owner, steady_malloc
from ..libvirt.api import SYSTEM
from . import check
from .tracecheck import RULES, check as check_trace, load as load_trace

ALL_FLAGS = MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY


def _device_target(role: str, state, flags: int) -> str:
    try:
        return lifecycle.target(role, state.runstate, state.status, flags).name
    except LifecycleRefused as err:
        return f"refused: {err.reason}"


class Progress:
    """A live status line on a terminal: phase, RAM left, device bytes, rate."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.live = stream.isatty()
        self._t0 = time.monotonic()

    def __call__(self, migration: dict) -> None:
        """One line from a migration as the daemon's ``status`` lists it."""
        if not self.live:
            return
        sent, ram = migration["device_bytes"], migration["ram_remaining"]
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        ram = "?" if ram is None else f"{ram >> 20} MiB"
        self.stream.write(f"\r{migration['phase']:10} RAM left {ram:>8}  devices sent {sent >> 20} MiB, "
                          f"pending {sum(migration['pending']) >> 10} KiB  {sent / elapsed / 2**20:6.1f} MiB/s ")
        self.stream.flush()

    def done(self) -> None:
        if self.live:
            self.stream.write("\n")


def _controller_options(args) -> Options:
    return Options(threshold=args.threshold, downtime_limit=args.downtime_limit,
                   max_downtime_limit=max(args.max_downtime_limit, args.downtime_limit),
                   timeout=args.timeout, max_pause=args.max_pause, debug=frozenset(args.debug),
                   device_flags=int(args.device_flags), compare_regions=tuple(args.compare_regions),
                   verify_ram=args.verify_ram or args.repair_ram, repair_ram=args.repair_ram)


def _region_write(text: str) -> tuple[int, int, bytes]:
    """``REGION:OFFSET:HEX`` (numbers in any base Python reads)."""
    try:
        region, offset, data = text.split(":")
        return int(region, 0), int(offset, 0), bytes.fromhex(data)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not REGION:OFFSET:HEXBYTES") from None


def _indices(text: str) -> list[int]:
    try:
        return [int(i, 0) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of region indices") from None


def _summary_dict(summary, report=None) -> dict:
    out = summary.as_dict()
    if report is not None:
        out["checks"] = {k: v or "ok" for k, v in report.checks.items()}
        out["trace_violations"] = [str(v) for v in report.violations]
        out["heartbeat"] = report.heartbeat
    return out


def _print_summary(d: dict) -> None:
    print(("OK: " if d["ok"] else "FAILED: ") + d["message"])
    print(f"  the guest: {GUEST_IS[d['guest_on']]}")
    print(f"  total {d['total_time_s']} s; guest paused {d['downtime_s']} s (QEMU's STOP to RESUME events; "
          f"QEMU's own downtime {d['qemu_downtime_ms']} ms); device I/O outage {d.get('device_outage_s')} s "
          f"(first device without DMA to last destination device RUNNING)")
    print(f"  device data {d['device_bytes']} bytes, DMA-dirty pages copied {d['dma_pages_copied']}"
          + "".join(f"; {name} outage {s} s" for name, s in d.get("device_outages_s", {}).items()))
    print("  phases: " + ", ".join(f"{k} {v}s" for k, v in d["phases_s"].items()))
    if d.get("ram_repaired"):
        print(f"  guest RAM repaired: {d['ram_repaired']} bytes differed at the destination after QEMU's load "
              f"and were copied from the source (--repair-ram)")
    for note in d.get("unverified", ()):
        print(f"  not verified: {note}")
    for name, result in d.get("checks", {}).items():
        print(f"  check {name}: {result}")
    if "trace_violations" in d:
        print("  trace check: " + ("ok" if not d["trace_violations"] else "; ".join(d["trace_violations"])))


#: ``qmpmig migrate``'s exit status when it did not complete cleanly, by
#: where the guest is (README, "Exit status"); 0 is a migration completed
#: with every check passed, 2 a command line argparse refused.
EXIT_STATUS = {"source": 1, "destination": 3, "nowhere": 4}

#: Where the guest is, in words.
GUEST_IS = {"source": "runs on at the source", "destination": "is at the destination",
            "nowhere": "is lost: its source QEMU died before the destination had all of it"}


async def _migrate(args) -> int:
    progress = Progress()
    if args.launch:
        opts = LaunchOptions(devices=args.devices, protocol=args.protocol or "v2", state_size=args.state_size,
                             memory_mib=args.memory, dma_rate=args.dma_rate, fault_stride=args.fault_stride,
                             mig_flags=args.mig_flags, trace_path=args.trace,
                             device_commands=tuple(args.device_cmd), device_writes=tuple(args.device_write),
                             controller=_controller_options(args))
        report = await launch(opts, progress if progress.live else None)
        result = _summary_dict(report.summary, report)
        ok = report.ok
    elif args.libvirt:
        result, ok = await _ask_migrate_libvirt(args, progress)
    elif args.src:
        result, ok = await _ask_migrate(args, args.src, args.dst, progress)
    else:
        result, ok = await _attach_and_migrate(args, progress)
    progress.done()
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        _print_summary(result)
    return 0 if ok else EXIT_STATUS[result.get("guest_on", "source")]


async def _attach_and_migrate(args, progress: Progress) -> tuple[dict, bool]:
    """Attach mode: hand both VMs and their devices to the host's daemon
    (started if none runs; a VM attached already is taken as it is, by its
    QMP socket), then ask it for the migration."""
    await client.ensure_daemon(args.run_dir)
    attached = {vm["name"] for vm in (await client.call(args.run_dir, "status"))["vms"]}
    for which, (qmp, ram) in enumerate(((args.src_qmp, args.src_ram), (args.dst_qmp, args.dst_ram))):
        name = os.path.abspath(qmp)
        if name not in attached:
            await client.call(args.run_dir, "attach", name=name, qmp=name, ram=os.path.abspath(ram),
                              devices=[os.path.abspath(spec.split(",")[which]) for spec in args.device],
                              protocol=args.protocol)
    return await _ask_migrate(args, os.path.abspath(args.src_qmp), os.path.abspath(args.dst_qmp), progress)


async def _ask_migrate(args, src: str, dst: str, progress: Progress) -> tuple[dict, bool]:
    """The daemon's migration of attached VM ``src`` to ``dst``: its result,
    and whether it succeeded with a clean trace."""
    dst, _, peer = dst.partition("@")
    request = client.call(args.run_dir, "migrate", src=src, dst=dst, uri=args.uri,
                          trace=args.trace and os.path.abspath(args.trace),
                          options=_controller_options(args).as_request(), peer=peer or None)
    result = await client.reporting(args.run_dir, request, progress if progress.live else None, src)
    return result, result["ok"] and not result["trace_violations"]


async def _ask_migrate_libvirt(args, progress: Progress) -> tuple[dict, bool]:
    """The daemon's migration of libvirt domain ``--libvirt`` (its hook
    handed it over) to the libvirt at ``--to``, the devices to the daemon
    at ``--peer`` (by default the host of ``--to``, port 7780)."""
    if not args.to:
        raise SystemExit("qmpmig migrate --libvirt DOMAIN needs --to, the destination's libvirt URI")
    host = urllib.parse.urlsplit(args.to).hostname
    if not (args.peer or host):
        raise SystemExit(f"qmpmig migrate --libvirt: {args.to} names no host: say where its daemon is (--peer)")
    peer_address = args.peer or (f"[{host}]" if ":" in host else host) + f":{peer.DEFAULT_PORT}"
    request = client.call(args.run_dir, "migrate_libvirt", domain=args.libvirt, to=args.to, peer=peer_address,
                          migrate_uri=args.uri, trace=args.trace and os.path.abspath(args.trace),
                          options=_controller_options(args).as_request())
    result = await client.reporting(args.run_dir, request, progress if progress.live else None, args.libvirt)
    return result, result["ok"] and not result["trace_violations"]


async def _follow(args) -> int:
    qemu = Qemu("follow")
    await qemu.connect(args.qmp)
    t0 = time.monotonic()
    try:
        async for state in qemu.states():
            target = _device_target(args.role, state, args.flags)
            print(json.dumps({"t": round(time.monotonic() - t0, 3), "runstate": state.runstate,
                              "status": state.status, "device_state": target}), flush=True)
    finally:
        await qemu.disconnect()
    return 0


def _trace_check(args) -> int:
    violations = check_trace(load_trace(args.file))
    failed = {v.rule for v in violations}
    for rule, (text, source) in RULES.items():
        print(f"{'FAIL' if rule in failed else 'PASS'}  {rule:18} {text}  [{source}]")
        for v in violations:
            if v.rule == rule:
                print(f"      record {v.seq}: {v.message}")
    return 1 if violations else 0


def _plan(args) -> int:
    try:
        steps = plan(MigState[args.cur], MigState[args.new], args.flags)
    except InvalidTransition as err:
        print(f"EINVAL: {err}", file=sys.stderr)
        return 1
    print(" -> ".join([args.cur, *(s.name for s in steps)]))
    return 0


def _daemon(args) -> int:
    """``qmpmig daemon``: serve in the foreground (``--stop``: ask it to end)."""
    if args.stop:
        asyncio.run(client.call(args.run_dir, "shutdown"))
        return 0
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="qmpmig-daemon[%(process)d] %(levelname)s %(name)s: %(message)s")
    steady_malloc()

    async def serve() -> None:
        owner = Owner(args.run_dir, listen=args.listen, tls_dir=args.tls_dir, libvirt_uri=args.libvirt_uri)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, owner.stopped.set)
        await owner.serve()

    asyncio.run(serve())
    return 0


def _attach(args) -> int:
    asyncio.run(client.ensure_daemon(args.run_dir))
    ring = [int(x, 0) for x in args.start_ring.split(":")] if args.start_ring else None
    vm = asyncio.run(client.call(args.run_dir, "attach", name=args.name, qmp=os.path.abspath(args.qmp),
                                 devices=[os.path.abspath(d) for d in args.device],
                                 protocol=args.protocol, start_ring=ring,
                                 **({"ram": os.path.abspath(args.ram)} if args.ram else {})))
    print(json.dumps(vm, indent=1) if args.json else _describe_vm(vm))
    return 0


def _recover(args) -> int:
    """``qmpmig recover``: a daemon for this run directory (started if none
    runs: starting, it ends what a dead one left half done), and what it
    found."""
    async def recover() -> dict:
        await client.ensure_daemon(args.run_dir)
        return await client.call(args.run_dir, "status")
    status = asyncio.run(recover())
    if args.json:
        print(json.dumps(status["recovered"], indent=1))
    for m in [] if args.json else status["recovered"]:
        print(f"migration {m['id']}: {m['message']}")
    if not args.json and not status["recovered"]:
        print("nothing was left half done")
    return 0


def _region(args) -> int:
    request = {"count": args.read} if args.read is not None else {"data": args.write}
    result = asyncio.run(client.call(args.run_dir, "region", vm=args.vm, device=args.device, index=args.index,
                                     offset=args.offset, **request))
    print(result.get("data", f"{result.get('written')} bytes written"))
    return 0


def _detach(args) -> int:
    asyncio.run(client.call(args.run_dir, "detach", name=args.name))
    return 0


def _status(args) -> int:
    status = asyncio.run(peer.call(args.peer, args.tls_dir, "status") if args.peer
                         else client.call(args.run_dir, "status"))
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(f"qmpmig daemon {status['pid']}: {len(status['vms'])} VM(s)")
    for vm in status["vms"]:
        print(_describe_vm(vm))
    for m in status["migrations"]:
        print(f"migration {m['id']}: {m['src']} -> {m['dst']}, {m['phase']}")
    return 0


def _describe_vm(vm: dict) -> str:
    lines = [f"{vm['name']}: ({vm['runstate']}, {vm['status']})" + (f", in migration {vm['busy']}" if vm["busy"] else "")]
    for dev in vm["devices"]:
        extra = "".join(f", {k} {dev[k]}" for k in ("state_hash", "dma_seq") if k in dev)
        extra += "".join(f", {k} {dev[k]}" for k in ("dma_faults", "client_losses") if dev.get(k))
        lines.append(f"  {dev['name']}: {dev['protocol']} {dev['state']}{extra}")
    return "\n".join(lines)


def _flags(text: str) -> int:
    value = 0
    for name in text.replace(",", "|").split("|"):
        name = name.strip().upper()
        if name.isdigit():
            value |= int(name)
        elif name in MigFlags.__members__:
            value |= MigFlags[name]
        else:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(MigFlags.__members__)}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qmpmig", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("device", help="serve a reference vfio-user device (see qmpmig device --help)")
    sub.add_parser("libvirt", help="qmpmig under libvirt: install-hook, hook, adopt, let-go "
                                   "(see qmpmig libvirt --help)")

    m = sub.add_parser("migrate", help="live-migrate a QEMU guest with its vfio-user devices")
    m.add_argument("--launch", action="store_true",
                   help="start everything here: two QEMUs of the test guest and the device processes")
    m.add_argument("--src", help="an attached VM (qmpmig attach) to migrate ...")
    m.add_argument("--dst", help="... to this attached VM, waiting with -incoming defer; VM@HOST:PORT is "
                                 "one attached to the daemon of another host, reached over TLS "
                                 "(qmpmig daemon --listen there)")
    m.add_argument("--libvirt", metavar="DOMAIN",
                   help="a libvirt domain with qmpmig devices (its hook handed it to this host's daemon): libvirt "
                        "migrates it (peer to peer, the destination paused until its devices run) ...")
    m.add_argument("--to", metavar="URI", help="... to this libvirt, e.g. qemu+tls://host-b/system")
    m.add_argument("--peer", metavar="HOST:PORT",
                   help="with --libvirt: the destination host's qmpmig daemon (default: --to's host, port "
                        f"{peer.DEFAULT_PORT})")
    m.add_argument("--src-qmp", help="source QEMU's QMP socket")
    m.add_argument("--dst-qmp", help="destination QEMU's QMP socket (started with -incoming defer -S)")
    m.add_argument("--uri", help="migration URI, e.g. unix:/run/mig.sock (with --libvirt: where QEMU's stream "
                                 "goes, e.g. tcp:10.0.0.2:49152; default: libvirt's choice)")
    m.add_argument("--src-ram", help="source guest RAM file (memory-backend-file mem-path, share=on)")
    m.add_argument("--dst-ram", help="destination guest RAM file")
    m.add_argument("--device", action="append", default=[], metavar="SRC_SOCKET,DST_SOCKET",
                   help="a device pair's vfio-user sockets (repeat for more)")
    m.add_argument("--protocol", choices=("v1", "v2"), help="force v1 or v2 (default: what devices offer)")
    m.add_argument("--devices", type=int, default=1, help="with --launch: device pairs to start")
    m.add_argument("--state-size", default="16M", help="with --launch: device internal state")
    m.add_argument("--dma-rate", type=int, default=500, help="with --launch: DMA records per second")
    m.add_argument("--fault-stride", type=int, default=0, help="with --launch: IO page faults every N pages")
    m.add_argument("--mig-flags", help="with --launch: v2 flags, e.g. STOP_COPY,P2P,PRE_COPY")
    m.add_argument("--memory", type=int, default=256, help="with --launch: guest MiB")
    m.add_argument("--device-cmd", action="append", default=[], metavar="TEMPLATE",
                   help="with --launch: your own vfio-user server instead of the reference device, a pair "
                        "per template; {sock} stands for its socket, e.g. 'server -v {sock}'")
    m.add_argument("--device-write", action="append", default=[], type=_region_write,
                   metavar="REGION:OFFSET:HEX", help="with --launch: bytes each source device gets written "
                                                     "into a region before the migration, as its driver would")
    m.add_argument("--device-flags", type=_flags, default=ALL_FLAGS, metavar="STOP_COPY[,P2P,PRE_COPY]",
                   help="use only these parts of the v2 protocol with the devices (default: all they offer)")
    m.add_argument("--compare-regions", type=_indices, default=[], metavar="I[,J...]",
                   help="for devices without qmpmig's state hash: compare these regions' contents, "
                        "source at the stop against destination after the load")
    m.add_argument("--verify-ram", action="store_true",
                   help="compare the destination's guest RAM with the source's, byte for byte, before the "
                        "destination runs; a difference fails the migration and the guest stays on the source "
                        "(both RAM files on this host; costs about 0.05 s of pause per 256 MiB)")
    m.add_argument("--repair-ram", action="store_true",
                   help="with the comparison of --verify-ram: copy what differs from the source's RAM (stopped "
                        "and final by then) and compare again, instead of failing: a workaround for QEMU before "
                        "9.0 under TCG, which loses guest stores (docs/known-problems.md), said in the summary")
    m.add_argument("--threshold", type=int, default=1 << 20, help="device bytes pending to end pre-copy")
    m.add_argument("--max-downtime", "--downtime-limit", dest="downtime_limit", type=int, default=300,
                   metavar="MS", help="the downtime budget: the vCPUs stop once QEMU's RAM and the devices' data "
                                      "left fit it at this migration's rates (default %(default)s ms)")
    m.add_argument("--max-downtime-limit", type=int, default=2000, metavar="MS",
                   help="how far the budget may be raised when pre-copy stalls (default %(default)s ms)")
    m.add_argument("--timeout", type=float, default=300.0)
    m.add_argument("--max-pause", type=float, default=5.0,
                   help="seconds a device that fails to answer may keep the guest paused (default %(default)s)")
    m.add_argument("--trace", help="write the JSON-lines trace here")
    m.add_argument("--json", action="store_true", help="print a JSON summary")
    m.add_argument("--debug", action="append", default=[], choices=sorted(DEBUG),
                   help="break one ordering rule on purpose (negative controls)")
    m.set_defaults(run=lambda a: asyncio.run(_migrate(a)))

    d = sub.add_parser("daemon", help="the devices' owner: serve the control socket in the foreground")
    d.add_argument("--stop", action="store_true", help="ask the running daemon to end (its devices reset)")
    d.add_argument("--listen", metavar="HOST:PORT",
                   help="serve peer daemons of other hosts here (TCP, TLS with client certificates)")
    d.add_argument("--tls-dir", type=Path, default=peer.DEFAULT_TLS_DIR,
                   help="ca-cert.pem, server-/client-cert.pem and -key.pem (QEMU's and libvirt's layout; "
                        "default %(default)s)")
    d.add_argument("--libvirt-uri", default=SYSTEM,
                   help="this host's libvirt, for the domains its hook hands over (default %(default)s)")
    d.add_argument("--log-level", default="INFO")
    d.set_defaults(run=_daemon)

    a = sub.add_parser("attach", help="hand a VM and its devices to the daemon (started if none runs)")
    a.add_argument("name")
    a.add_argument("--qmp", required=True, help="the VM's QMP socket")
    a.add_argument("--ram", help="its guest RAM file (default: the mem-path of its memory-backend-file, "
                                 "which must be share=on)")
    a.add_argument("--device", action="append", required=True, help="a device's vfio-user socket (repeat)")
    a.add_argument("--protocol", choices=("v1", "v2"))
    a.add_argument("--start-ring", metavar="IOVA:SIZE",
                   help="qmpmig's reference device only: play its driver, DMA records into this guest range")
    a.add_argument("--json", action="store_true")
    a.set_defaults(run=_attach)

    rg = sub.add_parser("region", help="read or write a region of an attached VM's device (as its driver would)")
    rg.add_argument("vm")
    rg.add_argument("device", help="dev0, dev1, ... (the order of attach's --device)")
    rg.add_argument("index", type=lambda v: int(v, 0), help="region index (BAR0 is 0)")
    rg.add_argument("offset", type=lambda v: int(v, 0))
    how = rg.add_mutually_exclusive_group(required=True)
    how.add_argument("--read", type=lambda v: int(v, 0), metavar="COUNT")
    how.add_argument("--write", metavar="HEX")
    rg.set_defaults(run=_region)

    dt = sub.add_parser("detach", help="the daemon lets go of a VM (its devices reset)")
    dt.add_argument("name")
    dt.set_defaults(run=_detach)

    st = sub.add_parser("status", help="the daemon's VMs, devices and migrations")
    st.add_argument("--json", action="store_true")
    st.add_argument("--peer", metavar="HOST:PORT", help="ask the daemon of another host (TLS, --tls-dir)")
    st.add_argument("--tls-dir", type=Path, default=peer.DEFAULT_TLS_DIR)
    st.set_defaults(run=_status)

    r = sub.add_parser("recover", help="end what a dead daemon left half done (starts the daemon)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(run=_recover)

    for each in (m, d, a, rg, dt, st, r):
        each.add_argument("--run-dir", type=Path, default=default_run_dir(),
                          help="the daemon's directory (control socket, log); default %(default)s")

    t = sub.add_parser("trace", help="work with a trace file")
    tsub = t.add_subparsers(dest="trace_command", required=True)
    tc = tsub.add_parser("check", help="prove the ordering rules over a trace")
    tc.add_argument("file")
    tc.set_defaults(run=_trace_check)

    f = sub.add_parser("follow", help="print a QEMU's (runstate, status) and the device_state it maps to")
    f.add_argument("--qmp", required=True)
    f.add_argument("--role", choices=lifecycle.ROLES, default="source")
    f.add_argument("--flags", type=_flags, default=ALL_FLAGS, help="e.g. STOP_COPY|PRE_COPY")
    f.set_defaults(run=lambda a: asyncio.run(_follow(a)))

    pl = sub.add_parser("plan", help="the arcs from one device_state to another")
    pl.add_argument("cur", choices=[s.name for s in MigState])
    pl.add_argument("new", choices=[s.name for s in MigState])
    pl.add_argument("--flags", type=_flags, default=ALL_FLAGS)
    pl.set_defaults(run=_plan)

    c = sub.add_parser("check", help="conformance run against a vfio-user device server")
    c.add_argument("--socket", help="the device's vfio-user socket")
    c.add_argument("--peer", help="a second device of the same kind to resume into")
    c.add_argument("--server-cmd", metavar="TEMPLATE",
                   help="start the server (and a peer) here, again whenever a connection needs one: "
                        "a command line with {sock} for the socket, e.g. 'server -v {sock}'")
    c.add_argument("--protocol", choices=("v1", "v2"), help="migrate by v1 or v2 (default: what the device offers)")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.set_defaults(run=check.command)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["device"]:
        from ..device.cli import main as device_main
        return device_main(argv[1:])
    if argv[:1] == ["libvirt"]:
        from ..libvirt.cli import main as libvirt_main
        return libvirt_main(argv[1:])
    args = parser().parse_args(argv)
    if args.command == "migrate" and any(spec.count(",") != 1 for spec in args.device):
        parser().error("--device takes SRC_SOCKET,DST_SOCKET")
    if args.command == "migrate" and not args.launch and not (args.libvirt and args.to) \
            and not (args.src and args.dst and args.uri) and not all(
            (args.src_qmp, args.dst_qmp, args.uri, args.src_ram, args.dst_ram)):
        parser().error("migrate needs --launch; or --libvirt DOMAIN and --to URI; "
                       "or --src, --dst and --uri of VMs attached to the daemon; "
                       "or --src-qmp, --dst-qmp, --uri, --src-ram and --dst-ram")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("qmpmig: interrupted (a migration asked of the daemon goes on: qmpmig status)", file=sys.stderr)
        return 130
    except QmpmigError as err:
        print(f"qmpmig: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
