#!/usr/bin/env python3
"""Soak: one qmpmig daemon, a guest migrated N times in a row, each time to a
fresh QEMU with a fresh reference device (so the guest goes back and forth
between generations of VMs), and the daemon's open descriptors and resident
memory after each migration, side by side with the first one's.

    .venv/bin/python scripts/soak-daemon.py [--migrations 20] [--memory 256]

Every migration must succeed with a clean trace and the destination device
never losing its client; the figures say whether the owner grows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpmig.daemon import client  # noqa: E402
from qmpmig.rig.processes import DeviceProcess  # noqa: E402
from qmpmig.rig.vm import DMA_WINDOW, Vm  # noqa: E402


def daemon_figures(run_dir: Path) -> tuple[int, int]:
    """(open descriptors, resident KiB) of the daemon of ``run_dir``."""
    pid = int((run_dir / "daemon.pid").read_text())
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return fds, rss


def qmpmig(run_dir: Path, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "qmpmig", *argv, "--json", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"qmpmig {argv[0]}: {done.stdout} {done.stderr}")
    return json.loads(done.stdout)


def soak(migrations: int, workdir: Path, memory: int = 256) -> list[dict]:
    """Migrate a guest ``migrations`` times through one daemon; a row of
    figures per migration."""
    run_dir = workdir / "run"
    asyncio.run(client.ensure_daemon(run_dir))
    ring = f"{DMA_WINDOW[0]:#x}:{DMA_WINDOW[1]:#x}"
    vm = Vm("g0", "source", workdir=workdir, memory_mib=memory).start()
    dev = DeviceProcess(workdir / "g0.sock", "--state-size", "16M").start()
    rows = []
    try:
        vm.wait_heartbeat(1, 60)
        qmpmig(run_dir, "attach", "g0", "--qmp", str(vm.qmp_path), "--ram", str(vm.ram_path),
               "--device", str(dev.socket), "--start-ring", ring)
        for n in range(1, migrations + 1):
            new = Vm(f"g{n}", "destination", workdir=workdir, memory_mib=memory).start()
            new_dev = DeviceProcess(workdir / f"g{n}.sock", "--state-size", "16M").start()
            qmpmig(run_dir, "attach", f"g{n}", "--qmp", str(new.qmp_path), "--ram", str(new.ram_path),
                   "--device", str(new_dev.socket))
            t0 = time.monotonic()
            result = qmpmig(run_dir, "migrate", "--src", f"g{n - 1}", "--dst", f"g{n}",
                            "--uri", f"unix:{workdir / f'mig{n}.sock'}")
            if not result["ok"] or result["trace_violations"]:
                raise RuntimeError(f"migration {n}: {result['message']} {result['trace_violations']}")
            seconds = time.monotonic() - t0
            device = qmpmig(run_dir, "status")["vms"][0]["devices"][0]
            if device["client_losses"]:
                raise RuntimeError(f"migration {n}: the destination device lost its client")
            vm.close()
            dev.close()
            vm, dev = new, new_dev
            fds, rss = daemon_figures(run_dir)
            rows.append({"migration": n, "seconds": round(seconds, 2), "daemon_fds": fds, "daemon_rss_kib": rss,
                         "pause_s": result["downtime_s"], "dma_seq": device.get("dma_seq")})
    finally:
        subprocess.run([sys.executable, "-m", "qmpmig", "daemon", "--stop", "--run-dir", str(run_dir)],
                       capture_output=True, timeout=60)
        dev.close()
        vm.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--migrations", type=int, default=20)
    p.add_argument("--memory", type=int, default=256, help="guest MiB")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="qmpmig-soak-") as workdir:
        rows = soak(args.migrations, Path(workdir), args.memory)
    first = rows[0]
    print(f"{'migration':>9} {'seconds':>8} {'pause s':>8} {'daemon fds':>10} {'vs first':>8} "
          f"{'daemon RSS KiB':>14} {'vs first':>9} {'dst dma_seq':>11}")
    for row in rows:
        print(f"{row['migration']:>9} {row['seconds']:>8} {row['pause_s']!s:>8} {row['daemon_fds']:>10} "
              f"{row['daemon_fds'] - first['daemon_fds']:>+8} {row['daemon_rss_kib']:>14} "
              f"{row['daemon_rss_kib'] - first['daemon_rss_kib']:>+9} {row['dma_seq']!s:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
