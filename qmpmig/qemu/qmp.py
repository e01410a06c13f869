"""One QEMU, over QMP, with qemu.qmp.

A :class:`Qemu` connects to a QMP socket, answers typed ``query-status`` and
``query-migrate``, and follows the VM as a stream of :class:`VmState`, the
(run state, migration status) tuple that :mod:`qmpmig.migration.lifecycle` maps to a
device_state.  STOP, RESUME and MIGRATION events drive the stream; a poll
catches what QEMU changes without an event (``postmigrate`` on the source,
``paused`` on a ``-S`` destination; qemu-migration-qmp.md section 1) and
notices when the monitor has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import StateError

from ..errors import QemuCommandError, QemuGone, QmpmigError

#: MigrationStatus values after which QEMU does nothing more by itself.
FINAL = frozenset({"completed", "failed", "cancelled"})
#: ... and those in which no migration is under way.
IDLE = FINAL | {"none"}
#: Those in which the source's RAM pre-copy is under way.
PRECOPY = frozenset({"setup", "active", "wait-unplug"})
#: Those that say a migration is ending without completing.
ENDING = frozenset({"failed", "cancelled", "cancelling"})
#: Migration statuses that QEMU reports only in one run state: it stops the
#: vCPUs into finish-migrate before either (migration.c, the completion of
#: a pre-copy migration, 7.2 and later), emitting no event when they were
#: already stopped.  A MIGRATION event with one of them needs no
#: query-status round trip to be placed: that is the pre-switchover
#: reaction's path.
IMPLIED_RUNSTATE = {"pre-switchover": "finish-migrate", "device": "finish-migrate"}

#: Events after which the run state or migration status may have changed.
STATE_EVENTS = ("STOP", "RESUME", "MIGRATION", "SHUTDOWN", "RESET", "SUSPEND", "WAKEUP")


@dataclass(frozen=True)
class Status:
    """query-status: StatusInfo."""

    running: bool
    runstate: str


@dataclass(frozen=True)
class MigrationInfo:
    """query-migrate: the MigrationInfo fields qmpmig reads; ``raw`` has all."""

    status: str
    ram_remaining: int | None = None
    ram_transferred: int | None = None
    ram_total: int | None = None
    total_time: int | None = None
    downtime: int | None = None
    expected_downtime: int | None = None
    error_desc: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_qmp(cls, info: dict) -> "MigrationInfo":
        ram = info.get("ram", {})
        return cls(
            status=info.get("status", "none"),
            ram_remaining=ram.get("remaining"),
            ram_transferred=ram.get("transferred"),
            ram_total=ram.get("total"),
            total_time=info.get("total-time"),
            downtime=info.get("downtime"),
            expected_downtime=info.get("expected-downtime"),
            error_desc=info.get("error-desc"),
            raw=info,
        )


@dataclass(frozen=True)
class VmState:
    """(run state, migration status), in QEMU's spelling."""

    runstate: str
    status: str

    def __str__(self) -> str:
        return f"({self.runstate}, {self.status})"


