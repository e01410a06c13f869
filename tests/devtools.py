"""Helpers for tests that drive a reference device through a client."""

import os
import struct

from qmpmig.device.model import CTRL_DMA_ENABLE, REGISTERS

RING_IOVA = 0x10_0000


def guest_memory(size: int) -> int:
    """A memfd standing in for guest RAM."""
    fd = os.memfd_create("qmpmig-test-guest")
    os.ftruncate(fd, size)
    return fd


async def reg_write(client, name: str, value: int) -> None:
    off, fmt, _ = REGISTERS[name]
    await client.region_write(0, off, struct.pack(fmt, value))


async def reg_read(client, name: str) -> int:
    off, fmt, _ = REGISTERS[name]
    return struct.unpack(fmt, await client.region_read(0, off, struct.calcsize(fmt)))[0]


async def start_dma(client, mem_fd: int, mem_size: int, ring_size: int = 64 << 10,
                    iova: int = RING_IOVA, rate: int | None = None) -> None:
    """Map the memory at ``iova`` and let the device's DMA engine write
    records into a ring at its start."""
    await client.dma_map(iova, mem_size, os.dup(mem_fd))
    await reg_write(client, "ring_iova", iova)
    await reg_write(client, "ring_size", ring_size)
    if rate:
        await reg_write(client, "dma_rate", rate)
    await reg_write(client, "ctrl", CTRL_DMA_ENABLE)
