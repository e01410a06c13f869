#!/usr/bin/env python3
"""qmpmig's benchmarks, each beside a baseline measured in the same run.

(a) migration: guest RAM at each size, one reference device: the devices'
    I/O outage, the guest's pause (QEMU's STOP to RESUME event timestamps),
    QEMU's own downtime and the total time; beside a QEMU-alone migration
    of the same guest on the same rig (no device, no hold).
(b) data path: a device's stop-copy stream through qmpmig's vfio-user
    client: the reference device's read alone, relayed into its twin, and
    a memory-speed device (--null-stream) relayed into its twin; beside the
    same bytes through a raw socket pair, a raw relay (three threads, two
    socket pairs: any relay's copies) and an in-memory copy.
(c) reaction: QEMU's pre-switchover event arriving -> the device's
    acknowledgement of STOP_COPY, over the migrations of (a) (one device
    each); (d) gives the slowest device's at each count.
(d) devices: 1, 4 and 16 device pairs: total time, the grace barrier's cost
    (first device in PRE_COPY_P2P -> the last), the outage.

    .venv/bin/python scripts/bench.py                 # the full run, by hand
    .venv/bin/python scripts/bench.py --smoke --json  # what the tests run

The table goes to the terminal; --json prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpmig.controller import Options  # noqa: E402
from qmpmig.controller.devices import RemoteDevice, drain  # noqa: E402
from qmpmig.migration.states import MigState  # noqa: E402
from qmpmig.rig.launch import LaunchOptions, launch  # noqa: E402
from qmpmig.rig.pair import Rig  # noqa: E402
from qmpmig.rig.processes import DeviceProcess  # noqa: E402

MiB = 1 << 20


# -- (a) migration beside QEMU alone -------------------------------------------

async def with_device(memory_mib: int, devices: int = 1, state_size: str = "16M") -> dict:
    report = await launch(LaunchOptions(memory_mib=memory_mib, devices=devices, state_size=state_size,
                                        verify_ram=False))
    s = report.summary
    return {"ok": report.ok, "message": s.message, "outage_s": s.device_outage, "pause_s": s.downtime,
            "qemu_downtime_ms": s.qemu_downtime_ms, "total_s": s.total_time, "device_bytes": s.device_bytes,
            "reactions_s": reactions(report.records), "barrier_s": barrier(report.records)}


async def qemu_alone(memory_mib: int) -> dict:
    """The same guest on the same rig, QEMU's own migration: no device, no
    hold, QEMU's default parameters."""
    async with Rig(memory_mib=memory_mib) as rig:
        with rig.src_qmp.listener(("STOP",)) as stops, rig.dst_qmp.listener(("RESUME",)) as resumes:
            t0 = time.monotonic()
            info = await rig.migrate(timeout=600)
            total = time.monotonic() - t0
            stop, resume = await asyncio.wait_for(stops.get(), 10), await asyncio.wait_for(resumes.get(), 10)
    return {"pause_s": stamp(resume) - stamp(stop), "qemu_downtime_ms": info.downtime, "total_s": total}


def stamp(event: dict) -> float:
    return event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6


# -- (b) the data path ------------------------------------------------------------

async def relay(state_size: str, workdir: Path, twin: bool = True, null: bool = False) -> tuple[float, int, bool]:
    """A v2 device's whole stop-copy stream through qmpmig's client (the
    controller's pipelined relay): into its twin, which loads it, or read
    and dropped.  With ``null`` the device serves ``state_size`` bytes from
    memory and the twin discards them.  Whether the state hashes agree."""
    opts = ("--mutate-rate", "0", "--dma-rate", "0",
            *(("--null-stream", state_size) if null else ("--state-size", state_size)))
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(DeviceProcess(workdir / "src.sock", *opts))
        b = stack.enter_context(DeviceProcess(workdir / "dst.sock", *opts)) if twin else None
        src = await RemoteDevice.open(str(a.socket))
        dst = await RemoteDevice.open(str(b.socket)) if b else None
        try:
            if dst:
                await dst.set_state(MigState.RESUMING)
            t0 = time.perf_counter()
            await src.set_state(MigState.STOP_COPY)
            moved = await drain(src, dst)
            if dst:
                await dst.set_state(MigState.STOP)
            elapsed = time.perf_counter() - t0
            same = not dst or null or await src.state_hash() == await dst.state_hash()
        finally:
            await src.close()
            if dst:
                await dst.close()
    return elapsed, moved, same