class Qemu:
    """A QMP session with one QEMU.  Every method raises :class:`QemuGone`
    once the monitor has closed, :class:`QemuCommandError` on a QMP error."""

    def __init__(self, name: str):
        self.name = name
        self._qmp = QMPClient(name)

    async def connect(self, address: str, timeout: float = 10.0) -> None:
        """Connect to a QMP UNIX socket, retrying while QEMU creates it.  A
        QEMU monitor serves one client at a time: while another holds it, no
        greeting comes, and after ``timeout`` this is QemuGone too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await asyncio.wait_for(self._qmp.connect(address), max(0.1, deadline - loop.time()))
                return
            except (ConnectError, asyncio.TimeoutError) as err:
                if loop.time() > deadline:
                    with contextlib.suppress(Exception):
                        await self._qmp.disconnect()
                    why = str(err) or "no greeting (another client holds the monitor?)"
                    raise QemuGone(f"{self.name}: cannot connect to QMP at {address}: {why}") from err
                await asyncio.sleep(0.05)

    async def disconnect(self) -> None:
        """Close the session; an EOF already seen is not an error here."""
        with contextlib.suppress(Exception):
            await self._qmp.disconnect()

    @property
    def connected(self) -> bool:
        return self._qmp.runstate.name == "RUNNING"

    async def execute(self, command: str, arguments: dict | None = None, fd: int | None = None) -> Any:
        """A QMP command; ``fd`` passed with it (SCM_RIGHTS), for ``getfd``."""
        try:
            if fd is not None:
                self._qmp.send_fd_scm(fd)
            return await self._qmp.execute(command, arguments)
        except ExecuteError as err:
            raise QemuCommandError(command, err.error_class, str(err)) from err
        except (ExecInterruptedError, StateError, EOFError, ConnectionError) as err:
            raise QemuGone(f"{self.name}: QMP connection lost during {command}") from err
        except QMPError as err:                 # fds cross only a UNIX socket
            raise QemuCommandError(command, "GenericError", str(err)) from err

    async def ram_backing(self) -> str:
        """The file behind the guest's RAM: the largest memory-backend-file
        object's ``mem-path`` (QOM).  Under libvirt, with ``<memoryBacking>
        <source type='file'/><access mode='shared'/>``, that is a file in its
        memory_backing_dir that only QEMU knows the name of."""
        found = []
        for obj in await self.execute("qom-list", {"path": "/objects"}):
            if obj.get("type") != "child<memory-backend-file>":
                continue
            path = f"/objects/{obj['name']}"
            found.append((await self.execute("qom-get", {"path": path, "property": "size"}),
                          await self.execute("qom-get", {"path": path, "property": "mem-path"}),
                          await self.execute("qom-get", {"path": path, "property": "share"})))
        if not found:
            raise QmpmigError(f"{self.name}: no memory-backend-file object: guest RAM must be "
                              "file-backed and shared for devices to reach it")
        size, path, share = max(found)
        if not share:
            raise QmpmigError(f"{self.name}: guest RAM {path} is not shared (share=on, or libvirt's "
                              "<access mode='shared'/>)")
        return path

    async def query_status(self) -> Status:
        info = await self.execute("query-status")
        return Status(running=info["running"], runstate=info["status"])

    async def query_migrate(self) -> MigrationInfo:
        return MigrationInfo.from_qmp(await self.execute("query-migrate"))

    async def vm_state(self) -> VmState:
        status = await self.query_status()
        migration = await self.query_migrate()
        return VmState(status.runstate, migration.status)

    async def set_capabilities(self, **caps: bool) -> None:
        """migrate-set-capabilities; keyword names use _ for QEMU's -."""
        await self.execute("migrate-set-capabilities", {
            "capabilities": [{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]})

    async def set_parameters(self, **params: Any) -> None:
        """migrate-set-parameters; keyword names use _ for QEMU's -."""
        await self.execute("migrate-set-parameters", {k.replace("_", "-"): v for k, v in params.items()})

    def listener(self, names=STATE_EVENTS):
        """A context-managed qemu.qmp listener: register it before the command."""
        return self._qmp.listener(names)

    async def states(self, poll: float = 0.1) -> AsyncIterator[VmState]:
        """Yield the (run state, migration status) now and on every change.

        Events arrive in stream order with command replies, so an event seen
        before a poll's reply is older than the poll: a poll that raced an
        event is dropped and the event handled first.  Raises QemuGone when
        the monitor closes.
        """
        with self._qmp.listener(STATE_EVENTS) as events:
            last = await self.vm_state()
            events.clear()
            yield last
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), poll)
                except asyncio.TimeoutError:
                    event = None
                if event is None:
                    now = await self.vm_state()
                    if not events.empty():
                        continue
                elif event["event"] == "MIGRATION":
                    status = event["data"]["status"]
                    runstate = IMPLIED_RUNSTATE.get(status) or (await self.query_status()).runstate
                    now = VmState(runstate, status)
                else:
                    now = VmState((await self.query_status()).runstate, last.status)
                if now != last:
                    last = now
                    yield now
