#!/usr/bin/env python3
"""Benchmark: device-to-device migration through qmpmig's vfio-user client,
v2 (MIG_DATA_READ/WRITE) and v1 (migration region, mmap'd window), against a
baseline measured in the same run: the same number of bytes pushed through a
UNIX socket pair in 1 MiB pieces by this Python, with nothing else.

    .venv/bin/python scripts/bench-device-migration.py [--size 256M] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpmig.rig.processes import DeviceProcess  # noqa: E402
from qmpmig.controller.devices import RemoteDevice, drain  # noqa: E402
from qmpmig.migration.states import MigState  # noqa: E402


def baseline(nbytes: int) -> float:
    """Seconds to move ``nbytes`` over a socketpair, 1 MiB per send."""
    a, b = socket.socketpair()
    chunk = bytes(1 << 20)

    def sink():
        left = nbytes
        while left:
            left -= len(b.recv(1 << 20))

    t = threading.Thread(target=sink)
    t0 = time.perf_counter()
    t.start()
    sent = 0
    while sent < nbytes:
        a.sendall(chunk[:min(len(chunk), nbytes - sent)])
        sent += min(len(chunk), nbytes - sent)
    t.join()
    elapsed = time.perf_counter() - t0
    a.close()
    b.close()
    return elapsed


async def migrate(protocol: str, state_size: str, workdir: Path) -> tuple[float, int, bool]:
    opts = ("--migration", protocol, "--state-size", state_size, "--mutate-rate", "0")
    with DeviceProcess(workdir / f"{protocol}-src.sock", *opts) as a, \
            DeviceProcess(workdir / f"{protocol}-dst.sock", *opts) as b:
        src, dst = await RemoteDevice.open(str(a.socket)), await RemoteDevice.open(str(b.socket))
        try:
            await dst.set_state(MigState.RESUMING)
            t0 = time.perf_counter()
            await src.set_state(MigState.STOP_COPY)
            moved = await drain(src, dst)
            await dst.set_state(MigState.STOP)
            elapsed = time.perf_counter() - t0
            same = await src.state_hash() == await dst.state_hash()
        finally:
            await src.close()
            await dst.close()
    return elapsed, moved, same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256M")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for protocol in ("v2", "v1"):
            times, moved, ok = [], 0, True
            for _ in range(args.runs):
                elapsed, moved, same = asyncio.run(migrate(protocol, args.size, Path(tmp)))
                times.append(elapsed)
                ok &= same
            base = [baseline(moved) for _ in range(args.runs)]
            t, b = statistics.median(times), statistics.median(base)
            rows.append((protocol, moved, t, b, ok))
    print(f"device state {args.size}, median of {args.runs} runs, stop-copy + resume incl. validation")
    print(f"{'path':6} {'bytes':>12} {'qmpmig s':>9} {'MiB/s':>8} {'baseline s':>11} {'MiB/s':>8} {'ratio':>6}  hash")
    for protocol, moved, t, b, ok in rows:
        mib = moved / 2**20
        print(f"{protocol:6} {moved:12d} {t:9.2f} {mib / t:8.1f} {b:11.2f} {mib / b:8.1f} {t / b:6.1f}  "
              f"{'equal' if ok else 'DIFFERENT'}")
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
