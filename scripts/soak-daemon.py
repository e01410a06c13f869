#!/usr/bin/env python3
"""Soak: one qmpmig daemon, a guest migrated N times in a row, each time to a
fresh QEMU with fresh reference devices doing DMA (so the guest goes back
and forth between generations of VMs), and the daemon's open descriptors,
threads and resident memory after each migration, side by side with the
first one's.

    .venv/bin/python scripts/soak-daemon.py [--migrations 20] [--devices 2] [--memory 256] [--across]

``--across``: back and forth between two hosts, the network and mount
namespaces scripts/libvirt-e2e sets up (a veth pair between them), a
daemon in each with TLS: the guest over TCP, the device streams and
DMA-dirty pages between the daemons (root; ``LV`` names their directory).

Every migration must pass its checks: it succeeds with a clean trace, each
device's state hash matches, the guest's heartbeat goes on at the
destination, and each destination device keeps writing DMA records without
losing its client, every record it wrote (before and after the migration)
in place in the destination's guest RAM.  The figures say whether the owner grows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from qmpmig.daemon import client  # noqa: E402
from qmpmig.device import records  # noqa: E402
from qmpmig.rig.processes import DeviceProcess  # noqa: E402
from qmpmig.rig.vm import DMA_WINDOW, Vm  # noqa: E402


def daemon_figures(run_dir: Path) -> tuple[int, int, int]:
    """(open descriptors, resident KiB, threads) of the daemon of ``run_dir``."""
    pid = int((run_dir / "daemon.pid").read_text())
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return fds, int(status["VmRSS"].split()[0]), int(status["Threads"])


def qmpmig(run_dir: Path, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "qmpmig", *argv, "--json", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"qmpmig {argv[0]}: {done.stdout} {done.stderr}")
    return json.loads(done.stdout)


def devices_now(run_dir: Path, tries: int = 5) -> list[dict]:
    """The attached VM's devices as the daemon describes them; asked again
    while one is described as unanswered (the daemon gives a device 2 s to
    answer ``status``, which a loaded 2-CPU machine can exceed)."""
    for _ in range(tries):
        devices = qmpmig(run_dir, "status")["vms"][0]["devices"]
        if all("dma_seq" in d for d in devices):
            return devices
        time.sleep(0.5)
    raise RuntimeError(f"a device did not answer the daemon {tries} times: {devices}")


@dataclass
class Host:
    """Where a generation of the guest runs: a daemon's run directory, and
    (across hosts) the prefix that runs a program in the host's namespaces
    and the address its daemon serves peers on."""

    run_dir: Path
    launcher: tuple[str, ...] = ()
    ip: str | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:7780"


def soak(migrations: int, workdir: Path, memory: int = 256, devices: int = 1,
         report=lambda row: None, hosts: list[Host] | None = None) -> list[dict]:
    """Migrate a guest ``migrations`` times, generation n on host n mod
    len(hosts) (one daemon by default; two: back and forth between them,
    their daemons already serving); a row of figures per migration
    (RuntimeError at the first that fails a check)."""
    if hosts is None:
        hosts = [Host(workdir / "run")]
        asyncio.run(client.ensure_daemon(hosts[0].run_dir))
    ring = f"{DMA_WINDOW[0]:#x}:{DMA_WINDOW[1]:#x}"

    def generation(n: int, role: str) -> tuple[Vm, list[DeviceProcess]]:
        host = hosts[n % len(hosts)]
        vm = Vm(f"g{n}", role, workdir=workdir, memory_mib=memory, launcher=host.launcher).start()
        return vm, [DeviceProcess(workdir / f"g{n}-{i}.sock", "--state-size", "16M", "--device-id", str(i + 1)).start()
                    for i in range(devices)]

    def attach(n: int, vm: Vm, devs: list[DeviceProcess], *extra: str) -> None:
        qmpmig(hosts[n % len(hosts)].run_dir, "attach", f"g{n}", "--qmp", str(vm.qmp_path), "--ram",
               str(vm.ram_path), *[arg for dev in devs for arg in ("--device", str(dev.socket))], *extra)

    vm, devs = generation(0, "source")
    rows = []
    try:
        vm.wait_heartbeat(1, 90)
        attach(0, vm, devs, "--start-ring", ring)
        for n in range(1, migrations + 1):
            here, there = hosts[(n - 1) % len(hosts)], hosts[n % len(hosts)]
            new, new_devs = generation(n, "destination")
            attach(n, new, new_devs)
            t0 = time.monotonic()
            result = qmpmig(here.run_dir, "migrate", "--src", f"g{n - 1}",
                            "--dst", f"g{n}" if here is there else f"g{n}@{there.address}",
                            "--uri", f"unix:{workdir / f'mig{n}.sock'}" if here is there else
                            f"tcp:{there.ip}:{4400 + n % 500}")
            seconds = time.monotonic() - t0
            if not result["ok"] or result["trace_violations"]:
                raise RuntimeError(f"migration {n}: {result['message']} {result['trace_violations']}")
            if any(d["src_hash"] != d["dst_hash"] or not d["compared"] for d in result["devices"].values()):
                raise RuntimeError(f"migration {n}: device state differs: {result['devices']}")
            beat = vm.last_heartbeat()
            new.wait_heartbeat(beat, 30)
            first = devices_now(there.run_dir)
            time.sleep(0.3)
            later = devices_now(there.run_dir)
            for a, b in zip(first, later):
                if b["client_losses"] or b["dma_faults"] or not b["dma_seq"] > a["dma_seq"]:
                    raise RuntimeError(f"migration {n}: destination device {b['name']} no longer works: {b}")
            with open(new.ram_path, "rb") as ram:
                ram.seek(DMA_WINDOW[0])
                window = ram.read(DMA_WINDOW[1])
            share = len(window) // devices
            for i, b in enumerate(later):
                if errors := records.verify(window[i * share:(i + 1) * share], i + 1, b["dma_seq"]):
                    raise RuntimeError(f"migration {n}: {b['name']}'s DMA records in guest RAM: {errors[:3]}")
            vm.close()
            for dev in devs:
                dev.close()
            vm, devs = new, new_devs
            figures = [daemon_figures(host.run_dir) for host in hosts]
            rows.append({"migration": n, "seconds": round(seconds, 2),
                         **{key: [f[i] for f in figures] for i, key in
                            enumerate(("daemon_fds", "daemon_rss_kib", "daemon_threads"))},
                         "pause_s": result["downtime_s"], "dma_seq": [d.get("dma_seq") for d in later]})
            report(rows[-1])
    finally:
        for host in hosts:
            subprocess.run([sys.executable, "-m", "qmpmig", "daemon", "--stop", "--run-dir", str(host.run_dir)],
                           capture_output=True, timeout=60)
        for dev in devs:
            dev.close()
        vm.close()
    return rows


@contextlib.contextmanager
def two_hosts(workdir: Path):
    """scripts/libvirt-e2e's two hosts (namespaces joined by a veth pair),
    a daemon in each with TLS, serving peers on its address."""
    spec = importlib.util.spec_from_loader("e2e", importlib.machinery.SourceFileLoader(
        "e2e", str(TOP / "scripts" / "libvirt-e2e")))
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    e2e.LV.mkdir(parents=True, exist_ok=True)
    e2e.hosts("up", timeout=300)
    daemons = []
    try:
        tls = e2e.pki(workdir / "pki")
        hosts = [Host(workdir / f"run-{h}", e2e.inns(h), ip) for h, ip in (("a", e2e.IP_A), ("b", e2e.IP_B))]
        for name, host in zip("ab", hosts):
            daemons.append(subprocess.Popen(
                [*host.launcher, sys.executable, "-m", "qmpmig", "daemon", "--run-dir", str(host.run_dir),
                 "--tls-dir", str(tls[name]), "--listen", host.address], cwd=TOP, stdout=subprocess.DEVNULL,
                stderr=open(workdir / f"daemon-{name}.log", "ab")))
            e2e.wait(lambda: (host.run_dir / "daemon.pid").exists(), 20, f"host {name}'s daemon")
        yield hosts
    finally:
        for proc in daemons:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        e2e.hosts("down")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--migrations", type=int, default=20)
    p.add_argument("--memory", type=int, default=256, help="guest MiB")
    p.add_argument("--devices", type=int, default=2, help="reference devices doing DMA")
    p.add_argument("--across", action="store_true",
                   help="back and forth between two hosts in namespaces (scripts/libvirt-e2e's; root)")
    args = p.parse_args()
    print(f"{'migration':>9} {'seconds':>8} {'pause s':>8} {'daemon fds':>12} {'threads':>8} "
          f"{'daemon RSS KiB':>16} {'RSS vs first':>14}  dst dma_seq", flush=True)
    rows: list[dict] = []

    def report(row: dict) -> None:
        rows.append(row)
        grown = [now - then for now, then in zip(row["daemon_rss_kib"], rows[0]["daemon_rss_kib"])]
        print(f"{row['migration']:>9} {row['seconds']:>8} {row['pause_s']!s:>8} {str(row['daemon_fds']):>12} "
              f"{str(row['daemon_threads']):>8} {str(row['daemon_rss_kib']):>16} {str(grown):>14}  "
              f"{row['dma_seq']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="qmpmig-soak-") as workdir:
        with two_hosts(Path(workdir)) if args.across else contextlib.nullcontext() as hosts:
            soak(args.migrations, Path(workdir), args.memory, args.devices, report, hosts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
