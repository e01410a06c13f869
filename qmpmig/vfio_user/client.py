"""An asyncio vfio-user client: one connection to one device server.

Typed calls for every command qmpmig uses, DEVICE_FEATURE helpers for the
migration features, and the answer to the server's commands: an IO page
request (qmpmig vendor extension) is passed to :attr:`Client.on_page_request`,
whose return completes it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Any, Awaitable, Callable

from ..errors import RemoteProtocolError
from . import codec
from .codec import Command
from .transport import Endpoint
from .uapi import PAGE_SIZE, DmaFlags, Feature, FeatureFlags, dirty_bitmap_size

#: VERSION this side proposes.
MAJOR, MINOR = 0, 1


async def _complete_at_once(request: codec.PageRequest) -> None:
    return None


class Client(Endpoint):
    """The client end.  ``capabilities`` holds what the server agreed to."""

    inline_commands = False

    def __init__(self, sock: socket.socket, max_data_xfer_size: int = codec.QMPMIG_MAX_DATA_XFER):
        super().__init__(sock, codec.Party.CLIENT, max_data_xfer_size=max_data_xfer_size, max_msg_fds=8)
        self.capabilities: dict = {}
        self.on_page_request: Callable[[codec.PageRequest], Awaitable[None]] = _complete_at_once

    @classmethod
    async def connect(cls, path: str, **kw: Any) -> "Client":
        """Connect to a device socket and negotiate VERSION."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
        except OSError:
            sock.close()
            raise
        client = cls(sock, **kw)
        client.start()
        try:
            await client._negotiate()
        except BaseException:
            await client.close()
            raise
        return client

    async def _negotiate(self) -> None:
        caps = {"max_msg_fds": 8, "max_data_xfer_size": self.conn.max_data_xfer_size}
        reply = await self.request(Command.VERSION, codec.Version(MAJOR, MINOR, caps))
        for fd in reply.fds:            # the one a VERSION reply may carry: qmpmig has no use for it
            os.close(fd)
        version = reply.payload
        if version.major != MAJOR or version.minor > MINOR:
            raise RemoteProtocolError(f"server answered version {version.major}.{version.minor}")
        self.capabilities = version.capabilities
        peer_max = self.capabilities.get("max_data_xfer_size", codec.DEFAULT_MAX_DATA_XFER)
        self.max_transfer = min(peer_max, self.conn.max_data_xfer_size)

    async def handle_command(self, msg: codec.Message):
        if msg.cmd == Command.QMPMIG_PAGE_REQUEST:
            await self.on_page_request(msg.payload)
            return msg.payload, ()
        raise OSError(errno.EINVAL, f"this client serves no {msg.cmd!r}")

    # -- device -------------------------------------------------------------

    async def device_info(self) -> codec.DeviceInfo:
        return (await self.request(Command.DEVICE_GET_INFO, codec.DeviceInfo.sized(0, 0, 0))).payload

    async def region_info(self, index: int, argsz: int = 512) -> tuple[codec.RegionInfo, int | None]:
        reply = await self.request(Command.DEVICE_GET_REGION_INFO,
                                   codec.RegionInfo(argsz, 0, index, 0, 0, 0))
        return reply.payload, (reply.fds[0] if reply.fds else None)

    async def irq_info(self, index: int) -> codec.IrqInfo:
        return (await self.request(Command.DEVICE_GET_IRQ_INFO, codec.IrqInfo.sized(0, index, 0))).payload

    async def set_irqs(self, index: int, flags: int, start: int, count: int,
                       data: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        await self.request(Command.DEVICE_SET_IRQS,
                           codec.SetIrqs.sized(flags, index, start, count, data), fds)

    async def region_read(self, region: int, offset: int, count: int) -> bytes:
        reply = await self.request(Command.REGION_READ, codec.RegionAccess(offset, region, count))
        return reply.payload.data

    async def region_write(self, region: int, offset: int, data: bytes) -> None:
        await self.request(Command.REGION_WRITE, codec.RegionAccess(offset, region, len(data), data))

    async def reset(self) -> None:
        await self.request(Command.DEVICE_RESET, codec.Empty())

    async def dma_map(self, address: int, size: int, fd: int | None, offset: int = 0,
                      flags: int = DmaFlags.READ | DmaFlags.WRITE) -> None:
        await self.request(Command.DMA_MAP, codec.DmaMap(flags, offset, address, size),
                           () if fd is None else (fd,))

    async def dma_unmap(self, address: int, size: int) -> None:
        await self.request(Command.DMA_UNMAP, codec.DmaUnmap.sized(0, address, size))

    # -- DEVICE_FEATURE -----------------------------------------------------

    async def feature(self, feature: int, flags: int, data: bytes = b"", reply_room: int = 0) -> bytes:
        """DEVICE_FEATURE; returns the reply's data (the feature's, for GET)."""
        reply = await self.request(Command.DEVICE_FEATURE,
                                   codec.DeviceFeature.sized(flags | feature, data, room=max(0, reply_room - len(data))))
        return reply.payload.data

    async def probe(self, feature: int, flags: int = FeatureFlags.GET) -> bool:
        try:
            await self.feature(feature, FeatureFlags.PROBE | flags)
        except OSError:
            return False
        return True

    async def migration_flags(self) -> int:
        data = await self.feature(Feature.MIGRATION, FeatureFlags.GET, reply_room=8)
        return codec.MigrationData.unpack(data).flags

    async def device_state(self) -> int:
        data = await self.feature(Feature.MIG_DEVICE_STATE, FeatureFlags.GET, reply_room=8)
        return codec.MigDeviceStateData.unpack(data).device_state

    async def set_device_state(self, state: int) -> None:
        await self.feature(Feature.MIG_DEVICE_STATE, FeatureFlags.SET,
                           codec.MigDeviceStateData(int(state)).pack())

    async def mig_data_size(self) -> int:
        data = await self.feature(Feature.MIG_DATA_SIZE, FeatureFlags.GET, reply_room=8)
        return codec.MigDataSizeData.unpack(data).stop_copy_length

    async def precopy_info(self) -> codec.PrecopyInfoData:
        data = await self.feature(Feature.QMPMIG_PRECOPY_INFO, FeatureFlags.GET, reply_room=16)
        return codec.PrecopyInfoData.unpack(data)

    async def state_hash(self) -> bytes:
        data = await self.feature(Feature.QMPMIG_STATE_HASH, FeatureFlags.GET, reply_room=32)
        return codec.StateHashData.unpack(data).digest

    async def dma_logging_start(self, page_size: int, ranges: list[tuple[int, int]]) -> int:
        data = await self.feature(Feature.DMA_LOGGING_START, FeatureFlags.SET,
                                  codec.DmaLoggingControl(page_size, tuple(ranges)).pack())
        return codec.DmaLoggingControl.unpack(data).page_size

    async def dma_logging_stop(self) -> None:
        await self.feature(Feature.DMA_LOGGING_STOP, FeatureFlags.SET)

    async def dma_logging_report(self, iova: int, length: int, page_size: int = PAGE_SIZE) -> bytes:
        request = codec.DmaLoggingReport(iova, length, page_size)
        room = 24 + dirty_bitmap_size(length, page_size)
        data = await self.feature(Feature.DMA_LOGGING_REPORT, FeatureFlags.GET, request.pack(), room)
        return codec.DmaLoggingReport.unpack(data).bitmap

    # -- migration data -----------------------------------------------------

    async def mig_data_read(self, size: int) -> bytes:
        reply = await self.request(Command.MIG_DATA_READ, codec.MigDataRead.sized(size, room=size))
        return reply.payload.data

    async def mig_data_write(self, data: bytes) -> None:
        await self.request(Command.MIG_DATA_WRITE, codec.MigDataWrite.sized(len(data), data))

    async def submit_mig_data_write(self, data: bytes) -> asyncio.Future:
        """MIG_DATA_WRITE, sent; the future of its reply (pipelined writes)."""
        return await self.submit(Command.MIG_DATA_WRITE, codec.MigDataWrite.sized(len(data), data))
