"""A migratable vfio-user device as the controller drives it, v1 or v2.

Both protocols answer in the v2 words: ``set_state(MigState)``,
``read_data()`` (one save_live_iterate step), ``write_data()`` (one load
step), ``pending()`` (save_live_pending).  :class:`V2Device` uses
MIG_DEVICE_STATE and MIG_DATA_READ/WRITE; :class:`V1Device` writes the v1
twin of each state into the migration region's device_state and runs seed
001's iteration over pending_bytes, data_offset and data_size, through the
region's mmap'd window where it offers one.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import mmap
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

from ..errors import DeviceError
from ..migration.states import MigFlags, MigState, V1, v1_to_v2, v2_to_v1
from ..vfio_user import codec
from ..vfio_user.client import Client
from ..vfio_user.uapi import MIGRATION_INFO, MIGRATION_REGION_TYPE, PCI_NUM_REGIONS, Feature

#: Seed 001: only pending_bytes == 0 ends the data; an iteration may bring
#: nothing while pending_bytes says more is coming.  Give it this many tries.
V1_EMPTY_ITERATIONS = 100

#: MIG_DATA_WRITEs sent before the oldest one's reply is awaited: the server
#: answers in order, so a refusal still stops the stream within this many.
WRITE_AHEAD = 3


class RemoteDevice:
    """One device behind a vfio-user client."""

    protocol: ClassVar[str]
    #: Optional DEVICE_FEATUREs used where offered (GET): the uAPI's and
    #: qmpmig's vendor extensions (qmpmig/device/PROTOCOL.md).
    OPTIONAL: ClassVar[tuple[Feature, ...]] = (Feature.QMPMIG_STATE_HASH,)
    #: Data reads that may be in flight at once (see :func:`relay`).
    read_ahead: ClassVar[int] = 1

    def __init__(self, client: Client, flags: int):
        self.client = client
        #: The migration flags the device offers, and those qmpmig uses.
        self.offered = self.flags = flags
        #: The optional extensions (uapi.Feature names) it answers PROBE for.
        self.extensions: frozenset[str] = frozenset()
        #: Region index -> size, as DEVICE_GET_REGION_INFO gave them at the
        #: open (libvfio-user answers no REGION_INFO in a stopped state).
        self.region_sizes: dict[int, int] = {}
        self.chunk_size = client.max_transfer

    @staticmethod
    async def open(path: str, protocol: str | None = None) -> RemoteDevice:
        """Connect and find out how the device migrates (``protocol`` forces
        v1 or v2); DeviceError ENOTTY if it does not."""
        client = await Client.connect(path)
        device = None
        try:
            for cls in (V2Device, V1Device):
                if protocol in (None, cls.protocol) and (device := await cls.probe(client)):
                    device.extensions = frozenset([f.name for f in cls.OPTIONAL if await client.probe(f)])
                    device.region_sizes = await _region_sizes(client)
                    return device
            raise DeviceError(errno.ENOTTY, f"{path}: the device offers no {protocol or 'v1 or v2'} migration")
        except BaseException:
            await (device or client).close()       # a v1 device's window is mapped: close it too
            raise

    @classmethod
    async def probe(cls, client: Client) -> RemoteDevice | None:
        """This protocol's device on ``client``, if the device speaks it."""
        raise NotImplementedError

    def use_only(self, flags: int) -> None:
        """Use only these optional parts of the protocol (STOP_COPY is not
        optional), as far as the device offers them."""
        self.flags = self.offered & (flags | MigFlags.STOP_COPY)

    async def close(self) -> None:
        await self.client.close()

    async def reset(self) -> None:
        await self.client.reset()

    async def state_hash(self) -> bytes | None:
        """QMPMIG_STATE_HASH, None where the device does not offer it."""
        if "QMPMIG_STATE_HASH" not in self.extensions:
            return None
        return await self.client.state_hash()

    async def state(self) -> MigState:
        raise NotImplementedError

    async def set_state(self, state: MigState) -> None:
        """One arc: the device goes from its state to ``state``."""
        raise NotImplementedError

    async def pending(self) -> int:
        """save_live_pending: bytes the device still has (an estimate in
        pre-copy; to the end of the stream in stop-copy)."""
        raise NotImplementedError

    async def read_data(self) -> bytes:
        """save_live_iterate: the next piece of the stream; empty when there
        is nothing now (pre-copy) or nothing more (stop-copy)."""
        raise NotImplementedError

    async def write_data(self, data: bytes) -> None:
        """load_state: one piece of the stream, in the order it was read."""
        await self.send_data(data)
        await self.flush()

    async def send_data(self, data: bytes) -> None:
        """:meth:`write_data`, but its acknowledgement may come later: a
        refusal surfaces at a later send_data or at :meth:`flush`."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Every piece sent is acknowledged; the first refusal raised."""


