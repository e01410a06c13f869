"""What a guest driver would do with the reference device: program BAR0.

qmpmig's rigs have no guest driver for the device, so the controller's
side plays it: map memory, point the DMA ring at it, enable the engine
(PROTOCOL.md, "BAR0 registers").
"""

from __future__ import annotations

import struct

from .model import CTRL_DMA_ENABLE, REGISTERS

BAR0 = 0


async def write_register(client, name: str, value: int) -> None:
    off, fmt, _ = REGISTERS[name]
    await client.region_write(BAR0, off, struct.pack(fmt, value))


async def read_register(client, name: str) -> int:
    off, fmt, _ = REGISTERS[name]
    return struct.unpack(fmt, await client.region_read(BAR0, off, struct.calcsize(fmt)))[0]


async def start_ring(client, iova: int, size: int, rate: int | None = None) -> None:
    """Point the DMA engine at [iova, iova+size) (already DMA_MAP'd) and start it."""
    await write_register(client, "ring_iova", iova)
    await write_register(client, "ring_size", size)
    if rate:
        await write_register(client, "dma_rate", rate)
    await write_register(client, "ctrl", CTRL_DMA_ENABLE)
