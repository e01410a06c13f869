"""A source and a destination QEMU, over QMP; and the rig of two test guests.

The rig is what ``qmpmig migrate --launch`` and the end-to-end tests run:
two :class:`~qmpmig.rig.vm.Vm` processes, a QMP session to each, a UNIX socket
for the migration stream, and observers that record every (run state,
migration status) each side passes through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QemuGone, VmError
from ..qemu.qmp import FINAL, MigrationInfo, Qemu, VmState
from .processes import DeviceProcess
from .vm import Vm, sweep_stale

log = logging.getLogger("qmpmig.rig")

#: Device processes yield the CPU to the guest: on a small machine a starved
#: guest dirties nothing, and QEMU then switches over before it is asked.
DEVICE_NICE = 10


@dataclass
class Observation:
    """What one side was seen to pass through, with monotonic timestamps."""

    side: str
    states: list[tuple[float, VmState]] = field(default_factory=list)
    gone: str | None = None

    @property
    def tuples(self) -> list[VmState]:
        return [s for _, s in self.states]


async def observe(qemu: Qemu, into: Observation) -> None:
    """Record ``qemu``'s states until cancelled or until it goes away."""
    try:
        async for state in qemu.states():
            into.states.append((time.monotonic(), state))
    except QemuGone as err:
        into.gone = str(err)


async def wait_state(obs: Observation, pred, timeout: float, what: str) -> VmState:
    """Wait until the observed side reaches a state ``pred`` accepts."""
    deadline = time.monotonic() + timeout
    while True:
        for _, state in obs.states:
            if pred(state):
                return state
        if obs.gone:
            raise QemuGone(f"{obs.side} went away waiting for {what}: {obs.gone}")
        if time.monotonic() > deadline:
            last = obs.tuples[-1] if obs.states else None
            raise TimeoutError(f"{obs.side}: no {what} within {timeout:.0f} s (last {last})")
        await asyncio.sleep(0.02)


class QemuPair:
    """A QMP session to a source and a destination QEMU, each observed from
    the moment :meth:`attach` returns."""

    def __init__(self, src_qmp_path: str, dst_qmp_path: str, uri: str):
        self.paths = {"src": src_qmp_path, "dst": dst_qmp_path}
        self.uri = uri
        self.src_qmp = Qemu("src")
        self.dst_qmp = Qemu("dst")
        self.seen = {"src": Observation("src"), "dst": Observation("dst")}
        self._observers: list[asyncio.Task] = []

    async def attach(self) -> None:
        """Connect QMP with the ``events`` capability on each side, and observe."""
        for side, qemu in (("src", self.src_qmp), ("dst", self.dst_qmp)):
            await qemu.connect(self.paths[side])
            await qemu.set_capabilities(events=True)
        for side, qemu in (("src", self.src_qmp), ("dst", self.dst_qmp)):
            self._observers.append(asyncio.create_task(observe(qemu, self.seen[side])))

    async def detach(self) -> None:
        for task in self._observers:
            task.cancel()
        for task in self._observers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.src_qmp.disconnect()
        await self.dst_qmp.disconnect()

    async def start_migration(self, **parameters) -> None:
        """migrate-incoming on the destination, then migrate on the source;
        ``parameters`` go to migrate-set-parameters on the source first."""
        if parameters:
            await self.src_qmp.set_parameters(**parameters)
        await self.dst_qmp.execute("migrate-incoming", {"uri": self.uri})
        await self.src_qmp.execute("migrate", {"uri": self.uri})

    async def wait_status(self, side: str, statuses, timeout: float = 120.0) -> VmState:
        statuses = {statuses} if isinstance(statuses, str) else set(statuses)
        return await wait_state(self.seen[side], lambda s: s.status in statuses, timeout,
                                f"migration status in {sorted(statuses)}")

    async def migrate(self, timeout: float = 120.0, cont: bool = True) -> MigrationInfo:
        """A plain QEMU live migration (no devices): start it, wait for both
        sides to complete, then (``cont``) start the destination's vCPUs."""
        await self.start_migration()
        src = await self.wait_status("src", FINAL, timeout)
        if src.status != "completed":
            info = await self.src_qmp.query_migrate()
            raise VmError(f"migration {src.status}: {info.error_desc}")
        await self.wait_status("dst", "completed", timeout)
        info = await self.src_qmp.query_migrate()
        if cont:
            await self.dst_qmp.execute("cont")
        return info


class Rig(QemuPair):
    """Two QEMUs running the test guest, started here: ``src`` (booted) and
    ``dst`` (``-incoming defer -S``); and ``devices`` pairs of
    ``qmpmig-device`` processes, source and destination, started with
    ``device_options``."""

    def __init__(self, *, memory_mib: int = 256, accel: str | None = None,
                 devices: int = 0, device_options: tuple[str, ...] = (), device_commands: tuple[str, ...] = ()):
        sweep_stale()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"qmpmig-rig-{os.getpid()}-"))
        self.src = Vm("src", "source", memory_mib=memory_mib, accel=accel, workdir=self.workdir)
        self.dst = Vm("dst", "destination", memory_mib=memory_mib, accel=accel, workdir=self.workdir)
        super().__init__(str(self.src.observer_qmp_path), str(self.dst.observer_qmp_path),
                         f"unix:{self.workdir / 'migration.sock'}")
        self.devices = [
            tuple(DeviceProcess(self.workdir / f"{side}-dev{i}.sock", *device_options,
                                "--device-id", str(i + 1), nice=DEVICE_NICE) for side in ("src", "dst"))
            for i in range(devices)] + [
            tuple(DeviceProcess(self.workdir / f"{side}-dev{i}.sock", command=command, nice=DEVICE_NICE)
                  for side in ("src", "dst"))
            for i, command in enumerate(device_commands, start=devices)]

    def ring(self, index: int) -> tuple[int, int]:
        """The slice of the guest's DMA window that device ``index`` owns."""
        base, size = self.src.dma_window
        share = size // max(1, len(self.devices))
        return base + index * share, share

    async def start(self, boot_timeout: float = 90.0) -> "Rig":
        """Start both QEMUs and the device processes, attach, and boot the
        source to its first heartbeat."""
        self.src.start()
        self.dst.start()
        for pair in self.devices:
            for proc in pair:
                proc.start()
        await self.attach()
        await asyncio.to_thread(self.src.wait_heartbeat, 0, boot_timeout)
        return self

    async def close(self) -> None:
        await self.detach()
        for pair in self.devices:
            for proc in pair:
                proc.close()
        self.src.close()
        self.dst.close()
        if os.environ.get("QMPMIG_KEEP_RIG"):
            log.warning("rig kept for inspection: %s", self.workdir)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> "Rig":
        try:
            return await self.start()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(self, *exc) -> None:
        await self.close()
