"""``qmpmig migrate --launch``: the whole rig on this machine, migrated and
then checked.

Two QEMUs of the test guest, N pairs of reference devices doing DMA into
the guest's reserved window, one controller migration, and the proofs: the
guest's heartbeat goes on at the destination, every device's state hash at
the destination equals its source's at the stop, every DMA record is in the
destination's guest RAM, and the trace passes its checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from dataclasses import dataclass, field

from ..controller import Controller, Options, Pair, RemoteDevice, Side, Summary, Trace
from ..device import records
from ..device.bar0 import read_register, start_ring
from ..qemu.guestmem import GuestRam
from ..tools import tracecheck
from .pair import Rig


@dataclass
class LaunchOptions:
    devices: int = 1
    protocol: str = "v2"
    state_size: str = "16M"
    memory_mib: int = 256
    dma_rate: int = 500
    fault_stride: int = 0
    mig_flags: str | None = None
    device_defects: tuple[str, ...] = ()
    trace_path: str | None = None
    #: Seconds the guest and its devices run before the migration starts.
    settle: float = 1.0
    controller: Options = field(default_factory=Options)

    def device_argv(self) -> tuple[str, ...]:
        argv = ["--migration", self.protocol, "--state-size", self.state_size,
                "--dma-rate", str(self.dma_rate), "--fault-stride", str(self.fault_stride)]
        if self.mig_flags:
            argv += ["--mig-flags", self.mig_flags]
        for defect in self.device_defects:
            argv += ["--defect", defect]
        return tuple(argv)


@dataclass
class Report:
    summary: Summary
    checks: dict[str, str | None] = field(default_factory=dict)
    violations: list[tracecheck.Violation] = field(default_factory=list)
    heartbeat: tuple[int, int] | None = None
    records: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.summary.ok and not self.violations and not any(self.checks.values())


async def launch(opts: LaunchOptions, progress=None, during=None) -> Report:
    """Start the rig, migrate it with the controller, check the result.
    ``during(rig, controller)``, if given, runs alongside the migration
    (tests use it to cancel, kill or misconfigure things)."""
    rig = Rig(memory_mib=opts.memory_mib, devices=opts.devices, device_options=opts.device_argv())
    trace = Trace(opts.trace_path)
    opened: list[RemoteDevice] = []
    rams: list[GuestRam] = []
    sides: list[Side] = []
    side_task = None
    try:
        await rig.start()
        rams = [GuestRam(rig.src.ram_path), GuestRam(rig.dst.ram_path)]
        base, size = rig.src.dma_window
        rams[0].mem[base:base + size] = bytes(size)  # the boot left the compressed kernel there
        for qemu, ram, procs in ((rig.src_qmp, rams[0], [p[0] for p in rig.devices]),
                                 (rig.dst_qmp, rams[1], [p[1] for p in rig.devices])):
            devices = []
            for i, proc in enumerate(procs):
                opened.append(await RemoteDevice.open(str(proc.socket), opts.protocol))
                devices.append((f"dev{i}", opened[-1]))
            sides.append(Side(qemu, ram, opts.controller.timeout, trace))
            await sides[-1].attach(devices)
        controller = Controller(*sides, rig.uri, trace, opts.controller)
        controller.progress = progress

        async def restart_destination():
            qemu = await rig.restart_destination()
            ram = GuestRam(rig.dst.ram_path)
            rams.append(ram)
            return qemu, ram

        controller.restart_destination = restart_destination
        pairs = controller.pairs
        for i, pair in enumerate(pairs):
            await start_ring(pair.src.device.client, *rig.ring(i))
        if during:
            side_task = asyncio.create_task(during(rig, controller))
        await asyncio.sleep(opts.settle)
        last_src_beat = rig.src.last_heartbeat()
        settings = await _settings(rig.src_qmp)
        summary = await controller.migrate()
        if side_task:
            await side_task
        report = Report(summary)
        if summary.guest_on == "destination" and controller.dst.vm.runstate != "running":
            await _verify_paused(report, rig, pairs)
        elif summary.guest_on == "destination":
            await _verify(report, rig, pairs, controller.dst.ram, last_src_beat)
            await _verify_source_stopped(report, rig)
        else:
            await _verify_source_survived(report, rig, pairs, controller.src.ram)
            if any(r["kind"] == "qmp_command" and r["command"] == "migrate-incoming" for r in trace.records):
                await _verify_destination_ended(report, rig)
        if not controller.src.gone:
            now = await _settings(rig.src_qmp)
            report.checks["source QEMU settings"] = None if now == settings else f"{settings} before, {now} after"
        report.records = trace.records
        report.violations = tracecheck.check(trace.records)
        return report
    finally:
        if side_task and not side_task.done():
            side_task.cancel()
        for side in sides:
            await side.unfollow()
        for dev in opened:
            with contextlib.suppress(Exception):
                await dev.close()
        for ram in rams:
            with contextlib.suppress(ValueError, OSError):
                ram.close()
        trace.close()
        await rig.close()


async def _settings(qemu) -> dict:
    """The source's migration settings qmpmig may change."""
    caps = {c["capability"]: c["state"] for c in await qemu.execute("query-migrate-capabilities")}
    params = await qemu.execute("query-migrate-parameters")
    return {"events": caps.get("events"), "pause-before-switchover": caps.get("pause-before-switchover"),
            "max-bandwidth": params.get("max-bandwidth"), "downtime-limit": params.get("downtime-limit")}