def _v2_state(value: int) -> MigState:
    """The v2 state a v1 device's device_state means; one that means none
    is the device breaking the uAPI (DeviceError EPROTO, as a malformed
    reply; MIG_DEVICE_STATE's codec already refuses one), not a ValueError
    out of the controller."""
    try:
        return v1_to_v2(value)
    except ValueError:
        raise DeviceError(errno.EPROTO, f"the device answered device_state {value:#x}, which is no state") from None


async def _region_sizes(client: Client) -> dict[int, int]:
    sizes = {}
    for index in range((await client.device_info()).num_regions):
        info, fd = await client.region_info(index)
        if fd is not None:
            os.close(fd)
        sizes[index] = info.size
    return sizes


class V2Device(RemoteDevice):
    """DEVICE_FEATURE MIG_DEVICE_STATE and MIG_DATA_READ/WRITE (vfio-user's v2)."""

    protocol = "v2"

    OPTIONAL = (Feature.MIG_DATA_SIZE, Feature.QMPMIG_PRECOPY_INFO, Feature.QMPMIG_STATE_HASH)
    #: Each MIG_DATA_READ is one request and the server answers in order
    #: (spec: commands are processed in order), so reads queue up on the
    #: socket and the device never waits for the next one.
    read_ahead = 3

    def __init__(self, client: Client, flags: int):
        super().__init__(client, flags)
        #: The last pre-copy read found nothing to read (the stream's own
        #: word on pending data where the device has no pre-copy info).
        self.drained = False
        #: MIG_DATA_WRITE replies still to come, oldest first.
        self._unacked: collections.deque[asyncio.Future] = collections.deque()

    @classmethod
    async def probe(cls, client: Client) -> V2Device | None:
        if not await client.probe(Feature.MIGRATION):
            return None
        return cls(client, await client.migration_flags())

    async def state(self) -> MigState:
        return MigState(await self.client.device_state())

    async def set_state(self, state: MigState) -> None:
        await self.client.set_device_state(state)

    async def pending(self) -> int:
        """Pre-copy: QMPMIG_PRECOPY_INFO where offered, else what the last
        read said (nothing to read now: 0; else a chunk at least).
        STOP_COPY: MIG_DATA_SIZE where offered, else a chunk until the
        stream ends."""
        state = await self.state()
        precopy = state in (MigState.PRE_COPY, MigState.PRE_COPY_P2P)
        if not precopy and state is not MigState.STOP_COPY:
            return 0
        if ("QMPMIG_PRECOPY_INFO" if precopy else "MIG_DATA_SIZE") not in self.extensions:
            return 0 if self.drained else self.chunk_size
        if precopy:
            info = await self.client.precopy_info()
            return info.initial_bytes + info.dirty_bytes
        return await self.client.mig_data_size()

    async def read_data(self) -> bytes:
        data = await self.client.mig_data_read(self.chunk_size)
        self.drained = not data
        return data

    async def send_data(self, data: bytes) -> None:
        for pos in range(0, len(data), self.chunk_size):
            while len(self._unacked) >= WRITE_AHEAD:
                await self._unacked.popleft()
            self._unacked.append(await self.client.submit_mig_data_write(data[pos:pos + self.chunk_size]))

    async def flush(self) -> None:
        try:
            while self._unacked:
                await self._unacked.popleft()
        finally:
            for reply in self._unacked:
                reply.cancel()
            self._unacked.clear()