def raw_socket(nbytes: int) -> float:
    """Seconds to move ``nbytes`` over a socket pair, 1 MiB per send."""
    a, b = socket.socketpair()
    chunk = bytes(MiB)

    def sink():
        left = nbytes
        while left:
            left -= len(b.recv(MiB))

    t = threading.Thread(target=sink)
    t0 = time.perf_counter()
    t.start()
    sent = 0
    while sent < nbytes:
        n = min(MiB, nbytes - sent)
        a.sendall(chunk[:n])
        sent += n
    t.join()
    elapsed = time.perf_counter() - t0
    a.close()
    b.close()
    return elapsed


def raw_relay(nbytes: int) -> float:
    """Seconds to move ``nbytes`` from one socket pair to another through a
    middle thread (recv_into, sendall), 1 MiB at a time: the copies any
    relay between two sockets makes, at C speed."""
    (a, b), (c, d) = socket.socketpair(), socket.socketpair()
    chunk = bytes(MiB)

    def source():
        for at in range(0, nbytes, MiB):
            a.sendall(chunk[:min(MiB, nbytes - at)])

    def middle():
        buf = bytearray(MiB)
        left = nbytes
        while left:
            n = b.recv_into(buf, min(MiB, left))
            c.sendall(memoryview(buf)[:n])
            left -= n

    def sink():
        buf = bytearray(MiB)
        left = nbytes
        while left:
            left -= d.recv_into(buf, min(MiB, left))

    threads = [threading.Thread(target=f) for f in (source, middle, sink)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for s in (a, b, c, d):
        s.close()
    return elapsed


def memory_copy(nbytes: int) -> float:
    """Seconds to copy ``nbytes`` into a buffer already in place (memcpy)."""
    source, target = bytearray(nbytes), bytearray(nbytes)
    target[:] = source
    t0 = time.perf_counter()
    target[:] = source
    return time.perf_counter() - t0


# -- figures from a trace -----------------------------------------------------------

def reactions(records: list[dict]) -> list[float]:
    """Seconds from the source's pre-switchover event to each device's
    acknowledgement of STOP_COPY."""
    event = next((r["t"] for r in records if r["kind"] == "qmp_event" and r["side"] == "src"
                  and r["event"] == "MIGRATION" and r["data"].get("status") == "pre-switchover"), None)
    if event is None:
        return []
    return [r["t"] - event for r in records if r["kind"] == "device_state" and r["side"] == "src"
            and r["to"] == "STOP_COPY" and r["t"] >= event]


def barrier(records: list[dict]) -> float | None:
    """Seconds from the first source device in PRE_COPY_P2P to the last."""
    times = [r["t"] for r in records if r["kind"] == "device_state" and r["side"] == "src"
             and r["to"] == "PRE_COPY_P2P"]
    return max(times) - min(times) if times else None


# -- the run ---------------------------------------------------------------------------

def fmt(value, unit: str = "", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


async def run(sizes: list[int], counts: list[int], data: str, count_state: str, null_data: str) -> dict:
    out: dict = {"machine": {"cpus": os.cpu_count(), "accel": os.environ.get("QMPMIG_ACCEL", "auto")},
                 "migration": [], "data_path": {}, "devices": [], "reaction": {}}
    for size in sizes:
        mine, alone = await with_device(size), await qemu_alone(size)
        out["migration"].append({"memory_mib": size, "qmpmig": mine, "qemu_alone": alone})
    with tempfile.TemporaryDirectory(prefix="qmpmig-bench-") as tmp:
        read_s, moved, _ = await relay(data, Path(tmp), twin=False)
        elapsed, moved, same = await relay(data, Path(tmp))
        null_s, null_moved, _ = await relay(null_data, Path(tmp), null=True)
    out["data_path"] = {"bytes": moved, "device_read_s": read_s, "relay_s": elapsed, "hashes_equal": same,
                        "null_bytes": null_moved, "null_relay_s": null_s,
                        "raw_socket_s": raw_socket(null_moved), "raw_relay_s": raw_relay(null_moved),
                        "memory_copy_s": memory_copy(null_moved)}
    for n in counts:
        out["devices"].append({"devices": n, **await with_device(256, n, count_state)})
    samples = [x for row in out["migration"] for x in row["qmpmig"]["reactions_s"]]
    if samples:
        ordered = sorted(samples)
        out["reaction"] = {"samples": len(samples), "median_s": statistics.median(samples),
                           "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}
    return out


def table(out: dict) -> str:
    lines = ["(a) migration, one reference device (16 MiB state), TCG: qmpmig | QEMU alone, same rig",
             f"{'RAM MiB':>8} {'outage s':>9} {'pause s':>8} {'QEMU ms':>8} {'total s':>8} | "
             f"{'pause s':>8} {'QEMU ms':>8} {'total s':>8}  ok"]
    for row in out["migration"]:
        m, a = row["qmpmig"], row["qemu_alone"]
        lines.append(f"{row['memory_mib']:8d} {fmt(m['outage_s'], '', 3):>9} {fmt(m['pause_s'], '', 3):>8} "
                     f"{m['qemu_downtime_ms'] or '-':>8} {fmt(m['total_s']):>8} | {fmt(a['pause_s'], '', 3):>8} "
                     f"{a['qemu_downtime_ms'] or '-':>8} {fmt(a['total_s']):>8}  {'yes' if m['ok'] else m['message']}")
    d = out["data_path"]
    mib = d["bytes"] / MiB

    def row(name: str, seconds: float, size: float = mib, note: str = "") -> str:
        return f"{name:34} {seconds:8.3f} {size / max(seconds, 1e-9):9.1f}  {note}"
    lines += ["", f"(b) data path: one stop-copy stream of {mib:.0f} MiB",
              f"{'path':34} {'s':>8} {'MiB/s':>9}",
              row("reference device, read alone", d["device_read_s"]),
              row("reference device -> twin (relay)", d["relay_s"],
                  note=f"hashes {'equal' if d['hashes_equal'] else 'DIFFER'}"),
              row("memory-speed device -> twin (relay)", d["null_relay_s"], d["null_bytes"] / MiB),
              row("raw socket pair, 1 MiB sends", d["raw_socket_s"], d["null_bytes"] / MiB),
              row("raw relay, 3 threads, 2 socket pairs", d["raw_relay_s"], d["null_bytes"] / MiB),
              row("memory copy (memcpy)", d["memory_copy_s"], d["null_bytes"] / MiB),
              f"relay of the memory-speed device / raw socket: {d['raw_socket_s'] / d['null_relay_s']:.3f}; "
              f"/ raw relay: {d['raw_relay_s'] / d['null_relay_s']:.3f}"]
    r = out["reaction"]
    if r:
        lines += ["", f"(c) reaction, pre-switchover event -> STOP_COPY acknowledged, one device: median "
                      f"{r['median_s'] * 1000:.2f} ms, p99 {r['p99_s'] * 1000:.2f} ms ({r['samples']} samples)"]
    lines += ["", "(d) device pairs (4 MiB state each), 256 MiB guest",
              f"{'devices':>8} {'total s':>8} {'barrier ms':>11} {'reaction ms':>12} {'outage s':>9}  ok"]
    for row in out["devices"]:
        slowest = max(row["reactions_s"], default=None)
        lines.append(f"{row['devices']:8d} {fmt(row['total_s']):>8} "
                     f"{fmt(row['barrier_s'] and row['barrier_s'] * 1000, '', 1):>11} "
                     f"{fmt(slowest and slowest * 1000, '', 1):>12} {fmt(row['outage_s'], '', 3):>9}  "
                     f"{'yes' if row['ok'] else row['message']}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,1024,2048,4096", help="guest RAM sizes, MiB")
    p.add_argument("--devices", default="1,4,16", help="device pair counts for (d)")
    p.add_argument("--data", default="256M", help="device state for (b)")
    p.add_argument("--null-data", default="1G", help="the memory-speed device's stream for (b)")
    p.add_argument("--smoke", action="store_true", help="the short run: 256 MiB, 1 device, 16M of data")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.sizes, args.devices, args.data, args.null_data = "256", "1", "16M", "64M"
    out = asyncio.run(run([int(s) for s in args.sizes.split(",")], [int(n) for n in args.devices.split(",")],
                          args.data, "4M", args.null_data))
    print(json.dumps(out, indent=1) if args.json else table(out))
    ok = all(row["qmpmig"]["ok"] for row in out["migration"]) and all(row["ok"] for row in out["devices"])
    return 0 if ok and out["data_path"]["hashes_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
