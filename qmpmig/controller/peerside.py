"""A destination on another host: the :class:`Side` the controller drives
there goes through that host's qmpmig daemon (qmpmig/daemon/incoming.py).

``call(op, **args)`` is one request to the peer daemon for this migration
(its VM and migration id already bound); the daemon's TLS channel is the
transport.  The controller's flows use a :class:`PeerSide` as they use a
local one: its QEMU (:class:`PeerQemu`), its devices (:class:`PeerDevice`)
and its guest RAM (:class:`PeerRam`) are proxies.  The trace records what
happened there as the source host saw it.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable, Iterable

from ..errors import DeviceError, MigrationFailed, QemuCommandError, QmpmigError
from ..migration.states import MigFlags, MigState
from ..qemu.guestmem import COMPARE_CHUNK, GuestRam
from ..qemu.qmp import MigrationInfo, VmState
from .devices import RemoteDevice
from .side import DeviceEnd, Side
from .trace import Trace

Call = Callable[..., Awaitable[dict]]
#: Guest pages one ram_write carries, and the migration data one request
#: carries: the bytes follow the request raw (control.MAX_PAYLOAD).
PAGES_PER_WRITE = 1024
DATA_PER_REQUEST = 4 << 20


class PeerQemu:
    """The destination QEMU, as far as a peer may drive it."""

    #: Its monitor is the peer daemon's: that QEMU's end comes through the
    #: peer's ``incoming_watch`` (PeerSide.gone), never as a lost connection here.
    connected = True

    def __init__(self, call: Call, name: str):
        self._call = call
        #: How logs and ``status`` name it: VM@HOST:PORT.
        self.name = name

    async def execute(self, command: str, arguments: dict | None = None):
        try:
            return (await self._call("incoming_qmp", command=command, arguments=arguments))["return"]
        except QmpmigError as err:
            raise QemuCommandError(command, type(err).__name__, f"at the destination: {err}") from err

    async def query_migrate(self) -> MigrationInfo:
        return MigrationInfo.from_qmp(await self.execute("query-migrate"))

    async def disconnect(self) -> None:
        pass


class PeerDevice(RemoteDevice):
    """A destination device, through the peer daemon that owns it."""

    client = None           # no vfio-user client here: DMA, regions and page requests stay there

    def __init__(self, call: Call, described: dict):
        self._call = call
        self.name = described["name"]
        self.protocol = described["protocol"]
        self.offered, self.flags = MigFlags(described["offered"]), MigFlags(described["flags"])
        self.extensions = frozenset(described["extensions"])
        self.region_sizes = {}
        self.chunk_size = described["chunk_size"]

    async def _device(self, call: str, **args) -> dict:
        """The call's result; the device's own refusal as the OSError a
        device of this host would raise."""
        result = await self._call("incoming_device", device=self.name, call=call, **args)
        if "errno" in result:
            raise DeviceError(result["errno"], f"{result['error']} (at the destination host)")
        return result

    async def close(self) -> None:
        pass

    async def reset(self) -> None:
        await self._device("reset")

    async def state_hash(self) -> bytes | None:
        digest = (await self._device("state_hash"))["hash"]
        return bytes.fromhex(digest) if digest else None

    async def state(self) -> MigState:
        return MigState[(await self._device("state"))["state"]]

    async def set_state(self, state: MigState) -> None:
        await self._device("set_state", state=state.name)

    async def send_data(self, data: bytes) -> None:
        """The piece, in requests of at most :data:`DATA_PER_REQUEST` bytes
        (the peer writes them to the device in this order), each with its
        CRC-32."""
        view = memoryview(data)
        for pos in range(0, len(view), DATA_PER_REQUEST):
            piece = view[pos:pos + DATA_PER_REQUEST]
            await self._device("send_data", payload=piece, crc=zlib.crc32(piece))

    async def flush(self) -> None:
        await self._device("flush")


class PeerRam:
    """The destination's guest RAM: pages go there, CRCs come back."""

    def __init__(self, call: Call):
        self._call = call

    async def receive(self, source: GuestRam, pages: Iterable[int]) -> int:
        """Copy ``pages`` of ``source`` here, a batch per request, each with
        its CRC-32."""
        pages = sorted(set(pages))
        for i in range(0, len(pages), PAGES_PER_WRITE):
            batch = pages[i:i + PAGES_PER_WRITE]
            data = source.page_data(batch)
            await self._call("ram_write", pages=batch, payload=data, crc=zlib.crc32(data))
        return len(pages)

    async def differing(self, source: GuestRam) -> tuple[int, list[int]]:
        """(bytes per unit, offsets of the units where this RAM differs from
        ``source``), by a CRC-32 per MiB on each host."""
        theirs, mine = await self._call("ram_crcs"), await asyncio.to_thread(source.crcs)
        if theirs["chunk"] != COMPARE_CHUNK or theirs["size"] != source.size:
            raise MigrationFailed(f"the destination's RAM ({theirs['size']} bytes, CRCs per {theirs['chunk']}) "
                                  f"cannot be compared with the source's ({source.size} bytes)")
        return COMPARE_CHUNK, [i * COMPARE_CHUNK for i, (a, b) in enumerate(zip(mine, theirs["crcs"])) if a != b]


