"""A migratable vfio-user device as the controller drives it, v1 or v2.

:class:`Device` hides which protocol the device speaks behind the v2 words:
``set_state(MigState)``, ``read_data()`` (one save_live_iterate step),
``write_data()`` (one load step), ``pending()``.  v2 uses MIG_DEVICE_STATE
and MIG_DATA_READ/WRITE; v1 writes the v1 twin of each state into the
migration region's device_state and runs the iteration of seed 001 over
pending_bytes, data_offset and data_size, moving the data through the
region's mmap'd window when it offers one.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from dataclasses import dataclass

from .states import MigFlags, MigState, V1, v1_to_v2, v2_to_v1
from .vfio_user import wire
from .vfio_user.client import Client

V1_REGION_TYPE = (3, 1)
#: struct vfio_device_migration_info: name -> (offset, format).
V1_FIELDS = {"device_state": (0, "<I"), "pending_bytes": (8, "<Q"),
             "data_offset": (16, "<Q"), "data_size": (24, "<Q")}
#: Seed 001: only pending_bytes == 0 ends the data; an iteration may bring
#: nothing while pending_bytes says more is coming.  Give it this many tries.
V1_EMPTY_ITERATIONS = 100


@dataclass
class V1Region:
    index: int
    size: int
    mem: mmap.mmap | None
    mmap_start: int
    mmap_size: int


class Device:
    """One device behind a vfio-user client."""

    def __init__(self, client: Client, protocol: str, flags: int, region: V1Region | None):
        self.client = client
        self.protocol = protocol
        self.flags = flags
        self.v1 = region
        self.chunk_size = min(client.max_transfer, 1 << 20)

    @classmethod
    async def open(cls, path: str, protocol: str | None = None) -> "Device":
        """Connect and find out how the device migrates (``protocol`` forces
        v1 or v2)."""
        client = await Client.connect(path)
        try:
            if protocol in (None, "v2") and await client.probe(wire.Feature.MIGRATION):
                return cls(client, "v2", await client.migration_flags(), None)
            if protocol in (None, "v1"):
                region = await cls._find_v1_region(client)
                if region:
                    device = cls(client, "v1", MigFlags.STOP_COPY | MigFlags.PRE_COPY, region)
                    if await device._v1_has_ndma():
                        device.flags |= MigFlags.P2P
                    return device
            raise ValueError(f"{path}: the device offers no {protocol or 'v1 or v2'} migration")
        except BaseException:
            await client.close()
            raise

    @staticmethod
    async def _find_v1_region(client: Client) -> V1Region | None:
        info = await client.device_info()
        for index in range(9, info.num_regions):
            region, fd = await client.region_info(index)
            caps = {type(c): c for c in region.caps}
            kind = caps.get(wire.TypeCap)
            if not kind or (kind.type, kind.subtype) != V1_REGION_TYPE:
                if fd is not None:
                    os.close(fd)
                continue
            mem, start, size = None, 0, 0
            sparse = caps.get(wire.SparseMmapCap)
            if fd is not None and sparse and sparse.areas:
                start, size = sparse.areas[0]
                mem = mmap.mmap(fd, size, offset=region.offset + start)
                os.close(fd)
            return V1Region(index, region.size, mem, start, size)
        return None

    async def _v1_has_ndma(self) -> bool:
        """NDMA is seed 000's proposal, not a flag a v1 device reports: ask
        a RUNNING device to enter NDMA|RUNNING and go back."""
        if await self.v1_get("device_state") != V1.RUNNING:
            return False
        try:
            await self.v1_set("device_state", V1.NDMA | V1.RUNNING)
        except OSError:
            return False
        await self.v1_set("device_state", V1.RUNNING)
        return True

    async def close(self) -> None:
        if self.v1 and self.v1.mem:
            self.v1.mem.close()
        await self.client.close()

    # -- v1 region fields ---------------------------------------------------

    async def v1_get(self, name: str) -> int:
        off, fmt = V1_FIELDS[name]
        return struct.unpack(fmt, await self.client.region_read(self.v1.index, off, struct.calcsize(fmt)))[0]

    async def v1_set(self, name: str, value: int) -> None:
        off, fmt = V1_FIELDS[name]
        await self.client.region_write(self.v1.index, off, struct.pack(fmt, value))

    async def v1_window_read(self, offset: int, size: int) -> bytes:
        v1 = self.v1
        if v1.mem is not None and v1.mmap_start <= offset and offset + size <= v1.mmap_start + v1.mmap_size:
            start = offset - v1.mmap_start
            return bytes(v1.mem[start:start + size])
        parts = []
        for pos in range(offset, offset + size, self.chunk_size):
            parts.append(await self.client.region_read(v1.index, pos, min(self.chunk_size, offset + size - pos)))
        return b"".join(parts)

    async def v1_window_write(self, offset: int, data: bytes) -> None:
        v1 = self.v1
        if v1.mem is not None and v1.mmap_start <= offset and offset + len(data) <= v1.mmap_start + v1.mmap_size:
            start = offset - v1.mmap_start
            v1.mem[start:start + len(data)] = data
            return
        for pos in range(0, len(data), self.chunk_size):
            await self.client.region_write(v1.index, offset + pos, data[pos:pos + self.chunk_size])

    # -- the v2 words -------------------------------------------------------

    async def state(self) -> MigState:
        if self.protocol == "v2":
            return MigState(await self.client.device_state())
        return v1_to_v2(await self.v1_get("device_state"))

    async def set_state(self, state: MigState) -> None:
        """One MIG_DEVICE_STATE set (v2), or one device_state write of the
        state's v1 twin (v1: NDMA for the P2P states)."""
        if self.protocol == "v2":
            await self.client.set_device_state(state)
        else:
            await self.v1_set("device_state", v2_to_v1(state))

    async def pending(self) -> int:
        """save_live_pending: bytes the device still has (an estimate in
        pre-copy; to the end of the stream in stop-copy)."""
        if self.protocol == "v1":
            return await self.v1_get("pending_bytes")
        state = await self.state()
        if state in (MigState.PRE_COPY, MigState.PRE_COPY_P2P):
            info = await self.client.precopy_info()
            return info.initial_bytes + info.dirty_bytes
        return await self.client.mig_data_size() if state is MigState.STOP_COPY else 0

    async def read_data(self) -> bytes:
        """save_live_iterate: the next piece of the stream; empty when there
        is nothing now (pre-copy) or nothing more (stop-copy)."""
        if self.protocol == "v2":
            return await self.client.mig_data_read(self.chunk_size)
        for _ in range(V1_EMPTY_ITERATIONS):
            if not await self.v1_get("pending_bytes"):
                return b""
            offset = await self.v1_get("data_offset")
            size = await self.v1_get("data_size")
            if size:
                return await self.v1_window_read(offset, size)
        return b""

    async def write_data(self, data: bytes) -> None:
        """load_state: one piece of the stream, in the order it was read."""
        if self.protocol == "v2":
            for pos in range(0, len(data), self.chunk_size):
                await self.client.mig_data_write(data[pos:pos + self.chunk_size])
            return
        pos = 0
        while pos < len(data):
            offset = await self.v1_get("data_offset")
            window = min(self.v1.mmap_size or self.chunk_size, self.v1.size - offset)
            if window <= 0:
                raise OSError(errno.EINVAL, f"data_offset {offset:#x} is outside the {self.v1.size:#x}-byte region")
            piece = data[pos:pos + window]
            await self.v1_window_write(offset, piece)
            await self.v1_set("data_size", len(piece))
            pos += len(piece)

    async def reset(self) -> None:
        await self.client.reset()

    async def state_hash(self) -> bytes:
        return await self.client.state_hash()


async def drain(src: Device, dst: Device | None = None) -> int:
    """Read the source's data until it has none (now, or ever), writing each
    piece to ``dst``; return the bytes moved."""
    moved = 0
    while data := await src.read_data():
        if dst is not None:
            await dst.write_data(data)
        moved += len(data)
    return moved
