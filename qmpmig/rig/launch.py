"""``qmpmig migrate --launch``: the whole rig on this machine, migrated by
a qmpmig daemon of its own, and then checked.

Two QEMUs of the test guest, N pairs of reference devices doing DMA into
the guest's reserved window, and a ``qmpmig daemon`` (its run directory in
the rig's) that owns every device connection, as the host's daemon would:
both VMs are attached to it and the migration is a request to it.  The
rig watches from outside, through each QEMU's second monitor and the
daemon's ``status``, and proves the result: the guest's heartbeat goes on
at the destination, every device's state hash at the destination equals
its source's at the stop, every DMA record is in the destination's guest
RAM (and the destination device, still owned by the daemon after the
migration, goes on writing them), and the trace passes its checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..controller import Options, Summary
from ..controller.precopy import settings_now
from ..daemon import client
from ..daemon.control import ControlError
from ..device import records
from ..qemu.guestmem import GuestRam
from ..tools import tracecheck
from .pair import Rig
from .processes import die_with_parent, stop_process


@dataclass
class LaunchOptions:
    devices: int = 1
    protocol: str = "v2"
    state_size: str = "16M"
    memory_mib: int = 256
    dma_rate: int = 500
    #: Internal pages each reference device rewrites per second.
    mutate_rate: int = 200
    fault_stride: int = 0
    mig_flags: str | None = None
    device_defects: tuple[str, ...] = ()
    trace_path: str | None = None
    #: Device servers of the user's own, a pair each, instead of the
    #: reference devices: command lines with {sock} for the socket.
    device_commands: tuple[str, ...] = ()
    #: (region, offset, bytes) written into each source device once it is
    #: attached, as its driver would (e.g. a BAR pattern to compare).
    device_writes: tuple[tuple[int, int, bytes], ...] = ()
    #: Seconds the guest and its devices run before the migration starts.
    settle: float = 1.0
    #: Compare the guests' RAM at switchover (Options.verify_ram): the rig's
    #: two RAM files are on this host.  Off only to measure the pause bare.
    verify_ram: bool = True
    controller: Options = field(default_factory=Options)

    def device_argv(self) -> tuple[str, ...]:
        argv = ["--migration", self.protocol, "--state-size", self.state_size,
                "--dma-rate", str(self.dma_rate), "--mutate-rate", str(self.mutate_rate),
                "--fault-stride", str(self.fault_stride)]
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
    #: time.monotonic() when the daemon answered the migration request: the
    #: migration over, recovered or not (before the rig's own checks).
    ended: float = 0.0

    @property
    def ok(self) -> bool:
        return self.summary.ok and not self.violations and not any(self.checks.values())


class Watch:
    """The rig's daemon, seen from outside through its control socket."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    async def phase(self) -> str | None:
        """The phase of the migration under way, None when there is none."""
        migrations = (await client.call(self.run_dir, "migrations"))["migrations"]
        return migrations[0]["phase"] if migrations else None

    async def wait_phase(self, *phases: str, timeout: float = 60.0) -> str | None:
        """Wait until the migration is in one of ``phases`` and return it;
        None if the migration ended before it got there."""
        started = False
        async with asyncio.timeout(timeout):
            while (phase := await self.phase()) not in phases:
                if phase is None and started:
                    return None
                started = started or phase is not None
                await asyncio.sleep(0.002)
        return phase

    async def devices_over(self, vm: str, seconds: float = 0.3) -> tuple[dict, dict]:
        """VM ``vm``'s devices now and ``seconds`` later (their DMA going on
        shows between the two)."""
        first = await self.devices(vm) or {}
        await asyncio.sleep(seconds)
        return first, await self.devices(vm) or {}

    async def devices(self, vm: str) -> dict[str, dict] | None:
        """VM ``vm``'s devices as the daemon describes them (None: not attached)."""
        for described in (await client.call(self.run_dir, "status"))["vms"]:
            if described["name"] == vm:
                return {device["name"]: device for device in described["devices"]}
        return None


