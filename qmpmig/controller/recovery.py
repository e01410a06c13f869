"""Recovery after a failed migration: the source guest runs on with its
devices back where its vCPUs are (RUNNING, or STOP if it was paused) and
QEMU's settings as they were; the destination devices are reset and, once
it was asked to listen, the destination QEMU is ended (``quit``), so that
no second copy of the guest can ever be started there.  Each step is
bounded; what could not be recovered is said, never hidden."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from ..errors import MigrationFailed, QmpmigError, reason
from ..migration.states import MigState
from ..qemu.qmp import IDLE
from .flows import ready_ram
from .precopy import restore_settings
from .side import DeviceEnd

if TYPE_CHECKING:
    from .core import Controller

#: Seconds any one recovery step may take before it is given up.
RECOVER_TIMEOUT = 15.0


async def recover(c: Controller, running: bool) -> str:
    """Cancel; returns what the source looks like now."""
    c.enter("recover")
    c.walker.resumed()
    src = c.src
    notes = []
    if not src.gone:
        with contextlib.suppress(QmpmigError):
            await c.manager.cancel(c)
            await src.wait(lambda s: s.status in IDLE, "the cancel to finish", timeout=30)
        if running and src.vm and src.vm.runstate != "running":
            with contextlib.suppress(QmpmigError):
                await c.manager.resume_source(c)
                await src.wait(lambda s: s.runstate == "running", "source running", timeout=10)
        notes.append(f"source VM {src.vm.runstate if src.vm else 'unknown'}")
    else:
        # Its devices are let go with it (their owner's rule: a device
        # resets when its VM's client leaves); nothing to walk them back for.
        notes.append(f"source QEMU gone: {src.gone}")
    target = MigState.RUNNING if running else MigState.STOP
    for end in src.devices if not src.gone else ():
        try:
            await asyncio.wait_for(_recover_source_device(c, end, target), RECOVER_TIMEOUT)
            notes.append(f"{end.name} {target.name}")
        except (QmpmigError, OSError, asyncio.TimeoutError) as err:
            notes.append(f"{end.name} not recovered: {reason(err)}")
    for end in c.dst.devices:
        with contextlib.suppress(QmpmigError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(c.walker.reset(end), RECOVER_TIMEOUT)
    notes += await restore_settings(c)
    if c.run.incoming and not c.dst.gone:
        try:
            await c.manager.end_destination(c, RECOVER_TIMEOUT)
            notes.append("destination QEMU ended")
        except (QmpmigError, asyncio.TimeoutError) as err:
            notes.append(f"destination QEMU not ended: {reason(err)}")
    elif c.run.incoming:
        notes.append(c.dst.left_behind)
    return ", ".join(notes)


async def go_forward(c: Controller, running: bool) -> str:
    """A failure once every destination device has loaded its state: the
    guest's place is the destination now (the journal's rule too), so
    finish there as far as possible, and never start the source again."""
    c.enter("recover")
    c.walker.resumed()
    dst, notes = c.dst, ["the source stays stopped: the destination had started the guest" if c.dst.gone else
                         "the guest stays on the destination (every device there had loaded its state, "
                         "or QEMU had completed under a manager that then ends the source)"]
    try:
        await asyncio.wait_for(ready_ram(c), RECOVER_TIMEOUT)
    except (QmpmigError, OSError, asyncio.TimeoutError) as err:
        # Its RAM is not whole: it stays paused, for whoever looks next.
        running = False
        notes.append(f"the destination stays paused: {reason(err)}")
    target = MigState.RUNNING if running else MigState.STOP
    for end in dst.devices:
        try:
            await asyncio.wait_for(c.walker.check_state(end, strict=False), RECOVER_TIMEOUT)
            await asyncio.wait_for(c.walker.walk(end, target), RECOVER_TIMEOUT)
        except (QmpmigError, OSError, asyncio.TimeoutError) as err:
            notes.append(f"destination {end.name} not {target.name}: {reason(err)}")
    if unloaded := [end.name for end in dst.devices if end.state in (MigState.RESUMING, MigState.ERROR)]:
        # Never a guest run with a device that has not loaded its state.
        running = False
        notes.append(f"the destination stays paused: {', '.join(unloaded)} did not load its state")
    if running and not dst.gone and dst.vm and dst.vm.runstate != "running":
        c.run.dst_started = True
        try:
            await asyncio.wait_for(c.manager.resume_destination(c), RECOVER_TIMEOUT)
            notes.append("destination vCPUs started")
        except (QmpmigError, asyncio.TimeoutError) as err:
            notes.append(f"destination vCPUs not started: {reason(err)}")
    for end in c.src.devices:
        with contextlib.suppress(QmpmigError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(c.walker.walk(end, MigState.STOP), RECOVER_TIMEOUT)
    notes += await restore_settings(c)
    return ", ".join(notes)


async def _recover_source_device(c: Controller, end: DeviceEnd, target: MigState) -> None:
    await c.walker.check_state(end, strict=False)
    if end.state is MigState.ERROR:
        await c.walker.reset(end)
    await c.walker.walk(end, target)
    # Said only once the device itself says so (it may be gone).
    if (state := await end.device.state()) is not target:
        raise MigrationFailed(f"it reports {state.name}")
    with contextlib.suppress(OSError):
        await end.device.client.dma_logging_stop()
