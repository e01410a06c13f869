"""The ``qmpmig`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from . import check, lifecycle
from .errors import QmpmigError
from .fsm import InvalidTransition, plan
from .qemu import Qemu
from .rig import Observation, Pair, Rig
from .states import MigFlags, MigState

ALL_FLAGS = MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY


def _device_target(role: str, state, flags: int) -> str:
    try:
        return lifecycle.target(role, state.runstate, state.status, flags).name
    except lifecycle.LifecycleRefused as err:
        return f"refused: {err.reason}"


def _timeline(obs: Observation, role: str, t0: float, flags: int) -> list[dict]:
    return [{"t": round(t - t0, 3), "side": obs.side, "runstate": s.runstate, "status": s.status,
             "device_state": _device_target(role, s, flags)} for t, s in obs.states]


def _print_timeline(rows: list[dict]) -> None:
    print(f"{'t/s':>7}  {'side':4}  {'(runstate, status)':38}  device_state (flags STOP_COPY|P2P|PRE_COPY)")
    for r in sorted(rows, key=lambda r: r["t"]):
        print(f"{r['t']:7.3f}  {r['side']:4}  {'(' + r['runstate'] + ', ' + r['status'] + ')':38}  {r['device_state']}")


async def _migrate(args) -> int:
    t0 = time.monotonic()
    if args.launch:
        pair = Rig(memory_mib=args.memory)
        await pair.start()
    else:
        pair = Pair(args.src_qmp, args.dst_qmp, args.uri)
        await pair.attach()
    try:
        info = await pair.migrate(timeout=args.timeout)
        summary = {"status": info.status, "total_time_ms": info.total_time,
                   "downtime_ms": info.downtime, "ram_transferred": info.ram_transferred}
        if args.launch:
            last = pair.src.last_heartbeat()
            resumed = await asyncio.to_thread(pair.dst.wait_heartbeat, last, 30)
            summary.update(accel=pair.src.accel, src_last_heartbeat=last,
                           dst_first_heartbeat=pair.dst.heartbeats()[0], dst_heartbeat=resumed)
        await asyncio.sleep(0.3)
        rows = (_timeline(pair.seen["src"], "source", t0, ALL_FLAGS)
                + _timeline(pair.seen["dst"], "destination", t0, ALL_FLAGS))
    finally:
        await (pair.close() if args.launch else pair.detach())
    if args.json:
        json.dump({"summary": summary, "timeline": rows}, sys.stdout, indent=1)
        print()
    else:
        _print_timeline(rows)
        print("migration", " ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


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


def _plan(args) -> int:
    try:
        steps = plan(MigState[args.cur], MigState[args.new], args.flags)
    except InvalidTransition as err:
        print(f"EINVAL: {err}", file=sys.stderr)
        return 1
    print(" -> ".join([args.cur, *(s.name for s in steps)]))
    return 0


def _flags(text: str) -> int:
    value = 0
    for name in text.replace(",", "|").split("|"):
        value |= MigFlags[name.strip().upper()] if not name.strip().isdigit() else int(name)
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qmpmig", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", help="live-migrate a QEMU guest")
    m.add_argument("--launch", action="store_true",
                   help="start a source and a destination QEMU of the test guest here")
    m.add_argument("--src-qmp", help="source QEMU's QMP socket")
    m.add_argument("--dst-qmp", help="destination QEMU's QMP socket (-incoming defer)")
    m.add_argument("--uri", help="migration URI, e.g. unix:/run/mig.sock")
    m.add_argument("--memory", type=int, default=256, help="guest MiB with --launch")
    m.add_argument("--timeout", type=float, default=300.0)
    m.add_argument("--json", action="store_true", help="print a JSON summary")
    m.set_defaults(run=lambda a: asyncio.run(_migrate(a)))

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
    c.add_argument("--socket", required=True, help="the device's vfio-user socket")
    c.add_argument("--peer", help="a second device of the same kind to resume into")
    c.add_argument("--protocol", choices=("v1", "v2"), help="migrate by v1 or v2 (default: what the device offers)")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.set_defaults(run=check.command)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "migrate" and not args.launch and not (args.src_qmp and args.dst_qmp and args.uri):
        parser().error("migrate needs --launch, or --src-qmp, --dst-qmp and --uri")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("qmpmig: interrupted", file=sys.stderr)
        return 130
    except QmpmigError as err:
        print(f"qmpmig: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