@dataclass
class MigrationRegion:
    """Where a v1 device's migration region is, and its data window if the
    device offers it for mmap (SPARSE_MMAP)."""

    index: int
    size: int
    mem: mmap.mmap | None = None
    mmap_start: int = 0
    mmap_size: int = 0

    def mapped(self, offset: int, size: int) -> int | None:
        """The window offset of region bytes [offset, offset+size), if mapped."""
        if self.mem is not None and self.mmap_start <= offset and offset + size <= self.mmap_start + self.mmap_size:
            return offset - self.mmap_start
        return None


def _map_window(fd: int, offset: int, size: int) -> mmap.mmap:
    """A v1 device's data window, mapped from the fd it offered; DeviceError
    if the fd cannot back it: not mappable there, or a file that ends
    before the window does (mmap's ValueError; a read there would be a
    SIGBUS in the controller; a device that shrinks the file afterwards
    can still bring one about)."""
    try:
        return mmap.mmap(fd, size, offset=offset)
    except (OSError, ValueError, OverflowError) as err:
        raise DeviceError(errno.EINVAL, f"cannot map the migration region's window: {err}") from None


class V1Device(RemoteDevice):
    """The v1 migration region (VFIO_REGION_TYPE_MIGRATION, kernels 5.8-5.17),
    with seed 000's NDMA where the device takes it."""

    protocol = "v1"

    def __init__(self, client: Client, flags: int, region: MigrationRegion):
        super().__init__(client, flags)
        self.region = region

    @classmethod
    async def probe(cls, client: Client) -> V1Device | None:
        region = await cls._find_region(client)
        if region is None:
            return None
        device = cls(client, MigFlags.STOP_COPY | MigFlags.PRE_COPY, region)
        try:
            if await device._takes_ndma():
                device.offered = device.flags = device.flags | MigFlags.P2P
        except BaseException:
            if region.mem:              # else held, fd and all, until the garbage collector finds it
                region.mem.close()
            raise
        return device

    @staticmethod
    async def _find_region(client: Client) -> MigrationRegion | None:
        info = await client.device_info()
        for index in range(PCI_NUM_REGIONS, info.num_regions):
            region, fd = await client.region_info(index)
            caps = {type(c): c for c in region.caps}
            kind = caps.get(codec.TypeCap)
            sparse = caps.get(codec.SparseMmapCap)
            try:
                if not kind or (kind.type, kind.subtype) != MIGRATION_REGION_TYPE:
                    continue
                found = MigrationRegion(index, region.size)
                if fd is not None and sparse and sparse.areas \
                        and _cannot_shrink(fd, region.offset + sum(sparse.areas[0])):
                    found.mmap_start, found.mmap_size = sparse.areas[0]
                    found.mem = _map_window(fd, region.offset + found.mmap_start, found.mmap_size)
                return found
            finally:
                if fd is not None:
                    os.close(fd)
        return None

    async def _takes_ndma(self) -> bool:
        """NDMA is seed 000's proposal, not a flag a v1 device reports: ask
        a RUNNING device to enter NDMA|RUNNING and go back."""
        if await self.get("device_state") != V1.RUNNING:
            return False
        try:
            await self.set("device_state", V1.NDMA | V1.RUNNING)
        except OSError:
            return False
        await self.set("device_state", V1.RUNNING)
        return True

    async def close(self) -> None:
        if self.region.mem:
            self.region.mem.close()
        await super().close()

    # -- struct vfio_device_migration_info and the data window ------------

    async def get(self, name: str) -> int:
        field = MIGRATION_INFO[name]
        return field.unpack(await self.client.region_read(self.region.index, field.offset, field.size))

    async def set(self, name: str, value: int) -> None:
        field = MIGRATION_INFO[name]
        await self.client.region_write(self.region.index, field.offset, field.pack(value))

    async def window_read(self, offset: int, size: int) -> bytes:
        start = self.region.mapped(offset, size)
        if start is not None:
            return bytes(self.region.mem[start:start + size])
        parts = []
        for pos in range(offset, offset + size, self.chunk_size):
            parts.append(await self.client.region_read(self.region.index, pos,
                                                       min(self.chunk_size, offset + size - pos)))
        return b"".join(parts)

    async def window_write(self, offset: int, data: bytes) -> None:
        start = self.region.mapped(offset, len(data))
        if start is not None:
            self.region.mem[start:start + len(data)] = data
            return
        for pos in range(0, len(data), self.chunk_size):
            await self.client.region_write(self.region.index, offset + pos, data[pos:pos + self.chunk_size])

    # -- the v2 words --------------------------------------------------------

    async def state(self) -> MigState:
        return _v2_state(await self.get("device_state"))

    async def set_state(self, state: MigState) -> None:
        """One device_state write of the state's v1 twin (NDMA for the P2P states)."""
        await self.set("device_state", v2_to_v1(state))

    async def pending(self) -> int:
        return await self.get("pending_bytes")

    async def read_data(self) -> bytes:
        for _ in range(V1_EMPTY_ITERATIONS):
            if not await self.get("pending_bytes"):
                return b""
            offset = await self.get("data_offset")
            size = await self.get("data_size")
            if size:
                return await self.window_read(offset, size)
        return b""

    async def send_data(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            offset = await self.get("data_offset")
            window = min(self.region.mmap_size or self.chunk_size, self.region.size - offset)
            if window <= 0:
                raise DeviceError(errno.EINVAL, f"data_offset {offset:#x} is outside the "
                                                f"{self.region.size:#x}-byte region")
            piece = data[pos:pos + window]
            await self.window_write(offset, piece)
            await self.set("data_size", len(piece))
            pos += len(piece)


async def drain(src: RemoteDevice, dst: RemoteDevice | None = None) -> int:
    """Read the source's data until it has none (now, or ever), writing each
    piece to ``dst``; return the bytes moved."""
    if dst is None:
        return await relay(src.read_data, None, depth=src.read_ahead)
    return await relay(src.read_data, dst.send_data, flush=dst.flush, depth=src.read_ahead)


async def relay(read: Callable[[], Awaitable[bytes]], write: Callable[[bytes], Awaitable[None]] | None,
                more: Callable[[int], bool] = lambda moved: True, depth: int = 1,
                flush: Callable[[], Awaitable[None]] | None = None) -> int:
    """Read until a read brings nothing (or ``more(moved)`` says enough),
    writing each piece in order, then ``flush()``.  Pipelined: up to
    ``depth`` reads are in flight while a piece is written (and ``write``
    may return before its piece is acknowledged).  A read that brings
    nothing stops new ones; those in flight are still written.  The bytes
    moved."""
    moved, reads = 0, collections.deque()
    try:
        while True:
            while len(reads) < depth and more(moved):
                reads.append(asyncio.ensure_future(read()))
            if not reads:
                break
            data = await reads.popleft()
            if not data:
                depth = 0
            elif write is not None:
                await write(data)
            moved += len(data)
        if flush is not None:
            await flush()
    finally:
        for task in reads:
            if not task.cancel() and not task.cancelled():
                task.exception()            # retrieved: the first failure is raised
    return moved


def _cannot_shrink(fd: int, end: int) -> bool:
    """Whether the window up to ``end`` of a device's region fd may be
    mapped: the file reaches that far and is sealed against shrinking
    (F_SEAL_SHRINK).  A device that could shrink it under the mapping would
    kill this process by SIGBUS on the next access; its region is then
    read and written through messages instead."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK) and os.fstat(fd).st_size >= end
    except OSError:
        return False
