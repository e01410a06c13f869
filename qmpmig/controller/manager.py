"""Who drives QEMU's side of a migration: qmpmig itself, over QMP
(:class:`QmpManager`), or libvirt (``qmpmig.libvirt.manager``).

The flows ask the manager for every step that starts, holds, stops,
releases, cancels or resumes QEMU's migration; the devices, the guest RAM
and the trace are the flows' own whoever the manager is.  Two facts set the
managers apart, and the flows read them here:

- :attr:`answers_pre_switchover`: qmpmig answers QEMU's ``pre-switchover``
  itself, so the devices' stop-copy runs in that pause.  libvirt answers it
  at once (docs/libvirt-flow.md), so there the vCPUs stop with QEMU still
  held and the devices' stop-copy ends before QEMU is released.
- :attr:`dst_ready`: the destination VM is attached before the migration
  starts.  Under libvirt it exists only once libvirt's Prepare started it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from ..errors import MigrationFailed, reason
from ..qemu import channel

if TYPE_CHECKING:
    from .core import Controller
    from .side import Side

#: The migration capabilities the flow turns on, per side.
CAPABILITIES = {"src": ("events", "pause-before-switchover"), "dst": ("events",)}
#: The migration parameters the flow changes (on the source).
PARAMETERS = ("max-bandwidth", "downtime-limit")
#: Seconds QEMU has to answer migrate_cancel before qmpmig shuts its
#: stream down itself (QmpManager.cancel).
CANCEL_GRACE = 0.5


class Manager(Protocol):
    """What the flows ask of whoever drives QEMU's migration."""

    answers_pre_switchover: bool
    dst_ready: bool

    async def settings(self, c: Controller) -> dict[str, dict]:
        """side -> what the flow will change, as it is now (for put_back)."""

    async def enable(self, c: Controller) -> None:
        """The capabilities the flow needs, turned on once what
        :meth:`settings` read is in the journal."""

    async def put_back(self, side: Side, saved: dict) -> None: ...

    async def set_parameters(self, c: Controller, parameters: dict) -> None:
        """QEMU's max-bandwidth (bytes/s) and downtime-limit (ms)."""

    async def start(self, c: Controller) -> None:
        """QEMU's migration under way; under a manager that is not
        :attr:`dst_ready`, the destination attached and the pairs made."""

    async def hold_for_stop(self, c: Controller) -> None:
        """QEMU held hard enough for the devices' stop-copy to end before
        its switchover (a manager that answers pre-switchover itself)."""

    async def stop(self, c: Controller) -> None:
        """The source vCPUs stopped, and seen so."""

    async def continue_switchover(self, c: Controller) -> None: ...

    async def resume_destination(self, c: Controller) -> None: ...

    async def cancel(self, c: Controller) -> None: ...

    async def resume_source(self, c: Controller) -> None: ...

    async def end_destination(self, c: Controller, timeout: float) -> None: ...

    async def done(self, c: Controller) -> None:
        """The manager's part has ended; MigrationFailed if it failed."""


class QmpManager:
    """qmpmig drives both QEMUs over QMP: seed 000's flows as they stand."""

    answers_pre_switchover = True
    dst_ready = True

    async def settings(self, c: Controller) -> dict[str, dict]:
        """side -> the capabilities and parameters the flow will change, as
        they are now."""
        saved = {}
        for side in (c.src, c.dst):
            caps = {cap["capability"]: cap["state"] for cap in await side.qemu.execute("query-migrate-capabilities")}
            saved[side.name] = {"capabilities": [{"capability": name, "state": caps.get(name, False)}
                                                 for name in CAPABILITIES[side.name]]}
        params = await c.src.qemu.execute("query-migrate-parameters")
        saved["src"]["parameters"] = {name: params[name] for name in PARAMETERS if name in params}
        return saved

    async def enable(self, c: Controller) -> None:
        for side in (c.src, c.dst):
            await side.qmp("migrate-set-capabilities", {"capabilities": [
                {"capability": name, "state": True} for name in CAPABILITIES[side.name]]})

    async def put_back(self, side: Side, saved: dict) -> None:
        await put_back(side.qmp, saved)

    async def set_parameters(self, c: Controller, parameters: dict) -> None:
        await c.src.qmp("migrate-set-parameters", parameters)

    def __init__(self):
        #: qmpmig's descriptor of the socket the source QEMU sends over.
        self.stream: channel.Stream | None = None

    async def start(self, c: Controller) -> None:
        """The destination listens; qmpmig connects to it and hands the
        socket to the source, which sends (:mod:`qmpmig.qemu.channel`)."""
        await c.dst.qmp("migrate-incoming", {"uri": c.uri})
        try:
            self.stream = await channel.Stream.connect(c.uri)
        except (OSError, asyncio.TimeoutError) as err:
            raise MigrationFailed(f"cannot connect to the destination at {c.uri}: {reason(err)}") from err
        if self.stream is None:
            await c.src.qmp("migrate", {"uri": c.uri})
            return
        await c.src.qmp("getfd", {"fdname": channel.FD_NAME}, fd=self.stream.fileno())
        await c.src.qmp("migrate", {"uri": f"fd:{channel.FD_NAME}"})

    async def hold_for_stop(self, c: Controller) -> None:
        """Not needed: qmpmig answers pre-switchover itself."""

    async def stop(self, c: Controller) -> None:
        await c.src.qmp("stop")

    async def continue_switchover(self, c: Controller) -> None:
        await c.src.qmp("migrate-continue", {"state": "pre-switchover"})

    async def resume_destination(self, c: Controller) -> None:
        await c.dst.qmp("cont")

    async def cancel(self, c: Controller) -> None:
        """migrate_cancel; if QEMU does not answer within CANCEL_GRACE (its
        big lock held in a write that does not end), the stream is shut down
        from outside, which is all migrate_cancel would do, and QEMU's write
        fails."""
        asking = asyncio.ensure_future(c.src.qmp("migrate_cancel"))
        await asyncio.wait({asking}, timeout=CANCEL_GRACE)
        if not asking.done() and self.stream is not None:
            c.trace.emit("stream_shutdown", side="src",
                         why=f"migrate_cancel unanswered after {CANCEL_GRACE} s")
            self.stream.shutdown()
        await asking

    async def resume_source(self, c: Controller) -> None:
        await c.src.qmp("cont")

    async def end_destination(self, c: Controller, timeout: float) -> None:
        """No second copy of the guest may ever start at the destination."""
        await c.dst.quit(timeout)

    async def done(self, c: Controller) -> None:
        """The migration has ended, either way: nothing of the manager's is
        left running, nor open."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None


async def put_back(execute, saved: dict) -> None:
    """Set QEMU's migration parameters and capabilities as ``saved`` has
    them, through ``execute(command, arguments)``."""
    if "parameters" in saved:
        await execute("migrate-set-parameters", saved["parameters"])
    if "capabilities" in saved:
        await execute("migrate-set-capabilities", {"capabilities": saved["capabilities"]})
