"""A libvirt domain's devices to the host's daemon and back: what the hook
starts, detached, at ``started`` and ``release``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ..daemon import client
from ..errors import QmpmigError
from ..rig.processes import listening
from .hook import stop_devices

#: Seconds a just-started domain has to show its monitor and device sockets.
READY_TIMEOUT = 30.0


async def adopt(name: str, monitor: str, devices: list[str], run_dir: Path, incoming: str = "refuse",
                timeout: float = READY_TIMEOUT) -> dict:
    """Once the second QMP monitor and every device listen, the daemon (one
    is started if none runs) attaches the domain under its name; its guest
    RAM is the file QEMU's memory backend names."""
    deadline = time.monotonic() + timeout
    waiting = [monitor, *devices]
    while waiting := [path for path in waiting if not listening(Path(path))]:
        if time.monotonic() > deadline:
            raise QmpmigError(f"{name}: not listening after {timeout:.0f} s: {', '.join(waiting)}")
        await asyncio.sleep(0.1)
    await client.ensure_daemon(run_dir)
    return await client.call(run_dir, "attach", name=name, qmp=monitor, devices=devices, libvirt=incoming)


async def let_go(name: str, run_dir: Path, started: list[dict]) -> None:
    """The daemon lets go of the domain (its devices reset), if it has it,
    once the migration it takes part in has ended (libvirt ends a migrated
    domain's source while qmpmig may still finish there); then the device
    processes the hook had started for it stop (``started``, taken at the
    release: a start of the domain meanwhile keeps its own)."""
    try:
        if await client.running(run_dir):
            await client.call(run_dir, "detach", name=name, when_idle=True)
    except QmpmigError:
        pass
    stop_devices(started)
