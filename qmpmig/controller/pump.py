"""The data path between a source device and its destination twin: the
device's migration stream, and the guest pages it dirtied by DMA.

QEMU's RAM migration only sees pages the vCPUs dirtied.  A device writing
guest RAM through its DMA_MAP fd is invisible to it, so the controller
reads each source device's DMA dirty log (uAPI DMA_LOGGING_REPORT: read and
clear) and, once QEMU's RAM load is done, copies those pages itself.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..migration import fsm
from ..vfio_user.uapi import PAGE_SIZE, bitmap_pages
from .devices import relay
from .side import DeviceEnd
from .walk import Walker


@dataclass(eq=False)
class Pair:
    """A device on the source and its counterpart on the destination."""

    name: str
    src: DeviceEnd
    dst: DeviceEnd
    #: Guest pages (by number) the source device wrote by DMA this migration.
    dirty: set[int] = field(default_factory=set)
    #: Stream bytes moved from source to destination this migration, and
    #: the seconds spent moving them.
    sent: int = 0
    moved_seconds: float = 0.0
    #: QMPMIG_STATE_HASH of the source at the end of its stream and of the
    #: destination once it left RESUMING (None where the device has none).
    src_hash: bytes | None = None
    dst_hash: bytes | None = None
    #: What the hashes are of: "QMPMIG_STATE_HASH" or "regions I,J".
    compared: str | None = None

    @property
    def rate(self) -> float | None:
        """Bytes per second the stream has moved at, this migration."""
        return self.sent / self.moved_seconds if self.moved_seconds else None


def _flip(piece: bytes) -> bytes:
    bent = bytearray(piece)
    bent[len(bent) // 2] ^= 0x01
    return bytes(bent)


#: ``--debug spoil-HOW``: the negative controls of the device stream's
#: integrity (issue 14, item 4).  What each does to a device's stream on its
#: way to the destination, by the number of the piece read (from 1), given
#: the first two pieces kept: the pieces written instead.
SPOIL: dict[str, Callable[[int, bytes, dict[int, bytes]], list[bytes]]] = {
    "flip": lambda n, piece, kept: [_flip(piece)] if n == 2 else [piece],
    "truncate": lambda n, piece, kept: [piece[:len(piece) // 2]] if n == 2 else [piece],
    "reorder": lambda n, piece, kept: [] if n == 2 else [piece, kept[2]] if n == 3 else [piece],
    "duplicate": lambda n, piece, kept: [piece, piece] if n == 2 else [piece],
    "replay": lambda n, piece, kept: [piece, kept[1]] if n == 3 else [piece],
}


class Spoiler:
    """One device stream bent as :data:`SPOIL` says."""

    def __init__(self, how: str):
        self.how, self.n, self.kept = SPOIL[how], 0, {}

    def __call__(self, piece: bytes) -> list[bytes]:
        self.n += 1
        if self.n <= 2:
            self.kept[self.n] = piece
        return self.how(self.n, piece, self.kept)


class Pump:
    """Moves stream data and reads DMA logs, every request bounded."""

    def __init__(self, walker: Walker, regions: tuple[int, ...] = (), spoil: str | None = None):
        self.walker = walker
        #: Regions whose contents stand for the state of a device without
        #: QMPMIG_STATE_HASH.
        self.regions = regions
        #: A negative control's way of bending every stream (SPOIL), if any.
        self.spoil = spoil
        self._spoilers: dict[str, Spoiler] = {}

    async def move(self, pair: Pair, limit: int | None = None, seconds: float | None = None) -> int:
        """Source data to the destination device until none is available
        (or ``limit`` bytes, or ``seconds``, have gone: pre-copy comes back
        up for air)."""
        src, dst = pair.src, pair.dst
        if src.state not in fsm.SAVING_GROUP:
            return 0
        start = time.monotonic()
        until = start + seconds if seconds is not None else float("inf")
        async def write(data: bytes) -> None:
            for piece in spoiler(data) if spoiler else (data,):
                await self.walker.call(dst, dst.device.send_data(piece), "a data write")

        spoiler = self.spoil and self._spoilers.setdefault(pair.name, Spoiler(self.spoil))
        moved = await relay(lambda: self.walker.call(src, src.device.read_data(), "a data read"), write,
                            lambda moved: (limit is None or moved < limit) and time.monotonic() < until,
                            depth=src.device.read_ahead,
                            flush=lambda: self.walker.call(dst, dst.device.flush(), "a data write"))
        if moved:
            pair.sent += moved
            pair.moved_seconds += time.monotonic() - start
            src.side.trace.emit("data", side=src.side.name, device=pair.name, bytes=moved)
        return moved

    async def dma_report(self, pair: Pair) -> None:
        """Read and clear a source device's DMA dirty log over all guest RAM."""
        src = pair.src
        report = src.device.client.dma_logging_report(0, src.side.ram.size, PAGE_SIZE)
        pages = set(bitmap_pages(await self.walker.call(src, report, "DMA_LOGGING_REPORT")))
        pair.dirty |= pages
        src.side.trace.emit("dma_dirty", side=src.side.name, device=pair.name, pages=len(pages))

    async def state_hash(self, pair: Pair, end: DeviceEnd) -> bytes | None:
        """The device's QMPMIG_STATE_HASH, None where it has none."""
        try:
            digest = await self.walker.call(end, end.device.state_hash(), "QMPMIG_STATE_HASH")
        except OSError:
            return None
        if digest:
            pair.compared = "QMPMIG_STATE_HASH"
        return digest

    async def region_hash(self, pair: Pair, end: DeviceEnd) -> bytes | None:
        """For a device without QMPMIG_STATE_HASH: a SHA-256 of the
        contents of the regions the options name (what a driver reads
        through its BARs), taken in STOP (libvfio-user refuses region
        access in STOP_COPY); None where no region is named."""
        if not self.regions:
            return None
        digest = hashlib.sha256()
        for index in self.regions:
            size = end.device.region_sizes.get(index, 0)
            for offset in range(0, size, end.device.chunk_size):
                count = min(end.device.chunk_size, size - offset)
                digest.update(await self.walker.call(end, end.device.client.region_read(index, offset, count),
                                                     f"a read of region {index}"))
        pair.compared = "regions " + ",".join(map(str, self.regions))
        return digest.digest()