class PeerSide(Side):
    """A VM attached to the daemon of another host, as this controller's
    destination."""

    lost = "VM is out of reach"
    #: Out of reach is not dead: a guest started there may run on.
    dies_when_gone = False
    left_behind = ("the destination left to its host's daemon, which ends it once it has lost its peer "
                   "(unless every device there had loaded its state: then it keeps it paused)")

    def __init__(self, call: Call, name: str, timeout: float, trace: Trace | None = None):
        super().__init__(PeerQemu(call, name), None, timeout, trace, name="dst")
        self._call = call
        self.ram = PeerRam(call)

    async def attach(self, devices: list = ()) -> None:
        """Take in the peer's devices for this VM, and follow its QEMU."""
        status = await self._call("incoming_watch", since=-1, timeout=0)
        self._mirror(status)
        for name in status.get("devices", ()):
            described = await self._call("incoming_device", device=name, call="describe")
            device = PeerDevice(self._call, described)
            end = await self.add_device(name, device)
            end.state = MigState[described["state"]]
        self.follow()

    async def arrive(self, timeout: float) -> None:
        """Once the peer's daemon has the VM (under libvirt, its hook hands
        it over after libvirt started it there), take it in."""
        await self._call("incoming_wait", timeout=timeout)
        await self.attach()

    async def resume(self) -> None:
        """The peer's daemon resumes the VM through its host's libvirt."""
        await self._call("incoming_resume")

    async def add_device(self, name: str, device: RemoteDevice) -> DeviceEnd:
        """The device's RAM mapping and page requests are the peer's."""
        end = DeviceEnd(name, self, device)
        self.devices.append(end)
        return end

    async def receive_pages(self, source: GuestRam, pages: Iterable[int]) -> int:
        return await self.ram.receive(source, pages)

    async def differing(self, source: GuestRam) -> tuple[int, list[int]]:
        return await self.ram.differing(source)

    def follow(self) -> None:
        self._tasks = [asyncio.create_task(self._poll())]

    async def _poll(self) -> None:
        try:
            while not self.gone:
                # Held by the peer as long as it likes (its LONG_POLL_MAX): asked
                # again at once, so that this side never looks silent to it.
                status = await self._call("incoming_watch", since=self.updates)
                async with self._changed:
                    self._mirror(status)
                    self._changed.notify_all()
        except QmpmigError as err:
            async with self._changed:
                self.gone = f"its host's daemon is out of reach: {err}"
                self._changed.notify_all()

    def _mirror(self, status: dict) -> None:
        for event, when in status["event_times"].items():
            if self.event_times.get(event) != when:
                self.event_times[event] = when
                self.trace.emit("qmp_event", side=self.name, event=event, data={}, qemu_time=when)
        if status["runstate"] is not None:
            state = VmState(status["runstate"], status["status"])
            if state != self.vm:
                self.trace.emit("vm_state", side=self.name, runstate=state.runstate, status=state.status)
                self.vm = state
        self.updates = status["updates"]
        if status["gone"]:
            self.gone = status["gone"]

    async def qmp(self, command: str, arguments: dict | None = None):
        self.trace.emit("qmp_command", side=self.name, command=command, arguments=arguments or {})
        try:
            return await self.qemu.execute(command, arguments)
        except QemuCommandError as err:
            raise MigrationFailed(str(err)) from err
