"""Walking a VM's devices through the FSM: one arc per SET, each traced,
and every device of a VM through a grace state before any goes past it.

Seed 000 names the grace states: on the source NDMA|RUNNING and
SAVING|NDMA|RUNNING (v2 RUNNING_P2P and PRE_COPY_P2P), where a device stops
its DMA while the vCPUs still run; on the destination RUNNING_P2P, on the
way from STOP to RUNNING.  They are cross-device synchronisation points:
QEMU's vfio_vmstate_change_prepare does the same for a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import Desync, MigrationFailed
from ..migration import fsm
from ..migration.states import V1, MigState, v2_to_v1
from .side import DeviceEnd, Side

T = TypeVar("T")

#: Seconds between two looks at whether the guest was paused meanwhile.
RECHECK = 0.05

#: The grace states of each role.
GRACE = {"source": frozenset({MigState.PRE_COPY_P2P, MigState.RUNNING_P2P}),
         "destination": frozenset({MigState.RUNNING_P2P})}
#: The grace state next to a device's state: save side from PRE_COPY (or
#: RUNNING, without pre-copy), resume side from STOP on the way to RUNNING.
GRACE_OF = {MigState.PRE_COPY: MigState.PRE_COPY_P2P, MigState.RUNNING: MigState.RUNNING_P2P,
            MigState.STOP: MigState.RUNNING_P2P}


def past_grace(role: str, state: MigState) -> bool:
    """Past a grace state: the source's device stops (!RUNNING), the
    destination's runs."""
    if role == "source":
        return not v2_to_v1(state) & V1.RUNNING
    return state is MigState.RUNNING


#: The states in which a device may do DMA (seed 000: not NDMA, not stopped).
DMA_CAPABLE = frozenset({MigState.RUNNING, MigState.PRE_COPY})


def _outage(end: DeviceEnd, state: MigState) -> None:
    """Note the ends of a device's I/O outage: the source device's first
    state without DMA, the destination device's RUNNING."""
    if end.side.role == "source" and state not in DMA_CAPABLE and end.dma_off_at is None:
        end.dma_off_at = time.monotonic()
    elif end.side.role == "destination" and state is MigState.RUNNING:
        end.running_at = time.monotonic()


def grace_target(end: DeviceEnd) -> MigState:
    """Where a device waits out a grace state: the P2P state next to where it
    is; a device without P2P stays where it is (seed 000: the NDMA states are
    pushed down to the next step)."""
    twin = GRACE_OF.get(end.state, end.state)
    return twin if fsm.supports(end.device.flags, twin) else end.state


def grace_on_the_way(end: DeviceEnd, target: MigState) -> MigState | None:
    """The grace state a device would pass on its way to ``target``."""
    path = fsm.plan(end.state, target, end.device.flags)
    role = end.side.role
    for here, after in zip(path, path[1:]):
        if here in GRACE[role] and past_grace(role, after):
            return here
    return None