async def launch(opts: LaunchOptions, progress: Callable[[dict], None] | None = None,
                 during: Callable | None = None) -> Report:
    """Start the rig and its daemon, ask the daemon for the migration, check
    the result.  ``during(rig, watch)``, if given, runs alongside the
    migration (tests use it to cancel, kill or misconfigure things at a
    phase ``watch`` waits for)."""
    rig = Rig(memory_mib=opts.memory_mib, devices=0 if opts.device_commands else opts.devices,
              device_options=opts.device_argv(), device_commands=opts.device_commands)
    run_dir = rig.workdir / "daemon"
    trace_path = Path(opts.trace_path or rig.workdir / "trace.jsonl").absolute()
    watch = Watch(run_dir)
    daemon = side_task = None
    rams: list[GuestRam] = []
    try:
        await rig.start()
        daemon = await client.start_daemon(run_dir, preexec_fn=die_with_parent)
        rams = [GuestRam(rig.src.ram_path), GuestRam(rig.dst.ram_path)]
        base, size = rig.src.dma_window
        rams[0].mem[base:base + size] = bytes(size)  # the boot left the compressed kernel there
        ring = None if opts.device_commands else [base, size]
        for vm, index, start_ring in ((rig.src, 0, ring), (rig.dst, 1, None)):
            await client.call(run_dir, "attach", name=vm.name, qmp=str(vm.qmp_path), ram=str(vm.ram_path),
                              devices=[str(pair[index].socket) for pair in rig.devices], protocol=opts.protocol,
                              start_ring=start_ring)
        for i in range(len(rig.devices)):
            for region, offset, data in opts.device_writes:
                await client.call(run_dir, "region", vm="src", device=f"dev{i}", index=region, offset=offset,
                                  data=data.hex())
        if during:
            side_task = asyncio.create_task(during(rig, watch))
        await asyncio.sleep(opts.settle)
        last_src_beat = rig.src.last_heartbeat()
        settings = await settings_now(rig.src_qmp)
        controller = replace(opts.controller, verify_ram=opts.controller.verify_ram or opts.verify_ram)
        request = client.call(run_dir, "migrate", src="src", dst="dst", uri=rig.uri, trace=str(trace_path),
                              options=controller.as_request())
        result = await client.reporting(run_dir, request, progress, "src")
        if side_task:
            await side_task
        report = Report(Summary.from_dict(result), ended=time.monotonic())
        report.records = tracecheck.load(trace_path)
        hashes = {name: (pair["src_hash"], pair["dst_hash"], pair["compared"])
                  for name, pair in result["devices"].items()}
        reference = not opts.device_commands
        incoming = any(r["kind"] == "qmp_command" and r["command"] == "migrate-incoming" for r in report.records)
        summary = report.summary
        if summary.guest_on == "destination" and rig.dst.proc.poll() is not None:
            report.checks["destination QEMU"] = ("gone after the guest's place had become the destination: "
                                                 "the guest is lost")
        elif summary.guest_on == "destination" and await _dst_paused(rig):
            await _verify_paused(report, rig, watch, hashes)
        elif summary.guest_on == "destination":
            await _verify(report, rig, watch, hashes, rams[1], last_src_beat, reference)
            await _verify_source_stopped(report, rig)
        elif summary.guest_on == "nowhere":
            await _verify_lost(report, rig, watch, incoming)
        else:
            await _verify_source_survived(report, rig, watch, rams[0], reference)
            if incoming:
                await _verify_destination_ended(report, rig)
        if controller.verify_ram and summary.guest_on == "destination":
            verified = [r for r in report.records if r["kind"] == "ram_verify"]
            report.checks["guest RAM identical at switchover"] = (
                "no RAM comparison in the trace" if not verified else
                None if not verified[-1]["differing"] else f"{verified[-1]['differing']} units differ")
        if rig.src.proc.poll() is None:
            now = await settings_now(rig.src_qmp)
            report.checks["source QEMU settings"] = None if now == settings else f"{settings} before, {now} after"
        report.violations = tracecheck.check(report.records)
        return report
    finally:
        if side_task and not side_task.done():
            side_task.cancel()
        if daemon:
            with contextlib.suppress(ControlError, OSError):
                await client.call(run_dir, "shutdown")
            await asyncio.to_thread(stop_process, daemon, 10.0)
        for ram in rams:
            with contextlib.suppress(ValueError, OSError):
                ram.close()
        await rig.close()


async def _dst_paused(rig: Rig) -> bool:
    return not (await rig.dst_qmp.query_status()).running


async def _verify_source_stopped(report: Report, rig: Rig) -> None:
    """Once the destination has the guest, the source never runs it again."""
    if rig.src.proc.poll() is not None:
        report.checks["source stopped"] = None
        return
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


async def _verify_lost(report: Report, rig: Rig, watch: Watch, incoming: bool) -> None:
    """A QEMU died when the guest had no other copy: nothing runs it any
    more (a source still there stays stopped), a destination asked to
    listen is ended, and the daemon lets go of the devices of each VM whose
    QEMU is gone (the owner's rule resets them).  A destination never asked
    to listen holds nothing of the guest and may wait on."""
    if rig.src.proc.poll() is None:
        await _verify_source_stopped(report, rig)
    if incoming:
        await _verify_destination_ended(report, rig)
    gone = [vm for vm, proc in (("src", rig.src.proc), ("dst", rig.dst.proc)) if proc.poll() is not None]
    report.checks["a QEMU gone"] = None if gone else "both QEMUs run, yet the guest is said to be lost"
    deadline = asyncio.get_running_loop().time() + 10
    while (held := [vm for vm in gone if await watch.devices(vm) is not None]) \
            and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    report.checks["devices let go"] = None if not held else f"the daemon still holds {held}"