async def _verify_source_stopped(report: Report, rig: Rig) -> None:
    """Once the destination has the guest, the source never runs it again."""
    status = await rig.src_qmp.query_status()
    report.checks["source stopped"] = None if not status.running else f"the source runs too ({status.runstate})"


async def _verify_destination_ended(report: Report, rig: Rig) -> None:
    """A failed migration leaves no destination QEMU that could run a
    second copy of the guest."""
    try:
        await asyncio.to_thread(rig.dst.proc.wait, 10)
        report.checks["destination QEMU ended"] = None
    except subprocess.TimeoutExpired:
        report.checks["destination QEMU ended"] = "the destination QEMU still runs after a failed migration"


async def _verify(report: Report, rig: Rig, pairs: list[Pair], dst_ram: GuestRam, last_src_beat: int) -> None:
    try:
        beat = await asyncio.to_thread(rig.dst.wait_heartbeat, last_src_beat, 30)
        report.heartbeat = (last_src_beat, beat)
        report.checks["heartbeat"] = None
    except Exception as err:
        report.checks["heartbeat"] = f"the guest did not go on at the destination: {err}"
    for i, pair in enumerate(pairs):
        if pair.src_hash is None or pair.src_hash != pair.dst_hash:
            report.checks[f"{pair.name} state"] = (f"destination state hash {pair.dst_hash and pair.dst_hash.hex()[:16]}"
                                                   f" != source {pair.src_hash and pair.src_hash.hex()[:16]}")
        else:
            report.checks[f"{pair.name} state"] = None
        iova, size = rig.ring(i)
        try:
            seq = await read_register(pair.dst.device.client, "dma_seq")
        except OSError as err:
            report.checks[f"{pair.name} DMA records"] = f"the destination device is unreachable: {err}"
            continue
        errors = records.verify(dst_ram.read(iova, size), i + 1, seq)
        report.checks[f"{pair.name} DMA records"] = (
            f"{len(errors)} of {min(seq, size // records.SIZE)} records wrong in destination RAM, "
            f"first: {errors[0]}" if errors else None)
        if not seq:
            report.checks[f"{pair.name} DMA records"] = "the device wrote no record"


async def _verify_paused(report: Report, rig: Rig, pairs: list[Pair]) -> None:
    """A guest paused before the migration stays paused at the destination,
    its devices in STOP with the source's state."""
    beat = rig.dst.last_heartbeat()
    await asyncio.sleep(1.0)
    report.checks["destination paused"] = (None if rig.dst.last_heartbeat() == beat
                                           else "the destination guest runs, the source's was paused")
    for pair in pairs:
        state = await pair.dst.device.state()
        same = pair.src_hash is not None and pair.src_hash == pair.dst_hash
        report.checks[f"{pair.name} state"] = (None if same and state.name == "STOP"
                                               else f"destination {state.name}, hashes {'equal' if same else 'differ'}")


async def _verify_source_survived(report: Report, rig: Rig, pairs: list[Pair], src_ram: GuestRam) -> None:
    """After a failed migration: the source guest runs on, and each source
    device runs with the state it had (not reset: its DMA goes on from where
    it was, and every record it wrote is in the source's RAM)."""
    try:
        beat = rig.src.last_heartbeat()
        await asyncio.to_thread(rig.src.wait_heartbeat, beat + 1, 20)
        report.checks["source heartbeat"] = None
    except Exception as err:
        report.checks["source heartbeat"] = f"the source guest stopped: {err}"
    for i, pair in enumerate(pairs):
        key = f"source {pair.name}"
        try:
            src = pair.src.device
            state = await src.state()
            first = await read_register(src.client, "dma_seq")
            await asyncio.sleep(0.3)
            second = await read_register(src.client, "dma_seq")
            iova, size = rig.ring(i)
            errors = records.verify(src_ram.read(iova, size), i + 1, first)
            report.checks[key] = (None if state.name == "RUNNING" and 0 < first < second and not errors
                                  else f"state {state.name}, dma_seq {first} -> {second}, {len(errors)} bad records")
        except Exception as err:
            report.checks[key] = f"unreachable: {err}"