class Walker:
    """Device requests of the migration flow: bounded in time and traced."""

    def __init__(self, timeout: float):
        #: Seconds one device request may take.
        self.timeout = timeout
        #: While the controller keeps the guest paused: the seconds one
        #: request may take, so that the guest runs again soon enough after
        #: a device stops answering.
        self.paused_timeout: float | None = None
        self.paused_since = 0.0

    def paused(self, timeout: float) -> None:
        """The guest is paused from now: every request, the ones under way
        included, must end within ``timeout`` of now or of its start."""
        self.paused_timeout, self.paused_since = timeout, time.monotonic()

    def resumed(self) -> None:
        self.paused_timeout = None

    def paused_deadline(self, start: float) -> float | None:
        """While the guest is paused: when a request begun at ``start``
        (monotonic) must have ended, so that the guest runs again soon
        enough; None while it runs."""
        if self.paused_timeout is None:
            return None
        return max(start, self.paused_since) + self.paused_timeout

    async def call(self, end: DeviceEnd, request: Awaitable[T], what: str) -> T:
        """One request to a device, bounded; a failure of it fails the
        migration with the device and the step named (and, where the device
        is not in the state qmpmig left it in, with that)."""
        try:
            return await self._bounded(end, request, what)
        except OSError as err:
            try:
                await self.check_state(end)
                also = ""
            except Desync:
                raise
            except MigrationFailed as state_err:
                also = f" ({state_err})"
            raise MigrationFailed(f"{end.side.name} device {end.name}: {what} failed: {err}{also}") from err

    async def check_state(self, end: DeviceEnd, strict: bool = True) -> None:
        """The device's device_state, read, must be the one qmpmig left it
        in: a device reset or moved by someone else (libvfio-user issue
        #853 is QEMU missing exactly that) fails the migration, naming the
        device and both states; the controller knows the real one from
        then on.  (ERROR is where a device goes by itself when a request
        fails: not a desync.)  Not ``strict`` (a recovery, after a request
        that timed out may have completed late): the real state is taken
        as it is."""
        try:
            actual = await self._bounded(end, end.device.state(), "a device_state read")
        except OSError as err:
            raise MigrationFailed(f"{end.side.name} device {end.name}: a device_state read failed: {err}") from err
        if actual is MigState.ERROR and end.state is not MigState.ERROR and strict:
            # The uAPI's own end of a failed request, not someone else's doing.
            end.state = actual
            raise MigrationFailed(f"{end.side.name} device {end.name} is in ERROR")
        if actual is not end.state:
            end.side.trace.emit("desync", side=end.side.name, device=end.name, expected=end.state, actual=actual)
            expected, end.state = end.state, actual
            if not strict:
                return
            raise Desync(f"{end.side.name} device {end.name} is in {actual.name}, not in {expected.name} "
                         f"where qmpmig left it: reset or moved by someone else")

    async def _bounded(self, end: DeviceEnd, request: Awaitable[T], what: str) -> T:
        """A device that stops answering fails the migration instead of
        hanging it, and, while the guest is paused, within the pause the
        guest may bear (a request begun before the pause included); the
        device's own errors pass through."""
        task = asyncio.ensure_future(request)
        start = time.monotonic()
        try:
            while True:
                timeout, why, deadline = self.timeout, "", start + self.timeout
                paused_deadline = self.paused_deadline(start)
                if paused_deadline is not None and paused_deadline < deadline:
                    timeout, why = self.paused_timeout, " with the guest paused (--max-pause)"
                    deadline = paused_deadline
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MigrationFailed(f"{end.side.name} device {end.name} did not answer {what} "
                                          f"within {timeout:.1f} s{why}")
                # Woken now and then: the guest may be paused meanwhile.
                done, _ = await asyncio.wait({task}, timeout=min(left, RECHECK))
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()

    async def walk(self, end: DeviceEnd, target: MigState) -> None:
        """Drive one device to ``target``, one FSM arc per SET, each traced."""
        trace, side = end.side.trace, end.side.name
        cur = end.state
        for step in fsm.plan(cur, target, end.device.flags):
            await self.check_state(end)
            try:
                await self._bounded(end, end.device.set_state(step), f"{cur.name} -> {step.name}")
            except OSError as err:
                trace.emit("device_error", side=side, device=end.name, target=step,
                           errno=err.errno or 0, message=str(err))
                with contextlib.suppress(OSError):
                    end.state = await end.device.state()
                raise MigrationFailed(f"{side} device {end.name}: {cur.name} -> {step.name} failed: {err}") from err
            trace.emit("device_state", side=side, device=end.name, **{"from": cur, "to": step})
            end.state = cur = step
            _outage(end, step)

    async def reset(self, end: DeviceEnd) -> None:
        """DEVICE_RESET: RUNNING from any state."""
        await self.call(end, end.device.reset(), "DEVICE_RESET")
        end.side.trace.emit("device_state", side=end.side.name, device=end.name, via="reset",
                            **{"from": end.state, "to": MigState.RUNNING})
        end.state = MigState.RUNNING

    async def walk_all(self, side: Side, target_of: Callable[[DeviceEnd], MigState],
                       barrier: MigState | None = None) -> None:
        """Every device of a side to its target, concurrently.  Where the way
        passes a grace state, every device reaches it before any goes past
        it; ``barrier`` records that all reached it when it is the target."""
        targets = {end: target_of(end) for end in side.devices}
        on_the_way = {end: g for end in side.devices if (g := grace_on_the_way(end, targets[end]))}
        if on_the_way:
            await asyncio.gather(*(self.walk(end, g) for end, g in on_the_way.items()))
            side.trace.emit("barrier", side=side.name, state=next(iter(on_the_way.values())),
                            devices=sorted(end.name for end in on_the_way))
        await asyncio.gather(*(self.walk(end, targets[end]) for end in side.devices))
        if barrier is not None:
            side.trace.emit("barrier", side=side.name, state=barrier,
                            devices=[end.name for end in side.devices if end.state is barrier])