async def _verify(report: Report, rig: Rig, watch: Watch, hashes: dict, dst_ram: GuestRam,
                  last_src_beat: int, reference: bool) -> None:
    """The guest goes on at the destination; each destination device,
    still owned by the daemon, has its source's state (where it can be
    compared), answers, and (the reference device) goes on writing DMA
    records into the destination's RAM."""
    try:
        beat = await asyncio.to_thread(rig.dst.wait_heartbeat, last_src_beat, 30)
        report.heartbeat = (last_src_beat, beat)
        report.checks["heartbeat"] = None
    except Exception as err:
        status = await rig.dst_qmp.query_status()
        report.checks["heartbeat"] = f"the guest did not go on at the destination ({status.runstate}): {err}"
    first, second = await watch.devices_over("dst")
    for i, (name, (src_hash, dst_hash, compared)) in enumerate(sorted(hashes.items())):
        if compared:
            report.checks[f"{name} state"] = (None if src_hash and src_hash == dst_hash else
                                              f"destination {compared} {dst_hash and dst_hash[:16]}"
                                              f" != source {src_hash and src_hash[:16]}")
        now = second.get(name, {})
        if not reference:
            report.checks[f"{name} answers"] = (None if now.get("state") == "RUNNING" and "unanswered" not in now
                                                else f"destination device: {now}")
            continue
        seq, later = first.get(name, {}).get("dma_seq"), now.get("dma_seq")
        if seq is None or later is None:
            report.checks[f"{name} DMA records"] = "the daemon cannot reach the destination device"
            continue
        iova, size = rig.ring(i)
        errors = records.verify(dst_ram.read(iova, size), i + 1, later)
        report.checks[f"{name} DMA records"] = (
            f"{len(errors)} of {min(later, size // records.SIZE)} records wrong in destination RAM, "
            f"first: {errors[0]}" if errors else
            None if 0 < seq < later else f"the destination device's DMA does not go on (dma_seq {seq} -> {later})")


async def _verify_paused(report: Report, rig: Rig, watch: Watch, hashes: dict) -> None:
    """A guest paused before the migration stays paused at the destination,
    its devices in STOP with the source's state."""
    beat = rig.dst.last_heartbeat()
    await asyncio.sleep(1.0)
    report.checks["destination paused"] = (None if rig.dst.last_heartbeat() == beat
                                           else "the destination guest runs, the source's was paused")
    devices = await watch.devices("dst") or {}
    for name, (src_hash, dst_hash, compared) in sorted(hashes.items()):
        state = devices.get(name, {}).get("state")
        same = not compared or src_hash == dst_hash
        report.checks[f"{name} state"] = (None if same and state == "STOP"
                                          else f"destination {state}, hashes {'equal' if same else 'differ'}")


async def _verify_source_survived(report: Report, rig: Rig, watch: Watch, src_ram: GuestRam,
                                  reference: bool) -> None:
    """After a failed migration: the source guest runs on, and each source
    device runs with the state it had (not reset: the reference device's
    DMA goes on from where it was, and every record it wrote is in the
    source's RAM)."""
    try:
        beat = rig.src.last_heartbeat()
        await asyncio.to_thread(rig.src.wait_heartbeat, beat + 1, 20)
        report.checks["source heartbeat"] = None
    except Exception as err:
        report.checks["source heartbeat"] = f"the source guest stopped: {err}"
    first, second = await watch.devices_over("src")
    for i, name in enumerate(f"dev{i}" for i in range(len(rig.devices))):
        key, now = f"source {name}", second.get(name, {})
        if not reference:
            report.checks[key] = (None if now.get("state") == "RUNNING" and "unanswered" not in now
                                  else f"source device: {now}")
            continue
        seq, later = first.get(name, {}).get("dma_seq"), now.get("dma_seq")
        if seq is None or later is None:
            report.checks[key] = "the daemon cannot reach it"
            continue
        iova, size = rig.ring(i)
        errors = records.verify(src_ram.read(iova, size), i + 1, seq)
        report.checks[key] = (None if now["state"] == "RUNNING" and 0 < seq < later and not errors
                              else f"state {now['state']}, dma_seq {seq} -> {later}, {len(errors)} bad records")
