"""One VM as the controller holds it: its QEMU, followed over QMP; its guest
RAM, mapped into each of its devices; the IO page requests its devices raise.

A :class:`Side` lives as long as the VM is attached, across migrations
(the devices' owner keeps it for the VM's life); a migration casts it as
its source or its destination (:meth:`Side.take_part`).  It knows the VM's
(run state, migration status) as QEMU last reported it, whether QEMU is
gone, and whether its vCPUs run, which is what completes a page request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import MigrationFailed, QemuGone, QemuMigrationFailed
from ..migration.lifecycle import Role
from ..migration.states import MigState
from ..qemu.guestmem import GuestRam
from ..qemu.qmp import Qemu, VmState
from ..vfio_user import codec
from ..vfio_user.uapi import PAGE_SIZE
from .devices import RemoteDevice
from .trace import Trace

#: The trace's name of each side -> the lifecycle table's role.
ROLE_OF: dict[str, Role] = {"src": "source", "dst": "destination"}


@dataclass(eq=False)
class DeviceEnd:
    """One device of a VM: what the controller knows of it."""

    name: str
    side: Side
    device: RemoteDevice
    #: The device_state the controller last set or read.
    state: MigState = MigState.ERROR
    #: IO page requests raised and not yet completed.
    outstanding: int = 0
    #: This migration: when (monotonic) the device acknowledged leaving the
    #: states where it may do DMA (source), or entering RUNNING (destination).
    dma_off_at: float | None = None
    running_at: float | None = None


class Side:
    """A QEMU, its guest RAM and its devices."""

    #: What ``gone`` means, as a failure says it.
    lost = "QEMU died"
    #: What a failed migration leaves of a destination that is gone.
    left_behind = "destination QEMU gone"
    #: Whether ``gone`` means the VM, and a guest it ran, is gone too.
    dies_when_gone = True

    def __init__(self, qemu: Qemu, ram: GuestRam, timeout: float, trace: Trace | None = None,
                 name: str = "src"):
        #: ``src`` or ``dst``: the part it takes in a migration, as the trace says it.
        self.name = name
        self.qemu = qemu
        self.ram = ram
        self.trace = trace or Trace(keep=False)
        #: Seconds a wait for QEMU may take unless told otherwise.
        self.timeout = timeout
        self.devices: list[DeviceEnd] = []
        #: (run state, migration status) as last reported; None before the first.
        self.vm: VmState | None = None
        #: Why QEMU's monitor closed, once it has.
        self.gone: str | None = None
        #: How many (run state, migration status) changes QEMU has reported.
        self.updates = 0
        self.vcpus_running = asyncio.Event()
        #: QMP event name -> QEMU's timestamp of its latest one (host clock, s).
        self.event_times: dict[str, float] = {}
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []

    @property
    def role(self) -> Role:
        """The lifecycle table's word for :attr:`name`."""
        return ROLE_OF[self.name]

    def take_part(self, name: str, trace: Trace) -> None:
        """Be a migration's source (``src``) or destination (``dst``), traced there."""
        self.name = name
        self.trace = trace

    async def attach(self, devices: list[tuple[str, RemoteDevice]]) -> None:
        """Follow QEMU and take each (name, device) in; return once QEMU has
        reported its state."""
        self.follow()
        for name, device in devices:
            await self.add_device(name, device)
        await self.wait(lambda s: True, "its first status", timeout=30)

    # -- devices -------------------------------------------------------------

    async def add_device(self, name: str, device: RemoteDevice) -> DeviceEnd:
        """Take a device in: read its state, answer its page requests, map
        the guest RAM into it (iova = guest physical address)."""
        end = DeviceEnd(name, self, device)
        device.client.on_page_request = self._page_request_handler(end)
        end.state = await device.state()
        await self.map_ram(end)
        self.devices.append(end)
        return end

    async def receive_pages(self, source: GuestRam, pages: Iterable[int]) -> int:
        """Copy ``pages`` (page numbers) of ``source`` into this VM's RAM."""
        return source.copy_pages_to(self.ram, pages)

    async def differing(self, source: GuestRam) -> tuple[int, list[int]]:
        """(bytes per unit, guest physical addresses of the units) where this
        VM's RAM differs from ``source``: pages, here."""
        return PAGE_SIZE, [page * PAGE_SIZE for page in self.ram.differing_pages(source)]

    async def map_ram(self, end: DeviceEnd) -> None:
        """DMA_MAP the guest RAM: the transport sends a copy of our fd."""
        await end.device.client.dma_map(0, self.ram.size, self.ram.fd)

    def _page_request_handler(self, end: DeviceEnd):
        async def complete(request: codec.PageRequest) -> None:
            """Seed 000: only running vCPUs can complete an IO page fault."""
            end.outstanding += 1
            self.trace.emit("page_request", side=self.name, device=end.name, iova=request.iova)
            try:
                await self.vcpus_running.wait()
            finally:
                end.outstanding -= 1
            self.trace.emit("page_complete", side=self.name, device=end.name, iova=request.iova)
        return complete

    # -- following QEMU ------------------------------------------------------

    def follow(self) -> None:
        self._tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._record_events())]

    async def unfollow(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def _follow(self) -> None:
        try:
            async for state in self.qemu.states():
                self.trace.emit("vm_state", side=self.name, runstate=state.runstate, status=state.status)
                if state.runstate == "running":
                    self.vcpus_running.set()
                else:
                    self.vcpus_running.clear()
                async with self._changed:
                    self.vm = state
                    self.updates += 1
                    self._changed.notify_all()
        except QemuGone as err:
            async with self._changed:
                self.gone = str(err)
                self._changed.notify_all()

    async def _record_events(self) -> None:
        with self.qemu.listener(()) as events:
            async for event in events:
                stamp = event.get("timestamp", {})
                qemu_time = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
                self.event_times[event["event"]] = qemu_time
                self.trace.emit("qmp_event", side=self.name, event=event["event"], data=event.get("data", {}),
                                qemu_time=qemu_time)

    async def wait(self, pred: Callable[[VmState], bool], what: str, timeout: float | None = None) -> VmState:
        """Wait until the (run state, migration status) satisfies ``pred``;
        MigrationFailed if QEMU goes away or the wait times out."""
        timeout = timeout or self.timeout

        def ready():
            return self.gone or (self.vm and pred(self.vm))
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
        except asyncio.TimeoutError:
            raise MigrationFailed(f"{self.name} QEMU: no {what} within {timeout:.0f} s (at {self.vm})") from None
        if self.gone:
            raise MigrationFailed(f"{self.name} {self.lost} ({self.gone}) waiting for {what}")
        return self.vm

    async def next_update(self, timeout: float) -> None:
        """Until QEMU reports a change of (run state, migration status), or
        goes away, or ``timeout`` passes: a poll that wakes at once."""
        seen = self.updates
        with contextlib.suppress(asyncio.TimeoutError):
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.updates != seen or self.gone), timeout)

    async def wait_gone(self, timeout: float) -> bool:
        """Whether QEMU's monitor closes within ``timeout`` seconds."""
        with contextlib.suppress(asyncio.TimeoutError):
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.gone), timeout)
        return self.gone is not None

    async def status(self, *statuses: str, since: int = -1) -> VmState:
        """Wait for one of ``statuses``; a failure or cancel reported after
        update ``since`` ends the wait too, as a MigrationFailed."""
        def reached(state: VmState) -> bool:
            return state.status in statuses or (state.status in ("failed", "cancelled") and self.updates > since)
        state = await self.wait(reached, f"status {'/'.join(statuses)}")
        if state.status not in statuses:
            info = await self.qemu.query_migrate()
            failure = QemuMigrationFailed if state.status == "failed" else MigrationFailed
            raise failure(f"{self.name} migration {state.status}: {info.error_desc or 'no reason given'}")
        return state

    async def quit(self, timeout: float) -> None:
        """End QEMU (QMP ``quit``) and see its monitor close; MigrationFailed
        if it does not within ``timeout``."""
        self.trace.emit("qmp_command", side=self.name, command="quit", arguments={})
        with contextlib.suppress(QemuGone):
            await asyncio.wait_for(self.qemu.execute("quit"), timeout)
        if not await self.wait_gone(timeout):
            raise MigrationFailed(f"{self.name} QEMU still there {timeout:.0f} s after quit")

    async def qmp(self, command: str, arguments: dict | None = None, fd: int | None = None):
        """A QMP command, traced; ``fd`` passed with it (``getfd``)."""
        self.trace.emit("qmp_command", side=self.name, command=command, arguments=arguments or {})
        try:
            return await self.qemu.execute(command, arguments, fd)
        except QemuGone as err:
            raise MigrationFailed(f"{self.name} QEMU died during {command}: {err}") from err
